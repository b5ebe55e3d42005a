"""Table cells shared by every report: numbers, mean ± std over seeds, verdicts, provenance marks."""
from utils.stats import ALPHA


def fmt(v, spec="{:.2f}", signed=False):
    if v is None:
        return "–"
    return ("{:+.2f}" if signed else spec).format(v)


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
    if not a.get("verdict"):
        return "–"
    word = a["verdict"] + (", harmful" if a.get("harmful") else "")
    test = f"n={a.get('n_paired', 1)}" if a.get("p") is None else f"p={a['p']:.3g}"
    return f"{word} ({test})"


PROVENANCE_MARKS = {"mismatch": " ✗", "unrecorded": " ?"}


def provenance_mark(row):
    return PROVENANCE_MARKS.get(row.get("provenance", row.get("status")), "")
