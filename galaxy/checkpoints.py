"""Reading what train.py saved: a checkpoint loaded safely (weights_only), checked, and turned
back into the model it was trained as, with a one-line error naming the fix when it cannot be."""
from collections.abc import Mapping
import os

import torch

from config import config_from_dict
from model import TASK_HEADS, build_model


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


def check_finite(state_dict, path):
    """CheckpointError if any floating-point tensor of state_dict holds a NaN or an inf: such weights
    come from a run that diverged, and would predict NaN for every galaxy (or train on from NaN)."""
    for name, tensor in state_dict.items():
        if torch.is_tensor(tensor) and tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise CheckpointError(f"checkpoint {path} holds non-finite weights (NaN or inf, first in {name}): "
                                  f"it diverged; use an earlier checkpoint or retrain with a lower --lr")


def load_state(model, state_dict, path):
    """load_state_dict with a one-line explanation when the shapes do not match or the weights
    are not finite (every script loads weights through here: predict, plot, --init_from, --resume)."""
    if not isinstance(state_dict, Mapping):
        raise CheckpointError(f"checkpoint {path} holds no weights (a {type(state_dict).__name__}); "
                              f"it was not written by train.py")
    check_finite(state_dict, path)
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as err:
        first = str(err).strip().splitlines()[-1].strip()
        raise CheckpointError(f"checkpoint {path} was saved from a different model ({first}); "
                              f"use a checkpoint trained with the same image_size and output, "
                              f"or start afresh without --resume") from None


def backbone_names(model, keep="hidden"):
    """The state_dict names of the model's conv blocks (keep="features"), or of them and its hidden linear
    layers (keep="hidden"): what --init_from gives a network for a user's labels."""
    parts = ("features.",) + tuple(f"classifier.{i}." for i in range(len(model.classifier) - 1)) * (keep == "hidden")
    return {name for name in model.state_dict() if name.startswith(parts)}


def load_backbone(model, state_dict, path, keep="hidden"):
    """--init_from with --labels: load state_dict's conv blocks (keep="features"), or its conv blocks and
    hidden linear layers (keep="hidden"), strictly; the last Linear and the head stay new (sized to the
    task). Returns the names of the tensors loaded; a one-line CheckpointError when one is missing or
    of another shape."""
    if not isinstance(state_dict, Mapping):
        raise CheckpointError(f"checkpoint {path} holds no weights (a {type(state_dict).__name__}); "
                              f"it was not written by train.py")
    names = backbone_names(model, keep)
    own = {name: tensor for name, tensor in model.state_dict().items() if name in names}
    for name, tensor in own.items():
        if name not in state_dict:
            raise CheckpointError(f"checkpoint {path} has no {name}; it was not written by train.py")
        if tuple(state_dict[name].shape) != tuple(tensor.shape):
            raise CheckpointError(f"checkpoint {path} was saved from a different model ({name} is "
                                  f"{tuple(state_dict[name].shape)} there, {tuple(tensor.shape)} here); pass the "
                                  f"image_size it was trained with, or --init_layers=features (the conv blocks "
                                  f"fit any image_size)")
    loaded = {name: state_dict[name] for name in own}
    check_finite(loaded, path)
    model.load_state_dict(loaded, strict=False)   # what is missing is the new head, by design
    return set(loaded)


def check_task(task, path):
    """The checkpoint's task record (galaxy/tasks.py) if usable, None for a Galaxy Zoo checkpoint; CheckpointError
    for one this project did not write."""
    if task is None:
        return None
    names = task.get("names") if isinstance(task, dict) else None
    ok = (isinstance(names, list) and len(names) >= 1 and all(isinstance(name, str) for name in names)
          and task.get("kind") in TASK_HEADS)
    if ok and task["kind"] == "numbers":
        ok = all(isinstance(task.get(key), list) and len(task[key]) == len(names) for key in ("mean", "std"))
    if not ok:
        raise CheckpointError(f"checkpoint {path} holds an unusable task record; it was not written by train.py")
    return task


def load_model(path, device="cpu"):
    """Rebuild the trained model from a checkpoint: returns (model in eval mode, its Config)."""
    return model_from_checkpoint(read_checkpoint(path), path, device)


def model_from_checkpoint(checkpoint, path, device="cpu"):
    """load_model for a checkpoint already read (by read_checkpoint) from path."""
    if not isinstance(checkpoint, dict) or "model" not in checkpoint or "config" not in checkpoint:
        raise CheckpointError(f"checkpoint {path} has no model/config; it was not written by train.py")
    try:
        # the machine-dependent bounds (workers, threads) were the training machine's to meet
        cfg = config_from_dict(checkpoint["config"]).validate(this_machine=False)
    except ValueError as err:
        raise CheckpointError(f"checkpoint {path} holds an unusable config ({err}); "
                              f"it was not written by this project's train.py") from None
    model = build_model(cfg, check_task(checkpoint.get("task"), path))   # old checkpoints: Galaxy Zoo's 37 outputs
    load_state(model, checkpoint["model"], path)
    return model.to(device).eval(), cfg
