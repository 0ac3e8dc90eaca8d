"""The Galaxy Zoo labels and the training data: the decision-tree table, pairing PNGs
with labels.csv, the cached uint8 image tensor, the train/val/test split and
batch augmentation.
"""
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
import hashlib
import math
import os
import re

from PIL import Image
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from galaxy.files import DataError, atomic_write, remove_dead_temp_files


@dataclass(frozen=True)
class Question:
    number: int
    text: str
    answers: tuple    # human names, in Kaggle's column order
    parent: str       # the column whose vote fraction this question's answers sum to ("" = 1)

    @property
    def columns(self):
        return [f"Class{self.number}.{i + 1}" for i in range(len(self.answers))]


# The Galaxy Zoo 2 decision tree (Willett et al. 2013) as Kaggle scores it: each question's
# vote fractions sum to the fraction of voters who reached it, i.e. the parent answer's column.
QUESTIONS = (
    Question(1, "Smooth, featured or star?", ("smooth", "features or disk", "star or artifact"), ""),
    Question(2, "Edge-on disk?", ("yes", "no"), "Class1.2"),
    Question(3, "Bar through the centre?", ("bar", "no bar"), "Class2.2"),
    Question(4, "Spiral arms?", ("spiral", "no spiral"), "Class2.2"),
    Question(5, "Central bulge prominence?", ("no bulge", "just noticeable", "obvious", "dominant"), "Class2.2"),
    Question(6, "Anything odd?", ("yes", "no"), ""),
    Question(7, "How round (smooth)?", ("completely round", "in between", "cigar-shaped"), "Class1.1"),
    Question(8, "What is odd?", ("ring", "lens or arc", "disturbed", "irregular", "other", "merger", "dust lane"),
             "Class6.1"),
    Question(9, "Bulge shape (edge-on)?", ("rounded", "boxy", "no bulge"), "Class2.1"),
    Question(10, "Spiral arm winding?", ("tight", "medium", "loose"), "Class4.1"),
    Question(11, "Number of spiral arms?", ("1", "2", "3", "4", "more than four", "can't tell"), "Class4.1"),
)

LABEL_COLUMNS = [column for q in QUESTIONS for column in q.columns]   # the 37 outputs, Kaggle order
NUM_OUTPUTS = len(LABEL_COLUMNS)

# How each answer reads in a summary, where the bare answer name would not say what it is about.
SUMMARY_WORDS = {
    "Class2.1": "edge-on", "Class2.2": "not edge-on",
    "Class4.1": "spiral", "Class4.2": "no spiral",
    "Class5.1": "no bulge", "Class5.2": "bulge just noticeable", "Class5.3": "bulge obvious",
    "Class5.4": "bulge dominant",
    "Class7.2": "in between round and cigar-shaped",
    "Class9.1": "rounded bulge", "Class9.2": "boxy bulge", "Class9.3": "no bulge",
    "Class10.1": "tight winding", "Class10.2": "medium winding", "Class10.3": "loose winding",
    "Class11.1": "1 arm", "Class11.2": "2 arms", "Class11.3": "3 arms", "Class11.4": "4 arms",
    "Class11.5": "more than four arms", "Class11.6": "can't tell how many arms",
}


def vote_summary(vote_fractions):
    """The galaxy in plain words: the most-voted answer of each question, following the tree down.

    e.g. "features or disk; not edge-on; no bar; spiral, 2 arms, tight winding; bulge just noticeable".
    Q6 (anything odd?) is asked of every galaxy; it adds "odd: <what>" only when "yes" wins.
    """
    votes = dict(zip(LABEL_COLUMNS, np.asarray(vote_fractions, np.float64).tolist()))
    by_number = {q.number: q for q in QUESTIONS}

    def top(number):
        question = by_number[number]
        column = max(question.columns, key=votes.get)
        return column, SUMMARY_WORDS.get(column, question.answers[question.columns.index(column)])

    q1, words = top(1)
    parts = [words]
    if q1 == "Class1.1":
        parts.append(top(7)[1])
    elif q1 == "Class1.2":
        q2, words = top(2)
        parts.append(words)
        if q2 == "Class2.1":
            parts.append(top(9)[1])
        else:
            q4, spiral = top(4)
            parts += [top(3)[1], f"{spiral}, {top(11)[1]}, {top(10)[1]}" if q4 == "Class4.1" else spiral, top(5)[1]]
    if top(6)[0] == "Class6.1":
        parts.append(f"odd: {top(8)[1]}")
    return "; ".join(parts)


SPLITS = ("train", "val", "test")
INT64_MAX = 2 ** 63 - 1


# --- labels and images ------------------------------------------------------------

def read_labels(processed_dir):
    """(galaxy_ids int64 array, vote_fractions float32 array (N, 37)) from labels.csv.

    The file may have been edited since preprocess.py wrote it, so every cell is checked: a NaN
    or a -5 would otherwise train (and score) silently, a text cell fail without the file's name.
    """
    path = os.path.join(processed_dir, "labels.csv")
    if not os.path.isfile(path):
        raise DataError(f"{path} not found; run `python preprocess.py --processed_dir={processed_dir}` first")
    fix = f"re-run `python preprocess.py --processed_dir={processed_dir}`, which rewrites it from Kaggle's CSV"
    table = pd.read_csv(path)
    missing = [c for c in ["GalaxyID"] + LABEL_COLUMNS if c not in table.columns]
    if missing:
        raise DataError(f"{path} lacks columns {missing[:3]}...; {fix}")
    galaxy_ids, votes = table["GalaxyID"], table[LABEL_COLUMNS]
    # 1e-6: float noise from whatever wrote the file; NaN fails both comparisons
    if not (galaxy_ids.dtype == np.int64 and (galaxy_ids >= 0).all() and galaxy_ids.is_unique
            and all(dtype.kind in "if" for dtype in votes.dtypes)
            and ((votes >= -1e-6) & (votes <= 1 + 1e-6)).to_numpy().all()):
        raise first_bad_label(path, fix)
    return galaxy_ids.to_numpy(np.int64), votes.to_numpy(np.float64).clip(0, 1).astype(np.float32)


def first_bad_label(path, fix):
    """DataError naming labels.csv's first bad cell by line, as written there (read again as text)."""
    table = pd.read_csv(path, dtype=str, keep_default_na=False)
    line_of = {}
    for row, text in enumerate(table["GalaxyID"].str.strip()):
        line = row + 2   # the header is line 1
        if not re.fullmatch(r"[0-9]+", text) or int(text) > INT64_MAX:
            return DataError(f"{path} line {line}: GalaxyID {text!r} is not a non-negative 64-bit integer; {fix}")
        if int(text) in line_of:
            return DataError(f"{path} line {line}: GalaxyID {text} repeats line {line_of[int(text)]}; {fix}")
        line_of[int(text)] = line
    votes = table[LABEL_COLUMNS].apply(pd.to_numeric, errors="coerce").to_numpy(np.float64)
    bad_cells = np.argwhere(~((votes >= -1e-6) & (votes <= 1 + 1e-6)))   # text was coerced to NaN
    if not len(bad_cells):   # nothing to point at: no rows at all
        return DataError(f"{path} has no label rows; {fix}")
    row, column = bad_cells[0]
    name = LABEL_COLUMNS[column]
    return DataError(f"{path} line {row + 2}: {name} is {table[name].iat[row]!r}, not a vote fraction in [0, 1]; {fix}")


def png_ids(folder):
    """GalaxyIDs of the <id>.png files in folder, sorted."""
    if not os.path.isdir(folder):
        return np.zeros(0, np.int64)
    ids = [int(name[:-4]) for name in os.listdir(folder) if name.endswith(".png") and name[:-4].isdigit()]
    return np.array(sorted(ids), np.int64)


def read_png(path, image_size=None):
    """uint8 (S, S, 3) pixels of a processed PNG; DataError naming the file and the fix if it is broken
    or (when image_size is given) not image_size wide."""
    try:
        with Image.open(path) as image:
            image = image.convert("RGB")   # decodes: a truncated file fails here
    except (OSError, SyntaxError, ValueError) as err:   # PIL's errors for broken PNG data
        processed_dir = os.path.dirname(os.path.dirname(os.path.abspath(path)))
        raise DataError(f"{path} cannot be read ({err}); re-run `python preprocess.py "
                        f"--processed_dir={processed_dir}`, which re-makes it from its JPEG") from None
    if image_size is not None and image.size != (image_size, image_size):
        raise DataError(f"{path} is {image.size[0]}x{image.size[1]}, not {image_size}x{image_size}; "
                        f"re-run `python preprocess.py --image_size={image_size}`")
    return np.asarray(image)


def png_stamp(folder):
    """A digest of each PNG's name, size, modification time and inode in folder: it changes when a
    PNG is added, removed, replaced or rewritten in place (the folder's own mtime misses the last).
    A stat per file (17 ms for 5,000 files here), against seconds to decode the PNGs again."""
    digest = hashlib.blake2b(digest_size=16)
    for entry in sorted(os.scandir(folder), key=lambda entry: entry.name):
        if entry.name.endswith(".png"):
            try:
                info = entry.stat()
            except OSError:   # gone meanwhile: its absence is a change too
                continue
            digest.update(f"{entry.name} {info.st_size} {info.st_mtime_ns} {info.st_ino}\n".encode())
    return digest.hexdigest()


def load_images(folder, galaxy_ids, image_size, workers=1):
    """uint8 tensor (N, 3, S, S) of folder/<id>.png for each id, decoded once and cached.

    The cache (folder/../<name>_images.pt) is reused while the folder's PNGs are unchanged
    (png_stamp): a PNG added, removed or rewritten, even in place, invalidates it.
    """
    galaxy_ids = np.asarray(galaxy_ids, np.int64)
    cache = os.path.join(os.path.dirname(os.path.abspath(folder)), f"{os.path.basename(folder)}_images.pt")
    stamp = png_stamp(folder)
    if os.path.isfile(cache):
        try:
            cached = torch.load(cache, weights_only=True)
            if cached["stamp"] == stamp and cached["images"].shape[-1] == image_size:
                if np.array_equal(cached["galaxy_ids"].numpy(), galaxy_ids):
                    return cached["images"]   # the usual case; indexing would copy the whole set
                index = {gid: i for i, gid in enumerate(cached["galaxy_ids"].tolist())}
                if all(gid in index for gid in galaxy_ids.tolist()):
                    return cached["images"][torch.as_tensor([index[g] for g in galaxy_ids.tolist()],
                                                            dtype=torch.long)]
        except Exception:
            pass  # a stale or damaged cache is simply rebuilt
    # filled in place in the model's (N, 3, S, S) layout: no second copy of the whole set (0.76 GB at Kaggle's size)
    images = np.empty((len(galaxy_ids), 3, image_size, image_size), np.uint8)
    paths = [os.path.join(folder, f"{gid}.png") for gid in galaxy_ids.tolist()]
    # PNG decoding releases the GIL, so threads are enough and start instantly
    with ThreadPoolExecutor(max(1, workers)) as pool:
        for i, pixels in enumerate(pool.map(read_png, paths, [image_size] * len(paths), chunksize=64)):
            images[i] = pixels.transpose(2, 0, 1)
    images = torch.from_numpy(images)   # shares the array: no copy
    payload = {"stamp": stamp, "galaxy_ids": torch.from_numpy(galaxy_ids), "images": images}
    try:
        remove_dead_temp_files(os.path.dirname(cache), os.path.basename(cache))   # a killed run's, up to GBs
        atomic_write(cache, lambda tmp: torch.save(payload, tmp))
    except (OSError, RuntimeError):   # torch.save reports an unwritable path as RuntimeError
        pass  # a read-only or full data folder still trains, just without the cache
    return images


def load_training_set(cfg):
    """(galaxy_ids, uint8 images (N, 3, S, S), vote_fractions (N, 37)) for every labelled PNG."""
    train_dir = os.path.join(cfg.processed_dir, "train")
    if not os.path.isdir(cfg.processed_dir) or not len(png_ids(train_dir)):
        raise DataError(f"no training PNGs in {train_dir}; run `python preprocess.py "
                        f"--raw_dir=... --processed_dir={cfg.processed_dir}` first (or use --demo)")
    label_ids, vote_fractions = read_labels(cfg.processed_dir)
    have_png = np.isin(label_ids, png_ids(train_dir))
    if not have_png.any():
        raise DataError(f"{cfg.processed_dir}/labels.csv matches no PNG in {train_dir}; "
                        f"re-run `python preprocess.py` so that both come from the same data")
    galaxy_ids, vote_fractions = label_ids[have_png], vote_fractions[have_png]
    images = load_images(train_dir, galaxy_ids, cfg.image_size, cfg.workers)
    return galaxy_ids, images, torch.from_numpy(vote_fractions)


# --- the split ---------------------------------------------------------------------

def make_split(galaxy_ids, seed, val_fraction, test_fraction):
    """{split: sorted ids}: a seeded permutation of the sorted ids, cut into train/val/test."""
    galaxy_ids = np.sort(np.asarray(galaxy_ids, np.int64))
    order = np.random.default_rng(seed).permutation(len(galaxy_ids))
    n_val = int(round(len(galaxy_ids) * val_fraction))
    n_test = int(round(len(galaxy_ids) * test_fraction))
    parts = {"val": order[:n_val], "test": order[n_val:n_val + n_test], "train": order[n_val + n_test:]}
    return {name: np.sort(galaxy_ids[part]) for name, part in parts.items()}


def save_split(split, path):
    rows = [(gid, name) for name in SPLITS for gid in split[name].tolist()]
    table = pd.DataFrame(rows, columns=["GalaxyID", "split"]).sort_values("GalaxyID")
    atomic_write(path, lambda tmp: table.to_csv(tmp, index=False))


def read_split(path):
    if not os.path.isfile(path):
        raise DataError(f"{path} not found; it is written by train.py next to its checkpoints")
    table = pd.read_csv(path)
    return {name: np.sort(table.loc[table["split"] == name, "GalaxyID"].to_numpy(np.int64)) for name in SPLITS}


def split_for_run(cfg, galaxy_ids, write=True):
    """The run's split: read from out_dir/split.csv when it exists (resume), else made (and
    saved when write; every process of a distributed run makes the same one)."""
    path = os.path.join(cfg.out_dir, "split.csv")
    if os.path.isfile(path):
        split = read_split(path)
        known = np.concatenate([split[name] for name in SPLITS])
        # both ways: a split galaxy without its PNG would make rows_of point at another galaxy
        if len(known) == len(galaxy_ids) and np.isin(galaxy_ids, known).all():
            return split
        raise DataError(f"{path} was made for other galaxies than the {len(galaxy_ids)} in {cfg.processed_dir}; "
                        f"use a new --out_dir or delete it")
    split = make_split(galaxy_ids, cfg.split_seed, cfg.val_fraction, cfg.test_fraction)
    if cfg.train_on_val:  # the val galaxies move to train; test stays the split the tuned runs were scored on
        split = {"train": np.union1d(split["train"], split["val"]), "val": split["val"][:0], "test": split["test"]}
    if write:
        os.makedirs(cfg.out_dir, exist_ok=True)
        save_split(split, path)
    return split


def rows_of(galaxy_ids, wanted):
    """Indices into galaxy_ids (sorted) of the wanted ids."""
    return torch.from_numpy(np.searchsorted(galaxy_ids, wanted)).long()


# --- augmentation on whole batches ---------------------------------------------------

def dihedral(images, index):
    """One of the 8 symmetries of the square (index 0..7); 0 is the identity."""
    if index & 4:
        images = images.transpose(-1, -2)
    if index & 2:
        images = images.flip(-2)
    if index & 1:
        images = images.flip(-1)
    return images


def random_dihedral(images, generator):
    """Each image gets its own random symmetry of the square: a transpose and two flips, each 50%."""
    n = images.shape[0]
    coins = torch.rand(n, 3, generator=generator, device=images.device) < 0.5
    transpose, flip_v, flip_h = (coins[:, i].view(n, 1, 1, 1) for i in range(3))
    images = torch.where(transpose, images.transpose(-1, -2), images)
    images = torch.where(flip_v, images.flip(-2), images)
    return torch.where(flip_h, images.flip(-1), images)


def random_affine(images, cfg, generator):
    """Small rotations, shifts and zooms in one resampling pass (bilinear, zero padding)."""
    n, device = images.shape[0], images.device

    def uniform(limit):
        return (torch.rand(n, generator=generator, device=device) * 2 - 1) * limit

    angle = uniform(math.radians(cfg.aug_rotate))
    scale = 1 + uniform(cfg.aug_zoom)        # > 1 zooms in
    shift_x, shift_y = uniform(2 * cfg.aug_shift), uniform(2 * cfg.aug_shift)  # grid units span 2
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift_x], 1), torch.stack([sin, cos, shift_y], 1)], 1)
    grid = F.affine_grid(theta.to(images.dtype), list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def augment(images, cfg, generator):
    """Augment a float batch (N, 3, S, S) in [0, 1]; the labels need no change for any of these."""
    if cfg.aug_flips:
        images = random_dihedral(images, generator)
    if cfg.aug_rotate or cfg.aug_shift or cfg.aug_zoom:
        images = random_affine(images, cfg, generator)
    if cfg.aug_brightness:
        n = images.shape[0]
        factor = 1 + (torch.rand(n, 1, 1, 1, generator=generator, device=images.device) * 2 - 1) * cfg.aug_brightness
        images = (images * factor.to(images.dtype)).clamp_(0, 1)
    return images
