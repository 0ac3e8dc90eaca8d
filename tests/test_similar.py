"""Galaxies like this one: embeddings written by predict.py --embed, the nearest search, and
plot_image.py --similar."""
import sys

from PIL import Image
import matplotlib.pyplot as plt
import numpy as np
import pytest

from config import Config
from galaxy.similar import nearest, read_embeddings, row_norms
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
