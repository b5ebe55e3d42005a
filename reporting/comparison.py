"""comparison.md: every row of a run beside the same row of a reference folder (e.g. a re-run beside the
committed one), with the difference and the verdicts that differ."""
from .cells import fmt
from .names import TEACHER_NAMES


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
        lines.append(f"| {label} | {fmt(acc)} | {fmt(other)} | {fmt(delta, signed=True)} | {word or '–'} | "
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
