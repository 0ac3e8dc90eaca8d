"""What a network trained on a user's labels (galaxy/tasks.py) gives back, to train.py, predict.py and
plot_image.py: its scores on a split of its labelled set, written as one set of files, the same at the
end of training as from predict.py --split=test|val:

    eval_<split>.csv            classes: accuracy, balanced accuracy, images; numbers: RMSE and R^2 per column
    eval_<split>_classes.csv    classes: precision, recall, F1 and support per class
    confusion_<split>.png       classes: the confusion matrix
    eval_<split>_members.csv    an ensemble: each member's scores
    predictions_<split>.csv     each image's id, its label and the prediction

and the table of predict.py --images (a probability column per class and the top label, or a column per
number), the label the set gives an image, and plot_image.py's bars.
"""
from dataclasses import replace
import os
from types import SimpleNamespace

import numpy as np
import pandas as pd
import torch

from dataset import SPLITS
from galaxy.checkpoints import CheckpointError
from galaxy.ensemble import inference_numerics, save_embeddings
from galaxy.files import DataError, csv_writer, file_text, write_file_set
from galaxy.inference import predict_views
from galaxy.labelled import CACHE_FOLDER, crop_labelled_set, read_labelled_set, read_labelled_split
from galaxy.labelled_scores import classification_metrics, confusion_figure, regression_metrics
from galaxy.similar import embedding_source

TRUE_COLOR, PREDICTED_COLOR = "tab:blue", "tab:orange"   # as plot_image.py's Galaxy Zoo panels


def describe(task):
    if task is None:
        return "Galaxy Zoo's 37 vote fractions"
    return f"the {task['kind']} {', '.join(task['names'])}"


def ensemble_task(members):
    """The task record the members share (None: Galaxy Zoo checkpoints); CheckpointError when they differ."""
    first = members[0].model.task
    for member in members[1:]:
        task = member.model.task
        if (task and (task["kind"], task["names"])) != (first and (first["kind"], first["names"])):
            raise CheckpointError(f"{file_text(members[0].path)} predicts {describe(first)}, {file_text(member.path)} "
                                  f"{describe(task)}: an ensemble's checkpoints must share one task")
    return first


# --- scores and their files -------------------------------------------------------------------------

def split_files(split):
    """Every file of a split's scores, the main one first; the last three are a Galaxy Zoo evaluation's,
    removed when these are written (they would be another checkpoint's)."""
    return (f"eval_{split}.csv", f"eval_{split}_classes.csv", f"confusion_{split}.png", f"eval_{split}_members.csv",
            f"predictions_{split}.csv", f"eval_{split}.png", f"spread_{split}.csv", f"spread_{split}.png")


def summary_scores(task, true, predicted):
    """{name: value}: accuracy and balanced accuracy (classes), or the mean R^2 and RMSE per column (numbers)."""
    if task["kind"] == "classes":
        scores = classification_metrics(true, np.asarray(predicted).argmax(1), task["names"])
        return {"accuracy": scores["accuracy"], "balanced_accuracy": scores["balanced_accuracy"]}
    table = regression_metrics(true, predicted, task["names"])
    return {"r2": float(table["r2"].mean()), **{f"rmse_{row.column}": row.rmse for row in table.itertuples()}}


def score_files(task, split, true, predicted, what, ids=None):
    """({file name: writer} of split_files, [lines to print]) of predictions (N, K) against true (class
    indices (N,) or numbers (N, K)); what names the model; with ids, predictions_<split>.csv too."""
    names, true, predicted = task["names"], np.asarray(true), np.asarray(predicted, np.float64)
    main, per_class, confusion, _, each = split_files(split)[:5]
    if task["kind"] == "classes":
        scores = classification_metrics(true, predicted.argmax(1), names)
        table = pd.DataFrame({"metric": ["accuracy", "balanced_accuracy", "images"],
                              "value": [scores["accuracy"], scores["balanced_accuracy"], len(true)]})
        title = (f"{split} split, {what}: accuracy {scores['accuracy']:.3f}, balanced accuracy "
                 f"{scores['balanced_accuracy']:.3f}")
        files = {main: csv_writer(table), per_class: csv_writer(scores["per_class"], float_format="%.4f"),
                 confusion: lambda path: confusion_figure(scores["confusion"], names, title).savefig(path, dpi=110,
                                                                                                   format="png")}
        lines = [f"{split} accuracy {scores['accuracy']:.4f}, balanced accuracy {scores['balanced_accuracy']:.4f} "
                 f"({what}, {len(true)} images)", scores["per_class"].to_string(index=False, float_format="%.3f")]
    else:
        table = regression_metrics(true, predicted, names)
        files = {main: csv_writer(table, float_format="%.6f")}
        lines = [f"{split} ({what}, {len(true)} images): " + ", ".join(
            f"{row.column} RMSE {row.rmse:.4g}, R^2 {row.r2:.4f}" for row in table.itertuples())]
    if ids is not None:
        files[each] = csv_writer(prediction_table(task, ids, predicted, True, true))
    return files, lines


def write_scores(out_dir, files, names, rescue=None, written=None):
    """write_file_set of a split's scores into out_dir, saying what it wrote and which older files it removed."""
    os.makedirs(out_dir, exist_ok=True)
    paths, removed = write_file_set(out_dir, files, names, rescue, written)
    for path in removed:
        print(f"removed {file_text(path)}: an earlier run's, it does not belong with these results")
    print(f"wrote {', '.join(file_text(path) for path in paths)}")


def prediction_table(task, names, values, with_label=True, true=None):
    """file (or id), a probability column per class named by it and label (the top class) when with_label,
    or a column per number; with true, a column "true" before them."""
    values = np.asarray(values)
    table = pd.DataFrame(values, columns=list(task["names"]))
    if true is not None:
        table.insert(0, "true", [task["names"][k] for k in true] if task["kind"] == "classes" else list(map(tuple,
                                                                                                             true)))
    table.insert(0, "file", [file_text(name) for name in names])
    if with_label and task["kind"] == "classes":
        table["label"] = [task["names"][k] for k in values.argmax(1)]
    return table


# --- predict.py --split on a task checkpoint ------------------------------------------------------

def labelled_set_of(cfg, member, task):
    """The labelled set member was trained on (cfg.labels where it has moved), checked to hold its classes."""
    path = cfg.labels or member.cfg.labels
    if not os.path.exists(path):
        raise DataError(f"the labelled set {file_text(path)} that {file_text(member.path)} was trained on is not "
                        f"there; pass --labels=<where it is now>")
    labelled = read_labelled_set(path, member.cfg.images_dir, label_columns=member.cfg.label_columns or None)
    found = {"kind": labelled.task, "names": labelled.class_names}
    if (found["kind"], found["names"]) != (task["kind"], task["names"]):
        raise DataError(f"{file_text(path)} now holds {describe(found)}, but {file_text(member.path)} was trained on "
                        f"{describe(task)}; pass --labels=<its set>")
    return labelled


def shared_labelled_split(split_name, members):
    """(the first member's split, its path), once every member's split.csv holds the same split_name
    images and trains on none of them; DataError naming the checkpoint otherwise."""
    paths = [os.path.join(os.path.dirname(os.path.abspath(member.path)), "split.csv") for member in members]
    first = read_labelled_split(paths[0])
    for member, path in zip(members[1:], paths[1:]):
        split = read_labelled_split(path)
        if split_name != "all" and (len(np.intersect1d(first[split_name], split["train"]))
                                    or not np.array_equal(split[split_name], first[split_name])):
            raise DataError(f"checkpoint {file_text(member.path)} does not share the {split_name} split of "
                            f"{paths[0]}; evaluate members trained with the same split_seed and fractions")
    return first, paths[0]


def evaluate_labelled(cfg, members, task, written):
    """predict.py --split=test|val on checkpoints of a user's labels: the scores (as at the end of
    training), from the mean over members x views; --split=all --embed: the features of every image."""
    if cfg.split == "kaggle":
        raise DataError(f"{file_text(members[0].path)} was trained on your own labels ({describe(task)}); "
                        f"--split=kaggle is Galaxy Zoo's test set: pass --split=test, --split=val or --images=<folder>")
    labelled = labelled_set_of(cfg, members[0], task)
    split, split_path = shared_labelled_split(cfg.split, members)
    wanted = (np.concatenate([split[name] for name in SPLITS]) if cfg.split == "all" else split[cfg.split]).tolist()
    if not wanted:
        raise DataError(f"{split_path} has no {cfg.split} images (trained with {cfg.split}_fraction=0?)")
    numerics = inference_numerics(members, cfg.amp, cfg.channels_last, cfg.batch_size)
    views, features, true = [], None, None
    for index, member in enumerate(members):
        cache = os.path.join(os.path.dirname(os.path.abspath(member.path)), CACHE_FOLDER)
        kept, images = crop_labelled_set(labelled, replace(member.cfg, workers=cfg.workers), cache)   # this machine's
        row_of = {image_id: row for row, image_id in enumerate(kept.ids)}
        missing = [image_id for image_id in wanted if image_id not in row_of]
        if missing:
            raise DataError(f"{len(missing)} images of {split_path} (e.g. {file_text(missing[0])}) are no longer "
                            f"usable in {file_text(labelled.source)}; pass --labels=<the set it was trained on>")
        rows = torch.tensor([row_of[image_id] for image_id in wanted], dtype=torch.long)
        member_views, member_features = predict_views(member.model, images[rows], cfg.batch_size, *numerics, cfg.tta,
                                                      embed=cfg.embed and index == 0)
        if not bool(torch.isfinite(member_views).all()):
            raise CheckpointError(f"member {file_text(member.path)} gives non-finite predictions: it diverged; "
                                  f"leave it out of --checkpoint")
        views.append(member_views)
        features = member_features if index == 0 else features
        true = kept.targets[rows.numpy()] if true is None else true
    views = torch.cat(views)
    mean, std = views.mean(0).numpy(), views.std(0, correction=0).numpy()
    if cfg.split != "all":
        what = file_text(members[0].path) if len(members) == 1 else f"{len(members)} checkpoints"
        files, lines = score_files(task, cfg.split, true, mean, what + (", 8-fold TTA" if cfg.tta else ""), wanted)
        if len(members) > 1:
            per_member = [views[k * len(views) // len(members):(k + 1) * len(views) // len(members)].mean(0).numpy()
                          for k in range(len(members))]
            table = pd.DataFrame([{"model": file_text(member.path), **summary_scores(task, true, values)}
                                  for member, values in zip(members, per_member)])
            files[split_files(cfg.split)[3]] = csv_writer(table, float_format="%.6f")
            lines.append(table.to_string(index=False, float_format="%.4f"))
        print("\n".join(lines))
        write_scores(cfg.out_dir, files, split_files(cfg.split), {"id": np.array(wanted, str), "mean": mean,
                                                                  "std": std}, written)
    if cfg.embed:
        source = {image_id: name for name in SPLITS for image_id in split[name].tolist()}
        result = SimpleNamespace(names=wanted, features=features.numpy().astype(np.float16),
                                 source=embedding_source(members[0], cfg.tta))
        save_embeddings(cfg.out_dir, result, [source[image_id] for image_id in wanted], written)


# --- plot_image.py ----------------------------------------------------------------------------------

def true_label(cfg, member, task, file):
    """The label member's labelled set gives the image file (its class index, or its numbers), or None
    when the file is not one of its images or the set cannot be read."""
    try:
        labelled = labelled_set_of(cfg, member, task)
    except DataError:
        return None
    real = os.path.realpath(file)
    rows = [row for row, other in enumerate(labelled.files) if os.path.realpath(other) == real]
    return labelled.targets[rows[0]] if rows else None


def plot_task(ax, task, predicted, std=None, true=None):
    """One horizontal bar per class, its probability (the spread as error bars, the true class in another
    colour), or per number, the prediction with the labelled value as a mark. Returns a title's words."""
    names, predicted = task["names"], np.asarray(predicted, np.float64)
    positions = np.arange(len(names))[::-1]   # the first class on top
    classes = task["kind"] == "classes"
    colors = [TRUE_COLOR if classes and k == true else PREDICTED_COLOR for k in range(len(names))]
    ax.barh(positions, predicted, color=colors, xerr=std, error_kw={"elinewidth": 1, "capsize": 3, "ecolor": "black"})
    for y, value in zip(positions, predicted):
        ax.text(value, y, f" {value:.3g}", va="center", fontsize=9)
    labels = [f"{name} (true)" if classes and k == true else name for k, name in enumerate(names)]
    ax.set_yticks(positions, labels, fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    top = names[int(predicted.argmax())] if classes else ""
    if classes:
        ax.set_xlim(0, 1.15)
        ax.set_xlabel("predicted probability" + (" (error bars: spread over members x views)" if std is not None
                                                  else ""))
        truth = f"; labelled {names[int(true)]}" if true is not None else ""
        return f"predicted {top} ({predicted.max():.2f}){truth}"
    if true is not None:
        ax.plot(np.asarray(true, np.float64), positions, "D", color=TRUE_COLOR, label="labelled")
        ax.legend()
    ax.set_xlabel("predicted value (each column in its own units)")
    return "predicted " + ", ".join(f"{name} {value:.3g}" for name, value in zip(names, predicted))
