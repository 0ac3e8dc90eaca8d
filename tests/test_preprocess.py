"""Tests of preprocess.py: the raw layouts, resuming, safe writing, bad input, the CLI."""
import io
import os
from pathlib import Path
import shutil
import signal
import subprocess
import sys
import time
import zipfile

from PIL import Image
import numpy as np
import pandas as pd
import pytest

from config import build_config
from conftest import REPO, SHARED_SAMPLE, needs_real_sample
from dataset import LABEL_COLUMNS, DataError
from galaxy import kaggle_raw
from helpers import jpeg_bytes, sky_with_galaxies
from galaxy import files, preprocessing
from galaxy.crop import SETTINGS_FILE


def run(cfg_overrides):
    cfg = build_config({"workers": 2, "crop": "roi", **cfg_overrides})
    return cfg, preprocessing.preprocess(cfg, progress=False)


def run_cli(*args):
    return subprocess.run([sys.executable, str(REPO / "preprocess.py"), *args], capture_output=True, text=True,
                          cwd=REPO, timeout=120)


def test_png_writer_round_trips_through_pillow():
    pixels = np.random.default_rng(0).integers(0, 256, (40, 56, 3), dtype=np.uint8)   # not square: rows vs columns
    png = preprocessing._png_bytes(Image.fromarray(pixels))
    Image.open(io.BytesIO(png)).verify()   # the chunk CRCs
    with Image.open(io.BytesIO(png)) as image:
        assert image.mode == "RGB" and np.array_equal(np.asarray(image), pixels)


@pytest.mark.parametrize("unnamed_files", [True, False])   # Linux's O_TMPFILE, and the portable way
def test_files_are_written_whole_and_replace_old_ones(tmp_path, monkeypatch, unnamed_files):
    if not unnamed_files:
        monkeypatch.delattr(os, "O_TMPFILE", raising=False)
    files.write_whole(str(tmp_path / "new.png"), b"new")
    (tmp_path / "old.png").write_bytes(b"a half-written file from a killed older tool")
    files.write_whole(str(tmp_path / "old.png"), b"replaced")
    assert (tmp_path / "new.png").read_bytes() == b"new" and (tmp_path / "old.png").read_bytes() == b"replaced"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new.png", "old.png"]   # no temporary files left


def test_labels_csv_text_is_what_pandas_writes():
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.random((5, len(LABEL_COLUMNS))), np.zeros((1, len(LABEL_COLUMNS)))])
    values[0, :3] = [1.0, 0.175681575, 1e-7]   # Kaggle's 9 decimals, whole numbers, tiny ones
    labels = pd.DataFrame(values, columns=LABEL_COLUMNS, index=pd.Index([100008, 5, 999999, 7, 8, 9], name="GalaxyID"))
    assert preprocessing._labels_csv(labels) == labels.reset_index().to_csv(index=False)


# --- raw layouts --------------------------------------------------------------------------------


def extract(zip_path, folder):
    with zipfile.ZipFile(zip_path) as archive:
        archive.extractall(folder)


def test_demo_set_preprocesses_completely(demo_processed):
    processed = Path(demo_processed.processed_dir)
    labels = pd.read_csv(processed / "labels.csv")
    assert list(labels.columns) == ["GalaxyID"] + LABEL_COLUMNS and len(labels) == 96
    assert labels.GalaxyID.is_monotonic_increasing
    assert sorted(int(p.stem) for p in (processed / "train").glob("*.png")) == list(labels.GalaxyID)
    assert len(list((processed / "test").glob("*.png"))) == 16
    assert len(pd.read_csv(processed / "skipped.csv")) == 0


def test_extracted_and_flat_zip_layouts_give_the_same_output(demo_raw, demo_processed, tmp_path):
    expected = pd.read_csv(Path(demo_processed.processed_dir) / "labels.csv")
    extracted = tmp_path / "extracted"
    for name in ("images_training_rev1", "images_test_rev1", "training_solutions_rev1"):
        extract(demo_raw / f"{name}.zip", extracted)
    flat = tmp_path / "flat"   # zips whose members have no top folder
    flat.mkdir()
    shutil.copy(demo_raw / "training_solutions_rev1.zip", flat)
    for name in ("images_training_rev1", "images_test_rev1"):
        with zipfile.ZipFile(flat / f"{name}.zip", "w") as archive:
            for jpeg in (extracted / name).iterdir():
                archive.write(jpeg, jpeg.name)
    for raw_dir in (extracted, flat):
        cfg, summary = run({"raw_dir": str(raw_dir), "processed_dir": str(raw_dir) + "_out"})
        assert summary["train"] == 96 and summary["test"] == 16
        pd.testing.assert_frame_equal(pd.read_csv(Path(cfg.processed_dir) / "labels.csv"), expected)
    reference = kaggle_raw.raw_images(flat, "train")[int(expected.GalaxyID[0])]
    assert kaggle_raw.read_raw(flat, reference)[:2] == b"\xff\xd8"


def test_rerun_resumes(demo_raw, tmp_path):
    overrides = {"raw_dir": str(demo_raw), "processed_dir": str(tmp_path / "out")}
    cfg, first = run(overrides)
    assert first["written"] == 112
    _, second = run(overrides)
    assert second["written"] == 0 and second["present"] == 112
    train = tmp_path / "out" / "train"
    victim = sorted(train.glob("*.png"))[0]
    victim.write_bytes(victim.read_bytes()[:200])   # as if killed mid-write by an older tool
    leftover = train / f"{victim.name}.4242.tmp"
    leftover.write_bytes(b"half a png")
    _, third = run(overrides)
    assert third["written"] == 1 and third["train"] == 96
    assert Image.open(victim).size == (64, 64) and not leftover.exists()
    _, fourth = run({**overrides, "crop": "center"})   # other crop settings: every PNG is redone
    assert fourth["written"] == 112


def test_ctrl_c_stops_cleanly_and_the_rerun_finishes(demo_raw, tmp_path):
    """Ctrl-C (SIGINT to the whole process group, as a terminal sends it) mid-run: exit 130, only
    complete PNGs and no temporary files left; the same command then writes just the rest."""
    raw = tmp_path / "raw"
    extract(demo_raw / "images_training_rev1.zip", raw)
    extract(demo_raw / "training_solutions_rev1.zip", raw)
    images, csv = raw / "images_training_rev1", raw / "training_solutions_rev1.csv"
    jpegs, labels = sorted(images.iterdir()), pd.read_csv(csv)
    copies = []   # 30 copies of the 96 galaxies under new IDs: a run long enough to interrupt
    for copy in range(1, 30):
        for jpeg in jpegs:
            (images / f"{copy}{jpeg.name}").write_bytes(jpeg.read_bytes())
        copies.append(labels.assign(GalaxyID=[int(f"{copy}{galaxy_id}") for galaxy_id in labels.GalaxyID]))
    pd.concat([labels] + copies).to_csv(csv, index=False)
    out = tmp_path / "out"
    # crop=roi: its search makes each image slower than the fixed crop, so the run is long enough to interrupt
    command = [sys.executable, str(REPO / "preprocess.py"), f"--raw_dir={raw}", f"--processed_dir={out}", "--workers=1",
               "--crop=roi"]
    # SIGINT back to its default in the child, as in a terminal: a suite started in the background
    # (`cmd &` in a script) inherits SIGINT ignored, and Python then never raises KeyboardInterrupt
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    while len(list((out / "train").glob("*.png"))) < 100:   # well under way
        assert process.poll() is None, process.communicate()
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGINT)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 130 and "interrupted: the PNGs already written are kept" in stderr, stderr
    written = sorted((out / "train").iterdir())
    assert 100 <= len(written) < 30 * 96 and all(path.suffix == ".png" for path in written)
    for path in written:
        with Image.open(path) as image:
            image.load()
            assert image.size == (64, 64)
    rerun = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr
    assert f"{30 * 96 - len(written)} PNGs written, {len(written)} already present" in rerun.stdout


# --- bad input ----------------------------------------------------------------------------------


def test_bad_input_is_skipped_with_reasons(demo_raw, tmp_path):
    raw = tmp_path / "raw"
    extract(demo_raw / "training_solutions_rev1.zip", raw)
    extract(demo_raw / "images_training_rev1.zip", raw)
    images = raw / "images_training_rev1"
    kept = sorted(images.iterdir())[:6]
    for extra in sorted(images.iterdir())[6:]:
        extra.unlink()
    good = kept[0].read_bytes()
    ids = [int(p.stem) for p in kept]
    (images / f"{ids[1]}.jpg").write_bytes(good[: len(good) // 2])            # truncated
    (images / f"{ids[2]}.jpg").write_bytes(b"")                               # zero bytes
    (images / f"{ids[3]}.jpg").write_bytes(b"<html>not found</html>")         # not a JPEG
    (images / f"{ids[4]}.jpg").write_bytes(jpeg_bytes(np.full((32, 32), 50.0)))  # too small
    (images / f"{ids[5]}.jpg").write_bytes(jpeg_bytes(sky_with_galaxies(300), mode="L"))  # gray, 300 px: used
    (images / "123456789.jpg").write_bytes(good)                              # no label row
    (images / "galaxy.jpg").write_bytes(good)                                 # name is no GalaxyID
    table = pd.read_csv(raw / "training_solutions_rev1.csv")
    table.loc[table.GalaxyID == ids[5], "Class1.1"] = 0.5                     # ... duplicate below
    broken = table[table.GalaxyID.isin(ids[:1])].copy()
    nan_row, high_row, bad_id_row = broken.copy(), broken.copy(), broken.copy()
    nan_row["GalaxyID"], nan_row["Class3.1"] = 555001, np.nan
    high_row["GalaxyID"], high_row["Class1.1"] = 555002, 1.5
    bad_id_row["GalaxyID"] = "abc"
    duplicate = table[table.GalaxyID == ids[0]].assign(**{"Class1.1": 0.99})
    table = pd.concat([table, duplicate, nan_row, high_row, bad_id_row])
    table.to_csv(raw / "training_solutions_rev1.csv", index=False)
    for jpeg_id in (555001, 555002):
        (images / f"{jpeg_id}.jpg").write_bytes(good)

    cfg, summary = run({"raw_dir": str(raw), "processed_dir": str(tmp_path / "out")})
    skipped = pd.read_csv(tmp_path / "out" / "skipped.csv", dtype=str)
    reasons = {(row.galaxy_id, row.reason.split(":")[0]) for row in skipped.itertuples()}
    for galaxy_id, reason in [(ids[1], "corrupt or truncated image"), (ids[2], "empty file"),
                              (ids[3], "not an image"), (ids[4], "image too small"),
                              (123456789, "image without label row"), (ids[0], "duplicate GalaxyID in labels"),
                              (555001, "label value missing or not a number"),
                              (555002, "label value outside [0, 1]"), ("abc", "bad GalaxyID in labels")]:
        assert (str(galaxy_id), reason) in reasons
    assert ("nan", "file name is not a GalaxyID") in {(str(g).lower(), r) for g, r in reasons}
    assert summary["skipped"]["label row without image"] == 96 - 6
    labels = pd.read_csv(tmp_path / "out" / "labels.csv")
    assert list(labels.GalaxyID) == [ids[0], ids[5]]
    assert labels.loc[0, "Class1.1"] != 0.99   # the first of the duplicated rows is kept
    assert summary["train"] == 2 and sum(summary["skipped"].values()) == len(skipped)


def test_labels_with_missing_columns_exit_with_the_file_and_columns(demo_raw, tmp_path):
    raw = tmp_path / "raw"
    extract(demo_raw / "images_training_rev1.zip", raw)
    extract(demo_raw / "training_solutions_rev1.zip", raw)
    csv = raw / "training_solutions_rev1.csv"
    pd.read_csv(csv).drop(columns=["Class7.2", "Class11.6"]).to_csv(csv, index=False)
    with pytest.raises(DataError, match=r"training_solutions_rev1.csv lacks the columns Class7.2, Class11.6"):
        run({"raw_dir": str(raw), "processed_dir": str(tmp_path / "out")})


def test_missing_or_empty_raw_dir_says_what_goes_where(tmp_path):
    for raw_dir in (tmp_path / "nowhere", tmp_path):
        with pytest.raises(SystemExit) as stop:
            run({"raw_dir": str(raw_dir), "processed_dir": str(tmp_path / "out")})
        message = str(stop.value.code)
        assert "kaggle competitions download -c galaxy-zoo-the-galaxy-challenge" in message
        assert "images_training_rev1.zip" in message and "unzipping is not needed" in message
    only_junk = tmp_path / "junk" / "images_test_rev1"
    only_junk.mkdir(parents=True)
    (only_junk / "1.jpg").write_bytes(b"junk")
    with pytest.raises(SystemExit, match="no image could be used"):
        run({"raw_dir": str(only_junk.parent), "processed_dir": str(tmp_path / "out2")})


# --- the command line ---------------------------------------------------------------------------


def test_cli_overrides_and_unknown_keys(demo_raw, tmp_path):
    result = run_cli(f"--raw_dir={demo_raw}", f"--processed_dir={tmp_path}", "--crop=center", "--image_size=32",
                     "--workers=1")
    assert result.returncode == 0, result.stderr
    assert "112 PNGs written" in result.stdout
    assert Image.open(next((tmp_path / "test").glob("*.png"))).size == (32, 32)
    assert '"crop": "center"' in (tmp_path / SETTINGS_FILE).read_text()
    result = run_cli("--cropp=center")
    assert result.returncode != 0 and "unknown key --cropp" in result.stderr
    result = run_cli(f"--raw_dir={tmp_path / 'missing'}")
    assert result.returncode != 0 and "kaggle competitions download" in result.stderr


# --- the real sample ----------------------------------------------------------------------------


@needs_real_sample
def test_real_sample(tmp_path):
    _, summary = run({"raw_dir": str(SHARED_SAMPLE), "processed_dir": str(tmp_path)})
    assert summary["train"] == 3000 and summary["test"] == 200 and not summary["skipped"]
    assert len(list((tmp_path / "train").glob("*.png"))) == 3000
    assert len(list((tmp_path / "test").glob("*.png"))) == 200
    assert len(pd.read_csv(tmp_path / "labels.csv")) == 3000


# --- a subset by GalaxyID (--ids) ---------------------------------------------------------------


def test_ids_keep_only_the_listed_galaxies_of_both_splits(demo_raw, demo_processed, tmp_path):
    train_ids = pd.read_csv(Path(demo_processed.processed_dir) / "labels.csv").GalaxyID.tolist()[:5]
    test_ids = sorted(int(p.stem) for p in (Path(demo_processed.processed_dir) / "test").glob("*.png"))[:3]
    absent = [1, 2]
    listed = tmp_path / "ids.csv"
    pd.DataFrame({"GalaxyID": train_ids + test_ids + absent, "note": "x"}).to_csv(listed, index=False)
    out = tmp_path / "out"
    _, summary = run({"raw_dir": str(demo_raw), "processed_dir": str(out), "ids": str(listed)})
    assert summary["train"] == 5 and summary["test"] == 3
    assert summary["skipped"] == {"listed in ids but not in raw_dir": 2}
    assert pd.read_csv(out / "labels.csv").GalaxyID.tolist() == sorted(train_ids)
    assert sorted(int(p.stem) for p in (out / "test").glob("*.png")) == test_ids
    skipped = pd.read_csv(out / "skipped.csv")
    assert skipped.galaxy_id.tolist() == absent and set(skipped.reason) == {"listed in ids but not in raw_dir"}
    # one ID a line, no header: the same galaxies
    text = tmp_path / "ids.txt"
    text.write_text("\n".join(str(galaxy_id) for galaxy_id in train_ids + test_ids) + "\n")
    _, again = run({"raw_dir": str(demo_raw), "processed_dir": str(out), "ids": str(text)})
    assert again["present"] == 8 and again["written"] == 0 and not again["skipped"]


def test_unusable_ids_files_are_one_line_errors_naming_the_file(demo_raw, tmp_path):
    empty, wrong = tmp_path / "empty.csv", tmp_path / "wrong.csv"
    empty.write_text("GalaxyID\n")
    wrong.write_text("id\n1\n")
    for path, fragment in ((empty, "holds no GalaxyID"), (wrong, "has no GalaxyID column"),
                           (tmp_path / "missing.csv", "cannot read")):
        with pytest.raises(DataError, match=fragment) as error:
            run({"raw_dir": str(demo_raw), "processed_dir": str(tmp_path / "out"), "ids": str(path)})
        assert str(path) in str(error.value) and "\n" not in str(error.value)
    result = run_cli(f"--raw_dir={demo_raw}", f"--processed_dir={tmp_path / 'out'}", f"--ids={empty}")
    assert result.returncode == 1 and result.stderr.strip().startswith("error: --ids=") and not result.stdout
