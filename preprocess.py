"""Turn Kaggle's Galaxy Zoo JPEGs into small square PNGs and a clean labels.csv.

    python preprocess.py                     # data/raw -> data/processed
    python preprocess.py --crop=center       # the Kaggle winner's fixed central crop
    python preprocess.py --demo              # synthetic galaxies in Kaggle's layout, then preprocess them

raw_dir holds Kaggle's files as downloaded (zips, read in place) or extracted. Each galaxy is
cropped around the central galaxy (crop=roi) or to a fixed central square (crop=center) and
written as processed_dir/{train,test}/<GalaxyID>.png. Re-runs skip PNGs that are already
complete; every file gets its name only when it is whole, so a killed run leaves no
half-written file. Unusable input is listed in processed_dir/skipped.csv, never fatal.
Images of any size are accepted (Kaggle's are all 424x424); ones smaller than image_size are skipped.
"""
import json
import multiprocessing
import os
import signal
import struct
import sys
import time
import zipfile
import zlib
from collections import Counter
from functools import partial
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from tqdm import tqdm

from config import get_config
from crop import CROP_KEYS, BadImage, crop_galaxy
from dataset import LABEL_COLUMNS, DataError
from files import atomic_write, lock_folder, writable_folder
from kaggle_raw import SPLIT_FOLDERS, forget_open_zips, raw_layout_error, read_raw, scan_images
from labels import SKIPPED_COLUMNS, SOLUTIONS, read_labels, skip_record

SETTINGS_FILE = "preprocess.json"   # the crop settings the PNGs in processed_dir were made with
# the config keys this script reads, with their meaning from config.py, are what --help lists
CONFIG_KEYS = ("raw_dir", "processed_dir", *CROP_KEYS, "workers", "demo", "demo_dir", "demo_train", "demo_test", "seed")


# ---------------------------------------------------------------------------------------------
# Writing files safely


def _png_is_complete(path, image_size):
    try:
        with Image.open(path) as image:
            image.load()   # a truncated PNG fails here, not at open
            return image.size == (image_size, image_size) and image.mode == "RGB"
    except (OSError, SyntaxError, ValueError):
        return False


def _labels_csv(labels):
    """labels.csv's text: the same as labels.reset_index().to_csv(index=False), in half the time."""
    rows = (f"{galaxy_id},{','.join(map(repr, values))}\n"
            for galaxy_id, values in zip(labels.index.tolist(), labels.to_numpy(np.float64).tolist()))
    return ",".join(["GalaxyID"] + LABEL_COLUMNS) + "\n" + "".join(rows)


def _write_csv(path, table):
    atomic_write(path, lambda temporary: table.to_csv(temporary, index=False))


def crop_settings(processed_dir):
    """The crop settings processed_dir's PNGs were made with ({} if it has no record)."""
    path = os.path.join(processed_dir, SETTINGS_FILE)
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)


def crop_settings_mismatch(processed_dir, model_cfg):
    """'' when processed_dir's PNGs were cropped as the model was trained, else what differs.

    PNGs made with another crop would feed the model galaxies at a different scale from the
    ones it learnt.
    """
    made_with = crop_settings(processed_dir)
    if not made_with:
        return ""  # older output without the record: read_png still checks the size
    return ", ".join(f"{key} {made_with.get(key)} there, {getattr(model_cfg, key)} in the checkpoint"
                     for key in CROP_KEYS if made_with.get(key) != getattr(model_cfg, key))


# ---------------------------------------------------------------------------------------------
# The worker pool


worker_job = {}   # what each worker needs, set once per process by start_worker
worker_stop = None   # each worker's copy of its run_pool's stop event


def start_worker(job, stop):
    global worker_stop
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # Ctrl-C is the parent's to handle
    forget_open_zips()
    _folder_fds.clear()
    worker_job.update(job)
    worker_stop = stop


def _unless_stopped(function, task):
    """Worker: function(task), or None at once when the run is ending early (see run_pool)."""
    return None if worker_stop.is_set() else function(task)


def run_pool(function, tasks, workers, job, description, progress=True, ordered=False):
    """Yield function(task) for every task from a pool of workers, with a progress bar in img/s.

    A run that ends early (an error, Ctrl-C, a consumer that stops) lets its workers finish
    instead of killing them: Pool.terminate() kills a worker even while it holds the result
    queue's lock, and then waits forever for that lock (seen here: 2 hangs in about 450 runs
    stopped by a full disk under load). The stop event makes the tasks still queued return at once.
    """
    tasks = list(tasks)
    chunk = max(1, min(32, len(tasks) // (8 * workers)))
    stop = multiprocessing.Event()
    with Pool(workers, initializer=start_worker, initargs=(job, stop)) as pool:
        try:
            results = (pool.imap if ordered else pool.imap_unordered)(partial(_unless_stopped, function), tasks,
                                                                      chunksize=chunk)
            yield from tqdm(results, total=len(tasks), desc=description, unit="img",
                            disable=not progress, smoothing=0.1)
        except BaseException:
            stop.set()
            pool.close()
            pool.join()   # each worker ends its current image, then answers the queued tasks at once
            raise


def _png_chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png_bytes(image):
    """An RGB image as the contents of a PNG file, its pixels stored without compression.

    Compressing does not pay for 64x64 crops: Pillow's encoder took 0.28 ms a crop, half as long
    as all the rest of the work on a galaxy, and zlib's fastest mode (Huffman coding alone) still
    0.07 ms, to shrink the file from 12.4 kB to 7.1 kB. Stored, Kaggle's 141,553 train and test
    galaxies take 2.3 GB of disk instead of 1.1 GB; training reads them once and caches one array.
    """
    pixels = np.asarray(image)
    height, width, channels = pixels.shape
    rows = np.zeros((height, 1 + width * channels), np.uint8)   # each row: filter type 0 (none), its pixels
    rows[:, 1:] = pixels.reshape(height, width * channels)
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)   # 8 bits per channel, RGB, no interlace
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header)
            + _png_chunk(b"IDAT", zlib.compress(rows, level=0)) + _png_chunk(b"IEND", b""))


_folder_fds = {}   # this process's open output folders, for os.link


def _write_whole(path, data):
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
        if folder not in _folder_fds:
            _folder_fds[folder] = os.open(folder, os.O_RDONLY)
        os.link(f"/proc/self/fd/{fd}", name, dst_dir_fd=_folder_fds[folder])   # linkat(AT_SYMLINK_FOLLOW)
    except OSError:   # the file exists (a re-run replacing a broken PNG), or no /proc
        atomic_write(path, lambda temporary: Path(temporary).write_bytes(data))
    finally:
        os.close(fd)


def _crop_and_save(task):
    """Worker: one galaxy (split, galaxy_id, reference, png_exists) -> (split, galaxy_id, outcome, reason)."""
    split, galaxy_id, reference, png_exists = task
    cfg = worker_job["cfg"]
    png_path = os.path.join(worker_job["processed_dir"], split, f"{galaxy_id}.png")
    if png_exists and _png_is_complete(png_path, cfg.image_size):
        return split, galaxy_id, "present", ""
    try:
        crop, _ = crop_galaxy(read_raw(worker_job["raw_dir"], reference), cfg)
        _write_whole(png_path, _png_bytes(crop))
    except BadImage as err:
        return split, galaxy_id, "skipped", str(err)
    except DataError:   # the output disk is full: every later galaxy would fail too, so stop the run
        raise
    except (OSError, zipfile.BadZipFile, EOFError) as err:
        return split, galaxy_id, "skipped", f"unreadable file: {err}"
    except Exception as err:   # whatever else one image does must not end a run of 140,000
        return split, galaxy_id, "skipped", unexpected_error(err)
    return split, galaxy_id, "written", ""


def unexpected_error(err):
    """The skip reason for an exception no one foresaw; Ctrl-C and exits are no Exception and still stop."""
    return f"unexpected error: {type(err).__name__}: {err}"


def _prepare_output(processed_dir, cfg):
    """Make train/ and test/, remove stale temp files, and drop PNGs made with other crop settings."""
    settings = {key: getattr(cfg, key) for key in CROP_KEYS}
    settings_path = processed_dir / SETTINGS_FILE
    old = crop_settings(processed_dir) or settings
    for split in SPLIT_FOLDERS:
        folder = processed_dir / split
        folder.mkdir(parents=True, exist_ok=True)
        stale = list(folder.glob("*.tmp")) + (list(folder.glob("*.png")) if old != settings else [])
        for path in stale:
            path.unlink()
    if old != settings:
        changed = ", ".join(f"{k} {old.get(k)} -> {v}" for k, v in settings.items() if old.get(k) != v)
        print(f"crop settings changed ({changed}): redoing every PNG in {processed_dir}")
    atomic_write(settings_path, lambda temporary: Path(temporary).write_text(json.dumps(settings, indent=1)))


def preprocess(cfg, progress=True):
    """Crop every raw image of cfg.raw_dir into cfg.processed_dir; return the summary counts.

    Exits with the what-goes-where message if raw_dir holds nothing usable; raises DataError for
    a damaged zip or labels file, an unwritable processed_dir, or another run using it.
    """
    raw_dir, processed_dir = Path(cfg.raw_dir), Path(cfg.processed_dir)
    message = raw_layout_error(raw_dir)
    if message:
        sys.exit(message)
    for folder in [processed_dir] + [processed_dir / split for split in SPLIT_FOLDERS]:
        writable_folder(folder, "processed_dir")
    # two runs on one folder, say with two crop settings, would mix their PNGs under one preprocess.json
    lock = lock_folder(processed_dir, "preprocess.py")
    try:
        return _preprocess_locked(cfg, raw_dir, processed_dir, progress)
    finally:
        lock.close()


def _preprocess_locked(cfg, raw_dir, processed_dir, progress):
    images = {}
    skipped = []
    for split in SPLIT_FOLDERS:
        images[split], split_skipped = scan_images(raw_dir, split)
        skipped += split_skipped
    labels, label_skipped, labels_file = read_labels(raw_dir)
    skipped += label_skipped
    if images["train"] and labels is None:
        sys.exit(raw_layout_error(raw_dir, f"training images but no {SOLUTIONS}.zip or .csv"))
    if labels is not None:
        # a galaxy needs both a label row and an image to be a training example
        for galaxy_id in sorted(set(labels.index) - set(images["train"])):
            skipped.append(skip_record("train", galaxy_id, labels_file, "label row without image"))
        for galaxy_id in sorted(set(images["train"]) - set(labels.index)):
            skipped.append(skip_record("train", galaxy_id, images["train"][galaxy_id], "image without label row"))
            del images["train"][galaxy_id]

    _prepare_output(processed_dir, cfg)
    # one listing instead of a stat per image: a first run finds nothing to check
    present = {split: set(os.listdir(processed_dir / split)) for split in SPLIT_FOLDERS}
    tasks = [(split, galaxy_id, reference, f"{galaxy_id}.png" in present[split])
             for split in SPLIT_FOLDERS for galaxy_id, reference in sorted(images[split].items())]
    done = {split: [] for split in SPLIT_FOLDERS}
    outcomes = Counter()
    job = {"cfg": cfg, "raw_dir": str(raw_dir), "processed_dir": str(processed_dir)}
    for split, galaxy_id, outcome, reason in run_pool(_crop_and_save, tasks, cfg.workers, job, "preprocess",
                                                      progress):
        outcomes[outcome] += 1
        if outcome == "skipped":
            skipped.append(skip_record(split, galaxy_id, images[split][galaxy_id], reason))
        else:
            done[split].append(galaxy_id)

    if labels is not None:
        atomic_write(processed_dir / "labels.csv",
                     lambda temporary: Path(temporary).write_text(_labels_csv(labels.loc[sorted(done["train"])])))
    _write_csv(processed_dir / "skipped.csv", pd.DataFrame(skipped, columns=SKIPPED_COLUMNS))
    reasons = Counter(record["reason"].split(":")[0] for record in skipped)
    summary = {"written": outcomes["written"], "present": outcomes["present"],
               "train": len(done["train"]), "test": len(done["test"]), "skipped": dict(reasons)}
    skipped_text = ", ".join(f"{n} {reason}" for reason, n in reasons.most_common()) or "none"
    print(f"preprocess: {summary['written']} PNGs written, {summary['present']} already present "
          f"({summary['train']} train, {summary['test']} test in {processed_dir}); "
          f"skipped {len(skipped)}: {skipped_text} (see skipped.csv)")
    if not done["train"] and not done["test"]:
        sys.exit(raw_layout_error(raw_dir, "no image could be used; skipped.csv says why"))
    return summary


def main():
    cfg = get_config(doc=__doc__, keys=CONFIG_KEYS)
    started = time.perf_counter()
    try:
        if cfg.demo:
            from demo import make_demo   # here, not at the top: demo.py imports this module
            make_demo(cfg.raw_dir, cfg.demo_train, cfg.demo_test, cfg.seed, cfg.workers)
        preprocess(cfg)
    except DataError as err:
        sys.exit(f"error: {err}")
    except KeyboardInterrupt:
        print("\ninterrupted: the PNGs already written are kept; run the same command again to finish",
              file=sys.stderr)
        sys.exit(130)
    print(f"done in {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
