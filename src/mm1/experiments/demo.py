"""`mm1 demo`: the whole MM1 workflow on the tiny synthetic world, on a laptop CPU, in minutes.

    world ──> 0. encoder (tags) ──> 1. MLLM pre-training (45:45:10) ──> eval 0/4/8-shot
                                                 └──> 2. SFT (chat) ──> eval 0-shot
    ──> runs/demo/report.md (tables, example generations, plots) + summary.json

Each stage is an ordinary `mm1 train` run directory under `--out`, so a finished stage is reused
when the demo is run again (delete the folder, or pass `--fresh`, to start over) and an interrupted
stage resumes from its last checkpoint. The report puts every score beside a *blind* baseline
(the question-only answer prior for VQA, the best constant caption for CIDEr): a number that does
not beat them says nothing about the images.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mm1.config import CAPTION_TEXTS, SUPERCLASS_POOLS, Config, load_config, preset_path
from mm1.data.inputs import resolve_inputs
from mm1.models.stems import STEMS
from mm1.train.checkpoint import latest_checkpoint
from mm1.train.encoder import OBJECTIVES
from mm1.train.precision import PRECISIONS, matmul_gflops, resolve_precision

STAGE_NAMES = {"encoder": "0. encoder pre-training", "pretrain": "1. MLLM pre-training", "sft": "2. SFT"}


@dataclass
class DemoPlan:
    """What the demo runs; the defaults fit the 15-minute budget on 2 CPU cores."""

    preset: str = "tiny"
    # stage 0: SuperClass on the images' tags (shapes, colours, places, count, and the background in a
    # softmax of its own: the tiny preset's train.superclass_groups), pooled by log-sum-exp so each token
    # must show what is where: the ViT carries colour, count, position and background (probes 95-99 /
    # 96-100 / 76-94 / 99 %) and shape (81-83 % at the rate below; the contrastive stage on captions: 21),
    # and the captions name the background rightly (docs/grounding.md sections 17, 21, 22 and 24)
    encoder_objective: str = "superclass"
    encoder_text: str = "tags"
    encoder_pool: str = "lse"
    encoder_steps: int = 900
    # stage 0's peak LR as a multiple of the MM1 law for its parameters (train.lr_scale): the law was fitted
    # to LM pre-training, and at 1 x the ViT carries shape at 46-77 % after 900 steps (by the draw), at 2 x
    # 81 / 83 % in two seeds, more than 1,500 steps at 1 x (75-77; docs/grounding.md section 24)
    encoder_lr_scale: float = 2.0
    # twice section 17's 600: with the ViT frozen and SFT data mixed in (below), the LM learns to read
    # shape in pre-training (0-shot 25-39 %) and SFT keeps it; VQA after SFT 53.4 / 49.1 / 53.35 over
    # three draws against 45-50 at 600 steps (docs/grounding.md section 19). A clean clone at 1,100 steps
    # ran make demo in 13 min 46 s but scored 47.75 after SFT (section 21); with the 2 x encoder 1,000 steps
    # lost 1.4 points in each of two draws (section 24)
    pretrain_steps: int = 1200
    # the ViT's input in every stage. 128 px with patch 16 (the world draws its images at 128 px) gives
    # the conv stem's same 8 x 8 tokens with twice the pixels across each shape (shape probe 73 against
    # 68 %); with a frozen ViT and SFT data in pre-training it read shape after SFT in one draw of three
    # (docs/grounding.md section 18), not reliably enough to be the default. 0 = the preset's (tiny: 64 / 8)
    image_size: int = 0
    patch_size: int = 0
    # with SFT data already in the pre-training mixture and replies in the captions' tokens, the model answers
    # chat questions from the image before SFT; 300 steps at the rate below read more on top (all 600 test
    # questions, two draws: 54.92 / 53.08 against 54.12 / 51.37 at 150 steps and 54.65 / 53.37 at 500;
    # docs/grounding.md section 24)
    sft_steps: int = 300
    # SFT at the encoder's own resolution (0 = the stages' image size above), one crop per image: at this budget the
    # high-resolution variant (2x2 crops + overview; both DemoPlan fields) scored lower (docs/grounding.md)
    sft_image_size: int = 0
    sft_subimage_grid: int = 0
    # MM1's fraction of the law (the preset's train.sft_lr_scale): since replies are the captions' tokens SFT
    # need not relearn reading, and 0.5 x did no better (54.18 / 50.53 at 150 steps; section 24)
    sft_lr_scale: float = 0.17
    # the ViT's stem in every stage: 3x3 stride-2 convolutions carry count and position to the LM where
    # patchify did not (docs/grounding.md section 14); "patch" keeps the model exportable to HF
    stem: str = "conv"
    # MLLM pre-training moves the ViT at this multiple of the law's rate, 0 = frozen (no backward through
    # it, and a cheaper step). At 1 x the conv stem's captions fell apart (CIDEr 33-52 against 84,
    # section 10); 0.3 x keeps what the encoder learned of colour and count but halves what the
    # connector carries of shape (probe 68 -> 48 %), which a frozen ViT keeps (section 18)
    pretrain_vision_lr_mult: float = 0.0
    # the world's SFT conversations as a fourth pre-training source at this weight beside MM1's 45:45:10
    # (0 = MM1's mixture alone): with a frozen ViT, SFT from such a pre-training no longer unlearns the
    # colours at 0.5 x the law (VQA after SFT 49.1 against 43.6; section 18)
    pretrain_sft_weight: float = 0.15
    # SFT with the ViT frozen: after a tag-trained encoder, moving it (1 x or 0.3 x) lost the colours
    # in one draw of three (VQA after SFT 28.7 and 27.0 against 38.2 frozen; docs/grounding.md section 16)
    sft_freeze_vision: bool = True
    # native: bf16 where it runs natively, else fp32 (mm1.train.precision); "fp32" or "bf16" force one
    precision: str = "native"
    eval_limit: int = 200
    eval_tasks: list[str] = field(default_factory=lambda: ["world_caption", "world_vqa"])
    shots: list[int] = field(default_factory=lambda: [0, 4, 8])
    examples: int = 4
    overrides: list[str] = field(default_factory=list)


def _say(msg: str) -> None:
    print(f"[demo {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _stage_config(plan: DemoPlan, stage: str, extra: list[str]) -> Config:
    precision = f"train.precision={resolve_precision(plan.precision, 'demo: precision')}"
    sizes = [f"model.vision.{k}={getattr(plan, k)}" for k in ("image_size", "patch_size") if getattr(plan, k)]
    fixed = [f"train.stage={stage}", precision, f"model.vision.stem={plan.stem}", *sizes]
    return load_config(preset_path(plan.preset), [*fixed, *plan.overrides, *extra])


def _train_stage(plan: DemoPlan, out: Path, stage: str, steps: int, extra: list[str]) -> Path:
    from mm1.train.trainer import train

    run_dir = out / stage
    cfg = _stage_config(plan, stage, [f"train.steps={steps}", f"train.save_every={max(1, steps // 3)}", *extra])
    done = latest_checkpoint(run_dir) if run_dir.exists() else None
    if done is not None and done.name == f"step-{steps}":
        _say(f"{STAGE_NAMES[stage]}: already trained ({done}), reusing it")
        return run_dir
    _say(f"{STAGE_NAMES[stage]}: {steps} steps -> {run_dir}")
    # a rerun with another step budget continues the stage's run with the new length
    train(cfg, run_dir, resume=run_dir.exists(), allow_change=("train.steps", "train.save_every"))
    return run_dir


def _evaluate(plan: DemoPlan, run_dir: Path, stage: str, shots: list[int], out: Path, chat: bool) -> list[dict]:
    from mm1.eval.runner import evaluate
    from mm1.train.checkpoint import load_checkpoint

    model, cfg, tokenizer = load_checkpoint(run_dir)
    cfg.eval.chat = chat
    _say(f"evaluating {stage}: {', '.join(plan.eval_tasks)} at {shots}-shot, {plan.eval_limit} items each")
    results = evaluate(
        model.eval(),
        tokenizer,
        cfg,
        plan.eval_tasks,
        shots,
        plan.eval_limit,
        out_dir=out / "eval" / stage,
        log=lambda m: _say("  " + m),
    )
    for r in results:
        r["stage"] = stage
    return results


def _baselines(plan: DemoPlan, cfg: Config) -> dict[str, dict]:
    from mm1.eval.baselines import blind_baseline
    from mm1.eval.tasks import get_task

    return {name: blind_baseline(get_task(name, cfg.data.world), limit=plan.eval_limit) for name in plan.eval_tasks}


@contextmanager
def timed(seconds: dict[str, float], phase: str) -> Iterator[None]:
    """Add the block's wall time to `seconds[phase]`. The demo's budget is minutes on a laptop and the
    host's speed moves them as much as the code does, so the report says where each minute went."""
    start = time.perf_counter()
    try:
        yield
    finally:
        seconds[phase] = seconds.get(phase, 0.0) + time.perf_counter() - start


def train_pretrained(plan: DemoPlan, out: Path, seconds: dict[str, float] | None = None) -> Path:
    """Stages 0 and 1 into `out` (reused when already trained); the pre-training run dir. `seconds`
    collects each phase's wall time ("world", "encoder", "pretrain")."""
    seconds = {} if seconds is None else seconds
    with timed(seconds, "world"):
        resolve_inputs(_stage_config(plan, "pretrain", []), load_tokenizer=False, world_part="eval")
    targets = [
        f"train.encoder_objective={plan.encoder_objective}",
        f"data.caption_text={plan.encoder_text}",
        f"train.superclass_pool={plan.encoder_pool}",
        f"train.lr_scale={plan.encoder_lr_scale}",
    ]
    with timed(seconds, "encoder"):
        encoder = _train_stage(plan, out, "encoder", plan.encoder_steps, targets)
    with timed(seconds, "pretrain"):
        return _train_stage(plan, out, "pretrain", plan.pretrain_steps, pretrain_overrides(plan, encoder))


def pretrain_overrides(plan: DemoPlan, encoder: Path) -> list[str]:
    """Stage 1's config on top of the preset: from the encoder, the ViT frozen or slowed, SFT data mixed in."""
    if plan.pretrain_vision_lr_mult < 0 or plan.pretrain_sft_weight < 0:
        raise ValueError(
            f"demo: pretrain_vision_lr_mult ({plan.pretrain_vision_lr_mult}) and pretrain_sft_weight "
            f"({plan.pretrain_sft_weight}) must be >= 0 (0 = a frozen ViT / MM1's mixture alone)"
        )
    vision = (
        f"train.lr_mult.vision={plan.pretrain_vision_lr_mult}"
        if plan.pretrain_vision_lr_mult
        else "train.freeze_vision=True"
    )
    mix = []
    if plan.pretrain_sft_weight:
        sft_file = _stage_config(plan, "sft", []).data.sft  # the file SFT reads, e.g. {world}/sft/train.json
        mix = [
            "data.sources.sft.kind=sft",
            f"data.sources.sft.path={json.dumps(sft_file)}",
            f"data.sources.sft.weight={plan.pretrain_sft_weight}",
        ]
    return [f"train.init_from={encoder}", vision, *mix]


def sft_overrides(plan: DemoPlan, pretrain: Path) -> list[str]:
    """Stage 2's config on top of the preset: from the pre-training run, at the plan's resolution and rate."""
    return [
        f"train.init_from={pretrain}",
        *([f"model.vision.image_size={plan.sft_image_size}"] if plan.sft_image_size else []),
        f"model.subimage_grid={plan.sft_subimage_grid}",
        f"train.sft_lr_scale={plan.sft_lr_scale}",
        f"train.freeze_vision={plan.sft_freeze_vision}",
    ]


def run_demo(plan: DemoPlan, out: Path) -> dict[str, Any]:
    """Run every stage into `out` and write report.md + summary.json; returns the summary."""
    from mm1.experiments.demo_report import DemoTiming, write_demo_report

    start = time.perf_counter()
    seconds: dict[str, float] = {}
    out.mkdir(parents=True, exist_ok=True)
    base = _stage_config(plan, "pretrain", [])
    precision = "bf16" if base.train.precision == "bf16" else "fp32"
    host = {"matmul_gflops": round(matmul_gflops(precision), 1), "precision": precision}
    _say(f"synthetic world ({base.data.world_preset}) at {base.data.world}; training in {base.train.precision}")
    with timed(seconds, "world"):
        resolve_inputs(base, load_tokenizer=False, world_part="eval")  # built (and its summary printed) up front

    pretrain = train_pretrained(plan, out, seconds)
    encoder = out / "encoder"
    with timed(seconds, "eval_pretrain"):
        results = _evaluate(plan, pretrain, "pretrain", plan.shots, out, chat=False)
    with timed(seconds, "sft"):
        sft = _train_stage(plan, out, "sft", plan.sft_steps, sft_overrides(plan, pretrain))
    with timed(seconds, "eval_sft"):
        results += _evaluate(plan, sft, "sft", [0], out, chat=True)

    _say("blind baselines (no image)")
    with timed(seconds, "baselines"):
        baselines = _baselines(plan, base)
    runs = {"encoder": encoder, "pretrain": pretrain, "sft": sft}
    timing = DemoTiming(time.perf_counter() - start, seconds, threads=torch.get_num_threads(), **host)
    summary = write_demo_report(out, plan, runs, results, baselines, timing)
    _say(f"done in {summary['wall_seconds']:.0f} s: {out / 'report.md'}")
    return summary


# DemoPlan fields offered as `--name-with-dashes NUMBER`: (type, what it is)
NUMBER_FLAGS: dict[str, tuple[type, str]] = {
    "encoder_steps": (int, "stage 0's steps"),
    "encoder_lr_scale": (float, "stage 0's peak LR, x the MM1 law for its parameters"),
    "pretrain_steps": (int, "MLLM pre-training's steps"),
    "sft_steps": (int, "SFT's steps"),
    "image_size": (int, "the ViT's input size in pixels, every stage; 0 = the preset's"),
    "patch_size": (int, "pixels per ViT token side, every stage; 0 = the preset's (128 with 16 = 64 with 8's tokens)"),
    "eval_limit": (int, "test items per task"),
    "pretrain_vision_lr_mult": (float, "the ViT's LR in MLLM pre-training, x the law; 0 = frozen"),
    "pretrain_sft_weight": (float, "the world's SFT conversations as a pre-training source at this weight; 0 = none"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    parser.add_argument("--preset", default="tiny", help="model/data preset (default tiny)")
    parser.add_argument("--fresh", action="store_true", help="delete --out first instead of reusing finished stages")
    parser.add_argument(
        "--stem",
        choices=sorted(STEMS),
        default=DemoPlan.stem,
        help=f"the ViT's stem (default {DemoPlan.stem}; patch: exportable to HF, reads count and position less)",
    )
    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        default=DemoPlan.precision,
        help="native (default): bf16 where this CPU/GPU runs it natively, else fp32",
    )
    parser.add_argument(
        "--encoder-objective",
        choices=OBJECTIVES,
        default=DemoPlan.encoder_objective,
        help=f"stage 0's objective (default {DemoPlan.encoder_objective}; the contrastive encoder: "
        "--encoder-objective clip --encoder-text caption --encoder-steps 150 --encoder-lr-scale 1 "
        "--no-sft-freeze-vision)",
    )
    parser.add_argument(
        "--encoder-text",
        choices=CAPTION_TEXTS,
        default=DemoPlan.encoder_text,
        help=f"what stage 0 learns from each image: its tags or its caption (default {DemoPlan.encoder_text})",
    )
    parser.add_argument(
        "--encoder-pool",
        choices=SUPERCLASS_POOLS,
        default=DemoPlan.encoder_pool,
        help=f"how a superclass stage 0 pools its tokens' class logits (default {DemoPlan.encoder_pool})",
    )
    parser.add_argument(
        "--sft-freeze-vision",
        action=argparse.BooleanOptionalAction,
        default=DemoPlan.sft_freeze_vision,
        help=f"keep the ViT frozen in SFT (default {DemoPlan.sft_freeze_vision})",
    )
    for name, (kind, what) in NUMBER_FLAGS.items():
        parser.add_argument(
            f"--{name.replace('_', '-')}",
            type=kind,
            default=getattr(DemoPlan, name),
            help=f"{what} (default {getattr(DemoPlan, name)})",
        )
    parser.set_defaults(takes_overrides=True)  # dotted config overrides applied to every stage


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if args.fresh and out.exists():
        shutil.rmtree(out)
    plan = DemoPlan(
        preset=args.preset,
        **{name: getattr(args, name) for name in NUMBER_FLAGS},
        precision=args.precision,
        stem=args.stem,
        encoder_objective=args.encoder_objective,
        encoder_text=args.encoder_text,
        encoder_pool=args.encoder_pool,
        sft_freeze_vision=args.sft_freeze_vision,
        overrides=list(args.overrides),
    )
    summary = run_demo(plan, out)
    print(json.dumps({k: summary[k] for k in ("report", "wall_seconds", "beats_baselines")}))
    return 0
