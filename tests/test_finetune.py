"""Training on a user's own labels (train.py --labels, galaxy/tasks.py, galaxy/task_eval.py): both layouts,
classes and numbers, fine-tuned from a Galaxy Zoo checkpoint and from scratch, what --freeze, lr_pretrained
and balance do, exact --resume, an ensemble, the score files, predict.py and plot_image.py on the result,
and one-line errors for bad sets."""
import os
import shutil

from PIL import Image
import numpy as np
import pandas as pd
import pytest
import torch

from benchmarks.finetune import draw_subset
from config import Config, build_config
from galaxy.checkpoints import CheckpointError, load_backbone, model_from_checkpoint, read_checkpoint
from galaxy.labelled import LabelledSet
from galaxy.tasks import Task, pretrained_parameters
from galaxy.training import balanced_order, make_optimizer
from helpers import SMALL, one_line_error, run_script, run_train, same_weights, save_checkpoint, weights
from model import build_model

ARGS = SMALL + ["--batch_size=8"]   # 30 training images: 3 steps an epoch
CLASSES = ("cigar", "ring", "round")


def shape_image(kind, seed, size=96):
    """A galaxy-like shape on a noisy sky: an elongated blob, a ring or a round blob."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:size, :size] - size / 2 + rng.normal(0, 1.5, 2)[:, None, None]
    if kind == "cigar":
        light = np.exp(-(x ** 2 / (2 * 12 ** 2) + y ** 2 / (2 * 3 ** 2)))
    elif kind == "ring":
        light = np.exp(-(np.sqrt(x ** 2 + y ** 2) - 10) ** 2 / (2 * 2.5 ** 2))
    else:
        light = np.exp(-(x ** 2 + y ** 2) / (2 * 7 ** 2))
    light = 220 * rng.uniform(0.7, 1.0) * light + rng.normal(10, 4, (size, size))
    return Image.fromarray(np.clip(np.stack([light, 0.9 * light, 0.8 * light], -1), 0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """folder/<class>/*.png (3 x 12), a CSV of text labels and a CSV of two numbers over the same images,
    the numbers again by id (flat/<id>.png, a text column beside them), and a Galaxy Zoo checkpoint
    (image_size 32, center crop) to start from."""
    root = tmp_path_factory.mktemp("labels")
    rows = []
    (root / "flat").mkdir()
    for c, kind in enumerate(CLASSES):
        (root / "folder" / kind).mkdir(parents=True)
        for i in range(12):
            path = root / "folder" / kind / f"{kind}{i:02d}.png"
            shape_image(kind, 100 * c + i).save(path)
            shutil.copyfile(path, root / "flat" / f"{100 * c + i}.png")
            rows.append({"file": f"folder/{kind}/{path.name}", "id": str(100 * c + i), "label": kind,
                         "size": 3.0 * c + i / 12, "brightness": 100 + 10 * c, "notes": "seen"})
    table = pd.DataFrame(rows)
    table[["file", "label"]].to_csv(root / "classes.csv", index=False)
    table[["file", "size", "brightness"]].to_csv(root / "numbers.csv", index=False)
    table[["id", "notes", "size", "brightness"]].to_csv(root / "numbers_by_id.csv", index=False)
    init = save_checkpoint(root / "gz.pt", Config(image_size=32), seed=3)
    return root, init


def train(*args, check=True):
    return run_train(*ARGS, *map(str, args), check=check)


def error_line(result):
    """The one error line of a run that failed, the progress bars of its crops left aside."""
    lines = [line for line in result.stderr.splitlines() if line.strip() and "img/s" not in line]
    assert result.returncode != 0 and len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


@pytest.fixture(scope="module")
def tuned(data, tmp_path_factory):
    """A fine-tuned classes run (conv blocks frozen) on the folder layout, 2 epochs, with one unreadable image."""
    root, init = data
    folder = tmp_path_factory.mktemp("bad") / "folder"
    shutil.copytree(root / "folder", folder)
    (folder / "ring" / "broken.jpg").write_bytes(b"no jpeg")
    out = tmp_path_factory.mktemp("tuned")
    result = train(f"--labels={folder}", f"--init_from={init}", "--freeze=features", f"--out_dir={out}", "--epochs=2")
    return folder, out, result


def test_fine_tuned_classes_run(tuned, data):
    folder, out, result = tuned
    init = weights(data[1])
    checkpoint = read_checkpoint(out / "best.pt")
    assert checkpoint["task"] == {"kind": "classes", "names": list(CLASSES)}
    assert checkpoint["config"]["image_size"] == 32   # taken from --init_from's config
    trained = checkpoint["model"]
    assert trained["classifier.6.weight"].shape == (3, 2048)
    # freeze=features: the conv blocks, BatchNorm statistics included, are the Galaxy Zoo ones; the rest trained
    assert all(torch.equal(trained[name], init[name]) for name in init if name.startswith("features."))
    assert not torch.equal(trained["classifier.0.weight"], init["classifier.0.weight"])
    skipped = pd.read_csv(out / "labels_skipped.csv")
    assert skipped["where"].tolist() == [str(folder / "ring" / "broken.jpg")] and "labels_skipped.csv" in result.stdout
    split = pd.read_csv(out / "split.csv")
    assert split["split"].value_counts().to_dict() == {"train": 30, "val": 3, "test": 3}
    assert sorted(split[split["split"] == "test"]["id"].str.split("/").str[0]) == list(CLASSES)   # stratified
    metrics = pd.read_csv(out / "metrics.csv")
    assert list(metrics.columns[:5]) == ["epoch", "train_loss", "val_loss", "val_accuracy", "val_balanced_accuracy"]
    assert len(metrics) == 2 and metrics["val_balanced_accuracy"].between(0, 1).all()
    scores = dict(pd.read_csv(out / "eval_test.csv").values)
    assert set(scores) == {"accuracy", "balanced_accuracy", "images"} and scores["images"] == 3
    per_class = pd.read_csv(out / "eval_test_classes.csv")
    assert per_class["class"].tolist() == list(CLASSES)
    assert list(per_class.columns[1:4]) == ["precision", "recall", "f1"]
    for name in ("confusion_test.png", "loss.png"):
        with Image.open(out / name) as image:
            assert image.format == "PNG"
    assert "test accuracy" in result.stdout and "val balanced accuracy" in result.stdout


def test_freeze_hidden_trains_the_head_alone(data, tmp_path):
    root, init = data
    train(f"--labels={root / 'classes.csv'}", f"--init_from={init}", "--freeze=hidden", f"--out_dir={tmp_path}",
          "--epochs=1")
    before, after = weights(init), weights(tmp_path / "last.pt")
    assert all(torch.equal(after[name], before[name]) for name in before if not name.startswith("classifier.6."))
    optimizer = torch.load(tmp_path / "last.pt", weights_only=True)["optimizer"]
    assert [len(group["params"]) for group in optimizer["param_groups"]] == [2]   # the head's weight and bias


def test_scratch_classes_from_a_csv_and_exact_resume(data, tmp_path):
    """--labels=<csv> without --init_from: the same network from scratch; balance=sampler; a run stopped
    mid-epoch and resumed ends with exactly the weights of one that never stopped."""
    root = data[0]
    common = [f"--labels={root / 'classes.csv'}", "--balance=sampler", "--epochs=2"]
    train(*common, f"--out_dir={tmp_path / 'whole'}")
    stopped = train(*common, f"--out_dir={tmp_path / 'parts'}", "--max_steps=4")
    assert "stopped by max_steps=4" in stopped.stdout
    train(f"--out_dir={tmp_path / 'parts'}", "--resume")
    whole, parts = weights(tmp_path / "whole" / "last.pt"), weights(tmp_path / "parts" / "last.pt")
    assert same_weights(whole, parts)
    assert read_checkpoint(tmp_path / "whole" / "best.pt")["task"]["names"] == list(CLASSES)
    timed = ["seconds", "img_per_s"]
    metrics = [pd.read_csv(tmp_path / run / "metrics.csv").drop(columns=timed) for run in ("whole", "parts")]
    assert metrics[0].equals(metrics[1])


@pytest.mark.parametrize("init", [True, False], ids=["fine_tuned", "scratch"])
def test_numbers_from_a_csv(data, tmp_path, init):
    root, checkpoint = data
    table = [f"--labels={root / 'numbers.csv'}"] if init else [   # by id: images_dir and label_columns
        f"--labels={root / 'numbers_by_id.csv'}", "--images_dir=flat", "--label_columns=size,brightness"]
    train(*table, f"--out_dir={tmp_path}", "--epochs=1",
          *([f"--init_from={checkpoint}", "--init_layers=features"] if init else []))
    best = read_checkpoint(tmp_path / "best.pt")
    task = best["task"]
    assert task["kind"] == "numbers" and task["names"] == ["size", "brightness"]
    assert 100 <= task["mean"][1] <= 120 and 5 < task["std"][1] < 10 and len(task["mean"]) == len(task["std"]) == 2
    table = pd.read_csv(tmp_path / "eval_test.csv")
    assert table["column"].tolist() == ["size", "brightness"] and {"rmse", "r2"} <= set(table.columns)
    assert list(pd.read_csv(tmp_path / "metrics.csv").columns[:5]) == ["epoch", "train_loss", "train_rmse", "val_rmse",
                                                                       "val_r2"]
    if init:   # init_layers=features: the conv blocks loaded, the hidden layers new
        before = weights(checkpoint)
        assert not torch.equal(best["model"]["classifier.0.weight"], before["classifier.0.weight"])
    result = run_script("predict.py", f"--checkpoint={tmp_path / 'best.pt'}", f"--images={root / 'folder' / 'ring'}",
                        f"--out_dir={tmp_path / 'predicted'}", "--workers=1", "--amp=false", "--channels_last=false")
    assert result.returncode == 0, result.stderr
    predictions = pd.read_csv(tmp_path / "predicted" / "predictions.csv")
    assert list(predictions.columns) == ["file", "size", "brightness"] and len(predictions) == 12
    assert predictions["brightness"].between(0, 300).all()   # in the targets' own units


def test_predict_and_plot_on_the_fine_tuned_network(tuned, tmp_path):
    folder, run, _ = tuned
    common = [f"--checkpoint={run / 'best.pt'}", "--workers=1", "--amp=false", "--channels_last=false"]
    result = run_script("predict.py", *common, f"--images={folder / 'ring'}", "--tta", "--embed",
                        f"--out_dir={tmp_path}")
    assert result.returncode == 0, result.stderr
    predictions = pd.read_csv(tmp_path / "predictions.csv")
    assert list(predictions.columns) == ["file", *CLASSES, "label"] and len(predictions) == 12
    assert np.allclose(predictions[list(CLASSES)].sum(axis=1), 1, atol=1e-4)
    assert set(predictions["label"]) <= set(CLASSES)
    assert pd.read_csv(tmp_path / "predictions_skipped.csv")["file"].tolist() == [str(folder / "ring" / "broken.jpg")]
    spread = pd.read_csv(next(tmp_path.glob("predictions_s[tp]*.csv")))   # the spread over the 8 views
    assert list(spread.columns) == ["file", *CLASSES]
    assert np.load(tmp_path / "embeddings.npy").shape == (12, 2048)

    evaluated = run_script("predict.py", *common, "--split=test", f"--out_dir={tmp_path / 'eval'}")   # no --labels
    assert evaluated.returncode == 0, evaluated.stderr
    assert {"eval_test.csv", "eval_test_classes.csv", "confusion_test.png", "predictions_test.csv"} <= set(
        os.listdir(tmp_path / "eval"))
    assert dict(pd.read_csv(tmp_path / "eval" / "eval_test.csv").values) == dict(
        pd.read_csv(run / "eval_test.csv").values)   # as train.py scored best.pt
    assert "--split=kaggle is Galaxy Zoo's test set" in one_line_error(
        run_script("predict.py", *common, f"--out_dir={tmp_path / 'kaggle'}"))

    image = folder / "ring" / "ring03.png"
    plotted = run_script("plot_image.py", str(image), *common, f"--out_dir={tmp_path / 'plot'}", "--similar=2",
                         f"--embeddings={tmp_path}")
    assert plotted.returncode == 0, plotted.stderr
    with Image.open(tmp_path / "plot" / "galaxy_ring03.png") as figure:
        assert figure.format == "PNG" and figure.width > 1000


def test_members(data, tmp_path):
    root, init = data
    train(f"--labels={root / 'classes.csv'}", f"--init_from={init}", "--members=2", f"--out_dir={tmp_path}",
          "--epochs=1")
    firsts = [read_checkpoint(tmp_path / f"member_{k}" / "best.pt") for k in (1, 2)]
    assert [c["config"]["seed"] for c in firsts] == [1337, 1338] and all(c["task"]["kind"] == "classes" for c in firsts)
    result = run_script("predict.py", f"--checkpoint={tmp_path}", "--split=test", f"--out_dir={tmp_path / 'eval'}",
                        "--workers=1", "--amp=false", "--channels_last=false")
    assert result.returncode == 0, result.stderr
    members = pd.read_csv(tmp_path / "eval" / "eval_test_members.csv")
    assert len(members) == 2 and {"accuracy", "balanced_accuracy"} <= set(members.columns)


def test_bad_sets_and_settings_are_one_line_errors(data, tmp_path):
    root, init = data
    (tmp_path / "one" / "spiral").mkdir(parents=True)
    for i in range(3):
        shape_image("ring", i).save(tmp_path / "one" / "spiral" / f"{i}.png")
    (tmp_path / "nolabel.csv").write_text("file,kind,notes\nfolder/ring/ring00.png,a,b\n")
    cases = {
        f"--labels={tmp_path / 'nowhere'}": "not found",
        f"--labels={tmp_path / 'one'}": "needs at least 2 classes",
        f"--labels={tmp_path / 'nolabel.csv'}": "has no usable label column",
        f"--labels={root / 'folder'} --freeze=features": "--freeze=features needs --labels and --init_from",
        f"--labels={root / 'folder'} --init_from={init} --image_size=48": "pass the image_size it was trained with",
        f"--labels={root / 'folder'} --batch_size=64": "only 30 training images",
    }
    for k, (args, message) in enumerate(cases.items()):
        result = train(*args.split(), f"--out_dir={tmp_path / f'run{k}'}", check=False)
        assert message in error_line(result), args


# --- the pieces, in this process ---------------------------------------------------------------------

def test_lr_pretrained_gives_two_parameter_groups():
    cfg = build_config({"labels": "x", "init_from": "gz.pt", "lr": 1e-3, "lr_pretrained": 0.1})
    model = build_model(cfg, {"kind": "classes", "names": ["a", "b"]})
    optimizer, _ = make_optimizer(model, cfg, 10, pretrained=pretrained_parameters(model, cfg))
    groups = optimizer.param_groups
    assert len(groups) == 2 and [len(group["params"]) for group in groups] == [2, 4 + 4 * 4]
    assert groups[0]["max_lr"] == pytest.approx(1e-3) and groups[1]["max_lr"] == pytest.approx(1e-4)
    scratch = build_model(cfg, {"kind": "classes", "names": ["a", "b"]})
    assert len(make_optimizer(scratch, build_config({"labels": "x"}), 10)[0].param_groups) == 1


def test_frozen_batchnorm_stays_in_eval_mode():
    model = build_model(Config(), {"kind": "classes", "names": ["a", "b", "c"]}).freeze("features")
    model.train()
    assert not any(module.training for module in model.features.modules())
    assert model.classifier[1].training and not any(p.requires_grad for p in model.features.parameters())
    model.eval().train()
    assert not model.features[0][1].training


def test_balanced_sampler():
    classes = torch.tensor([0] * 90 + [1] * 8 + [2] * 2)
    order = balanced_order(classes, seed=5, epoch=0, rank=0, world_size=1)
    assert len(order) == 100 and torch.equal(order, balanced_order(classes, 5, 0, 0, 1))
    assert not torch.equal(order, balanced_order(classes, 5, 1, 0, 1))
    counts = torch.bincount(classes[order], minlength=3)
    assert counts.min() >= 20 and counts.max() <= 48   # about a third each, where 90 % is class 0
    task = Task("classes", ["a", "b", "c"], classes, sampler=True)
    assert torch.equal(task.batch_order(100, 5, 0, 0, 1), order)


def test_bench_draws_each_class_in_proportion():
    counts = [60, 30, 6, 4]
    ids = [f"{k}/{i:02d}.jpg" for k, n in enumerate(counts) for i in range(n)]
    labelled = LabelledSet(ids, ids, "classes", list("abcd"), np.repeat(np.arange(4), counts))
    drawn = draw_subset(labelled, np.array(ids), 20, seed=1)
    assert [sum(i.startswith(f"{k}/") for i in drawn) for k in range(4)] == [12, 6, 1, 1]
    assert np.array_equal(drawn, draw_subset(labelled, np.array(ids), 20, seed=1))
    assert not np.array_equal(drawn, draw_subset(labelled, np.array(ids), 20, seed=2))
    assert len(draw_subset(labelled, np.array(ids), "all", seed=1)) == 100


def test_checkpoints_with_and_without_a_task(tmp_path):
    galaxy_zoo = save_checkpoint(tmp_path / "gz.pt", Config())
    model, _ = model_from_checkpoint(read_checkpoint(galaxy_zoo), galaxy_zoo)
    assert model.task is None and model.classifier[-1].out_features == 37   # an old checkpoint: Galaxy Zoo's
    numbers = {"kind": "numbers", "names": ["z"], "mean": [2.0], "std": [0.5]}
    torch.manual_seed(0)
    task_model = build_model(Config(), numbers)
    torch.save({"model": task_model.state_dict(), "config": Config().to_dict(), "task": numbers}, tmp_path / "n.pt")
    loaded, _ = model_from_checkpoint(read_checkpoint(tmp_path / "n.pt"), tmp_path / "n.pt")
    images = torch.rand(2, 3, 64, 64)
    assert torch.allclose(loaded.forward_with_features(images)[0], loaded(images) * 0.5 + 2.0)
    torch.save({"model": task_model.state_dict(), "config": Config().to_dict(), "task": {"kind": "numbers"}},
               tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match="unusable task record"):
        model_from_checkpoint(read_checkpoint(tmp_path / "bad.pt"), tmp_path / "bad.pt")
    small = build_model(Config(image_size=48), {"kind": "classes", "names": ["a", "b"]})
    with pytest.raises(CheckpointError, match="init_layers=features") as err:
        load_backbone(small, read_checkpoint(galaxy_zoo)["model"], galaxy_zoo, "hidden")
    assert "\n" not in str(err.value)
    state = read_checkpoint(galaxy_zoo)["model"]
    assert len(load_backbone(small, state, galaxy_zoo, "features")) == 4 * 7   # conv, BatchNorm: 7 tensors a block
    assert torch.equal(small.state_dict()["features.3.0.weight"], state["features.3.0.weight"])
