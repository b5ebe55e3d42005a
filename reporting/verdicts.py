"""What a stolen student is judged against (the bar of the threat model), the strongest attack on each teacher
(the frontier), and the data-free claim (a defended teacher's DFAD student below the original's).
"""
from utils.stats import MIN_SEEDS, verdict

from .names import TEACHER_NAMES, count_attacks, teacher_order


BAR_NAMES = {"ls": "label smoothing 0.1 on the true labels",
             "hardlabel": "the hard-label floor (KD on the original's argmax alone)"}


def bar_name(res):
    """The verdicts' bar: 'ls' (label smoothing), or 'hardlabel' for a thief without labels (METHOD.md section 10)."""
    return (res.get("threat") or {}).get("bar", "ls")


def floor_teacher(res):
    """Whose argmax the hard-label floor learns from: the original's, or (judge.py without an original) the
    judged teacher's own, as the threat model's record says."""
    return (res.get("threat") or {}).get("floor_teacher", "original")


def hard_label_floor(student, teacher="original"):
    """The hard-label floor of a student architecture: its hard-label KD from `teacher` ({} when not run)."""
    return student["kd"].get(teacher, {}).get("hardlabel") or {}


def floor_of(res, student):
    """The hard-label floor of a student architecture in a collected folder (its threat model says whose)."""
    return hard_label_floor(student, floor_teacher(res))


def bar_text(res):
    """The verdicts' bar in words."""
    name, teacher = bar_name(res), floor_teacher(res)
    if name == "hardlabel" and teacher != "original":
        return f"the hard-label floor (KD on the argmax of the judged teacher, {TEACHER_NAMES[teacher]}, alone)"
    return BAR_NAMES[name]


def bar_of(res, student):
    """The arm a student architecture's verdicts are against: its label-smoothing student, or the hard-label floor
    for a thief without labels ({} when not run)."""
    return floor_of(res, student) if bar_name(res) == "hardlabel" else (student.get("ls") or {})


def paired_delta(row, ref):
    """Δ of an arm ({accs: {seed: acc}, acc}) against a reference arm: the mean of the seed-by-seed differences over
    the seeds both hold (what the verdict tests: an arm on seed 0 alone is compared with the bar's seed 0, not with
    its mean over three), the difference of the means where they share no seed, None without a reference."""
    if not ref or ref.get("acc") is None or row.get("acc") is None:
        return None
    diff = verdict(row.get("accs") or {}, ref.get("accs") or {})["diff"]
    return row["acc"] - ref["acc"] if diff is None else diff


def dfad_against_original(dfad):
    """The data-free claim: is a defended teacher's DFAD student below the original's? Paired by seed, the
    one-sided paired t-test of METHOD.md section 8 in the other direction (delta_original, p_below, n_paired)."""
    base = dfad.get("original")
    for teacher, d in dfad.items():
        if teacher == "original" or base is None:
            continue
        test = verdict(d["accs"], base["accs"])
        d["delta_original"], d["p_below"], d["n_paired"] = test["diff"], test["p_less"], test["n"]


def strongest(attacks, acc, deltas=None):
    """(the attack that steals the most, whether every attack is KD-resistant) of {attack: row}, acc the row's
    accuracy key: what both frontiers call the strongest attack and a teacher that holds (METHOD.md section 8).
    With deltas ({attack: its Δ against the bar, paired by seed: paired_delta}) for
    every attack, the attacks are ranked by those, so an attack run on one seed cannot outrank one run on three by
    the luck of its seed's images; without, by mean accuracy (the same order where every attack holds the same
    seeds)."""
    if deltas and all(deltas.get(a) is not None for a in attacks):
        best = max(attacks, key=deltas.get)
    else:
        best = max(attacks, key=lambda a: attacks[a][acc])
    return best, all(r.get("verdict") == "KD-resistant" for r in attacks.values())


def frontier(res):
    """Per student architecture and teacher: the teacher's accuracy and the *strongest* attack on it (the
    stolen student furthest above the bar, paired by seed: strongest()), against the threat model's bar. A
    teacher resists every attack when each attack's verdict is KD-resistant (METHOD.md section 8). The bar's own
    row (a thief without labels: the hard-label student of the floor's teacher) is not one of its attacks."""
    out = []
    for arch, s in res["students"].items():
        bar_row = bar_of(res, s)
        bar = bar_row.get("acc")
        for teacher in teacher_order(res):
            # without labels the bar is the hard-label student of one teacher: that row is the bar, not an attack
            attacks = {a: r for a, r in s["kd"].get(teacher, {}).items()
                       if r.get("acc") is not None and r is not bar_row}
            t = res["teachers"].get(teacher)
            if not attacks or not t:
                continue
            best, resists_all = strongest(attacks, "acc", {a: paired_delta(r, bar_row) for a, r in attacks.items()})
            b = attacks[best]
            out.append({"arch": arch, "teacher": teacher, "teacher_acc": t["acc"], "teacher_delta": t.get("delta"),
                        "strongest": best, "acc": b["acc"], "std": b.get("std"), "n": b.get("n", 1),
                        "delta_ls": paired_delta(b, bar_row), "verdict": b.get("verdict"),
                        "p": b.get("p"), "bar": bar, "attacks": count_attacks(attacks),
                        "precision": b.get("precision"), "bar_precision": bar_row.get("precision"),
                        "resists_all": resists_all,
                        # judged on fewer seeds than a test needs: the seeds it shares with the bar (paired)
                        "attacks_few_seeds": count_attacks(a for a, r in attacks.items()
                                                           if r.get("n_paired", r.get("n", 1)) < MIN_SEEDS)})
    return out
