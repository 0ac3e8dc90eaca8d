"""Shared pytest fixtures: a small synthetic data set in Kaggle's layout, raw and preprocessed.

    demo_raw        Path of a raw_dir holding Kaggle's three zips with 96 train + 16 test galaxies
    demo_processed  a Config whose raw_dir is demo_raw and whose processed_dir holds its PNGs and
                    labels.csv (crop=roi, image_size=64); treat both folders as read-only
    data_args       train.py's arguments for demo_processed with helpers.SMALL
    full_run        (out_dir, result) of two uninterrupted epochs with data_args: the reference for
                    resume and determinism; treat out_dir as read-only (copy what a test changes)

All are built once per test session. SHARED_SAMPLE is the real 3,000 + 200 image sample beside
the repository (../shared); mark tests that need it with @needs_real_sample.
"""
from pathlib import Path
import signal
import sys

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))   # import the project's scripts as modules, from wherever pytest runs

from config import build_config  # noqa: E402
from galaxy import demo  # noqa: E402
from galaxy.preprocessing import preprocess  # noqa: E402
from helpers import SMALL, run_train  # noqa: E402

# A shell starts a background job (`pytest &`, nohup) with SIGINT ignored, and the scripts started by the
# tests would inherit that: the tests of Ctrl-C need it delivered, as a terminal delivers it.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

SHARED_SAMPLE = Path(__file__).resolve().parents[2] / "shared/data/galaxy-zoo-sample"
needs_real_sample = pytest.mark.skipif(
    not (SHARED_SAMPLE / "training_solutions_rev1.csv").is_file(),
    reason=f"the real Galaxy Zoo sample is not at {SHARED_SAMPLE} (clone the shared repo beside main)")

DEMO_TRAIN, DEMO_TEST, DEMO_SEED = 96, 16, 1337


@pytest.fixture(scope="session")
def demo_raw(tmp_path_factory):
    raw_dir = tmp_path_factory.mktemp("demo") / "raw"
    return demo.make_demo(raw_dir, DEMO_TRAIN, DEMO_TEST, DEMO_SEED, workers=2, progress=False)


@pytest.fixture(scope="session")
def demo_processed(demo_raw):
    cfg = build_config({"raw_dir": str(demo_raw), "processed_dir": str(demo_raw.parent / "processed"),
                        "workers": 2, "crop": "roi"})
    preprocess(cfg, progress=False)
    return cfg


@pytest.fixture(scope="session")
def data_args(demo_processed):
    return [f"--processed_dir={demo_processed.processed_dir}"] + SMALL


@pytest.fixture(scope="session")
def full_run(data_args, tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("full")
    result = run_train(*data_args, "--epochs=2", f"--out_dir={out_dir}")
    return out_dir, result
