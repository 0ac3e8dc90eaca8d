"""The pieces of one training step, shared by train.py and bench.py train: Adam and its lr schedule,
each epoch's batch order, the augmented batch, the weights' moving average (--ema) and the step."""
import copy
import warnings

import torch
import torch.nn.functional as F

from dataset import augment
from galaxy.numerics import autocast, prepare_batch


def make_optimizer(model, cfg, steps_per_epoch, checkpoint=None):
    """Adam and its lr schedule over cfg.epochs. From a checkpoint, Adam's moment estimates are
    restored and the schedule, planned from cfg, is moved to the checkpoint's step: the lr is then
    what an uninterrupted run with cfg's epochs and lr would have there, so --resume may change
    them (for an unchanged cfg it is exactly the lr the run stopped at)."""
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    if checkpoint is not None:  # the per-parameter state only: lr and betas come from cfg and the schedule
        optimizer.load_state_dict({"state": checkpoint["optimizer"]["state"],
                                   "param_groups": optimizer.state_dict()["param_groups"]})
    total_steps = cfg.epochs * steps_per_epoch
    if cfg.schedule == "onecycle":
        # +1: the scheduler also steps after the very last batch
        scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=cfg.lr, total_steps=total_steps + 1)
    elif cfg.schedule == "cosine":
        # after a linear warm-up over the first 5% of steps: starting at the full lr of 1e-3,
        # the network went dead within the first epoch (benchmarks/ACCURACY.md)
        warmup = max(1, total_steps // 20)
        scheduler = torch.optim.lr_scheduler.SequentialLR(optimizer, [
            torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=1 / 25, total_iters=warmup),
            torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, total_steps - warmup))],
            milestones=[warmup])
    else:
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    if checkpoint is not None:
        with warnings.catch_warnings():  # stepping without optimizer.step() is the point here
            warnings.filterwarnings("ignore", message="Detected call of")
            for _ in range(checkpoint["global_step"]):
                scheduler.step()
    return optimizer, scheduler


def epoch_order(n, seed, epoch, rank, world_size):
    """This rank's shuffled sample order for an epoch: a pure function of (seed, epoch), so a
    resumed run sees exactly the batches it would have seen, and ranks never overlap."""
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(n, generator=generator)
    per_rank = n // world_size
    return order[rank * per_rank:(rank + 1) * per_rank]


def next_batch(images_uint8, vote_fractions, rows, cfg, device, aug_generator, channels_last):
    """The float, augmented batch and its targets: one gather from the in-memory uint8 set."""
    batch = augment(prepare_batch(images_uint8[rows], device, channels_last), cfg, aug_generator)
    if channels_last:   # the flips leave strided views; the first convolution wants NHWC
        batch = batch.contiguous(memory_format=torch.channels_last)
    return batch, vote_fractions[rows]


def average_of(model):
    """--ema: a frozen copy of the model that update_average keeps at a moving average of its weights
    and BatchNorm statistics; validation, best.pt and so every prediction use the average."""
    averaged = copy.deepcopy(model)
    averaged.requires_grad_(False)
    return averaged


def update_average(averaged, model, decay, step):
    # a shorter memory over the first steps, so the random initial weights do not linger in the average
    weight = 1 - min(decay, (1 + step) / (10 + step))
    with torch.no_grad():
        for average, trained in zip(averaged.state_dict().values(), model.state_dict().values()):
            if average.is_floating_point():
                average.lerp_(trained, weight)
            else:   # BatchNorm's batch counter
                average.copy_(trained)


def train_step(model, optimizer, scheduler, batch, targets, amp, device):
    with autocast(device, amp):
        loss = F.mse_loss(model(batch), targets)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    scheduler.step()
    return loss
