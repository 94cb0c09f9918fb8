"""`mm1 world OUT`: write the synthetic world (the embedded default corpus) to a folder."""

from __future__ import annotations

import argparse

from mm1.data.world.build import WORLD_SIZES, build_world


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out", help="folder to write the world into (must not exist or be empty, unless --force)")
    parser.add_argument(
        "--size",
        default="tiny",
        choices=list(WORLD_SIZES),
        help="tiny builds in well under a minute on 2 cores; small is 5x, base 25x; single is the one-shape "
        "grounding check (SFT + VQA only, benchmarks/grounding.py) (default: tiny)",
    )
    parser.add_argument("--seed", type=int, default=0, help="same seed, byte-identical world (default: 0)")
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        help="worker processes (default: up to 4 of the available cores); output does not depend on it",
    )
    parser.add_argument("--force", action="store_true", help="replace an existing world at OUT")


def run(args: argparse.Namespace) -> int:
    try:
        build_world(args.out, args.size, args.seed, workers=args.workers, overwrite=args.force)
    except FileExistsError as e:
        print(f"mm1 world: {e}")
        return 1
    return 0
