"""One code path for 1 CPU process, N GPUs and many nodes: torchrun detection, DDP / FSDP2, logging.

`torchrun` sets RANK / WORLD_SIZE / LOCAL_RANK; without them this is a single process. A strategy
that needs a process group (`ddp`, `fsdp`) still gets one in a single process (an in-memory store),
so a one-GPU FSDP2 run exercises exactly the code a 64-GPU run does. CPU uses gloo, CUDA nccl.
FSDP2 shards every block of every `nn.ModuleList` (ViT blocks, decoder layers, text-tower layers)
as its own unit, then the root; DDP wraps the root. Both average gradients over ranks.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

log = logging.getLogger("mm1.train")


@dataclass
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str = ""  # "" = no process group

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def initialized(self) -> bool:
        return bool(self.backend) and dist.is_available() and dist.is_initialized()


def resolve_strategy(strategy: str, world_size: int) -> str:
    """`auto` is DDP across processes and no wrapper for one; explicit choices are kept."""
    if strategy == "auto":
        return "ddp" if world_size > 1 else "single"
    if strategy == "single" and world_size > 1:
        raise ValueError(
            f"train.strategy=single but torchrun started {world_size} processes; "
            "use train.strategy=ddp or fsdp (or auto)"
        )
    return strategy


def init_distributed(strategy: str) -> DistEnv:
    """Read the torchrun environment, pick the device, start the process group when one is needed."""
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    local = int(os.environ.get("LOCAL_RANK", 0))
    strategy = resolve_strategy(strategy, world)
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    env = DistEnv(rank, world, local, device)
    if strategy == "single" or not dist.is_available():
        return env
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        if "MASTER_ADDR" in os.environ:
            kwargs = {"device_id": device} if backend == "nccl" else {}
            dist.init_process_group(backend, rank=rank, world_size=world, **kwargs)
        else:  # one process without torchrun: an in-memory store is enough
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    env.backend = backend
    return env


def shutdown(env: DistEnv) -> None:
    if env.initialized:
        dist.barrier()
        dist.destroy_process_group()


def wrap_model(
    model: nn.Module, strategy: str, env: DistEnv, bf16: bool, materialise: Callable[[], None] | None = None
) -> nn.Module:
    """DDP or FSDP2 around `model`; `single` returns it unchanged.

    `model` is on `env.device`, or on the meta device with `materialise` given: FSDP2 then shards
    the meta parameters first, so `materialise` (to_empty + init) allocates only this rank's shards;
    for DDP and single, every rank keeps a replica anyway and `materialise` runs before wrapping."""
    strategy = resolve_strategy(strategy, env.world_size)
    if materialise is not None and strategy != "fsdp":
        materialise()
    if strategy == "single":
        return model
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [env.device.index] if env.device.type == "cuda" else None
        # unused parameters are normal here: MoE experts no token picked, a frozen-free part skipped
        return DDP(model, device_ids=ids, find_unused_parameters=True)
    if strategy == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mp = (
            MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
            if bf16
            else MixedPrecisionPolicy()
        )
        for block in transformer_blocks(model):
            fully_shard(block, mp_policy=mp)
        fully_shard(model, mp_policy=mp)
        # a unit whose parameters got no gradient on one rank (an MoE expert no token chose) must still
        # join the reduce-scatter, or the ranks' collectives fall out of step
        if hasattr(model, "set_reduce_scatter_unused_params"):  # torch >= 2.12
            model.set_reduce_scatter_unused_params(True)
        if materialise is not None:
            materialise()
        return model
    raise ValueError(f"train.strategy={strategy!r}: must be one of auto, single, ddp, fsdp")


BLOCK_LISTS = ("blocks", "layers", "resblocks", "h")


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """Elements of the ModuleLists that hold transformer blocks (by name: `blocks`, `layers`...).

    Only those: a unit must run its forward on every rank every step, which an MoE expert list
    (also a ModuleList) does not."""
    out = []
    for name, m in model.named_modules():
        if isinstance(m, nn.ModuleList) and name.rsplit(".", 1)[-1] in BLOCK_LISTS:
            out.extend(b for b in m if any(True for _ in b.parameters()))
    return out


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module inside a DDP wrapper (FSDP2 modifies the module in place)."""
    return model.module if hasattr(model, "module") and isinstance(model.module, nn.Module) else model


def all_reduce_sum(t: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """Sum a tensor over ranks (a no-op in one process); returns the same tensor."""
    if env.initialized and env.world_size > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def gather_objects(obj: object, env: DistEnv) -> list[object]:
    """Every rank's `obj` on rank 0 (others get []); small plain-data objects only."""
    if not (env.initialized and env.world_size > 1):
        return [obj]
    out: list[object] = [None] * env.world_size if env.is_main else []
    dist.gather_object(obj, out if env.is_main else None, dst=0)
    return out


def all_gather_objects(obj: object, env: DistEnv) -> list[object]:
    """Every rank's `obj` on every rank; small plain-data objects only."""
    if not (env.initialized and env.world_size > 1):
        return [obj]
    out: list[object] = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: object, env: DistEnv) -> object:
    """Rank 0's `obj` on every rank."""
    if not (env.initialized and env.world_size > 1):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(env: DistEnv) -> None:
    if env.initialized and env.world_size > 1:
        dist.barrier()


class GatherWithGrad(torch.autograd.Function):
    """all_gather along dim 0 that passes gradients back to each rank's slice (works on gloo too:
    the backward is an all-reduce of the full gradient, then each rank keeps its own rows)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        world, rank = dist.get_world_size(), dist.get_rank()
        sizes = torch.tensor([x.shape[0]], device=x.device)
        all_sizes = [torch.zeros_like(sizes) for _ in range(world)]
        dist.all_gather(all_sizes, sizes)
        ctx.sizes = [int(s) for s in all_sizes]
        ctx.rank = rank
        pad = max(ctx.sizes) - x.shape[0]
        xp = torch.cat([x, x.new_zeros(pad, *x.shape[1:])]) if pad else x.contiguous()
        parts = [torch.empty_like(xp) for _ in range(world)]
        dist.all_gather(parts, xp)
        return torch.cat([p[:s] for p, s in zip(parts, ctx.sizes)])

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = sum(ctx.sizes[: ctx.rank])
        return grad[start : start + ctx.sizes[ctx.rank]]


def gather_with_grad(x: torch.Tensor, env: DistEnv) -> torch.Tensor:
    if env.initialized and env.world_size > 1:
        return GatherWithGrad.apply(x)
    return x


def setup_logging(env: DistEnv, level: int = logging.INFO) -> None:
    """Rank 0 logs at `level`, other ranks only warnings; every line carries its rank when N > 1."""
    tag = f"[rank {env.rank}] " if env.world_size > 1 else ""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"%(asctime)s {tag}%(levelname)s %(message)s", "%H:%M:%S"))
    root = logging.getLogger("mm1")
    root.handlers[:] = [handler]
    root.setLevel(level if env.is_main else logging.WARNING)
    root.propagate = False
