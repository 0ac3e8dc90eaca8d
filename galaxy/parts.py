"""Survey outputs written chunk by chunk so that a kill loses at most the chunk in flight: each
chunk's rows are a part file of <output>.parts/, made durable (temporary name, fsync, rename) as
it is predicted, and joined into the single output file at the end; --resume reads the ids the
parts hold and goes on with the rest. join_shards joins the outputs of N shard jobs into one.

A chunk's part files are written in a fixed order: its skipped rows, its embeddings, then its
prediction rows, which mark the chunk done. On resume a chunk without its rows part is removed
whole and predicted again, so no id is ever written twice, whenever the kill came.
"""
import glob
import os
import re
import shutil

import numpy as np
import pandas as pd

from galaxy.catalog import IdSet, catalog_ids, table_kind
from galaxy.files import DataError, atomic_write, csv_writer, file_path, lock_folder, remove_dead_temp_files

PART_NAME = re.compile(r"(\d+)\.(rows|skipped|embeddings)\.(csv|parquet|npz)")
TEXT_COLUMNS = ("id", "file", "reason", "summary")   # read back as text, never as numbers
SKIPPED_COLUMNS = ["id", "file", "reason"]


def prediction_table(ids, mean, std=None, summary=False, files=None):
    """Rows keyed by id: [file], the 37 vote fractions, with std their <column>_std spread, with
    summary the answers in words (dataset.vote_summary)."""
    from dataset import LABEL_COLUMNS, vote_summary   # here: dataset imports torch, seconds a writer need not pay
    table = pd.DataFrame({"id": [str(i) for i in ids]})
    if files is not None:
        table["file"] = list(files)
    mean = np.asarray(mean, np.float32).reshape(len(table), len(LABEL_COLUMNS))
    table = pd.concat([table, pd.DataFrame(np.clip(mean, 0, 1), columns=LABEL_COLUMNS)], axis=1)
    if std is not None:
        std = np.asarray(std, np.float32).reshape(mean.shape)
        table = pd.concat([table, pd.DataFrame(std, columns=[f"{c}_std" for c in LABEL_COLUMNS])], axis=1)
    if summary:
        table["summary"] = [vote_summary(row) for row in mean]
    return table


def sibling(output, suffix, ext=None):
    """preds.parquet -> preds<suffix>.parquet (or .<ext>): the files that go with an output."""
    base, own = os.path.splitext(os.fspath(output))
    return f"{base}{suffix}{'.' + ext if ext else own}"


def shard_output(output, shard):
    """preds.parquet -> preds.shard3of8.parquet for shard 3/8: one command line names each job's own file."""
    return sibling(output, f".shard{shard.index}of{shard.count}")


def output_kind(path):
    """ "csv" or "parquet" for an output's name; DataError for any other."""
    kind = table_kind(path)
    if os.fspath(path).lower().endswith(".gz"):
        raise DataError(f"--output={path}: write .csv or .parquet (parquet is compressed already)")
    return kind


# --- tables on disk ----------------------------------------------------------------------------------

def _arrow(table):
    import pyarrow as pa
    arrow = pa.Table.from_pandas(table, preserve_index=False).replace_schema_metadata(None)
    text = [pa.field(f.name, pa.string()) if pa.types.is_null(f.type) or pa.types.is_large_string(f.type) else f
            for f in arrow.schema]   # an empty or all-missing text column is still text
    return arrow.cast(pa.schema(text))


def _synced(write):
    """write(path), then fsync the file: its bytes are on disk before its rename is."""
    def write_synced(path):
        write(path)
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    return write_synced


def durable_write(path, write):
    """atomic_write with fsync of the file and of its folder: after a power cut the file is whole or absent."""
    atomic_write(path, _synced(write))
    fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_table(path, table):
    """A DataFrame as CSV (text through file_text, floats %.6f) or parquet, by path's extension."""
    if table_kind(path) == "parquet":
        import pyarrow.parquet as pq
        return lambda tmp: pq.write_table(_arrow(table), tmp)
    return csv_writer(table, float_format="%.6f")


def read_chunks(path, columns=None, rows=100_000):
    """A CSV or parquet output of this module, chunk after chunk, text columns as str."""
    if table_kind(path) == "parquet":
        import pyarrow.parquet as pq
        for batch in pq.ParquetFile(path).iter_batches(batch_size=rows, columns=columns):
            yield batch.to_pandas()
        return
    for chunk in pd.read_csv(path, usecols=columns, chunksize=rows, keep_default_na=False,
                             dtype={c: str for c in TEXT_COLUMNS}):
        for column in set(TEXT_COLUMNS) & set(chunk.columns):
            chunk[column] = [file_path(v) for v in chunk[column]]
        yield chunk


def _column_names(path):
    if table_kind(path) == "parquet":
        import pyarrow.parquet as pq
        return list(pq.read_schema(path).names)
    return list(pd.read_csv(path, nrows=0).columns)


def read_ids(path):
    try:
        return np.concatenate([c["id"].to_numpy(dtype=object) for c in read_chunks(path, ["id"])] or [[]])
    except Exception as err:
        raise DataError(f"{path} cannot be read ({type(err).__name__}: {str(err)[:200]}); delete it and run "
                        f"again with --resume: its rows are predicted anew") from None


def _nonempty(paths):
    """The chunks of the tables at paths that hold rows; only if none does, the first empty one (a header)."""
    first_empty, any_rows = None, False
    for path in paths:
        for chunk in read_chunks(path):
            if len(chunk):
                any_rows = True
                yield chunk
            elif first_empty is None:
                first_empty = chunk
    if not any_rows and first_empty is not None:
        yield first_empty


def join_tables(paths, output):
    """The tables at paths, in order, as one durable file at output (CSV or parquet), a chunk at a time:
    flat memory however long. Empty tables add nothing (an all-skipped chunk's may have fewer columns)."""
    def write_parquet(tmp):
        import pyarrow.parquet as pq
        writer = None
        try:
            for chunk in _nonempty(paths):
                table = _arrow(chunk)
                writer = writer or pq.ParquetWriter(tmp, table.schema)
                writer.write_table(table.select(writer.schema.names).cast(writer.schema))
        finally:
            if writer is not None:
                writer.close()
        if writer is None:
            pq.write_table(_arrow(pd.DataFrame({"id": pd.Series([], dtype=str)})), tmp)

    def write_csv(tmp):
        with open(tmp, "w", newline="") as f:
            for n, chunk in enumerate(_nonempty(paths)):
                csv_writer(chunk, float_format="%.6f", header=n == 0)(f)
            if f.tell() == 0:
                f.write("id\n")
    durable_write(output, write_parquet if table_kind(output) == "parquet" else write_csv)


# --- one job's output, chunk by chunk ----------------------------------------------------------------

class ChunkedOutput:
    """The rows of one prediction job, written a chunk at a time into <output>.parts/ and joined into
    output by finish(): the predictions, the skipped rows (id, file, reason) as <stem>_skipped.<ext>,
    and, if given, float16 embeddings as <stem>_embeddings.npy with their ids in <stem>_embeddings_ids.csv.

    done (an IdSet) holds every id written, by this run or, with resume, by the runs before it: a
    caller predicts only the rest. Without resume, parts left by a killed run are an error (they are
    finished work); with resume on an output already joined, complete is True and nothing is written.
    """

    def __init__(self, output, resume=False):
        self.output = os.fspath(output)
        self.ext = output_kind(self.output)
        self.folder = self.output + ".parts"
        self.skipped_output = sibling(self.output, "_skipped")
        self.embeddings_output = sibling(self.output, "_embeddings", "npy")
        self.embedding_ids_output = sibling(self.output, "_embeddings_ids", "csv")
        self.done, self.parts, self._next, self._lock = IdSet(), {}, 0, None
        self.columns = None   # the columns of the rows written, which every later chunk must have
        self.complete = bool(resume) and os.path.isfile(self.output) and not os.path.isdir(self.folder)
        if self.complete:
            for path in (self.output, self.skipped_output):
                if os.path.isfile(path):
                    self.done.add(read_ids(path))
            return
        if os.path.isdir(self.folder) and not resume:
            raise DataError(f"{self.folder} holds the finished chunks of an earlier run that was stopped; pass "
                            f"--resume to go on with it, or remove the folder to start again")
        os.makedirs(self.folder, exist_ok=True)
        self._lock = lock_folder(self.folder, "prediction job writing " + os.path.basename(self.output))
        remove_dead_temp_files(self.folder)
        for path in (self.output, self.skipped_output, self.embeddings_output, self.embedding_ids_output):
            # a final join killed half-way; only the job holding the lock writes these names
            remove_dead_temp_files(os.path.dirname(os.path.abspath(path)), os.path.basename(path) + ".")
        self._read_parts()

    def _read_parts(self):
        found = {}
        for name in os.listdir(self.folder):
            match = PART_NAME.fullmatch(name)
            if match:
                found.setdefault(int(match.group(1)), {})[match.group(2)] = os.path.join(self.folder, name)
        for number, files in sorted(found.items()):
            if "rows" not in files:   # killed before the chunk was marked done: it is predicted again
                for path in files.values():
                    os.remove(path)
                continue
            for kind in ("rows", "skipped"):
                if kind in files:
                    ids = read_ids(files[kind])
                    if kind == "rows" and len(ids) and self.columns is None:
                        self.columns = _column_names(files[kind])
                    again = self.done.add(ids)
                    if again.any():
                        raise DataError(f"{files[kind]} repeats id {ids[again][0]} of another part; remove the "
                                        f"part and run again with --resume")
            self.parts[number] = files
        self._next = max(found, default=-1) + 1

    def write_chunk(self, rows, skipped=None, features=None):
        """Make one chunk durable: rows (a DataFrame with an "id" column, e.g. prediction_table),
        skipped ([(id, file, reason)] or such a DataFrame) and features ((len(rows), F), as float16).
        An id written before is a ValueError: the caller must predict only ids not in done."""
        if self.complete:
            raise DataError(f"{self.output} is complete; write to another --output to predict again")
        rows = rows.reset_index(drop=True).assign(id=lambda t: t["id"].astype(str))
        skipped = pd.DataFrame(skipped if skipped is not None else [], columns=SKIPPED_COLUMNS).astype(str)
        ids = np.concatenate([rows["id"].to_numpy(dtype=object), skipped["id"].to_numpy(dtype=object)])
        if len(rows) and self.columns is not None and list(rows.columns) != self.columns:
            raise DataError(f"{self.output}: the columns of this run's rows ({', '.join(rows.columns[:4])}...) are not "
                            f"those of the rows written before ({', '.join(self.columns[:4])}...); go on with the "
                            f"same settings, or remove {self.folder} to start again")
        probe = IdSet()
        if probe.add(ids).any() or self.done.contains(ids).any():
            raise ValueError("write_chunk: ids written before or twice in the chunk; predict only ids not in done")
        base = os.path.join(self.folder, f"{self._next:06d}")
        files = {"rows": f"{base}.rows.{self.ext}"}
        if len(skipped):
            files["skipped"] = f"{base}.skipped.{self.ext}"
            durable_write(files["skipped"], write_table(files["skipped"], skipped))
        if features is not None:
            features = np.asarray(features, np.float16)
            if len(features) != len(rows):
                raise ValueError(f"write_chunk: {len(features)} embeddings for {len(rows)} rows")
            files["embeddings"] = f"{base}.embeddings.npz"
            durable_write(files["embeddings"], lambda tmp: _save_npz(tmp, id=rows["id"].to_numpy(str),
                                                                    features=features))
        durable_write(files["rows"], write_table(files["rows"], rows))   # last: the chunk is done
        self.done.add(ids)
        self.columns = list(rows.columns) if len(rows) and self.columns is None else self.columns
        self.parts[self._next] = files
        self._next += 1

    def close(self):
        """Let go of the parts folder without joining them (a run that stops early; --resume goes on)."""
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def finish(self):
        """Join the parts into the output files, then remove the parts; returns the output's path."""
        if self.complete:
            return self.output
        numbers = sorted(self.parts)
        skipped = [self.parts[n]["skipped"] for n in numbers if "skipped" in self.parts[n]]
        if skipped:
            join_tables(skipped, self.skipped_output)
        elif os.path.isfile(self.skipped_output):   # an earlier run's: it does not belong with these rows
            os.remove(self.skipped_output)
        self._join_embeddings(numbers)
        join_tables([self.parts[n]["rows"] for n in numbers], self.output)
        self.close()
        shutil.rmtree(self.folder)
        return self.output

    def _join_embeddings(self, numbers):
        """The parts' embeddings as one float16 .npy, appended part by part: flat memory, and one part
        file open at a time however many there are."""
        have = [self.parts[n]["embeddings"] for n in numbers if "embeddings" in self.parts[n]]
        if not have:
            return
        lacking = [n for n in numbers if "embeddings" not in self.parts[n] and len(read_ids(self.parts[n]["rows"]))]
        if lacking:
            raise DataError(f"{self.folder}: {len(lacking)} chunks have no embeddings (predicted without --embed); "
                            f"remove the folder and predict again with --embed")
        ids = []
        for path in have:
            with np.load(path) as part:
                ids.append(part["id"])
        with np.load(have[0]) as part:
            width = part["features"].shape[1]

        def write(tmp):
            header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float16)), "fortran_order": False,
                      "shape": (sum(map(len, ids)), width)}
            with open(tmp, "wb") as f:   # the .npy header, then each part's rows appended as they are
                np.lib.format.write_array_header_1_0(f, header)
                for path in have:
                    with np.load(path) as part:
                        f.write(np.ascontiguousarray(part["features"], np.float16).tobytes())
        durable_write(self.embeddings_output, write)
        durable_write(self.embedding_ids_output, csv_writer(pd.DataFrame({"id": np.concatenate(ids)})))


def _save_npz(path, **arrays):
    with open(path, "wb") as f:   # a file object: np.savez would add .npz to the temporary name
        np.savez(f, **arrays)


# --- the outputs of N shard jobs as one ------------------------------------------------------------

def shard_outputs(spec, output=None):
    """The shard outputs a glob (or a list of paths and globs) names: files only, without their
    _skipped and _embeddings companions and without output itself."""
    specs = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec)
    paths = [p for s in specs for p in (sorted(glob.glob(os.fspath(s))) if glob.has_magic(os.fspath(s)) else [s])]
    companions = ("_skipped", "_embeddings", "_embeddings_ids")
    output = os.path.abspath(output) if output is not None else None
    return sorted(dict.fromkeys(os.fspath(p) for p in paths if os.path.isfile(p) and os.path.abspath(p) != output
                                and not os.path.splitext(os.fspath(p))[0].endswith(companions)))


def _listed(ids, total):
    return ", ".join(map(str, ids[:10])) + (f" and {total - 10} more" if total > 10 else "")


def join_shards(spec, output, catalog=None, id_column="id"):
    """Join the shard outputs spec names (and their _skipped tables) into output; returns the row count.

    Every id must be in exactly one output: a repeated one is a DataError naming it; with the
    original catalog, its ids found in no output are listed (the first 10 and the count), and ids
    of the outputs that the catalog lacks are counted. Nothing is written unless all checks pass.
    """
    output_kind(output)
    paths = shard_outputs(spec, output)
    if not paths:
        raise DataError(f"--join={spec} names no shard output; quote the glob, e.g. --join='preds.shard*.parquet'")
    seen, repeated, count, rows = IdSet(), [], 0, 0
    for path in paths:
        for table in (path, sibling(path, "_skipped")):
            if table == path or os.path.isfile(table):
                ids = read_ids(table)
                rows += len(ids) if table == path else 0
                again = ids[seen.add(ids)]
                count += len(again)
                repeated += [f"{i} (again in {table})" for i in again[:10 - len(repeated)]]
    if count:
        raise DataError(f"{count} ids are in more than one shard output: {_listed(repeated, count)}; were two jobs "
                        f"given the same --shard? Remove the wrong output and join again")
    if catalog is not None:
        missing, count, in_catalog = [], 0, 0
        for ids in catalog_ids(catalog, id_column):
            found = seen.contains(ids)
            in_catalog += int(found.sum())
            count += int((~found).sum())
            missing += list(ids[~found][:10 - len(missing)])
        if count:
            raise DataError(f"{count} ids of {catalog} are in no shard output: {_listed(missing, count)}; run their "
                            f"shards again with --resume, then join again")
        if len(seen) > in_catalog:
            raise DataError(f"{len(seen) - in_catalog} ids of the shard outputs are not in {catalog}; were they "
                            f"predicted from another catalog? Join the outputs of one catalog only")
    skipped = [sibling(p, "_skipped") for p in paths if os.path.isfile(sibling(p, "_skipped"))]
    if skipped:
        join_tables(skipped, sibling(output, "_skipped"))
    elif os.path.isfile(sibling(output, "_skipped")):
        os.remove(sibling(output, "_skipped"))
    join_tables(paths, output)
    return rows
