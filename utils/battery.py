"""A battery: several students that distil one teacher, trained in one pass over the same batches.

Every student of a teacher sees the same augmented batches when their seeds and data keys agree, so one
teacher forward per batch (and one crop/flip, one copy of the data, one teacher evaluation) serves them
all. Each student keeps its own Engine: its own run folder, config.json, optimizer, lr schedule, parts,
checkpoints, resume state, logs and metrics.json, written exactly as a lone run writes them. Each one's
global RNG state is swapped in around its own work, so a student trained in a battery computes what its
lone run with the same seed computes (tests/test_battery.py checks it).

The lead student's task draws the batches; every student's task reads the teacher through one
SharedForward, which computes the teacher's answer for a batch once and hands the same tensor to the rest.
"""
import contextlib
import os
import signal
import sys
import time

import torch

from .errors import UserError

# Keys that must agree across a battery's students: they fix the batches (data, split, batch size, seed,
# epochs), the teacher and the precision it answers in, and where it all runs. Everything else (student
# model, attack, temperature, lr, schedule...) may differ from student to student.
SHARED_KEYS = ("dataset", "data_root", "download", "subset", "subset_seed", "labels", "transfer", "test_subset",
               "batch_size", "eval_batch_size", "seed", "epochs", "teacher", "teacher_arch", "teacher_mean",
               "teacher_std", "amp", "device", "channels_last")


class SharedForward(torch.nn.Module):
    """A frozen module whose output for the batch it saw last is kept: a second call with the very same
    input tensor (the same object, as every student of a battery receives it) returns the kept output
    without running the module again. Any other input runs it."""

    def __init__(self, module):
        super().__init__()
        self.module = module
        self._last = None  # (input tensor, output): holding the input keeps its id from being reused
        self.calls = self.hits = 0

    def forward(self, x):
        self.calls += 1
        if self._last is not None and self._last[0] is x:
            self.hits += 1
            return self._last[1]
        out = self.module(x)
        self._last = (x, out)
        return out


def check_members(cfgs, folders):
    """Refuse a battery whose students would not see the same batches and teacher; one line naming both."""
    if len(set(os.path.abspath(f) for f in folders)) != len(folders):
        raise UserError(f"--battery names a folder twice ({', '.join(folders)}); give each student once")
    first = cfgs[0]
    for cfg, folder in zip(cfgs[1:], folders[1:]):
        for key in SHARED_KEYS:
            if cfg.get(key) != first.get(key):
                raise UserError(f"--battery: {folder} has {key}={cfg.get(key)!r}, {folders[0]} has "
                                f"{key}={first.get(key)!r}; the students of a battery must share {key} (they "
                                f"share batches and teacher); run them in separate batteries or alone")
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        raise UserError("--battery runs in one process; under torchrun train each student alone (--save_path)")


class Member:
    """One student of a battery: its engine, its task, its own global RNG state and resume position."""

    def __init__(self, engine, task, start):
        self.engine, self.task = engine, task
        self.start = start  # (start epoch, start step, steps per epoch) from engine.begin
        self.rng = torch.get_rng_state()
        self.cuda_rng = torch.cuda.get_rng_state(engine.device) if engine.device.type == "cuda" else None

    @contextlib.contextmanager
    def own_rng(self):
        torch.set_rng_state(self.rng)
        if self.cuda_rng is not None:
            torch.cuda.set_rng_state(self.cuda_rng, self.engine.device)
        try:
            yield
        finally:
            self.rng = torch.get_rng_state()
            if self.cuda_rng is not None:
                self.cuda_rng = torch.cuda.get_rng_state(self.engine.device)


def groups(members):
    """Members split by resume position: only students at the same (epoch, step) can share batches."""
    out = {}
    for m in members:
        out.setdefault(m.start[:2], []).append(m)
    return [out[k] for k in sorted(out)]


def fit(members, resume_how):
    """Train members that start at the same position in one pass; returns their metrics, in order.

    resume_how: the command line that resumes the battery, printed in each student's log at a stop.
    """
    start_epoch, start_step, steps = members[0].start
    assert all(m.start == members[0].start for m in members), "a battery's students start at one position"
    lead = members[0]
    engines = [m.engine for m in members]
    epochs = lead.engine.cfg["epochs"]
    stop = []

    def on_signal(signum, frame):
        if stop:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        stop.append(signum)
        for e in engines:
            e._stop_signal = signum

    old = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        for s in old:
            signal.signal(s, on_signal)
    except ValueError:  # not the main thread
        old = {}
    bar = None
    wall0 = time.time()
    try:
        for epoch in range(start_epoch, epochs):
            first = start_step if epoch == start_epoch else 0
            for m in members:
                m.engine.begin_epoch(epoch, first, steps, bar=False)
            if lead.engine.is_main:
                from tqdm import tqdm
                bar = tqdm(total=steps, initial=first, desc=f"battery of {len(members)}: epoch {epoch + 1}/{epochs}",
                           dynamic_ncols=True, leave=False, mininterval=1.0 if sys.stderr.isatty() else 30.0)
            t0 = time.time()
            for step, batch in enumerate(lead.task.train_batches(lead.engine, epoch, first), start=first):
                for m in members:
                    with m.own_rng():
                        m.engine.train_step(step, batch)
                if bar is not None:
                    bar.update(1)
                    if (step + 1 - first) % lead.engine.cfg["log_every"] == 0:
                        each = len(batch[1]) * (step + 1 - first) / (time.time() - t0)
                        bar.set_postfix({"img/s each": f"{each:.0f}", "all": f"{each * len(members):.0f}"})
                signum = stop[0] if stop else next((e._stop_signal for e in engines if e._stop_signal), None)
                if signum is not None:
                    for e in engines:
                        e._stop_signal = signum
                    if bar is not None:
                        bar.close()
                        bar = None
                    for m in members:
                        with m.own_rng():
                            m.engine.save_stopped(epoch, step + 1, resume_how)
                    sys.exit(128 + signum)
            if bar is not None:
                bar.close()
                bar = None
            for m in members:  # every train row first: one student's evaluation is not in another's epoch time
                m.engine.end_epoch_train()
            for m in members:
                with m.own_rng():
                    m.engine.close_epoch(epoch)
        wall = time.time() - wall0
        results = []
        for m in members:
            with m.own_rng():
                results.append(m.engine.finish(wall))
        return results
    finally:
        if bar is not None:
            bar.close()
        for s, h in old.items():
            signal.signal(s, h)
