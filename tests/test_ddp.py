"""Two CPU processes under torchrun (gloo) against one process with the same global batch.

On the CPU whatever TEST_DEVICE is: two NCCL ranks cannot share one GPU, and gloo is what this tests."""
import os
import socket
import subprocess
import sys

import torch

from conftest import ROOT, TINY, make_exp, read_json


def test_two_process_gloo_matches_single_process(tmp_path, cifar_root):
    params = dict(TINY, data_root=cifar_root, epochs=2, device="cpu")
    single = make_exp(tmp_path / "single", **params)
    multi = make_exp(tmp_path / "multi", **params)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    one = subprocess.run([sys.executable, "train_scratch.py", "--save_path", single], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    with socket.socket() as sock:  # a free port of our own, so concurrent test runs do not collide
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
                          "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}",
                          "train_scratch.py", "--save_path", multi], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = read_json(os.path.join(single, "metrics.json")), read_json(os.path.join(multi, "metrics.json"))
    assert b["world_size"] == 2 and a["world_size"] == 1
    # Same data order and global batch; only BatchNorm statistics differ (per-rank halves of each batch).
    assert abs(a["final_acc"] - b["final_acc"]) <= 10.0
    assert abs(a["history"][0]["train_loss"] - b["history"][0]["train_loss"]) <= 0.05 * a["history"][0]["train_loss"]
    wa = torch.load(os.path.join(single, "last.pth"), weights_only=True)["model"]
    wb = torch.load(os.path.join(multi, "last.pth"), weights_only=True)["model"]
    # conv and linear weights within 10% (relative L2); BN biases start at 0, so they are left out
    rel = max(((wa[k] - wb[k]).norm() / wa[k].norm()).item() for k in wa if wa[k].dim() > 1)
    assert rel < 0.1, rel
    # one set of files: rank 0 alone wrote, and the log holds one run's lines, not two
    assert sorted(os.listdir(multi)) == sorted(os.listdir(single))
    log = open(os.path.join(multi, "train.log")).read()
    assert log.count("done: final test acc") == 1
