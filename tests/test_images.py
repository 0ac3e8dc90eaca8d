"""Any image file: every Pillow mode decoded to 8-bit RGB by its real range, EXIF rotation, the
decompression-bomb limit, and predict.py --images / plot_image.py on a file: any file name, special
files, a run's files as one set, failed writes and Ctrl-C."""
import errno
import io
import os
from pathlib import Path
import signal
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
from galaxy.ensemble import read_regular_file
from galaxy.files import file_path
import helpers
from helpers import blob, run_script, save_checkpoint
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
    # no split.csv beside these checkpoints: no calibration, so the raw spread (never named std)
    spread = pd.read_csv(tmp_path / "predictions_spread.csv")
    assert not (tmp_path / "predictions_std.csv").exists()
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


# --- any file name, special files ----------------------------------------------------------------

def jpeg(offset=0):
    return encode(Image.fromarray(galaxy(offset)).convert("RGB"), "JPEG", quality=95)


def write_named(folder, name, data):
    """Write data to folder/name, name as bytes: any bytes, UTF-8 or not."""
    path = os.path.join(os.fsencode(folder), os.fsencode(name))
    with open(path, "wb") as f:
        f.write(data)
    return path


def as_bytes(column):
    """The paths a CSV column names, as bytes (galaxy.files.file_path undoes the writing's escapes)."""
    return sorted(os.fsencode(file_path(text)) for text in column)


NAMES = [b"\xff\xfebad.jpg", "car\rriage.jpg", "new\nline.jpg", "comma,name.jpg", 'quo"te.jpg', "space name.jpg",
         "\u00fcn\u00efcode.jpg", "back\\x41slash.jpg"]


def test_every_file_name_round_trips_through_the_csvs(files, tmp_path, monkeypatch, capsys):
    folder, out = tmp_path / "in", tmp_path / "out"
    folder.mkdir()
    paths = sorted(write_named(folder, name, jpeg(k)) for k, name in enumerate(NAMES))
    broken = write_named(folder, b"\xfe\rempty.jpg", b"")
    checkpoints = ",".join(str(p) for p in files["checkpoints"])
    run_main(monkeypatch, f"--checkpoint={checkpoints}", f"--images={folder}", "--tta", "--embed",
             f"--out_dir={out}", *FAST)
    for name in ("predictions.csv", "predictions_spread.csv"):
        table = pd.read_csv(out / name)
        assert len(table) == len(NAMES) and as_bytes(table["file"]) == paths
    assert f"{folder}/\\xff\\xfebad.jpg" in table["file"].tolist()   # as Python's backslashreplace writes it
    skipped = pd.read_csv(out / "predictions_skipped.csv")
    assert as_bytes(skipped["file"]) == [broken] and skipped["reason"].tolist() == ["empty file"]
    assert as_bytes(pd.read_csv(out / "embeddings_ids.csv", dtype={"id": str})["id"]) == paths
    assert f"skipped 1 unusable files: {folder}/\\xfe\\x0dempty.jpg" in capsys.readouterr().out


def test_plot_image_on_names_a_title_would_choke_on(files, tmp_path, monkeypatch, capsys):
    for name in (b"\xff\xfebad.jpg", b"cost$x^{$.jpg"):   # not UTF-8; mathtext that does not parse
        path = write_named(tmp_path, name, jpeg())
        monkeypatch.setattr(sys, "argv", ["plot_image.py", os.fsdecode(path), f"--checkpoint={files['checkpoints'][0]}",
                                          f"--out_dir={tmp_path}", "--amp=false", "--channels_last=false"])
        plot_image.main()
        plt.close("all")
        assert os.path.getsize(os.path.join(os.fsencode(tmp_path), b"galaxy_" + name[:-4] + b".png")) > 20_000
    assert f"wrote {tmp_path}/galaxy_\\xff\\xfebad.png" in capsys.readouterr().out


def test_special_files_are_skipped_with_their_reason(files, tmp_path):
    """In a subprocess: a FIFO that were opened would block the run for good."""
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(jpeg())
    (folder / "link.jpg").symlink_to(folder / "a.jpg")
    (folder / "loop.jpg").symlink_to(folder / "loop.jpg")
    (folder / "dangling.jpg").symlink_to(folder / "missing.jpg")
    os.mkfifo(folder / "fifo.jpg")
    (folder / "y.jpg").mkdir()   # a folder is no file: left out
    expected = {"dangling.jpg": f"dangling link (to {folder / 'missing.jpg'}, which does not exist)",
                "fifo.jpg": "not a regular file (FIFO)", "loop.jpg": "symlink loop"}
    checkpoint = f"--checkpoint={files['checkpoints'][0]}"
    for k, spec in enumerate((folder, f"{folder}/*.jpg")):
        result = run_script("predict.py", checkpoint, f"--images={spec}", f"--out_dir={tmp_path / str(k)}", *FAST)
        assert result.returncode == 0, result.stderr[-2000:]
        assert sorted(Path(p).name for p in pd.read_csv(tmp_path / str(k) / "predictions.csv")["file"]) == \
            ["a.jpg", "link.jpg"]
        skipped = pd.read_csv(tmp_path / str(k) / "predictions_skipped.csv")
        assert dict(zip(skipped["file"].map(lambda p: Path(p).name), skipped["reason"])) == expected
        assert "skipped 3 unusable files" in result.stdout
    result = run_script("predict.py", checkpoint, f"--images={folder / 'fifo.jpg'}", f"--out_dir={tmp_path}", *FAST)
    assert "could be used" in helpers.one_line_error(result)
    assert pd.read_csv(tmp_path / "predictions_skipped.csv")["reason"].tolist() == ["not a regular file (FIFO)"]
    signal.alarm(30)   # were the FIFO opened for reading the usual way, this would wait for a writer forever
    with pytest.raises(BadImage, match=r"not a regular file \(FIFO\)"):
        read_regular_file(folder / "fifo.jpg")
    signal.alarm(0)


# --- a run's files are one set ---------------------------------------------------------------------

def test_a_run_replaces_the_whole_set_of_an_earlier_one(files, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    both = ",".join(str(p) for p in files["checkpoints"])
    run_main(monkeypatch, f"--checkpoint={both}", f"--images={files['folder'] / 'a.jpg'}", f"--out_dir={out}", *FAST)
    assert (out / "predictions_spread.csv").is_file()
    run_main(monkeypatch, f"--checkpoint={files['checkpoints'][0]}", f"--images={files['folder'] / 'b.png'}",
             f"--out_dir={out}", *FAST)
    assert f"removed {out / 'predictions_spread.csv'}: an earlier run's" in capsys.readouterr().out
    assert not (out / "predictions_spread.csv").exists()   # it was about a.jpg
    assert pd.read_csv(out / "predictions.csv")["file"].tolist() == [str(files["folder"] / "b.png")]

    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "good.jpg").write_bytes(jpeg())
    (folder / "bad.jpg").write_bytes(b"")
    args = [f"--checkpoint={files['checkpoints'][0]}", f"--images={folder}", f"--out_dir={out}", *FAST]
    run_main(monkeypatch, *args)
    assert (out / "predictions_skipped.csv").is_file()
    (folder / "bad.jpg").write_bytes(jpeg(3))   # mended: no skipped list of the earlier run stays
    run_main(monkeypatch, *args)
    assert not (out / "predictions_skipped.csv").exists() and len(pd.read_csv(out / "predictions.csv")) == 2
    for name in ("good.jpg", "bad.jpg"):   # nothing usable: the skipped list alone, no earlier predictions
        (folder / name).write_bytes(b"")
    assert "could be used" in helpers.main_error(monkeypatch, predict_main, "predict.py", *args)
    assert not (out / "predictions.csv").exists() and len(pd.read_csv(out / "predictions_skipped.csv")) == 2


@pytest.mark.parametrize("failure", [OSError(errno.ENOSPC, "No space left on device"),
                                     UnicodeEncodeError("utf-8", "\udcff", 0, 1, "surrogates not allowed")])
def test_a_failed_write_keeps_the_earlier_set_and_the_predictions(files, tmp_path, monkeypatch, failure):
    both = ",".join(str(p) for p in files["checkpoints"])
    run_main(monkeypatch, f"--checkpoint={both}", f"--images={files['folder'] / 'a.jpg'}", f"--out_dir={tmp_path}",
             *FAST)
    earlier = {path.name: path.read_bytes() for path in tmp_path.glob("predictions*.csv")}
    to_csv = pd.DataFrame.to_csv

    def failing(table, path, *args, **kwargs):
        if "predictions_spread.csv" in str(path):
            raise failure
        return to_csv(table, path, *args, **kwargs)
    monkeypatch.setattr(pd.DataFrame, "to_csv", failing)
    message = helpers.main_error(monkeypatch, predict_main, "predict.py", f"--checkpoint={both}",
                                 f"--images={files['folder']}", f"--out_dir={tmp_path}", *FAST)
    assert {path.name: path.read_bytes() for path in tmp_path.glob("predictions*.csv")} == earlier
    assert not list(tmp_path.glob("*.tmp")) and f"the files in {tmp_path} are as they were" in message
    rescued = tmp_path / "predictions_rescued.npz"
    assert f"the results are kept in {rescued}" in message
    assert ("no space left on its disk" in message) == isinstance(failure, OSError)
    kept = np.load(rescued)
    assert [Path(name).name for name in kept["name"]] == files["good"] and kept["mean"].shape == (5, 37)
    assert sorted(Path(name).name for name in kept["skipped_name"]) == files["bad"]


def test_an_interrupt_says_exactly_what_was_written(files, tmp_path, monkeypatch):
    args = [f"--checkpoint={','.join(str(p) for p in files['checkpoints'])}", f"--out_dir={tmp_path}", *FAST]
    run_main(monkeypatch, f"--images={files['folder'] / 'a.jpg'}", *args)
    earlier = {path.name: path.read_bytes() for path in tmp_path.glob("predictions*.csv")}
    to_csv = pd.DataFrame.to_csv

    def interrupted(table, path, *more, **kwargs):   # Ctrl-C while the files are written
        if "predictions_skipped.csv" in str(path):
            raise KeyboardInterrupt
        return to_csv(table, path, *more, **kwargs)
    monkeypatch.setattr(pd.DataFrame, "to_csv", interrupted)
    with pytest.raises(SystemExit, match="^interrupted: nothing written$"):
        run_main(monkeypatch, f"--images={files['folder']}", *args)
    assert {path.name: path.read_bytes() for path in tmp_path.glob("predictions*.csv")} == earlier
    assert not list(tmp_path.glob("*.tmp"))

    monkeypatch.setattr(pd.DataFrame, "to_csv", to_csv)
    replace, sent = os.replace, []

    def replace_after_ctrl_c(source, target):   # Ctrl-C as the new set is swapped in: it waits for the last file
        if not sent:
            sent.append(os.kill(os.getpid(), signal.SIGINT))
        return replace(source, target)
    monkeypatch.setattr(os, "replace", replace_after_ctrl_c)
    with pytest.raises(SystemExit) as exit_info:
        run_main(monkeypatch, f"--images={files['folder']}", *args)
    names = ["predictions_spread.csv", "predictions_skipped.csv", "predictions.csv"]
    assert exit_info.value.code == (f"interrupted after writing {', '.join(str(tmp_path / n) for n in names)}; "
                                    f"nothing else written")
    assert sorted(Path(p).name for p in pd.read_csv(tmp_path / "predictions_spread.csv")["file"]) == files["good"]
