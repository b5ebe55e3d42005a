"""Training throughput per script step: a plain fp32/NCHW loop fed by a per-sample PIL DataLoader, against
the engine's path (uint8 batch in memory, batched crop/flip, channels_last, autocast where the device has it).

    python bench/bench_train.py [--step scratch kd possessive] [--models resnet20 cnn] [--steps 15] [--amp off]

Prints images/s for both paths, the speed-up, and the share of the measured matmul peak
(training FLOPs = 3 x forward FLOPs, counted with torch.utils.flop_counter). --amp off times the engine's
path in fp32 (default: the precision the engine picks on this device); --json FILE also writes the rows.
"""
import argparse
import json
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import models  # noqa: E402
from utils.constants import DATASETS  # noqa: E402
from utils.data import DeviceLoader  # noqa: E402
from utils.engine import cpu_supports_bf16  # noqa: E402


def matmul_peak(device, dtype, n=2048, reps=10):
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    sync(device)
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n ** 3 * reps / (time.perf_counter() - t)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def forward_flops(model, size, device):
    from torch.utils.flop_counter import FlopCounterMode
    x = torch.randn(1, 3, size, size, device=device)
    model.eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    model.train()
    return counter.get_total_flops()


def fake_split(n, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g),
            torch.randint(0, 10, (n,), generator=g))


def time_steps(step, batches, warmup, device):
    it = iter(batches)
    for _ in range(warmup):
        step(*next(it))
    sync(device)
    t, n = time.perf_counter(), 0
    for x, y in it:
        step(x, y)
        n += y.shape[0]
    sync(device)
    return n / (time.perf_counter() - t)


def make_step(kind, name, teacher_name, device, channels_last, amp_dtype):
    """One training step of a script: scratch (CE), kd (frozen teacher forward + student step, as in
    train_kd.py) or possessive (frozen original forward + RML step, as in train_possessive.py)."""
    from utils.losses import kd_loss, rml_loss
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = models.build(name, 10).to(device).to(memory_format=fmt)
    frozen = None
    if kind != "scratch":
        frozen = models.build(teacher_name, 10).to(device).to(memory_format=fmt).eval().requires_grad_(False)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4, nesterov=True)

    def step(x, y):
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            if frozen is not None:
                with torch.no_grad():
                    z = frozen(x)
            logits = model(x)
            if kind == "scratch":
                loss = F.cross_entropy(logits.float(), y)
            elif kind == "kd":
                loss = sum(kd_loss(logits, z, y, 4.0, 0.9).values())
            else:
                loss = sum(rml_loss(logits, z, y, 4.0, 1.0, 1.0, 0.0).values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step, model, frozen


def plain_loop(kind, name, teacher_name, images, labels, batch_size, steps, warmup, device):
    """The baseline: fp32, NCHW, torchvision transforms on PIL images, one sample at a time."""
    import torchvision.transforms as T
    from PIL import Image
    info = DATASETS["cifar10"]
    tf = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(),
                    T.Normalize(info.mean, info.std)])
    arr = images.permute(0, 2, 3, 1).numpy()

    class DS(torch.utils.data.Dataset):
        def __len__(self):
            return len(labels)

        def __getitem__(self, i):
            return tf(Image.fromarray(arr[i])), int(labels[i])

    loader = torch.utils.data.DataLoader(DS(), batch_size=batch_size, shuffle=True, drop_last=True, num_workers=0)
    step, _, _ = make_step(kind, name, teacher_name, device, False, None)

    def batches():
        for i, (x, y) in enumerate(loader):
            if i >= warmup + steps:
                return
            yield x.to(device), y.to(device)
    return time_steps(step, batches(), warmup, device)


def engine_loop(kind, name, teacher_name, images, labels, batch_size, steps, warmup, device, amp_dtype):
    """The engine's path: uint8 data on the device, batched crop/flip, channels_last, autocast if fast."""
    info = DATASETS["cifar10"]
    loader = DeviceLoader(images, labels, batch_size, device, info.mean, info.std, True, channels_last=True)
    step, _, _ = make_step(kind, name, teacher_name, device, True, amp_dtype)

    def batches():
        for i, b in enumerate(loader):
            if i >= warmup + steps:
                return
            yield b
    return time_steps(step, batches(), warmup, device)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("--step", nargs="+", default=["scratch", "kd", "possessive"],
                   choices=["scratch", "kd", "possessive"],
                   help="which script's step: train_scratch (CE), train_kd (teacher forward + student), "
                        "train_possessive (original forward + RML step of a same-architecture teacher)")
    p.add_argument("--models", nargs="+", default=["resnet20", "cnn"], help="trained models")
    p.add_argument("--teacher", default="resnet20", help="the frozen teacher of the kd step")
    p.add_argument("--steps", type=int, default=15)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--batch_size", type=int, default=128)
    p.add_argument("--device", default="auto")
    p.add_argument("--amp", default="auto", choices=["auto", "off", "bf16", "fp16"],
                   help="precision of the engine's path (default auto: what the engine picks on this device)")
    p.add_argument("--json", metavar="FILE", default=None, help="also write the rows to FILE")
    p.add_argument("--peak_size", type=int, default=2048,
                   help="side of the square matmuls timed for the peak (a big GPU needs ~8192 to reach it)")
    args = p.parse_args()
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda asked for but no CUDA GPU is visible")
    if args.amp == "fp16" and device.type != "cuda":
        p.error("--amp fp16 is for CUDA only")
    if args.amp == "off":
        amp = None
    elif args.amp != "auto":
        amp = torch.bfloat16 if args.amp == "bf16" else torch.float16
    elif device.type == "cuda":
        amp = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    else:
        amp = torch.bfloat16 if cpu_supports_bf16() else None
    torch.manual_seed(0)
    n = args.batch_size * (args.steps + args.warmup)
    images, labels = fake_split(n)
    peak32 = matmul_peak(device, torch.float32, args.peak_size)
    peak_amp = matmul_peak(device, amp, args.peak_size) if amp is not None else peak32
    precision = str(amp).replace("torch.", "") if amp else "fp32"
    print(f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"engine precision {precision if amp or args.amp == 'off' else 'fp32 (no fast bf16 on this CPU)'}")
    print(f"measured matmul peak: fp32 {peak32 / 1e9:.0f} GFLOP/s, engine precision {peak_amp / 1e9:.0f} GFLOP/s")
    print(f"{'step':<11} {'model':<22} {'GFLOP/img':>9} {'plain img/s':>12} {'engine img/s':>13} {'speed-up':>9} "
          f"{'plain %peak':>11} {'engine %peak':>12}")
    cpu = torch.device("cpu")
    rows = []
    for kind in args.step:
        for name in args.models:
            teacher = args.teacher if kind == "kd" else name
            flops = 3 * forward_flops(models.build(name, 10), 32, cpu)  # forward + backward of the trained model
            if kind != "scratch":
                flops += forward_flops(models.build(teacher, 10), 32, cpu)  # the frozen model's forward
            label = name if kind == "scratch" else f"{name} <- {teacher}"
            t0 = time.perf_counter()
            plain = plain_loop(kind, name, teacher, images, labels, args.batch_size, args.steps, args.warmup, device)
            fast = engine_loop(kind, name, teacher, images, labels, args.batch_size, args.steps, args.warmup,
                               device, amp)
            print(f"{kind:<11} {label:<22} {flops / 1e9:>9.3f} {plain:>12.0f} {fast:>13.0f} {fast / plain:>8.2f}x "
                  f"{100 * plain * flops / peak32:>10.1f}% {100 * fast * flops / peak_amp:>11.1f}%", flush=True)
            rows.append({"step": kind, "model": name, "teacher": teacher if kind != "scratch" else None,
                         "gflop_per_img": flops / 1e9, "plain_img_s": plain, "engine_img_s": fast,
                         "speedup": fast / plain, "plain_pct_peak": 100 * plain * flops / peak32,
                         "engine_pct_peak": 100 * fast * flops / peak_amp,
                         "seconds": time.perf_counter() - t0})
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": str(device), "torch": torch.__version__, "engine_precision": precision,
                       "batch_size": args.batch_size, "steps": args.steps, "peak_fp32_gflops": peak32 / 1e9,
                       "peak_engine_gflops": peak_amp / 1e9, "rows": rows}, f, indent=2)

if __name__ == "__main__":
    np.random.seed(0)
    main()
