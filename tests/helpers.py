"""Helpers shared by the test files: running a script or train.py, a random-weight checkpoint, the
demo config, comparing checkpoints' weights."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import preprocess
from config import Config
from dataset import make_split, save_split
from model import build_model

REPO = Path(__file__).resolve().parents[1]
SMALL = ["--batch_size=16", "--threads=1", "--workers=1", "--dropout=0.1"]   # train.py on the tests' data


def run_script(script, *args):
    return subprocess.run([sys.executable, str(REPO / script), *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def run_train(*args, check=True, **kwargs):
    result = subprocess.run([sys.executable, "-u", str(REPO / "train.py"), *args], cwd=REPO,
                            capture_output=True, text=True, timeout=300, **kwargs)
    if check:
        assert result.returncode == 0, result.stderr[-2000:]
    return result


def without_root_override():
    """Command prefix that runs a process without root's right to write anywhere (the tests run as
    root in CI), so a read-only folder is read-only to it; skips the test where that is impossible."""
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        pytest.skip("running as root and setpriv (util-linux) is missing: a read-only folder cannot be tested")
    return ["setpriv", "--inh-caps=-all", "--bounding-set=-all"]


def weights(path):
    return torch.load(path, weights_only=True)["model"]


def same_weights(a, b):
    return all(torch.equal(a[key], b[key]) for key in a)


def one_line_error(result):
    lines = result.stderr.strip().splitlines()
    assert result.returncode != 0 and len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def save_checkpoint(path, cfg, galaxy_ids=None, seed=0, train_mean=None):
    """A checkpoint as train.py writes it (random weights: the tests need a model, not a good
    one), with split.csv beside it when galaxy_ids are given."""
    torch.manual_seed(seed)
    torch.save({"model": build_model(cfg).state_dict(), "config": cfg.to_dict(), "train_mean": train_mean}, path)
    if galaxy_ids is not None:
        save_split(make_split(galaxy_ids, cfg.split_seed, 0.2, 0.2), os.path.join(os.path.dirname(path), "split.csv"))
    return path


def demo_config(processed_dir):
    """A Config with the crop settings the demo PNGs were made with (as training would use)."""
    with open(os.path.join(processed_dir, preprocess.SETTINGS_FILE)) as f:
        return Config(**json.load(f), processed_dir=str(processed_dir))
