"""python bench.py curve: the learning curve of the baseline CNN, test RMSE against the number of
training galaxies, fitted with RMSE(N) = a + b N^-c and extrapolated to Kaggle's 61,578.

    python bench.py curve                              # -> runs/curve/learning_curve.csv, fit.json, .png
    python bench.py curve --raw_dir=data/raw           # Kaggle's training files instead of ../shared
    python bench.py curve --epochs=2 --max_steps=5 --out_dir=runs/curve_smoke   # a quick check

The galaxies: the 3,000 of subsets/galaxy_zoo_3000.csv (close to a random draw of Kaggle's training
set) and the 3,000 of subsets/galaxy_zoo_more_3000.csv (kept for confident votes: easier, not random).
subsets/learning_curve.csv fixes every point: 450 test and 450 val galaxies drawn from the first list
alone, shared by every point, and one random order of the other 5,100 (role train, column order):
a point of N training galaxies trains on the first N of that order (mixed), or on the first N of the
2,100 from the first list (sample_only). The table is written from the two lists when it is absent.

Points, in order: the mixed curve (375 ... 5,100 galaxies) and the sample_only curve (375 ... 2,100)
of the 40-epoch flips-only model (recipes/flips_40.py) at seed 1337, then seed 1 for the points of
1,500 or fewer, then best_recipe: recipes/final_fit.py's settings without train_on_val, at 750, 3,000
and 5,100 (mixed). Each curve's settings come from those recipes (CURVE_SETTINGS), whatever
config.py's defaults. Each point trains through train.py (log in runs/curve/<point>/train.log; one
terminal line as it starts and ends) on a folder of links to one preprocessed folder of all 6,000,
then its best.pt is scored on val and test, with and without 8-fold TTA. learning_curve.csv is
rewritten as each point ends; a rerun skips the points in it and resumes a half-trained one from its
last.pt. Overrides (--epochs, --lr, ...) apply to every point;
the split keys and seed are the table's and the points'. --raw_dir holds Kaggle's training files
(zipped or not), of which only the table's 6,000 are preprocessed; without it the images are links to
../shared/data/galaxy-zoo-sample and galaxy-zoo-more, made in runs/curve/raw.

Each point keeps its test galaxies' squared errors (test_squared_error.npy), so that at the end
benchmarks/curve_fit.py fits the mixed curve, bootstraps the extrapolation over the test galaxies
(fit.json) and draws learning_curve.png.
"""
from collections import namedtuple
from contextlib import redirect_stderr, redirect_stdout
import os
from pathlib import Path
import shutil
import sys
import time

import numpy as np
import pandas as pd
import torch

from benchmarks.accuracy import run_logged
from benchmarks.common import REPO, SHARED_SAMPLE, machine_name
from benchmarks.curve_fit import draw_figure, fit_curve
from config import build_config
from dataset import load_images, read_labels, read_split, rows_of, save_split
from galaxy.checkpoints import CheckpointError, model_from_checkpoint, read_checkpoint
from galaxy.crop import SETTINGS_FILE
from galaxy.files import DataError, atomic_write
from galaxy.inference import predict_views, rmse
from galaxy.numerics import resolve_device
from galaxy.preprocessing import preprocess
from galaxy.recipes import as_args, member_settings, processed_dir_for
from galaxy.runs import CHANGEABLE_ON_RESUME

SHARED_MORE = SHARED_SAMPLE.parent / "galaxy-zoo-more"
SAMPLE_LIST, MORE_LIST = REPO / "subsets/galaxy_zoo_3000.csv", REPO / "subsets/galaxy_zoo_more_3000.csv"
TABLE = REPO / "subsets/learning_curve.csv"
TABLE_SEED, N_TEST, N_VAL = 1337, 450, 450
MIXED_SIZES = (375, 750, 1500, 3000, 4800, 5100)
SAMPLE_SIZES = (375, 750, 1500, 2100)
BEST_SIZES = (750, 3000, 5100)
SEEDS = (1337, 1)
TWO_SEEDS_UP_TO = 1500   # the small points vary most from seed to seed, and cost least
# What each curve trains, read from recipes/ so that a point means the same whatever config.py's defaults:
# the 40-epoch flips-only model, and the best member recipe trained on the train galaxies alone (val
# picks best.pt as elsewhere)
FLIPS_40 = member_settings("flips_40")
BEST_RECIPE = member_settings("final_fit", without=("train_on_val",))
CURVE_SETTINGS = {"mixed": FLIPS_40, "sample_only": FLIPS_40, "best_recipe": BEST_RECIPE}
# fixed by the table and the points, or bench.py's own: never passed on to train.py
NOT_PASSED = ("raw_dir", "processed_dir", "out_dir", "recipe", "members", "members_at_once", "resume", "scale",
              "demo", "demo_dir", "demo_train", "demo_test", "ids", "init_from", "seed", "split_seed",
              "val_fraction", "test_fraction", "train_on_val")
# what a point's settings column records: the keys that change what is trained
RECORDED_ANYWAY = ("epochs", "lr", "max_steps")

Point = namedtuple("Point", "curve n_train seed")


def point_name(point):
    return f"{point.curve}_{point.n_train}_seed{point.seed}"


# --- the table of galaxies ---------------------------------------------------------------------------

def build_table(sample_ids, more_ids, seed=TABLE_SEED):
    """subsets/learning_curve.csv's rows from the two ID lists: test and val drawn from sample_ids,
    then one random order of all the others. Deterministic for the same lists and seed."""
    sample, more = np.unique(np.asarray(sample_ids, np.int64)), np.unique(np.asarray(more_ids, np.int64))
    if np.intersect1d(sample, more).size:
        raise ValueError(f"{np.intersect1d(sample, more).size} GalaxyIDs are in both lists")
    if len(sample) <= N_TEST + N_VAL:
        raise ValueError(f"{len(sample)} sample galaxies leave none to train on after {N_TEST} test + {N_VAL} val")
    rng = np.random.default_rng(seed)
    shuffled = sample[rng.permutation(len(sample))]
    test, val = np.sort(shuffled[:N_TEST]), np.sort(shuffled[N_TEST:N_TEST + N_VAL])
    pool = np.concatenate([np.sort(shuffled[N_TEST + N_VAL:]), more])
    source = np.array(["sample"] * (len(pool) - len(more)) + ["more"] * len(more))
    order = rng.permutation(len(pool))
    parts = [pd.DataFrame({"GalaxyID": test, "source": "sample", "role": "test"}),
             pd.DataFrame({"GalaxyID": val, "source": "sample", "role": "val"}),
             pd.DataFrame({"GalaxyID": pool[order], "source": source[order], "role": "train",
                           "order": np.arange(1, len(pool) + 1)})]
    table = pd.concat(parts, ignore_index=True)
    table["order"] = table["order"].astype("Int64")   # blank for test and val
    return table


def table_text(table):
    return table.to_csv(index=False, lineterminator="\n")


def regenerate_table(sample_list=SAMPLE_LIST, more_list=MORE_LIST):
    """The table built from the two shipped ID lists (subsets/galaxy_zoo_3000.csv, _more_3000.csv)."""
    for path in (sample_list, more_list):
        if not Path(path).is_file():
            sys.exit(f"error: {path} not found; it lists the galaxies of the learning curve (restore it from git)")
    return build_table(pd.read_csv(sample_list)["GalaxyID"], pd.read_csv(more_list)["GalaxyID"])


def read_table(path=None):
    """The table at path (TABLE by default), written from the ID lists first if it is absent."""
    path = Path(path or TABLE)
    if not path.is_file():
        table = regenerate_table()
        atomic_write(path, lambda tmp: Path(tmp).write_text(table_text(table)))
        print(f"wrote {path} ({len(table)} galaxies) from {SAMPLE_LIST.name} and {MORE_LIST.name}")
    table = pd.read_csv(path, dtype={"order": "Int64"})
    if list(table.columns) != ["GalaxyID", "source", "role", "order"] or not table["GalaxyID"].is_unique:
        sys.exit(f"error: {path} is not a learning-curve table (GalaxyID,source,role,order, unique IDs); "
                 f"delete it and it is written again from {SAMPLE_LIST.name} and {MORE_LIST.name}")
    return table


def point_split(table, point):
    """{"train", "val", "test"}: sorted GalaxyIDs of the point's galaxies."""
    train = table[table["role"] == "train"].sort_values("order")
    if point.curve == "sample_only":
        train = train[train["source"] == "sample"]
    if point.n_train > len(train):
        raise ValueError(f"{point_name(point)} wants {point.n_train} training galaxies; the table has {len(train)}")
    split = {role: table.loc[table["role"] == role, "GalaxyID"].to_numpy(np.int64) for role in ("val", "test")}
    return {"train": train["GalaxyID"].to_numpy(np.int64)[:point.n_train], **{k: np.sort(v) for k, v in split.items()}}


# --- the points --------------------------------------------------------------------------------------

def plan():
    """Every point, in the order they run: seed 1337 first (mixed, then sample_only), then the other
    seeds on the points of TWO_SEEDS_UP_TO galaxies or fewer, then the best recipe's."""
    curves = (("mixed", MIXED_SIZES), ("sample_only", SAMPLE_SIZES))
    points = [Point(curve, n, SEEDS[0]) for curve, sizes in curves for n in sizes]
    points += [Point(curve, n, seed) for seed in SEEDS[1:] for curve, sizes in curves for n in sizes
               if n <= TWO_SEEDS_UP_TO]
    return points + [Point("best_recipe", n, SEEDS[0]) for n in BEST_SIZES]


def point_settings(point, passed):
    """The train.py settings of a point: its curve's, then the command line's overrides, then its seed."""
    return {**CURVE_SETTINGS[point.curve], **passed, "seed": point.seed}


def settings_text(point, settings):
    """What a row records of its settings: the keys that change what is trained and differ from its
    curve's own (CURVE_SETTINGS, implied by the curve's name), sorted."""
    own = CURVE_SETTINGS[point.curve]
    kept = {k: v for k, v in sorted(settings.items()) if (k not in CHANGEABLE_ON_RESUME or k in RECORDED_ANYWAY)
            and (k not in own or own[k] != v)}
    return " ".join(as_args(kept))


# --- the data: raw images, the preprocessed pool, a point's folder --------------------------------------

def link_shared_raw(folder, sources=None):
    """A raw_dir of links to the shared sets' JPEGs and one training_solutions_rev1.csv of their rows."""
    sources = sources or (SHARED_SAMPLE, SHARED_MORE)
    for source in sources:
        if not (Path(source) / "training_solutions_rev1.csv").is_file():
            sys.exit(f"error: {source}/training_solutions_rev1.csv not found; clone the shared data beside the "
                     f"repository or pass --raw_dir=<Kaggle's training files>, e.g. --raw_dir=data/raw")
    images = Path(folder) / "images_training_rev1"
    images.mkdir(parents=True, exist_ok=True)
    for source in sources:
        for jpeg in sorted((Path(source) / "images_training_rev1").resolve().glob("*.jpg")):
            if not (images / jpeg.name).is_symlink():
                (images / jpeg.name).symlink_to(jpeg)
    labels = pd.concat([pd.read_csv(Path(source) / "training_solutions_rev1.csv") for source in sources])
    atomic_write(Path(folder) / "training_solutions_rev1.csv", lambda tmp: labels.to_csv(tmp, index=False))
    return Path(folder)


def prepare_pool(settings, raw_dir, table_path, cfg, results, made):
    """The PNGs of every galaxy of the table with settings' crop: preprocessed once per crop into
    results/data_<crop> (re-checked once per command: preprocessing skips the PNGs it has)."""
    crop_cfg = build_config({**settings, "raw_dir": str(raw_dir), "ids": str(table_path), "workers": cfg.workers})
    folder = processed_dir_for(str(results / "data"), crop_cfg)
    if folder not in made:
        Path(folder).mkdir(parents=True, exist_ok=True)
        with open(f"{folder}.log", "a") as log, redirect_stdout(log), redirect_stderr(log):
            preprocess(build_config({**crop_cfg.to_dict(), "processed_dir": folder}), progress=False)
        made.add(folder)
    return Path(folder)


def link_point_data(pool, data, split):
    """data/ as a processed_dir holding exactly the point's galaxies: links to pool's PNGs (hard links,
    else symbolic), their rows of labels.csv and pool's crop settings. Kept when already so."""
    wanted = np.sort(np.concatenate([split[role] for role in ("train", "val", "test")]))
    missing = [gid for gid in wanted.tolist() if not (pool / "train" / f"{gid}.png").is_file()]
    if missing:
        raise DataError(f"{len(missing)} galaxies of the point have no PNG in {pool} (e.g. {missing[0]}); "
                        f"see {pool}/skipped.csv")
    labels_path = data / "labels.csv"
    if labels_path.is_file() and np.array_equal(read_labels(data)[0], wanted) and all(
            (data / "train" / f"{gid}.png").is_file() for gid in wanted.tolist()):
        return
    shutil.rmtree(data, ignore_errors=True)
    (data / "train").mkdir(parents=True)
    for gid in wanted.tolist():
        source, link = pool / "train" / f"{gid}.png", data / "train" / f"{gid}.png"
        try:
            os.link(source, link)
        except OSError:   # another file system, or none of hard links
            link.symlink_to(source.resolve())
    shutil.copyfile(pool / SETTINGS_FILE, data / SETTINGS_FILE)
    labels = pd.read_csv(pool / "labels.csv")
    labels = labels[labels["GalaxyID"].isin(wanted)].sort_values("GalaxyID")
    atomic_write(labels_path, lambda tmp: labels.to_csv(tmp, index=False))


def write_split(folder, split):
    """folder/split.csv, which train.py reads instead of making one; an old one must say the same."""
    path = folder / "split.csv"
    if path.is_file():
        old = read_split(path)
        if all(np.array_equal(old[role], np.sort(split[role])) for role in split):
            return
        raise DataError(f"{path} holds another split than subsets/learning_curve.csv gives; delete {folder}")
    folder.mkdir(parents=True, exist_ok=True)
    save_split({role: np.sort(ids) for role, ids in split.items()}, path)


# --- training and scoring a point ----------------------------------------------------------------------

def save_array(path, array):
    with open(path, "wb") as f:   # np.save given a name would add .npy to the temporary one
        np.save(f, array)


def score_point(folder, path, data, split, device):
    """RMSE of the checkpoint at path on val and test, with and without 8-fold TTA, and of predicting the
    train mean on test; each test galaxy's squared error per output (TTA) to test_squared_error.npy."""
    checkpoint = read_checkpoint(str(path))
    model, model_cfg = model_from_checkpoint(checkpoint, str(path), device)
    numerics = checkpoint.get("numerics") or {"amp": False, "channels_last": False}
    galaxy_ids, votes = read_labels(data)
    order = np.argsort(galaxy_ids)
    galaxy_ids, votes = galaxy_ids[order], torch.from_numpy(votes[order])
    images = load_images(str(data / "train"), galaxy_ids, model_cfg.image_size)
    scores = {"best_epoch": checkpoint["epoch"]}
    for role in ("val", "test"):
        rows = rows_of(galaxy_ids, split[role])
        views, _ = predict_views(model, images[rows], amp=numerics["amp"], channels_last=numerics["channels_last"],
                                 tta=True)
        targets = votes[rows]
        scores[f"{role}_rmse"] = round(rmse(views[0], targets), 5)   # view 0 is the image as it is
        scores[f"{role}_rmse_tta"] = round(rmse(views.mean(0), targets), 5)
        if role == "test":
            squared = ((views.mean(0) - targets) ** 2).numpy().astype(np.float32)
            atomic_write(folder / "test_squared_error.npy", lambda tmp: save_array(tmp, squared))
            train_mean = votes[rows_of(galaxy_ids, np.sort(split["train"]))].mean(0)
            scores["mean_rmse"] = round(rmse(train_mean.expand_as(targets), targets), 5)
    return scores


def training_minutes(folder):
    """The point's training time, its epochs' seconds in metrics.csv summed: the same whether it ran at
    once or was resumed (a resumed point's own run may have had one epoch left, or none)."""
    metrics = folder / "metrics.csv"
    return pd.read_csv(metrics)["seconds"].sum() / 60 if metrics.is_file() else float("nan")


def run_point(point, settings, table, pool, cfg, results):
    """Train one point (resuming a half-done one) and score its best.pt: its row of learning_curve.csv."""
    folder = results / point_name(point)
    split = point_split(table, point)
    data = folder / "data"
    link_point_data(pool, data, split)
    write_split(folder, split)
    args = {**settings, "processed_dir": data, "out_dir": folder}
    if (folder / "last.pt").is_file():
        args["resume"] = True
    code = run_logged("train.py", as_args(args), folder / "train.log")
    if code in (130, 143):   # Ctrl-C or SIGTERM: train.py saved last.pt; the next points must not start
        sys.exit(f"error: train.py was stopped ({folder / 'train.log'}); run the same command again to go on")
    if code:
        return {"error": f"train.py exit {code}; see {folder / 'train.log'}"}
    last = read_checkpoint(str(folder / "last.pt"))
    # --max_steps can stop a run before its first epoch ends, when there is no best.pt yet
    best = folder / "best.pt" if (folder / "best.pt").is_file() else folder / "last.pt"
    device = resolve_device(cfg.device)
    scores = score_point(folder, best, data, split, device)
    source = table.set_index("GalaxyID").loc[split["train"], "source"]
    return {"point": point_name(point), "curve": point.curve, "n_train": point.n_train,
            "n_from_sample": int((source == "sample").sum()), "n_from_more": int((source == "more").sum()),
            "seed": point.seed, "epochs": last["epoch"], "steps": last["global_step"], **scores,
            "minutes": round(training_minutes(folder), 1), "date": time.strftime("%Y-%m-%d"),
            "machine": machine_name(device), "torch": torch.__version__,
            "settings": settings_text(point, settings)}


# --- the whole curve ---------------------------------------------------------------------------------

def finished_rows(csv_path, wanted):
    """The rows already in csv_path; a one-line error for a point made with other settings."""
    done = pd.read_csv(csv_path, keep_default_na=False).to_dict("records") if csv_path.is_file() else []
    for row in done:
        if row["point"] in wanted and row["settings"] != wanted[row["point"]]:
            sys.exit(f"error: {csv_path} has {row['point']} trained with {row['settings'] or 'the defaults'}, "
                     f"not {wanted[row['point']] or 'the defaults'}; use another --out_dir for other settings")
    return done


def raw_source(cfg, overrides, results):
    if "raw_dir" in overrides:
        return Path(cfg.raw_dir)
    return link_shared_raw(results / "raw")


def run_curve(cfg, overrides, figure=None):
    """Every point of plan() not yet in out_dir/curve/learning_curve.csv, then the fit and the figure."""
    results = Path(cfg.out_dir) / "curve"
    csv_path = results / "learning_curve.csv"
    ignored = sorted(key for key in overrides if key in NOT_PASSED and key not in ("raw_dir", "out_dir"))
    if ignored:
        print(f"curve: ignoring --{', --'.join(ignored)} (the table and the points fix them)")
    passed = {key: value for key, value in overrides.items() if key not in NOT_PASSED}
    table = read_table()
    steps = plan()
    settings = {point_name(point): point_settings(point, passed) for point in steps}
    done = finished_rows(csv_path, {point_name(point): settings_text(point, settings[point_name(point)])
                                    for point in steps})
    finished, made, raw_dir, failed = {row["point"] for row in done}, set(), None, 0
    for number, point in enumerate(steps, 1):
        where = f"[{number}/{len(steps)}] {point_name(point)}"
        if point_name(point) in finished:
            print(f"{where}: in {csv_path}, skipped", flush=True)
            continue
        print(f"{where}: training on {point.n_train} galaxies ...", flush=True)
        started = time.perf_counter()
        try:
            raw_dir = raw_dir or raw_source(cfg, overrides, results)
            pool = prepare_pool(settings[point_name(point)], raw_dir, TABLE, cfg, results, made)
            row = run_point(point, settings[point_name(point)], table, pool, cfg, results)
        except (DataError, ValueError, CheckpointError) as err:
            row = {"error": str(err)}
        minutes = (time.perf_counter() - started) / 60
        if "error" in row:
            failed += 1
            print(f"{where}: failed: {row['error']} ({minutes:.1f} min)", flush=True)
            continue
        print(f"{where}: test RMSE {row['test_rmse_tta']:.4f} with TTA, {row['test_rmse']:.4f} without; "
              f"val {row['val_rmse']:.4f} ({minutes:.1f} min)", flush=True)
        done.append(row)
        results.mkdir(parents=True, exist_ok=True)
        atomic_write(csv_path, lambda tmp: pd.DataFrame(done).to_csv(tmp, index=False))
    if done:
        print(pd.DataFrame(done).drop(columns=["settings", "machine", "torch"]).to_string(index=False))
        fit = fit_curve(pd.DataFrame(done), results)
        draw_figure(pd.DataFrame(done), fit, figure or results / "learning_curve.png")
    print(f"saved {csv_path}" + (f"; {failed} points failed (a rerun tries them again)" if failed else ""))
