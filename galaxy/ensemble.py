"""Several checkpoints (an ensemble) run over the same galaxies, one batch at a time: which
checkpoints a --checkpoint spec names, the crop each member needs, the pool worker that reads
each image once and crops it once per distinct crop setting, and the mean and spread of the
members' (and TTA views') vote fractions.

predict.py and plot_image.py both predict through here: one checkpoint is an ensemble of one.
A member whose vote fractions are not finite (NaN, inf: a run that diverged) stops the run with
its name, so that no output ever holds them.
"""
from dataclasses import dataclass
import glob
import os
import stat
import zipfile

from matplotlib.figure import Figure  # no pyplot: files only, whatever the backend
import numpy as np
import torch

from dataset import NUM_OUTPUTS, DataError, png_ids, read_png
from galaxy import kaggle_raw
from galaxy.checkpoints import CheckpointError, model_from_checkpoint, read_checkpoint, unfinished_run
from galaxy.crop import CROP_KEYS, BadImage, crop_galaxy, crop_settings_mismatch
from galaxy.files import file_text, signals_held, write_failure
from galaxy.fits import crop_planes, is_fits, read_bands
from galaxy.inference import batch_tensor, inference_batch, predict_views
from galaxy.numerics import choose_numerics
from galaxy.pool import run_pool, unexpected_error, worker_job
from galaxy.similar import EMBEDDINGS_FILE, IDS_FILE, SOURCE_FILE, embedding_source, write_embeddings

# --- which checkpoints ---------------------------------------------------------------------------

def _checkpoints_in(path):
    """A file is itself; a run folder its best.pt; a folder of member_*/ runs each member's best.pt.

    A member without best.pt is an error, not left out: an ensemble silently one member short
    would look like the whole one.
    """
    if not os.path.isdir(path):
        return [path]
    members = sorted(folder for folder in glob.glob(os.path.join(path, "member_*")) if os.path.isdir(folder))
    if members:
        for folder in members:
            if not os.path.isfile(os.path.join(folder, "best.pt")):
                raise CheckpointError(f"{folder} has no best.pt: {unfinished_run(folder)}, or name the members to "
                                      f"use, e.g. --checkpoint='{os.path.join(path, 'member_1', 'best.pt')}'")
        return [os.path.join(folder, "best.pt") for folder in members]
    if os.path.isfile(os.path.join(path, "best.pt")) or os.path.isfile(os.path.join(path, "last.pt")):
        return [os.path.join(path, "best.pt")]   # without best.pt, read_checkpoint says what to do
    raise CheckpointError(f"the folder {path} holds no best.pt and no member_*/best.pt; pass --checkpoint=<file>.pt "
                          f"or a run folder written by train.py")


def resolve_checkpoints(spec, out_dir="runs"):
    """The sorted checkpoint paths named by --checkpoint: comma-separated files, run folders or globs.

    An empty spec means out_dir/best.pt. A plain file that does not exist is kept, so that
    read_checkpoint says it is not found with the fix; a glob that matches nothing is an error here.
    """
    paths = []
    for part in [part.strip() for part in (spec or os.path.join(out_dir, "best.pt")).split(",") if part.strip()]:
        if any(char in part for char in "*?["):
            matches = sorted(glob.glob(part))
            if not matches:
                raise CheckpointError(f"--checkpoint={part} matches no file; check the pattern "
                                      f"(quote it, e.g. --checkpoint='runs/ens/member_*/best.pt')")
            for match in matches:
                paths += _checkpoints_in(match)
        else:
            paths += _checkpoints_in(part)
    if not paths:
        raise CheckpointError(f"--checkpoint={spec!r} names no checkpoint; pass e.g. --checkpoint=runs/best.pt")
    return sorted(dict.fromkeys(os.path.normpath(path) for path in paths))


# --- the members -------------------------------------------------------------------------------

@dataclass
class Member:
    path: str
    train_mean: object   # the checkpoint's mean vote fractions of its train split (None before they were saved)
    model: torch.nn.Module
    cfg: object          # the Config it was trained with: its crop and image_size
    group: int = 0       # which of the ensemble's crop groups feeds it


def crop_key(cfg):
    return tuple(getattr(cfg, key) for key in CROP_KEYS)


def load_members(paths, device):
    """(members, crop groups): each member's model and config, and one Config per distinct crop setting.

    Members that crop alike share a group, so each image is cropped once per group, not per member.
    """
    members, groups = [], []
    for path in paths:
        checkpoint = read_checkpoint(path)
        model, cfg = model_from_checkpoint(checkpoint, path, device)
        keys = [crop_key(group) for group in groups]
        if crop_key(cfg) not in keys:
            groups.append(cfg)
            keys.append(crop_key(cfg))
        # only train_mean is kept: the rest of the checkpoint (its optimizer state is twice the
        # model's size) would stay in memory for the whole prediction, once per member
        members.append(Member(path, checkpoint.get("train_mean"), model, cfg, keys.index(crop_key(cfg))))
    return members, groups


def inference_numerics(members, amp, channels_last, batch_size, log=print):
    """(amp, channels_last) for predicting, chosen once on the first member (model.choose_numerics):
    the members share one architecture, so what is fastest for one is fastest for all."""
    first = members[0]
    device = next(first.model.parameters()).device
    return choose_numerics(amp, channels_last, first.model, device, batch_size, first.cfg.image_size,
                           training=False, log=log)


# --- where each member's images come from ------------------------------------------------------

def galaxy_tasks(cfg, kaggle_split, galaxy_ids=None):
    """([(galaxy_id, where)], PNG ids, raw images) for Kaggle's "train" or "test" galaxies (all of
    them, or galaxy_ids): where holds the galaxy's processed PNG and raw image (ensemble.load_crops)."""
    png_dir = os.path.join(cfg.processed_dir, kaggle_split)
    pngs = set(png_ids(png_dir).tolist())
    raw = kaggle_raw.raw_images(cfg.raw_dir, kaggle_split)
    galaxy_ids = sorted(pngs | set(raw)) if galaxy_ids is None else galaxy_ids
    tasks = [(gid, {"png": os.path.join(png_dir, f"{gid}.png") if gid in pngs else None, "raw": raw.get(gid)})
             for gid in galaxy_ids]
    return tasks, pngs, raw


def crop_sources(cfg, groups, pngs, raw, kaggle_split):
    """(use_png per crop group, what each group reads, in words).

    A group reads the PNGs when preprocess.py made them with its crop settings, else crops the
    raw JPEGs exactly as in training; DataError when it has neither.
    """
    png_dir = os.path.join(cfg.processed_dir, kaggle_split)
    use_png, sources = [], []
    for group in groups:
        mismatch = crop_settings_mismatch(cfg.processed_dir, group) if pngs else "no PNGs"
        use_png.append(not mismatch)
        if not mismatch:
            sources.append(f"processed PNGs in {png_dir}")
        elif raw:
            why = f" (not the PNGs in {png_dir}: {mismatch})" if pngs else ""
            sources.append(f"raw JPEGs in {cfg.raw_dir}, cropped with crop={group.crop}{why}")
        elif pngs:
            raise DataError(f"the PNGs in {png_dir} were cropped differently ({mismatch}); re-run "
                            f"`python preprocess.py` with the checkpoint's settings, or put Kaggle's raw images in "
                            f"{cfg.raw_dir}")
        else:
            raise DataError(f"no {kaggle_split} images: put Kaggle's {kaggle_raw.SPLIT_FOLDERS[kaggle_split]}.zip "
                            f"(or the folder {kaggle_raw.SPLIT_FOLDERS[kaggle_split]}/) in {cfg.raw_dir}/, or run "
                            f"`python preprocess.py` to write {png_dir}/<GalaxyID>.png")
    return use_png, sources


def describe_members(members, sources):
    for member in members:
        print(f"  {member.path}: crop={member.cfg.crop}, image_size={member.cfg.image_size}, from "
              f"{sources[member.group]}")



# --- reading and cropping, in the worker pool ------------------------------------------------------

FILE_KINDS = ((stat.S_ISFIFO, "FIFO"), (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "character device"),
              (stat.S_ISBLK, "block device"), (stat.S_ISDIR, "folder"))


def file_kind(mode):
    """"" for a regular file's st_mode, else what it is in words ("FIFO", "socket", ...)."""
    if stat.S_ISREG(mode):
        return ""
    return next((kind for test, kind in FILE_KINDS if test(mode)), "special file")


def read_regular_file(path):
    """The bytes of path; BadImage for anything but a regular file. O_NONBLOCK: opening a FIFO
    would otherwise wait for a writer forever (it is then refused unread)."""
    with open(os.open(path, os.O_RDONLY | os.O_NONBLOCK), "rb") as f:
        kind = file_kind(os.fstat(f.fileno()).st_mode)
        if kind:
            raise BadImage(f"not a regular file ({kind})")
        return f.read()


def read_fits(sources):
    """A FITS file's bytes, or a tuple of each band file's; '' (no file named) stays '' for read_bands to name."""
    many = isinstance(sources, (list, tuple))
    data = [read_regular_file(path) if path else "" for path in (sources if many else [sources])]
    return tuple(data) if many else data[0]


def load_crops(task):
    """Pool worker: (name, [uint8 HWC crop for each crop group] or None, why it was skipped).

    task is (name, where) with where holding any of "png" (a processed PNG), "raw" (a reference
    into raw_dir), "file" (a path: JPEG, PNG, or FITS by its name) and "fits" (three band files of
    one FITS image, galaxy/fits.read_bands). A group marked use_png reads the PNG when there is one; the
    others crop the raw bytes, read once however many groups need them.
    """
    name, where = task
    job = worker_job
    data, crops = None, []
    try:
        for group in job["groups"]:
            png = where.get("png") if group["use_png"] else None
            if png and os.path.isfile(png):
                crops.append(read_png(png, group["cfg"].image_size))
                continue
            if data is None:
                if where.get("raw"):
                    data = kaggle_raw.read_raw(job["raw_dir"], where["raw"])
                elif "fits" in where:   # a catalog's three band files, or its empty file name
                    data = read_bands(read_fits(where["fits"]))
                elif where.get("file"):
                    data = read_regular_file(where["file"])
                    data = read_bands(data) if is_fits(where["file"]) else data   # its bands, stretched by crop_planes
                else:
                    return name, None, "no image: neither a PNG made with these crop settings nor a raw image"
            crop = crop_planes if isinstance(data, np.ndarray) else crop_galaxy   # FITS bands, or an image's bytes
            crops.append(np.asarray(crop(data, group["cfg"])[0], np.uint8))
    except BadImage as err:
        return name, None, str(err)
    except (OSError, SyntaxError, ValueError, EOFError, zipfile.BadZipFile, DataError) as err:   # corrupt, truncated
        return name, None, f"unreadable file: {type(err).__name__}: {err}"
    except Exception as err:   # one bad image must never end a run, whatever it raises
        return name, None, unexpected_error(err)
    return name, crops, ""


# --- predicting ------------------------------------------------------------------------------------

def check_finite(members, per_member, features, names=None):
    """CheckpointError naming each member whose vote fractions (M, B, 37), or features (B, F) for
    --embed (the first member's), hold a NaN or inf, and the first galaxy affected (names[i], else
    its place in the batch).

    Weights that are finite can still overflow on some image: its row would be blank, or (as the
    mean over members) poison the ensemble's row while its summary still read like a galaxy.
    """
    problems = []
    for index, member in enumerate(members):
        outputs = [("vote fractions", per_member[index])] + ([("features", features)] if index == 0 and
                                                             features is not None else [])
        for what, values in outputs:
            bad = (~torch.isfinite(values).reshape(len(values), -1).all(1)).nonzero().flatten().tolist()
            if bad:
                first = file_text(names[bad[0]]) if names is not None else f"image {bad[0] + 1} of the batch"
                count = f"{len(bad)} galax{'y' if len(bad) == 1 else 'ies'} of a batch of {len(values)}"
                problems.append(f"member {file_text(member.path)} gives non-finite {what} for {count} (first: {first})")
                break
    if problems:
        leave = "it diverged; leave it" if len(problems) == 1 else "they diverged; leave them"
        raise CheckpointError(f"{'; '.join(problems)}: {leave} out of --checkpoint")


def predict_batch(members, group_images, numerics, tta, embed=False, names=None):
    """One batch through every member, one after another, each on its own crop group's images.

    group_images[g] is the uint8 batch (B, 3, S, S) as crop group g cuts it. Returns (mean (B, 37),
    std (B, 37), each member's vote fractions (M, B, 37), features (B, F) or None): mean and std
    run over all members x views (8 views each with tta), the features are the first member's.
    A member giving non-finite values is a CheckpointError (check_finite; names, the B galaxies'
    names, say which).
    """
    all_views, member_means, features = [], [], None
    for index, member in enumerate(members):
        images = group_images[member.group]
        views, member_features = predict_views(member.model, images, max(1, len(images)), *numerics, tta,
                                               embed=embed and index == 0)
        all_views.append(views)
        member_means.append(views.mean(0))
        features = member_features if index == 0 else features
    member_means = torch.stack(member_means)
    check_finite(members, member_means, features, names)
    views = torch.cat(all_views)
    return views.mean(0), views.std(0, correction=0), member_means, features


@dataclass
class EnsemblePrediction:
    names: list            # one per predicted galaxy or file, in task order
    mean: np.ndarray       # (N, 37) vote fractions averaged over members x views
    std: np.ndarray        # (N, 37) their standard deviation: the spread
    members: np.ndarray    # (M, N, 37) each member's own (TTA-averaged) vote fractions
    features: object       # (N, F) float16 penultimate features of the first member, or None
    source: object         # with features: the model that made them (galaxy.similar.embedding_source)
    skipped: list          # [(name, reason)] for the images that could not be read
    views: int             # members x views per member; the spread is 0 when it is 1


def predict_ensemble(members, groups, tasks, cfg, use_png=(), embed=False, description="predict"):
    """EnsemblePrediction for tasks (see load_crops), decoded by cfg.workers processes while the
    members run batch after batch: one batch of images in memory, whatever the number of members.

    use_png[g] says whether crop group g may read processed PNGs (they were made with its settings).
    """
    device = next(members[0].model.parameters()).device
    batch_size = inference_batch(cfg, device)
    numerics = inference_numerics(members, cfg.amp, cfg.channels_last, batch_size)
    job = {"groups": [{"cfg": group, "use_png": bool(use_png and use_png[g])} for g, group in enumerate(groups)],
           "raw_dir": cfg.raw_dir}
    names, means, stds, member_means, features, skipped, batch = [], [], [], [], [], [], []

    def flush():
        group_images = [batch_tensor([crops[g] for _, crops in batch], pin=device.type == "cuda")
                        for g in range(len(groups))]
        mean, std, per_member, batch_features = predict_batch(members, group_images, numerics, cfg.tta, embed,
                                                              names=[name for name, _ in batch])
        names.extend(name for name, _ in batch)
        means.append(mean.numpy())
        stds.append(std.numpy())
        member_means.append(per_member.numpy())
        if embed:
            features.append(batch_features.numpy().astype(np.float16))
        batch.clear()

    results = run_pool(load_crops, tasks, cfg.workers, job, description, ordered=True) if tasks else []
    for name, crops, reason in results:
        if crops is None:
            skipped.append((name, reason))
            continue
        batch.append((name, crops))
        if len(batch) == batch_size:
            flush()
    if batch:
        flush()
    empty = np.zeros((0, NUM_OUTPUTS), np.float32)
    return EnsemblePrediction(
        names=names, mean=np.concatenate(means) if means else empty, std=np.concatenate(stds) if stds else empty,
        members=(np.concatenate(member_means, 1) if member_means
                 else np.zeros((len(members), 0, NUM_OUTPUTS), np.float32)),
        features=(np.concatenate(features) if features else np.zeros((0, 0), np.float16)) if embed else None,
        source=embedding_source(members[0], cfg.tta) if embed else None,
        skipped=skipped, views=len(members) * (8 if cfg.tta else 1))


def save_embeddings(out_dir, result, sources, written):
    """write_embeddings (galaxy/similar.py) of an EnsemblePrediction's features, with the model that made
    them, each name through file_text, with Ctrl-C held back until they are written; written (a list)
    gets their paths. A failed write keeps the features in
    embeddings_rescued.npz and is a DataError that says where."""
    ids, features = [file_text(name) for name in result.names], result.features
    with signals_held():
        try:
            write_embeddings(out_dir, ids, sources, features, result.source)
        except Exception as err:
            rescue = {"id": np.array(ids, str), "source": np.array(sources, str), "features": features}
            raise DataError(write_failure(os.path.join(out_dir, EMBEDDINGS_FILE), err, rescue, EMBEDDINGS_FILE,
                                          changed=True)) from None
        paths = [os.path.join(out_dir, name) for name in (EMBEDDINGS_FILE, IDS_FILE, SOURCE_FILE)]
        written += [path for path in paths if os.path.isfile(path)]   # embeddings.json only with a known model


# --- does the spread mean anything? ------------------------------------------------------------------

def galaxy_spread(std):
    """Each galaxy's predicted spread: the RMS over its 37 outputs of their standard deviation."""
    return np.sqrt(np.mean(np.asarray(std, np.float64) ** 2, axis=1))


def galaxy_error(predictions, targets):
    """Each galaxy's actual error: the RMSE over its 37 outputs."""
    return np.sqrt(np.mean((np.asarray(predictions, np.float64) - np.asarray(targets, np.float64)) ** 2, axis=1))


def spread_calibration(spread, error, bins=8):
    """(Pearson correlation of spread and error, [(galaxies, RMS spread, RMSE)] per quantile bin of spread).

    Both bin columns are root mean squares, so a spread that predicts the error puts the bins on y = x.
    """
    spread, error = np.asarray(spread, np.float64), np.asarray(error, np.float64)
    correlation = float(np.corrcoef(spread, error)[0, 1]) if len(spread) > 1 and spread.std() > 0 else float("nan")
    rows = [(len(part), float(np.sqrt(np.mean(spread[part] ** 2))), float(np.sqrt(np.mean(error[part] ** 2))))
            for part in np.array_split(np.argsort(spread, kind="stable"), min(bins, len(spread))) if len(part)]
    return correlation, rows


def plot_spread(rows, correlation, path, title):
    """Binned predicted spread against the observed RMSE of each bin, with the y = x line, as the PNG path
    (written as it is: a temporary name of write_file_set's)."""
    spread, observed = [row[1] for row in rows], [row[2] for row in rows]
    fig = Figure(figsize=(6, 5.5), layout="constrained")
    ax = fig.subplots()
    top = 1.1 * max(spread + observed + [1e-6])
    ax.plot([0, top], [0, top], color="gray", ls="--", label="y = x (spread predicts the error)")
    ax.plot(spread, observed, "o-", color="tab:blue", label=f"quantile bins of {rows[0][0]}+ galaxies")
    ax.set_xlim(0, top)
    ax.set_ylim(0, top)
    ax.set_xlabel("predicted spread (RMS over 37 outputs of the std over members x views)")
    ax.set_ylabel("observed RMSE in the bin")
    ax.set_title(f"{title}\nPearson r(spread, error) per galaxy = {correlation:.3f}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    fig.savefig(path, dpi=110, format="png")
