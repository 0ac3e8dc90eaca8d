r"""Predict Galaxy Zoo vote fractions with one trained checkpoint or an ensemble of them.

    python predict.py --checkpoint=runs/best.pt             # Kaggle's test set -> runs/submission.csv
    python predict.py --checkpoint=runs/best.pt --tta       # mean over the 8 rotations/flips
    python predict.py --checkpoint=runs/best.pt --split=test  # RMSE per question on the held-out split
    python predict.py --checkpoint=runs/ens --tta           # every runs/ens/member_*/best.pt: mean and spread
    python predict.py --checkpoint=runs/best.pt --images=my_galaxies/   # any JPEGs/PNGs -> predictions.csv
    python predict.py --checkpoint=runs/best.pt --split=all --embed     # every galaxy's features, for --similar
    python predict.py --checkpoint=runs/best.pt --catalog=cat.parquet   # a survey table -> runs/predictions.parquet
    python predict.py --join='runs/predictions.shard*.parquet' --catalog=cat.parquet --output_file=runs/all.parquet
    python predict.py --checkpoint=runs/mine/best.pt --images=DIR   # trained on your labels: a column per class
    python predict.py --checkpoint=runs/mine/best.pt --split=test   # its scores on your test split

--catalog (docs/survey.md) predicts a CSV or parquet table of ids and images (JPEG, PNG, FITS) of any
length in flat memory, into --output_file keyed by id, a part every 10,000 rows: after a kill,
--resume goes on from the last part. --shard=K/N (or env) predicts part K of N into a file of its
own; --join joins those into one table, each id once.

--checkpoint takes a file, a run folder (its best.pt, or each member_*/best.pt), a glob, or a
comma-separated list of these. Several checkpoints are averaged (each over 8 views with --tta).
Beside the predictions, *_std.csv holds the calibrated standard deviation of each vote fraction
(galaxy/calibration.py: the spread over members x views, widened and floored to match the errors
on the val split), one checkpoint without TTA included. Its calibration.json lives beside best.pt,
in the member_* folder of an ensemble, or in out_dir for a list (--calibration=PATH overrides);
when it is missing or stale (other weights, members or --tta) the val split is predicted first
and it is fitted and saved (galaxy/uncertainty.py). Without a val split (--train_on_val: pass
--calibration=<a sibling run's calibration.json>), labels or images for it, the raw spread goes
to *_spread.csv instead, with one line saying why. calibration.json also holds interval_68 and
interval_95, per-question multiples of sigma whose prediction +- multiple * sigma holds 68% and
95% of the val errors. --split=test also writes calibration_test.csv and .png: the coverage of +-1
and +-2 sigma and of those intervals, overall and per question.

Each member sees the crop it was trained on: from processed_dir's PNGs when preprocess.py made
them with its settings, else cropped from the raw JPEGs (zip or folder) in raw_dir. Unreadable
images are listed in *_skipped.csv, never fatal; in Kaggle's submission they get the training
split's mean vote fractions, as Kaggle wants a row for each. With --images, every path the
folder or glob names is in predictions.csv or, with its reason, in predictions_skipped.csv (a
symlink loop, a dangling link, a FIFO or other special file, an unreadable image); folders and,
in a folder, hidden files are left out.

A run's files are one set, swapped in together once all are written: submission.csv with its
_std (or _spread) and _skipped files, predictions.csv with its own, eval_<split>.* with
spread_<split>.* and calibration_<split>.*. A file of the set that this run does not make (no
spread, nothing skipped) is removed, so nothing of an earlier run stays beside the new files. A
failed write changes nothing there and keeps the finished predictions in <name>_rescued.npz. A
member giving NaN or inf stops the run, named.

File names are written as they are, except that a control character (\r, \n, \t...) or a byte
that is not UTF-8 is written \xHH and a backslash \\: b"\xff\xfebad.jpg" reads \xff\xfebad.jpg.
galaxy.files.file_path(name) turns a name read back into the path (os.fsencode of it, the bytes).
"""
from contextlib import nullcontext
import errno
from functools import partial
import glob
import os
import sys

import numpy as np
import pandas as pd

from config import Config, get_config, script_keys
from dataset import LABEL_COLUMNS, DataError, read_labels, read_split, vote_summary
from galaxy import kaggle_raw
from galaxy.checkpoints import CheckpointError
from galaxy.ensemble import (crop_sources, describe_members, file_kind, galaxy_tasks, load_members, predict_ensemble,
                             resolve_checkpoints, save_embeddings)
from galaxy.evaluate import evaluate_split
from galaxy.files import csv_writer, file_text, lock_folder, writable_folder, write_file_set
from galaxy.survey import job_device, join_outputs, predict_catalog
from galaxy.task_eval import ensemble_task, evaluate_labelled, prediction_table
from galaxy.uncertainty import find_or_fit, uncertainty_files

# each output set, its main file first (galaxy.files.write_file_set)
SUBMISSION_FILES = ("submission.csv", "submission_std.csv", "submission_spread.csv", "submission_skipped.csv")
IMAGE_FILES = ("predictions.csv", "predictions_std.csv", "predictions_spread.csv", "predictions_skipped.csv")

# --- where the images come from ----------------------------------------------------------------

def preprocess_skipped(processed_dir):
    """[(galaxy_id, reason)] of the test images preprocess.py itself could not use."""
    path = os.path.join(processed_dir, "skipped.csv")
    if not os.path.isfile(path):
        return []
    table = pd.read_csv(path, dtype=str).fillna("")
    table = table[table["split"] == "test"]
    return list(zip(table["galaxy_id"], "preprocess.py: " + table["reason"]))


def write_set(out_dir, files, names, rescue, written):
    """write_file_set into out_dir, saying which files of an earlier run it removed; the paths written."""
    os.makedirs(out_dir, exist_ok=True)
    paths, removed = write_file_set(out_dir, files, names, rescue, written)
    for path in removed:
        print(f"removed {file_text(path)}: an earlier run's, it does not belong with these outputs")
    return paths


def submission_table(galaxy_ids, predictions):
    """Kaggle's format: GalaxyID, Class1.1 ... Class11.6, one row per galaxy, sorted by ID (also the
    format of submission_std.csv and submission_spread.csv)."""
    table = pd.DataFrame(np.clip(predictions, 0, 1), columns=LABEL_COLUMNS)
    table.insert(0, "GalaxyID", galaxy_ids)
    return table.sort_values("GalaxyID")


def fallback_prediction(train_mean, processed_dir):
    """The vote fractions given to a test galaxy whose image cannot be read, or None; train_mean is
    what the checkpoint carries (Member.train_mean).

    Kaggle scores only a file with a row for every test galaxy, and the best guess without an
    image is the mean of the training split, which the checkpoint carries (older checkpoints
    lack it: then the mean of labels.csv).
    """
    if train_mean is not None:
        return np.asarray(train_mean, np.float32)
    try:
        return read_labels(processed_dir)[1].mean(0)
    except DataError:
        return None


def fill_skipped(galaxy_ids, predictions, skipped, fallback):
    """Add a row of fallback vote fractions for each skipped galaxy with a GalaxyID; return the count."""
    missing = sorted({int(gid) for gid, _ in skipped if str(gid).isdigit()} - set(galaxy_ids.tolist()))
    if fallback is None or not missing:
        return galaxy_ids, predictions, 0
    filler = np.repeat(np.asarray(fallback, np.float32)[None], len(missing), axis=0)
    return np.concatenate([galaxy_ids, missing]), np.concatenate([predictions, filler]), len(missing)


def report_skipped(skipped, filled, path):
    """One line with the count and the first IDs; the full list is in path."""
    if not skipped:
        return
    first = ", ".join(file_text(gid) for gid, _ in skipped[:10]) + (", ..." if len(skipped) > 10 else "")
    fate = (f"{filled} of them get the training mean in the submission" if filled
            else "no row in the submission")
    print(f"skipped {len(skipped)} unreadable test images ({fate}): {first}; see {path}")


def mean_fallback(members, processed_dir):
    """The members' fallback_prediction averaged (None if none has one)."""
    fallbacks = [f for f in (fallback_prediction(m.train_mean, processed_dir) for m in members) if f is not None]
    return np.mean(fallbacks, axis=0) if fallbacks else None


def predict_kaggle(cfg, members, groups, written, uncertainty=None):
    tasks, pngs, raw = galaxy_tasks(cfg, "test")
    use_png, sources = crop_sources(cfg, groups, pngs, raw, "test")
    print(f"predicting {len(tasks)} test galaxies with {len(members)} checkpoint(s)"
          f"{', each with 8-fold TTA' if cfg.tta else ''}:")
    describe_members(members, sources)
    result = predict_ensemble(members, groups, tasks, cfg, use_png, embed=cfg.embed)
    # what preprocess.py skipped and nothing here could retry (no raw image) is reported as well
    task_ids = {gid for gid, _ in tasks}
    skipped = [row for row in preprocess_skipped(cfg.processed_dir)
               if not row[0].isdigit() or int(row[0]) not in task_ids]
    skipped += result.skipped
    if not result.names:
        raise DataError("no test image could be read; nothing to submit")
    predicted_ids = np.array(result.names, np.int64)
    galaxy_ids, predictions, filled = fill_skipped(predicted_ids, result.mean, skipped,
                                                   mean_fallback(members, cfg.processed_dir))
    main, std, spread, skips = SUBMISSION_FILES
    files = {main: csv_writer(submission_table(galaxy_ids, predictions), float_format="%.6f")}
    # the galaxies given the training mean have no sigma: no row there
    sigma_files, sigma_text = uncertainty_files(
        uncertainty, (std, spread), lambda values: csv_writer(submission_table(predicted_ids, values),
                                                                float_format="%.6f"), result)
    files.update(sigma_files)
    if skipped:
        files[skips] = csv_writer(pd.DataFrame([(gid if isinstance(gid, int) else file_text(gid), file_text(reason))
                                                for gid, reason in skipped], columns=["GalaxyID", "reason"]))
    rescue = {"GalaxyID": galaxy_ids, "mean": predictions, "std_GalaxyID": predicted_ids, "std": result.std}
    write_set(cfg.out_dir, files, SUBMISSION_FILES, rescue, written)
    path = os.path.join(cfg.out_dir, main)
    report_skipped(skipped, filled, os.path.join(cfg.out_dir, skips))
    print(f"wrote {path}: {len(galaxy_ids)} galaxies x {len(LABEL_COLUMNS)} vote fractions")
    print(f"wrote {os.path.join(cfg.out_dir, next(iter(sigma_files)))}: {sigma_text}" if sigma_files else sigma_text)
    if cfg.embed:
        save_embeddings(cfg.out_dir, result, ["kaggle_test"] * len(result.names), written)


# --- any image files --------------------------------------------------------------------------------

def unusable(path):
    """Why path is skipped ("" for a regular file or a link to one; None for a folder, left out).

    Checked with stat before anything opens it: a FIFO would block the reader until a writer came.
    """
    try:
        kind = file_kind(os.stat(path).st_mode)
    except OSError as err:
        if err.errno == errno.ELOOP:
            return "symlink loop"
        if os.path.islink(path) and err.errno in (errno.ENOENT, errno.ENOTDIR):
            try:
                return f"dangling link (to {file_text(os.readlink(path))}, which does not exist)"
            except OSError:
                return "dangling link"
        return f"cannot be read: {err.strerror}"
    if kind == "folder":
        return None
    return f"not a regular file ({kind})" if kind else ""


def image_files(spec):
    """(files, [(path, reason)]): every path named by --images (a folder's, not hidden ones; a glob's;
    or one file), sorted, each either a file to predict or skipped with its reason; folders are left out."""
    if os.path.isdir(spec):
        paths = [os.path.join(spec, name) for name in sorted(os.listdir(spec)) if not name.startswith(".")]
    elif any(char in spec for char in "*?["):
        paths = sorted(glob.glob(spec))
    else:
        paths = [spec] if os.path.lexists(spec) else []
    files, skipped = [], []
    for path in paths:
        reason = unusable(path)
        if reason:
            skipped.append((path, reason))
        elif reason is not None:
            files.append(path)
    if not files and not skipped:
        raise DataError(f"--images={file_text(spec)} names no file; pass a folder, a file or a quoted glob such as "
                        f"--images='galaxies/*.jpg'")
    return files, skipped


def image_table(names, values, summary):
    """file, the 37 columns (vote fractions or their spread), and with summary the answers in words."""
    table = pd.DataFrame(np.clip(values, 0, 1), columns=LABEL_COLUMNS)
    table.insert(0, "file", [file_text(name) for name in names])
    if summary:
        table["summary"] = [vote_summary(row) for row in values]
    return table


def predict_images(cfg, members, groups, written, uncertainty=None):
    """--images: predictions.csv (file, the 37 vote fractions, a summary in words), the spread and the skips."""
    files, special = image_files(cfg.images)
    task = ensemble_task(members)   # a network of a user's labels: a column per class (or number) and label
    image_table_ = partial(prediction_table, task) if task else image_table
    print(f"predicting {len(files)} files from {file_text(cfg.images)} with {len(members)} checkpoint(s)"
          f"{', each with 8-fold TTA' if cfg.tta else ''}")
    result = predict_ensemble(members, groups, [(path, {"file": path}) for path in files], cfg,
                              embed=cfg.embed, description="predict images")
    skipped = sorted(special + result.skipped)
    main, std, spread, skips = IMAGE_FILES
    outputs, sigma_text = {}, ""
    if result.names:
        outputs[main] = csv_writer(image_table_(result.names, result.mean, True), float_format="%.6f")
        sigma_files, sigma_text = uncertainty_files(
            uncertainty, (std, spread), lambda values: csv_writer(image_table_(result.names, values, False),
                                                                    float_format="%.6f"), result)
        outputs.update(sigma_files)
    if skipped:
        outputs[skips] = csv_writer(pd.DataFrame([(file_text(name), file_text(reason)) for name, reason in skipped],
                                                 columns=["file", "reason"]))
    rescue = {"name": np.array([file_text(name) for name in result.names], str), "mean": result.mean,
              "std": result.std, "skipped_name": np.array([file_text(name) for name, _ in skipped], str),
              "skipped_reason": np.array([file_text(reason) for _, reason in skipped], str)}
    write_set(cfg.out_dir, outputs, IMAGE_FILES, rescue, written)
    if skipped:
        path = os.path.join(cfg.out_dir, skips)
        print(f"skipped {len(skipped)} unusable files: {', '.join(file_text(name) for name, _ in skipped[:5])}"
              f"{', ...' if len(skipped) > 5 else ''}; see {path}")
        if not result.names:
            raise DataError(f"none of the {len(skipped)} files of --images={file_text(cfg.images)} could be used; "
                            f"the reasons are in {path}")
    print(f"wrote {os.path.join(cfg.out_dir, main)}: {len(result.names)} files")
    sigma_name = next((name for name in (std, spread) if name in outputs), None)
    print(f"wrote {os.path.join(cfg.out_dir, sigma_name)}: {sigma_text}" if sigma_name else sigma_text)
    if cfg.embed:
        save_embeddings(cfg.out_dir, result, ["file"] * len(result.names), written)


# --- every galaxy's embedding ---------------------------------------------------------------------

def embed_all(cfg, members, groups, written):
    """--split=all --embed: the features of every labelled galaxy (marked with its split in the first
    member's split.csv, "labelled" without one) and of Kaggle's test set; no predictions are written."""
    labelled_ids = read_labels(cfg.processed_dir)[0] if os.path.isfile(os.path.join(cfg.processed_dir, "labels.csv")) \
        else np.array(sorted(kaggle_raw.raw_images(cfg.raw_dir, "train")), np.int64)
    split_path = os.path.join(os.path.dirname(os.path.abspath(members[0].path)), "split.csv")
    split_of = ({gid: name for name, ids in read_split(split_path).items() for gid in ids.tolist()}
                if os.path.isfile(split_path) else {})
    tasks, pngs, raw = galaxy_tasks(cfg, "train", labelled_ids.tolist())
    use_png, sources = crop_sources(cfg, groups, pngs, raw, "train")
    test_tasks, test_pngs, test_raw = galaxy_tasks(cfg, "test")
    tasks += test_tasks
    print(f"embedding {len(labelled_ids)} labelled and {len(test_tasks)} Kaggle test galaxies with the first "
          f"checkpoint {members[0].path}{', averaged over 8 views' if cfg.tta else ''}")
    result = predict_ensemble(members[:1], groups[:1], tasks, cfg, use_png[:1], embed=True, description="embed")
    test_ids = {gid for gid, _ in test_tasks}
    sources = ["kaggle_test" if gid in test_ids else split_of.get(gid, "labelled") for gid in result.names]
    if result.skipped:
        print(f"skipped {len(result.skipped)} unreadable images, e.g. {result.skipped[0][0]}: {result.skipped[0][1]}")
    save_embeddings(cfg.out_dir, result, sources, written)


def written_note(written, message):
    """What a run that stopped early had already written whole (the paths the message does not name)."""
    others = [file_text(path) for path in written if file_text(path) not in message]
    return f" (written before it stopped: {', '.join(others)})" if others else ""


def catalog_keys_unread(cfg):
    """The --catalog keys set (away from their defaults) on a run that reads no catalog: an error, since
    they would silently do nothing (a --shard=3/8 job without --catalog would predict everything)."""
    unread = ("shard", "band_columns", "file_column") + (() if cfg.join else ("output_file", "id_column"))
    return [f"--{key}" for key in unread if getattr(cfg, key) != getattr(Config, key)]


def main():
    cfg = get_config(doc=__doc__, keys=script_keys("predict"))
    if hasattr(sys.stdout, "reconfigure"):   # a path that is not UTF-8 in a message must not end the run
        sys.stdout.reconfigure(errors="backslashreplace")
    written = []   # each output once it is whole: what an error or Ctrl-C leaves is said exactly
    try:
        unread = [] if cfg.catalog else catalog_keys_unread(cfg)
        if unread:
            one = len(unread) == 1
            raise DataError(f"{', '.join(unread)} {'acts' if one else 'act'} only with --catalog: add --catalog=<a "
                            f"CSV or parquet table of ids and images>, or leave {'it' if one else 'them'} out")
        if cfg.join:   # the --catalog shard outputs as one table: no checkpoint needed
            return join_outputs(cfg, written)
        writable_folder(cfg.out_dir, "out_dir")   # before the work, not after it
        # its own lock file: predict.py may evaluate best.pt while train.py (holding .lock) writes there;
        # a --catalog job locks its output instead, as N shard jobs share out_dir
        with nullcontext() if cfg.catalog else lock_folder(cfg.out_dir, "predict.py", ".predict.lock"):
            paths = resolve_checkpoints(cfg.checkpoint, cfg.out_dir)
            members, groups = load_members(paths, job_device(cfg))
            # the calibrated sigma: found, or fitted on the val split first (galaxy/uncertainty.py)
            task = ensemble_task(members)   # trained on a user's labels (galaxy/tasks.py): no calibration
            uncertainty = (find_or_fit(cfg, members, groups, written) if (cfg.images or cfg.split != "all")
                           and not task else None)
            if cfg.catalog and task:
                raise DataError("--catalog writes Galaxy Zoo's 37 vote fractions; for a network of your labels "
                                "pass --images=<folder or glob>")
            if cfg.catalog:
                predict_catalog(cfg, members, groups, written, uncertainty)
            elif cfg.images:
                predict_images(cfg, members, groups, written, uncertainty)
            elif task:   # --split=test|val (or all with --embed) of the user's set; kaggle is a one-line error
                evaluate_labelled(cfg, members, task, written)
            elif cfg.split == "kaggle":
                predict_kaggle(cfg, members, groups, written, uncertainty)
            elif cfg.split == "all":
                embed_all(cfg, members, groups, written)
            else:
                evaluate_split(cfg, members, groups, written, uncertainty)
    except (DataError, CheckpointError) as err:
        sys.exit(f"error: {err}{written_note(written, str(err))}")
    except KeyboardInterrupt:   # every output set is swapped in whole or not at all: written says which
        sys.exit(f"interrupted after writing {', '.join(file_text(path) for path in written)}; nothing else written"
                 if written else "interrupted: nothing written")


if __name__ == "__main__":
    main()
