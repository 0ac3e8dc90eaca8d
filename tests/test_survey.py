"""predict.py --catalog (galaxy/survey.py) on small synthetic catalogs: CSV and parquet in and out, FITS
rows (a cube, three band files, one band) beside JPEGs and PNGs, unreadable rows skipped with their
reason, a SIGKILL in the middle of a part's write and the resume after it, shards joined into one table,
embeddings keyed by id, and the bounds that keep memory flat however long the catalog."""
import os
import signal
import subprocess
import sys
import threading

from PIL import Image
import numpy as np
import pandas as pd
import pytest
import torch

from config import Config
from dataset import LABEL_COLUMNS, vote_summary
from galaxy import survey
from galaxy.catalog import parse_shard, shard_of, id_digests
from galaxy.crop import read_image
from galaxy.fits import rgb_to_bands, write_fits
from galaxy.inference import INFERENCE_BATCH, batch_tensor, inference_batch
from galaxy.parts import ChunkedOutput, sibling
from helpers import REPO, blob, jpeg_bytes, main_error, save_checkpoint
from predict import main as predict_main

FAST = ["--workers=2", "--batch_size=4", "--amp=false", "--channels_last=false"]
SIDE = 96
JPEGS, TWINS = 10, 3   # JPEG rows; PNGs, each with a FITS twin of the same pixels
IMAGES = []   # the sky fixture's image folder


def galaxy_rgb(seed, grey=False):
    """A galaxy of its own size, brightness and colour on a noisy sky: each image gets its own votes."""
    rng = np.random.default_rng(seed)
    image = 10 + rng.normal(0, 2, (SIDE, SIDE)) + blob(SIDE, 40 + seed % 7, 50, 3 + seed, 60 + 12 * seed)
    tint = (1, 1, 1) if grey else (1, 0.9 - 0.03 * seed, 0.5 + 0.04 * seed)
    return np.clip(np.stack([image * t for t in tint], axis=-1), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def sky(tmp_path_factory):
    """A random-weight checkpoint and a folder of images: JPEGs, PNGs with their FITS twins (p0: a cube,
    p1: three band files, p2: grey, as one band), and unusable files. Returns the paths and the rows."""
    folder = tmp_path_factory.mktemp("sky")
    checkpoint = save_checkpoint(folder / "best.pt", Config())
    (folder / "img").mkdir()
    IMAGES[:] = [str(folder / "img")]
    rows = []
    for i in range(JPEGS):
        (folder / "img" / f"j{i}.jpg").write_bytes(jpeg_bytes(galaxy_rgb(i)))
        rows.append((f"j{i}", f"img/j{i}.jpg"))
    for i in range(TWINS):
        rgb = galaxy_rgb(10 + i, grey=i == 2)
        Image.fromarray(rgb).save(folder / "img" / f"p{i}.png")
        rows.append((f"p{i}", f"img/p{i}.png"))
        # the bands that the stretch maps back to exactly these pixels (galaxy/fits.py)
        bands = rgb_to_bands(np.asarray(read_image((folder / "img" / f"p{i}.png").read_bytes())))
        if i == 0:
            write_fits(folder / "img" / "p0.fits", bands)
            rows.append(("f0", "img/p0.fits"))
        elif i == 1:
            for band, plane in zip("gri", bands):
                write_fits(folder / "img" / f"p1_{band}.fits", plane)
        else:   # grey: one band, unscaled, shows the same grey (i's scale is 1)
            write_fits(folder / "img" / "p2.fits.gz", bands[2])
            rows.append(("f2", "img/p2.fits.gz"))
    (folder / "img" / "broken.jpg").write_bytes(b"\xff\xd8 not a JPEG")
    write_fits(folder / "img" / "four.fits", np.zeros((4, SIDE, SIDE), np.float32))
    bad = [("missing", "img/nothing.jpg"), ("broken", "img/broken.jpg"), ("empty", ""), ("four", "img/four.fits")]
    return {"folder": folder, "checkpoint": str(checkpoint), "rows": rows, "bad": bad}


def write_catalog(path, rows):
    """A catalog of (id, file) rows at path; its img/ (the sky's images) is linked beside it for relative paths."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.lexists(os.path.join(folder, "img")):
        os.symlink(IMAGES[0], os.path.join(folder, "img"))
    table = pd.DataFrame(rows, columns=["id", "file"])
    table.to_parquet(path, index=False) if str(path).endswith(".parquet") else table.to_csv(path, index=False)
    return str(path)


def read_table(path):
    path = str(path)
    return pd.read_parquet(path) if path.endswith(".parquet") else pd.read_csv(path, dtype={"id": str},
                                                                                keep_default_na=False)


def predict(monkeypatch, sky, *args):
    monkeypatch.setattr(sys, "argv", ["predict.py", f"--checkpoint={sky['checkpoint']}",
                                      f"--out_dir={sky['folder'] / 'runs'}", *FAST, *args])
    predict_main()


def by_id(table):
    return table.set_index("id")[LABEL_COLUMNS]


@pytest.fixture(scope="module")
def reference(sky, tmp_path_factory):
    """Every good row of the sky catalog predicted in one run, without chunks: the values to compare with."""
    folder = tmp_path_factory.mktemp("reference")
    catalog = write_catalog(sky["folder"] / "all.csv", sky["rows"])
    with pytest.MonkeyPatch.context() as patch:
        predict(patch, sky, f"--catalog={catalog}", f"--output_file={folder / 'all.parquet'}", "--embed")
    return {"rows": read_table(folder / "all.parquet"), "embeddings": np.load(folder / "all_embeddings.npy"),
            "embedding_ids": pd.read_csv(folder / "all_embeddings_ids.csv", dtype=str)["id"].tolist()}


# --- one job ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("catalog_name, output_name", [("cat.csv", "preds.parquet"), ("cat.parquet", "preds.csv")])
def test_catalog_in_chunks_fits_rows_and_skipped_rows(monkeypatch, capsys, sky, reference, tmp_path, catalog_name,
                                                      output_name):
    catalog = write_catalog(sky["folder"] / catalog_name, sky["rows"] + sky["bad"])
    monkeypatch.setattr(survey, "CHUNK_ROWS", 5)
    output = tmp_path / output_name
    predict(monkeypatch, sky, f"--catalog={catalog}", f"--output_file={output}")
    said = capsys.readouterr().out
    assert "predicting 19 of the 19 galaxies" in said and "parts of 5 rows" in said
    assert "; the model waited " in said and " for images (" in said   # what starving it would show
    rows, skipped = read_table(output), read_table(sibling(output, "_skipped"))
    assert list(rows.columns) == ["id", "file", *LABEL_COLUMNS, "summary"]   # one checkpoint, no TTA: no sigma
    assert sorted(rows["id"]) == sorted(i for i, _ in sky["rows"]) and not os.path.exists(f"{output}.parts")
    values = by_id(rows)
    assert ((values >= 0) & (values <= 1)).all().all()
    np.testing.assert_allclose(values.loc[reference["rows"]["id"]], by_id(reference["rows"]), atol=2e-6)
    assert rows["summary"].tolist() == [vote_summary(v) for v in values.loc[rows["id"]].to_numpy()]
    for fits_id, twin in (("f0", "p0"), ("f2", "p2")):   # a FITS file gives its PNG's pixels, so its votes
        np.testing.assert_allclose(values.loc[fits_id], values.loc[twin], atol=2e-6)
        others = values.drop([fits_id, twin])
        assert np.abs(others - values.loc[twin]).max(axis=1).min() > 1e-5   # and no other galaxy's
    reasons = dict(zip(skipped["id"], skipped["reason"]))
    assert sorted(reasons) == ["broken", "empty", "four", "missing"]
    assert reasons["missing"].startswith("unreadable file: FileNotFoundError")
    assert reasons["empty"] == "no file: the file column is empty in the catalog"
    assert reasons["four"].startswith("wrong number of bands: shape 4x96x96")
    assert reasons["broken"].startswith("not an image")


def test_band_columns_and_tta_spread(monkeypatch, sky, reference, tmp_path):
    folder = sky["folder"]
    table = pd.DataFrame({"objid": ["b1", "lost"], "g": ["img/p1_g.fits", "img/p1_g.fits"],
                          "r": ["img/p1_r.fits", "img/p1_r.fits"], "i": ["img/p1_i.fits", ""]})
    table.to_csv(folder / "bands.csv", index=False)
    output = tmp_path / "bands.csv"
    predict(monkeypatch, sky, f"--catalog={folder / 'bands.csv'}", "--id_column=objid", "--band_columns=g,r,i",
            f"--output_file={output}")
    rows, skipped = read_table(output), read_table(tmp_path / "bands_skipped.csv")
    assert rows["id"].tolist() == ["b1"] and rows["file"][0] == "img/p1_g.fits, img/p1_r.fits, img/p1_i.fits"
    np.testing.assert_allclose(by_id(rows).loc["b1"], by_id(reference["rows"]).loc["p1"], atol=2e-6)
    assert skipped["reason"].tolist() == ["no file for band i: its column is empty in the catalog"]
    # with TTA there is a spread, and without a calibration it is written as such, not as a std
    predict(monkeypatch, sky, f"--catalog={folder / 'bands.csv'}", "--id_column=objid", "--band_columns=g,r,i",
            f"--output_file={tmp_path / 'tta.parquet'}", "--tta")
    columns = read_table(tmp_path / "tta.parquet").columns
    assert f"{LABEL_COLUMNS[0]}_spread" in columns and not any(c.endswith("_std") for c in columns)


def test_memory_stays_flat_reader_window_and_parts_are_bounded(monkeypatch, sky, tmp_path):
    rows = [(f"n{k}", str(sky["folder"] / sky["rows"][k % JPEGS][1])) for k in range(60)]   # absolute paths
    catalog = write_catalog(tmp_path / "long.csv", rows)
    chunk, window = 5, 6
    monkeypatch.setattr(survey, "CHUNK_ROWS", chunk)
    monkeypatch.setattr(survey, "window_size", lambda batch_size, workers: window)
    read, in_flight, parts, lock = [], [0, 0], [], threading.Lock()
    real_read = survey.read_catalog

    def reader(*args, **kwargs):
        for table in real_read(*args, **kwargs):
            read.append(len(table))
            yield table

    class CountingWindow(survey.Window):
        def feed(self, tasks):
            for task in super().feed(tasks):
                with lock:
                    in_flight[0] += 1
                    in_flight[1] = max(in_flight[1], in_flight[0])
                yield task

        def release(self):
            with lock:
                in_flight[0] -= 1
            super().release()

    real_write = ChunkedOutput.write_chunk
    monkeypatch.setattr(survey, "read_catalog", reader)
    monkeypatch.setattr(survey, "Window", CountingWindow)
    monkeypatch.setattr(ChunkedOutput, "write_chunk", lambda self, rows, skipped=None, features=None: (
        parts.append(len(rows) + len(skipped or [])), real_write(self, rows, skipped, features))[1])
    predict(monkeypatch, sky, f"--catalog={catalog}", f"--output_file={tmp_path / 'long.parquet'}",
            "--batch_size=2")
    assert len(read_table(tmp_path / "long.parquet")) == 60
    assert max(read) <= chunk and sum(read) == 2 * 60   # counted once, then predicted: chunk_rows at a time
    assert 0 < in_flight[1] <= window   # never more tasks in the pool than the window, whatever the catalog
    assert sum(parts) == 60 and max(parts) <= chunk + 2 - 1 and len(parts) >= 60 // (chunk + 1)


def test_summaries_match_vote_summary_with_ties():
    rng = np.random.default_rng(0)
    mean = rng.random((500, 37)).astype(np.float32)
    mean[:50] = 0.5   # every question tied: the first answer wins, as in max()
    mean[50:60, :3] = [0.4, 0.4, 0.2]
    assert survey.summaries(mean) == [vote_summary(row) for row in mean]
    assert survey.summaries(np.zeros((0, 37))) == []


# --- a kill at any moment, and the resume ------------------------------------------------------------------

CHILD = """
import os, sys, time
sys.path.insert(0, {repo!r})
import galaxy.survey
import predict
galaxy.survey.CHUNK_ROWS = {chunk}
calls, real_fsync = [0], os.fsync
def fsync(fd):
    calls[0] += 1
    if calls[0] == {stop_at}:   # a part's file is written, not yet renamed (or renamed, its folder not synced)
        print("writing", flush=True)
        time.sleep(120)
    real_fsync(fd)
os.fsync = fsync
sys.argv = ["predict.py"] + {args!r}
predict.main()
print("finished", flush=True)
"""


def kill_while_writing(sky, args, stop_at, chunk=4):
    """predict.py args in a child, SIGKILLed during its stop_at-th fsync; True if it was, False if it ended."""
    args = [f"--checkpoint={sky['checkpoint']}", f"--out_dir={sky['folder'] / 'runs'}", *FAST, *args]
    child = subprocess.Popen([sys.executable, "-c", CHILD.format(repo=str(REPO), chunk=chunk, stop_at=stop_at,
                                                                 args=args)],
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=REPO)
    try:
        for line in child.stdout:
            if line.strip() in ("writing", "finished"):
                break
        if line.strip() == "writing":
            os.kill(child.pid, signal.SIGKILL)
        assert child.wait(timeout=120) in (0, -signal.SIGKILL)
    finally:
        if child.poll() is None:
            child.kill()
    return line.strip() == "writing"


@pytest.mark.parametrize("ext, stop_at", [("parquet", 7), ("csv", 10)])
def test_sigkill_during_a_part_write_then_resume_gives_every_id_once(monkeypatch, sky, reference, tmp_path, ext,
                                                                     stop_at):
    catalog = write_catalog(tmp_path / "cat.csv", sky["rows"] + sky["bad"])
    output = tmp_path / f"preds.{ext}"
    assert kill_while_writing(sky, [f"--catalog={catalog}", f"--output_file={output}"], stop_at)
    assert not output.exists() and [name for name in os.listdir(f"{output}.parts") if ".rows." in name]   # kept
    message = main_error(monkeypatch, predict_main, "predict.py", f"--checkpoint={sky['checkpoint']}",
                         f"--catalog={catalog}", f"--output_file={output}", *FAST)
    assert "holds the finished chunks of an earlier run that was stopped; pass --resume" in message
    monkeypatch.setattr(survey, "CHUNK_ROWS", 4)
    predict(monkeypatch, sky, f"--catalog={catalog}", f"--output_file={output}", "--resume")
    rows, skipped = read_table(output), read_table(sibling(output, "_skipped"))
    ids = rows["id"].tolist() + skipped["id"].tolist()
    assert sorted(ids) == sorted(i for i, _ in sky["rows"] + sky["bad"])   # each once: none lost, none twice
    np.testing.assert_allclose(by_id(rows).loc[reference["rows"]["id"]], by_id(reference["rows"]), atol=2e-6)
    assert not [name for name in os.listdir(tmp_path) if name.endswith(".tmp") or name.startswith(".")]


# --- shards -------------------------------------------------------------------------------------------------

def test_three_shards_one_killed_and_resumed_joined_with_every_id_once(monkeypatch, sky, reference, tmp_path):
    rows = sky["rows"] + [(f"x{k}", sky["rows"][k % JPEGS][1]) for k in range(15)]
    catalog = write_catalog(tmp_path / "cat.parquet", rows + sky["bad"])
    output = tmp_path / "preds.parquet"
    monkeypatch.setattr(survey, "CHUNK_ROWS", 4)
    for k in (0, 1):
        predict(monkeypatch, sky, f"--catalog={catalog}", f"--output_file={output}", f"--shard={k}/3", "--embed")
    assert (tmp_path / "preds.shard1of3.parquet").is_file() and (tmp_path / "preds.shard0of3_embeddings.npy").is_file()
    ids = [i for i, _ in rows + sky["bad"]]
    third = [i for i, s in zip(ids, shard_of(id_digests(ids), 3)) if s == 2]
    join = [f"--join={tmp_path / 'preds.shard*.parquet'}", f"--output_file={tmp_path / 'all.parquet'}"]
    message = main_error(monkeypatch, predict_main, "predict.py", *join, f"--catalog={catalog}")
    assert f"{len(third)} ids of {catalog} are in no shard output: " in message and third[0] in message
    assert "run their shards again with --resume" in message and not (tmp_path / "all.parquet").exists()
    # the third shard's job is killed while it writes a part (Slurm's --shard=env), then requeued with --resume
    env_args = [f"--catalog={catalog}", f"--output_file={output}", "--shard=env", "--embed", "--resume"]
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "2")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "3")
    assert kill_while_writing(sky, env_args, stop_at=4)
    predict(monkeypatch, sky, *env_args)
    predict(monkeypatch, sky, *join, f"--catalog={catalog}")
    joined, skipped = read_table(tmp_path / "all.parquet"), read_table(tmp_path / "all_skipped.parquet")
    assert sorted(joined["id"].tolist() + skipped["id"].tolist()) == sorted(ids)
    assert sorted(skipped["id"]) == sorted(i for i, _ in sky["bad"])
    values = by_id(joined)
    np.testing.assert_allclose(values.loc[reference["rows"]["id"]], by_id(reference["rows"]), atol=2e-6)
    np.testing.assert_allclose(values.loc[[f"x{k}" for k in range(15)]],
                               by_id(reference["rows"]).loc[[f"j{k % JPEGS}" for k in range(15)]], atol=2e-6)
    # the embeddings, joined shard after shard, in the order of their ids file
    features = np.load(tmp_path / "all_embeddings.npy")
    feature_ids = pd.read_csv(tmp_path / "all_embeddings_ids.csv", dtype=str)["id"].tolist()
    assert sorted(feature_ids) == sorted(joined["id"]) and features.shape == (len(joined), 2048)
    row = {gid: n for n, gid in enumerate(reference["embedding_ids"])}
    for n, gid in enumerate(feature_ids):
        twin = gid if gid in row else f"j{int(gid[1:]) % JPEGS}"
        np.testing.assert_allclose(features[n], reference["embeddings"][row[twin]], atol=2e-3, rtol=2e-3)


def test_embed_in_chunks_keyed_by_id(monkeypatch, sky, reference, tmp_path):
    monkeypatch.setattr(survey, "CHUNK_ROWS", 3)
    catalog = write_catalog(tmp_path / "cat.csv", sky["rows"] + sky["bad"])
    predict(monkeypatch, sky, f"--catalog={catalog}", f"--output_file={tmp_path / 'e.csv'}", "--embed")
    rows = read_table(tmp_path / "e.csv")
    features = np.load(tmp_path / "e_embeddings.npy")
    feature_ids = pd.read_csv(tmp_path / "e_embeddings_ids.csv", dtype=str)["id"].tolist()
    assert feature_ids == rows["id"].tolist() and features.dtype == np.float16 and features.shape[1] == 2048
    row = {gid: n for n, gid in enumerate(reference["embedding_ids"])}
    np.testing.assert_allclose(features, reference["embeddings"][[row[gid] for gid in feature_ids]], atol=2e-3,
                               rtol=2e-3)
    assert reference["embeddings"].shape[0] == len(reference["rows"])


def test_bad_options_are_one_line_errors(monkeypatch, sky, tmp_path):
    catalog = write_catalog(tmp_path / "cat.csv", sky["rows"][:2])
    base = ["predict.py", f"--checkpoint={sky['checkpoint']}", f"--catalog={catalog}", *FAST]
    for name in ("RANK", "WORLD_SIZE", "SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT"):
        monkeypatch.delenv(name, raising=False)
    assert "--shard=3/2: K must be 0..N-1" in main_error(monkeypatch, predict_main, *base, "--shard=3/2")
    assert "neither RANK and WORLD_SIZE" in main_error(monkeypatch, predict_main, *base, "--shard=env")
    assert "has no column 'objid'" in main_error(monkeypatch, predict_main, *base, "--id_column=objid")
    assert not os.path.exists(os.path.join(sky["folder"], "runs", "predictions.parquet.parts"))   # nothing to keep
    assert "--catalog and --images both given" in main_error(monkeypatch, predict_main, *base,
                                                             f"--images={tmp_path}")
    assert "names no shard output" in main_error(monkeypatch, predict_main, "predict.py",
                                                 f"--join={tmp_path / 'none*.parquet'}")
    assert "write .csv or .parquet" in main_error(monkeypatch, predict_main, *base,
                                                  f"--output_file={tmp_path}/p.csv.gz")
    no_catalog = ["predict.py", f"--checkpoint={sky['checkpoint']}", f"--images={tmp_path}", *FAST]
    assert "--shard acts only with --catalog" in main_error(monkeypatch, predict_main, *no_catalog, "--shard=1/4")
    assert "--band_columns, --output_file act only with --catalog" in main_error(
        monkeypatch, predict_main, *no_catalog, "--band_columns=g,r,i", f"--output_file={tmp_path}/p.csv")


def test_shard_output_names_and_device(monkeypatch):
    cfg = Config(out_dir="runs", catalog="cat.csv")
    assert survey.catalog_output(cfg) == os.path.join("runs", "predictions.parquet")
    assert survey.catalog_output(Config(output_file="p.csv"), parse_shard("3/8")) == "p.shard3of8.csv"
    monkeypatch.setenv("LOCAL_RANK", "1")   # torchrun's: on a CPU it changes nothing
    assert survey.job_device(Config(device="cpu", catalog="cat.csv")) == torch.device("cpu")


# --- feeding a GPU ------------------------------------------------------------------------------------------

def test_inference_batch_is_at_least_256_on_a_gpu_and_batch_tensor_layout():
    assert inference_batch(Config(batch_size=64), torch.device("cuda")) == INFERENCE_BATCH
    assert inference_batch(Config(batch_size=512), torch.device("cuda")) == 512
    assert inference_batch(Config(batch_size=64), torch.device("cpu")) == 64
    crops = [np.full((8, 8, 3), k, np.uint8) for k in range(3)]
    images = batch_tensor(crops)
    assert images.shape == (3, 3, 8, 8) and images.is_contiguous() and images[2].eq(2).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_catalog_pins_its_batches_and_matches_the_cpu(monkeypatch, sky, reference, tmp_path):
    pinned = batch_tensor([np.zeros((8, 8, 3), np.uint8)], pin=True)
    assert pinned.is_pinned() and pinned.shape == (1, 3, 8, 8)
    catalog = write_catalog(tmp_path / "cat.csv", sky["rows"])
    predict(monkeypatch, sky, f"--catalog={catalog}", f"--output_file={tmp_path / 'gpu.parquet'}", "--device=cuda")
    np.testing.assert_allclose(by_id(read_table(tmp_path / "gpu.parquet")).loc[reference["rows"]["id"]],
                               by_id(reference["rows"]), atol=1e-4)


def test_rehearsal_catalog_repeats_the_jpegs_with_fits_cubes_among_them(demo_raw, tmp_path):
    from benchmarks.survey import FITS_EVERY, build_catalog, kept_rows
    path, sources, fits = build_catalog(demo_raw, tmp_path, 100)
    table = pd.read_parquet(path)
    assert table["id"].tolist() == list(range(1, 101)) and sources == 96 + 16 and fits == 100 // FITS_EVERY
    assert table["file"].str.endswith(".fits").sum() == fits and table["file"][FITS_EVERY - 1].endswith(".fits")
    assert all((tmp_path / name).is_file() for name in set(table["file"]))
    assert kept_rows("predicting 6,000 of the 10,000 galaxies of c.parquet (4,000 written before) with") == 4000
