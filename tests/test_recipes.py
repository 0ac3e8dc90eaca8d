"""Recipes (galaxy/recipes.py, recipes/*.py): every recipe file loads and says what it scored, and
`python train.py --recipe=...` preprocesses each crop, trains each member, evaluates them, resumes."""
import pandas as pd
import pytest

from config import build_config
from galaxy import recipes
from galaxy.recipes import crop_slug, load_recipe, member_plan, processed_dir_for
from helpers import SMALL, one_line_error, run_train

TWO_CROPS = '''"""Two crops, one member each: the tests' recipe."""
common = {"dropout": 0.1, "members_at_once": 2}
groups = [
    {"name": "center160", "crop": "center", "center_crop_size": 160, "seed": 1, "members": 1},
    {"name": "roi", "crop": "roi", "seed": 7, "members": 1},
]
'''


def test_every_recipe_loads_describes_itself_and_scores_the_same_test_galaxies():
    assert {"defaults", "four_crops", "final_fit", "gpu_ensemble"} <= set(recipes.available())
    for name in recipes.available():
        recipe = load_recipe(name)
        assert "test RMSE" in recipe.doc and f"--recipe={name}" in recipe.doc, name
        for _, _, seed, settings in member_plan(recipe, {}):
            cfg = build_config({**settings, "seed": seed})
            assert cfg.split_seed == 1337 and cfg.val_fraction == 0.1 and cfg.test_fraction == 0.1, name


def test_every_recipe_but_the_defaults_names_the_keys_its_numbers_rest_on():
    """Its numbers must not move when config.py's defaults do: every member names its crop, epochs,
    augmentation, dropout and lr. member_settings reads the first member's."""
    rests_on = {"crop", "epochs", "aug_rotate", "aug_zoom", "aug_shift", "dropout", "lr"}
    for name in set(recipes.available()) - {"defaults"}:
        for _, _, _, settings in member_plan(load_recipe(name), {}):
            assert rests_on <= set(settings), (name, rests_on - set(settings))
            assert settings["crop"] == "roi" or "center_crop_size" in settings, name
    assert recipes.member_settings("flips_40") == {
        "epochs": 40, "aug_rotate": 0.0, "aug_zoom": 0.0, "aug_shift": 0.0, "dropout": 0.1, "lr": 1e-3,
        "crop": "center", "center_crop_size": 212}
    assert "train_on_val" not in recipes.member_settings("final_fit", without=("train_on_val",))


def test_four_crops_is_the_measured_ensemble():
    recipe = load_recipe("four_crops")
    assert recipe.common == {"train_on_val": True, "epochs": 80, "aug_rotate": 180.0, "aug_zoom": 0.1,
                             "aug_shift": 0.03, "dropout": 0.05, "lr": 5e-4, "members_at_once": 2}
    plan = member_plan(recipe, {})
    crops = sorted({crop_slug(build_config(settings)) for _, _, _, settings in plan})
    assert crops == ["c128", "c160", "c212", "roi"]
    assert sorted(seed for _, _, seed, _ in plan) == [501] * 4 + [502] * 4
    final_fit = member_plan(load_recipe("final_fit"), {})
    assert [(seed, crop_slug(build_config(settings))) for _, _, seed, settings in final_fit] == [(501, "c160")]
    gpu = member_plan(load_recipe("gpu_ensemble"), {})
    assert len(gpu) == 17 and min(seed for _, _, seed, _ in gpu) == 101
    assert all(build_config(settings).epochs == 160 and not build_config(settings).train_on_val
               for _, _, _, settings in gpu)


def test_each_crop_gets_a_folder_of_its_own():
    assert crop_slug(build_config({})) == "c128"
    assert crop_slug(build_config({"crop": "roi", "image_size": 96})) == "roi_s96"
    assert processed_dir_for("data/processed/", build_config({"center_crop_size": 212})) == "data/processed_c212"


@pytest.mark.parametrize("text, fragment", [
    ('common = {"epoch": 3}\ngroups = [{"name": "a", "seed": 1, "members": 1}]', "unknown key 'epoch' in common"),
    ('groups = [{"name": "a", "seed": 1, "members": 1, "crop": "square"}]', "group a: impossible config: crop"),
    ('groups = [{"name": "a", "seed": 1, "members": 0}]', "group a needs members"),
    ('groups = [{"name": "a", "seed": 1, "members": 1}, {"name": "a", "seed": 2, "members": 1}]', "a name of its own"),
    ('common = {"out_dir": "x"}\ngroups = [{"name": "a", "seed": 1, "members": 1}]', "'out_dir' in common"),
    ('common = {}', "groups must be a non-empty list"),
    ('common = {\n', "cannot be read as a recipe: SyntaxError"),
])
def test_bad_recipes_are_errors_naming_the_file(tmp_path, text, fragment):
    path = tmp_path / "bad.py"
    path.write_text(text)
    with pytest.raises(ValueError, match=fragment) as error:
        load_recipe(str(path))
    assert str(path) in str(error.value) and "\n" not in str(error.value)
    with pytest.raises(ValueError, match="no file .*recipes/nope.py; name one of recipes/ \\(defaults"):
        load_recipe("nope")


def test_recipe_runs_end_to_end_and_a_rerun_resumes(demo_raw, tmp_path):
    recipe = tmp_path / "two_crops.py"
    recipe.write_text(TWO_CROPS)
    args = [f"--recipe={recipe}", f"--raw_dir={demo_raw}", f"--processed_dir={tmp_path / 'data'}",
            f"--out_dir={tmp_path / 'runs'}", "--epochs=1", "--workers=1", *SMALL]
    first = run_train(*args).stdout
    for folder in ("data_c160", "data_roi"):
        assert len(list((tmp_path / folder / "train").glob("*.png"))) == 96, folder
        assert f"preprocess {demo_raw} -> {tmp_path / folder}" in first
    runs = tmp_path / "runs"
    for member in ("center160/member_1", "roi/member_1"):
        assert (runs / member / "best.pt").is_file() and (runs / member / "train.log").is_file()
    table = pd.read_csv(runs / "eval_test_members.csv")
    assert sum(table["model"].str.endswith("member_1/best.pt")) == 2 and "ensemble" in set(table["model"])
    assert "recipe two_crops: test RMSE" in first.splitlines()[-1]
    second = run_train(*args).stdout
    assert "center160 member 1: done, skipped" in second and "roi member 1: done, skipped" in second
    assert "0 PNGs written, 112 already present" in second
    assert not any(line.startswith("train ") for line in second.splitlines())   # no member left to train

    unknown = tmp_path / "unknown.py"
    unknown.write_text('common = {"dropuot": 0.1}\ngroups = [{"name": "a", "seed": 1, "members": 1}]\n')
    error = one_line_error(run_train(f"--recipe={unknown}", f"--out_dir={tmp_path / 'x'}", check=False))
    assert str(unknown) in error and "'dropuot'" in error
    error = one_line_error(run_train(f"--recipe={recipe}", "--seed=3", check=False))
    assert error.startswith("error: --seed does not apply with --recipe")
