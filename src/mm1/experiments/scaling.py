"""`mm1 hparams`: MM1's learning-rate study — grid the peak LR on a few LM sizes, fit η(N).

MM1 (section 3.4, appendix) ran LR grids at 9M, 85M, 302M and 1.2B parameters, took the best LR of
each size and fitted log η = a·ln N + b with a = −0.4214, b = −0.5535 (and λ = 0.1·η). This module
does the same at the sizes a machine can afford: short text-only pre-training runs with the image
encoder and connector frozen, so N is the language model's trainable parameter count (what
`mm1.train.optim` uses for the law). Weight decay has the trainer's meaning: `train.weight_decay` = λ =
ratio·η, the decoupled per-step decay (torch AdamW gets λ/η = ratio). The grid is an ordinary
ablation spec, `configs/hparams/budget-<name>.yaml` with paired axes `size` x `lr` (resumable, with
its own sweep report); this module then
- picks the best LR per size from the final training loss (mean over seeds), refined by a parabola
  through the grid minimum and its neighbours in log-LR (flagged when the minimum sits at the grid's edge),
- fits a, b by least squares (numpy), and plots the measured optima, the fit and the paper's line,
- writes `lr_law.json` ({a, b, wd_ratio, ...}); `mm1 train CONFIG train.lr_law=PATH` starts from it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mm1.config import PRESETS_DIR
from mm1.experiments import report as R
from mm1.experiments.ablate import AblationSpec, load_spec
from mm1.experiments.sweep import stage_dir
from mm1.registry import ConfigError
from mm1.train.optim import LAW_INTERCEPT, LAW_SLOPE, WD_RATIO, mm1_lr

HPARAMS_DIR = PRESETS_DIR / "hparams"  # budget-<name>.yaml: ablation specs with a `size` and an `lr` axis
BUDGETS = ("tiny", "small")


@dataclass
class Grid:
    """What the analysis needs from an hparams spec: its `size` labels and its (lr, λ/η) cells."""

    sizes: list[str]
    lrs: list[float]
    wd_ratios: list[float]  # decoupled weight decay λ = ratio * lr (train.weight_decay)
    cells: dict[tuple[float, float], str]  # (lr, ratio) -> the `lr` axis label of that cell
    seeds: list[int]

    def label(self, lr: float, ratio: float) -> str | None:
        return self.cells.get((lr, ratio))


def load_budget(name: str, base: str = "") -> AblationSpec:
    """`configs/hparams/budget-<name>.yaml`, its base preset replaced by `base` when given."""
    path = HPARAMS_DIR / f"budget-{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"--budget {name!r}: no {path}; budgets: {', '.join(BUDGETS)}")
    spec = load_spec(path)
    if base:
        spec.base = str(Path(base).resolve())
    return spec


def grid_of(spec: AblationSpec) -> Grid:
    """The grid of an hparams spec: paired axes `size` (model.lm fields) and `lr` (train.lr and, optionally,
    train.weight_decay; without it λ = 0.1·η as in MM1)."""
    axes = {ax.name: ax for ax in spec.axes}
    if sorted(axes) != ["lr", "size"] or "train.lr" not in axes["lr"].keys:
        raise ConfigError(
            f"hparams spec {spec.source}: needs exactly two paired axes, `size` (model.lm fields) and "
            f"`lr` (train.lr, optionally train.weight_decay); found {sorted(axes)}"
        )
    lr_axis = axes["lr"]
    i_lr = lr_axis.keys.index("train.lr")
    i_wd = lr_axis.keys.index("train.weight_decay") if "train.weight_decay" in lr_axis.keys else None
    cells = {}
    for label, values in zip(lr_axis.labels, lr_axis.values):
        lr = float(values[i_lr])
        ratio = round(float(values[i_wd]) / lr, 9) if i_wd is not None else WD_RATIO
        cells[(lr, ratio)] = label
    return Grid(
        list(axes["size"].labels),
        sorted({lr for lr, _ in cells}),
        sorted({r for _, r in cells}),
        cells,
        list(spec.seeds),
    )


def best_lr(lrs: list[float], losses: list[float]) -> tuple[float, bool]:
    """The loss-minimising LR: a parabola in log-LR through the grid minimum and its neighbours.

    Returns (lr, at_edge); at the grid's edge the grid value itself is returned and flagged, since
    the true optimum may lie outside the grid."""
    order = np.argsort(lrs)
    grid = np.asarray(lrs, dtype=float)[order]
    y = np.asarray(losses, dtype=float)[order]
    ok = np.isfinite(y)
    grid, y = grid[ok], y[ok]
    x = np.log(grid)
    if len(x) == 0:
        return math.nan, True
    i = int(np.argmin(y))
    if i == 0 or i == len(x) - 1:
        return float(grid[i]), True
    c2, c1, _ = np.polyfit(x[i - 1 : i + 2], y[i - 1 : i + 2], 2)
    if c2 <= 0:
        return float(grid[i]), False
    vertex = float(np.clip(-c1 / (2 * c2), x[i - 1], x[i + 1]))
    return float(np.exp(vertex)), False


def fit_law(n_params: list[float], lrs: list[float]) -> tuple[float, float]:
    """Least-squares fit of log η = a·ln N + b; returns (a, b)."""
    if len(n_params) < 2:
        raise ValueError(f"fitting the LR law needs at least 2 model sizes, got {len(n_params)}")
    a, b = np.polyfit(np.log(np.asarray(n_params, dtype=float)), np.log(np.asarray(lrs, dtype=float)), 1)
    return float(a), float(b)


def plot_law(n_params: list[float], lrs: list[float], a: float, b: float, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.2))
    lo, hi = min(n_params) / 3, max(max(n_params) * 3, 1.2e9)
    ns = np.geomspace(lo, hi, 100)
    ax.plot(ns, np.exp(a * np.log(ns) + b), label=f"fit: ln η = {a:.4f}·ln N {b:+.4f}")
    ax.plot(ns, [mm1_lr(int(n)) for n in ns], "--", label=f"MM1: ln η = {LAW_SLOPE}·ln N {LAW_INTERCEPT:+}")
    ax.scatter(n_params, lrs, color="k", zorder=3, label="best LR measured here")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("trainable parameters N")
    ax.set_ylabel("peak learning rate η")
    ax.set_title("learning-rate law")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return R.save_figure(fig, path)


def _n_params(run_dir: Path) -> int | None:
    info = run_dir / "run.json"
    if info.is_file():
        return int(json.loads(info.read_text())["n_trainable_params"])
    return None


def analyse(grid: Grid, points: list, records: dict[str, dict], out: Path) -> dict[str, Any]:
    """Best (lr, wd) per size, the fitted law, the plots and the report section; returns the law dict."""
    from mm1.experiments.results import aggregate, point_rows

    rows = [r for p in points if p.run in records for r in point_rows(p, records[p.run], out)]
    agg = {
        (a["labels"]["size"], a["labels"]["lr"]): a
        for a in aggregate(rows, ["size", "lr"])
        if a["column"] == "pretrain loss"
    }
    sizes, table, curves = [], [], {}
    for label in grid.sizes:
        n = next(
            (
                _n_params(stage_dir(p, out, "pretrain"))
                for p in points
                if p.labels["size"] == label and p.run in records and "failed" not in records[p.run]
            ),
            None,
        )
        best = None
        for ratio in grid.wd_ratios:
            cells = [agg.get((label, grid.label(lr, ratio))) for lr in grid.lrs]
            losses = [c["mean"] if c else math.nan for c in cells]
            curves[f"{label} (wd {ratio:g}·lr)"] = (grid.lrs, losses)
            lr, edge = best_lr(grid.lrs, losses)
            low = np.nanmin(losses) if np.isfinite(losses).any() else math.nan
            if best is None or low < best[3]:
                best = (lr, edge, ratio, low)
            table.append(
                [
                    label,
                    f"{n:,}" if n else "?",
                    f"{ratio:g}",
                    *[R.fmt_mean_std(c["mean"], c["std"], c["n"]) if c else "–" for c in cells],
                    f"{lr:.3g}" + (" (grid edge)" if edge else ""),
                ]
            )
        if n and best and math.isfinite(best[0]):
            sizes.append(
                {
                    "size": label,
                    "n_params": n,
                    "best_lr": best[0],
                    "at_edge": best[1],
                    "wd_ratio": best[2],
                    "loss": best[3],
                    "mm1_lr": mm1_lr(n),
                }
            )
    law: dict[str, Any] = {"sizes": sizes, "source": str(out)}
    if len(sizes) >= 2:
        a, b = fit_law([s["n_params"] for s in sizes], [s["best_lr"] for s in sizes])
        ratios = sorted(s["wd_ratio"] for s in sizes)
        law |= {
            "a": a,
            "b": b,
            "wd_ratio": ratios[len(ratios) // 2],
            "formula": f"eta(N) = exp({a:.4f} * ln N {b:+.4f})",
            "paper": {"a": LAW_SLOPE, "b": LAW_INTERCEPT},
        }
    law["table"], law["curves"] = table, curves
    return law


def write_hparams_report(grid: Grid, steps: int, law: dict[str, Any], out: Path, wall: float) -> Path:
    """`lr_law.json`, `plots/lr-law.png`, `plots/loss-vs-lr.png` and `hparams.md`."""
    lines = [
        "# Learning-rate law",
        "",
        f"Text-only pre-training runs of {steps} steps, seeds {grid.seeds}, "
        "image encoder and connector frozen (N = the language model's trainable parameters). "
        f"Loss = final training loss (mean of the last 10 % of steps). Wall time {R.format_seconds(wall)}.",
        "",
    ]
    fig_curves = {k: v for k, v in law["curves"].items()}
    png = _plot_loss_vs_lr(fig_curves, out / "plots" / "loss-vs-lr.png")
    lines += [
        R.write_table(["size", "N", "λ / η", *[f"lr {lr:g}" for lr in grid.lrs], "best lr"], law["table"]),
        R.image_link(png, out, "final loss vs peak LR"),
        "",
    ]
    if "a" in law:
        s = law["sizes"]
        law_png = plot_law(
            [x["n_params"] for x in s], [x["best_lr"] for x in s], law["a"], law["b"], out / "plots" / "lr-law.png"
        )
        fitted = lambda n: math.exp(law["a"] * math.log(n) + law["b"])  # noqa: E731
        preds = [[f"{n:.2g}", f"{fitted(n):.3g}", f"{mm1_lr(int(n)):.3g}"] for n in (1e6, 1e8, 1.2e9, 3e10)]
        lines += [
            "## Fit",
            "",
            f"**Fitted:** ln η = {law['a']:.4f}·ln N {law['b']:+.4f}  "
            f"(MM1: ln η = {LAW_SLOPE}·ln N {LAW_INTERCEPT:+}); decoupled weight decay λ = {law['wd_ratio']:g}·η.",
            "",
            R.image_link(law_png, out, "LR law: measured, fitted, MM1"),
            "",
            R.write_table(["N", "fitted η", "MM1 η"], preds),
            "Extrapolating a fit over a few miniature sizes to billions of parameters is not reliable; "
            "the paper's line is the safer default at scale.",
            "",
            f"Use it: `mm1 train CONFIG train.lr_law={out / 'lr_law.json'}` (a run with `train.lr` unset "
            "then starts from the fitted law instead of the paper's).",
            "",
        ]
        if any(x["at_edge"] for x in s):
            lines += [
                "**Warning:** the best LR of "
                + ", ".join(x["size"] for x in s if x["at_edge"])
                + " is at the edge of the grid; widen `lrs` before trusting the fit.",
                "",
            ]
    else:
        lines += ["Fewer than two sizes finished: no fit.", ""]
    lines += ["Every run of the grid (loss curves, exact configs): [report.md](report.md)", ""]
    saved = {k: v for k, v in law.items() if k not in ("table", "curves")}
    (out / "lr_law.json").write_text(json.dumps(saved, indent=1))
    path = out / "hparams.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def _plot_loss_vs_lr(curves: dict[str, tuple[list[float], list[float]]], path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.2))
    for label, (lrs, losses) in curves.items():
        ax.plot(lrs, losses, marker="o", label=label)
    ax.set_xscale("log")
    ax.set_xlabel("peak learning rate")
    ax.set_ylabel("final training loss")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return R.save_figure(fig, path)


def run_hparams(
    budget_name: str,
    out: Path,
    runner: Any,
    base: str = "",
    keep_going: bool = False,
    log: Callable[[str], None] = print,
) -> Path:
    """Run the grid (resumable), write the sweep report, then the LR-law report and `lr_law.json`."""
    import time

    from mm1.experiments.ablate import expand
    from mm1.experiments.results import build_summary, write_sweep_report
    from mm1.experiments.sweep import run_sweep, write_commands

    t0 = time.perf_counter()
    spec = load_budget(budget_name, base)
    grid = grid_of(spec)
    points = expand(spec)
    out.mkdir(parents=True, exist_ok=True)
    write_commands(points, out)
    log(
        f"mm1 hparams: {len(grid.sizes)} sizes x {len(grid.lrs)} LRs x {len(grid.wd_ratios)} weight decays "
        f"x {len(grid.seeds)} seeds = {len(points)} runs -> {out}"
    )
    records = run_sweep(points, out, runner, keep_going=keep_going, log=log)
    write_sweep_report(spec, points, build_summary(spec, points, records, out, time.perf_counter() - t0), out)
    law = analyse(grid, points, records, out)
    steps = points[0].configs["pretrain"].train.steps
    return write_hparams_report(grid, steps, law, out, time.perf_counter() - t0)
