"""Tests of demo.py: the synthetic galaxies' labels, reuse, refusal and determinism."""
import zipfile

import numpy as np
import pandas as pd
import pytest

from dataset import LABEL_COLUMNS, QUESTIONS
from galaxy import demo


def test_demo_labels_obey_the_decision_tree(demo_raw):
    with zipfile.ZipFile(demo_raw / "training_solutions_rev1.zip") as archive:
        labels = pd.read_csv(archive.open("training_solutions_rev1.csv"))
    assert len(labels) == 96 and labels.GalaxyID.is_unique
    values = labels[LABEL_COLUMNS]
    assert ((values >= 0) & (values <= 1)).all().all()
    for question in QUESTIONS:
        parent = labels[question.parent] if question.parent else 1.0
        np.testing.assert_allclose(values[question.columns].sum(axis=1), parent, atol=1e-9)
    # the labels follow what was drawn, so they vary: smooth vs featured, round vs cigar
    assert labels["Class1.1"].std() > 0.2 and labels["Class7.1"].max() > 0.3 and labels["Class2.1"].max() > 0.3


def test_make_demo_reuses_its_set_and_refuses_other_folders(demo_raw, tmp_path):
    stamp = (demo_raw / "images_training_rev1.zip").stat().st_mtime_ns
    demo.make_demo(demo_raw, 96, 16, 1337, progress=False)
    assert (demo_raw / "images_training_rev1.zip").stat().st_mtime_ns == stamp
    (tmp_path / "mine.txt").write_text("precious")
    with pytest.raises(SystemExit, match="refusing"):
        demo.make_demo(tmp_path, 4, 1, 0, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.txt"]


def test_make_demo_is_deterministic(tmp_path):
    for name in ("a", "b"):
        demo.make_demo(tmp_path / name, 3, 1, 7, progress=False)
    for name in ("images_training_rev1.zip", "images_test_rev1.zip"):
        with zipfile.ZipFile(tmp_path / "a" / name) as a, zipfile.ZipFile(tmp_path / "b" / name) as b:
            assert [(i.filename, i.CRC) for i in a.infolist()] == [(i.filename, i.CRC) for i in b.infolist()]
