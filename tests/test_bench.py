"""The benchmark script still runs (a smoke test against drift; its numbers are not checked here)."""
import subprocess
import sys

from conftest import ROOT


def test_bench_prints_a_row_per_step():
    out = subprocess.run([sys.executable, "bench/bench_train.py", "--step", "scratch", "kd", "possessive",
                          "--models", "cnn_small", "--teacher", "cnn_small", "--steps", "1", "--warmup", "1",
                          "--batch_size", "8"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [line.split() for line in out.stdout.splitlines() if line.startswith(("scratch", "kd", "possessive"))]
    assert [r[0] for r in rows] == ["scratch", "kd", "possessive"]
    assert all(r[-3].endswith("x") and float(r[-3][:-1]) > 0 for r in rows)
