"""Steal a frozen teacher into a student by knowledge distillation: vanilla KD and the adaptive attacks.

    python train_kd.py --save_path exps/mini/kd_cnn_original [--attack rereverse --tau 1 ...]
    python train_kd.py --save_path exps/mini/kd_cnn_rml_tau_sweep --tau_sweep 1,4,10,20

Attacks (METHOD.md section 4): vanilla (Hinton KD); rereverse (the teacher's non-target logits are reversed
again, around its own argmax or the label, before KD); dkd (decoupled KD, non-target part weighted by
dkd_beta); tckd (dkd with dkd_beta = 0: only the target-vs-rest binary part is distilled).
With tau_sweep the attack runs once per tau into SAVE_PATH/tau_<tau>/ and SAVE_PATH/sweep.json names the best.
"""
import json
import os
import sys

import torch

import models
from utils.checkpoint import atomic_write_json, build_from_checkpoint, input_record
from utils.config import NON_RESULT_KEYS, TRAIN_DEFAULTS, parse_config, resolve_config, write_config
from utils.constants import DATASETS
from utils.engine import Engine, Task
from utils.errors import UserError, cli_main
from utils.losses import dkd_loss, kd_loss, reverse_logits

ATTACKS = ("vanilla", "rereverse", "dkd", "tckd")
REREVERSE_TARGETS = ("argmax", "label")

DEFAULTS = dict(TRAIN_DEFAULTS, teacher="", tau=4.0, alpha=0.9, attack="vanilla", rereverse_target="argmax",
                dkd_alpha=1.0, dkd_beta=8.0, dkd_warmup=20, tau_sweep=[])


SWEEP_PROTOCOL = ("best_tau is picked on the test split: the thief's most favourable temperature, so "
                  "best_acc is an upper bound on what this attack steals")


def check_kd_config(cfg, source):
    """The KD keys train_scratch's checks do not cover; raised before anything is written."""
    if cfg["attack"] not in ATTACKS:
        raise UserError(f"{source}: 'attack' must be one of {', '.join(ATTACKS)}, got '{cfg['attack']}'")
    if cfg["rereverse_target"] not in REREVERSE_TARGETS:
        raise UserError(f"{source}: 'rereverse_target' must be one of {', '.join(REREVERSE_TARGETS)}, "
                        f"got '{cfg['rereverse_target']}'")
    if not cfg["tau"] > 0:
        raise UserError(f"{source}: 'tau' must be > 0, got {cfg['tau']}")
    if not 0 <= cfg["alpha"] <= 1:
        raise UserError(f"{source}: 'alpha' must be in [0, 1], got {cfg['alpha']}")
    for key in ("dkd_alpha", "dkd_beta", "dkd_warmup"):
        if cfg[key] < 0:
            raise UserError(f"{source}: '{key}' must be >= 0, got {cfg[key]}")
    if cfg["label_smoothing"]:
        raise UserError(f"{source}: 'label_smoothing' is not used by train_kd.py; remove it (the label-smoothing "
                        f"student is trained by train_scratch.py)")
    for tau in cfg["tau_sweep"]:
        if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not tau > 0:
            raise UserError(f"{source}: 'tau_sweep' must be a list of temperatures > 0, e.g. 1,4,10,20; "
                            f"got {json.dumps(cfg['tau_sweep'])}")


def dkd_warmup_epochs(cfg):
    """Epochs over which DKD's KD weights ramp linearly from 0 to 1.

    DKD warms up over 20 of its 240 epochs; a short run caps the ramp at a quarter of its epochs, so a
    10-epoch CPU run ramps over 2.5 epochs instead of never reaching full weight.
    """
    return min(float(cfg["dkd_warmup"]), cfg["epochs"] / 4)


def warmup_factor(progress, warmup_epochs):
    """min(1, progress / warmup_epochs), progress in epochs (a float that grows every step)."""
    return 1.0 if warmup_epochs <= 0 else min(1.0, progress / warmup_epochs)


class KDTask(Task):
    """Student trained on the teacher's logits for the same augmented batch; the teacher never changes."""

    def __init__(self, student, teacher, cfg, teacher_arch=None, teacher_acc=None):
        self.model, self.teacher = student, teacher
        self.attack, self.tau, self.alpha = cfg["attack"], cfg["tau"], cfg["alpha"]
        self.rereverse_target = cfg["rereverse_target"]
        self.dkd_alpha = cfg["dkd_alpha"]
        self.dkd_beta = 0.0 if self.attack == "tckd" else cfg["dkd_beta"]
        self.warmup_epochs = dkd_warmup_epochs(cfg)
        self.teacher_path, self.teacher_arch, self.teacher_acc = cfg["teacher"], teacher_arch, teacher_acc
        self.engine = None

    def setup(self, engine):
        self.engine = engine
        self.teacher = engine.prepare_frozen(self.teacher)

    @torch.no_grad()
    def teacher_logits(self, x, y):
        t = self.teacher(x)
        if self.attack == "rereverse":
            t = reverse_logits(t, t.argmax(1) if self.rereverse_target == "argmax" else y)
        return t

    def loss(self, batch):
        x, y = batch
        t = self.teacher_logits(x, y)
        s = self.train_model(x)
        if self.attack in ("dkd", "tckd"):
            w = warmup_factor(self.engine.progress, self.warmup_epochs)  # (epoch, step): exact after --resume
            terms = dkd_loss(s, t, y, self.tau, self.dkd_alpha, self.dkd_beta, warmup=w)
            if self.attack == "tckd":
                del terms["nckd"]  # always 0: not worth a log column
        else:
            terms = kd_loss(s, t, y, self.tau, self.alpha)
        return terms, s, y

    def metrics(self):
        m = {"attack": self.attack, "tau": self.tau, "teacher": self.teacher_path,
             "teacher_arch": self.teacher_arch, "teacher_acc": self.teacher_acc}
        if self.attack in ("dkd", "tckd"):
            m.update(dkd_alpha=self.dkd_alpha, dkd_beta=self.dkd_beta, dkd_warmup_epochs=self.warmup_epochs)
        else:
            m["alpha"] = self.alpha
        if self.attack == "rereverse":
            m["rereverse_target"] = self.rereverse_target
        return m


def load_teacher(cfg):
    """The teacher rebuilt from its checkpoint; exit-2 errors for a missing, corrupt or mismatched file."""
    return build_from_checkpoint(cfg["teacher"], "teacher", dataset=cfg["dataset"],
                                 num_classes=DATASETS[cfg["dataset"]].num_classes)


def train(cfg, save_path, resume=False):
    """One attack run into save_path; returns its metrics."""
    engine = Engine(cfg, save_path, "train_kd.py", resume=resume)
    teacher, ckpt = load_teacher(cfg)
    engine.add_input("teacher", cfg["teacher"], ckpt)
    teacher = engine.prepare_frozen(teacher)
    engine.load_data()
    if engine.is_main:
        write_config(save_path, cfg)
    student = models.build(cfg["model"], engine.info.num_classes)
    teacher_acc, _ = engine.evaluate(teacher, diagnostics=False)
    engine.log(f"teacher {cfg['teacher']} ({ckpt['arch']}): test acc {teacher_acc:.2f}; attack {cfg['attack']}, "
               f"tau {cfg['tau']:g}")
    return engine.fit(KDTask(student, teacher, cfg, ckpt["arch"], teacher_acc))


def _tau_name(tau):
    return f"{tau:g}"


def _read_done(path, sub_cfg, teacher):
    """(metrics of a finished tau run made with this config and teacher or None, why an existing one is not
    reused); teacher: the input record (path, weights digest) of the teacher the sweep loads now."""
    metrics_path = os.path.join(path, "metrics.json")
    if not os.path.isfile(metrics_path):
        return None, None
    try:
        with open(metrics_path) as f:
            done = json.load(f)
    except (OSError, ValueError):
        done = None
    if not (isinstance(done, dict) and isinstance(done.get("config"), dict)
            and isinstance(done.get("final_acc"), (int, float))):
        return None, f"{metrics_path} is unreadable or incomplete"
    old = done["config"]
    for key in sorted(set(old) | set(sub_cfg)):
        if key not in NON_RESULT_KEYS and old.get(key) != sub_cfg.get(key):
            return None, (f"{metrics_path} was made with {key}={old.get(key)!r}, "
                          f"this sweep has {key}={sub_cfg.get(key)!r}")
    used = done.get("inputs", {}).get("teacher", {}).get("weights_sha256")
    if used != teacher["weights_sha256"]:
        return None, (f"{metrics_path} was distilled from teacher weights {(used or 'unrecorded')[:12]}, "
                      f"the teacher now has {teacher['weights_sha256'][:12]}")
    return done, None


def sweep(cfg, save_path, resume=False):
    """Run the attack once per tau (in-process, one engine each) and record the best in sweep.json."""
    taus = []
    for tau in cfg["tau_sweep"]:
        if float(tau) not in taus:
            taus.append(float(tau))
    _, ckpt = load_teacher(cfg)  # a bad teacher stops the sweep before any folder is made
    teacher = input_record(cfg["teacher"], ckpt)
    plan = []
    for tau in taus:
        sub = os.path.join(save_path, f"tau_{_tau_name(tau)}")
        sub_cfg = dict(cfg, tau=tau, tau_sweep=[])
        plan.append((tau, sub, sub_cfg) + _read_done(sub, sub_cfg, teacher))
    is_main = int(os.environ.get("RANK", 0)) == 0
    if is_main:
        write_config(save_path, cfg)
        summary_path = os.path.join(save_path, "sweep.json")
        if os.path.isfile(summary_path) and any(p[3] is None for p in plan):
            os.remove(summary_path)  # stale until every tau is done: a half-run sweep must not look finished
    results = {}
    for tau, sub, sub_cfg, done, stale in plan:
        if done is None:
            if is_main:
                if stale:
                    print(f"tau {_tau_name(tau)}: {stale}; running it again", flush=True)
                os.makedirs(sub, exist_ok=True)
                atomic_write_json(os.path.join(sub, "params.json"),
                                  dict(sub_cfg, _comment=f"tau {_tau_name(tau)} of the sweep in {save_path}"))
            done = train(sub_cfg, sub, resume=resume and os.path.isfile(os.path.join(sub, "last.pth")))
        elif is_main:
            print(f"tau {_tau_name(tau)}: {sub}/metrics.json exists, skipped", flush=True)
        results[tau] = done
    best = max(results, key=lambda t: results[t]["final_acc"])
    summary = {
        "final_acc": {_tau_name(t): m["final_acc"] for t, m in results.items()},
        "best_acc_per_tau": {_tau_name(t): m["best_acc"] for t, m in results.items()},
        "runs": {_tau_name(t): os.path.basename(sub) for t, sub, *_ in plan},
        "best_tau": best, "best_acc": results[best]["final_acc"],
        "attack": cfg["attack"], "model": cfg["model"], "teacher": cfg["teacher"],
        "teacher_acc": results[best].get("teacher_acc"), "protocol": SWEEP_PROTOCOL,
        "inputs": {"teacher": teacher}, "config": cfg,
    }
    if is_main:
        atomic_write_json(os.path.join(save_path, "sweep.json"), summary)
        print(f"\n{'tau':>8}  final_acc")
        for t, m in results.items():
            print(f"{_tau_name(t):>8}  {m['final_acc']:9.2f}{'  <- best' if t == best else ''}")
        print(f"best tau {_tau_name(best)}: final test acc {summary['best_acc']:.2f} ({cfg['attack']} KD of "
              f"{cfg['model']} from {cfg['teacher']}); {os.path.join(save_path, 'sweep.json')}", flush=True)
    return summary


@cli_main
def main(argv=None):
    args, _ = parse_config(__doc__.splitlines()[0], DEFAULTS, argv)
    cfg = resolve_config(args, DEFAULTS)
    check_kd_config(cfg, os.path.join(args.save_path, "params.json"))
    if cfg["tau_sweep"]:
        sweep(cfg, args.save_path, args.resume)
    else:
        train(cfg, args.save_path, args.resume)
    return 0


if __name__ == "__main__":
    sys.exit(main())
