"""train_scratch.py end to end on tiny data: config handling, outputs, bad input (its stop and resume are the
engine's, tested in tests/test_engine.py)."""
import os
import subprocess
import sys

import pytest
import torch

import train_scratch
from utils.checkpoint import CPU_ISA
from conftest import ROOT, TEST_DEVICE, TINY, make_exp, read_json, run_main


def _exp(tmp_path, cifar_root, name="run", **over):
    params = dict(TINY, data_root=cifar_root)
    params.update(over)
    return make_exp(tmp_path / name, **params)


@pytest.mark.device
def test_trains_and_writes_outputs(tmp_path, cifar_root):
    d = _exp(tmp_path, cifar_root)
    assert run_main(train_scratch.main, ["--save_path", d, "--epochs", "3", "--model", "cnn"]) == 0
    for f in ("last.pth", "best.pth", "metrics.json", "config.json", "log.csv", "train.log"):
        assert os.path.isfile(os.path.join(d, f)), f
    assert os.listdir(os.path.join(d, "tb"))
    m = read_json(os.path.join(d, "metrics.json"))
    assert m["epochs"] == 3 and m["model"] == "cnn" and len(m["history"]) == 3
    assert m["final_acc"] > 30  # 10 colour-coded classes: far above chance after 3 epochs
    assert m["images_per_s"] > 0 and m["seed"] == 0 and "torch" in m
    assert m["device"].split(":")[0] == TEST_DEVICE.split(":")[0]
    # the processor, whose instruction sets decide the last bits of an fp32 run (CPU_ISA), as /proc/cpuinfo says
    assert m["processor"]["cpu"] and set(m["processor"]["cpu_isa"]) <= set(CPU_ISA)
    if os.path.isfile("/proc/cpuinfo"):
        flags = open("/proc/cpuinfo").read().split()
        assert ("avx512_bf16" in m["processor"]["cpu_isa"]) == ("avx512_bf16" in flags)
        assert ("avx2" in m["processor"]["cpu_isa"]) == ("avx2" in flags)
    assert ("gpu" in m["processor"]) == m["device"].startswith("cuda")
    assert read_json(os.path.join(d, "config.json"))["epochs"] == 3  # CLI override resolved
    ckpt = torch.load(os.path.join(d, "last.pth"), weights_only=True)
    assert ckpt["arch"] == "cnn" and ckpt["num_classes"] == 10 and ckpt["epoch"] == 3
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in ckpt["model"])


@pytest.mark.parametrize("params,args,message", [
    ({"epochs": "two"}, [], "'epochs' must be an integer"),
    ({"colour": 1}, [], "unknown key 'colour'"),
    ({}, ["--model", "resnet9000"], "unknown model 'resnet9000'"),
    ({}, ["--epochs", "-1"], "'epochs' must be > 0"),
    ({}, ["--dataset", "mnist"], "'dataset' must be one of"),
    ({}, ["--batch_size", "5000"], "batch_size 5000 is larger"),
    ({"data_root": "/nonexistent/data"}, [], "does not exist"),
    ({}, ["--resume"], "last.pth not found"),
    ({}, ["--lr", "1e9"], "NaN/inf"),
])
def test_bad_input_is_one_line_exit_2(tmp_path, cifar_root, capsys, params, args, message):
    d = _exp(tmp_path, cifar_root, **params)
    before = sorted(os.listdir(d))
    assert run_main(train_scratch.main, ["--save_path", d] + args) == 2
    err = [line.split("\r")[-1] for line in capsys.readouterr().err.splitlines()]
    err = [line for line in err
           if line.strip() and "it/s" not in line and "s/it" not in line]  # progress-bar lines aside
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    if message != "NaN/inf":  # a NaN run has trained and logged; everything else touches nothing
        assert sorted(os.listdir(d)) == before


def test_malformed_or_missing_params(tmp_path, capsys):
    d = tmp_path / "bad"
    d.mkdir()
    assert run_main(train_scratch.main, ["--save_path", str(d)]) == 2
    assert "params.json not found" in capsys.readouterr().err
    (d / "params.json").write_text("{epochs: 3")
    assert run_main(train_scratch.main, ["--save_path", str(d)]) == 2
    assert "not valid JSON" in capsys.readouterr().err


def test_cli_subprocess_list_models_and_help():
    out = subprocess.run([sys.executable, "train_scratch.py", "--list-models"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "resnet20" in out.stdout and "wrn40_2" in out.stdout
    bad = subprocess.run([sys.executable, "train_scratch.py", "--save_path", "/nonexistent/exp"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.strip().startswith("error:") and "Traceback" not in bad.stderr
