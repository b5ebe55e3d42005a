"""summary.md: per teacher and threat model, the strongest attack against that threat model's bar, from the
folders written by reproduce.py --threat."""
import os

from utils.checkpoint import atomic_write_json, atomic_write_text
from utils.errors import UserError
from utils.stats import MIN_SEEDS

from .cells import count, few_seeds_note
from .collect import collect
from .figures import threat_figure
from .names import TEACHER_NAMES


def threat_summary(out_root, folders):
    """Per teacher and threat model, the strongest attack (its stolen student furthest above the bar, paired by
    seed) against that threat model's bar, from the threat-model folders written by reproduce.py --threat.
    Writes OUT_ROOT/summary.md, summary.json and fig_threats.png (each teacher's strongest-attack Δ against the
    thief's images); returns the summary dict."""
    models_, teachers = [], []
    for folder in folders:
        res = collect(folder)
        threat = res.get("threat")
        if not threat:
            raise UserError(f"{folder}/steps.json names no threat model; pass folders written by "
                            f"reproduce.py --threat NAME")
        entry = {"folder": folder, "threat": threat, "seeds": res.get("seeds"), "rows": {}}
        for r in res["frontier"]:
            attacks = res["students"][r["arch"]]["kd"][r["teacher"]]
            entry["rows"][f"{r['arch']}/{r['teacher']}"] = {
                "arch": r["arch"], "teacher": r["teacher"], "strongest": r["strongest"], "acc": r["acc"],
                "std": r["std"], "n": r["n"], "bar": r["bar"], "delta": r["delta_ls"], "verdict": r["verdict"],
                "p": r["p"], "attacks": r["attacks"], "resists_all": r["resists_all"],
                "attacks_few_seeds": r["attacks_few_seeds"],
                "distillable_by": [a for a, row in attacks.items() if row.get("verdict") == "distillable"]}
            if (r["arch"], r["teacher"]) not in teachers:
                teachers.append((r["arch"], r["teacher"]))
        models_.append(entry)
    summary = {"threat_models": models_}
    lines = ["# What the thief steals, threat model by threat model", "",
             "Each cell: the strongest attack on the teacher (the stolen student furthest above the bar, paired by "
             "seed), its "
             "Δ against the threat model's bar (label smoothing with labels, the hard-label floor without) and its "
             "verdict (METHOD.md sections 8 and 10); **holds** when every attack is KD-resistant (over how many "
             f"attacks: the battery is not always complete), *distillable by* the attacks whose verdict is "
             f"distillable where the strongest is not yet (its n < {MIN_SEEDS}, or not significant). Columns: "
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
            cells.append(summary_cell(r))
        lines.append(f"| {arch} | {TEACHER_NAMES[teacher]} | " + " | ".join(cells) + " |")
    lines += ["",
              "Figure: `fig_threats.png` (strongest-attack Δ against the thief's images, with and without labels).",
              f"Rebuild with `python report.py {out_root} --threats {' '.join(folders)}`.", ""]
    os.makedirs(out_root, exist_ok=True)
    atomic_write_json(os.path.join(out_root, "summary.json"), summary)
    atomic_write_text(os.path.join(out_root, "summary.md"), "\n".join(lines))
    threat_figure(models_, teachers, os.path.join(out_root, "fig_threats.png"))
    return summary


def summary_cell(r):
    """One teacher at one threat model: its strongest attack, that attack's Δ against the bar (n seeds), and the
    teacher's standing: holds against every attack run (how many), or the strongest attack's verdict, followed by
    the attacks already distillable when the strongest is not (a strongest attack on one seed does not hide a
    verdict reached on three). A hold says how many of its attacks ran on fewer than three seeds: below the bar on
    one seed is KD-resistant by the rule (METHOD.md section 8), but no test has judged it."""
    if r["resists_all"]:
        few = few_seeds_note(r)
        word = f"holds against {count(r['attacks'], 'attack')}" + (f" ({few})" if few else "")
    else:
        word = r["verdict"] or "no bar"
        others = [a for a in r.get("distillable_by", []) if a != r["strongest"]]
        if others and r["verdict"] != "distillable":
            word += f"; distillable by {', '.join(others)}"
    return f"{r['strongest']} {r['delta']:+.2f} (n={r['n']}), {word}"
