"""Ablation specs: a base config, axes to vary, seeds, stages and evaluation, expanded into points.

An ablation answers "what happens if I change X?". A spec names a base preset, the config keys to
vary (each an *axis* with a list of values, or a *paired* group of keys that vary together, e.g.
the caption and interleaved weights of a mixture), the seeds (`train.seed`) and the stages each
point runs (`encoder`, `pretrain`, `sft`, chained through `train.init_from`). `expand` turns it
into points — the cartesian product of the axes times the seeds — each with a stable readable
name and every stage's fully resolved `Config`. Points whose resolved configs are identical share
one run (`dedupe`), so a baseline that appears in several axes (or several lessons) trains once.

Spec file (YAML; `base` is relative to the spec, then the working directory, then `configs/`)::

    name: connector-x-tokens
    base: ../configs/tiny.yaml
    overrides: [train.steps=100]            # applied to every point and stage
    stages: [pretrain]                      # default [pretrain]; e.g. [encoder, pretrain, sft]
    stage_overrides: {encoder: [train.steps=50]}
    axes:
      model.connector.kind: [avgpool, attnpool]
      model.connector.num_tokens: [4, 16]
    paired:                                 # keys that vary together, one axis per group
      mixture:
        labels: ["100:0", "50:50"]
        data.sources.caption.weight: [0.9, 0.45]
        data.sources.interleaved.weight: [0.0, 0.45]
    seeds: [0, 1]
    fixed_seed_stages: [encoder]            # optional: trained once, with the first seed, for all seeds
    eval: {tasks: [world_caption, world_vqa], shots: [0, 4], limit: 20, after: [pretrain]}
    lesson: {...}                           # optional: claims `mm1 lessons` judges (mm1.experiments.lessons)

A key `STAGE:key` applies to that stage only (`pretrain:train.lr: [1e-3, 3e-3]`); the pseudo-key
`stages` varies the stage list itself (e.g. with vs without encoder pre-training). Overrides apply
in the order base < spec overrides < stage overrides < axes < seed.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import itertools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mm1.config import PRESETS_DIR, Config, load_config
from mm1.registry import ConfigError

STAGES = ("encoder", "pretrain", "sft")
_SPEC_KEYS = {
    "name",
    "base",
    "overrides",
    "stages",
    "stage_overrides",
    "axes",
    "paired",
    "seeds",
    "fixed_seed_stages",
    "eval",
    "lesson",
}
_EVAL_KEYS = {"tasks", "shots", "limit", "after", "trials"}


@dataclass
class Axis:
    """One thing the sweep varies: one or more config keys whose values move together."""

    name: str  # shown in reports, e.g. "model.connector.kind" or "mixture"
    keys: list[str]
    values: list[list[Any]]  # values[i][j]: the value of keys[j] at position i
    labels: list[str]  # labels[i]: how position i is shown


@dataclass
class AblationSpec:
    name: str
    base: str  # resolved path of the base preset ("" = built-in defaults)
    overrides: list[str] = field(default_factory=list)
    stages: list[str] = field(default_factory=lambda: ["pretrain"])
    stage_overrides: dict[str, list[str]] = field(default_factory=dict)
    axes: list[Axis] = field(default_factory=list)
    seeds: list[int] = field(default_factory=lambda: [0])
    # stages trained with the first seed at every seed: one run shared by all seeds (MM1 starts every
    # ablation from one pre-trained encoder; the seeds then vary what comes after it)
    fixed_seed_stages: list[str] = field(default_factory=list)
    eval_tasks: list[str] | None = None  # None = the base config's eval.tasks
    eval_shots: list[int] | None = None
    eval_limit: int | None = None
    eval_trials: int | None = None
    eval_after: list[str] | None = None  # None = the last stage of each point
    source: str = ""  # the spec file, for error messages
    lesson: dict[str, Any] | None = None  # `mm1 lessons`: the paper's claim and the pre-registered claims


@dataclass
class Point:
    """One run of the sweep: axis positions + seed, with every stage's resolved config."""

    name: str
    seed: int
    labels: dict[str, str]  # axis name -> label of its value at this point
    settings: dict[str, Any]  # config key -> value set by the axes
    stages: list[str]
    eval_after: list[str]
    configs: dict[str, Config]  # stage -> resolved config (train.init_from left to the runner)
    overrides: dict[str, list[str]]  # stage -> the dotted overrides on top of the base preset
    fingerprint: str
    run: str = ""  # directory name of the run holding it: its own name, or the first identical point's


def format_value(value: Any) -> str:
    """A short, stable rendering of an axis value for labels and directory names."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return "+".join(format_value(v) for v in value)
    if value is None:
        return "none"
    return str(value)


def _dotted(key: str, value: Any) -> str:
    """A `key=value` override that OmegaConf parses back to `value` (JSON is valid YAML flow)."""
    if isinstance(value, str):
        return f"{key}={value}"
    return f"{key}={json.dumps(value)}"


def _err(source: str, what: str) -> ConfigError:
    return ConfigError(f"ablation spec {source or '<dict>'}: {what}")


def _resolve_base(base: str, spec_path: Path | None) -> str:
    if not base:
        return ""
    candidates = [Path(base)] if Path(base).is_absolute() else []
    if spec_path is not None:
        candidates.append(spec_path.parent / base)
    candidates += [Path.cwd() / base, PRESETS_DIR / base, PRESETS_DIR / f"{base}.yaml"]
    for c in candidates:
        if c.is_file():
            return str(c.resolve())
    tried = ", ".join(str(c) for c in candidates)
    raise ConfigError(
        f"ablation spec {spec_path or '<dict>'}: base {base!r} not found (tried {tried}); "
        "give a preset path such as configs/tiny.yaml"
    )


def _string_list(src: str, key: str, value: Any) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) and "=" in v for v in value):
        raise _err(src, f"`{key}` must be a list of key=value strings, got {value!r}")
    return list(value)


def parse_spec(data: dict[str, Any], path: str | Path | None = None) -> AblationSpec:
    """Validate a spec mapping (see the module docstring) into an `AblationSpec`."""
    src = str(path or "")
    spec_path = Path(path) if path else None
    if not isinstance(data, dict):
        raise _err(src, f"expected a mapping at the top level, got {type(data).__name__}")
    unknown = set(data) - _SPEC_KEYS
    if unknown:
        raise _err(src, f"unknown key(s) {sorted(unknown)}; allowed: {sorted(_SPEC_KEYS)}")
    name = str(data.get("name") or (spec_path.stem if spec_path else "ablation"))
    stages = list(data.get("stages") or ["pretrain"])
    for s in stages:
        if s not in STAGES:
            raise _err(src, f"stages: unknown stage {s!r}; allowed: {', '.join(STAGES)}")
    stage_over = data.get("stage_overrides") or {}
    if not isinstance(stage_over, dict) or set(stage_over) - set(STAGES):
        raise _err(src, f"stage_overrides must map stages ({', '.join(STAGES)}) to override lists")
    axes: list[Axis] = []
    for key, values in (data.get("axes") or {}).items():
        if not isinstance(values, list) or not values:
            raise _err(src, f"axes.{key}: expected a non-empty list of values, got {values!r}")
        axes.append(Axis(key, [key], [[v] for v in values], [format_value(v) for v in values]))
    for group, body in (data.get("paired") or {}).items():
        if not isinstance(body, dict):
            raise _err(src, f"paired.{group}: expected a mapping of key -> list of values")
        body = dict(body)
        labels = body.pop("labels", None)
        if not body:
            raise _err(src, f"paired.{group}: names no config keys")
        lengths = {k: len(v) if isinstance(v, list) else -1 for k, v in body.items()}
        n = next(iter(lengths.values()))
        if n <= 0 or any(m != n for m in lengths.values()) or (labels is not None and len(labels) != n):
            raise _err(
                src,
                f"paired.{group}: every key (and `labels`) needs a list of the same length; "
                f"got lengths {lengths}" + (f", labels {len(labels)}" if labels is not None else ""),
            )
        keys = list(body)
        values = [[body[k][i] for k in keys] for i in range(n)]
        shown = (
            [str(x) for x in labels]
            if labels is not None
            else ["_".join(format_value(v) for v in row) for row in values]
        )
        axes.append(Axis(str(group), keys, values, shown))
    seen_keys: set[str] = set()
    for ax in axes:
        for k in ax.keys:
            if k in seen_keys:
                raise _err(src, f"config key {k!r} is varied by two axes; put it in one axis or one paired group")
            seen_keys.add(k)
        if len(set(ax.labels)) != len(ax.labels):
            raise _err(src, f"axis {ax.name!r}: labels {ax.labels} repeat; give distinct `labels`")
    seeds = data.get("seeds", [0])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) for s in seeds):
        raise _err(src, f"seeds must be a non-empty list of integers, got {seeds!r}")
    fixed = data.get("fixed_seed_stages") or []
    if not isinstance(fixed, list) or any(s not in STAGES for s in fixed):
        raise _err(src, f"fixed_seed_stages: expected a list of stages ({', '.join(STAGES)}), got {fixed!r}")
    ev = data.get("eval") or {}
    if set(ev) - _EVAL_KEYS:
        raise _err(src, f"eval: unknown key(s) {sorted(set(ev) - _EVAL_KEYS)}; allowed: {sorted(_EVAL_KEYS)}")
    return AblationSpec(
        name=name,
        base=_resolve_base(str(data.get("base") or ""), spec_path),
        overrides=_string_list(src, "overrides", data.get("overrides")),
        stages=stages,
        stage_overrides={k: _string_list(src, f"stage_overrides.{k}", v) for k, v in stage_over.items()},
        axes=axes,
        seeds=list(seeds),
        fixed_seed_stages=fixed,
        eval_tasks=ev.get("tasks"),
        eval_shots=ev.get("shots"),
        eval_limit=ev.get("limit"),
        eval_trials=ev.get("trials"),
        eval_after=ev.get("after"),
        source=src,
        lesson=data.get("lesson"),
    )


def load_spec(path: str | Path) -> AblationSpec:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"ablation spec {p} does not exist; see configs/ablations/example.yaml for the format")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"ablation spec {p}: not valid YAML: {e}") from None
    return parse_spec(data, p)


def _short_names(axes: list[Axis]) -> dict[str, str]:
    """Axis name -> the shortest unambiguous suffix of a config key (`num_tokens`, `kind`...); a
    paired group keeps its own name."""
    names = [ax.name for ax in axes]
    out = {ax.name: ax.name for ax in axes if ax.keys != [ax.name]}
    for n in names:
        if n in out:
            continue
        parts = n.replace(":", ".").split(".")
        for i in range(len(parts) - 1, -1, -1):
            cand = ".".join(parts[i:])
            if sum(1 for m in names if m.replace(":", ".").endswith(cand)) == 1:
                out[n] = cand
                break
        else:
            out[n] = n
    return out


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=+-]+", "-", text).strip("-") or "x"


def point_overrides(spec: AblationSpec, stage: str, settings: dict[str, Any], seed: int) -> list[str]:
    """The dotted overrides of one stage of one point, in precedence order."""
    ov = list(spec.overrides) + list(spec.stage_overrides.get(stage, []))
    if spec.eval_tasks is not None:
        ov.append(_dotted("eval.tasks", list(spec.eval_tasks)))
    if spec.eval_shots is not None:
        ov.append(_dotted("eval.shots", list(spec.eval_shots)))
    if spec.eval_limit is not None:
        ov.append(f"eval.limit={int(spec.eval_limit)}")
    if spec.eval_trials is not None:
        ov.append(f"eval.trials={int(spec.eval_trials)}")
    for key, value in settings.items():
        if key == "stages":
            continue
        if ":" in key:
            only, key = key.split(":", 1)
            if only != stage:
                continue
        ov.append(_dotted(key, value))
    ov += [f"train.seed={seed}", f"train.stage={stage}"]
    return ov


def fingerprint(stages: list[str], configs: dict[str, Config], eval_after: list[str]) -> str:
    """A hash of everything that determines a point's results: stages, resolved configs, what is evaluated."""
    blob = json.dumps(
        {"stages": stages, "eval_after": eval_after, "configs": {s: dataclasses.asdict(configs[s]) for s in stages}},
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def expand(spec: AblationSpec) -> list[Point]:
    """Every point of the sweep (axes' cartesian product x seeds), configs resolved and validated."""
    short = _short_names(spec.axes)
    points: list[Point] = []
    for combo in itertools.product(*[range(len(ax.labels)) for ax in spec.axes]):
        settings: dict[str, Any] = {}
        labels: dict[str, str] = {}
        for ax, i in zip(spec.axes, combo):
            labels[ax.name] = ax.labels[i]
            settings.update(zip(ax.keys, ax.values[i]))
        stages = list(settings.get("stages") or spec.stages)
        if any(s not in STAGES for s in stages):
            raise _err(spec.source, f"axis value stages={stages}: stages must come from {', '.join(STAGES)}")
        after = [s for s in (spec.eval_after if spec.eval_after is not None else stages[-1:]) if s in stages]
        resolved: dict[str, Config] = {}  # the seed is the last override: resolve once, set it per seed
        for stage in stages:
            try:
                resolved[stage] = load_config(spec.base or None, point_overrides(spec, stage, settings, spec.seeds[0]))
            except ConfigError as e:
                where = ", ".join(f"{k}={v}" for k, v in labels.items()) or "base"
                raise _err(spec.source, f"point ({where}), stage {stage}: {e}") from None
        for seed in spec.seeds:
            configs, overrides = {}, {}
            for stage in stages:
                stage_seed = spec.seeds[0] if stage in spec.fixed_seed_stages else seed
                overrides[stage] = point_overrides(spec, stage, settings, stage_seed)
                configs[stage] = copy.deepcopy(resolved[stage])
                configs[stage].train.seed = stage_seed
            label = "__".join(_safe(f"{short[ax.name]}={labels[ax.name]}") for ax in spec.axes) or "base"
            name = f"{label}__s{seed}"
            points.append(
                Point(
                    name, seed, labels, settings, stages, after, configs, overrides, fingerprint(stages, configs, after)
                )
            )
    return dedupe(points)


def dedupe(points: list[Point]) -> list[Point]:
    """Point `run` = the name of the first point with the same fingerprint (identical configs run once)."""
    first: dict[str, str] = {}
    for p in points:
        p.run = first.setdefault(p.fingerprint, p.run or p.name)
    return points


def unique_runs(points: list[Point]) -> list[Point]:
    """One point per distinct run, in sweep order."""
    seen: set[str] = set()
    return [p for p in points if not (p.run in seen or seen.add(p.run))]
