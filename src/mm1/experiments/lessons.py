"""`mm1 lessons`: MM1's ablations re-measured on the synthetic world, each beside the paper's claim.

Every lesson is an ablation spec (the schema of `mm1 ablate`) in `configs/lessons/<name>.yaml` whose
`lesson:` block holds the paper's claim, the baseline arm and the pre-registered claims that test it;
a budget file
(`configs/lessons/budget-<b>.yaml`) supplies the base preset, run lengths, seeds, evaluation and
optionally `precision: native | fp32 | bf16` (mm1.train.precision) for all of them (a lesson's own
`overrides` / `stage_overrides` are appended; `by_budget: {small: {...}}` replaces top-level keys,
e.g. the axis values, for one budget). The lessons' points are pooled and deduplicated by resolved
config, so the baseline trains once per seed however many lessons compare against it, and the sweep
shares each stage (e.g. the encoder pre-training) between the points whose stage configs agree
(with `fixed_seed_stages: [encoder]`, one encoder per encoder config for all seeds).

A claim is pre-registered in its spec, before any number is seen::

    claims:
      - text: "a higher input resolution scores higher"
        better: "128"                     # axis labels; or `similar: [a, b, c]`
        worse: "64"
        primary: "world_vqa vqa@4"        # the ONE column that decides the verdict
        paper_effect: 0.03                # the paper's effect, relative to the worse arm (power line)
        margin: 3.0                       # `similar` claims: the equivalence margin, in primary units
        secondary: ["world_caption cider@*"]   # reported beside it, never changing the verdict
        images: true                      # default; gated by the baseline's image_gain

`mm1.experiments.verdicts` turns the per-seed scores into `reproduced` / `contradicted` /
`inconclusive` (Welch's t-test or TOST); a claim about images (`images: true`, the default; a claim
on held-out text perplexity says `images: false`) is only judged where its lesson's `baseline` arm's
image_gain is significantly above 0.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mm1.config import PRESETS_DIR
from mm1.experiments.ablate import AblationSpec, Point, dedupe, expand, parse_spec
from mm1.registry import ConfigError
from mm1.train.precision import resolve_precision

LESSON_DIR = PRESETS_DIR / "lessons"
BUDGETS = ("tiny", "small")
MIN_SEEDS = 3  # no verdict rests on fewer seeds per arm
_EVAL_COLUMN = re.compile(r"^(?:(?P<stage>\w+): )?(?P<task>\S+) (?P<metric>\S+)@(?P<shots>\d+)$")


@dataclass
class Claim:
    """One pre-registered claim: the arms it compares, the single column that decides it, and why."""

    text: str
    primary: str  # exact column, e.g. "world_vqa vqa@4"
    better: str = ""  # axis label expected to score higher (lower, for a loss)
    worse: str = ""
    similar: list[str] = field(default_factory=list)  # labels expected to score alike
    margin: float = math.nan  # `similar`: equivalence margin in the primary metric's units
    paper_effect: float = math.nan  # compare: the paper's effect as a fraction of the worse arm's score
    secondary: list[str] = field(default_factory=list)  # column globs, reported only
    images: bool = True  # about images: judged only where the lesson's baseline uses the image

    @property
    def labels(self) -> list[str]:
        return list(self.similar) if self.similar else [self.better, self.worse]


@dataclass
class Lesson:
    name: str
    number: int
    title: str
    paper: str  # the paper's claim and number, quoted in the report
    claims: list[Claim]
    spec: AblationSpec
    axis: str  # the axis the claims' labels refer to
    baseline: str  # the axis label that is the standard recipe: its image_gain gates image claims
    note: str = ""


def parse_eval_column(column: str) -> dict[str, Any] | None:
    """`[stage: ]task metric@shots` -> its parts (None for a training-loss column)."""
    m = _EVAL_COLUMN.match(column)
    return (
        None if m is None else {"stage": m["stage"], "task": m["task"], "metric": m["metric"], "shots": int(m["shots"])}
    )


def _number(value: Any, where: str, what: str) -> float:
    if value is None:
        return math.nan
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: {what} must be a number, got {value!r}") from None


def parse_claim(c: Any, labels: list[str], where: str) -> Claim:
    """Validate one `lesson.claims` entry against the axis labels (see the module docstring)."""
    if not isinstance(c, dict):
        raise ConfigError(f"{where}: expected a mapping with text, primary and better/worse or similar; got {c!r}")
    unknown = set(c) - {
        "text",
        "primary",
        "better",
        "worse",
        "similar",
        "margin",
        "paper_effect",
        "secondary",
        "images",
    }
    if unknown:
        raise ConfigError(
            f"{where}: unknown key(s) {sorted(unknown)} (the old `metrics` list is now one "
            "`primary` column plus `secondary` globs)"
        )
    claim = Claim(
        text=str(c.get("text", "")),
        primary=str(c.get("primary") or ""),
        better=str(c.get("better", "")),
        worse=str(c.get("worse", "")),
        similar=[str(x) for x in c.get("similar") or []],
        margin=_number(c.get("margin"), where, "margin"),
        paper_effect=_number(c.get("paper_effect"), where, "paper_effect"),
        secondary=[str(x) for x in c.get("secondary") or []],
        images=bool(c.get("images", True)),
    )
    if not claim.primary or any(ch in claim.primary for ch in "*?["):
        raise ConfigError(f"{where}: needs `primary`: one exact column such as 'world_vqa vqa@4' (no globs)")
    if claim.images and parse_eval_column(claim.primary) is None:
        raise ConfigError(
            f"{where}: primary {claim.primary!r} is not an evaluation column ('task metric@shots'); "
            "an image lesson is gated by the image_gain of its primary task, which a loss has not"
        )
    if claim.similar:
        if len(claim.similar) < 2 or not claim.margin > 0:
            raise ConfigError(f"{where}: a `similar` claim needs >= 2 labels and an equivalence `margin` > 0")
    elif not claim.better or not claim.worse or claim.better == claim.worse:
        raise ConfigError(f"{where}: needs `better` and `worse` (two different labels) or `similar`")
    if not all(lab in labels for lab in claim.labels):
        raise ConfigError(f"{where}: labels {claim.labels} must be labels of the axis {labels}")
    return claim


def _merge_budget(body: dict, budget: dict, budget_name: str) -> dict:
    spec = dict(budget)
    for k, v in body.items():
        if k in ("overrides", "stage_overrides"):
            continue
        spec[k] = v
    spec["overrides"] = list(budget.get("overrides", [])) + list(body.get("overrides", []))
    so = {k: list(v) for k, v in (budget.get("stage_overrides") or {}).items()}
    for k, v in (body.get("stage_overrides") or {}).items():
        so[k] = so.get(k, []) + list(v)
    spec["stage_overrides"] = so
    spec.update((body.get("by_budget") or {}).get(budget_name, {}))
    spec.pop("by_budget", None)
    return spec


def load_lessons(budget: str = "tiny", directory: Path = LESSON_DIR, only: list[str] | None = None) -> list[Lesson]:
    """Every `configs/lessons/*.yaml` lesson, each merged with the budget file into a runnable spec."""
    if budget not in BUDGETS:
        raise ConfigError(f"--budget {budget!r}: choose one of {', '.join(BUDGETS)}")
    budget_path = directory / f"budget-{budget}.yaml"
    if not budget_path.is_file():
        raise ConfigError(f"budget file {budget_path} is missing; it sets the base preset, steps and seeds")
    budget_data = yaml.safe_load(budget_path.read_text()) or {}
    # `precision: native` (bf16 where it runs natively, else fp32) is resolved on this machine, first
    # among the overrides; a budget without it trains at the preset's train.precision
    if "precision" in budget_data:
        try:
            chosen = resolve_precision(str(budget_data.pop("precision")), f"{budget_path}: precision")
        except ValueError as e:
            raise ConfigError(str(e)) from None
        budget_data["overrides"] = [f"train.precision={chosen}", *(budget_data.get("overrides") or [])]
    lessons = []
    for path in sorted(directory.glob("*.yaml")):
        if path.name.startswith("budget-"):
            continue
        body = yaml.safe_load(path.read_text()) or {}
        if not isinstance(body.get("lesson"), dict):
            raise ConfigError(f"{path}: needs a `lesson:` block (number, title, paper, baseline, claims)")
        if only and path.stem not in only:
            continue
        data = _merge_budget(body, budget_data, budget)
        data["name"] = path.stem
        base = data.get("base", "")
        if base and not Path(base).is_absolute():  # budget paths are relative to the budget file
            data["base"] = str((directory / base).resolve())
        spec = parse_spec(data, path)
        meta = spec.lesson
        if len(spec.axes) != 1:
            raise ConfigError(f"{path}: a lesson varies exactly one axis (or one paired group), found {len(spec.axes)}")
        if len(spec.seeds) < MIN_SEEDS:
            raise ConfigError(
                f"{path}: seeds {spec.seeds}: a verdict needs at least {MIN_SEEDS} seeds per arm; "
                f"list {MIN_SEEDS} or more under `seeds` in the budget file"
            )
        labels = list(spec.axes[0].labels)
        baseline = str(meta.get("baseline", ""))
        if baseline not in labels:
            raise ConfigError(
                f"{path}: lesson.baseline {baseline!r} must name the axis label of the standard recipe "
                f"(one of {labels})"
            )
        claims = [parse_claim(c, labels, f"{path}: lesson.claims[{i}]") for i, c in enumerate(meta.get("claims") or [])]
        if not claims:
            raise ConfigError(f"{path}: lesson.claims is empty; a lesson states at least one claim")
        lessons.append(
            Lesson(
                path.stem,
                int(meta.get("number", 0)),
                str(meta.get("title", path.stem)),
                str(meta.get("paper", "")),
                claims,
                spec,
                spec.axes[0].name,
                baseline,
                str(meta.get("note", "")),
            )
        )
    lessons.sort(key=lambda lesson: (lesson.number, lesson.name))
    if only and len(lessons) != len(set(only)):
        missing = set(only) - {lesson.name for lesson in lessons}
        raise ConfigError(
            f"unknown lesson(s) {sorted(missing)}; available: {[p.stem for p in directory.glob('*.yaml')]}"
        )
    return lessons


def pooled_points(lessons: list[Lesson]) -> dict[str, list[Point]]:
    """Each lesson's points, named `<lesson>__<point>`, deduplicated across all lessons."""
    by_lesson = {}
    for lesson in lessons:
        pts = expand(lesson.spec)
        for p in pts:
            p.name, p.run = f"{lesson.name}__{p.name}", ""
        by_lesson[lesson.name] = pts
    everything = [p for pts in by_lesson.values() for p in pts]
    dedupe(everything)
    # a run several lessons share is their common baseline: give it a name that says so
    owners: dict[str, set[str]] = {}
    for lesson, pts in by_lesson.items():
        for p in pts:
            owners.setdefault(p.run, set()).add(lesson)
    shared = sorted((r for r, o in owners.items() if len(o) > 1), key=lambda r: -len(owners[r]))
    names: dict[str, str] = {}
    for r in shared:
        seed = next(p.seed for p in everything if p.run == r)
        base = (
            "baseline"
            if not any(n.startswith("baseline__") and n.endswith(f"__s{seed}") for n in names.values())
            else f"shared{len(names)}"
        )
        names[r] = f"{base}__s{seed}"
    for p in everything:
        p.run = names.get(p.run, p.run)
    return by_lesson
