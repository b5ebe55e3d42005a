"""Every shipped params.json parses against its script's keys and values (catches config drift)."""
import glob
import json
import os

import pytest

import train_dfad
import train_kd
import train_possessive
import train_scratch
from conftest import ROOT
from utils.config import read_params, validate

SCRIPTS = {"train_scratch.py": train_scratch, "train_possessive.py": train_possessive, "train_kd.py": train_kd,
           "train_dfad.py": train_dfad}


def _defaults_for(path):
    """The script a params.json belongs to: its own `_script` entry (never guessed from a folder name)."""
    with open(path) as f:
        script = json.load(f).get("_script")
    assert script in SCRIPTS, f"{path}: '_script' must name one of {', '.join(SCRIPTS)}, got {script!r}"
    return SCRIPTS[script].DEFAULTS


CONFIGS = sorted(glob.glob(os.path.join(ROOT, "exps", "**", "params.json"), recursive=True))


@pytest.mark.parametrize("path", CONFIGS)
def test_shipped_params_are_valid(path):
    defaults = _defaults_for(path)
    cfg = dict(defaults)
    cfg.update(read_params(os.path.dirname(path), defaults))
    validate(cfg, path)
    if defaults is train_possessive.DEFAULTS:
        train_possessive.check(cfg, path)
    elif defaults is train_kd.DEFAULTS:
        train_kd.check_kd_config(cfg, path)
        assert cfg["teacher"].endswith(".pth")
    elif defaults is train_dfad.DEFAULTS:
        train_dfad.check_dfad_config(cfg, path)
        assert cfg["teacher"].endswith(".pth")


def test_every_script_has_shipped_configs():
    kinds = {id(_defaults_for(p)) for p in CONFIGS}
    for script in (train_scratch, train_possessive, train_kd, train_dfad):
        assert id(script.DEFAULTS) in kinds, script.__name__


PAPER_SCALE = [p for p in CONFIGS if os.path.relpath(p, ROOT).split(os.sep)[1] in ("CIFAR10", "CIFAR100")]


@pytest.mark.parametrize("path", PAPER_SCALE)
def test_shipped_teachers_are_finished_weights(path):
    """In the paper-scale configs a teacher or original is the weights file a finished run leaves, never a
    training checkpoint (a last.pth or best.pth may be from a run that stopped part-way). The mini runs keep
    the paths they were run with, which their results record."""
    with open(path) as f:
        params = json.load(f)
    for key in ("teacher", "original"):
        if params.get(key):
            assert os.path.basename(params[key]) == "weights.pth", f"{path}: {key} {params[key]}"


def test_changed_result_key_names_the_first_setting_that_changes_a_run():
    from utils.config import changed_result_key
    old = {"lr": 0.1, "tau": 4.0, "device": "cpu", "data_root": "/a", "_comment": "x"}
    assert changed_result_key(old, dict(old, device="cuda", data_root="/b", _comment="y")) is None
    assert changed_result_key(old, dict(old, tau=2.0, lr=0.2)) == "lr"  # sorted: the first of the two
    assert changed_result_key(old, {k: v for k, v in old.items() if k != "tau"}) == "tau"  # a missing key is None
    assert changed_result_key(old, dict(old, tau=2.0), ignore={"tau"}) is None
    assert changed_result_key(old, {"lr": 0.1, "seed": 3}, keys={"lr"}) is None  # only the keys asked about
