"""Verdicts of the lessons' pre-registered claims, from per-seed scores (rules of issue 15).

A claim is decided by its ONE primary column; secondary columns get the same statistics in the
report and never change the verdict. In order:
1. `inconclusive (not measured)` when an arm has no score on the primary column;
2. `inconclusive (fewer than 3 seeds ...)` when an arm has fewer than `MIN_SEEDS` scores;
3. a claim about images: `inconclusive (baseline does not use the image ...)` unless its baseline
   arm's `image_gain` (score − image-shuffled score: the `<metric>_image_gain` column of the primary
   task and shots) is > 0 by a one-sided one-sample t-test at p < 0.05;
4. compare ("A beats B"): Welch's t-test, one-sided in the paper's direction. `reproduced` at
   p < 0.05; `contradicted` when the opposite one-sided test gives p < 0.05; else `inconclusive`.
   similar ("A ≈ B ≈ C"): TOST against the spec's margin on every pair. `reproduced` when every pair
   is shown equivalent at p < 0.05 (intersection–union: p = the largest pair p); `contradicted`
   when some pair differs by more than the margin at p < 0.05 (Bonferroni over the pairs); else
   `inconclusive`.
Effects are oriented so that a positive number is the paper's direction (for a loss or perplexity,
lower is better). The power line says how many seeds per arm would give 80 % power for the paper's
effect (compare) or for showing equivalence within the margin (similar) at the measured spread.
"""

from __future__ import annotations

import fnmatch
import itertools
import math
from dataclasses import asdict, dataclass, field
from typing import Any

from mm1.experiments.lessons import MIN_SEEDS, Claim, Lesson
from mm1.experiments.results import gain_column, lower_is_better
from mm1.experiments.stats import ALPHA, TTest, one_sample, seeds_needed, tost, welch

REPRODUCED, CONTRADICTED, INCONCLUSIVE = "reproduced", "contradicted", "inconclusive"
VERDICTS = (REPRODUCED, CONTRADICTED, INCONCLUSIVE)


@dataclass
class Comparison:
    """The statistics of one column for one claim (the primary, or a secondary one)."""

    column: str
    arms: dict[str, list[float]]  # label -> per-seed scores
    effect: float = math.nan  # paper's direction positive; similar: the largest pairwise |difference|
    ci_low: float = math.nan
    ci_high: float = math.nan
    df: float = math.nan
    p_value: float = math.nan  # the test of the claim (compare: one-sided; similar: TOST equivalence)
    p_opposite: float = math.nan  # compare: the other direction; similar: a difference beyond the margin
    pair: tuple[str, str] = ("", "")  # the two arms `effect` compares


@dataclass
class ClaimResult:
    claim: Claim
    verdict: str
    why: str
    primary: Comparison
    secondary: list[Comparison] = field(default_factory=list)
    seeds: int = 0  # the fewest seeds of any arm on the primary column
    seeds_for_power: int | None = None
    power_line: str = ""
    baseline_image_gain: float | None = None  # mean over the baseline's seeds; None = not an image lesson
    baseline_image_gain_p: float | None = None
    gated: bool = False  # inconclusive before any test: not measured, too few seeds, or a blind baseline

    @property
    def outcome(self) -> str:
        return f"{INCONCLUSIVE} ({self.why})" if self.gated else self.verdict


def arm_values(agg: list[dict], axis: str, label: str, column: str) -> list[float]:
    for a in agg:
        if a["column"] == column and a["labels"].get(axis) == label:
            return [float(v) for v in a["values"] if v is not None and not math.isnan(float(v))]
    return []


def _oriented(t: TTest, flip: bool) -> tuple[float, float, float, float, float]:
    """(effect, ci_low, ci_high, p, p_opposite) with the paper's direction positive."""
    if not flip:
        return t.effect, t.ci_low, t.ci_high, t.p, t.p_opposite
    return -t.effect, -t.ci_high, -t.ci_low, t.p_opposite, t.p


def compare(claim: Claim, column: str, arms: dict[str, list[float]]) -> Comparison:
    """The statistics of `column` for a claim (NaNs where an arm has fewer than 2 seeds)."""
    out = Comparison(column, arms)
    if any(len(v) < 2 for v in arms.values()):
        return out
    if not claim.similar:
        t = welch(arms[claim.better], arms[claim.worse])
        out.effect, out.ci_low, out.ci_high, out.p_value, out.p_opposite = _oriented(t, lower_is_better(column))
        out.df, out.pair = t.df, (claim.better, claim.worse)
        return out
    pairs = list(itertools.combinations(claim.similar, 2))
    widest = max(pairs, key=lambda ab: abs(welch(arms[ab[0]], arms[ab[1]]).effect))
    t = welch(arms[widest[0]], arms[widest[1]])
    sign = 1.0 if t.effect >= 0 else -1.0
    out.effect, out.df, out.pair = abs(t.effect), t.df, widest
    out.ci_low, out.ci_high = sorted((sign * t.ci_low, sign * t.ci_high))
    if claim.margin > 0 and column == claim.primary:  # the margin is in the primary metric's units
        tests = [tost(arms[a], arms[b], claim.margin) for a, b in pairs]
        out.p_value = max(x.p_equivalent for x in tests)
        out.p_opposite = min(1.0, len(pairs) * min(x.p_beyond for x in tests))
    return out


def _power(claim: Claim, cmp: Comparison) -> tuple[int | None, str]:
    sds = [_sd(v) for v in cmp.arms.values() if len(v) >= 2]
    if not sds:
        return None, "power: not measured"
    sd = math.sqrt(sum(s * s for s in sds) / len(sds))
    have = min(len(v) for v in cmp.arms.values())
    if claim.similar:
        n = seeds_needed(claim.margin, sd, equivalence=True)
        goal = f"to show equivalence within ±{claim.margin:g} (true difference 0)"
    else:
        if math.isnan(claim.paper_effect):
            return None, "power: the spec states no paper_effect"
        worse = sum(cmp.arms[claim.worse]) / len(cmp.arms[claim.worse])
        delta = claim.paper_effect * abs(worse)
        n = seeds_needed(delta, sd)
        goal = f"to detect the paper's effect ({claim.paper_effect:+.0%} of the worse arm = {delta:.3g})"
    need = f"{n} seeds per arm" if n else "more than 1000 seeds per arm (or no spread to size it by)"
    return n, f"power: {need} give 80 % power {goal} at the measured sd {sd:.3g}; this run has {have}"


def _sd(v: list[float]) -> float:
    m = sum(v) / len(v)
    return math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1))


def judge_claim(lesson: Lesson, claim: Claim, agg: list[dict], gains: list[float]) -> ClaimResult:
    """The verdict of one claim from the lesson's per-seed aggregate and its baseline's image gains."""
    columns = list(dict.fromkeys(a["column"] for a in agg))
    arms = {lab: arm_values(agg, lesson.axis, lab, claim.primary) for lab in claim.labels}
    primary = compare(claim, claim.primary, arms)
    secondary = [
        compare(claim, c, {lab: arm_values(agg, lesson.axis, lab, c) for lab in claim.labels})
        for c in columns
        if c != claim.primary and any(fnmatch.fnmatchcase(c, g) for g in claim.secondary)
    ]
    seeds = min(len(v) for v in arms.values())
    res = ClaimResult(claim, INCONCLUSIVE, "", primary, secondary, seeds)
    res.seeds_for_power, res.power_line = _power(claim, primary)
    if claim.images and len(gains) >= 2:
        g = one_sample(gains)
        res.baseline_image_gain, res.baseline_image_gain_p = g.effect, g.p
    elif claim.images and gains:
        res.baseline_image_gain = gains[0]
    res.gated = True
    if seeds == 0:
        res.why = f"not measured: no `{claim.primary}` scores for " + ", ".join(k for k, v in arms.items() if not v)
        return res
    if seeds < MIN_SEEDS:
        res.why = f"fewer than {MIN_SEEDS} seeds per arm ({seeds})"
        return res
    if claim.images:
        if len(gains) < 2:
            res.why = (
                f"baseline image_gain not measured on `{claim.primary}` ({len(gains)} seeds); "
                "the evaluation results carry no image_gain"
            )
            return res
        if not res.baseline_image_gain_p < ALPHA:
            res.why = (
                f"baseline does not use the image: image_gain {res.baseline_image_gain:+.3g}, "
                f"p = {res.baseline_image_gain_p:.3g} over {len(gains)} seeds"
            )
            return res
    res.gated = False
    if primary.p_value < ALPHA:
        res.verdict, res.why = REPRODUCED, f"p = {primary.p_value:.3g}"
    elif primary.p_opposite < ALPHA:
        res.verdict, res.why = CONTRADICTED, f"p = {primary.p_opposite:.3g} the other way"
    else:
        res.why = f"no significant difference: p = {primary.p_value:.3g} (claim), {primary.p_opposite:.3g} (opposite)"
    return res


def judge_lesson(lesson: Lesson, agg: list[dict]) -> list[ClaimResult]:
    """Every claim of a lesson; the image gate reads the baseline arm's `<primary>_image_gain` column."""
    return [
        judge_claim(lesson, c, agg, arm_values(agg, lesson.axis, lesson.baseline, gain_column(c.primary)))
        for c in lesson.claims
    ]


def _finite(x: float | None) -> float | None:
    return None if x is None or (isinstance(x, float) and not math.isfinite(x)) else x


def summary_row(lesson: Lesson, res: ClaimResult) -> dict[str, Any]:
    """One claim of `summary.json` (issue 15's fields first, then the detail behind them)."""
    p = res.primary
    return {
        "lesson": lesson.name,
        "claim": res.claim.text,
        "metric": res.claim.primary,
        "verdict": res.verdict,
        "p_value": _finite(p.p_value),
        "effect": _finite(p.effect),
        "ci_low": _finite(p.ci_low),
        "ci_high": _finite(p.ci_high),
        "seeds": res.seeds,
        "baseline_image_gain": _finite(res.baseline_image_gain),
        "why": res.why,
        "gated": res.gated,
        "kind": "similar" if res.claim.similar else "compare",
        "pair": list(p.pair),
        "df": _finite(p.df),
        "p_opposite": _finite(p.p_opposite),
        "margin": _finite(res.claim.margin),
        "paper_effect": _finite(res.claim.paper_effect),
        "baseline_image_gain_p": _finite(res.baseline_image_gain_p),
        "seeds_for_power": res.seeds_for_power,
        "arms": p.arms,
        "secondary": [
            {k: _finite(v) if isinstance(v, float) else v for k, v in asdict(s).items() if k != "arms"}
            for s in res.secondary
        ],
    }
