"""The state of a step's folder against the params it should run with and the teachers it loads: done, stale,
resume or new (step_state); writing a step's params.json; and the epoch times --cost takes from a file or from
the finished runs of a folder (epoch_times_of)."""
import json
import os

from utils.checkpoint import (WEIGHTS_FILE, atomic_write_json, checkpoint_digest, file_sha256, load_checkpoint,
                              read_json)
from utils.config import changed_result_key
from utils.cost import epoch_times_from_runs, load_epoch_times
from utils.defences import key_problem
from utils.errors import UserError
from utils.thief import SINGLE_RUN_FILES, SWEEP_ONLY_KEYS, grid

from .presets import CHECKPOINT_KEYS


def same_config(recorded, params):
    """Same config, checkpoint paths aside: which teacher a run used is checked by its weights digest
    (step_state), so a preset folder that moved (a clone, another --exp_root) still matches."""
    return changed_result_key(recorded, params, keys=params, ignore=CHECKPOINT_KEYS) is None


def finished_record(folder, params):
    """What a finished run of this folder recorded: {config, inputs, weights_sha256}, or None.

    A tau sweep's record is its sweep.json (with the config.json beside it for sweeps written before
    sweep.json carried its config); a single run's is its metrics.json.
    """
    if params.get("tau_sweep"):
        sweep = read_json(os.path.join(folder, "sweep.json"))
        if not isinstance(sweep, dict):
            return None
        config = sweep.get("config") or read_json(os.path.join(folder, "config.json")) or {}
        return {"config": config, "inputs": sweep.get("inputs"), "weights_sha256": None, "runs": sweep.get("runs")}
    metrics = read_json(os.path.join(folder, "metrics.json"))
    if not isinstance(metrics, dict):
        return None
    return {"config": metrics.get("config", {}), "inputs": metrics.get("inputs"),
            "weights_sha256": metrics.get("weights_sha256")}


def read_checkpoint(path):
    """A checkpoint file's content, or None when there is no readable one."""
    if not os.path.isfile(path):
        return None
    try:
        return load_checkpoint(path)
    except UserError:
        return None


def weights_digest(path):
    """The weights digest of a checkpoint file, or None when there is no readable one."""
    ckpt = read_checkpoint(path)
    return None if ckpt is None else checkpoint_digest(ckpt)


def input_mismatch(inputs, deps):
    """Why a run's recorded inputs do not match its teachers as they are now (None when they all match).

    deps: {key: (teacher step, its weights digest now, or None when that step is to be trained again)}.
    """
    for key, (dep, digest) in sorted(deps.items()):
        if digest is None:
            return f"its {key} ({dep}) is to be trained again"
        used = (inputs or {}).get(key, {}).get("weights_sha256")
        if used is None:
            return f"it has no record of its {key}'s weights (a run from before provenance was recorded)"
        if used != digest:
            return f"it was trained from {key} weights {used[:12]}, {dep} now has {digest[:12]}"
    return None


def picked_runs_changed(folder, rec, params):
    """Why a sweep that picked among another sweep's runs (runs_from) must pick again: one of those runs'
    metrics.json is gone or is not the file it picked from (None when every one is, or without runs_from).
    rec: the sweep's finished_record."""
    if not params.get("runs_from"):
        return None
    recorded = (rec["inputs"] or {}).get("runs")
    runs = rec.get("runs") or {}
    if not recorded:
        return "it has no record of the runs it picked among"
    for name, digest in sorted(recorded.items()):
        path = os.path.join(folder, runs.get(name, ""), "metrics.json")
        now = file_sha256(path)
        if now != digest:
            return f"{path}, a run it picked among, " + ("is gone" if now is None else "changed since it picked")
    return None


def step_state(folder, params, deps=None, weights_needed=False):
    """(state, reason) of a step folder for the params it should run with and the teachers it loads.

    'done': a finished run with this config, trained from these very teachers (and, when later steps load
    this step, with its weights file present and matching what its metrics.json recorded);
    'stale': a finished run with this config whose teacher has changed or is to be trained again;
    'resume': an unfinished run (last.pth) of this config and these teachers; 'new': anything else.
    Stale and new steps are trained from the start; reason says why a step is not done.
    """
    deps = deps or {}
    rec = finished_record(folder, params)
    reason = None
    if rec is not None and same_config(rec["config"], params):
        reason = input_mismatch(rec["inputs"], deps) or picked_runs_changed(folder, rec, params)
        if reason is not None:
            return "stale", reason
        if not weights_needed:
            return "done", None
        weights = os.path.join(folder, WEIGHTS_FILE)
        ckpt = read_checkpoint(weights)
        digest = None if ckpt is None else checkpoint_digest(ckpt)
        if digest is not None and digest == rec["weights_sha256"]:
            problem = key_problem(folder, ckpt.get("defence") or {})
            if problem is None:
                return "done", None
            return "stale", f"{weights} is a keyed teacher and {problem}; it is made again with a new key"
        reason = (f"{weights} is missing" if digest is None else
                  f"{weights} ({digest[:12]}) is not the file its metrics.json recorded "
                  f"({(rec['weights_sha256'] or 'none')[:12]})")
    lasts = [os.path.join(folder, "last.pth")] + [os.path.join(folder, d, "last.pth") for d in subdirs(folder)]
    lasts = [p for p in lasts if os.path.isfile(p)]
    config = read_json(os.path.join(folder, "config.json"))
    if lasts and isinstance(config, dict) and same_config(config, params):
        for last in lasts:
            try:
                inputs = load_checkpoint(last).get("inputs")
            except UserError:
                continue
            why = input_mismatch(inputs, deps)
            if why is not None:
                return "new", f"its unfinished run cannot resume: {why}"
        return "resume", reason
    if (params.get("tau_sweep") or params.get("alpha_sweep")) and not params.get("runs_from"):
        finished = split_sweep_runs(folder, params, deps)
        # a single run's files there make the sweep refuse to start without --overwrite: that step is new
        if finished and not any(os.path.isfile(os.path.join(folder, n)) for n in SINGLE_RUN_FILES):
            return "resume", (f"{finished} of its runs are finished in its tau_*/ folders (a sweep split into "
                              f"lone runs): the sweep reuses them, trains the rest and picks")
    return "new", reason


def split_sweep_runs(folder, params, deps):
    """How many of a sweep's runs are finished in folder/tau_<tau>[_alpha_<alpha>]/ with this step's config and
    teachers: runs trained there one by one, side by side (train_kd.py --save_path folder/tau_<tau>), which the
    sweep reuses (utils/thief.read_done makes the final check), so the step resumes instead of training them again.
    """
    swept = {k for k in ("tau", "alpha") if params.get(f"{k}_sweep")}
    lone = dict(params, tau_sweep=[], alpha_sweep=[])
    keys = set(params) - swept
    count = 0
    for name in subdirs(folder):
        metrics = read_json(os.path.join(folder, name, "metrics.json"))
        if not (isinstance(metrics, dict) and isinstance(metrics.get("config"), dict)
                and isinstance(metrics.get("final_acc"), (int, float))):
            continue
        config = metrics["config"]
        tau, alpha = config.get("tau"), config.get("alpha")
        if not (isinstance(tau, (int, float)) and isinstance(alpha, (int, float))):
            continue
        # one of the sweep's runs, in the folder the sweep gives it (a key the sweep does not vary is compared below)
        runs = grid({"tau_sweep": params.get("tau_sweep") or [], "alpha_sweep": params.get("alpha_sweep") or [],
                     "tau": tau, "alpha": alpha})
        if (name, float(tau), float(alpha)) not in {(sub, t, a) for _, sub, t, a in runs}:
            continue
        if changed_result_key(config, lone, keys=keys, ignore=CHECKPOINT_KEYS + SWEEP_ONLY_KEYS) is not None:
            continue
        if input_mismatch(metrics.get("inputs"), deps or {}) is not None:
            continue
        count += 1
    return count


def subdirs(folder):
    return [d for d in os.listdir(folder) if os.path.isdir(os.path.join(folder, d))] if os.path.isdir(folder) else []


def write_params(folder, params, comment=None, script=None):
    """Write params.json unless it already holds these params (comments and data paths aside); _script
    names the script the folder belongs to."""
    path = os.path.join(folder, "params.json")
    if os.path.isfile(path):
        with open(path) as f:
            try:
                old = json.load(f)
            except json.JSONDecodeError:
                old = None
        if isinstance(old, dict) and changed_result_key(old, params) is None:
            return
    os.makedirs(folder, exist_ok=True)
    extra = {k: v for k, v in (("_comment", comment), ("_script", script)) if v}
    atomic_write_json(path, dict(params, **extra))


def epoch_times_of(path):
    """The epoch times reproduce.py --cost PATH projects with: an epoch times file's (utils.cost.load_epoch_times),
    or those of the finished lone runs in the run folders directly under a folder (utils.cost.epoch_times_from_runs;
    a missing or unreadable metrics.json is no run)."""
    if not os.path.isdir(path):
        return load_epoch_times(path)
    runs = [read_json(os.path.join(path, name, "metrics.json")) for name in sorted(os.listdir(path))]
    return epoch_times_from_runs([m for m in runs if isinstance(m, dict)], path)
