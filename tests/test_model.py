import pytest
import torch

from PIL import Image
import numpy as np

from config import MIN_IMAGE_SIZE, Config, build_config, max_workers
from dataset import LABEL_COLUMNS, QUESTIONS, dihedral
from galaxy.checkpoints import CheckpointError, load_model, load_state
from galaxy.inference import predict, rmse
from galaxy.numerics import NUMERICS_CANDIDATES, choose_numerics, numerics_name
from helpers import one_line_error, run_script, run_train, save_checkpoint
from model import DecisionTreeHead, GalaxyCNN, build_model, feature_side, flat_features, layer_table


def test_shapes_follow_the_seed_diagram():
    model = GalaxyCNN()
    assert flat_features(64) == 8192
    convs = [m for m in model.features.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size[0], c.padding[0]) for c in convs] == [
        (3, 64, 9, 1), (64, 128, 5, 1), (128, 256, 3, 1), (256, 512, 1, 1)]
    linears = [m for m in model.classifier if isinstance(m, torch.nn.Linear)]
    assert [(l.in_features, l.out_features) for l in linears] == [(8192, 1024), (1024, 2048), (2048, 37)]
    assert model.features(torch.rand(2, 3, 64, 64)).shape == (2, 8192)


def test_python_model_py_prints_each_layers_shape_and_the_weight_total():
    model = GalaxyCNN(output="tree")
    rows = layer_table(model, 64)
    assert [(name, shape) for name, shape, _ in rows] == [
        ("conv 9x9 + pool 1", (64, 29, 29)), ("conv 5x5 + pool 2", (128, 13, 13)), ("conv 3x3 + pool 3", (256, 6, 6)),
        ("conv 1x1 + pool 4", (512, 4, 4)), ("flatten", (8192,)), ("linear 8192 -> 1024", (1024,)),
        ("linear 1024 -> 2048", (2048,)), ("linear 2048 -> 37", (37,))]
    assert sum(weights for _, _, weights in rows) == sum(p.numel() for p in model.parameters())
    result = run_script("model.py", "--image_size=96")
    assert result.returncode == 0 and not result.stderr, result.stderr
    assert "linear 18432 -> 1024" in result.stdout
    assert result.stdout.splitlines()[-1].split()[:2] == ["total", "21,699,621"]


@pytest.mark.parametrize("output", ["sigmoid", "tree"])
def test_outputs_lie_in_the_open_unit_interval(output):
    model = GalaxyCNN(output=output).eval()
    vote_fractions = model(torch.rand(4, 3, 64, 64))
    assert vote_fractions.shape == (4, 37)
    assert (vote_fractions > 0).all() and (vote_fractions < 1).all()


def test_other_image_sizes_flatten_consistently():
    model = GalaxyCNN(image_size=96)
    assert model(torch.rand(1, 3, 96, 96)).shape == (1, 37)


def test_the_smallest_image_size_is_the_one_the_network_takes():
    # config.py restates the rule without torch: it must be the network's own, found by running it
    assert min(side for side in range(1, 64) if feature_side(side)) == MIN_IMAGE_SIZE == 18
    model = GalaxyCNN(image_size=MIN_IMAGE_SIZE, output="tree").eval()
    assert model(torch.rand(2, 3, MIN_IMAGE_SIZE, MIN_IMAGE_SIZE)).shape == (2, 37)
    assert flat_features(MIN_IMAGE_SIZE) == 512
    below = MIN_IMAGE_SIZE - 1
    with pytest.raises(RuntimeError, match="Output size is too small"):   # torch's own layers refuse one less
        model.features(torch.rand(1, 3, below, below))
    with pytest.raises(ValueError, match=f"image_size {below} is too small for the network"):
        GalaxyCNN(image_size=below)
    with pytest.raises(ValueError, match="image_size must lie in 18..424"):
        build_config({"image_size": below})
    assert build_model(build_config({"image_size": MIN_IMAGE_SIZE})).classifier[0].in_features == 512


def test_model_py_refuses_an_image_size_the_network_cannot_take():
    for side in (16, 17):
        assert "image_size must lie in 18..424" in one_line_error(run_script("model.py", f"--image_size={side}"))
    result = run_script("model.py", "--image_size=18")
    assert result.returncode == 0 and "linear 512 -> 1024" in result.stdout, result.stderr


def nan_checkpoint(path, cfg):
    """A checkpoint as train.py writes it whose first conv weight holds one NaN: a run that diverged."""
    save_checkpoint(path, cfg)
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["model"]["features.0.0.weight"][0, 0, 0, 0] = float("nan")
    torch.save(checkpoint, path)
    return path


def test_a_checkpoint_with_non_finite_weights_is_refused_by_every_script(tmp_path, data_args):
    path = nan_checkpoint(tmp_path / "diverged.pt", Config(image_size=64, output="tree"))
    fix = "holds non-finite weights (NaN or inf, first in features.0.0.weight): it diverged; use an earlier " \
          "checkpoint or retrain with a lower --lr"
    with pytest.raises(CheckpointError, match=r"non-finite weights \(NaN or inf"):
        load_model(path)
    image = tmp_path / "galaxy.png"
    Image.fromarray(np.full((64, 64, 3), 90, np.uint8)).save(image)
    runs = {"predict.py": run_script("predict.py", f"--checkpoint={path}", f"--images={image}",
                                     f"--out_dir={tmp_path / 'out'}", "--workers=1"),
            "plot_image.py": run_script("plot_image.py", str(image), f"--checkpoint={path}",
                                        f"--out_dir={tmp_path / 'out'}"),
            "train.py --init_from": run_train(*data_args, f"--init_from={path}", "--epochs=1",
                                              f"--out_dir={tmp_path / 'run'}", check=False)}
    for script, result in runs.items():
        assert f"checkpoint {path} {fix}" in one_line_error(result), script
    assert not (tmp_path / "run" / "last.pt").exists() and not list((tmp_path / "out").glob("*.csv"))


def test_resume_refuses_non_finite_weights_too():
    # train.py --resume loads last.pt's weights through load_state, as --init_from does
    state = GalaxyCNN(image_size=32).state_dict()
    state["classifier.0.bias"][3] = float("inf")
    with pytest.raises(CheckpointError, match=r"runs/last.pt holds non-finite weights .*classifier.0.bias"):
        load_state(GalaxyCNN(image_size=32), state, "runs/last.pt")
    with pytest.raises(CheckpointError, match="holds no weights"):
        load_state(GalaxyCNN(image_size=32), [1, 2], "runs/last.pt")


def test_a_checkpoint_from_a_machine_with_more_cores_still_loads(tmp_path):
    cfg = Config(image_size=32, workers=10 * max_workers(), threads=10 * max_workers())
    _, loaded = load_model(save_checkpoint(tmp_path / "big_machine.pt", cfg))
    assert loaded.workers == 10 * max_workers()


def column_sum(values, question_number):
    q = QUESTIONS[question_number - 1]
    return values[:, [LABEL_COLUMNS.index(c) for c in q.columns]].sum(1)


def column(values, name):
    return values[:, LABEL_COLUMNS.index(name)]


def test_tree_head_obeys_every_kaggle_sum_rule():
    torch.manual_seed(0)
    v = DecisionTreeHead()(torch.randn(256, 37) * 4)
    ones = torch.ones(len(v))
    rules = {1: ones, 2: column(v, "Class1.2"), 3: column(v, "Class2.2"), 4: column(v, "Class2.2"),
             5: column(v, "Class2.2"), 6: ones, 7: column(v, "Class1.1"), 8: column(v, "Class6.1"),
             9: column(v, "Class2.1"), 10: column(v, "Class4.1"), 11: column(v, "Class4.1")}
    for question, expected in rules.items():
        torch.testing.assert_close(column_sum(v, question), expected, msg=f"Q{question}")


def test_question_table_names_every_answer():
    assert len(LABEL_COLUMNS) == 37 and LABEL_COLUMNS[0] == "Class1.1" and LABEL_COLUMNS[-1] == "Class11.6"
    assert all(q.text and all(q.answers) for q in QUESTIONS)


def test_rmse_is_the_kaggle_metric():
    predictions, targets = torch.zeros(2, 37), torch.zeros(2, 37)
    targets[0, 0] = 1.0  # one error of 1 among 74 entries
    assert rmse(predictions, targets) == pytest.approx((1 / 74) ** 0.5)


def test_predict_batches_and_tta_agree_with_direct_calls():
    torch.manual_seed(0)
    model = GalaxyCNN().eval()
    images = torch.randint(0, 256, (5, 3, 64, 64), dtype=torch.uint8)
    direct = model(images.float() / 255)
    torch.testing.assert_close(predict(model, images, batch_size=2), direct)
    views = torch.stack([model(dihedral(images.float() / 255, k)) for k in range(8)])
    torch.testing.assert_close(predict(model, images, tta=True), views.mean(0))


def test_load_model_explains_bad_checkpoints(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_model(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_model(tmp_path / "junk.pt")
    cfg = Config(output="tree")
    state = GalaxyCNN(image_size=96).state_dict()
    torch.save({"model": state, "config": cfg.to_dict()}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="different model"):
        load_model(tmp_path / "other.pt")


@pytest.mark.parametrize("amp, channels_last, expected", [
    ("false", "false", (False, False)), ("true", "true", (True, True)), ("true", "false", (True, False))])
def test_forced_numerics_are_kept_without_timing(amp, channels_last, expected):
    said = []
    assert choose_numerics(amp, channels_last, None, torch.device("cpu"), 8, 32, True, log=said.append) == expected
    assert said == []


def test_auto_numerics_on_cpu_time_a_copy_and_leave_weights_and_randomness_alone():
    torch.manual_seed(0)
    model = GalaxyCNN(image_size=32, output="tree", dropout=0.1)
    before = {key: value.clone() for key, value in model.state_dict().items()}
    rng = torch.get_rng_state()
    said = []
    amp, channels_last = choose_numerics("auto", "false", model, torch.device("cpu"), 4, 32, True, log=said.append)
    assert channels_last is False and amp in (True, False)
    assert "fp32 NCHW" in said[0] and "bf16 NCHW" in said[0] and "channels_last" not in said[0].split("->")[0]
    assert all(torch.equal(before[key], value) for key, value in model.state_dict().items())
    assert torch.equal(rng, torch.get_rng_state())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_auto_numerics_on_cuda_time_every_candidate_and_leave_weights_and_randomness_alone():
    device = torch.device("cuda")
    torch.manual_seed(0)
    model = GalaxyCNN(image_size=32, output="tree", dropout=0.1).to(device)
    before = {key: value.clone() for key, value in model.state_dict().items()}
    rng, cuda_rng = torch.get_rng_state(), torch.cuda.get_rng_state(device)
    said = []
    choice = choose_numerics("auto", "auto", model, device, 8, 32, True, log=said.append)
    assert choice in NUMERICS_CANDIDATES
    assert all(numerics_name(*candidate) in said[0] for candidate in NUMERICS_CANDIDATES)
    assert all(torch.equal(before[key], value) for key, value in model.state_dict().items())
    assert torch.equal(rng, torch.get_rng_state()) and torch.equal(cuda_rng, torch.cuda.get_rng_state(device))


def test_predict_in_bf16_channels_last_is_close_to_fp32():
    torch.manual_seed(0)
    model = GalaxyCNN(image_size=32, output="tree", dropout=0.1).eval()
    images = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8)
    fp32 = predict(model, images, batch_size=4)
    bf16 = predict(model, images, batch_size=4, amp=True, channels_last=True, tta=True)
    assert bf16.dtype == torch.float32 and (bf16 - fp32).abs().max() < 0.05


@pytest.mark.parametrize("change, fragment", [
    ({"output": "bogus"}, "output must be sigmoid or tree"),
    ({"image_size": "64"}, "image_size is '64' (str), not a int"),
    ({"dropout": True}, "dropout is True (bool), not a float"),
])
def test_checkpoint_with_an_unusable_config_names_the_checkpoint(tmp_path, change, fragment):
    cfg = Config(image_size=32)
    torch.save({"model": GalaxyCNN(image_size=32).state_dict(), "config": {**cfg.to_dict(), **change}},
               tmp_path / "odd.pt")
    with pytest.raises(CheckpointError) as error:
        load_model(tmp_path / "odd.pt")
    message = str(error.value)
    assert f"checkpoint {tmp_path / 'odd.pt'} holds an unusable config" in message and fragment in message
    assert "\n" not in message


def test_checkpoint_config_accepts_ints_for_floats_and_old_boolean_switches(tmp_path):
    saved = {**Config(image_size=32).to_dict(), "lr": 1, "amp": True, "channels_last": False, "gone_key": 3}
    torch.save({"model": GalaxyCNN(image_size=32).state_dict(), "config": saved}, tmp_path / "old.pt")
    _, cfg = load_model(tmp_path / "old.pt")
    assert cfg.lr == 1 and cfg.amp == "true" and cfg.channels_last == "false"
