"""Read a preset folder into one dict: every step's headline accuracy from its run folder (steps.json names the
steps), mean ± std over seeds, each row's provenance, and the verdict of every stolen student against its bar."""
import json
import os

from utils.checkpoint import file_sha256, read_json
from utils.errors import UserError
from utils.stats import mean_std, verdict

from .cells import precision
from .names import kd_arms
from .verdicts import bar_of, dfad_against_original, floor_of, frontier, paired_delta


def _sweep(folder):
    """The folder's sweep.json if it holds this run's result: its params ask for a tau sweep, or there is no
    single-run metrics.json (a sweep given on the command line). A sweep.json left over from an earlier
    config of the same folder is ignored."""
    params = read_json(os.path.join(folder, "params.json")) or {}
    if params.get("tau_sweep") or not os.path.isfile(os.path.join(folder, "metrics.json")):
        return read_json(os.path.join(folder, "sweep.json"))
    return None


def read_run(exp_root, name):
    """The headline of one step: final accuracy (at the thief's best tau for a sweep), its metrics, and its
    wall time in seconds (every temperature of a sweep; None if not recorded)."""
    folder = os.path.join(exp_root, name)
    sweep = _sweep(folder)
    if sweep:
        runs = {sub: read_json(os.path.join(folder, sub, "metrics.json")) or {} for sub in sweep["runs"].values()}
        metrics = runs[sweep["runs"][sweep.get("best_run") or _tau_key(sweep["best_tau"], sweep["runs"])]]
        out = {"acc": sweep["best_acc"], "tau": sweep["best_tau"], "per_tau": sweep["final_acc"],
               "metrics": metrics, "seconds": total_seconds(runs.values()), "inputs": _sweep_inputs(runs.values()),
               "digests": [file_sha256(os.path.join(folder, sub, "metrics.json")) for sub in runs]}
        if sweep.get("selected_on") == "val":  # the thief picked on its own held-out images
            out["chosen"] = _chosen(sweep, sweep.get("best_alpha"))
        return out
    metrics = read_json(os.path.join(folder, "metrics.json"))
    if metrics is None:
        return None
    out = {"acc": metrics["final_acc"], "tau": metrics.get("tau", metrics.get("config", {}).get("tau")),
           "metrics": metrics, "seconds": total_seconds([metrics]),
           "digests": [file_sha256(os.path.join(folder, "metrics.json"))]}
    tuned = metrics.get("tau_from")
    if tuned:  # a run at the tau (and alpha) a sweep of the thief picked on its own held-out images
        out["chosen"] = _chosen(tuned, tuned.get("alpha"))
    return out


def _chosen(record, alpha):
    """What the report says of a pick made on the thief's validation split (a sweep.json, or the tau_from record
    of a run at its pick): the α picked with τ, the images it was made on, and its rule where not top-1."""
    chosen = {"alpha": alpha, "val_images": record.get("val_images")}
    if record.get("selected_by", "val_acc") != "val_acc":
        chosen["by"] = record["selected_by"]
    return chosen


def _sweep_inputs(metrics_list):
    """The teacher a sweep's runs were distilled from, when every temperature used the same one (else None)."""
    digests = {json.dumps(m.get("inputs"), sort_keys=True) for m in metrics_list}
    return json.loads(digests.pop()) if len(digests) == 1 else None


def total_seconds(metrics_list):
    """Wall seconds of the runs; a student trained in a battery counts its share of the battery's time."""
    times = [m.get("wall_time_s") for m in metrics_list]
    if any(t is None for t in times):
        return None
    return round(sum(t / len(m.get("battery") or [None]) for t, m in zip(times, metrics_list)), 1)


def _tau_key(tau, runs):
    for key in runs:
        if float(key) == float(tau):
            return key
    raise KeyError(tau)


def read_manifest(exp_root):
    """(steps.json of a folder reproduce.py wrote, the folder of its teachers)."""
    manifest = read_json(os.path.join(exp_root, "steps.json"))
    if manifest is None:
        raise UserError(f"{exp_root}/steps.json not found; run reproduce.py first (it writes the manifest)")
    return manifest, os.path.normpath(os.path.join(exp_root, manifest.get("teachers_from", ".")))


def collect(exp_root):
    """The results of a preset folder written by reproduce.py: teachers, students (scratch, label smoothing and
    every attack x teacher), DFAD, the steps without results, wall times, provenance, verdicts and the frontier."""
    manifest, teachers_root = read_manifest(exp_root)
    res = {"preset": manifest["preset"], "teachers": {}, "students": {}, "dfad": {}, "missing": [], "compute": {},
           "runs": {}}
    if manifest.get("threat"):  # a threat model's students, against the teachers of another preset folder
        res["threat"] = manifest["threat"]
    seen = {}  # digest of a run's metrics.json -> the first step that holds it
    for step in manifest["steps"]:
        role = step["role"]
        run = read_run(teachers_root if role["kind"] == "teacher" else exp_root, step["name"])
        if run is None:
            res["missing"].append(step["name"])
            continue
        m = run["metrics"]
        ids = [d for d in run.get("digests") or [] if d]
        if ids and all(d in seen for d in ids):  # the runs of an earlier step (a sweep picked another way)
            res["compute"][step["name"]] = None
            res.setdefault("shared_runs", {})[step["name"]] = seen[ids[0]]
        else:
            res["compute"][step["name"]] = run["seconds"]
        for d in ids:
            seen.setdefault(d, step["name"])
        res["runs"][step["name"]] = {"role": role, "weights_sha256": m.get("weights_sha256"),
                                     "inputs": run.get("inputs", m.get("inputs")), "git_commit": m.get("git_commit"),
                                     "precision": precision(m)}
        if role["kind"] == "teacher":
            diag = m.get("final_diagnostics", {})
            res["teachers"][role["teacher"]] = {
                "acc": run["acc"], "best_acc": m.get("best_acc"), "ece": m.get("final_ece"),
                "kendall": diag.get("kendall"), "reversed_top1": diag.get("reversed_top1"),
                "nt_entropy": diag.get("nt_entropy"), "wall_time_s": m.get("wall_time_s"),
                "class_response": m.get("class_response"), "original_class_response": m.get("original_class_response"),
                "response_tau": m.get("response_tau"), "original_ece": m.get("original_ece"),
                "history": m.get("history", []), "folder": step["name"]}
        elif role["kind"] == "student":
            s = res["students"].setdefault(role["arch"], {"kd": {}})
            _add_seed(s, role["source"], role, run, step["name"], {"wall_time_s": m.get("wall_time_s")})
        elif role["kind"] == "kd":
            s = res["students"].setdefault(role["arch"], {"kd": {}})
            _add_seed(s["kd"].setdefault(role["teacher"], {}), role["attack"], role, run, step["name"],
                      dict({"tau": run["tau"], "per_tau": run.get("per_tau")},
                           **({"chosen": run["chosen"]} if "chosen" in run else {})))
        elif role["kind"] == "dfad":
            _add_seed(res["dfad"], role["teacher"], role, run, step["name"],
                      {"arch": role["arch"], "wall_time_s": m.get("wall_time_s"), "epochs": m.get("epochs"),
                       "iters_per_epoch": (m.get("config") or {}).get("iters_per_epoch")})
    res["provenance"] = provenance(res, manifest)
    for s in res["students"].values():
        for teacher, attacks in s["kd"].items():
            for a in attacks.values():
                a["provenance"] = _worst(res["provenance"], a["folders"])
    for d in res["dfad"].values():
        d["provenance"] = _worst(res["provenance"], d["folders"])
    for entry in _arms(res):
        entry["precision"] = sorted({res["runs"][f]["precision"] for f in entry["folders"]})
    orig = res["teachers"].get("original")
    if orig is not None and orig["ece"] is None:  # a defended teacher's run scores its original too
        orig["ece"] = next((t["original_ece"] for t in res["teachers"].values() if t.get("original_ece")), None)
    original = res["teachers"].get("original", {}).get("acc")
    for t in res["teachers"].values():
        t["delta"] = None if original is None else t["acc"] - original
    for s in res["students"].values():
        scratch, ls = s.get("scratch"), s.get("ls")
        floor, bar = floor_of(res, s), bar_of(res, s)
        for a in kd_arms(s):
            a["delta_scratch"] = paired_delta(a, scratch)
            a["delta_ls"] = paired_delta(a, ls)
            if "threat" in res:
                a["delta_floor"] = paired_delta(a, floor)
            if a is bar:  # the bar itself: no verdict against itself
                a["verdict"], a["harmful"], a["p"], a["t"], a["n_paired"] = None, False, None, None, 0
                continue
            test = verdict(a["accs"], bar.get("accs", {}))
            a["verdict"], a["harmful"], a["p"], a["t"], a["n_paired"] = (
                test["verdict"], test["harmful"], test["p"], test["t"], test["n"])
    dfad_against_original(res["dfad"])
    res["seeds"] = sorted({run["role"].get("seed", 0) for run in res["runs"].values()})
    res["frontier"] = frontier(res)
    return res


def _add_seed(group, key, role, run, folder, extra):
    """Add one seed's run of a student arm (or DFAD) to group[key]: accs {seed: acc}, then mean ± std and n.
    The first seed's folder and curve stand for the arm in the curves figure."""
    entry = group.setdefault(key, dict(extra, accs={}, folders=[], folder=folder,
                                       history=run["metrics"].get("history", [])))
    seed = role.get("seed", run["metrics"].get("seed", 0))
    if entry["accs"] and seed < min(entry["accs"]):
        entry["folder"], entry["history"] = folder, run["metrics"].get("history", [])
    entry["accs"][seed] = run["acc"]
    if "tau" in extra:  # a KD arm: the temperature each seed ran at, or its sweep picked (and the α it picked)
        entry.setdefault("taus", {})[seed] = extra["tau"]
        if extra.get("chosen"):
            entry.setdefault("alphas", {})[seed] = extra["chosen"].get("alpha")
    entry["folders"].append(folder)
    entry["acc"], entry["std"] = mean_std([entry["accs"][k] for k in sorted(entry["accs"])])
    entry["n"] = len(entry["accs"])


def _arms(res):
    """Every arm of a collected folder that holds runs of its own: scratch, label smoothing, each attack x
    teacher, each DFAD student."""
    for s in res["students"].values():
        yield from (s[k] for k in ("scratch", "ls") if k in s)
        yield from kd_arms(s)
    yield from res["dfad"].values()


def _worst(prov, folders):
    """The provenance status of an arm over its seeds' runs: mismatch before unrecorded before ok."""
    statuses = [prov.get(f, {}).get("status") for f in folders]
    for status in ("mismatch", "unrecorded", "ok"):
        if status in statuses:
            return status
    return None


def provenance(res, manifest):
    """{step: {status, why}} for every step that loads another step's weights: 'ok' when the digest it
    recorded is that of the weights the loaded step's run produced, 'mismatch' when it differs (a student
    beside a teacher it was not distilled from), 'unrecorded' when either side has no digest (a run from
    before digests were recorded)."""
    out = {}
    teachers = {s["role"]["teacher"]: s["name"] for s in manifest["steps"] if s["role"]["kind"] == "teacher"}
    for step in manifest["steps"]:
        run = res["runs"].get(step["name"])
        if run is None:
            continue
        for key, dep in _loads(step, teachers).items():
            made = res["runs"].get(dep, {}).get("weights_sha256")
            used = ((run["inputs"] or {}).get(key) or {}).get("weights_sha256")
            if made is None or used is None:
                entry = {"status": "unrecorded", "why": f"no weights digest recorded for {key} {dep}"}
            elif made != used:
                entry = {"status": "mismatch", "why": f"trained from {key} weights {used[:12]}, but {dep} in this "
                                                      f"folder produced {made[:12]}"}
            else:
                entry = {"status": "ok", "why": None}
            if out.get(step["name"], {}).get("status") in (None, "ok"):
                out[step["name"]] = entry
    return out


def _loads(step, teachers):
    """{key: step name} of the steps whose weights a step loads; teachers: {teacher name: its step}."""
    role = step["role"]
    if "loads" in role:  # a step that names what it loads (judge.py's teachers)
        return dict(role["loads"])
    if role["kind"] == "teacher" and role.get("teacher") != "original":
        return {"original": teachers.get("original")}
    if role["kind"] in ("kd", "dfad"):
        return {"teacher": teachers.get(role["teacher"])}
    return {}
