"""Table cells shared by every report: numbers, mean ± std over seeds, verdicts, provenance marks."""
from utils.attacks import ATTACKS
from utils.stats import ALPHA, MIN_SEEDS

from .names import kd_arms


def fmt(v, spec="{:.2f}", signed=False):
    if v is None:
        return "–"
    return ("{:+.2f}" if signed else spec).format(v)


def count(n, noun):
    """'1 attack', '3 attacks': a count with its noun in the right number."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


def few_seeds_note(r):
    """'N on fewer than 3 seeds' of a frontier row whose attacks ran on fewer than MIN_SEEDS seeds, '' when none:
    below the bar on one seed is KD-resistant by METHOD.md section 8's rule, but no test has judged it."""
    few = r.get("attacks_few_seeds")
    return f"{few} on fewer than {MIN_SEEDS} seeds" if few else ""


def seeded(entry):
    """'mean ± std (n)' of an arm over its seeds; 'acc (1)' with one seed."""
    if not entry or entry.get("acc") is None:
        return "–"
    if entry.get("std") is None:
        return f"{entry['acc']:.2f} ({entry.get('n', 1)})"
    return f"{entry['acc']:.2f} ± {entry['std']:.2f} ({entry['n']})"


def below_cell(d):
    if d.get("delta_original") is None:
        return "–"
    if d.get("p_below") is None:
        return f"no test (n={d.get('n_paired', 1)})"
    return f"{'yes' if d['p_below'] < ALPHA else 'not significantly'} (p={d['p_below']:.3g})"


def verdict_cell(a):
    """'distillable (p=0.004)', 'KD-resistant, harmful (p below=0.0003)': the verdict with the p of the side it is on.
    Above the bar the p is the one-sided test of 'above' (a['p']); at or below it, of 'below' (1 - p: the two one-sided
    p of utils.stats.paired_t add up to 1), which is what 'harmful' is decided on."""
    if not a.get("verdict"):
        return "–"
    word = a["verdict"] + (", harmful" if a.get("harmful") else "")
    n = a.get("n_paired", 1)
    if a.get("p") is None:
        return f"{word} (n={n})"
    test = f"p below={1.0 - a['p']:.3g}" if a["verdict"] == "KD-resistant" else f"p={a['p']:.3g}"
    if n < MIN_SEEDS:  # a t-test at n = 2 is shown but decides nothing (METHOD.md section 8)
        test = f"n={n} < {MIN_SEEDS}, {test}"
    return f"{word} ({test})"


PRECISIONS = {"bfloat16": "bf16", "float16": "fp16"}


def precision(metrics):
    """The precision a run trained in, from its metrics.json ('amp'): bf16, fp16 or fp32."""
    return PRECISIONS.get(metrics.get("amp"), "fp32")


def precision_mark(row, bar):
    """' [fp32]' after a row that ran in another precision than its bar ('' when they agree or one is unknown):
    precision moves a row about as much as a seed does, so such a verdict compares unlike runs."""
    mine, theirs = row.get("precision"), (bar or {}).get("precision")
    if not mine or not theirs or mine == theirs:
        return ""
    return f" [{'/'.join(mine)}]"


PROVENANCE_MARKS = {"mismatch": " ✗", "unrecorded": " ?"}


def provenance_mark(row):
    return PROVENANCE_MARKS.get(row.get("provenance", row.get("status")), "")


def tau_cell(arm, attack=None):
    """An arm's τ: the run's, or the sweep's pick; a pick made on the thief's validation split says so (and
    names the α it picked with it, when α was swept too). Where the seeds picked differently, each seed's
    pick in seed order ("1 / 1 / 4"). An attack whose loss reads no τ (hard-label: Attack.uses_tau) has none: –."""
    if attack in ATTACKS and not ATTACKS[attack].uses_tau:
        return "–"
    cell = _per_seed(arm.get("taus"), arm["tau"])
    chosen = arm.get("chosen")
    if not chosen:
        return cell
    alpha = f", α {_per_seed(arm.get('alphas'), chosen['alpha'])}" if chosen.get("alpha") is not None else ""
    by = ", by cross-entropy" if chosen.get("by") == "val_nll" else ""
    return f"{cell}{alpha} (val {chosen.get('val_images')}{by})"


def _per_seed(by_seed, first):
    """One value when every seed has it (or none are recorded), else each seed's in seed order: '1 / 1 / 4'."""
    values = [by_seed[k] for k in sorted(by_seed or {})]
    if len(set(values)) <= 1:
        return fmt(first, "{:g}")
    return " / ".join(fmt(v, "{:g}") for v in values)


def chosen_note(student):
    """The line under a student's table when a τ there was picked on the thief's validation split; none else."""
    if not any(a.get("chosen") for a in kd_arms(student)):
        return []
    nll = any((a.get("chosen") or {}).get("by") == "val_nll" for a in kd_arms(student))
    return ["", "best τ marked (val N): the thief picked τ (and α where shown) on N of its own training images, "
                "held out of the student's training (val_split), once per seed (where the seeds picked differently, "
                "each seed's pick in seed order); the accuracy shown is on the test split. Unmarked: picked on the "
                "test split, an upper bound." + (" (val N, by cross-entropy): picked there by the lowest mean "
                                                 "cross-entropy (select_by val_nll), not the highest top-1." if nll
                                                 else "")]
