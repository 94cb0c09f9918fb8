"""The lessons' statistics against scipy's reference values on fixed inputs (scipy is a test-only dependency)."""

from __future__ import annotations

import math

import pytest

from mm1.experiments.stats import one_sample, seeds_needed, t_ppf, t_sf, tost, welch
from references import require  # tests/references.py: skip here, fail under `make test`

scipy_stats = require("scipy.stats", module_level=True)

A = [41.2, 44.8, 39.5, 43.1]
B = [36.0, 38.9, 37.2]
C = [12.0, 30.5, 18.25, 22.0, 25.1]


@pytest.mark.parametrize("df", [1.0, 2.0, 2.7, 4.0, 11.3, 60.0])
@pytest.mark.parametrize("t", [-6.0, -1.3, 0.0, 0.4, 2.1, 9.0])
def test_the_t_distribution_matches_scipy(t, df):
    assert t_sf(t, df) == pytest.approx(scipy_stats.t.sf(t, df), rel=1e-9, abs=1e-13)


@pytest.mark.parametrize("q,df", [(0.95, 2.0), (0.975, 2.4), (0.8, 4.0), (0.975, 30.0), (0.05, 3.0), (0.999, 1.0)])
def test_t_quantiles_match_scipy(q, df):
    assert t_ppf(q, df) == pytest.approx(scipy_stats.t.ppf(q, df), rel=1e-8)


@pytest.mark.parametrize("a,b", [(A, B), (B, A), (C, B), (A, C)])
def test_welch_t_df_one_sided_p_and_ci_match_scipy(a, b):
    ours = welch(a, b)
    ref = scipy_stats.ttest_ind(a, b, equal_var=False, alternative="greater")
    assert ours.t == pytest.approx(ref.statistic, rel=1e-10)
    assert ours.df == pytest.approx(ref.df, rel=1e-10)
    assert ours.p == pytest.approx(ref.pvalue, rel=1e-8)
    less = scipy_stats.ttest_ind(a, b, equal_var=False, alternative="less")
    assert ours.p_opposite == pytest.approx(less.pvalue, rel=1e-8)
    two = scipy_stats.ttest_ind(a, b, equal_var=False).confidence_interval(0.95)
    assert (ours.ci_low, ours.ci_high) == (pytest.approx(two.low, rel=1e-8), pytest.approx(two.high, rel=1e-8))
    assert ours.effect == pytest.approx(sum(a) / len(a) - sum(b) / len(b))


@pytest.mark.parametrize("margin", [2.0, 5.0, 9.0])
def test_tost_is_two_one_sided_welch_tests_against_the_margin(margin):
    res = tost(A, B, margin)
    # H1: mean(A) - mean(B) > -margin  <=>  mean(A) + margin > mean(B)
    lower = scipy_stats.ttest_ind([x + margin for x in A], B, equal_var=False, alternative="greater").pvalue
    upper = scipy_stats.ttest_ind([x - margin for x in A], B, equal_var=False, alternative="less").pvalue
    assert res.p_equivalent == pytest.approx(max(lower, upper), rel=1e-8)
    above = scipy_stats.ttest_ind([x - margin for x in A], B, equal_var=False, alternative="greater").pvalue
    below = scipy_stats.ttest_ind([x + margin for x in A], B, equal_var=False, alternative="less").pvalue
    assert res.p_beyond == pytest.approx(min(1.0, 2 * min(above, below)), rel=1e-8)


def test_tost_shows_equivalence_for_close_means_and_a_difference_for_distant_ones():
    close = tost([10.0, 10.4, 9.8, 10.1], [10.2, 9.9, 10.3, 10.0], margin=1.0)
    assert close.p_equivalent < 0.05 and close.p_beyond > 0.5
    apart = tost([10.0, 10.4, 9.8, 10.1], [14.2, 13.9, 14.3, 14.0], margin=1.0)
    assert apart.p_equivalent > 0.5 and apart.p_beyond < 0.05


def test_one_sample_test_matches_scipy():
    gains = [1.5, 0.2, 2.4, 0.9]
    ref = scipy_stats.ttest_1samp(gains, 0.0, alternative="greater")
    ours = one_sample(gains)
    assert ours.t == pytest.approx(ref.statistic, rel=1e-10) and ours.df == 3
    assert ours.p == pytest.approx(ref.pvalue, rel=1e-8)


def test_no_spread_decides_by_the_sign_and_a_single_value_is_refused():
    same = welch([3.0, 3.0, 3.0], [3.0, 3.0, 3.0])
    assert same.p == 1.0 and same.p_opposite == 1.0
    assert welch([4.0, 4.0, 4.0], [3.0, 3.0, 3.0]).p == 0.0
    with pytest.raises(ValueError, match="at least 2 values"):
        welch([1.0], [2.0, 3.0])


@pytest.mark.parametrize("effect,sd", [(1.0, 1.0), (0.5, 1.0), (3.0, 1.0)])
def test_seeds_needed_reaches_the_power_by_the_noncentral_t(effect, sd):
    n = seeds_needed(effect, sd)
    assert n is not None and n >= 2

    def power(k: int) -> float:  # exact power of the one-sided two-sample t-test with equal n and sd
        df = 2 * k - 2
        return scipy_stats.nct.sf(scipy_stats.t.ppf(0.95, df), df, effect / (sd * math.sqrt(2 / k)))

    assert power(n) >= 0.78  # the t approximation is within a few points of the exact power
    if n > 2:
        assert power(n - 1) < 0.82
    assert seeds_needed(0.0, sd) is None and seeds_needed(effect, math.nan) is None
    assert seeds_needed(effect, sd, equivalence=True) >= n  # showing equivalence costs more than a difference
