"""A user's labelled set (galaxy/labelled.py, crop_cache.py, labelled_scores.py): both layouts read, every bad
case skipped or one line, the stratified split, the crop cache, the scores and the zero-shot baseline."""
import math
import os
from pathlib import Path

from PIL import Image
import numpy as np
import pandas as pd
import pytest
import torch

from config import build_config
from dataset import LABEL_COLUMNS
from galaxy import crop_cache
from galaxy.crop import crop_galaxy
from galaxy.files import DataError
from galaxy.labelled import (LabelledSet, class_weights, crop_labelled_set, labelled_split_for_run,
                             make_labelled_split, read_labelled_set, read_labelled_split, save_labelled_split)
from galaxy.labelled_scores import (classification_metrics, confusion_figure, confusion_matrix, regression_metrics,
                                    zero_shot_classes)

CLASSES_SAMPLE = Path(__file__).resolve().parents[2] / "shared/data/galaxy-classes-sample"
SAMPLE_COUNTS = {"cigar_smooth": 85, "edge_on": 523, "in_between_smooth": 1096, "round_smooth": 1190, "spiral": 1106}
ZERO_SHOT_NAMES = ["cigar_smooth", "edge_on", "in_between_smooth", "round_smooth", "spiral"]


def galaxy_image(path, seed, size=80):
    """A blob of light on a dark sky, different for every seed, saved in the format path's extension says."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:size, :size] - size / 2 + rng.normal(0, 3, 2)[:, None, None]
    width = rng.uniform(4, 12)
    light = 200 * np.exp(-(x ** 2 + y ** 2 / rng.uniform(1, 4)) / (2 * width ** 2)) + rng.normal(10, 3, (size, size))
    pixels = np.clip(np.stack([light, light * 0.9, light * 0.8], -1), 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def one_line(err):
    message = str(err.value)
    assert "\n" not in message
    return message


@pytest.fixture
def class_folders(tmp_path):
    """3 classes x 6 images of 80x80 in tmp_path/set/<class>/, with varied extensions."""
    root = tmp_path / "set"
    for c, name in enumerate(["elliptical", "edge", "spiral"]):
        (root / name).mkdir(parents=True)
        for i in range(6):
            extension = [".jpg", ".JPG", ".png", ".jpeg", ".tif", ".TIFF"][i]
            galaxy_image(root / name / f"{c}{i}{extension}", seed=10 * c + i)
    (root / "README.md").write_text("my galaxies\n")
    return root


def test_class_folders_read(class_folders):
    (class_folders / "spiral" / "notes.txt").write_text("not an image")
    (class_folders / "spiral" / "older").mkdir()
    (class_folders / "spiral" / ".hidden.jpg").write_bytes(b"")
    galaxy_image(class_folders / "loose.png", seed=99)
    labelled = read_labelled_set(class_folders)
    assert labelled.task == "classes" and labelled.class_names == ["edge", "elliptical", "spiral"]
    assert len(labelled) == 18 and labelled.ids == sorted(labelled.ids) and len(set(labelled.ids)) == 18
    assert labelled.ids[0] == "edge/10.jpg" and labelled.ids[1] == "edge/11.JPG"
    assert all(os.path.isabs(f) and os.path.isfile(f) for f in labelled.files)
    assert labelled.targets.dtype == np.int64 and np.bincount(labelled.targets).tolist() == [6, 6, 6]
    assert [labelled.class_names[t] for t in labelled.targets] == [i.split("/")[0] for i in labelled.ids]
    reasons = {Path(where).name: reason for where, reason in labelled.skipped}
    assert set(reasons) == {"notes.txt", "older", "loose.png"}   # hidden files and the README pass unlisted
    assert "not an image file" in reasons["notes.txt"] and "folder inside a class folder" in reasons["older"]
    assert "outside any class folder" in reasons["loose.png"]
    assert labelled.summary() == "18 images in 3 classes (edge 6, elliptical 6, spiral 6), 3 skipped"


def test_class_folders_bad_cases(class_folders, tmp_path):
    (class_folders / "edge" / "10.jpg").write_bytes(b"")   # empty: skipped without decoding anything
    (class_folders / "lonely").mkdir()
    galaxy_image(class_folders / "lonely" / "x.png", seed=5)
    (class_folders / "nothing").mkdir()
    os.symlink(class_folders / "spiral" / "20.jpg", class_folders / "elliptical" / "link.jpg")
    labelled = read_labelled_set(class_folders)
    assert labelled.class_names == ["edge", "elliptical", "spiral"] and len(labelled) == 17
    reasons = dict(labelled.skipped)
    assert reasons[str(class_folders / "edge" / "10.jpg")] == "empty file"
    assert "class 'lonely' has a single image" in reasons[str(class_folders / "lonely" / "x.png")]
    assert reasons[str(class_folders / "nothing")] == "class folder without images"
    # the same file in two class folders (a link) counts once, where it is first met
    assert reasons[str(class_folders / "spiral" / "20.jpg")].startswith(f"repeats {class_folders}/elliptical/link.jpg")

    one_class = tmp_path / "one"
    (one_class / "spiral").mkdir(parents=True)
    for i in range(3):
        galaxy_image(one_class / "spiral" / f"{i}.jpg", seed=i)
    with pytest.raises(DataError, match="needs at least 2 classes, found only 'spiral'") as err:
        read_labelled_set(one_class)
    one_line(err)
    (one_class / "edge").mkdir()
    galaxy_image(one_class / "edge" / "9.jpg", seed=9)   # a second class of one image leaves one class
    with pytest.raises(DataError, match="2 or more images each; edge have a single image"):
        read_labelled_set(one_class)
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(DataError, match="holds no usable labelled image") as err:
        read_labelled_set(tmp_path / "empty")
    assert str(tmp_path / "empty") in one_line(err)
    with pytest.raises(DataError, match="not found"):
        read_labelled_set(tmp_path / "nowhere")


def table_set(tmp_path, rows, name="labels.csv", images=6):
    """images/0.jpg ... images/<images-1>.jpg and a table of rows (dicts) beside them."""
    (tmp_path / "images").mkdir(exist_ok=True)
    for i in range(images):
        galaxy_image(tmp_path / "images" / f"{i}.jpg", seed=i)
    path = tmp_path / name
    table = pd.DataFrame(rows)
    table.to_csv(path, index=False) if name.endswith(".csv") else table.to_parquet(path)
    return path


def test_csv_with_text_labels(tmp_path):
    rows = [{"file": f"images/{i}.jpg", "label": "round" if i < 3 else "spiral"} for i in range(6)]
    rows += [{"file": "images/missing.jpg", "label": "round"},      # line 8
             {"file": "images/0.jpg", "label": "spiral"},           # line 9: the same file again
             {"file": "./images/1.jpg", "label": "round"},          # line 10: the same file, another name
             {"file": "images/5.jpg", "label": ""},                 # line 11
             {"file": "", "label": "round"}]                        # line 12
    (tmp_path / "images" / "empty.jpg").parent.mkdir()
    (tmp_path / "images" / "empty.jpg").write_bytes(b"")
    rows.append({"file": "images/empty.jpg", "label": "round"})    # line 13
    path = table_set(tmp_path, rows)
    labelled = read_labelled_set(path)
    assert labelled.task == "classes" and labelled.class_names == ["round", "spiral"]
    assert labelled.ids == [f"images/{i}.jpg" for i in range(6)] and labelled.targets.tolist() == [0, 0, 0, 1, 1, 1]
    assert labelled.files[0] == str(tmp_path / "images" / "0.jpg")
    skipped = dict(labelled.skipped)
    assert skipped[f"{path} line 8"].startswith("file not found: ")
    assert skipped[f"{path} line 9"] == f"repeats {path} line 2"
    assert skipped[f"{path} line 10"].startswith(f"repeats {path} line 3")
    assert skipped[f"{path} line 11"] == "no label in column label"
    assert skipped[f"{path} line 12"] == "no file"
    assert skipped[f"{path} line 13"].startswith("empty file: ")


def test_table_by_id_with_numbers_and_parquet(tmp_path):
    rows = [{"id": str(i), "redshift": 0.1 * i, "mass": 10 + i} for i in range(6)]
    rows += [{"id": "7", "redshift": 0.3, "mass": 11},            # no 7.<ext> in images/
             {"id": "2", "redshift": 0.3, "mass": 11},            # a repeated id
             {"id": "8", "redshift": float("nan"), "mass": 11},
             {"id": "9", "redshift": float("inf"), "mass": 11}]
    for name in ("labels.csv", "labels.parquet"):
        path = table_set(tmp_path, rows, name=name)
        galaxy_image(tmp_path / "images" / "8.png", seed=8)
        galaxy_image(tmp_path / "images" / "9.PNG", seed=9)
        labelled = read_labelled_set(path, images_dir="images")
        assert labelled.task == "numbers" and labelled.class_names == ["redshift", "mass"]
        assert labelled.ids == [str(i) for i in range(6)] and labelled.targets.dtype == np.float32
        assert labelled.targets.shape == (6, 2) and labelled.targets[3].tolist() == pytest.approx([0.3, 13])
        where = "line" if name.endswith(".csv") else "row"
        first = 2 if where == "line" else 1
        skipped = dict(labelled.skipped)
        assert skipped[f"{path} {where} {6 + first}"].startswith("no image named 7.jpg")
        assert skipped[f"{path} {where} {7 + first}"] == f"repeats {path} {where} {2 + first}"
        assert skipped[f"{path} {where} {8 + first}"] == "no value in column redshift"
        assert skipped[f"{path} {where} {9 + first}"] == "redshift is inf, not a finite number"
    only_mass = read_labelled_set(path, images_dir=str(tmp_path / "images"), label_columns="mass")
    assert only_mass.class_names == ["mass"] and only_mass.targets.shape == (8, 1)


def test_csv_text_in_a_number_column(tmp_path):
    rows = [{"file": f"images/{i}.jpg", "fraction": str(i / 10)} for i in range(5)]
    rows.append({"file": "images/5.jpg", "fraction": "lots"})
    labelled = read_labelled_set(table_set(tmp_path, rows))
    assert labelled.task == "numbers" and len(labelled) == 5
    assert labelled.skipped[0][1] == "fraction is 'lots', not a number"


def test_csv_errors(tmp_path):
    def error(rows, **options):
        with pytest.raises(DataError) as err:
            read_labelled_set(table_set(tmp_path, rows), **options)
        return one_line(err)

    files = [f"images/{i}.jpg" for i in range(6)]
    assert "has no usable label column (its columns: file, kind, notes)" in error(
        [{"file": f, "kind": "a", "notes": "b"} for f in files])
    assert "has no 'file' or 'id' column (its columns: path, label)" in error(
        [{"path": f, "label": "a"} for f in files])
    assert "needs at least 2 classes, found only 'spiral'" in error([{"file": f, "label": "spiral"} for f in files])
    assert "has no column klass (its columns: file, label)" in error([{"file": f, "label": "a"} for f in files],
                                                                     label_columns="klass")
    assert "mix text and numbers" in error([{"file": f, "kind": "a", "z": 1.0} for f in files],
                                           label_columns=["kind", "z"])
    assert "holds no usable labelled image; the first skipped" in error(
        [{"file": f"nowhere/{i}.jpg", "label": "ab"[i % 2]} for i in range(6)])
    assert "images_dir pictures is not a folder" in error([{"id": "1", "label": "a"}], images_dir="pictures")
    (tmp_path / "broken.csv").write_bytes(b"file,label\n\xff\xfe,\x00a\n")
    with pytest.raises(DataError, match="cannot read .*broken.csv") as err:
        read_labelled_set(tmp_path / "broken.csv")
    one_line(err)


def synthetic_set(counts, task="classes"):
    ids = [f"{c}/{i:03d}.jpg" for c, n in enumerate(counts) for i in range(n)]
    targets = np.repeat(np.arange(len(counts)), counts)
    if task == "numbers":
        targets = np.random.default_rng(0).normal(size=(len(ids), 2)).astype(np.float32)
    return LabelledSet(ids, ["/" + i for i in ids], task, [f"c{k}" for k in range(len(counts))], targets)


def test_stratified_split(tmp_path):
    labelled = synthetic_set([40, 10, 3, 2])
    split = make_labelled_split(labelled, seed=7, val_fraction=0.1, test_fraction=0.2)
    again = make_labelled_split(labelled, seed=7, val_fraction=0.1, test_fraction=0.2)
    other = make_labelled_split(labelled, seed=8, val_fraction=0.1, test_fraction=0.2)
    assert all(np.array_equal(split[name], again[name]) for name in split)
    assert not all(np.array_equal(split[name], other[name]) for name in split)
    everything = np.concatenate(list(split.values()))
    assert len(everything) == len(set(everything)) == len(labelled) and set(everything) == set(labelled.ids)
    class_of = dict(zip(labelled.ids, labelled.targets.tolist()))
    per_class = {name: np.bincount([class_of[i] for i in split[name]], minlength=4).tolist() for name in split}
    assert per_class == {"train": [28, 7, 1, 2], "val": [4, 1, 1, 0], "test": [8, 2, 1, 0]}

    numbers = make_labelled_split(synthetic_set([20], "numbers"), seed=7, val_fraction=0.1, test_fraction=0.2)
    assert [len(numbers[name]) for name in ("train", "val", "test")] == [14, 2, 4]

    path = tmp_path / "split.csv"
    odd = LabelledSet(["a,b.jpg", "ü/x\ny.jpg", "c.jpg", "d.jpg"], [""] * 4, "classes", ["p", "q"],
                      np.array([0, 0, 1, 1]))
    save_labelled_split(make_labelled_split(odd, 1, 0.0, 0.5), path)
    back = read_labelled_split(path)
    assert sorted(np.concatenate(list(back.values())).tolist()) == sorted(odd.ids)

    cfg = build_config({"out_dir": str(tmp_path / "run"), "split_seed": 3})
    made = labelled_split_for_run(cfg, labelled)
    reread = labelled_split_for_run(cfg, labelled)
    assert all(np.array_equal(made[name], reread[name]) for name in made)
    with pytest.raises(DataError, match="was made for other images"):
        labelled_split_for_run(cfg, synthetic_set([5, 5]))
    on_val = labelled_split_for_run(build_config({"out_dir": str(tmp_path / "final"), "train_on_val": True}),
                                    labelled)
    assert len(on_val["val"]) == 0 and len(on_val["train"]) == len(labelled) - len(on_val["test"])


def test_class_weights():
    weights = class_weights(synthetic_set([30, 10]))
    assert weights.tolist() == pytest.approx([40 / 60, 40 / 20])


def crop_config(tmp_path, **changes):
    return build_config({"image_size": 32, "workers": 1, "crop": "center", "out_dir": str(tmp_path / "run"),
                         **changes})


def test_crop_and_cache(class_folders, tmp_path, monkeypatch):
    (class_folders / "edge" / "11.JPG").write_bytes(b"this is no JPEG")   # unreadable: left to the crop stage
    labelled = read_labelled_set(class_folders)
    assert len(labelled) == 18
    cfg, cache = crop_config(tmp_path), tmp_path / "run" / "labelled_cache"
    kept, images = crop_labelled_set(labelled, cfg, cache, progress=False)
    assert images.dtype == torch.uint8 and tuple(images.shape) == (17, 3, 32, 32)
    assert len(kept) == 17 and "edge/11.JPG" not in kept.ids and kept.class_names == labelled.class_names
    assert dict(kept.skipped)[str(class_folders / "edge" / "11.JPG")].startswith("not an image")
    row = kept.ids.index("spiral/24.tif")
    expected = np.asarray(crop_galaxy(kept.files[row], cfg)[0]).transpose(2, 0, 1)
    assert np.array_equal(images[row].numpy(), expected)
    assert sorted(os.listdir(cache)) == ["images.npy", "key.json"]

    def no_crop(*args):
        raise AssertionError("cropped again although nothing changed")
    monkeypatch.setattr(crop_cache, "crop_all", no_crop)
    again, cached = crop_labelled_set(labelled, cfg, cache, progress=False)
    assert again.ids == kept.ids and np.array_equal(cached.numpy(), images.numpy())
    monkeypatch.undo()

    galaxy_image(class_folders / "spiral" / "24.tif", seed=1234)   # rewritten: a new crop
    _, new_images = crop_labelled_set(labelled, cfg, cache, progress=False)
    assert not np.array_equal(new_images[row].numpy(), images[row].numpy())
    _, big_images = crop_labelled_set(labelled, crop_config(tmp_path, image_size=40), cache, progress=False)
    assert tuple(big_images.shape) == (17, 3, 40, 40)


def test_crop_drops_a_class_left_with_one_image(class_folders, tmp_path):
    for i in range(1, 6):
        (class_folders / "edge" / f"1{i}{['.JPG', '.png', '.jpeg', '.tif', '.TIFF'][i - 1]}").write_bytes(b"junk")
    kept, images = crop_labelled_set(read_labelled_set(class_folders), crop_config(tmp_path), tmp_path / "c",
                                     progress=False)
    assert kept.class_names == ["elliptical", "spiral"] and len(kept) == 12 == len(images)
    assert kept.targets.tolist() == [0] * 6 + [1] * 6
    assert "class 'edge' has a single image" in dict(kept.skipped)[str(class_folders / "edge" / "10.jpg")]
    row = kept.ids.index("spiral/20.jpg")
    expected = np.asarray(crop_galaxy(kept.files[row], crop_config(tmp_path))[0]).transpose(2, 0, 1)
    assert np.array_equal(images[row].numpy(), expected)


def test_classification_metrics_by_hand():
    true, predicted = [0, 0, 0, 1, 1, 2], [0, 0, 1, 1, 2, 2]
    assert confusion_matrix(true, predicted, 3).tolist() == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    scores = classification_metrics(true, predicted, ["a", "b", "c"])
    assert scores["accuracy"] == pytest.approx(4 / 6)
    assert scores["balanced_accuracy"] == pytest.approx((2 / 3 + 1 / 2 + 1) / 3)
    table = scores["per_class"]
    assert table["precision"].tolist() == pytest.approx([1, 1 / 2, 1 / 2])
    assert table["recall"].tolist() == pytest.approx([2 / 3, 1 / 2, 1])
    assert table["f1"].tolist() == pytest.approx([0.8, 0.5, 2 / 3])
    assert table["support"].tolist() == [3, 2, 1] and table["class"].tolist() == ["a", "b", "c"]
    absent = classification_metrics([0, 0, 1], [0, 2, 1], ["a", "b", "c"])["per_class"]
    assert absent["precision"].tolist() == [1, 1, 0] and math.isnan(absent["recall"][2])
    assert classification_metrics([0, 0, 1], [0, 2, 1], ["a", "b", "c"])["balanced_accuracy"] == pytest.approx(0.75)


def test_regression_metrics_by_hand():
    true = np.array([[1.0, 5.0], [2.0, 5.0], [3.0, 5.0]])
    predicted = np.array([[1.0, 4.0], [2.0, 5.0], [4.0, 6.0]])
    table = regression_metrics(true, predicted, ["x", "y"])
    assert table["rmse"].tolist() == pytest.approx([math.sqrt(1 / 3), math.sqrt(2 / 3)])
    assert table["r2"][0] == pytest.approx(1 - 1 / 2) and math.isnan(table["r2"][1])


def test_confusion_figure(tmp_path):
    confusion = confusion_matrix([0, 0, 0, 1, 1, 2], [0, 0, 1, 1, 2, 2], 3)
    figure = confusion_figure(confusion, ["round_smooth", "cigar_smooth", "spiral"], title="val")
    texts = [text.get_text() for text in figure.axes[0].texts]
    assert texts[:3] == ["2\n67%", "1\n33%", "0\n0%"] and len(texts) == 9
    assert [label.get_text() for label in figure.axes[0].get_yticklabels()][0] == "round_smooth (3)"
    figure.savefig(tmp_path / "confusion.png")
    with Image.open(tmp_path / "confusion.png") as image:
        assert image.format == "PNG" and image.width > 300


def votes(**columns):
    row = np.zeros(len(LABEL_COLUMNS))
    for name, value in columns.items():
        row[LABEL_COLUMNS.index(name.replace("_", "."))] = value
    return row


def test_zero_shot_classes():
    smooth_round = votes(Class1_1=0.8, Class1_2=0.2, Class7_1=0.6, Class7_2=0.15, Class7_3=0.05,
                         Class2_1=0.05, Class2_2=0.15, Class4_1=0.1, Class4_2=0.05)
    spiral = votes(Class1_1=0.1, Class1_2=0.9, Class7_1=0.05, Class7_2=0.05, Class2_1=0.1, Class2_2=0.8,
                   Class4_1=0.7, Class4_2=0.1)
    probabilities, predicted = zero_shot_classes(np.stack([smooth_round, spiral, np.zeros(37)]), ZERO_SHOT_NAMES)
    assert probabilities[0] == pytest.approx(np.array([0.05, 0.05, 0.15, 0.6, 0.1]) / 0.95)
    assert probabilities[1] == pytest.approx(np.array([0.0, 0.1, 0.05, 0.05, 0.7]) / 0.9)
    assert probabilities[2] == pytest.approx([0.2] * 5)
    assert [ZERO_SHOT_NAMES[k] for k in predicted[:2]] == ["round_smooth", "spiral"]
    reordered, _ = zero_shot_classes(spiral, ["spiral", "edge_on", "round_smooth", "in_between_smooth",
                                              "cigar_smooth"])
    assert reordered[0, 0] == pytest.approx(0.7 / 0.9)
    with pytest.raises(ValueError, match="knows only the classes"):
        zero_shot_classes(spiral, ["elliptical", "spiral"])
    with pytest.raises(ValueError, match="must be"):
        zero_shot_classes(np.zeros(5), ZERO_SHOT_NAMES)


@pytest.mark.skipif(not CLASSES_SAMPLE.is_dir(),
                    reason=f"the real 5-class sample is not at {CLASSES_SAMPLE} (clone the shared repo beside main)")
def test_real_class_folders():
    labelled = read_labelled_set(CLASSES_SAMPLE)
    assert labelled.class_names == sorted(SAMPLE_COUNTS) == ZERO_SHOT_NAMES
    assert dict(zip(labelled.class_names, np.bincount(labelled.targets).tolist())) == SAMPLE_COUNTS
    assert labelled.skipped == []
    split = make_labelled_split(labelled, seed=1337, val_fraction=0.1, test_fraction=0.1)
    cigar = labelled.class_names.index("cigar_smooth")
    class_of = dict(zip(labelled.ids, labelled.targets.tolist()))
    assert [sum(class_of[i] == cigar for i in split[name]) for name in ("train", "val", "test")] == [69, 8, 8]
