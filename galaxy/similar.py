"""Galaxies like this one: each galaxy's penultimate-layer features (written by predict.py --embed)
and the nearest ones by cosine similarity, one matrix product over all of them (no index library).

    out_dir/embeddings.npy       float16 (N, 2048), one row per galaxy or file
    out_dir/embeddings_ids.csv   id (GalaxyID or file name), source (train | val | test | labelled |
                                 kaggle_test | file), labelled (true for galaxies with published votes),
                                 norm (the row's L2 norm, so a search never normalises the whole set)
    out_dir/embeddings.json      which model made them: the checkpoint, a digest of its weights, its crop
                                 settings and tta (features of another model live in another space)
"""
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from dataset import DataError
from galaxy.crop import CROP_KEYS
from galaxy.files import atomic_write

EMBEDDINGS_FILE, IDS_FILE, SOURCE_FILE = "embeddings.npy", "embeddings_ids.csv", "embeddings.json"
LABELLED_SOURCES = ("train", "val", "test", "labelled")
CHUNK_ROWS = 16384   # rows normalised at a time in float32: 128 MiB, whatever the number of galaxies


def row_norms(embeddings):
    """The L2 norm of each row, computed in float32 chunks of CHUNK_ROWS rows (float16 squares overflow)."""
    norms = np.empty(len(embeddings), np.float32)
    for start in range(0, len(embeddings), CHUNK_ROWS):
        chunk = torch.from_numpy(np.array(embeddings[start:start + CHUNK_ROWS], np.float32))
        norms[start:start + len(chunk)] = torch.linalg.vector_norm(chunk, dim=1).numpy()
    return norms


# --- which model made them -------------------------------------------------------------------------

def weights_digest(model):
    """A short digest of the model's weights: the same for any copy of one checkpoint, whatever its path."""
    digest = hashlib.blake2b(digest_size=12)
    for name, tensor in model.state_dict().items():
        flat = tensor.detach().cpu().contiguous().reshape(-1)   # channels_last or not: the same bytes
        digest.update(f"{name} {flat.dtype} {tuple(tensor.shape)};".encode())
        digest.update(flat.view(torch.uint8).numpy())
    return digest.hexdigest()


def embedding_source(member, tta):
    """What embeddings.json records of the model whose features they are: member (path, model, cfg)
    is the first checkpoint of an ensemble, the one whose features predict.py and plot_image.py use."""
    return {"checkpoint": str(member.path), "weights": weights_digest(member.model),
            "crop": {key: getattr(member.cfg, key) for key in CROP_KEYS}, "tta": bool(tta)}


def read_source(folder):
    """embeddings.json of folder as a dict, or None when it is missing or unreadable."""
    try:
        source = json.loads(Path(folder, SOURCE_FILE).read_text())
    except (OSError, ValueError):
        return None
    return source if isinstance(source, dict) and source.get("weights") else None


def source_mismatch(recorded, current, with_tta=True):
    """'' when current (embedding_source) made the features recorded describes, else what differs."""
    differences = []
    if recorded.get("weights") != current["weights"]:
        differences.append("other weights")
    crop = recorded.get("crop") or {}
    differences += [f"{key} {crop.get(key)} there, {value} here" for key, value in current["crop"].items()
                    if crop.get(key) != value]
    if with_tta and bool(recorded.get("tta")) != current["tta"]:
        differences.append(f"tta {str(bool(recorded.get('tta'))).lower()} there, {str(current['tta']).lower()} here")
    return ", ".join(differences)


def check_source(folder, current, with_tta=True):
    """DataError unless the embeddings in folder were made by the model current describes
    (embedding_source); with_tta: with the same tta too (when a query's features are computed)."""
    remake = (f"`python predict.py --checkpoint={current['checkpoint']} --split=all --embed "
              f"{'--tta ' if current['tta'] else ''}--out_dir={folder}`")
    recorded = read_source(folder)
    if recorded is None:
        raise DataError(f"{folder} has no readable {SOURCE_FILE}, so which checkpoint made its embeddings is "
                        f"unknown; write them again with {remake}")
    differences = source_mismatch(recorded, current, with_tta)
    if differences:
        raise DataError(f"the embeddings in {folder} were made by {recorded.get('checkpoint')}, not by "
                        f"--checkpoint={current['checkpoint']} ({differences}): its neighbours would be another "
                        f"model's; pass that checkpoint (and its --tta), or write them with this one: {remake}")


# --- writing and reading -----------------------------------------------------------------------------

def write_embeddings(out_dir, ids, sources, features, source=None):
    """embeddings.npy (float16), embeddings_ids.csv (id, source, labelled, norm), one row per id,
    and embeddings.json (source: the model that made them, see embedding_source; none if unknown).

    Each row's norm is stored beside its id, so that a search need not convert the whole set to
    float32 to normalise it. The old embeddings.json goes first and the new one comes last, so a
    write that stops half-way never leaves a record that vouches for other features.
    """
    os.makedirs(out_dir, exist_ok=True)
    features = np.asarray(features, np.float16)
    table = pd.DataFrame({"id": [str(i) for i in ids], "source": sources})
    table["labelled"] = table["source"].isin(LABELLED_SOURCES)
    table["norm"] = row_norms(features)
    path, source_path = os.path.join(out_dir, EMBEDDINGS_FILE), os.path.join(out_dir, SOURCE_FILE)
    if os.path.exists(source_path):
        os.remove(source_path)

    def save(tmp):
        with open(tmp, "wb") as f:   # a file object, so np.save does not append .npy to the temporary name
            np.save(f, features)
    atomic_write(path, save)
    atomic_write(os.path.join(out_dir, IDS_FILE), lambda tmp: table.to_csv(tmp, index=False))
    if source:
        record = {**source, "rows": int(features.shape[0]), "width": int(features.shape[1])}
        atomic_write(source_path, lambda tmp: Path(tmp).write_text(json.dumps(record, indent=1)))
    print(f"wrote {path}: {features.shape[0]} x {features.shape[1]} float16 features, ids in {IDS_FILE}")


def read_embeddings(folder):
    """(float16 embeddings (N, F), memory-mapped; ids table with each row's norm) from a folder
    written by write_embeddings; DataError naming the file and the fix if either is unusable."""
    path, ids_path = os.path.join(folder, EMBEDDINGS_FILE), os.path.join(folder, IDS_FILE)
    remake = f"write them again with `python predict.py --checkpoint=... --split=all --embed --out_dir={folder}`"
    if not (os.path.isfile(path) and os.path.isfile(ids_path)):
        raise DataError(f"no {EMBEDDINGS_FILE} and {IDS_FILE} in {folder}; write them with "
                        f"`python predict.py --checkpoint=... --split=all --embed --out_dir={folder}`")
    try:
        embeddings = np.load(path, mmap_mode="c")   # copy-on-write: torch wants a writable array, nothing is written
    except (ValueError, OSError, EOFError) as err:   # truncated ("mmap length is greater than file size"), not .npy
        raise DataError(f"{path} is damaged or incomplete ({err}); {remake}") from None
    if embeddings.ndim != 2 or embeddings.dtype.kind != "f":
        raise DataError(f"{path} holds a {embeddings.dtype} array of shape {embeddings.shape}, not one row of "
                        f"features per galaxy; {remake}")
    try:
        ids = pd.read_csv(ids_path, dtype={"id": str})
    except (ValueError, OSError, pd.errors.ParserError) as err:   # EmptyDataError is a ValueError
        raise DataError(f"{ids_path} cannot be read ({type(err).__name__}: {err}); {remake}") from None
    if "id" not in ids:
        raise DataError(f"{ids_path} has no id column; {remake}")
    if len(ids) != len(embeddings):
        raise DataError(f"{ids_path} has {len(ids)} rows for {len(embeddings)} embeddings; write both again")
    if "norm" not in ids or ids["norm"].dtype.kind != "f":
        ids["norm"] = row_norms(embeddings)
    return embeddings, ids


# --- the search --------------------------------------------------------------------------------------

def nearest(embeddings, query, count, exclude=(), norms=None, left_out=None):
    """(row indices, cosine similarities) of the count rows most similar to query, best first.

    One float16 matrix-vector product over all rows (against the unit query, so that it cannot
    overflow) ranks them; the best few hundred are then scored again exactly in float32, so
    float16's three digits never change which rows are returned. norms (row_norms) are computed
    when not given. Rows in exclude (e.g. the query itself) are left out, and so are rows that are
    not finite (NaN or inf: their similarity is no number); left_out (a list) gets those rows'
    indices. Fewer than count rows come back when fewer are left; none for a query that is not finite.
    """
    rows = torch.from_numpy(np.asarray(embeddings))
    norms = torch.from_numpy(np.asarray(row_norms(embeddings) if norms is None else norms, np.float32))
    query = torch.as_tensor(np.asarray(query, np.float32)).flatten()
    if not bool(torch.isfinite(query).all()):
        return np.zeros(0, np.int64), np.zeros(0, np.float32)
    query = query / torch.linalg.vector_norm(query).clamp_min(1e-12)
    similarities = torch.mv(rows, query.to(rows.dtype)).float() / norms.clamp_min(1e-12)
    unusable = ~(torch.isfinite(similarities) & torch.isfinite(norms))
    if left_out is not None:
        left_out.extend(torch.nonzero(unusable).flatten().tolist())
    similarities[unusable] = -torch.inf
    similarities[list(exclude)] = -torch.inf
    usable = int(torch.isfinite(similarities).sum())
    candidates = torch.topk(similarities, min(usable, max(256, 8 * count))).indices   # usable rows only
    exact = (rows[candidates].float() @ query) / norms[candidates].clamp_min(1e-12)
    best = torch.topk(exact, min(count, len(candidates)))
    return candidates[best.indices].numpy(), best.values.numpy()
