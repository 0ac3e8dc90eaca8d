"""Predict Galaxy Zoo vote fractions with one trained checkpoint or an ensemble of them.

    python predict.py --checkpoint=runs/best.pt             # Kaggle's test set -> runs/submission.csv
    python predict.py --checkpoint=runs/best.pt --tta       # mean over the 8 rotations/flips
    python predict.py --checkpoint=runs/best.pt --split=test  # RMSE per question on the held-out split
    python predict.py --checkpoint=runs/ens --tta           # every runs/ens/member_*/best.pt: mean and spread
    python predict.py --checkpoint=runs/best.pt --images=my_galaxies/   # any JPEGs/PNGs -> predictions.csv
    python predict.py --checkpoint=runs/best.pt --split=all --embed     # every galaxy's features, for --similar

--checkpoint takes a file, a run folder (its best.pt, or each member_*/best.pt), a glob, or a
comma-separated list of these. Several checkpoints are averaged (each over 8 views with --tta);
their spread, the standard deviation over members x views, goes to *_std.csv beside the
predictions. Each member sees the crop it was trained on: from processed_dir's PNGs when
preprocess.py made them with its settings, else cropped from the raw JPEGs (zip or folder) in
raw_dir. Unreadable images are listed in *_skipped.csv, never fatal; in Kaggle's submission
they get the training split's mean vote fractions, as Kaggle wants a row for each.
"""
import glob
import os
import sys

import numpy as np
import pandas as pd

from config import get_config, script_keys
from dataset import LABEL_COLUMNS, DataError, read_labels, read_split, vote_summary
from galaxy import kaggle_raw
from galaxy.checkpoints import CheckpointError
from galaxy.ensemble import (crop_sources, describe_members, galaxy_tasks, load_members, predict_ensemble,
                             resolve_checkpoints)
from galaxy.evaluate import evaluate_split
from galaxy.files import atomic_write, lock_folder, writable_folder
from galaxy.numerics import resolve_device
from galaxy.similar import write_embeddings

# --- where the images come from ----------------------------------------------------------------

def preprocess_skipped(processed_dir):
    """[(galaxy_id, reason)] of the test images preprocess.py itself could not use."""
    path = os.path.join(processed_dir, "skipped.csv")
    if not os.path.isfile(path):
        return []
    table = pd.read_csv(path, dtype=str).fillna("")
    table = table[table["split"] == "test"]
    return list(zip(table["galaxy_id"], "preprocess.py: " + table["reason"]))


def write_submission(path, galaxy_ids, predictions):
    """Kaggle's format: GalaxyID, Class1.1 ... Class11.6, one row per galaxy, sorted by ID (also the
    format of submission_std.csv, the spread)."""
    table = pd.DataFrame(np.clip(predictions, 0, 1), columns=LABEL_COLUMNS)
    table.insert(0, "GalaxyID", galaxy_ids)
    table = table.sort_values("GalaxyID")
    atomic_write(path, lambda tmp: table.to_csv(tmp, index=False, float_format="%.6f"))


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
    """One line with the count and the first IDs; the full list goes to path."""
    if not skipped:
        return
    table = pd.DataFrame(skipped, columns=["GalaxyID", "reason"])
    atomic_write(path, lambda tmp: table.to_csv(tmp, index=False))
    first = ", ".join(str(gid) for gid, _ in skipped[:10]) + (", ..." if len(skipped) > 10 else "")
    fate = (f"{filled} of them get the training mean in the submission" if filled
            else "no row in the submission")
    print(f"skipped {len(skipped)} unreadable test images ({fate}): {first}; see {path}")


def mean_fallback(members, processed_dir):
    """The members' fallback_prediction averaged (None if none has one)."""
    fallbacks = [f for f in (fallback_prediction(m.train_mean, processed_dir) for m in members) if f is not None]
    return np.mean(fallbacks, axis=0) if fallbacks else None


def predict_kaggle(cfg, members, groups):
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
    os.makedirs(cfg.out_dir, exist_ok=True)
    report_skipped(skipped, filled, os.path.join(cfg.out_dir, "submission_skipped.csv"))
    path = os.path.join(cfg.out_dir, "submission.csv")
    write_submission(path, galaxy_ids, predictions)
    print(f"wrote {path}: {len(galaxy_ids)} galaxies x {len(LABEL_COLUMNS)} vote fractions")
    if result.views > 1:   # the galaxies given the training mean have no spread: no row there
        std_path = os.path.join(cfg.out_dir, "submission_std.csv")
        write_submission(std_path, predicted_ids, result.std)
        print(f"wrote {std_path}: the spread over {result.views} members x views")
    if cfg.embed:
        write_embeddings(cfg.out_dir, result.names, ["kaggle_test"] * len(result.names), result.features)


# --- any image files --------------------------------------------------------------------------------

def image_files(spec):
    """The sorted files named by --images: a folder's files (not hidden ones), a glob's, or one file."""
    if os.path.isdir(spec):
        files = [os.path.join(spec, name) for name in sorted(os.listdir(spec)) if not name.startswith(".")]
    elif any(char in spec for char in "*?["):
        files = sorted(glob.glob(spec))
    else:
        files = [spec] if os.path.exists(spec) else []
    files = [path for path in files if os.path.isfile(path)]
    if not files:
        raise DataError(f"--images={spec} names no file; pass a folder, a file or a quoted glob such as "
                        f"--images='galaxies/*.jpg'")
    return files


def predict_images(cfg, members, groups):
    """--images: predictions.csv (file, the 37 vote fractions, a summary in words), the spread and the skips."""
    files = image_files(cfg.images)
    print(f"predicting {len(files)} files from {cfg.images} with {len(members)} checkpoint(s)"
          f"{', each with 8-fold TTA' if cfg.tta else ''}")
    result = predict_ensemble(members, groups, [(path, {"file": path}) for path in files], cfg,
                              embed=cfg.embed, description="predict images")
    os.makedirs(cfg.out_dir, exist_ok=True)
    if result.skipped:
        path = os.path.join(cfg.out_dir, "predictions_skipped.csv")
        table = pd.DataFrame(result.skipped, columns=["file", "reason"])
        atomic_write(path, lambda tmp: table.to_csv(tmp, index=False))
        print(f"skipped {len(result.skipped)} unusable files: {', '.join(name for name, _ in result.skipped[:5])}"
              f"{', ...' if len(result.skipped) > 5 else ''}; see {path}")
        if not result.names:
            raise DataError(f"none of the {len(files)} files of --images={cfg.images} could be used; "
                            f"the reasons are in {path}")
    for name, values, with_summary in (("predictions.csv", result.mean, True),
                                       ("predictions_std.csv", result.std, False)):
        if not with_summary and result.views == 1:
            continue   # one member without TTA: no spread to write
        table = pd.DataFrame(np.clip(values, 0, 1), columns=LABEL_COLUMNS)
        table.insert(0, "file", result.names)
        if with_summary:
            table["summary"] = [vote_summary(row) for row in result.mean]
        path = os.path.join(cfg.out_dir, name)
        atomic_write(path, lambda tmp: table.to_csv(tmp, index=False, float_format="%.6f"))
        print(f"wrote {path}: {len(table)} files")
    if cfg.embed:
        write_embeddings(cfg.out_dir, result.names, ["file"] * len(result.names), result.features)


# --- every galaxy's embedding ---------------------------------------------------------------------

def embed_all(cfg, members, groups):
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
    write_embeddings(cfg.out_dir, result.names, sources, result.features)


def main():
    cfg = get_config(doc=__doc__, keys=script_keys("predict"))
    try:
        writable_folder(cfg.out_dir, "out_dir")   # before the work, not after it
        # its own lock file: predict.py may evaluate best.pt while train.py (holding .lock) writes there
        with lock_folder(cfg.out_dir, "predict.py", ".predict.lock"):
            paths = resolve_checkpoints(cfg.checkpoint, cfg.out_dir)
            members, groups = load_members(paths, resolve_device(cfg.device))
            if cfg.images:
                predict_images(cfg, members, groups)
            elif cfg.split == "kaggle":
                predict_kaggle(cfg, members, groups)
            elif cfg.split == "all":
                embed_all(cfg, members, groups)
            else:
                evaluate_split(cfg, members, groups)
    except (DataError, CheckpointError) as err:
        sys.exit(f"error: {err}")
    except KeyboardInterrupt:
        sys.exit("interrupted: nothing written")  # every output is written whole or not at all


if __name__ == "__main__":
    main()
