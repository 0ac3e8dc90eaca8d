"""plot_image.py on the small synthetic set: train and test galaxies, with and without a
checkpoint, raw or processed-only, and its one-line errors."""
from pathlib import Path
import sys

from PIL import Image
import matplotlib.pyplot as plt
import numpy as np
import pytest

from dataset import LABEL_COLUMNS, png_ids, read_labels
import helpers
from helpers import REPO, demo_config, one_line_error, run_script, save_checkpoint, without_root_powers
import plot_image
from plot_image import closest_ids, find_galaxy, galaxy_images, plot_galaxy, true_vote_fractions


def run_plot(*args):
    return run_script("plot_image.py", *args)


@pytest.fixture(scope="module")
def demo(demo_raw, demo_processed, tmp_path_factory):
    processed_dir = Path(demo_processed.processed_dir)
    cfg = demo_config(processed_dir)
    cfg.raw_dir = str(demo_raw)
    return {"cfg": cfg, "raw_dir": Path(demo_raw), "processed_dir": processed_dir,
            "checkpoint": save_checkpoint(tmp_path_factory.mktemp("run") / "best.pt", cfg),
            "train_id": int(read_labels(processed_dir)[0][0]),
            "test_id": int(png_ids(processed_dir / "test")[0]),
            "data_args": [f"--raw_dir={demo_raw}", f"--processed_dir={processed_dir}"]}


def test_cli_plots_a_training_galaxy_against_the_checkpoint(demo, tmp_path):
    galaxy_id = demo["train_id"]
    result = run_plot(str(galaxy_id), *demo["data_args"], f"--checkpoint={demo['checkpoint']}",
                      f"--out_dir={tmp_path}")
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"wrote {tmp_path / f'galaxy_{galaxy_id}.png'}" in result.stdout
    assert [p.name for p in tmp_path.iterdir()] == [f"galaxy_{galaxy_id}.png"]  # no temp file left


@pytest.mark.parametrize("which", ["train_id", "test_id"])
@pytest.mark.parametrize("with_checkpoint", [False, True])
def test_plot_is_written(demo, tmp_path, monkeypatch, which, with_checkpoint):
    # main() in this process: the same code path as the CLI above, without a second torch import
    galaxy_id = demo[which]
    checkpoint = [f"--checkpoint={demo['checkpoint']}"] if with_checkpoint else []
    monkeypatch.setattr(sys, "argv", ["plot_image.py", str(galaxy_id), *demo["data_args"], *checkpoint,
                                      f"--out_dir={tmp_path}"])
    plot_image.main()
    plt.close("all")
    assert (tmp_path / f"galaxy_{galaxy_id}.png").stat().st_size > 20_000


def test_processed_png_alone_is_enough(demo, tmp_path):
    result = run_plot(str(demo["test_id"]), f"--raw_dir={tmp_path / 'no_raw'}", f"--checkpoint={demo['checkpoint']}",
                      f"--processed_dir={demo['processed_dir']}", f"--out_dir={tmp_path}")
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / f"galaxy_{demo['test_id']}.png").is_file()


def test_unknown_id_names_the_closest_known_ids(demo, tmp_path):
    known = np.concatenate([png_ids(demo["processed_dir"] / split) for split in ("train", "test")])
    nearest = sorted(known[np.argsort(np.abs(known - 1))[:3]].tolist())  # ID 1 lies below all of them
    result = run_plot("1", *demo["data_args"], f"--out_dir={tmp_path}")
    assert f"closest known IDs: {', '.join(map(str, nearest))}" in one_line_error(result)
    assert not list(tmp_path.iterdir())


def test_missing_checkpoint_is_a_one_line_error(demo, tmp_path):
    result = run_plot(str(demo["train_id"]), *demo["data_args"], f"--checkpoint={tmp_path / 'nope.pt'}")
    assert "nope.pt not found" in one_line_error(result)


def test_closest_ids():
    assert closest_ids(105, [100, 103, 108, 200, 90]) == [100, 103, 108]
    assert closest_ids(5, [7]) == [7]


def test_title_has_the_rmse_and_questions_have_paired_bars(demo):
    plt.switch_backend("Agg")
    cfg, galaxy_id = demo["cfg"], demo["train_id"]
    galaxy = find_galaxy(cfg, galaxy_id)
    galaxy.update(galaxy_images(cfg, galaxy))
    assert galaxy["split"] == "train" and galaxy["raw"].shape == (424, 424, 3)
    # the crop made from the raw JPEG is the very PNG the model was trained on
    with Image.open(galaxy["png_path"]) as png:
        np.testing.assert_array_equal(galaxy["crop"], np.asarray(png.convert("RGB")))
    true_values = true_vote_fractions(cfg, galaxy_id)
    predicted_values = np.clip(true_values + 0.1, 0, 1).astype(np.float32)
    expected = np.sqrt(np.mean((predicted_values - true_values) ** 2))

    fig = plot_galaxy(galaxy_id, galaxy, true_values, predicted_values, cfg)
    assert f"RMSE {expected:.4f}" in fig._suptitle.get_text()
    question_axes = [ax for ax in fig.get_axes() if ax.get_title(loc="left").startswith("Q")]
    assert len(question_axes) == 11
    assert sum(len(ax.patches) for ax in question_axes) == 2 * len(LABEL_COLUMNS)  # true + predicted
    plt.close(fig)


# --- bad input --------------------------------------------------------------------------------

def main_error(monkeypatch, *args):
    return helpers.main_error(monkeypatch, plot_image.main, "plot_image.py", *args)


def test_id_beyond_int64_is_a_one_line_error(monkeypatch):
    assert "'99999999999999999999999' is neither a galaxy ID (a number like 100008, at most 18 digits)" in main_error(
        monkeypatch, "99999999999999999999999")


def test_damaged_zip_or_an_out_dir_that_is_a_file_is_a_one_line_error(demo, tmp_path, monkeypatch):
    archive = tmp_path / "raw" / "images_training_rev1.zip"
    archive.parent.mkdir()
    archive.write_bytes((demo["raw_dir"] / archive.name).read_bytes()[-3000:])
    message = main_error(monkeypatch, str(demo["train_id"]), f"--raw_dir={archive.parent}", f"--out_dir={tmp_path}")
    assert f"{archive} is damaged" in message and "download" in message
    (tmp_path / "a_file").write_text("")
    message = main_error(monkeypatch, str(demo["train_id"]), *demo["data_args"], f"--out_dir={tmp_path / 'a_file'}")
    assert "is a file, not a folder; pass another --out_dir" in message


def test_read_only_out_dir_is_a_one_line_error(demo, tmp_path):
    tmp_path.chmod(0o555)
    try:
        result = without_root_powers(sys.executable, str(REPO / "plot_image.py"), str(demo["train_id"]),
                                     *demo["data_args"], f"--out_dir={tmp_path}")
    finally:
        tmp_path.chmod(0o755)
    assert f"cannot write into out_dir {tmp_path} (Permission denied)" in one_line_error(result)
