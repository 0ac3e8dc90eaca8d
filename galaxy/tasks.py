"""Training on a user's own labels (train.py --labels; the labelled set itself is galaxy/labelled.py):
the task a set defines (classes or numbers) and its record in the checkpoint, the labelled images as
the tensors train.py's loop uses, the layers --init_from gives and --freeze fixes, the loss, each
epoch's batch order, the val scores best.pt is chosen by, metrics.csv and loss.png, and the test
scores at the end. train.py branches on Data.task (None: Galaxy Zoo's 37 vote fractions).

The record a checkpoint carries under "task" (plain lists and text, as weights_only loads them):
    {"kind": "classes", "names": [the class names]}
    {"kind": "numbers", "names": [the label columns], "mean": [...], "std": [...]}   (the train split's)
Numbers are trained standardised by that mean and std; the head gives them back in their own units.
"""
from dataclasses import dataclass, replace
import math
import os

from matplotlib.figure import Figure  # no pyplot: files only, whatever the backend
from matplotlib.ticker import MaxNLocator
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from dataset import SPLITS
from galaxy.checkpoints import backbone_names, model_from_checkpoint, read_checkpoint
from galaxy.files import DataError, atomic_write, csv_writer, file_text
from galaxy.inference import predict
from galaxy.labelled import (CACHE_FOLDER, class_weights, crop_labelled_set, labelled_split_for_run,
                             read_labelled_set)
from galaxy.labelled_scores import classification_metrics, regression_metrics
from galaxy.task_eval import score_files, split_files, write_scores
from galaxy.training import Data, balanced_order, epoch_order

SKIPPED_FILE = "labels_skipped.csv"   # in out_dir: every image or row of --labels that is not trained on, and why


@dataclass
class Task:
    """What a user's labels ask of the network, and how it learns them."""
    kind: str                   # "classes" or "numbers"
    names: list                 # the class names, or the label columns
    train_classes: torch.Tensor = None   # classes: the train split's class of each image (balance=sampler)
    weights: torch.Tensor = None         # classes with balance=weights: the loss's weight per class
    mean: np.ndarray = None     # numbers: the train split's mean and spread per column
    std: np.ndarray = None
    sampler: bool = False       # balance=sampler: class-balanced batches

    @property
    def record(self):
        """What the checkpoint keeps (build_model sizes the head from it)."""
        if self.kind == "classes":
            return {"kind": "classes", "names": list(self.names)}
        return {"kind": "numbers", "names": list(self.names), "mean": self.mean.tolist(), "std": self.std.tolist()}

    def loss(self, outputs, targets):
        """Cross-entropy on the logits (weighted by class with balance=weights), or the mean squared
        error of the standardised numbers."""
        if self.kind == "numbers":
            return F.mse_loss(outputs, targets)
        weight = None if self.weights is None else self.weights.to(outputs.device)
        return F.cross_entropy(outputs, targets, weight=weight)

    def batch_order(self, n, seed, epoch, rank, world_size):
        """epoch_order, or with balance=sampler the class-balanced draw; both pure functions of (seed, epoch)."""
        if self.sampler:
            return balanced_order(self.train_classes, seed, epoch, rank, world_size)
        return epoch_order(n, seed, epoch, rank, world_size)

    def scores(self, train_loss, predictions, targets):
        """(the val score best.pt is chosen by, lower is better: 1 - balanced accuracy, or the RMSE of
        the standardised numbers; NaN without val predictions) and the epoch's columns of metrics.csv."""
        if self.kind == "classes":
            fields = {"val_loss": math.nan, "val_accuracy": math.nan, "val_balanced_accuracy": math.nan}
            if predictions is not None:
                picked = predictions.float()[torch.arange(len(targets)), targets].clamp_min(1e-12)
                scores = classification_metrics(targets.numpy(), predictions.argmax(1).numpy(), self.names)
                fields = {"val_loss": -picked.log().mean().item(), "val_accuracy": scores["accuracy"],
                          "val_balanced_accuracy": scores["balanced_accuracy"]}
            return 1 - fields["val_balanced_accuracy"], fields
        fields = {"val_rmse": math.nan, "val_r2": math.nan}
        if predictions is not None:
            fields = {"val_rmse": standardised_rmse(predictions, targets, self.std),
                      "val_r2": float(regression_metrics(targets, predictions, self.names)["r2"].mean())}
        return fields["val_rmse"], {"train_rmse": math.sqrt(train_loss), **fields}

    def describe(self, fields, improved, baseline):
        """The val part of train.py's line for an epoch."""
        best = " (best)" if improved else ""
        if self.kind == "classes":
            if math.isnan(fields["val_balanced_accuracy"]):
                return "no val split: best.pt is this epoch"
            return (f"val balanced accuracy {fields['val_balanced_accuracy']:.4f}{best} | accuracy "
                    f"{fields['val_accuracy']:.4f} | val loss {fields['val_loss']:.4f}")
        if math.isnan(fields["val_rmse"]):
            return "no val split: best.pt is this epoch"
        return (f"val RMSE {fields['val_rmse']:.5f} (standardised){best} | R^2 {fields['val_r2']:.4f} | mean baseline "
                f"{baseline:.5f}")


def standardised_rmse(predictions, targets, std):
    """RMSE over every image and column of (predictions - targets) / std: columns of any unit weigh alike."""
    errors = (np.asarray(predictions, np.float64) - np.asarray(targets, np.float64)) / np.asarray(std, np.float64)
    return float(np.sqrt(np.mean(errors ** 2)))


def make_task(labelled, train_rows, cfg):
    """The Task of a labelled set, its weights, mean and spread from the train split's rows alone."""
    if labelled.task == "classes":
        train = replace(labelled, ids=[labelled.ids[row] for row in train_rows], targets=labelled.targets[train_rows])
        weights = torch.from_numpy(class_weights(train)) if cfg.balance == "weights" else None
        return Task("classes", list(labelled.class_names), torch.from_numpy(train.targets), weights,
                    sampler=cfg.balance == "sampler")
    values = labelled.targets[train_rows].astype(np.float64)
    std = values.std(0)
    return Task("numbers", list(labelled.class_names), mean=values.mean(0), std=np.where(std > 0, std, 1.0))


# --- the labelled images as train.py's tensors ------------------------------------------------------

def report_skipped(labelled, out_dir):
    """out_dir/labels_skipped.csv (where, reason) of what is not trained on, or none (an older one goes)."""
    path = os.path.join(out_dir, SKIPPED_FILE)
    if not labelled.skipped:
        if os.path.isfile(path):
            os.remove(path)
        return
    table = pd.DataFrame([(file_text(where), file_text(reason)) for where, reason in labelled.skipped],
                         columns=["where", "reason"])
    atomic_write(path, csv_writer(table))
    first = ", ".join(f"{file_text(where)} ({reason})" for where, reason in labelled.skipped[:3])
    print(f"skipped {len(labelled.skipped)} of the labelled images or rows, e.g. {first}; all are listed in {path}")


def labelled_data(cfg, device, is_main, world_size):
    """train.py's Data for --labels: the set read (galaxy/labelled.py), cropped as cfg says (cached in
    out_dir/labelled_cache), split by split_seed (stratified by class; out_dir/split.csv), targets as the
    loss takes them (class indices, or numbers standardised by the train split) for train, as labelled
    for val and test."""
    labelled = read_labelled_set(cfg.labels, cfg.images_dir, label_columns=cfg.label_columns or None)
    labelled, images = crop_labelled_set(labelled, cfg, os.path.join(cfg.out_dir, CACHE_FOLDER), progress=is_main)
    if is_main:
        report_skipped(labelled, cfg.out_dir)
        print(f"{file_text(cfg.labels)}: {labelled.summary()}")
    split = labelled_split_for_run(cfg, labelled, write=is_main)
    row_of = {image_id: row for row, image_id in enumerate(labelled.ids)}
    rows = {name: torch.tensor([row_of[i] for i in split[name].tolist()], dtype=torch.long) for name in SPLITS}
    train, val, test = (rows[name] for name in SPLITS)
    if len(train) < cfg.batch_size * world_size:
        raise DataError(f"only {len(train)} training images in {file_text(cfg.labels)} for batch_size="
                        f"{cfg.batch_size} x {world_size} processes; use a smaller --batch_size or label more images")
    task = make_task(labelled, train.numpy(), cfg)
    targets = torch.from_numpy(labelled.targets)
    if task.kind == "classes":
        train_targets = targets[train]
        train_mean = torch.bincount(train_targets, minlength=len(task.names)).float() / len(train)
        majority = torch.zeros(len(val), len(task.names))
        majority[:, train_mean.argmax()] = 1.0   # the baseline: every image is the commonest class
        baseline = task.scores(math.nan, majority, targets[val])[0] if len(val) else math.nan
    else:
        train_targets = ((targets[train] - torch.from_numpy(task.mean).float()) / torch.from_numpy(task.std).float())
        train_mean = torch.from_numpy(task.mean).float()
        baseline = (standardised_rmse(task.mean[None].repeat(len(val), 0), targets[val], task.std) if len(val)
                    else math.nan)
    return Data(train_images=images[train].to(device), train_targets=train_targets.to(device),
                val_images=images[val], val_targets=targets[val], test_images=images[test], test_targets=targets[test],
                train_mean=train_mean, baseline_val_rmse=baseline, has_val=len(val) > 0, task=task, loss=task.loss)


def pretrained_parameters(model, cfg):
    """--init_from: freeze what cfg.freeze says and return the names of the parameters it gives (the
    optimizer's second group, at lr x lr_pretrained); None without it (one group: all is new)."""
    if not cfg.init_from:
        return None
    model.freeze(cfg.freeze)
    loaded = backbone_names(model, cfg.init_layers)
    return {name for name, _ in model.named_parameters() if name in loaded}


# --- metrics.csv, loss.png and the test scores ------------------------------------------------------

def write_task_metrics(history, out_dir, baseline, plot=True):
    """out_dir/metrics.csv, one row an epoch, and with plot loss.png: the train and val loss (classes, with
    the val accuracies on a second axis) or the standardised RMSEs (numbers)."""
    table = pd.DataFrame(history)
    atomic_write(os.path.join(out_dir, "metrics.csv"), lambda tmp: table.to_csv(tmp, index=False))
    if not plot:
        return
    fig = Figure(figsize=(7.5, 4.5))
    ax = fig.add_subplot()
    classes = "val_balanced_accuracy" in table
    train, val = ("train_loss", "val_loss") if classes else ("train_rmse", "val_rmse")
    ax.plot(table["epoch"], table[train], "o-", label=f"train {'loss' if classes else 'RMSE'} (augmented, dropout on)")
    lines = []
    if table[val].notna().any():
        ax.plot(table["epoch"], table[val], "s-", label=f"validation {'loss' if classes else 'RMSE'}")
        if classes:
            right = ax.twinx()
            for column, style, color in (("val_balanced_accuracy", "^-", "tab:green"), ("val_accuracy", "v--",
                                                                                     "tab:olive")):
                lines += right.plot(table["epoch"], table[column], style, color=color, label=column.replace("_", " "))
            best = table["val_balanced_accuracy"].idxmax()
            right.annotate(f"best {table['val_balanced_accuracy'][best]:.3f}",
                           (table["epoch"][best], table["val_balanced_accuracy"][best]), textcoords="offset points",
                           xytext=(0, 8), ha="center")
            right.set_ylim(0, 1.05)
            right.set_ylabel("val accuracy")
        else:
            ax.axhline(baseline, color="gray", ls="--", label=f"predict the mean ({baseline:.4f})")
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("cross-entropy" if classes else "RMSE of the standardised numbers")
    ax.set_title("training on your labels: " + ("classes" if classes else "numbers"))
    ax.grid(alpha=0.3)
    handles, names = ax.get_legend_handles_labels()
    ax.legend(handles + lines, names + [line.get_label() for line in lines], fontsize=8)
    fig.tight_layout()
    atomic_write(os.path.join(out_dir, "loss.png"), lambda tmp: fig.savefig(tmp, dpi=120, format="png"))


def report_labelled_test(cfg, data, device, numerics):
    """The test scores of best.pt: printed, and written to out_dir as predict.py --split=test writes them."""
    if not len(data.test_targets):
        print("no test split (test_fraction=0)")
        return
    path = os.path.join(cfg.out_dir, "best.pt")
    best = read_checkpoint(path)
    model, _ = model_from_checkpoint(best, path, device)
    predictions = predict(model, data.test_images, 2 * cfg.batch_size, numerics["amp"], numerics["channels_last"])
    files, lines = score_files(best["task"], "test", data.test_targets.numpy(), predictions.numpy(),
                               f"best.pt, epoch {best['epoch']}")
    write_scores(cfg.out_dir, files, split_files("test"))
    print("\n".join(lines[1:] + lines[:1]))   # the scores last: an ensemble's member log shows its last line
