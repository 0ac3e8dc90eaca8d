"""Galaxies like this one: each galaxy's penultimate-layer features (written by predict.py --embed)
and the nearest ones by cosine similarity, one matrix product over all of them (no index library).

    out_dir/embeddings.npy       float16 (N, 2048), one row per galaxy or file
    out_dir/embeddings_ids.csv   id (GalaxyID or file name), source (train | val | test | labelled |
                                 kaggle_test | file), labelled (true for galaxies with published votes)
"""
import os

import numpy as np
import pandas as pd
import torch

from dataset import DataError, atomic_write

EMBEDDINGS_FILE, IDS_FILE = "embeddings.npy", "embeddings_ids.csv"
LABELLED_SOURCES = ("train", "val", "test", "labelled")
CHUNK_ROWS = 16384   # rows normalised at a time in float32: 128 MiB, whatever the number of galaxies


def write_embeddings(out_dir, ids, sources, features):
    """embeddings.npy (float16) and embeddings_ids.csv, one row per id."""
    os.makedirs(out_dir, exist_ok=True)
    table = pd.DataFrame({"id": [str(i) for i in ids], "source": sources})
    table["labelled"] = table["source"].isin(LABELLED_SOURCES)
    path = os.path.join(out_dir, EMBEDDINGS_FILE)
    features = np.asarray(features, np.float16)

    def save(tmp):
        with open(tmp, "wb") as f:   # a file object, so np.save does not append .npy to the temporary name
            np.save(f, features)
    atomic_write(path, save)
    atomic_write(os.path.join(out_dir, IDS_FILE), lambda tmp: table.to_csv(tmp, index=False))
    print(f"wrote {path}: {features.shape[0]} x {features.shape[1]} float16 features, ids in {IDS_FILE}")


def read_embeddings(folder):
    """(float16 embeddings (N, F), memory-mapped; ids table) from a folder written by write_embeddings."""
    path, ids_path = os.path.join(folder, EMBEDDINGS_FILE), os.path.join(folder, IDS_FILE)
    if not (os.path.isfile(path) and os.path.isfile(ids_path)):
        raise DataError(f"no {EMBEDDINGS_FILE} and {IDS_FILE} in {folder}; write them with "
                        f"`python predict.py --checkpoint=... --split=all --embed --out_dir={folder}`")
    embeddings = np.load(path, mmap_mode="r")
    ids = pd.read_csv(ids_path, dtype={"id": str})
    if len(ids) != len(embeddings):
        raise DataError(f"{ids_path} has {len(ids)} rows for {len(embeddings)} embeddings; write both again")
    return embeddings, ids


def nearest(embeddings, query, count, exclude=()):
    """(row indices, cosine similarities) of the count rows most similar to query, best first.

    One matrix product, done in float32 chunks of CHUNK_ROWS rows so that a float16 set of any
    size is never converted whole; rows in exclude (e.g. the query itself) are left out.
    """
    query = torch.as_tensor(np.asarray(query, np.float32)).flatten()
    query = query / query.norm().clamp_min(1e-12)
    similarities = torch.empty(len(embeddings))
    for start in range(0, len(embeddings), CHUNK_ROWS):
        chunk = torch.from_numpy(np.ascontiguousarray(embeddings[start:start + CHUNK_ROWS])).float()
        similarities[start:start + len(chunk)] = (chunk @ query) / chunk.norm(dim=1).clamp_min(1e-12)
    similarities[list(exclude)] = -np.inf
    count = min(count, len(embeddings) - len(set(exclude)))
    best = torch.topk(similarities, count)
    return best.indices.numpy(), best.values.numpy()
