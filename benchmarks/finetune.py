"""python bench.py finetune: how many labels a user's own task needs. Accuracy and balanced accuracy on
one fixed test split of a labelled set of five classes (../shared/data/galaxy-classes-sample), training
on 100, 300, 1,000 and all of its training labels, fine-tuned from a Galaxy Zoo checkpoint against the
same network from scratch, two seeds each; and the zero-shot rule (the Galaxy Zoo network's 37 vote
fractions read as the five classes, galaxy/labelled_scores.zero_shot_classes) on the same test split.

    python bench.py finetune                                    # -> runs/finetune/finetune.csv and .png
    python bench.py finetune --init_from=runs/best.pt           # start from this Galaxy Zoo checkpoint
    python bench.py finetune --epochs=1 --out_dir=runs/finetune_smoke   # a quick check of the whole table

The split: split_seed (1337) cuts the set into val (0.1) and test (0.2), stratified by class, the same
for every point. A point of N labels trains on N of the remaining training images, drawn per class in
proportion to its size with the point's seed; every point chooses best.pt on the whole val split (by
balanced accuracy, with cross-entropy weighted by class). Each point is a train.py run of its own
(out_dir/finetune/<point>/, train.log) on a CSV of its images, its split.csv written beforehand; its
test scores are train.py's eval_test.csv. Without --init_from, the Galaxy Zoo checkpoint is trained
first with recipes/flips_40.py's settings on the sample in raw_dir (out_dir/finetune/galaxy_zoo).
Every point trains with that recipe's augmentation, dropout and lr, whatever config.py's defaults, and
a scratch point cuts its images with the checkpoint's crop keys. finetune.csv is
rewritten as each point ends, and a rerun skips the points in it (a half-trained one resumes).
Overrides (--lr, --threads, --max_steps ...) apply to every point; --epochs replaces the plan's.
"""
from dataclasses import replace
from datetime import date
from pathlib import Path
import time

from matplotlib.figure import Figure  # no pyplot: files only, whatever the backend
import numpy as np
import pandas as pd
import torch

from benchmarks.accuracy import run_logged
from benchmarks.common import REPO, machine_name
from config import build_config
from dataset import SPLITS
from galaxy.checkpoints import CheckpointError, load_model, read_checkpoint
from galaxy.crop import CROP_KEYS
from galaxy.files import DataError, atomic_write, csv_writer
from galaxy.inference import predict
from galaxy.labelled import (crop_labelled_set, labels_of, make_labelled_split, read_labelled_set,
                             save_labelled_split)
from galaxy.labelled_scores import ZERO_SHOT_COLUMNS, classification_metrics, zero_shot_classes
from galaxy.preprocessing import preprocess
from galaxy.recipes import as_args, member_settings

CLASSES_SAMPLE = REPO.parent / "shared/data/galaxy-classes-sample"
VAL, TEST = 0.1, 0.2
SIZES = (100, 300, 1000, "all")
SEEDS = (1, 2)
# epochs per point, the same for both starts: a small set takes more passes (100 labels: 300 steps), a large
# one fewer (all: 1,740 steps). Scratch needs them: with 6 epochs on all labels it scored 0.72, with 20 0.89
# (benchmarks/ACCURACY.md); fine-tuning had converged at 6
EPOCHS = {100: 100, 300: 50, 1000: 30, "all": 20}
BATCH = 32   # 100 labels give 3 steps an epoch
# what the table trains, read from recipes/flips_40.py so that it does not move with config.py's defaults:
# the Galaxy Zoo checkpoint made when no --init_from is given, and every point's augmentation, dropout
# and lr (a point keeps its own epochs; a scratch point cuts its images as the checkpoint's network did)
INIT_SETTINGS = member_settings("flips_40")
POINT_SETTINGS = {key: INIT_SETTINGS[key] for key in ("aug_rotate", "aug_zoom", "aug_shift", "dropout", "lr")}
# fixed by the benchmark, never passed on to train.py
NOT_PASSED = ("raw_dir", "processed_dir", "out_dir", "labels", "init_from", "seed", "split_seed", "val_fraction",
              "test_fraction", "train_on_val", "members", "members_at_once", "resume", "recipe", "epochs", "scale",
              "demo", "demo_dir", "demo_train", "demo_test", "ids", "batch_size")


def draw_subset(labelled, train_ids, n, seed):
    """n of train_ids, drawn per class in proportion to its share (largest remainders, at least one each)."""
    if n == "all" or n >= len(train_ids):
        return np.sort(train_ids)
    class_of = dict(zip(labelled.ids, labelled.targets.tolist()))
    by_class = [np.sort([i for i in train_ids if class_of[i] == k]) for k in range(len(labelled.class_names))]
    quota = np.array([len(ids) for ids in by_class]) * n / len(train_ids)
    counts = np.maximum(np.floor(quota).astype(int), 1)
    for k in np.argsort(-(quota - np.floor(quota)), kind="stable")[:max(0, n - counts.sum())]:
        counts[k] += 1
    rng = np.random.default_rng(seed)
    return np.sort(np.concatenate([ids[rng.permutation(len(ids))[:count]] for ids, count in zip(by_class, counts)]))


def galaxy_zoo_checkpoint(cfg, overrides, results):
    """--init_from, or recipes/flips_40.py's model trained on the sample in raw_dir (resumed if half done)."""
    if cfg.init_from:
        return Path(cfg.init_from)
    data, run = results / "galaxy_zoo_data", results / "galaxy_zoo"
    if not (data / "labels.csv").is_file():
        print(f"preprocessing {cfg.raw_dir} into {data} for the Galaxy Zoo checkpoint ...", flush=True)
        preprocess(build_config({**INIT_SETTINGS, "raw_dir": cfg.raw_dir, "processed_dir": str(data)}),
                   progress=False)
    args = [f"--processed_dir={data}", f"--out_dir={run}", *(["--resume"] if (run / "last.pt").is_file() else [])]
    args += as_args({**INIT_SETTINGS, **{key: overrides[key] for key in ("threads", "max_steps", "epochs")
                                         if key in overrides}})
    print(f"training the Galaxy Zoo checkpoint (recipes/flips_40.py) -> {run} (log: {run}/train.log) ...",
          flush=True)
    if run_logged("train.py", args, run / "train.log"):
        raise DataError(f"the Galaxy Zoo run in {run} failed; see {run}/train.log")
    return run / "best.pt"


def init_crop(init):
    """The crop keys of the checkpoint the fine-tuned points start from: scratch points cut their images
    the same way, so that both starts see the same pixels."""
    saved = read_checkpoint(str(init)).get("config") or {}
    return {key: saved[key] for key in CROP_KEYS if key in saved}


def run_point(name, n, seed, init, labelled, split, cfg, passed, results, crop):
    """One train.py run: the point's CSV and split.csv, then train.py; its row of finetune.csv."""
    folder = results / name
    folder.mkdir(parents=True, exist_ok=True)
    train_ids = draw_subset(labelled, split["train"], n, seed)
    # the CSV names each image by its absolute path, which is then its id in the point's split.csv
    file, label = dict(zip(labelled.ids, labelled.files)), dict(zip(labelled.ids, labels_of(labelled)))
    parts = {"train": train_ids, "val": split["val"], "test": split["test"]}
    ids = np.concatenate(list(parts.values()))
    atomic_write(folder / "labels.csv", csv_writer(pd.DataFrame({"file": [file[i] for i in ids],
                                                                 "label": [label[i] for i in ids]})))
    save_labelled_split({name: np.sort([file[i] for i in part]) for name, part in parts.items()},
                        folder / "split.csv")
    epochs = cfg.epochs if "epochs" in passed else EPOCHS[n]
    args = [f"--labels={folder / 'labels.csv'}", f"--out_dir={folder}", f"--seed={seed}", f"--epochs={epochs}",
            f"--batch_size={BATCH}", f"--val_fraction={VAL}", f"--test_fraction={TEST}",
            *as_args({**POINT_SETTINGS, **({} if init else crop),
                      **{key: value for key, value in passed.items() if key != "epochs"}})]
    if (folder / "last.pt").is_file():
        args.append("--resume")
    elif init:
        args.append(f"--init_from={init}")
    started = time.perf_counter()
    if run_logged("train.py", args, folder / "train.log"):
        raise DataError(f"train.py failed for {name}; see {folder}/train.log")
    scores = dict(pd.read_csv(folder / "eval_test.csv").values)
    metrics = pd.read_csv(folder / "metrics.csv")
    return {"point": name, "init": "fine-tuned" if init else "scratch", "labels": len(train_ids), "seed": seed,
            "epochs": epochs, "accuracy": round(scores["accuracy"], 4),
            "balanced_accuracy": round(scores["balanced_accuracy"], 4),
            "best_epoch": int(metrics["val_balanced_accuracy"].idxmax()) + 1,
            "minutes": round((time.perf_counter() - started) / 60, 1)}


def zero_shot(labelled, split, checkpoint, results):
    """The Galaxy Zoo network's vote fractions read as the five classes, on the test split: its row."""
    if set(labelled.class_names) != set(ZERO_SHOT_COLUMNS):
        print(f"zero-shot: skipped, it knows only the classes {', '.join(sorted(ZERO_SHOT_COLUMNS))}")
        return None
    model, model_cfg = load_model(str(checkpoint))
    test = set(split["test"].tolist())
    rows = [row for row, image_id in enumerate(labelled.ids) if image_id in test]
    subset = replace(labelled, ids=[labelled.ids[r] for r in rows], files=[labelled.files[r] for r in rows],
                     targets=labelled.targets[rows], skipped=[])
    kept, images = crop_labelled_set(subset, build_config({**model_cfg.to_dict(), "workers": 2}),
                                     results / "zero_shot_cache", progress=False)
    _, predicted = zero_shot_classes(predict(model, images, 256).numpy(), kept.class_names)
    scores = classification_metrics(kept.targets, predicted, kept.class_names)
    return {"point": "zero_shot", "init": "zero-shot", "labels": 0, "seed": "", "epochs": 0,
            "accuracy": round(scores["accuracy"], 4), "balanced_accuracy": round(scores["balanced_accuracy"], 4),
            "best_epoch": "", "minutes": ""}


def summary(rows):
    """Mean (and each seed's) accuracy and balanced accuracy per (init, labels), as a DataFrame."""
    table = pd.DataFrame(rows)
    grouped = table.groupby(["init", "labels"], sort=False)
    return grouped.agg(runs=("accuracy", "size"), accuracy=("accuracy", "mean"),
                       balanced_accuracy=("balanced_accuracy", "mean"),
                       accuracy_each=("accuracy", lambda values: " ".join(f"{v:.3f}" for v in values)),
                       balanced_each=("balanced_accuracy", lambda values: " ".join(f"{v:.3f}" for v in values))
                       ).reset_index()


def draw_figure(rows, path, title):
    """Accuracy and balanced accuracy against the number of training labels: fine-tuned and scratch
    (each seed a dot, their mean a line) and zero-shot as a horizontal line."""
    table = pd.DataFrame(rows)
    fig = Figure(figsize=(11, 4.5), layout="constrained")
    for ax, metric in zip(fig.subplots(1, 2), ("accuracy", "balanced_accuracy")):
        for init, color in (("fine-tuned", "tab:blue"), ("scratch", "tab:orange")):
            part = table[table["init"] == init]
            if part.empty:
                continue
            means = part.groupby("labels")[metric].mean()
            ax.plot(means.index, means.values, "o-", color=color, label=f"{init} (mean of seeds)")
            ax.plot(part["labels"], part[metric], ".", color=color, alpha=0.5)
        shot = table[table["init"] == "zero-shot"]
        if not shot.empty:
            ax.axhline(shot[metric].iloc[0], color="gray", ls="--", label="zero-shot (Galaxy Zoo votes)")
        ax.set_xscale("log")
        sizes = sorted(set(table.loc[table["init"] != "zero-shot", "labels"]))
        ax.set_xticks(sizes, [f"{n:,}" for n in sizes])
        ax.minorticks_off()
        ax.set_xlabel("training labels")
        ax.set_ylabel(f"test {metric.replace('_', ' ')}")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8, loc="lower right")
    fig.suptitle(title, fontsize=10)
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))


def run_finetune(cfg, overrides):
    """Every point not yet in out_dir/finetune/finetune.csv, the zero-shot row, the summary and the figure."""
    results = Path(cfg.out_dir) / "finetune"
    results.mkdir(parents=True, exist_ok=True)
    csv_path = results / "finetune.csv"
    passed = {key: value for key, value in overrides.items() if key not in NOT_PASSED or key == "epochs"}
    labelled = read_labelled_set(cfg.labels or CLASSES_SAMPLE)
    split = make_labelled_split(labelled, cfg.split_seed, VAL, TEST)
    counts = {name: len(split[name]) for name in SPLITS}
    print(f"{labelled.source}: {labelled.summary()}; split_seed {cfg.split_seed}: {counts}", flush=True)
    init = galaxy_zoo_checkpoint(cfg, overrides, results)
    crop = init_crop(init)
    done = pd.read_csv(csv_path, keep_default_na=False).to_dict("records") if csv_path.is_file() else []
    finished = {row["point"] for row in done}
    stamp = {"date": date.today().isoformat(), "machine": machine_name(torch.device("cpu")),
             "torch": torch.__version__, "init_checkpoint": str(init)}
    points = [(n, seed, start) for n in SIZES for seed in SEEDS for start in (init, None)]
    for number, (n, seed, start) in enumerate(points, 1):
        name = f"{'finetuned' if start else 'scratch'}_{n}_seed{seed}"
        where = f"[{number}/{len(points)}] {name}"
        if name in finished:
            print(f"{where}: in {csv_path}, skipped", flush=True)
            continue
        print(f"{where}: training ...", flush=True)
        try:
            row = run_point(name, n, seed, start, labelled, split, cfg, passed, results, crop)
        except (DataError, CheckpointError, ValueError, OSError) as err:
            print(f"{where}: failed: {err}", flush=True)
            continue
        print(f"{where}: test accuracy {row['accuracy']:.4f}, balanced accuracy {row['balanced_accuracy']:.4f} "
              f"({row['labels']} labels, {row['minutes']} min)", flush=True)
        done.append({**row, **stamp})
        atomic_write(csv_path, csv_writer(pd.DataFrame(done)))
    if "zero_shot" not in {row["point"] for row in done}:
        row = zero_shot(labelled, split, init, results)
        if row:
            done.append({**row, **stamp})
            atomic_write(csv_path, csv_writer(pd.DataFrame(done)))
    if not done:
        print(f"nothing measured; see the train.log files under {results}")
        return
    table = summary(done)
    atomic_write(results / "summary.csv", csv_writer(table, float_format="%.4f"))
    print(table.to_string(index=False, float_format=lambda value: f"{value:.4f}"))
    title = (f"{Path(labelled.source).name}: test split of {counts['test']} (split_seed {cfg.split_seed}); "
             f"{stamp['date']}, {stamp['machine'][:60]}")
    draw_figure(done, results / "finetune.png", title)
    print(f"saved {csv_path}, {results / 'summary.csv'} and {results / 'finetune.png'}")
