"""Every shipped params.json parses against its script's keys and values (catches config drift)."""
import glob
import os

import pytest

import train_dfad
import train_kd
import train_possessive
import train_scratch
from conftest import ROOT
from utils.config import read_params, validate

def _defaults_for(path):
    """The script a params.json belongs to, from its folder names (a tau sweep's tau_<t>/ sits inside)."""
    parts = os.path.relpath(path, ROOT).split(os.sep)[:-1]
    for part in reversed(parts):
        if part in ("possessive", "nasty", "rml") or part.startswith(("rml_", "nasty_")):
            return train_possessive.DEFAULTS
        if part == "kd" or part.startswith("kd_"):
            return train_kd.DEFAULTS
        if part == "dfad" or part.startswith("dfad_"):
            return train_dfad.DEFAULTS
    return train_scratch.DEFAULTS


CONFIGS = sorted(glob.glob(os.path.join(ROOT, "exps", "**", "params.json"), recursive=True))


@pytest.mark.parametrize("path", CONFIGS)
def test_shipped_params_are_valid(path):
    defaults = _defaults_for(path)
    cfg = dict(defaults)
    cfg.update(read_params(os.path.dirname(path), defaults))
    validate(cfg, path)
    if defaults is train_possessive.DEFAULTS:
        train_possessive.check(cfg)
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
