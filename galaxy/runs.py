"""A run's folder and its life: the config a run gets (its saved config as the base on --resume),
what --resume may change, --init_from's weights, the out_dir lock, writing checkpoints and the
training curves (metrics.csv, loss.png), a missing best.pt given back, and an ensemble's members
trained as train.py processes, one after another or side by side."""
import math
import os
import shutil
import signal
import subprocess
import sys
import time

from matplotlib.figure import Figure  # no pyplot: files only, whatever the backend
from matplotlib.ticker import MaxNLocator
import pandas as pd
import torch

from config import build_config, config_from_dict, cpu_count, max_workers
from galaxy.checkpoints import CheckpointError, read_checkpoint
from galaxy.crop import CROP_KEYS, crop_settings
from galaxy.files import atomic_write, lock_folder, remove_dead_temp_files, writable_folder

TRAIN_SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "train.py")   # each member runs it
# tests only: seconds each checkpoint lingers under its temporary name, so a kill can land mid-write
SAVE_DELAY = float(os.environ.get("TRAIN_TEST_SAVE_DELAY", "0"))

# --resume may change these; what each does is in docs/training.md ("Resuming and extending")
CHANGEABLE_ON_RESUME = (
    "epochs", "lr",                                   # the lr schedule is re-planned from the current step
    "max_steps", "threads", "workers", "device", "amp", "channels_last",   # how, not what, it computes
    "out_dir", "processed_dir",                       # checked: the same galaxies (split.csv) and crop keys
    "resume", "members", "members_at_once", "recipe", "ids",   # not read by a resumed run, nor are the next
    "raw_dir", "demo", "demo_dir", "demo_train", "demo_test",
    "checkpoint", "split", "tta", "show", "images", "embed", "similar", "embeddings",   # predict.py, plot_image.py only
    "calibration", "catalog", "output_file", "id_column", "file_column", "band_columns", "shard", "join",
    "scale",                                          # bench.py only
    "lr_pretrained",                                  # as lr: the loaded layers' share of it
)
# a resumed run takes this machine's value of these unless given again, not the saved one
MACHINE_KEYS = ("workers", "members_at_once")
# ... and not these: they define what is trained, so a change would make one run of two halves
FIXED_ON_RESUME = (
    "batch_size", "schedule", "seed", "split_seed", "val_fraction", "test_fraction", "train_on_val", "output",
    "dropout", "weight_decay", "ema", "init_from", *CROP_KEYS,
    "aug_flips", "aug_rotate", "aug_shift", "aug_zoom", "aug_brightness",
    "labels", "label_columns", "images_dir", "init_layers", "freeze", "balance",   # the task and what trains
)


def parse_config(overrides):
    """(the run's Config, last.pt's contents on --resume else None). On --resume the saved
    config is the base and the command line overrides it, so `python train.py --resume` alone
    continues the same run; check_resume refuses the overrides that cannot apply mid-run."""
    cfg = build_config(overrides)
    checkpoint = None
    if cfg.resume:
        if "init_from" in overrides:
            raise ValueError("--init_from starts a new run and --resume continues one; pass only one of them")
        path = os.path.join(cfg.out_dir, "last.pt")
        if not os.path.isfile(path):
            raise CheckpointError(f"--resume: {path} not found; train without --resume first, "
                                  f"or point --out_dir at the run to continue")
        checkpoint = read_checkpoint(path)
        saved = config_from_dict(checkpoint["config"]).to_dict()
        # how many processes the run had belongs to the machine it ran on, not to the run: a run resumed on
        # a smaller machine takes this one's defaults unless they are given again. Its threads are kept
        # (they change the float sums, and an exact resume needs the same), but never above this machine's bound
        for key in MACHINE_KEYS:
            saved.pop(key, None)
        saved["threads"] = min(saved.get("threads", 0), max_workers())
        cfg = build_config({**saved, **overrides, "out_dir": cfg.out_dir})   # the run is where last.pt is
    if cfg.labels:   # a user's images are cut from their files as the init_from network's were
        cfg = adopt_init_settings(cfg, overrides) if checkpoint is None else cfg
    else:
        cfg = adopt_crop_settings(cfg, overrides)
    if checkpoint is not None:
        check_resume(cfg, checkpoint)
    check_fine_tuning(cfg)
    return cfg, checkpoint


def adopt_init_settings(cfg, overrides):
    """--labels with --init_from: the crop keys (image_size included) of the checkpoint it starts from,
    unless given: the loaded layers then see galaxies at the scale they learnt them."""
    if not cfg.init_from:
        return cfg
    saved = config_from_dict(read_checkpoint(cfg.init_from).get("config") or {})
    return build_config({**{key: getattr(saved, key) for key in CROP_KEYS}, **overrides})


def check_fine_tuning(cfg):
    """ValueError for fine-tuning keys that cannot apply: freezing needs loaded layers to keep."""
    if cfg.freeze != "none" and not (cfg.labels and cfg.init_from):
        raise ValueError(f"--freeze={cfg.freeze} needs --labels and --init_from: it keeps the loaded layers fixed")
    if cfg.freeze == "hidden" and cfg.init_layers != "hidden":
        raise ValueError("--freeze=hidden with --init_layers=features would keep random hidden layers fixed; "
                         "pass --freeze=features, or --init_layers=hidden")


def adopt_crop_settings(cfg, overrides):
    """Take the crop keys from the settings preprocess.py saved with the PNGs, so the checkpoint
    records how its inputs were really made and predict.py crops raw JPEGs the same way. A crop
    key asked for on the command line that the PNGs were not made with is an error."""
    for key, value in crop_settings(cfg.processed_dir).items():
        if key not in CROP_KEYS:
            continue
        value = type(getattr(cfg, key))(value)
        if key in overrides and overrides[key] != value:
            raise ValueError(f"--{key}={overrides[key]} but the PNGs in {cfg.processed_dir} were made with "
                             f"{key}={value}; re-run `python preprocess.py --{key}={overrides[key]} "
                             f"--processed_dir=...` into another folder, or drop --{key}")
        setattr(cfg, key, value)
    return cfg


def check_resume(cfg, checkpoint):
    """ValueError unless cfg can continue checkpoint's run: no FIXED_ON_RESUME key changed, and
    epochs not below the epochs done (or started)."""
    saved = config_from_dict(checkpoint["config"])
    changed = [f"{key} {getattr(saved, key)} -> {getattr(cfg, key)}"
               for key in FIXED_ON_RESUME if getattr(saved, key) != getattr(cfg, key)]
    if changed:
        crop_note = (" (crop keys follow the PNGs' preprocess.json)"
                     if any(change.split()[0] in CROP_KEYS for change in changed) else "")
        raise ValueError(f"--resume cannot change {', '.join(changed)}{crop_note}: they define the run in "
                         f"{cfg.out_dir}; drop them, or start a new run with another --out_dir "
                         f"(--init_from={os.path.join(cfg.out_dir, 'last.pt')} starts one from its weights)")
    started = checkpoint["epoch"] + (1 if checkpoint["step_in_epoch"] else 0)
    if cfg.epochs < started:
        where = f"is in epoch {started}" if checkpoint["step_in_epoch"] else f"has done {started} epochs"
        raise ValueError(f"--epochs={cfg.epochs} but the run in {cfg.out_dir} {where}; pass "
                         f"--epochs={started} or more (to extend it), or a new --out_dir")


def run_is_complete(cfg, checkpoint):
    return checkpoint["epoch"] >= cfg.epochs and not checkpoint["step_in_epoch"]


def read_init_weights(cfg):
    """The weights of --init_from's checkpoint, checked to fit this run's model."""
    checkpoint = read_checkpoint(cfg.init_from)
    if not isinstance(checkpoint, dict) or "model" not in checkpoint or "config" not in checkpoint:
        raise CheckpointError(f"--init_from={cfg.init_from} has no model/config; it was not written by train.py")
    saved = config_from_dict(checkpoint["config"])
    if not cfg.labels and (saved.image_size, saved.output) != (cfg.image_size, cfg.output):   # --labels: a new head
        raise CheckpointError(f"--init_from={cfg.init_from} holds a model for image_size {saved.image_size}, "
                              f"output {saved.output}, not image_size {cfg.image_size}, output {cfg.output}; "
                              f"start from a checkpoint of the same shape")
    return checkpoint["model"]


def save_checkpoint(path, state):
    def write(tmp):
        # through a Python file: torch.save given a path reports a full disk as "iostream error",
        # a file object's write raises OSError(ENOSPC), which atomic_write turns into a clear message
        with open(tmp, "wb") as f:
            torch.save(state, f)
        time.sleep(SAVE_DELAY)
    atomic_write(path, write)


def save_checkpoints(paths, state):
    """Write state once, under the first path, and give the others the same file: a hard link
    where the file system has them, else a copy. An epoch that improves then writes its 134 MB of
    weights and Adam moments once, not twice: on an H200 0.18 s instead of 0.39 s, where a
    2,700-galaxy epoch takes 0.3 s. Sharing the file is safe because a checkpoint is never written
    into: the next last.pt is a new file renamed onto the name, which leaves best.pt's as it was."""
    first, *others = paths
    save_checkpoint(first, state)

    def link_or_copy(tmp):
        try:
            os.link(first, tmp)
        except OSError:   # no hard links here (some network and FAT file systems)
            shutil.copyfile(first, tmp)
    for path in others:
        atomic_write(path, link_or_copy)


def checkpoint_state(raw_model, optimizer, scheduler, cfg, progress, aug_generator, device, train_mean, numerics,
                     averaged_model=None):
    """Everything --resume needs to go on exactly where the run was. "model" holds the weights to
    predict with: with --ema the averaged ones, and the trained ones under "trained_model". A model
    for a user's labels adds its task record (galaxy/tasks.py), which sizes its head when it is loaded."""
    weights = {"model": raw_model.state_dict()} if averaged_model is None else {
        "model": averaged_model.state_dict(), "trained_model": raw_model.state_dict()}
    return {
        **({"task": raw_model.task} if raw_model.task else {}),
        "numerics": numerics,  # what amp/channels_last "auto" chose, so a resumed run keeps it
        **weights,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "config": cfg.to_dict(),
        "train_mean": train_mean,  # predict.py's answer for a test image it cannot read
        **progress,
        "rng": {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.zeros(0, dtype=torch.uint8),
            "augment": aug_generator.get_state(),
        },
    }


def write_metrics(history, out_dir, baseline_rmse, plot=True):
    """out_dir/metrics.csv, one row an epoch, and with plot its curves as out_dir/loss.png."""
    table = pd.DataFrame(history)
    atomic_write(os.path.join(out_dir, "metrics.csv"), lambda tmp: table.to_csv(tmp, index=False))
    if not plot:
        return
    fig = Figure(figsize=(7, 4.5))
    ax = fig.add_subplot()
    ax.plot(table["epoch"], table["train_rmse"], "o-", label="train RMSE (augmented, dropout on)")
    if table["val_rmse"].notna().any():   # a run without a val split draws its train curve alone
        ax.plot(table["epoch"], table["val_rmse"], "s-", label="validation RMSE")
        ax.axhline(baseline_rmse, color="gray", ls="--", label=f"predict the mean ({baseline_rmse:.4f})")
        best = table["val_rmse"].idxmin()
        ax.annotate(f"best {table['val_rmse'][best]:.4f}", (table["epoch"][best], table["val_rmse"][best]),
                    textcoords="offset points", xytext=(0, -16), ha="center")
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("RMSE over the 37 vote fractions")
    ax.set_title("Galaxy Zoo training")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    atomic_write(os.path.join(out_dir, "loss.png"), lambda tmp: fig.savefig(tmp, dpi=120, format="png"))


def repair_best(cfg, checkpoint):
    """Give a run whose best.pt is missing one again, so neither --resume nor predict.py is stuck.

    train.py writes best.pt before last.pt, so this only meets runs from before that rule or a
    best.pt deleted by hand. last.pt's weights at an epoch's end are the best still on disk;
    mid-epoch there are none, and the end of this epoch writes best.pt.
    """
    path = os.path.join(cfg.out_dir, "best.pt")
    if os.path.isfile(path) or not checkpoint["history"]:
        return
    if checkpoint["step_in_epoch"]:
        checkpoint["best_val_rmse"] = math.inf
        print(f"{path} is missing: the end of this epoch writes it")
        return
    last = checkpoint["history"][-1]   # a run of classes (galaxy/tasks.py) is chosen by 1 - balanced accuracy
    checkpoint["best_val_rmse"] = last["val_rmse"] if "val_rmse" in last else 1 - last["val_balanced_accuracy"]
    save_checkpoint(path, checkpoint)
    print(f"{path} was missing: wrote last.pt's weights (epoch {checkpoint['epoch']}) as best.pt")


def claim_out_dir(out_dir):
    """Lock out_dir for this run (one-line error if another run holds it or it cannot be written)
    and delete the temporary files killed runs left there. Returns the lock, to be kept open."""
    writable_folder(out_dir, "out_dir")
    lock = lock_folder(out_dir, "train.py")
    for name in remove_dead_temp_files(out_dir):
        print(f"removed {os.path.join(out_dir, name)}, left by a killed run")
    return lock


def train_members(cfg, argv):
    """Train an ensemble's members, each a train.py process of its own in out_dir/member_<k> with
    seed cfg.seed + k - 1 and the same split_seed (so the same val and test galaxies), one after
    another or members_at_once side by side. Re-running the same command resumes an unfinished
    member and skips finished ones."""
    lock = claim_out_dir(cfg.out_dir)  # noqa: F841 (held open): one ensemble command at a time
    own_keys = ("--members", "--out_dir", "--seed", "--resume", "--members_at_once")
    passed = [arg for arg in argv if arg.split("=")[0] not in own_keys]
    pending = []
    for k in range(1, cfg.members + 1):
        member_dir, seed = os.path.join(cfg.out_dir, f"member_{k}"), cfg.seed + k - 1
        args = [*passed, f"--out_dir={member_dir}", f"--seed={seed}", "--members=1"]
        last = os.path.join(member_dir, "last.pt")
        if os.path.isfile(last):
            checkpoint = read_checkpoint(last)
            if run_is_complete(cfg, checkpoint):
                print(f"member {k}: done, skipped")
                continue
            # its weights are in last.pt now; --init_from is for starting a run only
            args = [arg for arg in args if not arg.startswith("--init_from")] + ["--resume"]
        command = [sys.executable, "-u", TRAIN_SCRIPT, *args]   # -u: a log file gets each line as it is printed
        pending.append((f"member {k} of {cfg.members}: seed {seed}", member_dir, command))
    at_once = min(cfg.members_at_once, len(pending))
    if at_once > 1 and not cfg.threads:   # side by side, the CPU's cores are shared out, not oversubscribed
        for _, _, command in pending:
            command.append(f"--threads={max(1, cpu_count() // at_once)}")
    return run_members(pending, at_once)


def run_members(pending, at_once):
    """Run the pending (name, member_dir, command) members, at most at_once at a time, and return
    the first non-zero exit code (0 if all finish). Each runs in its own session, so a terminal's
    Ctrl-C reaches it only through us (not twice): SIGINT/SIGTERM is passed to every running
    member, which saves last.pt and exits, and no further member starts; nor after a failure.
    Side by side, each member writes to member_dir/train.log instead of the terminal."""
    running = {}   # process -> (name, its log file or None)
    stopped_by = []

    def forward(signum, frame):
        stopped_by.append(signum)
        for process in running:
            process.send_signal(signum)

    previous = {signum: signal.signal(signum, forward) for signum in (signal.SIGINT, signal.SIGTERM)}
    code = 0
    try:
        while running or (pending and not stopped_by and not code):
            while pending and len(running) < at_once and not stopped_by and not code:
                name, member_dir, command = pending.pop(0)
                log = None
                if at_once > 1:
                    os.makedirs(member_dir, exist_ok=True)
                    log = open(os.path.join(member_dir, "train.log"), "a")
                print(f"{name} -> {member_dir}" + (f" (log: {log.name})" if log else ""), flush=True)
                process = subprocess.Popen(command, start_new_session=True, stdout=log,
                                           stderr=subprocess.STDOUT if log else None)
                running[process] = (name.split(":")[0], log)
                if stopped_by:   # the signal came between Popen and the line above
                    process.send_signal(stopped_by[0])
            finished = [process for process in running if process.poll() is not None]
            if not finished:
                time.sleep(0.2)
            for process in finished:
                name, log = running.pop(process)
                said = f": {last_line(log.name)}" if log else ""
                if log:
                    log.close()
                if process.returncode:
                    code = code or process.returncode
                    print(f"{name} stopped (exit {process.returncode}){said}; run the same command again to continue",
                          flush=True)
                elif log:
                    print(f"{name} finished{said}", flush=True)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return code


def last_line(path):
    """The last line a member wrote to its log (its test RMSE, or its error), progress bars aside."""
    with open(path, encoding="utf-8", errors="replace") as log:
        lines = [line.strip() for line in log.read().replace("\r", "\n").split("\n")]
    return next((line for line in reversed(lines) if line and "img/s" not in line), "(nothing written)")
