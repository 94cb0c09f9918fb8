"""The statistics behind the lessons' verdicts: Student's t, Welch's test, TOST and a power estimate.

Pure functions on lists of per-seed scores, no dependencies: the verdicts must not hinge on an
optional package, and the t distribution is a few lines (the regularized incomplete beta function by
its continued fraction). `tests/test_experiments_stats.py` checks every number against scipy.

- `welch(a, b)`: is mean(a) > mean(b)? Welch's t (unequal variances), its Welch–Satterthwaite df,
  the one-sided p-value in that direction and the opposite one, the difference and its 95 % CI.
- `tost(a, b, margin)`: two one-sided tests; equivalence (|mean(a) − mean(b)| < margin) is shown
  when both reject (p = the larger p); a difference beyond the margin (either way) is shown when one
  of the two opposite one-sided tests rejects at α/2 (p = twice the smaller p).
- `one_sample(x)`: is mean(x) > 0? (e.g. a baseline's image_gain over seeds).
- `seeds_needed(effect, sd)`: seeds per arm for an 80 %-power one-sided Welch test of a given effect.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

ALPHA = 0.05


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz), converges for x < (a+1)/(a+b+2)."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        m2 = 2 * m
        for aa in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + aa / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def t_sf(t: float, df: float) -> float:
    """P(T > t) for Student's t with `df` (real, > 0) degrees of freedom."""
    if math.isnan(t) or math.isnan(df):
        return math.nan
    if math.isinf(t):
        return 0.0 if t > 0 else 1.0
    tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t))
    return tail if t > 0 else 1.0 - tail


def t_ppf(q: float, df: float) -> float:
    """The q-quantile of Student's t (bisection on the survival function: slow but exact enough)."""
    if not 0.0 < q < 1.0:
        raise ValueError(f"t_ppf: q={q} must lie in (0, 1)")
    if q < 0.5:
        return -t_ppf(1.0 - q, df)
    lo, hi = 0.0, 1.0
    while t_sf(hi, df) > 1.0 - q:
        lo, hi = hi, hi * 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_sf(mid, df) > 1.0 - q:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12 * max(1.0, hi):
            break
    return 0.5 * (lo + hi)


def _mean_var(x: Sequence[float]) -> tuple[float, float, int]:
    n = len(x)
    if n < 2:
        raise ValueError(f"a t-test needs at least 2 values per group, got {n}")
    m = sum(x) / n
    return m, sum((v - m) ** 2 for v in x) / (n - 1), n


@dataclass(frozen=True)
class TTest:
    """A t statistic for `effect` with its df, one-sided p-values both ways and a 95 % CI of `effect`."""

    effect: float
    se: float
    t: float
    df: float
    p: float  # H1: effect > 0
    p_opposite: float  # H1: effect < 0
    ci_low: float
    ci_high: float


def _ttest(effect: float, se: float, df: float, level: float = 0.95) -> TTest:
    if se == 0.0:  # no spread at all: the sign decides, with certainty (or nothing, if the effect is 0)
        p = 0.0 if effect > 0 else 1.0
        q = 0.0 if effect < 0 else 1.0
        return TTest(effect, 0.0, math.copysign(math.inf, effect) if effect else math.nan, df, p, q, effect, effect)
    t = effect / se
    half = t_ppf(0.5 + level / 2.0, df) * se
    return TTest(effect, se, t, df, t_sf(t, df), t_sf(-t, df), effect - half, effect + half)


def welch(a: Sequence[float], b: Sequence[float], level: float = 0.95) -> TTest:
    """Welch's t-test of mean(a) − mean(b) > 0 (and < 0), df by Welch–Satterthwaite."""
    ma, va, na = _mean_var(a)
    mb, vb, nb = _mean_var(b)
    sa, sb = va / na, vb / nb
    se = math.sqrt(sa + sb)
    df = (sa + sb) ** 2 / (sa**2 / (na - 1) + sb**2 / (nb - 1)) if se > 0 else float(na + nb - 2)
    return _ttest(ma - mb, se, df, level)


def one_sample(x: Sequence[float], level: float = 0.95) -> TTest:
    """One-sample t-test of mean(x) > 0 (e.g. a baseline's image_gain over seeds)."""
    m, v, n = _mean_var(x)
    return _ttest(m, math.sqrt(v / n), float(n - 1), level)


@dataclass(frozen=True)
class Tost:
    """Equivalence of two means within ±margin, and its converse (a difference beyond the margin)."""

    diff: TTest  # the plain Welch comparison of a − b
    margin: float
    p_equivalent: float  # H1: |effect| < margin (both one-sided tests reject)
    p_beyond: float  # H1: |effect| > margin (the more extreme side, Bonferroni over the two sides)


def tost(a: Sequence[float], b: Sequence[float], margin: float, level: float = 0.95) -> Tost:
    """Two one-sided Welch tests against ±margin (Schuirmann's TOST)."""
    if not margin > 0:
        raise ValueError(f"tost: margin={margin} must be > 0")
    d = welch(a, b, level)
    if d.se == 0.0:
        inside = abs(d.effect) < margin
        return Tost(d, margin, 0.0 if inside else 1.0, 0.0 if abs(d.effect) > margin else 1.0)
    p_above_lower = t_sf((d.effect + margin) / d.se, d.df)  # H1: effect > −margin
    p_below_upper = t_sf((margin - d.effect) / d.se, d.df)  # H1: effect < +margin
    p_beyond = min(1.0, 2.0 * min(1.0 - p_above_lower, 1.0 - p_below_upper))
    return Tost(d, margin, max(p_above_lower, p_below_upper), p_beyond)


def seeds_needed(
    effect: float, sd: float, alpha: float = ALPHA, power: float = 0.8, equivalence: bool = False, most: int = 1000
) -> int | None:
    """Seeds per arm for a one-sided Welch test at `alpha` to detect `effect` with `power`, both arms
    having standard deviation `sd` (the usual t approximation: n = 2·sd²·(t_{1−α} + t_{power})² / effect²,
    df = 2n − 2, solved by counting up). With `equivalence`, `effect` is the TOST margin and the true
    difference is taken to be 0 (then t_{power} becomes t_{(1+power)/2}). None: not measurable
    (no effect, no spread) or beyond `most` seeds."""
    if not (math.isfinite(effect) and math.isfinite(sd)) or effect == 0 or sd <= 0:
        return None
    q = (1.0 + power) / 2.0 if equivalence else power
    for n in range(2, most + 1):
        df = 2.0 * n - 2.0
        if sd * math.sqrt(2.0 / n) * (t_ppf(1.0 - alpha, df) + t_ppf(q, df)) <= abs(effect):
            return n
    return None
