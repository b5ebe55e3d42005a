"""bench/cuda_check.py as a CPU rehearsal, end to end at its smallest settings; a failing check; bad input."""
import os
import re
import subprocess
import sys
import types

import pytest
import torch

import reproduce
from conftest import HAS_CUDA, ROOT, read_json, run_main

sys.path.insert(0, os.path.join(ROOT, "bench"))
import cuda_check  # noqa: E402

# Every check shrunk to the least it can do on the CPU (compile alone is left out: building a CPU kernel takes
# close to a minute by itself); about a minute on 2 cores.
SMALLEST = ["--device", "cpu", "--tests_k", "crop_and_flip", "--tiny_only", "teacher_", "--bench_models", "cnn_small",
            "--bench_steps", "1", "--bench_warmup", "0", "--bench_batch", "8", "--bench_peak_size", "256",
            "--paper_epoch_images", "130", "--epoch_images", "130", "--epoch_only", "train_scratch.py/cnn",
            "--eval_images", "20", "--epoch_passes", "1", "--skip", "compile"]


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("cuda_check") / "out")
    proc = subprocess.run([sys.executable, "bench/cuda_check.py", "--out", out] + SMALLEST, cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    return out, proc.stdout


def test_rehearsal_table_has_a_row_per_check(rehearsal):
    out, stdout = rehearsal
    rows = read_json(os.path.join(out, "cuda_check.json"))["rows"]
    by_check = {}
    for r in rows:
        by_check.setdefault(r["check"], []).append(r)
    assert list(by_check) == list(cuda_check.CHECKS)
    # the engine-precision bench row is skipped, with its reason, where the engine trains in fp32 (a CPU
    # without bf16, e.g. an AVX2-only EPYC); every other row but compile must pass
    fp32_only = cuda_check.engine_precision(torch.device("cpu")) == "fp32"
    skipped = [r for r in rows if r["status"] == "skipped" and r["check"] != "compile"]
    assert [r["name"] for r in skipped] == (["bench, engine precision"] if fp32_only else [])
    assert all("trains in fp32" in r["reason"] for r in skipped)
    assert [r["status"] for r in rows if r["check"] != "compile" and r not in skipped] == \
        ["ok"] * (len(rows) - 1 - len(skipped))
    assert by_check["compile"] == [cuda_check.row("compile", "compile", "skipped", reason="--skip")]
    assert by_check["tests"][0]["figure"] == "1 passed"
    assert by_check["tiny"][0]["figure"].startswith("1/1 steps finished on cpu")
    assert {r["name"] for r in by_check["bench"]} >= {"bench cnn_small fp32"}
    assert all("img/s" in r["figure"] and "matmul peak" in r["figure"] for r in by_check["bench"]
               if r["status"] == "ok")
    assert by_check["torchrun"][0]["figure"].startswith("world size 1 on cpu")
    battery = by_check["battery"][0]  # every attack of the registry's battery, with and without the answer cache
    assert battery["name"].startswith(f"battery of {len(cuda_check.battery_attacks())} cnn students")
    assert re.search(r"battery \d+ \(x[\d.]+\); with the answer cache as over 240 epochs \d+ \(x[\d.]+\), as over "
                     r"1200 epochs \d+", battery["figure"]), battery["figure"]
    assert [r["name"] for r in by_check["epochs"]] == ["epoch train_scratch.py cnn"]
    assert all(r["seconds"] > 0 for r in rows if r["status"] == "ok")
    # one table on the screen and in the markdown, the same rows in both
    md = open(os.path.join(out, "cuda_check.md")).read()
    assert md.count("| check | status | seconds | key figure |") == 1
    for r in rows:
        assert f"| {r['name']} | {cuda_check.status_text(r)} |" in md
        assert r["name"] in stdout.split("key figure", 1)[1]
    assert stdout.count("key figure") == 1 and "0 FAILED" in stdout
    assert os.path.isfile(os.path.join(out, "logs", "tests.log"))


def test_rehearsal_epoch_times_feed_the_projection(rehearsal, tmp_path, capsys):
    out, _ = rehearsal
    times = read_json(os.path.join(out, "epoch_times.json"))
    assert times["device"] == "cpu" and times["preset"] == "paper"
    entries = times["epoch_times"]
    assert sorted(entries) == ["train_scratch.py/cnn", "train_scratch.py/resnet18"]
    assert all(e["seconds_per_epoch"] > 0 and e["batch_size"] == 128 for e in entries.values())
    assert "extrapolated from 130 of 50000 generated images" in entries["train_scratch.py/resnet18"]["how"]
    argv = ["--preset", "paper", "--dry_run", "--cost", os.path.join(out, "epoch_times.json"),
            "--data_root", str(tmp_path), "--exp_root", str(tmp_path / "paper")]
    assert run_main(reproduce.main, argv) == 0
    text = capsys.readouterr().out
    # the teacher, and scratch and label-smoothing students of resnet18 and cnn per seed (the preset's three)
    seeds = reproduce.PRESETS["paper"]["seeds"]
    assert f"for {1 + 4 * len(seeds)} of {len(reproduce.plan('paper', seeds=seeds))} steps" in text
    hours = 200 * entries["train_scratch.py/resnet18"]["seconds_per_epoch"] / 3600
    assert "| teacher_resnet18 | train_scratch.py | resnet18 | 1 x 200 |" in text and f"| {hours:.2f} |" in text


def test_timing_runs_keep_the_paper_settings():
    """A timing run changes only what it must: epochs, data, device, the teacher file, one tau of a sweep,
    and how much of an epoch it trains."""
    ctx = types.SimpleNamespace(device_arg="cpu", paper_data="D", real=False, teacher=lambda: "T.pth",
                                args=types.SimpleNamespace(eval_images=200, dfad_iters=10))
    steps = {s["name"]: s for s in reproduce.plan("paper")}
    kd = steps["kd_dkd_rml_resnet32"]["params"]
    p, full, what = cuda_check._epoch_params(ctx, steps["kd_dkd_rml_resnet32"], 5120, 2)
    changed = {"epochs", "device", "data_root", "test_subset", "tau", "tau_sweep", "teacher", "subset"}
    assert {k: v for k, v in p.items() if k not in changed} == {k: v for k, v in kd.items() if k not in changed}
    assert p["tau_sweep"] == [] and p["tau"] == kd["tau_sweep"][0] and p["teacher"] == "T.pth"
    assert p["epochs"] == 2 and p["subset"] == 5120 and p["test_subset"] == 200 and p["data_root"] == "D"
    assert full == 50000 // 128 and what == "5120 of 50000 generated images"
    dfad = steps["dfad_rml_resnet18"]["params"]
    p, full, what = cuda_check._epoch_params(ctx, steps["dfad_rml_resnet18"], 5120, 2)
    assert p["iters_per_epoch"] == 10 and "subset" not in p and p["k"] == dfad["k"] == 5 and p["batch_size"] == 256
    assert full == 50 * 5 and what == "10 of 50 generator iterations"


def test_a_failing_check_is_a_row_and_exit_1(tmp_path, capsys):
    code = run_main(cuda_check.main, ["--device", "cpu", "--out", str(tmp_path / "out"), "--only", "tests",
                                      "--tests_k", "no_test_has_this_name"])
    assert code == 1
    rows = read_json(str(tmp_path / "out" / "cuda_check.json"))["rows"]
    assert rows[0]["status"] == "FAILED" and rows[0]["figure"].startswith("exit 5: ")  # pytest: nothing selected
    assert "(logs/tests.log)" in rows[0]["figure"]
    assert [r["status"] for r in rows[1:]] == ["skipped"] * (len(cuda_check.CHECKS) - 1)
    assert "1 FAILED" in capsys.readouterr().out


@pytest.mark.parametrize("args,message", [
    (["--device", "tpu"], "--device must be cuda, cuda:N or cpu"),
    (["--device", "cpu", "--epoch_images", "55"], "--epoch_images must be 0 or at least 130"),
    (["--device", "cpu", "--epoch_images", "0"], "needs --data_root"),
    (["--device", "cpu", "--bench_models", "resnet9000"], "unknown model 'resnet9000'"),
    (["--device", "cpu", "--nproc", "0"], "--nproc must be at least 1"),
    (["--device", "cpu", "--data_root", "{tmp}"], "cifar-10-batches-py"),
    (["--device", "cpu", "--out", "{tmp}"], "was not written by bench/cuda_check.py"),
] + ([] if HAS_CUDA else [(["--device", "cuda"], "no CUDA GPU is visible; --device cpu runs the CPU rehearsal")]))
def test_bad_input_is_one_line_exit_2(tmp_path, capsys, args, message):
    os.makedirs(tmp_path / "work")  # someone else's folder: never replaced
    args = [a.format(tmp=tmp_path) for a in args]
    if "--out" not in args:
        args += ["--out", str(tmp_path / "out")]
    assert run_main(cuda_check.main, args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert os.listdir(tmp_path) in (["work"], ["work", "out"], ["out", "work"]) and not os.listdir(tmp_path / "work")
