"""Any image file: every Pillow mode decoded to 8-bit RGB by its real range, EXIF rotation, the
decompression-bomb limit, and predict.py --images / plot_image.py on a file."""
import io
from pathlib import Path
import struct
import sys
import zlib

from PIL import Image
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest

from config import Config
from dataset import LABEL_COLUMNS
from galaxy.crop import BadImage, crop_galaxy
from helpers import blob, save_checkpoint
import plot_image
from predict import main as predict_main

CFG = Config(image_size=32, roi_min_size=24, crop="roi")
SIDE = 96
FAST = ["--workers=1", "--batch_size=4", "--amp=false", "--channels_last=false"]


def galaxy(offset_x=0):
    """An 8-bit grayscale elongated galaxy on a dark noisy sky, SIDE px square."""
    rng = np.random.default_rng(offset_x)
    sky = 12 + rng.normal(0, 2, (SIDE, SIDE)) + blob(SIDE, SIDE / 2 + offset_x, SIDE / 2, 9, 150)
    sky += blob(SIDE, SIDE / 2 + offset_x + 8, SIDE / 2 - 4, 5, 60)   # asymmetric, so a rotation shows
    return np.clip(sky, 0, 255).astype(np.uint8)


def encode(image, fmt, **kwargs):
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def bomb_png(width=20000, height=20000):
    """A PNG header claiming width x height pixels, with no pixel data: cheap to make, never decoded."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IEND", b""))


def crop_of(data):
    return np.asarray(crop_galaxy(data, CFG)[0], np.float64)


def test_every_mode_gives_the_crop_of_the_8_bit_image():
    gray = galaxy()
    reference = crop_of(encode(Image.fromarray(gray).convert("RGB"), "PNG"))
    rgba = Image.fromarray(gray).convert("RGBA")
    variants = {
        "L": encode(Image.fromarray(gray), "PNG"),
        "RGBA": encode(rgba, "PNG"),
        "I;16 named .jpg": encode(Image.fromarray(gray.astype(np.uint16) * 257), "PNG"),
        "F 0..1": encode(Image.fromarray(gray.astype(np.float32) / 255), "TIFF"),
        "I;16B": encode(Image.frombytes("I;16B", gray.shape[::-1], (gray.astype(">u2") * 257).tobytes()), "TIFF"),
    }
    for name, data in variants.items():
        difference = np.abs(crop_of(data) - reference).mean()
        assert difference < 2, f"{name}: mean difference {difference:.1f} grey levels"
    # the bug this fixes: 16-bit pixels clipped to 255 made the crop almost white
    assert crop_of(variants["I;16 named .jpg"]).mean() < 100


def test_exif_rotated_jpeg_gives_the_upright_crop():
    upright = galaxy()
    stored = Image.fromarray(np.rot90(upright).copy())   # turned 90 degrees counter-clockwise on disk
    exif = Image.Exif()
    exif[0x0112] = 6   # "rotate 90 clockwise to display"
    rotated = crop_of(encode(stored, "JPEG", quality=98, exif=exif.tobytes()))
    straight = crop_of(encode(Image.fromarray(upright), "JPEG", quality=98))
    assert np.abs(rotated - straight).mean() < 2
    assert np.abs(crop_of(encode(stored, "JPEG", quality=98)) - straight).mean() > 5   # the tag did the work


def test_too_many_pixels_is_refused_from_the_header():
    with pytest.raises(BadImage, match="too many pixels: 20000x20000"):
        crop_galaxy(bomb_png(), CFG)


def test_too_many_pixels_by_a_lowered_limit(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", SIDE * SIDE - 1)
    with pytest.raises(BadImage, match=f"too many pixels: {SIDE}x{SIDE}"):
        crop_galaxy(encode(Image.fromarray(galaxy()), "PNG"), CFG)


# --- predict.py --images and plot_image.py on a file ----------------------------------------------

@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    gray = galaxy()
    good = {
        "a.jpg": encode(Image.fromarray(gray).convert("RGB"), "JPEG", quality=95),
        "b.png": encode(Image.fromarray(galaxy(6)).convert("RGB"), "PNG"),
        "gray.png": encode(Image.fromarray(gray), "PNG"),
        "rgba.png": encode(Image.fromarray(gray).convert("RGBA"), "PNG"),
        "sixteen.jpg": encode(Image.fromarray(gray.astype(np.uint16) * 257), "PNG"),
    }
    bad = {"small.jpg": encode(Image.fromarray(gray[:20, :20]), "JPEG"), "empty.jpg": b"",
           "text.jpg": b"not an image\n", "bomb.png": bomb_png()}
    for name, data in {**good, **bad}.items():
        (folder / name).write_bytes(data)
    run_dir = tmp_path_factory.mktemp("run")
    checkpoints = [save_checkpoint(run_dir / f"m{k}.pt", CFG, seed=k) for k in range(2)]
    return {"folder": folder, "good": sorted(good), "bad": sorted(bad), "checkpoints": checkpoints}


def run_main(monkeypatch, *args):
    monkeypatch.setattr(sys, "argv", ["predict.py", *args])
    predict_main()


def test_predict_a_folder_with_two_checkpoints_and_tta(files, tmp_path, monkeypatch):
    checkpoints = ",".join(str(p) for p in files["checkpoints"])
    run_main(monkeypatch, f"--checkpoint={checkpoints}", f"--images={files['folder']}", "--tta",
             f"--out_dir={tmp_path}", *FAST)
    predictions = pd.read_csv(tmp_path / "predictions.csv")
    assert list(predictions.columns) == ["file"] + LABEL_COLUMNS + ["summary"]
    assert [Path(name).name for name in predictions["file"]] == files["good"]
    assert predictions["summary"].str.len().gt(5).all()
    spread = pd.read_csv(tmp_path / "predictions_std.csv")
    assert list(spread.columns) == ["file"] + LABEL_COLUMNS and (spread[LABEL_COLUMNS].to_numpy() > 0).any()
    skipped = pd.read_csv(tmp_path / "predictions_skipped.csv").set_index("file")
    reasons = {Path(name).name: reason for name, reason in skipped["reason"].items()}
    assert sorted(reasons) == files["bad"]
    assert reasons["bomb.png"].startswith("too many pixels: 20000x20000")
    assert "too small" in reasons["small.jpg"] and reasons["empty.jpg"] == "empty file"
    assert reasons["text.jpg"] == "not an image: Pillow knows no image format that starts like this file"
    # the 16-bit PNG named .jpg predicts like its 8-bit twin
    by_name = predictions.set_index(predictions["file"].map(lambda p: Path(p).name))[LABEL_COLUMNS]
    np.testing.assert_allclose(by_name.loc["sixteen.jpg"], by_name.loc["gray.png"], atol=0.02)


def test_a_glob_and_a_single_file(files, tmp_path, monkeypatch):
    checkpoint = f"--checkpoint={files['checkpoints'][0]}"
    run_main(monkeypatch, checkpoint, f"--images={files['folder']}/*.png", f"--out_dir={tmp_path}", *FAST)
    assert sorted(Path(p).name for p in pd.read_csv(tmp_path / "predictions.csv")["file"]) == ["b.png", "gray.png",
                                                                                              "rgba.png"]
    assert not (tmp_path / "predictions_std.csv").exists()   # one member, no TTA: no spread
    run_main(monkeypatch, checkpoint, f"--images={files['folder'] / 'a.jpg'}", f"--out_dir={tmp_path}", *FAST)
    assert len(pd.read_csv(tmp_path / "predictions.csv")) == 1


def test_only_unreadable_files_is_a_one_line_error(files, tmp_path, monkeypatch):
    with pytest.raises(SystemExit) as exit_info:
        run_main(monkeypatch, f"--checkpoint={files['checkpoints'][0]}", f"--images={files['folder']}/*mpty.jpg",
                 f"--out_dir={tmp_path}", *FAST)
    message = str(exit_info.value.code)
    assert message.startswith("error: ") and "\n" not in message and "could be used" in message
    assert (tmp_path / "predictions_skipped.csv").is_file()


def test_plot_image_on_a_file(files, tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["plot_image.py", str(files["folder"] / "sixteen.jpg"),
                                      f"--checkpoint={files['checkpoints'][0]}", f"--out_dir={tmp_path}",
                                      "--amp=false", "--channels_last=false"])
    plot_image.main()
    plt.close("all")
    assert (tmp_path / "galaxy_sixteen.png").stat().st_size > 20_000
