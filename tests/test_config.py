import pytest

from config import Config, build_config, config_from_dict, get_config, parse_overrides


def test_overrides_are_typed():
    overrides, _ = parse_overrides(["--epochs=3", "--lr=0.01", "--crop=center", "--tta=true", "--show"])
    assert overrides == {"epochs": 3, "lr": 0.01, "crop": "center", "tta": True, "show": True}


@pytest.mark.parametrize("argv, fragment", [
    (["--nope=1"], "unknown key --nope; valid keys:"),
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


def test_positional_arguments():
    cfg, args = get_config(["100008", "--out_dir=x"], positional=("galaxy_id",))
    assert args == {"galaxy_id": "100008"} and cfg.out_dir == "x"
    with pytest.raises(SystemExit):
        get_config([], positional=("galaxy_id",))


def test_demo_moves_paths_unless_given():
    cfg = build_config({"demo": True})
    assert cfg.raw_dir == "data/demo/raw" and cfg.processed_dir == "data/demo/processed"
    assert build_config({"demo": True, "out_dir": "mine"}).out_dir == "mine"


def test_config_round_trips_through_a_dict():
    cfg = Config(epochs=7)
    assert config_from_dict({**cfg.to_dict(), "retired_key": 1}) == cfg
