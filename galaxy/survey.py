"""Predicting a survey catalog (predict.py --catalog): millions of galaxies in flat memory, each chunk
of rows made durable as soon as it is predicted, and shards, so that N jobs share one catalog (--shard,
--join; the command lines are in docs/survey.md).

One pool of workers serves the whole catalog. read_catalog (galaxy/catalog.py) reads CHUNK_ROWS rows
at a time, and a Window lets only a few batches of tasks into the pool at once, so that neither the
catalog nor its images are ever held whole; the workers read and crop each image (JPEG, PNG or FITS:
galaxy/ensemble.load_crops); a Feeder thread stacks the crops into batches (page-locked for a GPU)
while the model runs on the batch before; every CHUNK_ROWS rows predicted or skipped become one part
of galaxy/parts.ChunkedOutput, whole or absent after any kill. Rows come out in the order the images
are ready, not the catalog's: the output is keyed by id.
"""
import copy
import itertools
import os
import queue
import shutil
import threading
import time

import numpy as np
import torch

from dataset import LABEL_COLUMNS, NUM_OUTPUTS, QUESTIONS, vote_summary
from galaxy import catalog
from galaxy.calibration import calibrated_sigma
from galaxy.catalog import parse_shard, read_catalog
from galaxy.ensemble import inference_numerics, load_crops, predict_batch
from galaxy.files import DataError, writable_folder
from galaxy.inference import batch_tensor, inference_batch
from galaxy.numerics import resolve_device
from galaxy.parts import (ChunkedOutput, durable_write, join_shards, prediction_table, shard_output, shard_outputs,
                          sibling)
from galaxy.pool import STOP_WAIT_S, run_pool

CHUNK_ROWS = catalog.CHUNK_ROWS   # rows read at a time, and rows in a part: a kill loses at most this many
DEFAULT_OUTPUT = "predictions.parquet"   # in out_dir, without --output_file
QUEUED_BATCHES = 2   # batches stacked ahead of the model


# --- the job: its device, its shard, its output --------------------------------------------------------

def job_device(cfg):
    """resolve_device; under torchrun (LOCAL_RANK set) a --catalog job takes its own GPU of the machine's."""
    device = resolve_device(cfg.device)
    local = os.environ.get("LOCAL_RANK")
    if device.type != "cuda" or not cfg.catalog or local is None:
        return device
    if not local.isdigit() or int(local) >= torch.cuda.device_count():
        raise DataError(f"LOCAL_RANK={local}, but torch sees {torch.cuda.device_count()} GPUs; start torchrun with "
                        f"--nproc_per_node={torch.cuda.device_count()} at most")
    device = torch.device("cuda", int(local))
    torch.cuda.set_device(device)
    return device


def catalog_output(cfg, shard=None):
    """--output_file (default out_dir/predictions.parquet), named after the shard: preds.shard3of8.parquet."""
    output = cfg.output_file or os.path.join(cfg.out_dir, DEFAULT_OUTPUT)
    return shard_output(output, shard) if shard is not None else output


# --- the rows to predict ----------------------------------------------------------------------------------

def catalog_chunks(cfg, shard):
    return read_catalog(cfg.catalog, cfg.id_column, cfg.file_column, cfg.band_columns or None, shard, CHUNK_ROWS)


def count_rows(cfg, shard, done):
    """(rows of the catalog or its shard, those whose id is not in done): one pass before any prediction,
    so that a bad catalog (a missing column, an empty or repeated id) stops the job at once."""
    rows = todo = 0
    for chunk in catalog_chunks(cfg, shard):
        rows += len(chunk)
        todo += int((~done.contains(chunk["id"])).sum())
    return rows, todo


def image_where(source):
    """load_crops' where of a catalog row: one file is read by its name (FITS or any image Pillow reads);
    three band files, or no file at all, go to galaxy/fits.read_bands, which names what is missing."""
    return {"fits": source} if isinstance(source, tuple) or not source else {"file": source}


def catalog_tasks(cfg, shard, done):
    """((id, file as the catalog names it), where) for each row whose id is not in done, chunk after chunk."""
    for chunk in catalog_chunks(cfg, shard):
        chunk = chunk[~done.contains(chunk["id"])]
        for gid, name, source in zip(chunk["id"], chunk["file"], chunk["source"]):
            yield (gid, name), image_where(source)


def window_size(batch_size, workers):
    """Tasks in the pool at once: enough to keep every worker busy while a batch or two wait for the model,
    few enough that memory does not grow with the catalog (2,560 crops of 64 px, 31 MB, for 16 workers)."""
    return 2 * batch_size + 4 * workers * 32   # galaxy.pool.run_pool sends a worker up to 32 tasks at a time


class Window:
    """At most size tasks handed to the pool and not yet taken back (release): the pool's task thread reads
    the catalog only as fast as its images are used, so the pool's queues stay short whatever the catalog."""

    def __init__(self, size):
        self.slots, self.closed = threading.Semaphore(size), threading.Event()

    def feed(self, tasks):
        for task in tasks:
            while not self.slots.acquire(timeout=0.1):
                if self.closed.is_set():
                    return
            if self.closed.is_set():   # the run is ending: the pool must not wait for more tasks
                return
            yield task

    def release(self):
        self.slots.release()

    def close(self):
        self.closed.set()


class Feeder(threading.Thread):
    """Takes the workers' crops as they come and stacks them into batches (page-locked on a GPU, for a
    non-blocking copy) while the model runs on the batch before. batches() yields (names,
    uint8 images per crop group or None, skipped [(id, file, reason)]); an error here is raised there."""

    def __init__(self, first, results, window, groups, batch_size, device):
        super().__init__(name="catalog-feeder", daemon=True)
        self.first, self.results, self.window = first, results, window   # results: run_pool's, after its first
        self.groups, self.batch_size, self.device = groups, batch_size, device
        self.queue, self.stop = queue.Queue(QUEUED_BATCHES), threading.Event()
        self.waited = 0.0   # seconds the model waited for a batch, after the first: it is starved if this grows

    def run(self):
        try:
            if self.device.type == "cuda":   # a new thread starts on GPU 0: pin for the job's own (torchrun)
                torch.cuda.set_device(self.device)
            names, crops, skipped = [], [], []
            for result in itertools.chain([self.first], self.results):
                self.window.release()
                if self.stop.is_set():
                    break
                if result is None:   # the pool is ending: the task was abandoned
                    continue
                name, images, reason = result
                if images is None:
                    skipped.append((*name, reason))
                else:
                    names.append(name)
                    crops.append(images)
                if len(names) == self.batch_size or len(skipped) == self.batch_size:
                    self.put(self.batch(names, crops, skipped))
                    names, crops, skipped = [], [], []
            if names or skipped:
                self.put(self.batch(names, crops, skipped))
            self.put(None)
        except BaseException as err:   # the main thread raises it
            self.put(err)
        finally:
            self.results.close()   # ends the pool: each worker finishes or abandons its image

    def batch(self, names, crops, skipped):
        pin = self.device.type == "cuda"
        images = [batch_tensor([c[g] for c in crops], pin) for g in range(self.groups)] if names else None
        return names, images, skipped

    def put(self, item):
        while not self.stop.is_set():
            try:
                return self.queue.put(item, timeout=0.1)
            except queue.Full:
                pass

    def batches(self):
        first = True
        while True:
            started = time.perf_counter()
            item = self.queue.get()
            self.waited += 0 if first else time.perf_counter() - started
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            first = False
            yield item

    def end(self):
        self.stop.set()
        self.window.close()
        self.join(timeout=STOP_WAIT_S + 5)


# --- what a part holds --------------------------------------------------------------------------------

def summaries(mean):
    """dataset.vote_summary of each row, made once per distinct path down the decision tree: the winning
    answer (argmax, as vote_summary's max takes it) of each question its winners reach, on which alone it
    depends. A call costs about 35 us, a CPU-minute over a survey; the distinct paths are a few hundred."""
    mean = np.asarray(mean, np.float32)
    if not len(mean):
        return []
    ends = np.cumsum([len(q.columns) for q in QUESTIONS])
    winners = np.stack([mean[:, end - len(q.columns):end].argmax(1) for q, end in zip(QUESTIONS, ends)], axis=1)
    where = {column: (k, q.columns.index(column)) for k, q in enumerate(QUESTIONS) for column in q.columns}
    reached = np.ones(winners.shape, bool)
    for k, question in enumerate(QUESTIONS):   # a parent question comes before its children
        if question.parent:
            above, answer = where[question.parent]
            reached[:, k] = reached[:, above] & (winners[:, above] == answer)
    _, first, inverse = np.unique(np.where(reached, winners, -1), axis=0, return_index=True, return_inverse=True)
    words = [vote_summary(mean[row]) for row in first]
    return [words[i] for i in inverse.ravel()]


def sigma_columns(uncertainty, views):
    """(sigma(mean, spread) -> (N, 37) or None, the columns' suffix, what they hold in words): <column>_std
    the calibrated sigma (galaxy/uncertainty.py), else <column>_spread the raw spread over members x views."""
    if uncertainty is not None and uncertainty.calibration is not None:
        calibration = uncertainty.calibration
        return ((lambda mean, spread: calibrated_sigma(calibration, mean, spread if views > 1 else None)), "_std",
                f"<column>_std the calibrated standard deviation ({uncertainty.path})")
    reason = uncertainty.reason if uncertainty is not None else "no calibration"
    if views > 1:
        return (lambda mean, spread: spread), "_spread", (f"<column>_spread the raw spread over {views} members x "
                                                          f"views, not a calibrated std ({reason})")
    return (lambda mean, spread: None), "", f"no sigma: one checkpoint without TTA has no spread ({reason})"


class Pending:
    """The rows predicted or skipped since the last part was written."""

    def __init__(self):
        self.names, self.means, self.spreads, self.features, self.skipped = [], [], [], [], []

    def __len__(self):
        return len(self.names) + len(self.skipped)

    def rows(self, sigma, suffix):
        """id, file, the 37 vote fractions, their sigma(mean, spread) as <column><suffix>, the summary in words."""
        mean = np.concatenate(self.means or [np.zeros((0, NUM_OUTPUTS), np.float32)])
        values = sigma(mean, np.concatenate(self.spreads or [np.zeros_like(mean)]))
        table = prediction_table([i for i, _ in self.names], mean, values, files=[f for _, f in self.names])
        table = table.rename(columns={f"{c}_std": f"{c}{suffix}" for c in LABEL_COLUMNS})
        table["summary"] = summaries(mean)
        return table


def write_part(out, pending, sigma, embed, written):
    features = np.concatenate(pending.features) if embed and pending.features else None
    out.write_chunk(pending.rows(*sigma[:2]), pending.skipped, features)
    if out.folder not in written:   # finished work: an error or Ctrl-C from now on says where it is
        written.append(out.folder)


# --- the prediction -----------------------------------------------------------------------------------

def run_catalog(cfg, members, groups, out, shard, todo, sigma, written):
    """Predict the todo rows not in out.done into out, part after part: (predicted, skipped, what the model
    waited for images in words)."""
    device = next(members[0].model.parameters()).device
    batch_size = inference_batch(cfg, device)
    numerics = inference_numerics(members, cfg.amp, cfg.channels_last, batch_size)   # before the workers start
    job = {"groups": [{"cfg": group, "use_png": False} for group in groups], "raw_dir": cfg.raw_dir}
    window = Window(window_size(batch_size, cfg.workers))
    tasks = window.feed(catalog_tasks(cfg, shard, copy.copy(out.done)))   # a snapshot: out.done grows meanwhile
    results = run_pool(load_crops, tasks, cfg.workers, job, "predict catalog", total=todo)
    try:
        first = next(results, None)   # the pool starts (forks) here, in the main thread, not in the Feeder's
    except BaseException:
        window.close()
        results.close()
        raise
    feeder = Feeder(first, results, window, len(groups), batch_size, device)
    pending, predicted, skipped, started = Pending(), 0, 0, time.perf_counter()
    feeder.start()
    try:
        for names, images, lost in feeder.batches():
            pending.skipped += lost
            skipped += len(lost)
            if names:
                mean, spread, _, features = predict_batch(members, images, numerics, cfg.tta, cfg.embed,
                                                          names=[gid for gid, _ in names])
                pending.names += names
                pending.means.append(mean.numpy())
                pending.spreads.append(spread.numpy())
                if cfg.embed:
                    pending.features.append(features.numpy().astype(np.float16))
                predicted += len(names)
            if len(pending) >= CHUNK_ROWS:
                write_part(out, pending, sigma, cfg.embed, written)
                pending = Pending()
        if len(pending):
            write_part(out, pending, sigma, cfg.embed, written)
    finally:
        feeder.end()
    seconds = time.perf_counter() - started
    return predicted, skipped, (f"the model waited {feeder.waited:.1f} s of {seconds:.1f} s for images "
                                f"({feeder.waited / max(seconds, 1e-9):.0%})")


def predict_catalog(cfg, members, groups, written, uncertainty=None):
    """--catalog: the vote fractions, their sigma and a summary of every row of the catalog (or of its
    shard) into the output table keyed by id, the unreadable rows with their reason into <output>_skipped,
    with --embed the first member's features into <output>_embeddings.npy."""
    if cfg.images:
        raise DataError("--catalog and --images both given; predict one of them at a time")
    try:
        shard = parse_shard(cfg.shard) if cfg.shard else None   # K/N, or env: torchrun's or Slurm's variables
    except ValueError as err:
        raise DataError(str(err)) from None
    output = catalog_output(cfg, shard)
    writable_folder(os.path.dirname(os.path.abspath(output)), "output_file")
    out = ChunkedOutput(output, resume=cfg.resume)
    sigma = sigma_columns(uncertainty, len(members) * (8 if cfg.tta else 1))
    try:
        if out.complete:
            print(f"{output} is complete ({len(out.done):,} ids); nothing to predict")
            return
        rows, todo = count_rows(cfg, shard, out.done)
        where = f"shard {shard} of {cfg.catalog}" if shard else cfg.catalog
        before = f" ({rows - todo:,} written before)" if rows > todo else ""
        print(f"predicting {todo:,} of the {rows:,} galaxies of {where}{before}"
              f" with {len(members)} checkpoint(s){', each with 8-fold TTA' if cfg.tta else ''}; parts of "
              f"{CHUNK_ROWS:,} rows in {out.folder}")
        predicted, skipped, waited = (run_catalog(cfg, members, groups, out, shard, todo, sigma, written) if todo
                                      else (0, 0, ""))
        out.finish()
    finally:
        if not out.complete and not out.parts and os.path.isdir(out.folder):   # no finished work to keep
            shutil.rmtree(out.folder, ignore_errors=True)
        out.close()
    if out.folder in written:
        written.remove(out.folder)
    paths = [output, out.skipped_output, out.embeddings_output, out.embedding_ids_output]
    written += [path for path in paths if os.path.isfile(path)]
    print(f"wrote {output}: {len(out.done):,} ids ({predicted:,} predicted and {skipped:,} skipped by this run); "
          f"the 37 vote fractions, {sigma[2]}, and a summary{'; ' + waited if waited else ''}")
    if os.path.isfile(out.skipped_output):
        print(f"unreadable rows, with the reason: {out.skipped_output}")
    if os.path.isfile(out.embeddings_output):
        print(f"wrote {out.embeddings_output} (float16, one row per id of {out.embedding_ids_output})")


# --- N shard outputs as one -----------------------------------------------------------------------------

def join_embeddings(paths, output):
    """The shards' <stem>_embeddings.npy and _embeddings_ids.csv, one after another, as output's: read a
    slice at a time (np.load with mmap_mode), so memory stays flat. None when no shard has them."""
    have = [(sibling(p, "_embeddings", "npy"), sibling(p, "_embeddings_ids", "csv")) for p in paths]
    have = [(npy, ids) for npy, ids in have if os.path.isfile(npy)]
    if not have:
        return None
    if len(have) < len(paths):
        raise DataError(f"{len(paths) - len(have)} of the {len(paths)} shard outputs have no _embeddings.npy "
                        f"(predicted without --embed); predict them again with --embed, or join without them")
    arrays = [np.load(npy, mmap_mode="r") for npy, _ in have]
    if len({a.shape[1:] for a in arrays}) > 1:
        raise DataError(f"the shards' embeddings differ in width ({', '.join(str(a.shape[1]) for a in arrays)}); "
                        f"were they predicted with different checkpoints?")

    def write(tmp):
        header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float16)), "fortran_order": False,
                  "shape": (sum(len(a) for a in arrays), arrays[0].shape[1])}
        with open(tmp, "wb") as f:
            np.lib.format.write_array_header_1_0(f, header)
            for a in arrays:
                for start in range(0, len(a), CHUNK_ROWS):
                    f.write(np.ascontiguousarray(a[start:start + CHUNK_ROWS], np.float16).tobytes())

    def write_ids(tmp):
        with open(tmp, "w") as f:
            f.write("id\n")
            for _, ids in have:
                with open(ids) as part:
                    next(part)   # its header
                    shutil.copyfileobj(part, f)
    durable_write(sibling(output, "_embeddings", "npy"), write)
    durable_write(sibling(output, "_embeddings_ids", "csv"), write_ids)
    return sibling(output, "_embeddings", "npy")


def join_outputs(cfg, written):
    """--join: the shard outputs of a glob as one table (galaxy/parts.join_shards: every id once; with
    --catalog, every id of it), with their skipped rows and embeddings."""
    output = cfg.output_file or os.path.join(cfg.out_dir, DEFAULT_OUTPUT)
    writable_folder(os.path.dirname(os.path.abspath(output)), "output_file")
    paths = shard_outputs(cfg.join, output)
    rows = join_shards(cfg.join, output, cfg.catalog or None, cfg.id_column)
    written.append(output)
    embeddings = join_embeddings(paths, output)
    skipped = sibling(output, "_skipped")
    checked = (f"each id of {cfg.catalog} once" if cfg.catalog
               else "no id twice (add --catalog to check that none is missing)")
    print(f"joined {len(paths)} shard outputs into {output}: {rows:,} rows, {checked}")
    for path in (skipped, embeddings):
        if path and os.path.isfile(path):
            written.append(path)
            print(f"wrote {path}")
