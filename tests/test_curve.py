"""bench.py curve: the table of galaxies (subsets/learning_curve.csv), the points, a tiny curve end to end
on the demo set (resumable), and the power-law fit with its bootstrap interval."""
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from benchmarks import curve
from benchmarks.curve import (MIXED_SIZES, SAMPLE_SIZES, TABLE, Point, build_table, link_shared_raw, plan,
                              point_name, point_split, read_table, regenerate_table, run_curve, table_text)
from benchmarks.curve_fit import KAGGLE_N, bootstrap_fits, fit_curve, fit_power_law, interval, power_law
from conftest import SHARED_SAMPLE
from config import build_config

SHARED_MORE = SHARED_SAMPLE.parent / "galaxy-zoo-more"
TRUE = (0.08, 1.5, 0.45)   # a, b, c of the synthetic curves
SIZES = np.array([375, 750, 1500, 3000, 4800, 5100])


# --- the table ------------------------------------------------------------------------------------

def test_shipped_table_has_fixed_test_and_val_from_the_sample_and_a_nested_training_order():
    table = read_table(TABLE)
    roles = table.groupby("role")["source"].agg(lambda s: set(s)).to_dict()
    assert table.groupby("role").size().to_dict() == {"test": 450, "val": 450, "train": 5100}
    assert roles == {"test": {"sample"}, "val": {"sample"}, "train": {"sample", "more"}}
    assert table["GalaxyID"].is_unique   # test, val and train are disjoint
    train = table[table["role"] == "train"]
    assert sorted(train["order"].tolist()) == list(range(1, 5101))
    assert table.loc[table["role"] != "train", "order"].isna().all()
    assert (train["source"] == "sample").sum() == 2100
    held_out = set(table.loc[table["role"] != "train", "GalaxyID"])
    for name, sizes in (("mixed", MIXED_SIZES), ("sample_only", SAMPLE_SIZES)):
        previous = []
        for n in sizes:
            split = point_split(table, Point(name, n, 1337))
            assert len(split["train"]) == n and list(split["train"][:len(previous)]) == previous   # nested
            assert not set(split["train"]) & held_out
            assert len(split["val"]) == len(split["test"]) == 450
            previous = list(split["train"])
    sample_only = point_split(table, Point("sample_only", 2100, 1))["train"]
    assert set(table.set_index("GalaxyID").loc[sample_only, "source"]) == {"sample"}
    with pytest.raises(ValueError, match="2100"):
        point_split(table, Point("sample_only", 3000, 1))


def test_shipped_table_is_the_regeneration_from_the_id_lists():
    assert table_text(regenerate_table()) == Path(TABLE).read_text()


@pytest.mark.skipif(not (SHARED_MORE / "training_solutions_rev1.csv").is_file()
                    or not (SHARED_SAMPLE / "training_solutions_rev1.csv").is_file(),
                    reason=f"the real galaxy-zoo-sample and galaxy-zoo-more are not beside the repository "
                           f"({SHARED_MORE.parent})")
def test_the_id_lists_are_the_shared_sets():
    table = read_table(TABLE)
    for folder, source in ((SHARED_SAMPLE, "sample"), (SHARED_MORE, "more")):
        ids = set(pd.read_csv(folder / "training_solutions_rev1.csv")["GalaxyID"])
        assert ids == set(table.loc[table["source"] == source, "GalaxyID"])


def test_build_table_is_deterministic_and_refuses_overlapping_lists(monkeypatch):
    monkeypatch.setattr(curve, "N_TEST", 5)
    monkeypatch.setattr(curve, "N_VAL", 5)
    sample, more = range(100, 130), range(500, 520)
    first = build_table(sample, more)
    assert table_text(first) == table_text(build_table(list(sample)[::-1], more))
    assert table_text(first) != table_text(build_table(sample, more, seed=1))
    assert first.groupby(["role", "source"]).size().to_dict() == {
        ("test", "sample"): 5, ("val", "sample"): 5, ("train", "sample"): 20, ("train", "more"): 20}
    with pytest.raises(ValueError, match="both lists"):
        build_table(sample, range(125, 140))


def test_plan_has_two_seeds_up_to_1500_galaxies_and_the_best_recipe_last():
    points = plan()
    names = [point_name(point) for point in points]
    assert len(names) == len(set(names)) == 19
    for point in points:
        seeds = {p.seed for p in points if (p.curve, p.n_train) == (point.curve, point.n_train)}
        assert seeds == ({1337, 1} if point.n_train <= 1500 and point.curve != "best_recipe" else {1337})
    assert [(p.curve, p.n_train) for p in points[-3:]] == [("best_recipe", n) for n in (750, 3000, 5100)]
    assert points[0] == Point("mixed", 375, 1337)


def test_link_shared_raw_joins_both_sets_as_one_raw_dir(tmp_path):
    sources = []
    for name, ids in (("a", [1, 2]), ("b", [3])):
        folder = tmp_path / name
        (folder / "images_training_rev1").mkdir(parents=True)
        for gid in ids:
            (folder / "images_training_rev1" / f"{gid}.jpg").write_bytes(b"jpeg")
        pd.DataFrame({"GalaxyID": ids, "Class1.1": [0.5] * len(ids)}).to_csv(
            folder / "training_solutions_rev1.csv", index=False)
        sources.append(folder)
    raw = link_shared_raw(tmp_path / "raw", sources)
    links = sorted((raw / "images_training_rev1").iterdir())
    assert [link.name for link in links] == ["1.jpg", "2.jpg", "3.jpg"] and all(link.is_symlink() for link in links)
    assert (raw / "training_solutions_rev1.csv").read_text() == "GalaxyID,Class1.1\n1,0.5\n2,0.5\n3,0.5\n"
    link_shared_raw(tmp_path / "raw", sources)   # again: nothing changes, nothing fails
    with pytest.raises(SystemExit, match="error: .*--raw_dir"):
        link_shared_raw(tmp_path / "raw2", [tmp_path / "absent"])


# --- a tiny curve end to end ----------------------------------------------------------------------------

@pytest.fixture
def tiny_curve(demo_processed, tmp_path, monkeypatch):
    """The demo set as a curve: 8 test + 8 val of 64 "sample" galaxies, 48 + 32 to train on; both curves
    at 16 galaxies, the best recipe at 32, one seed. Returns (cfg, overrides) for run_curve."""
    ids = sorted(pd.read_csv(Path(demo_processed.processed_dir) / "labels.csv")["GalaxyID"])
    for name, value in {"N_TEST": 8, "N_VAL": 8, "MIXED_SIZES": (16,), "SAMPLE_SIZES": (16,),
                        "BEST_SIZES": (32,), "TWO_SEEDS_UP_TO": 0, "TABLE": tmp_path / "table.csv"}.items():
        monkeypatch.setattr(curve, name, value)
    (tmp_path / "table.csv").write_text(table_text(build_table(ids[:64], ids[64:])))
    overrides = {"raw_dir": str(demo_processed.raw_dir), "out_dir": str(tmp_path / "runs"), "batch_size": 16,
                 "threads": 1, "workers": 1, "amp": "false", "channels_last": "false", "epochs": 2, "max_steps": 2}
    return build_config(overrides), overrides


def test_tiny_curve_trains_scores_and_skips_what_is_done(tiny_curve, capsys):
    cfg, overrides = tiny_curve
    results = Path(cfg.out_dir) / "curve"
    run_curve(cfg, overrides)
    out = capsys.readouterr().out
    rows = pd.read_csv(results / "learning_curve.csv")
    assert rows["point"].tolist() == ["mixed_16_seed1337", "sample_only_16_seed1337", "best_recipe_32_seed1337"], out
    assert (rows["n_from_sample"] + rows["n_from_more"] == rows["n_train"]).all()
    assert rows.loc[rows["curve"] == "sample_only", "n_from_more"].tolist() == [0]
    assert rows["steps"].tolist() == [2, 2, 2]   # max_steps: 16 galaxies take 1 step an epoch, 32 take 2
    assert rows["epochs"].tolist() == [1, 1, 0]  # 32 stopped in its first epoch: scored from last.pt
    for column in ("val_rmse", "val_rmse_tta", "test_rmse", "test_rmse_tta", "mean_rmse"):
        assert rows[column].between(0, 1).all(), column
    assert "fit skipped: the mixed curve has points at 1 sizes" in out
    assert (results / "learning_curve.png").stat().st_size > 10_000
    point = results / "best_recipe_32_seed1337"
    table = pd.read_csv(curve.TABLE)
    split = pd.read_csv(point / "split.csv")
    first_32 = table[table["role"] == "train"].sort_values("order")["GalaxyID"][:32]
    assert set(split.loc[split["split"] == "train", "GalaxyID"]) == set(first_32)
    assert len(list((point / "data" / "train").glob("*.png"))) == 32 + 8 + 8
    assert np.load(point / "test_squared_error.npy").shape == (8, 37)
    # a row records the command line's keys and the seed; its curve's own settings reach train.py
    assert rows["settings"].tolist() == ["--batch_size=16 --epochs=2 --max_steps=2 --seed=1337"] * 3
    assert "--center_crop_size=160" in (point / "train.log").read_text()
    assert "--center_crop_size=212" in (results / "mixed_16_seed1337" / "train.log").read_text()

    logs = {path: path.read_text() for path in results.glob("*/train.log")}
    run_curve(cfg, overrides)   # everything is done: nothing trains again
    assert capsys.readouterr().out.count(", skipped\n") == 3
    assert {path: path.read_text() for path in results.glob("*/train.log")} == logs

    rows[rows["point"] != "mixed_16_seed1337"].to_csv(results / "learning_curve.csv", index=False)
    run_curve(cfg, overrides)   # a point missing from the table goes on from its last.pt
    log = (results / "mixed_16_seed1337" / "train.log").read_text()
    assert "--resume=true" in log[len(logs[results / "mixed_16_seed1337" / "train.log"]):]
    assert len(pd.read_csv(results / "learning_curve.csv")) == 3

    with pytest.raises(SystemExit, match="error: .*trained with .*use another --out_dir"):
        run_curve(build_config({**overrides, "lr": 2e-3}), {**overrides, "lr": 2e-3})


# --- the fit ---------------------------------------------------------------------------------------------

def test_fit_recovers_the_parameters_of_an_exact_power_law():
    a, b, c = fit_power_law(SIZES, power_law(SIZES, *TRUE))
    assert a == pytest.approx(TRUE[0], abs=1e-4)
    assert b == pytest.approx(TRUE[1], rel=1e-2)
    assert c == pytest.approx(TRUE[2], abs=1e-3)
    a, b, c = fit_power_law(SIZES, power_law(SIZES, 0.0, 2.0, 1.5))   # at the edges of the bounds too
    assert (a, c) == (pytest.approx(0.0, abs=1e-5), pytest.approx(1.5, abs=1e-3))


def synthetic_errors(seed=0, galaxies=450):
    """Per-galaxy mean squared errors (points, galaxies) whose mean at each size is the true law squared:
    each galaxy has its own difficulty, the same at every point, as with one shared test split."""
    rng = np.random.default_rng(seed)
    sizes = np.repeat(SIZES, [2, 2, 2, 1, 1, 1])   # two seeds up to 1,500
    difficulty = rng.gamma(2.0, 0.5, galaxies)     # mean 1
    noise = rng.gamma(20.0, 1 / 20, (len(sizes), galaxies))
    return sizes, power_law(sizes, *TRUE)[:, None] ** 2 * difficulty * noise


def test_bootstrap_interval_contains_the_true_extrapolation():
    sizes, per_galaxy = synthetic_errors()
    rmse = np.sqrt(per_galaxy.mean(1))
    distinct = np.unique(sizes)
    start = fit_power_law(distinct, [rmse[sizes == n].mean() for n in distinct])
    fits, failed = bootstrap_fits(per_galaxy, sizes, start, resamples=300)
    assert failed == 0 and fits.shape == (300, 3)
    assert (fits[:, 0] >= 0).all() and (fits[:, 1] > 0).all() and ((fits[:, 2] > 0) & (fits[:, 2] <= 2)).all()
    at_kaggle = power_law(KAGGLE_N, *fits.T)
    low, high = interval(at_kaggle, 0.95)
    assert low < power_law(KAGGLE_N, *TRUE) < high
    assert interval(at_kaggle, 0.68)[0] >= low and interval(at_kaggle, 0.68)[1] <= high


def test_fit_curve_reads_the_points_writes_fit_json_and_needs_three_sizes(tmp_path, capsys):
    sizes, per_galaxy = synthetic_errors(galaxies=60)
    points = [f"mixed_{n}_{i}" for i, n in enumerate(sizes)]
    for point, errors in zip(points, per_galaxy):
        (tmp_path / point).mkdir()
        np.save(tmp_path / point / "test_squared_error.npy", np.repeat(errors[:, None], 37, 1).astype(np.float32))
    rows = pd.DataFrame({"point": points, "curve": "mixed", "n_train": sizes})
    fit = fit_curve(rows, tmp_path, resamples=50)
    saved = json.loads((tmp_path / "fit.json").read_text())
    assert saved["n_test"] == 60 and saved["sizes"] == SIZES.tolist() and saved["bootstrap"]["resamples"] == 50
    assert saved["interval_95"][0] <= saved["interval_68"][0] <= saved["interval_68"][1] <= saved["interval_95"][1]
    assert fit["a"] == saved["a"] and fit["fits"].shape[1] == 3
    assert "at N = 61,578" in capsys.readouterr().out
    assert fit_curve(rows[rows["n_train"] <= 750], tmp_path) is None
    assert "needs 3 or more" in capsys.readouterr().out


def test_the_best_recipe_is_extrapolated_with_the_mixed_curves_exponent(tmp_path, capsys):
    """Recipe points on a law of the same c, offset (a 0.01 lower, b 0.8 times): fit_curve recovers
    its a and b, and the interval from the shared resamples holds its true value at 61,578."""
    sizes, per_galaxy = synthetic_errors(galaxies=200)
    recipe_law = (TRUE[0] - 0.01, 0.8 * TRUE[1], TRUE[2])
    recipe_sizes = np.array([750, 3000, 5100])
    rng = np.random.default_rng(1)
    recipe_errors = (power_law(recipe_sizes, *recipe_law)[:, None] ** 2
                     * per_galaxy[-1] / power_law(SIZES[-1], *TRUE) ** 2 * rng.gamma(50.0, 1 / 50, (3, 200)))
    rows = []
    for name, points_sizes, errors in (("mixed", sizes, per_galaxy), ("best_recipe", recipe_sizes, recipe_errors)):
        for i, (n, point_errors) in enumerate(zip(points_sizes, errors)):
            point = f"{name}_{n}_{i}"
            (tmp_path / point).mkdir()
            np.save(tmp_path / point / "test_squared_error.npy",
                    np.repeat(point_errors[:, None], 37, 1).astype(np.float32))
            rows.append({"point": point, "curve": name, "n_train": n})
    fit = fit_curve(pd.DataFrame(rows), tmp_path, resamples=200)
    recipe = json.loads((tmp_path / "fit.json").read_text())["best_recipe"]
    assert recipe["c"] == fit["c"] and recipe["sizes"] == [750, 3000, 5100]
    assert recipe["a"] == pytest.approx(recipe_law[0], abs=0.01)
    low, high = recipe["interval_95"]
    assert low < power_law(KAGGLE_N, *recipe_law) < high
    assert recipe["rmse_at"] < fit["rmse_at"]
    assert "best recipe, the same c" in capsys.readouterr().out
