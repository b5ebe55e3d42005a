"""The registry of attacks: every way a thief distils a frozen teacher, one entry each.

An attack is a class registered with @register. It declares its config keys (with defaults: train_kd.py's
keys are the union over the registry), checks them, says what it reads from the teacher (`query`: the
thief's view of one batch of teacher logits), and turns the student's logits and that view into named loss
terms. An attack that learns a part of its own (Markov KD's matrices) returns it from `parts`: the engine
optimises, schedules, checkpoints and resumes it with the student.

Adding an attack is one class here plus its test; train_kd.py, reproduce.py's battery, report.py's table and
figures pick it up from ATTACKS.
"""
import math

import torch
import torch.nn.functional as F

from . import registry
from .engine import Part  # the engine's trainable extra module; attacks build theirs from here
from .errors import UserError
from .losses import dkd_loss, kd_loss, kl_divergence, reverse_logits

ATTACKS = {}


def register(cls):
    """Class decorator: add a attack to ATTACKS under cls.name (a name may be registered once)."""
    return registry.add(ATTACKS, cls, "attack")


def attack_keys():
    """The config keys of every registered attack with their defaults (one default per key)."""
    return registry.merged_keys(ATTACKS, "attack")


class Attack:
    name = ""
    label = ""          # as the report names it
    keys = {}           # config keys read by this attack, with defaults
    battery = True      # part of reproduce.py's battery (every teacher is attacked by it)

    def __init__(self, cfg, num_classes):
        self.cfg, self.num_classes, self.tau = cfg, num_classes, cfg["tau"]

    @classmethod
    def as_used(cls, cfg):
        """{key: the value the attack uses} where it differs from the config's (a clamp), with '_why'."""
        return {}

    @classmethod
    def check(cls, cfg, source):
        """Raise UserError for a bad value of this attack's keys."""

    def parts(self):
        """{name: Part} trained beside the student."""
        return {}

    def query(self, teacher_logits, labels):
        """The thief's view of the teacher's answer to one batch (default: the full logits)."""
        return teacher_logits

    def loss(self, student_logits, view, labels, progress, parts):
        """Named loss terms; progress is in epochs (a float), parts the modules of parts() on the device."""
        raise NotImplementedError

    def metrics(self):
        return {}


def _check_alpha(cfg, source):
    if not 0 <= cfg["alpha"] <= 1:
        raise UserError(f"{source}: 'alpha' must be in [0, 1], got {cfg['alpha']}")


@register
class Vanilla(Attack):
    """Hinton KD: alpha tau^2 KL(p_t^tau || p_s^tau) + (1 - alpha) CE."""
    name, label = "vanilla", "vanilla KD"
    keys = {"alpha": 0.9}

    @classmethod
    def check(cls, cfg, source):
        _check_alpha(cfg, source)

    def loss(self, student_logits, view, labels, progress, parts):
        return kd_loss(student_logits, view, labels, self.tau, self.cfg["alpha"])

    def metrics(self):
        return {"alpha": self.cfg["alpha"]}


@register
class Rereverse(Vanilla):
    """The adaptive thief of RML: reverse the teacher's non-target ranks again (around its own argmax, or the
    label) and distil the result with vanilla KD."""
    name, label = "rereverse", "re-reversal"
    keys = {"alpha": 0.9, "rereverse_target": "argmax"}
    TARGETS = ("argmax", "label")

    @classmethod
    def check(cls, cfg, source):
        _check_alpha(cfg, source)
        if cfg["rereverse_target"] not in cls.TARGETS:
            raise UserError(f"{source}: 'rereverse_target' must be one of {', '.join(cls.TARGETS)}, "
                            f"got '{cfg['rereverse_target']}'")

    def query(self, teacher_logits, labels):
        around = teacher_logits.argmax(1) if self.cfg["rereverse_target"] == "argmax" else labels
        return reverse_logits(teacher_logits, around)

    def metrics(self):
        return {"alpha": self.cfg["alpha"], "rereverse_target": self.cfg["rereverse_target"]}


def dkd_warmup_epochs(cfg):
    """Epochs over which DKD's KD weights ramp linearly from 0 to 1.

    DKD warms up over 20 of its 240 epochs; a short run caps the ramp at a quarter of its epochs, so a
    10-epoch CPU run ramps over 2.5 epochs instead of never reaching full weight.
    """
    return min(float(cfg["dkd_warmup"]), cfg["epochs"] / 4)


def warmup_factor(progress, warmup_epochs):
    """min(1, progress / warmup_epochs), progress in epochs (a float that grows every step)."""
    return 1.0 if warmup_epochs <= 0 else min(1.0, progress / warmup_epochs)


@register
class DKD(Attack):
    """Decoupled KD: CE + warm-up x (dkd_alpha TCKD + dkd_beta NCKD)."""
    name, label = "dkd", "DKD"
    keys = {"dkd_alpha": 1.0, "dkd_beta": 8.0, "dkd_warmup": 20}

    @classmethod
    def check(cls, cfg, source):
        for key in cls.keys:
            if cfg[key] < 0:
                raise UserError(f"{source}: '{key}' must be >= 0, got {cfg[key]}")

    def beta(self):
        return self.cfg["dkd_beta"]

    def loss(self, student_logits, view, labels, progress, parts):
        w = warmup_factor(progress, dkd_warmup_epochs(self.cfg))  # from (epoch, step): exact after --resume
        return dkd_loss(student_logits, view, labels, self.tau, self.cfg["dkd_alpha"], self.beta(), warmup=w)

    def metrics(self):
        return {"dkd_alpha": self.cfg["dkd_alpha"], "dkd_beta": self.beta(),
                "dkd_warmup_epochs": dkd_warmup_epochs(self.cfg)}

    @classmethod
    def as_used(cls, cfg):
        used = dkd_warmup_epochs(cfg)
        if used == cfg["dkd_warmup"]:
            return {}
        return {"dkd_warmup": used, "_why": f"dkd_warmup is capped at a quarter of the {cfg['epochs']} epochs"}


@register
class TCKD(DKD):
    """DKD with the non-target part off: only the target-versus-rest confidence is distilled."""
    name, label = "tckd", "TCKD"

    def beta(self):
        return 0.0

    def loss(self, student_logits, view, labels, progress, parts):
        terms = super().loss(student_logits, view, labels, progress, parts)
        del terms["nckd"]  # always 0: not worth a log column
        return terms


@register
class HardLabel(Attack):
    """The hard-label thief: cross-entropy on the teacher's argmax, nothing else (what any prediction API
    leaks; the floor of every defence that keeps its top-1). `query` hands the loss the argmax alone."""
    name, label = "hardlabel", "hard-label"
    keys = {}

    def query(self, teacher_logits, labels):
        return teacher_logits.argmax(1)

    def loss(self, student_logits, view, labels, progress, parts):
        return {"ce_teacher": F.cross_entropy(student_logits.float(), view)}


class MarkovMatrices(torch.nn.Module):
    """One row-stochastic C x C matrix per class, M_y = softmax(W_y) row by row.

    W_y = markov_init * I + U_y V_y^T: the identity term makes M_y start near the identity (the teacher's
    distribution passes unchanged); with markov_rank r > 0 the learnt part is of rank r (their "intrinsic
    dimension" is 3 on CIFAR), with markov_rank 0 it is a full C x C matrix. U starts small and random, V
    at zero, so M_y starts exactly at softmax(markov_init * I).
    """

    def __init__(self, num_classes, rank, init, seed=0):
        super().__init__()
        c = num_classes
        self.init = float(init)
        g = torch.Generator().manual_seed(seed)
        if rank:
            self.u = torch.nn.Parameter(0.01 * torch.randn(c, c, rank, generator=g))
            self.v = torch.nn.Parameter(torch.zeros(c, c, rank))
        else:
            self.w = torch.nn.Parameter(torch.zeros(c, c, c))
        self.rank = rank
        self.register_buffer("eye", torch.eye(c))

    def forward(self, labels):
        """M_y for every label of a batch: (N, C, C), rows summing to 1."""
        learnt = self.u[labels] @ self.v[labels].transpose(1, 2) if self.rank else self.w[labels]
        return torch.softmax(self.init * self.eye + learnt.float(), dim=2)


@register
class Markov(Attack):
    """Markov KD (Yang & Ye, ECCV'24), as inferred in METHOD.md section 7 (their code is not public):

        p~ = M_y^T p_t^tau  (p~_j = sum_i p_i M_y[i, j]),  M_y = MarkovMatrices(y), learnt jointly,
        L = alpha tau^2 KL(p~ || p_s^tau) + (1 - alpha) CE(z_s, y).

    Choices stated: the matrix is chosen by the true label; rows are softmax(markov_init I + learnt part)
    so M_y starts near the identity; the matrices take the student's lr schedule with peak markov_lr (SGD,
    no weight decay) and the same loss as the student.
    """
    name, label = "markov", "Markov KD"
    keys = {"alpha": 0.9, "markov_rank": 3, "markov_init": 5.0, "markov_lr": 0.01}

    @classmethod
    def check(cls, cfg, source):
        _check_alpha(cfg, source)
        if cfg["markov_rank"] < 0:
            raise UserError(f"{source}: 'markov_rank' must be >= 0 (0: a full matrix), got {cfg['markov_rank']}")
        if not cfg["markov_lr"] > 0:
            raise UserError(f"{source}: 'markov_lr' must be > 0, got {cfg['markov_lr']}")
        if not math.isfinite(cfg["markov_init"]) or cfg["markov_init"] < 0:
            raise UserError(f"{source}: 'markov_init' must be >= 0, got {cfg['markov_init']}")

    def parts(self):
        module = MarkovMatrices(self.num_classes, self.cfg["markov_rank"], self.cfg["markov_init"], self.cfg["seed"])
        return {"markov": Part(module, {"optimizer": "sgd", "lr": self.cfg["markov_lr"], "momentum": 0.9,
                                        "nesterov": False, "weight_decay": 0.0})}

    def loss(self, student_logits, view, labels, progress, parts):
        alpha, tau = self.cfg["alpha"], self.tau
        z_s = student_logits.float()
        p_t = torch.softmax(view.float() / tau, dim=1)
        p_markov = torch.bmm(p_t.unsqueeze(1), parts["markov"](labels)).squeeze(1)
        log_p = torch.log(p_markov.clamp_min(1e-12))
        terms = {"ce": (1.0 - alpha) * F.cross_entropy(z_s, labels)}
        terms["kd"] = alpha * tau * tau * kl_divergence(log_p, F.log_softmax(z_s / tau, dim=1))
        return terms

    def metrics(self):
        return {"alpha": self.cfg["alpha"], "markov_rank": self.cfg["markov_rank"],
                "markov_init": self.cfg["markov_init"], "markov_lr": self.cfg["markov_lr"]}
