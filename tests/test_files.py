import errno
import os
from pathlib import Path
import subprocess
import sys

import pytest

from galaxy.files import DataError, atomic_write, lock_folder, remove_dead_temp_files, writable_folder

REPO = Path(__file__).resolve().parents[1]


FULL_DISK = r"could not write .*metrics.csv: no space left on its disk \(\d+ MB free in .*\); free some space, then run"


def full_disk_under_torch():
    """What torch.save raises when the file's write fails for want of space: its own RuntimeError,
    raised while handling the OSError."""
    try:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    except OSError:
        try:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 50079936 vs 50079828")
        except RuntimeError as err:
            return err


@pytest.mark.parametrize("error, raised, message", [
    (RuntimeError("a bug in the writer"), RuntimeError, "a bug in the writer"),
    (OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), DataError, FULL_DISK),   # a full disk says so
    (full_disk_under_torch(), DataError, FULL_DISK),
])
def test_a_failed_write_leaves_the_old_file_and_no_temp_file(tmp_path, error, raised, message):
    path = tmp_path / "metrics.csv"
    path.write_text("old")

    def broken_write(tmp):
        with open(tmp, "w") as f:
            f.write("half")
        raise error
    with pytest.raises(raised, match=message):
        atomic_write(path, broken_write)
    assert path.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["metrics.csv"]
    atomic_write(path, lambda tmp: open(tmp, "w").write("new"))
    assert path.read_text() == "new"


def test_writable_folder_makes_the_folder_and_refuses_a_file(tmp_path):
    writable_folder(tmp_path / "a" / "b", "out_dir")
    assert (tmp_path / "a" / "b").is_dir()
    (tmp_path / "file").write_text("x")
    with pytest.raises(DataError, match=r"out_dir .*file is a file, not a folder; pass another --out_dir"):
        writable_folder(tmp_path / "file", "out_dir")


def test_dead_processes_temp_files_are_removed_live_ones_kept(tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()   # its pid now belongs to no process (pids are not reused this quickly)
    for name in (f"last.pt.{dead.pid}.tmp", f"best.pt.{os.getpid()}.tmp", "notes.tmp", "last.pt"):
        (tmp_path / name).write_text("x")
    assert remove_dead_temp_files(str(tmp_path)) == [f"last.pt.{dead.pid}.tmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([f"best.pt.{os.getpid()}.tmp", "notes.tmp", "last.pt"])


def test_folder_lock_names_its_holder_and_dies_with_it(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from galaxy.files import lock_folder; "
                               f"lock_folder({str(tmp_path)!r}, 'train.py'); "
                               "print('locked', flush=True); time.sleep(60)"],
                              cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline() == "locked\n"
    with pytest.raises(DataError, match=fr"in use by another train.py \(PID {holder.pid}\)"):
        lock_folder(str(tmp_path), "train.py")
    holder.kill()
    holder.wait()
    lock_folder(str(tmp_path), "train.py").close()   # the kernel released the dead holder's lock
