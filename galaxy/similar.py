"""Galaxies like this one: each galaxy's penultimate-layer features (written by predict.py --embed)
and the nearest ones by cosine similarity, one matrix product over all of them (no index library).

    out_dir/embeddings.npy       float16 (N, 2048), one row per galaxy or file
    out_dir/embeddings_ids.csv   id (GalaxyID or file name), source (train | val | test | labelled |
                                 kaggle_test | file), labelled (true for galaxies with published votes),
                                 norm (the row's L2 norm, so a search never normalises the whole set)
"""
import os

import numpy as np
import pandas as pd
import torch

from dataset import DataError
from galaxy.files import atomic_write

EMBEDDINGS_FILE, IDS_FILE = "embeddings.npy", "embeddings_ids.csv"
LABELLED_SOURCES = ("train", "val", "test", "labelled")
CHUNK_ROWS = 16384   # rows normalised at a time in float32: 128 MiB, whatever the number of galaxies


def row_norms(embeddings):
    """The L2 norm of each row, computed in float32 chunks of CHUNK_ROWS rows (float16 squares overflow)."""
    norms = np.empty(len(embeddings), np.float32)
    for start in range(0, len(embeddings), CHUNK_ROWS):
        chunk = torch.from_numpy(np.array(embeddings[start:start + CHUNK_ROWS], np.float32))
        norms[start:start + len(chunk)] = torch.linalg.vector_norm(chunk, dim=1).numpy()
    return norms


def write_embeddings(out_dir, ids, sources, features):
    """embeddings.npy (float16) and embeddings_ids.csv (id, source, labelled, norm), one row per id.

    Each row's norm is stored beside its id, so that a search need not convert the whole set to
    float32 to normalise it.
    """
    os.makedirs(out_dir, exist_ok=True)
    features = np.asarray(features, np.float16)
    table = pd.DataFrame({"id": [str(i) for i in ids], "source": sources})
    table["labelled"] = table["source"].isin(LABELLED_SOURCES)
    table["norm"] = row_norms(features)
    path = os.path.join(out_dir, EMBEDDINGS_FILE)

    def save(tmp):
        with open(tmp, "wb") as f:   # a file object, so np.save does not append .npy to the temporary name
            np.save(f, features)
    atomic_write(path, save)
    atomic_write(os.path.join(out_dir, IDS_FILE), lambda tmp: table.to_csv(tmp, index=False))
    print(f"wrote {path}: {features.shape[0]} x {features.shape[1]} float16 features, ids in {IDS_FILE}")


def read_embeddings(folder):
    """(float16 embeddings (N, F), memory-mapped; ids table with each row's norm) from a folder
    written by write_embeddings."""
    path, ids_path = os.path.join(folder, EMBEDDINGS_FILE), os.path.join(folder, IDS_FILE)
    if not (os.path.isfile(path) and os.path.isfile(ids_path)):
        raise DataError(f"no {EMBEDDINGS_FILE} and {IDS_FILE} in {folder}; write them with "
                        f"`python predict.py --checkpoint=... --split=all --embed --out_dir={folder}`")
    embeddings = np.load(path, mmap_mode="c")   # copy-on-write: torch wants a writable array, nothing is written
    ids = pd.read_csv(ids_path, dtype={"id": str})
    if len(ids) != len(embeddings):
        raise DataError(f"{ids_path} has {len(ids)} rows for {len(embeddings)} embeddings; write both again")
    if "norm" not in ids:
        ids["norm"] = row_norms(embeddings)
    return embeddings, ids


def nearest(embeddings, query, count, exclude=(), norms=None):
    """(row indices, cosine similarities) of the count rows most similar to query, best first.

    One float16 matrix-vector product over all rows (against the unit query, so that it cannot
    overflow) ranks them; the best few hundred are then scored again exactly in float32, so
    float16's three digits never change which rows are returned. norms (row_norms) are computed
    when not given. Rows in exclude (e.g. the query itself) are left out.
    """
    rows = torch.from_numpy(np.asarray(embeddings))
    norms = torch.from_numpy(np.asarray(row_norms(embeddings) if norms is None else norms, np.float32))
    query = torch.as_tensor(np.asarray(query, np.float32)).flatten()
    query = query / torch.linalg.vector_norm(query).clamp_min(1e-12)
    similarities = torch.mv(rows, query.to(rows.dtype)).float() / norms.clamp_min(1e-12)
    similarities[list(exclude)] = -torch.inf
    candidates = torch.topk(similarities, min(len(rows), max(256, 8 * count))).indices
    exact = (rows[candidates].float() @ query) / norms[candidates].clamp_min(1e-12)
    exact[torch.isin(candidates, torch.as_tensor(list(exclude), dtype=torch.long))] = -torch.inf
    best = torch.topk(exact, min(count, len(rows) - len(set(exclude))))
    return candidates[best.indices].numpy(), best.values.numpy()
