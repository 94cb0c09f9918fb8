"""`mm1 train CONFIG [key=value ...] --out DIR [--resume]`: run a training stage into a run dir.

Single process: `mm1 train configs/tiny.yaml --out runs/tiny`. Many: `torchrun --nproc_per_node 8
-m mm1 train CONFIG --out DIR train.strategy=fsdp` (the same command on every node). The run dir
holds config.yaml, metrics.jsonl, run.json and checkpoints/step-N/; `--resume` continues it.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="preset name or YAML, e.g. tiny or configs/tiny.yaml")
    parser.add_argument(
        "--out", required=True, metavar="DIR", help="run directory to create (or continue with --resume)"
    )
    parser.set_defaults(takes_overrides=True)  # e.g. train.steps=100 train.seed=1, anywhere on the line
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue from the latest complete checkpoint in --out (start fresh if none); a "
        "config that differs from the checkpoint's is refused, naming each key",
    )
    parser.add_argument(
        "--allow-change",
        action="append",
        default=[],
        metavar="KEY",
        help="with --resume: apply this changed key (repeatable), e.g. train.steps to train longer",
    )


def run(args: argparse.Namespace) -> int:
    from mm1.config import load_config
    from mm1.train.trainer import NonFiniteLoss, train

    out = Path(args.out)
    cfg = load_config(args.config, args.overrides)
    try:
        result = train(cfg, out, resume=args.resume, allow_change=args.allow_change)
    except NonFiniteLoss as e:
        print(f"mm1 train: {e}", file=sys.stderr)
        return 1
    if result.get("final_loss") is not None and os.environ.get("RANK", "0") == "0":
        print(
            f"mm1 train: {result['steps']} steps, loss {result['first_loss']:.4f} -> {result['final_loss']:.4f}; "
            f"run dir {result['run_dir']}",
            file=sys.stderr,
        )
    return 0
