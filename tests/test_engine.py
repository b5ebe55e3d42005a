"""The training engine itself (utils/engine.py): the one loop (a lone run is a battery of one), stopping on a
signal and resuming to the uninterrupted result, the signal helper, Part, the lr schedule, the precision and
device choice, evaluation and prediction, and the refusals made before anything is written. Scripts' own
behaviour lives in their test files; this one drives the engine with small tasks of its own where it can."""
import contextlib
import os
import signal
import threading

import pytest
import torch

import models
import train_kd
import train_scratch
import utils.engine
from conftest import HAS_CUDA, TEST_DEVICE, TINY, file_bytes, make_exp, read_json, run_main
from utils.checkpoint import model_record, save_checkpoint
from utils.config import TRAIN_DEFAULTS
from utils.constants import DATASETS
from utils.engine import (STOP_SIGNALS, Engine, Member, Part, Task, catch_stop_signals, cpu_supports_bf16,
                          cross_entropy, lr_factor, train_together)
from utils.errors import UserError

STEPS = 5  # steps per epoch of TINY on the generated data: 100 training images, batch 20


def _cfg(cifar_root, **over):
    return dict(TRAIN_DEFAULTS, **dict(TINY, data_root=cifar_root, **over))


def _weights(folder):
    return torch.load(os.path.join(folder, "weights.pth"), weights_only=True)["model"]


def _same_weights(a, b):
    """Bit for bit on the CPU; within float tolerance on a GPU, whose kernels may differ from run to run."""
    assert a.keys() == b.keys()
    tol = {"rtol": 0, "atol": 0} if TEST_DEVICE == "cpu" else {"rtol": 1e-5, "atol": 1e-6}
    for k in a:
        torch.testing.assert_close(a[k], b[k], **tol)


class _CountingTask(Task):
    """Cross-entropy on cnn_small, with hooks the tests watch. It counts its steps in its own checkpointed state
    (Task.state_dict) and reports the count in metrics.json (Task.metrics); signals_at maps a step count to
    real signals raised inside that step's loss (as a SIGTERM arrives in the middle of a step); stop_at asks
    for a stop after that step (engine.request_stop); `extra` are its parts, each adding a CE term on
    part(logits); after every step it notes the engine's progress and the lr of the model and of each part."""

    def __init__(self, signals_at=None, stop_at=None):
        self.model = models.build("cnn_small", 10)
        self.signals_at, self.stop_at = signals_at or {}, stop_at
        self.extra = {}
        self.steps = 0
        self.seen = []

    def loss(self, batch):
        self.steps += 1
        for s in self.signals_at.get(self.steps, ()):
            signal.raise_signal(s)
        x, y = batch
        logits = self.train_model(x)
        terms = {"ce": cross_entropy(logits, y)}
        for name, part in self.extra.items():
            terms[name] = cross_entropy(part.module(logits), y)
        return terms, logits, y

    def parts(self):
        return self.extra

    def after_step(self, engine, step):
        self.seen.append((engine.progress, engine.optimizer.param_groups[0]["lr"],
                          {n: p.optimizer.param_groups[0]["lr"] for n, p in self.extra.items()}))
        if self.steps == self.stop_at:
            engine.request_stop(signal.SIGTERM)

    def state_dict(self):
        return {"steps": self.steps}

    def load_state_dict(self, state):
        self.steps = state["steps"]

    def metrics(self):
        return {"task_steps": self.steps}


def _start(folder, cifar_root, resume=False, cfg=None, **task_kw):
    """An engine on the generated data and a fresh task (its model built after the engine seeds the RNG)."""
    engine = Engine(cfg or _cfg(cifar_root), str(folder), "train_scratch.py", resume=resume)
    engine.load_data()
    return engine, _CountingTask(**task_kw)


@contextlib.contextmanager
def _recording_handlers():
    """Stand-in SIGTERM and SIGINT handlers for the length of a test, so that a signal the engine failed to catch
    is recorded instead of ending pytest; yields (the signals they received, the stand-in handler)."""
    got = []

    def record(signum, frame):
        got.append(signum)

    old = {s: signal.signal(s, record) for s in STOP_SIGNALS}
    try:
        yield got, record
    finally:
        for s, h in old.items():
            signal.signal(s, h)


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


def test_each_member_draws_from_its_own_random_stream(tmp_path):
    """A battery's members share the process's global RNG; Member.own_rng swaps each one's stream in and out, so
    interleaved draws give each member what it would draw alone. Members may start at different (epoch, step)
    (tests/test_battery.py), but over one number of steps per epoch."""
    engine = Engine(dict(TRAIN_DEFAULTS, **dict(TINY, device="cpu")), str(tmp_path / "run"), "train_kd.py")
    torch.manual_seed(1)
    a = Member(engine, None, (0, 0, STEPS))
    torch.manual_seed(2)
    b = Member(engine, None, (0, 0, STEPS))
    with a.own_rng():
        a1 = torch.rand(3)
    with b.own_rng():
        b1 = torch.rand(3)
    with a.own_rng():
        a2 = torch.rand(3)
    torch.manual_seed(1)
    assert torch.equal(torch.cat([a1, a2]), torch.rand(6))
    torch.manual_seed(2)
    assert torch.equal(b1, torch.rand(3))
    with pytest.raises(ValueError, match="one number of steps per epoch"):
        train_together([a, Member(engine, None, (1, 0, STEPS + 1))])


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


def test_a_real_signal_mid_step_finishes_the_step_and_resume_ends_as_the_uninterrupted_run(tmp_path, cifar_root):
    """A SIGTERM raised inside the 3rd step's loss reaches the loop's handler: the step completes, last.pth holds
    (epoch 0, step 3) with the task's own state, the log says how to resume, the process exits 128 + 15 and the
    handlers from before the run are back. The resumed run restores the task's state too and ends with the
    weights and test accuracies of a run never stopped."""
    engine, task = _start(tmp_path / "whole", cifar_root)
    whole = engine.fit(task)
    assert task.steps == whole["task_steps"] == TINY["epochs"] * STEPS
    cut = tmp_path / "cut"
    with _recording_handlers() as (got, record):
        engine, task = _start(cut, cifar_root, signals_at={3: [signal.SIGTERM]})
        with pytest.raises(SystemExit) as stop:
            engine.fit(task)
        assert all(signal.getsignal(s) is record for s in STOP_SIGNALS)
    assert stop.value.code == 128 + signal.SIGTERM and got == []  # the engine's handler took it, not ours
    assert task.steps == 3 and engine.stop_signal == signal.SIGTERM
    ckpt = torch.load(cut / "last.pth", weights_only=True)
    assert (ckpt["epoch"], ckpt["step"], ckpt["task"]) == (0, 3, {"steps": 3})
    assert not (cut / "metrics.json").exists() and not (cut / "best.pth").exists()
    last = (cut / "train.log").read_text().splitlines()[-1]
    assert last == (f"stopped by SIGTERM at epoch 1, step 3; last.pth written. Resume with: "
                    f"python train_scratch.py --save_path {cut} --resume")
    engine, task = _start(cut, cifar_root, resume=True)
    resumed = engine.fit(task)
    assert resumed["task_steps"] == TINY["epochs"] * STEPS  # 3 restored + 7 after the resume
    _same_weights(_weights(tmp_path / "whole"), _weights(cut))
    assert [r["test_acc"] for r in resumed["history"]] == [r["test_acc"] for r in whole["history"]]


def test_a_second_signal_stops_at_once(tmp_path, cifar_root):
    """SIGTERM then SIGINT within one step: the second raises KeyboardInterrupt out of the loop at once, no
    checkpoint is written, and the handlers from before the run are back."""
    with _recording_handlers() as (got, record):
        engine, task = _start(tmp_path / "run", cifar_root, signals_at={2: [signal.SIGTERM, signal.SIGINT]})
        with pytest.raises(KeyboardInterrupt):
            engine.fit(task)
        assert all(signal.getsignal(s) is record for s in STOP_SIGNALS)
    assert got == [] and task.steps == 2 and engine.stop_signal == signal.SIGTERM
    assert not (tmp_path / "run" / "last.pth").exists()


def test_catch_stop_signals_routes_both_signals_and_puts_the_previous_handlers_back():
    with _recording_handlers() as (got, record):
        caught = []
        restore = catch_stop_signals(lambda signum, frame: caught.append(signum))
        assert all(signal.getsignal(s) is not record for s in STOP_SIGNALS)
        signal.raise_signal(signal.SIGTERM)
        signal.raise_signal(signal.SIGINT)
        assert caught == [signal.SIGTERM, signal.SIGINT] and got == []
        restore()
        assert all(signal.getsignal(s) is record for s in STOP_SIGNALS)
        # outside the main thread Python refuses handlers: nothing is installed, and restoring does nothing
        seen = {}

        def elsewhere():
            undo = catch_stop_signals(lambda signum, frame: None)
            seen["during"] = [signal.getsignal(s) for s in STOP_SIGNALS]
            undo()

        thread = threading.Thread(target=elsewhere)
        thread.start()
        thread.join()
        assert seen["during"] == [record, record]
        assert all(signal.getsignal(s) is record for s in STOP_SIGNALS)


def test_resume_refuses_a_checkpoint_without_a_parts_state(tmp_path, cifar_root):
    """A task with a part cannot resume from a last.pth written without that part's state."""
    engine, task = _start(tmp_path / "run", cifar_root, stop_at=2)
    with pytest.raises(SystemExit):
        engine.fit(task)
    engine, task = _start(tmp_path / "run", cifar_root, resume=True)
    task.extra = {"head": Part(torch.nn.Linear(10, 10), {"optimizer": "sgd", "lr": 0.1, "momentum": 0.0,
                                                         "nesterov": False, "weight_decay": 0.0})}
    with pytest.raises(UserError, match="holds no state for 'head'"):
        engine.fit(task)


# ------------------------------------------------------------------------------------------ parts
def test_parts_get_their_optimizer_follow_the_schedule_and_are_checkpointed(tmp_path, cifar_root):
    """Part's contract: the engine moves each part to the device and builds the optimizer its dict names; every
    step sets each part's lr to its own peak times the model's schedule factor; a joint part is stepped with
    the model, a part with joint=False is left to its task (its gradient is there, its weights unchanged);
    last.pth holds each part's weights and optimizer state."""
    sgd = {"optimizer": "sgd", "lr": 0.2, "momentum": 0.9, "nesterov": False, "weight_decay": 0.0}
    engine, task = _start(tmp_path / "run", cifar_root, cfg=_cfg(cifar_root, epochs=1))
    task.extra = {"joint": Part(torch.nn.Linear(10, 10), sgd),
                  "own": Part(torch.nn.Linear(10, 10), {"optimizer": "adam", "lr": 0.01, "weight_decay": 0.0},
                              joint=False)}
    sgd["lr"] = 9.0  # Part keeps its own copy of the settings
    before = {n: {k: v.clone() for k, v in p.module.state_dict().items()} for n, p in task.extra.items()}
    engine.fit(task)
    joint, own = task.extra["joint"], task.extra["own"]
    assert joint.optimizer_cfg["lr"] == 0.2
    assert isinstance(joint.optimizer, torch.optim.SGD) and isinstance(own.optimizer, torch.optim.Adam)
    assert joint.optimizer.param_groups[0]["momentum"] == 0.9
    assert all(p.device.type == engine.device.type for part in (joint, own) for p in part.module.parameters())
    assert len(task.seen) == STEPS and len({lr for _, lr, _ in task.seen}) > 1  # onecycle: the lr moves
    for progress, lr, parts in task.seen:
        factor = lr_factor(engine.cfg, progress)
        assert lr == pytest.approx(TINY["lr"] * factor)
        assert parts == {"joint": pytest.approx(0.2 * factor), "own": pytest.approx(0.01 * factor)}
    assert not torch.equal(joint.module.weight, before["joint"]["weight"].to(engine.device))
    assert own.module.weight.grad is not None and own.module.weight.grad.abs().sum() > 0
    assert all(torch.equal(v, before["own"][k].to(engine.device)) for k, v in own.module.state_dict().items())
    saved = torch.load(tmp_path / "run" / "last.pth", weights_only=True)["parts"]
    assert set(saved) == {"joint", "own"}
    for name, part in task.extra.items():
        assert all(torch.equal(saved[name]["module"][k], v.cpu()) for k, v in part.module.state_dict().items())
    assert saved["joint"]["optimizer"]["state"] and not saved["own"]["optimizer"]["state"]  # own: never stepped


# ------------------------------------------------------------------------------------------ the lr schedule
def test_lr_schedules():
    cfg = {"epochs": 10, "schedule": "onecycle", "warmup": 0.2, "milestones": [5, 8], "lr_decay": 0.1}
    assert lr_factor(cfg, 2.0) == pytest.approx(1.0) and lr_factor(cfg, 10.0) == pytest.approx(0.0)
    assert lr_factor(dict(cfg, schedule="step"), 6.0) == pytest.approx(0.1)
    assert lr_factor(dict(cfg, schedule="step"), 9.0) == pytest.approx(0.01)
    assert lr_factor(dict(cfg, schedule="cosine"), 5.0) == pytest.approx(0.5)


def test_lr_schedule_edges():
    cfg = {"epochs": 10, "schedule": "onecycle", "warmup": 0.2, "milestones": [5, 8], "lr_decay": 0.1}
    assert lr_factor(cfg, 0.0) == pytest.approx(0.02)  # the warm-up starts at 2% of the peak, not at 0
    assert lr_factor(cfg, 1.0) == pytest.approx(0.5) and lr_factor(cfg, 6.0) == pytest.approx(0.5)
    assert lr_factor(dict(cfg, schedule="step"), 5.0) == pytest.approx(0.1)  # a milestone decays on the dot
    assert lr_factor(dict(cfg, schedule="step"), 4.99) == pytest.approx(1.0)
    assert lr_factor(dict(cfg, schedule="cosine"), 12.0) == pytest.approx(0.0)  # past the end: stays at 0
    assert lr_factor(dict(cfg, schedule="constant"), 7.3) == 1.0


# ------------------------------------------------------------------------------------------ precision and device
@pytest.mark.parametrize("amp,has_bf16,expected", [
    ("off", True, None), ("bf16", False, torch.bfloat16), ("auto", True, torch.bfloat16), ("auto", False, None),
])
def test_precision_on_the_cpu(tmp_path, monkeypatch, amp, has_bf16, expected):
    """--amp on the CPU: off is fp32, bf16 is bf16, auto is bf16 only where the CPU has it (cpu_supports_bf16,
    set here both ways); never a GradScaler, and autocast computes in the chosen precision."""
    monkeypatch.setattr(utils.engine, "cpu_supports_bf16", lambda: has_bf16)
    engine = Engine(dict(TRAIN_DEFAULTS, **dict(TINY, device="cpu", amp=amp)), str(tmp_path / "run"),
                    "train_scratch.py")
    assert engine.device == torch.device("cpu") and engine.amp_dtype is expected and engine.scaler is None
    with engine.autocast():
        out = torch.nn.Linear(4, 4)(torch.randn(2, 4))
    assert out.dtype == (expected or torch.float32)
    assert isinstance(cpu_supports_bf16(), bool)  # the real probe answers, whatever this CPU has


@pytest.mark.parametrize("over,kwargs,message", [
    ({"device": "cpu", "amp": "fp16"}, {}, "amp fp16 is for CUDA only"),
    pytest.param({"device": "cuda"}, {}, "no CUDA GPU is visible",
                 marks=pytest.mark.skipif(HAS_CUDA, reason="a CUDA GPU is visible")),
    ({}, {"resume": True, "overwrite": True}, "not both"),
])
def test_bad_settings_are_refused_before_anything_is_written(tmp_path, over, kwargs, message):
    folder = tmp_path / "run"
    with pytest.raises(UserError, match=message):
        Engine(dict(TRAIN_DEFAULTS, **dict(TINY, **over)), str(folder), "train_scratch.py", **kwargs)
    assert not folder.exists()


def test_resume_from_a_weights_only_checkpoint_is_refused_and_touches_nothing(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    save_checkpoint(str(folder / "last.pth"), model_record(models.build("cnn_small", 10), "cnn_small", "cifar10"))
    before = file_bytes(folder)
    with pytest.raises(UserError, match=r"holds no training state \(no 'config'\)"):
        Engine(dict(TRAIN_DEFAULTS, **TINY), str(folder), "train_scratch.py", resume=True)
    assert file_bytes(folder) == before  # no lock, no log: a refused resume changes nothing


# ------------------------------------------------------------------------------------------ evaluation
class _EvalTask(Task):
    """Diagnostics summed over a batch: the engine averages them per image over the whole test split."""

    def eval_batch(self, x, logits, y):
        return {"right": (logits.argmax(1) == y).sum(), "one": torch.tensor(float(len(y)), device=y.device)}


def test_predict_normalises_the_stored_images_and_agrees_with_evaluate(tmp_path, cifar_root):
    """predict: the whole test split's logits, in order, from the uint8 images normalised with the dataset's
    mean and std (the loader's normalise); evaluate: the accuracy of those logits and the task's diagnostics
    averaged per image, over several batches. Neither leaves the model in eval mode."""
    engine = Engine(_cfg(cifar_root, eval_batch_size=16), str(tmp_path / "run"), "train_scratch.py")
    engine.load_data()
    engine.task = _EvalTask()
    loader = engine.loaders["test"]
    model = engine.to_device(models.build("cnn_small", 10)).train()
    logits, labels = engine.predict(model)
    assert model.training and logits.dtype == torch.float32 and logits.device.type == "cpu"
    assert logits.shape == (len(loader.labels), 10) and len(loader.labels) == 50
    assert torch.equal(labels, loader.labels.cpu())
    info = DATASETS["cifar10"]
    mean, std = (torch.tensor(v, device=engine.device).view(1, 3, 1, 1) for v in (info.mean, info.std))
    by_hand = (loader.images.float() / 255 - mean) / std
    out = loader.normalise(loader.images[:4])
    assert out.is_contiguous(memory_format=torch.channels_last)  # TINY keeps channels_last on
    torch.testing.assert_close(out, by_hand[:4], rtol=0, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(logits, model.eval()(by_hand).float().cpu(), rtol=1e-4, atol=1e-4)
    model.train()
    acc, diag = engine.evaluate(model)
    assert model.training
    assert acc == pytest.approx(100.0 * (logits.argmax(1) == labels).float().mean().item())
    assert diag["one"] == pytest.approx(1.0) and 100 * diag["right"] == pytest.approx(acc)
