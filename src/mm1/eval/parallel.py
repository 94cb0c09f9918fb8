"""Evaluation on the accelerator and across ranks: `torchrun --nproc_per_node N -m mm1 eval ...`.

Every rank builds the same prompts (text only, cheap) and runs the model on its strided share of the
batches a single process would form (rank r takes batches r, r+N, r+2N ...: each rank gets short and
long prompts alike, and every batch pads exactly as in one process); the per-item outputs are
gathered back into the original order on every rank; scoring then runs on the
whole list exactly as in one process, so the scores and the per-item JSON equal a single-process
run. Rank 0 prints and writes the results.

`eval.device` (auto | cpu | cuda) and `eval.dtype` (auto | fp32 | bf16; auto = bf16 on CUDA) say
where the model runs and in which precision its weights are held.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import torch
from torch import nn

from mm1.config import EvalConfig
from mm1.registry import ConfigError
from mm1.train.distributed import DistEnv, all_gather_objects, init_distributed

T = TypeVar("T")


@dataclass
class Shards:
    """Which items this rank evaluates, and how their outputs come back together."""

    env: DistEnv = field(default_factory=DistEnv)

    @property
    def is_main(self) -> bool:
        return self.env.is_main

    def split(self, order: Sequence[int], batch_size: int) -> list[int]:
        """This rank's share of `order` (item indices in the order one process would batch them):
        whole batches of `batch_size`, strided over ranks, so every batch is the one a single
        process forms and its numbers are the same to the last bit."""
        batch_size = max(1, batch_size)
        batches = [list(order[s : s + batch_size]) for s in range(0, len(order), batch_size)]
        return [i for batch in batches[self.env.rank :: self.env.world_size] for i in batch]

    def gather(self, mine: list[int], local: list[T], n: int) -> list[T]:
        """The outputs of all `n` items, in item order, on every rank (`local[j]` belongs to item `mine[j]`)."""
        if self.env.world_size == 1 and mine == list(range(n)):
            return local
        out: list[T | None] = [None] * n
        for part in all_gather_objects(list(zip(mine, local)), self.env):
            for i, value in part:
                out[i] = value
        return out  # type: ignore[return-value]


def eval_env(cfg: EvalConfig) -> DistEnv:
    """This process's place: a process group when torchrun started several, the device from `eval.device`."""
    device = resolve_device(cfg.device)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        env = init_distributed("ddp")
        env.device = device if device.type == "cpu" else env.device
        return env
    return DistEnv(device=device)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("eval.device=cuda but torch sees no CUDA device; use eval.device=cpu (or auto)")
    if name not in ("cpu", "cuda"):
        raise ConfigError(f"eval.device={name!r}: must be one of auto, cpu, cuda")
    if name == "cuda":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    table = {"fp32": torch.float32, "bf16": torch.bfloat16}
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in table:
        raise ConfigError(f"eval.dtype={name!r}: must be one of auto, fp32, bf16")
    return table[name]


def place(model: nn.Module, cfg: EvalConfig, env: DistEnv) -> nn.Module:
    """`model` on this rank's device, its weights in `eval.dtype`, in eval mode."""
    return model.to(device=env.device, dtype=resolve_dtype(cfg.dtype, env.device)).eval()
