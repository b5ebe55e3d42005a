"""Data-free adversarial distillation (DFAD, Fang et al. 2019): steal a teacher with generated images only.

    python train_dfad.py --save_path exps/CIFAR10/dfad/resnet34_resnet18 [--epochs 2 ...]

A generator G maps z ~ N(0, I) to images. The student takes k steps minimising the L1 logit discrepancy to
the frozen teacher on fresh samples, then G takes one step maximising it through the teacher. No training
image is ever read (the training split is not even loaded); the test split only scores the student.
"""
import os
import shutil
import sys

import torch

import models
from utils.checkpoint import finished_weights
from utils.config import (TRAIN_DEFAULTS, checkpoint_keys, checkpoint_options, parse_config, resolve_config,
                          write_config)
from utils.defences import build_from_checkpoint
from utils.engine import Engine, Part, Task
from utils.errors import UserError, cli_main
from utils.generator import Generator
from utils.losses import dfad_discrepancy

# The defaults are the recommended CPU-scale settings, the mini preset's (reproduce.py PRESETS): 8 epochs of
# 50 iterations of k = 5 student steps and one generator step, student SGD lr 0.1 (momentum 0.9, wd 5e-4, no
# Nesterov) held constant (the one milestone is the end), batch 128: about 12 min a run on one CPU thread.
# DFAD's published CIFAR-10 settings (METHOD.md section 4: batch 256, x0.1 at 100 and 200 of 500 epochs)
# are spelt out in exps/CIFAR10/dfad/*/params.json.
RECOMMENDED = {"epochs": 8, "milestones": [8], "batch_size": 128}
DEFAULTS = dict(TRAIN_DEFAULTS, teacher="", **checkpoint_keys("teacher"), nz=256, ngf=64, iters_per_epoch=50, k=5,
                lr_G=1e-3, g_optimizer="adam", lr=0.1, nesterov=False, schedule="step", **RECOMMENDED)
HELP_NOTES = {k: "the mini preset's DFAD setting (the paper's: epochs 500, milestones 100,200, batch_size 256)"
              for k in RECOMMENDED}

G_OPTIMIZERS = ("adam", "adamw", "sgd")
SAMPLES = 64  # images in each saved grid


def check_dfad_config(cfg, source):
    for key in ("nz", "ngf", "iters_per_epoch", "k", "lr_G"):
        if not cfg[key] > 0:
            raise UserError(f"{source}: '{key}' must be > 0, got {cfg[key]}")
    if cfg["g_optimizer"] not in G_OPTIMIZERS:
        raise UserError(f"{source}: 'g_optimizer' must be one of {', '.join(G_OPTIMIZERS)}, got '{cfg['g_optimizer']}'")
    for key in ("subset", "transfer", "label_smoothing"):
        if cfg[key]:
            raise UserError(f"{source}: '{key}' does not apply to data-free training; remove it")


class DFADTask(Task):
    """One engine step = one student step on a fresh generated batch; every k-th step, one generator step.

    Noise: the batch of (epoch, step) is drawn from a generator seeded by (seed, rank, global step, which of
    the two steps). Nothing about it needs saving, a resumed run draws exactly the batches it would have, and
    every DDP rank draws its own.
    """

    def __init__(self, student, teacher, generator, cfg, teacher_arch=None, teacher_acc=None):
        self.model, self.teacher, self.generator = student, teacher, generator
        self.cfg = cfg
        self.k, self.iters, self.nz = cfg["k"], cfg["iters_per_epoch"], cfg["nz"]
        self.teacher_path, self.teacher_arch, self.teacher_acc = cfg["teacher"], teacher_arch, teacher_acc
        self.epoch = 0
        self.g_scaler = None

    def setup(self, engine):
        cfg = self.cfg
        self.engine = engine
        self.local_batch = cfg["batch_size"] // engine.world_size
        self.teacher = engine.prepare_frozen(self.teacher)
        self.generator = self.generator.to(engine.device).train()  # always train mode, as in DFAD
        if engine.scaler is not None:  # fp16 on CUDA: the generator needs its own loss scale
            self.g_scaler = torch.amp.GradScaler("cuda")
        self.noise_gen = torch.Generator(device=engine.device)
        fixed = torch.Generator().manual_seed(cfg["seed"])  # same grid noise every epoch, global RNG untouched
        self.sample_z = torch.randn(SAMPLES, self.nz, generator=fixed).to(engine.device)
        self.gen_sum = torch.zeros((), device=engine.device)
        self.gen_count = 0

    def parts(self):
        """The generator, trained beside the student: its own optimizer at peak lr_G on the student's lr
        schedule, checkpointed and resumed by the engine; stepped here (after_step), not from the student's loss."""
        g_cfg = {"optimizer": self.cfg["g_optimizer"], "lr": self.cfg["lr_G"], "weight_decay": 0.0, "momentum": 0.9,
                 "nesterov": False}
        return {"generator": Part(self.generator, g_cfg, joint=False)}

    @property
    def g_optimizer(self):
        return self.engine.parts["generator"].optimizer

    def steps_per_epoch(self, engine):
        return self.iters * self.k

    def train_batches(self, engine, epoch, start_step):
        self.epoch = epoch
        self.gen_sum.zero_()
        self.gen_count = 0
        return range(start_step, self.steps_per_epoch(engine))

    def noise(self, step, kind):
        """z ~ N(0, I) for student (kind 0) or generator (kind 1) step `step` of the current epoch."""
        global_step = self.epoch * self.steps_per_epoch(self.engine) + step
        seed = (self.cfg["seed"] << 40) + (self.engine.rank << 34) + 2 * global_step + kind
        self.noise_gen.manual_seed(seed % 2 ** 63)
        return torch.randn(self.local_batch, self.nz, generator=self.noise_gen, device=self.engine.device)

    def _images(self, z):
        x = self.generator(z)
        return x.contiguous(memory_format=torch.channels_last) if self.cfg["channels_last"] else x

    def loss(self, batch):
        with torch.no_grad():
            images = self._images(self.noise(batch, 0))
            t = self.teacher(images)
        s = self.train_model(images)
        return {"l1": dfad_discrepancy(s, t)}, None, None

    def after_step(self, engine, step):
        if (step + 1) % self.k:
            return  # the engine set the generator's lr for this step: lr_G x the schedule's factor
        self.gen_sum += self.generator_step(self.noise(step, 1))
        self.gen_count += 1

    def generator_step(self, z):
        """One step of G maximising D through the frozen teacher and the current student; returns D.

        Gradients are taken for G's parameters only (torch.autograd.grad), so the student's .grad is left
        alone and the teacher (requires_grad False) never receives one. The bare student is used, not the
        DDP wrapper: this forward must not take part in the student's gradient reduction.
        """
        params = list(self.generator.parameters())
        with self.engine.autocast():
            images = self._images(z)
            d = dfad_discrepancy(self.model(images), self.teacher(images))
        loss = -d
        if self.g_scaler is not None:
            loss = self.g_scaler.scale(loss)
        grads = torch.autograd.grad(loss, params)
        for p, g in zip(params, grads):
            p.grad = g
        if self.engine.world_size > 1:
            for p in params:
                self.engine.all_reduce(p.grad).div_(self.engine.world_size)
        if self.g_scaler is not None:
            self.g_scaler.step(self.g_optimizer)
            self.g_scaler.update()
        else:
            self.g_optimizer.step()
        return d.detach().float()

    def end_epoch(self, engine, epoch, row):
        stats = engine.all_reduce(torch.stack([self.gen_sum, torch.tensor(float(self.gen_count),
                                                                          device=engine.device)]))
        total, count = stats.tolist()
        if count:
            row["gen_l1"] = total / count
        if engine.is_main:
            self.save_samples(engine, epoch)

    @torch.no_grad()
    def save_samples(self, engine, epoch):
        from torchvision.utils import save_image
        with engine.autocast():
            x = self.generator(self.sample_z)
        mean = torch.tensor(engine.info.mean, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(engine.info.std, device=x.device).view(1, -1, 1, 1)
        x = (x.float() * std + mean).clamp_(0, 1).cpu()
        folder = os.path.join(engine.save_path, "samples")
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, f"epoch_{epoch + 1:03d}.png")
        save_image(x, path, nrow=8)
        shutil.copyfile(path, os.path.join(folder, "latest.png"))

    def state_dict(self):  # the generator and its optimizer are saved by the engine (parts)
        return {"g_scaler": self.g_scaler.state_dict() if self.g_scaler is not None else None}

    def load_state_dict(self, state):
        if self.g_scaler is not None and state.get("g_scaler"):
            self.g_scaler.load_state_dict(state["g_scaler"])

    def metrics(self):
        return {"attack": "dfad", "teacher": self.teacher_path, "teacher_arch": self.teacher_arch,
                "teacher_acc": self.teacher_acc, "nz": self.nz, "ngf": self.cfg["ngf"], "k": self.k,
                "iters_per_epoch": self.iters, "lr_G": self.cfg["lr_G"], "training_images_used": 0}


@cli_main
def main(argv=None):
    args, _ = parse_config(__doc__.splitlines()[0], DEFAULTS, argv, choices={"g_optimizer": G_OPTIMIZERS},
                           script="train_dfad.py", notes=HELP_NOTES)
    cfg = resolve_config(args, DEFAULTS, checks=[check_dfad_config])
    cfg["teacher"] = finished_weights(cfg["teacher"], "teacher")
    engine = Engine(cfg, args.save_path, "train_dfad.py", resume=args.resume, overwrite=args.overwrite)
    if cfg["batch_size"] % engine.world_size:
        raise UserError(f"batch_size {cfg['batch_size']} must be divisible by the {engine.world_size} processes")
    teacher, ckpt = build_from_checkpoint(cfg["teacher"], "teacher", dataset=cfg["dataset"],
                                          num_classes=engine.info.num_classes, **checkpoint_options(cfg, "teacher"))
    engine.add_input("teacher", cfg["teacher"], ckpt)
    teacher = engine.prepare_frozen(teacher)
    engine.load_data(train=False)  # the test split only: DFAD never sees a training image
    if engine.is_main:
        write_config(args.save_path, cfg)
    student = models.build(cfg["model"], engine.info.num_classes)
    generator = Generator(cfg["nz"], cfg["ngf"], engine.info.image_size, 3)
    teacher_acc, _ = engine.evaluate(teacher, diagnostics=False)
    engine.log(f"teacher {cfg['teacher']} ({ckpt['arch']}): test acc {teacher_acc:.2f}; generator nz {cfg['nz']} "
               f"ngf {cfg['ngf']}, {cfg['iters_per_epoch']} iterations x (k={cfg['k']} student steps + 1 "
               f"generator step) an epoch")
    engine.fit(DFADTask(student, teacher, generator, cfg, ckpt["arch"], teacher_acc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
