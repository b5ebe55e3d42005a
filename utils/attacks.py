"""The registry of attacks: every way a thief distils a frozen teacher, one entry each.

An attack is a class registered with @register. It declares its config keys (with defaults: train_kd.py's
keys are the union over the registry), checks them, says what it reads from the teacher (`query`: the
thief's view of one batch of teacher logits), and turns the student's logits and that view into named loss
terms. An attack that learns a part of its own (Markov KD's matrices; the Skeptical student's auxiliary head,
which `attach` hooks onto the student) returns it from `parts`: the engine optimises, schedules, checkpoints
and resumes it with the student.

Adding an attack is one class here plus its test; train_kd.py, reproduce.py's battery, report.py's table and
figures pick it up from ATTACKS. Longer than ~400 lines because the registry is one file on purpose: a reader
sees every attack of the battery, and how each reads the teacher, side by side.
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
    uses_tau = True     # its loss reads the temperature (the report shows a run's τ only where it does)
    reads_labels = True  # it reads the label (or, for a thief without labels, the argmax in its place)

    def __init__(self, cfg, num_classes):
        self.cfg, self.num_classes, self.tau = cfg, num_classes, cfg["tau"]

    @classmethod
    def as_used(cls, cfg):
        """{key: the value the attack uses} where it differs from the config's (a clamp), with '_why'."""
        return {}

    @classmethod
    def check(cls, cfg, source):
        """Raise UserError for a bad value of this attack's keys."""

    def attach(self, student):
        """Called once with the student before parts(): an attack that taps the student's intermediate stages
        (the Skeptical student's auxiliary head) builds its modules and forward hooks here."""

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
    uses_tau = False  # the argmax alone: any τ gives the same student
    reads_labels = False  # with labels or without, the same student (a label-free threat model shares its twin's)

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


def kd_delay_epochs(cfg):
    """Epochs the Skeptical student trains on labels alone before the teacher's soft targets reach its auxiliary
    head: kd_delay, capped at a quarter of the run (as DKD's warm-up), so a short run still distils."""
    return min(float(cfg["kd_delay"]), cfg["epochs"] / 4)


def _separable(in_ch, out_ch, stride):
    """Depthwise 3x3 (stride) then pointwise 1x1, each followed by BN; ReLU at the end."""
    return [torch.nn.Conv2d(in_ch, in_ch, 3, stride=stride, padding=1, groups=in_ch, bias=False),
            torch.nn.BatchNorm2d(in_ch), torch.nn.Conv2d(in_ch, out_ch, 1, bias=False),
            torch.nn.BatchNorm2d(out_ch), torch.nn.ReLU(inplace=True)]


class AuxHead(torch.nn.Module):
    """The Skeptical student's auxiliary classifier on one intermediate stage of a student of the zoo.

    A forward hook on that stage keeps its output while the student trains (not while it is evaluated);
    calling the head turns the kept features into logits: one separable-conv block per stage the main path
    still has to go through (same widths and down-sampling as those stages), global average pooling and a
    linear classifier. The head is a Part: it trains beside the student, is checkpointed and resumed with it,
    and is never in weights.pth, so the evaluated model is the student's own final head.
    """

    def __init__(self, student, stage, num_classes, image_size, seed=0):
        super().__init__()
        import models
        names = models.stages(student)
        self.tap = names[stage - 1]
        modules = dict(student.named_modules())
        shapes = []
        hooks = [modules[n].register_forward_hook(lambda m, i, out: shapes.append(tuple(out.shape[1:])))
                 for n in names]
        device = next(student.parameters()).device
        was = student.training
        student.eval()
        try:
            with torch.no_grad():
                student(torch.zeros(1, 3, image_size, image_size, device=device))
        finally:
            student.train(was)
            for h in hooks:
                h.remove()
        with torch.random.fork_rng(devices=[]):  # the student's RNG stream stays that of a run without the head
            torch.manual_seed(seed)
            blocks = []
            for (c_in, h_in, _), (c_out, h_out, _) in zip(shapes[stage - 1:], shapes[stage:]):
                blocks += _separable(c_in, c_out, max(h_in // h_out, 1))
            self.blocks = torch.nn.Sequential(*blocks)
            self.fc = torch.nn.Linear(shapes[-1][0], num_classes)
        self.to(device)
        self._features = None
        self._hook = modules[self.tap].register_forward_hook(self._keep)

    def _keep(self, module, inputs, output):
        if module.training:
            self._features = output

    def forward(self):
        """Logits of the auxiliary head for the batch the student saw last in training."""
        if self._features is None:
            raise RuntimeError("the auxiliary head has no features: run the student on a training batch first")
        x, self._features = self._features, None
        return self.fc(torch.flatten(torch.nn.functional.adaptive_avg_pool2d(self.blocks(x), 1), 1))


def skeptical_stage(cfg, student_stages):
    """The 1-based stage the auxiliary head sits on: skeptical_stage, or 0 for the last intermediate stage."""
    return cfg["skeptical_stage"] or student_stages - 1


@register
class Skeptical(Attack):
    """The Skeptical student (Kundu et al., NeurIPS'21), METHOD.md section 7: the teacher's soft targets go into
    an auxiliary head on an intermediate stage, never into the final head, and only after kd_delay epochs of
    labels alone; the final head learns from the labels and, by self-distillation, from the auxiliary head;
    the final head alone is evaluated.

        L = CE(z_f, y) + w [ on · alpha tau^2 KL(p_t^tau || p_a^tau) + (1 - alpha + c) CE(z_a, y)
                             + s tau^2 KL(sg(p_a^tau) || p_f^tau) ]

    on = 1 from kd_delay epochs on (0 before), w = skeptical_weight, c = skeptical_aux_ce,
    s = skeptical_sd, sg = no gradient. w = 0 leaves CE on the final head alone.
    """
    name, label = "skeptical", "Skeptical student"
    keys = {"alpha": 0.9, "kd_delay": 20.0, "skeptical_weight": 1.0, "skeptical_sd": 0.3,
            "skeptical_aux_ce": 0.7, "skeptical_stage": 0}

    def __init__(self, cfg, num_classes):
        super().__init__(cfg, num_classes)
        self.head = None
        self.stage = None

    @classmethod
    def check(cls, cfg, source):
        _check_alpha(cfg, source)
        for key in ("kd_delay", "skeptical_weight", "skeptical_sd", "skeptical_aux_ce", "skeptical_stage"):
            if cfg[key] < 0:
                raise UserError(f"{source}: '{key}' must be >= 0, got {cfg[key]}")
        if cfg.get("attack") != cls.name:
            return
        import models
        try:
            n = len(models.stages(models.build(cfg["model"], 2)))
        except ValueError:
            raise UserError(f"{source}: the Skeptical student needs a student whose stages are known (models.stages); "
                            f"'{cfg['model']}' is not one of them") from None
        if cfg["skeptical_stage"] >= n:
            raise UserError(f"{source}: 'skeptical_stage' must be below {n} (the stages of {cfg['model']}; the last "
                            f"feeds the final head) or 0 for stage {n - 1}; got {cfg['skeptical_stage']}")

    @classmethod
    def as_used(cls, cfg):
        used = kd_delay_epochs(cfg)
        if used == cfg["kd_delay"]:
            return {}
        return {"kd_delay": used, "_why": f"kd_delay is capped at a quarter of the {cfg['epochs']} epochs"}

    def attach(self, student):
        import models
        from .constants import DATASETS
        self.stage = skeptical_stage(self.cfg, len(models.stages(student)))
        self.head = AuxHead(student, self.stage, self.num_classes, DATASETS[self.cfg["dataset"]].image_size,
                            self.cfg["seed"])

    def parts(self):
        if self.head is None:
            raise RuntimeError("Skeptical.attach(student) must come before parts()")
        c = self.cfg
        return {"skeptical": Part(self.head, {"optimizer": c["optimizer"], "lr": c["lr"], "momentum": c["momentum"],
                                              "nesterov": c["nesterov"], "weight_decay": c["weight_decay"]})}

    def loss(self, student_logits, view, labels, progress, parts):
        return skeptical_loss(student_logits, parts["skeptical"](), view, labels, self.tau, self.cfg,
                              progress >= kd_delay_epochs(self.cfg))

    def metrics(self):
        c = self.cfg
        return {"alpha": c["alpha"], "kd_delay_epochs": kd_delay_epochs(c), "skeptical_weight": c["skeptical_weight"],
                "skeptical_sd": c["skeptical_sd"], "skeptical_aux_ce": c["skeptical_aux_ce"],
                "skeptical_stage": self.stage, "skeptical_tap": self.head.tap if self.head else None}


def skeptical_loss(final_logits, aux_logits, view, labels, tau, cfg, kd_on):
    """The Skeptical student's terms (see Skeptical), each weighted as it enters the sum:
    ce (final head, labels), aux_kd (teacher into the auxiliary head; 0 before the delay), aux_ce (labels into
    the auxiliary head), sd (auxiliary head into the final head, no gradient into the auxiliary head)."""
    w, alpha = cfg["skeptical_weight"], cfg["alpha"]
    z_f, z_a = final_logits.float(), aux_logits.float()
    zero = z_f.sum() * 0
    terms = {"ce": F.cross_entropy(z_f, labels)}
    if w and kd_on:
        log_p_t = F.log_softmax(view.float() / tau, dim=1)
        terms["aux_kd"] = w * alpha * tau * tau * kl_divergence(log_p_t, F.log_softmax(z_a / tau, dim=1))
    else:
        terms["aux_kd"] = zero
    ce_weight = w * (1.0 - alpha + cfg["skeptical_aux_ce"])
    terms["aux_ce"] = ce_weight * F.cross_entropy(z_a, labels) if ce_weight else zero
    if w and cfg["skeptical_sd"]:
        log_p_a = F.log_softmax(z_a.detach() / tau, dim=1)
        terms["sd"] = w * cfg["skeptical_sd"] * tau * tau * kl_divergence(log_p_a, F.log_softmax(z_f / tau, dim=1))
    else:
        terms["sd"] = zero
    return terms
