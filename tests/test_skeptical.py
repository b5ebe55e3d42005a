"""The Skeptical student (utils/attacks.py, METHOD.md section 7): the teacher reaches the auxiliary head only after
kd_delay and never the layers past it, the final head is the one evaluated and shipped, weight 0 is plain CE,
the head trains, saves and resumes with the student, alone or in a battery."""
import os
import signal

import pytest
import torch
import torch.nn.functional as F

import models
import train_kd
import train_scratch
from conftest import TINY, make_exp, read_json, run_main
from utils.attacks import ATTACKS, AuxHead, kd_delay_epochs
from utils.checkpoint import load_checkpoint

CFG = dict(train_kd.DEFAULTS, attack="skeptical", model="cnn_small", epochs=8)  # kd_delay 20 -> capped at 2 epochs


def _student_and_attack(**over):
    torch.manual_seed(0)
    student = models.build("cnn_small", 10)
    attack = ATTACKS["skeptical"](dict(CFG, **over), 10)
    attack.attach(student)
    return student, attack


def _grads(student, attack, x, view, y, progress):
    """The total loss and every parameter's gradient (student's and head's) for one batch."""
    student.zero_grad()
    attack.head.zero_grad()
    terms = attack.loss(student(x), view, y, progress, {"skeptical": attack.head})
    total = sum(terms.values())
    total.backward()
    named = list(student.named_parameters()) + [("head." + n, p) for n, p in attack.head.named_parameters()]
    return terms, total.detach(), {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p)) for n, p in named}


def test_teacher_reaches_the_auxiliary_head_only_after_kd_delay():
    student, attack = _student_and_attack()
    assert kd_delay_epochs(attack.cfg) == 2.0  # kd_delay 20 capped at a quarter of 8 epochs
    assert attack.head.tap == "features.7"  # cnn_small: 3 stages, the head on the 2nd
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 10, (8,), generator=g)
    view_a, view_b = torch.randn(8, 10, generator=g) * 3, torch.randn(8, 10, generator=g) * 3
    # before the delay: the teacher's answer changes nothing, anywhere
    terms, loss_a, grads_a = _grads(student, attack, x, view_a, y, progress=1.9)
    _, loss_b, grads_b = _grads(student, attack, x, view_b, y, progress=1.9)
    assert terms["aux_kd"].item() == 0 and terms["aux_ce"].item() > 0 and terms["sd"].item() > 0
    assert loss_a == loss_b and all(torch.equal(grads_a[n], grads_b[n]) for n in grads_a)
    # after it: the teacher moves the head and the stages below its tap, never the layers past it nor the final head
    terms, loss_a, grads_a = _grads(student, attack, x, view_a, y, progress=2.0)
    _, loss_b, grads_b = _grads(student, attack, x, view_b, y, progress=2.0)
    assert terms["aux_kd"].item() > 0 and loss_a != loss_b
    past_tap = [n for n in grads_a if n.startswith(("features.8", "fc."))]  # the 3rd conv block and the final head
    below_tap = [n for n in grads_a if n.startswith(("features.0", "features.4"))]
    head = [n for n in grads_a if n.startswith("head.")]
    assert past_tap and below_tap and head
    assert all(torch.equal(grads_a[n], grads_b[n]) for n in past_tap)
    assert all(not torch.equal(grads_a[n], grads_b[n]) for n in below_tap + head)


def test_weight_zero_is_cross_entropy_on_the_final_head():
    student, attack = _student_and_attack(skeptical_weight=0.0)
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 10, (8,), generator=g)
    z = student(x)
    for progress in (0.0, 5.0):
        terms = attack.loss(z, torch.randn(8, 10, generator=g), y, progress, {"skeptical": attack.head})
        assert set(terms) == {"ce", "aux_kd", "aux_ce", "sd"}  # one log column each, at every step
        torch.testing.assert_close(sum(terms.values()), F.cross_entropy(z, y), rtol=0, atol=0)
        student(x)  # the head reads the features of the student's last training forward


def test_head_keeps_training_features_only():
    student, attack = _student_and_attack()
    student.eval()
    student(torch.zeros(2, 3, 32, 32))
    with pytest.raises(RuntimeError, match="no features"):
        attack.head()
    student.train()
    student(torch.zeros(2, 3, 32, 32))
    assert attack.head().shape == (2, 10)


def test_head_does_not_move_the_students_random_stream():
    torch.manual_seed(5)
    models.build("cnn_small", 10)
    plain = torch.rand(3)
    torch.manual_seed(5)
    AuxHead(models.build("cnn_small", 10), 2, 10, 32, seed=0)
    assert torch.equal(torch.rand(3), plain)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory, cifar_root):
    d = make_exp(tmp_path_factory.mktemp("teacher") / "cnn_small", **dict(TINY, data_root=cifar_root))
    assert run_main(train_scratch.main, ["--save_path", d]) == 0
    return os.path.join(d, "weights.pth")


class _StopAt3(train_kd.KDTask):
    def after_step(self, engine, step):
        if self.attack.name == "skeptical" and engine.global_step + 1 == 3:
            engine._stop_signal = signal.SIGTERM


def _evaluate(weights, cifar_root):
    from utils.data import load_split
    from utils.constants import DATASETS
    model = models.build("cnn_small", 10)
    model.load_state_dict(torch.load(weights, weights_only=True)["model"])
    model.eval()
    images, labels = load_split("cifar10", cifar_root, False)
    info = DATASETS["cifar10"]
    mean = torch.tensor(info.mean).view(1, 3, 1, 1) * 255
    std = torch.tensor(info.std).view(1, 3, 1, 1) * 255
    with torch.no_grad():
        pred = model((images.float() - mean) / std).argmax(1)
    return 100.0 * int((pred == labels).sum()) / len(labels)


@pytest.mark.device
def test_skeptical_run_ships_the_final_head_and_resumes(tmp_path, cifar_root, teacher, monkeypatch):
    params = dict(TINY, data_root=cifar_root, teacher=teacher, attack="skeptical", epochs=4, kd_delay=1.0)
    whole = make_exp(tmp_path / "whole", **params)
    assert run_main(train_kd.main, ["--save_path", whole]) == 0
    m = read_json(os.path.join(whole, "metrics.json"))
    assert m["attack"] == "skeptical" and m["kd_delay_epochs"] == 1.0 and m["skeptical_tap"] == "features.7"
    rows = m["history"]
    assert rows[0]["train_aux_kd"] == 0 and all(r["train_aux_kd"] > 0 for r in rows[1:])  # epoch 1: labels only
    assert all(r["train_ce"] > 0 and r["train_aux_ce"] > 0 and r["train_sd"] > 0 for r in rows)
    # the shipped and scored model is the student's own final head: no auxiliary weights in weights.pth
    shipped = torch.load(os.path.join(whole, "weights.pth"), weights_only=True)["model"]
    assert set(shipped) == set(models.build("cnn_small", 10).state_dict())
    assert m["final_acc"] == pytest.approx(_evaluate(os.path.join(whole, "weights.pth"), cifar_root), abs=1e-6)
    head = load_checkpoint(os.path.join(whole, "last.pth"))["parts"]["skeptical"]["module"]
    assert "fc.weight" in head and not any(k.startswith("features") for k in head)
    assert "_as_used" not in read_json(os.path.join(whole, "config.json"))  # 1 epoch is below the cap
    # stopped at step 3 and resumed: the same student and head as the uninterrupted run
    cut = make_exp(tmp_path / "cut", **params)
    monkeypatch.setattr(train_kd, "KDTask", _StopAt3)
    assert run_main(train_kd.main, ["--save_path", cut]) == 128 + signal.SIGTERM
    monkeypatch.undo()
    assert run_main(train_kd.main, ["--save_path", cut, "--resume"]) == 0
    resumed = load_checkpoint(os.path.join(cut, "last.pth"))["parts"]["skeptical"]["module"]
    for k in head:
        torch.testing.assert_close(resumed[k], head[k], rtol=1e-5, atol=1e-6)
    assert read_json(os.path.join(cut, "metrics.json"))["final_acc"] == m["final_acc"]


@pytest.mark.device
def test_skeptical_student_in_a_battery_matches_its_lone_run(tmp_path, cifar_root, teacher):
    params = dict(TINY, data_root=cifar_root, teacher=teacher, epochs=2, kd_delay=0.5, seed=3)
    alone = make_exp(tmp_path / "alone", **dict(params, attack="skeptical"))
    assert run_main(train_kd.main, ["--save_path", alone]) == 0
    together = [make_exp(tmp_path / f"battery_{a}", **dict(params, attack=a)) for a in ("vanilla", "skeptical")]
    assert run_main(train_kd.main, ["--battery", ",".join(together)]) == 0
    wa = torch.load(os.path.join(alone, "weights.pth"), weights_only=True)["model"]
    wb = torch.load(os.path.join(together[1], "weights.pth"), weights_only=True)["model"]
    for k in wa:
        torch.testing.assert_close(wa[k].float(), wb[k].float(), rtol=0, atol=1e-5)
    assert read_json(os.path.join(alone, "metrics.json"))["final_acc"] == \
        read_json(os.path.join(together[1], "metrics.json"))["final_acc"]


@pytest.mark.parametrize("args,message", [
    (["--skeptical_stage", "3"], "'skeptical_stage' must be below 3"),
    (["--skeptical_weight", "-1"], "'skeptical_weight' must be >= 0"),
    (["--kd_delay", "-1"], "'kd_delay' must be >= 0"),
])
def test_bad_skeptical_config_is_one_line_exit_2(tmp_path, cifar_root, teacher, capsys, args, message):
    d = make_exp(tmp_path / "bad", **dict(TINY, data_root=cifar_root, teacher=teacher, attack="skeptical"))
    assert run_main(train_kd.main, ["--save_path", d] + args) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert sorted(os.listdir(d)) == ["params.json"]


def test_kd_delay_is_capped_at_a_quarter_of_the_run():
    assert kd_delay_epochs({"kd_delay": 20.0, "epochs": 240}) == 20.0
    assert kd_delay_epochs({"kd_delay": 20.0, "epochs": 12}) == 3.0
    used = ATTACKS["skeptical"].as_used({"kd_delay": 20.0, "epochs": 12})
    assert used["kd_delay"] == 3.0 and "quarter" in used["_why"]
    assert ATTACKS["skeptical"].as_used({"kd_delay": 2.0, "epochs": 12}) == {}
    assert ATTACKS["skeptical"].battery is True  # every threat model's battery attacks with it
