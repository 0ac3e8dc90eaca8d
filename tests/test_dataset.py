import io
import os

from PIL import Image
import numpy as np
import pandas as pd
import pytest
import torch

from config import Config
from dataset import (LABEL_COLUMNS, DataError, augment, dihedral, load_images, load_training_set, make_split,
                     random_dihedral, read_labels, read_split, save_split, split_for_run, vote_summary)


def write_processed(folder, galaxy_ids, labelled_ids=None, size=64):
    (folder / "train").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for gid in galaxy_ids:
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / "train" / f"{gid}.png")
    labelled_ids = galaxy_ids if labelled_ids is None else labelled_ids
    table = pd.DataFrame(rng.random((len(labelled_ids), 37)), columns=LABEL_COLUMNS)
    table.insert(0, "GalaxyID", labelled_ids)
    table.to_csv(folder / "labels.csv", index=False)


def test_split_is_deterministic_disjoint_and_complete():
    galaxy_ids = np.arange(100, 1100)
    split = make_split(galaxy_ids, seed=1, val_fraction=0.1, test_fraction=0.1)
    assert [len(split[s]) for s in ("train", "val", "test")] == [800, 100, 100]
    assert sorted(np.concatenate(list(split.values()))) == list(galaxy_ids)
    again = make_split(galaxy_ids[::-1], seed=1, val_fraction=0.1, test_fraction=0.1)
    assert all(np.array_equal(split[s], again[s]) for s in split)
    other = make_split(galaxy_ids, seed=2, val_fraction=0.1, test_fraction=0.1)
    assert not np.array_equal(split["val"], other["val"])


def test_split_round_trips_through_csv(tmp_path):
    split = make_split(np.arange(50), seed=0, val_fraction=0.2, test_fraction=0.2)
    save_split(split, tmp_path / "split.csv")
    loaded = read_split(tmp_path / "split.csv")
    assert all(np.array_equal(split[s], loaded[s]) for s in split)


def test_train_on_val_trains_on_the_val_galaxies_and_keeps_the_test_split(tmp_path):
    galaxy_ids = np.arange(100, 1100)
    tuned = split_for_run(Config(out_dir=str(tmp_path / "tuned")), galaxy_ids)
    final = split_for_run(Config(out_dir=str(tmp_path / "final"), train_on_val=True), galaxy_ids)
    assert np.array_equal(final["test"], tuned["test"])   # scored on the same galaxies as the runs tuned on val
    assert np.array_equal(final["train"], np.union1d(tuned["train"], tuned["val"])) and len(final["val"]) == 0
    saved = read_split(tmp_path / "final" / "split.csv")   # what --resume and predict.py read back
    assert all(np.array_equal(saved[s], final[s]) for s in final)


def test_training_set_pairs_pngs_with_labels_and_caches(tmp_path):
    write_processed(tmp_path, [5, 3, 9, 7], labelled_ids=[3, 5, 7, 11])  # 9 has no label, 11 no PNG
    cfg = Config(processed_dir=str(tmp_path), workers=2)
    galaxy_ids, images, vote_fractions = load_training_set(cfg)
    assert galaxy_ids.tolist() == [3, 5, 7]
    assert images.dtype == torch.uint8 and images.shape == (3, 3, 64, 64)
    expected = np.asarray(Image.open(tmp_path / "train" / "5.png")).transpose(2, 0, 1)
    assert np.array_equal(images[1].numpy(), expected)
    assert vote_fractions.shape == (3, 37)
    assert (tmp_path / "train_images.pt").exists()
    cached = load_images(str(tmp_path / "train"), galaxy_ids, 64)
    assert torch.equal(cached, images)
    # the cache also serves a subset in another order: the rows of those ids
    assert torch.equal(load_images(str(tmp_path / "train"), [7, 3], 64), images[[2, 0]])


def test_cache_is_rebuilt_when_pngs_change(tmp_path):
    write_processed(tmp_path, [1, 2])
    folder = str(tmp_path / "train")
    first = load_images(folder, [1, 2], 64)
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(tmp_path / "new.png")
    (tmp_path / "new.png").replace(tmp_path / "train" / "1.png")
    assert load_images(folder, [1, 2], 64)[0].sum() == 0 and first[0].sum() > 0


def test_cache_is_rebuilt_when_a_png_is_overwritten_in_place(tmp_path):
    write_processed(tmp_path, [1, 2])
    folder = tmp_path / "train"
    first = load_images(str(folder), [1, 2], 64)
    folder_times = os.stat(folder)
    # same name, other pixels, written into the same file: the folder itself does not change
    with open(folder / "2.png", "r+b") as f:
        buffer = io.BytesIO()
        Image.fromarray(np.full((64, 64, 3), 7, np.uint8)).save(buffer, format="PNG", compress_level=0)
        f.seek(0)
        f.write(buffer.getvalue())
        f.truncate()
    os.utime(folder, ns=(folder_times.st_atime_ns, folder_times.st_mtime_ns))
    assert os.stat(folder).st_mtime_ns == folder_times.st_mtime_ns
    again = load_images(str(folder), [1, 2], 64)
    assert (again[1] == 7).all() and torch.equal(again[0], first[0]) and not (first[1] == 7).all()
    cached = torch.load(tmp_path / "train_images.pt", weights_only=True)
    assert (cached["images"][1] == 7).all()   # the cache on disk was rebuilt, not only this result


@pytest.mark.parametrize("setup, fragment", [
    (lambda d: None, "no training PNGs"),
    (lambda d: write_processed(d, [1, 2], labelled_ids=[3, 4]), "matches no PNG"),
])
def test_unusable_processed_dir_says_what_to_do(tmp_path, setup, fragment):
    setup(tmp_path)
    with pytest.raises(DataError, match=fragment):
        load_training_set(Config(processed_dir=str(tmp_path)))


def test_dihedral_gives_the_eight_symmetries_of_the_square():
    image = torch.arange(16.0).view(1, 1, 4, 4)
    views = [dihedral(image, k) for k in range(8)]
    assert len({tuple(v.flatten().tolist()) for v in views}) == 8
    rotations = [torch.rot90(image, k, dims=(-2, -1)) for k in range(4)]
    for rotation in rotations + [r.flip(-1) for r in rotations]:
        assert any(torch.equal(rotation, v) for v in views)


def test_random_dihedral_permutes_pixels_of_each_image_independently():
    images = torch.rand(64, 3, 8, 8)
    out = random_dihedral(images, torch.Generator().manual_seed(0))
    seen = set()
    for before, after in zip(images, out):
        matches = [k for k in range(8) if torch.equal(dihedral(before, k), after)]
        assert matches, "every output is an exact symmetry of its own input"
        seen.add(matches[0])
    assert len(seen) == 8


def test_augment_is_seeded_and_keeps_values_in_range():
    cfg = Config(aug_rotate=20, aug_shift=0.05, aug_zoom=0.1, aug_brightness=0.2)
    images = torch.rand(16, 3, 32, 32)
    a = augment(images, cfg, torch.Generator().manual_seed(3))
    b = augment(images, cfg, torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and a.shape == images.shape
    assert a.min() >= 0 and a.max() <= 1
    off = Config(aug_flips=False, aug_rotate=0, aug_zoom=0, aug_shift=0)
    assert torch.equal(augment(images, off, torch.Generator()), images)


def test_small_rotation_of_a_centred_disk_changes_little():
    yy, xx = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    disk = (((yy - 15.5) ** 2 + (xx - 15.5) ** 2) < 64).float().expand(4, 3, 32, 32)
    rotate_only = Config(aug_flips=False, aug_rotate=30, aug_zoom=0, aug_shift=0)
    out = augment(disk, rotate_only, torch.Generator().manual_seed(0))
    assert (out - disk).abs().mean() < 0.02


@pytest.mark.parametrize("row, column, value, fragment", [
    (2, "Class1.1", "", "line 4: Class1.1 is ''"),            # an emptied cell
    (1, "Class2.1", "nan", "line 3: Class2.1 is 'nan'"),
    (0, "Class3.1", "-5", "line 2: Class3.1 is '-5'"),
    (3, "Class4.1", "oops", "line 5: Class4.1 is 'oops'"),
    (2, "GalaxyID", "1", "line 4: GalaxyID 1 repeats line 2"),
    (1, "GalaxyID", "99999999999999999999999", "line 3: GalaxyID '99999999999999999999999' is not"),
    (1, "GalaxyID", "-7", "line 3: GalaxyID '-7' is not"),
])
def test_edited_labels_are_refused_naming_file_line_and_fix(tmp_path, row, column, value, fragment):
    write_processed(tmp_path, [1, 2, 3, 4])
    table = pd.read_csv(tmp_path / "labels.csv", dtype=str)
    table.loc[row, column] = value
    table.to_csv(tmp_path / "labels.csv", index=False)
    with pytest.raises(DataError) as caught:
        read_labels(str(tmp_path))
    message = str(caught.value)
    assert fragment in message and str(tmp_path / "labels.csv") in message and "re-run `python preprocess.py" in message
    assert "\n" not in message


def test_labels_allow_float_noise_around_zero_and_one(tmp_path):
    write_processed(tmp_path, [1, 2])
    table = pd.read_csv(tmp_path / "labels.csv")
    table.loc[0, "Class1.1"], table.loc[1, "Class1.2"] = -1e-7, 1 + 1e-7
    table.to_csv(tmp_path / "labels.csv", index=False)
    galaxy_ids, vote_fractions = read_labels(str(tmp_path))
    assert galaxy_ids.tolist() == [1, 2] and vote_fractions.min() >= 0 and vote_fractions.max() <= 1


def test_truncated_png_is_named_with_the_fix(tmp_path):
    write_processed(tmp_path, [1, 2])
    png = tmp_path / "train" / "2.png"
    png.write_bytes(png.read_bytes()[:-2000])
    with pytest.raises(DataError, match=r"2\.png cannot be read .*re-makes it from its JPEG"):
        load_training_set(Config(processed_dir=str(tmp_path)))


def votes(**fractions):
    """A 37-vector from {"Class1_2": 0.8, ...} (dots written as underscores); the rest 0."""
    vector = np.zeros(len(LABEL_COLUMNS), np.float32)
    for column, value in fractions.items():
        vector[LABEL_COLUMNS.index(column.replace("_", "."))] = value
    return vector


def test_vote_summary_follows_the_tree():
    smooth = votes(Class1_1=0.8, Class1_2=0.15, Class1_3=0.05, Class7_1=0.6, Class7_2=0.2, Class6_2=0.9, Class6_1=0.1)
    assert vote_summary(smooth) == "smooth; completely round"
    edge_on = votes(Class1_2=0.9, Class1_1=0.1, Class2_1=0.7, Class2_2=0.2, Class9_2=0.5, Class9_1=0.2,
                    Class6_1=0.6, Class6_2=0.4, Class8_7=0.5, Class8_1=0.1)
    assert vote_summary(edge_on) == "features or disk; edge-on; boxy bulge; odd: dust lane"
    spiral = votes(Class1_2=0.9, Class1_1=0.1, Class2_2=0.85, Class2_1=0.05, Class3_2=0.6, Class3_1=0.25,
                   Class4_1=0.7, Class4_2=0.15, Class10_1=0.4, Class10_2=0.2, Class11_2=0.5, Class11_6=0.1,
                   Class5_2=0.5, Class5_3=0.3, Class6_2=0.8)
    assert vote_summary(spiral) == ("features or disk; not edge-on; no bar; spiral, 2 arms, tight winding; "
                                    "bulge just noticeable")
