"""Kaggle's JPEGs -> processed_dir/{train,test}/<GalaxyID>.png and a clean labels.csv: the work
behind preprocess.py, on every core, resumable, with unusable input listed in skipped.csv.

With --ids, only the galaxies listed in that file (subsets/*.csv) are made, from either split.
Every file gets its name only when it is whole, so a killed run leaves no half-written file, and a
re-run skips the PNGs already complete.
"""
from collections import Counter
from contextlib import closing
import json
import os
from pathlib import Path
import struct
import sys
import zipfile
import zlib

from PIL import Image
import numpy as np
import pandas as pd

from dataset import LABEL_COLUMNS, DataError
from galaxy.crop import CROP_KEYS, SETTINGS_FILE, BadImage, crop_galaxy, crop_settings
from galaxy.files import atomic_write, lock_folder, writable_folder, write_whole
from galaxy.kaggle_raw import SPLIT_FOLDERS, raw_layout_error, read_raw, scan_images
from galaxy.labels import SKIPPED_COLUMNS, SOLUTIONS, read_labels, skip_record
from galaxy.pool import run_pool, unexpected_error, worker_job


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


def _crop_and_save(task):
    """Worker: one galaxy (split, galaxy_id, reference, png_exists) -> (split, galaxy_id, outcome, reason)."""
    split, galaxy_id, reference, png_exists = task
    cfg = worker_job["cfg"]
    png_path = os.path.join(worker_job["processed_dir"], split, f"{galaxy_id}.png")
    if png_exists and _png_is_complete(png_path, cfg.image_size):
        return split, galaxy_id, "present", ""
    try:
        crop, _ = crop_galaxy(read_raw(worker_job["raw_dir"], reference), cfg)
        write_whole(png_path, _png_bytes(crop))
    except BadImage as err:
        return split, galaxy_id, "skipped", str(err)
    except DataError:   # the output disk is full: every later galaxy would fail too, so stop the run
        raise
    except (OSError, zipfile.BadZipFile, EOFError) as err:
        return split, galaxy_id, "skipped", f"unreadable file: {err}"
    except Exception as err:   # whatever else one image does must not end a run of 140,000
        return split, galaxy_id, "skipped", unexpected_error(err)
    return split, galaxy_id, "written", ""


def read_ids(path):
    """The set of GalaxyIDs in --ids's file: a CSV with a GalaxyID column, or one ID per line.

    Raises DataError naming the file when it cannot be read, holds no ID or holds something else.
    """
    fix = "give a CSV with a GalaxyID column or a text file with one GalaxyID per line, e.g. subsets/*.csv"
    try:
        lines = [line.strip() for line in Path(path).read_text(encoding="utf-8-sig").splitlines()]
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"cannot read --ids={path} ({getattr(err, 'strerror', None) or err}); {fix}") from None
    lines = [(number, line) for number, line in enumerate(lines, 1) if line]
    column = 0
    if lines and not lines[0][1].split(",")[0].strip().isdigit():   # a header line
        header = [name.strip().strip('"') for name in lines.pop(0)[1].split(",")]
        if "GalaxyID" not in header:
            raise DataError(f"--ids={path} has no GalaxyID column (its header is {','.join(header)}); {fix}")
        column = header.index("GalaxyID")
    ids = set()
    for number, line in lines:
        fields = line.split(",")
        value = fields[column].strip().strip('"') if column < len(fields) else ""
        if not value.isdigit():
            raise DataError(f"--ids={path} line {number}: {value!r} is not a GalaxyID; {fix}")
        ids.add(int(value))
    if not ids:
        raise DataError(f"--ids={path} holds no GalaxyID; {fix}")
    return ids


def _select_ids(cfg, images, labels, skipped):
    """Keep only --ids's galaxies: in images (in place), labels and the skip records; add a record
    for each listed ID found nowhere in raw_dir. Returns (labels, skipped, {"listed", "absent"})."""
    wanted = read_ids(cfg.ids)
    for split in SPLIT_FOLDERS:
        images[split] = {galaxy_id: ref for galaxy_id, ref in images[split].items() if galaxy_id in wanted}
    if labels is not None:
        labels = labels[labels.index.isin(wanted)]
    # records of galaxies not asked for would only hide the ones that matter
    skipped = [record for record in skipped
               if not str(record["galaxy_id"]).isdigit() or int(record["galaxy_id"]) in wanted]
    found = set(images["train"]) | set(images["test"]) | (set(labels.index) if labels is not None else set())
    absent = sorted(wanted - found)
    if len(absent) == len(wanted):
        raise DataError(f"none of the {len(wanted)} GalaxyIDs in --ids={cfg.ids} is in {cfg.raw_dir}; "
                        f"point --raw_dir at Kaggle's download or --ids at another list")
    skipped += [skip_record("", galaxy_id, cfg.ids, "listed in ids but not in raw_dir") for galaxy_id in absent]
    return labels, skipped, {"listed": len(wanted), "absent": len(absent)}


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
    selection = None
    if cfg.ids:
        labels, skipped, selection = _select_ids(cfg, images, labels, skipped)
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
    # closing: a Ctrl-C that lands in this loop's body ends the pool here too, not at exit with no stop set
    with closing(run_pool(_crop_and_save, tasks, cfg.workers, job, "preprocess", progress)) as results:
        for split, galaxy_id, outcome, reason in results:
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
    chosen = ""
    if selection:
        summary["ids"] = selection
        chosen = (f"; ids: {selection['listed']} listed in {cfg.ids}, {selection['absent']} of them not in "
                  f"{raw_dir}")
    print(f"preprocess: {summary['written']} PNGs written, {summary['present']} already present "
          f"({summary['train']} train, {summary['test']} test in {processed_dir}){chosen}; "
          f"skipped {len(skipped)}: {skipped_text} (see skipped.csv)")
    if not done["train"] and not done["test"]:
        sys.exit(raw_layout_error(raw_dir, "no image could be used; skipped.csv says why"))
    return summary
