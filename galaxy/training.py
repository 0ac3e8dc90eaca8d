"""The pieces of one training step, shared by train.py and bench.py train: the split's tensors, Adam
and its lr schedule, each epoch's batch order, the augmented batch, the weights' moving average (--ema)
and the step."""
import copy
from dataclasses import dataclass
import math
import warnings

import torch
import torch.nn.functional as F

from dataset import augment
from galaxy.inference import rmse
from galaxy.numerics import autocast, prepare_batch


@dataclass
class Data:
    """The split's tensors: the training set on the device (a batch is then one gather, no loader
    workers), val and test on the CPU, and the train split's mean targets. For a user's labels
    (galaxy/tasks.py) task says what they are, and the loss and scores follow it."""
    train_images: torch.Tensor
    train_targets: torch.Tensor
    val_images: torch.Tensor
    val_targets: torch.Tensor
    test_images: torch.Tensor
    test_targets: torch.Tensor
    train_mean: torch.Tensor   # the baseline prediction, and predict.py's answer for an unreadable image
    baseline_val_rmse: float   # the baseline's val score (a task's: lower is better too)
    has_val: bool              # none with --train_on_val or val_fraction=0: best.pt is then the last epoch
    task: object = None        # galaxy.tasks.Task for --labels; None: Galaxy Zoo's 37 vote fractions
    loss: object = F.mse_loss  # what train_step minimises: loss(outputs, targets)


def galaxy_zoo_scores(train_loss, predictions, targets):
    """(val RMSE, the score best.pt is chosen by: NaN without val predictions; metrics.csv's RMSE columns)."""
    val_rmse = rmse(predictions, targets) if predictions is not None else math.nan
    return val_rmse, {"train_rmse": math.sqrt(train_loss), "val_rmse": val_rmse}


def make_optimizer(model, cfg, steps_per_epoch, checkpoint=None, pretrained=None):
    """Adam and its lr schedule over cfg.epochs. From a checkpoint, Adam's moment estimates are
    restored and the schedule, planned from cfg, is moved to the checkpoint's step: the lr is then
    what an uninterrupted run with cfg's epochs and lr would have there, so --resume may change
    them (for an unchanged cfg it is exactly the lr the run stopped at).

    pretrained (--labels: the names of the loaded parameters) gives two parameter groups: the new
    layers at cfg.lr, the loaded ones at cfg.lr x cfg.lr_pretrained; frozen parameters stay out."""
    if pretrained is None:
        optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    else:
        trained = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        groups = [{"params": [p for name, p in trained if name not in pretrained], "lr": cfg.lr},
                  {"params": [p for name, p in trained if name in pretrained], "lr": cfg.lr * cfg.lr_pretrained}]
        optimizer = torch.optim.Adam([group for group in groups if group["params"]], weight_decay=cfg.weight_decay)
    peaks = [group["lr"] for group in optimizer.param_groups]
    if checkpoint is not None:  # the per-parameter state only: lr and betas come from cfg and the schedule
        optimizer.load_state_dict({"state": checkpoint["optimizer"]["state"],
                                   "param_groups": optimizer.state_dict()["param_groups"]})
    total_steps = cfg.epochs * steps_per_epoch
    if cfg.schedule == "onecycle":
        # +1: the scheduler also steps after the very last batch
        scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=peaks if len(peaks) > 1 else cfg.lr,
                                                        total_steps=total_steps + 1)
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


def balanced_order(classes, seed, epoch, rank, world_size):
    """--balance=sampler: epoch_order's counterpart for classes (the train split's class indices): as
    many rows as there are, drawn with replacement so that each class is equally likely, a pure
    function of (seed, epoch) as well."""
    classes = torch.as_tensor(classes).cpu()
    weights = (1 / torch.bincount(classes).double())[classes]
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.multinomial(weights, len(classes), replacement=True, generator=generator)
    per_rank = len(classes) // world_size
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


def train_step(model, optimizer, scheduler, batch, targets, amp, device, loss_fn=F.mse_loss):
    with autocast(device, amp):
        loss = loss_fn(model(batch), targets)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    scheduler.step()
    return loss
