"""The registries of attacks and defences: new entries reach the battery, the table and the figures with no
other edit; Markov KD learns and resumes its matrices; the hard-label thief reads the argmax alone; the
training-free defences match METHOD.md section 7 on hand-made logits."""
import os
import shutil
import signal

import pytest
import torch

import report
import reproduce
import train_kd
import train_possessive
import train_scratch
from conftest import TINY, make_exp, read_json, run_main
from utils.attacks import ATTACKS, Attack, HardLabel, Markov, MarkovMatrices
from utils.checkpoint import WEIGHTS_FILE, load_checkpoint, rebuild_model
from utils.defences import DEFENCES, Defence, DefendedModel, PostHocReversal, RMLNasty, Stingy, build_from_checkpoint
from utils.losses import kd_loss


# ------------------------------------------------------------------------------------------ definitions
def test_stingy_keeps_the_top_k_logits_and_masks_the_rest():
    z = torch.tensor([[1.0, 5.0, 3.0, 2.0, 0.0, -1.0, 4.0, 0.5, 0.2, 0.1]])
    out = Stingy.transform(z, {"stingy_ratio": 0.2})  # k = int(0.2 * 10) = 2: classes 1 (5.0) and 6 (4.0)
    assert out[0, 1] == 5.0 and out[0, 6] == 4.0
    others = [i for i in range(10) if i not in (1, 6)]
    assert torch.all(out[0, others] <= 5.0 - 1e4)
    for tau in (1.0, 4.0, 20.0):  # the masked classes get probability exactly 0, as with -inf
        p = torch.softmax(out / tau, dim=1)[0]
        assert torch.all(p[others] == 0)
        expected = torch.softmax(torch.tensor([5.0, 4.0]) / tau, dim=0)
        torch.testing.assert_close(p[[1, 6]], expected)
    assert Stingy.transform(z, {"stingy_ratio": 0.05}).gt(-1e3).sum() == 1  # k is at least 1
    # the label plays no part: same output whatever the label would be; KD on it stays finite
    s = torch.randn(1, 10, requires_grad=True)
    loss = sum(kd_loss(s, out, torch.tensor([0]), tau=20.0).values())
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()


def test_posthoc_reversal_keeps_the_top1_and_reverses_the_others():
    z = torch.tensor([[5.0, 3.0, 2.0, 1.0, 0.0]])
    torch.testing.assert_close(PostHocReversal.transform(z, {}), torch.tensor([[5.0, 0.0, 1.0, 2.0, 3.0]]))
    z = torch.tensor([[0.0, 2.0, 9.0, 1.0, 3.0]])  # top-1 is class 2 by the teacher's own argmax
    out = PostHocReversal.transform(z, {})
    torch.testing.assert_close(out, torch.tensor([[3.0, 1.0, 9.0, 2.0, 0.0]]))
    assert torch.equal(out.argmax(1), z.argmax(1))
    # a tie at the top: the reversal hands class 0 the tied value; the kept top-1 (class 2) must still win
    z = torch.tensor([[0.0, 1.0, 2.0, 2.0]])
    out = PostHocReversal.transform(z, {})
    assert out.argmax(1).item() == 2 and out[0, 2] > 2.0 and out[0, 0] == 2.0
    torch.testing.assert_close(out[0, [0, 1, 3]], torch.tensor([2.0, 1.0, 0.0]))
    zb = torch.tensor([[0.6171875, 2.015625, 1.4453125, -0.4296875, -1.6484375, -2.75, 2.3125, -2.15625, -1.734375,
                        2.3125]], dtype=torch.bfloat16)  # a real bf16 row of the mini teacher that tied
    assert PostHocReversal.transform(zb, {}).argmax(1).item() == zb.float().argmax(1).item() == 6
    assert PostHocReversal.settings({}) == {"version": 2}  # part of the teacher file's digest


def test_rml_plus_nasty_screening_settings():
    """The screening settings drop the binary term and keep the reproduction's beta and Nasty's omega; the
    variant is a teacher of the registry's battery (every threat model's), not of the committed full-data grid
    (its loss: tests/test_losses.py)."""
    screen = reproduce.defence_params(reproduce.PRESETS["mini"], "rmlnasty", "cifar10")
    assert (screen["alpha"], screen["beta"], screen["omega"], screen["tau"]) == (0.0, 0.3, 0.04, 4.0)
    assert RMLNasty.battery and DEFENCES["rmlnasty"] is RMLNasty and "rmlnasty" in reproduce.battery_teachers()
    assert "rmlnasty" not in reproduce.grid_teachers(reproduce.PRESETS["mini"])


def test_a_defence_step_is_the_schedule_then_the_defences_settings_then_the_presets_overrides():
    """A defence names only its own keys for a dataset; reproduce.defence_params puts the preset around them:
    the shared fine-tuning schedule for a trained defence (one epoch for a training-free one), then the
    defence's settings, then the preset's entry for that defence, which wins."""
    for name, defence in DEFENCES.items():
        for dataset in ("cifar10", "cifar100", "tinyimagenet"):
            assert set(defence.dataset_settings(dataset)) <= set(defence.keys), name
    mini = reproduce.PRESETS["mini"]
    assert mini["possessive"]["lr"] == 0.05 and mini["rml"] == {"lr": 0.01, "beta": 0.3}
    assert reproduce.defence_params(mini, "rml", "cifar100") == {
        "epochs": 3, "lr": 0.01, "init_from_original": True, "tau": 20.0, "alpha": 1.0, "beta": 0.3, "gamma": 0.0}
    assert reproduce.defence_params(mini, "nasty", "cifar100") == {
        "epochs": 3, "lr": 0.05, "init_from_original": True, "tau": 20.0, "omega": 0.005}
    assert reproduce.defence_params(mini, "stingy", "cifar10") == {"epochs": 1}
    assert reproduce.defence_params(mini, "keyedflat", "cifar100") == {
        "epochs": 1, "keyed_confidence": 0.9, "keyed_tau": 20.0}
    assert Defence.dataset_settings("cifar10") == {} and DEFENCES["keyed"].dataset_settings("cifar10") == {}


def test_hard_label_thief_reads_the_argmax_alone():
    cfg = dict(train_kd.DEFAULTS, attack="hardlabel")
    attack = HardLabel(cfg, 10)
    a = torch.randn(8, 10)
    b = a * 3 + torch.randn(8, 10) * 0.01  # other values, same argmax
    b.scatter_(1, a.argmax(1, keepdim=True), 100.0)
    assert torch.equal(a.argmax(1), b.argmax(1))
    view_a, view_b = attack.query(a, None), attack.query(b, None)
    assert view_a.dtype == torch.long and view_a.shape == (8,) and torch.equal(view_a, view_b)
    student = torch.randn(8, 10, requires_grad=True)
    la = sum(attack.loss(student, view_a, torch.zeros(8, dtype=torch.long), 0.0, {}).values())
    (ga,) = torch.autograd.grad(la, student)
    lb = sum(attack.loss(student, view_b, torch.zeros(8, dtype=torch.long), 0.0, {}).values())
    (gb,) = torch.autograd.grad(lb, student)
    assert torch.equal(la, lb) and torch.equal(ga, gb)
    torch.testing.assert_close(la, torch.nn.functional.cross_entropy(student, a.argmax(1)))


def test_markov_matrices_start_near_the_identity_and_stay_row_stochastic():
    for rank in (0, 3):
        m = MarkovMatrices(10, rank, init=5.0)
        mats = m(torch.tensor([0, 3, 9]))
        assert mats.shape == (3, 10, 10)
        torch.testing.assert_close(mats.sum(2), torch.ones(3, 10))
        assert torch.all(mats.diagonal(dim1=1, dim2=2) > 0.9)
    cfg = dict(train_kd.DEFAULTS, attack="markov", markov_rank=0)
    attack = Markov(cfg, 10)
    part = attack.parts()["markov"]
    with torch.no_grad():
        part.module.w[2] = torch.randn(10, 10)
    student, teacher = torch.randn(4, 10, requires_grad=True), torch.randn(4, 10)
    labels = torch.tensor([2, 2, 1, 0])
    terms = attack.loss(student, teacher, labels, 0.0, {"markov": part.module})
    sum(terms.values()).backward()
    assert part.module.w.grad[2].abs().sum() > 0  # the matrix of class 2 learns from the loss
    assert part.module.w.grad[5].abs().sum() == 0  # no sample of class 5: its matrix is left alone


# ------------------------------------------------------------------------------------------ Markov KD runs
@pytest.fixture(scope="module")
def teacher(tmp_path_factory, cifar_root):
    d = make_exp(tmp_path_factory.mktemp("teacher") / "cnn_small", **dict(TINY, data_root=cifar_root))
    assert run_main(train_scratch.main, ["--save_path", d]) == 0
    return os.path.join(d, WEIGHTS_FILE)


class _StopAt3(train_kd.KDTask):
    def after_step(self, engine, step):
        if engine.global_step + 1 == 3:
            engine.request_stop(signal.SIGTERM)


def test_markov_kd_trains_saves_and_resumes_its_matrices(tmp_path, cifar_root, teacher, monkeypatch):
    params = dict(TINY, data_root=cifar_root, teacher=teacher, attack="markov", epochs=2, markov_lr=0.5)
    whole = make_exp(tmp_path / "whole", **params)
    assert run_main(train_kd.main, ["--save_path", whole]) == 0
    ckpt = load_checkpoint(os.path.join(whole, "last.pth"))
    learnt = ckpt["parts"]["markov"]["module"]
    start = MarkovMatrices(10, params.get("markov_rank", 3), 5.0, seed=0).state_dict()
    assert set(learnt) == set(start)
    assert any(not torch.equal(learnt[k], start[k]) for k in ("u", "v"))  # the matrices moved
    m = read_json(os.path.join(whole, "metrics.json"))
    assert m["attack"] == "markov" and m["markov_rank"] == 3 and "train_kd" in m["history"][-1]
    cut = make_exp(tmp_path / "cut", **params)
    monkeypatch.setattr(train_kd, "KDTask", _StopAt3)
    assert run_main(train_kd.main, ["--save_path", cut]) == 128 + signal.SIGTERM
    monkeypatch.undo()
    assert load_checkpoint(os.path.join(cut, "last.pth"))["step"] == 3
    assert run_main(train_kd.main, ["--save_path", cut, "--resume"]) == 0
    resumed = load_checkpoint(os.path.join(cut, "last.pth"))["parts"]["markov"]["module"]
    for k in learnt:
        torch.testing.assert_close(resumed[k], learnt[k], rtol=1e-5, atol=1e-6)
    assert read_json(os.path.join(cut, "metrics.json"))["final_acc"] == m["final_acc"]


def test_training_free_defence_publishes_the_original_wrapped(tmp_path, cifar_root, teacher):
    d = make_exp(tmp_path / "stingy", **dict(TINY, data_root=cifar_root, model="cnn_small", method="stingy",
                                              original=teacher))
    assert run_main(train_possessive.main, ["--save_path", d]) == 0
    ckpt = load_checkpoint(os.path.join(d, WEIGHTS_FILE))
    assert ckpt["defence"] == {"name": "stingy", "stingy_ratio": 0.2}
    original = load_checkpoint(teacher)
    assert all(torch.equal(ckpt["model"][k], original["model"][k]) for k in original["model"])
    assert not os.path.exists(os.path.join(d, "last.pth"))  # nothing was trained
    model, _ = build_from_checkpoint(os.path.join(d, WEIGHTS_FILE), "teacher")
    assert isinstance(model, DefendedModel)
    plain, _ = build_from_checkpoint(teacher, "teacher")
    # the checkpoint layer's loader gives the stored weights as they are, the defence only named
    bare, bare_ckpt = rebuild_model(os.path.join(d, WEIGHTS_FILE), "teacher")
    assert not isinstance(bare, DefendedModel) and bare_ckpt["defence"]["name"] == "stingy"
    x = torch.randn(4, 3, 32, 32)
    model.eval(), plain.eval(), bare.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), Stingy.transform(plain(x), {"stingy_ratio": 0.2}))
        assert torch.equal(bare(x), plain(x))
    m = read_json(os.path.join(d, "metrics.json"))
    assert m["trained"] is False and m["final_acc"] == m["original_acc"]  # top-1 kept: same accuracy
    assert m["weights_sha256"] != read_json(os.path.join(os.path.dirname(teacher), "metrics.json"))["weights_sha256"]


# ------------------------------------------------------------------------------------------ one entry
class ToyAttack(Attack):
    """Distils the teacher's logits halved: a stand-in for a contributor's new attack."""
    name, label = "toyhalf", "toy half"
    keys = {"toy_scale": 0.5}

    def query(self, teacher_logits, labels):
        return teacher_logits * self.cfg["toy_scale"]

    def loss(self, student_logits, view, labels, progress, parts):
        return kd_loss(student_logits, view, labels, self.tau, 0.9)


class ToyDefence(Defence):
    """Answers with the original's logits negated but the top-1 kept: a stand-in for a new defence."""
    name, label = "toyflip", "toy flip"
    keys = {}
    trained = False

    @staticmethod
    def transform(logits, settings):
        top = logits.argmax(1, keepdim=True)
        return (-logits).scatter(1, top, logits.gather(1, top).abs() + 100.0)


@pytest.fixture
def toys(monkeypatch):
    monkeypatch.setitem(ATTACKS, ToyAttack.name, ToyAttack)
    monkeypatch.setitem(DEFENCES, ToyDefence.name, ToyDefence)
    for module in (train_kd, train_possessive):  # the scripts' keys are built from the registries at import
        monkeypatch.setitem(module.DEFAULTS, "toy_scale", 0.5)
    yield


def test_a_new_attack_and_defence_reach_the_battery_table_and_figures(toys, tiny_chain, tmp_path, cifar_root, capsys):
    steps = {s["name"]: s for s in reproduce.plan("tiny")}
    assert "toyflip_cnn" in steps and steps["toyflip_cnn"]["params"]["method"] == "toyflip"
    for teacher in reproduce.battery_teachers():
        assert f"kd_toyhalf_{teacher}_cnn_small" in steps
    for attack in reproduce.battery_attacks():
        assert f"kd_{attack}_toyflip_cnn_small" in steps
    exp_root = str(tmp_path / "tiny")
    shutil.copytree(tiny_chain[0], exp_root)  # the chain before the toys: only their steps are new
    assert run_main(reproduce.main, ["--preset", "tiny", "--data_root", cifar_root, "--exp_root", exp_root]) == 0
    out = capsys.readouterr().out
    toy_steps = [name for name in steps if "toy" in name]
    assert out.count("done, skipped") == len(steps) - len(toy_steps)
    for name in toy_steps:
        assert os.path.isfile(os.path.join(exp_root, name, "metrics.json")), name
    text = open(os.path.join(exp_root, "results.md")).read()
    assert "| toy flip |" in text  # the teacher row
    for attack in reproduce.battery_attacks():
        assert f"| toy flip | {attack} |" in text
    for teacher in reproduce.battery_teachers():
        assert f"| {report.TEACHER_NAMES[teacher]} | toyhalf |" in text
    assert "Steps without results yet" not in text
    res = report.collect(exp_root)
    labels, values, colours = report.accuracy_bars(res)
    assert "teacher\ntoy flip" in labels and any("toyflip/toyhalf" in label for label in labels)
    assert len(set(colours)) >= len(reproduce.battery_teachers()) - 1
    for name in ("fig_accuracy.png", "fig_response.png", "fig_curves.png"):
        with open(os.path.join(exp_root, name), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    kd = read_json(os.path.join(exp_root, "kd_toyhalf_toyflip_cnn_small", "metrics.json"))
    assert kd["attack"] == "toyhalf" and kd["inputs"]["teacher"]["weights_sha256"] == \
        read_json(os.path.join(exp_root, "toyflip_cnn", "metrics.json"))["weights_sha256"]


def test_training_free_defence_with_another_model_is_refused_before_writing(tmp_path, cifar_root, teacher, capsys):
    d = make_exp(tmp_path / "stingy", **dict(TINY, data_root=cifar_root, model="resnet8", method="stingy",
                                              original=teacher))
    assert run_main(train_possessive.main, ["--save_path", d]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(err) == 1 and "trains nothing and answers with the original: set model to 'cnn_small'" in err[0]
    assert sorted(os.listdir(d)) == ["params.json"]  # nothing written beside it
