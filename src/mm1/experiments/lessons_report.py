"""Run the MM1 lessons as one pooled sweep and write the report that sets each beside the paper.

`SWEEP/report.md` is the page a reader wants: one row per paper claim with what this run measured
and a plain verdict, then a section per lesson (its numbers per metric and its plot). Each lesson
also gets the full ablation report (`SWEEP/<lesson>.md`: every metric, loss curves, exact configs).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

from mm1.experiments import report as R
from mm1.experiments.ablate import _safe
from mm1.experiments.lessons import (K_SE, Lesson, _stats, claim_outcome, judge_lesson, lesson_effects,
                                     load_lessons, pooled_points)
from mm1.experiments.results import build_summary, gain_column, write_sweep_report
from mm1.experiments.sweep import run_sweep, write_commands, write_json_atomic


def _cell(agg: list[dict], axis: str, label: str, column: str) -> str:
    return R.fmt_mean_std(*_stats(agg, axis, label, column))


def _measured(lesson: Lesson, claim: Any, agg: list[dict], verdicts: list) -> str:
    """A one-line account of the first measured metric of a claim."""
    v = next((v for v in verdicts if v.detail != "not measured"), None)
    if v is None:
        return "not measured"
    labels = claim.similar or [claim.better, claim.worse]
    vals = "; ".join(f"{lab}: {_cell(agg, lesson.axis, lab, v.column)}" for lab in labels)
    more = f" (+{len(verdicts) - 1} more metrics)" if len(verdicts) > 1 else ""
    return f"`{v.column}` {vals}{more}"


def _gain_table(lesson: Lesson, agg: list[dict], labels: list[str], columns: list[str]) -> list[str]:
    """The image gain (score − image-shuffled score) behind a claim's image metrics, per setting: a
    lesson about images is only shown where the model uses them (gain > 0)."""
    have = {a["column"] for a in agg}
    rows = [[f"`{gain_column(c)}`", *[_cell(agg, lesson.axis, lab, gain_column(c)) for lab in labels]]
            for c in columns if gain_column(c) in have]
    if not rows:
        return []
    return ["Image gain of these metrics (score − the same queries with shuffled images; near 0 = the image "
            "is not used):", "", R.write_table(["image gain", *labels], rows, "l" + "r" * len(labels))]


def write_lessons_report(lessons: list[Lesson], by_lesson: dict, records: dict, out: Path, budget: str,
                         wall_seconds: float) -> Path:
    summaries = {}
    for lesson in lessons:
        summaries[lesson.name] = build_summary(lesson.spec, by_lesson[lesson.name], records, out, wall_seconds)
        write_sweep_report(lesson.spec, by_lesson[lesson.name], summaries[lesson.name], out, name=lesson.name)
    effects = {(lesson.name, col): e for lesson in lessons
               for col, e in lesson_effects(lesson, summaries[lesson.name]["aggregate"]).items()}
    runs = {p.run for pts in by_lesson.values() for p in pts}
    compute = sum(sum(records.get(r, {}).get("seconds", {}).values()) for r in runs)
    first = lessons[0].spec if lessons else None
    lines = [f"# MM1 lessons, re-measured at `{budget}` scale", "",
             f"- {len(lessons)} lessons, {sum(len(p) for p in by_lesson.values())} points, {len(runs)} distinct runs "
             "(points with identical resolved configs, such as the shared baseline, train once)",
             f"- base preset `{first.base if first else '?'}`; seeds {first.seeds if first else []}; "
             f"stages {', '.join(first.stages) if first else ''}",
             f"- wall time of this invocation: {R.format_seconds(wall_seconds)}; compute of all runs: {R.format_seconds(compute)}",
             "", "**How to read the verdicts.** For a claim \"A beats B\" the difference of the means over seeds "
             f"is compared with its standard error se = sqrt(s_A²/n_A + s_B²/n_B): reproduced when it exceeds "
             f"{K_SE:g}·se in the paper's direction, not reproduced when it is within {K_SE:g}·se (the seeds "
             "disagree more than the settings) or goes the other way. For \"A ≈ B ≈ C\" the range of the means must "
             "stay within the spread or below the effect of the reference lesson. A claim counts as reproduced "
             "when most of its informative metrics reproduce it (a metric on which every run scored the same, "
             "or a single seed, decides nothing: *undecided*). These are miniature models on a synthetic world: a lesson "
             "that does not reproduce here says something about scale, not necessarily about the paper.", ""]
    table, outcome_by, detail = [], {}, []
    for lesson in lessons:
        agg = summaries[lesson.name]["aggregate"]
        judged = judge_lesson(lesson, agg, effects)
        detail += [f"## {lesson.number}. {lesson.title}", "", f"**Paper:** {lesson.paper}", ""]
        if lesson.note:
            detail += [lesson.note, ""]
        claims_out = []
        for claim, verdicts in judged:
            outcome = claim_outcome(verdicts)
            outcome_by.setdefault(outcome, []).append(f"{lesson.number}. {claim.text}")
            table.append([f"{lesson.number}. {lesson.title}", claim.text, _measured(lesson, claim, agg, verdicts),
                          f"**{outcome}**"])
            labels = claim.similar or [claim.better, claim.worse]
            detail += [f"*{claim.text}* — **{outcome}**", ""]
            rows = [[f"`{v.column}`", *[_cell(agg, lesson.axis, lab, v.column) for lab in labels],
                     {True: "yes", False: "no", None: "?"}[v.reproduced], v.detail] for v in verdicts]
            detail.append(R.write_table(["metric", *labels, "reproduced", "why"], rows, "l" + "r" * len(labels) + "ll")
                          if rows else "No metric matched " + ", ".join(f"`{m}`" for m in claim.metrics) + ".\n")
            detail += _gain_table(lesson, agg, labels, [v.column for v in verdicts])
            claims_out.append({"text": claim.text, "outcome": outcome, "verdicts": [v.__dict__ for v in verdicts]})
        png = out / "plots" / lesson.name / f"axis-{_safe(lesson.axis)}.png"
        if png.is_file():
            detail += [R.image_link(png, out, f"{lesson.title}: scores vs {lesson.axis}"), ""]
        gain_png = png.with_name(f"axis-{_safe(lesson.axis)}-image-gain.png")
        if gain_png.is_file():
            detail += [R.image_link(gain_png, out, f"{lesson.title}: image gain vs {lesson.axis}"), ""]
        detail += [f"Every metric, loss curves and exact configs: [{lesson.name}.md]({lesson.name}.md)", ""]
        summaries[lesson.name]["claims"] = claims_out
    lines += ["## Verdicts", "", R.write_table(["lesson", "claim (paper)", "measured here (mean ± std (seeds))",
                                                "verdict"], table, "llll")]
    for outcome in ("reproduced", "partly reproduced", "not reproduced", "undecided", "not measured"):
        if outcome in outcome_by:
            lines += [f"**{outcome.capitalize()} at this scale:** " + "; ".join(outcome_by[outcome]) + ".", ""]
    lines += detail
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    write_json_atomic(out / "summary.json", {
        "budget": budget, "wall_seconds": wall_seconds, "compute_seconds": compute, "k_se": K_SE,
        "lessons": [{"name": lesson.name, "number": lesson.number, "title": lesson.title, "paper": lesson.paper,
                     "claims": summaries[lesson.name]["claims"], "aggregate": summaries[lesson.name]["aggregate"]}
                    for lesson in lessons]})
    return path


def _text_perplexity_task(lessons: list[Lesson], out: Path) -> None:
    """`world_text_ppl` in a budget's eval tasks: perplexity on the world's held-out text documents.

    The world registers no such task, so a task spec file pointing at `<world>/eval/text_docs_test.jsonl` is
    written into the output directory and named in `eval.tasks` instead."""
    import yaml

    from mm1.config import load_config

    for lesson in lessons:
        tasks = lesson.spec.eval_tasks or []
        if "world_text_ppl" not in tasks:
            continue
        world = Path(load_config(lesson.spec.base or None, lesson.spec.overrides).data.world).resolve()
        path = out.resolve() / "tasks" / "world_text_ppl.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump({"name": "world_text_ppl", "kind": "text", "metric": "perplexity",
                                        "test": str(world / "eval" / "text_docs_test.jsonl")}))
        lesson.spec.eval_tasks = [str(path) if t == "world_text_ppl" else t for t in tasks]


def run_lessons(budget: str, out: Path, runner: Any, only: list[str] | None = None, keep_going: bool = False,
                log: Callable[[str], None] = print, dry_run: bool = False) -> Path:
    """Run every lesson's points (pooled, deduplicated, resumable) and write `report.md`."""
    t0 = time.perf_counter()
    lessons = load_lessons(budget, only=only)
    _text_perplexity_task(lessons, out)
    by_lesson = pooled_points(lessons)
    points = [p for pts in by_lesson.values() for p in pts]
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "sweep.json", {"budget": budget, "lessons": [lesson.name for lesson in lessons], "points": [
        {"name": p.name, "run": p.run, "seed": p.seed, "labels": p.labels, "overrides": p.overrides,
         "fingerprint": p.fingerprint} for p in points]})
    commands = write_commands(points, out)
    n_runs = len({p.run for p in points})
    log(f"mm1 lessons: {len(lessons)} lessons, {len(points)} points, {n_runs} distinct runs -> {out}")
    if dry_run:
        log(f"dry run: configs and commands written to {commands}")
        return commands
    records = run_sweep(points, out, runner, keep_going=keep_going, log=log)
    return write_lessons_report(lessons, by_lesson, records, out, budget, time.perf_counter() - t0)


def verdict_counts(summary: dict) -> dict[str, int]:
    """How many claims of a lessons summary ended in each outcome (for tests and dashboards)."""
    counts: dict[str, int] = {}
    for lesson in summary["lessons"]:
        for claim in lesson["claims"]:
            counts[claim["outcome"]] = counts.get(claim["outcome"], 0) + 1
    return counts


