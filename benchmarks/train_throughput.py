"""End-to-end training throughput: the real loader feeding the real trainer, on the synthetic world.

Two measurements on the same config, so a slow run can be blamed on the right half:
- `loader`: batches drawn from `mm1.data.mixture.build_loader` alone (read, decode, preprocess,
  tokenize, pack, collate) -> tokens/s and images/s the data path can supply;
- `train`: `mm1.train.train` for `--warmup + --steps` steps into a temp run dir; its metrics.jsonl
  gives tokens/s, images/s and step time per step (the trainer's clock includes fetching the batch),
  reported as the median over the steps after the warm-up.
`data_share` = loader seconds per batch / trainer seconds per step: the part of a step the data path
would cost if it were not overlapped (num_workers > 0 overlaps it).

    python benchmarks/train_throughput.py                       # tiny preset, tiny world
    python benchmarks/train_throughput.py data.num_workers=1 --steps 20
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import ROOT, cli, emit, machine_info  # noqa: E402


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=str(ROOT / "configs" / "tiny.yaml"))
    p.add_argument("--steps", type=int, default=10, help="timed steps (and loader batches)")
    p.add_argument("--warmup", type=int, default=2, help="steps / batches before timing")
    p.add_argument(
        "--world", default="", help="synthetic world dir (default: the config's data.world, built if missing)"
    )
    p.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. data.batch_size=16")


def time_loader(cfg, warmup: int, steps: int) -> dict[str, float]:
    """Batches/s of the loader alone, with the tokens (non-pad) and images they carry."""
    from mm1.data.inputs import resolve_inputs
    from mm1.data.loader import build_loader

    inputs = resolve_inputs(cfg)
    cfg.model.image_token_id = inputs.tokenizer.image_id
    it = iter(build_loader(cfg, inputs))
    for _ in range(warmup):
        next(it)
    tokens = images = 0
    start = time.perf_counter()
    for _ in range(steps):
        batch = next(it)
        tokens += int((batch["doc_ids"] >= 0).sum())
        images += int(batch["images"].shape[0]) if "images" in batch else 0
    dt = time.perf_counter() - start
    return {
        "batches_per_s": steps / dt,
        "tokens_per_s": tokens / dt,
        "images_per_s": images / dt,
        "s_per_batch": dt / steps,
    }


def time_training(cfg, warmup: int, steps: int) -> dict[str, Any]:
    """Run the trainer for warmup + steps steps; medians of its own per-step metrics after warm-up."""
    from mm1.train import train

    cfg.train.steps = warmup + steps
    cfg.train.save_every = 10**9  # only the final checkpoint, written after the last step is timed
    cfg.train.warmup_steps = 1
    cfg.train.log_every = 1
    with tempfile.TemporaryDirectory() as tmp:
        train(cfg, Path(tmp) / "run")
        rows = [json.loads(line) for line in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "tokens_per_s" in r]
    timed = rows[warmup:] or rows
    med = lambda key: statistics.median(r[key] for r in timed)  # noqa: E731
    return {
        "tokens_per_s": med("tokens_per_s"),
        "images_per_s": med("images_per_s"),
        "step_time_s": med("step_time_s"),
        "tokens_per_step": med("tokens"),
        "images_per_step": med("images"),
        "loss_first": rows[0]["loss"],
        "loss_last": rows[-1]["loss"],
        "steps_timed": len(timed),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    from mm1.config import load_config
    from mm1.data.inputs import resolve_inputs

    overrides = list(args.overrides) + ([f"data.world={args.world}"] if args.world else [])
    cfg = load_config(args.config, overrides)
    resolve_inputs(cfg)  # builds the world (if a path needs it) before anything is timed
    loader = time_loader(load_config(args.config, overrides), args.warmup, args.steps)
    emit({"bench": "train_throughput", "part": "loader", **loader})
    trained = time_training(cfg, args.warmup, args.steps)
    emit({"bench": "train_throughput", "part": "train", **trained})
    result = {
        "bench": "train_throughput",
        "tokens_per_s": trained["tokens_per_s"],
        "images_per_s": trained["images_per_s"],
        "step_time_s": trained["step_time_s"],
        "loader_tokens_per_s": loader["tokens_per_s"],
        "loader_images_per_s": loader["images_per_s"],
        "data_share": loader["s_per_batch"] / trained["step_time_s"],
        "config": {
            "preset": cfg.name,
            "batch_size": cfg.data.batch_size,
            "seq_len": cfg.data.seq_len,
            "num_workers": cfg.data.num_workers,
            "overrides": overrides,
        },
        "machine": machine_info(),
    }
    emit(result)
    return result


def main(argv: list[str] | None = None) -> int:
    return cli(__doc__, add_arguments, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
