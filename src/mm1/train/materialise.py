"""Build on the meta device, wrap, then materialise: each rank allocates only what it keeps.

    build on meta (no memory) -> FSDP2 shards on meta -> to_empty(device) -> seeded init -> weights
                              (DDP/single: to_empty + init, then wrap: a replica is what DDP keeps)

The initial weights must not depend on how the model is split, or a 1-process and an 8-process run
with the same seed would start from different points. So the init draws every parameter from its
own generator, seeded by (train.seed, the parameter's name, how many draws it had), on the CPU at the
parameter's full shape, and each rank copies the slice it owns: the same values with or without
FSDP, on any device, one full parameter alive at a time. The model's own `reset_parameters` stays
the one definition of *how* each tensor is initialised; `SeededInit` only decides where the random
numbers come from and where they land. The same mode lets weight loaders written for whole tensors
(`module.load_state_dict`, HF loaders, `train.init_from`) fill sharded parameters: `copy_` of a full
tensor into a DTensor copies the local slice.
"""

from __future__ import annotations

import hashlib
import resource
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.overrides import TorchFunctionMode

_RANDOM_INITS = {
    nn.init.normal_,
    nn.init.uniform_,
    nn.init.trunc_normal_,
    nn.init.kaiming_uniform_,
    nn.init.kaiming_normal_,
    nn.init.xavier_uniform_,
    nn.init.xavier_normal_,
    nn.init.orthogonal_,
}
_RANDOM_METHODS = {torch.Tensor.normal_, torch.Tensor.uniform_}


def param_seed(seed: int, name: str, draw: int) -> int:
    """A 63-bit generator seed for the `draw`-th random init of parameter `name`."""
    digest = hashlib.sha256(f"{seed}/{name}/{draw}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def copy_full_into(target: torch.Tensor, full: torch.Tensor) -> None:
    """Write a full-shape tensor into `target`, which may be a sharded DTensor (only its slice)."""
    if isinstance(target, DTensor):
        local = distribute_tensor(
            full.to(target.dtype), target.device_mesh, target.placements, src_data_rank=None
        ).to_local()  # no communication: every rank slices
        target.to_local().copy_(local)
    else:
        target.copy_(full)


class SeededInit(TorchFunctionMode):
    """Random inits of the named parameters come from per-parameter generators; full-tensor copies
    into DTensors land as their local slice. Anything else runs as usual."""

    def __init__(self, names: dict[int, str], seed: int) -> None:
        super().__init__()
        self.names, self.seed = names, seed
        self.draws: dict[str, int] = defaultdict(int)

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = dict(kwargs or {})
        if func in _RANDOM_INITS or func in _RANDOM_METHODS:
            target = kwargs.pop("tensor") if "tensor" in kwargs else args[0]
            name = self.names.get(id(target))
            if name is None:
                if isinstance(target, DTensor):
                    raise RuntimeError(
                        f"{getattr(func, '__name__', func)} on a sharded tensor that is not a "
                        "parameter of the model being initialised: its values would depend on the "
                        "sharding; initialise parameters only"
                    )
                return func(target, *args[1:], **kwargs)
            gen = torch.Generator().manual_seed(param_seed(self.seed, name, self.draws[name]))
            self.draws[name] += 1
            full = torch.empty(tuple(target.shape), dtype=torch.float32)
            with torch.no_grad():
                func(full, *args[1:], **{**kwargs, "generator": gen})
                copy_full_into(target, full)
            return target
        if func is torch.Tensor.copy_ and isinstance(args[0], DTensor) and not isinstance(args[1], DTensor):
            with torch.no_grad():
                copy_full_into(args[0], args[1].to(args[0].device))
            return args[0]
        return func(*args, **kwargs)


def seeded_init(model: nn.Module, seed: int) -> None:
    """Re-initialise `model` (its `reset_parameters`) so that every parameter's values depend only on
    `seed` and the parameter's name, whether the model is whole or sharded."""
    names = {id(p): n for n, p in model.named_parameters()}
    with SeededInit(names, seed):
        model.reset_parameters()


def loading_into_shards(module: nn.Module) -> SeededInit:
    """Context in which whole-tensor loaders (`load_state_dict`, HF loaders) fill sharded parameters.
    Random inits inside it are seeded by name too (seed 0), so they never depend on the sharding."""
    return SeededInit({id(p): n for n, p in module.named_parameters()}, 0)


def materialise(module: nn.Module, device: torch.device, init: Callable[[], None]) -> None:
    """Allocate a meta-built (possibly FSDP-sharded) module on `device`, then fill it with `init`."""
    module.to_empty(device=device)
    init()


# ----------------------------------------------------------------------------- host memory


def reset_peak_rss() -> None:
    """Restart the process's peak-RSS counter (Linux: /proc/self/clear_refs); a no-op elsewhere."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_rss_mb() -> float:
    """Peak resident memory of this process since start or the last `reset_peak_rss`, in MiB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_mb() -> float:
    """Current resident memory of this process, in MiB (0 where /proc is missing)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0
