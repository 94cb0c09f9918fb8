"""Throughput of the whole data pipeline (read + decode + preprocess + tokenize + pack + collate).

Prints one JSON line: samples/s (records turned into sequences), rows/s, tokens/s (non-pad tokens)
and images/s over `--batches` batches after `--warmup` batches, with `--workers` DataLoader workers,
on the synthetic world of the chosen config (built first if missing; `--world DIR` to use another).

    .venv/bin/python benchmarks/data.py --workers 2 --batches 50
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from mm1.config import load_config
from mm1.data.inputs import resolve_inputs
from mm1.data.loader import build_loader
from mm1.data.sequence import packing_efficiency

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "tiny.yaml"))
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers (0 = main process)")
    p.add_argument("--batches", type=int, default=30, help="batches to time")
    p.add_argument("--warmup", type=int, default=3, help="batches to skip before timing (worker start-up)")
    p.add_argument("--stage", default="pretrain", choices=["pretrain", "sft"])
    p.add_argument("--world", default="", help="synthetic world dir (default: the config's data.world)")
    p.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. data.batch_size=16")
    args = p.parse_args(argv)

    overrides = [f"data.num_workers={args.workers}", f"train.stage={args.stage}", *args.overrides]
    if args.world:
        overrides.append(f"data.world={args.world}")
    cfg = load_config(args.config, overrides)
    inputs = resolve_inputs(cfg)
    cfg.model.image_token_id = inputs.tokenizer.image_id
    loader = build_loader(cfg, inputs, with_keys=True)

    samples = rows = tokens = images = 0
    eff: list[float] = []
    start = time.perf_counter()
    t0 = start
    for i, batch in enumerate(loader):
        if i == args.warmup:
            t0 = time.perf_counter()
        if i >= args.warmup:
            samples += len({k.rsplit("|", 1)[0] for row in batch["keys"] for k in row})
            rows += batch["input_ids"].shape[0]
            tokens += int((batch["doc_ids"] >= 0).sum())
            images += batch["images"].shape[0]
            eff.append(packing_efficiency(batch))
        if i + 1 >= args.warmup + args.batches:
            break
    dt = time.perf_counter() - t0
    result = {
        "benchmark": "data",
        "config": Path(args.config).stem,
        "stage": args.stage,
        "workers": args.workers,
        "batches": args.batches,
        "batch_size": cfg.data.batch_size,
        "seq_len": cfg.data.seq_len,
        "samples_per_s": round(samples / dt, 1),
        "rows_per_s": round(rows / dt, 2),
        "tokens_per_s": round(tokens / dt, 1),
        "images_per_s": round(images / dt, 1),
        "packing_efficiency": round(sum(eff) / max(1, len(eff)), 4),
        "seconds": round(dt, 3),
        "startup_s": round(t0 - start, 3),
        "torch_threads": torch.get_num_threads(),
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
