"""python bench.py accuracy: what each choice around the baseline CNN is worth on real galaxies, every
row of benchmarks/ACCURACY.md trained from scratch through train.py and scored through predict.py.

    python bench.py accuracy                  # -> runs/accuracy/accuracy.csv, a folder per row
    python bench.py accuracy --epochs=3       # a quick check: overrides apply to every row
    python bench.py accuracy --device=cuda    # the members of 160 epochs want a GPU

Three kinds of row, in this order: (a) single runs, one change at a time, grouped by topic, each
scored on val (best epoch, then best.pt with 8-fold TTA) and on test with and without TTA;
(b) every recipe in recipes/, run end to end by `train.py --recipe`; (c) ensembles of (a)'s runs
and (b)'s recipes, scored on test with TTA. Every row uses split_seed 1337: the same 300 val and
300 test galaxies of the 3,000-galaxy subset (subsets/galaxy_zoo_3000.csv).

A row's processes log to runs/accuracy/<row>/train.log and predict.log; the terminal gets a line as
each row starts and ends. accuracy.csv is rewritten as each row finishes, and a rerun skips the rows
already in it (a half-trained run resumes from its last.pt).
"""
from contextlib import redirect_stderr, redirect_stdout
import glob
import math
from pathlib import Path
import re
import subprocess
import sys
import time

import pandas as pd

from config import build_config, script_keys
from galaxy.files import atomic_write
from galaxy.preprocessing import preprocess
from galaxy.recipes import as_args, available, load_recipe, processed_dir_for

REPO = Path(__file__).resolve().parents[1]

# --- the settings ----------------------------------------------------------------------------
# Each row spells out every key the table varies, so it means the same whatever config.py's
# defaults become.
ROTATE_ZOOM_SHIFT = {"aug_rotate": 180.0, "aug_zoom": 0.1, "aug_shift": 0.03}
NO_ROTATE_ZOOM_SHIFT = {"aug_rotate": 0.0, "aug_zoom": 0.0, "aug_shift": 0.0}
# the defaults before the center crop: tree head, dropout 0.1, flips only, 40 epochs, ROI crop
ROI_DEFAULTS = {"crop": "roi", "output": "tree", "dropout": 0.1, "epochs": 40, "lr": 1e-3, "batch_size": 64,
                "schedule": "onecycle", "aug_flips": True, **NO_ROTATE_ZOOM_SHIFT, "seed": 1337, "split_seed": 1337}
BASELINE_CNN = {**ROI_DEFAULTS, "output": "sigmoid", "dropout": 0.5}   # the original design's settings
CENTER_DEFAULTS = {**ROI_DEFAULTS, "crop": "center", "center_crop_size": 212}   # recipes/flips_40.py
FP32 = {"amp": "false", "channels_last": "false"}   # what the CPU ran before numerics "auto" picked bf16 there
TREE_15 = {**BASELINE_CNN, "output": "tree", "epochs": 15}
AUG_80 = {**CENTER_DEFAULTS, **ROTATE_ZOOM_SHIFT, "epochs": 80}   # the 80-epoch recipe, at 212 px
C160, C128 = {**AUG_80, "center_crop_size": 160}, {**AUG_80, "center_crop_size": 128}
ADOPTED = {"dropout": 0.05, "lr": 5e-4}   # adopted on val for the 80-epoch recipe
FINAL_FIT = {"train_on_val": True}        # trained on the val galaxies too: scored on test only


def seeds(name, settings, *numbers):
    """{"<name>, seed <n>": settings at seed n} for each seed: one row each."""
    return {f"{name}, seed {n}": {**settings, "seed": n} for n in numbers}


def members(name, *numbers):
    return [f"{name}, seed {n}" for n in numbers]


RZS = "rotate/zoom/shift, 80 epochs"
ABLATIONS = {
    "head": {
        "baseline CNN (sigmoid head, dropout 0.5, ROI crop, flips only), 15 epochs": {**BASELINE_CNN, "epochs": 15},
        "tree head, dropout 0.5, 15 epochs": TREE_15,
        "sigmoid head, dropout 0.1, 15 epochs": {**BASELINE_CNN, "dropout": 0.1, "epochs": 15},
    },
    "dropout": {
        "tree head, dropout 0.25, 15 epochs": {**TREE_15, "dropout": 0.25},
        "tree head, dropout 0.1, 15 epochs": {**TREE_15, "dropout": 0.1},
        **seeds(f"160 px, {RZS}, dropout 0.05", {**C160, "dropout": 0.05}, 1337, 1, 2),
        **seeds(f"160 px, {RZS}, dropout 0.2", {**C160, "dropout": 0.2}, 1337),
    },
    "epochs": {
        "baseline CNN, 20 epochs": {**BASELINE_CNN, "epochs": 20},
        "tree head, dropout 0.1, rotate/zoom/shift, 40 epochs": {**TREE_15, "dropout": 0.1, **ROTATE_ZOOM_SHIFT,
                                                                 "epochs": 40},
        **seeds("160 px, rotate/zoom/shift, 120 epochs", {**C160, "epochs": 120}, 1337),
        **seeds("160 px, rotate/zoom/shift, 160 epochs", {**C160, "epochs": 160}, 1337),
        **seeds("212 px, rotate/zoom/shift, 160 epochs", {**AUG_80, "epochs": 160}, 1337),
    },
    "augmentation": {
        "tree head, dropout 0.5, rotate/zoom/shift, 15 epochs": {**TREE_15, **ROTATE_ZOOM_SHIFT},
        "tree head, dropout 0.1, rotate/zoom/shift, 15 epochs": {**TREE_15, "dropout": 0.1, **ROTATE_ZOOM_SHIFT},
        **seeds(f"212 px, {RZS}", AUG_80, 1337, 1, 2, 3),
        **seeds(f"160 px, {RZS}", C160, 1337, 1, 2, 3),
        **seeds(f"128 px, {RZS}", C128, 1337, 1, 2, 3),
        **seeds(f"ROI crop, {RZS}", {**AUG_80, "crop": "roi"}, 1337, 1),
        **seeds(f"160 px, {RZS}, brightness 0.1", {**C160, "aug_brightness": 0.1}, 1337, 1),
    },
    "crop": {
        "tree head, dropout 0.5, center crop 212 px, 15 epochs": {**TREE_15, "crop": "center",
                                                                  "center_crop_size": 212},
        "ROI defaults but center crop 212 px, fp32 NCHW": {**CENTER_DEFAULTS, **FP32},
        **seeds("center crop 212 px (flips_40)", CENTER_DEFAULTS, 1337, 1, 2, 3, 4),
        **seeds("center crop 160 px", {**CENTER_DEFAULTS, "center_crop_size": 160}, 1337, 1),
        **seeds("center crop 128 px", {**CENTER_DEFAULTS, "center_crop_size": 128}, 1337, 1),
        **seeds("center crop 280 px", {**CENTER_DEFAULTS, "center_crop_size": 280}, 1337),
        **seeds(f"160 px, {RZS}, 96x96 input", {**C160, "image_size": 96}, 101),
    },
    "lr, batch size, schedule": {
        "ROI defaults but lr 2e-3": {**ROI_DEFAULTS, **FP32, "lr": 2e-3},
        "ROI defaults but batch size 32": {**ROI_DEFAULTS, **FP32, "batch_size": 32},
        "ROI defaults but cosine schedule": {**ROI_DEFAULTS, **FP32, "schedule": "cosine"},
        **seeds(f"160 px, {RZS}, lr 5e-4", {**C160, "lr": 5e-4}, 1337, 1, 2),
        **seeds(f"160 px, {RZS}, lr 2e-3", {**C160, "lr": 2e-3}, 1337),
        **seeds(f"160 px, {RZS}, dropout 0.05, lr 5e-4", {**C160, **ADOPTED}, 1337, 1, 2),
    },
    "weight decay": {
        **seeds(f"160 px, {RZS}, weight decay 1e-4", {**C160, "weight_decay": 1e-4}, 101),
        **seeds(f"160 px, {RZS}, weight decay 5e-4", {**C160, "weight_decay": 5e-4}, 101),
    },
    "numerics": {
        "ROI defaults, fp32 NCHW": {**ROI_DEFAULTS, **FP32},
        **seeds("ROI defaults, numerics auto", ROI_DEFAULTS, 1337, 1),
    },
    "EMA": {
        **seeds(f"160 px, {RZS}, dropout 0.05, lr 5e-4, EMA 0.998", {**C160, **ADOPTED, "ema": 0.998}, 1337, 1, 2),
    },
    "final fit": {
        **seeds(f"final fit, 160 px, {RZS}", {**C160, **FINAL_FIT}, *range(201, 209)),
        **seeds(f"final fit, 212 px, {RZS}", {**AUG_80, **FINAL_FIT}, 201, 202),
        **seeds(f"final fit, 128 px, {RZS}", {**C128, **FINAL_FIT}, 201, 202, 203, 204),
        **seeds(f"final fit, 160 px, {RZS}, dropout 0.05, lr 5e-4", {**C160, **ADOPTED, **FINAL_FIT},
                *range(401, 407)),
        **seeds(f"final fit, 128 px, {RZS}, dropout 0.05, lr 5e-4", {**C128, **ADOPTED, **FINAL_FIT},
                *range(401, 407)),
    },
}
RECIPES = available()   # (b): every recipe in recipes/, its row named "recipe <name>"

# (c) Ensembles of (a)'s rows and (b)'s recipes ("recipe <name>": all its members), each member with
# 8-fold TTA; the compositions were fixed before they were scored (benchmarks/ACCURACY.md).
CENTER_212, ROI_AUTO = "center crop 212 px (flips_40)", "ROI defaults, numerics auto"
FOUR_CROPS = (CENTER_212, "center crop 160 px", "center crop 128 px", ROI_AUTO)
FOUR_CROPS_80 = (f"212 px, {RZS}", f"160 px, {RZS}", f"128 px, {RZS}", f"ROI crop, {RZS}")
GPU_AND_CPU_20 = (["recipe gpu_ensemble"] + members("160 px, rotate/zoom/shift, 120 epochs", 1337)
                  + members("160 px, rotate/zoom/shift, 160 epochs", 1337)
                  + members("212 px, rotate/zoom/shift, 160 epochs", 1337))
FINAL_FITS_6 = [row for seed in (201, 202) for crop in ("160", "212", "128")
                for row in members(f"final fit, {crop} px, {RZS}", seed)]
FINAL_FITS_10 = FINAL_FITS_6 + [row for seed in (203, 204) for crop in ("160", "128")
                                for row in members(f"final fit, {crop} px, {RZS}", seed)]
FINAL_FITS_14 = FINAL_FITS_10 + members(f"final fit, 160 px, {RZS}", 205, 206, 207, 208)
ADOPTED_7 = (members(f"160 px, {RZS}, dropout 0.05, lr 5e-4", 1337, 1, 2)
             + [row for crop in ("160", "128")
                for row in members(f"final fit, {crop} px, {RZS}, dropout 0.05, lr 5e-4", 401, 402)])
ENSEMBLES = {
    "5 members: center crop 212 px x seeds 1337, 1-4": members(CENTER_212, 1337, 1, 2, 3, 4),
    "5 members: center crop 212 px x seeds 1-3 + ROI crop x seeds 1337, 1": members(CENTER_212, 1, 2, 3)
    + members(ROI_AUTO, 1337, 1),
    "8 members: 212, 160, 128 px, ROI x seeds 1337, 1": [m for crop in FOUR_CROPS for m in members(crop, 1337, 1)],
    "8 members: as above, the 212-px ones rotate/zoom/shift at 80 epochs":
        [m for crop in (FOUR_CROPS_80[0],) + FOUR_CROPS[1:] for m in members(crop, 1337, 1)],
    "8 members: 212, 160, 128 px, ROI x seeds 1337, 1, all rotate/zoom/shift at 80 epochs":
        [m for crop in FOUR_CROPS_80 for m in members(crop, 1337, 1)],
    "14 members: 212, 160, 128 px x seeds 1337, 1-3 + ROI x 1337, 1, all rotate/zoom/shift at 80 epochs":
        [m for crop in FOUR_CROPS_80[:3] for m in members(crop, 1337, 1, 2, 3)] + members(FOUR_CROPS_80[3], 1337, 1),
    "20 members: recipe gpu_ensemble + 160 px at 120 and 160 epochs and 212 px at 160 epochs, seed 1337":
        GPU_AND_CPU_20,
    "26 members: the 20 + 6 final fits (160, 212, 128 px x seeds 201, 202)": GPU_AND_CPU_20 + FINAL_FITS_6,
    "6 final fits alone": FINAL_FITS_6,
    "30 members: the 26 + 4 final fits (160, 128 px x seeds 203, 204)": GPU_AND_CPU_20 + FINAL_FITS_10,
    "10 final fits alone": FINAL_FITS_10,
    "34 members: the 30 + 4 final fits (160 px x seeds 205-208)": GPU_AND_CPU_20 + FINAL_FITS_14,
    "14 final fits alone": FINAL_FITS_14,
    "7 members, dropout 0.05, lr 5e-4: 160 px x seeds 1337, 1, 2 + final fits (160, 128 px x seeds 401, 402)":
        ADOPTED_7,
    "15 members: the 7 + 8 final fits (160, 128 px x seeds 403-406), dropout 0.05, lr 5e-4":
        ADOPTED_7 + [m for crop in ("160", "128")
                     for m in members(f"final fit, {crop} px, {RZS}, dropout 0.05, lr 5e-4", 403, 404, 405, 406)],
}
# bench.py's own keys, and the paths each row sets itself: never passed on to a row's scripts
NOT_PASSED = ("raw_dir", "processed_dir", "out_dir", "recipe", "members", "resume", "scale", "demo", "demo_dir",
              "demo_train", "demo_test")


def rows():
    """{row name: (topic, its settings)} of every single run."""
    return {name: (topic, settings) for topic, table in ABLATIONS.items() for name, settings in table.items()}


# --- running a row --------------------------------------------------------------------------------

def slug(name):
    """A row's name as a folder name under runs/accuracy/."""
    return re.sub(r"[^A-Za-z0-9.-]+", "_", name.replace("+", "and").replace("/", "-")).strip("_")


def run_logged(script, args, log_path):
    """One of the project's scripts, its output appended to log_path; its exit code."""
    Path(log_path).parent.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-u", str(REPO / script), *args]
    with open(log_path, "a") as log:
        log.write(f"$ {' '.join(command)}\n")
        log.flush()
        return subprocess.run(command, stdout=log, stderr=subprocess.STDOUT).returncode


_prepared = set()


def processed_for(settings, cfg, results):
    """The PNGs of settings' crop, made once per crop into results/data_<crop> (the folders that
    `train.py --recipe --processed_dir=results/data` uses too); preprocess's output goes to a log."""
    member = build_config({**settings, "raw_dir": cfg.raw_dir})
    folder = processed_dir_for(str(results / "data"), member)
    if folder not in _prepared:
        Path(folder).mkdir(parents=True, exist_ok=True)
        with open(f"{folder}.log", "a") as log, redirect_stdout(log), redirect_stderr(log):
            preprocess(build_config({**settings, "raw_dir": cfg.raw_dir, "processed_dir": folder}), progress=False)
        _prepared.add(folder)
    return folder


def eval_rmse(run_dir, split):
    return round(float(pd.read_csv(Path(run_dir) / f"eval_{split}.csv")["model_rmse"][0]), 4)


def single_row(name, settings, cfg, overrides, results):
    """Train one run (resuming a half-done one), then score its best.pt on val and test, with and
    without 8-fold TTA."""
    run_dir = results / slug(name)
    settings = {**settings, **overrides}
    processed = processed_for(settings, cfg, results)
    args = {**settings, "processed_dir": processed, "out_dir": run_dir}
    if (run_dir / "last.pt").is_file():
        args["resume"] = True
    started = time.perf_counter()
    train_log = run_dir / "train.log"
    code = run_logged("train.py", as_args(args), train_log)
    if code:
        return {"error": f"train.py exit {code}; see {train_log}"}
    row = {"train_minutes": round((time.perf_counter() - started) / 60, 1)}
    metrics = pd.read_csv(run_dir / "metrics.csv")
    has_val = metrics["val_rmse"].notna().any()
    if has_val:
        best = metrics["val_rmse"].idxmin()
        row.update(val_rmse=round(float(metrics["val_rmse"][best]), 4), best_epoch=int(metrics["epoch"][best]))
    row["epochs"] = int(metrics["epoch"].iloc[-1])
    predict_keys = [key for key in script_keys("predict") if key in overrides and key not in NOT_PASSED]
    common = [f"--checkpoint={run_dir / 'best.pt'}", f"--processed_dir={processed}", f"--raw_dir={cfg.raw_dir}",
              f"--out_dir={run_dir}", *as_args({key: overrides[key] for key in predict_keys})]
    for split, tta in ([("val", True)] if has_val else []) + [("test", False), ("test", True)]:
        code = run_logged("predict.py", [*common, f"--split={split}", *(["--tta"] if tta else [])],
                          run_dir / "predict.log")
        if code:
            return {**row, "error": f"predict.py exit {code}; see {run_dir / 'predict.log'}"}
        row[f"{split}_rmse{'_tta' if tta else ''}"] = eval_rmse(run_dir, split)
    return row


def recipe_row(recipe, cfg, overrides, results):
    """A recipe run end to end by train.py --recipe (resumable), scored on test with TTA."""
    run_dir = results / slug(f"recipe {recipe}")
    passed = {key: value for key, value in overrides.items() if key not in NOT_PASSED + ("seed",)}
    args = [f"--recipe={recipe}", f"--raw_dir={cfg.raw_dir}", f"--processed_dir={results / 'data'}",
            f"--out_dir={run_dir}", *as_args(passed)]
    code = run_logged("train.py", args, run_dir / "train.log")
    if code:
        return {"error": f"train.py --recipe exit {code}; see {run_dir / 'train.log'}"}
    return {"test_rmse_tta": eval_rmse(run_dir, "test"), **member_scores(run_dir)}


def member_scores(run_dir):
    path = Path(run_dir) / "eval_test_members.csv"
    if not path.is_file():   # one member: no table of members
        return {}
    rmse_of = dict(pd.read_csv(path).itertuples(index=False))
    best = next(value for model, value in rmse_of.items() if model.startswith("best member"))
    return {"best_member_tta": round(best, 4), "mean_member_tta": round(rmse_of["mean member"], 4)}


def ensemble_row(name, member_rows, cfg, overrides, results):
    """Score finished runs and recipes together on the test split with 8-fold TTA."""
    paths = []
    for member in member_rows:
        if member.startswith("recipe "):
            found = sorted(glob.glob(str(results / slug(member) / "*" / "member_*" / "best.pt")))
            if len(found) != load_recipe(member.split(" ", 1)[1]).members():
                return {"error": f"{member} is not trained in full ({len(found)} members); see its train.log"}
            paths += found
        elif not (results / slug(member) / "best.pt").is_file():
            return {"error": f"member {member!r} has no best.pt; see {results / slug(member) / 'train.log'}"}
        else:
            paths.append(str(results / slug(member) / "best.pt"))
    first = next(member for member in member_rows if not member.startswith("recipe "))
    run_dir = results / slug(name)
    predict_keys = [key for key in script_keys("predict") if key in overrides and key not in NOT_PASSED]
    processed = processed_for({**rows()[first][1], **overrides}, cfg, results)
    args = [f"--checkpoint={','.join(paths)}", f"--processed_dir={processed}",
            f"--raw_dir={cfg.raw_dir}", "--split=test", "--tta", f"--out_dir={run_dir}",
            *as_args({key: overrides[key] for key in predict_keys})]
    code = run_logged("predict.py", args, run_dir / "predict.log")
    if code:
        return {"error": f"predict.py exit {code}; see {run_dir / 'predict.log'}"}
    return {"test_rmse_tta": eval_rmse(run_dir, "test"), **member_scores(run_dir)}


# --- the table --------------------------------------------------------------------------------------

def plan():
    """[(topic, row name, what runs it)] in order: single runs, recipes, ensembles."""
    single = [(topic, name, ("run", settings)) for name, (topic, settings) in rows().items()]
    recipes = [("recipes", f"recipe {recipe}", ("recipe", recipe)) for recipe in RECIPES]
    ensembles = [("ensembles", name, ("ensemble", member_rows)) for name, member_rows in ENSEMBLES.items()]
    return single + recipes + ensembles


def result_text(row):
    if "error" in row:
        return f"failed: {row['error']}"
    shown = [(key, row.get(key)) for key in ("val_rmse", "val_rmse_tta", "test_rmse", "test_rmse_tta",
                                             "best_member_tta", "mean_member_tta")]
    return ", ".join(f"{key} {value:.4f}" for key, value in shown if value is not None and not math.isnan(value))


def run_accuracy(cfg, overrides):
    """Every row of plan() on the real sample, skipping those already in accuracy.csv; prints a line as
    each starts and ends, and the whole table at the end. Overrides apply to every row."""
    results = Path(cfg.out_dir) / "accuracy"
    csv_path = results / "accuracy.csv"
    done = pd.read_csv(csv_path).to_dict("records") if csv_path.is_file() else []
    done = [row for row in done if not isinstance(row.get("error"), str)]   # a failed row is tried again
    finished = {row["run"] for row in done}
    passed = {key: value for key, value in overrides.items() if key not in NOT_PASSED}
    steps = plan()
    for number, (topic, name, (kind, what)) in enumerate(steps, 1):
        where = f"[{number}/{len(steps)}] {topic}: {name}"
        if name in finished:
            print(f"{where}: in {csv_path}, skipped", flush=True)
            continue
        print(f"{where} ...", flush=True)
        started = time.perf_counter()
        if kind == "run":
            row = single_row(name, what, cfg, passed, results)
        elif kind == "recipe":
            row = recipe_row(what, cfg, passed, results)
        else:
            row = ensemble_row(name, what, cfg, passed, results)
        print(f"{where}: {result_text(row)} ({(time.perf_counter() - started) / 60:.1f} min)", flush=True)
        done.append({"topic": topic, "run": name, **row})
        results.mkdir(parents=True, exist_ok=True)
        atomic_write(csv_path, lambda tmp: pd.DataFrame(done).to_csv(tmp, index=False))
    print(pd.DataFrame(done).to_string(index=False))
    print(f"saved {csv_path}")
