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


@pytest.fixture(scope="session")
def tiny_chain(tmp_path_factory, cifar_root):
    """The tiny preset run once end to end by reproduce.py in its own process: (exp_root, CompletedProcess).
    Shared by the test files that read or copy it; a test that changes it works on a copy."""
    import subprocess
    exp_root = str(tmp_path_factory.mktemp("repro") / "tiny")
    out = subprocess.run([sys.executable, "reproduce.py", "--preset", "tiny", "--data_root", cifar_root,
                          "--exp_root", exp_root], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    return exp_root, out


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
