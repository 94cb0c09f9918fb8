"""`mm1 hparams`: MM1's learning-rate study — grid the peak LR on a few LM sizes, fit η(N).

MM1 (section 3.4, appendix) ran LR grids at 9M, 85M, 302M and 1.2B parameters, took the best LR of
each size and fitted log η = a·ln N + b with a = −0.4214, b = −0.5535 (and λ = 0.1·η). This module
does the same at the sizes a machine can afford: short text-only pre-training runs with the image
encoder and connector frozen, so N is the language model's trainable parameter count (what
`mm1.train.optim` uses for the law). Weight decay has the trainer's meaning: `train.weight_decay` = λ =
ratio·η, the decoupled per-step decay (torch AdamW gets λ/η = ratio). The grid is an ordinary ablation sweep (`size` x `lr`
paired axes, resumable, with its own report); this module then
- picks the best LR per size from the final training loss (mean over seeds), refined by a parabola
  through the grid minimum and its neighbours in log-LR (flagged when the minimum sits at the grid's edge),
- fits a, b by least squares (numpy), and plots the measured optima, the fit and the paper's line,
- writes `lr_law.json` ({a, b, wd_ratio, ...}); `mm1 train CONFIG train.lr_law=PATH` starts from it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from mm1.experiments import report as R
from mm1.experiments.ablate import AblationSpec, parse_spec
from mm1.experiments.sweep import stage_dir
from mm1.train.optim import LAW_INTERCEPT, LAW_SLOPE, WD_RATIO, mm1_lr


@dataclass
class HparamBudget:
    sizes: dict[str, dict[str, int]]  # label -> model.lm fields
    lrs: list[float]
    wd_ratios: list[float]  # decoupled weight decay λ = ratio * lr (train.weight_decay)
    steps: int
    seeds: list[int]
    overrides: list[str]


_TEXT_ONLY = ["data.sources.caption.weight=0", "data.sources.interleaved.weight=0", "data.sources.text.weight=1",
              "train.freeze_vision=true", "train.freeze_connector=true"]
_SMALL_VISION = ["model.vision.width=32", "model.vision.depth=1", "model.vision.heads=2", "model.vision.mlp_dim=64",
                 "model.connector.kind=avgpool", "model.connector.num_tokens=4"]

BUDGETS = {
    "tiny": HparamBudget(
        sizes={"xs": dict(dim=32, n_layers=1, n_heads=2, n_kv_heads=2, ffn_dim=88),
               "s": dict(dim=64, n_layers=2, n_heads=2, n_kv_heads=2, ffn_dim=172),
               "m": dict(dim=128, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=344)},
        lrs=[1e-3, 2e-3, 4e-3, 8e-3, 1.6e-2], wd_ratios=[WD_RATIO], steps=60, seeds=[0],
        overrides=_TEXT_ONLY + _SMALL_VISION + ["data.seq_len=128", "data.batch_size=8", "train.warmup_steps=6"]),
    "small": HparamBudget(
        sizes={"xs": dict(dim=64, n_layers=2, n_heads=2, n_kv_heads=2, ffn_dim=172),
               "s": dict(dim=128, n_layers=3, n_heads=4, n_kv_heads=2, ffn_dim=344),
               "m": dict(dim=256, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=688),
               "l": dict(dim=384, n_layers=6, n_heads=6, n_kv_heads=2, ffn_dim=1024)},
        lrs=[5e-4, 1e-3, 2e-3, 4e-3, 8e-3, 1.6e-2], wd_ratios=[0.0, WD_RATIO], steps=200, seeds=[0, 1],
        overrides=_TEXT_ONLY + _SMALL_VISION + ["data.seq_len=256", "data.batch_size=8", "train.warmup_steps=20"]),
}


def cell_label(budget: HparamBudget, lr: float, ratio: float) -> str:
    """How a grid cell is named: `0.004`, or `0.004,wd=0.1` when weight decay is gridded too."""
    return f"{lr:g}" if len(budget.wd_ratios) == 1 else f"{lr:g},wd={ratio:g}"


def grid_spec(budget: HparamBudget, base: str, name: str = "hparams") -> AblationSpec:
    """The LR x weight-decay x size grid as an ablation spec (one run per cell and seed)."""
    fields = list(next(iter(budget.sizes.values())))
    size = {"labels": list(budget.sizes)} | {f"model.lm.{f}": [s[f] for s in budget.sizes.values()] for f in fields}
    cells = [(lr, r) for lr in budget.lrs for r in budget.wd_ratios]
    lr_wd = {"labels": [cell_label(budget, lr, r) for lr, r in cells],
             "train.lr": [float(lr) for lr, _ in cells], "train.weight_decay": [float(lr * r) for lr, r in cells]}
    return parse_spec({"name": name, "base": base, "seeds": budget.seeds, "stages": ["pretrain"],
                       "overrides": budget.overrides + [f"train.steps={budget.steps}", f"train.save_every={budget.steps}",
                                                        "train.keep_last=1"],
                       "paired": {"size": size, "lr": lr_wd}, "eval": {"after": []}})


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
    c2, c1, _ = np.polyfit(x[i - 1:i + 2], y[i - 1:i + 2], 2)
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


def analyse(budget: HparamBudget, spec: AblationSpec, points: list, records: dict[str, dict], out: Path) -> dict[str, Any]:
    """Best (lr, wd) per size, the fitted law, the plots and the report section; returns the law dict."""
    from mm1.experiments.results import aggregate, point_rows

    rows = [r for p in points if p.run in records for r in point_rows(p, records[p.run], out)]
    agg = {(a["labels"]["size"], a["labels"]["lr"]): a for a in aggregate(rows, ["size", "lr"])
           if a["column"] == "pretrain loss"}
    sizes, table, curves = [], [], {}
    for label in budget.sizes:
        n = next((_n_params(stage_dir(p, out, "pretrain")) for p in points
                  if p.labels["size"] == label and p.run in records and "failed" not in records[p.run]), None)
        best = None
        for ratio in budget.wd_ratios:
            cells = [agg.get((label, cell_label(budget, lr, ratio))) for lr in budget.lrs]
            losses = [c["mean"] if c else math.nan for c in cells]
            curves[f"{label} (wd {ratio:g}·lr)"] = (budget.lrs, losses)
            lr, edge = best_lr(budget.lrs, losses)
            low = np.nanmin(losses) if np.isfinite(losses).any() else math.nan
            if best is None or low < best[3]:
                best = (lr, edge, ratio, low)
            table.append([label, f"{n:,}" if n else "?", f"{ratio:g}",
                          *[R.fmt_mean_std(c["mean"], c["std"], c["n"]) if c else "–" for c in cells],
                          f"{lr:.3g}" + (" (grid edge)" if edge else "")])
        if n and best and math.isfinite(best[0]):
            sizes.append({"size": label, "n_params": n, "best_lr": best[0], "at_edge": best[1], "wd_ratio": best[2],
                          "loss": best[3], "mm1_lr": mm1_lr(n)})
    law: dict[str, Any] = {"sizes": sizes, "source": str(out)}
    if len(sizes) >= 2:
        a, b = fit_law([s["n_params"] for s in sizes], [s["best_lr"] for s in sizes])
        ratios = sorted(s["wd_ratio"] for s in sizes)
        law |= {"a": a, "b": b, "wd_ratio": ratios[len(ratios) // 2], "formula": f"eta(N) = exp({a:.4f} * ln N {b:+.4f})",
                "paper": {"a": LAW_SLOPE, "b": LAW_INTERCEPT}}
    law["table"], law["curves"] = table, curves
    return law


def write_hparams_report(budget: HparamBudget, law: dict[str, Any], out: Path, wall: float) -> Path:
    """`lr_law.json`, `plots/lr-law.png`, `plots/loss-vs-lr.png` and `hparams.md`."""
    lines = ["# Learning-rate law", "", f"Text-only pre-training runs of {budget.steps} steps, seeds {budget.seeds}, "
             "image encoder and connector frozen (N = the language model's trainable parameters). "
             f"Loss = final training loss (mean of the last 10 % of steps). Wall time {R.format_seconds(wall)}.", ""]
    fig_curves = {k: v for k, v in law["curves"].items()}
    png = _plot_loss_vs_lr(fig_curves, out / "plots" / "loss-vs-lr.png")
    lines += [R.write_table(["size", "N", "λ / η", *[f"lr {lr:g}" for lr in budget.lrs], "best lr"], law["table"]),
              R.image_link(png, out, "final loss vs peak LR"), ""]
    if "a" in law:
        s = law["sizes"]
        law_png = plot_law([x["n_params"] for x in s], [x["best_lr"] for x in s], law["a"], law["b"],
                           out / "plots" / "lr-law.png")
        fitted = lambda n: math.exp(law["a"] * math.log(n) + law["b"])  # noqa: E731
        preds = [[f"{n:.2g}", f"{fitted(n):.3g}", f"{mm1_lr(int(n)):.3g}"] for n in (1e6, 1e8, 1.2e9, 3e10)]
        lines += ["## Fit", "", f"**Fitted:** ln η = {law['a']:.4f}·ln N {law['b']:+.4f}  "
                  f"(MM1: ln η = {LAW_SLOPE}·ln N {LAW_INTERCEPT:+}); decoupled weight decay λ = {law['wd_ratio']:g}·η.", "",
                  R.image_link(law_png, out, "LR law: measured, fitted, MM1"), "",
                  R.write_table(["N", "fitted η", "MM1 η"], preds),
                  "Extrapolating a fit over a few miniature sizes to billions of parameters is not reliable; "
                  "the paper's line is the safer default at scale.", "",
                  f"Use it: `mm1 train CONFIG train.lr_law={out / 'lr_law.json'}` (a run with `train.lr` unset "
                  "then starts from the fitted law instead of the paper's).", ""]
        if any(x["at_edge"] for x in s):
            lines += ["**Warning:** the best LR of " + ", ".join(x["size"] for x in s if x["at_edge"]) +
                      " is at the edge of the grid; widen `lrs` before trusting the fit.", ""]
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


def run_hparams(budget_name: str, out: Path, runner: Any, base: str, keep_going: bool = False,
                log: Callable[[str], None] = print) -> Path:
    """Run the grid (resumable), write the sweep report, then the LR-law report and `lr_law.json`."""
    import time

    from mm1.experiments.ablate import expand
    from mm1.experiments.results import build_summary, write_sweep_report
    from mm1.experiments.sweep import run_sweep, write_commands

    t0 = time.perf_counter()
    budget = BUDGETS[budget_name]
    spec = grid_spec(budget, base, name=f"hparams-{budget_name}")
    points = expand(spec)
    out.mkdir(parents=True, exist_ok=True)
    write_commands(points, out)
    log(f"mm1 hparams: {len(budget.sizes)} sizes x {len(budget.lrs)} LRs x {len(budget.wd_ratios)} weight decays "
        f"x {len(budget.seeds)} seeds = {len(points)} runs -> {out}")
    records = run_sweep(points, out, runner, keep_going=keep_going, log=log)
    write_sweep_report(spec, points, build_summary(spec, points, records, out, time.perf_counter() - t0), out)
    law = analyse(budget, spec, points, records, out)
    return write_hparams_report(budget, law, out, time.perf_counter() - t0)
