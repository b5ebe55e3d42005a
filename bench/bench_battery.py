"""Images/s per student: the attacks of one teacher trained as separate runs, and as one shared battery.

    python bench/bench_battery.py [--teacher resnet20] [--student cnn] [--attacks vanilla rereverse dkd tckd]
                                  [--steps 20] [--warmup 3] [--batch_size 128] [--threads N] [--json FILE]
                                  [--cache_epochs E ...]

Both paths are the engine's own: Engine.train_step of train_kd.py's KDTask on batches of the engine's loader
(generated images, a randomly initialised teacher: the speed does not depend on the weights). Separate: each
attack alone, its own crop/flip and teacher forward per batch, one after another, as separate runs are.
Battery: one batch and one teacher forward per step serve every attack (utils/battery.py), as
`train_kd.py --battery` and reproduce.py train them. Images/s per student = the images all students learn
from over the wall time they take (separate: the sum of the runs' times; battery: its one pass), so the
speed-up is how much less time the same students cost. --threads sets torch's threads
(default: torch's own, the cores of this machine; reproduce.py --jobs 2 gives each job half of them).

--cache_epochs E also times the battery with the teacher's answer cache (train_kd.py's teacher_cache) as it is
on average over an E-epoch run: each image version of the timed batches is already kept with the probability
utils/battery.py expected_saved(E, 162) gives (0.48 at the 10% thief's 240 epochs, 0.86 at the 2% thief's 1,200),
so the teacher runs on the rest, as a sub-batch.
"""
import argparse
import contextlib
import io
import json
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import models  # noqa: E402
from bench_train import fake_split  # noqa: E402
from train_kd import DEFAULTS, KDTask  # noqa: E402
from utils.battery import AnswerCache, SharedForward, expected_saved  # noqa: E402
from utils.checkpoint import freeze  # noqa: E402
from utils.constants import DATASETS  # noqa: E402
from utils.data import DeviceLoader  # noqa: E402
from utils.engine import Engine  # noqa: E402


def _member(attack, args, folder, loaders, teacher):
    cfg = dict(DEFAULTS, model=args.student, attack=attack, batch_size=args.batch_size, device=args.device,
               amp=args.amp, epochs=1, log_every=10 ** 9)
    engine = Engine(cfg, folder, "bench_battery.py")
    engine.loaders = loaders
    task = KDTask(models.build(args.student, 10), teacher, cfg, args.teacher, 0.0)
    with contextlib.redirect_stdout(io.StringIO()):  # the run's header line: not part of the table
        engine.begin(task)
    engine.begin_epoch(0, 0, len(loaders["train"]), bar=False)
    return engine, task


def _batches(loader):
    """The loader's own iterator over epoch 0: its crop/flip is part of what is timed."""
    loader.set_epoch(0)
    return loader.iterate()


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_separate(members, loader, steps, warmup, device):
    """Seconds per attack for `steps` steps, each attack alone over its own batches (after `warmup`)."""
    out = []
    for engine, task in members:
        it = _batches(loader)
        for step in range(warmup):
            engine.train_step(step, next(it))
        _sync(device)
        t = time.perf_counter()
        for step in range(warmup, warmup + steps):
            engine.train_step(step, next(it))
        _sync(device)
        out.append(time.perf_counter() - t)
    return out


def time_battery(members, loader, steps, warmup, device):
    """Seconds for `steps` steps of every attack together, one batch and one teacher forward per step."""
    it = _batches(loader)
    t = None
    for step in range(warmup + steps):
        if step == warmup:
            _sync(device)
            t = time.perf_counter()
        batch = next(it)
        for engine, _ in members:
            engine.train_step(step, batch)
    _sync(device)
    return time.perf_counter() - t


def warm_cache(teacher, loader, saved, seed=0):
    """An AnswerCache of `teacher` over `loader`'s versions in which each version of epoch 0's batches is kept
    with probability `saved` (its answer computed here, before any timing), as on average over a long run."""
    cache = AnswerCache(teacher, len(loader.labels) * loader.variants)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for x, _ in _batches(loader):
            cache(x)
    keep = torch.rand(cache.size, generator=g) < saved
    cache.seen &= keep.to(cache.seen.device)
    cache.served = cache.computed = 0
    return cache


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("--teacher", default="resnet20")
    p.add_argument("--student", default="cnn")
    p.add_argument("--attacks", nargs="+", default=["vanilla", "rereverse", "dkd", "tckd"])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--batch_size", type=int, default=128)
    p.add_argument("--device", default="auto")
    p.add_argument("--amp", default="auto", choices=["auto", "off", "bf16", "fp16"])
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", metavar="FILE", default=None, help="also write the figures to FILE")
    p.add_argument("--cache_epochs", type=int, nargs="*", default=[],
                   help="also time the battery with the teacher's answer cache, as on average over runs of these "
                        "many epochs (e.g. 240 1200)")
    args = p.parse_args(argv)
    if any(e < 1 for e in args.cache_epochs):
        p.error(f"--cache_epochs takes epoch counts of at least 1, e.g. 240 1200; got {args.cache_epochs}")
    if args.threads:
        torch.set_num_threads(args.threads)
    n = args.batch_size * (args.steps + args.warmup)
    images, labels = fake_split(n)
    info = DATASETS["cifar10"]
    with tempfile.TemporaryDirectory() as tmp:
        probe = Engine(dict(DEFAULTS, device=args.device, amp=args.amp), tmp, "bench_battery.py")
        device = probe.device
        loaders = {"train": DeviceLoader(images, labels, args.batch_size, device, info.mean, info.std, True),
                   "test": DeviceLoader(images[:args.batch_size], labels[:args.batch_size], args.batch_size, device,
                                        info.mean, info.std, False)}
        teacher = freeze(probe.to_device(models.build(args.teacher, 10)))
        precision = str(probe.amp_dtype).replace("torch.", "") if probe.amp_dtype else "fp32"
        print(f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}, precision {precision}; "
              f"{args.student} students of a {args.teacher} teacher, attacks {' '.join(args.attacks)}, "
              f"batch {args.batch_size}, {args.steps} timed steps after {args.warmup}", flush=True)
        alone = [_member(a, args, os.path.join(tmp, f"alone_{a}"), loaders, teacher) for a in args.attacks]
        separate = time_separate(alone, loaders["train"], args.steps, args.warmup, device)
        shared = SharedForward(teacher)
        together = [_member(a, args, os.path.join(tmp, f"battery_{a}"), loaders, shared) for a in args.attacks]
        battery = time_battery(together, loaders["train"], args.steps, args.warmup, device)
        cached = {}
        for epochs in args.cache_epochs:
            saved = expected_saved(epochs, loaders["train"].variants)
            with probe.autocast():  # the answers kept in the precision the students read them in
                cache = warm_cache(teacher, loaders["train"], saved)
            shared = SharedForward(cache)
            members = [_member(a, args, os.path.join(tmp, f"cached{epochs}_{a}"), loaders, shared)
                       for a in args.attacks]
            cached[epochs] = (saved, time_battery(members, loaders["train"], args.steps, args.warmup, device),
                              cache.record())
    images_per_student = args.steps * args.batch_size
    sep_rate = len(args.attacks) * images_per_student / sum(separate)
    bat_rate = len(args.attacks) * images_per_student / battery
    print(f"{'attack':<12} {'separate img/s':>15}")
    for attack, sec in zip(args.attacks, separate):
        print(f"{attack:<12} {images_per_student / sec:>15.0f}")
    print(f"{'per student':<12} {'separate img/s':>15} {'battery img/s':>14} {'speed-up':>9}")
    print(f"{len(args.attacks)} students {sep_rate:>15.0f} {bat_rate:>14.0f} {bat_rate / sep_rate:>8.2f}x", flush=True)
    cache_rows = {}
    for epochs, (saved, sec, record) in cached.items():
        rate = len(args.attacks) * images_per_student / sec
        cache_rows[epochs] = {"expected_saved": saved, "battery_s": sec, "battery_img_s_per_student": rate,
                              "speedup_over_battery": rate / bat_rate, "teacher_answers": record}
        print(f"battery with the answer cache, as over {epochs} epochs ({saved:.0%} of the teacher's answers kept): "
              f"{rate:.0f} img/s per student, {rate / bat_rate:.2f}x the battery", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": str(device), "torch": torch.__version__, "threads": torch.get_num_threads(),
                       "precision": precision, "teacher": args.teacher, "student": args.student,
                       "attacks": args.attacks, "batch_size": args.batch_size, "steps": args.steps,
                       "separate_s": dict(zip(args.attacks, separate)), "battery_s": battery,
                       "separate_img_s_per_student": sep_rate, "battery_img_s_per_student": bat_rate,
                       "speedup": bat_rate / sep_rate, "cache": cache_rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
