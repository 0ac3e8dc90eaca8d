"""What each choice around the seed architecture is worth on real galaxies (python bench.py accuracy):
every row of benchmarks/ACCURACY.md, trained from scratch through train.py and scored through
predict.py, and the ensembles scored on the test split.
"""
from pathlib import Path
import subprocess
import sys
import time

import pandas as pd

from config import build_config
from galaxy.files import atomic_write
from galaxy.preprocessing import preprocess

# What each choice around the seed architecture is worth on real galaxies. Every row trains from
# scratch on the real sample and is judged by its best validation RMSE. The rows spell out every
# key the table varies, so they mean the same thing whatever config.py's defaults become.
ROTATE_ZOOM_SHIFT = {"aug_rotate": 180.0, "aug_zoom": 0.1, "aug_shift": 0.03}
NO_ROTATE_ZOOM_SHIFT = {"aug_rotate": 0.0, "aug_zoom": 0.0, "aug_shift": 0.0}
SEED_SETTINGS = {"crop": "roi", "output": "sigmoid", "dropout": 0.5, **NO_ROTATE_ZOOM_SHIFT}
STOP7_DEFAULTS = {"crop": "roi", "output": "tree", "dropout": 0.1, "epochs": 40, "lr": 1e-3, "batch_size": 64,
                  "schedule": "onecycle", "aug_flips": True, **NO_ROTATE_ZOOM_SHIFT, "seed": 1337, "split_seed": 1337}
FP32 = {"amp": "false", "channels_last": "false"}   # what the CPU ran before numerics "auto" (stop 8)
ACCURACY_RUNS = [
    ("seed settings (sigmoid, dropout 0.5), 15 epochs", {**SEED_SETTINGS, "epochs": 15}),
    ("seed settings, 20 epochs", {**SEED_SETTINGS, "epochs": 20}),
    ("tree head, dropout 0.5, 15 epochs", {**SEED_SETTINGS, "output": "tree", "epochs": 15}),
    ("tree head, dropout 0.5, rotate/zoom/shift, 15 epochs",
     {**SEED_SETTINGS, "output": "tree", **ROTATE_ZOOM_SHIFT, "epochs": 15}),
    ("tree head, dropout 0.5, center crop, 15 epochs",
     {**SEED_SETTINGS, "output": "tree", "crop": "center", "epochs": 15}),
    ("tree head, dropout 0.25, 15 epochs", {**SEED_SETTINGS, "output": "tree", "dropout": 0.25, "epochs": 15}),
    ("tree head, dropout 0.1, 15 epochs", {**SEED_SETTINGS, "output": "tree", "dropout": 0.1, "epochs": 15}),
    ("sigmoid head, dropout 0.1, 15 epochs", {**SEED_SETTINGS, "dropout": 0.1, "epochs": 15}),
    ("tree head, dropout 0.1, rotate/zoom/shift, 15 epochs",
     {**SEED_SETTINGS, "output": "tree", "dropout": 0.1, **ROTATE_ZOOM_SHIFT, "epochs": 15}),
    ("tree head, dropout 0.1, rotate/zoom/shift, 40 epochs",
     {**SEED_SETTINGS, "output": "tree", "dropout": 0.1, **ROTATE_ZOOM_SHIFT, "epochs": 40}),
    # stop 7's defaults: tree head, dropout 0.1, flips only, 40 epochs, ROI crop
    ("defaults (ROI crop), fp32 NCHW", {**STOP7_DEFAULTS, **FP32}),
    ("defaults (ROI crop) but lr 2e-3", {**STOP7_DEFAULTS, **FP32, "lr": 2e-3}),
    ("defaults (ROI crop) but batch size 32", {**STOP7_DEFAULTS, **FP32, "batch_size": 32}),
    ("defaults (ROI crop) but cosine schedule", {**STOP7_DEFAULTS, **FP32, "schedule": "cosine"}),
    ("defaults but center crop, fp32 NCHW", {**STOP7_DEFAULTS, **FP32, "crop": "center"}),
    # issue #9: the numerics amp=auto picks on this CPU (bf16 + channels_last on one with bf16 units)
    ("ROI crop, numerics auto", {**STOP7_DEFAULTS}),
    # issue #10: a second seed of each crop (split_seed stays 1337: the same val and test galaxies)
    ("center crop, numerics auto", {**STOP7_DEFAULTS, "crop": "center"}),
    ("ROI crop, numerics auto, seed 1", {**STOP7_DEFAULTS, "seed": 1}),
    ("center crop, numerics auto, seed 1", {**STOP7_DEFAULTS, "crop": "center", "seed": 1}),
]
# Ensemble members: the defaults (numerics auto) with one of these crops, and a seed. Each is
# trained once into accuracy/members/<variant>/member_<seed>/ and shared by every ensemble naming it.
MEMBER_VARIANTS = {
    "center": {"crop": "center"},                               # 212 raw pixels, the default
    "center160": {"crop": "center", "center_crop_size": 160},   # the central 160 px: the galaxy larger
    "center128": {"crop": "center", "center_crop_size": 128},   # the central 128 px
    "center280": {"crop": "center", "center_crop_size": 280},   # 280 px: more of the surroundings
    "roi": {"crop": "roi"},                                     # the galaxy's own box
    "rzs80": {"crop": "center", **ROTATE_ZOOM_SHIFT, "epochs": 80},   # 212 px, rotate/zoom/shift, twice as long
    # stop 10: the same augmentation and length at the other crops
    "center160_rzs80": {"crop": "center", "center_crop_size": 160, **ROTATE_ZOOM_SHIFT, "epochs": 80},
    "center128_rzs80": {"crop": "center", "center_crop_size": 128, **ROTATE_ZOOM_SHIFT, "epochs": 80},
    "roi_rzs80": {"crop": "roi", **ROTATE_ZOOM_SHIFT, "epochs": 80},
    # stop 12 (trained on a GPU): the same at 160 epochs
    "rzs160": {"crop": "center", **ROTATE_ZOOM_SHIFT, "epochs": 160},
    "center160_rzs160": {"crop": "center", "center_crop_size": 160, **ROTATE_ZOOM_SHIFT, "epochs": 160},
    "center128_rzs160": {"crop": "center", "center_crop_size": 128, **ROTATE_ZOOM_SHIFT, "epochs": 160},
    "roi_rzs160": {"crop": "roi", **ROTATE_ZOOM_SHIFT, "epochs": 160},
    "center160_rzs120": {"crop": "center", "center_crop_size": 160, **ROTATE_ZOOM_SHIFT, "epochs": 120},
}
# stop 13: the stop-10 recipe as a final fit, trained on the val galaxies too (the test split is the same)
MEMBER_VARIANTS.update({f"{variant}_tv": {**MEMBER_VARIANTS[variant], "train_on_val": True}
                        for variant in ("rzs80", "center160_rzs80", "center128_rzs80")})
# stop 14: the 160-px recipe with brightness augmentation (not adopted: 0.00025 better on val)
MEMBER_VARIANTS["center160_rzs80_b10"] = {**MEMBER_VARIANTS["center160_rzs80"], "aug_brightness": 0.1}
# stop 15: the 160-px recipe at half and twice the dropout (neither adopted: 0.0002 better and 0.0012 worse on val)
MEMBER_VARIANTS["center160_rzs80_d05"] = {**MEMBER_VARIANTS["center160_rzs80"], "dropout": 0.05}
MEMBER_VARIANTS["center160_rzs80_d20"] = {**MEMBER_VARIANTS["center160_rzs80"], "dropout": 0.2}
# stop 16: the 160-px recipe at half and twice the peak lr (neither adopted: 0.0002 better over 3 seeds, worse)
MEMBER_VARIANTS["center160_rzs80_lr5e-4"] = {**MEMBER_VARIANTS["center160_rzs80"], "lr": 5e-4}
MEMBER_VARIANTS["center160_rzs80_lr2e-3"] = {**MEMBER_VARIANTS["center160_rzs80"], "lr": 2e-3}
# stop 21: the two near-misses together (adopted: 0.0008 better on val over 3 seeds), and an average of the
# weights (--ema); then the adopted pair as final fits at 160 and 128 px
STOP21_RECIPE = {"dropout": 0.05, "lr": 5e-4}
MEMBER_VARIANTS["center160_rzs80_d05_lr5e-4"] = {**MEMBER_VARIANTS["center160_rzs80"], **STOP21_RECIPE}
MEMBER_VARIANTS["center160_rzs80_d05_lr5e-4_ema998"] = {**MEMBER_VARIANTS["center160_rzs80_d05_lr5e-4"],
                                                         "ema": 0.998}
# (stop 21 trained the 160 and 128 px ones, stop 23 the 212 px one, "rzs80", and the ROI one too)
MEMBER_VARIANTS.update({f"{variant}_d05_lr5e-4_tv": {**MEMBER_VARIANTS[variant], **STOP21_RECIPE, "train_on_val": True}
                        for variant in ("rzs80", "center160_rzs80", "center128_rzs80", "roi_rzs80")})
# stop 12's 17 members of 160 epochs (trained 12 at a time on one H200)
STOP12_MEMBERS = ([("center160_rzs160", seed) for seed in range(101, 107)]
                  + [(variant, seed) for variant in ("rzs160", "center128_rzs160") for seed in range(101, 106)]
                  + [("roi_rzs160", 101)])
STOP12_FINAL = STOP12_MEMBERS + [("center160_rzs120", 1337), ("center160_rzs160", 1337), ("rzs160", 1337)]
# stop 13's final-fit members: seeds 201 and 202 of the three center crops, trained on train + val
FINAL_FIT_MEMBERS = [(variant, seed) for seed in (201, 202)
                     for variant in ("center160_rzs80_tv", "rzs80_tv", "center128_rzs80_tv")]
# stop 14's: more seeds of the two best final-fit crops
STOP14_FINAL_FIT = [(variant, seed) for seed in (203, 204) for variant in ("center160_rzs80_tv", "center128_rzs80_tv")]
# stop 15's: four more seeds of the 160-px final fit, the best crop's
STOP15_FINAL_FIT = [("center160_rzs80_tv", seed) for seed in (205, 206, 207, 208)]
# stop 21's composition, fixed before its final fits trained: the adopted recipe's three val-scored members
# and four final fits
STOP21_MEMBERS = ([("center160_rzs80_d05_lr5e-4", seed) for seed in (1337, 1, 2)]
                  + [(variant, seed) for variant in ("center160_rzs80_d05_lr5e-4_tv", "center128_rzs80_d05_lr5e-4_tv")
                     for seed in (401, 402)])
# stop 22's, fixed before they trained: four more final-fit pairs of the adopted recipe
STOP22_FINAL_FIT = [(variant, seed) for seed in (403, 404, 405, 406)
                    for variant in ("center160_rzs80_d05_lr5e-4_tv", "center128_rzs80_d05_lr5e-4_tv")]
# stop 23's, fixed before they trained: the same recipe's final fits at all four crops, for a composition
# that differs more than seeds of one crop do
STOP23_FINAL_FIT = [(f"{variant}_d05_lr5e-4_tv", seed) for seed in (501, 502)
                    for variant in ("rzs80", "center160_rzs80", "center128_rzs80", "roi_rzs80")]
# Ensembles, scored on the test split with 8-fold TTA. The compositions were fixed on val (ACCURACY.md).
ENSEMBLE_RUNS = [
    ("5 members, center crop, seeds 1337 and 1-4", [("center", seed) for seed in (1337, 1, 2, 3, 4)]),
    ("5 members, mixed: center seeds 1-3 + ROI seeds 1337 and 1", [("center", 1), ("center", 2), ("center", 3),
                                                                   ("roi", 1337), ("roi", 1)]),
    # stop 9: two seeds of each of four crops; the second with the 212-px members as rzs80 (chosen on val)
    ("8 members, 4 crops x seeds 1337 and 1",
     [(variant, seed) for variant in ("center", "center160", "center128", "roi") for seed in (1337, 1)]),
    ("8 members, 4 crops x seeds 1337 and 1, the 212-px ones rzs80",
     [(variant, seed) for variant in ("rzs80", "center160", "center128", "roi") for seed in (1337, 1)]),
    # stop 10: every crop with rotate/zoom/shift and 80 epochs (chosen on val among five)
    ("8 members, 4 crops x seeds 1337 and 1, all rzs80",
     [(variant, seed) for variant in ("rzs80", "center160_rzs80", "center128_rzs80", "roi_rzs80")
      for seed in (1337, 1)]),
    # stop 11: four seeds of the three center crops (chosen on val among four; not better on test)
    ("14 members, 3 center crops x seeds 1337 and 1-3 + ROI x seeds 1337 and 1, all rzs80",
     [(variant, seed) for variant in ("rzs80", "center160_rzs80", "center128_rzs80") for seed in (1337, 1, 2, 3)]
     + [("roi_rzs80", seed) for seed in (1337, 1)]),
    # stop 12, chosen on val among four (benchmarks/ACCURACY.md); python bench.py accuracy --device=cuda trains
    # the members one after another
    ("17 members, 160 epochs: 160 px x seeds 101-106, 212 and 128 px x 101-105, ROI x 101, all rotate/zoom/shift",
     STOP12_MEMBERS),
    # stop 12's final choice by the same rule: the 17 + three CPU members of seed 1337
    ("20 members: the 17 above + 160 px at 120 and 160 epochs and 212 px at 160 epochs, seed 1337",
     STOP12_FINAL),
    # stop 13, fixed before training (no val score is possible for a final-fit member): the 20 + the final fits
    ("26 members: the 20 above + 6 trained on train + val (160, 212, 128 px x seeds 201, 202), rotate/zoom/shift",
     STOP12_FINAL + FINAL_FIT_MEMBERS),
    ("6 members trained on train + val alone", FINAL_FIT_MEMBERS),
    # stop 14, fixed before training: the 26 + four more final fits of the two best crops
    ("30 members: the 26 above + 4 trained on train + val (160, 128 px x seeds 203, 204), rotate/zoom/shift",
     STOP12_FINAL + FINAL_FIT_MEMBERS + STOP14_FINAL_FIT),
    ("10 members trained on train + val alone", FINAL_FIT_MEMBERS + STOP14_FINAL_FIT),
    # stop 15, fixed before training: the 30 + four more final fits at 160 px
    ("34 members: the 30 above + 4 trained on train + val (160 px x seeds 205-208), rotate/zoom/shift",
     STOP12_FINAL + FINAL_FIT_MEMBERS + STOP14_FINAL_FIT + STOP15_FINAL_FIT),
    ("14 members trained on train + val alone", FINAL_FIT_MEMBERS + STOP14_FINAL_FIT + STOP15_FINAL_FIT),
    # stop 21, fixed before its final fits trained: dropout 0.05 and lr 5e-4 (adopted on val)
    ("7 members, dropout 0.05, lr 5e-4: 160 px x seeds 1337, 1, 2 + train + val (160, 128 px x seeds 401, 402)",
     STOP21_MEMBERS),
    # stop 22, fixed before training: the 7 + eight final fits of the same recipe
    ("15 members: the 7 above + 8 trained on train + val (160, 128 px x seeds 403-406), dropout 0.05, lr 5e-4",
     STOP21_MEMBERS + STOP22_FINAL_FIT),
    # stop 23, fixed before training: final fits of that recipe at four crops
    ("8 members trained on train + val (212, 160, 128 px, ROI x seeds 501, 502), dropout 0.05, lr 5e-4",
     STOP23_FINAL_FIT),
]


def _slug(name):
    """A row's or ensemble's name as a folder name under runs/accuracy/."""
    for text, replacement in ((" ", "_"), (",", ""), ("/", "-"), (":", ""), ("+", "and")):
        name = name.replace(text, replacement)
    return name


def _run_script(script, args):
    """Run one of the project's scripts; True if it succeeded."""
    command = [sys.executable, str(Path(__file__).parent / script), *args]
    return subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode == 0


def _train_and_measure(name, overrides, out_dir):
    """Train once through train.py's command line, then score best.pt on val with 8-fold TTA."""
    args = [f"--{key}={value}" for key, value in {**overrides, "out_dir": out_dir}.items()]
    started = time.perf_counter()
    if not _run_script("train.py", args):
        return {"run": name, "error": "train.py failed; rerun its command to see why"}
    minutes = (time.perf_counter() - started) / 60
    metrics = pd.read_csv(Path(out_dir) / "metrics.csv")
    best = metrics["val_rmse"].idxmin()
    row = {"run": name, "val_rmse": round(float(metrics["val_rmse"][best]), 4),
           "best_epoch": int(metrics["epoch"][best]), "epochs": int(metrics["epoch"].iloc[-1]),
           "train_minutes": round(minutes, 1)}
    tta_args = [f"--checkpoint={Path(out_dir) / 'best.pt'}", f"--processed_dir={overrides['processed_dir']}",
                f"--out_dir={out_dir}", "--split=val", "--tta"]
    if _run_script("predict.py", tta_args):
        evaluation = pd.read_csv(Path(out_dir) / "eval_val.csv")
        row["val_rmse_tta"] = round(float(evaluation["model_rmse"][0]), 4)
    return row


def _processed_for(settings, cfg, results_dir):
    """One processed folder per crop setting, made once and reused by every row that needs it."""
    size = f"_{settings.center_crop_size}" if settings.crop == "center" else ""
    processed_dir = str(results_dir / f"data_{settings.crop}{size}_{settings.image_size}")
    preprocess(build_config({**settings.to_dict(), "raw_dir": cfg.raw_dir, "processed_dir": processed_dir}),
                          progress=False)
    return processed_dir


def member_settings(variant, seed, overrides=None):
    """An ensemble member's train.py settings: the stop-7 defaults, its variant, then the command
    line's overrides (so --epochs=3 shortens every member), and its seed."""
    return {**STOP7_DEFAULTS, **MEMBER_VARIANTS[variant], **(overrides or {}), "seed": seed}


def _ensemble_row(name, members, cfg, overrides, results_dir):
    """Train the members that are not trained yet, then score the ensemble on the test split with TTA,
    beside its best and its mean member (predict.py's eval_test_members.csv)."""
    paths = []
    for variant, seed in members:
        member = member_settings(variant, seed, overrides)
        processed_dir = _processed_for(build_config(member), cfg, results_dir)
        out_dir = results_dir / "members" / variant / f"member_{seed}"
        if not (out_dir / "best.pt").is_file() or not _run_script("train.py", [f"--out_dir={out_dir}", "--resume"]):
            args = {**member, "processed_dir": processed_dir, "out_dir": out_dir}
            if not _run_script("train.py", [f"--{key}={value}" for key, value in args.items()]):
                return {"run": name, "error": f"train.py failed for {out_dir}; rerun its command to see why"}
        paths.append(str(out_dir / "best.pt"))
    eval_dir = results_dir / _slug(name)
    args = [f"--checkpoint={','.join(paths)}", f"--processed_dir={processed_dir}", f"--raw_dir={cfg.raw_dir}",
            "--split=test", "--tta", f"--out_dir={eval_dir}"]
    if not _run_script("predict.py", args):
        return {"run": name, "error": "predict.py failed; rerun its command to see why"}
    rmse_of = dict(pd.read_csv(eval_dir / "eval_test_members.csv").itertuples(index=False))
    best = next(value for model, value in rmse_of.items() if model.startswith("best member"))
    return {"run": name, "test_rmse_tta": round(rmse_of["ensemble"], 4), "best_member_tta": round(best, 4),
            "mean_member_tta": round(rmse_of["mean member"], 4)}


def run_accuracy(cfg, overrides):
    """Every row of ACCURACY_RUNS and ENSEMBLE_RUNS on the real sample; prints the markdown table
    and saves it as CSV.

    Overrides given on the command line apply to every row (e.g. --epochs=3 for a quick check).
    """
    results_dir = Path(cfg.out_dir) / "accuracy"
    rows = []
    for name, run_overrides in ACCURACY_RUNS:
        settings = build_config({"raw_dir": cfg.raw_dir, **overrides, **run_overrides})
        print(f"training: {name} ...", flush=True)
        train_overrides = {**run_overrides, **overrides,
                           "processed_dir": _processed_for(settings, cfg, results_dir)}
        rows.append(_train_and_measure(name, train_overrides, results_dir / _slug(name)))
        print(rows[-1], flush=True)
    for name, members in ENSEMBLE_RUNS:
        print(f"ensemble: {name} ...", flush=True)
        rows.append(_ensemble_row(name, members, cfg, overrides, results_dir))
        print(rows[-1], flush=True)
    table = pd.DataFrame(rows)
    atomic_write(results_dir / "accuracy.csv", lambda tmp: table.to_csv(tmp, index=False))
    print(table.to_string(index=False))
    print(f"saved {results_dir / 'accuracy.csv'}")
