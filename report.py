"""Rebuild a reproduction's results table and figures from its run folders alone.

    python report.py exps/mini
    python report.py runs/mini --compare exps/mini      # a re-run beside the committed figures
    python report.py exps/mini_curve --curve --with exps/mini   # convergence: accuracy against epochs


Reads exps/<preset>/steps.json (written by reproduce.py) and each step's metrics.json / sweep.json; writes
results.md (the table of docs/METHOD.md section 5), results.json and PNG figures beside them.
A stolen student counts as *distillable* when it beats the label-smoothing student of the same
architecture (the bar of Markov KD and CMIM), *KD-resistant* otherwise.
"""
import json
import os
import sys

from utils.checkpoint import atomic_write_json, atomic_write_text, read_json
from utils.config import NON_RESULT_KEYS
from utils.errors import UserError, cli_main
from utils.stats import ALPHA, RULE, mean_std, verdict

PALETTE = ["#55a868", "#c44e52", "#dd8452", "#8172b3", "#937860", "#da8bc3", "#64b5cd", "#ccb974"]


class _Names(dict):
    """Report names of teachers: the original, then each defence's label from the registry."""

    def __missing__(self, key):
        from utils.defences import DEFENCES
        return DEFENCES[key].label if key in DEFENCES else key

    def get(self, key, default=None):
        return self[key]


TEACHER_NAMES = _Names(original="original")


def _teacher_order(res):
    """Teachers in the manifest's order, then any a student names that has no teacher row."""
    order = list(res["teachers"])
    for s in res["students"].values():
        order += [t for t in s["kd"] if t not in order]
    order += [t for t in res["dfad"] if t not in order]
    return order
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _sweep(folder):
    """The folder's sweep.json if it holds this run's result: its params ask for a tau sweep, or there is no
    single-run metrics.json (a sweep given on the command line). A sweep.json left over from an earlier
    config of the same folder is ignored."""
    params = read_json(os.path.join(folder, "params.json")) or {}
    if params.get("tau_sweep") or not os.path.isfile(os.path.join(folder, "metrics.json")):
        return read_json(os.path.join(folder, "sweep.json"))
    return None


def _run(exp_root, name):
    """The headline of one step: final accuracy (at the thief's best tau for a sweep), its metrics, and its
    wall time in seconds (every temperature of a sweep; None if not recorded)."""
    folder = os.path.join(exp_root, name)
    sweep = _sweep(folder)
    if sweep:
        runs = {sub: read_json(os.path.join(folder, sub, "metrics.json")) or {} for sub in sweep["runs"].values()}
        metrics = runs[sweep["runs"][sweep.get("best_run") or _tau_key(sweep["best_tau"], sweep["runs"])]]
        out = {"acc": sweep["best_acc"], "tau": sweep["best_tau"], "per_tau": sweep["final_acc"],
               "metrics": metrics, "seconds": _total_seconds(runs.values()), "inputs": _sweep_inputs(runs.values())}
        if sweep.get("selected_on") == "val":  # the thief picked on its own held-out images
            out["chosen"] = {"alpha": sweep.get("best_alpha"), "val_images": sweep.get("val_images")}
        return out
    metrics = read_json(os.path.join(folder, "metrics.json"))
    if metrics is None:
        return None
    return {"acc": metrics["final_acc"], "tau": metrics.get("tau", metrics.get("config", {}).get("tau")),
            "metrics": metrics, "seconds": _total_seconds([metrics])}


def _sweep_inputs(metrics_list):
    """The teacher a sweep's runs were distilled from, when every temperature used the same one (else None)."""
    digests = {json.dumps(m.get("inputs"), sort_keys=True) for m in metrics_list}
    return json.loads(digests.pop()) if len(digests) == 1 else None


def _total_seconds(metrics_list):
    """Wall seconds of the runs; a student trained in a battery counts its share of the battery's time."""
    times = [m.get("wall_time_s") for m in metrics_list]
    if any(t is None for t in times):
        return None
    return round(sum(t / len(m.get("battery") or [None]) for t, m in zip(times, metrics_list)), 1)


def _tau_cell(arm):
    """An arm's τ: the run's, or the sweep's pick; a pick made on the thief's validation split says so (and
    names the α it picked with it, when α was swept too)."""
    cell = _fmt(arm["tau"], "{:g}")
    chosen = arm.get("chosen")
    if not chosen:
        return cell
    alpha = f", α {chosen['alpha']:g}" if chosen.get("alpha") is not None else ""
    return f"{cell}{alpha} (val {chosen.get('val_images')})"


def _chosen_note(student):
    """The line under a student's table when a τ there was picked on the thief's validation split; none else."""
    if not any(a.get("chosen") for arms in student["kd"].values() for a in arms.values()):
        return []
    return ["", "best τ marked (val N): the thief picked τ (and α where shown) on N of its own training images, held "
                "out of the student's training (val_split); the accuracy shown is on the test split. Unmarked: picked "
                "on the test split, an upper bound."]


def _tau_key(tau, runs):
    for key in runs:
        if float(key) == float(tau):
            return key
    raise KeyError(tau)


def collect(exp_root):
    manifest = read_json(os.path.join(exp_root, "steps.json"))
    if manifest is None:
        raise UserError(f"{exp_root}/steps.json not found; run reproduce.py first (it writes the manifest)")
    res = {"preset": manifest["preset"], "teachers": {}, "students": {}, "dfad": {}, "missing": [], "compute": {},
           "runs": {}}
    if manifest.get("threat"):  # a threat model's students, against the teachers of another preset folder
        res["threat"] = manifest["threat"]
    teachers_root = os.path.normpath(os.path.join(exp_root, manifest.get("teachers_from", ".")))
    for step in manifest["steps"]:
        role = step["role"]
        run = _run(teachers_root if role["kind"] == "teacher" else exp_root, step["name"])
        if run is None:
            res["missing"].append(step["name"])
            continue
        m = run["metrics"]
        res["compute"][step["name"]] = run["seconds"]
        res["runs"][step["name"]] = {"role": role, "weights_sha256": m.get("weights_sha256"),
                                     "inputs": run.get("inputs", m.get("inputs")), "git_commit": m.get("git_commit")}
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
    orig = res["teachers"].get("original")
    if orig is not None and orig["ece"] is None:  # a defended teacher's run scores its original too
        orig["ece"] = next((t["original_ece"] for t in res["teachers"].values() if t.get("original_ece")), None)
    original = res["teachers"].get("original", {}).get("acc")
    for t in res["teachers"].values():
        t["delta"] = None if original is None else t["acc"] - original
    for s in res["students"].values():
        scratch = s.get("scratch", {}).get("acc")
        ls = s.get("ls", {})
        floor, bar = hard_label_floor(s), _bar_of(res, s)
        for attacks in s["kd"].values():
            for a in attacks.values():
                a["delta_scratch"] = None if scratch is None else a["acc"] - scratch
                a["delta_ls"] = None if not ls else a["acc"] - ls["acc"]
                if "threat" in res:
                    a["delta_floor"] = None if not floor else a["acc"] - floor["acc"]
                if a is bar:  # the bar itself: no verdict against itself
                    a["verdict"], a["harmful"], a["p"], a["t"], a["n_paired"] = None, False, None, None, 0
                    continue
                test = verdict(a["accs"], bar.get("accs", {}))
                a["verdict"], a["harmful"], a["p"], a["t"], a["n_paired"] = (
                    test["verdict"], test["harmful"], test["p"], test["t"], test["n"])
    _dfad_against_original(res["dfad"])
    res["seeds"] = sorted({run["role"].get("seed", 0) for run in res["runs"].values()})
    res["frontier"] = frontier(res)
    return res


BAR_NAMES = {"ls": "label smoothing 0.1 on the true labels", "hardlabel": "the hard-label floor (KD on the original's argmax alone)"}


def _bar_name(res):
    """The verdicts' bar: 'ls' (label smoothing), or 'hardlabel' for a thief without labels (METHOD.md section 10)."""
    return (res.get("threat") or {}).get("bar", "ls")


def hard_label_floor(student):
    """The hard-label floor of a student architecture: its hard-label KD from the original ({} when not run)."""
    return student["kd"].get("original", {}).get("hardlabel") or {}


def _bar_of(res, student):
    return hard_label_floor(student) if _bar_name(res) == "hardlabel" else (student.get("ls") or {})


def _dfad_against_original(dfad):
    """The data-free claim: is a defended teacher's DFAD student below the original's? Paired by seed, the
    one-sided paired t-test of METHOD.md section 8 in the other direction (delta_original, p_below, n_paired)."""
    base = dfad.get("original")
    for teacher, d in dfad.items():
        if teacher == "original" or base is None:
            continue
        test = verdict(d["accs"], base["accs"])
        d["delta_original"], d["p_below"], d["n_paired"] = test["diff"], test["p_less"], test["n"]


def _add_seed(group, key, role, run, folder, extra):
    """Add one seed's run of a student arm (or DFAD) to group[key]: accs {seed: acc}, then mean ± std and n.
    The first seed's folder and curve stand for the arm in the curves figure."""
    entry = group.setdefault(key, dict(extra, accs={}, folders=[], folder=folder, history=run["metrics"].get("history", [])))
    seed = role.get("seed", run["metrics"].get("seed", 0))
    if entry["accs"] and seed < min(entry["accs"]):
        entry["folder"], entry["history"] = folder, run["metrics"].get("history", [])
    entry["accs"][seed] = run["acc"]
    entry["folders"].append(folder)
    entry["acc"], entry["std"] = mean_std([entry["accs"][k] for k in sorted(entry["accs"])])
    entry["n"] = len(entry["accs"])


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
    if role["kind"] == "teacher" and role.get("teacher") != "original":
        return {"original": teachers.get("original")}
    if role["kind"] in ("kd", "dfad"):
        return {"teacher": teachers.get(role["teacher"])}
    return {}


def _fmt(v, spec="{:.2f}", signed=False):
    if v is None:
        return "–"
    return ("{:+.2f}" if signed else spec).format(v)


def markdown(res, extra=None):
    lines = [f"# Results: preset `{res['preset']}`", ""]
    seeds = res.get("seeds", [0])
    lines += ["Final-epoch top-1 test accuracy (%); student rows are mean ± std (n seeds) over seeds "
              f"{', '.join(map(str, seeds))}. KD rows: the thief's best temperature, picked on the test split (an "
              "upper bound for the attack).", "", RULE, ""]
    threat = res.get("threat")
    if threat:
        lines += [f"**Threat model `{threat['name']}`: {threat['title']}.** Every student arm holds the same "
                  f"{threat['images'] or 'training'} images (a class-balanced draw with the student's seed); the "
                  f"thief {'has' if threat['labels'] else 'has no'} labels. Verdicts are against "
                  f"{BAR_NAMES[threat['bar']]}; every row also shows its Δ against the other bar "
                  f"(METHOD.md section 10).", ""]
    lines += ["## Teachers", "",
              "| teacher | test acc | Δ vs original | Kendall τ vs original (non-target order) | reversed top-1 | "
              "non-target entropy | ECE |", "|---|---|---|---|---|---|---|"]
    for key in _teacher_order(res):
        t = res["teachers"].get(key)
        if t:
            mark = _mark(res.get("provenance", {}).get(t["folder"], {}))
            lines.append(f"| {TEACHER_NAMES[key]} | {_fmt(t['acc'])}{mark} | {_fmt(t['delta'], signed=True) if key != 'original' else '–'} | "
                         f"{_fmt(t['kendall'], '{:.3f}')} | {_fmt(t['reversed_top1'], '{:.3f}')} | "
                         f"{_fmt(t['nt_entropy'], '{:.3f}')} | {_fmt(t['ece'], '{:.3f}')} |")
    for arch, s in res["students"].items():
        if threat:
            floor_is_bar = threat["bar"] == "hardlabel"
            lines += ["", f"## Student `{arch}`", "",
                      f"Scratch: **{_seeded(s.get('scratch'))}**, label smoothing 0.1"
                      f"{'' if floor_is_bar else ' (the bar)'}: **{_seeded(s.get('ls'))}**, hard-label floor"
                      f"{' (the bar)' if floor_is_bar else ''}: **{_seeded(hard_label_floor(s))}**.", "",
                      "| teacher | attack | student acc | best τ | Δ vs label smoothing | Δ vs hard-label floor | "
                      "verdict (p) |", "|---|---|---|---|---|---|---|"]
            for teacher in _teacher_order(res):
                for attack, a in s["kd"].get(teacher, {}).items():
                    cell = "the bar" if a is _bar_of(res, s) else _verdict_cell(a)
                    lines.append(f"| {TEACHER_NAMES[teacher]} | {attack} | {_seeded(a)}{_mark(a)} | "
                                 f"{_tau_cell(a)} | {_fmt(a['delta_ls'], signed=True)} | "
                                 f"{_fmt(a.get('delta_floor'), signed=True)} | {cell} |")
            lines += _chosen_note(s)
            continue
        lines += ["", f"## Student `{arch}`", "",
                  f"Scratch: **{_seeded(s.get('scratch'))}**, label smoothing 0.1 (the bar): "
                  f"**{_seeded(s.get('ls'))}**.", "",
                  "| teacher | attack | student acc | best τ | Δ vs scratch | Δ vs label smoothing | verdict (p) |",
                  "|---|---|---|---|---|---|---|"]
        for teacher in _teacher_order(res):
            for attack, a in s["kd"].get(teacher, {}).items():
                lines.append(f"| {TEACHER_NAMES[teacher]} | {attack} | {_seeded(a)}{_mark(a)} | {_tau_cell(a)} | "
                             f"{_fmt(a['delta_scratch'], signed=True)} | {_fmt(a['delta_ls'], signed=True)} | "
                             f"{_verdict_cell(a)} |")
        lines += _chosen_note(s)
    if res["dfad"]:
        lines += ["", "## Data-free (DFAD)", "",
                  "The data-free claim: a defended teacher's DFAD student against the original's, paired by seed "
                  f"(one-sided paired t-test, below it at p < {ALPHA}).", "",
                  "| teacher | student | budget | student acc | Δ vs the original's | below it? |",
                  "|---|---|---|---|---|---|"]
        for teacher, d in res["dfad"].items():
            budget = (f"{d['epochs']} × {d['iters_per_epoch']} generator iterations"
                      if d.get("epochs") and d.get("iters_per_epoch") else "–")
            lines.append(f"| {TEACHER_NAMES[teacher]} | {d['arch']} | {budget} | {_seeded(d)}{_mark(d)} | "
                         f"{_fmt(d.get('delta_original'), signed=True)} | {_below_cell(d)} |")
    lines += _frontier_lines(res)
    resistant = _verdicts(res)
    if resistant:
        lines += ["", "## Which teachers resist which attacks", ""] + resistant
    if res["missing"]:
        lines += ["", f"Steps without results yet: {', '.join(res['missing'])}."]
    lines += _provenance_lines(res)
    lines += _compute_lines(res, extra or {})
    lines += ["", "Figures: `fig_accuracy.png` (teachers and students), `fig_response.png` (mean softmax "
              "response at τ for one class), `fig_curves.png` (test accuracy per epoch), `fig_frontier.png` (each "
              "teacher's accuracy against its strongest attack).",
              "Rebuild with `python report.py <this folder>`.", ""]
    return "\n".join(lines)


def _seeded(entry):
    """'mean ± std (n)' of an arm over its seeds; 'acc (1)' with one seed."""
    if not entry or entry.get("acc") is None:
        return "–"
    if entry.get("std") is None:
        return f"{entry['acc']:.2f} ({entry.get('n', 1)})"
    return f"{entry['acc']:.2f} ± {entry['std']:.2f} ({entry['n']})"


def _below_cell(d):
    if d.get("delta_original") is None:
        return "–"
    if d.get("p_below") is None:
        return f"no test (n={d.get('n_paired', 1)})"
    return f"{'yes' if d['p_below'] < ALPHA else 'not significantly'} (p={d['p_below']:.3g})"


def _verdict_cell(a):
    if not a.get("verdict"):
        return "–"
    word = a["verdict"] + (", harmful" if a.get("harmful") else "")
    test = f"n={a.get('n_paired', 1)}" if a.get("p") is None else f"p={a['p']:.3g}"
    return f"{word} ({test})"


PROVENANCE_MARKS = {"mismatch": " ✗", "unrecorded": " ?"}


def _mark(row):
    return PROVENANCE_MARKS.get(row.get("provenance", row.get("status")), "")


def _provenance_lines(res):
    prov = res.get("provenance", {})
    if not prov:
        return []
    bad = {name: p for name, p in prov.items() if p["status"] != "ok"}
    lines = ["", "## Provenance", ""]
    if not bad:
        lines.append(f"Every one of the {len(prov)} runs that load a teacher recorded the sha256 of the teacher "
                     f"weights it loaded, and each is the digest of the weights that teacher's run in this folder "
                     f"produced: every row sits beside the teacher it was trained from.")
        return lines
    lines.append("Rows marked ✗ were trained from *other* weights than the teacher shown beside them; rows marked ? "
                 "cannot be checked (no digest recorded). Re-run `reproduce.py` on this folder: it re-trains them.")
    lines.append("")
    lines += [f"- `{name}`: {p['status']}: {p['why']}." for name, p in bad.items()]
    return lines


def _compute_lines(res, extra):
    timed = {k: v for k, v in res.get("compute", {}).items() if v is not None}
    if not timed:
        return []
    lines = ["", "## Compute", "", "| step | wall time (min) |", "|---|---|"]
    lines += [f"| {name} | {sec / 60:.1f} |" for name, sec in timed.items()]
    lines += ["", f"Sum of the step times: **{sum(timed.values()) / 60:.1f} min** (what the chain costs one step "
                  f"at a time, on the hardware each step ran on; a student trained in a shared-teacher battery counts "
                  f"its share, the battery's wall time over its students)."]
    if extra.get("reproduce_wall_time_s") is not None:
        jobs = extra.get("jobs", 1)
        lines.append(f"The last `reproduce.py` run took **{extra['reproduce_wall_time_s'] / 60:.1f} min** of wall "
                     f"time with `--jobs {jobs}` (steps it found finished were skipped, not timed).")
    return lines


def _verdicts(res):
    out = []
    for arch, s in res["students"].items():
        for teacher in _teacher_order(res):
            attacks = s["kd"].get(teacher, {})
            if not attacks or any(a["verdict"] is None for a in attacks.values()):
                continue
            by = {word: [k for k, a in attacks.items() if a["verdict"] == word]
                  for word in ("distillable", "inconclusive", "KD-resistant")}
            if not by["distillable"] and not by["inconclusive"]:
                out.append(f"- {TEACHER_NAMES[teacher]} → `{arch}`: **KD-resistant** against all "
                           f"{len(attacks)} attacks ({', '.join(attacks)}).")
                continue
            parts = []
            if by["distillable"]:
                parts.append(f"**distillable** by {', '.join(by['distillable'])}")
            if by["inconclusive"]:
                parts.append(f"above the bar but not significantly (inconclusive) with {', '.join(by['inconclusive'])}")
            if by["KD-resistant"]:
                parts.append(f"resists {', '.join(by['KD-resistant'])}")
            out.append(f"- {TEACHER_NAMES[teacher]} → `{arch}`: " + "; ".join(parts) + ".")
    return out


def _strongest(attacks, acc):
    """(the attack whose stolen student is the most accurate, whether every attack is KD-resistant) of
    {attack: row}, acc the row's accuracy key: what both frontiers call the strongest attack and a teacher that
    holds (METHOD.md section 8)."""
    best = max(attacks, key=lambda a: attacks[a][acc])
    return best, all(r.get("verdict") == "KD-resistant" for r in attacks.values())


def frontier(res):
    """Per student architecture and teacher: the teacher's accuracy and the *strongest* attack on it (the
    stolen student with the highest mean accuracy), against the label-smoothing bar. A teacher resists
    every attack when each attack's verdict is KD-resistant (METHOD.md section 8)."""
    out = []
    for arch, s in res["students"].items():
        bar = _bar_of(res, s).get("acc")
        for teacher in _teacher_order(res):
            attacks = {a: r for a, r in s["kd"].get(teacher, {}).items() if r.get("acc") is not None}
            t = res["teachers"].get(teacher)
            if not attacks or not t:
                continue
            best, resists_all = _strongest(attacks, "acc")
            b = attacks[best]
            out.append({"arch": arch, "teacher": teacher, "teacher_acc": t["acc"], "teacher_delta": t.get("delta"),
                        "strongest": best, "acc": b["acc"], "std": b.get("std"), "n": b.get("n", 1),
                        "delta_ls": None if bar is None else b["acc"] - bar, "verdict": b.get("verdict"),
                        "p": b.get("p"), "bar": bar, "attacks": len(attacks),
                        "resists_all": resists_all})
    return out


def _frontier_lines(res):
    rows_ = res["frontier"]
    if not rows_:
        return []
    lines = ["", "## Defences at a glance: the strongest attack on each teacher", "",
             "Each teacher's accuracy beside the stolen student of the attack that steals the most from it (highest "
             "mean accuracy); the goal is a teacher within 0.5 point of the original whose strongest attack stays at "
             f"or below {'the label-smoothing bar' if _bar_name(res) == 'ls' else 'the bar, ' + BAR_NAMES[_bar_name(res)]} "
             "(`fig_frontier.png`).", "",
             "| student | teacher | teacher acc (Δ vs original) | strongest attack | its student | Δ vs bar | verdict (p) "
             "| every attack KD-resistant |", "|---|---|---|---|---|---|---|---|"]
    for r in rows_:
        delta = "" if r["teacher"] == "original" else f" ({_fmt(r['teacher_delta'], signed=True)})"
        entry = {"acc": r["acc"], "std": r["std"], "n": r["n"]}
        lines.append(f"| `{r['arch']}` | {TEACHER_NAMES[r['teacher']]} | {_fmt(r['teacher_acc'])}{delta} | {r['strongest']} "
                     f"| {_seeded(entry)} | {_fmt(r['delta_ls'], signed=True)} | "
                     f"{_verdict_cell({'verdict': r['verdict'], 'p': r['p'], 'n_paired': r['n']})} | "
                     f"{'yes' if r['resists_all'] else 'no'} ({r['attacks']} attacks) |")
    return lines


def accuracy_bars(res):
    """(labels, values, colours) of the accuracy figure: teachers, then per student architecture scratch,
    label smoothing and every attack x teacher, coloured by teacher."""
    labels, values, colours = [], [], []
    order = _teacher_order(res)
    colour = {t: PALETTE[i % len(PALETTE)] for i, t in enumerate(order)}
    for key in order:
        if key in res["teachers"]:
            labels.append(f"teacher\n{TEACHER_NAMES[key]}")
            values.append(res["teachers"][key]["acc"])
            colours.append("#4c72b0")
    for arch, s in res["students"].items():
        for src in ("scratch", "ls"):
            if src in s:
                labels.append(f"{arch}\n{src}")
                values.append(s[src]["acc"])
                colours.append("#8c8c8c")
        for teacher, attacks in s["kd"].items():
            for attack, a in attacks.items():
                labels.append(f"{arch} KD\n{teacher}/{attack}")
                values.append(a["acc"])
                colours.append(colour[teacher])
    return labels, values, colours


def _save_plot(fig, ax, xlabel, ylabel, path, legend_size, dpi):
    import matplotlib.pyplot as plt
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=legend_size)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


def figures(res, exp_root, response_class=3):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    written = []
    # 1. accuracy bars
    labels, values, colours = accuracy_bars(res)
    order = _teacher_order(res)
    if values:
        fig, ax = plt.subplots(figsize=(max(6, 0.55 * len(values)), 4.5))
        ax.bar(range(len(values)), values, color=colours)
        ax.set_xticks(range(len(values)), labels, rotation=70, fontsize=7)
        ax.set_ylabel("test accuracy (%)")
        lo = min(values)
        ax.set_ylim(max(0, lo - 10), min(100, max(values) + 3))
        bars = [s["ls"]["acc"] for s in res["students"].values() if "ls" in s]
        for i, bar in enumerate(bars):
            ax.axhline(bar, color="k", ls="--", lw=0.8, label="label-smoothing student" if i == 0 else None)
        if bars:
            ax.legend(loc="lower right", fontsize=7)
        ax.set_title("Teachers and students (KD at the thief's best τ)")
        fig.tight_layout()
        fig.savefig(os.path.join(exp_root, "fig_accuracy.png"), dpi=110)
        plt.close(fig)
        written.append("fig_accuracy.png")
    # 2. softmax response for one class
    responses = {}
    for key in [k for k in order if k != "original"]:
        t = res["teachers"].get(key)
        if t and t.get("class_response"):
            responses[TEACHER_NAMES[key]] = t["class_response"]
            responses.setdefault("original", t["original_class_response"])
    if responses:
        order = ["original"] + [k for k in responses if k != "original"]
        fig, axes = plt.subplots(1, len(order), figsize=(4 * len(order), 3.2), sharey=True)
        axes = axes if len(order) > 1 else [axes]
        tau = next(t.get("response_tau") for t in res["teachers"].values() if t.get("response_tau"))
        for ax, name in zip(axes, order):
            row = responses[name][response_class]
            ax.bar(range(len(row)), row, color=["#c44e52" if i == response_class else "#4c72b0" for i in range(len(row))])
            ax.set_title(f"{name}")
            if len(row) == 10:
                ax.set_xticks(range(10), CIFAR10_CLASSES, rotation=70, fontsize=7)
        axes[0].set_ylabel(f"mean softmax at τ={tau:g}")
        cls = CIFAR10_CLASSES[response_class] if len(responses["original"]) == 10 else str(response_class)
        fig.suptitle(f"Mean response to test images of class '{cls}'")
        fig.tight_layout()
        fig.savefig(os.path.join(exp_root, "fig_response.png"), dpi=110)
        plt.close(fig)
        written.append("fig_response.png")
    # 3. training curves
    curves = [(f"teacher {TEACHER_NAMES[k]}", t["history"]) for k, t in res["teachers"].items()]
    for arch, s in res["students"].items():
        curves += [(f"{arch} {src}", s[src]["history"]) for src in ("scratch", "ls") if src in s]
        curves += [(f"{arch} KD {t}/{a}", v["history"]) for t, atts in s["kd"].items() for a, v in atts.items()
                   if a == "vanilla"]
    curves += [(f"DFAD {t}", d["history"]) for t, d in res["dfad"].items()]
    curves = [(n, h) for n, h in curves if h]
    if curves:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for name, hist in curves:
            ax.plot([r["epoch"] for r in hist], [r["test_acc"] for r in hist], marker=".", label=name)
        _save_plot(fig, ax, "epoch", "test accuracy (%)", os.path.join(exp_root, "fig_curves.png"), 7, 110)
        written.append("fig_curves.png")
    # 4. the frontier: teacher accuracy against the strongest attack's student, the bar drawn
    points = res["frontier"]
    if points:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        colour = {t: PALETTE[i % len(PALETTE)] for i, t in enumerate(_teacher_order(res))}
        for r in points:
            yerr = r["std"] if r["std"] is not None else None
            ax.errorbar([r["teacher_acc"]], [r["acc"]], yerr=yerr, fmt="o", color=colour[r["teacher"]], capsize=3,
                        label=f"{TEACHER_NAMES[r['teacher']]} ({r['strongest']})")
        for arch in res["students"]:
            bar = (res["students"][arch].get("ls") or {}).get("acc")
            if bar is not None:
                ax.axhline(bar, color="grey", linestyle="--", linewidth=1, label=f"label-smoothing bar ({arch})")
        original = res["teachers"].get("original")
        if original:
            ax.axvline(original["acc"] - 0.5, color="grey", linestyle=":", linewidth=1,
                       label="original − 0.5 point")
        ax.set_title("each teacher against the attack that steals the most from it", fontsize=9)
        _save_plot(fig, ax, "teacher test accuracy (%)", "strongest attack's student accuracy (%)",
                   os.path.join(exp_root, "fig_frontier.png"), 7, 110)
        written.append("fig_frontier.png")
    return written


def build(exp_root, extra=None, strict=False):
    res = collect(exp_root)
    bad = {n: p for n, p in res["provenance"].items() if p["status"] == "mismatch"}
    if strict and bad:
        name = next(iter(bad))
        raise UserError(f"{exp_root}: {len(bad)} row(s) were not trained from the teacher beside them, e.g. {name} "
                        f"({bad[name]['why']}); re-run reproduce.py on this folder, or drop --strict to mark them")
    old = read_json(os.path.join(exp_root, "results.json")) or {}
    extra = dict(old.get("extra", {}), **(extra or {}))
    slim = json.loads(json.dumps(res))
    for group in (slim["teachers"], slim["dfad"]):
        for t in group.values():
            t.pop("history", None)
    for s in slim["students"].values():
        for k in ("scratch", "ls"):
            s.get(k, {}).pop("history", None)
        for atts in s["kd"].values():
            for a in atts.values():
                a.pop("history", None)
    slim["extra"] = extra
    atomic_write_json(os.path.join(exp_root, "results.json"), slim)
    atomic_write_text(os.path.join(exp_root, "results.md"), markdown(res, extra))
    figures(res, exp_root)
    return res


def rows(res):
    """[(row label, accuracy, verdict or None)] of every result in a collected folder, in table order."""
    out = [(f"teacher {TEACHER_NAMES.get(k, k)}", t["acc"], None) for k, t in res["teachers"].items()]
    for arch, s in res["students"].items():
        out += [(f"{arch} {src}", s[src]["acc"], None) for src in ("scratch", "ls") if src in s]
        out += [(f"{arch} KD {TEACHER_NAMES.get(t, t)} / {attack}", a["acc"], a.get("verdict"))
                for t, attacks in s["kd"].items() for attack, a in attacks.items()]
    out += [(f"DFAD {d['arch']} {TEACHER_NAMES.get(t, t)}", d["acc"], None) for t, d in res["dfad"].items()]
    return out


def comparison(res, ref, run_root, ref_root):
    """Markdown: every row of this run beside the same row of a reference folder, with the difference."""
    mine, theirs = rows(res), {label: (acc, word) for label, acc, word in rows(ref)}
    lines = [f"# `{run_root}` against `{ref_root}`", "",
             "Final-epoch test accuracy (%) of each row in both folders; Δ = this run − reference. A verdict that "
             "differs is marked **≠**.", "",
             "| row | this run | reference | Δ | verdict here | verdict there |", "|---|---|---|---|---|---|"]
    deltas, flips = [], []
    for label, acc, word in mine:
        other, other_verdict = theirs.get(label, (None, None))
        delta = None if acc is None or other is None else acc - other
        if delta is not None:
            deltas.append((abs(delta), label))
        flip = word and other_verdict and word != other_verdict
        if flip:
            flips.append(label)
        lines.append(f"| {label} | {_fmt(acc)} | {_fmt(other)} | {_fmt(delta, signed=True)} | {word or '–'} | "
                     f"{other_verdict or '–'}{' **≠**' if flip else ''} |")
    only_ref = [label for label in theirs if label not in {m[0] for m in mine}]
    lines.append("")
    if deltas:
        worst = max(deltas)
        lines.append(f"{len(deltas)} rows in both: mean |Δ| {sum(d for d, _ in deltas) / len(deltas):.2f}, largest "
                     f"{worst[0]:.2f} ({worst[1]}); {len(flips)} verdict(s) differ"
                     f"{': ' + ', '.join(flips) if flips else ''}.")
    if only_ref:
        lines.append(f"Rows only in the reference: {', '.join(only_ref)}.")
    for name, r in (("this run", res), ("the reference", ref)):
        commits = sorted({v["git_commit"][:7] for v in r["runs"].values() if v.get("git_commit")})
        lines.append(f"Commits of {name}'s runs: {', '.join(commits) or 'not recorded'}.")
    return "\n".join(lines) + "\n"


# Keys that may differ between the points of one curve: the schedule length, the seed, and what does not
# change a result; the teacher is compared by the digest of the weights the run loaded.
CURVE_FREE_KEYS = NON_RESULT_KEYS | {"epochs", "seed", "teacher"}


def _curve_arm(m):
    """(what identifies a run's arm, label): its script, teacher weights and every setting but the epochs and
    the seed. Two runs are of one arm when these agree on every key both record (a run made before a key was
    added to its script, e.g. an attack's new option, still joins its arm)."""
    cfg = {k: v for k, v in (m.get("config") or {}).items() if k not in CURVE_FREE_KEYS}
    teacher = (m.get("inputs") or {}).get("teacher", {})
    ident = {"script": m.get("script"), "teacher": teacher.get("weights_sha256"), "config": cfg}
    if m.get("script") == "train_kd.py":
        label = f"{m.get('attack')} KD from {os.path.basename(os.path.dirname(teacher.get('path', '?')))}"
    else:
        label = "label smoothing" if cfg.get("label_smoothing") else "scratch"
    subset, source = _thief(cfg)[0], cfg.get("transfer") or ""
    held = (f", {subset:,} {source + ' ' if source else ''}images" if subset else "") + (
        ", no labels" if cfg.get("labels") is False else "")
    return ident, f"{label} ({m.get('model')}{held})"


def _thief(cfg):
    """What the thief held, as a curve compares it: (images, their draw, transfer set); full data is (0, None, '')."""
    subset = cfg.get("subset") or 0
    return subset, cfg.get("subset_seed", 0) if subset else None, cfg.get("transfer") or ""


def _same_arm(a, b):
    if a["script"] != b["script"] or a["teacher"] != b["teacher"]:
        return False
    return all(a["config"][k] == b["config"][k] for k in set(a["config"]) & set(b["config"]))


def _finished_runs(folder):
    for name in sorted(os.listdir(folder)):
        m = read_json(os.path.join(folder, name, "metrics.json"))
        if isinstance(m, dict) and isinstance(m.get("final_acc"), (int, float)) and m.get("script") != "train_dfad.py":
            yield os.path.join(folder, name), m


def curve(curve_root, others=()):
    """Final accuracy against the schedule length for every arm with runs in curve_root (more points of the
    same arms, e.g. the preset's own short schedule, from `others`). Writes CURVE_ROOT/curve.md, curve.json
    and fig_convergence.png; returns the curve dict."""
    arms = []
    for folder in (curve_root,) + tuple(others):
        for path, m in _finished_runs(folder):
            ident, label = _curve_arm(m)
            arm = next((a for a in arms if _same_arm(a["ident"], ident)), None)
            if arm is None:
                teacher = (m.get("inputs") or {}).get("teacher", {}).get("path")
                arm = {"ident": ident, "label": label, "points": {}, "own": False, "model": m.get("model"),
                       "attack": m.get("attack"), "teacher_acc": m.get("teacher_acc"),
                       "teacher": os.path.basename(os.path.dirname(teacher)) if teacher else None}
                arms.append(arm)
            arm["own"] = arm["own"] or folder == curve_root
            arm["points"].setdefault(m["epochs"], []).append({"acc": m["final_acc"], "seed": m.get("seed"), "run": path})
    # the arms the curve folder measures, and those the other folders hold at two schedules or more (e.g. the
    # preset's 3-epoch arms that a convergence folder measured longer); an arm of one point elsewhere is no curve
    arms = [a for a in arms if a["own"] or len(a["points"]) > 1]
    if not any(a["own"] for a in arms):
        raise UserError(f"{curve_root} holds no finished run (a folder with metrics.json); train the curve's runs first")
    out = {"arms": [], "rule": "the schedule is long enough where doubling the epochs gains < 1 point"}
    lines = [f"# Convergence: `{curve_root}`", "",
             "Final-epoch test accuracy (%) against the number of epochs (each a full run with its own one-cycle "
             "schedule), mean ± std (n seeds); Δ: gain over the previous point. The rule (issue: students trained "
             "to convergence): a schedule is long enough where doubling the epochs gains < 1 point.", "",
             "| arm | epochs | accuracy | Δ vs previous | runs |", "|---|---|---|---|---|"]
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.set_prop_cycle(color=plt.cm.tab20.colors)  # an arm per colour up to 20
    for arm in arms:
        epochs = sorted(arm["points"])
        means, prev, enough = [], None, None
        for e in epochs:
            accs = [p["acc"] for p in arm["points"][e]]
            mean, std = mean_std(accs)
            means.append(mean)
            gain = None if prev is None else mean - prev[1]
            if gain is not None and enough is None and e == 2 * prev[0] and gain < 1.0:
                enough = prev[0]
            lines.append(f"| {arm['label']} | {e} | {_seeded({'acc': mean, 'std': std, 'n': len(accs)})} | "
                         f"{_fmt(gain, signed=True) if gain is not None else '–'} | "
                         f"{', '.join(os.path.relpath(p['run']) for p in arm['points'][e])} |")
            prev = (e, mean)
        out["arms"].append({"label": arm["label"], "epochs": epochs, "mean": means, "enough_at": enough,
                            "points": {str(e): arm["points"][e] for e in epochs}})
        ax.plot(epochs, means, marker="o", label=arm["label"])
    lines.append("")
    for arm in out["arms"]:
        lines.append(f"- {arm['label']}: " + (f"long enough at {arm['enough_at']} epochs (doubling gains < 1 point)."
                                               if arm["enough_at"] else
                                               f"not flat within the measured epochs ({', '.join(map(str, arm['epochs']))}): "
                                               f"every doubling measured gained ≥ 1 point, or a doubling is missing."))
    _epoch_ticks(ax, {e for arm in out["arms"] for e in arm["epochs"]})
    _save_plot(fig, ax, "epochs (log 2)", "final test accuracy (%)", os.path.join(curve_root, "fig_convergence.png"),
               8, 120)
    sched = schedule(arms)
    if sched:
        out["schedule"] = sched
        lines += [""] + _schedule_lines(sched)
        _schedule_figure(sched, os.path.join(curve_root, "fig_schedule.png"))
        front = schedule_frontier(sched)
        out["frontier"] = front
        lines += [""] + _schedule_frontier_lines(front)
        _schedule_frontier_figure(front, os.path.join(curve_root, "fig_frontier_schedule.png"))
    atomic_write_text(os.path.join(curve_root, "curve.md"), "\n".join(lines) + "\n")
    atomic_write_json(os.path.join(curve_root, "curve.json"), out)
    return out


def _is_bar(arm):
    return arm["ident"]["script"] == "train_scratch.py" and bool(arm["ident"]["config"].get("label_smoothing"))


def schedule(arms):
    """Does a verdict depend on the schedule? Every KD arm against the label-smoothing student of its
    architecture at each schedule both were trained at (the verdict of METHOD.md section 8, seeds paired).
    Returns [{label, bar, rows: [{epochs, n, mean, std, diff, verdict, harmful, p, n_paired}], verdicts}]."""
    out = []
    for arm in arms:
        if arm["ident"]["script"] != "train_kd.py":
            continue
        model = arm["ident"]["config"].get("model")
        held = _thief(arm["ident"]["config"])
        bar = next((b for b in arms if _is_bar(b) and b["ident"]["config"].get("model") == model
                    and _thief(b["ident"]["config"]) == held), None)
        if bar is None:
            continue
        rows = []
        for e in sorted(set(arm["points"]) & set(bar["points"])):
            accs = [p["acc"] for p in arm["points"][e]]
            mean, std = mean_std(accs)
            test = verdict({p["seed"]: p["acc"] for p in arm["points"][e]},
                           {p["seed"]: p["acc"] for p in bar["points"][e]})
            rows.append({"epochs": e, "n": len(accs), "mean": mean, "std": std,
                         "diff": test["diff"], "verdict": test["verdict"], "harmful": test["harmful"],
                         "p": test["p"], "n_paired": test["n"]})
        if len(rows) > 1:
            out.append({"label": arm["label"], "bar": bar["label"], "rows": rows,
                        "verdicts": sorted({r["verdict"] for r in rows if r["verdict"]}),
                        **{k: arm[k] for k in ("model", "attack", "teacher", "teacher_acc")}})
    return out


def schedule_frontier(sched):
    """Per student architecture, teacher and schedule: the strongest attack measured at that schedule (the
    stolen student with the highest mean accuracy) against the bar of the same schedule, and whether every
    attack measured there is KD-resistant. The frontier of issue 16, schedule by schedule: a defence must hold
    where the students have trained long enough, not only at 3 epochs."""
    groups = {}
    for s in sched:
        groups.setdefault((s["model"], s["teacher"]), []).append(s)
    out = []
    for (model, teacher), arms in groups.items():
        by_epochs = {}  # epochs -> {attack: its row at those epochs}
        for s in arms:
            for r in s["rows"]:
                by_epochs.setdefault(r["epochs"], {})[s["attack"]] = r
        for e in sorted(by_epochs):
            at = by_epochs[e]
            best, resists_all = _strongest(at, "mean")
            out.append({"model": model, "teacher": teacher, "teacher_acc": arms[0]["teacher_acc"], "epochs": e,
                        "attacks": sorted(at), "strongest": best,
                        **{k: at[best][k] for k in ("n", "mean", "std", "diff", "verdict", "harmful", "p", "n_paired")},
                        "resists_all": resists_all})
    # teachers by accuracy, highest first; each teacher's schedules in order
    out.sort(key=lambda f: (f["model"], -(f["teacher_acc"] or 0), f["teacher"], f["epochs"]))
    return out


def _schedule_frontier_lines(front):
    lines = ["## The strongest attack on each teacher, schedule by schedule", "",
             "For each teacher and schedule, the attack whose student is the most accurate among the attacks of the "
             "table above (those trained at more than one schedule) at that schedule, against the label-smoothing "
             "student of the same schedule. A teacher holds at a schedule when every attack compared there is "
             "KD-resistant; read the attacks column before the verdict (two attacks are not the full battery).", "",
             "| student | teacher (acc) | epochs | attacks compared | strongest | its student | Δ vs bar | verdict (p) "
             "| every attack compared KD-resistant |", "|---|---|---|---|---|---|---|---|---|"]
    for f in front:
        lines.append(f"| {f['model']} | {f['teacher']} ({_fmt(f['teacher_acc'])}) | {f['epochs']} | "
                     f"{len(f['attacks'])}: {', '.join(f['attacks'])} | {f['strongest']} | "
                     f"{_seeded({'acc': f['mean'], 'std': f['std'], 'n': f['n']})} "
                     f"| {_fmt(f['diff'], signed=True)} | {_verdict_cell(f)} | {'yes' if f['resists_all'] else 'no'} |")
    return lines


def _schedule_frontier_figure(front, path):
    """Δ of each teacher's strongest attack against the bar, a marker per schedule, teachers in the order of
    their accuracy (written under each name)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    teachers = list(dict.fromkeys((f["model"], f["teacher"]) for f in front))  # in the table's order
    acc = {(f["model"], f["teacher"]): f["teacher_acc"] for f in front}
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(teachers)), 4.5))
    ax.axhline(0.0, color="black", lw=1, label="label-smoothing bar")
    markers = "os^Dv<>p*h"
    for i, e in enumerate(sorted({f["epochs"] for f in front})):
        pts = [(teachers.index((f["model"], f["teacher"])), f["diff"], len(f["attacks"])) for f in front if f["epochs"] == e]
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], marker=markers[i % len(markers)], s=50,
                   label=f"{e} epochs", zorder=3)
        for x, y, k in pts:
            ax.annotate(str(k), (x, y), textcoords="offset points", xytext=(6, -3), fontsize=7)
    names = [f"{t}\n{_fmt(acc[(m, t)])}" + (f"\n{m}" if len({m for m, _ in teachers}) > 1 else "") for m, t in teachers]
    ax.set_xticks(range(len(teachers)), names, fontsize=7)
    ax.set_title("strongest attack per teacher (the number beside a point: attacks compared)", fontsize=8)
    _save_plot(fig, ax, "teacher (test accuracy %)", "strongest stolen student − bar (points)", path, 8, 120)


def _schedule_lines(sched):
    lines = ["## Short against long schedule", "",
             "Every KD student against the label-smoothing student trained for the same number of epochs (the bar; "
             "seeds paired, one-sided paired t-test, METHOD.md section 8). A verdict of n = 1 has no test: above the "
             "bar it is inconclusive, at or below it KD-resistant by the rule, and either can flip with more seeds.", "",
             "| student | epochs | accuracy | Δ vs bar | verdict (p) |", "|---|---|---|---|---|"]
    for s in sched:
        for r in s["rows"]:
            lines.append(f"| {s['label']} | {r['epochs']} | {_seeded({'acc': r['mean'], 'std': r['std'], 'n': r['n']})} | "
                         f"{_fmt(r['diff'], signed=True)} | {_verdict_cell(r)} |")
    lines.append("")
    for s in sched:
        gaps = ", ".join(f"{_fmt(r['diff'], signed=True)} at {r['epochs']}" for r in s["rows"])
        above = {r["diff"] > 0 for r in s["rows"]}
        side = ("above the bar at every schedule measured" if above == {True} else
                "at or below the bar at every schedule measured" if above == {False} else
                "crosses the bar between schedules")
        words = "; the verdict: " + ", ".join(f"{r['verdict']} at {r['epochs']}" for r in s["rows"])
        lines.append(f"- {s['label']}: {side} ({gaps}){words}.")
    return lines


def _schedule_figure(sched, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.set_prop_cycle(color=plt.cm.tab20.colors)
    ax.axhline(0.0, color="black", lw=1, label="label-smoothing bar")
    for s in sched:
        ax.plot([r["epochs"] for r in s["rows"]], [r["diff"] for r in s["rows"]], marker="o", label=s["label"])
    _epoch_ticks(ax, {r["epochs"] for s in sched for r in s["rows"]})
    _save_plot(fig, ax, "epochs (log 2)", "student − label-smoothing student (points)", path, 7, 120)


def _epoch_ticks(ax, epochs):
    """A log-2 epoch axis ticked at the schedules measured, labelled in epochs."""
    ax.set_xscale("log", base=2)
    ticks = sorted(epochs)
    ax.set_xticks(ticks, [str(e) for e in ticks])
    ax.minorticks_off()


def threat_summary(out_root, folders):
    """Per teacher and threat model, the strongest attack (its stolen student the most accurate) against that
    threat model's bar, from the threat-model folders written by reproduce.py --threat. Writes OUT_ROOT/summary.md,
    summary.json and fig_threats.png (each teacher's strongest-attack Δ against the thief's images); returns the
    summary dict."""
    models_, teachers = [], []
    for folder in folders:
        res = collect(folder)
        threat = res.get("threat")
        if not threat:
            raise UserError(f"{folder}/steps.json names no threat model; pass folders written by "
                            f"reproduce.py --threat NAME")
        entry = {"folder": folder, "threat": threat, "seeds": res.get("seeds"), "rows": {}}
        for r in res["frontier"]:
            entry["rows"][f"{r['arch']}/{r['teacher']}"] = {
                "arch": r["arch"], "teacher": r["teacher"], "strongest": r["strongest"], "acc": r["acc"],
                "std": r["std"], "n": r["n"], "bar": r["bar"], "delta": r["delta_ls"], "verdict": r["verdict"],
                "p": r["p"], "attacks": r["attacks"], "resists_all": r["resists_all"]}
            if (r["arch"], r["teacher"]) not in teachers:
                teachers.append((r["arch"], r["teacher"]))
        models_.append(entry)
    summary = {"threat_models": models_}
    lines = ["# What the thief steals, threat model by threat model", "",
             "Each cell: the strongest attack on the teacher (the stolen student with the highest mean accuracy), its "
             "Δ against the threat model's bar (label smoothing with labels, the hard-label floor without) and its "
             "verdict (METHOD.md sections 8 and 10); **holds** when every attack is KD-resistant. Columns: "
             + "; ".join(f"`{m['threat']['name']}` = {m['threat']['title']} ({m['folder']})" for m in models_) + ".",
             "", "| student | teacher | " + " | ".join(f"`{m['threat']['name']}`" for m in models_) + " |",
             "|---|---|" + "---|" * len(models_)]
    for arch, teacher in teachers:
        cells = []
        for m in models_:
            r = m["rows"].get(f"{arch}/{teacher}")
            if r is None or r["delta"] is None:
                cells.append("–")
                continue
            word = "holds" if r["resists_all"] else (r["verdict"] or "no bar")
            cells.append(f"{r['strongest']} {r['delta']:+.2f} (n={r['n']}), {word}")
        lines.append(f"| {arch} | {TEACHER_NAMES[teacher]} | " + " | ".join(cells) + " |")
    lines += ["", "Figure: `fig_threats.png` (strongest-attack Δ against the thief's images, with and without labels).",
              f"Rebuild with `python report.py {out_root} --threats {' '.join(folders)}`.", ""]
    os.makedirs(out_root, exist_ok=True)
    atomic_write_json(os.path.join(out_root, "summary.json"), summary)
    atomic_write_text(os.path.join(out_root, "summary.md"), "\n".join(lines))
    _threat_figure(models_, teachers, os.path.join(out_root, "fig_threats.png"))
    return summary


def _threat_figure(models_, teachers, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, labels in zip(axes, (True, False)):
        for i, (arch, teacher) in enumerate(teachers):
            pts = sorted((m["threat"]["images"] or 50000, m["rows"][f"{arch}/{teacher}"]["delta"])
                         for m in models_ if m["threat"]["labels"] is labels and f"{arch}/{teacher}" in m["rows"]
                         and m["rows"][f"{arch}/{teacher}"]["delta"] is not None)
            if pts:
                ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", color=PALETTE[i % len(PALETTE)],
                        label=f"{TEACHER_NAMES[teacher]} ({arch})")
        ax.axhline(0, color="black", lw=0.8)
        ax.set_xscale("log")
        ax.set_title("thief with labels: Δ vs label smoothing" if labels else "thief without labels: Δ vs hard-label floor",
                     fontsize=9)
        ax.set_xlabel("thief's training images")
    axes[0].set_ylabel("strongest attack's student − bar (points)")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


@cli_main
def main(argv=None):
    import argparse
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("exp_root", help="a preset folder written by reproduce.py, e.g. exps/mini")
    parser.add_argument("--compare", metavar="REF", default=None,
                        help="another preset folder (e.g. the committed exps/mini): write EXP_ROOT/comparison.md "
                             "with every row beside REF's and the difference")
    parser.add_argument("--strict", action="store_true",
                        help="refuse (exit 2) when a row was trained from other weights than its teacher's")
    parser.add_argument("--curve", action="store_true",
                        help="EXP_ROOT holds runs of a few arms at several epoch counts: write curve.md, curve.json and "
                             "fig_convergence.png (final accuracy against epochs) instead of the results table")
    parser.add_argument("--with", dest="others", nargs="+", default=[], metavar="FOLDER",
                        help="with --curve: more points of the same arms from these folders (e.g. exps/mini)")
    parser.add_argument("--threats", nargs="+", default=None, metavar="FOLDER",
                        help="write EXP_ROOT/summary.md, summary.json and fig_threats.png: each teacher's strongest "
                             "attack in each of these threat-model folders (reproduce.py --threat)")
    parser.error = lambda message: (_ for _ in ()).throw(UserError(f"{message}; usage: python report.py "
                                                                   f"exps/<preset> [--compare REF] [--strict]"))
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.threats:
        for folder in args.threats:
            if not os.path.isfile(os.path.join(folder, "steps.json")):
                raise UserError(f"--threats {folder}: no steps.json there; pass folders written by reproduce.py --threat")
        threat_summary(args.exp_root, args.threats)
        print(open(os.path.join(args.exp_root, "summary.md")).read(), end="")
        return 0
    for folder in (args.exp_root, args.compare):
        if folder is not None and not os.path.isdir(folder):
            raise UserError(f"{folder} is not a folder; pass a preset folder, e.g. exps/mini")
    if args.curve:
        for folder in args.others:
            if not os.path.isdir(folder):
                raise UserError(f"--with {folder} is not a folder")
        curve(args.exp_root, args.others)
        print(open(os.path.join(args.exp_root, "curve.md")).read(), end="")
        return 0
    res = build(args.exp_root, strict=args.strict)
    print(f"wrote {os.path.join(args.exp_root, 'results.md')}, results.json and figures")
    if args.compare:
        text = comparison(res, collect(args.compare), args.exp_root, args.compare)
        atomic_write_text(os.path.join(args.exp_root, "comparison.md"), text)
        print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
