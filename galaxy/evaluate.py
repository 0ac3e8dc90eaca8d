"""Evaluation on the held-out split of the training data (predict.py --split=test|val): RMSE
per question against the mean-prediction baseline, and for an ensemble each member's RMSE and
whether the members' spread predicts the error.
"""
import os

from matplotlib.figure import Figure  # no pyplot: files only, whatever the backend
import numpy as np
import pandas as pd
import torch

from dataset import LABEL_COLUMNS, QUESTIONS, DataError, read_labels, read_split
from galaxy.ensemble import (crop_sources, galaxy_error, galaxy_spread, galaxy_tasks, plot_spread, predict_ensemble,
                             spread_calibration)
from galaxy.files import atomic_write
from galaxy.inference import rmse
from galaxy.similar import write_embeddings

# --- the metric per question ---------------------------------------------------------------

def question_rmse(predictions, targets):
    """{question number: RMSE over that question's answer columns}, for (N, 37) arrays."""
    squared_errors = (np.asarray(predictions, np.float64) - np.asarray(targets, np.float64)) ** 2
    return {q.number: float(np.sqrt(squared_errors[:, [LABEL_COLUMNS.index(c) for c in q.columns]].mean()))
            for q in QUESTIONS}


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


def shared_split(split_name, members):
    """(the first member's split, its path), once every member's split.csv holds the same
    split_name galaxies and trains on none of them; DataError naming the checkpoint otherwise."""
    paths = [os.path.join(os.path.dirname(os.path.abspath(member.path)), "split.csv") for member in members]
    evaluated = read_split(paths[0])[split_name]
    for member, path in zip(members, paths):
        split = read_split(path)
        leaked = np.intersect1d(evaluated, split["train"])
        if len(leaked) or not np.array_equal(split[split_name], evaluated):
            raise DataError(f"checkpoint {member.path} does not share the {split_name} split of {paths[0]} "
                            f"({len(leaked)} of its {len(evaluated)} galaxies are in {path}'s train split); "
                            f"evaluate members trained with the same split_seed and fractions, or leave it out")
    return read_split(paths[0]), paths[0]


def report_members(cfg, members, member_predictions, predictions, targets):
    """Each member's RMSE beside the ensemble's, best and mean member: printed and in eval_<split>_members.csv."""
    member_rmse = [float(np.sqrt(np.mean((p - targets) ** 2))) for p in member_predictions]
    rows = [(member.path, value) for member, value in zip(members, member_rmse)]
    rows += [("ensemble", float(np.sqrt(np.mean((predictions - targets) ** 2)))),
             (f"best member ({members[int(np.argmin(member_rmse))].path})", min(member_rmse)),
             ("mean member", float(np.mean(member_rmse)))]
    for name, value in rows:
        print(f"  RMSE {value:.4f}  {name}")
    table = pd.DataFrame(rows, columns=["model", "rmse"])
    path = os.path.join(cfg.out_dir, f"eval_{cfg.split}_members.csv")
    atomic_write(path, lambda tmp: table.to_csv(tmp, index=False, float_format="%.6f"))
    print(f"wrote {path}")


def report_spread(cfg, std, predictions, targets, views):
    """Does the spread mean anything? Pearson r of each galaxy's spread and error, and the binned
    spread against the observed RMSE: spread_<split>.csv and spread_<split>.png."""
    correlation, rows = spread_calibration(galaxy_spread(std), galaxy_error(predictions, targets))
    print(f"spread over {views} members x views: Pearson r(predicted spread, actual error) per galaxy = "
          f"{correlation:.3f}; per quantile bin (spread -> RMSE): "
          + ", ".join(f"{spread:.3f}->{error:.3f}" for _, spread, error in rows))
    table = pd.DataFrame(rows, columns=["galaxies", "rms_spread", "rmse"])
    table.insert(0, "pearson_r", correlation)
    csv_path = os.path.join(cfg.out_dir, f"spread_{cfg.split}.csv")
    png_path = os.path.join(cfg.out_dir, f"spread_{cfg.split}.png")
    atomic_write(csv_path, lambda tmp: table.to_csv(tmp, index=False, float_format="%.6f"))
    plot_spread(rows, correlation, png_path, f"{cfg.split} split: {len(targets)} galaxies, {views} members x views")
    print(f"wrote {csv_path} and {png_path}")


def evaluate_split(cfg, members, groups):
    """RMSE per question on the held-out split; with several members or TTA also the spread report."""
    split, split_path = shared_split(cfg.split, members)
    galaxy_ids = split[cfg.split]
    if not len(galaxy_ids):
        how = f"{cfg.split}_fraction=0" + (" or train_on_val" if cfg.split == "val" else "")
        raise DataError(f"{split_path} has no {cfg.split} galaxies (trained with {how}?)")
    label_ids, vote_fractions = read_labels(cfg.processed_dir)
    row_of = {gid: row for row, gid in enumerate(label_ids.tolist())}
    missing = [gid for gid in galaxy_ids.tolist() + split["train"].tolist() if gid not in row_of]
    if missing:
        raise DataError(f"{len(missing)} galaxies of {split_path} (e.g. {missing[0]}) have no row in "
                        f"{cfg.processed_dir}/labels.csv; pass the --processed_dir the checkpoint was trained on")
    targets = vote_fractions[[row_of[gid] for gid in galaxy_ids.tolist()]]
    baseline = vote_fractions[[row_of[gid] for gid in split["train"].tolist()]].mean(0)

    tasks, pngs, raw = galaxy_tasks(cfg, "train", galaxy_ids.tolist())
    use_png, _ = crop_sources(cfg, groups, pngs, raw, "train")
    result = predict_ensemble(members, groups, tasks, cfg, use_png, embed=cfg.embed, description=f"predict {cfg.split}")
    if result.skipped:
        name, reason = result.skipped[0]
        png = os.path.join(cfg.processed_dir, "train", f"{name}.png")
        raise DataError(f"{len(result.skipped)} galaxies of the {cfg.split} split cannot be read (e.g. {png}: "
                        f"{reason}); re-run `python preprocess.py --processed_dir={cfg.processed_dir}` to redo them")
    predictions = result.mean

    table = evaluation_table(predictions, targets, baseline)
    checkpoints = members[0].path if len(members) == 1 else f"{len(members)} checkpoints"
    print(f"{cfg.split} split: {len(galaxy_ids)} galaxies, {checkpoints}"
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
    if len(members) > 1:
        report_members(cfg, members, result.members, predictions, targets)
    if result.views > 1:
        report_spread(cfg, result.std, predictions, targets, result.views)
    if cfg.embed:
        write_embeddings(cfg.out_dir, result.names, [cfg.split] * len(result.names), result.features)
