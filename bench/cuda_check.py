"""Does the CUDA path work, and what would the paper preset cost on this device? One table, a row per check.

    python bench/cuda_check.py --device cuda [--data_root ./data] [--out bench/cuda_check_out]
    python bench/cuda_check.py --device cpu        # the same checks as a rehearsal, at CPU budgets

The checks (their names for --only / --skip):
  tests        the device tests: TEST_DEVICE=<device> python -m pytest -m device tests (CUDA-only ones included)
  tiny         reproduce.py --preset tiny end to end, on a generated tiny CIFAR-10
  bench        bench/bench_train.py per model: the engine's path against a plain loop and its share of the
               matmul peak, in fp32 and in the precision the engine picks
  battery      bench/bench_battery.py: the threat grid's KD students of one teacher, separate, as one battery,
               and with the teacher's answer cache (train_kd.py teacher_cache) as over the p10 and p2 schedules
  torchrun     a short tiny train_scratch.py run under torchrun --nproc_per_node N
  compile      train_scratch.py with --compile false, then true: the time of each
  paper_epoch  one epoch of the paper preset's ResNet-18 teacher: a whole epoch of real CIFAR-10 with
               --data_root, else a fraction of an epoch on generated images, extrapolated
  epochs       a fraction of an epoch of every other script/model of the paper preset, extrapolated

Everything goes to --out: cuda_check.md and cuda_check.json (the table), epoch_times.json (seconds per epoch
per script/model: python reproduce.py --preset paper --dry_run --cost OUT/epoch_times.json projects the
preset's device-hours from it), logs/ (each command's output) and work/ (generated data and runs, replaced
on every run). Exit code 0 when no check FAILED, 1 when one did, 2 on bad input.

Longer than ~400 lines because it is one self-contained script a device session runs as it is: one function a
check, read top to bottom, with nothing to import beyond the project and the tests' generated data.
"""
import argparse
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))  # fakedata: the generated CIFAR-10 the tests use

import torch  # noqa: E402

import fakedata  # noqa: E402
import models  # noqa: E402
import reproduce  # noqa: E402
from reproduction.presets import battery_attacks  # noqa: E402
from utils.checkpoint import (atomic_write_json, atomic_write_text, export_weights, model_record,  # noqa: E402
                              processor)
from utils.cost import runs_of  # noqa: E402
from utils.engine import cpu_supports_bf16  # noqa: E402
from utils.errors import UserError, cli_main  # noqa: E402

CHECKS = ("tests", "tiny", "bench", "battery", "torchrun", "compile", "paper_epoch", "epochs")
PRESET = "paper"
TRAIN_IMAGES, TEST_IMAGES = 50000, 10000  # CIFAR-10, the paper preset's dataset
# A tiny run: the settings of the test suite's end-to-end runs (tests/conftest.py TINY).
TINY = {"model": "cnn_small", "epochs": 1, "batch_size": 20, "eval_batch_size": 50, "lr": 0.05, "log_every": 5,
        "amp": "off"}
MARKER = ".cuda_check"  # in OUT/work: the folder is ours to replace

# Defaults per device type: a modern GPU runs every check in about 8 minutes, the 2-core CPU rehearsal in a
# few. Every one can be set on the command line (smaller ones make the check faster and the figures rougher).
BUDGETS = {
    "cuda": {"bench_models": ["resnet18", "resnet20", "cnn"], "bench_steps": 10, "bench_warmup": 3,
             "bench_batch": 128, "bench_peak_size": 8192, "compile_model": "resnet20", "compile_images": 5120,
             "paper_epoch_images": None,
             "epoch_images": 5120, "dfad_iters": 10, "eval_images": 0, "epoch_passes": 2, "epoch_only": [],
             "timeout_s": 360},
    # the CPU leaves out what takes minutes there: resnet18 in the bench, DFAD's 256-image resnet18 steps
    "cpu": {"bench_models": ["resnet20", "cnn"], "bench_steps": 2, "bench_warmup": 1, "bench_batch": 32,
            "bench_peak_size": 2048, "compile_model": "cnn_small", "compile_images": 0, "paper_epoch_images": 130,
            "epoch_images": 130, "dfad_iters": 1, "eval_images": 200, "epoch_passes": 2,
            "epoch_only": ["train_possessive.py/", "train_kd.py/cnn", "train_scratch.py/cnn"], "timeout_s": 600},
}


def row(check, name, status, seconds=None, figure="", reason=None):
    return {"check": check, "name": name, "status": status, "reason": reason,
            "seconds": None if seconds is None else round(seconds, 1), "figure": figure}


def status_text(r):
    return f"skipped ({r['reason']})" if r["status"] == "skipped" else r["status"]


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def write_run(folder, params):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "params.json"), "w") as f:
        json.dump(params, f, indent=2)
    return folder


def read_metrics(folder):
    with open(os.path.join(folder, "metrics.json")) as f:
        return json.load(f)


class Context:
    """What every check shares: the device, the budgets, the folders, the data, and the way commands run."""

    def __init__(self, args, device):
        self.args, self.device = args, device
        self.device_arg = args.device  # what the scripts are given: cpu, cuda or cuda:N
        self.out = os.path.abspath(args.out)
        self.work, self.logs = os.path.join(self.out, "work"), os.path.join(self.out, "logs")
        self.epoch_times = {}
        self._teacher = None

    def prepare(self, selected):
        for folder in (self.work, self.logs):
            if os.path.isdir(folder) and not os.path.isfile(os.path.join(self.work, MARKER)):
                raise UserError(f"{folder} exists and was not written by bench/cuda_check.py; choose another --out")
        for folder in (self.work, self.logs):
            shutil.rmtree(folder, ignore_errors=True)
            os.makedirs(folder)
        open(os.path.join(self.work, MARKER), "w").close()
        t0 = time.perf_counter()
        self.tiny_data = fakedata.make_cifar10(os.path.join(self.work, "data_tiny"), train_per_class=10,
                                               test_per_class=5)
        a = self.args
        paper_needed = {"paper_epoch", "epochs"} & set(selected) or ("compile" in selected and a.compile_images)
        self.real = a.data_root is not None
        if self.real:
            self.paper_data = os.path.abspath(a.data_root)
        elif paper_needed:
            most = max([a.paper_epoch_images, a.epoch_images, a.compile_images, 130])
            self.paper_data = fakedata.make_cifar10(os.path.join(self.work, "data_paper"),
                                                    train_per_class=math.ceil(most / 10),
                                                    test_per_class=math.ceil((a.eval_images or TEST_IMAGES) / 10))
        return time.perf_counter() - t0

    def run(self, log, cmd, env=None):
        """Run cmd in the repository root, its output in logs/LOG.log: (exit code or None if it ran past
        --timeout_s, seconds, output)."""
        path = os.path.join(self.logs, log + ".log")
        env = dict(os.environ if env is None else env, PYTHONUNBUFFERED="1")
        t0 = time.perf_counter()
        with open(path, "w") as f:
            f.write("$ " + " ".join(cmd) + "\n")
            f.flush()
            proc = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env,
                                    start_new_session=True)  # its own group: a timeout ends torchrun's workers too
            try:
                code = proc.wait(timeout=self.args.timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                code = None
            except BaseException:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                raise
        with open(path, errors="replace") as f:
            text = f.read()
        return code, time.perf_counter() - t0, text

    def why(self, code, text, log):
        """One line on why a command failed, and where its log is."""
        if code is None:
            return f"ran past --timeout_s {self.args.timeout_s} s and was stopped (logs/{log}.log)"
        lines = [ln.strip() for ln in text.replace("\r", "\n").splitlines() if ln.strip()]
        errors = [ln for ln in lines if ln.startswith("error:") or re.match(r"^\w*(Error|Exception)\b", ln)]
        last = (errors or lines or ["no output"])[-1]
        return f"exit {code}: {last[:160]} (logs/{log}.log)"

    def teacher(self):
        """A weights-only checkpoint of the paper's teacher architecture (untrained: the timing is the same)."""
        if self._teacher is None:
            arch = reproduce.PRESETS[PRESET]["teacher_model"]
            torch.manual_seed(0)
            self._teacher = os.path.join(self.work, f"teacher_{arch}.pth")
            export_weights(self._teacher, model_record(models.build(arch, 10), arch, "cifar10"))
        return self._teacher


# ------------------------------------------------------------------------------------------ the checks
def check_tests(ctx):
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "device", "-p", "no:cacheprovider", "tests"]
    if ctx.args.tests_k:
        cmd += ["-k", ctx.args.tests_k]
    code, secs, text = ctx.run("tests", cmd, env=dict(os.environ, TEST_DEVICE=ctx.device_arg))
    summary = [ln for ln in text.splitlines() if re.search(r"\d+ (passed|failed|skipped|deselected|errors?)\b", ln)]
    counts = re.findall(r"(\d+) (passed|failed|skipped|errors?)\b", summary[-1] if summary else "")
    figure = ", ".join(f"{n} {w}" for n, w in counts) or "no summary line"
    name = f"device tests on {ctx.device_arg} (pytest -m device)"
    if code == 0 and any(w == "passed" for _, w in counts):
        return [row("tests", name, "ok", secs, figure)]
    failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", text, re.M)
    detail = f"{figure}; {', '.join(failed[:3])}" if failed else ctx.why(code, text, "tests")
    return [row("tests", name, "FAILED", secs, detail + ("" if not failed else " (logs/tests.log)"))]


def check_tiny(ctx):
    exp = os.path.join(ctx.work, "tiny")
    cmd = [sys.executable, "reproduce.py", "--preset", "tiny", "--data_root", ctx.tiny_data, "--exp_root", exp,
           "--device", ctx.device_arg]
    if ctx.args.tiny_only:
        cmd += ["--only", ctx.args.tiny_only]
    code, secs, text = ctx.run("tiny", cmd)
    name = "reproduce.py --preset tiny" + (f" --only {ctx.args.tiny_only}" if ctx.args.tiny_only else "")
    steps = [s for s in reproduce.plan("tiny") if not ctx.args.tiny_only or ctx.args.tiny_only in s["name"]]
    done = [s["name"] for s in steps if os.path.isfile(os.path.join(exp, s["name"], "metrics.json"))]
    devices = sorted({read_metrics(os.path.join(exp, n))["device"] for n in done})
    figure = f"{len(done)}/{len(steps)} steps finished on {', '.join(devices) or '-'}"
    if code != 0:
        return [row("tiny", name, "FAILED", secs, f"{figure}; {ctx.why(code, text, 'tiny')}")]
    if len(done) < len(steps) or any(d.split(":")[0] != ctx.device.type for d in devices):
        return [row("tiny", name, "FAILED", secs, f"{figure}, expected {len(steps)} on {ctx.device_arg}")]
    return [row("tiny", name, "ok", secs, figure + "; results.md written")]


def engine_precision(device):
    """The precision the engine's amp auto picks on this device ('fp32' when none)."""
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if cpu_supports_bf16() else "fp32"


def check_bench(ctx):
    a, rows = ctx.args, []
    engine = engine_precision(ctx.device)
    for amp, label in (("off", "fp32"), ("auto", engine)):
        if amp == "auto" and engine == "fp32":
            rows.append(row("bench", "bench, engine precision", "skipped", reason="the engine trains in fp32 on "
                            "this device: the fp32 rows are its figures"))
            continue
        out = os.path.join(ctx.work, f"bench_{label}.json")
        log = f"bench_{label}"
        cmd = [sys.executable, "bench/bench_train.py", "--device", ctx.device_arg, "--step", *a.bench_step,
               "--models", *a.bench_models, "--teacher", reproduce.PRESETS[PRESET]["teacher_model"],
               "--steps", str(a.bench_steps), "--warmup", str(a.bench_warmup), "--batch_size", str(a.bench_batch),
               "--amp", amp, "--peak_size", str(a.bench_peak_size), "--json", out]
        code, secs, text = ctx.run(log, cmd)
        if code != 0:
            rows.append(row("bench", f"bench {label}", "FAILED", secs, ctx.why(code, text, log)))
            continue
        with open(out) as f:
            data = json.load(f)
        start = secs - sum(r["seconds"] for r in data["rows"])  # start-up and the matmul peaks: on the first row
        for i, r in enumerate(data["rows"]):
            what = r["model"] if r["step"] == "scratch" else f"{r['step']} {r['model']}"
            figure = (f"engine {r['engine_img_s']:.0f} img/s, plain loop {r['plain_img_s']:.0f} "
                      f"(x{r['speedup']:.2f}); {r['engine_pct_peak']:.1f}% of the {label} matmul peak "
                      f"({data['peak_engine_gflops']:.0f} GFLOP/s)")
            rows.append(row("bench", f"bench {what} {label}", "ok", r["seconds"] + (start if i == 0 else 0), figure))
    return rows


def check_battery(ctx):
    """The threat grid's KD students of one teacher (the mini preset's models, every attack of the registry's
    battery) in the engine's precision: images/s per student trained separately, as one battery, and as one
    battery with the teacher's answer cache as it is on average over the p10 (240) and p2 (1,200) epochs."""
    a, mini = ctx.args, reproduce.PRESETS["mini"]
    out = os.path.join(ctx.work, "battery.json")
    attacks = battery_attacks()
    cmd = [sys.executable, "bench/bench_battery.py", "--device", ctx.device_arg, "--teacher", mini["teacher_model"],
           "--student", mini["students"][0], "--attacks", *attacks, "--steps", str(a.bench_steps),
           "--warmup", str(a.bench_warmup), "--batch_size", str(a.bench_batch), "--cache_epochs", "240", "1200",
           "--json", out]
    code, secs, text = ctx.run("battery", cmd)
    name = f"battery of {len(attacks)} {mini['students'][0]} students, {mini['teacher_model']} teacher"
    if code != 0:
        return [row("battery", name, "FAILED", secs, ctx.why(code, text, "battery"))]
    with open(out) as f:
        data = json.load(f)
    figure = (f"{data['precision']}: separate {data['separate_img_s_per_student']:.0f} img/s per student, battery "
              f"{data['battery_img_s_per_student']:.0f} (x{data['speedup']:.2f}); with the answer cache " +
              ", ".join(f"as over {e} epochs {c['battery_img_s_per_student']:.0f} (x{c['speedup_over_battery']:.2f})"
                        for e, c in data["cache"].items()))
    return [row("battery", name, "ok", secs, figure)]


def check_torchrun(ctx):
    n = ctx.args.nproc
    folder = write_run(os.path.join(ctx.work, "torchrun"), dict(TINY, data_root=ctx.tiny_data, device=ctx.device_arg,
                                                                batch_size=n * max(1, 20 // n)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", f"--nproc_per_node={n}",
           "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{free_port()}", "train_scratch.py",
           "--save_path", folder]
    env = dict(os.environ, OMP_NUM_THREADS="1") if ctx.device.type == "cpu" else None
    code, secs, text = ctx.run("torchrun", cmd, env=env)
    name = f"torchrun --nproc_per_node={n}, tiny run"
    if code != 0:
        return [row("torchrun", name, "FAILED", secs, ctx.why(code, text, "torchrun"))]
    m = read_metrics(folder)
    backend = ("nccl" if ctx.device.type == "cuda" else "gloo") if n > 1 else \
        "no process group: at world size 1 the engine starts none (DDP and nccl need --nproc 2 and 2 GPUs)"
    figure = f"world size {m['world_size']} on {m['device']}, final acc {m['final_acc']:.1f}; {backend}"
    if m["world_size"] != n:
        return [row("torchrun", name, "FAILED", secs, figure + f", expected world size {n}")]
    return [row("torchrun", name, "ok", secs, figure)]


def check_compile(ctx):
    a, rows, walls = ctx.args, [], {}
    if a.compile_images:
        base = dict(model=a.compile_model, epochs=2, batch_size=128, eval_batch_size=500, subset=a.compile_images,
                    test_subset=a.eval_images, data_root=ctx.paper_data, log_every=25)
    else:
        base = dict(TINY, model=a.compile_model, epochs=2, data_root=ctx.tiny_data)
    # a cache of its own: compiled kernels of an earlier run would make compilation look free
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=os.path.join(ctx.work, "inductor_cache"))
    for flag in ("off", "on"):
        folder = write_run(os.path.join(ctx.work, f"compile_{flag}"), dict(base, device=ctx.device_arg,
                                                                            compile=flag == "on"))
        log = f"compile_{flag}"
        code, secs, text = ctx.run(log, [sys.executable, "train_scratch.py", "--save_path", folder], env=env)
        name = f"--compile {'true' if flag == 'on' else 'false'}, {a.compile_model}, 2 epochs"
        if code != 0:
            rows.append(row("compile", name, "FAILED", secs, ctx.why(code, text, log)))
            continue
        m = read_metrics(folder)
        walls[flag] = m["wall_time_s"]
        speeds = ", ".join(f"{r['train_img_per_s']:.0f}" for r in m["history"])
        figure = f"{m['wall_time_s']:.1f} s in the loop; img/s per epoch {speeds}"
        if flag == "on" and "off" in walls:
            figure += f"; {m['wall_time_s'] - walls['off']:+.1f} s against off (compilation included)"
        rows.append(row("compile", name, "ok", secs, figure))
    return rows


def _epoch_params(ctx, step, images, epochs):
    """The step's paper params for a short timing run: (params, steps of a whole epoch, what is measured)."""
    p = dict(step["params"], epochs=epochs, device=ctx.device_arg, data_root=ctx.paper_data,
             test_subset=ctx.args.eval_images)
    if p.get("tau_sweep"):  # one run of the sweep: the projection counts one per tau
        p["tau"], p["tau_sweep"] = float(p["tau_sweep"][0]), []
    for key in reproduce.CHECKPOINT_KEYS:
        if key in p:
            p[key] = ctx.teacher()
    if step["script"] == "train_dfad.py":
        full = p["iters_per_epoch"] * p["k"]
        p["iters_per_epoch"] = min(ctx.args.dfad_iters, p["iters_per_epoch"])
        what = f"{p['iters_per_epoch']} of {step['params']['iters_per_epoch']} generator iterations"
    else:
        full = TRAIN_IMAGES // p["batch_size"]
        p["subset"] = images
        what = f"{images or TRAIN_IMAGES} of {TRAIN_IMAGES} {'real' if ctx.real else 'generated'} images"
    return p, full, what


def time_epoch(ctx, check, step, images):
    """Time the step's script on part of an epoch (--epoch_passes of them, the last timed: with 2, warm-up is
    left out) or on one whole epoch (images 0, real data): a table row and its epoch_times entry."""
    script, model = step["script"], step["params"]["model"]
    whole = step["script"] != "train_dfad.py" and images == 0
    passes = 1 if whole else ctx.args.epoch_passes
    p, full_steps, what = _epoch_params(ctx, step, images, passes)
    log = f"epoch_{script[:-3]}_{model}"
    folder = write_run(os.path.join(ctx.work, "epochs", f"{script[:-3]}_{model}"), p)
    code, secs, text = ctx.run(log, [sys.executable, script, "--save_path", folder])
    name = f"epoch {script} {model}" + (" (paper teacher)" if check == "paper_epoch" else "")
    if code != 0:
        return row(check, name, "FAILED", secs, ctx.why(code, text, log)), None
    m = read_metrics(folder)
    tested = min(ctx.args.eval_images or TEST_IMAGES, TEST_IMAGES)
    rest = max(m["wall_time_s"] - m["train_time_s"], 0.0) / len(m["history"])  # evaluation, checkpoints, logs
    if whole:
        train, how = m["train_time_s"], f"one whole epoch of {what}"
    else:
        train = full_steps * p["batch_size"] / m["history"][-1]["train_img_per_s"]
        how = f"extrapolated from {what}" + (f", the last of {passes} passes timed" if passes > 1 else
                                              ", warm-up included")
    seconds = train + rest * TEST_IMAGES / tested
    if tested < TEST_IMAGES:
        how += f", evaluation from {tested} of {TEST_IMAGES} test images"
    entry = {"seconds_per_epoch": round(seconds, 2), "batch_size": p["batch_size"], "how": how,
             "step": step["name"], "amp": m["amp"]}
    if script == "train_dfad.py":
        entry.update(iters_per_epoch=step["params"]["iters_per_epoch"], k=p["k"])
    hours = seconds * step["params"]["epochs"] * runs_of(step["params"]) / 3600
    figure = (f"{'' if whole else '~'}{seconds:.1f} s/epoch ({how}; {m['amp']}); "
              f"{hours:.2f} h for {step['name']}'s {step['params']['epochs']} epochs")
    return row(check, name, "ok", secs, figure), entry


def _paper_keys():
    """The first step of the paper preset for each script/model, in plan order."""
    seen = {}
    for step in reproduce.plan(PRESET):
        seen.setdefault(f"{step['script']}/{step['params']['model']}", step)
    return seen


def check_paper_epoch(ctx):
    key, step = next(iter(_paper_keys().items()))  # the teacher: train_scratch.py/resnet18
    r, entry = time_epoch(ctx, "paper_epoch", step, ctx.args.paper_epoch_images)
    if entry:
        ctx.epoch_times[key] = entry
    return [r]


def check_epochs(ctx):
    rows = []
    keys = list(_paper_keys().items())[1:]
    for key, step in keys:
        if ctx.args.epoch_only and not any(text in key for text in ctx.args.epoch_only):
            continue
        r, entry = time_epoch(ctx, "epochs", step, ctx.args.epoch_images)
        if entry:
            ctx.epoch_times[key] = entry
        rows.append(r)
    if not rows:
        rows.append(row("epochs", "epoch times", "skipped", reason=f"--epoch_only {' '.join(ctx.args.epoch_only)} "
                        f"matches none of {', '.join(k for k, _ in keys)}"))
    return rows


RUN = {"tests": check_tests, "tiny": check_tiny, "bench": check_bench, "battery": check_battery,
       "torchrun": check_torchrun, "compile": check_compile, "paper_epoch": check_paper_epoch, "epochs": check_epochs}


# ------------------------------------------------------------------------------------------ input and output
def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 2)[2])
    p.add_argument("--device", default="cuda", help="cuda, cuda:N, or cpu for the rehearsal (default cuda)")
    p.add_argument("--data_root", default=None, help="a real CIFAR-10 copy (cifar-10-batches-py) for the paper epoch "
                   "timings; without it they run on generated images and are extrapolated")
    p.add_argument("--out", default=os.path.join(ROOT, "bench", "cuda_check_out"),
                   help="folder of the table, epoch_times.json, logs/ and work/ (default bench/cuda_check_out)")
    p.add_argument("--only", nargs="+", choices=CHECKS, default=None, help="run these checks only")
    p.add_argument("--skip", nargs="+", choices=CHECKS, default=[], help="leave these checks out")
    p.add_argument("--timeout_s", type=int, default=None, help="limit of each command (cuda 360, cpu 600)")
    g = p.add_argument_group("budgets (defaults: the cuda / cpu value)")
    g.add_argument("--tests_k", default=None, help="tests: only the device tests matching this pytest -k expression")
    g.add_argument("--tiny_only", default=None,
                   help="tiny: only the steps whose name contains this (reproduce.py --only)")
    g.add_argument("--bench_models", nargs="+", default=None,
                   help="bench: models (resnet18 resnet20 cnn / resnet20 cnn)")
    g.add_argument("--bench_step", nargs="+", default=["scratch"], choices=["scratch", "kd", "possessive"],
                   help="bench: the script steps timed (default scratch)")
    g.add_argument("--bench_steps", type=int, default=None, help="bench: timed steps per model (10 / 2)")
    g.add_argument("--bench_warmup", type=int, default=None, help="bench: warm-up steps (3 / 1)")
    g.add_argument("--bench_batch", type=int, default=None, help="bench: batch size (128 / 32)")
    g.add_argument("--bench_peak_size", type=int, default=None, help="bench: side of the peak matmuls (8192 / 2048)")
    g.add_argument("--nproc", type=int, default=1, help="torchrun: processes (default 1)")
    g.add_argument("--compile_model", default=None, help="compile: the model (resnet20 / cnn_small)")
    g.add_argument("--compile_images", type=int, default=None,
                   help="compile: training images, batch 128 (5120 / 0: the tiny generated set at batch 20)")
    g.add_argument("--paper_epoch_images", type=int, default=None,
                   help="paper_epoch: training images timed, 0 for one whole epoch (cuda: 0 with --data_root, else "
                        "10000; cpu: 130)")
    g.add_argument("--epoch_images", type=int, default=None, help="epochs: training images timed per run (5120 / 130)")
    g.add_argument("--dfad_iters", type=int, default=None,
                   help="epochs: DFAD generator iterations timed of 50 (10 / 1)")
    g.add_argument("--eval_images", type=int, default=None, help="test images evaluated, 0 for all (0 / 200)")
    g.add_argument("--epoch_passes", type=int, choices=[1, 2], default=None,
                   help="epochs and paper_epoch: epochs per timing run, the last one timed (2: without warm-up; 2 / 2)")
    g.add_argument("--epoch_only", nargs="+", default=None,
                   help="epochs: only the script/model keys containing one of these, e.g. train_kd.py /resnet20 "
                        "(cuda: all; cpu: train_possessive.py/ train_kd.py/cnn train_scratch.py/cnn)")
    try:
        return p.parse_args(argv)
    except SystemExit as e:  # argparse already printed its one-line usage error
        raise SystemExit(0 if e.code == 0 else 2) from None


def check_args(args):
    """The device, and every budget filled in from the device's defaults and checked."""
    name = args.device
    if not (name in ("cpu", "cuda") or re.fullmatch(r"cuda:\d+", name)):
        raise UserError(f"--device must be cuda, cuda:N or cpu, got '{name}'")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name} asked for but no CUDA GPU is visible; --device cpu runs the CPU rehearsal")
    device = torch.device(name)
    if device.type == "cuda":
        device = torch.device("cuda", device.index or 0)
        if device.index >= torch.cuda.device_count():
            raise UserError(f"--device {name}: {torch.cuda.device_count()} CUDA GPU(s) are visible")
    budget = BUDGETS[device.type]
    for key, value in budget.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.paper_epoch_images is None:
        args.paper_epoch_images = 0 if args.data_root else 10000
    for key in ("bench_steps", "bench_batch", "bench_peak_size", "nproc", "dfad_iters", "timeout_s"):
        if getattr(args, key) < 1:
            raise UserError(f"--{key} must be at least 1, got {getattr(args, key)}")
    for key in ("bench_warmup", "compile_images", "eval_images", "paper_epoch_images", "epoch_images"):
        if getattr(args, key) < 0:
            raise UserError(f"--{key} must be 0 or more, got {getattr(args, key)}")
    least = math.ceil(reproduce.PRESETS[PRESET]["train"]["batch_size"] / 10) * 10  # a class-balanced batch
    for key in ("paper_epoch_images", "epoch_images", "compile_images"):
        value = getattr(args, key)
        if value and value < least:
            raise UserError(f"--{key} must be 0 or at least {least} (one batch, in a class-balanced subset), "
                            f"got {value}")
    if args.epoch_images == 0 and not args.data_root:
        raise UserError("--epoch_images 0 (whole epochs) needs --data_root with a real CIFAR-10 copy")
    if args.paper_epoch_images == 0 and not args.data_root:
        raise UserError("--paper_epoch_images 0 (a whole epoch) needs --data_root with a real CIFAR-10 copy")
    for m in args.bench_models + [args.compile_model]:
        if m not in models.MODELS and m not in models.ALIASES:
            raise UserError(f"unknown model '{m}'; choose one of: {', '.join(models.names())}")
    if device.type == "cuda" and args.nproc > torch.cuda.device_count():
        raise UserError(f"--nproc {args.nproc} needs {args.nproc} GPUs, {torch.cuda.device_count()} are visible")
    if args.data_root:
        from utils.data import load_split
        images, _ = load_split("cifar10", args.data_root, True)  # a missing or broken copy: one error line
        most = max(args.paper_epoch_images, args.epoch_images, args.compile_images)
        if most > len(images):
            raise UserError(f"--data_root {args.data_root} holds {len(images)} training images, the timings ask for "
                            f"{most}")
    return device


def device_name(device):
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} ({device})"
    return f"{processor()['cpu']}, {os.cpu_count()} cores, {torch.get_num_threads()} threads"


def table(rows):
    width = max(len(r["name"]) for r in rows)
    head = f"{'check':<{width}}  {'status':<8} {'seconds':>7}  key figure"
    lines = [head, "-" * len(head)]
    for r in rows:
        secs = f"{r['seconds']:.1f}" if r["seconds"] is not None else "-"
        lines.append(f"{r['name']:<{width}}  {status_text(r):<8} {secs:>7}  {r['figure']}")
    return "\n".join(lines)


def markdown(rows, info):
    lines = [f"# CUDA check: {info['device_name']}", "",
             f"torch {info['torch']}, {info['date']}, `{info['command']}`; {info['total_s']:.0f} s in all.", "",
             "| check | status | seconds | key figure |", "|---|---|---:|---|"]
    for r in rows:
        secs = f"{r['seconds']:.1f}" if r["seconds"] is not None else "-"
        lines.append(f"| {r['name']} | {status_text(r)} | {secs} | {r['figure'].replace('|', '/')} |")
    return "\n".join(lines) + "\n"


@cli_main
def main(argv=None):
    args = parse(argv)
    device = check_args(args)
    ctx = Context(args, device)
    selected = [c for c in CHECKS if (args.only is None or c in args.only) and c not in args.skip]
    t0 = time.perf_counter()
    setup = ctx.prepare(selected)
    info = {"device": str(device), "device_name": device_name(device), "torch": torch.__version__,
            "host_cpu": processor()["cpu"], "date": time.strftime("%Y-%m-%d %H:%M"),
            "command": "python bench/cuda_check.py " + " ".join(sys.argv[1:] if argv is None else argv),
            "data": "real CIFAR-10 in " + args.data_root if args.data_root else "generated", "setup_s": round(setup, 1)}
    print(f"cuda_check on {info['device_name']}, torch {torch.__version__}; checks: {', '.join(selected)}; "
          f"output in {ctx.out}", flush=True)
    rows = []
    for check in CHECKS:
        if check not in selected:
            rows.append(row(check, check, "skipped", reason="--only" if args.only else "--skip"))
            continue
        started = time.perf_counter()
        try:
            new = RUN[check](ctx)
        except Exception as e:  # a check that breaks is a FAILED row; the other checks still run
            msg = " ".join(str(e).split())[:200]
            new = [row(check, check, "FAILED", time.perf_counter() - started, f"{type(e).__name__}: {msg}")]
        for r in new:
            secs = f"{r['seconds']:.1f} s" if r["seconds"] is not None else ""
            print(f"[{check}] {r['name']}: {status_text(r)} {secs} {r['figure']}".rstrip(), flush=True)
        rows += new
    info["total_s"] = round(time.perf_counter() - t0, 1)
    if ctx.epoch_times:
        atomic_write_json(os.path.join(ctx.out, "epoch_times.json"), {
            "written_by": "bench/cuda_check.py", "preset": PRESET, "dataset": "cifar10", "device": info["device"],
            "device_name": info["device_name"], "torch": info["torch"], "date": info["date"],
            "epoch_times": ctx.epoch_times})
    atomic_write_json(os.path.join(ctx.out, "cuda_check.json"), dict(info, rows=rows))
    atomic_write_text(os.path.join(ctx.out, "cuda_check.md"), markdown(rows, info))
    print("\n" + table(rows))
    failed = [r["name"] for r in rows if r["status"] == "FAILED"]
    print(f"\n{len(rows)} rows, {len(failed)} FAILED, {info['total_s']:.0f} s; table in "
          f"{os.path.join(ctx.out, 'cuda_check.md')}" + (f", epoch times in {os.path.join(ctx.out, 'epoch_times.json')}"
                                                          if ctx.epoch_times else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
