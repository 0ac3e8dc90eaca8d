"""Recipes: a whole training plan kept as a file, recipes/<name>.py, and run end to end by

    python train.py --recipe=four_crops                   # a name in recipes/, or a path to a .py file
    python train.py --recipe=four_crops --epochs=1        # command-line overrides apply to every member

A recipe file holds a docstring (what it is, what it scored where measured, how long it takes) and
plain data: `common`, a dict of config overrides every member gets, and `groups`, a list of dicts,
each with a `name`, its own overrides (the crop), `seed` (its first seed) and `members` (how many
seeds: seed, seed + 1, ...).

Running one: each distinct crop is preprocessed from raw_dir into <processed_dir>_<crop>
(data/processed_c160, data/processed_roi; with --ids only those galaxies), each member trains as its
own train.py process into <out_dir>/<group name>/member_<k> (out_dir defaults to runs/<recipe name>),
members_at_once side by side, and predict.py scores them together on the test split with 8-fold
TTA (out_dir/eval_test.csv, eval_test_members.csv). Every step keeps what is done: a rerun of the
same command skips present PNGs and finished members, and resumes an unfinished one.
"""
from dataclasses import dataclass, fields
import glob
import os
from pathlib import Path
import re
import shlex
import subprocess
import sys

import pandas as pd

from config import Config, build_config, config_from_dict, cpu_count, script_keys
from galaxy.checkpoints import read_checkpoint
from galaxy.crop import CROP_KEYS
from galaxy.preprocessing import preprocess
from galaxy.runs import TRAIN_SCRIPT, claim_out_dir, run_is_complete, run_members

REPO = Path(__file__).resolve().parents[1]
RECIPES_DIR = REPO / "recipes"
PREDICT_SCRIPT = REPO / "predict.py"
# set by the recipe and the command, never by a recipe's common: where things go, and which run is which
RUNNER_KEYS = ("recipe", "out_dir", "processed_dir", "raw_dir", "members", "seed", "resume")
GROUP_KEYS = ("name", "seed", "members")
NOT_FOR_MEMBERS = ("recipe", "members", "members_at_once", "resume", "ids")   # the recipe's own work
# how a crop setting names its processed folder: data/processed_c160, data/processed_roi_s96
SLUG_KEYS = (("center_crop_size", "c"), ("image_size", "s"), ("roi_threshold", "t"), ("roi_pad", "p"),
             ("roi_min_size", "m"))


@dataclass
class Recipe:
    name: str
    path: Path
    doc: str
    common: dict
    groups: list

    def members(self):
        return sum(group["members"] for group in self.groups)


# --- reading a recipe ---------------------------------------------------------------------------

def available():
    """The recipe names in recipes/."""
    return sorted(path.stem for path in RECIPES_DIR.glob("*.py") if not path.name.startswith("_"))


def recipe_path(spec):
    """recipes/<spec>.py for a name, else spec itself as a path; ValueError if there is no such file."""
    path = Path(spec) if spec.endswith(".py") or os.sep in spec else RECIPES_DIR / f"{spec}.py"
    if not path.is_file():
        raise ValueError(f"recipe {spec}: no file {path}; name one of recipes/ ({', '.join(available())}) "
                         f"or give the path of a .py file")
    return path


def load_recipe(spec):
    """The Recipe named by spec, checked: every override a Config key of the right type, every group
    named once with a first seed and a number of members. ValueError naming the file otherwise."""
    path = recipe_path(spec)
    namespace = {"__file__": str(path), "__name__": f"recipe_{path.stem}"}
    try:
        exec(compile(path.read_text(encoding="utf-8"), str(path), "exec"), namespace)
    except Exception as err:   # whatever the file does wrong, say so in one line naming it
        raise ValueError(f"{path} cannot be read as a recipe: {type(err).__name__}: {err}".splitlines()[0]) from None
    common, groups = namespace.get("common", {}), namespace.get("groups")
    if not isinstance(common, dict):
        raise ValueError(f"{path}: common must be a dict of config overrides, not a {type(common).__name__}")
    if not isinstance(groups, list) or not groups or not all(isinstance(group, dict) for group in groups):
        raise ValueError(f"{path}: groups must be a non-empty list of dicts, each with name, seed and members")
    _check_keys(path, "common", common, reserved=RUNNER_KEYS)
    names = set()
    for number, group in enumerate(groups, 1):
        name = group.get("name")
        where = f"group {name or number}"
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.-]+", name) or name in names:
            raise ValueError(f"{path}: {where} needs a name of its own made of letters, digits, _ . or - "
                             f"(its members' folder)")
        names.add(name)
        for key, least in (("seed", 0), ("members", 1)):
            value = group.get(key)
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                raise ValueError(f"{path}: {where} needs {key} = an integer of at least {least}, not {value!r}")
        settings = {key: value for key, value in group.items() if key not in GROUP_KEYS}
        _check_keys(path, where, settings, reserved=[key for key in RUNNER_KEYS if key not in GROUP_KEYS])
        try:
            config_from_dict({**common, **settings}).validate(this_machine=False)   # a recipe is for any machine
        except (ValueError, TypeError) as err:
            raise ValueError(f"{path}: {where}: {err}") from None
    return Recipe(path.stem, path, (namespace.get("__doc__") or "").strip(), common, groups)


def member_settings(spec, without=()):
    """The train.py settings of a recipe's first group: its common overrides and the group's own (its
    crop), without GROUP_KEYS or the keys in without. What a benchmark trains when its numbers must not
    move with config.py's defaults, so a recipe must name every key it depends on."""
    recipe = load_recipe(spec)
    settings = {**recipe.common, **recipe.groups[0]}
    return {key: value for key, value in settings.items() if key not in GROUP_KEYS and key not in without}


def _check_keys(path, where, overrides, reserved):
    keys = {f.name for f in fields(Config)}
    for key in overrides:
        if key not in keys:
            raise ValueError(f"{path}: unknown key {key!r} in {where}; a recipe's overrides are config.py's keys "
                             f"(python train.py --help lists them)")
        if key in reserved:
            raise ValueError(f"{path}: {key!r} in {where} is set by the recipe's command, not the recipe; "
                             f"drop it (a group gives seed and members; --out_dir and the data folders come "
                             f"from the command line)")


# --- what each member is ------------------------------------------------------------------------

def crop_slug(cfg):
    """A crop setting's short name: c212, c160, roi, roi_s96 (the keys that differ from the defaults)."""
    defaults, roi = Config(), cfg.crop == "roi"
    parts = ["roi" if roi else f"c{cfg.center_crop_size}"]
    for key, short in SLUG_KEYS:
        value = getattr(cfg, key)
        if (key != "center_crop_size" or roi) and value != getattr(defaults, key):
            parts.append(f"{short}{value:g}")
    return "_".join(parts)


def processed_dir_for(processed_dir, cfg):
    """Where the PNGs of cfg's crop go: one folder per crop setting beside processed_dir."""
    return f"{os.path.normpath(processed_dir)}_{crop_slug(cfg)}"


def member_plan(recipe, overrides):
    """[(group name, k, seed, the member's settings)] for every member: the recipe's common, its
    group's overrides, then the command line's (members_at_once aside: it is the whole recipe's)."""
    passed = {key: value for key, value in overrides.items() if key not in RUNNER_KEYS}
    plan = []
    for group in recipe.groups:
        settings = {**recipe.common, **{k: v for k, v in group.items() if k not in GROUP_KEYS}, **passed}
        settings.pop("members_at_once", None)
        for k in range(1, group["members"] + 1):
            plan.append((group["name"], k, group["seed"] + k - 1, settings))
    return plan


def as_args(settings):
    """--key=value arguments for a script, booleans as true/false."""
    return [f"--{key}={str(value).lower() if isinstance(value, bool) else value}" for key, value in settings.items()]


# --- running one ----------------------------------------------------------------------------------

def prepare_crops(plan, base):
    """Preprocess raw_dir once per distinct crop of the plan; {crop slug: processed folder}."""
    folders = {}
    for _, _, _, settings in plan:
        cfg = build_config({**settings, "raw_dir": base.raw_dir, "processed_dir": base.processed_dir})
        slug = crop_slug(cfg)
        if slug in folders:
            continue
        folders[slug] = processed_dir_for(base.processed_dir, cfg)
        crop = ", ".join(f"{key}={getattr(cfg, key)}" for key in CROP_KEYS)
        print(f"preprocess {cfg.raw_dir} -> {folders[slug]} ({crop}{', ids ' + cfg.ids if cfg.ids else ''})",
              flush=True)
        preprocess(build_config({**settings, "raw_dir": base.raw_dir, "processed_dir": folders[slug]}))
    return folders


def pending_members(plan, folders, base, out_dir, at_once):
    """(the members still to train as run_members wants them, [their best.pt paths], how many are done)."""
    pending, checkpoints, done = [], [], 0
    for group, k, seed, settings in plan:
        cfg = build_config({**settings, "raw_dir": base.raw_dir, "processed_dir": base.processed_dir})
        member_dir = os.path.join(out_dir, group, f"member_{k}")
        checkpoints.append(os.path.join(member_dir, "best.pt"))
        args = {key: value for key, value in settings.items() if key not in NOT_FOR_MEMBERS}
        args.update(processed_dir=folders[crop_slug(cfg)], out_dir=member_dir, seed=seed)
        last = os.path.join(member_dir, "last.pt")
        if os.path.isfile(last):
            if run_is_complete(cfg, read_checkpoint(last)):
                done += 1
                print(f"{group} member {k}: done, skipped", flush=True)
                continue
            args.pop("init_from", None)   # its weights are in last.pt now
            args["resume"] = True
        if at_once > 1 and "threads" not in args:   # side by side, the cores are shared out
            args["threads"] = max(1, cpu_count() // at_once)
        command = [sys.executable, "-u", TRAIN_SCRIPT, *as_args(args)]
        pending.append((f"{group} member {k}: seed {seed}", member_dir, command))
    return pending, checkpoints, done


def evaluate(checkpoints, folders, base, overrides, out_dir):
    """predict.py on the test split with TTA, all members together; its exit code."""
    pattern = os.path.join(out_dir, "*", "member_*", "best.pt")
    found = sorted(os.path.normpath(path) for path in glob.glob(pattern))
    # the glob reads better in the line printed; the list, when other runs sit in out_dir too
    spec = pattern if found == sorted(os.path.normpath(path) for path in checkpoints) else ",".join(checkpoints)
    passed = {key: value for key, value in overrides.items()
              if key in script_keys("predict") and key not in RUNNER_KEYS + ("checkpoint", "split", "tta")}
    args = [f"--checkpoint={spec}", "--split=test", "--tta", f"--out_dir={out_dir}",
            f"--processed_dir={next(iter(folders.values()))}", f"--raw_dir={base.raw_dir}", *as_args(passed)]
    print(f"evaluate: python predict.py {shlex.join(args)}", flush=True)
    try:
        return subprocess.run([sys.executable, "-u", str(PREDICT_SCRIPT), *args]).returncode
    except KeyboardInterrupt:   # the terminal's Ctrl-C reached predict.py too: it writes nothing half
        return 130


def result_line(recipe, out_dir):
    """The recipe's score in one line, from predict.py's eval_test.csv and eval_test_members.csv."""
    test = float(pd.read_csv(os.path.join(out_dir, "eval_test.csv"))["model_rmse"][0])
    line = f"recipe {recipe.name}: test RMSE {test:.4f} with 8-fold TTA, {recipe.members()} member(s)"
    members_path = os.path.join(out_dir, "eval_test_members.csv")
    if recipe.members() > 1 and os.path.isfile(members_path):
        rmse_of = dict(pd.read_csv(members_path).itertuples(index=False))
        best = next(value for name, value in rmse_of.items() if name.startswith("best member"))
        line += f" (best member {best:.4f}, mean member {rmse_of['mean member']:.4f})"
    return line + f"; see {out_dir}/eval_test.csv"


def run_recipe(overrides):
    """Preprocess, train and evaluate the recipe overrides["recipe"]; returns the exit code.

    Raises ValueError for a bad recipe or a --seed/--members that cannot apply."""
    recipe = load_recipe(overrides["recipe"])
    for key in ("seed", "members"):
        if key in overrides:
            raise ValueError(f"--{key} does not apply with --recipe: each group of {recipe.path} gives its "
                             f"first seed and its members; edit a copy of the recipe instead")
    base = build_config({key: value for key, value in overrides.items() if key != "recipe"})
    out_dir = base.out_dir if "out_dir" in overrides else os.path.join(base.out_dir, recipe.name)
    at_once = overrides.get("members_at_once", recipe.common.get("members_at_once", 1))
    plan = member_plan(recipe, overrides)
    print(f"recipe {recipe.name} ({recipe.path}): {len(recipe.groups)} group(s), {len(plan)} member(s) -> {out_dir}",
          flush=True)
    lock = claim_out_dir(out_dir)  # noqa: F841 (held open): one command on a recipe's folder at a time
    try:
        folders = prepare_crops(plan, base)
    except KeyboardInterrupt:
        print("\ninterrupted: the PNGs already written are kept; run the same command again to go on",
              file=sys.stderr)
        return 130
    pending, checkpoints, done = pending_members(plan, folders, base, out_dir, at_once)
    if pending:
        print(f"train {len(pending)} member(s) ({done} done before), {min(at_once, len(pending))} at a time",
              flush=True)
        code = run_members(pending, min(at_once, len(pending)))
        if code:
            return code
    code = evaluate(checkpoints, folders, base, overrides, out_dir)
    if code:
        print(f"predict.py stopped (exit {code}); its message is above", flush=True)
        return code
    print(result_line(recipe, out_dir), flush=True)
    return 0
