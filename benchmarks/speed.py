"""The speed benchmarks of bench.py: preprocess (against plain JPEG decoding), train (every numerics
candidate, the model alone and the whole pipeline, checkpoint writes) and similar (loading and
searching every Kaggle galaxy's embeddings)."""
import io
import itertools
from multiprocessing import Pool
import os
from pathlib import Path
import sys
import tempfile
import time

from PIL import Image
import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.common import INFERENCE_BATCH, ROUNDS, machine_name
from galaxy import kaggle_raw
from galaxy.numerics import NUMERICS_CANDIDATES, autocast, choose_numerics, numerics_name, prepare_batch, resolve_device
from galaxy.preprocessing import preprocess
from galaxy.training import make_optimizer, next_batch, train_step
from model import build_model

SLOW_DISK_MS = 0.2      # kernel time per preprocessed image above which ext4 is slowed down (_kernel_seconds)
SLOW_DISK_WAIT_S = 420  # how long bench_preprocess waits for such a slowdown to pass


def _decode_full(task):
    """Only read and decode one JPEG at full size: the floor any preprocessing is measured against."""
    raw_dir, reference = task
    image = Image.open(io.BytesIO(kaggle_raw.read_raw(raw_dir, reference)))
    image.load()
    return image.size


def _kernel_seconds():
    """System CPU time of this process and its finished children.

    Preprocessing creates one file per image: about 0.05 ms of kernel time on this machine's ext4,
    0.08 ms per image with reading the JPEG. For a few minutes after many files were deleted (by the
    tests, or the end of this bench) it is 0.3-1 ms: without a journal, ext4 will not reuse an inode
    for a minute or more after its deletion, and for every new file it checks each such inode again
    (perf shows __ext4_new_inode -> find_inode_bit -> recently_deleted). A high figure here is that.
    """
    times = os.times()
    return times.system + times.children_system


def bench_preprocess(cfg, overrides):
    """Preprocessing throughput next to plain full-size decoding, same images, same worker count."""
    references = [(cfg.raw_dir, reference) for split in kaggle_raw.SPLIT_FOLDERS
                  for reference in kaggle_raw.raw_images(cfg.raw_dir, split).values()]
    if not references:
        sys.exit(kaggle_raw.raw_layout_error(cfg.raw_dir) or f"error: no images in {cfg.raw_dir}")
    for raw_dir, reference in references:   # warm the page cache so neither run pays for the disk
        kaggle_raw.read_raw(raw_dir, reference)
    print(f"{len(references)} images from {cfg.raw_dir}, {cfg.workers} workers, crop={cfg.crop}, "
          f"image_size={cfg.image_size}")

    # this machine's speed drifts from second to second: alternate the two and keep the best of each.
    # Every round writes a fresh folder; all are deleted only at the end, as mass deletion slows the disk
    # for a few minutes (see _kernel_seconds). A round slowed by that is shown, not counted, and
    # repeated after a pause, so the figures are those of a disk in its usual state.
    counted, slow = [], []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as bench_dir:
        for round_number in itertools.count():
            if len(counted) == ROUNDS or (slow and time.perf_counter() - started > SLOW_DISK_WAIT_S):
                break
            if slow:
                time.sleep(15)
            kernel, round_started = _kernel_seconds(), time.perf_counter()
            with Pool(cfg.workers) as pool:
                for _ in pool.imap_unordered(_decode_full, references, chunksize=32):
                    pass
            round_decode = len(references) / (time.perf_counter() - round_started)
            decode_kernel = (_kernel_seconds() - kernel) / len(references) * 1e3
            cfg.processed_dir = str(Path(bench_dir) / f"round{round_number}")
            kernel, round_started = _kernel_seconds(), time.perf_counter()
            summary = preprocess(cfg, progress=False)
            round_preprocess = len(references) / (time.perf_counter() - round_started)
            preprocess_kernel = (_kernel_seconds() - kernel) / len(references) * 1e3
            disk_slow = preprocess_kernel > SLOW_DISK_MS
            print(f"round {round_number}: decode {round_decode:5.0f} img/s, preprocess {round_preprocess:5.0f} img/s "
                  f"(kernel time per image: {decode_kernel:.2f} ms, {preprocess_kernel:.2f} ms)"
                  f"{'  disk slowed by recently deleted files: not counted' if disk_slow else ''}", flush=True)
            (slow if disk_slow else counted).append((round_decode, round_preprocess))
    if not counted:
        print(f"warning: the disk stayed slow for {SLOW_DISK_WAIT_S} s; these figures include that")
    decode_rate = max(rate for rate, _ in counted or slow)
    preprocess_rate = max(rate for _, rate in counted or slow)
    print(f"decode only (full size): {decode_rate:7.0f} img/s")
    print(f"preprocess:              {preprocess_rate:7.0f} img/s ({summary['written']} PNGs written)")
    print(f"ratio preprocess / decode: {preprocess_rate / decode_rate:.2f} (target >= 0.6)")


# --- training ---------------------------------------------------------------------------

FULL_EPOCH = 61_578  # Kaggle's training set


def _timed_steps(run_step, steps, device):
    """Seconds taken by `steps` calls of run_step(), after two warm-up calls."""
    for _ in range(2):
        run_step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(steps):
        run_step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started


def _training_flops_per_image(model, cfg, device):
    batch = torch.rand(cfg.batch_size, 3, cfg.image_size, cfg.image_size, device=device)
    with FlopCounterMode(display=False) as counter:
        model(batch).sum().backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / cfg.batch_size


class TrainingBench:
    """One model, optimizer and in-memory uint8 set per numerics candidate, with a step function for
    each measured thing: a training step on a ready batch, one through the whole pipeline, and an
    inference batch."""

    def __init__(self, cfg, device, amp, channels_last, pool_size):
        self.cfg, self.device, self.amp, self.channels_last = cfg, device, amp, channels_last
        torch.manual_seed(cfg.seed)
        self.model = build_model(cfg).to(device)
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.optimizer, self.scheduler = make_optimizer(self.model, cfg, steps_per_epoch=10 ** 6)
        images = torch.randint(0, 256, (pool_size, 3, cfg.image_size, cfg.image_size), dtype=torch.uint8)
        self.images, self.targets = images.to(device), torch.rand(pool_size, 37, device=device)
        self.generator = torch.Generator(device=device).manual_seed(cfg.seed)
        self.order = torch.randperm(pool_size, device=device)
        self.position = 0
        self.ready_batch, self.ready_targets = self._gather(torch.arange(cfg.batch_size, device=device))
        self.inference_batch = prepare_batch(images[:INFERENCE_BATCH], device, channels_last)

    def _gather(self, rows):
        return next_batch(self.images, self.targets, rows, self.cfg, self.device, self.generator, self.channels_last)

    def model_step(self):
        train_step(self.model, self.optimizer, self.scheduler, self.ready_batch, self.ready_targets, self.amp,
                   self.device)

    def pipeline_step(self):
        start = self.position % (len(self.images) - self.cfg.batch_size + 1)
        self.position += self.cfg.batch_size
        batch, targets = self._gather(self.order[start:start + self.cfg.batch_size])
        train_step(self.model, self.optimizer, self.scheduler, batch, targets, self.amp, self.device)

    @torch.no_grad()
    def inference_step(self):
        self.model.eval()
        with autocast(self.device, self.amp):
            self.model(self.inference_batch)
        self.model.train()




def bench_train(cfg, overrides):
    """Training and inference img/s of every numerics candidate (fp32/bf16 x NCHW/channels_last),
    what amp=auto picks, and the whole pipeline (gather from the in-memory uint8 set, augmentation,
    step) beside the best candidate. FLOPs per image; on CUDA one timed 61,578-image epoch."""
    device = resolve_device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    steps = 10 if device.type == "cpu" else 100
    print(f"{machine_name(device)} | torch {torch.__version__} | batch_size {cfg.batch_size}, "
          f"image_size {cfg.image_size}, inference batch {INFERENCE_BATCH}")
    benches = {candidate: TrainingBench(cfg, device, *candidate, steps * cfg.batch_size)
               for candidate in NUMERICS_CANDIDATES}
    train_rate = {candidate: 0.0 for candidate in benches}
    inference_rate = dict(train_rate)
    # alternate the candidates round by round, keeping the best of each, because this machine's speed drifts
    for _ in range(ROUNDS):
        for candidate, bench in benches.items():
            train_rate[candidate] = max(train_rate[candidate],
                                        steps * cfg.batch_size / _timed_steps(bench.model_step, steps, device))
            inference_rate[candidate] = max(inference_rate[candidate], max(1, steps // 4) * INFERENCE_BATCH
                                            / _timed_steps(bench.inference_step, max(1, steps // 4), device))
    reference = (False, False)
    print("| numerics | training, model only | inference | training vs fp32 NCHW | inference vs fp32 NCHW |")
    print("|---|---|---|---|---|")
    for candidate in benches:
        print(f"| {numerics_name(*candidate)} | {train_rate[candidate]:.1f} img/s "
              f"| {inference_rate[candidate]:.1f} img/s "
              f"| {train_rate[candidate] / train_rate[reference]:.2f}x "
              f"| {inference_rate[candidate] / inference_rate[reference]:.2f}x |")

    fresh = build_model(cfg).to(device)
    train_choice = choose_numerics(cfg.amp, cfg.channels_last, fresh, device, cfg.batch_size, cfg.image_size, True)
    inference_choice = choose_numerics(cfg.amp, cfg.channels_last, fresh, device, INFERENCE_BATCH, cfg.image_size,
                                       False)
    print(f"amp={cfg.amp} channels_last={cfg.channels_last} picks {numerics_name(*train_choice)} for training "
          f"({train_rate[train_choice] / train_rate[reference]:.2f}x fp32 NCHW) and "
          f"{numerics_name(*inference_choice)} for inference "
          f"({inference_rate[inference_choice] / inference_rate[reference]:.2f}x fp32 NCHW)")

    best = max(benches, key=train_rate.get)
    bench = benches[best]
    model_rate, pipeline_rate = 0.0, 0.0
    for _ in range(ROUNDS):
        model_rate = max(model_rate, steps * cfg.batch_size / _timed_steps(bench.model_step, steps, device))
        pipeline_rate = max(pipeline_rate, steps * cfg.batch_size / _timed_steps(bench.pipeline_step, steps, device))
    print(f"best candidate {numerics_name(*best)}: model only {model_rate:.1f} img/s, full pipeline "
          f"(gather+augment+step) {pipeline_rate:.1f} img/s, ratio {pipeline_rate / model_rate:.3f} (target >= 0.95)")
    flops_per_image = _training_flops_per_image(benches[reference].model, cfg, device)
    print(f"training FLOPs per image: {flops_per_image / 1e9:.2f} GFLOP (forward + backward); "
          f"achieved {flops_per_image * pipeline_rate / 1e9:.0f} GFLOP/s")
    if device.type == "cuda":
        epoch = TrainingBench(cfg, device, *best, FULL_EPOCH)
        epoch_steps = FULL_EPOCH // cfg.batch_size
        seconds = _timed_steps(epoch.pipeline_step, epoch_steps, device)
        print(f"one epoch of {epoch_steps * cfg.batch_size} images: {seconds:.2f} s (target < 10 s on one H100)")
    else:
        seconds = FULL_EPOCH / pipeline_rate
        print(f"one epoch of {FULL_EPOCH} images at this rate: {seconds:.0f} s (estimated)")
    once, twice = checkpoint_seconds(cfg, bench)
    print(f"an improving epoch's checkpoints (best.pt + last.pt): {once:.2f} s written once and linked, "
          f"{twice:.2f} s written twice (best.pt and last.pt apart); a 2,700-galaxy epoch at the pipeline's rate: "
          f"{2700 / pipeline_rate:.2f} s")
    return {"train": train_rate, "inference": inference_rate, "pipeline": pipeline_rate, "model": model_rate,
            "best": best, "auto_train": train_choice, "auto_inference": inference_choice,
            "epoch_seconds": seconds, "epoch_measured": device.type == "cuda",
            "checkpoint_once": once, "checkpoint_twice": twice}


def checkpoint_seconds(cfg, bench):
    """Seconds for train.py's checkpoints at the end of an improving epoch, best of ROUNDS: the state
    written once under best.pt and linked as last.pt (save_checkpoints), and written twice. In a
    folder under out_dir, on the disk a run writes to; the files land in the page cache, so this is
    the least it costs: many runs side by side also wait for the disk."""
    from galaxy.runs import checkpoint_state, save_checkpoint, save_checkpoints
    progress = {"epoch": 1, "step_in_epoch": 0, "global_step": 1, "epoch_loss_sum": 0.0, "best_val_rmse": 0.1,
                "history": []}
    os.makedirs(cfg.out_dir, exist_ok=True)
    numerics = {"amp": bench.amp, "channels_last": bench.channels_last}
    once, twice = float("inf"), float("inf")
    with tempfile.TemporaryDirectory(dir=cfg.out_dir, prefix="bench_checkpoints_") as folder:
        best, last = os.path.join(folder, "best.pt"), os.path.join(folder, "last.pt")
        for _ in range(ROUNDS):
            for written_once in (True, False):
                started = time.perf_counter()
                state = checkpoint_state(bench.model, bench.optimizer, bench.scheduler, cfg, progress,
                                         bench.generator, bench.device, torch.zeros(37), numerics)
                if written_once:
                    save_checkpoints([best, last], state)
                    once = min(once, time.perf_counter() - started)
                else:
                    save_checkpoint(best, state)
                    save_checkpoint(last, state)
                    twice = min(twice, time.perf_counter() - started)
    return once, twice


SIMILAR_ROWS, SIMILAR_WIDTH = 141_553, 2048   # Kaggle's 61,578 + 79,975 galaxies x the penultimate layer


def bench_similar(cfg, overrides):
    """Seconds to load a float16 embeddings file of every Kaggle galaxy and find one galaxy's 8 nearest."""
    import numpy as np

    from galaxy.similar import nearest, read_embeddings, write_embeddings
    with tempfile.TemporaryDirectory() as folder:
        rng = np.random.default_rng(0)   # ReLU features: non-negative
        features = np.abs(rng.standard_normal((SIMILAR_ROWS, SIMILAR_WIDTH), np.float32)).astype(np.float16)
        write_embeddings(folder, range(SIMILAR_ROWS), ["kaggle_test"] * SIMILAR_ROWS, features)
        del features
        times = []
        for _ in range(ROUNDS):
            started = time.perf_counter()
            embeddings, ids = read_embeddings(folder)
            nearest(embeddings, embeddings[123], 8, exclude=[123], norms=ids["norm"].to_numpy())
            times.append(time.perf_counter() - started)
            del embeddings
    print(f"similar: {SIMILAR_ROWS:,} x {SIMILAR_WIDTH} float16 embeddings, load + 8 nearest: "
          f"{min(times):.3f} s best of {ROUNDS} ({', '.join(f'{t:.3f}' for t in times)} s)")
