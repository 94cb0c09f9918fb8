"""From finished points to numbers: score rows, mean ± std over seeds, `summary.json` and `report.md`.

A *row* is one measurement: point, seed, axis labels, stage, a column (`world_vqa vqa@4`,
`pretrain loss`) and a value. Evaluation results and the final training loss of every stage (mean
of the last 10 % of logged steps, overall and per data source) both become rows, so tiny runs whose
generations are still weak are compared on loss too.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from pathlib import Path
from typing import Any

from mm1.config import load_config
from mm1.experiments import report as R
from mm1.experiments.ablate import AblationSpec, Point, _safe
from mm1.experiments.sweep import compute_seconds, stage_dir, write_json_atomic

_NOT_METRICS = {
    "shots",
    "n",
    "count",
    "items",
    "n_items",
    "seconds",
    "trials",
    "seed",
    "limit",
    "step",
    "time",
    "elapsed",
    "num_examples",
    "examples",
}
LOWER_IS_BETTER = ("loss", "perplexity", "ppl")
# result key -> metric suffix of the image-shuffled control's columns (`world_vqa vqa_image_gain@4`)
CONTROLS = {"score_shuffled": "_shuffled", "image_gain": "_image_gain"}


def eval_rows(result: dict) -> list[tuple[str, int | None, str, float]]:
    """(task, shots, metric, value) of one evaluation result, whichever of the common shapes it has."""
    task = str(result.get("task", "?"))
    shots = result.get("shots")
    shots = int(shots) if shots is not None else None
    if isinstance(result.get("metrics"), dict):
        items = list(result["metrics"].items())
    elif "metric" in result and ("score" in result or "value" in result):
        items = [(result["metric"], result.get("score", result.get("value")))]
        # the image-shuffled control (None for text-only tasks: then no row, never a fake 0)
        items += [(f"{result['metric']}{suffix}", result.get(key)) for key, suffix in CONTROLS.items()]
    else:
        items = [(k, v) for k, v in result.items() if k not in _NOT_METRICS]
    return [
        (task, shots, str(k), float(v)) for k, v in items if isinstance(v, (int, float)) and not isinstance(v, bool)
    ]


def column_name(stage: str, task: str, shots: int | None, metric: str, multi_stage: bool) -> str:
    col = f"{task} {metric}" + (f"@{shots}" if shots is not None else "")
    return f"{stage}: {col}" if multi_stage else col


def lower_is_better(column: str) -> bool:
    return any(w in column.split()[-1] for w in LOWER_IS_BETTER)


def control_of(column: str) -> tuple[str, str]:
    """(the score column, "" | "_shuffled" | "_image_gain"): `world_vqa vqa_image_gain@4` ->
    (`world_vqa vqa@4`, "_image_gain"), so a control sorts and plots beside its score."""
    head, at, shots = column.rpartition("@")
    if not at:
        head, shots = column, ""
    for suffix in CONTROLS.values():
        if head.endswith(suffix):
            return head[: -len(suffix)] + (at + shots), suffix
    return column, ""


def gain_column(column: str) -> str:
    """The image-gain column of a score column (`world_vqa vqa@4` -> `world_vqa vqa_image_gain@4`)."""
    head, at, shots = column.rpartition("@")
    return f"{head}{CONTROLS['image_gain']}@{shots}" if at else f"{column}{CONTROLS['image_gain']}"


def point_rows(point: Point, record: dict, sweep_dir: Path) -> list[dict[str, Any]]:
    """Every measurement of one point (its run's record: eval results + training curves)."""
    if "failed" in record:
        return []
    multi = len(point.eval_after) > 1
    base = {"point": point.name, "run": point.run, "seed": point.seed, "labels": dict(point.labels)}
    rows = []
    for res in record.get("results", []):
        for task, shots, metric, value in eval_rows(res):
            rows.append(
                dict(
                    base,
                    stage=res.get("stage", ""),
                    task=task,
                    shots=shots,
                    metric=metric,
                    value=value,
                    column=column_name(res.get("stage", ""), task, shots, metric, multi),
                )
            )
    for stage in point.stages:
        curves = R.loss_curves(R.read_metrics(stage_dir(point, sweep_dir, stage) / "metrics.jsonl"))
        for key, (_, values) in sorted(curves.items()):
            if key == "loss" or key.startswith("loss_"):
                rows.append(
                    dict(
                        base,
                        stage=stage,
                        task="train",
                        shots=None,
                        metric=key,
                        value=R.final_value(values),
                        column=f"{stage} {key}",
                    )
                )
    return rows


def aggregate(rows: list[dict], axes: list[str]) -> list[dict[str, Any]]:
    """Mean, std and n over seeds for each (axis labels, column)."""
    groups: dict[tuple, list[float]] = {}
    for r in rows:
        key = (tuple(r["labels"].get(a, "") for a in axes), r["column"])
        groups.setdefault(key, []).append(r["value"])
    out = []
    for (labels, column), values in groups.items():
        m, s, n = R.mean_std(values)
        out.append({"labels": dict(zip(axes, labels)), "column": column, "mean": m, "std": s, "n": n, "values": values})
    return out


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


@functools.lru_cache(maxsize=8)
def _base_flat(base: str) -> dict[str, Any]:
    return _flatten(dataclasses.asdict(load_config(base or None)))


def config_diff(spec: AblationSpec, point: Point, stage: str) -> dict[str, Any]:
    """Keys whose resolved value differs from the base preset (what this point changes)."""
    base = _base_flat(spec.base)
    mine = _flatten(dataclasses.asdict(point.configs[stage]))
    return {k: v for k, v in mine.items() if base.get(k, object()) != v}


def build_summary(
    spec: AblationSpec, points: list[Point], records: dict[str, dict], sweep_dir: Path, wall_seconds: float
) -> dict[str, Any]:
    axes = [ax.name for ax in spec.axes]
    rows = [r for p in points if p.run in records for r in point_rows(p, records[p.run], sweep_dir)]
    compute = compute_seconds(records)
    return {
        "name": spec.name,
        "spec": spec.source,
        "base": spec.base,
        "sweep_dir": str(sweep_dir),
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
        "wall_seconds": wall_seconds,
        "compute_seconds": compute,
        "axes": [{"name": ax.name, "keys": ax.keys, "labels": ax.labels} for ax in spec.axes],
        "seeds": spec.seeds,
        "points": [
            {
                "name": p.name,
                "run": p.run,
                "seed": p.seed,
                "labels": p.labels,
                "stages": p.stages,
                "fingerprint": p.fingerprint,
                "failed": records.get(p.run, {}).get("failed"),
                "seconds": records.get(p.run, {}).get("seconds", {}),
                "configs": {s: f"points/{p.run}/{s}.yaml" for s in p.stages},
            }
            for p in points
        ],
        "rows": rows,
        "aggregate": aggregate(rows, axes),
    }


def _columns(summary: dict) -> list[str]:
    """Scores first, each followed by its shuffled score and image gain; losses last."""
    cols = list(dict.fromkeys(a["column"] for a in summary["aggregate"]))
    order = ("", *CONTROLS.values())
    return sorted(
        cols, key=lambda c: (" loss" in c or c.startswith("train"), control_of(c)[0], order.index(control_of(c)[1]))
    )


def _axis_panels(ax: Any, axes: list[str], combos: list[tuple], cell: dict, cols: list[str]) -> dict:
    """`plot_axis` panels for `cols`: one line per setting of the other axes."""
    others = [x for x in axes if x != ax.name]
    panels: dict[str, dict[str, list[tuple[float, float]]]] = {}
    for c in cols:
        lines_by: dict[str, list[tuple[float, float]]] = {}
        for combo in combos:
            rest = ", ".join(f"{x}={combo[axes.index(x)]}" for x in others)
            if rest in lines_by:
                continue
            pts = []
            for lab in ax.labels:
                key = tuple(lab if x == ax.name else combo[axes.index(x)] for x in axes)
                a = cell.get((key, c))
                pts.append((a["mean"], a["std"]) if a else (math.nan, math.nan))
            lines_by[rest] = pts
        panels[c] = lines_by
    return panels


def write_sweep_report(
    spec: AblationSpec, points: list[Point], summary: dict, sweep_dir: Path, name: str = "report"
) -> Path:
    """`NAME.md` (+ `NAME.json` summary and `plots/NAME/*.png` or `plots/*.png`) of a sweep."""
    sweep_dir = Path(sweep_dir)
    plots = sweep_dir / "plots" / ("" if name == "report" else name)
    axes = [ax.name for ax in spec.axes]
    cols = _columns(summary)
    cell = {(tuple(a["labels"].get(x, "") for x in axes), a["column"]): a for a in summary["aggregate"]}
    combos = list(dict.fromkeys(tuple(p.labels.get(x, "") for x in axes) for p in points))
    n_runs = len({p.run for p in points})
    lines = [
        f"# Ablation `{spec.name}`",
        "",
        f"- spec: `{spec.source}`; base preset: `{spec.base or 'built-in defaults'}`",
        f"- stages: {', '.join(spec.stages)}; seeds: {spec.seeds}; {len(points)} points, {n_runs} distinct runs",
        f"- wall time of this invocation: {R.format_seconds(summary['wall_seconds'])}; "
        f"compute of all points (train, each shared stage once, + eval): "
        f"{R.format_seconds(summary['compute_seconds'])}",
        "",
        "## Results",
        "",
        "Mean ± sample std over seeds (number of seeds). Loss and perplexity: lower is "
        "better; every other metric: higher is better. `loss` columns are the final training loss "
        "(mean of the last 10 % of steps). `_shuffled`: the same queries scored with each query's image "
        "replaced by another test item's; `_image_gain` = score − shuffled, what the image is worth "
        "(text-only tasks have none).",
        "",
    ]
    table = [
        [
            *combo,
            *(
                R.fmt_mean_std(cell[(combo, c)]["mean"], cell[(combo, c)]["std"], cell[(combo, c)]["n"])
                if (combo, c) in cell
                else "–"
                for c in cols
            ),
        ]
        for combo in combos
    ]
    lines.append(
        R.write_table(
            [*(axes or ["point"]), *cols],
            [r if axes else ["base", *r] for r in table],
            "l" * max(1, len(axes)) + "r" * len(cols),
        )
    )
    if cols:
        scores = [c for c in cols if not (" loss_" in c or c.startswith("train")) and not control_of(c)[1]][:9]
        gains = [c for c in cols if control_of(c)[1] == CONTROLS["image_gain"]][:9]
        for ax in spec.axes:
            png = R.plot_axis(
                ax.name, ax.labels, _axis_panels(ax, axes, combos, cell, scores), plots / f"axis-{_safe(ax.name)}.png"
            )
            lines += [f"### {ax.name}", "", R.image_link(png, sweep_dir, f"scores vs {ax.name}"), ""]
            if gains:
                png = R.plot_axis(
                    ax.name,
                    ax.labels,
                    _axis_panels(ax, axes, combos, cell, gains),
                    plots / f"axis-{_safe(ax.name)}-image-gain.png",
                )
                lines += [
                    "Image gain (score − the same queries with shuffled images; near 0 = the image is not used):",
                    "",
                    R.image_link(png, sweep_dir, f"image gain vs {ax.name}"),
                    "",
                ]
    curves = {}
    for p in points:
        recs = R.read_metrics(stage_dir(p, sweep_dir, p.stages[-1]) / "metrics.jsonl")
        c = R.loss_curves(recs).get("loss")
        label = ", ".join(f"{v}" for v in p.labels.values()) or "base"
        if c and f"{label} s{p.seed}" not in curves:
            curves[f"{label} s{p.seed}"] = c
    if curves:
        png = R.plot_loss_curves(curves, plots / "loss-curves.png", title=f"{spec.stages[-1]} training loss")
        lines += ["## Training loss", "", R.image_link(png, sweep_dir, "loss curves"), ""]
    lines += [
        "## Configs",
        "",
        "Each point's exact resolved config per stage is in the linked YAML; "
        "the last column lists what differs from the base preset (last stage).",
        "",
    ]
    common: dict[str, Any] | None = None
    diffs = {}
    for p in points:
        diffs[p.name] = config_diff(spec, p, p.stages[-1])
        common = (
            dict(diffs[p.name])
            if common is None
            else {k: v for k, v in common.items() if diffs[p.name].get(k, object()) == v}
        )
    common = common or {}
    if common:
        lines += ["Every point: " + ", ".join(f"`{k}={v}`" for k, v in sorted(common.items()) if k != "train.seed"), ""]
    rows = []
    for p, info in zip(points, summary["points"]):
        links = " ".join(f"[{s}]({path})" for s, path in info["configs"].items())
        own = ", ".join(f"`{k}={v}`" for k, v in sorted(diffs[p.name].items()) if k not in common)
        status = "failed: " + info["failed"] if info["failed"] else R.format_seconds(sum(info["seconds"].values()))
        rows.append([p.name, p.run if p.run != p.name else "(own)", status, links, own])
    lines.append(R.write_table(["point", "shares run", "time", "configs", "differs from base"], rows, "lllll"))
    path = sweep_dir / f"{name}.md"
    path.write_text("\n".join(lines) + "\n")
    write_json_atomic(sweep_dir / ("summary.json" if name == "report" else f"{name}.json"), summary)
    return path


def run_ablation(
    spec: AblationSpec,
    sweep_dir: Path,
    runner: Any,
    keep_going: bool = False,
    points: list[Point] | None = None,
    log: Any = print,
) -> Path:
    """Expand, run what is missing, write `summary.json` + `report.md`; returns the report path."""
    from mm1.experiments.ablate import expand
    from mm1.experiments.sweep import run_sweep, write_commands

    t0 = time.perf_counter()
    points = points if points is not None else expand(spec)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(
        sweep_dir / "sweep.json",
        {
            "spec": spec.source,
            "name": spec.name,
            "points": [
                {
                    "name": p.name,
                    "run": p.run,
                    "seed": p.seed,
                    "labels": p.labels,
                    "settings": p.settings,
                    "stages": p.stages,
                    "overrides": p.overrides,
                    "fingerprint": p.fingerprint,
                }
                for p in points
            ],
        },
    )
    write_commands(points, sweep_dir)
    records = run_sweep(points, sweep_dir, runner, keep_going=keep_going, log=log)
    summary = build_summary(spec, points, records, sweep_dir, time.perf_counter() - t0)
    return write_sweep_report(spec, points, summary, sweep_dir)
