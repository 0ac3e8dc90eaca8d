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
import io
import json
import math
import os
import signal
import struct
import sys
import time
import zipfile
import zlib
from collections import Counter
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from scipy import ndimage
from tqdm import tqdm

from config import get_config
from dataset import LABEL_COLUMNS, QUESTIONS, atomic_write

# Kaggle's file names, without .zip / .csv
SPLIT_FOLDERS = {"train": "images_training_rev1", "test": "images_test_rev1"}
SOLUTIONS = "training_solutions_rev1"
SETTINGS_FILE = "preprocess.json"   # the crop settings the PNGs in processed_dir were made with
CROP_KEYS = ("crop", "image_size", "roi_threshold", "roi_pad", "roi_min_size", "center_crop_size")
ROI_WORK_SIDE = 106                 # the ROI is found on a frame about this wide (424 / 4)
SKIPPED_COLUMNS = ["split", "galaxy_id", "file", "reason"]


class BadImage(ValueError):
    """An image that cannot be used; str() is a short reason, 'category: detail'."""


# ---------------------------------------------------------------------------------------------
# Finding the raw files


def raw_layout_error(raw_dir, problem=None):
    """The message that says which of Kaggle's files go where, or None if raw_dir looks usable."""
    raw = Path(raw_dir)
    if problem is None:
        if not raw.is_dir():
            problem = "the folder does not exist"
        elif not any(_find_images_source(raw, split) for split in SPLIT_FOLDERS):
            problem = "it holds neither training nor test images"
        else:
            return None
    return (f"error: no usable Galaxy Zoo data in {raw}/ ({problem}).\n"
            f"Put Kaggle's files there as downloaded; unzipping is not needed:\n"
            f"  {raw}/images_training_rev1.zip     (or the folder images_training_rev1/<GalaxyID>.jpg)\n"
            f"  {raw}/training_solutions_rev1.zip  (or training_solutions_rev1.csv)\n"
            f"  {raw}/images_test_rev1.zip         (or the folder images_test_rev1/<GalaxyID>.jpg)\n"
            f"Get them with:  kaggle competitions download -c galaxy-zoo-the-galaxy-challenge -p {raw}\n"
            f"(if that gives one galaxy-zoo-the-galaxy-challenge.zip, unzip it: it holds the zips above),\n"
            f"or try the pipeline on synthetic galaxies:  python preprocess.py --demo")


def _find_images_source(raw_dir, split):
    """The extracted folder if it holds any JPEG, else the zip, else None."""
    folder = Path(raw_dir) / SPLIT_FOLDERS[split]
    if folder.is_dir() and any(_is_jpeg_name(name) for _, _, names in os.walk(folder) for name in names):
        return folder
    archive = folder.with_name(folder.name + ".zip")
    return archive if archive.is_file() else None


def _is_jpeg_name(name):
    base = name.rsplit("/", 1)[-1]
    return base.lower().endswith((".jpg", ".jpeg")) and not base.startswith("._")


def scan_images(raw_dir, split):
    """({galaxy_id: reference}, [skip records]) for one split; see raw_images for references."""
    source = _find_images_source(raw_dir, split)
    if source is None:
        return {}, []
    if source.suffix == ".zip":
        with zipfile.ZipFile(source) as archive:
            names = [n for n in archive.namelist() if _is_jpeg_name(n) and "__MACOSX" not in n]
        references = [f"{source.name}/{name}" for name in names]
    else:
        references = []
        for root, _, files in os.walk(source):
            folder = Path(root).relative_to(raw_dir).as_posix()   # strings per file: a split holds 60k files
            references += [f"{folder}/{name}" for name in files if _is_jpeg_name(name)]
        references.sort()
    images, skipped = {}, []
    for reference in references:
        stem = reference.rsplit("/", 1)[-1].rsplit(".", 1)[0]
        if not stem.isdigit():
            skipped.append(_skip(split, "", reference, "file name is not a GalaxyID"))
        elif int(stem) in images:
            skipped.append(_skip(split, int(stem), reference, f"duplicate image: kept {images[int(stem)]}"))
        else:
            images[int(stem)] = reference
    return images, skipped


def raw_images(raw_dir, split):
    """{GalaxyID: reference} of the JPEGs of split "train" or "test" in raw_dir.

    A reference is a path relative to raw_dir: "images_training_rev1/100008.jpg" for an
    extracted file, "images_training_rev1.zip/images_training_rev1/100008.jpg" for a zip
    member (the member may sit in a top folder or not). Pass it to read_raw for the bytes.
    """
    return scan_images(raw_dir, split)[0]


_open_zips = {}   # this process's own ZipFile handles; a forked worker must not share its parent's


def read_raw(raw_dir, reference):
    """The bytes of one raw image, given raw_dir and a reference from raw_images."""
    archive_name, is_zip, member = reference.partition(".zip/")
    if not is_zip:
        with open(os.path.join(raw_dir, reference), "rb") as f:
            return f.read()
    archive_path = str(Path(raw_dir) / (archive_name + ".zip"))
    if archive_path not in _open_zips:
        _open_zips[archive_path] = zipfile.ZipFile(archive_path)
    return _open_zips[archive_path].read(member)


def read_labels(raw_dir):
    """(labels DataFrame indexed by GalaxyID with the 37 LABEL_COLUMNS, [skip records], file name).

    Rows with a bad GalaxyID, a repeated GalaxyID (the first is kept), or a value that is
    missing or outside [0, 1] are skipped. Exits with a one-line message if the file cannot be
    read or lacks columns. Returns (None, [], None) when there is no solutions file.
    """
    raw = Path(raw_dir)
    csv_path, zip_path = raw / f"{SOLUTIONS}.csv", raw / f"{SOLUTIONS}.zip"
    try:
        if csv_path.is_file():
            file_name = csv_path.name
            table = pd.read_csv(csv_path)
        elif zip_path.is_file():
            with zipfile.ZipFile(zip_path) as archive:
                members = [n for n in archive.namelist() if n.lower().endswith(".csv") and "__MACOSX" not in n]
                if not members:
                    sys.exit(f"error: {zip_path} holds no .csv; it should hold Kaggle's {SOLUTIONS}.csv")
                file_name = f"{zip_path.name}/{members[0]}"
                with archive.open(members[0]) as f:
                    table = pd.read_csv(f)
        else:
            return None, [], None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, zipfile.BadZipFile) as err:
        sys.exit(f"error: cannot read {raw / SOLUTIONS}: {err}; download Kaggle's {SOLUTIONS}.zip again")
    table.columns = [c.strip() for c in table.columns]
    missing = [c for c in ["GalaxyID"] + LABEL_COLUMNS if c not in table.columns]
    if missing:
        sys.exit(f"error: {raw / file_name} lacks the columns {', '.join(missing)}; "
                 f"it should be Kaggle's {SOLUTIONS}.csv (GalaxyID, Class1.1 ... Class11.6)")

    skipped = []
    # read_csv parsed every clean column as numbers; one holding any text comes as strings, whose
    # unparsable cells become NaN here (parsing all 37 columns as text first took 4x as long)
    ids = pd.to_numeric(table["GalaxyID"], errors="coerce")
    values = table[LABEL_COLUMNS].apply(lambda column: column if pd.api.types.is_float_dtype(column)
                                        else pd.to_numeric(column, errors="coerce"))
    bad_id = ids.isna() | (ids != ids.round()) | (ids < 0)
    repeated = ~bad_id & ids.duplicated(keep="first")
    not_number = values.isna().any(axis=1)
    # the published fractions sit in [0, 1] up to float noise; anything further off is broken
    out_of_range = ((values < -1e-6) | (values > 1 + 1e-6)).any(axis=1)
    reasons = [(bad_id, "bad GalaxyID in labels"), (repeated, "duplicate GalaxyID in labels: first row kept"),
               (not_number, "label value missing or not a number"), (out_of_range, "label value outside [0, 1]")]
    keep = pd.Series(True, index=table.index)
    for mask, reason in reasons:
        for row in table.index[mask & keep]:
            galaxy_id = int(ids[row]) if not bad_id[row] else table.at[row, "GalaxyID"]
            skipped.append(_skip("train", galaxy_id, f"{file_name} line {row + 2}", reason))
        keep &= ~mask
    labels = values[keep].clip(0, 1)
    labels.index = ids[keep].astype(np.int64).rename("GalaxyID")
    return labels, skipped, file_name


def _skip(split, galaxy_id, file, reason):
    return {"split": split, "galaxy_id": galaxy_id, "file": file, "reason": reason}


# ---------------------------------------------------------------------------------------------
# Cropping


def _square_box(center_x, center_y, side, width, height):
    """An integer square of the given side about a centre, shifted inside the frame (shrunk only if too big)."""
    side = int(round(min(side, width, height)))
    left = int(round(center_x - side / 2))
    top = int(round(center_y - side / 2))
    left = min(max(left, 0), width - side)
    top = min(max(top, 0), height - side)
    return left, top, left + side, top + side


def center_box(width, height, cfg):
    """The fixed central square of cfg.center_crop_size raw pixels (crop=center)."""
    return _square_box(width / 2, height / 2, cfg.center_crop_size, width, height)


def _mean3x3(gray):
    """The mean of each pixel's 3x3 neighbourhood, edges mirrored, as float32.

    The same as scipy's uniform_filter(size=3) up to float rounding, in a third of the time:
    this runs once per image, and on a 106 px frame scipy's per-call overhead dominates.
    """
    height, width = gray.shape
    padded = np.empty((height + 2, width + 2), np.float32)
    padded[1:-1, 1:-1] = gray
    padded[0, 1:-1], padded[-1, 1:-1] = gray[0], gray[-1]
    padded[:, 0], padded[:, -1] = padded[:, 1], padded[:, -2]
    rows = padded[:-2] + padded[1:-1] + padded[2:]
    return (rows[:, :-2] + rows[:, 1:-1] + rows[:, 2:]) / 9


_FOUR_NEIGHBOURS = ndimage.generate_binary_structure(2, 1)   # made once: label() would make it per call


def _central_blob(smooth, level, cy, cx):
    """(row slice, column slice) bounding the blob of pixels above level that holds (cy, cx), or lies nearest.

    Labelling blobs is most of the cost of roi_box, so it starts on the central window of 2/3 of
    the frame's side, which holds most galaxies; only a blob that touches the window's edge (it may
    go on outside), or a dark centre, needs the whole frame. The result is the same either way.
    """
    reach = max(smooth.shape) // 3
    top, left = max(cy - reach, 0), max(cx - reach, 0)
    for frame, (y0, x0) in ((smooth[top:cy + reach, left:cx + reach], (top, left)), (smooth, (0, 0))):
        blobs, _ = ndimage.label(frame > level, _FOUR_NEIGHBOURS)
        galaxy = blobs[cy - y0, cx - x0]
        if galaxy == 0:
            if frame is not smooth:
                continue   # the nearest blob may lie outside the window
            ys, xs = np.nonzero(blobs)
            nearest = np.argmin((ys - cy) ** 2 + (xs - cx) ** 2)
            galaxy = blobs[ys[nearest], xs[nearest]]
        pixels = blobs == galaxy   # its bounding box; twice as fast as ndimage.find_objects here
        rows, cols = np.flatnonzero(pixels.any(axis=1)), np.flatnonzero(pixels.any(axis=0))
        inside = rows[0] > 0 and cols[0] > 0 and rows[-1] < frame.shape[0] - 1 and cols[-1] < frame.shape[1] - 1
        if inside or frame is smooth:
            return slice(y0 + rows[0], y0 + rows[-1] + 1), slice(x0 + cols[0], x0 + cols[-1] + 1)


def roi_box(gray, cfg, scale=1.0):
    """(left, top, right, bottom) of a square around the central galaxy, in gray's pixel coordinates.

    gray is a 2-D array of the image; scale is how many raw pixels one of its pixels spans (so
    roi_min_size, in raw pixels, means the same on a reduced image). Pixels brighter than
    sky + roi_threshold * (central brightness - sky) form connected blobs; the one holding the
    frame centre (or nearest to it) is the galaxy, even if a neighbour elsewhere is brighter.
    Its bounding box grows by roi_pad of its side, is made square about its centre, at least
    roi_min_size, and shifted inside the frame.
    """
    height, width = gray.shape
    # light smoothing so sky noise neither fragments the galaxy nor sets the central brightness
    smooth = _mean3x3(gray)
    border = max(1, min(height, width) // 16)
    edges = np.sort(np.concatenate([smooth[:border].ravel(), smooth[-border:].ravel(),
                                    smooth[:, :border].ravel(), smooth[:, -border:].ravel()]))
    sky = (float(edges[(len(edges) - 1) // 2]) + float(edges[len(edges) // 2])) / 2   # their median, 3x faster than np.median
    cy, cx = height // 2, width // 2
    reach = max(1, min(height, width) // 16)   # the galaxy's peak may sit a little off centre
    centre = float(smooth[cy - reach:cy + reach + 1, cx - reach:cx + reach + 1].max())
    if centre - sky < 2.0:   # (grey levels) nothing stands out of the sky: fall back to the fixed crop
        left, top, right, bottom = center_box(width * scale, height * scale, cfg)
        return left / scale, top / scale, right / scale, bottom / scale
    rows, cols = _central_blob(smooth, sky + cfg.roi_threshold * (centre - sky), cy, cx)
    side = max(rows.stop - rows.start, cols.stop - cols.start) * (1 + cfg.roi_pad)
    side = max(side, cfg.roi_min_size / scale)
    side = min(side, width, height)
    # the same shift-inside-the-frame rule as _square_box, kept in floats at this reduced scale
    left = min(max((cols.start + cols.stop) / 2 - side / 2, 0), width - side)
    top = min(max((rows.start + rows.stop) / 2 - side / 2, 0), height - side)
    return left, top, left + side, top + side


def _read_source(source):
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source)
    if hasattr(source, "read"):
        return source.read()
    return Path(source).read_bytes()


def _open(data):
    """The image with only its header read, so that draft can still pick the decoding scale."""
    try:
        return Image.open(io.BytesIO(data))
    except (OSError, SyntaxError, ValueError) as err:
        raise BadImage(f"not an image: {err}") from None


def _decode(image, reduction):
    """image (fresh from _open) decoded as RGB at 1/reduction of its size where it is a JPEG."""
    try:
        if reduction > 1:
            image.draft("RGB", (image.width // reduction, image.height // reduction))
        image.load()
    except Image.DecompressionBombError as err:
        raise BadImage(f"image too large: {err}") from None
    except (OSError, SyntaxError, ValueError) as err:   # Pillow's ways of saying corrupt or truncated
        raise BadImage(f"corrupt or truncated image: {err}") from None
    if image.mode != "RGB":   # grayscale, CMYK, palette ... are converted, not skipped
        image = image.convert("RGB")
    return image


def _reduction_for(side, image_size):
    """The largest JPEG reduction (8, 4, 2, 1) that leaves at least image_size pixels across side."""
    return next(k for k in (8, 4, 2, 1) if side / k >= image_size or k == 1)


def crop_galaxy(source, cfg):
    """(RGB crop of image_size x image_size, box) for one image; box is in the image's full-size pixels.

    source is a path, a file object or the bytes of a JPEG (any Pillow-readable image works).
    Raises BadImage with a short reason for an empty, unreadable, truncated or too small image.
    """
    data = _read_source(source)
    if not data:
        raise BadImage("empty file")
    image = _open(data)
    width, height = image.size
    if min(width, height) < cfg.image_size:
        raise BadImage(f"image too small: {width}x{height} < image_size {cfg.image_size}")

    if cfg.crop == "center":
        box = center_box(width, height, cfg)
        image = _decode(image, _reduction_for(box[2] - box[0], cfg.image_size))
    else:
        # one decode at half size serves both the ROI search and, for most galaxies, the crop
        image = _decode(image, 2 if min(width, height) >= 4 * ROI_WORK_SIDE else 1)
        gray = image.convert("L").reduce(max(1, min(image.size) // ROI_WORK_SIDE))
        scale = width / gray.width
        left, top, right, bottom = roi_box(np.asarray(gray), cfg, scale)
        box = _square_box((left + right) / 2 * scale, (top + bottom) / 2 * scale,
                          (right - left) * scale, width, height)
        if width / image.width > _reduction_for(box[2] - box[0], cfg.image_size):
            image = _decode(_open(data), _reduction_for(box[2] - box[0], cfg.image_size))   # small galaxy
    scale_x, scale_y = width / image.width, height / image.height
    scaled_box = (box[0] / scale_x, box[1] / scale_y, box[2] / scale_x, box[3] / scale_y)
    size = (cfg.image_size, cfg.image_size)
    return image.resize(size, Image.Resampling.BOX, box=scaled_box), box


# ---------------------------------------------------------------------------------------------
# Writing files safely


def _temp_name(path):
    # *.tmp: never mistaken for a finished file, ignored by git, and removed by the next run;
    # the same name dataset.atomic_write gives its temporary files
    return path.with_name(f"{path.name}.{os.getpid()}.tmp")


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


def start_worker(job):
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # Ctrl-C is the parent's to handle
    _open_zips.clear()   # forked copies would share one file offset with the parent's handles
    _folder_fds.clear()
    worker_job.update(job)


def run_pool(function, tasks, workers, job, description, progress=True, ordered=False):
    """Yield function(task) for every task from a pool of workers, with a progress bar in img/s."""
    tasks = list(tasks)
    chunk = max(1, min(32, len(tasks) // (8 * workers)))
    with Pool(workers, initializer=start_worker, initargs=(job,)) as pool:   # exit terminates it
        results = (pool.imap if ordered else pool.imap_unordered)(function, tasks, chunksize=chunk)
        yield from tqdm(results, total=len(tasks), desc=description, unit="img",
                        disable=not progress, smoothing=0.1)


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
        png = _png_bytes(crop)
    except BadImage as err:
        return split, galaxy_id, "skipped", str(err)
    except (OSError, zipfile.BadZipFile, EOFError) as err:   # e.g. a damaged zip member
        return split, galaxy_id, "skipped", f"unreadable file: {err}"
    _write_whole(png_path, png)
    return split, galaxy_id, "written", ""


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

    Exits with the what-goes-where message if raw_dir holds nothing usable.
    """
    raw_dir, processed_dir = Path(cfg.raw_dir), Path(cfg.processed_dir)
    message = raw_layout_error(raw_dir)
    if message:
        sys.exit(message)
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
            skipped.append(_skip("train", galaxy_id, labels_file, "label row without image"))
        for galaxy_id in sorted(set(images["train"]) - set(labels.index)):
            skipped.append(_skip("train", galaxy_id, images["train"][galaxy_id], "image without label row"))
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
            skipped.append(_skip(split, galaxy_id, images[split][galaxy_id], reason))
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


# ---------------------------------------------------------------------------------------------
# Synthetic galaxies in Kaggle's layout (--demo and the tests)

DEMO_MARKER = "synthetic_demo.json"   # says a folder is ours to (re)write
DEMO_SIDE = 424
DEMO_KINDS = ("elliptical", "disk", "edge-on", "star")
DEMO_KIND_ODDS = (0.38, 0.42, 0.15, 0.05)


def _sersic(grid, x0, y0, r_e, n, q, angle, peak):
    """A Sersic light profile of effective radius r_e (px), index n, axis ratio q, on a local window."""
    reach = int(min(DEMO_SIDE, 8 * r_e + 4))   # beyond 8 r_e the light is below 1e-5 of the peak
    window = (slice(max(0, int(y0) - reach), int(y0) + reach + 1), slice(max(0, int(x0) - reach), int(x0) + reach + 1))
    dx, dy = grid[1][window] - x0, grid[0][window] - y0
    u = dx * math.cos(angle) + dy * math.sin(angle)
    v = (dy * math.cos(angle) - dx * math.sin(angle)) / q
    # a softened core (the seeing blurs the cusp of a high-n profile) whose top is the given peak
    core = 0.15 * r_e
    radius = np.sqrt(u * u + v * v + core * core)
    b_n = 2 * n - 1 / 3
    return window, u, v, radius, peak * np.exp(-b_n * ((radius / r_e) ** (1 / n) - (core / r_e) ** (1 / n)))


def _demo_galaxy(kind, rng):
    """The drawn properties of one synthetic galaxy (all that its labels depend on)."""
    g = {"kind": kind, "angle": rng.uniform(0, math.pi), "bulge": 0.0, "arms": 0, "pitch": 0.0, "bar": False,
         "peak": rng.uniform(90, 220), "neighbour_near": False}
    if kind == "elliptical":
        g.update(q=rng.uniform(0.35, 1.0), r_e=rng.uniform(10, 35), n=rng.uniform(2.5, 4), bulge=1.0)
    elif kind == "disk":
        g.update(q=rng.uniform(0.35, 1.0), r_e=rng.uniform(10, 32), n=1.0, bulge=rng.uniform(0, 0.7),
                 bar=rng.random() < 0.3)
        if rng.random() < 0.6:
            g.update(arms=int(rng.choice([1, 2, 2, 2, 3, 4, 5])), pitch=rng.uniform(10, 40))
    elif kind == "edge-on":
        g.update(q=rng.uniform(0.08, 0.2), r_e=rng.uniform(12, 36), n=1.0, bulge=rng.uniform(0, 0.6))
    else:   # a foreground star or artifact sitting where the galaxy should be
        g.update(q=1.0, r_e=rng.uniform(2.5, 4), n=0.5, peak=255.0)
    return g


def _soft(rng, weights, concentration=40.0):
    """Random vote fractions around the given weights (summing to 1), like a finite crowd of voters."""
    weights = np.asarray(weights, dtype=float) + 0.02
    return rng.dirichlet(concentration * weights / weights.sum())


def _bumps(value, centres, width):
    return [math.exp(-((value - c) / width) ** 2) for c in centres]


def demo_labels(g, rng):
    """The 37 vote fractions of a drawn galaxy, obeying the Galaxy Zoo decision tree exactly."""
    first = {"elliptical": (0.85, 0.12, 0.03), "disk": (0.15, 0.83, 0.02), "edge-on": (0.08, 0.9, 0.02),
             "star": (0.1, 0.1, 0.8)}[g["kind"]]
    edge_on = 0.9 if g["kind"] == "edge-on" else max(0.03, 0.6 - g["q"])
    answers = {   # question number -> weights of its answers, before scaling by the parent's fraction
        1: first,
        2: (edge_on, 1 - edge_on),
        3: (0.8, 0.2) if g["bar"] else (0.08, 0.92),
        4: (0.85, 0.15) if g["arms"] else (0.1, 0.9),
        5: _bumps(g["bulge"], (0.0, 0.25, 0.5, 0.8), 0.15),
        6: (0.4, 0.6) if g["neighbour_near"] else (0.08, 0.92),
        7: _bumps(g["q"], (1.0, 0.7, 0.35), 0.15),
        8: (0.05, 0.05, 0.3, 0.1, 0.1, 0.5, 0.02) if g["neighbour_near"] else (0.3, 0.2, 0.1, 0.1, 0.3, 0.02, 0.02),
        9: _bumps(g["bulge"], (0.5, 0.25, 0.0), 0.15),
        10: _bumps(g["pitch"], (12, 25, 38), 7),
        11: [float(g["arms"] == m) for m in (1, 2, 3, 4)] + [float(g["arms"] >= 5), 0.1],
    }
    values = {}
    for question in QUESTIONS:   # parents come before their children in Kaggle's order
        parent = values[question.parent] if question.parent else 1.0
        for column, fraction in zip(question.columns, _soft(rng, answers[question.number])):
            values[column] = parent * fraction
    return [values[column] for column in LABEL_COLUMNS]


def _render_demo(task):
    """Worker: (split, galaxy_id, seed) -> (split, galaxy_id, JPEG bytes, labels or None)."""
    split, galaxy_id, seed = task
    rng = np.random.default_rng([seed, galaxy_id])
    grid = np.mgrid[0:DEMO_SIDE, 0:DEMO_SIDE].astype(np.float32)
    light = np.zeros((DEMO_SIDE, DEMO_SIDE, 3), np.float32)
    red, blue, white = np.array([1.0, 0.8, 0.6]), np.array([0.7, 0.8, 1.0]), np.array([1.0, 1.0, 1.0])

    def add(window, image, colour):
        light[window] += image[..., None] * colour.astype(np.float32)

    g = _demo_galaxy(rng.choice(DEMO_KINDS, p=DEMO_KIND_ODDS), rng)
    x0, y0 = DEMO_SIDE / 2 + rng.uniform(-1, 1), DEMO_SIDE / 2 + rng.uniform(-1, 1)
    if g["kind"] in ("elliptical", "star"):
        window, _, _, _, image = _sersic(grid, x0, y0, g["r_e"], g["n"], g["q"], g["angle"], g["peak"])
        add(window, image, red if g["kind"] == "elliptical" else white)
    else:
        window, u, v, radius, disk = _sersic(grid, x0, y0, g["r_e"], 1.0, g["q"], g["angle"],
                                             g["peak"] * (1 - 0.6 * g["bulge"]))
        if g["arms"]:   # logarithmic spirals: brightness rises along theta = ln(r) / tan(pitch)
            phase = g["arms"] * (np.arctan2(v, u) - np.log(radius / g["r_e"] + 1e-3) / math.tan(math.radians(g["pitch"])))
            disk *= 1 + 0.8 * np.cos(phase) * np.clip(radius / g["r_e"] - 0.3, 0, 1)
        add(window, disk, blue)
        if g["bar"]:
            window, *_, bar = _sersic(grid, x0, y0, 0.8 * g["r_e"], 0.5, 0.25, g["angle"] + rng.uniform(0.5, 1.2),
                                      0.5 * g["peak"])
            add(window, bar, red)
        if g["bulge"] > 0.05:
            window, *_, bulge = _sersic(grid, x0, y0, 0.25 * g["r_e"] * (0.5 + g["bulge"]), 4.0, max(g["q"], 0.6),
                                        g["angle"], g["peak"] * g["bulge"])
            add(window, bulge, red)
    for _ in range(rng.poisson(1.2)):   # neighbour galaxies, sometimes brighter than the central one
        nx, ny = rng.uniform(20, DEMO_SIDE - 20, size=2)
        r_e = rng.uniform(3, 15)
        g["neighbour_near"] |= math.hypot(nx - x0, ny - y0) < 3 * (g["r_e"] + r_e)
        window, *_, image = _sersic(grid, nx, ny, r_e, rng.choice([1.0, 4.0]), rng.uniform(0.3, 1), rng.uniform(0, 3.2),
                                    rng.uniform(40, 255))
        add(window, image, red if rng.random() < 0.5 else blue)
    for _ in range(rng.poisson(2.0)):   # foreground stars: point sources blurred by the seeing
        sx, sy = rng.uniform(5, DEMO_SIDE - 5, size=2)
        window, *_, image = _sersic(grid, sx, sy, rng.uniform(1, 2.5), 0.5, 1.0, 0.0, rng.uniform(60, 255))
        add(window, image, white)
    sky = 8 + rng.normal(0, 3, size=light.shape).astype(np.float32)
    pixels = np.clip(light + sky, 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    labels = demo_labels(g, rng) if split == "train" else None
    return split, galaxy_id, buffer.getvalue(), labels


def make_demo(raw_dir, n_train, n_test, seed, workers=1, progress=True):
    """Write n_train + n_test synthetic galaxies into raw_dir as Kaggle's three zips; return raw_dir.

    Deterministic by seed. A complete set with the same numbers is reused; a folder holding
    other files (no marker file) is refused, so nothing of yours is ever overwritten.
    """
    raw = Path(raw_dir)
    marker = raw / DEMO_MARKER
    wanted = {"n_train": n_train, "n_test": n_test, "seed": seed}
    if raw.is_dir() and any(raw.iterdir()) and not marker.is_file():
        sys.exit(f"error: {raw} holds files that are not a synthetic demo set ({DEMO_MARKER} is missing); "
                 f"refusing to write there. Pick an empty folder with --raw_dir=...")
    if marker.is_file() and json.loads(marker.read_text()) == {**wanted, "complete": True}:
        print(f"demo: reusing the synthetic galaxies in {raw}")
        return raw
    raw.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps({**wanted, "complete": False}))   # ours from here on, even if killed

    rng = np.random.default_rng(seed)
    ids = rng.choice(np.arange(100000, 1000000), size=n_train + n_test, replace=False)
    tasks = [("train" if i < n_train else "test", int(galaxy_id), seed) for i, galaxy_id in enumerate(ids)]
    archives = {split: zipfile.ZipFile(_temp_name(raw / f"{folder}.zip"), "w")
                for split, folder in SPLIT_FOLDERS.items()}
    rows = []
    for split, galaxy_id, jpeg, labels in run_pool(_render_demo, tasks, workers, {}, "demo galaxies",
                                                    progress, ordered=True):
        # JPEGs do not compress further: store them, as Kaggle's zips do
        archives[split].writestr(f"{SPLIT_FOLDERS[split]}/{galaxy_id}.jpg", jpeg)
        if labels is not None:
            rows.append([galaxy_id] + labels)
    for split, archive in archives.items():
        archive.close()
        os.replace(archive.filename, raw / f"{SPLIT_FOLDERS[split]}.zip")
    table = pd.DataFrame(sorted(rows), columns=["GalaxyID"] + LABEL_COLUMNS)

    def write_solutions(temporary):
        with zipfile.ZipFile(temporary, "w", zipfile.ZIP_DEFLATED) as archive:
            archive.writestr(f"{SOLUTIONS}.csv", table.to_csv(index=False))

    atomic_write(raw / f"{SOLUTIONS}.zip", write_solutions)
    marker.write_text(json.dumps({**wanted, "complete": True}))
    return raw


def main():
    cfg = get_config()
    started = time.perf_counter()
    try:
        if cfg.demo:
            make_demo(cfg.raw_dir, cfg.demo_train, cfg.demo_test, cfg.seed, cfg.workers)
        preprocess(cfg)
    except KeyboardInterrupt:
        print("\ninterrupted: the PNGs already written are kept; run the same command again to finish",
              file=sys.stderr)
        sys.exit(130)
    print(f"done in {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
