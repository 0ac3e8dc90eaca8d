"""Scores for a network fine-tuned on a user's labels (galaxy/labelled.py): accuracy, balanced
accuracy, a per-class table and the confusion matrix with its figure for classes; RMSE and R^2 per
column for numbers; and the zero-shot baseline, which reads five morphology classes off the 37
Galaxy Zoo vote fractions with no training at all. numpy only.
"""
import math

from matplotlib.figure import Figure  # no pyplot: files only, whatever the backend
import numpy as np
import pandas as pd

from dataset import LABEL_COLUMNS


def confusion_matrix(true, predicted, num_classes):
    """int64 (K, K) counts: row = true class, column = predicted class."""
    true, predicted = np.asarray(true, np.int64), np.asarray(predicted, np.int64)
    return np.bincount(true * num_classes + predicted, minlength=num_classes ** 2).reshape(num_classes, num_classes)


def classification_metrics(true, predicted, class_names):
    """{accuracy, balanced_accuracy (the mean recall of the classes present), per_class DataFrame (class,
    precision, recall, f1, support), confusion}. A class never predicted has precision 0; a class
    absent from true has recall and f1 NaN, and no part in the balanced accuracy."""
    confusion = confusion_matrix(true, predicted, len(class_names))
    hits, support, called = np.diag(confusion).astype(np.float64), confusion.sum(1), confusion.sum(0)
    precision = np.divide(hits, called, out=np.zeros_like(hits), where=called > 0)
    recall = np.divide(hits, support, out=np.full_like(hits, np.nan), where=support > 0)
    both = precision + recall
    f1 = np.divide(2 * precision * recall, both, out=np.where(np.isnan(both), np.nan, 0.0), where=both > 0)
    table = pd.DataFrame({"class": list(class_names), "precision": precision, "recall": recall, "f1": f1,
                          "support": support})
    total = int(confusion.sum())
    return {"accuracy": float(hits.sum() / total) if total else math.nan,
            "balanced_accuracy": float(np.nanmean(recall)) if total else math.nan,
            "per_class": table, "confusion": confusion}


def regression_metrics(true, predicted, column_names):
    """DataFrame (column, rmse, r2) per target column; r2 is NaN for a column whose true values are all one."""
    true = np.asarray(true, np.float64).reshape(len(true), -1)
    predicted = np.asarray(predicted, np.float64).reshape(true.shape)
    residual = ((true - predicted) ** 2).sum(0)
    spread = ((true - true.mean(0)) ** 2).sum(0)
    unexplained = np.divide(residual, spread, out=np.full_like(residual, np.nan), where=spread > 0)
    return pd.DataFrame({"column": list(column_names), "rmse": np.sqrt(residual / len(true)), "r2": 1 - unexplained})


def confusion_figure(confusion, class_names, title=""):
    """A Figure of the confusion matrix: each row coloured by the share of its true class (so a rare
    class reads as clearly as a common one), each cell annotated with its count and that share, each
    row label with the class's number of images."""
    confusion = np.asarray(confusion, np.int64)
    k, totals = len(class_names), confusion.sum(1, keepdims=True)
    shares = np.divide(confusion, totals, out=np.zeros(confusion.shape), where=totals > 0)
    side = 2.5 + 0.8 * k
    fig = Figure(figsize=(side + 1.5, side), layout="constrained")
    ax = fig.subplots()
    shown = ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    for i in range(k):
        for j in range(k):
            ax.text(j, i, f"{confusion[i, j]}\n{shares[i, j]:.0%}", ha="center", va="center", fontsize=8,
                    color="white" if shares[i, j] > 0.55 else "black")
    ax.set_xticks(range(k), class_names, rotation=35, ha="right")
    ax.set_yticks(range(k), [f"{name} ({n})" for name, n in zip(class_names, totals.ravel().tolist())])
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class (images)")
    ax.set_title(title or "confusion matrix (share of each true class)")
    fig.colorbar(shown, ax=ax, shrink=0.8, label="share of the true class")
    return fig


# Galaxy Zoo's vote fractions are cumulative down the decision tree (Class7.x sums to Class1.1,
# Class4.1 is featured x not edge-on x spiral), so each class is one column as it stands.
ZERO_SHOT_COLUMNS = {"round_smooth": "Class7.1", "in_between_smooth": "Class7.2", "cigar_smooth": "Class7.3",
                     "edge_on": "Class2.1", "spiral": "Class4.1"}


def zero_shot_classes(vote_fractions, class_names):
    """(probabilities (N, K) in class_names' order, the argmax class index (N,)) from (N, 37) or (37,)
    vote fractions: each class's column, renormalised over the five (uniform where all five are 0).

    class_names must be the five of ZERO_SHOT_COLUMNS, in any order; ValueError otherwise.
    """
    if len(class_names) != len(ZERO_SHOT_COLUMNS) or set(class_names) != set(ZERO_SHOT_COLUMNS):
        raise ValueError(f"the zero-shot baseline knows only the classes {', '.join(sorted(ZERO_SHOT_COLUMNS))}, "
                         f"not {', '.join(map(str, class_names))}")
    votes = np.atleast_2d(np.asarray(vote_fractions, np.float64))
    if votes.ndim != 2 or votes.shape[1] != len(LABEL_COLUMNS):
        raise ValueError(f"vote fractions must be (N, {len(LABEL_COLUMNS)}), not {votes.shape}")
    scores = votes[:, [LABEL_COLUMNS.index(ZERO_SHOT_COLUMNS[name]) for name in class_names]].clip(0, None)
    total = scores.sum(1, keepdims=True)
    probabilities = np.divide(scores, total, out=np.full_like(scores, 1 / len(class_names)), where=total > 0)
    return probabilities, probabilities.argmax(1)
