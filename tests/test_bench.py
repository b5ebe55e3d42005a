"""The benchmark script still runs (a smoke test against drift; its numbers are not checked here)."""
import json
import subprocess
import sys

import pytest
import torch

from conftest import ROOT


def test_bench_prints_a_row_per_step():
    out = subprocess.run([sys.executable, "bench/bench_train.py", "--step", "scratch", "kd", "possessive",
                          "--models", "cnn_small", "--teacher", "cnn_small", "--steps", "1", "--warmup", "1",
                          "--batch_size", "8"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [line.split() for line in out.stdout.splitlines() if line.startswith(("scratch", "kd", "possessive"))]
    assert [r[0] for r in rows] == ["scratch", "kd", "possessive"]
    assert all(r[-3].endswith("x") and float(r[-3][:-1]) > 0 for r in rows)


def test_battery_bench_prints_separate_and_shared_per_student(tmp_path):
    out = subprocess.run([sys.executable, "bench/bench_battery.py", "--teacher", "cnn_small", "--student", "cnn_small",
                          "--attacks", "vanilla", "tckd", "--steps", "2", "--warmup", "1", "--batch_size", "8",
                          "--json", str(tmp_path / "b.json"), "--cache_epochs", "1200"], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.strip().splitlines()
    assert lines[-1].startswith("battery with the answer cache, as over 1200 epochs (87% of the teacher's answers "
                                "kept)")
    last = lines[-2].split()
    assert last[:2] == ["2", "students"] and float(last[2]) > 0 and float(last[3]) > 0 and last[4].endswith("x")
    with open(tmp_path / "b.json") as f:
        rec = json.load(f)
    assert set(rec["separate_s"]) == {"vanilla", "tckd"} and rec["speedup"] == pytest.approx(
        rec["battery_img_s_per_student"] / rec["separate_img_s_per_student"])
    cache = rec["cache"]["1200"]  # the timed batches' answers: the teacher ran on the versions not kept
    assert cache["teacher_answers"]["served"] == 3 * 8 and cache["teacher_answers"]["computed"] < 3 * 8  # warm-up too
    assert cache["battery_img_s_per_student"] > 0


def test_battery_bench_refuses_a_run_of_no_epochs():
    out = subprocess.run([sys.executable, "bench/bench_battery.py", "--cache_epochs", "240", "0"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.strip().splitlines()[-1].endswith("--cache_epochs takes epoch counts of at least 1, e.g. 240 "
                                                         "1200; got [240, 0]")


def test_argmax_agreement_counts_the_thief_images_whose_argmax_is_the_label(tmp_path, teacher, cifar_root):
    """bench/argmax_agreement.py: a row per teacher and seed; the clean share is the teacher's top-1 on the seed's
    class-balanced subset, counted here on images read and normalised independently of the loader."""
    from utils.checkpoint import freeze
    from utils.constants import DATASETS
    from utils.data import class_balanced_subset, load_split
    from utils.thief import load_teacher
    out = subprocess.run([sys.executable, "bench/argmax_agreement.py", "--teachers", teacher, "--subset", "50",
                          "--seeds", "0", "1", "--epochs", "2", "--batch_size", "10", "--data_root", cifar_root,
                          "--json", str(tmp_path / "a.json")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    with open(tmp_path / "a.json") as f:
        rows = json.load(f)
    assert [(r["teacher"], r["seed"]) for r in rows] == [(teacher, 0), (teacher, 1)]
    assert sum(line.startswith(f"| {teacher} |") for line in out.stdout.splitlines()) == 2
    info = DATASETS["cifar10"]
    images, labels = load_split("cifar10", cifar_root, True)
    model, _ = load_teacher({"teacher": teacher, "dataset": "cifar10"})
    for r in rows:
        idx = class_balanced_subset(labels, 50, 10, r["seed"])
        x = (images[idx].float() / 255 - torch.tensor(info.mean).view(1, 3, 1, 1)) / torch.tensor(info.std).view(
            1, 3, 1, 1)
        with torch.no_grad():
            assert r["clean"] == pytest.approx((freeze(model)(x).argmax(1) == labels[idx]).float().mean().item())
        assert 0 <= r["augmented"] <= 1 and r["epochs"] == 2 and r["subset"] == 50


def test_argmax_agreement_refuses_an_empty_subset():
    out = subprocess.run([sys.executable, "bench/argmax_agreement.py", "--subset", "0"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stdout == ""
    err = out.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].endswith("--subset and --epochs must be at least 1, got 0 and 20")
