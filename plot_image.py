"""Plot one galaxy: the raw image with its crop box, the crop the network sees, and the
vote fractions of the 11 decision-tree questions (true, predicted, or both side by side).

    python plot_image.py 100008                              # -> runs/galaxy_100008.png
    python plot_image.py 100008 --checkpoint=runs/best.pt    # true vs predicted, RMSE in the title
    python plot_image.py 100018 --checkpoint=runs/best.pt --show   # a test galaxy, in a window too
    python plot_image.py 100008 --checkpoint=runs/ens --tta  # an ensemble: its sigma as error bars
    python plot_image.py my/galaxy.jpg --checkpoint=runs/best.pt   # any image file -> runs/galaxy_galaxy.png
    python plot_image.py 100008 --similar=8 --embeddings=runs      # plus the 8 most similar galaxies
    python plot_image.py my/galaxy.jpg --checkpoint=runs/mine/best.pt   # trained on your labels: its classes

An ID (all digits) is looked up in raw_dir (Kaggle's zips or folders) and processed_dir, train or
test; an existing file, or a name with an image extension, is plotted as it is (it has no true votes).
--checkpoint takes what predict.py takes: a file, a run folder, a glob or a comma list. The error
bars are the calibrated sigma when predict.py has fitted a calibration for these checkpoints and
--tta (or --calibration=PATH names one), else the raw spread over members x views.
"""
import os
from pathlib import Path
import re
import sys
import zipfile

from matplotlib.patches import Rectangle
import matplotlib.pyplot as plt
import numpy as np
import torch

from config import get_config, script_keys
from dataset import LABEL_COLUMNS, QUESTIONS, DataError, png_ids, read_labels, read_png
from galaxy import kaggle_raw, labels
from galaxy.checkpoints import CheckpointError
from galaxy.crop import BadImage, crop_galaxy, crop_settings_mismatch, read_image
from galaxy.ensemble import inference_numerics, load_members, predict_batch, resolve_checkpoints
from galaxy.files import atomic_write, file_text, writable_folder
from galaxy.inference import rmse
from galaxy.numerics import resolve_device
from galaxy.similar import check_source, embedding_source, nearest, read_embeddings
from galaxy.task_eval import ensemble_task, plot_task, true_label
from galaxy.uncertainty import error_bars

SPLIT_NAMES = {"train": "Kaggle training set", "test": "Kaggle test set", "file": "image file"}
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".gif", ".webp")
TRUE_COLOR, PREDICTED_COLOR = "tab:blue", "tab:orange"

# --- finding the galaxy ------------------------------------------------------------------------

def closest_ids(galaxy_id, known_ids, count=3):
    known_ids = np.asarray(sorted(known_ids), np.int64)
    nearest = known_ids[np.argsort(np.abs(known_ids - galaxy_id), kind="stable")[:count]]
    return sorted(nearest.tolist())


def find_galaxy(cfg, galaxy_id):
    """{"split", "raw_reference", "png_path"} for the galaxy; DataError naming the closest IDs if unknown."""
    known_ids = set()
    for split in ("train", "test"):
        raw = kaggle_raw.raw_images(cfg.raw_dir, split)
        png_dir = os.path.join(cfg.processed_dir, split)
        png_path = os.path.join(png_dir, f"{galaxy_id}.png")
        if galaxy_id in raw or os.path.isfile(png_path):
            return {"split": split, "raw_reference": raw.get(galaxy_id),
                    "png_path": png_path if os.path.isfile(png_path) else None}
        known_ids.update(raw)
        known_ids.update(png_ids(png_dir).tolist())
    if not known_ids:
        raise DataError(f"galaxy {galaxy_id} not found: no images in {cfg.raw_dir}/ (Kaggle's images_*_rev1 "
                        f"zips or folders) nor in {cfg.processed_dir}/train|test/; pass --raw_dir=... or --demo")
    nearest = ", ".join(str(gid) for gid in closest_ids(galaxy_id, known_ids))
    raise DataError(f"galaxy {galaxy_id} not found in {cfg.raw_dir}/ or {cfg.processed_dir}/; "
                    f"closest known IDs: {nearest}")


def true_vote_fractions(cfg, galaxy_id):
    """The galaxy's 37 published vote fractions, or None (a test galaxy, or no labels file)."""
    if os.path.isfile(os.path.join(cfg.processed_dir, "labels.csv")):
        label_ids, vote_fractions = read_labels(cfg.processed_dir)
        if galaxy_id in label_ids:
            return vote_fractions[np.flatnonzero(label_ids == galaxy_id)[0]]
    solutions, _, _ = labels.read_labels(cfg.raw_dir)
    if solutions is not None and galaxy_id in solutions.index:
        return solutions.loc[galaxy_id, LABEL_COLUMNS].to_numpy(np.float32)
    return None


def galaxy_images(cfg, galaxy, model_cfg=None):
    """{"raw": RGB array or None, "roi_box": box or None, "crop": uint8 HWC, "crop_note": its source}.

    The crop is made from the raw image (a Kaggle JPEG, or the file given) as preprocess.py makes
    the training PNGs, with the checkpoint's settings when there is one (model_cfg); without a raw
    image it is the PNG.
    """
    crop_cfg = model_cfg or cfg
    if galaxy["raw_reference"] or galaxy.get("file"):
        source = galaxy.get("file") or galaxy["raw_reference"]
        try:
            data = kaggle_raw.read_raw(cfg.raw_dir, source) if galaxy["raw_reference"] else Path(source).read_bytes()
            crop, roi_box = crop_galaxy(data, crop_cfg)
            return {"raw": np.asarray(read_image(data)), "roi_box": roi_box, "crop": np.asarray(crop),
                    "crop_note": f"crop={crop_cfg.crop} of the raw image"}
        except (BadImage, OSError, EOFError, zipfile.BadZipFile) as err:
            if not galaxy["png_path"]:
                raise DataError(f"the image {source} is unusable ({err})") from None
    # the model must see the crop it was trained on; a PNG made otherwise would mislead it
    mismatch = crop_settings_mismatch(cfg.processed_dir, model_cfg) if model_cfg else ""
    if mismatch:
        raise DataError(f"no raw image, and the PNGs in {cfg.processed_dir} were cropped differently "
                        f"({mismatch}); put the raw images in {cfg.raw_dir} or re-run preprocess.py")
    crop = read_png(galaxy["png_path"], model_cfg.image_size if model_cfg else None)   # any size for a plot alone
    return {"raw": None, "roi_box": None, "crop": crop, "crop_note": "processed PNG"}


def ensemble_prediction(cfg, galaxy, members, groups):
    """(mean, std, features) of the members' vote fractions, each member on its own crop; std is
    None when there is one member without TTA; the features (for --similar) are the first member's,
    as predict.py --embed writes them. The galaxy's shown images are the first member's."""
    group_images = []
    for group in groups:
        images = galaxy_images(cfg, galaxy, group)
        if not group_images:
            galaxy.update(images)
        group_images.append(torch.from_numpy(np.array(images["crop"])).permute(2, 0, 1).unsqueeze(0))
    numerics = inference_numerics(members, cfg.amp, cfg.channels_last, 1, log=lambda _: None)
    mean, std, _, features = predict_batch(members, group_images, numerics, cfg.tta, embed=True)
    spread = len(members) > 1 or cfg.tta
    return mean[0].numpy(), std[0].numpy() if spread else None, features[0].numpy()


# --- galaxies like this one ------------------------------------------------------------------

def thumbnail(cfg, name):
    """The crop of a galaxy (GalaxyID) or file by name, from its PNG or raw image; None if there is none."""
    try:
        if name.isdigit():
            galaxy = find_galaxy(cfg, int(name))
        elif os.path.isfile(name):
            galaxy = {"split": "file", "raw_reference": None, "png_path": None, "file": name}
        else:
            return None
        return galaxy_images(cfg, galaxy)["crop"]
    except DataError:
        return None


def similar_galaxies(cfg, name, features, source=None):
    """[(name, cosine similarity, thumbnail or None, true Q1 answer or "")] of the cfg.similar
    galaxies nearest to name in cfg.embeddings, the query itself and embeddings that are not finite
    left out. The query's embedding is the one stored there when there is one, else features
    (computed with --checkpoint). source (galaxy.similar.embedding_source of --checkpoint's first
    member) must be the model that made the embeddings: another model's features are another space."""
    embeddings, ids = read_embeddings(cfg.embeddings)
    names = [os.path.normpath(i) for i in ids["id"]]
    own_rows = [row for row, other in enumerate(names) if other == os.path.normpath(str(name))]
    if source is not None:
        check_source(cfg.embeddings, source, with_tta=not own_rows)   # tta matters only to a computed query
    if own_rows:
        features = np.asarray(embeddings[own_rows[0]], np.float32)
    elif features is None:
        raise DataError(f"{name} has no embedding in {cfg.embeddings}; pass --checkpoint=... to compute it "
                        f"(or write it with predict.py --embed)")
    remake = (f"write them again with `python predict.py --checkpoint=... --split=all --embed "
              f"--out_dir={cfg.embeddings}`")
    if np.shape(features)[-1] != embeddings.shape[1]:
        raise DataError(f"{name} has {np.shape(features)[-1]} features, the embeddings in {cfg.embeddings} "
                        f"{embeddings.shape[1]}: they come from another model; {remake}")
    if not np.isfinite(features).all():
        where = f"stored in {cfg.embeddings}" if own_rows else "computed with --checkpoint"
        raise DataError(f"the embedding of {name} {where} holds NaN or inf, so nothing is similar to it; {remake}")
    left_out = []
    rows, similarities = nearest(embeddings, features, cfg.similar, exclude=own_rows, norms=ids["norm"].to_numpy(),
                                 left_out=left_out)
    if left_out:
        print(f"left out {len(left_out)} of the {len(ids)} embeddings in {cfg.embeddings} that are not finite "
              f"(NaN or inf), e.g. {', '.join(ids['id'][row] for row in left_out[:5])}; {remake}")
    labels = {}
    if os.path.isfile(os.path.join(cfg.processed_dir, "labels.csv")):
        label_ids, vote_fractions = read_labels(cfg.processed_dir)
        labels = dict(zip(label_ids.tolist(), vote_fractions[:, :len(QUESTIONS[0].answers)]))
    found = []
    for row, similarity in zip(rows.tolist(), similarities.tolist()):
        other = ids["id"][row]
        q1 = labels.get(int(other)) if other.isdigit() else None
        found.append((other, similarity, thumbnail(cfg, other),
                      "" if q1 is None else QUESTIONS[0].answers[int(np.argmax(q1))]))
    return found


def plot_similar(subfigure, neighbours):
    """One row of thumbnails with each neighbour's name, similarity and true Q1 answer if known."""
    axes = np.atleast_1d(subfigure.subplots(1, max(1, len(neighbours))))
    for ax, (name, similarity, crop, q1) in zip(axes, neighbours):
        if crop is not None:
            ax.imshow(crop, interpolation="nearest")
        else:
            ax.text(0.5, 0.5, "no image", ha="center", va="center")
        label = os.path.basename(name)
        ax.set_title(f"{label[:18]}\ncos {similarity:.3f}" + (f"\ntrue Q1: {q1}" if q1 else ""), fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    subfigure.suptitle(f"the {len(neighbours)} most similar galaxies (cosine similarity of the penultimate features)",
                       fontsize=11)


# --- the figure --------------------------------------------------------------------------------

def plot_question(ax, question, true_values, predicted_values, predicted_std=None):
    """Horizontal bars, one per answer; paired true/predicted bars when both are known; the
    calibrated sigma, or the ensemble's spread, as error bars on the predicted ones."""
    series = [(name, values, color, errors) for name, values, color, errors in
              (("true", true_values, TRUE_COLOR, None), ("predicted", predicted_values, PREDICTED_COLOR, predicted_std))
              if values is not None]
    positions = np.arange(len(question.answers))[::-1]  # the first answer on top
    height = 0.8 / len(series)
    for i, (name, values, color, errors) in enumerate(series):
        offset = (len(series) - 1) / 2 * height - i * height  # true above predicted
        ax.barh(positions + offset, values, height=height, color=color, label=name,
                xerr=errors, error_kw={"elinewidth": 1, "capsize": 2, "ecolor": "black"})
        for y, value in zip(positions + offset, values):
            ax.text(value + 0.01, y, f"{value:.2f}", va="center", fontsize=7)
    ax.set_yticks(positions, question.answers, fontsize=8)
    ax.set_xlim(0, 1.15)  # vote fractions, with room for the value labels
    ax.tick_params(axis="x", labelsize=7)
    ax.grid(axis="x", alpha=0.3)
    ax.set_title(f"Q{question.number}  {question.text}", fontsize=9, loc="left")


def plot_galaxy(galaxy_id, galaxy, true_values, predicted_values, cfg, predicted_std=None, neighbours=None,
                error_label="spread over members x views", task=None):
    """The figure; galaxy holds where it was found (find_galaxy) and its images (galaxy_images);
    neighbours (similar_galaxies) add a row of the most similar galaxies. With task (a network of a
    user's labels) the values are its classes' probabilities (or its numbers), one bar chart."""
    raw, crop = galaxy["raw"], galaxy["crop"]
    has_values = true_values is not None or predicted_values is not None
    width, height = (20, 10) if has_values else (12, 10)
    fig = plt.figure(figsize=(width, height + (3.5 if neighbours else 0)), layout="constrained")
    top = fig
    if neighbours:
        top, bottom = fig.subfigures(2, 1, height_ratios=[height, 3.5])
        plot_similar(bottom, neighbours)
    left, right = top.subfigures(1, 2, width_ratios=[1, 2.4] if has_values else [1, 1.2])

    raw_ax, crop_ax = left.subplots(2, 1, height_ratios=[3, 2])
    if raw is not None:
        raw_ax.imshow(raw)
        x0, y0, x1, y1 = galaxy["roi_box"]  # raw-pixel edges; imshow puts pixel centres on integers
        raw_ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, edgecolor="lime", lw=2))
        raw_ax.set_title(f"raw {raw.shape[1]}x{raw.shape[0]}, crop box {x1 - x0}x{y1 - y0} px", fontsize=10)
    else:
        raw_ax.text(0.5, 0.5, f"no usable raw image in {cfg.raw_dir}/\nshowing the processed PNG only:\n"
                              f"{galaxy['png_path']}", ha="center", va="center", fontsize=10, wrap=True)
    crop_ax.imshow(crop, interpolation="nearest")
    crop_ax.set_title(f"{crop.shape[1]}x{crop.shape[0]} network input ({galaxy['crop_note']})", fontsize=10)
    for ax in (raw_ax, crop_ax):
        ax.set_xticks([])
        ax.set_yticks([])

    if not has_values:
        ax = right.subplots()
        ax.axis("off")
        why = ("Kaggle never released the vote fractions\nof its test galaxies." if galaxy["split"] == "test"
               else "An image file has no published vote fractions." if galaxy["split"] == "file"
               else f"No vote fractions for this galaxy in\n{cfg.processed_dir}/labels.csv or {cfg.raw_dir}/.")
        ax.text(0.5, 0.5, f"{why}\n\nPass --checkpoint=runs/best.pt\nto see the model's prediction.",
                ha="center", va="center", fontsize=14)
    elif task:
        task_words = plot_task(right.subplots(), task, predicted_values, predicted_std, true_values)
    else:
        axes = right.subplots(3, 4).ravel()
        for ax, question in zip(axes, QUESTIONS):
            columns = [LABEL_COLUMNS.index(column) for column in question.columns]
            plot_question(ax, question,
                          None if true_values is None else true_values[columns],
                          None if predicted_values is None else predicted_values[columns],
                          None if predicted_std is None else predicted_std[columns])
        legend_ax = axes[-1]  # 11 questions leave the 12th panel for the key
        legend_ax.axis("off")
        legend_ax.legend(*axes[0].get_legend_handles_labels(), loc="center", fontsize=11,
                         title="vote fraction")

    name = file_text(galaxy_id).replace("$", r"\$")   # any file name: bytes that are not UTF-8, mathtext's $
    title = f"Galaxy {name} ({SPLIT_NAMES[galaxy['split']]})"
    if predicted_std is not None:
        title += f" [error bars: {error_label}]"
    if task and predicted_values is not None:
        title += f": {task_words}"
    elif true_values is not None and predicted_values is not None:
        error = rmse(torch.from_numpy(predicted_values), torch.from_numpy(true_values))
        title += f": RMSE {error:.4f} over the 37 vote fractions"
    elif true_values is None and predicted_values is not None:
        title += ": prediction only (no labels)"
    fig.suptitle(title, fontsize=15)
    return fig


def parse_galaxy(text):
    """("file", path) or ("id", GalaxyID) for the positional argument; DataError if it is neither.

    An existing file, or a name with an image extension, is a file; all digits is an ID.
    """
    if os.path.isfile(text) or text.lower().endswith(IMAGE_EXTENSIONS):
        if not os.path.isfile(text):
            raise DataError(f"image file {text} not found")
        return "file", text
    if re.fullmatch(r"[0-9]{1,18}", text):   # 18 digits always fit int64, as GalaxyIDs must
        return "id", int(text)
    raise DataError(f"{text!r} is neither a galaxy ID (a number like 100008, at most 18 digits) nor an image file")


def main():
    cfg, args = get_config(positional=("galaxy",), doc=__doc__, keys=script_keys("plot_image"))
    if not cfg.show:
        plt.switch_backend("Agg")  # files only, no display needed
    try:
        writable_folder(cfg.out_dir, "out_dir")   # before the work, not after it
        kind, galaxy_id = parse_galaxy(args["galaxy"])
        if kind == "file":
            galaxy = {"split": "file", "raw_reference": None, "png_path": None, "file": galaxy_id}
            galaxy_id = os.path.basename(galaxy_id)
        else:
            galaxy = find_galaxy(cfg, galaxy_id)
        members, groups = [], []
        if cfg.checkpoint:
            members, groups = load_members(resolve_checkpoints(cfg.checkpoint, cfg.out_dir),
                                           resolve_device(cfg.device))
        task = ensemble_task(members) if members else None   # trained on a user's labels: its classes
        if task:   # the label its set gives the file, if it is one of them
            true_values = true_label(cfg, members[0], task, galaxy["file"]) if galaxy.get("file") else None
        else:
            true_values = true_vote_fractions(cfg, galaxy_id) if galaxy["split"] == "train" else None
        predicted_values, predicted_std, features, neighbours = None, None, None, None
        error_label = ""
        if members:
            predicted_values, predicted_std, features = ensemble_prediction(cfg, galaxy, members, groups)
            if not task:
                predicted_std, error_label = error_bars(cfg, members, predicted_values, predicted_std)
        else:
            galaxy.update(galaxy_images(cfg, galaxy))
        if cfg.similar:
            if not cfg.embeddings:
                raise DataError("--similar needs --embeddings=<folder with embeddings.npy>, written by "
                                "`python predict.py --split=all --embed`")
            source = embedding_source(members[0], cfg.tta) if members else None
            neighbours = similar_galaxies(cfg, galaxy.get("file") or galaxy_id, features, source)
        fig = plot_galaxy(galaxy_id, galaxy, true_values, predicted_values, cfg, predicted_std, neighbours,
                          error_label or "spread over members x views", task)
        os.makedirs(cfg.out_dir, exist_ok=True)
        stem = os.path.splitext(galaxy_id)[0] if kind == "file" else galaxy_id
        path = os.path.join(cfg.out_dir, f"galaxy_{stem}.png")
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))   # a full disk: DataError
    except (DataError, CheckpointError) as err:
        sys.exit(f"error: {err}")
    print(f"wrote {file_text(path)}")
    if cfg.show:
        plt.show()


if __name__ == "__main__":
    main()
