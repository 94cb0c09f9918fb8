"""`mm1 lessons`: MM1's ablations re-measured on the synthetic world, each beside the paper's claim.

Every lesson is an ablation spec in `configs/lessons/<name>.yaml` with a `lesson:` block (the paper's
claim and number, and the comparisons that test it); a budget file (`configs/lessons/budget-<b>.yaml`)
supplies the base preset, run lengths, seeds and evaluation for all of them (a lesson's own
`overrides` / `stage_overrides` are appended; `by_budget: {small: {...}}` replaces top-level keys,
e.g. the axis values, for one budget). The lessons' points are
pooled and deduplicated by resolved config, so the baseline (45:45:10, contrastive encoder, 16
C-Abstractor tokens...) trains once per seed however many lessons compare against it.

A verdict compares means with the seed spread instead of trusting a hard-coded answer:
- `better`/`worse` claim: d = mean(better) − mean(worse) (sign flipped for losses), with the
  standard error of the difference se = sqrt(s_b²/n_b + s_w²/n_w). d > 2·se: reproduced;
  d < −2·se: not reproduced (the opposite); otherwise not reproduced (within the seed spread).
- `similar` claim ("connector type barely matters"): the range of the means is compared with 2·se
  of its extremes, and, when a `reference` lesson is named, with that lesson's effect on the same
  metric: reproduced when the range is within the spread or smaller than the reference effect.
With one seed there is no spread, and a metric on which every run scored the same (e.g. 0 VQA
accuracy from a model too small to answer) carries no signal: such metrics are left out of the
majority, and a claim with no informative metric is "undecided" rather than guessed.
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from mm1.config import PRESETS_DIR
from mm1.experiments.ablate import AblationSpec, Point, dedupe, expand, parse_spec
from mm1.registry import ConfigError

LESSON_DIR = PRESETS_DIR / "lessons"
BUDGETS = ("tiny", "small")
K_SE = 2.0  # how many standard errors a difference must clear


@dataclass
class Claim:
    text: str
    metrics: list[str]  # column globs, e.g. "world_vqa *@4"
    better: str = ""  # axis label expected to score higher (kind = compare)
    worse: str = ""
    similar: list[str] = field(default_factory=list)  # labels expected to score alike (kind = similar)
    reference: str = ""  # for `similar`: a lesson whose effect this one should be smaller than


@dataclass
class Lesson:
    name: str
    number: int
    title: str
    paper: str  # the paper's claim and number, quoted in the report
    claims: list[Claim]
    spec: AblationSpec
    axis: str  # the axis the claims' labels refer to
    note: str = ""


@dataclass
class Verdict:
    column: str
    reproduced: bool | None  # None = cannot tell (one seed)
    effect: float  # better − worse (sign-adjusted), or the range for `similar`
    se: float
    detail: str


def _merge_budget(body: dict, budget: dict, budget_name: str) -> dict:
    spec = {k: v for k, v in budget.items() if k != "lesson_overrides"}
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
    lessons = []
    for path in sorted(directory.glob("*.yaml")):
        if path.name.startswith("budget-"):
            continue
        body = yaml.safe_load(path.read_text()) or {}
        meta = body.pop("lesson", None)
        if not isinstance(meta, dict):
            raise ConfigError(f"{path}: needs a `lesson:` block (number, title, paper, claims)")
        if only and path.stem not in only:
            continue
        data = _merge_budget(body, budget_data, budget)
        data["name"] = path.stem
        base = data.get("base", "")
        if base and not Path(base).is_absolute():  # budget paths are relative to the budget file
            data["base"] = str((directory / base).resolve())
        spec = parse_spec(data, path)
        if len(spec.axes) != 1:
            raise ConfigError(f"{path}: a lesson varies exactly one axis (or one paired group), found {len(spec.axes)}")
        claims = []
        for i, c in enumerate(meta.get("claims") or []):
            claim = Claim(text=str(c.get("text", "")), metrics=list(c.get("metrics") or []), better=str(c.get("better", "")),
                          worse=str(c.get("worse", "")), similar=[str(x) for x in c.get("similar") or []],
                          reference=str(c.get("reference", "")))
            labels = set(spec.axes[0].labels)
            used = ([claim.better, claim.worse] if not claim.similar else claim.similar)
            if not claim.metrics or not all(u in labels for u in used) or (not claim.similar and not claim.better):
                raise ConfigError(f"{path}: lesson.claims[{i}] needs `metrics` and `better`/`worse` (or `similar`) "
                                  f"naming labels of the axis ({sorted(labels)}); got {c}")
            claims.append(claim)
        lessons.append(Lesson(path.stem, int(meta.get("number", 0)), str(meta.get("title", path.stem)),
                              str(meta.get("paper", "")), claims, spec, spec.axes[0].name, str(meta.get("note", ""))))
    lessons.sort(key=lambda lesson: (lesson.number, lesson.name))
    if only and len(lessons) != len(set(only)):
        missing = set(only) - {lesson.name for lesson in lessons}
        raise ConfigError(f"unknown lesson(s) {sorted(missing)}; available: {[p.stem for p in directory.glob('*.yaml')]}")
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
        base = "baseline" if not any(n.startswith("baseline__") and n.endswith(f"__s{seed}") for n in names.values()) \
            else f"shared{len(names)}"
        names[r] = f"{base}__s{seed}"
    for p in everything:
        p.run = names.get(p.run, p.run)
    return by_lesson


def _stats(agg: list[dict], axis: str, label: str, column: str) -> tuple[float, float, int]:
    for a in agg:
        if a["column"] == column and a["labels"].get(axis) == label:
            return a["mean"], a["std"], a["n"]
    return math.nan, math.nan, 0


def _sign(column: str) -> float:
    from mm1.experiments.results import lower_is_better

    return -1.0 if lower_is_better(column) else 1.0


def judge_compare(better: tuple[float, float, int], worse: tuple[float, float, int], column: str,
                  k: float = K_SE) -> Verdict:
    """Is `better` higher (lower, for a loss) than `worse` by more than k standard errors?"""
    (mb, sb, nb), (mw, sw, nw) = better, worse
    if nb == 0 or nw == 0 or math.isnan(mb) or math.isnan(mw):
        return Verdict(column, None, math.nan, math.nan, "not measured")
    d = _sign(column) * (mb - mw)
    if d == 0 and not (sb or 0) and not (sw or 0):
        return Verdict(column, None, d, 0.0, f"no signal: every run scored {mb:.3g}")
    if nb < 2 or nw < 2:
        return Verdict(column, None, d, math.nan, f"difference {d:+.3g}, one seed: no spread to compare with")
    se = math.sqrt(sb**2 / nb + sw**2 / nw)
    if d > k * se:
        return Verdict(column, True, d, se, f"difference {d:+.3g} > {k:g}·se ({k * se:.3g})")
    if d < -k * se:
        return Verdict(column, False, d, se, f"opposite: difference {d:+.3g} < −{k:g}·se ({k * se:.3g})")
    return Verdict(column, False, d, se, f"within the seed spread: |{d:+.3g}| ≤ {k:g}·se ({k * se:.3g})")


def judge_similar(groups: list[tuple[float, float, int]], column: str, reference_effect: float = math.nan,
                  k: float = K_SE) -> Verdict:
    """Do the groups score alike: range within the spread, or smaller than a reference lesson's effect?"""
    groups = [g for g in groups if g[2] > 0 and not math.isnan(g[0])]
    if len(groups) < 2:
        return Verdict(column, None, math.nan, math.nan, "not measured")
    hi, lo = max(groups, key=lambda g: g[0]), min(groups, key=lambda g: g[0])
    rng = hi[0] - lo[0]
    if rng == 0 and all(not g[1] or math.isnan(g[1]) for g in groups) and all(g[2] > 1 for g in groups):
        return Verdict(column, None, 0.0, 0.0, f"no signal: every run scored {hi[0]:.3g}")
    ref = f"; reference effect {abs(reference_effect):.3g}" if not math.isnan(reference_effect) else ""
    if hi[2] < 2 or lo[2] < 2:
        if not math.isnan(reference_effect):
            ok = rng < abs(reference_effect)
            return Verdict(column, ok, rng, math.nan, f"range {rng:.3g} {'<' if ok else '≥'} reference effect "
                                                       f"{abs(reference_effect):.3g} (one seed)")
        return Verdict(column, None, rng, math.nan, f"range {rng:.3g}, one seed: no spread to compare with")
    se = math.sqrt(hi[1] ** 2 / hi[2] + lo[1] ** 2 / lo[2])
    if rng <= k * se:
        return Verdict(column, True, rng, se, f"range {rng:.3g} ≤ {k:g}·se ({k * se:.3g}){ref}")
    if not math.isnan(reference_effect) and rng < abs(reference_effect):
        return Verdict(column, True, rng, se, f"range {rng:.3g} < reference effect {abs(reference_effect):.3g}")
    return Verdict(column, False, rng, se, f"range {rng:.3g} > {k:g}·se ({k * se:.3g}){ref}")


def matching_columns(globs: list[str], columns: list[str]) -> list[str]:
    return [c for c in columns if any(fnmatch.fnmatchcase(c, g) for g in globs)]


def judge_lesson(lesson: Lesson, agg: list[dict], effects: dict[tuple[str, str], float]) -> list[tuple[Claim, list[Verdict]]]:
    """Verdicts of every claim of a lesson, one per matching metric column."""
    columns = list(dict.fromkeys(a["column"] for a in agg))
    out = []
    for claim in lesson.claims:
        verdicts = []
        for col in matching_columns(claim.metrics, columns):
            if claim.similar:
                groups = [_stats(agg, lesson.axis, lab, col) for lab in claim.similar]
                verdicts.append(judge_similar(groups, col, effects.get((claim.reference, col), math.nan)))
            else:
                verdicts.append(judge_compare(_stats(agg, lesson.axis, claim.better, col),
                                              _stats(agg, lesson.axis, claim.worse, col), col))
        out.append((claim, verdicts))
    return out


def lesson_effects(lesson: Lesson, agg: list[dict]) -> dict[str, float]:
    """Per column, the size of a lesson's first compare claim (better − worse): a yardstick for others."""
    claim = next((c for c in lesson.claims if not c.similar), None)
    if claim is None:
        return {}
    cols = dict.fromkeys(a["column"] for a in agg)
    return {c: _sign(c) * (_stats(agg, lesson.axis, claim.better, c)[0] - _stats(agg, lesson.axis, claim.worse, c)[0])
            for c in cols}


def claim_outcome(verdicts: list[Verdict]) -> str:
    """One word per claim: reproduced if most informative metrics reproduced it."""
    known = [v for v in verdicts if v.reproduced is not None]
    if not verdicts or all(v.detail == "not measured" for v in verdicts):
        return "not measured"
    if not known:
        return "undecided"
    yes = sum(v.reproduced for v in known)
    if yes * 2 > len(known):
        return "reproduced"
    if yes == 0:
        return "not reproduced"
    return "partly reproduced"
