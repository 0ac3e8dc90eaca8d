"""preprocess.py against damaged or hostile input: damaged zips, same-named zip
members, odd label rows, unwritable output folders, two runs at once, unforeseen errors."""
import errno
import os
from pathlib import Path
import shutil
import signal
import subprocess
import sys
import time
import zipfile

import pandas as pd
import pytest

from config import build_config
from conftest import REPO
from dataset import DataError
from galaxy import kaggle_raw
from galaxy.files import atomic_write
from galaxy.labels import read_labels
from helpers import one_line_error, run_script, without_root_powers
from galaxy import files, preprocessing


def run(cfg_overrides):
    cfg = build_config({"workers": 2, **cfg_overrides})
    return cfg, preprocessing.preprocess(cfg, progress=False)


def demo_members(demo_raw, count):
    """{name: bytes} of the first count training JPEGs of the demo zip."""
    with zipfile.ZipFile(demo_raw / "images_training_rev1.zip") as archive:
        names = sorted(n for n in archive.namelist() if n.endswith(".jpg"))[:count]
        return {name: archive.read(name) for name in names}


def raw_with_zip(demo_raw, tmp_path, members):
    """A raw_dir with the demo labels and an images_training_rev1.zip of members [(name, bytes, compression)]."""
    raw = tmp_path / "raw"
    raw.mkdir()
    shutil.copy(demo_raw / "training_solutions_rev1.zip", raw)
    with zipfile.ZipFile(raw / "images_training_rev1.zip", "w") as archive:
        for name, data, compression in members:
            archive.writestr(zipfile.ZipInfo(name), data, compress_type=compression)
    return raw


def damage_member(zip_path, name):
    """Flip bytes in the middle of one member's stored data, leaving the zip's directory intact."""
    with zipfile.ZipFile(zip_path) as archive:
        info = archive.getinfo(name)
    data = bytearray(zip_path.read_bytes())
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    middle = start + info.compress_size // 2
    data[middle:middle + 8] = bytes(b ^ 0xFF for b in data[middle:middle + 8])
    zip_path.write_bytes(bytes(data))


def test_truncated_image_zip_is_a_one_line_error(demo_raw, tmp_path):
    raw = tmp_path / "raw"
    shutil.copytree(demo_raw, raw)
    archive = raw / "images_test_rev1.zip"
    archive.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    with pytest.raises(DataError, match=r"images_test_rev1.zip is damaged .*download Kaggle's images_test_rev1.zip"):
        kaggle_raw.raw_images(raw, "test")   # what predict.py and plot_image.py scan too
    message = one_line_error(run_script("preprocess.py", f"--raw_dir={raw}", f"--processed_dir={tmp_path / 'out'}"))
    assert f"{archive} is damaged" in message and "download" in message


def test_damaged_zip_members_are_skipped_one_by_one(demo_raw, tmp_path):
    jpegs = demo_members(demo_raw, 3)
    names = sorted(jpegs)
    raw = raw_with_zip(demo_raw, tmp_path, [(names[0], jpegs[names[0]], zipfile.ZIP_DEFLATED),   # bad stream
                                            (names[1], jpegs[names[1]], zipfile.ZIP_STORED),     # bad CRC
                                            (names[2], jpegs[names[2]], zipfile.ZIP_DEFLATED)])
    for name in names[:2]:
        damage_member(raw / "images_training_rev1.zip", name)
    _, summary = run({"raw_dir": str(raw), "processed_dir": str(tmp_path / "out")})
    skipped = pd.read_csv(tmp_path / "out" / "skipped.csv")
    damaged = skipped[skipped.reason.str.startswith("damaged zip member")]
    assert sorted(damaged.galaxy_id) == sorted(int(Path(n).stem) for n in names[:2])
    assert summary["train"] == 1 and (tmp_path / "out" / "train" / f"{Path(names[2]).stem}.png").is_file()


def test_same_named_zip_members_keep_and_read_the_first(demo_raw, tmp_path):
    jpegs = demo_members(demo_raw, 2)
    first, second = sorted(jpegs)
    with pytest.warns(UserWarning, match="Duplicate name"):
        raw = raw_with_zip(demo_raw, tmp_path, [(first, jpegs[first], zipfile.ZIP_STORED),
                                                (first, jpegs[second], zipfile.ZIP_STORED)])
    images, skipped = kaggle_raw.scan_images(raw, "train")
    assert [record["reason"] for record in skipped] == ["duplicate image: kept the first zip member of this name"]
    assert kaggle_raw.read_raw(raw, images[int(Path(first).stem)]) == jpegs[first]   # what it said it kept


def test_label_rows_with_too_many_fields_or_huge_ids_are_skipped_by_line(demo_raw, tmp_path):
    raw = tmp_path / "raw"
    with zipfile.ZipFile(demo_raw / "training_solutions_rev1.zip") as archive:
        archive.extractall(raw)
    csv = raw / "training_solutions_rev1.csv"
    lines = csv.read_text().splitlines()
    huge = "99999999999999999999999"
    lines[1] += ",0.5"                                  # the first row: pandas would cut it short
    lines[4] += ",0.5,0.5"
    lines[6] = huge + lines[6][lines[6].index(","):]
    lines[8] = lines[8].replace(",", ",x", 1)           # a value that is no number, after the skipped rows
    csv.write_text("\n".join(lines) + "\n")
    labels, skipped, _ = read_labels(raw)
    by_line = {record["file"]: (str(record["galaxy_id"]), record["reason"].split(":")[0]) for record in skipped}
    assert by_line == {"training_solutions_rev1.csv line 2": (lines[1].split(",")[0], "too many fields in labels row"),
                       "training_solutions_rev1.csv line 5": (lines[4].split(",")[0], "too many fields in labels row"),
                       "training_solutions_rev1.csv line 7": (huge, "bad GalaxyID in labels"),
                       "training_solutions_rev1.csv line 9": (lines[8].split(",")[0],
                                                              "label value missing or not a number")}
    assert len(labels) == len(lines) - 1 - 4 and labels.index.min() > 0

    csv.write_text("\n".join(lines[:3]) + '\n1,"unterminated\n')
    with pytest.raises(DataError, match=r"cannot read .*training_solutions_rev1\.csv \(") as error:
        read_labels(raw)
    assert "\n" not in str(error.value)


def test_output_that_is_a_file_is_a_one_line_error_before_any_work(demo_raw, tmp_path):
    (tmp_path / "a_file").write_text("")
    with pytest.raises(DataError, match=r"processed_dir .*a_file is a file, not a folder; pass another"):
        run({"raw_dir": str(demo_raw), "processed_dir": str(tmp_path / "a_file")})
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "train").write_text("")
    with pytest.raises(DataError, match=r"out/train is a file, not a folder"):
        run({"raw_dir": str(demo_raw), "processed_dir": str(tmp_path / "out")})
    assert not (tmp_path / "out" / "test").exists()   # nothing done before the check
    with pytest.raises(DataError, match=r"cannot write into processed_dir .*a_file/inside \(Not a directory\)"):
        run({"raw_dir": str(demo_raw), "processed_dir": str(tmp_path / "a_file" / "inside")})


@pytest.mark.parametrize("read_only", ["processed_dir", "processed_dir/train"])
def test_read_only_output_is_a_one_line_error(demo_raw, tmp_path, read_only):
    out = tmp_path / "out"
    (out / "train").mkdir(parents=True)
    folder = out if read_only == "processed_dir" else out / "train"
    folder.chmod(0o555)
    try:
        result = without_root_powers(sys.executable, str(REPO / "preprocess.py"), f"--raw_dir={demo_raw}",
                                     f"--processed_dir={out}", "--workers=1")
    finally:
        folder.chmod(0o755)
    message = one_line_error(result)
    assert f"cannot write into processed_dir {folder} (Permission denied)" in message


def slowed_run(raw, out):
    """preprocess.py in a new session, 0.1 s per image (the workers are forked, so they share the delay)."""
    code = ("import sys, time, preprocess\n"
            "from galaxy import preprocessing\n"
            "crop = preprocessing.crop_galaxy\n"
            "preprocessing.crop_galaxy = lambda *args: (time.sleep(0.1), crop(*args))[1]\n"
            "sys.argv[0] = 'preprocess.py'\n"
            "preprocess.main()\n")
    return subprocess.Popen([sys.executable, "-c", code, f"--raw_dir={raw}", f"--processed_dir={out}", "--workers=1"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def test_second_run_on_one_folder_fails_fast_and_a_dead_runs_lock_is_taken_over(demo_raw, tmp_path):
    out = tmp_path / "out"
    first = slowed_run(demo_raw, out)
    try:
        while len(list((out / "train").glob("*.png"))) < 3:   # under way, holding the lock
            assert first.poll() is None, first.communicate()
            time.sleep(0.05)
        started = time.perf_counter()
        second = run_script("preprocess.py", f"--raw_dir={demo_raw}", f"--processed_dir={out}", "--crop=center")
        assert f"in use by another preprocess.py (PID {first.pid})" in one_line_error(second)
        assert time.perf_counter() - started < 30 and first.poll() is None
        os.kill(first.pid, signal.SIGKILL)   # its lock file stays, with its PID; the kernel drops the lock
        first.wait(timeout=30)
        third = run_script("preprocess.py", f"--raw_dir={demo_raw}", f"--processed_dir={out}", "--workers=1")
        assert third.returncode == 0, third.stderr
        assert len(list((out / "train").glob("*.png"))) == 96 and len(list((out / "test").glob("*.png"))) == 16
        assert (out / ".lock").read_text().strip() != str(first.pid)
    finally:
        try:
            os.killpg(first.pid, signal.SIGKILL)   # the first run's session: its orphaned workers too
        except ProcessLookupError:
            pass


def test_an_unforeseen_error_skips_one_image_not_the_run(demo_raw, tmp_path, monkeypatch):
    references = kaggle_raw.raw_images(demo_raw, "test")
    victim = min(references)
    victim_bytes, crop = kaggle_raw.read_raw(demo_raw, references[victim]), preprocessing.crop_galaxy

    def crop_or_fail(data, cfg):   # the workers are forked, so they see this too
        if data == victim_bytes:
            raise RuntimeError("something no one foresaw")
        return crop(data, cfg)

    monkeypatch.setattr(preprocessing, "crop_galaxy", crop_or_fail)
    _, summary = run({"raw_dir": str(demo_raw), "processed_dir": str(tmp_path / "out")})
    assert summary["test"] == 15 and summary["skipped"] == {"unexpected error": 1}
    skipped = pd.read_csv(tmp_path / "out" / "skipped.csv")
    assert skipped.reason.tolist() == ["unexpected error: RuntimeError: something no one foresaw"]

    def interrupted(data, cfg):
        raise KeyboardInterrupt
    monkeypatch.setattr(preprocessing, "crop_galaxy", interrupted)
    monkeypatch.setattr(preprocessing, "worker_job", {"cfg": build_config({}), "raw_dir": str(demo_raw),
                                                   "processed_dir": str(tmp_path / "out")})
    with pytest.raises(KeyboardInterrupt):   # Ctrl-C still stops the run
        preprocessing._crop_and_save(("test", victim, references[victim], False))


def test_a_full_disk_stops_the_run_with_one_error_and_keeps_the_pngs_written(demo_raw, tmp_path, monkeypatch):
    """Out of space after 20 PNGs: one DataError naming the file, not 100 skipped galaxies; the
    rerun, with space again, writes only the rest."""
    out = tmp_path / "out"
    run({"raw_dir": str(demo_raw), "processed_dir": str(out), "workers": 1})
    kept = sorted((out / "train").glob("*.png"))[:20]
    for path in sorted((out / "train").glob("*.png"))[20:] + sorted((out / "test").glob("*.png")):
        path.unlink()

    def no_space(tmp):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def png_writes_fail(path, write):   # the workers are forked, so they see this too
        return atomic_write(path, no_space if str(path).endswith(".png") else write)
    monkeypatch.delattr(os, "O_TMPFILE", raising=False)   # every PNG through atomic_write
    monkeypatch.setattr(files, "atomic_write", png_writes_fail)
    with pytest.raises(DataError, match=r"could not write .*\.png: no space left on its disk"):
        run({"raw_dir": str(demo_raw), "processed_dir": str(out)})
    assert sorted((out / "train").glob("*.png")) == kept and not list(out.rglob("*.tmp"))
    monkeypatch.undo()
    _, summary = run({"raw_dir": str(demo_raw), "processed_dir": str(out)})
    assert summary["present"] == 20 and summary["written"] == 112 - 20


# --- special files and a worker that never returns ---------------------------------------------------

needs_fifos = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="this system has no FIFOs (os.mkfifo)")


def raw_folder(demo_raw, tmp_path, count):
    """A raw_dir with the demo labels and the first count training JPEGs extracted into images_training_rev1/."""
    raw = tmp_path / "raw"
    folder = raw / "images_training_rev1"
    folder.mkdir(parents=True)
    shutil.copy(demo_raw / "training_solutions_rev1.zip", raw)
    for name, data in demo_members(demo_raw, count).items():
        (folder / Path(name).name).write_bytes(data)
    return raw, folder


@needs_fifos
def test_special_files_in_the_raw_folder_are_skipped_and_listed(demo_raw, tmp_path):
    raw, folder = raw_folder(demo_raw, tmp_path, 3)
    os.mkfifo(folder / "817739.jpg")   # opening it would wait for a writer forever
    (folder / "100001.jpg").symlink_to(folder / "gone.jpg")
    (folder / "x.jpg").mkdir()   # a folder named like a JPEG is just a folder
    images, skipped = kaggle_raw.scan_images(raw, "train")
    assert len(images) == 3 and {(r["galaxy_id"], r["reason"]) for r in skipped} == {
        (817739, "not a regular file (FIFO)"), (100001, "not a regular file (broken link)")}
    out = tmp_path / "out"
    result = run_script("preprocess.py", f"--raw_dir={raw}", f"--processed_dir={out}", "--workers=2")
    assert result.returncode == 0, result.stderr
    listed = pd.read_csv(out / "skipped.csv")
    listed = listed[listed.reason.str.startswith("not a regular file")]
    assert sorted(zip(listed.galaxy_id, listed.file, listed.reason)) == [
        (100001, "images_training_rev1/100001.jpg", "not a regular file (broken link)"),
        (817739, "images_training_rev1/817739.jpg", "not a regular file (FIFO)")]
    assert len(list((out / "train").glob("*.png"))) == 3


@needs_fifos
def test_the_first_ctrl_c_ends_a_run_whose_worker_is_blocked(demo_raw, tmp_path):
    """A worker stuck in open() on a FIFO (it became one after the scan): one SIGINT to the process
    group, as a terminal's Ctrl-C sends, ends the run with 130 and leaves no worker waiting."""
    raw, folder = raw_folder(demo_raw, tmp_path, 12)
    fifo, started, out = tmp_path / "fifo", tmp_path / "blocked", tmp_path / "out"
    os.mkfifo(fifo)
    victim = sorted(folder.iterdir())[5].name
    code = ("import os, sys, preprocess\n"
            "from galaxy import preprocessing\n"
            "read = preprocessing.read_raw\n"
            "def read_or_block(raw_dir, reference):\n"
            f"    if reference.endswith({victim!r}):\n"
            f"        open({str(started)!r}, 'w').close()\n"
            f"        with open({str(fifo)!r}, 'rb') as f:   # no writer: open() never returns\n"
            "            return f.read()\n"
            "    return read(raw_dir, reference)\n"
            "preprocessing.read_raw = read_or_block\n"
            "sys.argv[0] = 'preprocess.py'\n"
            "preprocess.main()\n")
    run = subprocess.Popen([sys.executable, "-c", code, f"--raw_dir={raw}", f"--processed_dir={out}", "--workers=2"],
                           cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           start_new_session=True)
    try:
        while not started.exists():
            assert run.poll() is None, run.communicate()
            time.sleep(0.05)
        time.sleep(0.5)   # let the other worker go on meanwhile
        os.killpg(run.pid, signal.SIGINT)
        try:
            _, stderr = run.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            pytest.fail("the run still waits for its blocked worker after the first Ctrl-C")
        assert run.returncode == 130 and "interrupted: the PNGs already written are kept" in stderr, stderr
        assert "Traceback" not in stderr, stderr
        with pytest.raises(OSError) as no_reader:   # the blocked worker is gone: nothing opens the FIFO any more
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        assert no_reader.value.errno == errno.ENXIO
        assert not list(out.rglob("*.tmp")) and not (out / "train" / victim.replace(".jpg", ".png")).exists()
    finally:
        try:
            os.killpg(run.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@needs_fifos
def test_a_worker_deaf_to_the_nudge_is_terminated(tmp_path):
    """A worker that even a signal cannot move (here: one that blocks the nudge) is terminated once
    the pool has waited STOP_WAIT_S for it, so an ending run never hangs."""
    fifo, started = tmp_path / "fifo", tmp_path / "blocked"
    os.mkfifo(fifo)
    code = ("import os, signal, sys, time\n"
            "from galaxy import pool\n"
            "pool.STOP_WAIT_S = 1.0\n"
            "def task(i):\n"
            "    if i == 0:\n"
            "        signal.pthread_sigmask(signal.SIG_BLOCK, {pool.NUDGE})\n"
            f"        open({str(started)!r}, 'w').close()\n"
            f"        open({str(fifo)!r}, 'rb')\n"
            "    time.sleep(0.05)\n"
            "    return i\n"
            "try:\n"
            "    for result in pool.run_pool(task, range(20), 2, {}, 'test', progress=False):\n"
            f"        while not os.path.exists({str(started)!r}):\n"
            "            time.sleep(0.01)\n"
            "        raise RuntimeError('the consumer stops')\n"
            "except RuntimeError as err:\n"
            "    sys.exit(f'ended: {err}')\n")
    run = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True, start_new_session=True)
    try:
        try:
            _, stderr = run.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            pytest.fail("run_pool still waits for a worker that ignores the nudge")
        assert run.returncode == 1 and stderr.strip() == "ended: the consumer stops", stderr
        with pytest.raises(OSError) as no_reader:
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        assert no_reader.value.errno == errno.ENXIO
    finally:
        try:
            os.killpg(run.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
