"""The names a report gives teachers, the order it lists them in, and the walk over its KD arms."""


class _Names(dict):
    """Report names of teachers: the original, then each defence's label from the registry."""

    def __missing__(self, key):
        from utils.defences import DEFENCES
        return DEFENCES[key].label if key in DEFENCES else key

    def get(self, key, default=None):
        return self[key]


TEACHER_NAMES = _Names(original="original")

# an attack that several report rows share: the self-tuning thief, one row per rule that picks its τ (docs/METHOD.md)
SAME_ATTACK = {"tuned_nll": "tuned"}


def count_attacks(keys):
    """How many attacks the KD rows keyed by `keys` are: the self-tuning thief counts once, whichever of its
    selection rules (tuned, tuned_nll) picked the τ of each of its rows."""
    return len({SAME_ATTACK.get(k, k) for k in keys})


def teacher_order(res):
    """Teachers in the manifest's order, then any a student names that has no teacher row."""
    order = list(res["teachers"])
    for s in res["students"].values():
        order += [t for t in s["kd"] if t not in order]
    order += [t for t in res["dfad"] if t not in order]
    return order


def kd_arms(*students):
    """Every attack x teacher arm of the given student tables (a collected folder's res["students"] values)."""
    for s in students:
        for attacks in s["kd"].values():
            yield from attacks.values()
