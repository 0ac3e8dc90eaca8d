import ast
from dataclasses import fields

import pytest

from config import (MIN_IMAGE_SIZE, Config, build_config, config_from_dict, cpu_count, get_config, help_text,
                    key_meanings, max_workers, parse_overrides, script_keys)
from helpers import REPO, one_line_error, run_script


def test_overrides_are_typed():
    overrides, _ = parse_overrides(["--epochs=3", "--lr=0.01", "--crop=center", "--tta=true", "--show"])
    assert overrides == {"epochs": 3, "lr": 0.01, "crop": "center", "tta": True, "show": True}


@pytest.mark.parametrize("argv, fragment", [
    (["--nope=1"], "unknown key --nope; see python"),
    (["--epochs=three"], "--epochs takes a int"),
    (["--tta=maybe"], "--tta takes true or false"),
    (["--epochs"], "--epochs needs a value"),
])
def test_bad_overrides_are_one_line_errors(argv, fragment, capsys):
    with pytest.raises(SystemExit) as exit_info:
        get_config(argv)
    message = str(exit_info.value.code)
    assert fragment in message and "\n" not in message


@pytest.mark.parametrize("overrides, fragment", [
    ({"batch_size": 0}, "batch_size"), ({"lr": -1.0}, "lr"), ({"crop": "square"}, "crop"),
    ({"val_fraction": 0.6, "test_fraction": 0.5}, "val_fraction"),
])
def test_impossible_configs_are_refused(overrides, fragment):
    with pytest.raises(ValueError, match=fragment):
        build_config(overrides)


FLOAT_KEYS = [f.name for f in fields(Config) if f.type is float]


@pytest.mark.parametrize("key", FLOAT_KEYS)
@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
def test_every_float_key_must_be_finite(key, value):
    with pytest.raises(ValueError, match=f"impossible config: {key} must be a finite number, not {value}"):
        build_config({key: value})


@pytest.mark.parametrize("argv, fragment", [
    (["--lr=inf"], "lr must be a finite number, not inf"),
    (["--weight_decay=inf"], "weight_decay must be a finite number, not inf"),
    (["--aug_shift=nan"], "aug_shift must be a finite number, not nan"),
    (["--threads=-3"], "threads must not be negative (0 = torch's default)"),
    (["--workers=10000"], f"workers must be at most {max_workers()} on this machine ({cpu_count()} cores"),
    (["--workers=0"], "workers must be at least 1"),
    (["--threads=10000"], f"threads must be at most {max_workers()} on this machine"),
    (["--members_at_once=10000"], f"members_at_once must be at most {max_workers()} on this machine"),
    (["--image_size=16"], "image_size must lie in 18..424"),
    (["--image_size=17"], "image_size must lie in 18..424"),
    (["--image_size=425"], "image_size must lie in 18..424"),
    (["--center_crop_size=0"], "center_crop_size must lie in 8..424 (pixels of Kaggle's 424-px frame)"),
    (["--center_crop_size=-50"], "center_crop_size must lie in 8..424"),
    (["--center_crop_size=7"], "center_crop_size must lie in 8..424"),
    (["--center_crop_size=425"], "center_crop_size must lie in 8..424"),
    (["--roi_min_size=0"], "roi_min_size must be at least 1"),
    (["--roi_pad=-0.5"], "roi_pad must not be negative"),
    (["--roi_pad=nan"], "roi_pad must be a finite number, not nan"),
    (["--aug_zoom=1"], "aug_zoom must lie in [0, 1)"),
    (["--aug_shift=-0.1"], "aug_shift must lie in [0, 1)"),
    (["--aug_rotate=-5"], "aug_rotate must lie in [0, 180]"),
    (["--aug_brightness=2"], "aug_brightness must lie in [0, 1]"),
    (["--seed=-1"], "seed and split_seed must lie in 0..4294967295"),
    (["--split_seed=99999999999999999999"], "seed and split_seed must lie in 0..4294967295"),
    (["--max_steps=-1"], "max_steps must not be negative"),
    (["--demo_train=-5"], "demo_train and demo_test must not be negative"),
    (["--similar=100000"], "similar must lie in 0..64"),
])
def test_out_of_range_values_are_one_line_errors(argv, fragment):
    with pytest.raises(SystemExit) as exit_info:
        get_config(argv)
    message = str(exit_info.value.code)
    assert message.startswith("error: impossible config: ") and fragment in message and "\n" not in message


def test_the_bounds_themselves_are_accepted():
    for overrides in ({"image_size": MIN_IMAGE_SIZE}, {"image_size": 424}, {"center_crop_size": 8},
                      {"center_crop_size": 424}, {"roi_min_size": 1}, {"roi_pad": 0.0}, {"threads": 0},
                      {"threads": max_workers()}, {"workers": max_workers()}, {"aug_rotate": 180.0},
                      {"aug_brightness": 1.0}, {"seed": 0, "split_seed": 2 ** 32 - 1}, {"workers": cpu_count()}):
        build_config(overrides)


def test_a_checkpoints_config_is_not_held_to_this_machines_bounds():
    other_machine = Config(workers=10 * max_workers(), threads=10 * max_workers())   # trained on a bigger one
    assert other_machine.validate(this_machine=False) is other_machine
    with pytest.raises(ValueError, match="workers must be at most"):
        other_machine.validate()


@pytest.mark.parametrize("script", ["train.py", "predict.py"])
def test_negative_threads_are_a_one_line_error_in_every_script(script):
    assert "threads must not be negative" in one_line_error(run_script(script, "--threads=-3"))


def test_positional_arguments():
    cfg, args = get_config(["100008", "--out_dir=x"], positional=("galaxy_id",))
    assert args == {"galaxy_id": "100008"} and cfg.out_dir == "x"
    with pytest.raises(SystemExit):
        get_config([], positional=("galaxy_id",))


def test_a_missing_or_extra_positional_argument_names_the_usage():
    with pytest.raises(ValueError, match=r"expected <galaxy_id>, got none; usage: python .* <galaxy_id> \[--key"):
        parse_overrides([], positional=("galaxy_id",))
    with pytest.raises(ValueError, match="expected no positional arguments, got foo bar; usage"):
        parse_overrides(["foo", "bar"])


def test_demo_moves_paths_unless_given():
    cfg = build_config({"demo": True})
    assert cfg.raw_dir == "data/demo/raw" and cfg.processed_dir == "data/demo/processed"
    assert build_config({"demo": True, "out_dir": "mine"}).out_dir == "mine"


def test_config_round_trips_through_a_dict():
    cfg = Config(epochs=7)
    assert config_from_dict({**cfg.to_dict(), "retired_key": 1}) == cfg


# --- --help ------------------------------------------------------------------------------------

SCRIPTS = {   # each script's --help must list at least these keys, which it obviously reads
    "preprocess.py": ["crop", "raw_dir", "processed_dir", "image_size", "demo"],
    "train.py": ["epochs", "lr", "batch_size", "out_dir"],
    "predict.py": ["checkpoint", "tta", "split"],
    "plot_image.py": ["checkpoint", "show"],
    "bench.py": ["raw_dir", "workers", "epochs", "scale"],
    "model.py": ["image_size", "output"],
}
# the modules whose cfg reads are a script's own: train.py's run set-up lives in runs.py
READ_FOR = {"train.py": ["galaxy/runs.py", "galaxy/training.py"]}


def test_every_key_has_a_one_line_meaning_in_config_py():
    meanings = key_meanings()
    for field in fields(Config):
        assert meanings.get(field.name), f"{field.name} has no comment in config.py"
    assert meanings["epochs"] == "passes over the training split"


def test_help_text_shows_usage_docstring_type_default_and_meaning():
    text = help_text("Do one thing.\n\n    python x.py --epochs=3\n", ["epochs", "tta", "amp", "checkpoint"],
                     ["galaxy_id"])
    lines = text.splitlines()
    assert lines[0].startswith("usage: python ") and lines[0].endswith(" <galaxy_id> [--key=value ...]")
    assert "Do one thing." in lines and "    python x.py --epochs=3" in lines
    assert any(line.split() == ["--epochs=<int>", "80", "passes", "over", "the", "training", "split"] for line in lines)
    assert any(line.split()[:4] == ["--tta", "|", "--tta=false", "false"] for line in lines)
    assert any(line.split()[:2] == ["--amp=auto|true|false", "auto"] for line in lines)
    assert any(line.split()[:2] == ["--checkpoint=<str>", '""'] for line in lines)
    assert "--lr" not in text


def _keys_read_in(script):
    """The Config keys a script's own code reads as cfg.<key>."""
    tree = ast.parse((REPO / script).read_text())
    keys = {f.name for f in fields(Config)}
    return {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name) and node.value.id == "cfg" and node.attr in keys}


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_each_script_lists_every_key_it_reads(script):
    keys = set(script_keys(script[:-3]))
    assert set(SCRIPTS[script]) <= keys
    for source in [script, *READ_FOR.get(script, [])]:
        assert _keys_read_in(source) <= keys, source


def test_every_key_has_a_meaning_and_a_reader():
    for f in fields(Config):
        assert f.metadata["meaning"] and "\n" not in f.metadata["meaning"], f.name
        assert f.metadata["scripts"], f.name


@pytest.mark.parametrize("flag", ["-h", "--help"])
@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_help_exits_0_with_usage_and_keys(script, flag):
    result = run_script(script, flag)
    assert result.returncode == 0 and not result.stderr, result.stderr
    assert result.stdout.startswith(f"usage: python {script} ")
    for key in SCRIPTS[script]:
        assert f"--{key}" in result.stdout
    if script == "plot_image.py":
        assert "usage: python plot_image.py <galaxy> [--key=value ...]" in result.stdout
    if script == "bench.py":
        assert "<accuracy|curve|finetune|gpu|preprocess|scale|similar|survey|train>" in result.stdout


def test_unknown_key_points_to_help():
    result = run_script("predict.py", "--chekpoint=x")
    assert result.returncode != 0
    assert result.stderr.strip() == "error: unknown key --chekpoint; see python predict.py --help for the valid keys"
