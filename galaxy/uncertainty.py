"""Which calibration (galaxy/calibration.py) turns these checkpoints' spread into a calibrated sigma,
fitting it when there is none, and the per-galaxy uncertainty file each prediction writes beside its
vote fractions: <name>_std.csv, the calibrated standard deviation, or, when no calibration can be
had, <name>_spread.csv, the raw spread over members x views, so a file named std is always calibrated.

Where the calibration lives, with nothing to type: one checkpoint: calibration.json beside it; the
member_*/best.pt of one ensemble folder: in that folder; any other list: in out_dir; --calibration=PATH
overrides. The file records the checkpoints it was fitted for (each path, size, mtime and SHA-256), the
number of members and the TTA setting: a retrained best.pt, another member or another --tta makes it
stale, and predict.py fits it again on the checkpoints' val split (their split.csv, processed_dir's
labels.csv and images, the same members and TTA) before it predicts anything else, and saves it.

A final fit (--train_on_val) has no val split to fit on: pass --calibration=<the calibration.json of a
sibling run>, members trained alike and predicted with the same number of members and --tta. A file
named by --calibration is used as it is (a note says when it was fitted for other checkpoints); one
fitted for another number of members or TTA setting is an error, as the spread's size depends on both.
"""
from dataclasses import dataclass
import hashlib
import os

import numpy as np

from galaxy.calibration import (CALIBRATION_FILE, calibrated_sigma, calibration_mismatch, fit_calibration,
                                load_calibration, save_calibration, views_text)
from galaxy.ensemble import crop_sources, galaxy_tasks, predict_ensemble
from galaxy.evaluate import split_targets
from galaxy.files import DataError, file_text

SIBLING_HINT = "pass --calibration=<calibration.json of a run trained alike> to use one"


@dataclass
class Uncertainty:
    calibration: object   # the calibration dict, or None when there is none for these checkpoints
    path: str             # the calibration file used, or where one was looked for
    reason: str = ""      # without a calibration: why, in words


# --- where it lives, and does it apply? -----------------------------------------------------------

def calibration_path(cfg, paths):
    """The calibration file for these checkpoint paths (see the module docstring)."""
    if cfg.calibration:
        given = cfg.calibration
        return os.path.join(given, CALIBRATION_FILE) if os.path.isdir(given) else given
    paths = [os.path.normpath(path) for path in paths]
    if len(paths) == 1:
        return os.path.join(os.path.dirname(paths[0]), CALIBRATION_FILE)
    folders = {os.path.dirname(os.path.dirname(path)) for path in paths}
    if len(folders) == 1 and all(os.path.basename(os.path.dirname(path)).startswith("member_") for path in paths):
        return os.path.join(folders.pop(), CALIBRATION_FILE)
    return os.path.join(cfg.out_dir, CALIBRATION_FILE)


def file_digest(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_stamp(path):
    status = os.stat(path)
    return [status.st_size, status.st_mtime_ns]


def fingerprint(paths):
    """[{"path", "stamp" (size, mtime), "sha256"}] of the checkpoint files, as a calibration records them."""
    return [{"path": file_text(os.path.normpath(path)), "stamp": file_stamp(path), "sha256": file_digest(path)}
            for path in paths]


def weights_mismatch(calibration, paths):
    """"" when calibration was fitted for these checkpoint files (the same bytes, wherever they lie now),
    else why not. Files of the recorded size and mtime are taken as the same (a checkpoint is 100+ MB);
    otherwise (copied, or written again) their SHA-256 decides."""
    recorded = calibration.get("checkpoints")
    if not isinstance(recorded, list) or not all(isinstance(c, dict) and "sha256" in c for c in recorded):
        return "it does not record the checkpoints it was fitted for"
    stamps = sorted(str(c.get("stamp")) for c in recorded)
    if stamps == sorted(str(file_stamp(path)) for path in paths):
        return ""
    if sorted(str(c["sha256"]) for c in recorded) != sorted(file_digest(path) for path in paths):
        return "it was fitted for other checkpoints (or these were trained again since)"
    return ""


# --- finding or fitting it ------------------------------------------------------------------------

def val_inputs(cfg, members, groups):
    """(val galaxy ids, their vote fractions, split.csv, tasks, use_png) to fit on; DataError saying why
    there are none."""
    galaxy_ids, targets, _, split_path, _ = split_targets(cfg, "val", members)
    tasks, pngs, raw = galaxy_tasks(cfg, "train", galaxy_ids.tolist())
    use_png, _ = crop_sources(cfg, groups, pngs, raw, "train")
    return galaxy_ids, targets, split_path, tasks, use_png


def fit_on_val(cfg, members, groups):
    """(calibration fitted on the members' val split with cfg.tta, "") or (None, why it cannot be)."""
    try:
        galaxy_ids, targets, split_path, tasks, use_png = val_inputs(cfg, members, groups)
    except DataError as err:
        return None, f"cannot fit one: {err}"
    result = predict_ensemble(members, groups, tasks, cfg, use_png, description="predict val (calibration)")
    if len(result.names) < 2:
        return None, f"cannot fit one: {len(result.names)} of the {len(galaxy_ids)} val galaxies could be read"
    row_of = {gid: row for row, gid in enumerate(galaxy_ids.tolist())}
    truth = targets[[row_of[name] for name in result.names]]
    calibration = fit_calibration(result.mean, truth, result.std if result.views > 1 else None,
                                  members=len(members), tta=cfg.tta)
    calibration["checkpoints"] = fingerprint(member.path for member in members)
    calibration["fitted_on"] = (f"the val split of {file_text(split_path)} with the labels in "
                                f"{file_text(cfg.processed_dir)}" + (f", {len(result.skipped)} unreadable galaxies "
                                                                     f"left out" if result.skipped else ""))
    return calibration, ""


def existing_calibration(cfg, path, members):
    """(the calibration at path if it applies, or None; why a new one is needed). An explicit
    --calibration is used whatever checkpoints it names, but never for another members/TTA setting."""
    if not os.path.exists(path):
        return None, f"none yet at {path}"
    try:
        calibration = load_calibration(path)
    except DataError as err:
        if cfg.calibration:
            raise
        return None, str(err)
    setting = calibration_mismatch(calibration, len(members), cfg.tta)
    if cfg.calibration and setting:
        raise DataError(f"--calibration={path} does not apply: {setting}; predict with that setting, or pass "
                        f"--calibration=<a file to fit one for this setting into>")
    stale = setting or weights_mismatch(calibration, [member.path for member in members])
    if cfg.calibration and stale:
        print(f"calibrated sigma from {path}, as --calibration says ({stale})")
        return calibration, ""
    if stale:
        return None, f"{path} is stale: {stale}"
    print(f"calibrated sigma from {path} (fitted on {calibration.get('galaxies', '?')} val galaxies, "
          f"{views_text(len(members), cfg.tta)})")
    return calibration, ""


def find_or_fit(cfg, members, groups, written=None):
    """The Uncertainty of these members with cfg.tta: the calibration that applies, else one fitted on
    their val split and saved (written, a list, gets its path), else none with the reason."""
    path = calibration_path(cfg, [member.path for member in members])
    calibration, why = existing_calibration(cfg, path, members)
    if calibration is not None:
        return Uncertainty(calibration, path)
    calibration, reason = fit_on_val(cfg, members, groups)
    if calibration is None:
        if cfg.calibration:
            raise DataError(f"--calibration={path} does not exist and {reason}")
        return Uncertainty(None, path, f"{why}, and {reason}; {SIBLING_HINT}")
    saved = f"saved {path}"
    try:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        save_calibration(calibration, path)
        if written is not None:
            written.append(path)
    except (OSError, DataError) as err:
        saved = f"not saved ({err}): used for this run only"
    coverage = calibration["fit_coverage"]
    print(f"fitted the calibration on {calibration['galaxies']} val galaxies, {views_text(len(members), cfg.tta)} "
          f"({why}): +-1 sigma holds {coverage['1sigma']:.1f}% of their errors, +-2 sigma {coverage['2sigma']:.1f}%; "
          f"{saved}")
    return Uncertainty(calibration, path)


def saved_calibration(cfg, members):
    """The Uncertainty plot_image.py draws: the calibration predict.py would use when it exists and
    applies, never fitted here (that takes the whole val split)."""
    path = calibration_path(cfg, [member.path for member in members])
    calibration, why = existing_calibration(cfg, path, members)
    return Uncertainty(calibration, path, "" if calibration is not None else
                       f"{why}; `python predict.py --split=val` with the same --checkpoint and --tta fits one")


# --- what each prediction writes --------------------------------------------------------------------

def uncertainty_files(uncertainty, names, table, result):
    """({name: writer}, what it holds, in words) for an EnsemblePrediction result: names[0] (*_std.csv)
    the calibrated sigma, else names[1] (*_spread.csv) the raw spread when there is one, else nothing.
    table(values) is the CSV's table of the predicted galaxies."""
    std_name, spread_name = names
    if uncertainty is not None and uncertainty.calibration is not None:
        sigma = calibrated_sigma(uncertainty.calibration, result.mean, result.std)
        return {std_name: table(sigma)}, f"the calibrated standard deviation of each vote fraction ({uncertainty.path})"
    reason = uncertainty.reason if uncertainty is not None else "no calibration"
    if result.views > 1:
        return ({spread_name: table(result.std)},
                f"the raw spread over {result.views} members x views, not a calibrated std: {reason}")
    return {}, f"no {std_name}: one checkpoint without TTA has no spread, {reason}"


def error_bars(cfg, members, mean, std):
    """(the error bars of plot_image.py's predicted vote fractions, what they are in words): the calibrated
    sigma when a calibration applies, else the raw spread (None for one checkpoint without TTA)."""
    uncertainty = saved_calibration(cfg, members)
    if uncertainty.calibration is None:
        if std is not None:
            print(f"error bars: the raw spread, not calibrated ({uncertainty.reason})")
        return std, "spread over members x views"
    sigma = calibrated_sigma(uncertainty.calibration, np.asarray(mean)[None], None if std is None else std[None])
    return sigma[0], "calibrated sigma"
