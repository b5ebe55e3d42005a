"""Run configuration: DIR/params.json, overridden key by key from the command line, checked, written back.

Every script declares its keys as a dict of defaults; the default's type is the key's type. The resolved
config is written to DIR/config.json only once it has been checked, so a bad invocation changes nothing.
"""
import argparse
import difflib
import json
import math
import os
import sys

from .constants import DATASETS
from .errors import UserError

# Keys every training script shares (METHOD.md section 1 and the CPU pilot of section 6).
TRAIN_DEFAULTS = {
    "dataset": "cifar10",
    "data_root": "./data",
    "download": False,
    # The thief's threat model (METHOD.md section 9): which training images it holds and whether it has their labels.
    "subset": 0,            # >0: the thief holds this many training images, a class-balanced draw fixed by subset_seed
    "subset_seed": 0,       # the draw of the subset (nested: for one seed, a smaller subset lies inside a larger one)
    "labels": True,         # false: the thief has no labels; no loss term reads one (the teacher's argmax instead)
    "transfer": "",         # a dataset name: the thief queries with that dataset's training images instead (no labels)
    "test_subset": 0,       # >0: score on the first N test images only (tests)
    "model": "resnet20",
    "epochs": 12,
    "batch_size": 128,
    "eval_batch_size": 500,
    "optimizer": "sgd",
    "lr": 0.1,
    "momentum": 0.9,
    "nesterov": True,
    "weight_decay": 5e-4,
    "schedule": "onecycle",  # onecycle | cosine | step | constant
    "milestones": [],        # epochs, for schedule=step
    "lr_decay": 0.1,         # factor at each milestone
    "warmup": 0.15,          # onecycle: fraction of the run spent rising to lr
    "label_smoothing": 0.0,
    "seed": 0,
    "device": "auto",        # auto | cpu | cuda | cuda:N
    "amp": "auto",           # auto | off | bf16 | fp16
    "channels_last": True,
    "compile": False,
    "log_every": 25,         # steps between host syncs for the progress bar
    "eval_every": 1,         # epochs between test evaluations (the last is always scored; a small subset's
                             # epoch is short)
}

# Keys that do not change what a run computes: where the data lives, which device, how often the bar updates
# (compile and teacher_cache compute the same, up to the last bits a different kernel or batch size may give).
# Every other key does, so a --resume must keep it and a finished run only counts as done when it matches.
NON_RESULT_KEYS = frozenset({"data_root", "download", "device", "log_every", "eval_batch_size", "eval_every", "compile",
                             "teacher_cache", "allow_unfinished_teacher", "allow_unfinished_original"})


def changed_result_key(old, new, keys=None, ignore=()):
    """The first key, in sorted order, whose value differs between two configs, or None when both describe the
    same run: NON_RESULT_KEYS, notes (keys starting with '_', which no script reads) and `ignore` aside.
    keys: the keys compared (default: every key of either config); a key a config lacks reads as None."""
    keys = set(old) | set(new) if keys is None else keys
    for key in sorted(keys):
        if key in NON_RESULT_KEYS or key in ignore or key.startswith("_"):
            continue
        if old.get(key) != new.get(key):
            return key
    return None


def checkpoint_keys(role):
    """The keys that describe a run's teacher or original file where the file does not (one from another
    codebase): its architecture and normalisation (empty: the dataset's); and the flag that lets a run use
    a checkpoint whose training did not finish."""
    return {f"{role}_arch": "", f"{role}_mean": [], f"{role}_std": [], f"allow_unfinished_{role}": False}


def checkpoint_options(cfg, role):
    """build_from_checkpoint's keyword arguments from a run's config, for its teacher or original."""
    return {"arch": cfg.get(f"{role}_arch") or None, "mean": cfg.get(f"{role}_mean") or None,
            "std": cfg.get(f"{role}_std") or None, "allow_unfinished": bool(cfg.get(f"allow_unfinished_{role}"))}


# Keys added after runs were recorded, with the value that leaves a run as it was: a recorded config without
# them reads as having these values (a --resume of such a run is not refused for them).
ADDED_KEYS = {**checkpoint_keys("teacher"), **checkpoint_keys("original"),
              "subset_seed": 0, "labels": True, "transfer": "", "eval_every": 1,
              "kd_delay": 20.0, "skeptical_weight": 1.0, "skeptical_sd": 0.3, "skeptical_aux_ce": 0.7,
              "skeptical_stage": 0, "val_split": 0, "alpha_sweep": [], "tau_from": "", "select_by": "val_acc",
              "runs_from": ""}

CHOICES = {
    "dataset": tuple(DATASETS),
    "optimizer": ("sgd", "adam", "adamw"),
    "schedule": ("onecycle", "cosine", "step", "constant"),
    "amp": ("auto", "off", "bf16", "fp16"),
}

POSITIVE = ("epochs", "batch_size", "eval_batch_size", "lr", "log_every", "eval_every")
NON_NEGATIVE = ("subset", "subset_seed", "test_subset", "weight_decay", "momentum", "label_smoothing", "seed", "warmup")


def close_match(word, options):
    """' (did you mean 'x'?)' for the option closest to a misspelt word, or '' when none is close."""
    found = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    return f" (did you mean '{found[0]}'?)" if found else ""


class Parser(argparse.ArgumentParser):
    """argparse without prefix matching (--epoch is not --epochs), whose errors are one line with the close
    match of a misspelt flag and the way to --help."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message):
        hint = ""
        if message.startswith("unrecognized arguments:"):
            flags = [a.split("=")[0] for a in message.split(":", 1)[1].split() if a.startswith("--")]
            known = [o for a in self._actions for o in a.option_strings if o.startswith("--")]
            for flag in flags:
                found = difflib.get_close_matches(flag, known, n=1, cutoff=0.6)
                if found:
                    hint = f" (did you mean {found[0]}?)"
                    break
        print(f"error: command line: {message}{hint}; see {self.prog} --help", file=sys.stderr)
        sys.exit(2)


def _type_name(value):
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string", list: "a list"}.get(
        type(value), type(value).__name__)


def _coerce(key, value, default, source):
    """Check a value against the type of its default; ints are accepted where floats are expected."""
    if default is None:
        if value is None or isinstance(value, str):
            return value
    elif isinstance(default, bool):
        if isinstance(value, bool):
            return value
    elif isinstance(default, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(default, float):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise UserError(f"{source}: '{key}' must be finite, got {value}")
            return float(value)
    elif isinstance(default, str):
        if isinstance(value, str):
            return value
    elif isinstance(default, list):
        if isinstance(value, list):
            return value
    expected = "a string or null" if default is None else _type_name(default)
    raise UserError(f"{source}: '{key}' must be {expected}, got {json.dumps(value)}")


def _parse_cli_value(key, text, default):
    """Command-line text -> value: JSON first (numbers, true/false, lists), else the plain string."""
    low = text.lower()
    if isinstance(default, bool) and low in ("true", "false", "1", "0", "yes", "no"):
        return low in ("true", "1", "yes")
    if isinstance(default, str) or default is None:
        return None if low in ("null", "none") and default is None else text
    if isinstance(default, list) and "," in text and not text.startswith("["):
        text = "[" + text + "]"
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return text
    return [value] if isinstance(default, list) and not isinstance(value, list) else value


def read_params(save_path, defaults, script=None):
    path = os.path.join(save_path, "params.json")
    if not os.path.isfile(path):
        raise UserError(f"{path} not found; create it (copy one from exps/) "
                        "or point --save_path at an experiment folder")
    try:
        with open(path) as f:
            params = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({e}); fix the file") from None
    if not isinstance(params, dict):
        raise UserError(f"{path} must hold a JSON object of key: value pairs")
    owner = params.get("_script")
    if script and isinstance(owner, str) and owner.endswith(".py") and os.path.basename(owner) != script:
        raise UserError(f"{path} is the folder of a {owner} run (its '_script'), not of {script}; run python {owner} "
                        f"--save_path {save_path}, or give {script} a folder of its own")
    unknown = sorted(k for k in params if k not in defaults and not k.startswith("_"))
    if unknown:
        raise UserError(f"{path}: unknown key '{unknown[0]}'{close_match(unknown[0], defaults)}; fix or remove it "
                        f"(python {script or 'SCRIPT'} --help lists the keys)")
    return {k: _coerce(k, v, defaults[k], path) for k, v in params.items() if not k.startswith("_")}


def validate(cfg, source="config"):
    for key, options in CHOICES.items():
        if key in cfg and cfg[key] not in options:
            raise UserError(f"{source}: '{key}' must be one of {', '.join(options)}, got '{cfg[key]}'"
                            f"{close_match(str(cfg[key]), options)}")
    for key in POSITIVE:
        if key in cfg and not cfg[key] > 0:
            raise UserError(f"{source}: '{key}' must be > 0, got {cfg[key]}")
    for key in NON_NEGATIVE:
        if key in cfg and cfg[key] < 0:
            raise UserError(f"{source}: '{key}' must be >= 0, got {cfg[key]}")
    if "model" in cfg:
        import models
        if cfg["model"] not in models.MODELS and cfg["model"] not in models.ALIASES:
            raise UserError(f"{source}: unknown model '{cfg['model']}'"
                            f"{close_match(cfg['model'], list(models.names()) + list(models.ALIASES))}; choose one of: "
                            f"{', '.join(models.names())} (python train_scratch.py --list-models)")
    if cfg.get("schedule") == "step" and not all(isinstance(m, int) and m > 0 for m in cfg.get("milestones", [])):
        raise UserError(f"{source}: 'milestones' must be a list of positive epoch numbers")
    if cfg.get("transfer"):
        if cfg["transfer"] not in DATASETS:
            raise UserError(f"{source}: 'transfer' must be empty or one of {', '.join(DATASETS)}, "
                            f"got '{cfg['transfer']}'")
        if cfg.get("labels", True):
            raise UserError(f"{source}: transfer data ({cfg['transfer']}) has no labels for {cfg.get('dataset')}'s "
                            f"classes; set labels to false")
        if DATASETS[cfg["transfer"]].image_size != DATASETS[cfg.get("dataset", "cifar10")].image_size:
            raise UserError(f"{source}: transfer images of {cfg['transfer']} are "
                            f"{DATASETS[cfg['transfer']].image_size} px, {cfg.get('dataset')} needs "
                            f"{DATASETS[cfg.get('dataset', 'cifar10')].image_size} px; choose a dataset of that size")
    dev = cfg.get("device", "auto")
    if not (dev in ("auto", "cpu", "cuda") or dev.startswith("cuda:")):
        raise UserError(f"{source}: 'device' must be auto, cpu, cuda or cuda:N, got '{dev}'")


def thief_has_labels(cfg):
    """Whether the thief holds the true labels of its training images (never for transfer data)."""
    return bool(cfg.get("labels", True)) and not cfg.get("transfer")


def require_labels(cfg, source, what):
    """Refuse a label-free threat model for a script whose loss is defined by the true labels."""
    if not thief_has_labels(cfg):
        raise UserError(f"{source}: {what} trains on the true labels, so 'labels' must be true and 'transfer' empty; "
                        f"a thief without labels is a train_kd.py run (its bar: --attack hardlabel from the original)")


def key_choices(extra=None):
    """{key: its allowed values} for --help: CHOICES, the model zoo and a script's own (attack, method)."""
    import models
    out = dict(CHOICES, model=tuple(models.names()))
    out.update(extra or {})
    return out


def parse_config(description, defaults, argv=None, extra_args=None, choices=None, script=None, notes=None):
    """Parse `--save_path DIR [--key value ...] [--resume | --overwrite]` into (args namespace, parser).

    extra_args: callable(parser) adding script-only flags (e.g. --list-models); choices: {key: values} the
    script accepts beyond CHOICES (shown in --help); notes: {key: text} added to a key's help.
    A true/false key given alone means true (--download is --download true).
    """
    choices = key_choices(choices)
    parser = Parser(prog=script, description=description,
                    epilog="Any key of params.json can be overridden, e.g. --epochs 2. Values on the command line "
                           "win over params.json, which wins over the defaults shown here.")
    parser.add_argument("--save_path", help="experiment folder holding params.json; outputs go there")
    parser.add_argument("--resume", action="store_true", help="continue from SAVE_PATH/last.pth")
    parser.add_argument("--overwrite", action="store_true",
                        help="train a finished run (metrics.json) again from the start; its results are kept until "
                             "the new run writes its first checkpoint (without it a finished folder is refused)")
    if extra_args:
        extra_args(parser)
    group = parser.add_argument_group("config keys (override params.json)")
    for key, default in defaults.items():
        text = f"default: {json.dumps(default)}"
        if key in choices:
            text += f"; one of: {', '.join(choices[key])}"
        if notes and key in notes:
            text += f"; {notes[key]}"
        extra = {"nargs": "?", "const": "true"} if isinstance(default, bool) else {}
        group.add_argument(f"--{key}", dest=f"cfg_{key}", default=None, metavar=_type_name(default).upper()
                           if default is not None else "STR", help=text.replace("%", "%%"), **extra)
    args = parser.parse_args(argv)
    if args.resume and args.overwrite:
        parser.error("give either --resume (continue the run) or --overwrite (train it again from the start), "
                     "not both")
    args.script = script
    return args, parser


def check_sources(cfg, base, cli_keys, params_path, checks):
    """Run each check(cfg, source) so that its error names where the bad value came from: params.json (or the
    defaults) when the error is there without the command-line values too, else the command line."""
    for check in checks:
        try:
            check(cfg, params_path)
        except UserError as e:
            if cli_keys:
                try:
                    check(base, params_path)
                    fault = None
                except UserError as e0:
                    fault = str(e0)
                if fault != str(e):  # the command-line values brought the error in
                    check(cfg, "command line")
            raise


def resolve_config(args, defaults, checks=()):
    """defaults < params.json < command line, checked by validate() and then by `checks` (each a
    check(cfg, source) of the script's own keys), every error naming its source."""
    if not args.save_path:
        raise UserError("--save_path is required: an experiment folder holding params.json (see exps/)")
    cfg = dict(defaults)
    cfg.update(read_params(args.save_path, defaults, getattr(args, "script", None)))
    base = dict(cfg)
    cli_keys = []
    for key, default in defaults.items():
        text = getattr(args, f"cfg_{key}")
        if text is not None:
            cfg[key] = _coerce(key, _parse_cli_value(key, text, default), default, "command line")
            cli_keys.append(key)
    check_sources(cfg, base, cli_keys, os.path.join(args.save_path, "params.json"), (validate,) + tuple(checks))
    return cfg


def write_config(save_path, cfg, as_used=None):
    """DIR/config.json: the resolved config; as_used: {key: value the run actually uses, '_why': why} where a
    script clamps a value, written next to the keys as '_as_used' (read_params ignores '_' keys)."""
    from .checkpoint import atomic_write_text
    out = dict(cfg, _as_used=as_used) if as_used else cfg
    atomic_write_text(os.path.join(save_path, "config.json"), json.dumps(out, indent=2, sort_keys=True) + "\n")
