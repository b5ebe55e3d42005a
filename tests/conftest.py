"""Shared fixtures: a tiny generated CIFAR-10 copy, a tiny teacher trained on it, a way to run a script's main()
in-process, and the device the device-dependent tests run on.

TEST_DEVICE (cpu, cuda or cuda:N; default cpu) is the device of every training run the tests start and of
the `device` fixture. Tests marked `device` (and every test that takes the `device` fixture) exercise device
code: tensor placement, autocast, the training loop. On a GPU machine

    TEST_DEVICE=cuda python -m pytest -q -m device tests

runs them there (bench/cuda_check.py does). Tests that only make sense on a GPU are marked with cuda_only
and skipped, with the reason, where none is visible.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import fakedata  # noqa: E402

TEST_DEVICE = os.environ.get("TEST_DEVICE", "cpu")
HAS_CUDA = torch.cuda.is_available()
CUDA_SKIP_REASON = ("needs a CUDA GPU and none is visible "
                    "(on a GPU machine: TEST_DEVICE=cuda python -m pytest -m device)")
# The device of the CUDA-only tests: TEST_DEVICE when it names a GPU, else the first one.
CUDA_DEVICE = TEST_DEVICE if TEST_DEVICE.startswith("cuda") else "cuda"

# Small, fast settings every end-to-end test starts from.
TINY = {"model": "cnn_small", "epochs": 2, "batch_size": 20, "eval_batch_size": 50, "lr": 0.05,
        "log_every": 2, "amp": "off", "device": TEST_DEVICE}


def pytest_configure(config):
    config.addinivalue_line("markers", "device: exercises device code; runs on TEST_DEVICE (default cpu)")
    if not (TEST_DEVICE in ("cpu", "cuda") or TEST_DEVICE.startswith("cuda:")):
        raise pytest.UsageError(f"TEST_DEVICE must be cpu, cuda or cuda:N, got '{TEST_DEVICE}'")
    if TEST_DEVICE != "cpu" and not HAS_CUDA:
        raise pytest.UsageError(f"TEST_DEVICE={TEST_DEVICE} but no CUDA GPU is visible; unset it to test on the CPU")


def pytest_collection_modifyitems(config, items):
    for item in items:  # a test that takes the device fixture is a device test
        if "device" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.device)


def cuda_only(test):
    """Mark a test that runs on a CUDA GPU only: selected by -m device, skipped with the reason elsewhere."""
    return pytest.mark.device(pytest.mark.skipif(not HAS_CUDA, reason=CUDA_SKIP_REASON)(test))


@pytest.fixture
def device():
    """The device under test (TEST_DEVICE)."""
    return torch.device(TEST_DEVICE)


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


@pytest.fixture(scope="session")
def threat_runs(tmp_path_factory, tiny_chain, cifar_root):
    """The tiny preset's two threat models, seed 0, against the tiny chain's teachers."""
    exp_root, _ = tiny_chain
    out = {}
    base = tmp_path_factory.mktemp("threats")
    for name in ("s50", "s50nl"):
        root = str(base / name)
        done = subprocess.run([sys.executable, "reproduce.py", "--preset", "tiny", "--threat", name, "--data_root",
                               cifar_root, "--exp_root", root, "--teachers_from", exp_root, "--jobs", "2"],
                              cwd=ROOT, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        out[name] = root
    return exp_root, out, str(base / "summary")


@pytest.fixture(scope="module")
def teacher(tmp_path_factory, cifar_root):
    """A tiny cnn_small teacher trained by train_scratch.py, once per test module: its weights.pth."""
    import train_scratch
    d = make_exp(tmp_path_factory.mktemp("teacher") / "cnn_small", **dict(TINY, data_root=cifar_root))
    assert run_main(train_scratch.main, ["--save_path", d]) == 0
    return os.path.join(d, "weights.pth")


def file_bytes(path):
    """Names and bytes of every file under path: 'nothing changed' means this is equal."""
    out = {}
    for folder, _, files in os.walk(path):
        for f in files:
            full = os.path.join(folder, f)
            with open(full, "rb") as fh:
                out[os.path.relpath(full, path)] = fh.read()
    return out


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
