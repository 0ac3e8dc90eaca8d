"""The calibrated sigma every prediction writes (galaxy/uncertainty.py): where calibration.json lives,
fitting it on the val split on first use and reusing it, refitting when the TTA setting or the
weights change, the coverage files of --split=test, one checkpoint without TTA, a final fit without
a val split (the raw spread, named so), --calibration=PATH, an unchanged submission.csv, and
plot_image.py's error bars."""
import re
from pathlib import Path
import shutil
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from config import Config
from dataset import LABEL_COLUMNS, QUESTIONS, make_split, read_labels, save_split
from galaxy.calibration import FORM, calibrated_sigma, load_calibration, save_calibration
from galaxy.ensemble import load_members
from galaxy.uncertainty import calibration_path, error_bars, fingerprint, saved_calibration
import helpers
from helpers import demo_config, save_checkpoint
from predict import main as predict_main

FAST = ["--workers=1", "--batch_size=16", "--amp=false", "--channels_last=false"]


def make_ensemble(folder, cfg, label_ids, seeds=(0, 1), val_fraction=0.2):
    """folder/member_<k>/best.pt for each seed, sharing one split (val_fraction=0: a final fit's)."""
    paths = []
    for k, seed in enumerate(seeds):
        (folder / f"member_{k}").mkdir(parents=True)
        paths.append(save_checkpoint(folder / f"member_{k}" / "best.pt", cfg, seed=seed))
        save_split(make_split(label_ids, cfg.split_seed, val_fraction, 0.2), folder / f"member_{k}" / "split.csv")
    return paths


@pytest.fixture(scope="module")
def demo(demo_raw, demo_processed):
    processed_dir = Path(demo_processed.processed_dir)
    return {"cfg": demo_config(processed_dir), "label_ids": read_labels(processed_dir)[0],
            "data": [f"--raw_dir={demo_raw}", f"--processed_dir={processed_dir}", *FAST]}


@pytest.fixture
def ensemble(demo, tmp_path):
    return make_ensemble(tmp_path / "ens", demo["cfg"], demo["label_ids"])


def run_main(monkeypatch, capsys, *args):
    """predict.main() in this process; its printed output."""
    monkeypatch.setattr(sys, "argv", ["predict.py", *args])
    predict_main()
    return capsys.readouterr().out


def test_where_the_calibration_lives(tmp_path):
    cfg = Config(out_dir=str(tmp_path / "out"))
    assert calibration_path(cfg, ["runs/a/best.pt"]) == "runs/a/calibration.json"
    assert calibration_path(cfg, ["runs/ens/member_1/best.pt", "runs/ens/member_2/best.pt"]) == \
        "runs/ens/calibration.json"
    assert calibration_path(cfg, ["runs/a/best.pt", "runs/b/best.pt"]) == str(tmp_path / "out" / "calibration.json")
    assert calibration_path(cfg, ["x/member_1/best.pt", "y/member_2/best.pt"]) == \
        str(tmp_path / "out" / "calibration.json")
    assert calibration_path(Config(calibration=str(tmp_path)), ["runs/a/best.pt"]) == \
        str(tmp_path / "calibration.json")
    assert calibration_path(Config(calibration="c.json"), ["runs/a/best.pt"]) == "c.json"


def test_fitted_on_first_use_then_reused_and_refitted_for_another_tta(demo, ensemble, tmp_path, monkeypatch, capsys):
    run_dir = ensemble[0].parent.parent
    args = [f"--checkpoint={run_dir}", f"--out_dir={tmp_path / 'out'}", *demo["data"]]
    out = run_main(monkeypatch, capsys, *args)
    fitted = [line for line in out.splitlines() if line.startswith("fitted the calibration")]
    assert len(fitted) == 1 and f"saved {run_dir / 'calibration.json'}" in fitted[0]
    assert "2 members, no TTA" in fitted[0] and "none yet at" in fitted[0]
    calibration = load_calibration(run_dir)
    assert calibration["members"] == 2 and calibration["tta"] is False
    assert sorted(c["path"] for c in calibration["checkpoints"]) == [str(p) for p in ensemble]
    assert calibration["galaxies"] == len(make_split(demo["label_ids"], demo["cfg"].split_seed, 0.2, 0.2)["val"])
    sigma = pd.read_csv(tmp_path / "out" / "submission_std.csv")
    assert "calibrated standard deviation" in out and not (tmp_path / "out" / "submission_spread.csv").exists()
    assert ((sigma[LABEL_COLUMNS] > 0) & (sigma[LABEL_COLUMNS] <= 0.5)).all().all()

    text = (run_dir / "calibration.json").read_text()
    out = run_main(monkeypatch, capsys, *args)   # the same checkpoints and TTA: reused as it is
    assert "fitted the calibration" not in out and f"calibrated sigma from {run_dir / 'calibration.json'}" in out
    assert (run_dir / "calibration.json").read_text() == text
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "out" / "submission_std.csv"), sigma)

    out = run_main(monkeypatch, capsys, *args, "--tta")   # another TTA setting: refit
    assert "fitted the calibration" in out and "not 2 members with 8-view TTA" in out
    assert load_calibration(run_dir)["tta"] is True


def test_a_retrained_checkpoint_makes_it_stale(demo, ensemble, tmp_path, monkeypatch, capsys):
    args = [f"--checkpoint={ensemble[0]}", f"--out_dir={tmp_path / 'out'}", *demo["data"]]
    run_main(monkeypatch, capsys, *args)
    first = load_calibration(ensemble[0].parent)
    save_checkpoint(ensemble[0], demo["cfg"], seed=7)   # train.py wrote a new best.pt
    out = run_main(monkeypatch, capsys, *args)
    assert "is stale: it was fitted for other checkpoints" in out and "fitted the calibration" in out
    assert load_calibration(ensemble[0].parent)["checkpoints"] != first["checkpoints"]
    copied = tmp_path / "copied"   # the same bytes elsewhere, with a new mtime: still its calibration
    copied.mkdir()
    for name in ("best.pt", "split.csv", "calibration.json"):
        shutil.copy(ensemble[0].parent / name, copied / name)
    out = run_main(monkeypatch, capsys, f"--checkpoint={copied / 'best.pt'}", f"--out_dir={tmp_path / 'out'}",
                   *demo["data"])
    assert "fitted the calibration" not in out and f"calibrated sigma from {copied / 'calibration.json'}" in out


def test_one_checkpoint_without_tta_gets_a_calibrated_std(demo, ensemble, tmp_path, monkeypatch, capsys):
    out_dir = tmp_path / "out"
    run_main(monkeypatch, capsys, f"--checkpoint={ensemble[1]}", f"--out_dir={out_dir}", *demo["data"])
    calibration = load_calibration(ensemble[1].parent / "calibration.json")
    assert calibration["members"] == 1 and calibration["tta"] is False and calibration["scale"] == [0.0] * 37
    submission = pd.read_csv(out_dir / "submission.csv")
    sigma = pd.read_csv(out_dir / "submission_std.csv")
    assert sigma["GalaxyID"].tolist() == submission["GalaxyID"].tolist()
    # no spread: sigma is sqrt(floor^2 + size^2 p^2 + reach^2 r^2) of the predicted vote fractions
    np.testing.assert_allclose(sigma[LABEL_COLUMNS], calibrated_sigma(calibration, submission[LABEL_COLUMNS]),
                               atol=1e-5)
    assert sigma[LABEL_COLUMNS].to_numpy().std(0).max() > 0   # the p and r terms: not one number per output


def test_split_test_writes_the_coverage_files(demo, ensemble, tmp_path, monkeypatch, capsys):
    out_dir = tmp_path / "out"
    out = run_main(monkeypatch, capsys, f"--checkpoint={ensemble[0].parent.parent}", "--split=test",
                   f"--out_dir={out_dir}", *demo["data"])
    table = pd.read_csv(out_dir / "calibration_test.csv").set_index("question")
    assert list(table.index) == ["all"] + [f"Q{q.number}" for q in QUESTIONS]
    assert list(table.columns) == ["text", "nominal_1sigma", "observed_1sigma", "nominal_2sigma", "observed_2sigma",
                                   "observed_interval_68", "observed_interval_95", "spread_1sigma", "spread_2sigma"]
    assert table["observed_1sigma"].between(0, 100).all()
    assert (table["observed_2sigma"] >= table["observed_1sigma"]).all()
    assert (table["observed_interval_95"] >= table["observed_interval_68"]).all()
    assert (out_dir / "calibration_test.png").read_bytes()[:4] == b"\x89PNG"
    line = next(line for line in out.splitlines() if line.startswith("calibrated sigma on the test split"))
    printed = float(re.search(r"([\d.]+)% of the vote fractions within \+-1 sigma", line).group(1))
    assert printed == pytest.approx(table.loc["all", "observed_1sigma"], abs=0.051)   # the CSV has 2 decimals
    assert "the raw spread:" in line
    line = next(line for line in out.splitlines() if line.startswith("intervals on the test split"))
    printed = float(re.search(r"([\d.]+)% within the 68% intervals", line).group(1))
    assert printed == pytest.approx(table.loc["all", "observed_interval_68"], abs=0.051)
    # a single checkpoint's evaluation replaces the set: the coverage files are its own
    run_main(monkeypatch, capsys, f"--checkpoint={ensemble[0]}", "--split=test", f"--out_dir={out_dir}",
             *demo["data"])
    assert pd.read_csv(out_dir / "calibration_test.csv")["spread_1sigma"].isna().all()


def test_a_final_fit_writes_the_raw_spread_and_says_why(demo, tmp_path, monkeypatch, capsys):
    paths = make_ensemble(tmp_path / "final", demo["cfg"], demo["label_ids"], seeds=(3,), val_fraction=0.0)
    out_dir = tmp_path / "out"
    out = run_main(monkeypatch, capsys, f"--checkpoint={paths[0]}", "--tta", f"--out_dir={out_dir}", *demo["data"])
    assert not (out_dir / "submission_std.csv").exists() and not (paths[0].parent / "calibration.json").exists()
    spread = pd.read_csv(out_dir / "submission_spread.csv")
    assert list(spread.columns) == ["GalaxyID"] + LABEL_COLUMNS and (spread[LABEL_COLUMNS] > 0).any().any()
    line = next(line for line in out.splitlines() if "submission_spread.csv" in line)
    assert "not a calibrated std" in line and "has no val galaxies (trained with val_fraction=0 or train_on_val?)" \
        in line and "--calibration=" in line
    out = run_main(monkeypatch, capsys, f"--checkpoint={paths[0]}", f"--out_dir={out_dir}", *demo["data"])
    assert "no submission_std.csv: one checkpoint without TTA has no spread" in out   # and nothing else to write
    assert not list(out_dir.glob("submission_s*.csv"))


def test_calibration_path_from_a_sibling_run(demo, ensemble, tmp_path, monkeypatch, capsys):
    final = make_ensemble(tmp_path / "final", demo["cfg"], demo["label_ids"], seeds=(5, 6), val_fraction=0.0)
    sibling = tmp_path / "sibling.json"
    out_dir = tmp_path / "out"
    out = run_main(monkeypatch, capsys, f"--checkpoint={ensemble[0].parent.parent}", f"--calibration={sibling}",
                   f"--out_dir={out_dir}", *demo["data"])   # not there yet: fitted and saved there
    assert f"saved {sibling}" in out and not (ensemble[0].parent.parent / "calibration.json").exists()
    out = run_main(monkeypatch, capsys, f"--checkpoint={final[0].parent.parent}", f"--calibration={sibling}",
                   f"--out_dir={out_dir}", *demo["data"])
    assert f"calibrated sigma from {sibling}, as --calibration says (it was fitted for other checkpoints" in out
    submission = pd.read_csv(out_dir / "submission.csv")[LABEL_COLUMNS].to_numpy()
    assert (pd.read_csv(out_dir / "submission_std.csv")[LABEL_COLUMNS] > 0).all().all()
    assert not (out_dir / "submission_spread.csv").exists() and submission.shape[0] > 0
    message = helpers.main_error(monkeypatch, predict_main, "predict.py", f"--checkpoint={final[0]}",
                                 f"--calibration={sibling}", f"--out_dir={out_dir}", *demo["data"])
    assert message == (f"error: --calibration={sibling} does not apply: it was fitted for 2 members, no TTA, not 1 "
                       f"member, no TTA; predict with that setting, or pass --calibration=<a file to fit one for "
                       f"this setting into>")
    message = helpers.main_error(monkeypatch, predict_main, "predict.py", f"--checkpoint={final[0]}",
                                 f"--calibration={tmp_path / 'typo.json'}", f"--out_dir={out_dir}", *demo["data"])
    assert f"--calibration={tmp_path / 'typo.json'} does not exist and cannot fit one" in message


def test_submission_csv_is_the_same_with_or_without_a_calibration(demo, ensemble, tmp_path, monkeypatch, capsys):
    plain = tmp_path / "plain"   # the same weights, no split.csv: nothing to calibrate on
    for path in ensemble:
        (plain / path.parent.name).mkdir(parents=True)
        shutil.copy(path, plain / path.parent.name / "best.pt")
    for name, run_dir in (("raw", plain), ("calibrated", ensemble[0].parent.parent)):
        run_main(monkeypatch, capsys, f"--checkpoint={run_dir}", f"--out_dir={tmp_path / name}", *demo["data"])
    raw, calibrated = tmp_path / "raw", tmp_path / "calibrated"
    assert (raw / "submission_spread.csv").is_file() and (calibrated / "submission_std.csv").is_file()
    assert (raw / "submission.csv").read_bytes() == (calibrated / "submission.csv").read_bytes()


def test_plot_image_error_bars_are_the_calibrated_sigma(demo, ensemble, tmp_path, monkeypatch, capsys):
    cfg = Config(out_dir=str(tmp_path), tta=True)
    members, _ = load_members(ensemble, "cpu")
    mean, std = np.full(37, 0.3, np.float32), np.full(37, 0.01, np.float32)
    assert saved_calibration(cfg, members).calibration is None
    bars, label = error_bars(cfg, members, mean, std)
    assert label == "spread over members x views" and bars is std and "none yet at" in capsys.readouterr().out
    calibration = {"form": FORM, "members": 2, "tta": True, "columns": LABEL_COLUMNS, "scale": [3.0] * 37,
                   "floor": [0.02] * 37, "size": [0.0] * 37, "reach": [0.0] * 37,
                   "interval_68": [1.0] * 37, "interval_95": [2.0] * 37, "checkpoints": fingerprint(ensemble)}
    save_calibration(calibration, ensemble[0].parent.parent)
    bars, label = error_bars(cfg, members, mean, std)
    assert label == "calibrated sigma"
    np.testing.assert_allclose(bars, np.sqrt(0.03 ** 2 + 0.02 ** 2), rtol=1e-6)


def test_a_member_that_diverges_stops_the_fit_named(demo, ensemble, tmp_path):
    checkpoint = torch.load(ensemble[1], weights_only=True)
    checkpoint["model"]["classifier.0.weight"].fill_(3e38)
    torch.save(checkpoint, ensemble[1])
    result = helpers.run_script("predict.py", f"--checkpoint={ensemble[0].parent.parent}", f"--out_dir={tmp_path}",
                                *demo["data"])
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: member {ensemble[1]} gives non-finite")
    assert not (ensemble[0].parent.parent / "calibration.json").exists() and not (tmp_path / "submission.csv").exists()
