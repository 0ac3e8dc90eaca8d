"""train.py runs over time: resuming with changed settings, extending, fine-tuning, ensembles,
the out_dir lock, and kills at any moment (checkpoint writes included)."""
import builtins
from dataclasses import fields
import os
from pathlib import Path
import random
import shutil
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
import torch

from config import Config, max_workers
from galaxy import runs
from galaxy.files import DataError
from galaxy.runs import CHANGEABLE_ON_RESUME, FIXED_ON_RESUME
from galaxy.training import make_optimizer
from helpers import one_line_error, run_script, run_train, same_weights, save_checkpoint, weights

REPO = Path(__file__).resolve().parents[1]


def copy_run(out_dir, to, names=("last.pt", "split.csv")):
    """A copy of a finished run's files, for a test that may change them."""
    to.mkdir()
    for name in names:
        shutil.copy(out_dir / name, to / name)
    return to


def start_train(*args, env=None):
    return subprocess.Popen([sys.executable, "-u", str(REPO / "train.py"), *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(condition, process, timeout=120):
    """Poll condition() every 20 ms until true; fails if process exits first."""
    deadline = time.time() + timeout
    while not condition():
        assert process.poll() is None, f"train.py exited ({process.returncode}) first: {process.stderr.read()[-2000:]}"
        assert time.time() < deadline, "timed out"
        time.sleep(0.02)


# --- resume with changed settings ----------------------------------------------------------

def test_every_config_key_is_either_changeable_or_fixed_on_resume():
    changeable, fixed = set(CHANGEABLE_ON_RESUME), set(FIXED_ON_RESUME)
    assert not changeable & fixed
    assert changeable | fixed == {f.name for f in fields(Config)}


@pytest.mark.parametrize("schedule", ["onecycle", "cosine", "constant"])
def test_resumed_schedule_continues_exactly_and_replans_over_new_epochs(schedule):
    """From a checkpoint at step k, make_optimizer gives the lr of a fresh schedule stepped k times:
    the same one for the same epochs, the longer schedule's for more epochs."""
    def lr_after(cfg, steps):
        optimizer, scheduler = make_optimizer(torch.nn.Linear(2, 2), cfg, steps_per_epoch=10)
        for _ in range(steps):
            optimizer.step()
            scheduler.step()
        return optimizer, scheduler.get_last_lr()[0]

    optimizer, _ = lr_after(Config(schedule=schedule, epochs=2), 20)
    checkpoint = {"optimizer": optimizer.state_dict(), "global_step": 20}
    for cfg in (Config(schedule=schedule, epochs=2), Config(schedule=schedule, epochs=5, lr=1e-2)):
        _, resumed = make_optimizer(torch.nn.Linear(2, 2), cfg, 10, checkpoint)
        assert resumed.get_last_lr()[0] == lr_after(cfg, 20)[1]


def test_extending_a_run_replans_the_schedule_and_refuses_fewer_epochs(data_args, tmp_path):
    run_train(*data_args, "--epochs=1", "--lr=1e-3", f"--out_dir={tmp_path}")
    # the schedule is re-planned over the new total (the old one would end at epoch 1's last step),
    # and --lr changes the peak of the re-planned one-cycle schedule as well as the recorded config
    run_train(f"--out_dir={tmp_path}", "--resume", "--epochs=2", "--lr=1e-2")
    last = torch.load(tmp_path / "last.pt", weights_only=True)
    assert last["epoch"] == 2 and last["config"]["epochs"] == 2 and last["config"]["lr"] == 1e-2
    final_lr = pd.read_csv(tmp_path / "metrics.csv")["lr"].tolist()
    assert final_lr[0] == pytest.approx(1e-3 / 25 / 1e4) and final_lr[1] == pytest.approx(1e-2 / 25 / 1e4)
    done = run_train(f"--out_dir={tmp_path}", "--resume", "--epochs=2")
    assert "already complete: 2 of 2 epochs done" in done.stdout
    fewer = run_train(f"--out_dir={tmp_path}", "--resume", "--epochs=1", check=False)
    assert "--epochs=1 but the run in" in one_line_error(fewer) and "has done 2 epochs" in fewer.stderr


@pytest.mark.parametrize("args, named", [
    (["--batch_size=8"], "batch_size 16 -> 8"),      # the saved mid-epoch step would mean other images
    (["--batch_size=32"], "batch_size 16 -> 32"),    # and with fewer steps, part of the epoch would be skipped
    (["--schedule=cosine", "--seed=7"], "schedule onecycle -> cosine, seed 1337 -> 7"),   # another schedule's state
    (["--ema=0.99"], "ema 0.0 -> 0.99"),   # last.pt would have no average to go on from
])
def test_resume_refuses_keys_that_define_the_run(full_run, tmp_path, args, named):
    out_dir = copy_run(full_run[0], tmp_path / "run")
    result = run_train(f"--out_dir={out_dir}", "--resume", "--epochs=3", *args, check=False)
    assert f"--resume cannot change {named}" in one_line_error(result)


def test_a_run_from_a_bigger_machine_resumes_with_this_machines_workers(full_run, tmp_path):
    out_dir = copy_run(full_run[0], tmp_path / "run")
    checkpoint = torch.load(out_dir / "last.pt", weights_only=True)
    checkpoint["config"].update(workers=1000, threads=500, members_at_once=300)   # a 256-core machine's
    torch.save(checkpoint, out_dir / "last.pt")
    cfg, _ = runs.parse_config({"out_dir": str(out_dir), "resume": True, "epochs": 3})
    assert (cfg.workers, cfg.members_at_once) == (Config().workers, 1)
    assert cfg.threads == max_workers()   # kept as near as this machine allows: they change the float sums
    cfg, _ = runs.parse_config({"out_dir": str(out_dir), "resume": True, "epochs": 3, "workers": 1})
    assert cfg.workers == 1


# --- fine-tuning and ensembles ----------------------------------------------------------

def test_init_from_starts_a_new_run_from_the_weights(full_run, data_args, tmp_path):
    start = full_run[0] / "best.pt"
    result = run_train(*data_args, f"--init_from={start}", "--lr=1e-12", "--max_steps=1", f"--out_dir={tmp_path}")
    assert f"weights from {start}" in result.stdout
    tuned = torch.load(tmp_path / "last.pt", weights_only=True)
    assert tuned["config"]["init_from"] == str(start) and tuned["global_step"] == 1 and tuned["epoch"] == 0
    assert all(int(state["step"]) == 1 for state in tuned["optimizer"]["state"].values())   # a fresh Adam
    initial = weights(start)
    for key in (key for key in initial if key.endswith(".weight")):   # one step at lr 1e-12 moves nothing
        torch.testing.assert_close(tuned["model"][key], initial[key], rtol=0, atol=1e-6)


def test_init_from_a_model_of_another_shape_is_refused(data_args, tmp_path):
    other = save_checkpoint(tmp_path / "big.pt", Config(image_size=96))
    result = run_train(*data_args, f"--init_from={other}", f"--out_dir={tmp_path / 'run'}", check=False)
    assert "holds a model for image_size 96" in one_line_error(result)


def test_train_on_val_run_is_scored_on_test_and_refused_on_val(full_run, data_args, tmp_path):
    final = tmp_path / "final"
    result = run_train(*data_args, "--epochs=1", "--train_on_val", f"--out_dir={final}")
    assert "0 val" in result.stdout and "no val split" in result.stdout and "test RMSE" in result.stdout
    assert pd.read_csv(final / "metrics.csv")["val_rmse"].isna().all() and (final / "loss.png").is_file()
    assert torch.load(final / "best.pt", weights_only=True)["epoch"] == 1   # no val to choose by: the last epoch
    assert os.path.samefile(final / "best.pt", final / "last.pt")   # that epoch's state, written once
    tuned = full_run[0] / "best.pt"
    predict = [data_args[0], "--workers=1", "--amp=false", "--channels_last=false", f"--out_dir={tmp_path}"]
    # the test split is shared, so a final-fit member joins an ensemble tuned on val
    scored = run_script("predict.py", f"--checkpoint={tuned},{final / 'best.pt'}", "--split=test", *predict)
    assert scored.returncode == 0 and "2 checkpoints" in scored.stdout, scored.stderr[-2000:]
    # ... but never scores the val galaxies it trained on
    mixed = run_script("predict.py", f"--checkpoint={tuned},{final / 'best.pt'}", "--split=val", *predict)
    assert str(final / "best.pt") in one_line_error(mixed) and "train split" in one_line_error(mixed)
    alone = run_script("predict.py", f"--checkpoint={final / 'best.pt'}", "--split=val", *predict)
    assert "no val galaxies" in one_line_error(alone) and "train_on_val" in one_line_error(alone)


def test_members_train_resume_and_skip_with_one_command(data_args, tmp_path):
    ensemble = [*data_args, "--members=2", "--epochs=1", f"--out_dir={tmp_path}"]
    run_train(*ensemble, "--max_steps=2")   # both members stop part-way
    resumed = run_train(*ensemble, "--max_steps=0")
    assert resumed.stdout.count("resumed from") == 2
    again = run_train(*ensemble)
    assert "member 1: done, skipped" in again.stdout and "member 2: done, skipped" in again.stdout
    members = [torch.load(tmp_path / f"member_{k}" / "last.pt", weights_only=True) for k in (1, 2)]
    assert [m["config"]["seed"] for m in members] == [1337, 1338] and all(m["epoch"] == 1 for m in members)
    assert not same_weights(members[0]["model"], members[1]["model"])
    splits = [(tmp_path / f"member_{k}" / "split.csv").read_text() for k in (1, 2)]
    assert splits[0] == splits[1]   # one split_seed: the same val and test galaxies


def test_members_side_by_side_stop_together_and_match_one_after_another(data_args, tmp_path):
    ensemble = [*data_args, "--members=2", "--epochs=4"]
    run_train(*ensemble, f"--out_dir={tmp_path / 'one_by_one'}")
    side_by_side = [*ensemble, "--members_at_once=2", f"--out_dir={tmp_path / 'side'}"]
    process = start_train(*side_by_side)
    logs = [tmp_path / "side" / f"member_{k}" / "train.log" for k in (1, 2)]
    # both members in their first epoch (its progress bar starts after the signal handlers are set):
    # each stops mid-epoch, epochs before its end, and resumes mid-epoch
    wait_for(lambda: all(log.exists() and "epoch 1/4" in log.read_text() for log in logs), process)
    process.send_signal(signal.SIGINT)   # Ctrl-C: passed to both members, each saves last.pt
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGINT and output.count("stopped (exit 130)") == 2, output
    assert all((tmp_path / "side" / f"member_{k}" / "last.pt").is_file() for k in (1, 2))
    finished = run_train(*side_by_side)   # the same command finishes both
    assert finished.stdout.count("finished: test RMSE") == 2, finished.stdout
    for k in (1, 2):
        assert "resumed from" in logs[k - 1].read_text()
        assert same_weights(weights(tmp_path / "one_by_one" / f"member_{k}" / "last.pt"),
                            weights(tmp_path / "side" / f"member_{k}" / "last.pt"))


def test_members_side_by_side_share_out_the_cpu_threads(tmp_path, monkeypatch):
    started = {}
    monkeypatch.setattr(runs, "run_members", lambda pending, at_once: started.update(pending=pending, at_once=at_once))
    cfg = Config(members=3, members_at_once=2, out_dir=str(tmp_path / "a"))
    runs.train_members(cfg, ["--members=3", "--members_at_once=2"])
    assert started["at_once"] == 2 and len(started["pending"]) == 3
    threads = f"--threads={max(1, runs.cpu_count() // 2)}"
    assert all(command[-1] == threads and "--members=1" in command for _, _, command in started["pending"])
    cfg = Config(members=3, members_at_once=2, threads=1, out_dir=str(tmp_path / "b"))   # a's lock lasts the process
    runs.train_members(cfg, ["--members=3", "--members_at_once=2", "--threads=1"])   # the user's own is kept
    assert all(command.count("--threads=1") == 1 for _, _, command in started["pending"])


# --- the out_dir lock ---------------------------------------------------------------------

def test_second_run_into_a_locked_out_dir_fails_fast_until_the_holder_dies(data_args, tmp_path):
    holder = start_train(*data_args, "--epochs=50", f"--out_dir={tmp_path}")
    try:
        wait_for(lambda: str(holder.pid) in ((tmp_path / ".lock").read_text() if (tmp_path / ".lock").exists() else ""),
                 holder)
        second = run_train(*data_args, f"--out_dir={tmp_path}", check=False)
        assert f"is in use by another train.py (PID {holder.pid})" in one_line_error(second)
    finally:
        holder.kill()
        holder.wait()
    run_train(*data_args, "--max_steps=1", f"--out_dir={tmp_path}")   # the kernel dropped the dead holder's lock


# --- kills and crashes ----------------------------------------------------------------------

def test_missing_best_pt_is_rebuilt_from_last_pt(full_run, tmp_path):
    out_dir = copy_run(full_run[0], tmp_path / "run")   # as if killed between last.pt and best.pt
    result = run_train(f"--out_dir={out_dir}", "--resume")
    assert "best.pt was missing" in result.stdout and "already complete" in result.stdout
    assert torch.load(out_dir / "best.pt", weights_only=True)["epoch"] == 2


def test_two_ctrl_c_during_a_save_keep_it_and_exit_130(data_args, tmp_path):
    env = {**os.environ, "TRAIN_TEST_SAVE_DELAY": "1.5"}   # the presses land while best.pt is written
    process = start_train(*data_args, "--epochs=3", f"--out_dir={tmp_path}", env=env)
    for line in process.stdout:
        if line.startswith("epoch 1:"):
            break
    process.send_signal(signal.SIGINT)
    time.sleep(0.3)
    process.send_signal(signal.SIGINT)
    output, errors = process.communicate(timeout=120)
    assert process.returncode == 130 and "Traceback" not in errors, errors[-2000:]
    assert "saving last.pt first" in errors and "stopped by signal 2" in output
    assert torch.load(tmp_path / "last.pt", weights_only=True)["epoch"] == 1
    assert not list(tmp_path.glob("*.tmp"))


def test_sigkill_at_any_moment_never_leaves_a_run_stuck(full_run, data_args, tmp_path):
    """SIGKILL during checkpoint writes (each lingers 0.5 s under its temporary name) and at a
    random moment: the same command, with --resume once last.pt exists, always finishes the run,
    with the weights of an uninterrupted one and no temporary file left behind."""
    env = {**os.environ, "TRAIN_TEST_SAVE_DELAY": "0.5"}
    args = [*data_args, "--epochs=2", f"--out_dir={tmp_path}"]
    moment = random.Random(0).uniform(0.2, 1.5)

    def writing_a_checkpoint(process):
        return lambda: bool(list(tmp_path.glob(f"*.pt.{process.pid}.tmp")))

    def a_moment_after_last_pt(process):
        return lambda: (tmp_path / "last.pt").exists() and time.sleep(moment) is None

    def resume():
        return ["--resume"] if (tmp_path / "last.pt").exists() else []

    # epoch 1's best.pt with nothing saved yet; a random moment after last.pt; a write of epoch 2
    for kill_when in (writing_a_checkpoint, a_moment_after_last_pt, writing_a_checkpoint):
        process = start_train(*args, *resume(), env=env)
        wait_for(kill_when(process), process)
        process.kill()
        process.wait()
    assert list(tmp_path.glob("*.tmp"))   # the last kill left its temporary file
    result = run_train(*args, *resume(), env=env)
    assert "left by a killed run" in result.stdout
    assert not list(tmp_path.glob("*.tmp"))
    assert pd.read_csv(tmp_path / "metrics.csv")["epoch"].tolist() == [1, 2]
    assert same_weights(weights(full_run[0] / "last.pt"), weights(tmp_path / "last.pt"))
    assert (tmp_path / "best.pt").is_file()


@pytest.mark.parametrize("links", [True, False], ids=["hard link", "no links: a copy"])
def test_best_and_last_pt_are_written_once_and_part_at_the_next_save(tmp_path, monkeypatch, links):
    """An improving epoch's best.pt and last.pt share one write; the next last.pt replaces its own
    name only, so best.pt keeps that epoch's state."""
    if not links:
        monkeypatch.setattr(runs.os, "link", lambda *_: (_ for _ in ()).throw(OSError("no hard links here")))
    best, last = tmp_path / "best.pt", tmp_path / "last.pt"
    runs.save_checkpoints([best, last], {"epoch": 1, "weights": torch.zeros(3)})
    assert os.path.samefile(best, last) == links
    runs.save_checkpoints([last], {"epoch": 2, "weights": torch.ones(3)})
    assert torch.load(best, weights_only=True)["epoch"] == 1 and torch.equal(
        torch.load(best, weights_only=True)["weights"], torch.zeros(3))
    assert torch.load(last, weights_only=True)["epoch"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "last.pt"]


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux), whose every write fails "
                                                              "with ENOSPC as on a full disk")
def test_a_checkpoint_written_to_a_full_disk_is_a_clear_error(tmp_path, monkeypatch):
    """torch.save given a path says only "iostream error" on a full disk; through a file object the
    real ENOSPC reaches atomic_write. The checkpoint already on disk stays whole."""
    path = tmp_path / "last.pt"
    runs.save_checkpoint(path, {"weights": torch.zeros(3)})
    monkeypatch.setattr(runs, "open", lambda tmp, mode: builtins.open("/dev/full", mode), raising=False)
    with pytest.raises(DataError, match=r"could not write .*last.pt: no space left on its disk"):
        runs.save_checkpoint(path, {"weights": torch.ones(100_000)})
    monkeypatch.undo()
    assert torch.equal(torch.load(path, weights_only=True)["weights"], torch.zeros(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]
