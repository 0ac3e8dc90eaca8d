"""Predict Galaxy Zoo vote fractions with a trained checkpoint.

    python predict.py --checkpoint=runs/best.pt             # Kaggle's test set -> runs/submission.csv
    python predict.py --checkpoint=runs/best.pt --tta       # mean over the 8 rotations/flips
    python predict.py --checkpoint=runs/best.pt --split=test  # RMSE per question on the held-out split

Kaggle's test images come from processed_dir/test/*.png when preprocess.py has written them
with the checkpoint's crop settings, else straight from the raw JPEGs (zip or folder) in
raw_dir, cropped exactly as in training. Unreadable images are listed in submission_skipped.csv,
never fatal, and get the training split's mean vote fractions, as Kaggle wants a row for each.
"""
import os
import sys
import zipfile

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure  # no pyplot: files only, whatever the backend
from tqdm import tqdm

import preprocess
from config import get_config
from crop import BadImage, crop_galaxy
from dataset import (LABEL_COLUMNS, QUESTIONS, DataError, atomic_write, load_images, lock_folder, png_ids,
                     read_labels, read_png, read_split, writable_folder)
from model import (CheckpointError, choose_numerics, model_from_checkpoint, predict, read_checkpoint, resolve_device,
                   rmse)

# the config keys this script reads, with their meaning from config.py, are what --help lists
CONFIG_KEYS = ("checkpoint", "split", "tta", "raw_dir", "processed_dir", "out_dir", "demo", "demo_dir", "workers",
               "batch_size", "device", "amp", "channels_last")


# --- the metric per question ---------------------------------------------------------------

def question_rmse(predictions, targets):
    """{question number: RMSE over that question's answer columns}, for (N, 37) arrays."""
    squared_errors = (np.asarray(predictions, np.float64) - np.asarray(targets, np.float64)) ** 2
    return {q.number: float(np.sqrt(squared_errors[:, [LABEL_COLUMNS.index(c) for c in q.columns]].mean()))
            for q in QUESTIONS}


# --- where the images come from ----------------------------------------------------------------

def checkpoint_path(cfg):
    return cfg.checkpoint or os.path.join(cfg.out_dir, "best.pt")


def load_processed(task):
    """Pool worker: (galaxy_id, uint8 HWC pixels or None, why it was skipped)."""
    galaxy_id, path = task
    try:
        return galaxy_id, read_png(path, preprocess.worker_job["cfg"].image_size), ""
    except (OSError, SyntaxError, ValueError) as err:  # Pillow's ways of saying corrupt or truncated
        return galaxy_id, None, f"corrupt or truncated PNG: {err}"
    except Exception as err:  # one image must never end the run
        return galaxy_id, None, preprocess.unexpected_error(err)


def load_raw(task):
    """Pool worker: the galaxy cropped from its raw JPEG exactly as preprocess.py crops it."""
    galaxy_id, reference = task
    try:
        data = preprocess.read_raw(preprocess.worker_job["raw_dir"], reference)
        crop, _ = crop_galaxy(data, preprocess.worker_job["cfg"])
        return galaxy_id, np.asarray(crop, np.uint8), ""
    except BadImage as err:
        return galaxy_id, None, str(err)
    except (OSError, EOFError, zipfile.BadZipFile) as err:
        return galaxy_id, None, f"unreadable file: {err}"
    except Exception as err:  # one image must never end the run
        return galaxy_id, None, preprocess.unexpected_error(err)


def kaggle_test_images(cfg, model_cfg):
    """(tasks [(galaxy_id, path or reference)], worker, what they are) for Kaggle's test set."""
    png_dir = os.path.join(cfg.processed_dir, "test")
    galaxy_ids = png_ids(png_dir)
    mismatch = preprocess.crop_settings_mismatch(cfg.processed_dir, model_cfg) if len(galaxy_ids) else ""
    raw = preprocess.raw_images(cfg.raw_dir, "test")
    if len(galaxy_ids) and not mismatch:
        tasks = [(gid, os.path.join(png_dir, f"{gid}.png")) for gid in galaxy_ids.tolist()]
        unmade = len(set(raw) - set(galaxy_ids.tolist()))
        if unmade:  # e.g. an interrupted preprocess.py; Kaggle wants a row for every test galaxy
            print(f"warning: {unmade} test images in {cfg.raw_dir} have no PNG in {png_dir}; "
                  f"run `python preprocess.py` again to include them")
        return tasks, load_processed, f"processed PNGs in {png_dir}"
    if raw:
        why = f" (not the PNGs in {png_dir}: {mismatch})" if mismatch else ""
        return (sorted(raw.items()), load_raw,
                f"raw JPEGs in {cfg.raw_dir}, cropped with crop={model_cfg.crop}{why}")
    if mismatch:
        raise DataError(f"the PNGs in {png_dir} were cropped differently ({mismatch}); re-run "
                        f"`python preprocess.py` with the checkpoint's settings, or put the raw test images in "
                        f"{cfg.raw_dir}")
    raise DataError(f"no test images: put Kaggle's images_test_rev1.zip (or the folder images_test_rev1/) in "
                    f"{cfg.raw_dir}/, or run `python preprocess.py` to write {png_dir}/<GalaxyID>.png")


def preprocess_skipped(processed_dir):
    """[(galaxy_id, reason)] of the test images preprocess.py itself could not use."""
    path = os.path.join(processed_dir, "skipped.csv")
    if not os.path.isfile(path):
        return []
    table = pd.read_csv(path, dtype=str).fillna("")
    table = table[table["split"] == "test"]
    return list(zip(table["galaxy_id"], "preprocess.py: " + table["reason"]))


def inference_numerics(model, model_cfg, cfg):
    """(amp, channels_last) for predicting: --amp/--channels_last, or the fastest here (model.choose_numerics)."""
    device = next(model.parameters()).device
    return choose_numerics(cfg.amp, cfg.channels_last, model, device, cfg.batch_size, model_cfg.image_size,
                           training=False)


def predict_tasks(model, tasks, worker, model_cfg, cfg):
    """(galaxy_ids, predictions (N, 37), skipped [(galaxy_id, reason)]), decoding in a worker pool.

    Images are decoded by cfg.workers processes in order and fed to the model a batch at a time,
    so the whole test set never has to sit in memory at once.
    """
    galaxy_ids, predictions, skipped = [], [], []
    batch_ids, batch_pixels = [], []

    def flush():
        images = torch.from_numpy(np.stack(batch_pixels)).permute(0, 3, 1, 2).contiguous()
        predictions.append(predict(model, images, cfg.batch_size, *numerics, cfg.tta))
        galaxy_ids.extend(batch_ids)
        batch_ids.clear()
        batch_pixels.clear()

    numerics = inference_numerics(model, model_cfg, cfg)
    job = {"cfg": model_cfg, "raw_dir": cfg.raw_dir}
    results = preprocess.run_pool(worker, tasks, cfg.workers, job, "predict", ordered=True)
    for galaxy_id, pixels, reason in results:
        if pixels is None:
            skipped.append((galaxy_id, reason))
            continue
        batch_ids.append(galaxy_id)
        batch_pixels.append(pixels)
        if len(batch_ids) == cfg.batch_size:
            flush()
    if batch_ids:
        flush()
    if not galaxy_ids:
        return np.zeros(0, np.int64), np.zeros((0, len(LABEL_COLUMNS)), np.float32), skipped
    return np.array(galaxy_ids, np.int64), torch.cat(predictions).numpy(), skipped


def write_submission(path, galaxy_ids, predictions):
    """Kaggle's format: GalaxyID, Class1.1 ... Class11.6, one row per galaxy, sorted by ID."""
    table = pd.DataFrame(np.clip(predictions, 0, 1), columns=LABEL_COLUMNS)
    table.insert(0, "GalaxyID", galaxy_ids)
    table = table.sort_values("GalaxyID")
    atomic_write(path, lambda tmp: table.to_csv(tmp, index=False, float_format="%.6f"))


def fallback_prediction(checkpoint, processed_dir):
    """The vote fractions given to a test galaxy whose image cannot be read, or None.

    Kaggle scores only a file with a row for every test galaxy, and the best guess without an
    image is the mean of the training split, which the checkpoint carries (older checkpoints
    lack it: then the mean of labels.csv).
    """
    if checkpoint.get("train_mean") is not None:
        return np.asarray(checkpoint["train_mean"], np.float32)
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


def predict_kaggle(cfg, model, model_cfg, fallback):
    tasks, worker, source = kaggle_test_images(cfg, model_cfg)
    print(f"predicting {len(tasks)} test galaxies from {source}"
          f"{' with 8-fold TTA' if cfg.tta else ''}")
    galaxy_ids, predictions, skipped = predict_tasks(model, tasks, worker, model_cfg, cfg)
    if worker is load_processed:
        skipped = preprocess_skipped(cfg.processed_dir) + skipped
    if not len(galaxy_ids):
        raise DataError("no test image could be read; nothing to submit")
    galaxy_ids, predictions, filled = fill_skipped(galaxy_ids, predictions, skipped, fallback)
    os.makedirs(cfg.out_dir, exist_ok=True)
    report_skipped(skipped, filled, os.path.join(cfg.out_dir, "submission_skipped.csv"))
    path = os.path.join(cfg.out_dir, "submission.csv")
    write_submission(path, galaxy_ids, predictions)
    print(f"wrote {path}: {len(galaxy_ids)} galaxies x {len(LABEL_COLUMNS)} vote fractions")


# --- evaluation on the held-out split of the training data ----------------------------------------

def evaluation_table(predictions, targets, baseline):
    """Model and mean-prediction RMSE, overall and per question, as a DataFrame."""
    predictions, targets = np.asarray(predictions), np.asarray(targets)
    baseline_predictions = np.repeat(np.asarray(baseline)[None], len(targets), axis=0)
    model_rmse = question_rmse(predictions, targets)
    baseline_rmse = question_rmse(baseline_predictions, targets)
    rows = [{"question": "all", "text": "all 37 outputs",
             "model_rmse": rmse(torch.as_tensor(predictions), torch.as_tensor(targets)),
             "baseline_rmse": rmse(torch.as_tensor(baseline_predictions), torch.as_tensor(targets))}]
    rows += [{"question": f"Q{q.number}", "text": q.text, "model_rmse": model_rmse[q.number],
              "baseline_rmse": baseline_rmse[q.number]} for q in QUESTIONS]
    return pd.DataFrame(rows)


def plot_evaluation(table, path, title):
    """Horizontal bars, model beside the mean-prediction baseline, one pair per question."""
    labels = [f"{q}  {text}" if q != "all" else text for q, text in zip(table["question"], table["text"])]
    positions = np.arange(len(table))[::-1]  # the overall row on top, Q1 under it
    fig = Figure(figsize=(9, 7.5), layout="constrained")
    ax = fig.subplots()
    for offset, column, name, color in ((0.2, "model_rmse", "model", "tab:blue"),
                                        (-0.2, "baseline_rmse", "mean of the train split", "tab:gray")):
        ax.barh(positions + offset, table[column], height=0.4, label=name, color=color)
        for y, value in zip(positions + offset, table[column]):
            ax.text(value, y, f" {value:.3f}", va="center", fontsize=7)
    ax.set_yticks(positions, labels)
    ax.set_xlim(0, 1.12 * table[["model_rmse", "baseline_rmse"]].to_numpy().max())
    ax.set_xlabel("RMSE over the question's vote fractions")
    ax.set_title(title)
    ax.grid(axis="x", alpha=0.3)
    fig.legend(loc="outside lower center", ncols=2)
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))


def load_split_images(folder, galaxy_ids, image_size, cfg):
    """load_images, or a DataError naming the first PNG it cannot read (a truncated one, say)."""
    try:
        return load_images(folder, galaxy_ids, image_size, cfg.workers)
    except (OSError, SyntaxError, ValueError) as err:   # Pillow's ways of saying corrupt or truncated
        for gid in galaxy_ids.tolist():   # only on failure: find which one, to name it
            path = os.path.join(folder, f"{gid}.png")
            try:
                read_png(path, image_size)
            except (OSError, SyntaxError, ValueError):
                raise DataError(f"{path} is unreadable ({err}); re-run `python preprocess.py "
                                f"--processed_dir={cfg.processed_dir}` to redo it") from None
        raise


def evaluate_split(cfg, model, model_cfg, checkpoint):
    split_path = os.path.join(os.path.dirname(os.path.abspath(checkpoint)), "split.csv")
    split = read_split(split_path)
    galaxy_ids = split[cfg.split]
    if not len(galaxy_ids):
        raise DataError(f"{split_path} has no {cfg.split} galaxies (trained with {cfg.split}_fraction=0?)")
    mismatch = preprocess.crop_settings_mismatch(cfg.processed_dir, model_cfg)
    if mismatch:
        raise DataError(f"the PNGs in {cfg.processed_dir} were cropped differently ({mismatch}); re-run "
                        f"`python preprocess.py` with the checkpoint's settings")
    label_ids, vote_fractions = read_labels(cfg.processed_dir)
    row_of = {gid: row for row, gid in enumerate(label_ids.tolist())}
    missing = [gid for gid in galaxy_ids.tolist() + split["train"].tolist() if gid not in row_of]
    if missing:
        raise DataError(f"{len(missing)} galaxies of {split_path} (e.g. {missing[0]}) have no row in "
                        f"{cfg.processed_dir}/labels.csv; pass the --processed_dir the checkpoint was trained on")
    targets = vote_fractions[[row_of[gid] for gid in galaxy_ids.tolist()]]
    baseline = vote_fractions[[row_of[gid] for gid in split["train"].tolist()]].mean(0)

    images = load_split_images(os.path.join(cfg.processed_dir, "train"), galaxy_ids, model_cfg.image_size, cfg)
    with tqdm(total=len(images), unit="img", desc=f"predict {cfg.split}") as bar:
        predictions = predict(model, images, cfg.batch_size, *inference_numerics(model, model_cfg, cfg), cfg.tta,
                              progress=bar.update).numpy()

    table = evaluation_table(predictions, targets, baseline)
    print(f"{cfg.split} split: {len(galaxy_ids)} galaxies, checkpoint {checkpoint}"
          f"{', 8-fold TTA' if cfg.tta else ''}; baseline = mean vote fractions of the "
          f"{len(split['train'])} train galaxies")
    print(f"{'RMSE':<36}{'model':>8}{'baseline':>10}")
    for row in table.itertuples():
        label = row.text if row.question == "all" else f"{row.question:<4} {row.text}"
        print(f"{label:<36}{row.model_rmse:>8.4f}{row.baseline_rmse:>10.4f}")
    os.makedirs(cfg.out_dir, exist_ok=True)
    csv_path = os.path.join(cfg.out_dir, f"eval_{cfg.split}.csv")
    png_path = os.path.join(cfg.out_dir, f"eval_{cfg.split}.png")
    atomic_write(csv_path, lambda tmp: table.to_csv(tmp, index=False, float_format="%.6f"))
    plot_evaluation(table, png_path, f"{cfg.split} split: {len(galaxy_ids)} galaxies, "
                                     f"RMSE {table['model_rmse'][0]:.4f} (baseline {table['baseline_rmse'][0]:.4f})")
    print(f"wrote {csv_path} and {png_path}")


def main():
    cfg = get_config(doc=__doc__, keys=CONFIG_KEYS)
    checkpoint = checkpoint_path(cfg)
    try:
        writable_folder(cfg.out_dir, "out_dir")   # before the work, not after it
        # its own lock file: predict.py may evaluate best.pt while train.py (holding .lock) writes there
        lock = lock_folder(cfg.out_dir, "predict.py", ".predict.lock")  # held until the process exits
        saved = read_checkpoint(checkpoint)
        model, model_cfg = model_from_checkpoint(saved, checkpoint, resolve_device(cfg.device))
        if cfg.split == "kaggle":
            predict_kaggle(cfg, model, model_cfg, fallback_prediction(saved, cfg.processed_dir))
        else:
            evaluate_split(cfg, model, model_cfg, checkpoint)
    except (DataError, CheckpointError) as err:
        sys.exit(f"error: {err}")
    except KeyboardInterrupt:
        sys.exit("interrupted: nothing written")  # every output is written whole or not at all


if __name__ == "__main__":
    main()
