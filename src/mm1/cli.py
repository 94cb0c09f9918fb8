"""The `mm1` command. Each subcommand lives beside the code it drives, in a module that exposes
`add_arguments(parser)` and `run(args) -> int`; this file only routes."""

from __future__ import annotations

import argparse
import importlib
import sys

from mm1.data.skips import DataError
from mm1.registry import ConfigError

# subcommand -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "info": ("mm1.models.info", "parameter counts, image tokens and FLOPs of a config (meta device)"),
    "world": ("mm1.data.world.command", "write the synthetic world (default corpus) in real data formats"),
    "train": ("mm1.train.command", "train a stage (encoder / pretrain / sft) into a run dir; torchrun for many GPUs"),
    "eval": ("mm1.eval.command", "few-shot captioning / VQA / multiple-choice / text benchmarks on a checkpoint"),
    "generate": ("mm1.eval.command", "answer one interleaved image-text prompt with a checkpoint"),
    "demo": ("mm1.experiments.demo", "the whole workflow on the tiny synthetic world -> runs/demo/report.md"),
    "ablate": ("mm1.experiments.command", "sweep any config axes x seeds -> runs -> report (table, plots, configs)"),
    "lessons": ("mm1.experiments.command", "re-measure the MM1 paper's ablation lessons on the synthetic world"),
    "hparams": ("mm1.experiments.command", "learning-rate grid on a few LM sizes and a fit of the LR law"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mm1", description="Multimodal LLMs the MM1 way.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        mod = importlib.import_module(module)
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except ConfigError as e:
        print(f"mm1 {args.command}: config error: {e}", file=sys.stderr)
        return 2
    except (DataError, FileNotFoundError) as e:
        print(f"mm1 {args.command}: data error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"mm1 {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
