"""The CUDA path: the engine's autocast and GradScaler, a DFAD run with its generator's own scaler, and that a
CUDA run's checkpoints load (and resume) on the CPU.

The cuda_only tests skip, with the reason, where no GPU is visible; on a GPU machine bench/cuda_check.py
runs them (TEST_DEVICE=cuda python -m pytest -m device tests). The rest run on the CPU everywhere.
"""
import os
import re
import signal
import subprocess
import sys
import types

import pytest
import torch

import models
import train_dfad
import train_scratch
from conftest import (CUDA_DEVICE, CUDA_SKIP_REASON, HAS_CUDA, ROOT, TINY, cuda_only, make_exp, read_json,
                      run_main)
from utils.checkpoint import load_checkpoint, model_record, save_checkpoint, weights_sha256
from utils.defences import build_from_checkpoint
from utils.engine import Engine
from utils.errors import UserError


def _engine(tmp_path, amp):
    cfg = dict(train_scratch.DEFAULTS, **TINY)
    cfg.update(device=CUDA_DEVICE, amp=amp)
    return Engine(cfg, str(tmp_path / f"engine_{amp}"), "train_scratch.py")


def _on_cpu(state):
    """Every tensor of a nested checkpoint entry, for checking where they were loaded."""
    if torch.is_tensor(state):
        return [state]
    if isinstance(state, dict):
        return [t for v in state.values() for t in _on_cpu(v)]
    if isinstance(state, (list, tuple)):
        return [t for v in state for t in _on_cpu(v)]
    return []


# ------------------------------------------------------------------------------------------ on a GPU only
@cuda_only
@pytest.mark.parametrize("amp,dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_engine_autocast_on_cuda(tmp_path, amp, dtype):
    if dtype is torch.bfloat16 and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bfloat16")
    engine = _engine(tmp_path, amp)
    assert engine.device.type == "cuda" and engine.device.index is not None
    assert engine.amp_dtype == dtype and (engine.scaler is not None) == (dtype is torch.float16)
    model = engine.to_device(models.build("cnn_small", 10))
    x = torch.randn(4, 3, 32, 32, device=engine.device).contiguous(memory_format=torch.channels_last)
    with engine.autocast():
        logits = model(x)
    assert logits.dtype == dtype and logits.device == engine.device
    assert all(p.dtype == torch.float32 and p.is_cuda for p in model.parameters())  # fp32 master weights


@cuda_only
def test_auto_amp_on_cuda_prefers_bf16(tmp_path):
    engine = _engine(tmp_path, "auto")
    assert engine.amp_dtype == (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)


@cuda_only
def test_fp16_grad_scaler_run_of_train_scratch(tmp_path, cifar_root):
    d = make_exp(tmp_path / "fp16", **dict(TINY, data_root=cifar_root, device=CUDA_DEVICE, amp="fp16",
                                          model="cnn", epochs=3))
    assert run_main(train_scratch.main, ["--save_path", d]) == 0
    m = read_json(os.path.join(d, "metrics.json"))
    assert m["amp"] == "float16" and m["device"].startswith("cuda")
    assert all(row["train_loss"] == row["train_loss"] for row in m["history"])  # no NaN
    assert m["final_acc"] > 30  # as on the CPU in fp32 (test_scratch): the scaled steps do train
    scaler = torch.load(os.path.join(d, "last.pth"), map_location="cpu", weights_only=True)["scaler"]
    assert isinstance(scaler, dict) and 0 < scaler["scale"] < float("inf")


@cuda_only
def test_cuda_checkpoints_load_on_cpu_with_weights_only(tmp_path, cifar_root):
    d = make_exp(tmp_path / "run", **dict(TINY, data_root=cifar_root, device=CUDA_DEVICE, amp="auto", epochs=1))
    assert run_main(train_scratch.main, ["--save_path", d]) == 0
    m = read_json(os.path.join(d, "metrics.json"))
    assert m["device"].startswith("cuda") and m["amp"] in ("bfloat16", "float16")
    for name in ("last.pth", "best.pth", "weights.pth"):
        ckpt = load_checkpoint(os.path.join(d, name))  # weights_only, map_location cpu
        tensors = _on_cpu({k: v for k, v in ckpt.items() if k != "rng"})
        assert tensors and all(t.device.type == "cpu" for t in tensors), name
        assert weights_sha256(ckpt["model"]) == m["weights_sha256"], name
    model, _ = build_from_checkpoint(os.path.join(d, "weights.pth"), "teacher", "cifar10", 10)
    with torch.no_grad():
        assert torch.isfinite(model.eval()(torch.randn(2, 3, 32, 32))).all()


from test_engine import _StopAt  # noqa: E402 (the interrupting task the CPU resume test uses)


@cuda_only
def test_run_interrupted_on_cuda_resumes_on_cpu(tmp_path, cifar_root, monkeypatch):
    """The device is not part of a run's result: a last.pth written on the GPU (CUDA RNG state, optimizer
    state on the GPU) continues on the CPU."""
    d = make_exp(tmp_path / "run", **dict(TINY, data_root=cifar_root, device=CUDA_DEVICE, epochs=2))
    monkeypatch.setattr(train_scratch, "ScratchTask", lambda m, ls: _StopAt(m, 7))  # mid-epoch 2
    assert run_main(train_scratch.main, ["--save_path", d]) == 128 + signal.SIGTERM
    assert "cuda" in load_checkpoint(os.path.join(d, "last.pth"))["rng"]
    monkeypatch.undo()
    assert run_main(train_scratch.main, ["--save_path", d, "--resume", "--device", "cpu"]) == 0
    m = read_json(os.path.join(d, "metrics.json"))
    assert m["device"] == "cpu" and len(m["history"]) == 2 and m["final_acc"] is not None


@cuda_only
def test_dfad_fp16_with_the_generator_scaler(tmp_path, cifar_root):
    teacher = str(tmp_path / "teacher.pth")
    save_checkpoint(teacher, model_record(models.build("cnn_small", 10), "cnn_small", "cifar10"))
    d = make_exp(tmp_path / "dfad", model="cnn_small", epochs=1, batch_size=16, eval_batch_size=50,
                 iters_per_epoch=2, k=2, nz=32, ngf=16, lr=0.05, milestones=[1], log_every=1, amp="fp16",
                 device=CUDA_DEVICE,
                 data_root=cifar_root, teacher=teacher)
    assert run_main(train_dfad.main, ["--save_path", d]) == 0
    m = read_json(os.path.join(d, "metrics.json"))
    assert m["amp"] == "float16" and m["device"].startswith("cuda")
    gen = m["history"][-1]["gen_l1"]
    assert gen == gen and gen >= 0  # the generator stepped through its own scaler, without NaN


# ------------------------------------------------------------------------------------------ everywhere
def test_cuda_device_gets_an_index(monkeypatch):
    """torch.cuda.set_device refuses torch.device('cuda') (no index): the engine names the first GPU, and a
    GPU that is not there is one error line, not a CUDA traceback."""
    from torch.cuda._utils import _get_device_index
    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: chosen.append(_get_device_index(d)))  # its real check
    one = types.SimpleNamespace(world_size=1, local_rank=0)
    assert Engine._pick_device(one, "cuda") == torch.device("cuda", 0) and chosen == [0]
    assert Engine._pick_device(one, "auto") == torch.device("cuda", 0)
    assert Engine._pick_device(one, "cuda:1") == torch.device("cuda", 1) and chosen[-1] == 1
    assert Engine._pick_device(types.SimpleNamespace(world_size=2, local_rank=1), "cuda") == torch.device("cuda", 1)
    with pytest.raises(UserError, match=r"device cuda:2 asked for but 2 CUDA GPU\(s\) are visible"):
        Engine._pick_device(one, "cuda:2")
    with pytest.raises(UserError, match="one per process under torchrun"):
        Engine._pick_device(types.SimpleNamespace(world_size=4, local_rank=3), "cuda")


@pytest.mark.skipif(HAS_CUDA, reason="a GPU is visible: the CUDA-only tests run instead of skipping")
def test_cuda_only_tests_skip_with_a_reason_without_a_gpu():
    env = {k: v for k, v in os.environ.items() if k != "TEST_DEVICE"}
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-m", "device", "-p", "no:cacheprovider",
                          "tests/test_cuda.py"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:]
    summary = out.stdout.strip().splitlines()[-1]
    skipped = int(re.search(r"(\d+) skipped", summary).group(1))
    assert "passed" not in summary and "failed" not in summary and "error" not in summary, summary
    assert skipped == 7, summary  # every cuda_only test of this file, none run
    reasons = re.findall(r"^SKIPPED \[(\d+)\] \S+: (.*)$", out.stdout, re.M)
    assert sum(int(n) for n, _ in reasons) == skipped and all(r == CUDA_SKIP_REASON for _, r in reasons), reasons
