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
This module holds what is the battery's own: which students may share (check_members) and the
shared teacher forward; and the teacher's answer cache (AnswerCache), which a lone run uses as well.
"""
import math
import os

import torch

from .errors import UserError

# Keys that must agree across a battery's students: they fix the batches (data, split, batch size, seed,
# epochs), the teacher and the precision it answers in, and where it all runs. Everything else (student
# model, attack, temperature, lr, schedule...) may differ from student to student.
SHARED_KEYS = ("dataset", "data_root", "download", "subset", "subset_seed", "labels", "transfer", "test_subset",
               "batch_size", "eval_batch_size", "seed", "epochs", "teacher", "teacher_arch", "teacher_mean",
               "teacher_std", "amp", "device", "channels_last", "teacher_cache")

CACHE_MODES = ("auto", "on", "off")  # teacher_cache
# teacher_cache auto keeps the answers when the table fits in this many bytes and the schedule repeats enough
# versions of each image that at least MIN_SAVED of the teacher's forwards are saved (in expectation)
CACHE_BYTES = 1 << 30
MIN_SAVED = 0.2


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


class AnswerCache(torch.nn.Module):
    """A frozen teacher whose answer for each augmented version of a training image is kept: a batch that
    carries variant_keys (utils/data.py, DeviceLoader) is answered from the table where every version was seen
    before, and the teacher runs on the versions never seen (on the whole batch when none was). A small thief set
    trained for many epochs sees each of an image's 162 versions (4-pixel crops, flips) again and again: at 1,000
    images and 1,200 epochs the teacher computes one answer in seven. Any input without keys (evaluation,
    generated images) runs the teacher. The kept answer is the teacher's own output for that input; a version
    first seen in a sub-batch may differ from the full batch's in the last bits (as with any batch size)."""

    def __init__(self, module, size):
        super().__init__()
        self.module = module
        self.size = size  # the number of keys: training images x versions of each
        self.table = self.seen = None
        self.served = self.computed = 0

    def forward(self, x):
        keys = getattr(x, "variant_keys", None)
        if keys is None:
            return self.module(x)
        self.served += len(keys)
        new = None if self.table is None else ~self.seen[keys]  # None: nothing seen yet
        count = len(keys) if new is None else int(new.sum())
        if count == len(keys):  # no version seen: the whole batch runs, as without the cache
            out = self.module(x)
            if self.table is None:
                self.table = torch.empty((self.size, *out.shape[1:]), dtype=out.dtype, device=out.device)
                self.seen = torch.zeros(self.size, dtype=torch.bool, device=out.device)
            self.table[keys] = out
            self.seen[keys] = True
            self.computed += count
            return out
        if count:
            sub = x[new]
            if x.is_contiguous(memory_format=torch.channels_last):
                sub = sub.contiguous(memory_format=torch.channels_last)
            self.table[keys[new]] = self.module(sub)
            self.seen[keys[new]] = True
            self.computed += count
        return self.table[keys]

    def record(self):
        """metrics.json's account of the cache: answers served, answers the teacher computed."""
        return {"served": self.served, "computed": self.computed}


def expected_saved(epochs, variants):
    """The expected fraction of teacher forwards a cache saves when each epoch draws one of an image's
    `variants` versions at random: 1 - (expected distinct versions seen) / epochs."""
    distinct = variants * -math.expm1(epochs * math.log1p(-1.0 / variants)) if variants > 1 else 1.0
    return 1.0 - distinct / epochs


def answer_cache(teacher, cfg, loader, num_classes, bytes_per_answer=4):
    """The teacher wrapped in an AnswerCache over the training loader's versions when cfg's teacher_cache
    asks for one (on; auto: on a CPU, when the table fits in CACHE_BYTES and at least MIN_SAVED of the forwards
    are saved in expectation), else the teacher itself. Auto leaves a GPU without it: there the cache waits for
    the device once a step (to count the unseen versions), and what that costs has not been measured."""
    mode = cfg.get("teacher_cache", "auto")
    size = len(loader.labels) * loader.variants
    if mode == "off" or mode == "auto" and (loader.device.type != "cpu"
                                            or size * num_classes * bytes_per_answer > CACHE_BYTES
                                            or expected_saved(cfg["epochs"], loader.variants) < MIN_SAVED):
        return teacher
    return AnswerCache(teacher, size)


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
