"""The statistics of a verdict (docs/METHOD.md section 8): mean ± std over seeds and a one-sided paired t-test
of a stolen student against the label-smoothing bar, in plain Python (no SciPy needed).

    distillable   the attack's mean is above the bar and significantly so (one-sided paired t-test, p < 0.05)
    inconclusive  above the bar, not significantly, or with fewer than MIN_SEEDS paired seeds (section 8 asks
                  for n >= 3: a t-test at n = 2 has one degree of freedom, and two lucky seeds pass it)
    KD-resistant  at or below the bar; `harmful` beside it when significantly below (p < 0.05 the other way,
                  n >= MIN_SEEDS)
"""
import math

ALPHA = 0.05
MIN_SEEDS = 3  # METHOD.md section 8: every arm has n >= 3 seeds; below that no test decides a verdict
RULE = ("Verdict per attack x teacher against the label-smoothing student of the same architecture (a threat model "
        "without labels says its own bar), paired by seed, final-epoch accuracy. Every Δ is the mean of the "
        "seed-by-seed differences over the seeds both arms hold (the difference of their means where they hold the "
        "same seeds). *distillable* when Δ > 0 and a one-sided paired t-test gives p < 0.05; *inconclusive* when "
        f"Δ > 0 but not significantly, or on fewer than {MIN_SEEDS} paired seeds (METHOD.md section 8 asks for "
        f"n >= {MIN_SEEDS}); *KD-resistant* when Δ <= 0, *harmful* beside it when significantly below "
        f"(the one-sided test the other way, shown as *p below*: p below < 0.05, n >= {MIN_SEEDS}). "
        "With n = 3, significance needs t > 2.92.")


def mean_std(values):
    """(mean, sample standard deviation) of a list; std is None for fewer than two values."""
    n = len(values)
    if n == 0:
        return None, None
    m = sum(values) / n
    if n < 2:
        return m, None
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1))


def _betacf(a, b, x, iters=300, eps=1e-15):
    """Continued fraction of the regularised incomplete beta function (modified Lentz)."""
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, iters + 1):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < eps:
            break
    return h


def betainc(a, b, x):
    """Regularised incomplete beta function I_x(a, b), 0 <= x <= 1."""
    if x <= 0:
        return 0.0
    if x >= 1:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1) / (a + b + 2):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_sf(t, df):
    """P(T > t) for Student's t with df degrees of freedom."""
    x = df / (df + t * t)
    tail = 0.5 * betainc(df / 2.0, 0.5, x)
    return tail if t >= 0 else 1.0 - tail


def paired_t(a, b):
    """One-sided paired t-test of mean(a - b) > 0: (t, p_greater, p_less), or (None, None, None) for fewer
    than two pairs. Identical differences give t = ±inf (p 0 or 1), or t = 0 when they are all 0."""
    d = [x - y for x, y in zip(a, b)]
    n = len(d)
    if n < 2:
        return None, None, None
    m, s = mean_std(d)
    if s == 0:
        t = math.copysign(math.inf, m) if m else 0.0
    else:
        t = m / (s / math.sqrt(n))
    if math.isinf(t):
        p = 0.0 if t > 0 else 1.0
    else:
        p = t_sf(t, n - 1)
    return t, p, 1.0 - p


def verdict(attack, bar):
    """The verdict of METHOD.md section 8 for an attack's accuracies against the bar's, each {seed: acc};
    only seeds present in both are paired. Returns a dict: verdict, harmful, n, diff (mean of the paired
    differences), t, p (one-sided, above the bar), p_less (one-sided, below it) and seeds. t and p are given
    from n = 2 on, but with fewer than MIN_SEEDS pairs they decide nothing: above the bar is inconclusive,
    below it is never harmful."""
    seeds = sorted(set(attack) & set(bar))
    if not seeds:
        return {"verdict": None, "harmful": False, "n": 0, "diff": None, "t": None, "p": None, "p_less": None,
                "seeds": []}
    a, b = [attack[s] for s in seeds], [bar[s] for s in seeds]
    diff = sum(x - y for x, y in zip(a, b)) / len(seeds)
    t, p, p_less = paired_t(a, b)
    tested = len(seeds) >= MIN_SEEDS
    if diff > 0:
        word = "distillable" if tested and p < ALPHA else "inconclusive"
    else:
        word = "KD-resistant"
    harmful = diff < 0 and tested and p_less < ALPHA
    return {"verdict": word, "harmful": harmful, "n": len(seeds), "diff": diff, "t": t, "p": p, "p_less": p_less,
            "seeds": seeds}
