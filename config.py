"""Every path and hyperparameter of the project, with its default, in one place.

Any script takes ``--key=value`` overrides of these keys on its command line
(``--key`` alone sets a boolean key to true), and lists the keys it reads with -h or --help:

    python train.py --epochs=5 --device=cpu --output=tree
    python train.py --help

Each key is declared once, with its default, its one-line meaning (what --help prints) and the
scripts that read it (which keys each script's --help lists).

The checkpoint carries the config it was trained with, so evaluation and
prediction rebuild exactly the same model and crop.
"""
from dataclasses import asdict, dataclass, field, fields
import math
import os
import sys


def cpu_count():
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS and Windows have no affinity mask
        return os.cpu_count() or 1


def max_workers():
    """The most worker processes (and torch threads) a command may ask for: 4 per core, at most 64,
    but never fewer than the cores (the default). Each worker is a fork of a process that may
    hold GBs, so --workers=10000 would exhaust the machine long before it sped anything up."""
    return max(cpu_count(), min(4 * cpu_count(), 64))


# The smallest image side GalaxyCNN takes: every conv and pool of model.py must leave at least one
# pixel (18 -> conv 9x9 12 -> pool 6 -> conv 5x5 4 -> pool 2 -> conv 3x3 2 -> pool 1 -> conv 1x1 3 -> pool 1).
# config.py imports no torch, so the rule is restated here; tests/test_model.py checks it against the network.
MIN_IMAGE_SIZE = 18
FRAME_SIDE = 424                 # Kaggle's JPEGs are 424 x 424; center_crop_size is in its pixels
MIN_CENTER_CROP = 8              # a smaller square is a few pixels blown up to image_size: flat colour, no galaxy
MAX_SEED = 2 ** 32 - 1           # numpy wants seeds >= 0, torch.manual_seed below 2**64 (train.py multiplies it)
MAX_SIMILAR = 64                 # plot_image.py --similar draws one row of thumbnails


# The command-line scripts, by the name each key lists in `scripts` (what its --help shows and reads)
PRE, TRAIN, PREDICT, PLOT, MODEL, BENCH = "preprocess", "train", "predict", "plot_image", "model", "bench"
CROP_READERS = (PRE, PLOT, BENCH)   # the crop keys: preprocessing, and cropping a raw image the same way


def key(default, meaning, *scripts):
    """A config key: its default, its one-line meaning for --help, and the scripts that read it."""
    return field(default=default, metadata={"meaning": meaning, "scripts": scripts})


@dataclass
class Config:
    # --- paths -------------------------------------------------------------
    raw_dir: str = key("data/raw", "Kaggle's files, zipped or extracted", PRE, PREDICT, PLOT, BENCH)
    processed_dir: str = key("data/processed", "train/, test/ PNGs and labels.csv", PRE, TRAIN, PREDICT, PLOT, BENCH)
    out_dir: str = key("runs", "checkpoints, metrics, plots and predictions go here", TRAIN, PREDICT, PLOT, BENCH)
    demo: bool = key(False, "use the synthetic data set under demo_dir", PRE, TRAIN, PREDICT, PLOT, BENCH)
    demo_dir: str = key("data/demo", "the synthetic set's raw/ and processed/ live here", PRE, TRAIN, PREDICT, PLOT,
                        BENCH)

    # --- preprocessing -----------------------------------------------------
    image_size: int = key(64, "side of the square PNG fed to the network", *CROP_READERS, TRAIN, MODEL)
    crop: str = key("center", "center: a fixed central square of center_crop_size; roi: the galaxy's own box",
                    *CROP_READERS)
    roi_threshold: float = key(0.1, "crop=roi: fraction of the central brightness above the sky that counts as "
                               "galaxy", *CROP_READERS)
    roi_pad: float = key(0.2, "crop=roi: the galaxy's box grows by this fraction of its side", *CROP_READERS)
    roi_min_size: int = key(48, "crop=roi: smallest crop side in raw pixels (a tiny galaxy is not blown up)",
                            *CROP_READERS)
    center_crop_size: int = key(128, "crop=center: side of the central square in pixels of a 424-px frame (the "
                                "same fraction of any other)", *CROP_READERS)
    workers: int = key(cpu_count(), "processes for preprocessing, data loading and prediction", PRE, TRAIN, PREDICT,
                       BENCH)
    ids: str = key("", "preprocess only the galaxies whose GalaxyID is in this CSV (a GalaxyID column) or text "
                   "file (one ID per line)", PRE, TRAIN, BENCH)
    demo_train: int = key(2000, "synthetic training galaxies written by --demo", PRE, BENCH)
    demo_test: int = key(200, "synthetic test galaxies written by --demo", PRE, BENCH)

    # --- data split and augmentation ----------------------------------------
    split_seed: int = key(1337, "fixes which galaxies are train, val and test (out_dir/split.csv)", TRAIN, BENCH)
    seed: int = key(1337, "initial weights, shuffling, augmentation and dropout; the --demo galaxies", PRE, TRAIN,
                    BENCH)
    val_fraction: float = key(0.1, "share of the labelled galaxies held out for validation", TRAIN, BENCH)
    test_fraction: float = key(0.1, "share held out for the final test (predict.py --split=test)", TRAIN, BENCH)
    train_on_val: bool = key(False, "final fit: train on the val galaxies too (no val RMSE; best.pt = last epoch)",
                             TRAIN, BENCH)
    aug_flips: bool = key(True, "the 8 rotations/flips of the square", TRAIN, BENCH)
    aug_rotate: float = key(180.0, "max extra rotation in degrees (0 = off)", TRAIN, BENCH)
    aug_shift: float = key(0.03, "max shift as a fraction of the image side (0 = off)", TRAIN, BENCH)
    aug_zoom: float = key(0.1, "max relative zoom in or out (0 = off)", TRAIN, BENCH)
    aug_brightness: float = key(0.0, "max relative brightness change (0 = off)", TRAIN, BENCH)

    # --- model -------------------------------------------------------------
    output: str = key("tree", "tree: vote fractions that obey the decision tree; sigmoid: 37 independent outputs",
                      TRAIN, MODEL, BENCH)
    dropout: float = key(0.05, "dropout after each hidden linear layer", TRAIN, MODEL, BENCH)

    # --- training ----------------------------------------------------------
    device: str = key("auto", "auto (CUDA when present) | cpu | cuda", TRAIN, PREDICT, PLOT, BENCH)
    epochs: int = key(80, "passes over the training split", TRAIN, BENCH)
    batch_size: int = key(64, "images per optimizer step (per process under torchrun); predict.py: per batch",
                          TRAIN, PREDICT, BENCH)
    lr: float = key(5e-4, "Adam's peak learning rate", TRAIN, BENCH)
    weight_decay: float = key(0.0, "Adam's L2 penalty on the weights", TRAIN, BENCH)
    ema: float = key(0.0, "decay per step of a moving average of the weights, which val and best.pt use (0 = off)",
                     TRAIN, BENCH)
    schedule: str = key("onecycle", "learning rate schedule: onecycle | cosine (after a warm-up) | constant", TRAIN,
                        BENCH)
    amp: str = key("auto", "bf16 autocast: auto (whichever runs faster here, timed at start-up) | true | false",
                   TRAIN, PREDICT, PLOT, BENCH)
    channels_last: str = key("auto", "NHWC memory layout: auto (timed with amp) | true | false", TRAIN, PREDICT,
                             PLOT, BENCH)
    resume: bool = key(False, "go on from out_dir/last.pt; --catalog: skip ids already written", TRAIN, PREDICT, BENCH)
    init_from: str = key("", "start a new run from this checkpoint's weights (fresh optimizer, schedule, epoch 0)",
                         TRAIN, BENCH)
    members: int = key(1, "ensemble: this many runs, seeds seed, seed+1, ... in out_dir/member_1, member_2, ...",
                       TRAIN, BENCH)
    members_at_once: int = key(1, "ensemble: train this many members side by side", TRAIN, BENCH)
    recipe: str = key("", "a recipe (a name in recipes/ or a .py file): preprocess its crops, train its members, "
                      "evaluate them", TRAIN, BENCH)
    max_steps: int = key(0, "stop after this many optimizer steps (0 = no limit)", TRAIN, BENCH)
    threads: int = key(0, "torch CPU threads (0 = torch's default)", TRAIN, BENCH)

    # --- your own labels (fine-tuning) ---------------------------------------
    labels: str = key("", "train on your own labels: a folder of class folders, or a CSV/parquet table (a text label: "
                      "classes; numeric columns: numbers); with --init_from, fine-tune", TRAIN, PREDICT, PLOT, BENCH)
    label_columns: str = key("", "labels=<table>: its label column(s), comma-separated (default: label, else the "
                             "only other column, else every numeric one)", TRAIN, BENCH)
    images_dir: str = key("", "labels=<table> with an id column: the folder of its <id>.jpg images (default: the "
                          "table's)", TRAIN, BENCH)
    init_layers: str = key("hidden", "labels + init_from: the layers loaded: hidden (conv blocks and hidden linear "
                           "layers) | features (the conv blocks alone)", TRAIN, BENCH)
    freeze: str = key("none", "labels + init_from: none | features (the conv blocks) | hidden (conv blocks and hidden "
                      "linear layers: only the new head trains); frozen layers stay in eval mode", TRAIN, BENCH)
    lr_pretrained: float = key(0.1, "labels + init_from: the loaded layers' learning rate, as a multiple of lr",
                               TRAIN, BENCH)
    balance: str = key("weights", "labels of classes: weights (cross-entropy weighted by inverse class frequency) | "
                       "sampler (class-balanced batches, drawn with replacement) | none", TRAIN, BENCH)

    # --- evaluation and prediction -----------------------------------------
    checkpoint: str = key("", ".pt file, run folder (best.pt or member_*/best.pt), glob or comma list; 2+: ensemble",
                          PREDICT, PLOT)
    split: str = key("kaggle", "kaggle (the unlabelled test set) | test | val | all (every galaxy, with --embed)",
                     PREDICT)
    tta: bool = key(False, "average over the 8 rotations/flips", PREDICT, PLOT)
    images: str = key("", "predict these image files instead (a folder, a glob or one file)", PREDICT)
    embed: bool = key(False, "also write each galaxy's 2048 penultimate features (embeddings.npy)", PREDICT)
    catalog: str = key("", "predict a survey table: CSV or parquet of ids and images (docs/survey.md)", PREDICT)
    output_file: str = key("", "--catalog/--join output: .parquet or .csv (or out_dir/predictions.parquet)", PREDICT)
    id_column: str = key("id", "--catalog: its column of unique galaxy ids", PREDICT)
    file_column: str = key("file", "--catalog: its column of images (JPEG, PNG, FITS), relative to it", PREDICT)
    band_columns: str = key("", "--catalog: three columns of one-band FITS files, in g,r,i order", PREDICT)
    shard: str = key("", "--catalog: the part K/N to predict (K from 0), or env (torchrun's or Slurm's)", PREDICT)
    join: str = key("", "join the shard outputs this glob names into output_file (with --catalog: all of it)", PREDICT)
    calibration: str = key("", "the calibration.json of the sigma in *_std.csv (default: beside best.pt, in the "
                           "member_* folder, or out_dir for a list; fitted on val when missing)", PREDICT, PLOT)
    similar: int = key(0, "show this many most similar galaxies (needs embeddings)", PLOT)
    embeddings: str = key("", "the folder with embeddings.npy (written by predict.py --embed)", PLOT)
    show: bool = key(False, "open a window as well as saving the figure", PLOT)

    # --- benchmarks -----------------------------------------------------------
    scale: float = key(1.0, "bench.py scale: fraction of Kaggle's 61,578 + 79,975 images (survey: of 1M rows)", BENCH)

    def __post_init__(self):
        for key in SWITCH_KEYS:   # checkpoints made before "auto" existed stored True or False
            setattr(self, key, _switch(getattr(self, key)))

    def validate(self, this_machine=True):
        """Raise ValueError for a setting that cannot work, with what to do instead.

        this_machine=False leaves out the bounds that depend on the machine (workers, threads,
        members_at_once): a checkpoint's config was made on the machine that trained it.
        """
        for f in fields(self):   # inf or nan passes every comparison below that it should fail, or none at all
            value = getattr(self, f.name)
            if f.type is float and isinstance(value, (int, float)) and not math.isfinite(value):
                raise ValueError(f"impossible config: {f.name} must be a finite number, not {value}")
        checks = [
            (self.crop in ("roi", "center"), "crop must be roi or center"),
            (self.output in ("sigmoid", "tree"), "output must be sigmoid or tree"),
            (self.device in ("auto", "cpu", "cuda"), "device must be auto, cpu or cuda"),
            (self.amp in ("auto", "true", "false"), "amp must be auto, true or false"),
            (self.channels_last in ("auto", "true", "false"), "channels_last must be auto, true or false"),
            (self.schedule in ("onecycle", "cosine", "constant"), "schedule must be onecycle, cosine or constant"),
            (self.split in ("kaggle", "test", "val", "all"), "split must be kaggle, test, val or all"),
            (self.split != "all" or self.embed, "split=all writes only embeddings: add --embed"),
            (0 <= self.similar <= MAX_SIMILAR, f"similar must lie in 0..{MAX_SIMILAR} (one row of thumbnails)"),
            (self.scale > 0, "scale must be positive, e.g. --scale=0.1"),
            (MIN_IMAGE_SIZE <= self.image_size <= FRAME_SIDE,
             f"image_size must lie in {MIN_IMAGE_SIZE}..{FRAME_SIDE}: below {MIN_IMAGE_SIZE} the network's "
             f"convolutions and poolings leave no pixel, above {FRAME_SIDE} it exceeds Kaggle's images"),
            (MIN_CENTER_CROP <= self.center_crop_size <= FRAME_SIDE,
             f"center_crop_size must lie in {MIN_CENTER_CROP}..{FRAME_SIDE} (pixels of Kaggle's {FRAME_SIDE}-px "
             f"frame), e.g. --center_crop_size=212"),
            (self.roi_min_size >= 1, "roi_min_size must be at least 1 (raw pixels), e.g. --roi_min_size=48"),
            (self.roi_pad >= 0, "roi_pad must not be negative"),
            (0 < self.roi_threshold < 1, "roi_threshold must lie in (0, 1)"),
            (self.batch_size > 0, "batch_size must be a positive integer, e.g. --batch_size=64"),
            (self.epochs > 0, "epochs must be a positive integer"),
            (self.max_steps >= 0, "max_steps must not be negative (0 = no limit)"),
            (self.lr > 0, "lr must be positive, e.g. --lr=1e-3"),
            (self.weight_decay >= 0, "weight_decay must not be negative"),
            (0 <= self.dropout < 1, "dropout must lie in [0, 1)"),
            (0 <= self.ema < 1, "ema must lie in [0, 1), e.g. --ema=0.998 (0 = off)"),
            (0 <= self.aug_rotate <= 180, "aug_rotate must lie in [0, 180] degrees (0 = off)"),
            (0 <= self.aug_shift < 1, "aug_shift must lie in [0, 1), a fraction of the image side (0 = off)"),
            (0 <= self.aug_zoom < 1, "aug_zoom must lie in [0, 1): 1 or more would zoom by 0 or less (0 = off)"),
            (0 <= self.aug_brightness <= 1, "aug_brightness must lie in [0, 1]: more would make negative pixels "
                                            "(0 = off)"),
            (0 <= self.seed <= MAX_SEED and 0 <= self.split_seed <= MAX_SEED,
             f"seed and split_seed must lie in 0..{MAX_SEED}"),
            (self.demo_train >= 0 and self.demo_test >= 0, "demo_train and demo_test must not be negative"),
            (self.init_layers in ("hidden", "features"), "init_layers must be hidden or features"),
            (self.freeze in ("none", "features", "hidden"), "freeze must be none, features or hidden"),
            (self.lr_pretrained > 0, "lr_pretrained must be positive (to keep loaded layers fixed, use --freeze)"),
            (self.balance in ("weights", "sampler", "none"), "balance must be weights, sampler or none"),
            (self.members >= 1, "members must be at least 1"),
            (self.members_at_once >= 1, "members_at_once must be at least 1"),
            (self.workers >= 1, "workers must be at least 1"),
            (self.threads >= 0, "threads must not be negative (0 = torch's default)"),
            (0 <= self.val_fraction < 1 and 0 <= self.test_fraction < 1
             and self.val_fraction + self.test_fraction < 1,
             "val_fraction + test_fraction must be below 1"),
        ]
        if this_machine:
            bound, cores = max_workers(), cpu_count()
            here = f"at most {bound} on this machine ({cores} cores; 4 per core, up to 64)"
            checks += [
                (self.workers <= bound, f"workers must be {here}, e.g. --workers={cores}"),
                (self.threads <= bound, f"threads must be {here}, e.g. --threads=0 (torch's default)"),
                (self.members_at_once <= bound, f"members_at_once must be {here}: each is a whole train.py"),
            ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"impossible config: {message}")
        return self

    def to_dict(self):
        return asdict(self)


# keys that take auto besides true and false; a bare --key means true, as for a boolean
SWITCH_KEYS = ("amp", "channels_last")


def _switch(value):
    """'auto', 'true' or 'false' for a switch key's value (a bool from an old checkpoint included)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    lowered = str(value).lower()
    if lowered in ("1", "true", "yes", "on"):
        return "true"
    if lowered in ("0", "false", "no", "off"):
        return "false"
    return lowered


def _parse_value(key, text, kind):
    if key in SWITCH_KEYS:
        value = _switch(text)
        if value not in ("auto", "true", "false"):
            raise ValueError(f"--{key} takes auto, true or false, not {text!r}")
        return value
    if kind is bool:
        if _switch(text) in ("true", "false"):   # the same words as a switch key's, without auto
            return _switch(text) == "true"
        raise ValueError(f"--{key} takes true or false, not {text!r}")
    try:
        return kind(text)
    except ValueError:
        raise ValueError(f"--{key} takes a {kind.__name__}, not {text!r}") from None


def parse_overrides(argv, positional=()):
    """Split argv into {key: value} overrides and the named positional arguments.

    Raises ValueError with a one-line message for anything it cannot use.
    """
    types = {f.name: f.type for f in fields(Config)}
    overrides, values = {}, []
    for arg in argv:
        if not arg.startswith("--"):
            values.append(arg)
            continue
        key, has_value, text = arg[2:].partition("=")
        if key not in types:
            raise ValueError(f"unknown key --{key}; see python {_script_name()} --help for the valid keys")
        if not has_value:
            if types[key] is not bool and key not in SWITCH_KEYS:
                raise ValueError(f"--{key} needs a value, e.g. --{key}={getattr(Config, key)}")
            text = "true"
        overrides[key] = _parse_value(key, text, types[key])
    if len(values) != len(positional):
        wanted = " ".join(f"<{name}>" for name in positional)
        got = " ".join(values) or "none"
        raise ValueError(f"expected {wanted or 'no positional arguments'}, got {got}; "
                         f"usage: python {_script_name()} {wanted + ' ' if wanted else ''}[--key=value ...] (--help)")
    return overrides, dict(zip(positional, values))


def build_config(overrides):
    """A Config from explicit overrides; --demo moves the paths under demo_dir unless given."""
    cfg = Config(**overrides)
    if cfg.demo:
        demo_paths = {"raw_dir": os.path.join(cfg.demo_dir, "raw"), "out_dir": os.path.join("runs", "demo"),
                      "processed_dir": os.path.join(cfg.demo_dir, "processed")}
        for key, path in demo_paths.items():
            if key not in overrides:
                setattr(cfg, key, path)
    return cfg.validate()


def get_config(argv=None, positional=(), doc="", keys=None):
    """Parse sys.argv (or argv) into a validated Config; exit with a one-line error on bad input.

    With positional names, returns (cfg, {name: value}). -h or --help prints help_text and exits.
    """
    argv = sys.argv[1:] if argv is None else argv
    answer_help(argv, doc, keys, positional)
    try:
        overrides, args = parse_overrides(argv, positional)
        cfg = build_config(overrides)
    except (ValueError, TypeError) as err:
        sys.exit(f"error: {err}")
    return (cfg, args) if positional else cfg


def config_from_dict(saved):
    """Rebuild the Config stored in a checkpoint, ignoring keys this version no longer has.

    Raises ValueError for a value of the wrong type (e.g. image_size "64"): a Config built from
    it would fail far from here, or silently build another model.
    """
    if not isinstance(saved, dict):
        raise ValueError(f"the config is a {type(saved).__name__}, not a dict")
    types = {f.name: f.type for f in fields(Config)}
    kept = {k: v for k, v in saved.items() if k in types}
    for key, value in kept.items():
        kind = types[key]
        # ints are fine where floats are wanted; bools (an int subclass) only where bools are
        ok = (key in SWITCH_KEYS and isinstance(value, (bool, str))
              or isinstance(value, kind) and (kind is bool or not isinstance(value, bool))
              or kind is float and isinstance(value, int) and not isinstance(value, bool))
        if not ok:
            raise ValueError(f"{key} is {value!r} ({type(value).__name__}), not a {kind.__name__}")
    return Config(**kept)


# --- --help --------------------------------------------------------------------------

def _script_name():
    return os.path.basename(sys.argv[0])


def key_meanings():
    """{key: its one-line meaning}, as declared with the key."""
    return {f.name: f.metadata["meaning"] for f in fields(Config)}


def script_keys(script):
    """The keys a script (preprocess, train, predict, plot_image, model, bench) reads, in declaration order."""
    return tuple(f.name for f in fields(Config) if script in f.metadata["scripts"])


def _shown(value):
    return str(value).lower() if isinstance(value, bool) else str(value) if value != "" else '""'


def help_text(doc, keys=None, positional=()):
    """What -h and --help print: a usage line, the script's docstring, then each config key it
    reads (all of Config's if keys is None) with its type, default and meaning."""
    by_name = {f.name: f for f in fields(Config)}
    rows = []
    for key in by_name if keys is None else keys:
        kind = by_name[key].type
        usage = (f"--{key} | --{key}=false" if kind is bool else f"--{key}=auto|true|false" if key in SWITCH_KEYS
                 else f"--{key}=<{kind.__name__}>")
        rows.append((usage, _shown(by_name[key].default), key_meanings()[key]))
    words = ["usage: python", _script_name(), *(f"<{name}>" for name in positional), "[--key=value ...]"]
    lines = [" ".join(words), "", doc.strip("\n"), "", "config keys (defaults and meanings from config.py):"]
    usage_width = min(24, max(len(usage) for usage, _, _ in rows))   # a longer one gets a line of its own
    default_width = max(len(default) for _, default, _ in rows)
    for usage, default, meaning in rows:
        if len(usage) > usage_width:
            lines.append(f"  {usage}")
            usage = ""
        lines.append(f"  {usage:<{usage_width}}  {default:<{default_width}}  {meaning}")
    return "\n".join(lines)


def answer_help(argv, doc, keys=None, positional=()):
    """Print help_text and exit 0 when argv asks for help (-h or --help, anywhere)."""
    if "-h" in argv or "--help" in argv:
        print(help_text(doc, keys, positional))
        sys.exit(0)
