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

Per epoch: a progress bar, train loss and validation RMSE; out_dir/metrics.csv is rewritten (and
loss.png, at most every 10 s and after the last epoch), best.pt is saved when val RMSE improves
(every epoch when there is no val split, as with --train_on_val), then last.pt.
Ctrl-C or SIGTERM saves last.pt (mid-epoch) and exits; --resume continues exactly there.
A run holds out_dir/.lock: a second run into the same out_dir stops at once.
"""
import math
import os
import signal
import sys
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from config import answer_help, build_config, parse_overrides, script_keys
from dataset import DataError, load_training_set, rows_of, split_for_run
from galaxy.checkpoints import CheckpointError, load_state, read_checkpoint
from galaxy.inference import predict, rmse
from galaxy.numerics import choose_numerics, numerics_name, resolve_device
from galaxy.runs import (checkpoint_state, claim_out_dir, parse_config, read_init_weights, repair_best, run_is_complete,
                         save_checkpoints, train_members, write_metrics)
from galaxy.training import average_of, epoch_order, make_optimizer, next_batch, train_step, update_average
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


# --- set-up --------------------------------------------------------------------------

def setup_distributed(cfg):
    """(rank, world_size, device). torchrun sets RANK/WORLD_SIZE; a plain run is rank 0 of 1."""
    if "RANK" not in os.environ:
        return 0, 1, resolve_device(cfg.device)
    device = resolve_device(cfg.device)
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


# --- the loop --------------------------------------------------------------------------

def train(cfg, checkpoint, init_weights=None):
    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    rank, world_size, device = setup_distributed(cfg)
    is_main = rank == 0
    if cfg.threads:
        torch.set_num_threads(cfg.threads)

    galaxy_ids, images, vote_fractions = load_training_set(cfg)
    split = split_for_run(cfg, galaxy_ids, write=is_main)
    train_rows, val_rows = rows_of(galaxy_ids, split["train"]), rows_of(galaxy_ids, split["val"])
    has_val = len(val_rows) > 0   # none with --train_on_val or val_fraction=0: best.pt is then the last epoch
    if len(train_rows) < cfg.batch_size * world_size:
        raise DataError(f"only {len(train_rows)} training galaxies for batch_size={cfg.batch_size} "
                        f"x {world_size} processes; use a smaller --batch_size or more data")
    # the whole uint8 set lives on the device: a batch is then one gather, no loader workers
    train_images, train_targets = images[train_rows].to(device), vote_fractions[train_rows].to(device)
    val_images, val_targets = images[val_rows], vote_fractions[val_rows]
    test_rows = rows_of(galaxy_ids, split["test"])
    test_images, test_targets = images[test_rows], vote_fractions[test_rows]
    del images   # the splits are copies: the whole set (0.76 GB at Kaggle's size) need not stay beside them
    mean_prediction = vote_fractions[train_rows].mean(0)
    baseline_val_rmse = rmse(mean_prediction.expand_as(val_targets), val_targets) if has_val else float("nan")

    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    model = build_model(cfg).to(device)
    numerics = run_numerics(cfg, checkpoint, model, device, is_main, world_size)
    if numerics["channels_last"]:
        model = model.to(memory_format=torch.channels_last)
    raw_model = model
    if world_size > 1:
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    steps_per_epoch = len(train_rows) // world_size // cfg.batch_size
    optimizer, scheduler = make_optimizer(raw_model, cfg, steps_per_epoch, checkpoint)
    aug_generator = torch.Generator(device=device).manual_seed(cfg.seed * 7919 + rank)
    torch.manual_seed(cfg.seed + rank)  # dropout differs per rank

    progress = {"epoch": 0, "step_in_epoch": 0, "global_step": 0, "epoch_loss_sum": 0.0,
                "best_val_rmse": math.inf, "history": []}
    if checkpoint is not None:
        load_state(raw_model, checkpoint.get("trained_model", checkpoint["model"]),
                   os.path.join(cfg.out_dir, "last.pt"))
        progress = {key: checkpoint[key] for key in progress}
        rng = checkpoint["rng"]
        if world_size == 1:  # per-rank RNG streams are not saved; DDP resumes with fresh ones
            torch.set_rng_state(rng["torch"])
            aug_generator.set_state(rng["augment"])
            if device.type == "cuda" and len(rng["cuda"]):
                torch.cuda.set_rng_state(rng["cuda"], device)
        if is_main:
            print(f"resumed from {cfg.out_dir}/last.pt at epoch {progress['epoch'] + 1}, "
                  f"step {progress['step_in_epoch']} | epochs {cfg.epochs}, lr {cfg.lr:g} "
                  f"(lr now {scheduler.get_last_lr()[0]:.2e})")
    elif init_weights is not None:
        load_state(raw_model, init_weights, cfg.init_from)
        if is_main:
            print(f"weights from {cfg.init_from}; fresh optimizer and lr schedule from epoch 1")
    averaged_model = average_of(raw_model) if cfg.ema else None
    if averaged_model is not None and checkpoint is not None:
        load_state(averaged_model, checkpoint["model"], os.path.join(cfg.out_dir, "last.pt"))
    eval_model = averaged_model if averaged_model is not None else raw_model   # what val RMSE measures

    if is_main:
        print(f"{len(galaxy_ids)} galaxies: {len(split['train'])} train, {len(split['val'])} val, "
              f"{len(split['test'])} test | device {device} x {world_size} | output {cfg.output} | " +
              (f"mean-prediction val RMSE {baseline_val_rmse:.4f}" if has_val else
               "no val split (val_fraction=0 or train_on_val): best.pt is the last epoch"))

    def save(*names):
        """Rank 0 writes the current state under each name in out_dir, in that order (one file, linked)."""
        if is_main:
            state = checkpoint_state(raw_model, optimizer, scheduler, cfg, progress, aug_generator, device,
                                     mean_prediction, numerics, averaged_model)
            try:
                save_checkpoints([os.path.join(cfg.out_dir, name) for name in names], state)
            except DataError as err:   # a full disk: the checkpoints on disk are still whole
                if not os.path.isfile(os.path.join(cfg.out_dir, "last.pt")):
                    raise   # nothing to resume: the same command starts the run again
                raise DataError(f"{err} with --resume (it goes on from last.pt)") from None

    model.train()
    plotted_at = -math.inf
    while progress["epoch"] < cfg.epochs:
        epoch = progress["epoch"]
        order = epoch_order(len(train_rows), cfg.seed, epoch, rank, world_size)
        bar = tqdm(total=steps_per_epoch * cfg.batch_size, initial=progress["step_in_epoch"] * cfg.batch_size,
                   unit="img", desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not is_main, leave=True)
        started = time.time()
        for step in range(progress["step_in_epoch"], steps_per_epoch):
            batch_rows = order[step * cfg.batch_size:(step + 1) * cfg.batch_size].to(device)
            batch, targets = next_batch(train_images, train_targets, batch_rows, cfg, device, aug_generator,
                                        numerics["channels_last"])
            loss = train_step(model, optimizer, scheduler, batch, targets, numerics["amp"], device)
            progress["step_in_epoch"] = step + 1
            progress["global_step"] += 1
            if averaged_model is not None:
                update_average(averaged_model, raw_model, cfg.ema, progress["global_step"])
            loss = loss.item()  # one device sync per step
            progress["epoch_loss_sum"] += loss
            bar.update(cfg.batch_size)
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
            if stop_requested(world_size) or progress["global_step"] == cfg.max_steps:
                bar.close()
                save("last.pt")
                if is_main:
                    why = f"signal {STOP_SIGNAL}" if STOP_SIGNAL else f"max_steps={cfg.max_steps}"
                    print(f"stopped by {why}; saved {cfg.out_dir}/last.pt (resume with --resume)")
                return 128 + STOP_SIGNAL if STOP_SIGNAL else 0
        bar.close()

        train_loss = progress["epoch_loss_sum"] / steps_per_epoch
        val_rmse = rmse(predict(eval_model, val_images, 2 * cfg.batch_size, numerics["amp"], numerics["channels_last"]),
                        val_targets) if has_val else float("nan")
        seconds = time.time() - started
        progress["history"].append({
            "epoch": epoch + 1, "train_loss": train_loss, "train_rmse": math.sqrt(train_loss),
            "val_rmse": val_rmse, "lr": scheduler.get_last_lr()[0], "seconds": round(seconds, 2),
            "img_per_s": round(steps_per_epoch * cfg.batch_size * world_size / seconds, 1),
            "numerics": numerics_name(numerics["amp"], numerics["channels_last"])})
        progress.update(epoch=epoch + 1, step_in_epoch=0, epoch_loss_sum=0.0)
        improved = val_rmse < progress["best_val_rmse"] or not has_val  # no val: best = last
        if improved:
            progress["best_val_rmse"] = val_rmse
        if is_main:
            print(f"epoch {epoch + 1}: train loss {train_loss:.5f} | " +
                  (f"val RMSE {val_rmse:.5f}{' (best)' if improved else ''} | mean baseline {baseline_val_rmse:.5f}"
                   if has_val else "no val split: best.pt is this epoch"))
            # best.pt first: a kill between the two writes then leaves last.pt at the epoch before,
            # whose resume redoes this one; never a last.pt past a best.pt that is not on disk
            save(*(["best.pt", "last.pt"] if improved else ["last.pt"]))
            plot = progress["epoch"] == cfg.epochs or time.monotonic() - plotted_at >= PLOT_EVERY_S
            write_metrics(progress["history"], cfg.out_dir, baseline_val_rmse, plot)
            plotted_at = time.monotonic() if plot else plotted_at
        if stop_requested(world_size):  # the signal came during the epoch's end: last.pt is saved
            if is_main:
                print(f"stopped by signal {STOP_SIGNAL}; saved {cfg.out_dir}/last.pt (resume with --resume)")
            return 128 + STOP_SIGNAL

    if is_main:
        report_test(cfg, test_images, test_targets, mean_prediction, device, numerics)
    return 0


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


def stop_requested(world_size):
    """True on every rank as soon as any rank got SIGINT/SIGTERM, so all stop at the same step."""
    if world_size == 1:
        return STOP_SIGNAL is not None
    flag = torch.tensor([1.0 if STOP_SIGNAL else 0.0])
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def report_test(cfg, test_images, targets, mean_prediction, device, numerics):
    """Test-split RMSE of best.pt, with the mean-prediction baseline beside it."""
    if not len(targets):
        print("no test split (test_fraction=0)")
        return
    best = read_checkpoint(os.path.join(cfg.out_dir, "best.pt"))
    model = build_model(cfg).to(device)
    model.load_state_dict(best["model"])
    test_rmse = rmse(predict(model, test_images, 2 * cfg.batch_size, numerics["amp"], numerics["channels_last"]),
                     targets)
    baseline = rmse(mean_prediction.expand_as(targets), targets)
    print(f"test RMSE {test_rmse:.5f} (best.pt, epoch {best['epoch']}) | mean-prediction baseline "
          f"{baseline:.5f} | {len(targets)} galaxies")


def train_run(overrides):
    """One run: lock its out_dir, then train, resume, extend or fine-tune it. Returns the exit code."""
    is_main = int(os.environ.get("RANK", "0")) == 0
    lock = claim_out_dir(build_config(overrides).out_dir) if is_main else None  # noqa: F841 (held open)
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
