"""What a thief does around its attack: load the teacher it attacks, lay out a sweep of tau (and alpha), reuse the
finished runs of a sweep, and run at the tau a sweep picked on its own held-out images (tau_from). train_kd.py runs
the attack and the sweep with these."""
import hashlib
import json
import os

from .checkpoint import input_record, read_json
from .config import ADDED_KEYS, changed_result_key, checkpoint_options
from .constants import DATASETS
from .defences import build_from_checkpoint
from .errors import UserError

SWEEP_PROTOCOL = ("best_tau is picked on the test split: the thief's most favourable temperature, so "
                  "best_acc is an upper bound on what this attack steals")
VAL_PROTOCOL = ("best_tau (and best_alpha) are picked on the thief's validation split, held out of its own training "
                "images (val_acc); best_acc is the test accuracy of the run picked there, what a thief tuning "
                "itself gets")


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
    key = changed_result_key(old, sub_cfg)
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
    with open(path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    cfg = dict(cfg, tau=float(summary["best_tau"]))
    if isinstance(summary.get("best_alpha"), (int, float)):
        cfg["alpha"] = float(summary["best_alpha"])
    record = {"path": folder, "sweep_sha256": digest, "attack": summary.get("attack"), "tau": cfg["tau"],
              "alpha": summary.get("best_alpha"), "val_images": summary.get("val_images")}
    return cfg, record
