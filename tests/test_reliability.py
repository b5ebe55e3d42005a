"""Reliability and security of the four training scripts.

Covered here:
  * crash safety: SIGKILL at random moments (and in the middle of a checkpoint write), --resume from what is
    left, same final result as an uninterrupted run; SIGTERM / SIGINT finish the step, write last.pth, exit
    128 + signal with a line saying how to resume;
  * safe loading: every torch.load is weights_only=True, and a crafted checkpoint whose unpickling would run
    code is refused (one line, exit 2, no marker file) by every script that loads a checkpoint;
  * bad input: one table of bad invocations walked for all four scripts (exit 2, one line naming the problem,
    nothing in an existing save_path changed);
  * numerical faults: NaN / inf loss and a diverging --lr stop the run and keep the last good checkpoint;
  * disk: a failed write (simulated ENOSPC, read-only filesystem) is reported and never corrupts the
    previous checkpoint.

The kill tests need real processes. Starting a fresh Python for each of them would cost ~5 s of imports on
this machine, so one helper process (the "zygote", started with start_new_session=True) imports torch and the
scripts once and forks one child per run; each child calls os.setsid() and runs train_scratch.main. The tests
kill the children by pid. In the children every training step sleeps STEP_DELAY after its update and every
checkpoint write stalls WRITE_DELAY half-way through, so that kills drawn at random land inside steps and
inside checkpoint writes; the code paths are the scripts' own (the real engine, the real _atomic_write).
"""
import ast
import errno
import glob
import json
import os
import random
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback

import pytest
import torch

import models
import train_dfad
import train_kd
import train_possessive
import train_scratch
import utils.checkpoint as checkpoint
import utils.engine as engine_mod
from conftest import ROOT, TEST_DEVICE, TINY, file_bytes, make_exp, read_json, run_main
from utils.checkpoint import load_checkpoint, model_record, save_checkpoint

DFAD_TINY = {"model": "cnn_small", "epochs": 1, "batch_size": 16, "eval_batch_size": 50, "iters_per_epoch": 2,
             "k": 2, "nz": 32, "ngf": 16, "lr": 0.05, "milestones": [1], "amp": "off", "log_every": 1,
             "device": TEST_DEVICE}
SCRIPTS = {"scratch": train_scratch, "possessive": train_possessive, "kd": train_kd, "dfad": train_dfad}
TEACHER_KEY = {"possessive": "original", "kd": "teacher", "dfad": "teacher"}
STEPS_PER_EPOCH = 5  # the 100 generated training images in batches of 20


# ------------------------------------------------------------------------------------------ helpers
_snapshot = file_bytes


def _error_lines(text):
    lines = [line.split("\r")[-1] for line in text.splitlines()]
    # tqdm progress lines aside: "it/s" when fast, "s/it" on a loaded machine
    return [line for line in lines if line.strip() and "it/s" not in line and "s/it" not in line]


def _assert_one_error_line(err, pattern):
    lines = _error_lines(err)
    assert len(lines) == 1, f"expected one error line, got {lines}"
    assert lines[0].startswith("error: "), lines
    assert re.search(pattern, lines[0]), f"{pattern!r} not in {lines[0]!r}"
    return lines[0]


def _run(main, argv):
    """run_main, but an uncaught exception ends like it would in a real process: traceback, exit 1."""
    try:
        return run_main(main, argv)
    except Exception:
        traceback.print_exc()
        return 1


def _pth_bytes(path):
    return {f: open(os.path.join(path, f), "rb").read() for f in sorted(os.listdir(path)) if f.endswith(".pth")}


def _temp_files(path):
    return sorted(f for f in os.listdir(path) if f.startswith(".tmp"))


def _all_finite(ckpt):
    return all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


def _assert_same_result(ref, run):
    """Final metrics and the final weights (and optimizer state) of two runs of the same config agree."""
    a, b = read_json(os.path.join(ref, "metrics.json")), read_json(os.path.join(run, "metrics.json"))
    for key in ("final_acc", "best_acc", "best_epoch", "epochs"):
        assert a[key] == b[key], (key, a[key], b[key])
    assert [h["test_acc"] for h in a["history"]] == [h["test_acc"] for h in b["history"]]
    ca = torch.load(os.path.join(ref, "last.pth"), weights_only=True)
    cb = torch.load(os.path.join(run, "last.pth"), weights_only=True)
    assert (ca["epoch"], ca["step"], ca["scheduler"]) == (cb["epoch"], cb["step"], cb["scheduler"])
    assert ca["model"].keys() == cb["model"].keys()
    for k in ca["model"]:
        torch.testing.assert_close(ca["model"][k], cb["model"][k], rtol=1e-6, atol=1e-7, msg=k)
    torch.testing.assert_close(ca["optimizer"]["state"], cb["optimizer"]["state"], rtol=1e-6, atol=1e-7)


def _record(path, num_classes=10, dataset="cifar10"):
    save_checkpoint(str(path), model_record(models.build("cnn_small", num_classes), "cnn_small", dataset))
    return str(path)


class _Payload:
    """Unpickling this calls open(marker, 'w'): the file appears if any loader runs pickled code."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


# ------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    torch.manual_seed(3)
    return _record(tmp_path_factory.mktemp("teacher") / "teacher.pth")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cifar_root):
    """An uninterrupted 3-epoch tiny run, in this process, with the scripts' code untouched."""
    d = make_exp(tmp_path_factory.mktemp("ref") / "run", **dict(TINY, data_root=cifar_root, epochs=3))
    # the same thread count as the killed runs' processes: a different count changes the order of float sums
    threads = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or "1"))
    try:
        assert run_main(train_scratch.main, ["--save_path", d]) == 0
    finally:
        torch.set_num_threads(threads)
    return d


@pytest.fixture(scope="module")
def bad_roots(tmp_path_factory, cifar_root):
    """Copies of the generated CIFAR-10 folder with files missing and with files cut short."""
    base = tmp_path_factory.mktemp("badroots")
    src = os.path.join(cifar_root, "cifar-10-batches-py")
    roots = {}
    for name in ("missing", "truncated"):
        roots[name] = str(base / name)
        shutil.copytree(src, os.path.join(roots[name], "cifar-10-batches-py"))
    for f in ("data_batch_5", "test_batch"):
        os.remove(os.path.join(roots["missing"], "cifar-10-batches-py", f))
    for f in ("data_batch_2", "test_batch"):
        p = os.path.join(roots["truncated"], "cifar-10-batches-py", f)
        data = open(p, "rb").read()
        with open(p, "wb") as fh:
            fh.write(data[:len(data) // 2])
    return roots


def _params(script, cifar_root, teacher):
    if script == "dfad":
        return dict(DFAD_TINY, data_root=cifar_root, teacher=teacher)
    params = dict(TINY, data_root=cifar_root, epochs=1)
    if script in TEACHER_KEY:
        params[TEACHER_KEY[script]] = teacher
    return params


# ------------------------------------------------------------------------------------------ the zygote
ZYGOTE = r'''
import io, json, os, sys, time, traceback
root, STEP_DELAY, WRITE_DELAY = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
sys.path.insert(0, root)
os.chdir(root)
import torch
import torch.utils.tensorboard  # what a run imports lazily: load it once, here
import torchvision.utils
import tqdm
import train_scratch
import utils.checkpoint as checkpoint
import utils.engine as engine_mod

job = {}


def after_step(self, engine, step):
    with open(job["progress"], "a") as f:
        f.write(f"{engine.global_step + 1}\n")  # steps completed (the engine counts this one next)
    time.sleep(STEP_DELAY)


def save_checkpoint(path, state):
    """The engine's save_checkpoint, through the real _atomic_write, stalling half-way through the bytes."""
    def write(f):
        buf = io.BytesIO()
        torch.save(state, buf)
        data = buf.getvalue()
        f.write(data[:len(data) // 2])
        f.flush()
        if job.get("stall") == [os.path.basename(path), state["epoch"]]:
            open(job["stalled"], "w").close()
            time.sleep(600)  # killed here
        time.sleep(WRITE_DELAY)
        f.write(data[len(data) // 2:])
    checkpoint._atomic_write(path, write)


train_scratch.ScratchTask.after_step = after_step
engine_mod.save_checkpoint = save_checkpoint
print(json.dumps({"ready": os.getpid()}), flush=True)
for line in sys.stdin:
    cmd = json.loads(line)
    if cmd["op"] == "run":
        pid = os.fork()
        if pid == 0:
            code = 70
            try:
                os.setsid()
                job.update(cmd)
                for stream, name in ((1, cmd["log"] + ".out"), (2, cmd["log"] + ".err")):
                    fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                    os.dup2(fd, stream)
                    os.close(fd)
                code = train_scratch.main(cmd["argv"]) or 0
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else 1
            except BaseException:
                traceback.print_exc()
                code = 1
            finally:
                try:
                    sys.stdout.flush()
                    sys.stderr.flush()
                finally:
                    os._exit(code)
        print(json.dumps({"pid": pid}), flush=True)
    elif cmd["op"] == "wait":
        _, status = os.waitpid(cmd["pid"], 0)
        print(json.dumps({"code": os.waitstatus_to_exitcode(status)}), flush=True)
'''
STEP_DELAY, WRITE_DELAY = 0.06, 0.12


class Child:
    def __init__(self, pid, save_path, log, progress, stalled):
        self.pid, self.save_path, self.log, self.progress, self.stalled = pid, save_path, log, progress, stalled

    def steps_done(self):
        try:
            with open(self.progress) as f:
                lines = f.read().split()
        except FileNotFoundError:
            return 0
        return int(lines[-1]) if lines else 0

    def alive(self):
        """Running (not yet exited: an exited child stays a zombie until the zygote waits for it)."""
        try:
            with open(f"/proc/{self.pid}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
        except FileNotFoundError:
            return False

    def stdout(self):
        with open(self.log + ".out", errors="replace") as f:
            return f.read()

    def output(self):
        with open(self.log + ".err", errors="replace") as f:
            return self.stdout() + "\n--- stderr ---\n" + f.read()


class Zygote:
    def __init__(self, workdir):
        self.workdir = workdir
        self.children = []
        self.count = 0
        env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS") or "1", PYTHONUNBUFFERED="1")
        self.err = open(os.path.join(workdir, "zygote.err"), "w")
        self.proc = subprocess.Popen([sys.executable, "-c", ZYGOTE, ROOT, str(STEP_DELAY), str(WRITE_DELAY)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.err, cwd=ROOT,
                                     env=env, start_new_session=True, text=True)
        self._reply(timeout=120)

    def _reply(self, timeout):
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            raise AssertionError(f"zygote gave no answer within {timeout} s")
        line = self.proc.stdout.readline()
        if not line:
            self.err.flush()
            raise AssertionError("zygote died: " + open(self.err.name).read()[-2000:])
        return json.loads(line)

    def _send(self, cmd):
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()

    def start(self, save_path, stall=None):
        """Run train_scratch in a forked child: --resume if a last.pth is there, else from the start."""
        self.count += 1
        tag = os.path.join(self.workdir, f"run{self.count}")
        argv = ["--save_path", save_path]
        if os.path.isfile(os.path.join(save_path, "last.pth")):
            argv.append("--resume")
        self._send({"op": "run", "argv": argv, "log": tag, "progress": tag + ".progress",
                    "stalled": tag + ".stalled", "stall": stall})
        child = Child(self._reply(30)["pid"], save_path, tag, tag + ".progress", tag + ".stalled")
        self.children.append(child)
        child.resumed = "--resume" in argv
        return child

    def wait(self, child, timeout=90):
        self._send({"op": "wait", "pid": child.pid})
        try:
            code = self._reply(timeout)["code"]
        except AssertionError:
            os.kill(child.pid, signal.SIGKILL)
            self._reply(20)  # the zygote reaps it: stay in step with its answers
            raise AssertionError(f"run {child.pid} did not finish in {timeout} s:\n{child.output()[-3000:]}")
        self.children.remove(child)
        return code

    def close(self):
        for child in self.children:  # only our own children, by pid
            if child.alive():
                os.kill(child.pid, signal.SIGKILL)
        try:
            self.proc.stdin.close()
            self.proc.wait(timeout=20)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()
        self.err.close()


@pytest.fixture(scope="module")
def zygote(tmp_path_factory):
    z = Zygote(str(tmp_path_factory.mktemp("zygote")))
    yield z
    z.close()


def _poll(cond, child, timeout=60, what="condition"):
    end = time.time() + timeout
    while time.time() < end:
        if cond():
            return
        if not child.alive():
            if cond():
                return
            raise AssertionError(f"run ended before {what}:\n{child.output()[-3000:]}")
        time.sleep(0.003)
    raise AssertionError(f"timed out waiting for {what}:\n{child.output()[-3000:]}")


def _landing(child, temps_before):
    """Where a kill landed, for the assertion messages: steps done and any checkpoint write under way."""
    new = [t for t in _temp_files(child.save_path) if t not in temps_before]
    return f"after {child.steps_done()} steps" + (f", mid-write of {new}" if new else "")


# ------------------------------------------------------------------------------------------ crash safety
def test_sigkill_at_random_moments_then_resume_matches_uninterrupted(tmp_path, cifar_root, reference, zygote):
    """Kill a 3-epoch run (15 steps) with SIGKILL three times at random moments and once in the middle of
    writing last.pth; after every kill the last complete checkpoint loads; resuming each time ends exactly
    where the uninterrupted run ends."""
    d = make_exp(tmp_path / "killed", **dict(TINY, data_root=cifar_root, epochs=3))
    rng = random.Random(6)
    # (kind, argument): a random moment inside global steps [lo, hi], or a stall inside a named checkpoint write
    plan = [("random", (1, 5)), ("random", (6, 10)), ("stall", ["last.pth", 2]), ("random", (11, 14))]
    landed = []
    for kind, arg in plan:
        before = _temp_files(d)
        saved = load_checkpoint(os.path.join(d, "last.pth")) if os.path.isfile(os.path.join(d, "last.pth")) else None
        if kind == "random":
            child = zygote.start(d)
            target, jitter = rng.randint(*arg), rng.uniform(0, STEP_DELAY + WRITE_DELAY)
            _poll(lambda: child.steps_done() >= target, child, what=f"step {target}")
            time.sleep(jitter)
        else:
            child = zygote.start(d, stall=arg)
            _poll(lambda: os.path.exists(child.stalled), child, what=f"the write of {arg}")
            assert set(_temp_files(d)) - set(before)  # this write's half-written temp file is there
        where = _landing(child, before)
        os.kill(child.pid, signal.SIGKILL)
        assert zygote.wait(child) == -signal.SIGKILL, child.output()[-3000:]
        landed.append(where)
        path = os.path.join(d, "last.pth")
        if kind == "stall" or saved is not None:
            assert os.path.isfile(path), f"last.pth gone after a kill {where}"
        if os.path.isfile(path):  # the last complete checkpoint is readable, and no older than before
            ckpt = load_checkpoint(path, "resume checkpoint")
            assert ckpt["step"] == 0 and ckpt["epoch"] >= (saved["epoch"] if saved else 0), where
            assert ckpt["scheduler"]["global_step"] == ckpt["epoch"] * STEPS_PER_EPOCH
            assert ckpt["epoch"] * STEPS_PER_EPOCH <= child.steps_done(), where
            if kind == "stall":
                assert ckpt["epoch"] == 1, "the half-written epoch-2 last.pth replaced the complete epoch-1 one"
    child = zygote.start(d)
    assert child.resumed
    assert zygote.wait(child) == 0, child.output()[-3000:]
    assert _temp_files(d) == []  # what the kills left half-written is cleared on the next start
    print("SIGKILL landed:", landed)
    _assert_same_result(reference, d)


def test_sigkill_between_last_and_best_write_keeps_best_consistent(tmp_path, cifar_root, reference, zygote):
    """A run killed while it writes best.pth (last.pth of that epoch already replaced) and then resumed must
    end with the same best.pth as the uninterrupted run: the weights of the epoch metrics.json calls best."""
    best_epoch = read_json(os.path.join(reference, "metrics.json"))["best_epoch"]
    d = make_exp(tmp_path / "killed", **dict(TINY, data_root=cifar_root, epochs=3))
    child = zygote.start(d, stall=["best.pth", best_epoch])
    _poll(lambda: os.path.exists(child.stalled), child, what="the write of best.pth")
    os.kill(child.pid, signal.SIGKILL)
    assert zygote.wait(child) == -signal.SIGKILL
    assert load_checkpoint(os.path.join(d, "last.pth"))["epoch"] in (best_epoch - 1, best_epoch)
    child = zygote.start(d)
    assert child.resumed and zygote.wait(child) == 0, child.output()[-3000:]
    _assert_same_result(reference, d)
    m = read_json(os.path.join(d, "metrics.json"))
    assert os.path.isfile(os.path.join(d, "best.pth")), "best.pth missing after resume"
    best = load_checkpoint(os.path.join(d, "best.pth"))
    ref_best = load_checkpoint(os.path.join(reference, "best.pth"))
    assert best["epoch"] == m["best_epoch"] == ref_best["epoch"], \
        f"best.pth holds epoch {best['epoch']}, metrics.json says the best epoch is {m['best_epoch']}"
    for k in ref_best["model"]:
        torch.testing.assert_close(best["model"][k], ref_best["model"][k], rtol=1e-6, atol=1e-7)


def test_sigterm_and_sigint_stop_cleanly_and_resume_matches(tmp_path, cifar_root, reference, zygote):
    """SIGTERM, then (after a resume) SIGINT, at random moments: each finishes the step under way, writes
    last.pth at that step, exits 128 + signal with a line saying how to resume; the resumed run ends exactly
    where the uninterrupted one does."""
    d = make_exp(tmp_path / "stopped", **dict(TINY, data_root=cifar_root, epochs=3))
    rng = random.Random(99)
    for sig, (lo, hi) in ((signal.SIGTERM, (2, 6)), (signal.SIGINT, (8, 13))):
        child = zygote.start(d)
        target = rng.randint(lo, hi)
        _poll(lambda: child.steps_done() >= target, child, what=f"step {target}")
        time.sleep(rng.uniform(0, STEP_DELAY))
        os.kill(child.pid, sig)
        code = zygote.wait(child)
        out = child.output()
        assert code == 128 + sig, out[-3000:]
        assert "Traceback" not in out, out[-3000:]
        done = child.steps_done()
        ckpt = load_checkpoint(os.path.join(d, "last.pth"))
        # the step under way was finished and is in last.pth; nothing after it ran
        assert ckpt["scheduler"]["global_step"] == done, (ckpt["scheduler"], done)
        assert ckpt["epoch"] * STEPS_PER_EPOCH + ckpt["step"] == done
        lines = [line for line in child.stdout().splitlines() if "Resume with" in line]
        assert len(lines) == 1, out[-3000:]
        assert f"stopped by {signal.Signals(sig).name}" in lines[0]
        assert f"python train_scratch.py --save_path {d} --resume" in lines[0]
        assert lines[0] in open(os.path.join(d, "train.log")).read()
    child = zygote.start(d)
    assert child.resumed and zygote.wait(child) == 0, child.output()[-3000:]
    _assert_same_result(reference, d)


# ------------------------------------------------------------------------------------------ safe loading
PROJECT_FILES = [p for p in glob.glob(os.path.join(ROOT, "**", "*.py"), recursive=True)
                 if not os.path.relpath(p, ROOT).startswith((".venv", "tests" + os.sep))]


def test_every_torch_load_is_weights_only():
    offenders, seen = [], 0
    for path in PROJECT_FILES:
        tree = ast.parse(open(path).read(), path)
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            name = ast.unparse(node.func)
            if name.endswith("torch.load"):
                seen += 1
                kw = {k.arg: k.value for k in node.keywords}
                if not (isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True):
                    offenders.append(f"{os.path.relpath(path, ROOT)}:{node.lineno}: {ast.unparse(node)}")
            if name in ("pickle.load", "pickle.loads", "pickle.Unpickler"):
                offenders.append(f"{os.path.relpath(path, ROOT)}:{node.lineno}: unrestricted {name}")
    assert seen and not offenders, offenders


@pytest.mark.parametrize("script,how", [
    ("possessive", "original"), ("kd", "teacher"), ("dfad", "teacher"),
    ("scratch", "resume"), ("possessive", "resume"), ("kd", "resume"), ("dfad", "resume"),
])
def test_crafted_checkpoint_is_refused_and_runs_no_code(tmp_path, cifar_root, teacher, capsys, script, how):
    marker = str(tmp_path / "marker")
    # the payload is live: loading it the unsafe way does create its marker file
    probe = str(tmp_path / "probe")
    torch.save({"x": _Payload(probe)}, tmp_path / "probe.pth")
    torch.load(tmp_path / "probe.pth", weights_only=False)
    assert os.path.exists(probe)

    d = make_exp(tmp_path / "run", **_params(script, cifar_root, teacher))
    record = model_record(models.build("cnn_small", 10), "cnn_small", "cifar10")
    if how == "resume":
        crafted = os.path.join(d, "last.pth")
        torch.save(dict(record, epoch=1, step=0, config={}, pwn=_Payload(marker)), crafted)
        argv = ["--save_path", d, "--resume"]
    else:
        crafted = str(tmp_path / "crafted.pth")
        torch.save(dict(record, pwn=_Payload(marker)), crafted)
        argv = ["--save_path", d, f"--{how}", crafted]
    before = _snapshot(d)
    assert _run(SCRIPTS[script].main, argv) == 2
    _assert_one_error_line(capsys.readouterr().err, "was refused")
    assert not os.path.exists(marker)
    assert _snapshot(d) == before


# ------------------------------------------------------------------------------------------ bad input
def _write_params(d, text):
    mode = "wb" if isinstance(text, bytes) else "w"
    with open(os.path.join(d, "params.json"), mode) as f:
        f.write(text)


def _set_params(ctx, **over):
    with open(os.path.join(ctx["d"], "params.json"), "w") as f:
        json.dump(dict(ctx["params"], **over), f)
    return []


def _readonly_access(mp, d):
    """A save_path on a read-only mount: access(W_OK) fails there even for root (EROFS)."""
    real = os.access
    mp.setattr(os, "access", lambda p, mode, *a, **k: False if os.path.abspath(p) == os.path.abspath(d)
               and mode & os.W_OK else real(p, mode, *a, **k))


def _readonly_writes(mp, d):
    """A save_path whose filesystem refuses to create files although access() says yes."""
    real = tempfile.mkstemp

    def mkstemp(*a, **k):
        if os.path.abspath(k.get("dir") or "").startswith(os.path.abspath(d)):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))
        return real(*a, **k)

    mp.setattr(tempfile, "mkstemp", mkstemp)


def _wrong_classes(ctx):
    if ctx["script"] == "scratch":  # its only checkpoint is the resume one: a last.pth of a CIFAR-100 run
        state = torch.load(ctx["trained"], weights_only=True)
        cfg = dict(state["config"], dataset="cifar100")
        state.update(model_record(models.build("cnn_small", 100), "cnn_small", "cifar100"), config=cfg)
        torch.save(state, os.path.join(ctx["d"], "last.pth"))
        return ["--resume"]
    path = str(ctx["tmp"] / "c10_with_100_classes.pth")
    torch.save(dict(model_record(models.build("cnn_small", 100), "cnn_small", "cifar10"), num_classes=100), path)
    return [f"--{TEACHER_KEY[ctx['script']]}", path]


def _missing_ckpt(ctx):
    if ctx["script"] == "scratch":
        os.remove(os.path.join(ctx["d"], "last.pth"))
        return ["--resume"]
    return [f"--{TEACHER_KEY[ctx['script']]}", str(ctx["tmp"] / "nope.pth")]


def _corrupt_ckpt(ctx):
    if ctx["script"] == "scratch":  # the save_path's last.pth holds garbage bytes
        return ["--resume"]
    path = ctx["tmp"] / "garbage.pth"
    path.write_bytes(os.urandom(300))
    return [f"--{TEACHER_KEY[ctx['script']]}", str(path)]


def _weights_only_resume(ctx):
    """--resume from a last.pth that holds weights only (a teacher record copied over it)."""
    shutil.copyfile(ctx["teacher"], os.path.join(ctx["d"], "last.pth"))
    return ["--resume"]


# id -> (set-up: ctx -> extra argv, expected message: one regex, or script -> regex)
BAD_INPUT = {
    "params_missing": (lambda c: os.remove(os.path.join(c["d"], "params.json")) or [], r"params\.json not found"),
    "params_garbled": (lambda c: _write_params(c["d"], "{epochs: 3") or [], r"params\.json is not valid JSON"),
    "params_binary": (lambda c: _write_params(c["d"], b"\xff\xfe\x00\x81garbage") or [], r"is not valid JSON"),
    "params_not_object": (lambda c: _write_params(c["d"], "[1, 2]") or [], r"must hold a JSON object"),
    "unknown_key": (lambda c: _set_params(c, colour=1), r"unknown key 'colour'"),
    "wrong_type_params": (lambda c: _set_params(c, epochs="two"), r"'epochs' must be an integer"),
    "wrong_type_cli": (lambda c: ["--lr", "fast"], r"'lr' must be a number"),
    "unknown_model": (lambda c: ["--model", "resnet9000"], r"unknown model 'resnet9000'"),
    "unknown_dataset": (lambda c: ["--dataset", "mnist"], r"'dataset' must be one of"),
    "data_root_missing": (lambda c: ["--data_root", str(c["tmp"] / "no_such_data")], r"no_such_data' does not exist"),
    "data_files_missing": (lambda c: ["--data_root", c["bad_roots"]["missing"]],
                           {"dfad": r"missing \S*test_batch", None: r"missing \S*data_batch_5"}),
    "data_batch_truncated": (lambda c: ["--data_root", c["bad_roots"]["truncated"]],
                             {"dfad": r"test_batch.*truncated or corrupt",
                              None: r"data_batch_2.*truncated or corrupt"}),
    "checkpoint_missing": (_missing_ckpt, {"scratch": r"resume checkpoint \S*last\.pth not found",
                                           None: r"(original|teacher) \S*nope\.pth not found"}),
    "checkpoint_corrupt": (_corrupt_ckpt, {"scratch": r"last\.pth cannot be read.*truncated or corrupt",
                                           None: r"garbage\.pth cannot be read.*truncated or corrupt"}),
    "checkpoint_wrong_classes": (_wrong_classes, {"scratch": r"written with dataset='cifar100'",
                                                  None: r"has 100 classes, this run needs 10"}),
    "resume_weights_only_checkpoint": (_weights_only_resume, r"cannot resume: \S*last\.pth"),
    "save_path_not_writable": (lambda c: _readonly_access(c["mp"], c["d"]) or [], r"is not writable"),
    "save_path_readonly_fs": (lambda c: _readonly_writes(c["mp"], c["d"]) or [], r"Read-only file system"),
    "negative_epochs": (lambda c: ["--epochs", "-1"], r"'epochs' must be > 0, got -1"),
    "batch_larger_than_subset": (lambda c: ["--subset", "20", "--batch_size", "50"],
                                 {"dfad": r"'subset' does not apply",
                                  None: r"batch_size 50 is larger than the 20 training images"}),
}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, cifar_root):
    """A real last.pth of a 1-epoch tiny train_scratch run."""
    d = make_exp(tmp_path_factory.mktemp("trained") / "run", **dict(TINY, data_root=cifar_root, epochs=1))
    assert run_main(train_scratch.main, ["--save_path", d]) == 0
    return os.path.join(d, "last.pth")


@pytest.mark.parametrize("script", list(SCRIPTS))
@pytest.mark.parametrize("row", list(BAD_INPUT))
def test_bad_input_table(tmp_path, cifar_root, teacher, bad_roots, trained, monkeypatch, capsys, row, script):
    setup, expected = BAD_INPUT[row]
    params = _params(script, cifar_root, teacher)
    d = str(tmp_path / "exp")
    os.makedirs(os.path.join(d, "tb"))
    # an existing experiment folder: outputs of an earlier run that a bad invocation must not touch
    for name, data in (("last.pth", b"earlier checkpoint bytes"), ("best.pth", b"earlier best"),
                       ("log.csv", b"epoch,test_acc\n1,50.0\n"), ("train.log", b"earlier log\n"),
                       ("config.json", b"{}\n"), ("metrics.json", b"{\"final_acc\": 50.0}\n"),
                       (os.path.join("tb", "events.out"), b"\x00events")):
        with open(os.path.join(d, name), "wb") as f:
            f.write(data)
    ctx = {"script": script, "d": d, "tmp": tmp_path, "params": params, "bad_roots": bad_roots,
           "teacher": teacher, "trained": trained, "mp": monkeypatch}
    with open(os.path.join(d, "params.json"), "w") as f:
        json.dump(params, f)
    extra = setup(ctx)
    if "--resume" not in extra:  # the folder holds a finished run: without this flag it is refused as such
        extra.append("--overwrite")
    before = _snapshot(d)
    capsys.readouterr()
    code = _run(SCRIPTS[script].main, ["--save_path", d] + extra)
    monkeypatch.undo()
    err = capsys.readouterr().err
    pattern = expected if isinstance(expected, str) else expected.get(script, expected[None])
    assert code == 2, f"exit code {code}, stderr:\n{err[-3000:]}"
    _assert_one_error_line(err, pattern)
    assert _snapshot(d) == before, "the bad invocation changed files in the existing save_path"


# ------------------------------------------------------------------------------------------ numerical faults
class _PoisonAt(train_scratch.ScratchTask):
    """Make the loss of one (epoch, step) non-finite; snapshot the checkpoints as the poisoned epoch starts."""

    def __init__(self, model, ls, epoch, step, value, snap):
        super().__init__(model, ls)
        self.at, self.value, self.snap = (epoch, step), value, snap

    def train_batches(self, engine, epoch, start_step):
        self.epoch = epoch
        if epoch == self.at[0]:
            self.snap.update(_pth_bytes(engine.save_path))
        for step, batch in enumerate(super().train_batches(engine, epoch, start_step), start=start_step):
            self.step = step
            yield batch

    def loss(self, batch):
        terms, logits, y = super().loss(batch)
        if (self.epoch, self.step) == self.at:
            terms = {"ce": terms["ce"] * self.value}
        return terms, logits, y


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_non_finite_loss_stops_with_clear_message_and_keeps_last_good_checkpoint(
        tmp_path, cifar_root, monkeypatch, capsys, value):
    d = make_exp(tmp_path / "run", **dict(TINY, data_root=cifar_root, epochs=3))
    snap = {}
    monkeypatch.setattr(train_scratch, "ScratchTask", lambda m, ls: _PoisonAt(m, ls, 1, 2, value, snap))
    assert _run(train_scratch.main, ["--save_path", d]) == 2
    line = _assert_one_error_line(capsys.readouterr().err, r"NaN/inf")
    for part in ("epoch 2", "step 3", "learning rate", "lr=0.05", "last good checkpoint"):
        assert part in line, (part, line)
    assert set(snap) == {"last.pth", "best.pth"}
    assert _pth_bytes(d) == snap, "the checkpoints of the last good epoch were changed"
    assert load_checkpoint(os.path.join(d, "last.pth"))["epoch"] == 1
    assert not os.path.exists(os.path.join(d, "metrics.json")) and _temp_files(d) == []


class _DivergeAfter(train_scratch.ScratchTask):
    """The update of one step blows the weights up (as a too-large lr does), though its own loss was finite."""

    def __init__(self, model, ls, epoch, step, snap):
        super().__init__(model, ls)
        self.at, self.snap = (epoch, step), snap

    def train_batches(self, engine, epoch, start_step):
        if epoch == self.at[0]:
            self.snap.update(_pth_bytes(engine.save_path))
        for step, batch in enumerate(super().train_batches(engine, epoch, start_step), start=start_step):
            self.now = (epoch, step)
            yield batch

    def after_step(self, engine, step):
        if self.now == self.at:
            with torch.no_grad():
                for p in self.model.parameters():
                    p.mul_(1e30).mul_(1e30)  # overflows to inf


def test_divergence_in_the_last_step_of_an_epoch_is_not_saved_as_last_good(tmp_path, cifar_root, monkeypatch,
                                                                           capsys):
    """Weights that became inf in the last update of epoch 2 must not replace the good epoch-1 last.pth."""
    d = make_exp(tmp_path / "run", **dict(TINY, data_root=cifar_root, epochs=3))
    snap = {}
    monkeypatch.setattr(train_scratch, "ScratchTask",
                        lambda m, ls: _DivergeAfter(m, ls, 1, STEPS_PER_EPOCH - 1, snap))
    code = _run(train_scratch.main, ["--save_path", d])
    err = capsys.readouterr().err
    for name in ("last.pth", "best.pth"):
        ckpt = load_checkpoint(os.path.join(d, name))
        assert _all_finite(ckpt), f"{name} of epoch {ckpt['epoch']} holds NaN/inf weights"
    assert _pth_bytes(d) == snap
    assert code == 2
    _assert_one_error_line(err, r"NaN/inf")


def test_diverging_lr_is_caught_and_keeps_checkpoint(tmp_path, cifar_root, monkeypatch, capsys):
    """Stop a healthy run mid-epoch (as SIGTERM does), resume it with an lr schedule gone wild (x1e10; a
    changed --lr itself is refused on resume): the divergence is caught with the same message and the
    checkpoint the run was resumed from is left as it was."""
    d = make_exp(tmp_path / "run", **dict(TINY, data_root=cifar_root, epochs=2))

    class StopAt3(train_scratch.ScratchTask):
        def after_step(self, engine, step):
            if engine.global_step + 1 == 3:
                engine.request_stop(signal.SIGTERM)

    monkeypatch.setattr(train_scratch, "ScratchTask", StopAt3)
    assert run_main(train_scratch.main, ["--save_path", d]) == 128 + signal.SIGTERM
    monkeypatch.undo()
    before = _pth_bytes(d)
    assert load_checkpoint(os.path.join(d, "last.pth"))["step"] == 3
    capsys.readouterr()
    monkeypatch.setattr(engine_mod, "lr_factor", lambda cfg, progress: 1e10)
    assert _run(train_scratch.main, ["--save_path", d, "--resume"]) == 2
    line = _assert_one_error_line(capsys.readouterr().err, r"NaN/inf.* at epoch \d+, step \d+")
    assert "lower --lr" in line
    assert _pth_bytes(d) == before and _temp_files(d) == []
    assert not os.path.exists(os.path.join(d, "metrics.json"))


# ------------------------------------------------------------------------------------------ disk
def _failing_save(monkeypatch, d, name, epoch, kind, seen):
    """Make the engine's write of `name` for `epoch` fail like a full disk (ENOSPC half-way through the
    bytes) or a filesystem gone read-only (EROFS on creating the temp file); keep the bytes it replaces."""
    real_save = engine_mod.save_checkpoint

    def save(path, state):
        if os.path.basename(path) != name or state["epoch"] != epoch:
            return real_save(path, state)
        seen["previous"] = open(path, "rb").read() if os.path.exists(path) else None
        if kind == "erofs":
            real = tempfile.mkstemp
            monkeypatch.setattr(tempfile, "mkstemp", lambda *a, **k: (_ for _ in ()).throw(
                OSError(errno.EROFS, os.strerror(errno.EROFS))))
            try:
                return real_save(path, state)
            finally:
                monkeypatch.setattr(tempfile, "mkstemp", real)

        def write(f):
            f.write(b"PK\x03\x04 half a checkpoint")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        return checkpoint._atomic_write(path, write)

    monkeypatch.setattr(engine_mod, "save_checkpoint", save)


@pytest.mark.parametrize("kind,pattern", [
    ("enospc", r"writing \S*last\.pth failed \(No space left on device\)"),
    ("erofs", r"cannot write in \S+ \(Read-only file system\)"),
])
def test_failed_checkpoint_write_is_reported_and_keeps_previous(tmp_path, cifar_root, monkeypatch, capsys,
                                                               kind, pattern):
    d = make_exp(tmp_path / "run", **dict(TINY, data_root=cifar_root))
    seen = {}
    _failing_save(monkeypatch, d, "last.pth", 2, kind, seen)
    assert _run(train_scratch.main, ["--save_path", d]) == 2
    _assert_one_error_line(capsys.readouterr().err, pattern)
    assert seen["previous"] is not None
    assert open(os.path.join(d, "last.pth"), "rb").read() == seen["previous"]
    assert load_checkpoint(os.path.join(d, "last.pth"))["epoch"] == 1
    assert _temp_files(d) == [] and not os.path.exists(os.path.join(d, "metrics.json"))


def test_failed_metrics_write_is_reported(tmp_path, cifar_root, monkeypatch, capsys):
    d = make_exp(tmp_path / "run", **dict(TINY, data_root=cifar_root))
    real = checkpoint._atomic_write

    def atomic_write(path, write):
        if os.path.basename(path) != "metrics.json":
            return real(path, write)

        def half(f):
            f.write(b'{"final_acc": ')
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        return real(path, half)

    monkeypatch.setattr(checkpoint, "_atomic_write", atomic_write)
    assert _run(train_scratch.main, ["--save_path", d]) == 2
    _assert_one_error_line(capsys.readouterr().err, r"writing \S*metrics\.json failed \(No space left on device\)")
    assert not os.path.exists(os.path.join(d, "metrics.json")) and _temp_files(d) == []
    assert load_checkpoint(os.path.join(d, "last.pth"))["epoch"] == 2
