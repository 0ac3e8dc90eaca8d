"""Train the galaxy CNN on CPU or CUDA, on one process or many (torchrun).

    python train.py                                # data/processed -> runs/
    python train.py --demo --epochs=10             # the synthetic demo set
    python train.py --resume                       # continue from runs/last.pt
    python train.py --resume --epochs=60           # extend it: the lr schedule is re-planned
    python train.py --init_from=runs/best.pt --lr=1e-4 --out_dir=runs/tune   # fine-tune its weights
    python train.py --members=5 --out_dir=runs/ens # an ensemble: runs/ens/member_1 ... member_5
    python train.py --members=4 --members_at_once=2 --out_dir=runs/ens   # two members side by side
    python train.py --train_on_val --out_dir=runs/final   # last step: train on the val galaxies too
    torchrun --nproc_per_node=2 train.py           # DistributedDataParallel
    python train.py --labels=my_classes/ --init_from=runs/best.pt --out_dir=runs/mine   # fine-tune on your labels
    python train.py --labels=my_classes/ --out_dir=runs/mine_scratch    # the same network from scratch
(--labels: a folder of class folders or a CSV/parquet table; a new head for it: galaxy/tasks.py)

Per epoch: a progress bar, train loss and validation RMSE; out_dir/metrics.csv is rewritten (and
loss.png, at most every 10 s and after the last epoch), best.pt is saved when val RMSE improves
(every epoch when there is no val split, as with --train_on_val), then last.pt.
Ctrl-C or SIGTERM saves last.pt (mid-epoch) and exits; --resume continues exactly there.
A non-finite loss (a learning rate too high for the data) stops the run with an error and exit
code 1; last.pt keeps the state from before it, and no checkpoint of non-finite weights is written.
A run holds out_dir/.lock: a second run into the same out_dir stops at once.
"""
import contextlib
from dataclasses import dataclass, field
import math
import os
import signal
import sys
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from config import Config, answer_help, build_config, parse_overrides, script_keys
from dataset import DataError, load_training_set, rows_of, split_for_run
from galaxy.checkpoints import CheckpointError, load_backbone, load_state, read_checkpoint
from galaxy.inference import predict, rmse
from galaxy.numerics import choose_numerics, numerics_name, resolve_device
from galaxy.recipes import run_recipe
from galaxy.runs import (checkpoint_state, claim_out_dir, parse_config, read_init_weights, repair_best, run_is_complete,
                         save_checkpoints, train_members, write_metrics)
from galaxy.tasks import labelled_data, pretrained_parameters, report_labelled_test, write_task_metrics
from galaxy.training import (Data, average_of, epoch_order, galaxy_zoo_scores, make_optimizer, next_batch, train_step,
                             update_average)
from model import build_model

PLOT_EVERY_S = 10   # on a GPU a small set's epoch can take less time than drawing loss.png
STOP_SIGNAL = None  # set by the first SIGINT/SIGTERM; the loop saves last.pt at the next step and exits
STOP_REQUESTS = 0


def request_stop(signum, frame):
    global STOP_SIGNAL, STOP_REQUESTS
    STOP_REQUESTS += 1
    if STOP_REQUESTS == 1:
        STOP_SIGNAL = signum
    elif STOP_REQUESTS == 2:
        # stopping mid-step or mid-write would lose the state about to be saved, and a step is short
        os.write(2, b"\nstopping: saving last.pt first (a third Ctrl-C quits without saving)\n")
    else:
        raise KeyboardInterrupt


class Diverged(Exception):
    """A non-finite loss, weight or val RMSE: every rank stops at once and nothing more is saved."""


@dataclass
class Run:
    """What the loop steps, validates and saves; progress holds the counters and history last.pt records."""
    cfg: Config
    rank: int
    world_size: int
    device: torch.device
    model: torch.nn.Module       # what trains: raw_model, or its DistributedDataParallel wrapper
    raw_model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    aug_generator: torch.Generator
    numerics: dict               # {"amp", "channels_last"}
    steps_per_epoch: int
    train_mean: torch.Tensor
    averaged_model: torch.nn.Module = None   # --ema
    progress: dict = field(default_factory=lambda: {"epoch": 0, "step_in_epoch": 0, "global_step": 0,
                                                    "epoch_loss_sum": 0.0, "best_val_rmse": math.inf, "history": []})
    saved_step: int = None       # global_step of the last.pt this run wrote or resumed from
    plotted_at: float = -math.inf

    @property
    def is_main(self):
        return self.rank == 0

    @property
    def eval_model(self):   # what val RMSE measures and best.pt predicts with
        return self.averaged_model if self.averaged_model is not None else self.raw_model


# --- set-up --------------------------------------------------------------------------

def setup_distributed(cfg):
    """(rank, world_size, device). torchrun sets RANK/WORLD_SIZE; a plain run is rank 0 of 1."""
    device = resolve_device(cfg.device)
    if "RANK" not in os.environ:
        return 0, 1, device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


def load_splits(cfg, device, is_main, world_size):
    """The labelled set cut into the run's train, val and test splits (out_dir/split.csv)."""
    if cfg.labels:   # a user's own labels
        return labelled_data(cfg, device, is_main, world_size)
    galaxy_ids, images, vote_fractions = load_training_set(cfg)
    split = split_for_run(cfg, galaxy_ids, write=is_main)
    train_rows, val_rows, test_rows = (rows_of(galaxy_ids, split[name]) for name in ("train", "val", "test"))
    if len(train_rows) < cfg.batch_size * world_size:
        raise DataError(f"only {len(train_rows)} training galaxies for batch_size={cfg.batch_size} "
                        f"x {world_size} processes; use a smaller --batch_size or more data")
    train_mean, val_targets = vote_fractions[train_rows].mean(0), vote_fractions[val_rows]
    # the splits are copies: the whole set (0.76 GB at Kaggle's size) goes when this returns
    return Data(train_images=images[train_rows].to(device), train_targets=vote_fractions[train_rows].to(device),
                val_images=images[val_rows], val_targets=val_targets,
                test_images=images[test_rows], test_targets=vote_fractions[test_rows], train_mean=train_mean,
                baseline_val_rmse=rmse(train_mean.expand_as(val_targets), val_targets) if len(val_rows) else math.nan,
                has_val=len(val_rows) > 0)


def build_training(cfg, checkpoint, init_weights, data, rank, world_size, device):
    """The model (the same initial weights on every rank), its numerics, optimizer, lr schedule, weight
    average and random streams; with --init_from, its weights."""
    torch.manual_seed(cfg.seed)
    raw_model = build_model(cfg, data.task and data.task.record).to(device)
    pretrained = pretrained_parameters(raw_model, cfg) if data.task else None   # --labels: what it loads, freezes
    numerics = run_numerics(cfg, checkpoint, raw_model, device, rank == 0, world_size)
    if numerics["channels_last"]:
        raw_model = raw_model.to(memory_format=torch.channels_last)
    model = raw_model if world_size == 1 else DistributedDataParallel(
        raw_model, device_ids=[device.index] if device.type == "cuda" else None)
    steps_per_epoch = len(data.train_targets) // world_size // cfg.batch_size
    optimizer, scheduler = make_optimizer(raw_model, cfg, steps_per_epoch, checkpoint, pretrained)
    aug_generator = torch.Generator(device=device).manual_seed(cfg.seed * 7919 + rank)
    torch.manual_seed(cfg.seed + rank)  # dropout differs per rank
    if init_weights is not None:
        # --labels: the conv blocks (and hidden layers) alone, the head is new
        (load_backbone(raw_model, init_weights, cfg.init_from, cfg.init_layers) if data.task
         else load_state(raw_model, init_weights, cfg.init_from))
        if rank == 0:
            print(f"weights from {cfg.init_from}; fresh optimizer and lr schedule from epoch 1")
    return Run(cfg, rank, world_size, device, model, raw_model, optimizer, scheduler, aug_generator, numerics,
               steps_per_epoch, data.train_mean, averaged_model=average_of(raw_model) if cfg.ema else None)


def run_numerics(cfg, checkpoint, model, device, is_main, world_size):
    """{"amp", "channels_last"} as booleans: what the config forces, what a resumed run chose
    before (so it goes on exactly as it would have), or the fastest on this machine (choose_numerics)."""
    saved = (checkpoint or {}).get("numerics")
    if saved and cfg.amp == "auto" and cfg.channels_last == "auto":
        return dict(saved)
    amp, channels_last = choose_numerics(cfg.amp, cfg.channels_last, model, device, cfg.batch_size,
                                         cfg.image_size, training=True, log=print if is_main else (lambda _: None))
    if world_size > 1:   # every rank must run the same numerics: rank 0's timing decides
        choice = [(amp, channels_last)]
        dist.broadcast_object_list(choice, src=0)
        amp, channels_last = choice[0]
    return {"amp": amp, "channels_last": channels_last}


def restore_progress(run, checkpoint):
    """--resume: last.pt's weights, counters, history and (on one process) random streams, exactly."""
    if checkpoint is None:
        return
    last = os.path.join(run.cfg.out_dir, "last.pt")
    load_state(run.raw_model, checkpoint.get("trained_model", checkpoint["model"]), last)
    if run.averaged_model is not None:
        load_state(run.averaged_model, checkpoint["model"], last)
    run.progress = {key: checkpoint[key] for key in run.progress}
    run.saved_step = checkpoint["global_step"]
    rng = checkpoint["rng"]
    if run.world_size == 1:  # per-rank RNG streams are not saved; DDP resumes with fresh ones
        torch.set_rng_state(rng["torch"])
        run.aug_generator.set_state(rng["augment"])
        if run.device.type == "cuda" and len(rng["cuda"]):
            torch.cuda.set_rng_state(rng["cuda"], run.device)
    if run.is_main:
        print(f"resumed from {last} at epoch {run.progress['epoch'] + 1}, step {run.progress['step_in_epoch']} | "
              f"epochs {run.cfg.epochs}, lr {run.cfg.lr:g} (lr now {run.scheduler.get_last_lr()[0]:.2e})")


# --- the loop --------------------------------------------------------------------------

def train(cfg, checkpoint, init_weights=None):
    """Train to cfg.epochs (or a stop); returns the exit code."""
    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    rank, world_size, device = setup_distributed(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    data = load_splits(cfg, device, rank == 0, world_size)
    run = build_training(cfg, checkpoint, init_weights, data, rank, world_size, device)
    restore_progress(run, checkpoint)
    if run.is_main:
        counts = [len(targets) for targets in (data.train_targets, data.val_targets, data.test_targets)]
        print(f"{sum(counts)} galaxies: {counts[0]} train, {counts[1]} val, {counts[2]} test | device {device} "
              f"x {world_size} | output {data.task.kind if data.task else cfg.output} | " +
              (f"{'majority-class val 1 - balanced accuracy' if data.task else 'mean-prediction val RMSE'} "
               f"{data.baseline_val_rmse:.4f}" if data.has_val else
               "no val split (val_fraction=0 or train_on_val): best.pt is the last epoch"))
    run.model.train()
    try:
        while run.progress["epoch"] < cfg.epochs:
            started = time.time()
            stop = run_epoch(run, data) or end_epoch(run, data, started)
            if stop:
                return stop_early(run, stop)
    except Diverged as err:   # on every rank at once, before any save of what diverged
        if run.is_main:
            kept = (f"{cfg.out_dir}/last.pt is kept from step {run.saved_step}, before the divergence (--resume "
                    f"--lr=<lower> goes on from it)" if run.saved_step is not None else "nothing of this run was saved")
            print(f"error: {err}: the learning rate is probably too high for this data: try a lower --lr; {kept}",
                  file=sys.stderr)
        if world_size > 1:
            dist.barrier()   # the others wait for rank 0's line: torchrun ends every process once one exits
        return 1
    if run.is_main:
        (report_labelled_test if data.task else report_test)(cfg, data, device, run.numerics)
    return 0


def run_epoch(run, data):
    """Train from the run's place in its epoch to the epoch's end (None), or until a stop: "signal"
    (SIGINT/SIGTERM on any rank) or "max_steps". A non-finite loss on any rank raises Diverged."""
    cfg, progress = run.cfg, run.progress
    order = (data.task.batch_order if data.task else epoch_order)(len(data.train_targets), cfg.seed,
                                                                  progress["epoch"], run.rank, run.world_size)
    bar = tqdm(total=run.steps_per_epoch * cfg.batch_size, initial=progress["step_in_epoch"] * cfg.batch_size,
               unit="img", desc=f"epoch {progress['epoch'] + 1}/{cfg.epochs}", disable=not run.is_main, leave=True)
    with bar:
        for step in range(progress["step_in_epoch"], run.steps_per_epoch):
            batch_rows = order[step * cfg.batch_size:(step + 1) * cfg.batch_size].to(run.device)
            batch, targets = next_batch(data.train_images, data.train_targets, batch_rows, cfg, run.device,
                                        run.aug_generator, run.numerics["channels_last"])
            loss = train_step(run.model, run.optimizer, run.scheduler, batch, targets, run.numerics["amp"], run.device,
                              data.loss)
            progress["step_in_epoch"] = step + 1
            progress["global_step"] += 1
            if run.averaged_model is not None:
                update_average(run.averaged_model, run.raw_model, cfg.ema, progress["global_step"])
            loss = loss.item()  # one device sync per step
            progress["epoch_loss_sum"] += loss
            bar.update(cfg.batch_size)
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{run.scheduler.get_last_lr()[0]:.2e}")
            signalled, diverged = on_any_rank(run, STOP_SIGNAL is not None, not math.isfinite(loss))
            if diverged:
                raise Diverged(f"the training loss is {loss if not math.isfinite(loss) else 'not finite'} at step "
                               f"{progress['global_step']} (epoch {progress['epoch'] + 1}, batch {step + 1} of "
                               f"{run.steps_per_epoch})")
            if signalled or progress["global_step"] == cfg.max_steps:
                return "signal" if signalled else "max_steps"


def end_epoch(run, data, started):
    """Validate, record the epoch, save best.pt (when val RMSE improves, or every epoch without val)
    and last.pt, rewrite metrics.csv. Returns "signal" if SIGINT/SIGTERM came meanwhile, else None."""
    cfg, progress, numerics = run.cfg, run.progress, run.numerics
    epoch = progress["epoch"]
    train_loss = progress["epoch_loss_sum"] / run.steps_per_epoch
    val = predict(run.eval_model, data.val_images, 2 * cfg.batch_size, numerics["amp"],
                  numerics["channels_last"]) if data.has_val else None
    val_rmse, scores = (data.task.scores if data.task else galaxy_zoo_scores)(train_loss, val, data.val_targets)
    if on_any_rank(run, data.has_val and not math.isfinite(val_rmse))[0]:
        raise Diverged(f"the validation RMSE is not finite after epoch {epoch + 1} (step {progress['global_step']})")
    seconds = time.time() - started
    progress["history"].append({
        "epoch": epoch + 1, "train_loss": train_loss, **scores, "lr": run.scheduler.get_last_lr()[0],
        "seconds": round(seconds, 2),
        "img_per_s": round(run.steps_per_epoch * cfg.batch_size * run.world_size / seconds, 1),
        "numerics": numerics_name(numerics["amp"], numerics["channels_last"])})
    progress.update(epoch=epoch + 1, step_in_epoch=0, epoch_loss_sum=0.0)
    improved = not data.has_val or val_rmse < progress["best_val_rmse"]   # no val: best = last
    if improved:
        progress["best_val_rmse"] = val_rmse
    if run.is_main:
        print(f"epoch {epoch + 1}: train loss {train_loss:.5f} | " +
              (data.task.describe(scores, improved, data.baseline_val_rmse) if data.task else
               f"val RMSE {val_rmse:.5f}{' (best)' if improved else ''} | mean baseline {data.baseline_val_rmse:.5f}"
               if data.has_val else "no val split: best.pt is this epoch"))
    # best.pt first: a kill between the two writes then leaves last.pt at the epoch before,
    # whose resume redoes this one; never a last.pt past a best.pt that is not on disk
    save(run, *(["best.pt", "last.pt"] if improved else ["last.pt"]))
    if run.is_main:
        plot = progress["epoch"] == cfg.epochs or time.monotonic() - run.plotted_at >= PLOT_EVERY_S
        (write_task_metrics if data.task else write_metrics)(progress["history"], cfg.out_dir, data.baseline_val_rmse,
                                                             plot)
        run.plotted_at = time.monotonic() if plot else run.plotted_at
    return "signal" if on_any_rank(run, STOP_SIGNAL is not None)[0] else None


def stop_early(run, why):
    """The one way out before cfg.epochs: last.pt holds where the run is; 128 + signal or 0 (max_steps)."""
    if run.saved_step != run.progress["global_step"]:
        save(run, "last.pt")
    if run.is_main:
        said = f"signal {STOP_SIGNAL}" if STOP_SIGNAL else "a signal to another process"
        print(f"stopped by {said if why == 'signal' else f'max_steps={run.cfg.max_steps}'}; "
              f"saved {run.cfg.out_dir}/last.pt (resume with --resume)")
    return 128 + STOP_SIGNAL if STOP_SIGNAL else 0


def save(run, *names):
    """Write the run's state under each name in out_dir, in that order (one file, linked); rank 0
    writes. Every rank first checks the weights: non-finite ones raise Diverged, and are never saved."""
    models = [model for model in (run.raw_model, run.averaged_model) if model is not None]
    finite = torch.stack([torch.isfinite(tensor).all() for model in models for tensor in model.state_dict().values()
                          if tensor.is_floating_point()]).all().item()
    if on_any_rank(run, not finite)[0]:
        raise Diverged(f"the weights are not finite after step {run.progress['global_step']}")
    if run.is_main:
        state = checkpoint_state(run.raw_model, run.optimizer, run.scheduler, run.cfg, run.progress, run.aug_generator,
                                 run.device, run.train_mean, run.numerics, run.averaged_model)
        try:
            save_checkpoints([os.path.join(run.cfg.out_dir, name) for name in names], state)
        except DataError as err:   # a full disk: the checkpoints on disk are still whole
            if not os.path.isfile(os.path.join(run.cfg.out_dir, "last.pt")):
                raise   # nothing to resume: the same command starts the run again
            raise DataError(f"{err} with --resume (it goes on from last.pt)") from None
    run.saved_step = run.progress["global_step"]


def on_any_rank(run, *flags):
    """Each flag OR-ed over every rank (one all_reduce), so all ranks stop at the same step."""
    if run.world_size == 1:
        return [bool(flag) for flag in flags]
    together = torch.tensor([float(bool(flag)) for flag in flags], device=run.device)   # NCCL reduces CUDA tensors
    dist.all_reduce(together, op=dist.ReduceOp.MAX)
    return [bool(value) for value in together.tolist()]


def report_test(cfg, data, device, numerics):
    """Test-split RMSE of best.pt, with the mean-prediction baseline beside it."""
    targets = data.test_targets
    if not len(targets):
        print("no test split (test_fraction=0)")
        return
    best = read_checkpoint(os.path.join(cfg.out_dir, "best.pt"))
    model = build_model(cfg).to(device)
    model.load_state_dict(best["model"])
    test_rmse = rmse(predict(model, data.test_images, 2 * cfg.batch_size, numerics["amp"], numerics["channels_last"]),
                     targets)
    baseline = rmse(data.train_mean.expand_as(targets), targets)
    print(f"test RMSE {test_rmse:.5f} (best.pt, epoch {best['epoch']}) | mean-prediction baseline "
          f"{baseline:.5f} | {len(targets)} galaxies")


def train_run(overrides):
    """One run: lock its out_dir, then train, resume, extend or fine-tune it. Returns the exit code."""
    is_main = int(os.environ.get("RANK", "0")) == 0
    with claim_out_dir(build_config(overrides).out_dir) if is_main else contextlib.nullcontext():   # the lock
        cfg, checkpoint = parse_config(overrides)
        init_weights = read_init_weights(cfg) if cfg.init_from and checkpoint is None else None
        if checkpoint is not None:
            if is_main:
                repair_best(cfg, checkpoint)
            if run_is_complete(cfg, checkpoint):
                if is_main:
                    print(f"{cfg.out_dir} is already complete: {checkpoint['epoch']} of {cfg.epochs} epochs done; "
                          f"nothing to train (a larger --epochs extends it)")
                return 0
        return train(cfg, checkpoint, init_weights)


def main():
    answer_help(sys.argv[1:], __doc__, script_keys("train"))
    code = 0
    try:
        overrides, _ = parse_overrides(sys.argv[1:])
        cfg = build_config(overrides)
        if cfg.recipe:
            code = run_recipe(overrides)
        else:
            code = train_members(cfg, sys.argv[1:]) if cfg.members > 1 else train_run(overrides)
    except (ValueError, DataError, CheckpointError) as err:
        sys.exit(f"error: {err}")
    except KeyboardInterrupt:  # a third Ctrl-C
        print("error: stopped without saving; last.pt holds the last complete save", file=sys.stderr)
        code = 130
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    sys.exit(code)


if __name__ == "__main__":
    main()
