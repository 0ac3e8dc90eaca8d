"""Synthetic galaxies in Kaggle's layout, for `python preprocess.py --demo` and the tests.

make_demo writes raw_dir/images_training_rev1.zip, images_test_rev1.zip and
training_solutions_rev1.zip as Kaggle ships them: 424x424 JPEGs of Sersic-profile ellipticals,
disks (bars, bulges, spiral arms), edge-on disks and stars, with neighbours, foreground stars and
sky noise, and 37 vote fractions that follow what was drawn and obey the decision tree exactly.
"""
import io
import json
import math
import os
from pathlib import Path
import sys
import zipfile

from PIL import Image
import numpy as np
import pandas as pd

from dataset import LABEL_COLUMNS, QUESTIONS
from galaxy.crop import KAGGLE_SIDE
from galaxy.files import atomic_write, temp_name
from galaxy.kaggle_raw import SPLIT_FOLDERS
from galaxy.labels import SOLUTIONS
from galaxy.pool import run_pool

DEMO_MARKER = "synthetic_demo.json"   # says a folder is ours to (re)write
DEMO_SIDE = KAGGLE_SIDE              # Kaggle's 424 x 424 frames
DEMO_KINDS = ("elliptical", "disk", "edge-on", "star")
DEMO_KIND_ODDS = (0.38, 0.42, 0.15, 0.05)


def _sersic(grid, x0, y0, r_e, n, q, angle, peak):
    """A Sersic light profile of effective radius r_e (px), index n, axis ratio q, on a local window."""
    reach = int(min(DEMO_SIDE, 8 * r_e + 4))   # beyond 8 r_e the light is below 1e-5 of the peak
    window = (slice(max(0, int(y0) - reach), int(y0) + reach + 1), slice(max(0, int(x0) - reach), int(x0) + reach + 1))
    dx, dy = grid[1][window] - x0, grid[0][window] - y0
    u = dx * math.cos(angle) + dy * math.sin(angle)
    v = (dy * math.cos(angle) - dx * math.sin(angle)) / q
    # a softened core (the seeing blurs the cusp of a high-n profile) whose top is the given peak
    core = 0.15 * r_e
    radius = np.sqrt(u * u + v * v + core * core)
    b_n = 2 * n - 1 / 3
    return window, u, v, radius, peak * np.exp(-b_n * ((radius / r_e) ** (1 / n) - (core / r_e) ** (1 / n)))


def _demo_galaxy(kind, rng):
    """The drawn properties of one synthetic galaxy (all that its labels depend on)."""
    g = {"kind": kind, "angle": rng.uniform(0, math.pi), "bulge": 0.0, "arms": 0, "pitch": 0.0, "bar": False,
         "peak": rng.uniform(90, 220), "neighbour_near": False}
    if kind == "elliptical":
        g.update(q=rng.uniform(0.35, 1.0), r_e=rng.uniform(10, 35), n=rng.uniform(2.5, 4), bulge=1.0)
    elif kind == "disk":
        g.update(q=rng.uniform(0.35, 1.0), r_e=rng.uniform(10, 32), n=1.0, bulge=rng.uniform(0, 0.7),
                 bar=rng.random() < 0.3)
        if rng.random() < 0.6:
            g.update(arms=int(rng.choice([1, 2, 2, 2, 3, 4, 5])), pitch=rng.uniform(10, 40))
    elif kind == "edge-on":
        g.update(q=rng.uniform(0.08, 0.2), r_e=rng.uniform(12, 36), n=1.0, bulge=rng.uniform(0, 0.6))
    else:   # a foreground star or artifact sitting where the galaxy should be
        g.update(q=1.0, r_e=rng.uniform(2.5, 4), n=0.5, peak=255.0)
    return g


def _soft(rng, weights, concentration=40.0):
    """Random vote fractions around the given weights (summing to 1), like a finite crowd of voters."""
    weights = np.asarray(weights, dtype=float) + 0.02
    return rng.dirichlet(concentration * weights / weights.sum())


def _bumps(value, centres, width):
    return [math.exp(-((value - c) / width) ** 2) for c in centres]


def demo_labels(g, rng):
    """The 37 vote fractions of a drawn galaxy, obeying the Galaxy Zoo decision tree exactly."""
    first = {"elliptical": (0.85, 0.12, 0.03), "disk": (0.15, 0.83, 0.02), "edge-on": (0.08, 0.9, 0.02),
             "star": (0.1, 0.1, 0.8)}[g["kind"]]
    edge_on = 0.9 if g["kind"] == "edge-on" else max(0.03, 0.6 - g["q"])
    answers = {   # question number -> weights of its answers, before scaling by the parent's fraction
        1: first,
        2: (edge_on, 1 - edge_on),
        3: (0.8, 0.2) if g["bar"] else (0.08, 0.92),
        4: (0.85, 0.15) if g["arms"] else (0.1, 0.9),
        5: _bumps(g["bulge"], (0.0, 0.25, 0.5, 0.8), 0.15),
        6: (0.4, 0.6) if g["neighbour_near"] else (0.08, 0.92),
        7: _bumps(g["q"], (1.0, 0.7, 0.35), 0.15),
        8: (0.05, 0.05, 0.3, 0.1, 0.1, 0.5, 0.02) if g["neighbour_near"] else (0.3, 0.2, 0.1, 0.1, 0.3, 0.02, 0.02),
        9: _bumps(g["bulge"], (0.5, 0.25, 0.0), 0.15),
        10: _bumps(g["pitch"], (12, 25, 38), 7),
        11: [float(g["arms"] == m) for m in (1, 2, 3, 4)] + [float(g["arms"] >= 5), 0.1],
    }
    values = {}
    for question in QUESTIONS:   # parents come before their children in Kaggle's order
        parent = values[question.parent] if question.parent else 1.0
        for column, fraction in zip(question.columns, _soft(rng, answers[question.number])):
            values[column] = parent * fraction
    return [values[column] for column in LABEL_COLUMNS]


def _render_demo(task):
    """Worker: (split, galaxy_id, seed) -> (split, galaxy_id, JPEG bytes, labels or None)."""
    split, galaxy_id, seed = task
    rng = np.random.default_rng([seed, galaxy_id])
    grid = np.mgrid[0:DEMO_SIDE, 0:DEMO_SIDE].astype(np.float32)
    light = np.zeros((DEMO_SIDE, DEMO_SIDE, 3), np.float32)
    red, blue, white = np.array([1.0, 0.8, 0.6]), np.array([0.7, 0.8, 1.0]), np.array([1.0, 1.0, 1.0])

    def add(window, image, colour):
        light[window] += image[..., None] * colour.astype(np.float32)

    g = _demo_galaxy(rng.choice(DEMO_KINDS, p=DEMO_KIND_ODDS), rng)
    x0, y0 = DEMO_SIDE / 2 + rng.uniform(-1, 1), DEMO_SIDE / 2 + rng.uniform(-1, 1)
    if g["kind"] in ("elliptical", "star"):
        window, _, _, _, image = _sersic(grid, x0, y0, g["r_e"], g["n"], g["q"], g["angle"], g["peak"])
        add(window, image, red if g["kind"] == "elliptical" else white)
    else:
        window, u, v, radius, disk = _sersic(grid, x0, y0, g["r_e"], 1.0, g["q"], g["angle"],
                                             g["peak"] * (1 - 0.6 * g["bulge"]))
        if g["arms"]:   # logarithmic spirals: brightness rises along theta = ln(r) / tan(pitch)
            phase = g["arms"] * (np.arctan2(v, u)
                                 - np.log(radius / g["r_e"] + 1e-3) / math.tan(math.radians(g["pitch"])))
            disk *= 1 + 0.8 * np.cos(phase) * np.clip(radius / g["r_e"] - 0.3, 0, 1)
        add(window, disk, blue)
        if g["bar"]:
            window, *_, bar = _sersic(grid, x0, y0, 0.8 * g["r_e"], 0.5, 0.25, g["angle"] + rng.uniform(0.5, 1.2),
                                      0.5 * g["peak"])
            add(window, bar, red)
        if g["bulge"] > 0.05:
            window, *_, bulge = _sersic(grid, x0, y0, 0.25 * g["r_e"] * (0.5 + g["bulge"]), 4.0, max(g["q"], 0.6),
                                        g["angle"], g["peak"] * g["bulge"])
            add(window, bulge, red)
    for _ in range(rng.poisson(1.2)):   # neighbour galaxies, sometimes brighter than the central one
        nx, ny = rng.uniform(20, DEMO_SIDE - 20, size=2)
        r_e = rng.uniform(3, 15)
        g["neighbour_near"] |= math.hypot(nx - x0, ny - y0) < 3 * (g["r_e"] + r_e)
        window, *_, image = _sersic(grid, nx, ny, r_e, rng.choice([1.0, 4.0]), rng.uniform(0.3, 1), rng.uniform(0, 3.2),
                                    rng.uniform(40, 255))
        add(window, image, red if rng.random() < 0.5 else blue)
    for _ in range(rng.poisson(2.0)):   # foreground stars: point sources blurred by the seeing
        sx, sy = rng.uniform(5, DEMO_SIDE - 5, size=2)
        window, *_, image = _sersic(grid, sx, sy, rng.uniform(1, 2.5), 0.5, 1.0, 0.0, rng.uniform(60, 255))
        add(window, image, white)
    sky = 8 + rng.normal(0, 3, size=light.shape).astype(np.float32)
    pixels = np.clip(light + sky, 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    labels = demo_labels(g, rng) if split == "train" else None
    return split, galaxy_id, buffer.getvalue(), labels


def make_demo(raw_dir, n_train, n_test, seed, workers=1, progress=True):
    """Write n_train + n_test synthetic galaxies into raw_dir as Kaggle's three zips; return raw_dir.

    Deterministic by seed. A complete set with the same numbers is reused; a folder holding
    other files (no marker file) is refused, so nothing of yours is ever overwritten.
    """
    raw = Path(raw_dir)
    marker = raw / DEMO_MARKER
    wanted = {"n_train": n_train, "n_test": n_test, "seed": seed}
    if raw.is_dir() and any(raw.iterdir()) and not marker.is_file():
        sys.exit(f"error: {raw} holds files that are not a synthetic demo set ({DEMO_MARKER} is missing); "
                 f"refusing to write there. Pick an empty folder with --raw_dir=...")
    if marker.is_file() and json.loads(marker.read_text()) == {**wanted, "complete": True}:
        print(f"demo: reusing the synthetic galaxies in {raw}")
        return raw
    raw.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps({**wanted, "complete": False}))   # ours from here on, even if killed

    rng = np.random.default_rng(seed)
    ids = rng.choice(np.arange(100000, 1000000), size=n_train + n_test, replace=False)
    tasks = [("train" if i < n_train else "test", int(galaxy_id), seed) for i, galaxy_id in enumerate(ids)]
    archives = {split: zipfile.ZipFile(temp_name(raw / f"{folder}.zip"), "w")
                for split, folder in SPLIT_FOLDERS.items()}
    rows = []
    for split, galaxy_id, jpeg, labels in run_pool(_render_demo, tasks, workers, {}, "demo galaxies",
                                                    progress, ordered=True):
        # JPEGs do not compress further: store them, as Kaggle's zips do
        archives[split].writestr(f"{SPLIT_FOLDERS[split]}/{galaxy_id}.jpg", jpeg)
        if labels is not None:
            rows.append([galaxy_id] + labels)
    for split, archive in archives.items():
        archive.close()
        os.replace(archive.filename, raw / f"{SPLIT_FOLDERS[split]}.zip")
    table = pd.DataFrame(sorted(rows), columns=["GalaxyID"] + LABEL_COLUMNS)

    def write_solutions(temporary):
        with zipfile.ZipFile(temporary, "w", zipfile.ZIP_DEFLATED) as archive:
            archive.writestr(f"{SOLUTIONS}.csv", table.to_csv(index=False))

    atomic_write(raw / f"{SOLUTIONS}.zip", write_solutions)
    marker.write_text(json.dumps({**wanted, "complete": True}))
    return raw
