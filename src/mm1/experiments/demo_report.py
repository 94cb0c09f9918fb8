"""The demo's report: scores per stage and shots beside the blind baselines and the image-shuffled
control (score_shuffled, image_gain), example generations with their images, loss curves per data
source and scores-by-shots / image-gain plots; plus `summary.json`."""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mm1.experiments.report import (
    format_seconds,
    image_link,
    loss_curves,
    plot_loss_curves,
    plot_scores_by_shots,
    read_metrics,
    write_table,
)


def _examples(out: Path, results: list[dict], world: str, n: int) -> list[dict]:
    """The first `n` post-SFT VQA items: image (copied next to the report), question, answer, truth."""
    from mm1.eval.tasks import get_task

    sft_vqa = [r for r in results if r["stage"] == "sft" and r["metric"] == "vqa"]
    if not sft_vqa:
        return []
    by_id = {ex.id: ex for ex in get_task(sft_vqa[0]["task"], world).test}
    shown, folder = [], out / "examples"
    folder.mkdir(exist_ok=True)
    for rec in sft_vqa[0]["predictions"][0][:n]:
        ex = by_id[rec["id"]]
        image = folder / f"{ex.id}{Path(ex.images[0]).suffix}"
        shutil.copyfile(ex.images[0], image)
        shown.append(
            {
                "id": ex.id,
                "image": image,
                "question": ex.question,
                "answer": rec.get("prediction", ""),
                "truth": ex.answers[0] if ex.answers else "",
                "score": rec.get("score"),
            }
        )
    return shown


def _fmt(x: float | None, sign: str = "") -> str:
    return "no image" if x is None else f"{x:{sign}.2f}"


def _score_rows(results: list[dict], baselines: dict[str, dict]) -> tuple[list[list[Any]], bool]:
    rows, beats = [], True
    for r in results:
        base = baselines.get(r["task"], {}).get("score", math.nan)
        margin = r["score"] - base
        if r["stage"] == "sft" and r["shots"] == 0:
            beats = beats and margin > 0
        rows.append(
            [
                r["stage"],
                r["task"],
                r["metric"],
                r["shots"],
                f"{r['score']:.2f}",
                _fmt(r.get("score_shuffled")),
                _fmt(r.get("image_gain"), "+"),
                f"{base:.2f}",
                f"{margin:+.2f}",
            ]
        )
    return rows, beats


def _mean_by_type(details: list[dict]) -> dict[str, float]:
    """Per question type, the mean over trials of a VQA breakdown's "question_type" scores."""
    per_trial = [d.get("question_type", {}) for d in details]
    types = sorted({t for d in per_trial for t in d})
    return {t: sum(d.get(t, math.nan) for d in per_trial) / len(per_trial) for t in types}


def by_question_type(result: dict, baseline: dict) -> dict[str, dict[str, Any]]:
    """A VQA result per question type: score, image-shuffled score and the blind prior's score on the
    same items (empty when the items carry no question type). Which kinds of question read the image
    shows here: a type whose score equals its shuffled score is answered from the words alone."""
    real = _mean_by_type(result.get("details") or [])
    shuffled = _mean_by_type(result.get("details_shuffled") or [])
    prior = baseline.get("by_question_type", {})
    return {
        t: {
            "score": real[t],
            "score_shuffled": shuffled.get(t),
            "baseline": prior.get(t, {}).get("score"),
            "n": prior.get(t, {}).get("n"),
        }
        for t in real
    }


def _type_rows(results: list[dict], baselines: dict[str, dict]) -> list[list[Any]]:
    rows = []
    for r in results:
        if r["shots"] != 0:
            continue
        for t, v in by_question_type(r, baselines.get(r["task"], {})).items():
            shuffled = v["score_shuffled"]
            rows.append(
                [
                    r["stage"],
                    r["task"],
                    t,
                    v["n"] if v["n"] is not None else "?",
                    f"{v['score']:.1f}",
                    "no image" if shuffled is None else f"{shuffled:.1f}",
                    "no image" if shuffled is None else f"{v['score'] - shuffled:+.1f}",
                    "?" if v["baseline"] is None else f"{v['baseline']:.1f}",
                ]
            )
    return rows


def _type_section(results: list[dict], baselines: dict[str, dict]) -> list[str]:
    rows = _type_rows(results, baselines)
    if not rows:
        return []
    return [
        "## VQA by question type (0-shot)",
        "",
        "The same scores split by the world's question types, each beside its image-shuffled score and the "
        "blind prior on the same items: a type whose score equals its shuffled score is answered from the "
        "question alone, whatever the overall image gain.",
        "",
        write_table(["stage", "task", "question type", "n", "score", "shuffled", "image gain", "blind prior"], rows),
        "",
    ]


@dataclass
class DemoTiming:
    """Where a demo's minutes went, and how fast the host was meanwhile: the 15-minute budget is met or
    missed by the host as much as by the code, so a wall time is only comparable beside the host's speed."""

    wall_seconds: float
    stage_seconds: dict[str, float] = field(default_factory=dict)  # per phase, in the order run
    matmul_gflops: float | None = None  # mm1.train.precision.matmul_gflops in the run's precision
    precision: str = ""
    threads: int = 0

    def sentence(self) -> str:
        phases = ", ".join(f"{k} {format_seconds(v)}" for k, v in self.stage_seconds.items())
        host = (
            f" on a host doing {self.matmul_gflops:.0f} GFLOP/s ({self.precision} matrix product, "
            f"{self.threads} threads)"
            if self.matmul_gflops
            else ""
        )
        return f"Wall time {format_seconds(self.wall_seconds)}" + (f" ({phases})" if phases else "") + host + "."

    def summary(self) -> dict[str, Any]:
        return {
            "wall_seconds": round(self.wall_seconds, 1),
            "stage_seconds": {k: round(v, 1) for k, v in self.stage_seconds.items()},
            "host": {"matmul_gflops": self.matmul_gflops, "precision": self.precision, "threads": self.threads},
        }


def write_demo_report(
    out: Path, plan: Any, runs: dict[str, Path], results: list[dict], baselines: dict[str, dict], timing: DemoTiming
) -> dict[str, Any]:
    """Write `out/report.md` and `out/summary.json`; return the summary."""
    plots = out / "plots"
    curves = {}
    for stage, run_dir in runs.items():
        records = read_metrics(run_dir / "metrics.jsonl")
        per_source = {k: v for k, v in loss_curves(records, prefix="loss_").items()}
        curves[stage] = per_source or loss_curves(records)
    loss_pngs = {
        stage: plot_loss_curves(c, plots / f"loss_{stage}.png", title=f"{stage}: training loss per source")
        for stage, c in curves.items()
        if c
    }
    series: dict[str, dict[int, tuple[float, float]]] = {}
    styles: dict[str, str] = {}
    colour_of: dict[str, str] = {}
    for r in results:
        series.setdefault(f"{r['task']} ({r['stage']})", {})[r["shots"]] = (r["score"], r.get("std", math.nan))
    for r in results:  # the image-shuffled control of each curve: dashed, in the curve's colour
        if r.get("score_shuffled") is not None:
            label = f"{r['task']} ({r['stage']}), images shuffled"
            series.setdefault(label, {})[r["shots"]] = (r["score_shuffled"], r.get("std_shuffled") or math.nan)
            styles[label], colour_of[label] = "--", f"{r['task']} ({r['stage']})"
    for name, b in baselines.items():
        shots = sorted({r["shots"] for r in results})
        series[f"{name} blind baseline"] = {s: (b["score"], math.nan) for s in shots}
        styles[f"{name} blind baseline"] = ":"
        colour_of[f"{name} blind baseline"] = next((k for k in series if k.startswith(f"{name} (")), "")
    shots_png = plot_scores_by_shots(
        series,
        plots / "scores_by_shots.png",
        title="scores by shots",
        ylabel="CIDEr / VQA accuracy (x100)",
        styles=styles,
        colour_of=colour_of,
    )
    gains = {}
    for r in results:
        if r.get("image_gain") is not None:
            gains.setdefault(f"{r['task']} ({r['stage']})", {})[r["shots"]] = (r["image_gain"], math.nan)
    gain_png = (
        plot_scores_by_shots(
            gains,
            plots / "image_gain_by_shots.png",
            ylabel="score − image-shuffled score",
            title="image gain by shots (0 = the image is not used)",
        )
        if gains
        else None
    )
    rows, beats = _score_rows(results, baselines)
    precision = {s: json.loads((d / "run.json").read_text()).get("precision", "?") for s, d in runs.items()}
    examples = _examples(out, results, _world_of(runs["pretrain"]), plan.examples)

    lines = [
        "# mm1 demo: the MM1 workflow on the tiny synthetic world",
        "",
        timing.sentence() + " Stages: " + ", ".join(f"`{s}` ({runs[s]}, {precision[s]})" for s in runs) + ".",
        "",
        "## Scores",
        "",
        "CIDEr-D x100 for captioning, VQAv2 accuracy x100 for VQA. *Blind* baselines never look at the "
        "image: the best constant caption for CIDEr, the answer prior per question type for VQA. "
        "The model's number means something only where it beats them. *Shuffled* is the same queries "
        "scored with each query's image replaced by another test item's (demonstrations unchanged); "
        "*image gain* = score − shuffled is what the query's own image is worth: near 0, the model "
        "answers from the question and the demonstrations alone.",
        "",
        write_table(
            ["stage", "task", "metric", "shots", "score", "shuffled", "image gain", "blind baseline", "margin"], rows
        ),
        "",
        f"After SFT, 0-shot beats every blind baseline: **{'yes' if beats else 'no'}**.",
        "",
        image_link(shots_png, out, "scores by shots"),
        "",
        *([image_link(gain_png, out, "image gain by shots"), ""] if gain_png else []),
        *_type_section(results, baselines),
        "## Example generations (after SFT, 0-shot VQA)",
        "",
    ]
    for ex in examples:
        lines += [
            f"{image_link(ex['image'], out, ex['id'])}",
            "",
            f"- prompt: `<image>` {ex['question']}",
            f"- answer: **{ex['answer']}** (reference: {ex['truth']})",
            "",
        ]
    lines += [
        "## Training loss",
        "",
        "Per data source; `loss_probe` / `loss_shuffled`: one fixed batch scored every "
        "`train.eval_every` steps with its own images / with its images deranged across documents (the gap "
        "is what the images are worth to the model).",
        "",
    ]
    lines += [image_link(p, out, f"loss {s}") for s, p in loss_pngs.items()] + [""]
    report = out / "report.md"
    report.write_text("\n".join(lines) + "\n", encoding="utf-8")

    summary = {
        "report": str(report),
        **timing.summary(),
        "beats_baselines": beats,
        "runs": {k: str(v) for k, v in runs.items()},
        "precision": precision,
        "scores": [
            {
                "task": r["task"],
                "metric": r["metric"],
                "shots": r["shots"],
                "stage": r["stage"],
                "score": r["score"],
                "std": r.get("std"),
                "n": r["n"],
                "baseline": baselines.get(r["task"], {}).get("score"),
                "baseline_kind": baselines.get(r["task"], {}).get("baseline"),
                "score_shuffled": r.get("score_shuffled"),
                "image_gain": r.get("image_gain"),
                "by_question_type": by_question_type(r, baselines.get(r["task"], {})) or None,
            }
            for r in results
        ],
        "plots": [str(p) for p in [shots_png, *([gain_png] if gain_png else []), *loss_pngs.values()]],
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1), encoding="utf-8")
    return summary


def _world_of(run_dir: Path) -> str:
    from mm1.train.checkpoint import read_config, resolve_checkpoint

    return read_config(resolve_checkpoint(run_dir)).data.world
