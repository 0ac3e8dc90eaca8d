"""Tests of galaxy/catalog.py and galaxy/parts.py: catalogs read in chunks, shards, the chunked output
written part by part, a SIGKILL in the middle of a write and the resume after it, and joining shards."""
import os
from pathlib import Path
import signal
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from galaxy.catalog import IdSet, id_digests, parse_shard, read_catalog, shard_of
from galaxy.files import DataError
from galaxy.parts import ChunkedOutput, join_shards, prediction_table, shard_output, sibling

TESTS = Path(__file__).resolve().parent


def write_catalog(path, ids, files=None, **columns):
    table = pd.DataFrame({"id": ids, "file": files if files is not None else [f"img/{i}.jpg" for i in ids],
                          **columns})
    if str(path).endswith(".parquet"):
        table.to_parquet(path, index=False)
    else:
        table.to_csv(path, index=False)
    return str(path)


def all_rows(*args, **kwargs):
    return pd.concat(list(read_catalog(*args, **kwargs)), ignore_index=True)


# --- reading ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["cat.csv", "cat.parquet"])
def test_catalog_chunks_ids_and_relative_paths(tmp_path, name):
    ids = list(range(100, 125))
    files = [f"img/{i}.fits" for i in ids]
    files[3] = "/data/elsewhere/103.fits"
    path = write_catalog(tmp_path / name, ids, files, ra=np.linspace(0, 1, 25))
    chunks = list(read_catalog(path, chunk_rows=10))
    assert [len(c) for c in chunks] == [10, 10, 5]
    table = pd.concat(chunks, ignore_index=True)
    assert table["id"].tolist() == [str(i) for i in ids] and table["row"].tolist() == list(range(1, 26))
    assert table["file"].tolist() == files
    assert table["source"][0] == str(tmp_path / "img" / "100.fits") and table["source"][3] == files[3]


def test_band_columns_give_three_paths_and_ids_only(tmp_path):
    table = pd.DataFrame({"objid": ["a", "b"], "g": ["a_g.fits", "b_g.fits"], "r": ["a_r.fits", "b_r.fits"],
                          "i": ["a_i.fits", ""]})
    table.to_csv(tmp_path / "cat.csv", index=False)
    rows = all_rows(str(tmp_path / "cat.csv"), id_column="objid", band_columns="g, r,i")
    assert rows["source"][0] == tuple(str(tmp_path / f"a_{b}.fits") for b in "gri")
    assert rows["source"][1][2] == "" and rows["file"][0] == "a_g.fits, a_r.fits, a_i.fits"
    assert all_rows(str(tmp_path / "cat.csv"), id_column="objid", file_column=None)["id"].tolist() == ["a", "b"]


def test_parquet_integer_ids_stay_integers_as_text(tmp_path):
    table = pd.DataFrame({"id": pd.array([587722981741363294, 5, None], dtype="Int64"), "file": ["a", "b", "c"]})
    table.to_parquet(tmp_path / "cat.parquet")
    with pytest.raises(DataError, match="row 3: the id column is empty"):
        all_rows(str(tmp_path / "cat.parquet"))
    table.iloc[:2].to_parquet(tmp_path / "two.parquet")
    assert all_rows(str(tmp_path / "two.parquet"))["id"].tolist() == ["587722981741363294", "5"]


@pytest.mark.parametrize("ids, options, message", [
    (["1", "2"], {"id_column": "objid"}, r"has no column 'objid' \(it has: id, file\); name the column with "
                                         r"--id_column=\.\.\."),
    (["1", "2"], {"file_column": "path"}, "has no column 'path'.*--file_column=..."),
    (["1", "2", "1"], {}, "id 1 on line 4 repeats line 2; ids must be unique"),
    ([str(i) for i in range(30)] + ["4"], {"chunk_rows": 8}, "id 4 on line 32 repeats line 6"),
    ([], {}, "has no rows; it needs a header and one row per galaxy"),
    (["1", ""], {}, "line 3: the id column is empty"),
    (["1"], {"band_columns": ["file", "file"]}, "give three columns"),
])
def test_bad_catalogs_are_one_line_errors(tmp_path, ids, options, message):
    path = write_catalog(tmp_path / "cat.csv", ids)
    with pytest.raises(DataError, match=message) as error:
        all_rows(path, **options)
    assert str(error.value).startswith(f"catalog {path}") or "--band_columns" in str(error.value)
    assert "\n" not in str(error.value)


def test_unreadable_or_unknown_catalog_files(tmp_path):
    (tmp_path / "cat.txt").write_text("id,file\n")
    (tmp_path / "bad.parquet").write_text("not parquet")
    for path, message in ((tmp_path / "cat.txt", "must be .csv, .csv.gz or .parquet"),
                          (tmp_path / "none.csv", "not found"), (tmp_path / "bad.parquet", "cannot be read")):
        with pytest.raises(DataError, match=message):
            all_rows(str(path))


# --- shards and ids ----------------------------------------------------------------------------------

def test_parse_shard():
    assert parse_shard("2/8") == (2, 8) and str(parse_shard(" 0/1 ")) == "0/1"
    for bad, message in (("8/8", "K must be 0..N-1"), ("-1/4", "K must be"), ("1/0", "N at least 1"),
                         ("2", "expected K/N"), ("a/b", "expected K/N"), ("1/2/3", "expected K/N")):
        with pytest.raises(ValueError, match=message):
            parse_shard(bad)


def test_shard_from_torchrun_or_slurm_array_environment():
    assert parse_shard("env", {"RANK": "3", "WORLD_SIZE": "4"}) == (3, 4)
    slurm = {"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_COUNT": "8"}
    assert parse_shard("env", slurm) == (4, 8)   # --array=1-8 counts from 1
    with pytest.raises(ValueError, match="neither RANK and WORLD_SIZE"):
        parse_shard("env", {})
    assert shard_output("out/preds.parquet", parse_shard("3/8")) == "out/preds.shard3of8.parquet"


def test_shards_are_stable_and_cover_every_id_once(tmp_path):
    # the shard of an id is fixed for ever: a change here would split a half-done survey differently
    assert shard_of(id_digests(["587722981741363294", "galaxy-a", "0"]), 8).tolist() == [3, 3, 2]
    assert id_digests(["0"]).tobytes().hex() == "1240a4684403b160e6597a653a88f56c"   # BLAKE2b-128 of "0"
    ids = [f"J{i:05d}" for i in range(600)]
    path = write_catalog(tmp_path / "cat.csv", ids)
    reordered = write_catalog(tmp_path / "reordered.parquet", ids[::-1])
    parts = [set(all_rows(path, shard=f"{k}/3", chunk_rows=50)["id"]) for k in range(3)]
    assert sum(map(len, parts)) == 600 and set().union(*parts) == set(ids)
    assert all(150 < len(part) < 250 for part in parts)   # about a third each
    assert [set(all_rows(reordered, shard=parse_shard(f"{k}/3"))["id"]) for k in range(3)] == parts
    chunks = list(read_catalog(path, shard="1/3", chunk_rows=50))
    assert all(len(c) == 50 for c in chunks[:-1]) and 0 < len(chunks[-1]) <= 50   # refilled after the shard


def test_idset_contains_and_repeats():
    seen = IdSet()
    assert seen.add(["a", "b", "a"]).tolist() == [False, False, True]
    assert seen.add(["c", "b"]).tolist() == [False, True] and len(seen) == 3
    assert seen.contains(["a", "z", "c"]).tolist() == [True, False, True]
    assert IdSet().contains(["a"]).tolist() == [False]


# --- the chunked output -------------------------------------------------------------------------------

def predict_catalog(catalog, output, resume=False, chunk_rows=7):
    """A stand-in for predict.py: ids ending in 3 are skipped, the others get a value of id / 1000 (two
    columns, not prediction_table's 37: that imports dataset, and so torch, seconds for each child)."""
    out = ChunkedOutput(output, resume=resume)
    for chunk in read_catalog(catalog, chunk_rows=chunk_rows):
        chunk = chunk[~out.done.contains(chunk["id"])]
        if not len(chunk):
            continue
        bad = chunk["id"].str.endswith("3").to_numpy()
        good = chunk[~bad]
        values = good["id"].astype(float).to_numpy()[:, None] / 1000
        rows = pd.DataFrame({"id": good["id"], "file": good["file"], "value": values[:, 0],
                             "value_std": values[:, 0] / 10})
        out.write_chunk(rows,
                        [(r.id, r.file, "unreadable") for r in chunk[bad].itertuples()],
                        features=np.repeat(values[:, :1], 4, axis=1))
    return out.finish()


def read_output(path):
    return pd.read_parquet(path) if path.endswith(".parquet") else pd.read_csv(path, dtype={"id": str})


def check_output(output, ids):
    """Every id exactly once: in output with the right values, or in the skipped table."""
    rows, skipped = read_output(output), read_output(sibling(output, "_skipped"))
    assert sorted(rows["id"].tolist() + skipped["id"].tolist(), key=int) == [str(i) for i in ids]
    assert skipped["id"].str.endswith("3").all() and (skipped["reason"] == "unreadable").all()
    assert np.allclose(rows["value"], rows["id"].astype(float) / 1000, atol=1e-6)
    assert np.allclose(rows["value_std"], rows["id"].astype(float) / 10000, atol=1e-6)
    features = np.load(sibling(output, "_embeddings", "npy"))
    feature_ids = pd.read_csv(sibling(output, "_embeddings_ids", "csv"), dtype=str)["id"]
    assert feature_ids.tolist() == rows["id"].tolist() and features.dtype == np.float16
    assert np.allclose(features[:, 0], rows["id"].astype(float) / 1000, rtol=1e-3)
    assert not os.path.exists(output + ".parts")


@pytest.mark.parametrize("ext", ["csv", "parquet"])
def test_chunked_output_joins_parts_in_order(tmp_path, ext):
    ids = list(range(1, 41))
    catalog = write_catalog(tmp_path / "cat.csv", ids)
    output = predict_catalog(catalog, str(tmp_path / f"preds.{ext}"))
    check_output(output, ids)
    assert read_output(output)["file"][0] == "img/1.jpg"
    assert list(read_output(output).columns) == ["id", "file", "value", "value_std"]


def test_prediction_table_columns():
    from dataset import LABEL_COLUMNS   # here, not above: the SIGKILL test's children import this file
    mean = np.random.default_rng(0).uniform(-0.1, 1.1, (3, len(LABEL_COLUMNS)))
    table = prediction_table([7, 8, 9], mean, std=mean / 10, summary=True, files=["a", "b", "c"])
    assert list(table.columns) == ["id", "file", *LABEL_COLUMNS, *[f"{c}_std" for c in LABEL_COLUMNS], "summary"]
    assert table["id"].tolist() == ["7", "8", "9"] and table[LABEL_COLUMNS].to_numpy().min() >= 0
    assert table[LABEL_COLUMNS].dtypes.eq(np.float32).all() and table["summary"].str.len().min() > 0


def test_resume_goes_on_and_a_stale_parts_folder_needs_resume(tmp_path):
    ids = list(range(1, 41))
    catalog = write_catalog(tmp_path / "cat.csv", ids)
    output = str(tmp_path / "preds.parquet")
    first = ChunkedOutput(output)
    chunk = next(read_catalog(catalog, chunk_rows=7))
    good = chunk[chunk["id"] != "3"]
    values = good["id"].astype(float).to_numpy() / 1000
    rows = pd.DataFrame({"id": good["id"], "file": good["file"], "value": values, "value_std": values / 10})
    first.write_chunk(rows, [("3", "img/3.jpg", "unreadable")], features=np.repeat(values[:, None], 4, axis=1))
    first.close()   # stopped early: the parts stay
    with pytest.raises(DataError, match="preds.parquet.parts holds the finished chunks .* pass --resume"):
        ChunkedOutput(output)
    again = ChunkedOutput(output, resume=True)
    assert len(again.done) == 7
    with pytest.raises(ValueError, match="ids written before"):
        again.write_chunk(rows.iloc[:1])
    with pytest.raises(DataError, match=r"the columns of this run's rows \(id, Class1.1, Class1.2, Class1.3...\) are "
                                        r"not those of the rows written before \(id, file, value, value_std...\)"):
        again.write_chunk(prediction_table(["40"], np.zeros((1, 37))))
    again.close()
    holder = ChunkedOutput(output, resume=True)
    with pytest.raises(DataError, match="in use by another prediction job"):
        ChunkedOutput(output, resume=True)
    holder.close()
    predict_catalog(catalog, output, resume=True)
    assert len(read_output(output)) + len(read_output(sibling(output, "_skipped"))) == 40
    done = ChunkedOutput(output, resume=True)   # already joined: nothing to write
    assert done.complete and len(done.done) == 40 and done.finish() == output


WORKER = """
import os, signal, sys, time
sys.path.insert(0, {tests!r})
from test_catalog import predict_catalog
calls, stop_at = [0], int(sys.argv[3])
real_fsync = os.fsync
def fsync(fd):
    calls[0] += 1
    if calls[0] == stop_at:   # in the middle of writing a part (or its folder entry): wait to be killed
        print("writing", flush=True)
        time.sleep(120)
    real_fsync(fd)
os.fsync = fsync
predict_catalog(sys.argv[1], sys.argv[2], resume=os.path.isdir(sys.argv[2] + ".parts"))
print("finished", flush=True)
"""


def kill_while_writing(catalog, output, fsync_call):
    """Run predict_catalog in a child and SIGKILL it during its fsync_call-th fsync; True if it was
    killed, False if it finished first."""
    child = subprocess.Popen([sys.executable, "-c", WORKER.format(tests=str(TESTS)), catalog, output,
                              str(fsync_call)], stdout=subprocess.PIPE, text=True, cwd=TESTS.parent,
                             env={**os.environ, "PYTHONPATH": str(TESTS.parent)})
    line = child.stdout.readline().strip()
    if line == "writing":
        os.kill(child.pid, signal.SIGKILL)
    child.wait(timeout=120)
    assert line in ("writing", "finished"), line
    return line == "writing"


@pytest.mark.parametrize("ext, fsync_calls", [("parquet", (1, 4, 11)), ("csv", (6, 17, 15))])
def test_sigkill_while_writing_then_resume_writes_every_id_once(tmp_path, ext, fsync_calls):
    # 40 galaxies in chunks of 7: 6 chunks of up to 3 parts, 2 fsyncs a part (the file, then its folder),
    # counted afresh by each resumed child: the kills hit a skipped part's file, an embeddings part's
    # folder entry, a rows part's file and its folder entry, and the final join's embedding ids
    ids = list(range(1, 41))
    catalog = write_catalog(tmp_path / "cat.csv", ids)
    output = str(tmp_path / f"preds.{ext}")
    killed = [kill_while_writing(catalog, output, call) for call in fsync_calls]
    assert all(killed) and os.path.isdir(output + ".parts")   # the parts go only once all is joined
    predict_catalog(catalog, output, resume=True)
    check_output(output, ids)
    assert not [name for name in os.listdir(tmp_path) if name.endswith(".tmp")]


# --- joining shards ----------------------------------------------------------------------------------

def test_join_shards_names_missing_and_repeated_ids(tmp_path):
    ids = list(range(1, 31))
    catalog = write_catalog(tmp_path / "cat.csv", ids)
    for k in range(3):
        out = ChunkedOutput(str(tmp_path / f"preds.shard{k}.parquet"))
        for chunk in read_catalog(catalog, shard=f"{k}/3"):
            keep = chunk[~chunk["id"].isin(["17", "5"])]   # 17 is lost, 5 is skipped
            out.write_chunk(prediction_table(keep["id"], np.full((len(keep), 37), 0.5)),
                            [(i, "", "unreadable") for i in chunk["id"] if i == "5"])
        out.finish()
    with pytest.raises(DataError, match=r"^1 ids of .*cat.csv are in no shard output: 17; run their shards"):
        join_shards(str(tmp_path / "preds.shard*.parquet"), str(tmp_path / "all.parquet"), catalog=catalog)
    first = read_output(str(tmp_path / "preds.shard0.parquet"))
    pd.concat([first, first.iloc[:1]]).to_parquet(tmp_path / "preds.shard0.parquet", index=False)
    with pytest.raises(DataError, match=rf"^1 ids are in more than one shard output: {first['id'][0]} \(again in "):
        join_shards(str(tmp_path / "preds.shard*.parquet"), str(tmp_path / "all.parquet"))
    assert not os.path.exists(tmp_path / "all.parquet")
    first.to_parquet(tmp_path / "preds.shard0.parquet", index=False)
    smaller = write_catalog(tmp_path / "smaller.csv", [i for i in ids if i not in (17, 30)])
    with pytest.raises(DataError, match=r"^1 ids of the shard outputs are not in .*smaller.csv"):
        join_shards(str(tmp_path / "preds.shard*.parquet"), str(tmp_path / "all.parquet"), catalog=smaller)
    assert join_shards([str(tmp_path / "preds.shard*.parquet")], str(tmp_path / "all.csv")) == 28
    joined, skipped = read_output(str(tmp_path / "all.csv")), read_output(str(tmp_path / "all_skipped.csv"))
    assert sorted(joined["id"].tolist() + skipped["id"].tolist(), key=int) == [str(i) for i in ids if i != 17]
    assert skipped["id"].tolist() == ["5"]
    with pytest.raises(DataError, match="names no shard output"):
        join_shards(str(tmp_path / "nothing*.parquet"), str(tmp_path / "all.parquet"))
