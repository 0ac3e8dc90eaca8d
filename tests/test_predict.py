"""predict.py on the small synthetic set: the submission file, raw vs processed input, skipped
images, test-time augmentation, the per-question evaluation, and the output files as one set."""
import io
import math
import os
from pathlib import Path
import shutil
import signal
import sys
import zipfile

import numpy as np
import pandas as pd
import pytest
import torch

from config import Config
from dataset import LABEL_COLUMNS, QUESTIONS, dihedral, png_ids, read_labels
from galaxy import ensemble, kaggle_raw
from galaxy.ensemble import crop_sources, galaxy_tasks, load_crops
from galaxy.evaluate import evaluation_table, question_rmse
from galaxy.files import csv_writer, file_path, file_text, lock_folder, signals_held
from galaxy.inference import predict
import helpers
from helpers import REPO, demo_config, one_line_error, run_script, save_checkpoint, without_root_powers
from model import build_model
from predict import fallback_prediction, fill_skipped
from predict import main as predict_main


FAST = ["--workers=1", "--batch_size=16"]


def run_predict(*args):
    # fp32 forced: "auto" times the candidates and may pick bf16, whose outputs differ in the 3rd decimal
    return run_script("predict.py", "--amp=false", "--channels_last=false", *args)


@pytest.fixture(scope="module")
def demo(demo_raw, demo_processed, tmp_path_factory):
    processed_dir = Path(demo_processed.processed_dir)
    run_dir = tmp_path_factory.mktemp("run")
    cfg = demo_config(processed_dir)
    label_ids, _ = read_labels(processed_dir)
    checkpoint = save_checkpoint(run_dir / "best.pt", cfg, label_ids)
    return {"raw_dir": Path(demo_raw), "processed_dir": processed_dir, "checkpoint": checkpoint,
            "cfg": cfg, "missing": tmp_path_factory.mktemp("empty") / "nothing"}


@pytest.fixture(scope="module")
def processed_submission(demo, tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("processed")
    result = run_predict(f"--checkpoint={demo['checkpoint']}", f"--processed_dir={demo['processed_dir']}",
                         f"--raw_dir={demo['missing']}", f"--out_dir={out_dir}", *FAST)
    assert result.returncode == 0, result.stderr[-2000:]
    return result, pd.read_csv(out_dir / "submission.csv")


# --- Kaggle's test set ------------------------------------------------------------------------

def test_submission_has_kaggles_format(demo, processed_submission):
    result, submission = processed_submission
    assert "processed PNGs" in result.stdout
    assert list(submission.columns) == ["GalaxyID"] + LABEL_COLUMNS
    test_ids = png_ids(demo["processed_dir"] / "test")
    assert submission["GalaxyID"].tolist() == sorted(test_ids.tolist())
    values = submission[LABEL_COLUMNS].to_numpy()
    assert np.isfinite(values).all() and values.min() >= 0 and values.max() <= 1


def test_raw_jpegs_give_the_same_predictions_as_processed_pngs(demo, processed_submission, tmp_path):
    result = run_predict(f"--checkpoint={demo['checkpoint']}", f"--raw_dir={demo['raw_dir']}",
                         f"--processed_dir={demo['missing']}", f"--out_dir={tmp_path}", "--workers=2")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "raw JPEGs" in result.stdout
    from_raw = pd.read_csv(tmp_path / "submission.csv")
    from_png = processed_submission[1]
    assert from_raw["GalaxyID"].tolist() == from_png["GalaxyID"].tolist()
    # the same crop, losslessly stored as PNG: equal up to the 6 decimals written
    np.testing.assert_allclose(from_raw[LABEL_COLUMNS], from_png[LABEL_COLUMNS], atol=2e-6)


def test_corrupt_test_jpegs_are_skipped_and_reported(demo, tmp_path):
    """An extracted images_test_rev1/ folder with two good JPEGs, a truncated one and an empty one."""
    raw_dir = tmp_path / "raw"
    folder = raw_dir / "images_test_rev1"
    folder.mkdir(parents=True)
    with zipfile.ZipFile(demo["raw_dir"] / "images_test_rev1.zip") as archive:
        members = sorted(n for n in archive.namelist() if n.endswith(".jpg"))[:3]
        jpegs = {int(Path(name).stem): archive.read(name) for name in members}
    good, truncated = sorted(jpegs)[:2], sorted(jpegs)[2]
    for galaxy_id in good:
        (folder / f"{galaxy_id}.jpg").write_bytes(jpegs[galaxy_id])
    (folder / f"{truncated}.jpg").write_bytes(jpegs[truncated][:200])
    (folder / "999999.jpg").write_bytes(b"")

    (folder / "galaxy.jpg").write_bytes(jpegs[good[0]])   # no GalaxyID: no row to fill
    train_mean = torch.linspace(0.1, 0.9, len(LABEL_COLUMNS))
    checkpoint = save_checkpoint(tmp_path / "best.pt", demo["cfg"], train_mean=train_mean)

    result = run_predict(f"--checkpoint={checkpoint}", f"--raw_dir={raw_dir}", "--tta=true",
                         f"--processed_dir={demo['missing']}", f"--out_dir={tmp_path}", "--workers=2")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "skipped 2 unreadable test images (2 of them get the training mean" in result.stdout
    assert str(truncated) in result.stdout and "999999" in result.stdout
    assert sorted(pd.read_csv(tmp_path / "submission_skipped.csv")["GalaxyID"]) == [truncated, 999999]
    # Kaggle scores only complete files: the unreadable galaxies get the checkpoint's training mean
    submission = pd.read_csv(tmp_path / "submission.csv").set_index("GalaxyID")
    assert submission.index.tolist() == sorted(good + [truncated, 999999])
    for galaxy_id in (truncated, 999999):
        np.testing.assert_allclose(submission.loc[galaxy_id, LABEL_COLUMNS], train_mean.numpy(), atol=1e-6)
    assert not np.allclose(submission.loc[good[0], LABEL_COLUMNS], train_mean.numpy(), atol=1e-3)


def test_fallback_is_the_checkpoints_mean_else_that_of_labels_csv(demo):
    train_mean = np.full(len(LABEL_COLUMNS), 0.25, np.float32)
    assert np.array_equal(fallback_prediction(torch.from_numpy(train_mean), demo["missing"]),
                          train_mean)
    np.testing.assert_allclose(fallback_prediction(None, demo["processed_dir"]),   # a checkpoint from before
                               read_labels(demo["processed_dir"])[1].mean(0))
    assert fallback_prediction(None, demo["missing"]) is None


def test_fill_skipped_adds_one_row_per_skipped_galaxy_id():
    galaxy_ids, predictions = np.array([5, 7]), np.zeros((2, len(LABEL_COLUMNS)), np.float32)
    skipped = [(9, "corrupt"), ("3", "preprocess.py: empty file"), ("", "file name is not a GalaxyID"),
               (5, "listed twice")]
    ids, rows, filled = fill_skipped(galaxy_ids, predictions, skipped, np.ones(len(LABEL_COLUMNS)))
    assert filled == 2 and ids.tolist() == [5, 7, 3, 9] and rows[2:].min() == 1 and rows[:2].max() == 0
    assert fill_skipped(galaxy_ids, predictions, skipped, None)[2] == 0


def main_error(monkeypatch, *args):
    return helpers.main_error(monkeypatch, predict_main, "predict.py", *args)


def test_missing_checkpoint_is_a_one_line_error(tmp_path):
    result = run_predict(f"--out_dir={tmp_path}")  # the default: out_dir/best.pt
    assert f"{tmp_path / 'best.pt'} not found" in one_line_error(result)


def test_no_test_images_is_a_one_line_error(demo, tmp_path, monkeypatch):
    message = main_error(monkeypatch, f"--checkpoint={demo['checkpoint']}", f"--raw_dir={demo['missing']}",
                         f"--processed_dir={demo['missing']}", f"--out_dir={tmp_path}")
    assert "images_test_rev1.zip" in message


def test_checkpoint_of_another_model_is_a_one_line_error(demo, tmp_path, monkeypatch):
    checkpoint = tmp_path / "other.pt"
    torch.save({"model": build_model(Config(image_size=32)).state_dict(), "config": Config().to_dict()},
               checkpoint)
    message = main_error(monkeypatch, f"--checkpoint={checkpoint}", f"--processed_dir={demo['processed_dir']}")
    assert "different model" in message


# --- test-time augmentation --------------------------------------------------------------------

@pytest.fixture(scope="module")
def random_model():
    torch.manual_seed(0)
    return build_model(Config(image_size=32)).eval()


def test_tta_changes_nothing_for_a_radially_symmetric_galaxy(random_model):
    # brightness depends on the distance from the centre only, so all 8 views are the same pixels
    side = 32
    y, x = np.mgrid[:side, :side] - (side - 1) / 2
    disc = np.clip(255 * np.exp(-(x ** 2 + y ** 2) / 60), 0, 255).astype(np.uint8)
    image = torch.from_numpy(np.stack([disc, disc // 2, disc // 3]))[None]
    views = [predict(random_model, dihedral(image, k)) for k in range(8)]
    for view in views[1:]:
        torch.testing.assert_close(view, views[0])
    torch.testing.assert_close(predict(random_model, image, tta=True), views[0], atol=1e-6, rtol=0)


def test_tta_is_the_mean_over_the_8_symmetries(random_model):
    images = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    mean_of_views = torch.stack([predict(random_model, dihedral(images, k)) for k in range(8)]).mean(0)
    torch.testing.assert_close(predict(random_model, images, batch_size=2, tta=True), mean_of_views)
    assert not torch.allclose(predict(random_model, images), mean_of_views)  # a real average, not a copy


# --- evaluation on the held-out split ----------------------------------------------------------

def test_question_rmse_by_hand():
    targets = np.zeros((2, 37))
    predictions = np.zeros((2, 37))
    q2 = [LABEL_COLUMNS.index("Class2.1"), LABEL_COLUMNS.index("Class2.2")]
    q6 = [LABEL_COLUMNS.index("Class6.1"), LABEL_COLUMNS.index("Class6.2")]
    predictions[:, q2] = [[0.2, 0.4], [0.4, 0.2]]  # squared errors 0.04 + 0.16 + 0.16 + 0.04 = 0.4 over 4
    predictions[:, q6] = 0.5                       # every error 0.5
    per_question = question_rmse(predictions, targets)
    expected = {q.number: 0.0 for q in QUESTIONS}
    expected.update({2: math.sqrt(0.4 / 4), 6: 0.5})
    assert per_question == pytest.approx(expected)

    table = evaluation_table(predictions, targets, baseline=np.zeros(37)).set_index("question")
    assert table.loc["all", "model_rmse"] == pytest.approx(math.sqrt((0.4 + 4 * 0.25) / 74))
    assert table.loc["Q2", "model_rmse"] == pytest.approx(math.sqrt(0.1))
    assert (table["baseline_rmse"] == 0).all()
    assert list(table.index) == ["all"] + [f"Q{q.number}" for q in QUESTIONS]


def test_evaluating_the_test_split_writes_table_and_chart(demo, tmp_path):
    result = run_predict(f"--checkpoint={demo['checkpoint']}", f"--processed_dir={demo['processed_dir']}",
                         "--split=test", f"--out_dir={tmp_path}", *FAST)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Smooth, featured or star?" in result.stdout
    table = pd.read_csv(tmp_path / "eval_test.csv").set_index("question")
    assert (tmp_path / "eval_test.png").stat().st_size > 10_000
    assert len(table) == 12 and table["model_rmse"].between(0, 1).all()

    # the baseline predicts the train split's mean: recompute it for the test split here
    split = pd.read_csv(demo["checkpoint"].parent / "split.csv")
    labels = pd.read_csv(demo["processed_dir"] / "labels.csv").set_index("GalaxyID")[LABEL_COLUMNS]
    mean = labels.loc[split.GalaxyID[split.split == "train"]].mean().to_numpy()
    targets = labels.loc[split.GalaxyID[split.split == "test"]].to_numpy()
    assert table.loc["all", "baseline_rmse"] == pytest.approx(np.sqrt(((targets - mean) ** 2).mean()), abs=1e-5)


def test_pngs_cropped_otherwise_fall_back_to_the_raw_jpegs(demo):
    cfg = Config(raw_dir=str(demo["raw_dir"]), processed_dir=str(demo["processed_dir"]))
    tasks, pngs, raw = galaxy_tasks(cfg, "test")
    center_model = Config(**{**demo["cfg"].to_dict(), "crop": "center"})
    use_png, sources = crop_sources(cfg, [demo["cfg"], center_model], pngs, raw, "test")
    assert use_png == [True, False] and "processed PNGs" in sources[0]
    assert "raw JPEGs" in sources[1] and "crop roi there, center in the checkpoint" in sources[1]
    assert [gid for gid, _ in tasks] == png_ids(demo["processed_dir"] / "test").tolist()
    assert all(where["png"] and where["raw"] for _, where in tasks)


# --- bad input --------------------------------------------------------------------------------

def test_damaged_test_zip_is_a_one_line_error(demo, tmp_path, monkeypatch):
    archive = tmp_path / "raw" / "images_test_rev1.zip"
    archive.parent.mkdir()
    archive.write_bytes((demo["raw_dir"] / archive.name).read_bytes()[:5000])
    message = main_error(monkeypatch, f"--checkpoint={demo['checkpoint']}", f"--raw_dir={archive.parent}",
                         f"--processed_dir={demo['missing']}", f"--out_dir={tmp_path / 'out'}")
    assert f"{archive} is damaged" in message and "download Kaggle's images_test_rev1.zip again" in message


def test_wrong_or_busy_out_dir_is_a_one_line_error_before_any_work(demo, tmp_path, monkeypatch):
    (tmp_path / "a_file").write_text("")
    message = main_error(monkeypatch, f"--checkpoint={demo['checkpoint']}", f"--out_dir={tmp_path / 'a_file'}")
    assert "is a file, not a folder; pass another --out_dir" in message
    held = lock_folder(tmp_path, "predict.py", ".predict.lock")   # as another predict.py writing there would
    try:
        message = main_error(monkeypatch, f"--checkpoint={demo['checkpoint']}", f"--out_dir={tmp_path}")
        assert f"{tmp_path} is in use by another predict.py (PID {os.getpid()})" in message
    finally:
        held.close()


def test_read_only_out_dir_is_a_one_line_error(demo, tmp_path):
    tmp_path.chmod(0o555)
    try:
        result = without_root_powers(sys.executable, str(REPO / "predict.py"), f"--checkpoint={demo['checkpoint']}",
                                     f"--processed_dir={demo['processed_dir']}", f"--out_dir={tmp_path}")
    finally:
        tmp_path.chmod(0o755)
    assert f"cannot write into out_dir {tmp_path} (Permission denied)" in one_line_error(result)


def test_an_unforeseen_error_skips_one_image(demo, monkeypatch):
    reference = sorted(kaggle_raw.raw_images(demo["raw_dir"], "test").items())[0]
    monkeypatch.setattr(ensemble, "worker_job", {"raw_dir": str(demo["raw_dir"]),
                                                   "groups": [{"cfg": demo["cfg"], "use_png": False}]})
    monkeypatch.setattr(ensemble, "crop_galaxy", lambda data, cfg: 1 / 0)
    task = (reference[0], {"raw": reference[1]})
    assert load_crops(task) == (reference[0], None, "unexpected error: ZeroDivisionError: division by zero")

    def interrupted(*args):
        raise KeyboardInterrupt
    monkeypatch.setattr(ensemble, "crop_galaxy", interrupted)
    with pytest.raises(KeyboardInterrupt):   # Ctrl-C still stops the run
        load_crops(task)


def test_truncated_png_of_the_split_is_a_one_line_error(demo, tmp_path, monkeypatch):
    processed = tmp_path / "processed"
    shutil.copytree(demo["processed_dir"], processed, ignore=shutil.ignore_patterns("*_images.pt"))
    test_id = pd.read_csv(demo["checkpoint"].parent / "split.csv").query("split == 'test'").GalaxyID.iloc[0]
    png = processed / "train" / f"{test_id}.png"
    png.write_bytes(png.read_bytes()[:300])
    message = main_error(monkeypatch, f"--checkpoint={demo['checkpoint']}", f"--processed_dir={processed}",
                         "--split=test", f"--out_dir={tmp_path / 'out'}", *FAST)
    assert str(png) in message and "cannot be read" in message and "re-run `python preprocess.py" in message


def test_truncated_test_png_is_skipped_and_reported(demo, tmp_path, monkeypatch, capsys):
    processed = tmp_path / "processed"
    shutil.copytree(demo["processed_dir"], processed)
    png = sorted((processed / "test").glob("*.png"))[0]
    png.write_bytes(png.read_bytes()[:300])
    monkeypatch.setattr(sys, "argv", ["predict.py", f"--checkpoint={demo['checkpoint']}",
                                      f"--processed_dir={processed}", f"--raw_dir={demo['missing']}",
                                      f"--out_dir={tmp_path}", "--amp=false", "--channels_last=false", *FAST])
    predict_main()
    assert f"skipped 1 unreadable test images (1 of them get the training mean in the submission): {png.stem}" \
        in capsys.readouterr().out
    assert "unreadable file" in pd.read_csv(tmp_path / "submission_skipped.csv").reason[0]


# --- the output files ------------------------------------------------------------------------------

def test_file_text_is_undone_by_file_path():
    names = [os.fsdecode(b"\xff\xfebad.jpg"), "a\rb.jpg", "a\nb\tc", "back\\slash", "\\x41 literal",
             "comma, \"quote\"", "\u00fcn\u00efcode \u2603.jpg", "plain.jpg"]
    for name in names:
        assert file_path(file_text(name)) == name
    assert file_text(names[0]) == "\\xff\\xfebad.jpg" and file_text(b"\xff\xfebad.jpg") == "\\xff\\xfebad.jpg"
    assert file_text("a\rb.jpg") == "a\\x0db.jpg" and file_text("plain.jpg") == "plain.jpg"
    assert file_text(100018) == "100018"


def test_csv_writer_keeps_one_row_per_record(tmp_path):
    names = ["car\rriage", "new\nline", "cr\r\nlf", "comma,name", 'quo"te', "space name", "\u00fcn\u00efcode",
             os.fsdecode(b"\xff\xfe")]
    path = tmp_path / "table.csv"
    table = pd.DataFrame({"file": [file_text(name) for name in names], "value": np.arange(len(names)) / 3})
    csv_writer(table, float_format="%.6f")(path)
    table = pd.read_csv(path)
    assert len(table) == len(names) and [file_path(text) for text in table["file"]] == names
    assert len(path.read_text().splitlines()) == len(names) + 1   # no record spans two lines
    assert pd.read_csv(io.StringIO(path.read_text()))["value"].tolist() == pytest.approx(table["value"].tolist())


def test_signals_are_held_until_the_swap_ends():
    done = []
    with pytest.raises(KeyboardInterrupt):
        with signals_held():
            os.kill(os.getpid(), signal.SIGINT)
            done.append("the rest of the swap")
    assert done == ["the rest of the swap"]


def test_a_submission_replaces_the_whole_set_of_an_earlier_one(demo, tmp_path, monkeypatch, capsys):
    """An ensemble run with a skipped image, then one checkpoint on readable images: no _std or
    _skipped file of the first run stays beside the second's submission."""
    processed = tmp_path / "processed"
    shutil.copytree(demo["processed_dir"], processed, ignore=shutil.ignore_patterns("*_images.pt"))
    png = sorted((processed / "test").glob("*.png"))[0]
    png.write_bytes(png.read_bytes()[:300])
    out = tmp_path / "out"
    args = [f"--checkpoint={demo['checkpoint']}", f"--raw_dir={demo['missing']}", f"--out_dir={out}", "--amp=false",
            "--channels_last=false", *FAST]
    monkeypatch.setattr(sys, "argv", ["predict.py", *args, f"--processed_dir={processed}", "--tta"])
    predict_main()
    assert (out / "submission_std.csv").is_file() and (out / "submission_skipped.csv").is_file()
    capsys.readouterr()
    monkeypatch.setattr(sys, "argv", ["predict.py", *args, f"--processed_dir={demo['processed_dir']}"])
    predict_main()
    printed = capsys.readouterr().out
    name = "submission_skipped.csv"
    assert not (out / name).exists() and f"removed {out / name}: an earlier run's" in printed
    submission = pd.read_csv(out / "submission.csv")
    assert submission["GalaxyID"].tolist() == sorted(png_ids(demo["processed_dir"] / "test").tolist())
    # one checkpoint without TTA has a calibrated sigma too: the second run's, with a row for every galaxy
    assert pd.read_csv(out / "submission_std.csv")["GalaxyID"].tolist() == submission["GalaxyID"].tolist()
