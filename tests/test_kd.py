"""train_kd.py on tiny data: every attack end to end, the frozen teacher, the tau sweep, bad teachers and configs."""
import json
import os
import signal

import pytest
import torch

import models
import train_kd
import train_scratch
import utils.attacks
from conftest import TINY, make_exp, read_json, run_main
from utils.checkpoint import model_record, save_checkpoint
from utils.engine import Engine
from utils.losses import reverse_logits
from utils.thief import read_done


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory, cifar_root):
    d = make_exp(tmp_path_factory.mktemp("teacher") / "cnn_small", **dict(TINY, data_root=cifar_root))
    assert run_main(train_scratch.main, ["--save_path", d]) == 0
    return os.path.join(d, "last.pth")


def _exp(tmp_path, cifar_root, teacher, name="run", **over):
    params = dict(TINY, data_root=cifar_root, teacher=teacher, epochs=1)
    params.update(over)
    return make_exp(tmp_path / name, **params)


def _error_lines(capsys):
    err = [line.split("\r")[-1] for line in capsys.readouterr().err.splitlines()]
    return [line for line in err
            if line.strip() and "it/s" not in line and "s/it" not in line]  # progress-bar lines aside


def _tree(path):
    """Every file under path with its size and mtime: 'nothing changed' means this is equal."""
    out = {}
    for folder, _, files in os.walk(path):
        for f in files:
            st = os.stat(os.path.join(folder, f))
            out[os.path.relpath(os.path.join(folder, f), path)] = (st.st_size, st.st_mtime_ns)
    return out


# ------------------------------------------------------------------------------------------ end to end
@pytest.mark.device
@pytest.mark.parametrize("attack,columns", [
    ("vanilla", ("train_ce", "train_kd")),
    ("rereverse", ("train_ce", "train_kd")),
    ("dkd", ("train_ce", "train_tckd", "train_nckd")),
    ("tckd", ("train_ce", "train_tckd")),
])
def test_each_attack_runs_and_records(tmp_path, cifar_root, teacher_ckpt, attack, columns):
    d = _exp(tmp_path, cifar_root, teacher_ckpt, attack=attack, epochs=2)
    assert run_main(train_kd.main, ["--save_path", d]) == 0
    m = read_json(os.path.join(d, "metrics.json"))
    assert m["attack"] == attack and m["tau"] == 4.0 and m["teacher"] == teacher_ckpt
    assert m["teacher_arch"] == "cnn_small" and 0 <= m["teacher_acc"] <= 100
    assert m["script"] == "train_kd.py" and len(m["history"]) == 2 and m["final_acc"] is not None
    row = m["history"][-1]
    assert all(c in row for c in columns), row
    if attack == "tckd":
        assert "train_nckd" not in row and m["dkd_beta"] == 0.0
    if attack == "rereverse":
        assert m["rereverse_target"] == "argmax"
    assert os.path.isfile(os.path.join(d, "last.pth")) and os.path.isfile(os.path.join(d, "config.json"))


# ------------------------------------------------------------------------------------------ unit level
def _task(tmp_path, cifar_root, teacher_ckpt, **over):
    cfg = dict(train_kd.DEFAULTS, **TINY)
    cfg.update(data_root=cifar_root, teacher=teacher_ckpt, **over)
    engine = Engine(cfg, str(tmp_path / "unit"), "train_kd.py")
    engine.load_data()
    teacher, ckpt = train_kd.load_teacher(cfg)
    student = engine.to_device(models.build(cfg["model"], 10))
    task = train_kd.KDTask(student, teacher, cfg, ckpt["arch"])
    task.setup(engine)
    task.train_model = student
    return engine, task, next(iter(engine.loaders["train"]))


@pytest.mark.device
@pytest.mark.parametrize("attack", train_kd.ATTACKS)
def test_kd_step_leaves_teacher_unchanged(tmp_path, cifar_root, teacher_ckpt, attack):
    engine, task, batch = _task(tmp_path, cifar_root, teacher_ckpt, attack=attack)
    before = {k: v.clone() for k, v in task.teacher.state_dict().items()}  # weights and BN statistics
    student_before = [p.detach().clone() for p in task.model.parameters()]
    opt = engine.build_optimizer(task.model.parameters())
    engine.progress = 10.0  # past the DKD warm-up: every term is live
    for _ in range(2):
        terms, logits, y = task.loss(batch)
        opt.zero_grad()
        sum(terms.values()).backward()
        opt.step()
    assert not task.teacher.training
    for k, v in task.teacher.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None and not p.requires_grad for p in task.teacher.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(student_before, task.model.parameters()))


@pytest.mark.parametrize("target", ["argmax", "label"])
def test_rereverse_distils_the_reversed_teacher(tmp_path, cifar_root, teacher_ckpt, monkeypatch, target):
    engine, task, (x, y) = _task(tmp_path, cifar_root, teacher_ckpt, attack="rereverse", rereverse_target=target)
    seen = {}

    def spy(s, t, labels, tau, alpha):
        seen["t"] = t
        return {"kd": s.float().sum() * 0}

    monkeypatch.setattr(utils.attacks, "kd_loss", spy)
    task.loss((x, y))
    with torch.no_grad():
        raw = task.teacher(x)
    expected = reverse_logits(raw, raw.argmax(1) if target == "argmax" else y)
    torch.testing.assert_close(seen["t"], expected)
    assert not torch.equal(seen["t"], raw)


def test_rereverse_around_the_argmax_undoes_posthoc_reversal_exactly():
    """Post-hoc reversal keeps the top-1 and reverses the rest; re-reversal around the argmax reverses them back:
    the thief that knows this defence gets the original's logits bit for bit (distinct values, fp32), so its student
    is vanilla KD from the original (exps/threat_p2nl: the same log.csv). Around the label it does not, where the
    label is not the argmax."""
    from utils.defences import DEFENCES
    g = torch.Generator().manual_seed(0)
    z = torch.randn(256, 10, generator=g)
    defended = DEFENCES["posthoc"].transform(z, {})
    assert torch.equal(defended.argmax(1), z.argmax(1)) and not torch.equal(defended, z)
    y = torch.randint(0, 10, (256,), generator=g)
    def thief(target):
        return utils.attacks.ATTACKS["rereverse"]({"alpha": 0.9, "tau": 4.0, "rereverse_target": target}, 10)
    assert torch.equal(thief("argmax").query(defended, y), z)
    by_label = thief("label").query(defended, y)
    same = y == z.argmax(1)
    assert torch.equal(by_label[same], z[same]) and not torch.equal(by_label[~same], z[~same])


def test_rereverse_around_the_argmax_of_an_undefended_teacher_is_what_posthoc_reversal_serves():
    """Re-reversal around the argmax reverses the non-target order, as post-hoc reversal does: against a teacher
    that was never reversed the thief's counter-measure sends its student exactly post-hoc reversal's answers, so
    re-reversal from the original trains vanilla KD from post-hoc reversal (exps/threat_p2: the same
    weights_sha256 on seed 0). Applied twice it is the identity."""
    from utils.defences import DEFENCES
    g = torch.Generator().manual_seed(2)
    z, y = torch.randn(256, 10, generator=g), torch.randint(0, 10, (256,), generator=g)
    attack = utils.attacks.ATTACKS["rereverse"]
    assert attack.keys["rereverse_target"] == "argmax"  # the battery's default
    thief = attack({"alpha": 0.9, "tau": 4.0, "rereverse_target": "argmax"}, 10)
    once = thief.query(z, y)
    assert torch.equal(once, DEFENCES["posthoc"].transform(z, {})) and not torch.equal(once, z)
    assert torch.equal(thief.query(once, y), z)


def test_tckd_reads_the_same_from_posthoc_reversal_as_from_its_original_around_the_argmax():
    """Post-hoc reversal only permutes the non-target logits, so the target-versus-rest confidence TCKD distils
    (around the teacher's argmax, as for a thief without labels) is the original's, to rounding; DKD's non-target
    term is not (it reads the reversed order)."""
    from utils.defences import DEFENCES
    from utils.losses import dkd_loss
    g = torch.Generator().manual_seed(1)
    z, s = torch.randn(128, 10, generator=g) * 3, torch.randn(128, 10, generator=g)
    defended = DEFENCES["posthoc"].transform(z, {})
    top = z.argmax(1)
    plain, reversed_ = dkd_loss(s, z, top), dkd_loss(s, defended, top)
    torch.testing.assert_close(reversed_["tckd"], plain["tckd"])
    assert not torch.allclose(reversed_["nckd"], plain["nckd"])


def test_dkd_warmup_rule_and_progress(tmp_path, cifar_root, teacher_ckpt):
    assert utils.attacks.dkd_warmup_epochs({"dkd_warmup": 20, "epochs": 240}) == 20  # DKD's own setting
    assert utils.attacks.dkd_warmup_epochs({"dkd_warmup": 20, "epochs": 10}) == 2.5  # short run: a quarter
    assert utils.attacks.dkd_warmup_epochs({"dkd_warmup": 0, "epochs": 10}) == 0
    assert utils.attacks.warmup_factor(0.0, 2.5) == 0 and utils.attacks.warmup_factor(1.25, 2.5) == 0.5
    assert utils.attacks.warmup_factor(7.0, 2.5) == 1 and utils.attacks.warmup_factor(0.0, 0) == 1
    engine, task, batch = _task(tmp_path, cifar_root, teacher_ckpt, attack="dkd")
    engine.progress = 0.0  # the engine's position in epochs drives the ramp
    start, _, _ = task.loss(batch)
    assert start["tckd"].item() == 0 and start["nckd"].item() == 0
    engine.progress = 10.0
    live, _, _ = task.loss(batch)
    assert live["tckd"].item() > 0 and live["nckd"].item() > 0


# ------------------------------------------------------------------------------------------ tau sweep
def test_tau_sweep_writes_each_tau_and_the_best(tmp_path, cifar_root, teacher_ckpt, capsys):
    d = _exp(tmp_path, cifar_root, teacher_ckpt)
    assert run_main(train_kd.main, ["--save_path", d, "--tau_sweep", "1,4"]) == 0
    s = read_json(os.path.join(d, "sweep.json"))
    assert set(s["final_acc"]) == {"1", "4"}
    assert s["best_acc"] == max(s["final_acc"].values())
    assert s["final_acc"][f"{s['best_tau']:g}"] == s["best_acc"]
    for tau in (1, 4):
        sub = os.path.join(d, f"tau_{tau}")
        p = read_json(os.path.join(sub, "params.json"))
        assert p["tau"] == tau and p["tau_sweep"] == [] and p["teacher"] == teacher_ckpt
        m = read_json(os.path.join(sub, "metrics.json"))
        assert m["tau"] == tau and m["final_acc"] == s["final_acc"][str(tau)]
    out = capsys.readouterr().out
    assert "best tau" in out and "<- best" in out
    # no engine state leaks from one tau to the next: tau 4 run on its own gives the same student
    alone = _exp(tmp_path, cifar_root, teacher_ckpt, "alone", tau=4.0)
    assert run_main(train_kd.main, ["--save_path", alone]) == 0
    assert read_json(os.path.join(alone, "metrics.json"))["final_acc"] == s["final_acc"]["4"]
    wa = torch.load(os.path.join(alone, "last.pth"), weights_only=True)["model"]
    wb = torch.load(os.path.join(d, "tau_4", "last.pth"), weights_only=True)["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    capsys.readouterr()
    # a second call finds both runs done and only rewrites the summary
    done = {t: _tree(os.path.join(d, f"tau_{t}")) for t in (1, 4)}
    assert run_main(train_kd.main, ["--save_path", d, "--tau_sweep", "1,4"]) == 0
    assert out.count("skipped") == 0 and capsys.readouterr().out.count("skipped") == 2
    assert done == {t: _tree(os.path.join(d, f"tau_{t}")) for t in (1, 4)}
    # a finished tau folder made with another config is run again, not silently reused
    assert run_main(train_kd.main, ["--save_path", d, "--tau_sweep", "1,4", "--alpha", "0.5"]) == 0
    assert capsys.readouterr().out.count("was made with alpha=0.9, this sweep has alpha=0.5; running it again") == 2
    assert all(read_json(os.path.join(d, f"tau_{t}", "metrics.json"))["alpha"] == 0.5 for t in (1, 4))


def test_a_sweep_reuses_a_lone_run_trained_into_its_tau_folder(tmp_path, cifar_root, teacher_ckpt, capsys):
    # a sweep split over two processes: the tau-4 run is trained on its own, with the sweep's params, beforehand
    d = _exp(tmp_path, cifar_root, teacher_ckpt, tau_sweep=[1, 4])
    lone = make_exp(os.path.join(d, "tau_4"), **dict(read_json(os.path.join(d, "params.json")), tau=4.0, tau_sweep=[]))
    assert run_main(train_kd.main, ["--save_path", lone]) == 0
    assert read_json(os.path.join(lone, "metrics.json"))["config"]["runs_from"] == ""  # a lone run's default
    before = _tree(lone)
    capsys.readouterr()
    assert run_main(train_kd.main, ["--save_path", d]) == 0
    out = capsys.readouterr().out
    assert "tau 4: " in out and out.count("skipped") == 1 and _tree(lone) == before
    assert read_json(os.path.join(d, "sweep.json"))["final_acc"]["4"] == read_json(
        os.path.join(lone, "metrics.json"))["final_acc"]
    # what it ignores is the sweep-only keys alone: a lone run at another sweep's pick (tau_from) is another run
    m = read_json(os.path.join(lone, "metrics.json"))
    sub_cfg = {k: v for k, v in m["config"].items() if k not in ("runs_from", "select_by")}
    assert read_done(lone, sub_cfg, m["inputs"]["teacher"])[0] is not None
    picked = tmp_path / "picked"
    picked.mkdir()
    (picked / "metrics.json").write_text(json.dumps(dict(m, config=dict(m["config"], tau_from=d))))
    done, why = read_done(str(picked), sub_cfg, m["inputs"]["teacher"])
    assert done is None and "tau_from" in why


def test_a_sweep_asks_its_teacher_once_per_batch(tmp_path, cifar_root, teacher_ckpt, monkeypatch):
    from utils.battery import SharedForward
    seen = []
    real = SharedForward.forward

    def counted(self, x):
        out = real(self, x)
        seen.append((self.calls, self.hits))
        return out

    monkeypatch.setattr(SharedForward, "forward", counted)
    d = _exp(tmp_path, cifar_root, teacher_ckpt, tau_sweep=[1, 4, 10])
    assert run_main(train_kd.main, ["--save_path", d]) == 0
    assert seen, "the sweep's runs did not share one teacher forward"
    calls, hits = seen[-1]
    batches = calls // 3  # every training batch: the first temperature's call runs it, the other two reuse it
    assert batches == 5 and calls == 3 * batches and hits == 2 * batches  # 1 epoch of 5 batches of 20


class _StopAtTau4(train_kd.KDTask):
    """Raise the engine's stop flag at the 3rd step of the tau-4 run, as SIGTERM would."""

    def after_step(self, engine, step):
        self.count = getattr(self, "count", 0) + 1
        if self.tau == 4.0 and self.count == 3:
            engine.request_stop(signal.SIGTERM)


def test_interrupted_sweep_resumes_every_unfinished_tau(tmp_path, cifar_root, teacher_ckpt, monkeypatch, capsys):
    d = _exp(tmp_path, cifar_root, teacher_ckpt, tau_sweep=[1, 4])
    monkeypatch.setattr(train_kd, "KDTask", _StopAtTau4)
    assert run_main(train_kd.main, ["--save_path", d]) == 128 + signal.SIGTERM
    # the temperatures train together (one teacher forward per batch): the stop halts both after the same step
    for tau in (1, 4):
        assert torch.load(os.path.join(d, f"tau_{tau}", "last.pth"), weights_only=True)["step"] == 3
        assert not os.path.isfile(os.path.join(d, f"tau_{tau}", "metrics.json"))
    assert not os.path.isfile(os.path.join(d, "sweep.json"))
    assert f"Resume with: python train_kd.py --save_path {d} --resume" in capsys.readouterr().out
    monkeypatch.undo()
    assert run_main(train_kd.main, ["--save_path", d, "--resume"]) == 0
    assert "resumed from" in capsys.readouterr().out
    s = read_json(os.path.join(d, "sweep.json"))
    for tau in (1, 4):  # each resumed temperature ends where its uninterrupted lone run ends
        alone = _exp(tmp_path, cifar_root, teacher_ckpt, f"alone{tau}", tau=float(tau))
        assert run_main(train_kd.main, ["--save_path", alone]) == 0
        assert s["final_acc"][str(tau)] == read_json(os.path.join(alone, "metrics.json"))["final_acc"]
    # a sweep that finds one temperature done trains only the other, and counts the done one's time alone
    assert run_main(train_kd.main, ["--save_path", d, "--tau_sweep", "1,4,10"]) == 0
    out = capsys.readouterr().out
    assert out.count("skipped") == 2 and "tau 10" in out
    m10 = read_json(os.path.join(d, "tau_10", "metrics.json"))
    assert m10["battery"] == [os.path.join(d, "tau_10")]
    assert (read_json(os.path.join(d, "tau_1", "metrics.json"))["battery"]
            == [os.path.join(d, f"tau_{t}") for t in (1, 4)])


# ------------------------------------------------------------------------------------------ bad input
def _fake_record(path, dataset, num_classes):
    save_checkpoint(str(path), model_record(models.build("cnn_small", num_classes), "cnn_small", dataset))
    return str(path)


@pytest.mark.parametrize("case,message", [
    ("missing", "not found"),
    ("garbage", "cannot be read"),
    ("other_dataset", "was trained on cifar100"),
    ("other_classes", "has 100 classes"),
    ("empty", "no teacher given"),
])
@pytest.mark.parametrize("sweep", [False, True])
def test_bad_teacher_is_one_line_exit_2(tmp_path, cifar_root, capsys, case, message, sweep):
    teacher = {
        "missing": str(tmp_path / "nope.pth"),
        "garbage": str(tmp_path / "garbage.pth"),
        "other_dataset": str(tmp_path / "c100.pth"),
        "other_classes": str(tmp_path / "c10_100.pth"),
        "empty": "",
    }[case]
    if case == "garbage":
        (tmp_path / "garbage.pth").write_bytes(os.urandom(300))
    elif case == "other_dataset":
        _fake_record(teacher, "cifar100", 100)
    elif case == "other_classes":
        torch.save(dict(model_record(models.build("cnn_small", 100), "cnn_small", "cifar10"), num_classes=100),
                   teacher)
    d = _exp(tmp_path, cifar_root, teacher)
    before = _tree(d)
    args = ["--save_path", d] + (["--tau_sweep", "1,4"] if sweep else [])
    assert run_main(train_kd.main, args) == 2
    err = _error_lines(capsys)
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert _tree(d) == before


@pytest.mark.parametrize("args,message", [
    (["--attack", "fitnet"], "'attack' must be one of vanilla, rereverse, dkd, tckd"),
    (["--rereverse_target", "random"], "'rereverse_target' must be one of argmax, label"),
    (["--tau", "0"], "'tau' must be > 0"),
    (["--alpha", "1.5"], "'alpha' must be in [0, 1]"),
    (["--tau_sweep", "[1, -4]"], "'tau_sweep' must be a list of temperatures > 0"),
    (["--label_smoothing", "0.1"], "'label_smoothing' is not used"),
])
def test_bad_kd_config_is_one_line_exit_2(tmp_path, cifar_root, teacher_ckpt, capsys, args, message):
    d = _exp(tmp_path, cifar_root, teacher_ckpt)
    before = _tree(d)
    assert run_main(train_kd.main, ["--save_path", d] + args) == 2
    err = _error_lines(capsys)
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert _tree(d) == before


def test_resume_refuses_a_changed_attack(tmp_path, cifar_root, teacher_ckpt, capsys):
    d = _exp(tmp_path, cifar_root, teacher_ckpt)
    assert run_main(train_kd.main, ["--save_path", d]) == 0
    before = _tree(d)
    assert run_main(train_kd.main, ["--save_path", d, "--resume", "--attack", "dkd"]) == 2
    assert "written with attack='vanilla'" in _error_lines(capsys)[0]
    assert _tree(d) == before
