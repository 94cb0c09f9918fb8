"""`mm1 info CONFIG`: size a preset without allocating it (meta device) — parameters per part,
total and active (MoE), image tokens per image and training FLOPs per token."""

from __future__ import annotations

import argparse
import json
import time

import torch

from mm1.config import Config, load_config
from mm1.models.build import build_model
from mm1.models.flops import training_flops
from mm1.models.mllm import count_parameters


def describe(cfg: Config) -> dict:
    """Everything `mm1 info` reports, as a JSON-ready dict."""
    start = time.perf_counter()
    model = build_model(cfg.model, device="meta")
    params = count_parameters(model)
    flops = training_flops(cfg.model, cfg.data.seq_len)
    return {
        "name": cfg.name,
        "params": params,
        "image_tokens_per_image": cfg.model.tokens_per_image,
        "patches_per_image": cfg.model.vision.grid**2,
        "seq_len": cfg.data.seq_len,
        "train_flops_per_token": flops.lm_per_token,
        "train_flops_per_image": flops.vision_per_image + flops.connector_per_image,
        "build_seconds": round(time.perf_counter() - start, 3),
    }


def _human(n: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(int(n))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="a preset name or YAML, e.g. mm1-3b or configs/mm1-3b.yaml")
    parser.set_defaults(takes_overrides=True)  # e.g. model.connector.num_tokens=64
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")


@torch.no_grad()  # a scope, not a global switch: commands also run in-process (tests)
def run(args: argparse.Namespace) -> int:
    info = describe(load_config(args.config, args.overrides))
    if args.json:
        print(json.dumps(info))
        return 0
    p = info["params"]
    print(f"{info['name']}")
    for part in ("vision", "connector", "lm"):
        print(f"  {part:<10} {_human(p[part]):>9} parameters")
    print(f"  {'total':<10} {_human(p['total']):>9}   active per token: {_human(p['active'])}")
    print(f"  image tokens per image: {info['image_tokens_per_image']} (from {info['patches_per_image']} patches)")
    print(
        f"  training FLOPs: {_human(info['train_flops_per_token'])} per token at seq {info['seq_len']}, "
        f"{_human(info['train_flops_per_image'])} per image"
    )
    return 0
