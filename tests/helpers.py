"""Helpers shared by the test files: running a script or train.py (also without root's powers), a
random-weight checkpoint, the demo config, comparing checkpoints' weights, synthetic images."""
import io
import json
import os
from pathlib import Path
import shutil
import subprocess
import sys

from PIL import Image
import numpy as np
import pytest
import torch

from config import Config
from dataset import make_split, save_split
from galaxy.crop import SETTINGS_FILE
from model import build_model

REPO = Path(__file__).resolve().parents[1]
# train.py on the tests' data, fp32 NCHW forced: "auto" would time the numerics candidates at every start
# (tested on its own in test_train.py)
SMALL = ["--batch_size=16", "--threads=1", "--workers=1", "--dropout=0.1", "--amp=false", "--channels_last=false"]


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
    prefix = ["setpriv", "--inh-caps=-all", "--bounding-set=-all"]
    if shutil.which("setpriv") is None:
        pytest.skip("running as root and setpriv (util-linux) is missing: a read-only folder cannot be tested")
    probe = subprocess.run(prefix + ["true"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"setpriv cannot drop root's capabilities here: {probe.stderr.strip()}")
    return prefix


def without_root_powers(*command):
    """Run command without root's right to write anywhere: it then meets file permissions, as a user does."""
    return subprocess.run(without_root_override() + list(command), cwd=REPO, capture_output=True, text=True,
                          timeout=120)


def weights(path):
    return torch.load(path, weights_only=True)["model"]


def same_weights(a, b):
    return all(torch.equal(a[key], b[key]) for key in a)


def one_line_error(result):
    lines = result.stderr.strip().splitlines()
    assert result.returncode != 0 and len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def main_error(monkeypatch, main, script, *args):
    """A script's main() run in this process (no second torch import): the one-line message it exits with."""
    monkeypatch.setattr(sys, "argv", [script, *args])
    with pytest.raises(SystemExit) as exit_info:
        main()
    message = str(exit_info.value.code)
    assert message.startswith("error: ") and "\n" not in message
    return message


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
    with open(os.path.join(processed_dir, SETTINGS_FILE)) as f:
        return Config(**json.load(f), processed_dir=str(processed_dir))


def blob(size, x, y, sigma, peak):
    yy, xx = np.mgrid[0:size, 0:size]
    return peak * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * sigma ** 2))


def sky_with_galaxies(size=424, seed=0):
    """A faint central galaxy (sigma 15 px) and a much brighter neighbour off centre."""
    rng = np.random.default_rng(seed)
    image = 10 + rng.normal(0, 2, (size, size)) + blob(size, size / 2, size / 2, 15, 80)
    return image + blob(size, 90, 330, 20, 240)


def jpeg_bytes(array, mode="RGB", quality=95):
    pixels = np.clip(array, 0, 255).astype(np.uint8)
    if mode == "RGB" and pixels.ndim == 2:
        pixels = np.stack([pixels] * 3, axis=-1)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()
