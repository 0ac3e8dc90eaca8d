"""bench.py scale (the Kaggle-sized rehearsal, at a tiny scale), bench.py gpu's CPU-side parts (the
no-GPU error and its table), bench.py train's checkpoint timing and bench.py accuracy's rows."""
import math
import os
from pathlib import Path
import re
import subprocess
import sys
import zipfile

import pandas as pd
import pytest
import torch

from benchmarks import accuracy, gpu, speed
from benchmarks.accuracy import ABLATIONS, ENSEMBLES, RECIPES, plan, rows, run_accuracy
from benchmarks.gpu import NO_GPU, beyond_startup, gpu_table, members_side_by_side, small_processed_copy
from benchmarks.scale import build_kaggle_zips
from benchmarks.speed import TrainingBench, checkpoint_seconds
from config import Config, build_config
from galaxy.recipes import load_recipe, member_plan
from helpers import REPO, run_script


def test_build_kaggle_zips_repeats_the_source_in_kaggles_layout(demo_raw, tmp_path):
    sources = build_kaggle_zips(demo_raw, tmp_path, 250, 40, first_id=100_000)
    assert sources == {"train": 96, "test": 16}   # conftest's demo set
    with zipfile.ZipFile(tmp_path / "images_training_rev1.zip") as archive:
        infos = archive.infolist()
        assert [info.filename for info in infos] == [f"images_training_rev1/{100_000 + i}.jpg" for i in range(250)]
        assert {info.compress_type for info in infos} == {zipfile.ZIP_STORED}
        # the 97th image repeats the first source JPEG
        assert archive.read(infos[96]) == archive.read(infos[0]) != archive.read(infos[1])
    with zipfile.ZipFile(tmp_path / "images_test_rev1.zip") as archive:
        assert archive.namelist() == [f"images_test_rev1/{100_250 + i}.jpg" for i in range(40)]
    with zipfile.ZipFile(tmp_path / "training_solutions_rev1.zip") as archive:
        assert archive.namelist() == ["training_solutions_rev1.csv"]
        with archive.open("training_solutions_rev1.csv") as f:
            labels = pd.read_csv(f)
    assert labels["GalaxyID"].tolist() == list(range(100_000, 100_250))
    assert len(labels.columns) == 38
    # each image keeps its source's label row
    assert labels.iloc[96, 1:].tolist() == labels.iloc[0, 1:].tolist()


def test_scale_rehearsal_runs_every_step_and_leaves_nothing(demo_raw, tmp_path):
    env = {**os.environ, "TMPDIR": str(tmp_path)}   # the bench's temporary folder goes here
    result = subprocess.run([sys.executable, str(REPO / "bench.py"), "scale", "--scale=0.002", f"--raw_dir={demo_raw}",
                             "--batch_size=16", "--workers=2", "--threads=1", "--amp=false", "--channels_last=false",
                             "--image_size=32"],
                            cwd=REPO, capture_output=True, text=True, timeout=180, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    assert "123 + 160 images" in out
    table = out[out.index("### `python bench.py scale --scale=0.002`"):]
    for row in ("| build Kaggle's zips (123 + 160 JPEGs from 96 + 16)", "| preprocess.py (283 images from the zips)",
                "| train.py: start-up, labels", "| train.py: 6 steps of 16", "| predict.py (160 test PNGs)",
                "| predict.py --tta (160 test PNGs)", "| model only:"):
        assert row in table, row
    assert "one epoch (96 images) ≈" in out
    assert not list(tmp_path.glob("bench_scale_*"))   # the temporary folder is gone (torch may leave its own)


def test_scale_must_be_positive():
    result = run_script("bench.py", "scale", "--scale=0")
    assert result.returncode == 1 and result.stderr.strip() == ("error: impossible config: "
                                                                 "scale must be positive, e.g. --scale=0.1")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given where there is no GPU")
def test_gpu_bench_without_a_gpu_is_a_one_line_error():
    result = run_script("bench.py", "gpu")
    assert result.returncode == 1
    assert result.stderr == NO_GPU + "\n" and not result.stdout
    assert NO_GPU == "error: bench.py gpu needs a CUDA GPU (torch.cuda.is_available() is False)"


def test_gpu_table_formats_a_run():
    # made-up numbers, only to check the formatting: the real ones come from a GPU run
    results = {"tests": {"passed": 1, "errors": 0, "exit": 0, "seconds": 31.2}, "train_model": 52_000.4,
               "train_pipeline": 50_000.0, "best": "bf16 channels_last", "inference": 200_000.0,
               "inference_numerics": "bf16 channels_last", "epoch_seconds": 1.25, "predict": 9_000.0,
               "predict_beyond": 95_000.0, "predict_startup": 3.01, "predict_tta": 4_000.0,
               "predict_tta_beyond": 12_000.0, "predict_tta_startup": 3.2, "model_inference": 100_000.0,
               "checkpoint_once": 0.18, "checkpoint_twice": 0.39, "torchrun_ok": True,
               "torchrun_seconds": 12.34, "alone_seconds": 20.0, "side_by_side_seconds": 80.0,
               "side_by_side_gain": 2.0, "total_seconds": 190.0, "catalog": 80_000.0, "catalog_steady": 92_000.0}
    lines = gpu_table(results, "### title").splitlines()
    assert lines[:4] == ["### title", "", "| check | result | goal |", "|---|---|---|"]
    assert "| CUDA tests (`pytest -q -k cuda tests/`) | 1 passed, 0 failed, 0 skipped, 0 errors, exit 0 (31 s) " \
           "| all pass: met |" in lines
    assert ("| training, full pipeline (gather + augment + step) | 50,000 img/s "
            "| ≥ 0.95 × model only: 0.96 |" in lines)
    assert "| one 61,578-image epoch (timed) | 1.25 s | < 10 s on one H100: met |" in lines
    assert ("| predict.py, 5,000 PNGs | 9,000 img/s in all; 95,000 img/s beyond 3.0 s of start-up "
            "| ≥ 0.9 × model only (100,000 img/s), beyond start-up: 0.95 |" in lines)
    assert ("| predict.py --tta, 5,000 PNGs | 4,000 img/s in all; 12,000 img/s beyond 3.2 s of start-up "
            "| ≥ 0.9 × model only / 8 (12,500 img/s), beyond start-up: 0.96 |" in lines)
    assert any(line.startswith("| predict.py --catalog, ") and "80,000 img/s in all; 92,000 img/s steady" in line
               and "steady: 0.92 |" in line for line in lines)
    assert "| torchrun, 1 GPU, 20 steps of train.py | ok in 12.3 s | succeeds |" in lines
    assert ("| 8 members side by side (`--members_at_once`), 60 epochs each | 80.0 s; one alone 20.0 s "
            "| more members an hour than one after another: 2.00× |" in lines)
    assert "| the whole check | 190 s | < 8 min: met |" in lines
    assert ("| an improving epoch's checkpoints (best.pt + last.pt) | 0.18 s written once and linked; 0.39 s twice "
            "| once ≤ 0.6 × twice: 0.46 |" in lines)
    assert len(lines) == 4 + 12


def test_members_side_by_side_check_trains_both_ways(demo_processed, tmp_path, monkeypatch):
    # the GPU check's train.py calls on the CPU, shortened: 2 members at once, 1 epoch
    monkeypatch.setattr(gpu, "SIDE_BY_SIDE", 2)
    monkeypatch.setattr(gpu, "SIDE_BY_SIDE_EPOCHS", 1)
    overrides = {"device": "cpu", "threads": 1, "batch_size": 16, "amp": "false", "channels_last": "false"}
    result = members_side_by_side(overrides, tmp_path, Path(demo_processed.processed_dir))
    assert (tmp_path / "members_1" / "best.pt").is_file()
    assert all((tmp_path / "members_2" / f"member_{k}" / "train.log").is_file() for k in (1, 2))
    assert result["side_by_side_gain"] == pytest.approx(2 * result["alone_seconds"] / result["side_by_side_seconds"])


def test_predict_rate_beyond_start_up_comes_from_the_small_and_the_full_run():
    # 500 images in 3.5 s and 5,000 in 8 s: 4,500 more images in 4.5 s, so 1,000 img/s after 3.0 s of start-up
    rate, startup = beyond_startup(3.5, 8.0)
    assert rate == pytest.approx(1_000.0) and startup == pytest.approx(3.0)
    assert all(math.isnan(value) for value in beyond_startup(5.0, 5.0))   # no difference: nothing measured


def test_small_processed_copy_holds_the_first_pngs_and_the_settings(tmp_path):
    processed = tmp_path / "processed"
    (processed / "test").mkdir(parents=True)
    (processed / "preprocess.json").write_text("{}")
    for galaxy_id in (30, 10, 20):
        (processed / "test" / f"{galaxy_id}.png").write_bytes(b"png")
    small = small_processed_copy(processed, tmp_path / "small", 2)
    assert sorted(path.name for path in (small / "test").iterdir()) == ["10.png", "20.png"]
    assert (small / "preprocess.json").read_text() == "{}" and not (small / "labels.csv").exists()


def test_accuracy_rows_recipes_and_ensembles_are_valid_and_share_the_test_galaxies():
    for name, (_, settings) in rows().items():
        assert build_config(settings).validate().split_seed == 1337, name   # all score the same held-out galaxies
    for recipe in RECIPES:
        for _, _, seed, settings in member_plan(load_recipe(recipe), {}):
            assert build_config({**settings, "seed": seed}).split_seed == 1337, recipe
    for name, members in ENSEMBLES.items():
        assert len(set(members)) == len(members), name   # a member twice would weigh double
        for member in members:
            assert member in rows() or member.removeprefix("recipe ") in RECIPES, member
    names = [name for _, name, _ in plan()]
    assert len(names) == len(set(names))   # a row's name is its key in accuracy.csv and its folder


def test_accuracy_names_say_what_the_rows_are():
    texts = list(ABLATIONS) + [name for _, name, _ in plan()] + [name for name in vars(accuracy) if name.isupper()]
    for text in texts:
        assert not re.search(r"stop|issue|#\d", text, re.IGNORECASE), text


def test_accuracy_rows_log_to_files_and_a_rerun_skips_them(demo_raw, tmp_path, monkeypatch, capsys):
    settings = {"crop": "roi", "epochs": 1, "split_seed": 1337, "seed": 1337}
    monkeypatch.setattr(accuracy, "ABLATIONS", {"crop": {"ROI crop, 1 epoch": settings}})
    monkeypatch.setattr(accuracy, "RECIPES", [])
    monkeypatch.setattr(accuracy, "ENSEMBLES", {"1 member: ROI crop": ["ROI crop, 1 epoch"]})
    overrides = {"batch_size": 16, "threads": 1, "workers": 1, "amp": "false", "channels_last": "false"}
    cfg = build_config({"raw_dir": str(demo_raw), "out_dir": str(tmp_path), **overrides})
    run_accuracy(cfg, overrides)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "[1/2] crop: ROI crop, 1 epoch ..."
    assert lines[1].startswith("[1/2] crop: ROI crop, 1 epoch: val_rmse")
    assert lines[3].startswith("[2/2] ensembles: 1 member: ROI crop: test_rmse_tta")
    results = tmp_path / "accuracy"
    table = pd.read_csv(results / "accuracy.csv")
    assert list(table["run"]) == ["ROI crop, 1 epoch", "1 member: ROI crop"] and "error" not in table
    assert {"val_rmse", "val_rmse_tta", "test_rmse", "test_rmse_tta"} <= set(table.columns)
    assert table["test_rmse_tta"].notna().all()
    run_dir = results / "ROI_crop_1_epoch"
    assert "epoch 1: train loss" in (run_dir / "train.log").read_text()
    assert "--split=test" in (run_dir / "predict.log").read_text()
    assert (results / "data_roi" / "labels.csv").is_file()
    run_accuracy(cfg, overrides)
    assert "[1/2] crop: ROI crop, 1 epoch: in " in capsys.readouterr().out   # skipped: already in the table


def test_checkpoint_timing_writes_both_ways_and_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(speed, "ROUNDS", 1)
    cfg = Config(out_dir=str(tmp_path / "runs"), batch_size=4, image_size=32)   # a smaller net, the same writes
    training = TrainingBench(cfg, torch.device("cpu"), False, False, pool_size=8)
    training.model_step()   # Adam's moments exist, as in a run's checkpoint
    once, twice = checkpoint_seconds(cfg, training)
    assert 0 < once < float("inf") and 0 < twice < float("inf")
    assert list((tmp_path / "runs").iterdir()) == []
