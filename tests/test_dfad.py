"""train_dfad.py and utils/generator.py: the generator, the two adversarial steps, a run that never reads
training data, resume, and bad input."""
import json
import os
import signal

import pytest
import torch

import fakedata
import models
import train_dfad
import utils.data
from conftest import ROOT, TEST_DEVICE, make_exp, read_json, run_main
from utils.checkpoint import model_record, save_checkpoint
from utils.config import read_params
from utils.engine import Engine
from utils.generator import Generator
from utils.losses import dfad_discrepancy

DFAD_TINY = {"model": "cnn_small", "epochs": 2, "batch_size": 16, "eval_batch_size": 50, "iters_per_epoch": 2,
             "k": 2, "nz": 32, "ngf": 16, "lr": 0.05, "milestones": [1], "amp": "off", "log_every": 1,
             "device": TEST_DEVICE}


@pytest.fixture(scope="module")
def test_only_root(tmp_path_factory):
    """A CIFAR-10 folder holding test_batch and nothing else."""
    root = fakedata.make_cifar10(str(tmp_path_factory.mktemp("cifar_test_only")), with_train=False)
    assert os.listdir(os.path.join(root, "cifar-10-batches-py")) == ["test_batch"]
    return root


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory):
    torch.manual_seed(1)
    path = str(tmp_path_factory.mktemp("teacher") / "teacher.pth")
    save_checkpoint(path, model_record(models.build("cnn_small", 10), "cnn_small", "cifar10"))
    return path


@pytest.fixture
def no_training_split(monkeypatch):
    real = utils.data.load_split

    def guarded(dataset, root, train, download=False):
        if train:
            raise AssertionError("DFAD asked for the training split")
        return real(dataset, root, train, download)

    monkeypatch.setattr(utils.data, "load_split", guarded)


def _exp(tmp_path, root, teacher, name="run", **over):
    params = dict(DFAD_TINY, data_root=root, teacher=teacher)
    params.update(over)
    return make_exp(tmp_path / name, **params)


# ------------------------------------------------------------------------------------------ generator
def test_generator_shape_and_output_statistics():
    torch.manual_seed(0)
    g = Generator()  # the paper's nz=256, ngf=64
    x = g(torch.randn(8, 256))
    assert x.shape == (8, 3, 32, 32) and torch.isfinite(x).all()
    # BN without affine parameters in train mode: every channel is standardised over the batch
    torch.testing.assert_close(x.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-4, rtol=0)
    torch.testing.assert_close(x.var(dim=(0, 2, 3), unbiased=False), torch.ones(3), atol=1e-2, rtol=0)
    assert g.body[-1].affine is False and g.body[-1].weight is None
    assert Generator(nz=16, ngf=8, img_size=64)(torch.randn(2, 16)).shape == (2, 3, 64, 64)
    with pytest.raises(ValueError, match="divisible by 4"):
        Generator(img_size=30)


# ------------------------------------------------------------------------------------------ the two steps
def _task(tmp_path, root, teacher, **over):
    cfg = dict(train_dfad.DEFAULTS, **DFAD_TINY)
    cfg.update(data_root=root, teacher=teacher, **over)
    torch.manual_seed(0)
    engine = Engine(cfg, str(tmp_path / "unit"), "train_dfad.py")
    teacher_model, _ = train_dfad.build_from_checkpoint(teacher, "teacher", "cifar10", 10)
    student = engine.to_device(models.build("cnn_small", 10))
    task = train_dfad.DFADTask(student, teacher_model, Generator(cfg["nz"], cfg["ngf"]), cfg)
    task.setup(engine)
    engine.prepare_parts(task)
    task.train_model = student
    task.train_batches(engine, 0, 0)
    return engine, task


def _discrepancy(task, z):
    with torch.no_grad():
        x = task.generator(z)
        return dfad_discrepancy(task.model(x), task.teacher(x)).item()


@pytest.mark.device
def test_student_step_lowers_the_discrepancy(tmp_path, test_only_root, teacher_ckpt):
    engine, task = _task(tmp_path, test_only_root, teacher_ckpt)
    opt = engine.build_optimizer(task.model.parameters())
    z = task.noise(0, 0)
    assert torch.equal(z, task.noise(0, 0)) and not torch.equal(z, task.noise(0, 1))  # seeded per step
    before = _discrepancy(task, z)
    for _ in range(5):  # step 0's batch again each time: a fixed batch
        terms, _, _ = task.loss(0)
        opt.zero_grad(set_to_none=True)
        terms["l1"].backward()
        opt.step()
    assert _discrepancy(task, z) < 0.9 * before
    assert all(p.grad is None for p in task.teacher.parameters())
    assert all(p.grad is None for p in task.generator.parameters())  # G is sampled under no_grad


@pytest.mark.device
def test_generator_step_raises_the_discrepancy_through_the_frozen_teacher(tmp_path, test_only_root, teacher_ckpt):
    engine, task = _task(tmp_path, test_only_root, teacher_ckpt)
    teacher_state = {k: v.clone() for k, v in task.teacher.state_dict().items()}
    student_params = [p.detach().clone() for p in task.model.parameters()]
    g_params = [p.detach().clone() for p in task.generator.parameters()]
    z = task.noise(0, 1)
    before = _discrepancy(task, z)
    for _ in range(5):
        d = task.generator_step(z)
    assert d.requires_grad is False and _discrepancy(task, z) > 1.05 * before
    # the teacher is frozen yet backpropagated through: no .grad, no change
    assert all(p.grad is None and not p.requires_grad for p in task.teacher.parameters())
    assert all(torch.equal(v, teacher_state[k]) for k, v in task.teacher.state_dict().items())
    # the generator got gradients and moved; the student's parameters did not
    assert all(p.grad is not None for p in task.generator.parameters())
    assert any(p.grad.abs().sum() > 0 for p in task.generator.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(g_params, task.generator.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(student_params, task.model.parameters()))
    assert all(p.grad is None for p in task.model.parameters())


def test_generator_lr_follows_the_student_schedule(tmp_path, test_only_root, teacher_ckpt):
    engine, task = _task(tmp_path, test_only_root, teacher_ckpt)  # step schedule, x0.1 at epoch 1
    task.train_batches(engine, 1, 0)
    engine.optimizer = torch.optim.SGD(task.model.parameters(), lr=1.0)
    engine.set_lr(1 + 1 / task.steps_per_epoch(engine))  # what the loop does before step 1 of epoch 1
    task.after_step(engine, 1)  # k = 2: the second student step triggers a generator step
    assert task.g_optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * task.cfg["lr_G"])
    assert task.gen_count == 1
    task.after_step(engine, 2)  # not a k-th step: nothing happens
    assert task.gen_count == 1


# ------------------------------------------------------------------------------------------ end to end
@pytest.mark.device
def test_runs_without_ever_reading_training_data(tmp_path, test_only_root, teacher_ckpt, no_training_split):
    d = _exp(tmp_path, test_only_root, teacher_ckpt)
    assert run_main(train_dfad.main, ["--save_path", d]) == 0
    m = read_json(os.path.join(d, "metrics.json"))
    assert m["script"] == "train_dfad.py" and m["attack"] == "dfad" and m["training_images_used"] == 0
    assert m["teacher"] == teacher_ckpt and m["teacher_arch"] == "cnn_small" and 0 <= m["teacher_acc"] <= 100
    assert len(m["history"]) == 2 and m["final_acc"] is not None
    row = m["history"][-1]
    assert row["train_l1"] > 0 and row["gen_l1"] > 0 and "train_acc" not in row
    for name in ("epoch_001.png", "epoch_002.png", "latest.png"):
        assert os.path.getsize(os.path.join(d, "samples", name)) > 0
    from PIL import Image
    with Image.open(os.path.join(d, "samples", "latest.png")) as im:
        assert im.size == (8 * 32 + 9 * 2,) * 2  # 8 x 8 grid, 2-pixel padding
    ckpt = torch.load(os.path.join(d, "last.pth"), weights_only=True)
    assert ckpt["arch"] == "cnn_small" and set(ckpt["parts"]["generator"]) == {"module", "optimizer"}
    assert ckpt["parts"]["generator"]["optimizer"]["param_groups"][0]["lr"] > 0


class _StopAt(train_dfad.DFADTask):
    """Raise the engine's stop flag after the 6th student step (epoch 2, right after a generator step)."""

    def after_step(self, engine, step):
        super().after_step(engine, step)
        self.count = getattr(self, "count", 0) + 1
        if self.count == 6:
            engine.request_stop(signal.SIGTERM)


def test_interrupt_then_resume_matches_uninterrupted(tmp_path, test_only_root, teacher_ckpt, monkeypatch, capsys,
                                                     no_training_split):
    full = _exp(tmp_path, test_only_root, teacher_ckpt, "full")
    assert run_main(train_dfad.main, ["--save_path", full]) == 0
    part = _exp(tmp_path, test_only_root, teacher_ckpt, "part")
    monkeypatch.setattr(train_dfad, "DFADTask", _StopAt)
    assert run_main(train_dfad.main, ["--save_path", part]) == 128 + signal.SIGTERM
    assert "--resume" in capsys.readouterr().out
    ckpt = torch.load(os.path.join(part, "last.pth"), weights_only=True)
    assert (ckpt["epoch"], ckpt["step"]) == (1, 2)
    monkeypatch.setattr(train_dfad, "DFADTask", _StopAt.__bases__[0])
    assert run_main(train_dfad.main, ["--save_path", part, "--resume"]) == 0
    a, b = read_json(os.path.join(full, "metrics.json")), read_json(os.path.join(part, "metrics.json"))
    assert a["final_acc"] == b["final_acc"] and len(b["history"]) == 2
    ca = torch.load(os.path.join(full, "last.pth"), weights_only=True)
    cb = torch.load(os.path.join(part, "last.pth"), weights_only=True)
    for k in ca["model"]:
        torch.testing.assert_close(ca["model"][k], cb["model"][k], rtol=1e-5, atol=1e-6)
    for k in ca["parts"]["generator"]["module"]:
        torch.testing.assert_close(ca["parts"]["generator"]["module"][k], cb["parts"]["generator"]["module"][k],
                                   rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("case,args,message", [
    ("missing teacher", ["--teacher", "/nonexistent/teacher.pth"], "not found"),
    ("bad optimizer", ["--g_optimizer", "rmsprop"], "'g_optimizer' must be one of"),
    ("zero k", ["--k", "0"], "'k' must be > 0"),
    ("resume nothing", ["--resume"], "last.pth not found"),
])
def test_bad_input_is_one_line_exit_2(tmp_path, test_only_root, teacher_ckpt, capsys, case, args, message):
    d = _exp(tmp_path, test_only_root, teacher_ckpt)
    before = sorted(os.listdir(d))
    assert run_main(train_dfad.main, ["--save_path", d] + args) == 2
    err = [line.split("\r")[-1] for line in capsys.readouterr().err.splitlines()]
    err = [line for line in err if line.strip() and "it/s" not in line and "s/it" not in line]
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert sorted(os.listdir(d)) == before


def test_resume_refuses_a_changed_generator(tmp_path, test_only_root, teacher_ckpt, capsys):
    d = _exp(tmp_path, test_only_root, teacher_ckpt, epochs=1)
    assert run_main(train_dfad.main, ["--save_path", d]) == 0
    assert run_main(train_dfad.main, ["--save_path", d, "--resume", "--nz", "64"]) == 2
    assert "written with nz=32" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ shipped configs
def test_paper_config_holds_dfad_published_settings():
    cfg = dict(train_dfad.DEFAULTS)
    cfg.update(read_params(os.path.join(ROOT, "exps", "CIFAR10", "dfad", "resnet34_resnet18"), train_dfad.DEFAULTS))
    assert {k: cfg[k] for k in ("nz", "iters_per_epoch", "k", "lr_G", "g_optimizer", "lr", "schedule", "milestones",
                                "epochs", "batch_size", "weight_decay", "momentum")} == {
        "nz": 256, "iters_per_epoch": 50, "k": 5, "lr_G": 1e-3, "g_optimizer": "adam", "lr": 0.1, "schedule": "step",
        "milestones": [100, 200], "epochs": 500, "batch_size": 256, "weight_decay": 5e-4, "momentum": 0.9}
    # the published settings are the file's own, whatever the script's defaults (the mini preset's)
    with open(os.path.join(ROOT, "exps", "CIFAR10", "dfad", "resnet34_resnet18", "params.json")) as f:
        spelt = json.load(f)
    assert all(k in spelt for k in ("nz", "k", "lr_G", "epochs", "batch_size", "milestones"))
