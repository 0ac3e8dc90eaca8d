"""Evaluation on the held-out split of the training data (predict.py --split=test|val): RMSE
per question against the mean-prediction baseline, for an ensemble each member's RMSE and
whether the members' spread predicts the error, and with a calibration (galaxy/calibration.py)
how much of the errors its sigma covers. Its files are one set (galaxy.files.write_file_set):
eval_<split>.csv and .png, eval_<split>_members.csv, spread_<split>.csv and .png,
calibration_<split>.csv and .png; a run replaces all the earlier run's, so no file of another
ensemble or split stays beside them. split_targets also gives galaxy/uncertainty.py the val
galaxies its calibration is fitted on.
"""
import os

from matplotlib.figure import Figure  # no pyplot: files only, whatever the backend
import numpy as np
import pandas as pd
import torch

from dataset import LABEL_COLUMNS, QUESTIONS, DataError, read_labels, read_split
from galaxy.calibration import (INTERVALS, calibrated_sigma, calibration_curve, coverage_table, plot_calibration,
                                views_text)
from galaxy.ensemble import (crop_sources, galaxy_error, galaxy_spread, galaxy_tasks, plot_spread, predict_ensemble,
                             save_embeddings, spread_calibration)
from galaxy.files import csv_writer, file_text, write_file_set
from galaxy.inference import rmse

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


def evaluation_files(split):
    """Every file of an evaluation's set, the main one first."""
    return (f"eval_{split}.csv", f"eval_{split}.png", f"eval_{split}_members.csv", f"spread_{split}.csv",
            f"spread_{split}.png", f"calibration_{split}.csv", f"calibration_{split}.png")


def plot_evaluation(table, path, title):
    """Horizontal bars, model beside the mean-prediction baseline, one pair per question, as the PNG path."""
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
    fig.savefig(path, dpi=120, format="png")


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


def report_members(members, member_predictions, predictions, targets):
    """Each member's RMSE beside the ensemble's, best and mean member: printed, and returned as the table
    of eval_<split>_members.csv."""
    member_rmse = [float(np.sqrt(np.mean((p - targets) ** 2))) for p in member_predictions]
    rows = [(member.path, value) for member, value in zip(members, member_rmse)]
    rows += [("ensemble", float(np.sqrt(np.mean((predictions - targets) ** 2)))),
             (f"best member ({members[int(np.argmin(member_rmse))].path})", min(member_rmse)),
             ("mean member", float(np.mean(member_rmse)))]
    for name, value in rows:
        print(f"  RMSE {value:.4f}  {name}")
    return pd.DataFrame([(file_text(name), value) for name, value in rows], columns=["model", "rmse"])


def report_spread(split, std, predictions, targets, views):
    """Does the spread mean anything? Pearson r of each galaxy's spread and error, and the binned
    spread against the observed RMSE: printed, and returned as the writers of spread_<split>.csv and .png."""
    correlation, rows = spread_calibration(galaxy_spread(std), galaxy_error(predictions, targets))
    print(f"spread over {views} members x views: Pearson r(predicted spread, actual error) per galaxy = "
          f"{correlation:.3f}; per quantile bin (spread -> RMSE): "
          + ", ".join(f"{spread:.3f}->{error:.3f}" for _, spread, error in rows))
    table = pd.DataFrame(rows, columns=["galaxies", "rms_spread", "rmse"])
    table.insert(0, "pearson_r", correlation)
    title = f"{split} split: {len(targets)} galaxies, {views} members x views"
    return {f"spread_{split}.csv": csv_writer(table, float_format="%.6f"),
            f"spread_{split}.png": lambda path: plot_spread(rows, correlation, path, title)}


def coverage_report(split, calibration, predictions, std, views, targets):
    """How much of the errors the calibrated sigma covers (and the raw spread, with one): printed, and
    returned as the writers of calibration_<split>.csv (coverage_table with the calibration's intervals, and
    the raw spread's coverage in spread_1sigma and spread_2sigma, empty without a spread) and
    calibration_<split>.png (the curves, the intervals as stars)."""
    spread = std if views > 1 else None
    sigma = calibrated_sigma(calibration, predictions, spread)
    table = coverage_table(predictions, sigma, targets, calibration)
    curves = {"calibrated sigma": calibration_curve(predictions, sigma, targets)}
    raw = ""
    if spread is not None:
        floored = np.maximum(spread, 1e-12)   # an output all views agree on exactly: outside any +-z spread
        raw_table = coverage_table(predictions, floored, targets)
        for k in (1, 2):
            table[f"spread_{k}sigma"] = raw_table[f"observed_{k}sigma"]
        curves = {f"raw spread ({views} members x views)": calibration_curve(predictions, floored, targets), **curves}
        raw = f"; the raw spread: {raw_table['observed_1sigma'][0]:.1f}% and {raw_table['observed_2sigma'][0]:.1f}%"
    else:
        table["spread_1sigma"] = table["spread_2sigma"] = np.nan
    overall = table.iloc[0]
    fitted = "the split it was fitted on" if split == "val" else f"fitted on {calibration['galaxies']} val galaxies"
    print(f"calibrated sigma on the {split} split ({fitted}): {overall['observed_1sigma']:.1f}% of the vote "
          f"fractions within +-1 sigma (nominal {overall['nominal_1sigma']:.1f}%), {overall['observed_2sigma']:.1f}% "
          f"within +-2 sigma ({overall['nominal_2sigma']:.1f}%){raw}")
    per_question = {name: table.iloc[1:][f"observed_{name}"] for name in INTERVALS}
    print(f"intervals on the {split} split: {overall['observed_interval_68']:.1f}% within the 68% intervals "
          f"(questions {per_question['interval_68'].min():.1f}-{per_question['interval_68'].max():.1f}%), "
          f"{overall['observed_interval_95']:.1f}% within the 95% intervals "
          f"({per_question['interval_95'].min():.1f}-{per_question['interval_95'].max():.1f}%)")
    intervals = {f"{name[-2:]}% intervals (± {name} σ)": (level, overall[f"observed_{name}"])
                 for name, level in INTERVALS.items()}
    title = (f"{split} split: {len(targets)} galaxies, {views_text(calibration['members'], calibration['tta'])}\n"
             f"±1σ holds {overall['observed_1sigma']:.1f}%, ±2σ {overall['observed_2sigma']:.1f}%, the 68% and 95% "
             f"intervals {overall['observed_interval_68']:.1f}% and {overall['observed_interval_95']:.1f}%")
    return {f"calibration_{split}.csv": csv_writer(table, float_format="%.2f"),
            f"calibration_{split}.png": lambda path: plot_calibration(curves, path, title, intervals)}


def split_targets(cfg, split_name, members):
    """(galaxy ids of the members' shared split_name split, their vote fractions, the train split's mean
    vote fractions, the split.csv, the number of train galaxies); DataError when the split is empty or
    unknown or labels.csv lacks its galaxies."""
    split, split_path = shared_split(split_name, members)
    galaxy_ids = split[split_name]
    if not len(galaxy_ids):
        how = f"{split_name}_fraction=0" + (" or train_on_val" if split_name == "val" else "")
        raise DataError(f"{split_path} has no {split_name} galaxies (trained with {how}?)")
    label_ids, vote_fractions = read_labels(cfg.processed_dir)
    row_of = {gid: row for row, gid in enumerate(label_ids.tolist())}
    missing = [gid for gid in galaxy_ids.tolist() + split["train"].tolist() if gid not in row_of]
    if missing:
        raise DataError(f"{len(missing)} galaxies of {split_path} (e.g. {missing[0]}) have no row in "
                        f"{cfg.processed_dir}/labels.csv; pass the --processed_dir the checkpoint was trained on")
    targets = vote_fractions[[row_of[gid] for gid in galaxy_ids.tolist()]]
    baseline = vote_fractions[[row_of[gid] for gid in split["train"].tolist()]].mean(0)
    return galaxy_ids, targets, baseline, split_path, len(split["train"])


def evaluate_split(cfg, members, groups, written=None, uncertainty=None):
    """RMSE per question on the held-out split; with several members or TTA also the spread report;
    with a calibration (uncertainty, galaxy/uncertainty.py) the coverage of its sigma. written (a list)
    gets each path as it is written."""
    galaxy_ids, targets, baseline, split_path, train_count = split_targets(cfg, cfg.split, members)
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
          f"{train_count} train galaxies")
    print(f"{'RMSE':<36}{'model':>8}{'baseline':>10}")
    for row in table.itertuples():
        label = row.text if row.question == "all" else f"{row.question:<4} {row.text}"
        print(f"{label:<36}{row.model_rmse:>8.4f}{row.baseline_rmse:>10.4f}")
    title = (f"{cfg.split} split: {len(galaxy_ids)} galaxies, "
             f"RMSE {table['model_rmse'][0]:.4f} (baseline {table['baseline_rmse'][0]:.4f})")
    names = evaluation_files(cfg.split)
    files = {names[0]: csv_writer(table, float_format="%.6f"),
             names[1]: lambda path: plot_evaluation(table, path, title)}
    if len(members) > 1:
        files[names[2]] = csv_writer(report_members(members, result.members, predictions, targets),
                                     float_format="%.6f")
    if result.views > 1:
        files.update(report_spread(cfg.split, result.std, predictions, targets, result.views))
    rescue = {"galaxy_id": galaxy_ids, "mean": predictions, "std": result.std, "members": result.members}
    if uncertainty is not None and uncertainty.calibration is not None:
        files.update(coverage_report(cfg.split, uncertainty.calibration, predictions, result.std, result.views,
                                     targets))
        rescue["sigma"] = calibrated_sigma(uncertainty.calibration, predictions, result.std)
    elif uncertainty is not None:
        print(f"no calibrated sigma: {uncertainty.reason}")
    os.makedirs(cfg.out_dir, exist_ok=True)
    written = [] if written is None else written
    paths, removed = write_file_set(cfg.out_dir, files, names, rescue, written)
    for path in removed:
        print(f"removed {path}: an earlier run's, it does not belong with these results")
    print(f"wrote {', '.join(paths)}")
    if cfg.embed:
        save_embeddings(cfg.out_dir, result, [cfg.split] * len(result.names), written)
