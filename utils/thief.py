"""What a thief does around its attack: load the teacher it attacks, lay out a sweep of tau (and alpha), reuse the
finished runs of a sweep, and run at the tau a sweep picked on its own held-out images (tau_from). train_kd.py runs
the attack and the sweep with these."""
import contextlib
import json
import os

import torch
import torch.nn.functional as F

from .checkpoint import (WEIGHTS_FILE, checkpoint_digest, file_sha256, freeze, input_record, read_json,
                         rebuild_model)
from .config import ADDED_KEYS, changed_result_key, checkpoint_options, thief_has_labels
from .data import build_loaders
from .constants import DATASETS
from .defences import build_from_checkpoint
from .errors import UserError

SWEEP_PROTOCOL = ("best_tau is picked on the test split: the thief's most favourable temperature, so "
                  "best_acc is an upper bound on what this attack steals")
VAL_PROTOCOL = ("best_tau (and best_alpha) are picked on the thief's validation split, held out of its own training "
                "images, by selected_by (val_acc: the highest top-1; val_nll: the lowest cross-entropy); best_acc is "
                "the test accuracy of the run picked there, what a thief tuning itself gets")

# How a sweep with a validation split picks its run: the score each run records there, and whether the best is
# its highest or its lowest. val_acc counts the images right (100 images move it a point each); val_nll is the mean
# cross-entropy of the student's softmax, which also weighs how sure it is, right or wrong.
SELECT_BY = {"val_acc": max, "val_nll": min}


def load_teacher(cfg):
    """The teacher rebuilt from its checkpoint; exit-2 errors for a missing, corrupt or mismatched file."""
    return build_from_checkpoint(cfg["teacher"], "teacher", dataset=cfg["dataset"],
                                 num_classes=DATASETS[cfg["dataset"]].num_classes, **checkpoint_options(cfg, "teacher"))


def tau_name(tau):
    return f"{tau:g}"


def read_done(path, sub_cfg, teacher):
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
    old = dict({k: v for k, v in ADDED_KEYS.items() if k in sub_cfg}, **done["config"])
    # a lone run of this config trained into the folder (a sweep split over several processes) records the
    # sweep-only keys at their defaults, which a lone run never reads: it is the same run
    key = changed_result_key(old, sub_cfg, ignore=SWEEP_ONLY_KEYS)
    if key is not None:
        return None, (f"{metrics_path} was made with {key}={old.get(key)!r}, "
                      f"this sweep has {key}={sub_cfg.get(key)!r}")
    used = done.get("inputs", {}).get("teacher", {}).get("weights_sha256")
    if used != teacher["weights_sha256"]:
        return None, (f"{metrics_path} was distilled from teacher weights {(used or 'unrecorded')[:12]}, "
                      f"the teacher now has {teacher['weights_sha256'][:12]}")
    return done, None





def grid(cfg):
    """[(run name, folder name, tau, alpha)] of a sweep: every tau of tau_sweep (or the run's tau) with every
    alpha of alpha_sweep (or the run's alpha). Without alpha_sweep a run is named by its tau and lives in
    tau_<tau>/; with it, <tau>/<alpha> in tau_<tau>_alpha_<alpha>/."""
    def unique(values):
        out = []
        for v in values:
            if float(v) not in out:
                out.append(float(v))
        return out
    taus, alphas = unique(cfg["tau_sweep"] or [cfg["tau"]]), unique(cfg["alpha_sweep"] or [cfg["alpha"]])
    if not cfg["alpha_sweep"]:
        return [(tau_name(t), f"tau_{tau_name(t)}", t, cfg["alpha"]) for t in taus]
    return [(f"{tau_name(t)}/{a:g}", f"tau_{tau_name(t)}_alpha_{a:g}", t, a) for t in taus for a in alphas]


# The files of a single run: a sweep's folder holding one is refused (or cleared with --overwrite), not resumed.
SINGLE_RUN_FILES = ("metrics.json", WEIGHTS_FILE, "last.pth", "best.pth", "log.csv")


# A sweep's keys that are not its runs': a run is the same whichever way the sweep picks among them and wherever
# the sweep reads them from (runs_from), so one set of runs serves every pick.
SWEEP_ONLY_KEYS = ("select_by", "runs_from")


def sweep_runs(cfg, save_path, teacher, overwrite=False):
    """[(run name, what, folder, run config, metrics of its finished run or None, why not reused)] of a sweep.
    A sweep with runs_from picks among the finished runs of the sweep in that folder and trains nothing: a run
    missing there, or made with another config or teacher, is refused with one line before anything is written.
    Without it the runs live in save_path and --overwrite trains every one again."""
    if cfg["runs_from"] and os.path.realpath(cfg["runs_from"]) == os.path.realpath(save_path):
        raise UserError(f"runs_from {cfg['runs_from']} is this sweep's own folder; leave runs_from empty to pick "
                        f"among the runs here")
    root = cfg["runs_from"] or save_path
    plan = []
    for name, folder, tau, alpha in grid(cfg):
        sub = os.path.join(root, folder)
        sub_cfg = {k: v for k, v in dict(cfg, tau=tau, alpha=alpha, tau_sweep=[], alpha_sweep=[]).items()
                   if k not in SWEEP_ONLY_KEYS}
        what = f"tau {tau_name(tau)}" + (f", alpha {alpha:g}" if cfg["alpha_sweep"] else "")
        done, why = (None, None) if overwrite and not cfg["runs_from"] else read_done(sub, sub_cfg, teacher)
        if cfg["runs_from"] and done is None:
            raise UserError(f"runs_from {root}: {what} is not a finished run of this sweep there ("
                            f"{why or f'no {sub}/metrics.json'}); run that sweep first (python train_kd.py "
                            f"--save_path {root}) or leave runs_from empty to train the runs in this folder")
        plan.append((name, what, sub, sub_cfg, done, why))
    return plan


# What a sweep and a run that takes its pick (tau_from) must share: the thief's images, labels and validation split
# (the pick was made on them), and the teacher (checked by its weights digest).
THIEF_KEYS = ("dataset", "subset", "subset_seed", "labels", "transfer", "val_split", "test_subset")


def tuned(cfg, source):
    """(cfg with the tau, and the alpha where the sweep chose one, that the sweep `tau_from` picked on the thief's
    validation split; the record metrics.json keeps of it), or (cfg, None) without tau_from. Refused with one
    line: no finished sweep there, a pick made on the test split, another thief's images or another teacher."""
    folder = cfg["tau_from"]
    if not folder:
        return cfg, None
    path = folder if folder.endswith(".json") else os.path.join(folder, "sweep.json")
    summary = read_json(path)
    if not isinstance(summary, dict) or not isinstance(summary.get("best_tau"), (int, float)):
        raise UserError(f"{source}: tau_from {folder} holds no finished sweep ({path} is missing or unreadable); run "
                        f"the sweep first, e.g. python train_kd.py --save_path {folder} --tau_sweep 1,4,10,20 "
                        f"--val_split 500")
    if summary.get("selected_on") != "val":
        raise UserError(f"{source}: the sweep in {folder} picked its tau on the test split, which a thief never sees; "
                        f"run it with val_split N (images held out of the thief's own) and take tau from that one")
    theirs = dict({k: v for k, v in ADDED_KEYS.items() if k in THIEF_KEYS}, **(summary.get("config") or {}))
    for key in THIEF_KEYS:
        if theirs.get(key) != cfg.get(key):
            raise UserError(f"{source}: the sweep in {folder} was made with {key}={theirs.get(key)!r}, this run has "
                            f"{key}={cfg.get(key)!r}; a thief tunes on the images it trains on: give both the same "
                            f"{key}")
    _, ckpt = load_teacher(cfg)
    used = (summary.get("inputs") or {}).get("teacher", {}).get("weights_sha256")
    now = input_record(cfg["teacher"], ckpt)["weights_sha256"]
    if used != now:
        raise UserError(f"{source}: the sweep in {folder} tuned against teacher weights {(used or 'unrecorded')[:12]}, "
                        f"this run's teacher has {now[:12]}; tune against the teacher you attack")
    digest = file_sha256(path)
    cfg = dict(cfg, tau=float(summary["best_tau"]))
    if isinstance(summary.get("best_alpha"), (int, float)):
        cfg["alpha"] = float(summary["best_alpha"])
    record = {"path": folder, "sweep_sha256": digest, "attack": summary.get("attack"), "tau": cfg["tau"],
              "alpha": summary.get("best_alpha"), "val_images": summary.get("val_images"),
              "selected_by": summary.get("selected_by", "val_acc")}
    return cfg, record


def check_sweep_keys(cfg, source):
    """The keys of a sweep and of the thief's own model selection (tau_sweep, alpha_sweep, val_split, select_by,
    runs_from, tau_from); raised before anything is written."""
    for tau in cfg["tau_sweep"]:
        if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not tau > 0:
            raise UserError(f"{source}: 'tau_sweep' must be a list of temperatures > 0, e.g. 1,4,10,20; "
                            f"got {json.dumps(cfg['tau_sweep'])}")
    for alpha in cfg["alpha_sweep"]:
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 <= alpha <= 1:
            raise UserError(f"{source}: 'alpha_sweep' must be a list of KD weights in [0, 1], e.g. 0.5,0.9; "
                            f"got {json.dumps(cfg['alpha_sweep'])}")
    if cfg["val_split"] < 0:
        raise UserError(f"{source}: 'val_split' must be >= 0 (images held out of the thief's training images; 0: "
                        f"none), got {cfg['val_split']}")
    if cfg["select_by"] not in SELECT_BY:
        raise UserError(f"{source}: 'select_by' must be one of {', '.join(SELECT_BY)}, got {cfg['select_by']!r}")
    if cfg["select_by"] != "val_acc" and not (cfg["val_split"] > 0 and (cfg["tau_sweep"] or cfg["alpha_sweep"])):
        raise UserError(f"{source}: select_by {cfg['select_by']} picks among a sweep's runs on the thief's validation "
                        f"split; give tau_sweep (or alpha_sweep) and val_split > 0, or leave select_by at val_acc")
    if cfg["runs_from"] and not (cfg["tau_sweep"] or cfg["alpha_sweep"]):
        raise UserError(f"{source}: 'runs_from' makes a sweep pick among another sweep's runs; give the tau_sweep "
                        f"(and alpha_sweep) of the sweep in {cfg['runs_from']}, or leave runs_from empty")
    if cfg["tau_from"] and (cfg["tau_sweep"] or cfg["alpha_sweep"]):
        raise UserError(f"{source}: 'tau_from' runs at a finished sweep's pick, 'tau_sweep'/'alpha_sweep' make this a "
                        f"sweep itself; keep one of them")


@torch.no_grad()
def val_sums(model, loader, teacher, labels, autocast=contextlib.nullcontext):
    """[images right, summed cross-entropy (nats), images] of a model in eval mode on the thief's validation split,
    against the labels the thief holds (the teacher's argmax for a thief without labels): sums, so that the ranks
    of a DDP run add them up before val_scores divides."""
    sums = torch.zeros(3, device=next(model.parameters()).device)  # a DDP rank may hold none of the images
    for x, y in loader:
        with autocast():
            s = model(x)
            if not labels:
                y = teacher(x).argmax(1)
        s = s.float()
        sums += torch.stack([(s.argmax(1) == y).sum().float(), F.cross_entropy(s, y, reduction="sum"),
                             torch.tensor(float(len(y)), device=s.device)])
    return sums


def val_scores(sums):
    """{"val_acc": top-1 (%), "val_nll": mean cross-entropy} from val_sums."""
    right, nll, total = sums.tolist()
    return {"val_acc": 100.0 * right / total, "val_nll": nll / total}


def nll_from_weights(cfg, runs, teacher):
    """{folder: val_nll} of finished runs of a sweep that did not record val_nll (they finished before it was
    recorded), from their weights files, on the CPU in fp32, over the sweep's one validation split (its runs share
    the thief's images); runs: {folder: its metrics}; teacher: the thief's frozen view of it, which labels the split
    for a thief without labels. A run whose weights are gone, or are not the file its metrics.json recorded, is
    refused with one line, before any is scored."""
    loaded = {}
    for folder, metrics in runs.items():
        path = os.path.join(folder, WEIGHTS_FILE)
        if not os.path.isfile(path):
            raise UserError(f"{folder}/metrics.json records no val_nll (the run finished before it was recorded) and "
                            f"{path} is gone; train the sweep again with --overwrite, or pick with select_by val_acc")
        model, ckpt = rebuild_model(path, "student", dataset=cfg["dataset"])
        digest = checkpoint_digest(ckpt)
        if digest != metrics.get("weights_sha256"):
            raise UserError(f"{path} ({digest[:12]}) is not the weights file {folder}/metrics.json recorded "
                            f"({(metrics.get('weights_sha256') or 'none')[:12]}); put that run's own file there, "
                            f"or pick with select_by val_acc")
        loaded[folder] = model
    loader = build_loaders(dict(cfg, channels_last=False), "cpu")["val"]
    return {folder: val_scores(val_sums(freeze(model), loader, teacher, thief_has_labels(cfg)))["val_nll"]
            for folder, model in loaded.items()}
