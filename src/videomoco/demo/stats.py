"""Paired comparisons over seeds: is a variant better than the baseline, or is the gap noise?

Every variant of the ablation is run with the same seeds as the baseline (same initial weights, data
order and augmentations), so the per-seed differences are compared, not two spreads: a paired t-test.
No SciPy: Student's t distribution via the regularised incomplete beta function (a continued fraction,
as in Numerical Recipes), exact to ~1e-10, checked against tabulated critical values in the tests.
"""

import math

import numpy as np


def _betacf(a, b, x, iterations=200, eps=1e-14):
    """Continued fraction of the regularised incomplete beta function I_x(a, b) (Lentz's method)."""
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, iterations + 1):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < eps:
            break
    return h


def incomplete_beta(a, b, x):
    """The regularised incomplete beta function I_x(a, b), x in [0, 1]."""
    if x <= 0.0 or x >= 1.0:
        return float(x >= 1.0)
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_two_sided_p(t, df):
    """P(|T| >= |t|) for Student's t with `df` degrees of freedom."""
    if not math.isfinite(t):
        return 0.0 if math.isinf(t) else 1.0
    return incomplete_beta(df / 2.0, 0.5, df / (df + t * t))


def paired_test(variant, baseline):
    """Per-seed differences `variant - baseline` -> {"diff", "std", "t", "p"} (a two-sided paired t-test).

    variant, baseline: `(S,)` metric values of the same S seeds. Identical runs give p = 1; one seed, NaN."""
    diff = np.asarray(variant, dtype=float) - np.asarray(baseline, dtype=float)
    n, mean = len(diff), float(diff.mean())
    if n < 2:  # one seed says nothing about the spread
        return {"diff": mean, "std": math.nan, "t": math.nan, "p": math.nan}
    std = float(diff.std(ddof=1))
    t = mean / (std / math.sqrt(n)) if std > 0 else (0.0 if mean == 0 else math.copysign(math.inf, mean))
    return {"diff": mean, "std": std, "t": t, "p": t_two_sided_p(t, n - 1)}


def t_critical(df, p=0.05):
    """The |t| a two-sided test with `df` degrees of freedom needs for `p` (bisection on `t_two_sided_p`)."""
    lo, hi = 0.0, 1e3
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_two_sided_p(mid, df) > p else (lo, mid)
    return hi


def resolvable(std, n, p=0.05):
    """The smallest mean paired difference that `n` seeds with a paired std `std` resolve at `p` (two-sided)."""
    return t_critical(n - 1, p) * std / math.sqrt(n) if n > 1 else math.inf
