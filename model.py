"""The seed CNN (four conv blocks, three linear layers) and its two output heads,
plus loading a trained model back from a checkpoint.

    python model.py [--image_size=64 --output=tree]   # each layer's output shape and weight count

Shapes at 64x64 input (each conv has stride 1 and padding 1, each pool halves):
    conv 9x9:  64 -> 58, pool -> 29      conv 5x5: 29 -> 27, pool -> 13
    conv 3x3:  13 -> 13, pool -> 6       conv 1x1:  6 ->  8, pool ->  4
    flatten: 512 * 4 * 4 = 8192
"""
import copy
import math
import os
import time

import torch
import torch.nn as nn

from config import Config, config_from_dict, get_config
from dataset import LABEL_COLUMNS, NUM_OUTPUTS, QUESTIONS, dihedral


def conv_block(in_channels, out_channels, kernel_size):
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, stride=1, padding=1),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(kernel_size=2, stride=2),
    )


def flat_features(image_size):
    """Length of the flattened feature vector for a square input of this side."""
    side = image_size
    for kernel_size in (9, 5, 3, 1):
        side = (side + 2 - kernel_size + 1) // 2
    return 512 * side * side


class DecisionTreeHead(nn.Module):
    """Turns 37 logits into vote fractions that obey the Galaxy Zoo decision tree.

    Each question's answers are a softmax over its logits, scaled by the vote fraction
    of the answer that leads to the question (as in the Kaggle winner's solution), so
    e.g. Q3's answers sum to Class2.2 and Q1's to 1. QUESTIONS is in an order where every
    parent comes before its children.
    """

    def __init__(self):
        super().__init__()
        self.slices, self.parent_index = [], []
        start = 0
        for q in QUESTIONS:
            self.slices.append((start, start + len(q.answers)))
            self.parent_index.append(LABEL_COLUMNS.index(q.parent) if q.parent else -1)
            start += len(q.answers)

    def forward(self, logits):
        logits = logits.float()  # the softmax and products in fp32 even under autocast
        answers = []
        for (start, end), parent in zip(self.slices, self.parent_index):
            fractions = torch.softmax(logits[:, start:end], dim=1)
            if parent >= 0:
                # parents precede children, so the parent's column is already in `answers`
                fractions = fractions * torch.cat(answers, dim=1)[:, parent:parent + 1]
            answers.append(fractions)
        return torch.cat(answers, dim=1)


class GalaxyCNN(nn.Module):
    def __init__(self, image_size=64, output="sigmoid", dropout=0.5):
        super().__init__()
        self.features = nn.Sequential(
            conv_block(3, 64, 9),
            conv_block(64, 128, 5),
            conv_block(128, 256, 3),
            conv_block(256, 512, 1),
            nn.Flatten(),
        )
        self.classifier = nn.Sequential(
            nn.Linear(flat_features(image_size), 1024), nn.Dropout(dropout), nn.ReLU(inplace=True),
            nn.Linear(1024, 2048), nn.Dropout(dropout), nn.ReLU(inplace=True),
            nn.Linear(2048, NUM_OUTPUTS),  # the seed's diagram says 128 inputs; the layer before gives 2048
        )
        self.head = nn.Sigmoid() if output == "sigmoid" else DecisionTreeHead()

    def forward(self, images):
        """images: float (N, 3, H, W) in [0, 1]; returns (N, 37) vote fractions in (0, 1)."""
        return self.forward_with_features(images)[0]

    def forward_with_features(self, images):
        """(vote fractions (N, 37), the 2048 penultimate features (N, 2048)) from one forward pass.

        The features are the input of the last Linear, after its ReLU: what "galaxies like this
        one" are compared by (predict.py --embed).
        """
        features = self.classifier[:-1](self.features(images))
        return self.head(self.classifier[-1](features).float()), features


def build_model(cfg: Config):
    return GalaxyCNN(image_size=cfg.image_size, output=cfg.output, dropout=cfg.dropout)


class CheckpointError(RuntimeError):
    pass


def unfinished_run(folder):
    """What to do with a run that has written no best.pt (stopped before its first epoch ended)."""
    return (f"the run in {folder} has not finished an epoch yet; go on with "
            f"`python train.py --out_dir={folder} --resume`")


def read_checkpoint(path, map_location="cpu"):
    """The dict saved by train.py, loaded safely; CheckpointError with the fix if unusable."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        folder = os.path.dirname(path) or "."
        if os.path.basename(path) == "best.pt" and os.path.isfile(os.path.join(folder, "last.pt")):
            raise CheckpointError(f"checkpoint {path} not found: {unfinished_run(folder)}") from None
        raise CheckpointError(f"checkpoint {path} not found; train one with `python train.py` "
                              f"or pass --checkpoint=<out_dir>/best.pt") from None
    except Exception as err:  # truncated file, not a torch file, pickled objects, ...
        raise CheckpointError(f"checkpoint {path} cannot be read ({type(err).__name__}); "
                              f"it is not a checkpoint written by train.py") from None


def load_state(model, state_dict, path):
    """load_state_dict with a one-line explanation when the shapes do not match."""
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as err:
        first = str(err).strip().splitlines()[-1].strip()
        raise CheckpointError(f"checkpoint {path} was saved from a different model ({first}); "
                              f"use a checkpoint trained with the same image_size and output, "
                              f"or start afresh without --resume") from None


def load_model(path, device="cpu"):
    """Rebuild the trained model from a checkpoint: returns (model in eval mode, its Config)."""
    return model_from_checkpoint(read_checkpoint(path), path, device)


def model_from_checkpoint(checkpoint, path, device="cpu"):
    """load_model for a checkpoint already read (by read_checkpoint) from path."""
    if not isinstance(checkpoint, dict) or "model" not in checkpoint or "config" not in checkpoint:
        raise CheckpointError(f"checkpoint {path} has no model/config; it was not written by train.py")
    try:
        cfg = config_from_dict(checkpoint["config"]).validate()
    except ValueError as err:
        raise CheckpointError(f"checkpoint {path} holds an unusable config ({err}); "
                              f"it was not written by this project's train.py") from None
    model = build_model(cfg)
    load_state(model, checkpoint["model"], path)
    return model.to(device).eval(), cfg


# --- running the model -------------------------------------------------------------

def resolve_device(name):
    """'auto' picks CUDA when there is one; asking for CUDA without one is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise CheckpointError("--device=cuda but torch sees no CUDA GPU; use --device=cpu or auto")
    return torch.device(name)


def autocast(device, enabled=True):
    """bf16 autocast on CUDA or CPU (bf16 keeps fp32's range, so no loss scaling is needed)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


def prepare_batch(images_uint8, device, channels_last):
    images = images_uint8.to(device, non_blocking=True).float().div_(255)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images


# --- choosing the numerics ---------------------------------------------------------------
# (amp, channels_last). What is fastest depends on the chip: on a CPU with bf16 units (AMX,
# AVX512-BF16) bf16 + NHWC trains 2-3x faster than fp32 NCHW; on one without, bf16 is emulated and
# slower. So "auto" on a CPU times each candidate on the run's real batch shape and takes the fastest.
NUMERICS_CANDIDATES = ((False, False), (False, True), (True, False), (True, True))


def numerics_name(amp, channels_last):
    return f"{'bf16' if amp else 'fp32'} {'channels_last' if channels_last else 'NCHW'}"


def _timed_step(model, images, targets, amp, channels_last, training, repeats=1):
    """A function that runs `repeats` training steps (or inference batches) of a copy of model in
    these numerics and returns the seconds of one; the copy leaves the model's weights untouched."""
    layout = torch.channels_last if channels_last else torch.contiguous_format
    model = copy.deepcopy(model).to(memory_format=layout).train(training)
    images = images.contiguous(memory_format=layout)
    # only a training step needs one: building the first optimizer imports torch._dynamo, about
    # 1.6 s of predict.py's start-up here (measured beside two training runs)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-9) if training else None
    # CUDA runs asynchronously: without a synchronize the clock would time only the kernel launches
    synchronize = torch.cuda.synchronize if images.device.type == "cuda" else (lambda: None)

    def step():
        synchronize()
        started = time.perf_counter()
        for _ in range(repeats):
            with torch.set_grad_enabled(training), autocast(images.device, amp):
                outputs = model(images)
            if training:
                optimizer.zero_grad(set_to_none=True)
                torch.nn.functional.mse_loss(outputs, targets).backward()
                optimizer.step()
        synchronize()
        return (time.perf_counter() - started) / repeats
    return step


def choose_numerics(amp, channels_last, model, device, batch_size, image_size, training, rounds=2, log=print):
    """(amp, channels_last) as booleans for the config's "auto" | "true" | "false" values.

    A forced value is kept. auto times training steps (or inference batches) of each remaining
    candidate on a copy of the model, on the CPU or GPU it will run on, without touching its weights
    or the random streams, prints the timings and takes the fastest. Neither device has one answer:
    a CPU without bf16 units emulates bf16 slowly, and on an H200 this small net at batch 64 trained
    fastest in fp32 NCHW (bf16 channels_last: 0.82x), since its steps are bound by kernel launches.
    """
    forced = {"true": True, "false": False}
    if amp != "auto" and channels_last != "auto":
        return forced[amp], forced[channels_last]
    candidates = [(a, c) for a, c in NUMERICS_CANDIDATES
                  if forced.get(amp, a) == a and forced.get(channels_last, c) == c]
    cuda = device.type == "cuda"
    repeats = 5 if cuda else 1   # a GPU step takes milliseconds: one alone is mostly timer noise
    # dropout in the timed steps must not shift the run's randomness, on the CPU or the GPU
    with torch.random.fork_rng(devices=[device] if cuda else []):
        images = torch.rand(batch_size, 3, image_size, image_size, device=device)
        targets = torch.rand(batch_size, NUM_OUTPUTS, device=device)
        steps = {candidate: _timed_step(model, images, targets, *candidate, training, repeats)
                 for candidate in candidates}
        for step in steps.values():
            step()   # the first step builds the kernels: not counted
        seconds = {candidate: math.inf for candidate in candidates}
        for _ in range(rounds):   # alternate the candidates, so a slow moment of the machine hits them all
            for candidate, step in steps.items():
                seconds[candidate] = min(seconds[candidate], step())
    best = min(candidates, key=seconds.get)
    what = "training step" if training else "inference batch"
    timings = ", ".join(f"{numerics_name(*c)} {batch_size / seconds[c]:.0f}" for c in candidates)
    log(f"numerics: img/s per {what} of {batch_size}: {timings} -> {numerics_name(*best)}")
    return best


@torch.no_grad()
def predict_views(model, images_uint8, batch_size=256, amp=False, channels_last=False, tta=False, embed=False,
                  progress=None):
    """(vote fractions of each view (V, N, 37), features (N, 2048) averaged over the views or None).

    V is 8 with tta (the symmetries of the square, model inputs dihedral(images, k)), else 1.
    amp and channels_last are booleans (see choose_numerics); with channels_last the model is
    moved to that layout, which load_state_dict and state_dict do not care about. With embed the
    penultimate features come from the same forward pass. progress, if given, is called with the
    number of images done after each batch. Everything returned lives on the CPU.
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    if channels_last:
        model.to(memory_format=torch.channels_last)
    views, features = [], []
    for start in range(0, len(images_uint8), batch_size):
        batch = prepare_batch(images_uint8[start:start + batch_size], device, channels_last)
        with autocast(device, amp):
            outputs = [model.forward_with_features(dihedral(batch, k)) for k in range(8 if tta else 1)]
        views.append(torch.stack([votes.float() for votes, _ in outputs]).cpu())
        if embed:
            features.append((sum(f.float() for _, f in outputs) / len(outputs)).cpu())
        if progress:
            progress(len(batch))
    model.train(was_training)
    if not views:
        width = model.classifier[-1].in_features
        return torch.zeros(8 if tta else 1, 0, NUM_OUTPUTS), (torch.zeros(0, width) if embed else None)
    return torch.cat(views, 1), (torch.cat(features) if embed else None)


def predict(model, images_uint8, batch_size=256, amp=False, channels_last=False, tta=False, progress=None):
    """Vote fractions (N, 37) on the CPU for uint8 images (N, 3, S, S); with tta the mean over the 8 views."""
    return predict_views(model, images_uint8, batch_size, amp, channels_last, tta, progress=progress)[0].mean(0)


def rmse(predictions, targets):
    """The Kaggle metric: root mean squared error over every galaxy and all 37 outputs."""
    return torch.sqrt(torch.mean((predictions.float() - targets.float()) ** 2)).item()


CONFIG_KEYS = ("image_size", "output", "dropout")   # what build_model reads


def layer_table(model, image_size):
    """(name, output shape, weights) per conv block and linear layer for one image of this side."""
    rows, x = [], torch.zeros(1, 3, image_size, image_size)
    model.eval()
    with torch.no_grad():
        for index, block in enumerate(model.features[:-1]):
            x = block(x)
            conv = block[0]
            rows.append((f"conv {conv.kernel_size[0]}x{conv.kernel_size[0]} + pool {index + 1}", tuple(x.shape[1:]),
                         sum(p.numel() for p in block.parameters())))
        x = model.features[-1](x)
        rows.append(("flatten", tuple(x.shape[1:]), 0))
        for layer in model.classifier:
            x = layer(x)
            if isinstance(layer, nn.Linear):
                rows.append((f"linear {layer.in_features} -> {layer.out_features}", tuple(x.shape[1:]),
                             sum(p.numel() for p in layer.parameters())))
    return rows


def main():
    cfg = get_config(doc=__doc__, keys=CONFIG_KEYS)
    model = build_model(cfg)
    for name, shape, weights in layer_table(model, cfg.image_size):
        print(f"{name:<24} {str(shape):<18} {weights:>12,}")
    print(f"{'total':<24} {'':<18} {sum(p.numel() for p in model.parameters()):>12,}  ({cfg.output} head)")


if __name__ == "__main__":
    main()
