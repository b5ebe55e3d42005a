"""A battery: several students that distil one teacher, trained in one pass over the same batches.

Every student of a teacher sees the same augmented batches when their seeds and data keys agree, so one
teacher forward per batch (and one crop/flip, one copy of the data, one teacher evaluation) serves them
all. Each student keeps its own Engine: its own run folder, config.json, optimizer, lr schedule, parts,
checkpoints, resume state, logs and metrics.json, written exactly as a lone run writes them. The students
train in the engine's one loop (utils/engine.py train_together, which also runs a lone run as a battery of
one): each one's global RNG state is swapped in around its own work, so a student trained in a battery
computes what its lone run with the same seed computes (tests/test_battery.py checks it).

The lead student's task draws the batches; every student's task reads the teacher through one
SharedForward, which computes the teacher's answer for a batch once and hands the same tensor to the rest.
This module holds what is the battery's own: which students may share (check_members, groups) and the
shared teacher forward.
"""
import os

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


def one_process():
    """Whether this is one process (not a rank under torchrun): a battery trains its students in one process."""
    return int(os.environ.get("WORLD_SIZE", 1)) <= 1


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
    if not one_process():
        raise UserError("--battery runs in one process; under torchrun train each student alone (--save_path)")


def groups(members):
    """Members split by resume position: only students at the same (epoch, step) can share batches."""
    out = {}
    for m in members:
        out.setdefault(m.start[:2], []).append(m)
    return [out[k] for k in sorted(out)]
