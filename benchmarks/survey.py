"""Survey-sized rehearsal (python bench.py survey): predict.py --catalog over a catalog of --scale x
1,000,000 rows, beside the model alone and the decoding alone, with its peak memory, the output's size
and what a kill -9 and --resume cost.

    python bench.py survey --scale=0.02    # 20,000 rows
    python bench.py survey                 # 1,000,000 rows: a quiet machine's job

The catalog (a parquet file in a temporary folder, deleted at the end) repeats the real sample's JPEGs,
training and test, under new ids; every FITS_EVERY-th row is instead a float32 g, r, i cube made of one
of them (galaxy/fits.rgb_to_bands: the same pixels). Rows point at SOURCES images at most, so the disk
holds a few hundred MB whatever --scale, and the page cache serves them: the rates leave the disk out.

1. model only: predict_views on in-memory uint8 at predict.py's batch, in the numerics auto picks, which
   predict.py is then given (--amp, --channels_last: the same kernels); before and after step 3, averaged;
2. decoding only: load_crops (read, FITS stretch, crop) in a pool of --workers over the catalog's rows;
3. predict.py --catalog: wall time; galaxies/s over the whole run and in its steady state (from its
   progress bar); CPU time a galaxy, all its processes together; peak memory of the largest process
   (ru_maxrss) and of the whole process tree (the sum of each process's PSS, sampled every 0.5 s:
   forked workers share pages); the output's size;
4. the same killed with SIGKILL half-way through its rows, then run again with --resume: the time lost,
   and every id once.

The pipeline bound is what two jobs sharing the same cores allow, 1 / (1 / model + 1 / decoding): on a
CPU the workers' decoding takes cores the model would use, so predict.py cannot reach the model-only
rate unless decoding is cheap next to the model (with --tta it is an eighth as large).
"""
import dataclasses
import datetime
import glob
import os
from pathlib import Path
import re
import resource
import shutil
import signal
import sys
import tempfile
import threading
import time

import numpy as np
import pandas as pd
import torch

from benchmarks.common import machine_name
from benchmarks.scale import TrainProgress, check, disk_used, run_command, script_command
from galaxy import kaggle_raw
from galaxy.crop import read_image
from galaxy.ensemble import load_crops
from galaxy.fits import rgb_to_bands, write_fits
from galaxy.inference import inference_batch, predict_views
from galaxy.numerics import choose_numerics, numerics_name, resolve_device
from galaxy.pool import run_pool
from model import build_model

FULL_ROWS = 1_000_000   # --scale=1
SOURCES = 3_200         # distinct JPEGs the rows point at (the sample's 3,000 + 200)
FITS_EVERY = 20         # every 20th row a FITS cube...
FITS_SOURCES = 32       # ...of one of the first 32 JPEGs (2.2 MB each at 424 x 424 x 3 float32)
DECODE_ROWS = 4_000     # rows timed for decoding only
TARGET_RATIO = 0.9


def build_catalog(source_dir, folder, rows):
    """folder/catalog.parquet: rows ids 1.. with a file each (JPEGs of source_dir's two splits, written
    under folder/img, and FITS cubes of some of them); returns (its path, sources, FITS files)."""
    images = Path(folder) / "img"
    images.mkdir(parents=True)
    refs = [ref for split in ("train", "test") for _, ref in sorted(kaggle_raw.raw_images(source_dir, split).items())]
    if not refs:
        sys.exit(f"error: {source_dir} holds no JPEG to repeat; pass --raw_dir=<Kaggle's files or the sample>")
    names = []
    for n, ref in enumerate(refs[:SOURCES]):
        data = kaggle_raw.read_raw(source_dir, ref)
        (images / f"{n}.jpg").write_bytes(data)
        names.append(f"img/{n}.jpg")
        if n < FITS_SOURCES:
            write_fits(images / f"{n}.fits", rgb_to_bands(np.asarray(read_image(data))))
    index = np.arange(rows)
    files = np.array(names, object)[index % len(names)]
    fits = index % FITS_EVERY == FITS_EVERY - 1
    files[fits] = [f"img/{k % min(FITS_SOURCES, len(names))}.fits" for k in index[fits]]
    path = Path(folder) / "catalog.parquet"
    pd.DataFrame({"id": index + 1, "file": files}).to_parquet(path, index=False)
    return path, len(names), int(fits.sum())


def children_cpu():
    """CPU seconds of the child processes this one has waited for (and of the children they waited for)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def model_rate(cfg, device, count, tta, numerics=None):
    """(img/s, CPU seconds an image, numerics) of predict_views alone on in-memory uint8: what predict.py would
    reach if reading cost nothing. numerics (amp, channels_last), if not given, as auto picks at cfg.batch_size."""
    torch.manual_seed(cfg.seed)
    model = build_model(cfg).to(device)
    numerics = numerics or choose_numerics(cfg.amp, cfg.channels_last, model, device, cfg.batch_size,
                                           cfg.image_size, training=False, log=lambda line: None)
    images = torch.randint(0, 256, (count, 3, cfg.image_size, cfg.image_size), dtype=torch.uint8)
    predict_views(model, images[:cfg.batch_size], cfg.batch_size, *numerics, tta)   # warm-up
    started, cpu = time.perf_counter(), time.process_time()
    predict_views(model, images, cfg.batch_size, *numerics, tta)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return count / (time.perf_counter() - started), (time.process_time() - cpu) / count, numerics


def decode_rate(cfg, catalog, rows):
    """(img/s, CPU seconds an image) of load_crops over the catalog's first rows in a pool of cfg.workers:
    reading, the FITS stretch, cropping."""
    table = pd.read_parquet(catalog).iloc[:rows]
    folder = os.path.dirname(catalog)
    tasks = [((str(i), f), {"file": os.path.join(folder, f)}) for i, f in zip(table["id"], table["file"])]
    job = {"groups": [{"cfg": cfg, "use_png": False}], "raw_dir": cfg.raw_dir}
    started, cpu = time.perf_counter(), children_cpu()
    done = sum(crops is not None for _, crops, _ in run_pool(load_crops, tasks, cfg.workers, job, "decode only",
                                                            progress=False))
    assert done == len(tasks), f"{len(tasks) - done} rows of the rehearsal's catalog could not be read"
    return len(tasks) / (time.perf_counter() - started), (children_cpu() - cpu) / len(tasks)


def process_children():
    """{parent pid: [child pids]} of every process, from /proc."""
    children = {}
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            fields = Path(stat).read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.split("/")[2]))
        except (OSError, IndexError, ValueError):
            pass
    return children


def tree_pss():
    """Bytes of PSS of every process below this one (the command running and its workers)."""
    children = process_children()
    total, todo = 0, list(children.get(os.getpid(), []))
    while todo:
        pid = todo.pop()
        todo += children.get(pid, [])
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total


def measured(command, kill_at=None, timeout=None):
    """run_command with the steady rate from its progress bar and the peak PSS of its process tree; with
    kill_at, the command's process group gets SIGKILL once its bar has counted kill_at images."""
    progress, peak, stop, killed, cpu = TrainProgress(), [0], threading.Event(), threading.Event(), children_cpu()

    def watch(seconds, text):
        progress(seconds, text)
        if kill_at and progress.points and progress.points[-1][1] >= kill_at and not killed.is_set():
            killed.set()
            for pid in process_children().get(os.getpid(), []):   # the command: run_command's own session
                os.killpg(pid, signal.SIGKILL)

    def sample():
        while not stop.wait(0.5):
            peak[0] = max(peak[0], tree_pss())
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        code, seconds, rss, output = run_command(command, on_output=watch, timeout=timeout)
    finally:
        stop.set()
        sampler.join()
    return {"code": code, "seconds": seconds, "rss": rss, "pss": peak[0], "output": output, "steady": progress.rate(),
            "cpu": children_cpu() - cpu}


def every_id_once(output, rows):
    ids = np.concatenate([pd.read_parquet(path, columns=["id"])["id"].to_numpy(str) for path in
                          (output, output.with_name(output.stem + "_skipped.parquet")) if path.is_file()])
    return len(ids) == rows and len(np.unique(ids)) == rows


def model_waited(output):
    """(seconds the model waited for images, seconds it predicted), from predict.py's last line; (nan, nan)."""
    found = re.search(r"the model waited ([\d.]+) s of ([\d.]+) s for images", output)
    return (float(found.group(1)), float(found.group(2))) if found else (float("nan"), float("nan"))


def kept_rows(output):
    """The rows a --resume run found written before it, from its first line (0 when none were)."""
    found = re.search(r"predicting [\d,]+ of the [\d,]+ galaxies .*\(([\d,]+) written before\)", output)
    return int(found.group(1).replace(",", "")) if found else 0


def catalog_run(cfg, overrides, folder, checkpoint, catalog, name, extra=(), kill_at=None, timeout=None):
    output = Path(folder) / f"{name}.parquet"
    command = script_command("predict.py", [f"--checkpoint={checkpoint}", f"--catalog={catalog}",
                                            f"--output_file={output}", f"--out_dir={folder}", *extra], overrides)
    return {**measured(command, kill_at, timeout), "path": output}


def rehearse_survey(cfg, overrides):
    """Every step on a catalog of cfg.scale x FULL_ROWS rows; returns the results."""
    rows, device = round(FULL_ROWS * cfg.scale), resolve_device(cfg.device)
    result = {"rows": rows, "device": machine_name(device), "tta": cfg.tta}
    with tempfile.TemporaryDirectory(prefix="bench_survey_") as folder:
        catalog, sources, fits = build_catalog(cfg.raw_dir, folder, rows)
        result.update(sources=sources, fits=fits)
        checkpoint = Path(folder) / "random.pt"   # the weights do not change the speed
        torch.save({"model": build_model(cfg).state_dict(), "config": cfg.to_dict(), "train_mean": None}, checkpoint)
        print(f"{result['device']} | {rows:,} rows ({fits:,} FITS cubes) from {sources:,} JPEGs of {cfg.raw_dir} | "
              f"working in {folder} (deleted at the end)", flush=True)
        at_batch = dataclasses.replace(cfg, batch_size=inference_batch(cfg, device))
        model = [model_rate(at_batch, device, min(rows, 4096), cfg.tta)]
        # predict.py in the same numerics: timed afresh on a busy machine, auto's pick could differ from run to run
        numerics = model[0][2]
        overrides = {**overrides, "amp": str(numerics[0]).lower(), "channels_last": str(numerics[1]).lower()}
        result["numerics"] = numerics_name(*numerics)
        result["decode"], result["decode_cpu"] = decode_rate(cfg, catalog, min(rows, DECODE_ROWS))
        print(f"model only {model[0][0]:,.0f} img/s; decoding only {result['decode']:,.0f} img/s", flush=True)
        tta = ["--tta"] if cfg.tta else []
        full = catalog_run(cfg, overrides, folder, checkpoint, catalog, "full", tta)
        check(full["code"], full["output"], "predict.py --catalog")
        assert every_id_once(full["path"], rows), "the output does not hold every id once"
        result["full"] = {**full, "disk": disk_used(full["path"])}
        print(f"predict.py --catalog: {full['seconds']:.1f} s, {full['steady'] or 0:,.0f} img/s steady, peak PSS "
              f"{full['pss'] / 1e9:.2f} GB", flush=True)
        # a busy machine changes its speed: the reference is taken before and after, and averaged
        model.append(model_rate(at_batch, device, min(rows, 4096), cfg.tta, numerics))
        result["model"], result["model_range"] = float(np.mean([m[0] for m in model])), [m[0] for m in model]
        result["model_cpu"] = float(np.mean([m[1] for m in model]))
        # killed half-way through its predictions (after its start-up), then run again with --resume
        killed = catalog_run(cfg, overrides, folder, checkpoint, catalog, "killed", tta, kill_at=rows // 2)
        resumed = catalog_run(cfg, overrides, folder, checkpoint, catalog, "killed", tta + ["--resume"])
        check(resumed["code"], resumed["output"], "predict.py --catalog --resume")
        result["resume"] = {"killed": killed["seconds"], "resumed": resumed["seconds"],
                            "lost": killed["seconds"] + resumed["seconds"] - full["seconds"],
                            "once": every_id_once(resumed["path"], rows), "kept": kept_rows(resumed["output"])}
    return result


def survey_table(result, title):
    """The Markdown table of one rehearsal, for benchmarks/RESULTS.md."""
    full, model, decode, resume = result["full"], result["model"], result["decode"], result["resume"]
    bound = 1 / (1 / model + 1 / decode)
    rate, steady = result["rows"] / full["seconds"], full["steady"] or float("nan")
    views, tta = (", 8 views", " --tta") if result["tta"] else ("", "")
    before, after = result["model_range"]
    waited = model_waited(full["output"])
    rows = [
        (f"model only: predict_views on in-memory uint8, {result['numerics']}{views}",
         f"{model:,.0f} img/s (before {before:,.0f}, after {after:,.0f})", "the reference"),
        ("decoding only: load_crops in the worker pool (JPEG + 5% FITS)", f"{decode:,.0f} img/s", ""),
        (f"predict.py --catalog{tta}, {result['rows']:,} rows",
         f"{full['seconds']:.1f} s: {rate:,.0f} img/s in all, {steady:,.0f} img/s steady",
         f"≥ {TARGET_RATIO} × model only: {steady / model:.2f}; of the pipeline bound ({bound:,.0f} img/s): "
         f"{steady / bound:.2f}"),
        ("the model's wait for images (predict.py's own count, after its first batch)",
         f"{waited[0]:.1f} s of {waited[1]:.1f} s ({waited[0] / waited[1]:.1%})", "small: never starved"),
        ("CPU time a galaxy (all processes; a busy machine's wall times vary, these much less)",
         f"model alone {result['model_cpu'] * 1e3:.2f} ms + decoding alone {result['decode_cpu'] * 1e3:.2f} ms = "
         f"{(result['model_cpu'] + result['decode_cpu']) * 1e3:.2f} ms; predict.py --catalog "
         f"{full['cpu'] / result['rows'] * 1e3:.2f} ms, its start-up included", "the pipeline adds little"),
        ("peak memory", f"{full['pss'] / 1e9:.2f} GB PSS of the process tree; {full['rss'] / 1e9:.2f} GB RSS of "
                        f"its largest process", "flat in the rows"),
        ("output (parquet)", f"{full['disk'] / 1e6:.1f} MB, {full['disk'] / result['rows']:.0f} bytes a row", ""),
        ("kill -9 half-way through, then --resume", f"{resume['killed']:.1f} s + {resume['resumed']:.1f} s: "
         f"{resume['lost']:.1f} s lost; {resume['kept']:,} rows kept", f"every id once: "
                                                                     f"{'yes' if resume['once'] else 'NO'}"),
    ]
    lines = [title, "", "| step | result | goal |", "|---|---|---|"] + [f"| {a} | {b} | {c} |" for a, b, c in rows]
    return "\n".join(lines)


def bench_survey(cfg, overrides):
    free = shutil.disk_usage(tempfile.gettempdir()).free
    if free < 1 << 30:
        sys.exit(f"error: bench.py survey needs about 1 GB free in {tempfile.gettempdir()}; point TMPDIR elsewhere")
    result = rehearse_survey(cfg, overrides)
    title = (f"### `python bench.py survey --scale={cfg.scale:g}{' --tta' if cfg.tta else ''}` — {result['device']}, "
             f"{datetime.date.today()}, torch {torch.__version__}")
    print()
    print(survey_table(result, title))


GPU_ROWS = 20_000


def catalog_on_gpu(cfg, overrides, folder, checkpoint, source_dir):
    """bench.py gpu's step: predict.py --catalog over GPU_ROWS rows of source_dir's JPEGs (and FITS cubes of
    them) with checkpoint: {"catalog": img/s in all, "catalog_steady": img/s from its progress bar}."""
    catalog, _, _ = build_catalog(source_dir, Path(folder) / "survey", GPU_ROWS)
    run = catalog_run(cfg, overrides, Path(folder) / "survey", checkpoint, catalog, "gpu", timeout=240)
    check(run["code"], run["output"], "predict.py --catalog")
    return {"catalog": GPU_ROWS / run["seconds"], "catalog_steady": run["steady"] or float("nan")}
