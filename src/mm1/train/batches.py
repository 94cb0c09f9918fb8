"""The global batch, independent of how many processes share it.

The data loader shards its stream by (rank, world size), so by default 8 GPUs see different data
than 4 GPUs with twice the batch. `train.data_shards = S` fixes the stream instead: it is split into
S shards and each of the W ranks reads S/W of them and concatenates their batches (rank-major, the
same row order as one process reading all S). A run can then change its number of processes and
keep, step for step, the same global batch - which is also how the distributed tests check DDP and
FSDP2 against one process.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import torch

from mm1.config import Config
from mm1.data.inputs import Inputs
from mm1.data.loader import build_loader
from mm1.registry import ConfigError


def shard_plan(cfg: Config, rank: int, world_size: int) -> tuple[list[int], int, int]:
    """(shard ids of this rank, total shards, rows per shard batch)."""
    shards = cfg.train.data_shards or world_size
    if shards % world_size:
        raise ConfigError(f"train.data_shards={shards} must be a multiple of the {world_size} processes")
    per_rank = shards // world_size
    if cfg.data.batch_size % per_rank:
        raise ConfigError(
            f"data.batch_size={cfg.data.batch_size} (per process) must be divisible by the "
            f"{per_rank} data shards each process reads (train.data_shards={shards})"
        )
    return list(range(rank * per_rank, (rank + 1) * per_rank)), shards, cfg.data.batch_size // per_rank


def concat_batches(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """Row-wise concatenation; `images` in order of appearance stays row-major."""
    if len(parts) == 1:
        return parts[0]
    out: dict[str, Any] = {}
    for key in parts[0]:
        vals = [p[key] for p in parts]
        out[key] = torch.cat(vals) if torch.is_tensor(vals[0]) else sum((list(v) for v in vals), [])
    return out


class ShardedLoader:
    """One data loader per shard this rank owns, yielding their concatenated batches."""

    def __init__(self, cfg: Config, inputs: Inputs, rank: int, world_size: int) -> None:
        ids, total, rows = shard_plan(cfg, rank, world_size)
        shard_cfg = copy.deepcopy(cfg)
        shard_cfg.data.batch_size = rows
        self.shard_ids, self.total = ids, total
        self.loaders = [build_loader(shard_cfg, inputs, rank=i, world_size=total) for i in ids]
        self._its: list[Iterator[dict[str, Any]]] | None = None

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self

    def __next__(self) -> dict[str, Any]:
        if self._its is None:
            self._its = [iter(loader) for loader in self.loaders]
        return concat_batches([next(it) for it in self._its])

    def state_dict(self) -> dict[str, Any]:
        return {
            "total": self.total,
            "shards": {str(i): loader.state_dict() for i, loader in zip(self.shard_ids, self.loaders)},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Positions of this rank's shards, from a state that may hold every rank's (a resume on
        another number of processes), provided the stream was split into the same shards."""
        saved = state["shards"]
        total = state.get("total", len(saved))
        missing = [i for i in self.shard_ids if str(i) not in saved]
        if total != self.total or missing:
            raise ConfigError(
                f"the checkpoint's data stream was split into {total} shard(s) ({sorted(saved)} saved), "
                f"this run splits it into {self.total} and reads shards {self.shard_ids}; to resume on "
                f"another number of processes set train.data_shards={total} (and keep it)"
            )
        for i, loader in zip(self.shard_ids, self.loaders):
            loader.load_state_dict(saved[str(i)])
        self._its = None


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}
