"""results.md: the table of docs/METHOD.md section 5, a piece per section."""
from utils.stats import ALPHA, MIN_SEEDS, RULE

from .cells import (below_cell, chosen_note, count, few_seeds_note, fmt, precision_mark, provenance_mark, seeded,
                    tau_cell, verdict_cell)
from .names import TEACHER_NAMES, count_attacks, kd_arms, teacher_order
from .verdicts import bar_name, bar_of, bar_text, floor_of


def markdown(res, extra=None):
    """results.md of a collected folder: the teachers, a table per student architecture, DFAD, the frontier,
    which teachers resist which attacks, provenance and compute; extra: what reproduce.py recorded of its run."""
    lines = _header_lines(res) + _precision_lines(res) + _teacher_lines(res)
    for arch, s in res["students"].items():
        lines += (_threat_student_lines if res.get("threat") else _student_lines)(res, arch, s)
    lines += _dfad_lines(res)
    lines += _frontier_lines(res)
    resistant = _resistance_lines(res)
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


def _kd_rows_text(res):
    """How the KD rows' temperature was chosen: a sweep picked on the test split (an upper bound), the thief's
    own held-out images (val N), or none (the τ the arm was run at)."""
    arms = list(kd_arms(*res["students"].values()))
    if any(a.get("per_tau") and not a.get("chosen") for a in arms):
        return "KD rows: the thief's best temperature, picked on the test split (an upper bound for the attack)."
    if any(a.get("chosen") for a in arms):
        return ("KD rows: at the temperature in the τ column; one marked (val N) is the thief's own pick, made on "
                "N of its training images held out.")
    return "KD rows: at the temperature in the τ column (no sweep)."


def _header_lines(res):
    lines = [f"# Results: preset `{res['preset']}`", ""]
    seeds = res.get("seeds", [0])
    lines += ["Final-epoch top-1 test accuracy (%); student rows are mean ± std (n seeds) over seeds "
              f"{', '.join(map(str, seeds))}. {_kd_rows_text(res)}", "", RULE, ""]
    threat = res.get("threat")
    if threat:
        lines += [f"**Threat model `{threat['name']}`: {threat['title']}.** Every student arm holds the same "
                  f"{threat['images'] or 'training'} images (a class-balanced draw with the student's seed); the "
                  f"thief {'has' if threat['labels'] else 'has no'} labels. Verdicts are against "
                  f"{bar_text(res)}; every row also shows its Δ against the other bar "
                  f"(METHOD.md section 10).", ""]
    return lines


def _precision_lines(res):
    """Which precision the runs trained in: one line when every student agrees; when they do not, which ran in
    which, and the rows that ran in another precision than their bar are marked."""
    kinds = {}
    for name, run in res.get("runs", {}).items():
        kinds.setdefault("teacher" if run["role"]["kind"] == "teacher" else "student", {}).setdefault(
            run["precision"], []).append(name)
    if not kinds.get("student"):
        return []

    def count(group):
        return ", ".join(f"{p} ({len(names)} run{'s' * (len(names) > 1)})" for p, names in sorted(group.items()))

    teachers = f"; the teachers: {count(kinds['teacher'])}" if kinds.get("teacher") else ""
    if len(kinds["student"]) == 1:
        return [f"Precision: every student run in {count(kinds['student'])}{teachers}.", ""]
    return [f"Precision: **mixed**, the students in {count(kinds['student'])}{teachers}. A student row marked "
            "[fp32] (or [bf16], [fp16]) ran in another precision than its bar: precision moves a row about as much "
            "as a seed does (docs/RESULTS.md, \"Which schedule, within which budget?\"), so its Δ and verdict "
            "compare unlike runs; re-run it in its bar's precision (reproduce.py --amp).", ""]


def _teacher_lines(res):
    lines = ["## Teachers", "",
             "| teacher | test acc | Δ vs original | Kendall τ vs original (non-target order) | reversed top-1 | "
             "non-target entropy | ECE |", "|---|---|---|---|---|---|---|"]
    for key in teacher_order(res):
        t = res["teachers"].get(key)
        if t:
            mark = provenance_mark(res.get("provenance", {}).get(t["folder"], {}))
            lines.append(f"| {TEACHER_NAMES[key]} | {fmt(t['acc'])}{mark} | "
                         f"{fmt(t['delta'], signed=True) if key != 'original' else '–'} | "
                         f"{fmt(t['kendall'], '{:.3f}')} | {fmt(t['reversed_top1'], '{:.3f}')} | "
                         f"{fmt(t['nt_entropy'], '{:.3f}')} | {fmt(t['ece'], '{:.3f}')} |")
    return lines


def _student_lines(res, arch, s):
    """A student architecture's table: every attack x teacher against scratch and the label-smoothing bar."""
    lines = ["", f"## Student `{arch}`", "",
             f"Scratch: **{seeded(s.get('scratch'))}**, label smoothing 0.1 (the bar): "
             f"**{seeded(s.get('ls'))}**.", "",
             "| teacher | attack | student acc | best τ | Δ vs scratch | Δ vs label smoothing | verdict (p) |",
             "|---|---|---|---|---|---|---|"]
    for teacher in teacher_order(res):
        for attack, a in s["kd"].get(teacher, {}).items():
            lines.append(f"| {TEACHER_NAMES[teacher]} | {attack} | {seeded(a)}{provenance_mark(a)}"
                         f"{precision_mark(a, s.get('ls'))} | {tau_cell(a, attack)} | "
                         f"{fmt(a['delta_scratch'], signed=True)} | {fmt(a['delta_ls'], signed=True)} | "
                         f"{verdict_cell(a)} |")
    return lines + chosen_note(s)


def _threat_student_lines(res, arch, s):
    """A student architecture's table in a threat model: every row against both bars, the verdict against the
    threat model's (METHOD.md section 10)."""
    floor_is_bar = res["threat"]["bar"] == "hardlabel"
    lines = ["", f"## Student `{arch}`", "",
             f"Scratch: **{seeded(s.get('scratch'))}**, label smoothing 0.1"
             f"{'' if floor_is_bar else ' (the bar)'}: **{seeded(s.get('ls'))}**, hard-label floor"
             f"{' (the bar)' if floor_is_bar else ''}: **{seeded(floor_of(res, s))}**.", "",
             "| teacher | attack | student acc | best τ | Δ vs label smoothing | Δ vs hard-label floor | "
             "verdict (p) |", "|---|---|---|---|---|---|---|"]
    for teacher in teacher_order(res):
        for attack, a in s["kd"].get(teacher, {}).items():
            cell = "the bar" if a is bar_of(res, s) else verdict_cell(a)
            lines.append(f"| {TEACHER_NAMES[teacher]} | {attack} | {seeded(a)}{provenance_mark(a)}"
                         f"{precision_mark(a, bar_of(res, s))} | {tau_cell(a, attack)} | "
                         f"{fmt(a['delta_ls'], signed=True)} | "
                         f"{fmt(a.get('delta_floor'), signed=True)} | {cell} |")
    return lines + chosen_note(s)


def _dfad_lines(res):
    if not res["dfad"]:
        return []
    lines = ["", "## Data-free (DFAD)", "",
             "The data-free claim: a defended teacher's DFAD student against the original's, paired by seed "
             f"(one-sided paired t-test, below it at p < {ALPHA}).", "",
             "| teacher | student | budget | student acc | Δ vs the original's | below it? |",
             "|---|---|---|---|---|---|"]
    for teacher, d in res["dfad"].items():
        budget = (f"{d['epochs']} × {d['iters_per_epoch']} generator iterations"
                  if d.get("epochs") and d.get("iters_per_epoch") else "–")
        lines.append(f"| {TEACHER_NAMES[teacher]} | {d['arch']} | {budget} | {seeded(d)}{provenance_mark(d)} | "
                     f"{fmt(d.get('delta_original'), signed=True)} | {below_cell(d)} |")
    return lines


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
    shared = res.get("shared_runs") or {}
    lines += [f"| {name} | {sec / 60:.1f} |" if sec is not None else f"| {name} | – (the runs of {shared[name]}) |"
              for name, sec in res["compute"].items() if sec is not None or name in shared]
    lines += ["", f"Sum of the step times: **{sum(timed.values()) / 60:.1f} min** (what the chain costs one step "
                  f"at a time, on the hardware each step ran on; a student trained in a shared-teacher battery counts "
                  f"its share, the battery's wall time over its students" +
                  ("; a step marked – holds the same runs as the step it names, counted once there" if shared else "")
                  + ")."]
    if extra.get("reproduce_wall_time_s") is not None:
        jobs = extra.get("jobs", 1)
        lines.append(f"The last `reproduce.py` run took **{extra['reproduce_wall_time_s'] / 60:.1f} min** of wall "
                     f"time with `--jobs {jobs}` (steps it found finished were skipped, not timed).")
    return lines


def _resistance_lines(res):
    """A line per student architecture and teacher whose every attack has a verdict: what it resists."""
    out = []
    for arch, s in res["students"].items():
        for teacher in teacher_order(res):
            attacks = s["kd"].get(teacher, {})
            if not attacks or any(a["verdict"] is None for a in attacks.values()):
                continue
            by = {word: [k for k, a in attacks.items() if a["verdict"] == word]
                  for word in ("distillable", "inconclusive", "KD-resistant")}
            if not by["distillable"] and not by["inconclusive"]:
                n = count_attacks(attacks)  # the self-tuning thief's two rules are one attack
                every = ("all " if n > 1 else "") + count(n, "attack")
                out.append(f"- {TEACHER_NAMES[teacher]} → `{arch}`: **KD-resistant** against {every} "
                           f"({', '.join(attacks)}).")
                continue
            parts = []
            if by["distillable"]:
                parts.append(f"**distillable** by {', '.join(by['distillable'])}")
            few = [k for k in by["inconclusive"] if attacks[k]["n_paired"] < MIN_SEEDS]
            if few:
                parts.append(f"above the bar on fewer than {MIN_SEEDS} seeds (inconclusive) with {', '.join(few)}")
            tested = [k for k in by["inconclusive"] if k not in few]
            if tested:
                parts.append(f"above the bar but not significantly (inconclusive) with {', '.join(tested)}")
            if by["KD-resistant"]:
                parts.append(f"resists {', '.join(by['KD-resistant'])}")
            out.append(f"- {TEACHER_NAMES[teacher]} → `{arch}`: " + "; ".join(parts) + ".")
    return out


def _frontier_lines(res):
    rows_ = res["frontier"]
    if not rows_:
        return []
    lines = ["", "## Defences at a glance: the strongest attack on each teacher", "",
             "Each teacher's accuracy beside the stolen student of the attack that steals the most from it (furthest "
             "above the bar, paired by seed: an attack run on fewer seeds is ranked on the seeds it has); the goal "
             "is a teacher within 0.5 point of the original whose strongest attack stays at "
             f"or below {'the label-smoothing bar' if bar_name(res) == 'ls' else 'the bar, ' + bar_text(res)} "
             "(`fig_frontier.png`).", "",
             "| student | teacher | teacher acc (Δ vs original) | strongest attack | its student | Δ vs bar | "
             "verdict (p) | every attack KD-resistant |", "|---|---|---|---|---|---|---|---|"]
    for r in rows_:
        delta = "" if r["teacher"] == "original" else f" ({fmt(r['teacher_delta'], signed=True)})"
        entry = {"acc": r["acc"], "std": r["std"], "n": r["n"]}
        held = f"yes ({_attacks_held(r)})" if r["resists_all"] else f"no ({count(r['attacks'], 'attack')})"
        lines.append(f"| `{r['arch']}` | {TEACHER_NAMES[r['teacher']]} | {fmt(r['teacher_acc'])}{delta} | "
                     f"{r['strongest']} | {seeded(entry)}{precision_mark(r, {'precision': r.get('bar_precision')})} | "
                     f"{fmt(r['delta_ls'], signed=True)} | "
                     f"{verdict_cell({'verdict': r['verdict'], 'p': r['p'], 'n_paired': r['n']})} | "
                     f"{held} |")
    return lines


def _attacks_held(r):
    """'2 attacks' or '2 attacks, 1 on fewer than 3 seeds': what a teacher that resists every attack was judged on."""
    few = few_seeds_note(r)
    return count(r["attacks"], "attack") + (f", {few}" if few else "")
