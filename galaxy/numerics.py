"""Where and in which numerics the model runs: the device, bf16 autocast, the memory layout, and
"auto", which times each (amp, channels_last) candidate on the run's real batch shape and keeps the fastest."""
import copy
import math
import time

import torch

from galaxy.checkpoints import CheckpointError


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
        targets = torch.rand(batch_size, model.classifier[-1].out_features, device=device)   # 37, or a task's
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
