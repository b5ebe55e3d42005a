"""screen.md: the tables of a screening schedule (reproduce.py --schedule mini_rml_screen), rebuilt from its run
folders alone. Every teacher the schedule fine-tuned, with its settings, its accuracy against its original's,
against the plain cross-entropy control on the same images and schedule where the schedule has one, and the
reversal diagnostics; then every student distilled from those teachers."""
import os

from utils.checkpoint import atomic_write_json, atomic_write_text
from utils.defences import DEFENCES
from utils.errors import UserError

from .cells import fmt, precision
from .collect import read_manifest, read_run

# A teacher's settings as the table names them: (config key, column)
SETTINGS = (("method", "method"), ("alpha", "α"), ("beta", "β"), ("gamma", "γ"), ("tau", "τ"), ("lr", "peak lr"),
            ("epochs", "epochs"), ("subset", "images"))


def _is_control(cfg):
    """A fine-tune with every loss weight of its defence at 0: plain cross-entropy on the same schedule."""
    defence = DEFENCES.get(cfg.get("method"))
    weights = [k for k in ("alpha", "beta", "gamma", "omega") if defence is not None and k in defence.keys]
    return bool(weights) and all(float(cfg.get(k) or 0.0) == 0.0 for k in weights)


def _schedule_key(cfg):
    """What a teacher shares with the control it is compared with: its images, epochs and the original it tunes."""
    return cfg.get("subset") or 0, cfg.get("subset_seed"), cfg.get("epochs"), cfg.get("original")


def screen(exp_root):
    """Write EXP_ROOT/screen.md and screen.json from the run folders its steps.json lists; return the rows."""
    manifest, teachers_root = read_manifest(exp_root)
    teachers, students, missing = [], [], []
    for step in manifest["steps"]:
        kind = step["role"].get("kind")
        if kind == "teacher" and step["script"] == "train_scratch.py":
            continue  # the original: the teachers' own rows carry its accuracy
        root = teachers_root if kind == "teacher" else exp_root
        run = read_run(root, step["name"])
        if run is None:
            missing.append(os.path.relpath(os.path.join(root, step["name"]), exp_root))
            continue
        m = run["metrics"]
        cfg = m.get("config") or {}
        row = {"run": os.path.relpath(os.path.join(root, step["name"]), exp_root), "acc": run["acc"],
               "precision": precision(m), "wall_time_s": run["seconds"], "git_commit": m.get("git_commit"),
               "inputs": run.get("inputs", m.get("inputs"))}
        if kind == "teacher":
            diag = m.get("final_diagnostics") or {}
            row.update({key: cfg.get(key) for key, _ in SETTINGS}, original_acc=m.get("original_acc"),
                       kendall=diag.get("kendall"), reversed_top1=diag.get("reversed_top1"),
                       control=_is_control(cfg), schedule=list(_schedule_key(cfg)))
            teachers.append(row)
        else:
            path = (row["inputs"] or {}).get("teacher", {}).get("path") or m.get("teacher") or cfg.get("teacher")
            row.update(attack=step["role"].get("attack") or m.get("attack"), tau=run["tau"],
                       teacher=os.path.relpath(os.path.dirname(path), os.path.dirname(exp_root)) if path else "?",
                       teacher_acc=m.get("teacher_acc"))
            students.append(row)
    if not teachers and not students:
        raise UserError(f"{exp_root}: none of its runs has finished (no metrics.json); train them first")
    controls = {tuple(t["schedule"]): t["acc"] for t in teachers if t["control"]}
    for t in teachers:
        c = controls.get(tuple(t["schedule"]))
        t["delta_control"] = None if c is None or t["control"] else round(t["acc"] - c, 2)
        t["delta_original"] = None if t["original_acc"] is None else round(t["acc"] - t["original_acc"], 2)
    out = {"teachers": teachers, "students": students, "missing": missing}
    atomic_write_json(os.path.join(exp_root, "screen.json"), out)
    atomic_write_text(os.path.join(exp_root, "screen.md"), _markdown(exp_root, out))
    return out


def _markdown(exp_root, out):
    lines = [f"# Screening: `{exp_root}`", "",
             "Final-epoch test accuracy (%), one seed. Teachers: Δ against the original each was fine-tuned from, and "
             "against the plain cross-entropy fine-tune on the same images and schedule (α = β = γ = 0) where the "
             "screen has one; Kendall τ between the teacher's non-target order and the original's (the original "
             "itself: +1) and the share of test images whose top non-target class is the original's lowest one "
             "(chance 11.1% on 10 classes).", "",
             "| run | " + " | ".join(col for _, col in SETTINGS) + " | test acc | Δ vs original | Δ vs CE control "
             "| Kendall τ | original's lowest on top | precision | wall time |",
             "|---" * (len(SETTINGS) + 8) + "|"]
    for t in out["teachers"]:
        settings = [_setting(k, t[k]) for k, _ in SETTINGS]
        control = "control" if t["control"] else fmt(t["delta_control"], signed=True)
        lines.append(f"| `{t['run']}` | " + " | ".join(settings) + f" | {t['acc']:.2f} | "
                     f"{fmt(t['delta_original'], signed=True)} | {control} | {fmt(t['kendall'], '{:+.3f}')} | "
                     f"{fmt(t['reversed_top1'], '{:.1%}')} | {t['precision']} | {_secs(t['wall_time_s'])} |")
    if out["students"]:
        lines += ["", "Students distilled from the screened teachers (the preset's student schedule; the wall time of "
                  "a student trained in a battery is its share of the battery's):", "",
                  "| run | attack | τ | teacher (its acc) | test acc | precision | wall time |",
                  "|---|---|---|---|---|---|---|"]
        for s in out["students"]:
            lines.append(f"| `{s['run']}` | {s['attack']} | {fmt(s['tau'], '{:g}')} | `{s['teacher']}` "
                         f"({fmt(s['teacher_acc'])}) | {s['acc']:.2f} | {s['precision']} | "
                         f"{_secs(s['wall_time_s'])} |")
    if out["missing"]:
        lines += ["", "Not finished yet: " + ", ".join(f"`{r}`" for r in out["missing"]) + "."]
    return "\n".join(lines) + "\n"


def _setting(key, value):
    if key == "subset" and not value:
        return "all"
    return "–" if value is None else (format(value, "g") if isinstance(value, (int, float)) else str(value))


def _secs(x):
    return fmt(x, "{:.0f} s")
