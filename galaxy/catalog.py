"""Survey catalogs: reading a CSV or parquet table of galaxies in chunks (flat memory at millions of
rows), the shard K/N of it one job takes, and the compact set of ids that finds duplicates.

A catalog has an id column and either a file column (an image: JPEG, PNG or FITS) or three band
columns (one FITS file per band). Relative paths are taken from the catalog's folder. The shard of
a row depends on its id alone (a stable hash), so N jobs given the same catalog take disjoint parts
that together cover it, whatever the order of its rows. The outputs are written by galaxy/parts.py.
"""
import hashlib
import os
from typing import NamedTuple

import numpy as np
import pandas as pd

from galaxy.files import DataError

CHUNK_ROWS = 10_000   # rows read (and, in galaxy/parts.py, written) at a time


class Shard(NamedTuple):
    index: int   # K, counted from 0 as SLURM_ARRAY_TASK_ID (--array=0-7) and torchrun's RANK are
    count: int   # N, the number of jobs

    def __str__(self):
        return f"{self.index}/{self.count}"


def shard_from_env(environ=os.environ):
    """"K/N" from torchrun's RANK and WORLD_SIZE, else from a Slurm job array (task ID - MIN of COUNT)."""
    if "RANK" in environ and "WORLD_SIZE" in environ:
        return f"{environ['RANK']}/{environ['WORLD_SIZE']}"
    if "SLURM_ARRAY_TASK_ID" in environ and "SLURM_ARRAY_TASK_COUNT" in environ:
        index = int(environ["SLURM_ARRAY_TASK_ID"]) - int(environ.get("SLURM_ARRAY_TASK_MIN", 0))
        return f"{index}/{environ['SLURM_ARRAY_TASK_COUNT']}"
    raise ValueError("--shard=env: neither RANK and WORLD_SIZE (torchrun) nor SLURM_ARRAY_TASK_ID and "
                     "SLURM_ARRAY_TASK_COUNT (sbatch --array) are set; pass --shard=K/N")


def parse_shard(text, environ=os.environ):
    """Shard(K, N) of "K/N" (0 <= K < N), or of "env" (shard_from_env); ValueError with a one-line fix otherwise."""
    if str(text).strip() == "env":
        text = shard_from_env(environ)
    parts = str(text).strip().split("/")
    try:
        index, count = (int(part) for part in parts)
    except ValueError:
        raise ValueError(f"--shard={text}: expected K/N with whole numbers, e.g. --shard=2/8 "
                         f"(the third of 8 jobs; K counts from 0)") from None
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"--shard={text}: K must be 0..N-1 and N at least 1, e.g. --shard=0/{max(count, 1)} "
                         f"(K counts from 0, as SLURM_ARRAY_TASK_ID with --array=0-{max(count, 1) - 1} does)")
    return Shard(index, count)


def id_digests(ids):
    """16-byte BLAKE2b digests (numpy S16) of the ids' text: the same on every machine and Python run
    (Python's hash() of a str is salted per process, so N jobs would disagree on the shards)."""
    blobs = [hashlib.blake2b(str(i).encode("utf-8", "surrogateescape"), digest_size=16).digest() for i in ids]
    return np.frombuffer(b"".join(blobs), "S16") if blobs else np.empty(0, "S16")


def shard_of(digests, count):
    """The shard (0..count-1) of each id, from its digest's first 8 bytes."""
    return (np.frombuffer(np.ascontiguousarray(digests).tobytes(), "<u8")[::2] % np.uint64(count)).astype(np.int64)


class IdSet:
    """A set of ids kept as their sorted 16-byte digests: 16 B an id (160 MB at 10 M ids) where a
    Python set of str takes about 100 B. Two different ids share a digest with probability about
    n^2 / 2^129 (1e-25 at 10 M ids), so membership is exact in practice."""

    def __init__(self):
        self._digests = np.empty(0, "S16")

    def __len__(self):
        return len(self._digests)

    def contains(self, ids=None, digests=None):
        """A bool array: which ids (or their digests) are in the set."""
        digests = id_digests(ids) if digests is None else digests
        if not len(self._digests) or not len(digests):
            return np.zeros(len(digests), bool)
        where = np.minimum(np.searchsorted(self._digests, digests), len(self._digests) - 1)
        return self._digests[where] == digests

    def add(self, ids=None, digests=None):
        """Add ids (or their digests); returns a bool array marking those already there or repeated
        within ids (their second and later copies). The merge is linear: both runs are sorted."""
        digests = id_digests(ids) if digests is None else np.asarray(digests, "S16")
        repeated = self.contains(digests=digests)
        order = np.argsort(digests, kind="stable")
        ordered = digests[order]
        again = np.zeros(len(digests), bool)
        again[order[1:]] = ordered[1:] == ordered[:-1]
        merged = np.concatenate([self._digests, ordered[~again[order]]])
        merged.sort(kind="stable")   # timsort: two sorted runs merge in linear time
        self._digests = merged[np.concatenate([[True], merged[1:] != merged[:-1]])] if len(merged) else merged
        return repeated | again


# --- reading a catalog -------------------------------------------------------------------------------

def table_kind(path):
    """ "csv" or "parquet" from the file name; DataError for anything else."""
    name = os.fspath(path).lower()
    if name.endswith((".csv", ".csv.gz")):
        return "csv"
    if name.endswith((".parquet", ".pq")):
        return "parquet"
    raise DataError(f"{path}: a table must be .csv, .csv.gz or .parquet (named so)")


def _columns(path, kind):
    try:
        if kind == "parquet":
            import pyarrow.parquet as pq
            return list(pq.ParquetFile(path).schema_arrow.names)
        return list(pd.read_csv(path, nrows=0).columns)
    except FileNotFoundError:
        raise DataError(f"catalog {path} not found; pass the path of a .csv or .parquet table") from None
    except Exception as err:   # not a table, truncated, no header...
        raise DataError(f"catalog {path} cannot be read ({type(err).__name__}: {str(err)[:200]}); "
                        f"it must be a CSV with a header row or a parquet file") from None


def _raw_chunks(path, kind, columns, chunk_rows):
    """The columns of path in chunks of chunk_rows rows, every value as text ('' where missing)."""
    if kind == "parquet":
        import pyarrow.parquet as pq
        import pyarrow as pa
        for batch in pq.ParquetFile(path).iter_batches(batch_size=chunk_rows, columns=columns):
            # cast in arrow: an integer id with a gap in it must not become a float ("12.0") in pandas
            yield pd.DataFrame({c: batch.column(c).cast(pa.string()).fill_null("").to_numpy(zero_copy_only=False)
                                for c in columns})
    else:
        yield from pd.read_csv(path, usecols=columns, dtype=str, keep_default_na=False, chunksize=chunk_rows)


def _rebatch(frames, chunk_rows):
    """Frames (a shard's rows of each chunk read) joined and cut into chunks of chunk_rows rows."""
    held, size = [], 0
    for frame in frames:
        held.append(frame)
        size += len(frame)
        while size >= chunk_rows:
            table = pd.concat(held, ignore_index=True)
            yield table.iloc[:chunk_rows].reset_index(drop=True)
            held, size = [table.iloc[chunk_rows:]], size - chunk_rows
    if size:
        yield pd.concat(held, ignore_index=True)


def _where(kind, row):
    """Where a row is, as a user finds it: a CSV's line (its header is line 1), a parquet file's row."""
    return f"line {row + 1}" if kind == "csv" else f"row {row}"


def _first_row(path, kind, id_column, wanted):
    """The first row number (from 1) holding id wanted: read again only to name a duplicate."""
    start = 1
    for chunk in _raw_chunks(path, kind, [id_column], CHUNK_ROWS):
        hits = np.flatnonzero(chunk[id_column].to_numpy() == wanted)
        if len(hits):
            return start + int(hits[0])
        start += len(chunk)
    return None


def read_catalog(path, id_column="id", file_column="file", band_columns=None, shard=None, chunk_rows=CHUNK_ROWS):
    """The rows of a CSV or parquet catalog, chunk after chunk (DataFrames of at most chunk_rows rows).

    Each chunk has "row" (the row's number in the catalog, from 1), "id" (text), "file" (the image
    as the catalog names it; with band_columns the three names joined by ", "; '' if none) and
    "source" (what to read: the path, or with band_columns a tuple of three paths, relative ones
    taken from the catalog's folder). file_column=None reads the ids only. shard ("K/N" or a Shard)
    keeps the rows whose id falls in part K of N. DataError, one line naming the file and the column,
    for a missing column, an empty id, an id repeated anywhere in the shard, or no rows at all.
    """
    kind = table_kind(path)
    shard = parse_shard(shard) if isinstance(shard, str) else shard
    if isinstance(band_columns, str):   # as a command line gives it: "g_file,r_file,i_file"
        band_columns = [name.strip() for name in band_columns.split(",") if name.strip()]
    have = _columns(path, kind)
    files = list(band_columns) if band_columns else ([file_column] if file_column else [])
    for name, flag in [(id_column, "id_column")] + [(name, "file_column" if not band_columns else "band_columns")
                                                    for name in files]:
        if name not in have:
            raise DataError(f"catalog {path} has no column {name!r} (it has: {', '.join(map(str, have[:20]))}); "
                            f"name the column with --{flag}=...")
    if band_columns and len(files) != 3:
        raise DataError(f"--band_columns={','.join(files)}: give three columns, one FITS file per band")
    folder = os.path.dirname(os.path.abspath(path))
    seen, start, total = IdSet(), 1, 0

    def shard_rows():
        nonlocal start, total
        for chunk in _raw_chunks(path, kind, list(dict.fromkeys([id_column] + files)), chunk_rows):
            ids = chunk[id_column].to_numpy(dtype=object)
            rows = np.arange(start, start + len(chunk))
            start += len(chunk)
            total += len(chunk)
            empty = np.flatnonzero([not str(i).strip() for i in ids])
            if len(empty):
                raise DataError(f"catalog {path} {_where(kind, rows[empty[0]])}: the {id_column} column is empty; "
                                f"every galaxy needs an id")
            digests = id_digests(ids)
            keep = np.ones(len(ids), bool) if shard is None else shard_of(digests, shard.count) == shard.index
            again = np.flatnonzero(seen.add(digests=digests[keep]))
            if len(again):
                row, gid = rows[keep][again[0]], ids[keep][again[0]]
                raise DataError(f"catalog {path}: {id_column} {gid} on {_where(kind, row)} repeats "
                                f"{_where(kind, _first_row(path, kind, id_column, gid))}; ids must be unique")
            table = pd.DataFrame({"row": rows[keep], "id": [str(i) for i in ids[keep]]})
            names = [chunk[c].to_numpy(dtype=object)[keep] for c in files]
            table["file"] = [", ".join(map(str, parts)) for parts in zip(*names)] if names else ""
            resolved = [[os.path.join(folder, n) if n else "" for n in column] for column in names]
            table["source"] = (list(zip(*resolved)) if band_columns else resolved[0]) if names else ""
            yield table

    yield from _rebatch(shard_rows(), chunk_rows)
    if not total:
        raise DataError(f"catalog {path} has no rows; it needs a header and one row per galaxy")


def catalog_ids(path, id_column="id", shard=None):
    """Every id of the catalog (or of its shard), chunk after chunk: arrays of text."""
    for chunk in read_catalog(path, id_column, None, shard=shard):
        yield chunk["id"].to_numpy(dtype=object)
