"""Kaggle-sized rehearsal (python bench.py scale): the commands a user runs, on a data set of
Kaggle's exact layout and size, with the time, memory and disk each step takes.

    python bench.py scale                  # 61,578 + 79,975 images: about 1.9 GB of zips, 5 GB in all
    python bench.py scale --scale=0.002    # the same steps on 123 + 160 images (the test)

Kaggle's three zips are built in a temporary folder (TMPDIR decides where; it is deleted at the
end, on Ctrl-C and on an error too) by repeating the real sample's JPEGs and label rows under
fresh GalaxyIDs. Then each step runs as its own process, as a user would run it:
preprocess.py on every image, train.py for 40 steps (it builds the uint8 cache first; one epoch is
estimated from the steps), predict.py over the test set without and with TTA, beside the
model-only inference rate. Every step reports its wall time, the peak RSS of its largest process
(the kernel's figure for the process and the children it waited for) and the disk it fills; a
Markdown table for benchmarks/RESULTS.md closes. The crop, numerics, batch_size, workers and
threads keys given here are passed on to the scripts.
"""
import datetime
import io
import os
from pathlib import Path
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import zipfile

import torch

from benchmarks.common import REPO, ROUNDS, machine_name
from config import script_keys
from galaxy import kaggle_raw
from galaxy.inference import predict_views
from galaxy.labels import SOLUTIONS
from galaxy.numerics import choose_numerics, resolve_device
from model import build_model

KAGGLE_TRAIN, KAGGLE_TEST = 61_578, 79_975
FIRST_ID = 100_000            # fresh GalaxyIDs: 100000 ... 241552 at full scale, six digits like Kaggle's
BYTES_PER_IMAGE = 40_000      # zip member + PNG + cache row, with room to spare: the free disk asked for
TRAIN_STEPS = 40
TARGET_PREPROCESS_S = 90      # the whole Kaggle set
TARGET_PREDICT_RATIO = 0.9    # predict.py's img/s against the model alone
TARGET_RSS = 4 << 30
# keys the scripts read that the bench leaves to the user; paths, epochs and steps are the bench's own
PASSED_ON = ("crop", "image_size", "roi_threshold", "roi_pad", "roi_min_size", "center_crop_size", "workers",
             "threads", "batch_size", "device", "amp", "channels_last", "output")


# --- the data set -------------------------------------------------------------------------

def _label_rows(raw_dir):
    """(header line, {GalaxyID: the rest of its line}) of the labels file as written, from the
    .csv or the .zip, so the rehearsal's rows are byte for byte Kaggle's."""
    csv_path, zip_path = Path(raw_dir) / f"{SOLUTIONS}.csv", Path(raw_dir) / f"{SOLUTIONS}.zip"
    if csv_path.is_file():
        text = csv_path.read_text()
    elif not zip_path.is_file():
        sys.exit(f"error: {raw_dir} holds no {csv_path.name} or {zip_path.name} to repeat; pass --raw_dir=<Kaggle's "
                 f"files or the sample>")
    else:
        with zipfile.ZipFile(zip_path) as archive:
            text = archive.read(next(n for n in archive.namelist() if n.endswith(".csv"))).decode()
    header, *lines = text.splitlines()
    rows = {}
    for line in lines:
        galaxy_id, _, rest = line.partition(",")
        if galaxy_id.strip().isdigit():
            rows.setdefault(int(galaxy_id), rest)
    return header, rows


def _write_images(path, folder, sources, count, first_id):
    """A ZIP_STORED archive of count members folder/<id>.jpg, cycling through the source JPEGs."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        for i in range(count):
            info = zipfile.ZipInfo(f"{folder}/{first_id + i}.jpg", date_time=(2013, 12, 20, 0, 0, 0))
            archive.writestr(info, sources[i % len(sources)])


def build_kaggle_zips(source_dir, raw_dir, n_train, n_test, first_id=FIRST_ID):
    """Kaggle's images_training_rev1.zip, images_test_rev1.zip and training_solutions_rev1.zip in
    raw_dir, with n_train and n_test images: source_dir's JPEGs (zipped or not) repeated under the
    GalaxyIDs first_id, first_id + 1, ... (training first), each training image with its source's
    label row. Each source JPEG is read once. Returns the number of source images of each split."""
    header, label_rows = _label_rows(source_dir)
    train_refs = kaggle_raw.raw_images(source_dir, "train")
    train_ids = sorted(set(train_refs) & set(label_rows))   # an image to repeat needs its row
    test_refs = kaggle_raw.raw_images(source_dir, "test") or train_refs   # no test images: use the training ones
    if not train_ids:
        sys.exit(f"error: {source_dir} holds no training JPEG with a label row to repeat; pass --raw_dir=<Kaggle's "
                 f"files or the sample>")
    raw_dir = Path(raw_dir)
    raw_dir.mkdir(parents=True, exist_ok=True)
    train_jpegs = [kaggle_raw.read_raw(source_dir, train_refs[gid]) for gid in train_ids]
    _write_images(raw_dir / f"{kaggle_raw.SPLIT_FOLDERS['train']}.zip", kaggle_raw.SPLIT_FOLDERS["train"],
                  train_jpegs, n_train, first_id)
    del train_jpegs
    test_jpegs = [kaggle_raw.read_raw(source_dir, ref) for _, ref in sorted(test_refs.items())]
    _write_images(raw_dir / f"{kaggle_raw.SPLIT_FOLDERS['test']}.zip", kaggle_raw.SPLIT_FOLDERS["test"],
                  test_jpegs, n_test, first_id + n_train)
    lines = io.StringIO()
    lines.write(header + "\n")
    for i in range(n_train):
        lines.write(f"{first_id + i},{label_rows[train_ids[i % len(train_ids)]]}\n")
    with zipfile.ZipFile(raw_dir / f"{SOLUTIONS}.zip", "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(f"{SOLUTIONS}.csv", lines.getvalue())
    return {"train": len(train_ids), "test": len(test_jpegs)}


# --- measuring one command ---------------------------------------------------------------------

def disk_used(path):
    """Bytes the files under path take on disk (st_blocks, as du counts them)."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_blocks * 512
    return sum(os.stat(os.path.join(root, name)).st_blocks * 512
               for root, _, names in os.walk(path) for name in names)


def run_command(command, on_output=None, timeout=None):
    """Run command to its end: (exit code, seconds, peak RSS in bytes, output text).

    os.wait4 gives this child's own rusage, whose ru_maxrss is the largest of the process and the
    children it waited for (a pool's workers), not a maximum over every child this bench ran.
    on_output(seconds since start, text) sees stdout and stderr as they come (tqdm's bars too).
    The child runs in its own session, and its whole group is killed on timeout, Ctrl-C or any
    error here, so no worker outlives the temporary folder it reads.
    """
    started = time.perf_counter()
    child = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    kill = lambda: os.killpg(child.pid, signal.SIGKILL)  # noqa: E731
    timer = threading.Timer(timeout, kill) if timeout else None
    if timer:
        timer.start()
    chunks = []
    try:
        while chunk := os.read(child.stdout.fileno(), 1 << 16):
            text = chunk.decode(errors="replace")
            chunks.append(text)
            if on_output:
                on_output(time.perf_counter() - started, text)
        _, status, usage = os.wait4(child.pid, 0)
    except BaseException:
        kill()
        child.wait()
        raise
    finally:
        if timer:
            timer.cancel()
        child.stdout.close()
    child.returncode = os.waitstatus_to_exitcode(status)   # reaped here, so Popen must not wait again
    return child.returncode, time.perf_counter() - started, usage.ru_maxrss * 1024, "".join(chunks)


def script_command(script, args, overrides):
    """python <script> args..., with the overrides of PASSED_ON keys that the script reads."""
    keys = script_keys(Path(script).stem)
    passed = [f"--{key}={overrides[key]}" for key in PASSED_ON if key in overrides and key in keys]
    return [sys.executable, str(REPO / script), *args, *passed]


def check(code, output, what):
    """Stop the bench with the command's last lines when a step failed: later steps need its output."""
    if code:
        sys.exit(f"error: {what} failed (exit {code}); its last lines:\n" + "\n".join(output.splitlines()[-15:]))


class TrainProgress:
    """When train.py's tqdm bar showed each image count: the step rate between the first count
    after step 1 (kernels built, numerics chosen) and the last."""
    BAR = re.compile(r"(\d+)/(\d+) \[")

    def __init__(self):
        self.points, self.total = [], None

    def __call__(self, seconds, text):
        for done, total in self.BAR.findall(text):
            if int(done) > 0 and (not self.points or int(done) > self.points[-1][1]):
                self.points.append((seconds, int(done)))
            self.total = int(total)

    def rate(self):
        """Images a second over the timed steps, or None with fewer than two counts."""
        if len(self.points) < 2:
            return None
        (t0, n0), (t1, n1) = self.points[0], self.points[-1]
        return (n1 - n0) / (t1 - t0)


def model_only_rate(cfg, device, count, tta):
    """img/s of model.predict_views on in-memory random uint8 images, in the numerics and batch size
    predict.py would use, best of ROUNDS: what predict.py would reach if reading cost nothing."""
    torch.manual_seed(cfg.seed)
    model = build_model(cfg).to(device)
    amp, channels_last = choose_numerics(cfg.amp, cfg.channels_last, model, device, cfg.batch_size, cfg.image_size,
                                         training=False, log=lambda line: None)
    images = torch.randint(0, 256, (count, 3, cfg.image_size, cfg.image_size), dtype=torch.uint8)
    predict_views(model, images[:cfg.batch_size], cfg.batch_size, amp, channels_last, tta)   # warm-up
    best = 0.0
    for _ in range(ROUNDS):
        started = time.perf_counter()
        predict_views(model, images, cfg.batch_size, amp, channels_last, tta)
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = max(best, count / (time.perf_counter() - started))
    return best


# --- the rehearsal ------------------------------------------------------------------------------

def _size(size):
    return f"{size / 1e9:.2f} GB" if size >= 1e8 else f"{size / 1e6:.1f} MB"


def _rss(size):
    return f"{_size(size)} ({'under' if size < TARGET_RSS else 'OVER'} 4 GB)"


def _verdict(met, scale):
    """Whether a full-set target is met; only a full-scale run can say."""
    return ("met" if met else "NOT met") if scale == 1 else "judged at --scale=1"


def scale_table(rows, title):
    """The Markdown table of the rehearsal: one row per step, as returned by rehearse."""
    lines = [title, "", "| step | wall time | throughput | peak RSS (largest process) | disk | target |",
             "|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['step']} | {row['time']} | {row['rate']} | {row['rss']} | {row['disk']} "
                     f"| {row['target']} |")
    return "\n".join(lines)


def rehearse(cfg, overrides):
    """Every step on a Kaggle-sized set in a temporary folder; returns the table's rows."""
    n_train, n_test = round(KAGGLE_TRAIN * cfg.scale), round(KAGGLE_TEST * cfg.scale)
    device = resolve_device(cfg.device)
    needed, free = (n_train + n_test) * BYTES_PER_IMAGE, shutil.disk_usage(tempfile.gettempdir()).free
    if needed > free:
        sys.exit(f"error: bench.py scale needs about {_size(needed)} free in {tempfile.gettempdir()}, which has "
                 f"{_size(free)}; point TMPDIR at a larger disk or pass a smaller --scale")
    full = f"{cfg.scale:g} of Kaggle's" if cfg.scale != 1 else "Kaggle's"
    rows = []

    def add(step, seconds, count, rss, disk, target):
        rows.append({"step": step, "time": f"{seconds:.1f} s", "rate": f"{count / seconds:,.0f} img/s" if count else "",
                     "rss": rss, "disk": disk, "target": target})
        print(" | ".join(str(value) for value in rows[-1].values()), flush=True)

    with tempfile.TemporaryDirectory(prefix="bench_scale_") as folder:
        folder = Path(folder)
        raw, processed, run = folder / "raw", folder / "processed", folder / "run"
        print(f"{machine_name(device)} | {full} {n_train:,} + {n_test:,} images from {cfg.raw_dir} | working in "
              f"{folder} (deleted at the end)", flush=True)

        started = time.perf_counter()
        sources = build_kaggle_zips(cfg.raw_dir, raw, n_train, n_test)
        add(f"build Kaggle's zips ({n_train:,} + {n_test:,} JPEGs from {sources['train']:,} + {sources['test']:,})",
            time.perf_counter() - started, n_train + n_test,
            f"{_size(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)} (this process)", _size(disk_used(raw)),
            "report only")

        code, seconds, rss, output = run_command(script_command(
            "preprocess.py", [f"--raw_dir={raw}", f"--processed_dir={processed}"], overrides))
        check(code, output, "preprocess.py")
        full_set = seconds / cfg.scale
        add(f"preprocess.py ({n_train + n_test:,} images from the zips)", seconds, n_train + n_test, _rss(rss),
            _size(disk_used(processed)),
            f"full set < {TARGET_PREPROCESS_S} s: {full_set:.0f} s"
            f"{' (scaled up linearly, start-up included)' if cfg.scale != 1 else ''}, "
            f"{_verdict(full_set < TARGET_PREPROCESS_S, cfg.scale)}")

        progress, wall_started = TrainProgress(), time.time()
        code, seconds, rss, output = run_command(script_command(
            "train.py", [f"--processed_dir={processed}", f"--out_dir={run}", "--epochs=1",
                         f"--max_steps={TRAIN_STEPS}"], overrides), on_output=progress)
        check(code, output, "train.py")
        cache = processed / "train_images.pt"   # dataset.load_images' cache, written once it is built
        cache_seconds = cache.stat().st_mtime - wall_started
        add("train.py: start-up, labels, decode every PNG, write the uint8 cache", cache_seconds, 0, _rss(rss),
            f"cache {_size(disk_used(cache))}", "report only")
        rate = progress.rate()
        steps = progress.points[-1][1] // cfg.batch_size if progress.points else 0
        epoch = (f"one epoch ({progress.total:,} images) ≈ {progress.total / rate:.0f} s "
                 f"(estimated from {steps} steps)"
                 if rate else f"too few steps ({steps}) to time")
        print(epoch)
        rows.append({"step": f"train.py: {steps} steps of {cfg.batch_size}, {TRAIN_STEPS} at most",
                     "time": f"{seconds:.1f} s whole command", "rate": f"{rate:,.0f} img/s" if rate else "n/a",
                     "rss": _rss(rss), "disk": f"run {_size(disk_used(run))}", "target": epoch})

        model_rate = model_only_rate(cfg, device, min(n_test, 4096), tta=False)
        for tta in (False, True):
            out_dir = folder / f"predict{'_tta' if tta else ''}"
            code, seconds, rss, output = run_command(script_command(
                "predict.py", [f"--checkpoint={run / 'last.pt'}", f"--raw_dir={raw}", f"--processed_dir={processed}",
                               f"--out_dir={out_dir}", *(["--tta"] if tta else [])], overrides))
            check(code, output, "predict.py")
            with open(out_dir / "submission.csv") as f:
                predicted = sum(1 for _ in f) - 1
            if predicted != n_test:
                print(f"warning: submission.csv has {predicted} rows for {n_test} test images")
            reference = model_rate / 8 if tta else model_rate
            ratio = n_test / seconds / reference
            add(f"predict.py{' --tta' if tta else ''} ({n_test:,} test PNGs)", seconds, n_test, _rss(rss),
                f"submission {_size(disk_used(out_dir))}",
                f"≥ {TARGET_PREDICT_RATIO} × model only{' / 8' if tta else ''} "
                f"({reference:,.0f} img/s): {ratio:.2f}, "
                f"{_verdict(ratio >= TARGET_PREDICT_RATIO, cfg.scale)}")
        rows.append({"step": f"model only: predict_views on in-memory uint8, batch {cfg.batch_size}", "time": "",
                     "rate": f"{model_rate:,.0f} img/s", "rss": "", "disk": "", "target": "the reference above"})
    return rows


def bench_scale(cfg, overrides):
    rows = rehearse(cfg, overrides)
    title = (f"### `python bench.py scale{f' --scale={cfg.scale:g}' if cfg.scale != 1 else ''}` — "
             f"{machine_name(resolve_device(cfg.device))}, {datetime.date.today()}, torch {torch.__version__}")
    print()
    print(scale_table(rows, title))
