"""One-command GPU check (python bench.py gpu): every CUDA check of the project in one run, meant
to finish within 8 minutes on one GPU, closing with a Markdown table for benchmarks/RESULTS.md.

    python bench.py gpu

1. the CUDA tests: python -m pytest -q -k cuda tests/ (passed and failed counts);
2. bench.py train on CUDA: training img/s of the model alone and of the whole pipeline, inference img/s,
   and an improving epoch's checkpoint writes (once and linked, against twice);
3. one timed 61,578-image epoch through the pipeline (goal: under 10 s on one H100);
4. predict.py without and with TTA on a synthetic set of PNGs (demo.py + preprocess.py), beside
   the model-only inference rate: on 5,000 PNGs and on 500 of them, so that the rate beyond the
   process's start-up shows (on a GPU the start-up is most of a 5,000-image run);
5. a one-GPU torchrun run of train.py (python -m torch.distributed.run --standalone
   --nproc_per_node=1, 20 steps on the synthetic set), whose checkpoint step 4 predicts with;
6. an ensemble's members side by side (train.py --members_at_once=8) against one member alone,
   on the synthetic set: how many more members an hour the GPU gives that way;
7. predict.py --catalog over 20,000 rows of the synthetic set's JPEGs and FITS cubes of them
   (benchmarks/survey.py), with step 5's checkpoint, against the model-only rate.

Without a CUDA GPU it stops at once with a one-line error.
"""
import dataclasses
import datetime
import math
import os
from pathlib import Path
import re
import shutil
import sys
import tempfile
import time

import torch

from benchmarks.accuracy import ROTATE_ZOOM_SHIFT
from benchmarks.common import INFERENCE_BATCH, machine_name
from benchmarks.scale import check, model_only_rate, run_command, script_command
from benchmarks.speed import bench_train
from benchmarks.survey import GPU_ROWS, catalog_on_gpu
from config import build_config
from galaxy import demo
from galaxy.crop import SETTINGS_FILE
from galaxy.inference import inference_batch
from galaxy.numerics import numerics_name
from galaxy.preprocessing import preprocess

NO_GPU = "error: bench.py gpu needs a CUDA GPU (torch.cuda.is_available() is False)"
DEMO_TRAIN, DEMO_TEST = 2_000, 5_000   # enough test images for predict.py to reach its steady rate
SMALL_TEST = 500   # predict.py on this many of them too: the difference is the rate beyond start-up
TORCHRUN_STEPS = 20
SIDE_BY_SIDE, SIDE_BY_SIDE_EPOCHS = 8, 60   # members at once, and each one's epochs on the 1,600 train PNGs
TARGET_EPOCH_S = 10       # one 61,578-image epoch on one H100
TARGET_TOTAL_S = 8 * 60
STEP_TIMEOUT_S = 240      # no single step may eat the whole budget


def cuda_tests():
    """{"passed": n, "failed": n, "skipped": n, "errors": n, "exit": code, "seconds": s} of the tests
    whose names say cuda, from pytest's closing line."""
    code, seconds, _, output = run_command([sys.executable, "-m", "pytest", "-q", "-k", "cuda", "tests/"],
                                           timeout=STEP_TIMEOUT_S)
    last = output.strip().splitlines()[-1] if output.strip() else "no output"
    counts = {{"error": "errors"}.get(word, word): int(number)
              for number, word in re.findall(r"(\d+) (passed|failed|skipped|errors?)", last)}
    print(f"CUDA tests: {last} ({seconds:.0f} s)", flush=True)
    return {**counts, "exit": code, "seconds": seconds}


def synthetic_set(cfg, folder):
    """The processed folder of a synthetic set of DEMO_TRAIN + DEMO_TEST galaxies made in folder."""
    raw, processed = folder / "raw", folder / "processed"
    demo.make_demo(raw, DEMO_TRAIN, DEMO_TEST, cfg.seed, workers=cfg.workers, progress=False)
    preprocess(build_config({"raw_dir": str(raw), "processed_dir": str(processed),
                                        "workers": cfg.workers}), progress=False)
    return processed


def torchrun_and_predict(cfg, overrides, folder, processed):
    """Train TORCHRUN_STEPS steps under torchrun on the synthetic set, then predict.py its test set
    without and with TTA; the results of both steps."""
    run = folder / "run"
    train_command = script_command("train.py", [f"--processed_dir={processed}", f"--out_dir={run}", "--epochs=1",
                                                f"--max_steps={TORCHRUN_STEPS}"], overrides)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", *train_command[1:]]
    code, seconds, _, output = run_command(command, timeout=STEP_TIMEOUT_S)
    ok = code == 0 and (run / "last.pt").is_file()
    print(f"torchrun, 1 GPU, {TORCHRUN_STEPS} steps: {'ok' if ok else f'FAILED (exit {code})'} in {seconds:.1f} s",
          flush=True)
    results = {"torchrun_ok": ok, "torchrun_seconds": seconds}
    if not ok:
        check(code or 1, output, "torchrun train.py")
    no_raw = folder / "no_raw"   # both runs read the PNGs alone
    no_raw.mkdir()
    sets = {"small": small_processed_copy(processed, folder / "processed_small", SMALL_TEST), "full": processed}
    for tta in (False, True):
        seconds = {}
        for name, processed_dir in sets.items():
            code, seconds[name], _, output = run_command(script_command(
                "predict.py", [f"--checkpoint={run / 'last.pt'}", f"--raw_dir={no_raw}",
                               f"--processed_dir={processed_dir}", f"--out_dir={folder / ('predict_' + name)}",
                               *(["--tta"] if tta else [])], overrides), timeout=STEP_TIMEOUT_S)
            check(code, output, "predict.py")
        key = "predict_tta" if tta else "predict"
        results[key] = DEMO_TEST / seconds["full"]
        results[key + "_beyond"], results[key + "_startup"] = beyond_startup(seconds["small"], seconds["full"])
        print(f"predict.py{' --tta' if tta else ''}: {DEMO_TEST} PNGs in {seconds['full']:.1f} s "
              f"({results[key]:.0f} img/s), {SMALL_TEST} in {seconds['small']:.1f} s: "
              f"{results[key + '_beyond']:.0f} img/s beyond {results[key + '_startup']:.1f} s of start-up", flush=True)
    return results


def members_side_by_side(overrides, folder, processed):
    """Wall seconds of train.py for one member alone and for SIDE_BY_SIDE members at once
    (--members_at_once), SIDE_BY_SIDE_EPOCHS epochs each with the ensemble recipe's augmentation,
    start-up included as a user meets it; and how many more members an hour side by side gives."""
    seconds = {}
    for at_once in (1, SIDE_BY_SIDE):
        args = [f"--processed_dir={processed}", f"--out_dir={folder / f'members_{at_once}'}",
                f"--epochs={SIDE_BY_SIDE_EPOCHS}", f"--members={at_once}", f"--members_at_once={at_once}",
                *(f"--{key}={value}" for key, value in ROTATE_ZOOM_SHIFT.items())]
        code, seconds[at_once], _, output = run_command(
            script_command("train.py", args, overrides), timeout=STEP_TIMEOUT_S)
        check(code, output, f"train.py --members={at_once} --members_at_once={at_once}")
    gain = SIDE_BY_SIDE * seconds[1] / seconds[SIDE_BY_SIDE]
    print(f"members side by side: {SIDE_BY_SIDE} in {seconds[SIDE_BY_SIDE]:.1f} s, one alone in {seconds[1]:.1f} s: "
          f"{gain:.2f}x the members an hour", flush=True)
    return {"alone_seconds": seconds[1], "side_by_side_seconds": seconds[SIDE_BY_SIDE], "side_by_side_gain": gain}


def small_processed_copy(processed, small, count):
    """A processed folder with the first count test PNGs of processed (hard links where possible)
    and its settings, for timing predict.py's start-up."""
    (small / "test").mkdir(parents=True)
    for name in (SETTINGS_FILE, "labels.csv"):
        if (processed / name).is_file():
            shutil.copy(processed / name, small / name)
    for png in sorted((processed / "test").glob("*.png"))[:count]:
        try:
            os.link(png, small / "test" / png.name)
        except OSError:   # another file system
            shutil.copy(png, small / "test" / png.name)
    return small


def beyond_startup(small_seconds, full_seconds):
    """(img/s beyond start-up, start-up seconds) from predict.py's times on SMALL_TEST and DEMO_TEST
    images; NaN for both when the larger run was not slower (nothing to measure)."""
    extra = full_seconds - small_seconds
    if extra <= 0:
        return math.nan, math.nan
    rate = (DEMO_TEST - SMALL_TEST) / extra
    return rate, small_seconds - SMALL_TEST / rate


def predict_result(results, key):
    return (f"{results[key]:,.0f} img/s in all; {results[key + '_beyond']:,.0f} img/s beyond "
            f"{results[key + '_startup']:.1f} s of start-up")


def gpu_table(results, title):
    """The Markdown table of one bench.py gpu run; results as bench_gpu gathers them."""
    tests = results["tests"]
    counts = ", ".join(f"{tests.get(word, 0)} {word}" for word in ("passed", "failed", "skipped", "errors"))
    tests_pass = tests["exit"] == 0 and tests.get("passed", 0) > 0
    model, tta_model = results["model_inference"], results["model_inference"] / 8
    rows = [
        ("CUDA tests (`pytest -q -k cuda tests/`)", f"{counts}, exit {tests['exit']} ({tests['seconds']:.0f} s)",
         f"all pass: {'met' if tests_pass else 'NOT met'}"),
        (f"training, model only ({results['best']})", f"{results['train_model']:,.0f} img/s", ""),
        ("training, full pipeline (gather + augment + step)", f"{results['train_pipeline']:,.0f} img/s",
         f"≥ 0.95 × model only: {results['train_pipeline'] / results['train_model']:.2f}"),
        (f"inference, model only ({results['inference_numerics']}, batch {INFERENCE_BATCH})",
         f"{results['inference']:,.0f} img/s", ""),
        ("one 61,578-image epoch (timed)", f"{results['epoch_seconds']:.2f} s",
         f"< {TARGET_EPOCH_S} s on one H100: {'met' if results['epoch_seconds'] < TARGET_EPOCH_S else 'NOT met'}"),
        ("an improving epoch's checkpoints (best.pt + last.pt)",
         f"{results['checkpoint_once']:.2f} s written once and linked; {results['checkpoint_twice']:.2f} s twice",
         f"once ≤ 0.6 × twice: {results['checkpoint_once'] / results['checkpoint_twice']:.2f}"),
        (f"predict.py, {DEMO_TEST:,} PNGs", predict_result(results, "predict"),
         f"≥ 0.9 × model only ({model:,.0f} img/s), beyond start-up: {results['predict_beyond'] / model:.2f}"),
        (f"predict.py --tta, {DEMO_TEST:,} PNGs", predict_result(results, "predict_tta"),
         f"≥ 0.9 × model only / 8 ({tta_model:,.0f} img/s), beyond start-up: "
         f"{results['predict_tta_beyond'] / tta_model:.2f}"),
        (f"predict.py --catalog, {GPU_ROWS:,} rows (JPEG + 5% FITS)",
         f"{results['catalog']:,.0f} img/s in all; {results['catalog_steady']:,.0f} img/s steady",
         f"≥ 0.9 × model only ({model:,.0f} img/s), steady: {results['catalog_steady'] / model:.2f}"),
        (f"torchrun, 1 GPU, {TORCHRUN_STEPS} steps of train.py", f"{'ok' if results['torchrun_ok'] else 'FAILED'} in "
         f"{results['torchrun_seconds']:.1f} s", "succeeds"),
        (f"{SIDE_BY_SIDE} members side by side (`--members_at_once`), {SIDE_BY_SIDE_EPOCHS} epochs each",
         f"{results['side_by_side_seconds']:.1f} s; one alone {results['alone_seconds']:.1f} s",
         f"more members an hour than one after another: {results['side_by_side_gain']:.2f}×"),
        ("the whole check", f"{results['total_seconds']:.0f} s",
         f"< {TARGET_TOTAL_S // 60} min: {'met' if results['total_seconds'] < TARGET_TOTAL_S else 'NOT met'}"),
    ]
    lines = [title, "", "| check | result | goal |", "|---|---|---|"]
    lines += [f"| {check_name} | {result} | {goal} |" for check_name, result, goal in rows]
    return "\n".join(lines)


def bench_gpu(cfg, overrides):
    if not torch.cuda.is_available():
        sys.exit(NO_GPU)
    started = time.perf_counter()
    device = torch.device("cuda")
    cfg.device = "cuda"
    results = {"tests": cuda_tests()}
    train = bench_train(cfg, {**overrides, "device": "cuda"})
    results.update(train_model=train["model"], train_pipeline=train["pipeline"], best=numerics_name(*train["best"]),
                   inference=train["inference"][train["auto_inference"]],
                   inference_numerics=numerics_name(*train["auto_inference"]), epoch_seconds=train["epoch_seconds"],
                   checkpoint_once=train["checkpoint_once"], checkpoint_twice=train["checkpoint_twice"])
    with tempfile.TemporaryDirectory(prefix="bench_gpu_") as folder:
        processed = synthetic_set(cfg, Path(folder))
        results.update(torchrun_and_predict(cfg, {**overrides, "device": "cuda"}, Path(folder), processed))
        results.update(catalog_on_gpu(cfg, {**overrides, "device": "cuda"}, folder, Path(folder) / "run" / "last.pt",
                                      Path(folder) / "raw"))
        results.update(members_side_by_side({**overrides, "device": "cuda"}, Path(folder), processed))
    # at predict.py's own batch size (at least 256 on a GPU) and numerics: the ratio is the cost of reading alone
    at_batch = dataclasses.replace(cfg, batch_size=inference_batch(cfg, device))
    results["model_inference"] = model_only_rate(at_batch, device, 16_384, tta=False)
    results["total_seconds"] = time.perf_counter() - started
    title = (f"### `python bench.py gpu` — {machine_name(device)}, {datetime.date.today()}, "
             f"torch {torch.__version__}, CUDA {torch.version.cuda}")
    print()
    print(gpu_table(results, title))
