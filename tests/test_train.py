"""train.py end to end on a small synthetic set, through its command line."""
import json
from pathlib import Path
import shutil
import signal
import subprocess
import sys

from PIL import Image
import pandas as pd
import pytest
import torch

from config import Config, parse_overrides
from dataset import LABEL_COLUMNS
from galaxy.checkpoints import load_model
from galaxy.training import make_optimizer, train_step
from helpers import SMALL, one_line_error, run_script, run_train, same_weights, weights, without_root_override
from model import GalaxyCNN
import train

REPO = Path(__file__).resolve().parents[1]


def test_training_writes_checkpoints_metrics_and_plot(full_run):
    out_dir, result = full_run
    for name in ("last.pt", "best.pt", "metrics.csv", "loss.png", "split.csv"):
        assert (out_dir / name).is_file(), name
    metrics = pd.read_csv(out_dir / "metrics.csv")
    assert metrics["epoch"].tolist() == [1, 2]
    assert {"train_loss", "val_rmse", "img_per_s"} <= set(metrics.columns)
    assert "test RMSE" in result.stdout and "mean-prediction baseline" in result.stdout
    checkpoint = torch.load(out_dir / "last.pt", weights_only=True)
    assert {"model", "optimizer", "scheduler", "epoch", "config", "rng", "train_mean"} <= set(checkpoint)
    assert checkpoint["epoch"] == 2 and checkpoint["config"]["epochs"] == 2
    # the mean vote fractions of the train split, predict.py's answer for an unreadable test image
    split = pd.read_csv(out_dir / "split.csv")
    labels = pd.read_csv(Path(checkpoint["config"]["processed_dir"]) / "labels.csv").set_index("GalaxyID")
    train_ids = split.loc[split["split"] == "train", "GalaxyID"]
    torch.testing.assert_close(checkpoint["train_mean"],
                               torch.tensor(labels.loc[train_ids, LABEL_COLUMNS].to_numpy().mean(0),
                                            dtype=torch.float32))


def train_here(*args):
    """train.py's train_run in this process, so a test can patch it; its signal handlers and threads are put back."""
    handlers, threads = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}, torch.get_num_threads()
    try:
        return train.train_run(parse_overrides(list(args))[0])
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
        torch.set_num_threads(threads)


def test_loss_plot_is_drawn_at_most_every_few_seconds_and_after_the_last_epoch(data_args, tmp_path, monkeypatch):
    """metrics.csv every epoch, loss.png only when PLOT_EVERY_S have passed and after the last epoch:
    on a GPU a small set's epoch can take less time than drawing the plot."""
    drawn, draw = [], train.write_metrics
    monkeypatch.setattr(train, "write_metrics", lambda *args: drawn.append(args[-1]) or draw(*args))
    monkeypatch.setattr(train, "PLOT_EVERY_S", 3600)
    assert train_here(*data_args, "--epochs=3", f"--out_dir={tmp_path}") == 0
    assert drawn == [True, False, True]   # the first epoch's, none for the next hour, the last epoch's
    assert pd.read_csv(tmp_path / "metrics.csv")["epoch"].tolist() == [1, 2, 3] and (tmp_path / "loss.png").is_file()


def test_same_seed_gives_the_same_losses_on_cpu(full_run, data_args, tmp_path):
    out_dir, _ = full_run
    run_train(*data_args, "--epochs=2", f"--out_dir={tmp_path}")
    first, second = pd.read_csv(out_dir / "metrics.csv"), pd.read_csv(tmp_path / "metrics.csv")
    assert first["train_loss"].tolist() == second["train_loss"].tolist()
    assert first["val_rmse"].tolist() == second["val_rmse"].tolist()
    assert (out_dir / "split.csv").read_text() == (tmp_path / "split.csv").read_text()


def test_resume_mid_epoch_ends_with_the_same_weights(full_run, data_args, tmp_path):
    out_dir, _ = full_run
    stopped = run_train(*data_args, "--epochs=2", "--max_steps=5", f"--out_dir={tmp_path}")
    assert "saved" in stopped.stdout
    assert torch.load(tmp_path / "last.pt", weights_only=True)["global_step"] == 5
    run_train(f"--out_dir={tmp_path}", "--resume", "--max_steps=0")
    assert same_weights(weights(out_dir / "last.pt"), weights(tmp_path / "last.pt"))
    assert pd.read_csv(out_dir / "metrics.csv").equals(
        pd.read_csv(tmp_path / "metrics.csv").assign(seconds=pd.read_csv(out_dir / "metrics.csv")["seconds"],
                                                      img_per_s=pd.read_csv(out_dir / "metrics.csv")["img_per_s"]))


def test_weight_average_warms_up_then_follows_the_trained_weights():
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    averaged = train.average_of(model)
    assert not any(parameter.requires_grad for parameter in averaged.parameters())
    start = averaged[0].weight.clone()
    with torch.no_grad():
        model[0].weight.add_(1.0)
        model[1].running_mean.fill_(2.0)
        model[1].num_batches_tracked += 5
    train.update_average(averaged, model, decay=0.99, step=1)   # the warm-up's decay 2/11, not 0.99
    torch.testing.assert_close(averaged[0].weight, start + 9 / 11)
    torch.testing.assert_close(averaged[1].running_mean, torch.full((2,), 2.0 * 9 / 11))   # BatchNorm's too
    assert averaged[1].num_batches_tracked == 5
    for step in range(2, 3000):
        train.update_average(averaged, model, decay=0.99, step=step)
    torch.testing.assert_close(averaged[0].weight, model[0].weight)
    with torch.no_grad():
        model[0].weight.add_(1.0)
    before = averaged[0].weight.clone()
    train.update_average(averaged, model, decay=0.99, step=10_000)   # past the warm-up: 1 % of the way
    torch.testing.assert_close(averaged[0].weight, before + 0.01)


def test_ema_run_validates_and_predicts_with_the_average_and_resumes_exactly(data_args, tmp_path):
    ema = [*data_args, "--ema=0.9", "--epochs=2"]
    run_train(*ema, f"--out_dir={tmp_path / 'a'}")
    run_train(*ema, "--max_steps=5", f"--out_dir={tmp_path / 'b'}")
    run_train(f"--out_dir={tmp_path / 'b'}", "--resume", "--max_steps=0")
    first, second = (torch.load(tmp_path / run / "last.pt", weights_only=True) for run in ("a", "b"))
    assert not same_weights(first["model"], first["trained_model"])   # "model" is the average
    assert same_weights(first["model"], second["model"]) and same_weights(first["trained_model"],
                                                                           second["trained_model"])
    metrics = pd.read_csv(tmp_path / "a" / "metrics.csv")
    assert metrics["train_loss"].tolist() == pd.read_csv(tmp_path / "b" / "metrics.csv")["train_loss"].tolist()
    # val RMSE during training is the averaged weights', and predict.py predicts with them
    predicted = run_script("predict.py", f"--checkpoint={tmp_path / 'a' / 'best.pt'}", "--split=val", data_args[0],
                           "--workers=1", "--amp=false", "--channels_last=false", f"--out_dir={tmp_path / 'a'}")
    assert predicted.returncode == 0, predicted.stderr[-2000:]
    model_rmse = pd.read_csv(tmp_path / "a" / "eval_val.csv")["model_rmse"][0]
    assert model_rmse == pytest.approx(metrics["val_rmse"].min(), abs=1e-5)


def test_bf16_channels_last_is_deterministic_and_resumes_exactly(data_args, tmp_path):
    """The numerics auto picks on a CPU with bf16 units: the same seed still gives the same losses,
    and a run stopped mid-epoch and resumed ends with the same weights."""
    bf16 = [*data_args, "--amp=true", "--channels_last=true", "--epochs=2"]
    run_train(*bf16, f"--out_dir={tmp_path / 'a'}")
    run_train(*bf16, "--max_steps=5", f"--out_dir={tmp_path / 'b'}")
    run_train(f"--out_dir={tmp_path / 'b'}", "--resume", "--max_steps=0")
    first, second = pd.read_csv(tmp_path / "a" / "metrics.csv"), pd.read_csv(tmp_path / "b" / "metrics.csv")
    assert first["train_loss"].tolist() == second["train_loss"].tolist()
    assert (first["numerics"] == "bf16 channels_last").all()
    assert same_weights(weights(tmp_path / "a" / "last.pt"), weights(tmp_path / "b" / "last.pt"))


def test_auto_numerics_are_timed_recorded_and_kept_on_resume(demo_processed, tmp_path):
    args = [f"--processed_dir={demo_processed.processed_dir}", "--batch_size=16", "--threads=1", "--epochs=2",
            f"--out_dir={tmp_path}"]
    first = run_train(*args, "--max_steps=2")
    assert "numerics: img/s per training step of 16: fp32 NCHW" in first.stdout
    chosen = torch.load(tmp_path / "last.pt", weights_only=True)["numerics"]
    assert set(chosen) == {"amp", "channels_last"}
    resumed = run_train(f"--out_dir={tmp_path}", "--resume", "--max_steps=0")
    assert "numerics:" not in resumed.stdout   # the recorded choice, not a new timing
    assert torch.load(tmp_path / "last.pt", weights_only=True)["numerics"] == chosen
    metrics = pd.read_csv(tmp_path / "metrics.csv")
    name = f"{'bf16' if chosen['amp'] else 'fp32'} {'channels_last' if chosen['channels_last'] else 'NCHW'}"
    assert (metrics["numerics"] == name).all()


def test_sigint_saves_last_checkpoint_and_resume_finishes_the_run(data_args, tmp_path):
    args = [sys.executable, "-u", str(REPO / "train.py"), *data_args, "--epochs=3", f"--out_dir={tmp_path / 'a'}"]
    process = subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    for line in process.stdout:  # wait until training is under way
        if line.startswith("epoch 1:"):
            break
    process.send_signal(signal.SIGINT)
    output = process.stdout.read()
    assert process.wait(timeout=120) == 128 + signal.SIGINT
    assert "stopped by signal" in output
    saved = torch.load(tmp_path / "a" / "last.pt", weights_only=True)
    assert 1 <= saved["epoch"] < 3
    run_train(f"--out_dir={tmp_path / 'a'}", "--resume")
    run_train(*data_args, "--epochs=3", f"--out_dir={tmp_path / 'b'}")
    assert same_weights(weights(tmp_path / "a" / "last.pt"), weights(tmp_path / "b" / "last.pt"))


def test_two_process_gloo_run(data_args, tmp_path):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(REPO / "train.py"), *data_args, "--epochs=3", "--max_steps=3", f"--out_dir={tmp_path}"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "x 2" in result.stdout and result.stdout.count("stopped by max_steps") == 1  # rank 0 speaks
    assert torch.load(tmp_path / "last.pt", weights_only=True)["global_step"] == 3


# --- a diverging run ---------------------------------------------------------------------------
# the demo set's 76 training galaxies at batch_size 16: 4 steps an epoch

def all_finite(path):
    return all(torch.isfinite(tensor).all() for tensor in weights(path).values() if tensor.is_floating_point())


def last_error_line(stderr):
    """The line after the progress bars: the run's one-line error."""
    assert "Traceback" not in stderr, stderr[-2000:]
    return stderr.replace("\r", "\n").strip().splitlines()[-1]


def test_a_learning_rate_far_too_high_stops_at_the_first_nan_loss_and_saves_nothing(data_args, tmp_path):
    result = run_train(*data_args, "--epochs=3", "--lr=1e20", f"--out_dir={tmp_path}", check=False)
    error = last_error_line(result.stderr)
    assert result.returncode == 1 and error.startswith("error: the training loss is nan at step "), error
    assert "(epoch 1, batch" in error and "the learning rate is probably too high for this data: try a lower --lr" \
        in error and "nothing of this run was saved" in error
    assert not list(tmp_path.glob("*.pt")) and "test RMSE" not in result.stdout


def test_a_resumed_run_that_diverges_keeps_last_pt_from_before(full_run, tmp_path):
    for name in ("last.pt", "best.pt", "split.csv", "metrics.csv"):
        shutil.copy(full_run[0] / name, tmp_path / name)
    before = {name: (tmp_path / name).read_bytes() for name in ("last.pt", "best.pt", "metrics.csv")}
    result = run_train(f"--out_dir={tmp_path}", "--resume", "--epochs=3", "--lr=1e20", check=False)
    error = last_error_line(result.stderr)
    assert result.returncode == 1 and "(epoch 3, batch" in error, error
    assert f"{tmp_path}/last.pt is kept from step 8, before the divergence" in error
    assert {name: (tmp_path / name).read_bytes() for name in before} == before   # not a byte written
    assert all_finite(tmp_path / "last.pt")


def nan_at(step, poison_weights=False):
    """train_step, but its step-th call returns a nan loss, or (poison_weights) leaves nan weights
    behind a finite loss, as the last step before a save may."""
    calls = []

    def patched(model, *args):
        loss = train_step(model, *args)
        calls.append(step)
        if len(calls) == step and poison_weights:
            with torch.no_grad():
                next(model.parameters()).fill_(float("nan"))
        return torch.tensor(float("nan")) if len(calls) == step and not poison_weights else loss
    return patched


@pytest.mark.parametrize("step, poison_weights, args, said, kept_step", [
    (6, False, [], "the training loss is nan at step 6 (epoch 2, batch 2 of 4)", 4),
    (8, True, [], "the validation RMSE is not finite after epoch 2 (step 8)", 4),
    (10, True, ["--train_on_val"], "the weights are not finite after step 10", 5),   # 86 galaxies: 5 steps
    (3, True, ["--max_steps=3"], "the weights are not finite after step 3", None),
])
def test_non_finite_loss_or_weights_are_never_saved(data_args, tmp_path, monkeypatch, capsys, step, poison_weights,
                                                     args, said, kept_step):
    """Mid-epoch, at an epoch's end (with or without val) and at a max_steps stop: the run ends with
    exit code 1 and the one-line error, and every checkpoint on disk is from before, with finite weights."""
    monkeypatch.setattr(train, "train_step", nan_at(step, poison_weights))
    assert train_here(*data_args, "--epochs=3", f"--out_dir={tmp_path}", *args) == 1
    error = last_error_line(capsys.readouterr().err)
    assert error.startswith(f"error: {said}: the learning rate is probably too high"), error
    if kept_step is None:
        assert not list(tmp_path.glob("*.pt")) and "nothing of this run was saved" in error
        return
    assert f"last.pt is kept from step {kept_step}, before the divergence" in error
    for name in ("last.pt", "best.pt"):
        checkpoint = torch.load(tmp_path / name, weights_only=True)
        assert (checkpoint["epoch"], checkpoint["global_step"]) == (1, kept_step) and all_finite(tmp_path / name)
    assert pd.read_csv(tmp_path / "metrics.csv")["epoch"].tolist() == [1]


def test_two_process_run_stops_together_at_a_nan_loss(data_args, tmp_path):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(REPO / "train.py"), *data_args, "--epochs=1", "--lr=1e20", f"--out_dir={tmp_path}"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    # rank 0 says why; torchrun then reports the failed processes
    assert result.returncode != 0 and result.stderr.count("error: the training loss is") == 1, result.stderr[-3000:]
    assert "exitcode  : 1" in result.stderr and not list(tmp_path.glob("*.pt"))


# --- impossible requests ------------------------------------------------------------------------

@pytest.mark.parametrize("args, fragment", [
    (["--batch_size=0"], "batch_size must be a positive integer"),
    (["--lr=-0.1"], "lr must be positive"),
    (["--resume"], "last.pt not found"),
    (["--init_from=x.pt", "--resume"], "pass only one of them"),
    (["--image_size=32"], "were made with image_size=64"),   # the PNGs are 64 px: never silently 64
])
def test_impossible_requests_are_one_line_errors(data_args, tmp_path, args, fragment):
    result = run_train(*data_args, f"--out_dir={tmp_path}", *args, check=False)
    assert result.returncode != 0
    assert fragment in result.stderr and result.stderr.strip().count("\n") == 0, result.stderr


def test_missing_or_unmatched_data_are_one_line_errors(tmp_path):
    result = run_train(f"--processed_dir={tmp_path / 'nothing'}", f"--out_dir={tmp_path}", check=False)
    assert result.returncode != 0 and "run `python preprocess.py" in result.stderr
    (tmp_path / "p" / "train").mkdir(parents=True)
    Image.new("RGB", (64, 64)).save(tmp_path / "p" / "train" / "1.png")
    labels = pd.DataFrame({"GalaxyID": [2], **{column: [0.5] for column in LABEL_COLUMNS}})
    labels.to_csv(tmp_path / "p" / "labels.csv", index=False)
    result = run_train(f"--processed_dir={tmp_path / 'p'}", f"--out_dir={tmp_path}", check=False)
    assert result.returncode != 0 and "matches no PNG" in result.stderr


def test_unwritable_out_dir_is_a_one_line_error_before_any_work(data_args, tmp_path):
    (tmp_path / "file").write_text("not a folder")
    assert "is a file, not a folder" in one_line_error(run_train(*data_args, f"--out_dir={tmp_path / 'file'}",
                                                                 check=False))
    (tmp_path / "ro").mkdir(mode=0o555)
    command = [*without_root_override(), sys.executable, str(REPO / "train.py"), *data_args,
               f"--out_dir={tmp_path / 'ro'}"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert "cannot write into out_dir" in one_line_error(result) and "Permission denied" in result.stderr


def test_read_only_data_folder_still_trains(demo_processed, tmp_path):
    processed = tmp_path / "processed"
    shutil.copytree(demo_processed.processed_dir, processed, ignore=shutil.ignore_patterns("*_images.pt"))
    for folder in (processed / "train", processed):
        folder.chmod(0o555)
    command = [*without_root_override(), sys.executable, str(REPO / "train.py"), f"--processed_dir={processed}",
               f"--out_dir={tmp_path / 'run'}", *SMALL, "--max_steps=1"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert not list(processed.glob("*images.pt*"))   # no cache, and no temporary file either


def test_resume_from_a_different_model_is_refused(full_run, data_args, tmp_path):
    out_dir, _ = full_run
    checkpoint = torch.load(out_dir / "last.pt", weights_only=True)
    checkpoint["model"] = GalaxyCNN(image_size=96).state_dict()
    (tmp_path / "split.csv").write_text((out_dir / "split.csv").read_text())
    torch.save(checkpoint, tmp_path / "last.pt")
    result = run_train(f"--out_dir={tmp_path}", "--resume", "--epochs=3", check=False)   # 2 are done
    assert result.returncode != 0 and "different model" in result.stderr
    assert result.stderr.strip().count("\n") == 0


def test_checkpoint_records_the_crop_the_pngs_were_made_with(demo_processed, tmp_path):
    processed = tmp_path / "processed"
    shutil.copytree(demo_processed.processed_dir, processed)
    settings = json.loads((processed / "preprocess.json").read_text())
    (processed / "preprocess.json").write_text(json.dumps({**settings, "crop": "center"}))
    run_train(f"--processed_dir={processed}", f"--out_dir={tmp_path / 'run'}", *SMALL, "--max_steps=1")
    assert torch.load(tmp_path / "run" / "last.pt", weights_only=True)["config"]["crop"] == "center"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_run_with_bf16_and_channels_last_loads_on_cpu(data_args, tmp_path):
    result = run_train(*data_args, "--device=cuda", "--amp=true", "--channels_last=true", "--epochs=2",
                       f"--out_dir={tmp_path}")
    assert "device cuda" in result.stdout
    metrics = pd.read_csv(tmp_path / "metrics.csv")
    assert metrics["val_rmse"].notna().all() and (metrics["train_loss"] < 1).all()
    model, cfg = load_model(tmp_path / "best.pt", "cpu")
    assert cfg.device == "cuda" and next(model.parameters()).device.type == "cpu"


@pytest.mark.parametrize("schedule", ["onecycle", "cosine"])
def test_schedules_warm_up_then_decay_to_zero(schedule):
    cfg = Config(schedule=schedule, lr=1e-3, epochs=4)
    optimizer, scheduler = make_optimizer(torch.nn.Linear(2, 2), cfg, steps_per_epoch=50)
    rates = []
    for _ in range(cfg.epochs * 50):
        rates.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    peak = max(range(len(rates)), key=rates.__getitem__)
    assert rates[0] < 0.1 * cfg.lr and 0 < peak < len(rates) // 2   # a warm-up, then the peak
    assert rates[peak] == pytest.approx(cfg.lr, rel=0.01) and rates[-1] < 0.01 * cfg.lr
