"""A user's own labelled galaxies, for fine-tuning the network on them: read from a folder of class
folders or from a CSV or parquet table (classes, or numbers to regress), split stratified by class
(out_dir/split.csv), and cropped as every other image is (galaxy/crop_cache.py). Their scores and the
zero-shot baseline live in galaxy/labelled_scores.py.

A bad row or file is skipped and listed as (row or file, reason); what leaves nothing to train on is
a DataError of one line that names the file and what to do.
"""
from collections import Counter
from dataclasses import dataclass, field
import math
import os

import numpy as np
import pandas as pd
import torch

from dataset import SPLITS
from galaxy.crop_cache import cropped_images
from galaxy.files import DataError, atomic_write, csv_writer, file_path, file_text

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".tif", ".tiff")   # compared in lower case
TABLE_EXTENSIONS = (".csv", ".parquet", ".pq")
MISSING = {"", "nan", "na", "n/a", "null", "none", "<na>", "nat"}   # a label cell that says nothing (lower case)
CACHE_FOLDER = "labelled_cache"    # under out_dir: the crops (galaxy/crop_cache.py)
LAYOUT = ("lay it out as <class>/<image>.jpg (one folder per class) or give a CSV with a file column "
          "(or id + images_dir) and a label column")


@dataclass
class LabelledSet:
    """The usable labelled images, sorted by id; ids, files and targets are aligned."""
    ids: list            # str, unique: the file's path relative to the set (or to the table), or the table's id
    files: list          # absolute paths
    task: str            # "classes" or "numbers"
    class_names: list    # classes: the class names, sorted; numbers: the label columns
    targets: np.ndarray  # classes: int64 index into class_names (N,); numbers: float32 (N, K)
    skipped: list = field(default_factory=list)   # (row or file, reason)
    source: str = ""     # the folder or table read

    def __len__(self):
        return len(self.ids)

    def summary(self):
        """e.g. '18 images in 3 classes (a 6, b 6, c 6), 2 skipped'."""
        if self.task == "classes":
            counts = np.bincount(self.targets, minlength=len(self.class_names))
            what = f"{len(self.class_names)} classes (" + ", ".join(
                f"{name} {n}" for name, n in zip(self.class_names, counts.tolist())) + ")"
        else:
            what = f"{len(self.class_names)} numbers ({', '.join(self.class_names)})"
        return f"{len(self)} images in {what}, {len(self.skipped)} skipped"


def is_image_name(name):
    return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")


def file_problem(path):
    """Why path cannot be an image ('' when it may be one); a stat, never an open (a FIFO would block)."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        return "file not found"
    except OSError as err:
        return f"cannot be read: {err.strerror}"
    if not os.path.isfile(path):
        return "not a regular file"
    return "empty file" if info.st_size == 0 else ""


# --- reading ------------------------------------------------------------------------------------

def read_labelled_set(path, images_dir="", file_column="file", id_column="id", label_columns=None):
    """The LabelledSet of a folder of class folders, or of a .csv / .parquet table.

    A table's rows name an image by file_column (a path relative to the table's folder) or by
    id_column (<id>.<any image extension> in images_dir: relative to the working folder or to the
    table's; the table's own folder by default). label_columns (a list, or a comma-separated text)
    picks the labels; by default the column "label", else the only other column, else every other
    column when all are numeric. One text column means classes, numeric columns mean numbers.
    """
    path = str(path)
    if os.path.isdir(path):
        source, rows, skipped = path, *_read_folder(path)
        task, columns = "classes", ["class"]
    elif os.path.isfile(path) and path.lower().endswith(TABLE_EXTENSIONS):
        source = path
        task, columns, rows, skipped = _read_table(path, images_dir, file_column, id_column, label_columns)
    elif os.path.exists(path):
        raise DataError(f"{file_text(path)} is neither a folder nor a .csv or .parquet table; {LAYOUT}")
    else:
        raise DataError(f"{file_text(path)} not found; {LAYOUT}")
    return _finish(source, task, columns, rows, skipped)


def _read_folder(root):
    """([(id, file, class, where)], skipped) of root/<class>/<image>; loose images and deeper folders listed."""
    rows, skipped, seen = [], [], {}
    for name in sorted(os.listdir(root)):
        folder = os.path.join(root, name)
        if name.startswith("."):
            continue
        if not os.path.isdir(folder):
            if is_image_name(name):   # a README beside the class folders is no data
                skipped.append((file_text(folder), "image outside any class folder: move it into one"))
            continue
        found = len(rows)
        for image in sorted(os.listdir(folder)):
            file = os.path.join(folder, image)
            if image.startswith("."):
                continue
            if os.path.isdir(file):
                reason = "folder inside a class folder: only images directly in a class folder are read"
            elif not is_image_name(image):
                reason = f"not an image file (the extensions read are {', '.join(IMAGE_EXTENSIONS)})"
            else:
                reason = file_problem(file) or _repeat(seen, f"{name}/{image}", file, file_text(file))
            if reason:
                skipped.append((file_text(file), reason))
            else:
                rows.append((f"{name}/{image}", os.path.abspath(file), name, file_text(file)))
        if len(rows) == found:
            skipped.append((file_text(folder), "class folder without images"))
    return rows, skipped


def _load_table(path):
    """The table as read: a CSV's cells as text (so that an id keeps its zeros), a parquet's as stored."""
    try:
        if path.lower().endswith(".csv"):
            table = pd.read_csv(path, dtype=str, keep_default_na=False, skipinitialspace=True)
        else:
            table = pd.read_parquet(path)
    except (OSError, ValueError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise DataError(f"cannot read {file_text(path)} ({first}); save it again as UTF-8 CSV or parquet") from None
    table.columns = [str(column).strip().lstrip("\ufeff") for column in table.columns]
    return table


def _text(value):
    """A cell as stripped text, '' for a missing one."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    text = str(value).strip()
    return "" if text.lower() in MISSING else text


def _is_numeric(column):
    """Whether a column holds numbers: stored as numbers, or text where most filled cells read as one."""
    if pd.api.types.is_bool_dtype(column):
        return False
    if pd.api.types.is_numeric_dtype(column):
        return True
    filled = [text for text in map(_text, column) if text]
    return bool(filled) and pd.to_numeric(pd.Series(filled), errors="coerce").notna().mean() > 0.5


def _choose_labels(path, table, keys, label_columns):
    """(task, label columns) of the table; DataError naming the columns found when none is usable."""
    found = ", ".join(table.columns)
    fix = "name the label column(s) with label_columns"
    candidates = [c for c in table.columns if c not in keys and c and not c.startswith("Unnamed:")]
    if label_columns:
        wanted = label_columns.split(",") if isinstance(label_columns, str) else list(label_columns)
        wanted = [c.strip() for c in wanted]
        missing = [c for c in wanted if c not in table.columns]
        if missing:
            raise DataError(f"{file_text(path)} has no column {', '.join(missing)} (its columns: {found}); {fix}")
    elif "label" in candidates:
        wanted = ["label"]
    elif len(candidates) == 1 or (candidates and all(_is_numeric(table[c]) for c in candidates)):
        wanted = candidates
    else:
        raise DataError(f"{file_text(path)} has no usable label column (its columns: {found}); add a 'label' "
                        f"column, or {fix}")
    numeric = [_is_numeric(table[c]) for c in wanted]
    if len(wanted) == 1 and not numeric[0]:
        return "classes", wanted
    if all(numeric):
        return "numbers", wanted
    raise DataError(f"{file_text(path)}: the label columns {', '.join(wanted)} mix text and numbers; classes "
                    f"take one text column, numbers only numeric ones; {fix}")


def _images_folder(images_dir, table_path):
    folder = os.path.dirname(os.path.abspath(table_path))
    if not images_dir:
        return folder
    for candidate in (images_dir, os.path.join(folder, images_dir)):
        if os.path.isdir(candidate):
            return os.path.abspath(candidate)
    raise DataError(f"images_dir {file_text(images_dir)} is not a folder (here or beside {file_text(table_path)}); "
                    f"point it at the folder of <id>.jpg images")


def _image_index(folder):
    """{id: [file names]} of folder's images, the id being the name without its image extension."""
    index = {}
    for name in sorted(os.listdir(folder)):
        if is_image_name(name):
            index.setdefault(os.path.splitext(name)[0], []).append(name)
    return index


def _row_labels(task, columns, table):
    """[(label, '') or (None, why the row is skipped)] for every row: a class name, or a tuple of numbers."""
    if task == "classes":
        return [(label, "") if label else (None, f"no label in column {columns[0]}")
                for label in map(_text, table[columns[0]])]
    texts = [[_text(cell) for cell in table[column]] for column in columns]
    numbers = [pd.to_numeric(pd.Series([t or None for t in column], dtype=object), errors="coerce").to_numpy(float)
               for column in texts]
    labels = []
    for row in range(len(table)):
        reason = next((f"{column} is {text[row]!r}, not a number" if text[row] else f"no value in column {column}"
                       for column, text, value in zip(columns, texts, numbers) if np.isnan(value[row])), "")
        reason = reason or next((f"{column} is {value[row]}, not a finite number"
                                 for column, value in zip(columns, numbers) if not np.isfinite(value[row])), "")
        labels.append((None, reason) if reason else (tuple(float(value[row]) for value in numbers), ""))
    return labels


def _image_of(name, folder, index):
    """(the file a row names, '') or ('', why not): name is a path in folder, or (with index) an id."""
    if index is None:
        return (file_path(name) if os.path.isabs(name) else os.path.join(folder, file_path(name))), ""
    if len(index.get(name, [])) == 1:
        return os.path.join(folder, index[name][0]), ""
    return "", (f"no image named {name}.jpg (or .png, .tif...) in {file_text(folder)}" if name not in index
                else f"several images named {name}: {', '.join(index[name])}")


def _read_table(path, images_dir, file_column, id_column, label_columns):
    """(task, label columns, [(id, file, label, where)], skipped) of a table's rows."""
    table = _load_table(path)
    if file_column in table.columns:
        key, folder, index = file_column, os.path.dirname(os.path.abspath(path)), None
    elif id_column in table.columns:
        key, folder = id_column, _images_folder(images_dir, path)
        index = _image_index(folder)
    else:
        raise DataError(f"{file_text(path)} has no {file_column!r} or {id_column!r} column (its columns: "
                        f"{', '.join(table.columns)}); add one that names each row's image")
    task, columns = _choose_labels(path, table, (file_column, id_column), label_columns)
    line = "line" if path.lower().endswith(".csv") else "row"
    first_line = 2 if line == "line" else 1   # a CSV's header is line 1
    rows, skipped, seen = [], [], {}
    for row, (cell, (label, reason)) in enumerate(zip(table[key], _row_labels(task, columns, table))):
        where, name, file = f"{file_text(path)} {line} {row + first_line}", _text(cell), ""
        if not name:
            reason = f"no {key}"
        if not reason:
            file, reason = _image_of(name, folder, index)
        if not reason and file_problem(file):
            reason = f"{file_problem(file)}: {file_text(file)}"
        if not reason:
            reason = _repeat(seen, name, file, where)
        if reason:
            skipped.append((where, reason))
        else:
            rows.append((name, os.path.abspath(file), label, where))
    return task, columns, rows, skipped


def _repeat(seen, name, file, where):
    """'repeats <where>' if an earlier row had this id or this file (seen records each), else ''."""
    real = os.path.realpath(file)
    if name in seen or real in seen:
        return f"repeats {seen[name]}" if name in seen else f"repeats {seen[real]} ({file_text(file)})"
    seen[name] = seen[real] = where
    return ""


def _finish(source, task, columns, rows, skipped):
    """The LabelledSet of rows [(id, file, label, where)], sorted by id, after the class rules:
    a class of a single image is skipped, fewer than 2 classes left is a DataError."""
    if not rows:
        first = f"; the first skipped: {skipped[0][0]}: {skipped[0][1]}" if skipped else ""
        raise DataError(f"{file_text(source)} holds no usable labelled image{first}; {LAYOUT}")
    if task == "classes":
        counts = Counter(row[2] for row in rows)
        if len(counts) < 2:
            raise DataError(f"{file_text(source)}: needs at least 2 classes, found only {next(iter(counts))!r} "
                            f"({len(rows)} images); label the images of at least one other class")
        single = sorted(name for name, n in counts.items() if n == 1)
        skipped = skipped + [(row[3], f"class {row[2]!r} has a single image; a class needs at least 2")
                             for row in rows if row[2] in single]
        rows = [row for row in rows if row[2] not in single]
        if len(counts) - len(single) < 2:
            raise DataError(f"{file_text(source)}: needs at least 2 classes with 2 or more images each; "
                            f"{', '.join(single)} have a single image")
        names = sorted(set(counts) - set(single))
        number = {name: i for i, name in enumerate(names)}
    rows = sorted(rows, key=lambda row: row[0])
    if task == "classes":
        targets = np.array([number[row[2]] for row in rows], np.int64)
    else:
        names, targets = list(columns), np.array([row[2] for row in rows], np.float32).reshape(len(rows), -1)
    return LabelledSet([row[0] for row in rows], [row[1] for row in rows], task, names, targets, skipped, source)


def labels_of(labelled):
    """Each image's label as _finish takes it: its class name, or its tuple of numbers."""
    if labelled.task == "classes":
        return [labelled.class_names[i] for i in labelled.targets.tolist()]
    return [tuple(row) for row in labelled.targets.tolist()]


# --- the split ----------------------------------------------------------------------------------

def _split_sizes(n, val_fraction, test_fraction):
    """(val, test) counts of a class of n: each at least 1 where n >= 3 and its fraction > 0; train keeps 1."""
    n_val, n_test = int(round(n * val_fraction)), int(round(n * test_fraction))
    if n >= 3:
        n_val, n_test = max(n_val, int(val_fraction > 0)), max(n_test, int(test_fraction > 0))
    while n_val + n_test > n - 1 and n_val + n_test:
        n_val, n_test = (n_val - 1, n_test) if n_val >= n_test else (n_val, n_test - 1)
    return n_val, n_test


def make_labelled_split(labelled, seed, val_fraction, test_fraction):
    """{split: sorted str ids}: each class cut on its own (stratified; numbers: one random cut), with a
    generator seeded by seed, so the same set and seed always give the same split."""
    ids = np.array(labelled.ids, dtype=str)
    strata = labelled.targets if labelled.task == "classes" else np.zeros(len(ids), np.int64)
    rng = np.random.default_rng(seed)
    parts = {name: [ids[:0]] for name in SPLITS}
    for stratum in np.unique(strata):
        members = np.sort(ids[strata == stratum])
        order = rng.permutation(len(members))
        n_val, n_test = _split_sizes(len(members), val_fraction, test_fraction)
        parts["val"].append(members[order[:n_val]])
        parts["test"].append(members[order[n_val:n_val + n_test]])
        parts["train"].append(members[order[n_val + n_test:]])
    return {name: np.sort(np.concatenate(parts[name])) for name in SPLITS}


def save_labelled_split(split, path):
    """split.csv with columns id, split (as dataset.save_split, keyed by the text ids)."""
    rows = [(image_id, name) for name in SPLITS for image_id in split[name].tolist()]
    atomic_write(path, csv_writer(pd.DataFrame(sorted(rows), columns=["id", "split"])))


def read_labelled_split(path):
    if not os.path.isfile(path):
        raise DataError(f"{path} not found; it is written by train.py next to its checkpoints")
    table = pd.read_csv(path, dtype=str, keep_default_na=False)
    if list(table.columns[:2]) != ["id", "split"]:
        raise DataError(f"{path} has no id and split columns (it may be a Galaxy Zoo run's); use a new --out_dir")
    ids = np.array([file_path(text) for text in table["id"]], dtype=str)
    return {name: np.sort(ids[(table["split"] == name).to_numpy()]) for name in SPLITS}


def labelled_split_for_run(cfg, labelled, write=True):
    """The run's split: out_dir/split.csv when it exists (resume) and names these images, else made
    (cfg.split_seed, val_fraction, test_fraction; train_on_val moves val into train) and saved."""
    path = os.path.join(cfg.out_dir, "split.csv")
    if os.path.isfile(path):
        split = read_labelled_split(path)
        if sorted(np.concatenate([split[name] for name in SPLITS]).tolist()) == sorted(labelled.ids):
            return split
        raise DataError(f"{path} was made for other images than the {len(labelled)} of {file_text(labelled.source)}; "
                        f"use a new --out_dir or delete it")
    split = make_labelled_split(labelled, cfg.split_seed, cfg.val_fraction, cfg.test_fraction)
    if cfg.train_on_val:
        split = {"train": np.union1d(split["train"], split["val"]), "val": split["val"][:0], "test": split["test"]}
    if write:
        os.makedirs(cfg.out_dir, exist_ok=True)
        save_labelled_split(split, path)
    return split


def class_weights(labelled):
    """float32 weight per class, n / (classes x its count): a loss weighted by them counts every class alike."""
    counts = np.bincount(labelled.targets, minlength=len(labelled.class_names)).astype(np.float64)
    return (len(labelled) / (len(counts) * np.maximum(counts, 1))).astype(np.float32)


# --- the images ---------------------------------------------------------------------------------

def crop_labelled_set(labelled, cfg, cache_dir, progress=True):
    """(the LabelledSet of the images that crop, uint8 tensor (N, 3, S, S) aligned with its ids).

    Every file is cut by crop_galaxy under cfg's crop settings, on cfg.workers processes, so that a
    Kaggle-framed cutout is cut as the network saw its training galaxies; the crops are cached in
    cache_dir (e.g. <out_dir>/labelled_cache) until a file or a crop setting changes. An image that
    cannot be read is skipped and listed, and the class rules apply again to what is left.
    """
    images, reasons = cropped_images(labelled.files, cfg, cache_dir, progress)
    kept = [i for i, reason in enumerate(reasons) if not reason]
    labels = labels_of(labelled)
    rows = [(labelled.ids[i], labelled.files[i], labels[i], file_text(labelled.files[i])) for i in kept]
    skipped = labelled.skipped + [(file_text(file), reason) for file, reason in zip(labelled.files, reasons) if reason]
    result = _finish(labelled.source, labelled.task, labelled.class_names, rows, skipped)
    if len(result) < len(kept):   # a class left with a single image went too
        position = {labelled.ids[i]: j for j, i in enumerate(kept)}
        images = images[[position[image_id] for image_id in result.ids]]
    return result, torch.from_numpy(images)
