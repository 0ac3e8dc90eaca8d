"""Files every script writes safely: atomic writes, the temporary files a killed run leaves,
checking an output folder before the work, locking a folder against a second run, a run's
outputs swapped in as one set, and file names as text that any CSV or terminal takes.
"""
from contextlib import contextmanager
import errno
import fcntl
import os
from pathlib import Path
import re
import shutil
import signal
import tempfile
import threading

import numpy as np


class DataError(RuntimeError):
    """Input data that cannot be used; the message says what to do."""


def temp_name(path):
    """Where path is written before it gets its name: *.tmp is never taken for a finished file."""
    return f"{path}.{os.getpid()}.tmp"


TEMP_NAME = re.compile(r"(.+)\.(\d+)\.tmp")   # atomic_write's <name>.<pid>.tmp


def atomic_write(path, write):
    """Call write(temp_path), then rename onto path, so readers never see a half-written file.

    A full disk is a DataError that says so: the file at path, if any, is still the last whole one.
    """
    path = str(path)
    tmp = temp_name(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException as err:   # Ctrl-C included: leave no temporary file behind
        if os.path.exists(tmp):
            os.remove(tmp)
        if disk_full(err):
            raise DataError(disk_full_message(path)) from None
        raise


def disk_full(err):
    """Whether err, or an error it was raised while handling, is a full disk or quota; torch.save's
    writer answers an OSError(ENOSPC) from the file with a RuntimeError of its own."""
    for _ in range(10):   # a chain, never a cycle, but bounded anyway
        if err is None:
            return False
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        err = err.__cause__ or err.__context__
    return False


def disk_full_message(path):
    """What to say when the disk (or quota) under path ran out mid-write; the earlier files stay."""
    folder = os.path.dirname(os.path.abspath(path))
    free_mb = shutil.disk_usage(folder).free / 1e6
    return (f"could not write {path}: no space left on its disk ({free_mb:.0f} MB free in {folder}); "
            f"free some space, then run the same command again")


def process_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:   # alive, but another user's
        return True
    return True


def remove_dead_temp_files(folder, prefix=""):
    """Delete the <name>.<pid>.tmp files (name starting with prefix) of processes that are gone:
    a SIGKILL mid-write gives atomic_write no chance to clean up, and nothing else ever would.
    A live process's temporary file is a write in progress and stays. Returns the names removed."""
    removed = []
    for name in sorted(os.listdir(folder)):
        match = TEMP_NAME.fullmatch(name)
        if match and name.startswith(prefix) and not process_alive(int(match.group(2))):
            try:
                os.remove(os.path.join(folder, name))
                removed.append(name)
            except FileNotFoundError:   # another process cleaned it first
                pass
    return removed


def writable_folder(path, what):
    """Make the folder path (and its parents) and check that a file can be created in it.

    Run before any work, so that a wrong or read-only output folder is a one-line DataError
    that says what to do, not a traceback after an hour's work. what is the config key that
    set the path (e.g. "processed_dir"), named in the fix.
    """
    path = str(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise DataError(f"{what} {path} is a file, not a folder; pass another --{what}=... or move the file away")
    try:
        os.makedirs(path, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path, prefix=".write-test-")
        os.close(fd)
        os.remove(probe)
    except OSError as err:
        raise DataError(f"cannot write into {what} {path} ({err.strerror}); make it writable "
                        f"or pass another --{what}=...") from None


def lock_folder(folder, what, name=".lock"):
    """Hold an exclusive lock on folder (folder/<name>, holding this process's PID) until exit.

    A second run on the same folder gets a DataError naming the PID of the one that holds it.
    The kernel drops the lock when its process dies, so a lock left by a killed run is taken
    over. Worker processes forked later close their copy, so that they cannot keep a dead
    parent's lock alive. Returns the open lock file; closing it releases the lock.
    """
    path = os.path.join(folder, name)
    lock = open(path, "a+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        pid = lock.read().strip() or "unknown"
        lock.close()
        raise DataError(f"{folder} is in use by another {what} (PID {pid}); wait for it to finish, "
                        f"or stop it, then run this again") from None
    lock.seek(0)
    lock.truncate()
    lock.write(f"{os.getpid()}\n")
    lock.flush()
    os.register_at_fork(after_in_child=lock.close)   # close() drops this copy, not the lock
    return lock


_open_folders = {}   # this process's open output folders, for os.link


def write_whole(path, data):
    """Write data to path so that no reader ever sees part of it, even if the process is killed.

    On Linux the file is made without a name (O_TMPFILE) and linked into its folder once written:
    one change to the folder, where a temporary name and a rename make two, and two workers writing
    into one folder queue for its lock at each (measured here: 0.045 ms a file instead of 0.085).
    Elsewhere, or over an existing file, it takes a temporary name and a rename (atomic_write).
    """
    folder, name = os.path.split(path)
    try:
        fd = os.open(folder, os.O_TMPFILE | os.O_WRONLY, 0o644)
    except (AttributeError, OSError):   # not Linux, or a file system without unnamed files
        return atomic_write(path, lambda temporary: Path(temporary).write_bytes(data))
    try:
        with open(fd, "wb", closefd=False) as f:
            f.write(data)
        if folder not in _open_folders:
            _open_folders[folder] = os.open(folder, os.O_RDONLY)
        os.link(f"/proc/self/fd/{fd}", name, dst_dir_fd=_open_folders[folder])   # linkat(AT_SYMLINK_FOLLOW)
    except OSError:   # the file exists (a re-run replacing a broken PNG), or no /proc
        atomic_write(path, lambda temporary: Path(temporary).write_bytes(data))
    finally:
        os.close(fd)


def forget_open_folders():
    """A forked worker must open its own folder descriptors (see write_whole)."""
    _open_folders.clear()


# --- file names as text --------------------------------------------------------------------------

# what file_text escapes: control characters (a \r splits a CSV row), the backslash (the escape
# itself), and the lone surrogates that stand for the bytes of a name that are not UTF-8 (os.fsdecode)
_ESCAPED = re.compile("[\x00-\x1f\x7f\\\\\ud800-\udfff]")
_ESCAPE = re.compile(r"\\(\\|x[0-9a-f]{2})")


def file_text(name):
    r"""name (a path, str or bytes; anything else through str) as text that every CSV, terminal and
    figure takes: as it is, except that each control character (\r, \n, \t...) and each byte that
    is not UTF-8 is written \xHH, and a backslash \\ (as Python's backslashreplace writes bytes).
    So the bytes b"\xff\xfebad.jpg" read \xff\xfebad.jpg and "a\rb.jpg" reads a\x0db.jpg;
    file_path(text) gives the name back, os.fsencode(file_path(text)) its bytes.
    """
    text = os.fsdecode(name) if isinstance(name, (bytes, os.PathLike)) else str(name)
    return _ESCAPED.sub(_escape, text)


def _escape(match):
    code = ord(match.group())
    if match.group() == "\\":
        return "\\\\"
    if 0xDC80 <= code <= 0xDCFF:   # os.fsdecode's stand-in for the byte code - 0xDC00
        return f"\\x{code - 0xDC00:02x}"
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"   # other lone surrogates: never in a name


def file_path(text):
    """The name that file_text made text of, as os.listdir gives it (a str that open() takes)."""
    return _ESCAPE.sub(lambda m: "\\" if m.group(1) == "\\" else _byte_char(int(m.group(1)[1:], 16)), text)


def _byte_char(byte):
    return chr(byte) if byte < 0x80 else chr(0xDC00 + byte)


def csv_writer(table, **options):
    """write(path) for write_file_set or atomic_write: the DataFrame table as CSV without its index,
    options to DataFrame.to_csv (e.g. float_format). Put each name or message through file_text
    before it goes into the table (pandas' string columns refuse the bytes that are not UTF-8): then
    no cell holds a \r or \n (the csv module would quote a \n but not a lone \r), every record is
    one line, and a name read back gives its file (file_path)."""
    return lambda path: table.to_csv(path, index=False, lineterminator="\n", **options)


# --- a run's outputs as one set --------------------------------------------------------------------

@contextmanager
def signals_held():
    """Hold back Ctrl-C (SIGINT), SIGTERM and SIGHUP until the block ends, then act on them: for the
    few renames that must all happen or none. Only the main thread can; elsewhere nothing is held."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught, previous = [], {}
    for number in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(number) is not None:   # None: a handler set outside Python, left alone
            previous[number] = signal.signal(number, lambda received, frame: caught.append(received))
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
        for number in dict.fromkeys(caught):
            signal.raise_signal(number)


def keep_arrays(folder, name, arrays):
    """Save arrays ({key: array}; no key "file", np.savez's own argument) as the .npz name in folder, else
    in the temp folder, so that finished work outlives a failed write; returns where, or None."""
    def save(tmp):
        with open(tmp, "wb") as f:   # a file object: np.savez would add .npz to the temporary name
            np.savez(f, **arrays)
    for path in (os.path.join(folder, name), os.path.join(tempfile.gettempdir(), f"{os.getpid()}-{name}")):
        try:
            atomic_write(path, save)
            return path
        except (OSError, DataError):   # this disk is full too, or not writable: the next place
            continue
    return None


def write_file_set(folder, files, names, rescue=None, written=None):
    """Write files ({name: write(path)}) into folder as the outputs of one run, and remove the other
    names of the set (names: every file the set may hold, its main file first), an earlier run's.
    Returns (paths written, paths removed); written, a list, gets each path as it is put in place.

    Nothing in folder changes until every file is whole under its temporary name (temp_name): an
    error until then leaves the earlier set as it was and is a DataError saying so; with rescue
    ({key: array}, the finished results) it is kept first (keep_arrays) and the message says where.

    The swap runs with Ctrl-C held back, in an order that never leaves files of two runs beside the
    main file: the old main file goes first, then the companions that no longer apply, then the new
    companions are renamed in, the new main file last. A set without its main file is no result, so
    a kill at any point (SIGKILL, a power cut) leaves the whole new set or no main file, and the next
    run removes what is left. Each step is one rename or unlink, atomic in itself.
    """
    main = names[0]
    unknown = sorted(set(files) - set(names))
    assert not unknown, f"{unknown} are not in the set {names}"
    paths = {name: os.path.join(folder, name) for name in names}
    for path in paths.values():
        if os.path.isdir(path) and not os.path.islink(path):
            raise DataError(f"{file_text(path)} is a folder, where predict.py writes a file; move it away "
                            f"or pass another --out_dir")
    order = [name for name in names[1:] if name in files] + [main] * (main in files)
    temporary = {}
    try:
        for name in order:
            temporary[name] = temp_name(paths[name])
            files[name](temporary[name])
    except BaseException as err:   # Ctrl-C included: no temporary file stays behind
        _remove_all(temporary.values())
        if not isinstance(err, Exception):
            raise
        raise DataError(write_failure(paths[name], err, rescue, main, changed=False)) from None
    done, removed = [], []
    with signals_held():
        try:
            for name in names:
                if (name == main or name not in files) and os.path.lexists(paths[name]):
                    os.remove(paths[name])
                    if name not in files:
                        removed.append(paths[name])
            for name in order:
                os.replace(temporary[name], paths[name])
                done.append(paths[name])
                if written is not None:
                    written.append(paths[name])
        except Exception as err:   # a rename in one folder that fails: the folder went away or read-only
            _remove_all(temporary.values())
            raise DataError(write_failure(paths[name], err, rescue, main, changed=True)) from None
    return done, removed


def _remove_all(paths):
    for path in paths:
        if os.path.lexists(path):
            os.remove(path)


def write_failure(path, err, rescue, main, changed):
    """The one line that says which write failed and why, whether the earlier files are as they were
    (changed: maybe not), and where rescue ({key: array}, or None) is kept: <main's stem>_rescued.npz."""
    folder = os.path.dirname(os.path.abspath(path))
    if disk_full(err):
        try:
            why = f"no space left on its disk ({shutil.disk_usage(folder).free / 1e6:.0f} MB free in {folder})"
        except OSError:
            why = "no space left on its disk"
        fix = "free some space, then run the same command again"
    else:
        why = f"{type(err).__name__}: {err}"
        fix = "run the same command again once that is mended"
    state = ("some files of the earlier run there may be gone" if changed
             else f"the files in {folder} are as they were")
    kept = ""
    if rescue is not None:
        where = keep_arrays(os.path.dirname(path), f"{os.path.splitext(main)[0]}_rescued.npz", rescue)
        kept = (f"; the results are kept in {file_text(where)} (numpy.load gives {', '.join(rescue)})" if where
                else "; the results could not be kept anywhere else either")
    return " ".join(f"could not write {file_text(path)} ({why}); {state}{kept}; {fix}".split("\n"))
