"""The shared-teacher battery (utils/battery.py, train_kd.py --battery): each student ends where its lone run
with the same seed ends, the teacher answers each batch once, a stopped battery resumes, bad input is refused."""
import os
import signal

import pytest
import torch

import train_kd
from conftest import TINY, make_exp, read_json, run_main
from utils.battery import SharedForward

ATTACKS = ("vanilla", "markov", "dkd")  # markov: a trained part of its own; dkd: a warm-up that reads progress


def _runs(root, cifar_root, teacher, prefix, **over):
    return [make_exp(root / f"{prefix}_{a}", **dict(TINY, data_root=cifar_root, teacher=teacher, attack=a, **over))
            for a in ATTACKS]


def _weights(folder):
    return torch.load(os.path.join(folder, "weights.pth"), weights_only=True)["model"]


def _same_run(a, b, tol=1e-5, train_rows=True):
    """Two runs ended alike: every weight within tol, the same per-epoch test accuracies and (train_rows) train
    losses and accuracies (a resumed epoch's train row covers only the steps after the resume)."""
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.allclose(wa[k].float(), wb[k].float(), atol=tol, rtol=0), (a, k)
    ha, hb = (read_json(os.path.join(a, "metrics.json"))["history"],
              read_json(os.path.join(b, "metrics.json"))["history"])
    for ra, rb in zip(ha, hb):
        for key in ra:
            if key.startswith("train_") and key != "train_img_per_s" and train_rows or key == "test_acc":
                assert ra[key] == pytest.approx(rb[key], abs=tol), (a, key)


def _count_shared_hits(monkeypatch):
    """A list that gets the shared teacher forward's running count of answers served from its kept output, one
    entry per call."""
    hits, real = [], SharedForward.forward

    def counted(self, x):
        out = real(self, x)
        hits.append(self.hits)
        return out

    monkeypatch.setattr(SharedForward, "forward", counted)
    return hits


@pytest.mark.device
def test_battery_students_match_their_lone_runs(tmp_path, cifar_root, teacher, monkeypatch):
    alone = _runs(tmp_path, cifar_root, teacher, "alone", seed=3)
    for d in alone:
        assert run_main(train_kd.main, ["--save_path", d]) == 0
    together = _runs(tmp_path, cifar_root, teacher, "battery", seed=3)
    calls = _count_shared_hits(monkeypatch)
    assert run_main(train_kd.main, ["--battery", ",".join(together)]) == 0
    for a, b in zip(alone, together):
        _same_run(a, b)
        m = read_json(os.path.join(b, "metrics.json"))
        assert m["battery"] == together and m["attack"] == os.path.basename(b).split("_")[1]
        assert m["inputs"]["teacher"] == read_json(os.path.join(a, "metrics.json"))["inputs"]["teacher"]
        assert os.path.isfile(os.path.join(b, "config.json")) and os.path.isfile(os.path.join(b, "last.pth"))
    steps = read_json(os.path.join(together[0], "metrics.json"))["history"][-1]
    # the teacher ran once per training batch: every other student's call was answered from the kept output
    n_batches = len(calls) // len(ATTACKS)
    assert calls[-1] == n_batches * (len(ATTACKS) - 1) and steps["epoch"] == TINY["epochs"]
    markov = _weights(together[1])
    assert read_json(os.path.join(together[1], "metrics.json"))["markov_rank"] == 3 and markov


def _stopping_at(counts):
    """A KDTask that raises its engine's stop flag, as SIGTERM would, after the number of steps `counts` gives its
    attack (a step count per attack, or a function of the steps per epoch); the other attacks run on."""

    class Stopping(train_kd.KDTask):
        def after_step(self, engine, step):
            self.count = getattr(self, "count", 0) + 1
            at = counts.get(self.attack.name)
            if at is not None and self.count == (at(self.steps_per_epoch(engine)) if callable(at) else at):
                engine.request_stop(signal.SIGTERM)

    return Stopping


@pytest.mark.device
def test_stopped_battery_resumes_to_the_uninterrupted_result(tmp_path, cifar_root, teacher, monkeypatch, capsys):
    whole = _runs(tmp_path, cifar_root, teacher, "whole")
    assert run_main(train_kd.main, ["--battery", ",".join(whole)]) == 0
    cut = _runs(tmp_path, cifar_root, teacher, "cut")
    monkeypatch.setattr(train_kd, "KDTask", _stopping_at({"dkd": 3}))  # the dkd student stops all
    assert run_main(train_kd.main, ["--battery", ",".join(cut)]) == 128 + signal.SIGTERM
    monkeypatch.undo()
    for d in cut:  # every student stopped at the same step, none finished
        assert torch.load(os.path.join(d, "last.pth"), weights_only=True)["step"] == 3
        assert not os.path.isfile(os.path.join(d, "metrics.json"))
    assert "--battery " + ",".join(cut) + " --resume" in capsys.readouterr().out
    assert run_main(train_kd.main, ["--battery", ",".join(cut), "--resume"]) == 0
    for a, b in zip(whole, cut):
        _same_run(a, b, train_rows=False)


@pytest.mark.device
def test_battery_students_stopped_apart_resume_together(tmp_path, cifar_root, teacher, monkeypatch, capsys):
    whole = _runs(tmp_path, cifar_root, teacher, "whole")
    assert run_main(train_kd.main, ["--battery", ",".join(whole)]) == 0
    apart = _runs(tmp_path, cifar_root, teacher, "apart")
    # lone runs killed at different times (or a battery killed between one student's checkpoint and the next's)
    # leave them apart: dkd after 3 steps, markov after the last step of epoch 1 (before its evaluation), vanilla
    # 2 steps into epoch 2
    monkeypatch.setattr(train_kd, "KDTask", _stopping_at({"dkd": 3, "markov": lambda n: n, "vanilla": lambda n: n + 2}))
    for d in apart:
        assert run_main(train_kd.main, ["--save_path", d]) == 128 + signal.SIGTERM
    monkeypatch.undo()
    starts = [tuple(torch.load(os.path.join(d, "last.pth"), weights_only=True)[k] for k in ("epoch", "step"))
              for d in apart]
    assert starts == [(1, 2), (0, 5), (0, 3)]  # vanilla, markov, dkd: 5 steps an epoch
    capsys.readouterr()
    hits = _count_shared_hits(monkeypatch)
    assert run_main(train_kd.main, ["--battery", ",".join(apart), "--resume"]) == 0
    # one teacher forward per batch once they train together: epoch 2's steps 1-2 serve two students, 3-5 three
    assert hits[-1] == 2 * 1 + 3 * 2
    assert "resume at epoch 0 step 3 (1), epoch 0 step 5 (1), epoch 1 step 2 (1); each joins" in capsys.readouterr().out
    for a, b in zip(whole, apart):  # each joined the loop at its own start and ended as if never stopped
        _same_run(a, b, train_rows=False)
        assert len(read_json(os.path.join(b, "metrics.json"))["history"]) == TINY["epochs"]


def test_shared_forward_runs_once_per_input():
    seen = []
    module = SharedForward(torch.nn.Identity())
    module.module.register_forward_hook(lambda m, i, o: seen.append(1))
    x, y = torch.ones(2), torch.ones(2)
    assert module(x) is module(x) and len(seen) == 1
    module(y)  # equal values, another tensor: run again
    assert len(seen) == 2 and module.hits == 1 and module.calls == 3


@pytest.mark.parametrize("bad,expected", [
    ({"seed": 1}, "must share seed"),
    ({"batch_size": 10}, "must share batch_size"),
    ({"tau_sweep": [1, 4]}, "is not trained in a battery"),
])
def test_battery_refuses_students_that_cannot_share(tmp_path, cifar_root, teacher, capsys, bad, expected):
    runs = _runs(tmp_path, cifar_root, teacher, "run")
    make_exp(runs[-1], **dict(read_json(os.path.join(runs[-1], "params.json")), **bad))
    assert run_main(train_kd.main, ["--battery", ",".join(runs)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expected in err[0] and err[0].startswith("error: ")
    assert not any(os.path.exists(os.path.join(d, "config.json")) for d in runs)  # nothing written


@pytest.mark.parametrize("argv,expected", [
    (["--battery", "a"], "at least two run folders"),
    (["--battery", "a,a"], "names a folder twice"),
    (["--battery", "a,b", "--save_path", "a"], "not both"),
])
def test_battery_bad_command_lines(tmp_path, cifar_root, teacher, capsys, argv, expected, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("a", "b"):
        make_exp(tmp_path / name, **dict(TINY, data_root=cifar_root, teacher=teacher))
    assert run_main(train_kd.main, argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expected in err[0]


def test_battery_resume_without_checkpoints_is_refused(tmp_path, cifar_root, teacher, capsys):
    runs = _runs(tmp_path, cifar_root, teacher, "run")
    assert run_main(train_kd.main, ["--battery", ",".join(runs), "--resume"]) == 2
    assert "last.pth not found" in capsys.readouterr().err
    assert not any(os.path.exists(os.path.join(d, "config.json")) for d in runs)
