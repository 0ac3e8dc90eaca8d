"""Ensembles: which checkpoints a spec names, the mean and spread over members x views, mixed
crops, the submission and std files, the split check and the spread report, plot_image, and a
member whose outputs are not finite."""
from pathlib import Path
import shutil
import sys

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
import torch

from config import Config
from dataset import LABEL_COLUMNS, QUESTIONS, read_labels
from galaxy.calibration import calibrated_sigma, load_calibration
from galaxy.checkpoints import CheckpointError, load_model, read_checkpoint
from galaxy.ensemble import load_members, predict_batch, resolve_checkpoints
from galaxy.inference import predict_views
import helpers
from helpers import demo_config, one_line_error, run_script, save_checkpoint
import plot_image
import predict
from predict import main as predict_main

FAST = ["--workers=1", "--batch_size=16", "--amp=false", "--channels_last=false"]


@pytest.fixture(scope="module")
def ensemble(demo_raw, demo_processed, tmp_path_factory):
    """runs/ens/member_0 (crop=roi, seed 0) and member_1 (crop=center, seed 1), sharing one split."""
    processed_dir = Path(demo_processed.processed_dir)
    cfg = demo_config(processed_dir)
    label_ids, _ = read_labels(processed_dir)
    run_dir = tmp_path_factory.mktemp("ens")
    center = Config(**{**cfg.to_dict(), "crop": "center", "seed": 1})
    paths = []
    for k, member_cfg in enumerate((cfg, center)):
        (run_dir / f"member_{k}").mkdir()
        paths.append(save_checkpoint(run_dir / f"member_{k}" / "best.pt", member_cfg, label_ids, seed=k))
    return {"run_dir": run_dir, "paths": paths, "cfg": cfg, "raw_dir": Path(demo_raw), "processed_dir": processed_dir,
            "data_args": [f"--raw_dir={demo_raw}", f"--processed_dir={processed_dir}"]}


def run_main(monkeypatch, capsys, *args):
    """predict.main() in this process; its printed output."""
    monkeypatch.setattr(sys, "argv", ["predict.py", *args])
    predict_main()
    return capsys.readouterr().out


def test_spec_resolution(ensemble, tmp_path):
    a, b = (str(p) for p in ensemble["paths"])
    run_dir = ensemble["run_dir"]
    assert resolve_checkpoints(f"{b},{a}") == [a, b]                   # comma list, sorted
    assert resolve_checkpoints(str(run_dir)) == [a, b]                 # a folder of member_*/ runs
    assert resolve_checkpoints(str(run_dir / "member_1")) == [b]       # a run folder: its best.pt
    assert resolve_checkpoints(str(run_dir / "member_*" / "best.pt")) == [a, b]   # a glob
    assert resolve_checkpoints("", out_dir="runs") == [str(Path("runs/best.pt"))]
    with pytest.raises(CheckpointError, match="matches no file"):
        resolve_checkpoints(str(tmp_path / "nothing_*" / "best.pt"))
    with pytest.raises(CheckpointError, match="holds no best.pt"):
        resolve_checkpoints(str(tmp_path))


def test_a_run_that_has_not_finished_an_epoch_says_to_resume_it(ensemble, tmp_path):
    """A run stopped before its first epoch ended has last.pt but no best.pt; a member like that is
    named, never silently left out of its ensemble."""
    run_dir = tmp_path / "ens"
    shutil.copytree(ensemble["run_dir"], run_dir)
    unfinished = run_dir / "member_3"
    unfinished.mkdir()
    shutil.copy(run_dir / "member_1" / "best.pt", unfinished / "last.pt")
    with pytest.raises(CheckpointError, match=r"member_3 has no best.pt: the run in .*member_3 has not finished an "
                                              r"epoch yet; go on with `python train.py --out_dir=.*member_3 --resume`"):
        resolve_checkpoints(str(run_dir))
    paths = resolve_checkpoints(str(unfinished))   # the run folder itself: read_checkpoint says the same
    with pytest.raises(CheckpointError, match=r"best.pt not found: the run in .*member_3 has not finished an epoch"):
        read_checkpoint(paths[0])
    assert len(resolve_checkpoints(str(run_dir / "member_[01]"))) == 2   # the members that are done


def test_mean_and_std_are_over_members_and_views(ensemble):
    members, groups = load_members(ensemble["paths"], "cpu")
    assert [m.group for m in members] == [0, 1] and [g.crop for g in groups] == ["roi", "center"]
    generator = torch.Generator().manual_seed(0)
    group_images = [torch.randint(0, 256, (3, 3, 64, 64), dtype=torch.uint8, generator=generator) for _ in groups]
    mean, std, per_member, _ = predict_batch(members, group_images, (False, False), tta=True)
    views = torch.cat([predict_views(m.model, group_images[m.group], tta=True)[0] for m in members]).numpy()
    assert views.shape == (16, 3, len(LABEL_COLUMNS))
    np.testing.assert_allclose(mean.numpy(), views.mean(0), atol=1e-6)
    np.testing.assert_allclose(std.numpy(), views.std(0), atol=1e-6)
    np.testing.assert_allclose(per_member.numpy(), views.reshape(2, 8, 3, -1).mean(1), atol=1e-6)
    # the average of tree-head outputs still obeys the decision tree's sum rules
    mean = mean.numpy()
    for question in QUESTIONS:
        total = mean[:, [LABEL_COLUMNS.index(c) for c in question.columns]].sum(1)
        parent = mean[:, LABEL_COLUMNS.index(question.parent)] if question.parent else 1.0
        np.testing.assert_allclose(total, parent, atol=1e-5)


def test_mixed_crop_ensemble_is_the_mean_of_its_members_alone(ensemble, tmp_path, monkeypatch, capsys):
    data = [*ensemble["data_args"], *FAST]
    alone = []
    for k, path in enumerate(ensemble["paths"]):
        run_main(monkeypatch, capsys, f"--checkpoint={path}", f"--out_dir={tmp_path / str(k)}", *data)
        alone.append(pd.read_csv(tmp_path / str(k) / "submission.csv"))
        # one member without TTA has no spread; its calibrated sigma has no spread term
        sigma = pd.read_csv(tmp_path / str(k) / "submission_std.csv")[LABEL_COLUMNS].to_numpy()
        expected = calibrated_sigma(load_calibration(path.parent), alone[k][LABEL_COLUMNS].to_numpy())
        np.testing.assert_allclose(sigma, expected, atol=1e-5)
    out = run_main(monkeypatch, capsys, f"--checkpoint={ensemble['run_dir']}", f"--out_dir={tmp_path}", *data)
    assert "processed PNGs" in out and "raw JPEGs" in out and "crop=center" in out
    submission = pd.read_csv(tmp_path / "submission.csv")
    assert list(submission.columns) == ["GalaxyID"] + LABEL_COLUMNS   # Kaggle's format, unchanged
    assert submission["GalaxyID"].tolist() == alone[0]["GalaxyID"].tolist()
    a, b = (table[LABEL_COLUMNS].to_numpy() for table in alone)
    np.testing.assert_allclose(submission[LABEL_COLUMNS], (a + b) / 2, atol=2e-6)
    sigma = pd.read_csv(tmp_path / "submission_std.csv")
    assert list(sigma.columns) == ["GalaxyID"] + LABEL_COLUMNS
    # the spread of two members is half their difference; the ensemble's calibration lives in its folder
    calibration = load_calibration(ensemble["run_dir"] / "calibration.json")
    assert calibration["members"] == 2 and calibration["tta"] is False
    # (a and b are rounded to 6 decimals, and a random member's spread is scaled up a lot)
    np.testing.assert_allclose(sigma[LABEL_COLUMNS], calibrated_sigma(calibration, (a + b) / 2, np.abs(a - b) / 2),
                               rtol=0.05, atol=1e-4)


def test_members_with_another_split_are_a_one_line_error(ensemble, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    label_ids, _ = read_labels(ensemble["processed_dir"])
    save_checkpoint(other / "best.pt", Config(**{**ensemble["cfg"].to_dict(), "split_seed": 7}), label_ids)
    result = run_script("predict.py", f"--checkpoint={ensemble['paths'][0]},{other / 'best.pt'}", "--split=test",
                        *ensemble["data_args"], f"--out_dir={tmp_path}", *FAST)
    message = one_line_error(result)
    assert str(other / "best.pt") in message and "train split" in message


def test_split_report_has_members_and_spread(ensemble, tmp_path, monkeypatch, capsys):
    out = run_main(monkeypatch, capsys, f"--checkpoint={ensemble['run_dir']}", "--split=test", "--tta",
                   f"--out_dir={tmp_path}", *ensemble["data_args"], *FAST)
    assert "Pearson r(predicted spread, actual error)" in out and "mean member" in out
    members = pd.read_csv(tmp_path / "eval_test_members.csv").set_index("model")
    member_rmse = members.loc[[str(p) for p in ensemble["paths"]], "rmse"]
    assert members.loc["mean member", "rmse"] == pytest.approx(member_rmse.mean(), abs=1e-6)
    assert members.loc["ensemble", "rmse"] <= member_rmse.max() + 1e-6   # the mean is never worse than both
    assert (tmp_path / "spread_test.png").stat().st_size > 10_000
    spread = pd.read_csv(tmp_path / "spread_test.csv")
    assert spread["galaxies"].sum() == len(
        pd.read_csv(ensemble["paths"][0].parent / "split.csv").query("split == 'test'"))


def test_plot_image_with_two_checkpoints(ensemble, tmp_path, monkeypatch):
    galaxy_id = int(read_labels(ensemble["processed_dir"])[0][0])
    monkeypatch.setattr(sys, "argv", ["plot_image.py", str(galaxy_id), f"--checkpoint={ensemble['run_dir']}",
                                      *ensemble["data_args"], f"--out_dir={tmp_path}", "--amp=false",
                                      "--channels_last=false"])
    plot_image.main()
    plt.close("all")
    assert (tmp_path / f"galaxy_{galaxy_id}.png").stat().st_size > 20_000
    assert load_model(ensemble["paths"][1])[1].crop == "center"


def test_an_evaluation_replaces_the_whole_set_of_an_earlier_one(ensemble, tmp_path, monkeypatch, capsys):
    args = ["--split=test", f"--out_dir={tmp_path}", *ensemble["data_args"], *FAST]
    run_main(monkeypatch, capsys, f"--checkpoint={ensemble['run_dir']}", "--tta", *args)
    stale = ["eval_test_members.csv", "spread_test.csv", "spread_test.png"]
    assert all((tmp_path / name).is_file() for name in stale)
    out = run_main(monkeypatch, capsys, f"--checkpoint={ensemble['paths'][0]}", *args)
    for name in stale:   # they were about the ensemble, not this checkpoint
        assert not (tmp_path / name).exists() and f"removed {tmp_path / name}: an earlier run's" in out
    assert (tmp_path / "eval_test.csv").is_file() and (tmp_path / "eval_test.png").is_file()


def nan_for_some(model, rows):
    """model, whose vote fractions (and features) become NaN for the given rows of each batch."""
    forward = model.forward_with_features

    def forward_with_features(images):
        votes, features = forward(images)
        votes, features = votes.clone(), features.clone()
        votes[rows], features[rows] = float("nan"), float("nan")
        return votes, features
    model.forward_with_features = forward_with_features
    return model


def test_a_member_with_non_finite_outputs_is_named_and_nothing_is_written(ensemble, tmp_path, monkeypatch):
    load_members = predict.load_members

    def second_member_diverged(paths, device):
        members, groups = load_members(paths, device)
        nan_for_some(members[1].model, [1, 3])
        return members, groups
    monkeypatch.setattr(predict, "load_members", second_member_diverged)
    args = [f"--checkpoint={ensemble['run_dir']}", f"--out_dir={tmp_path}", *ensemble["data_args"], *FAST]
    for more in ([], ["--split=test"]):
        message = helpers.main_error(monkeypatch, predict_main, "predict.py", *args, *more)
        assert message.startswith(f"error: member {ensemble['paths'][1]} gives non-finite vote fractions for "
                                   f"2 galaxies of a batch of 16 (first: ")
        assert message.endswith("): it diverged; leave it out of --checkpoint")
    assert sorted(path.name for path in tmp_path.iterdir()) == [".predict.lock"]   # nothing written


def test_finite_weights_that_overflow_are_caught(ensemble, tmp_path):
    """Weights a loader accepts (all finite) but whose products overflow to inf, then NaN."""
    checkpoint = torch.load(ensemble["paths"][1], weights_only=True)
    checkpoint["model"]["classifier.0.weight"].fill_(3e38)
    (tmp_path / "member_1").mkdir()
    shutil.copy(ensemble["paths"][1].parent / "split.csv", tmp_path / "member_1")
    torch.save(checkpoint, tmp_path / "member_1" / "best.pt")
    bad = tmp_path / "member_1" / "best.pt"
    result = run_script("predict.py", f"--checkpoint={ensemble['paths'][0]},{bad}", "--embed",
                        f"--out_dir={tmp_path}", *ensemble["data_args"], *FAST)
    last_line = result.stderr.strip().splitlines()[-1]   # under the progress bar
    assert result.returncode == 1 and last_line.startswith(f"error: member {bad} gives non-finite vote fractions "
                                                           f"for 16 galaxies of a batch of 16 (first: ")
    assert not (tmp_path / "submission.csv").exists() and not (tmp_path / "embeddings.npy").exists()
