"""Galaxies like this one: embeddings written by predict.py --embed, the nearest search, and
plot_image.py --similar."""
import json
import shutil
import sys

from PIL import Image
import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch

from config import Config
from dataset import DataError
from galaxy.checkpoints import load_model
from galaxy.crop import CROP_KEYS
from galaxy.similar import EMBEDDINGS_FILE, SOURCE_FILE, nearest, read_embeddings, row_norms, weights_digest
import helpers
from helpers import blob, save_checkpoint
import plot_image
from predict import main as predict_main

# a fixed central crop of an even-sided image is symmetric, so a rotated image gives the rotated crop
CFG = Config(image_size=32, crop="center", center_crop_size=64)


def test_nearest_is_the_exact_cosine_ranking():
    rng = np.random.default_rng(0)
    embeddings = np.abs(rng.standard_normal((500, 64))).astype(np.float16)
    query = embeddings[7].astype(np.float32)
    rows, similarities = nearest(embeddings, query, 5, exclude=[7])
    unit = embeddings.astype(np.float32) / np.linalg.norm(embeddings.astype(np.float32), axis=1, keepdims=True)
    direct = unit @ (query / np.linalg.norm(query))
    direct[7] = -np.inf
    assert rows.tolist() == np.argsort(-direct)[:5].tolist() and 7 not in rows
    np.testing.assert_allclose(similarities, direct[rows], atol=1e-5)
    np.testing.assert_allclose(row_norms(embeddings), np.linalg.norm(embeddings.astype(np.float32), axis=1), rtol=1e-5)


@pytest.fixture(scope="module")
def embedded(tmp_path_factory):
    """predict.py --images --tta --embed over 4 distinct galaxies and the first one turned 90 degrees."""
    folder = tmp_path_factory.mktemp("galaxies")
    rng = np.random.default_rng(0)
    for k in range(4):
        sky = 10 + rng.normal(0, 2, (96, 96)) + blob(96, 48, 48, 6 + 3 * k, 120 + 20 * k)
        sky += blob(96, 48 + 10 - 4 * k, 40 + 3 * k, 3 + k, 80)   # a companion, so rotations differ
        pixels = np.clip(sky, 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"g{k}.png")
        if k == 0:
            Image.fromarray(np.rot90(pixels).copy()).save(folder / "g0_turned.png")
    run_dir = tmp_path_factory.mktemp("run")
    checkpoint = save_checkpoint(run_dir / "best.pt", CFG)
    out_dir = tmp_path_factory.mktemp("out")
    argv = ["predict.py", f"--checkpoint={checkpoint}", f"--images={folder}", "--tta", "--embed",
            f"--out_dir={out_dir}", "--workers=1", "--amp=false", "--channels_last=false"]
    mp = pytest.MonkeyPatch()
    mp.setattr(sys, "argv", argv)
    predict_main()
    mp.undo()
    return {"folder": folder, "out_dir": out_dir, "checkpoint": checkpoint}


def test_a_galaxys_nearest_is_its_rotated_copy(embedded):
    embeddings, ids = read_embeddings(embedded["out_dir"])
    assert embeddings.dtype == np.float16 and embeddings.shape == (5, 2048)
    assert ids["source"].eq("file").all() and not ids["labelled"].any()
    names = [name.rsplit("/", 1)[-1] for name in ids["id"]]
    query = names.index("g0.png")
    rows, similarities = nearest(embeddings, embeddings[query], 2, exclude=[query], norms=ids["norm"].to_numpy())
    assert names[rows[0]] == "g0_turned.png" and similarities[0] > 0.999
    assert similarities[1] < similarities[0]


def test_plot_image_similar_row(embedded, tmp_path, monkeypatch):
    query = str(embedded["folder"] / "g1.png")
    monkeypatch.setattr(sys, "argv", ["plot_image.py", query, "--similar=3", f"--embeddings={embedded['out_dir']}",
                                      f"--out_dir={tmp_path}"])
    plot_image.main()
    fig_axes = plt.gcf().get_axes()
    titles = [ax.get_title() for ax in fig_axes if "cos " in ax.get_title()]
    plt.close("all")
    assert len(titles) == 3 and not any(title.startswith("g1.png") for title in titles)
    assert (tmp_path / "galaxy_g1.png").stat().st_size > 20_000


def test_similar_without_embedding_or_checkpoint_is_an_error(embedded, tmp_path, monkeypatch):
    other = tmp_path / "new.png"
    Image.open(embedded["folder"] / "g2.png").save(other)
    monkeypatch.setattr(sys, "argv", ["plot_image.py", str(other), "--similar=2",
                                      f"--embeddings={embedded['out_dir']}", f"--out_dir={tmp_path}"])
    with pytest.raises(SystemExit) as exit_info:
        plot_image.main()
    assert "has no embedding" in str(exit_info.value.code) and "--checkpoint" in str(exit_info.value.code)


# --- embeddings that do not match -----------------------------------------------------------------

def plot_error(monkeypatch, *args):
    return helpers.main_error(monkeypatch, plot_image.main, "plot_image.py", *args)


def copy_of(embedded, tmp_path):
    return shutil.copytree(embedded["out_dir"], tmp_path / "embeddings")


def test_embeddings_json_records_the_model_that_made_them(embedded):
    record = json.loads((embedded["out_dir"] / SOURCE_FILE).read_text())
    assert record["checkpoint"] == str(embedded["checkpoint"]) and record["tta"] is True
    assert record["weights"] == weights_digest(load_model(embedded["checkpoint"])[0])
    assert record["crop"] == {key: getattr(CFG, key) for key in CROP_KEYS}
    assert (record["rows"], record["width"]) == (5, 2048)


def test_a_truncated_embeddings_file_is_a_one_line_error(embedded, tmp_path, monkeypatch):
    folder = copy_of(embedded, tmp_path)
    path = folder / EMBEDDINGS_FILE
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(DataError, match=r"embeddings.npy is damaged or incomplete \(mmap length is greater"):
        read_embeddings(folder)
    message = plot_error(monkeypatch, str(embedded["folder"] / "g1.png"), "--similar=2", f"--embeddings={folder}",
                         f"--out_dir={tmp_path}")
    assert f"{path} is damaged or incomplete" in message
    assert "predict.py --checkpoint=... --split=all --embed" in message
    path.write_text("not numpy at all")
    with pytest.raises(DataError, match="is damaged or incomplete"):
        read_embeddings(folder)


def test_embeddings_of_another_checkpoint_are_refused(embedded, tmp_path, monkeypatch):
    query, folder = str(embedded["folder"] / "g1.png"), embedded["out_dir"]
    other = save_checkpoint(tmp_path / "other.pt", CFG, seed=1)
    message = plot_error(monkeypatch, query, "--similar=2", f"--embeddings={folder}", f"--checkpoint={other}",
                         f"--out_dir={tmp_path}")
    assert (f"the embeddings in {folder} were made by {embedded['checkpoint']}, not by --checkpoint={other} "
            f"(other weights)") in message and f"predict.py --checkpoint={other} --split=all --embed" in message
    # another crop on the same weights is another model as well
    cropped = tmp_path / "cropped.pt"
    checkpoint = torch.load(embedded["checkpoint"], weights_only=True)
    checkpoint["config"]["center_crop_size"] = 80
    torch.save(checkpoint, cropped)
    assert "(center_crop_size 64 there, 80 here)" in plot_error(
        monkeypatch, query, "--similar=2", f"--embeddings={folder}", f"--checkpoint={cropped}", f"--out_dir={tmp_path}")

    # a galaxy that is not in the set gets its features computed: with the embeddings' tta, too
    new = tmp_path / "new.png"
    Image.open(embedded["folder"] / "g2.png").save(new)
    copied = shutil.copy(embedded["checkpoint"], tmp_path / "same_weights.pt")   # the weights count, not the path
    assert "(tta true there, false here)" in plot_error(monkeypatch, str(new), "--similar=2", f"--embeddings={folder}",
                                                        f"--checkpoint={copied}", f"--out_dir={tmp_path}")
    for args in ([query, "--similar=2"], [str(new), "--similar=2", "--tta"]):
        monkeypatch.setattr(sys, "argv", ["plot_image.py", *args, f"--embeddings={folder}", f"--checkpoint={copied}",
                                          f"--out_dir={tmp_path}"])
        plot_image.main()
        plt.close("all")

    unknown = copy_of(embedded, tmp_path)
    (unknown / SOURCE_FILE).unlink()   # embeddings written before the record existed
    assert f"{unknown} has no readable {SOURCE_FILE}, so which checkpoint made its embeddings is unknown" in plot_error(
        monkeypatch, query, "--similar=2", f"--embeddings={unknown}", f"--checkpoint={copied}", f"--out_dir={tmp_path}")


def test_rows_that_are_not_finite_are_never_ranked():
    rng = np.random.default_rng(1)
    embeddings = np.abs(rng.standard_normal((300, 16))).astype(np.float16)
    query = embeddings[0].astype(np.float32)
    bad = [3, 50, 299]
    embeddings[3, 5], embeddings[50] = np.nan, np.inf
    embeddings[299] = np.nan
    norms = row_norms(embeddings)
    norms[299] = 1.0   # a stale norm from before the row went bad: the row's similarity still tells
    left_out = []
    rows, similarities = nearest(embeddings, query, 300, exclude=[0], norms=norms, left_out=left_out)
    assert sorted(left_out) == bad and not set(bad) & set(rows.tolist()) and 0 not in rows
    assert len(rows) == 300 - 1 - len(bad) and np.isfinite(similarities).all()
    assert (np.diff(similarities) <= 1e-6).all()   # best first
    assert len(nearest(embeddings, np.full(16, np.nan, np.float32), 5)[0]) == 0


def test_plot_image_leaves_out_embeddings_that_are_not_finite(embedded, tmp_path, monkeypatch, capsys):
    folder = copy_of(embedded, tmp_path)
    embeddings, ids = read_embeddings(folder)
    names = [name.rsplit("/", 1)[-1] for name in ids["id"]]
    poisoned = np.array(embeddings)
    poisoned[names.index("g0_turned.png")] = np.nan   # the one most like g0
    with open(folder / EMBEDDINGS_FILE, "wb") as f:
        np.save(f, poisoned)
    query = str(embedded["folder"] / "g0.png")
    monkeypatch.setattr(sys, "argv", ["plot_image.py", query, "--similar=4", f"--embeddings={folder}",
                                      f"--out_dir={tmp_path}"])
    plot_image.main()
    titles = [ax.get_title() for ax in plt.gcf().get_axes() if "cos " in ax.get_title()]
    plt.close("all")
    assert len(titles) == 3 and not any("nan" in title or title.startswith("g0_turned") for title in titles)
    assert "left out 1 of the 5 embeddings" in capsys.readouterr().out
    message = plot_error(monkeypatch, str(embedded["folder"] / "g0_turned.png"), "--similar=2",
                         f"--embeddings={folder}", f"--out_dir={tmp_path}")
    assert "g0_turned.png stored in" in message and "holds NaN or inf" in message
