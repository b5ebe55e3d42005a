"""Shared fixtures: a tiny generated CIFAR-10 copy and a way to run a script's main() in-process."""
import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import fakedata  # noqa: E402

# Small, fast settings every end-to-end test starts from.
TINY = {"model": "cnn_small", "epochs": 2, "batch_size": 20, "eval_batch_size": 50, "lr": 0.05,
        "log_every": 2, "amp": "off"}


@pytest.fixture(scope="session")
def cifar_root(tmp_path_factory):
    return fakedata.make_cifar10(str(tmp_path_factory.mktemp("cifar")), train_per_class=10, test_per_class=5)


def make_exp(path, **params):
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "params.json"), "w") as f:
        json.dump(params, f)
    return str(path)


def run_main(main, argv):
    """Call a script's main(argv); return its exit code (0, or the code it exited with)."""
    try:
        return main(argv) or 0
    except SystemExit as e:
        return e.code


def read_json(path):
    with open(path) as f:
        return json.load(f)
