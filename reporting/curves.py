"""curve.md: final accuracy against the schedule length for every arm of a convergence folder (report.py --curve),
each KD arm against the label-smoothing student of its own schedule, and the strongest attack on each teacher
schedule by schedule."""
import os

from utils.checkpoint import atomic_write_json, atomic_write_text, read_json
from utils.config import changed_result_key
from utils.errors import UserError
from utils.stats import mean_std, verdict

from .cells import fmt, seeded, verdict_cell
from .figures import convergence_figure, schedule_figure, schedule_frontier_figure
from .names import count_attacks
from .verdicts import strongest


# Keys that may differ between the points of one curve beside those that do not change a result
# (changed_result_key): the schedule length and the seed; the teacher is compared by the digest of the weights
# the run loaded.
CURVE_FREE_KEYS = frozenset({"epochs", "seed", "teacher"})


def _curve_arm(m):
    """(what identifies a run's arm, label): its script, teacher weights and every setting but the epochs and
    the seed. Two runs are of one arm when these agree on every key both record (a run made before a key was
    added to its script, e.g. an attack's new option, still joins its arm)."""
    cfg = m.get("config") or {}
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
    common = set(a["config"]) & set(b["config"])
    return changed_result_key(a["config"], b["config"], keys=common, ignore=CURVE_FREE_KEYS) is None


def _finished_runs(folder):
    """(run folder, metrics) of every finished student run in folder (DFAD has no place on a curve)."""
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
            arm["points"].setdefault(m["epochs"], []).append(
                {"acc": m["final_acc"], "seed": m.get("seed"), "run": path})
    # the arms the curve folder measures, and those the other folders hold at two schedules or more (e.g. the
    # preset's 3-epoch arms that a convergence folder measured longer); an arm of one point elsewhere is no curve
    arms = [a for a in arms if a["own"] or len(a["points"]) > 1]
    if not any(a["own"] for a in arms):
        raise UserError(f"{curve_root} holds no finished run (a folder with metrics.json); "
                        "train the curve's runs first")
    out = {"arms": [], "rule": "the schedule is long enough where doubling the epochs gains < 1 point"}
    lines = [f"# Convergence: `{curve_root}`", "",
             "Final-epoch test accuracy (%) against the number of epochs (each a full run with its own one-cycle "
             "schedule), mean ± std (n seeds); Δ: gain over the previous point. The rule (docs/METHOD.md section "
             "8): a schedule is long enough where doubling the epochs gains < 1 point.", "",
             "| arm | epochs | accuracy | Δ vs previous | runs |", "|---|---|---|---|---|"]
    for arm in arms:
        epochs = sorted(arm["points"])
        means, prev, enough, doublings = [], None, None, []
        for e in epochs:
            accs = [p["acc"] for p in arm["points"][e]]
            mean, std = mean_std(accs)
            means.append(mean)
            gain = None if prev is None else mean - prev[1]
            if gain is not None and e == 2 * prev[0]:
                doublings.append((prev[0], e, gain))
                if enough is None and gain < 1.0:
                    enough = prev[0]
            lines.append(f"| {arm['label']} | {e} | {seeded({'acc': mean, 'std': std, 'n': len(accs)})} | "
                         f"{fmt(gain, signed=True) if gain is not None else '–'} | "
                         f"{', '.join(os.path.relpath(p['run']) for p in arm['points'][e])} |")
            prev = (e, mean)
        out["arms"].append({"label": arm["label"], "epochs": epochs, "mean": means, "enough_at": enough,
                            "doublings": [list(d) for d in doublings],
                            "points": {str(e): arm["points"][e] for e in epochs}})
    lines.append("")
    for arm in out["arms"]:
        lines.append(f"- {arm['label']}: {_rule_line(arm)}")
    convergence_figure(out["arms"], os.path.join(curve_root, "fig_convergence.png"))
    sched = schedule(arms)
    if sched:
        out["schedule"] = sched
        lines += [""] + _schedule_lines(sched)
        schedule_figure(sched, os.path.join(curve_root, "fig_schedule.png"))
        front = schedule_frontier(sched)
        out["frontier"] = front
        lines += [""] + _schedule_frontier_lines(front)
        schedule_frontier_figure(front, os.path.join(curve_root, "fig_frontier_schedule.png"))
    atomic_write_text(os.path.join(curve_root, "curve.md"), "\n".join(lines) + "\n")
    atomic_write_json(os.path.join(curve_root, "curve.json"), out)
    return out


def _rule_line(arm):
    """What the rule says of one arm: long enough at the first doubling that gains < 1 point; not flat where every
    doubling measured gains more; and, where no two measured schedules are a doubling apart, that it cannot say."""
    measured = ", ".join(map(str, arm["epochs"]))
    if arm["enough_at"]:
        return f"long enough at {arm['enough_at']} epochs (doubling gains < 1 point)."
    if not arm["doublings"]:
        return (f"no doubling measured (epochs {measured}): the rule cannot say whether the longest schedule is long "
                f"enough.")
    gains = ", ".join(f"{a}→{b} {fmt(g, signed=True)}" for a, b, g in arm["doublings"])
    return f"not flat within the measured epochs ({measured}): every doubling measured gained ≥ 1 point ({gains})."


def _is_bar(arm):
    """Whether an arm is a label-smoothing student: the bar of the schedule table."""
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
    stolen student furthest above the bar, paired by seed: verdicts.strongest) against the bar of the same
    schedule, and whether every attack measured there is KD-resistant. The frontier, schedule by schedule: a
    defence must hold where the students have trained long enough, not only at 3 epochs."""
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
            best, resists_all = strongest(at, "mean", {a: r["diff"] for a, r in at.items()})
            out.append({"model": model, "teacher": teacher, "teacher_acc": arms[0]["teacher_acc"], "epochs": e,
                        "attacks": sorted(at), "strongest": best,
                        **{k: at[best][k] for k in ("n", "mean", "std", "diff", "verdict", "harmful", "p", "n_paired")},
                        "resists_all": resists_all})
    # teachers by accuracy, highest first; each teacher's schedules in order
    out.sort(key=lambda f: (f["model"], -(f["teacher_acc"] or 0), f["teacher"], f["epochs"]))
    return out


def _schedule_frontier_lines(front):
    lines = ["## The strongest attack on each teacher, schedule by schedule", "",
             "For each teacher and schedule, the attack whose student is furthest above the bar (paired by seed) among "
             "the attacks of the table above (those trained at more than one schedule) at that schedule, against the "
             "label-smoothing student of the same schedule. A teacher holds at a schedule when every attack compared "
             "there is KD-resistant; read the attacks column before the verdict (two attacks are not the full "
             "battery).", "",
             "| student | teacher (acc) | epochs | attacks compared | strongest | its student | Δ vs bar | "
             "verdict (p) | every attack compared KD-resistant |", "|---|---|---|---|---|---|---|---|---|"]
    for f in front:
        lines.append(f"| {f['model']} | {f['teacher']} ({fmt(f['teacher_acc'])}) | {f['epochs']} | "
                     f"{count_attacks(f['attacks'])}: {', '.join(f['attacks'])} | {f['strongest']} | "
                     f"{seeded({'acc': f['mean'], 'std': f['std'], 'n': f['n']})} "
                     f"| {fmt(f['diff'], signed=True)} | {verdict_cell(f)} | {'yes' if f['resists_all'] else 'no'} |")
    return lines


def _schedule_lines(sched):
    lines = ["## Short against long schedule", "",
             "Every KD student against the label-smoothing student trained for the same number of epochs (the bar; "
             "seeds paired, one-sided paired t-test, METHOD.md section 8). A verdict of n = 1 has no test: above the "
             "bar it is inconclusive, at or below it KD-resistant by the rule, and either can flip with more seeds.",
             "", "| student | epochs | accuracy | Δ vs bar | verdict (p) |", "|---|---|---|---|---|"]
    for s in sched:
        for r in s["rows"]:
            lines.append(f"| {s['label']} | {r['epochs']} | "
                         f"{seeded({'acc': r['mean'], 'std': r['std'], 'n': r['n']})} | "
                         f"{fmt(r['diff'], signed=True)} | {verdict_cell(r)} |")
    lines.append("")
    for s in sched:
        gaps = ", ".join(f"{fmt(r['diff'], signed=True)} at {r['epochs']}" for r in s["rows"])
        above = {r["diff"] > 0 for r in s["rows"]}
        side = ("above the bar at every schedule measured" if above == {True} else
                "at or below the bar at every schedule measured" if above == {False} else
                "crosses the bar between schedules")
        words = "; the verdict: " + ", ".join(f"{r['verdict']} at {r['epochs']}" for r in s["rows"])
        lines.append(f"- {s['label']}: {side} ({gaps}){words}.")
    return lines
