"""Run the MM1 lessons as one pooled sweep and write the report that sets each beside the paper.

`SWEEP/report.md` is the page a reader wants: one row per paper claim with what this run measured
and a plain verdict, then a section per lesson (its numbers per metric and its plot). Each lesson
also gets the full ablation report (`SWEEP/<lesson>.md`: every metric, loss curves, exact configs).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mm1.experiments import report as R
from mm1.experiments.ablate import _safe
from mm1.experiments.lessons import MIN_SEEDS, Lesson, load_lessons, pooled_points
from mm1.experiments.results import build_summary, gain_column, write_sweep_report
from mm1.experiments.sweep import compute_seconds, plan, run_sweep, write_commands, write_json_atomic
from mm1.experiments.verdicts import VERDICTS, ClaimResult, Comparison, arm_values, judge_lesson, summary_row

HOW_TO_READ = (
    "**How to read the verdicts.** Each claim was registered in its spec before the runs with ONE primary "
    'metric; the other metrics are secondary and never change the verdict. "A beats B": Welch\'s t-test, '
    "one-sided in the paper's direction: *reproduced* at p < 0.05, *contradicted* when the opposite one-sided "
    'test gives p < 0.05, *inconclusive* otherwise. "A ≈ B": two one-sided tests (TOST) against the margin '
    "stated in the spec, on every pair of arms: *reproduced* when equivalence is shown at p < 0.05, "
    "*contradicted* when a difference beyond the margin is shown at p < 0.05, *inconclusive* otherwise. "
    f"No verdict rests on fewer than {MIN_SEEDS} seeds per arm, and a claim about images is only judged where "
    "its baseline uses the image (image_gain = score − score with every query's image swapped for another "
    "item's, > 0 by a one-sided t-test over seeds, p < 0.05). Effects are positive in the paper's direction "
    "(lower is better for losses and perplexity); the CI is the two-sided 95 % interval of the difference. "
    "These are miniature models on a synthetic world: a lesson that does not reproduce here says something "
    "about scale, not necessarily about the paper."
)


def _num(x: float | None) -> str:
    return R.fmt_number(x) if x is not None else "–"


def _p(x: float) -> str:
    return "–" if math.isnan(x) else (f"{x:.3f}" if x >= 0.001 else f"{x:.1e}")


def _effect(c: Comparison) -> str:
    if math.isnan(c.effect):
        return "–"
    return f"{c.effect:+.3g} [{c.ci_low:+.3g}, {c.ci_high:+.3g}]"


def _arm_cell(values: list[float]) -> str:
    return R.fmt_mean_std(*R.mean_std(values))


def _claim_section(lesson: Lesson, res: ClaimResult) -> list[str]:
    claim, p = res.claim, res.primary
    out = [f"### {claim.text}", "", f"**{res.outcome}** — primary metric `{claim.primary}`", ""]
    rows = [[f"`{lab}`", _arm_cell(v), ", ".join(R.fmt_number(x) for x in v) or "–"] for lab, v in p.arms.items()]
    out.append(R.write_table([lesson.axis, "mean ± sd (seeds)", "per seed"], rows, "lrl"))
    if claim.similar:
        test = (
            f"largest pairwise |difference| ({p.pair[0]} vs {p.pair[1]}) {_effect(p)}; TOST within ±{claim.margin:g}: "
            f"p = {_p(p.p_value)} (equivalent), p = {_p(p.p_opposite)} (beyond the margin)"
        )
    else:
        test = (
            f"effect ({claim.better} over {claim.worse}, paper's direction positive) {_effect(p)}; Welch t, "
            f"df = {R.fmt_number(p.df)}: p = {_p(p.p_value)} (paper's direction), {_p(p.p_opposite)} (other way)"
        )
    out += [f"- {test}"]
    if claim.images:
        gain = (
            f"{_num(res.baseline_image_gain)}, one-sided p = {_p(res.baseline_image_gain_p)}"
            if res.baseline_image_gain_p is not None
            else _num(res.baseline_image_gain)
        )
        out.append(f"- baseline `{lesson.baseline}` image_gain on `{claim.primary}`: {gain}")
    out += [f"- {res.power_line}", ""]
    if res.secondary:
        labels = claim.labels
        rows = [
            [
                f"`{s.column}`",
                *[_arm_cell(s.arms[lab]) for lab in labels],
                _effect(s),
                _p(s.p_value if not claim.similar else math.nan),
            ]
            for s in res.secondary
        ]
        out += [
            "Secondary metrics (reported, not deciding):",
            "",
            R.write_table(
                [
                    "metric",
                    *labels,
                    "effect [95 % CI]" if not claim.similar else "largest |difference|",
                    "p (one-sided)",
                ],
                rows,
                "l" + "r" * (len(labels) + 2),
            ),
        ]
    return out


def _gain_table(lesson: Lesson, res: ClaimResult, agg: list[dict]) -> list[str]:
    """Per arm, the image gain (score − image-shuffled score) behind the claim's image metrics: a
    difference between models that do not use the image says nothing about images."""
    labels = res.claim.labels
    rows = []
    for cmp in [res.primary, *res.secondary]:
        gains = {lab: arm_values(agg, lesson.axis, lab, gain_column(cmp.column)) for lab in labels}
        if any(gains.values()):
            rows.append([f"`{gain_column(cmp.column)}`", *[_arm_cell(gains[lab]) for lab in labels]])
    if not rows:
        return []
    return [
        "Image gain of these metrics (score − the same queries with shuffled images; near 0 = the image is not used):",
        "",
        R.write_table(["image gain", *labels], rows, "l" + "r" * len(labels)),
    ]


def write_lessons_report(
    lessons: list[Lesson], by_lesson: dict, records: dict, out: Path, budget: str, wall_seconds: float
) -> Path:
    """`report.md` (verdict table, then one section per lesson) and `summary.json` (one entry per claim)."""
    runs = {p.run for pts in by_lesson.values() for p in pts}
    compute = compute_seconds({r: records[r] for r in runs if r in records})
    first = lessons[0].spec if lessons else None
    lines = [
        f"# MM1 lessons, re-measured at `{budget}` scale",
        "",
        f"- {len(lessons)} lessons, {sum(len(p) for p in by_lesson.values())} points, {len(runs)} distinct runs "
        "(points with identical resolved configs, such as the shared baseline, train once; so does every "
        "stage that several points share, such as an encoder pre-training)",
        f"- base preset `{first.base if first else '?'}`; seeds {first.seeds if first else []}",
        f"- wall time of this invocation: {R.format_seconds(wall_seconds)}; compute of all runs: "
        f"{R.format_seconds(compute)}",
        "",
        HOW_TO_READ,
        "",
    ]
    table, by_verdict, detail, claims = [], {}, [], []
    for lesson in lessons:
        summary = build_summary(lesson.spec, by_lesson[lesson.name], records, out, wall_seconds)
        write_sweep_report(lesson.spec, by_lesson[lesson.name], summary, out, name=lesson.name)
        agg = summary["aggregate"]
        results = judge_lesson(lesson, agg)
        detail += [f"## {lesson.number}. {lesson.title}", "", f"**Paper:** {lesson.paper}", ""]
        if lesson.note:
            detail += [lesson.note, ""]
        for res in results:
            name = f"{lesson.number}. {res.claim.text}"
            by_verdict.setdefault(res.verdict, []).append(name)
            table.append(
                [
                    f"{lesson.number}. {lesson.title}",
                    res.claim.text,
                    f"`{res.claim.primary}`",
                    _effect(res.primary),
                    _p(res.primary.p_value),
                    str(res.seeds),
                    f"**{res.outcome}**",
                ]
            )
            detail += _claim_section(lesson, res) + _gain_table(lesson, res, agg)
            claims.append(summary_row(lesson, res))
        png = out / "plots" / lesson.name / f"axis-{_safe(lesson.axis)}.png"
        if png.is_file():
            detail += [R.image_link(png, out, f"{lesson.title}: scores vs {lesson.axis}"), ""]
        gain_png = png.with_name(f"axis-{_safe(lesson.axis)}-image-gain.png")
        if gain_png.is_file():
            detail += [R.image_link(gain_png, out, f"{lesson.title}: image gain vs {lesson.axis}"), ""]
        detail += [f"Every metric, loss curves and exact configs: [{lesson.name}.md]({lesson.name}.md)", ""]
    lines += [
        "## Verdicts",
        "",
        R.write_table(
            ["lesson", "claim (paper)", "primary metric", "effect [95 % CI]", "p", "seeds", "verdict"], table, "lllrrrl"
        ),
    ]
    for verdict in VERDICTS:
        if verdict in by_verdict:
            lines += [f"**{verdict.capitalize()} at this scale:** " + "; ".join(by_verdict[verdict]) + ".", ""]
    lines += detail
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    write_json_atomic(out / "summary.json", claims)
    write_json_atomic(
        out / "run.json",
        {
            "budget": budget,
            "wall_seconds": wall_seconds,
            "compute_seconds": compute,
            "lessons": [lesson.name for lesson in lessons],
        },
    )
    return path


def run_lessons(
    budget: str,
    out: Path,
    runner: Any,
    only: list[str] | None = None,
    keep_going: bool = False,
    log: Callable[[str], None] = print,
    dry_run: bool = False,
) -> Path:
    """Run every lesson's points (pooled, deduplicated, resumable) and write `report.md`."""
    t0 = time.perf_counter()
    lessons = load_lessons(budget, only=only)
    by_lesson = pooled_points(lessons)
    points = [p for pts in by_lesson.values() for p in pts]
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(
        out / "sweep.json",
        {
            "budget": budget,
            "lessons": [lesson.name for lesson in lessons],
            "points": [
                {
                    "name": p.name,
                    "run": p.run,
                    "seed": p.seed,
                    "labels": p.labels,
                    "overrides": p.overrides,
                    "fingerprint": p.fingerprint,
                }
                for p in points
            ],
        },
    )
    commands = write_commands(points, out)
    n_runs = len({p.run for p in points})
    log(f"mm1 lessons: {len(lessons)} lessons, {len(points)} points, {n_runs} distinct runs -> {out}")
    if dry_run:
        for line in plan(points):
            log(f"  {line}")
        log(f"dry run: configs and commands written to {commands}")
        return commands
    records = run_sweep(points, out, runner, keep_going=keep_going, log=log)
    return write_lessons_report(lessons, by_lesson, records, out, budget, time.perf_counter() - t0)


def verdict_counts(summary: list[dict]) -> dict[str, int]:
    """How many claims of a lessons `summary.json` ended in each verdict (for tests and dashboards)."""
    counts: dict[str, int] = {}
    for claim in summary:
        counts[claim["verdict"]] = counts.get(claim["verdict"], 0) + 1
    return counts
