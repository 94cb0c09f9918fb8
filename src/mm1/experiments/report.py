"""Markdown tables and PNG plots shared by every report mm1 writes (ablate, lessons, hparams, demo).

Reports are plain markdown next to their PNGs so they render on GitHub and in any viewer, and stay
diffable. Numbers over seeds are always shown as `mean ± std (n)`: a difference smaller than the
seed spread is not a finding, and the reader should see that at a glance.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: no display on clusters or CI
import matplotlib.pyplot as plt  # noqa: E402

Number = float | int


def mean_std(values: Iterable[Number]) -> tuple[float, float, int]:
    """Mean, sample standard deviation (ddof=1; NaN for a single value) and count, ignoring NaNs."""
    vals = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    n = len(vals)
    if n == 0:
        return math.nan, math.nan, 0
    mean = sum(vals) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (n - 1)) if n > 1 else math.nan
    return mean, std, n


def fmt_number(x: float | None, digits: int = 3) -> str:
    """Three significant digits, one decimal from 100 up, scientific for the very large or small."""
    if x is None or math.isnan(x):
        return "–"
    if x != 0 and (abs(x) >= 1e5 or abs(x) < 1e-3):
        return f"{x:.{digits - 1}e}"
    if abs(x) >= 100:
        return f"{x:.1f}"
    return f"{x:.{digits}g}"


def fmt_mean_std(mean: float, std: float, n: int, digits: int = 3) -> str:
    """`12.3 ± 0.4 (2)`; a single seed shows no spread: `12.3 (1)`."""
    if n == 0:
        return "–"
    if n == 1 or math.isnan(std):
        return f"{fmt_number(mean, digits)} ({n})"
    return f"{fmt_number(mean, digits)} ± {fmt_number(std, digits)} ({n})"


def write_table(headers: Sequence[str], rows: Iterable[Sequence[Any]], align: str = "") -> str:
    """A GitHub markdown table; `align` is one char per column (l, r, c), default left then right."""
    headers = [str(h) for h in headers]
    align = align or "l" + "r" * (len(headers) - 1)
    marks = {"l": ":--", "r": "--:", "c": ":-:"}
    esc = lambda v: str(v).replace("|", "\\|").replace("\n", " ")  # noqa: E731
    lines = ["| " + " | ".join(esc(h) for h in headers) + " |", "|" + "|".join(marks[a] for a in align) + "|"]
    for row in rows:
        cells = [esc(c) for c in row]
        if len(cells) != len(headers):
            raise ValueError(f"table row {cells} has {len(cells)} cells for {len(headers)} columns")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def read_metrics(path: str | Path) -> list[dict]:
    """The records of a run's metrics.jsonl (a truncated last line, from a killed run, is ignored)."""
    out = []
    p = Path(path)
    if not p.is_file():
        return out
    for line in p.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out


def loss_curves(records: list[dict], prefix: str = "loss") -> dict[str, tuple[list[int], list[float]]]:
    """Every numeric metric whose name starts with `prefix` (loss, loss/caption...) as (steps, values)."""
    curves: dict[str, tuple[list[int], list[float]]] = {}
    for i, rec in enumerate(records):
        step = int(rec.get("step", i))
        for k, v in rec.items():
            if k.startswith(prefix) and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                curves.setdefault(k, ([], []))
                curves[k][0].append(step)
                curves[k][1].append(float(v))
    return curves


def final_value(values: Sequence[float], frac: float = 0.1) -> float:
    """Mean over the last `frac` of a curve: a final loss that one noisy batch does not decide."""
    if not values:
        return math.nan
    k = max(1, int(round(len(values) * frac)))
    tail = values[-k:]
    return sum(tail) / len(tail)


def _smooth(values: Sequence[float], window: int) -> list[float]:
    if window <= 1:
        return list(values)
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def save_figure(fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_loss_curves(
    curves: dict[str, tuple[Sequence[int], Sequence[float]]],
    path: str | Path,
    title: str = "training loss",
    ylabel: str = "loss",
    smooth: int = 0,
    log_y: bool = False,
) -> Path:
    """One line per label (e.g. per source, or per ablation point); `smooth`=0 picks ~1/50 of the run."""
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for label, (steps, values) in curves.items():
        if not values:
            continue
        w = smooth or max(1, len(values) // 50)
        ax.plot(list(steps), _smooth(list(values), w), label=label, linewidth=1.3)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if log_y:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    if 0 < len(curves) <= 16:
        ax.legend(fontsize=7)
    return save_figure(fig, Path(path))


def plot_scores_by_shots(
    series: dict[str, dict[int, tuple[float, float]]],
    path: str | Path,
    title: str = "score by shots",
    ylabel: str = "score",
    styles: dict[str, str] | None = None,
    colour_of: dict[str, str] | None = None,
) -> Path:
    """Score vs number of in-context examples; `series[label][shots] = (mean, std)` (std may be NaN).
    `styles[label]` is a matplotlib line style ("--" for an image-shuffled control, ":" for a baseline);
    `colour_of[label]` names an earlier series whose colour it shares (a score and its control)."""
    fig, ax = plt.subplots(figsize=(6, 4))
    colours: dict[str, Any] = {}
    for label, by_shots in series.items():
        shots = sorted(by_shots)
        means = [by_shots[s][0] for s in shots]
        stds = [0.0 if math.isnan(by_shots[s][1]) else by_shots[s][1] for s in shots]
        same = colours.get((colour_of or {}).get(label, ""))
        line = ax.errorbar(
            shots,
            means,
            yerr=stds,
            marker="o",
            capsize=3,
            label=label,
            linestyle=(styles or {}).get(label, "-"),
            **({"color": same} if same else {}),
        )
        colours[label] = line[0].get_color()
    ax.set_xlabel("shots")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.set_xticks(sorted({s for by in series.values() for s in by}))
    ax.grid(alpha=0.3)
    if series:
        ax.legend(fontsize=8)
    return save_figure(fig, Path(path))


def _as_numbers(labels: Sequence[str]) -> list[float] | None:
    try:
        return [float(x) for x in labels]
    except ValueError:
        return None


def plot_axis(
    axis: str, labels: Sequence[str], panels: dict[str, dict[str, list[tuple[float, float]]]], path: str | Path
) -> Path:
    """Score vs axis value with seed error bars: one subplot per metric, one line per other-axes setting.

    `panels[metric][line_label][i] = (mean, std)` at `labels[i]`. Numeric axis values get a real x
    scale (log when they span a decade), others are evenly spaced categories."""
    n = max(1, len(panels))
    cols = min(3, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.4 * rows), squeeze=False)
    nums = _as_numbers(labels)
    xs = nums if nums is not None else list(range(len(labels)))
    for ax, (metric, lines) in zip(axes.flat, panels.items()):
        for j, (line_label, pts) in enumerate(lines.items()):
            m = [p[0] for p in pts]
            s = [0.0 if math.isnan(p[1]) else p[1] for p in pts]
            # categorical x: dodge lines sideways a little so equal scores stay visible
            dx = 0.0 if nums is not None else (j - (len(lines) - 1) / 2) * 0.06
            ax.errorbar([x + dx for x in xs], m, yerr=s, marker="o", capsize=3, label=line_label or None)
        ax.set_title(metric, fontsize=9)
        ax.set_xlabel(axis, fontsize=8)
        ax.set_xticks(xs)
        ax.set_xticklabels(labels, fontsize=7, rotation=20 if max(map(len, labels)) > 6 else 0)
        if nums is not None and min(nums) > 0 and max(nums) / min(nums) >= 10:
            ax.set_xscale("log")
            ax.set_xticks(xs)
            ax.set_xticklabels(labels, fontsize=7)
        ax.grid(alpha=0.3)
        if any(lines) and len(lines) > 1:
            ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    return save_figure(fig, Path(path))


def image_link(path: Path, report_dir: Path, alt: str) -> str:
    """A markdown image reference relative to the report, so the folder can be moved or published."""
    rel = Path(path).resolve().relative_to(Path(report_dir).resolve())
    return f"![{alt}]({rel.as_posix()})"


def format_seconds(seconds: float) -> str:
    seconds = float(seconds)
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.2f} h"
