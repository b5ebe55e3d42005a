"""The training engine itself (utils/engine.py): the one loop (a lone run is a battery of one), stopping and
resuming to the uninterrupted result, and the lr schedule. Scripts' own behaviour lives in their test files."""
import os
import signal

import pytest
import torch

import train_kd
import train_scratch
from conftest import TINY, make_exp, read_json, run_main
from utils.engine import lr_factor


def _weights(folder):
    return torch.load(os.path.join(folder, "weights.pth"), weights_only=True)["model"]


# ------------------------------------------------------------------------------------------ the one loop
def test_a_lone_run_and_a_battery_of_one_end_bitwise_equal(tmp_path, cifar_root, teacher):
    """One loop: a lone run (Engine.fit) and train_kd's battery path with one student (shared teacher forward,
    the battery's own Member and RNG swap) end with the same bits. markov: a trained part beside the model."""
    lone, one = (make_exp(tmp_path / name, **dict(TINY, data_root=cifar_root, teacher=teacher, attack="markov",
                                                  seed=5)) for name in ("lone", "one"))
    assert run_main(train_kd.main, ["--save_path", lone]) == 0
    args, _ = train_kd.parse_args(["--battery", one])  # the command line asks for two; the function takes one
    [metrics] = train_kd.battery([one], args)
    assert metrics["battery"] == [one]
    wa, wb = _weights(lone), _weights(one)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    pa, pb = (torch.load(os.path.join(d, "last.pth"), weights_only=True)["parts"]["markov"]["module"]
              for d in (lone, one))
    assert pa.keys() == pb.keys() and pa and all(torch.equal(pa[k], pb[k]) for k in pa)
    ha, hb = (read_json(os.path.join(d, "metrics.json"))["history"] for d in (lone, one))
    drop = ("train_img_per_s",)
    assert [{k: v for k, v in r.items() if k not in drop} for r in ha] == \
           [{k: v for k, v in r.items() if k not in drop} for r in hb]


# ------------------------------------------------------------------------------------------ stop and resume
class _StopAt(train_scratch.ScratchTask):
    """Raise the engine's stop flag at a given global step, as SIGTERM would."""

    def __init__(self, model, stop_at):
        super().__init__(model, 0.0)
        self.stop_at, self.count = stop_at, 0

    def after_step(self, engine, step):
        self.count += 1
        if self.count == self.stop_at:
            engine.request_stop(signal.SIGTERM)


def test_interrupt_then_resume_matches_uninterrupted(tmp_path, cifar_root, monkeypatch, capsys):
    full = make_exp(tmp_path / "full", **dict(TINY, data_root=cifar_root, epochs=3))
    assert run_main(train_scratch.main, ["--save_path", full]) == 0
    part = make_exp(tmp_path / "part", **dict(TINY, data_root=cifar_root, epochs=3))
    monkeypatch.setattr(train_scratch, "ScratchTask", lambda m, ls: _StopAt(m, 7))  # mid-epoch 2 (5 steps/epoch)
    assert run_main(train_scratch.main, ["--save_path", part]) == 128 + signal.SIGTERM
    assert "--resume" in capsys.readouterr().out
    assert torch.load(os.path.join(part, "last.pth"), weights_only=True)["step"] == 2
    monkeypatch.undo()
    assert run_main(train_scratch.main, ["--save_path", part, "--resume"]) == 0
    a, b = read_json(os.path.join(full, "metrics.json")), read_json(os.path.join(part, "metrics.json"))
    assert a["final_acc"] == b["final_acc"]
    wa = torch.load(os.path.join(full, "last.pth"), weights_only=True)["model"]
    wb = torch.load(os.path.join(part, "last.pth"), weights_only=True)["model"]
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------ the lr schedule
def test_lr_schedules():
    cfg = {"epochs": 10, "schedule": "onecycle", "warmup": 0.2, "milestones": [5, 8], "lr_decay": 0.1}
    assert lr_factor(cfg, 2.0) == pytest.approx(1.0) and lr_factor(cfg, 10.0) == pytest.approx(0.0)
    assert lr_factor(dict(cfg, schedule="step"), 6.0) == pytest.approx(0.1)
    assert lr_factor(dict(cfg, schedule="step"), 9.0) == pytest.approx(0.01)
    assert lr_factor(dict(cfg, schedule="cosine"), 5.0) == pytest.approx(0.5)
