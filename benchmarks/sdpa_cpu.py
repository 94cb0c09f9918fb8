"""Attention forward + backward on CPU: SDPA's math backend vs its fused flash kernel vs mm1's per-call choice.

Training picks the kernel per attention call (`mm1.models.attention.sdpa`): math for calls that need
gradients on fewer than `CPU_FLASH_MIN_KEYS` keys, flash otherwise. This benchmark times the shapes
the tiny preset trains, both kernels forced and mm1's choice, alternating A/B/C:

    python benchmarks/sdpa_cpu.py                    # the demo's shapes, bf16
    python benchmarks/sdpa_cpu.py --dtype float32 --repeats 5

One JSON line per (shape, kernel) with the median seconds of one forward + backward, then a last line
with `speedup_vs_math` and `speedup_vs_flash` per shape (> 1 = mm1's choice is faster).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from common import alternate, cli, emit, machine_info, summary  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

from mm1.models.attention import CPU_FLASH_MIN_KEYS, dense_mask, sdpa  # noqa: E402

# name: (batch, heads, tokens, head dim, packed documents of this length, None = no mask)
SHAPES: dict[str, tuple[int, int, int, int, int | None]] = {
    "vit_64_tokens": (50, 4, 64, 32, None),  # the tiny ViT: ~50 images a step, 8 x 8 tokens, width 128
    "lm_192_rows": (11, 4, 192, 64, 48),  # the grounding benchmark's rows of 192 x 11
    "lm_512_rows": (4, 4, 512, 64, 48),  # the demo's rows of 512 x 4, packed captions
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    p.add_argument("--repeats", type=int, default=15, help="timed calls per kernel and shape")
    p.add_argument("--shapes", nargs="*", default=list(SHAPES), choices=list(SHAPES))


def call(shape: tuple[int, int, int, int, int | None], dtype: torch.dtype, kernel: str) -> Callable[[], torch.Tensor]:
    """One forward + backward of the shape's attention with `kernel` (math | flash | mm1); returns
    the gradient of q, so the kernels can be checked to compute the same thing before timing."""
    b, h, t, hd, doc_len = shape
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(b, h, t, hd, generator=gen).to(dtype).requires_grad_() for _ in range(3))
    mask = None if doc_len is None else dense_mask((torch.arange(t) // doc_len).expand(b, t), t)
    forced = {"math": [SDPBackend.MATH], "flash": [SDPBackend.FLASH_ATTENTION]}.get(kernel)

    def run() -> None:
        if forced is None:
            y = sdpa(q, k, v, attn_mask=mask)
        else:
            with sdpa_kernel(forced):
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        q.grad = None
        y.float().square().sum().backward()
        return q.grad

    return run


def run(args: argparse.Namespace) -> None:
    dtype = getattr(torch, args.dtype)
    emit({"machine": machine_info(), "dtype": args.dtype, "cpu_flash_min_keys": CPU_FLASH_MIN_KEYS})
    speedups = {}
    for name in args.shapes:
        fns = {kernel: call(SHAPES[name], dtype, kernel) for kernel in ("math", "flash", "mm1")}
        grads = {kernel: fn().float() for kernel, fn in fns.items()}
        tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
        for kernel in ("flash", "mm1"):  # the same attention, or the timings compare different work
            torch.testing.assert_close(grads[kernel], grads["math"], rtol=tol, atol=tol * grads["math"].abs().max())
        times = alternate(fns, args.repeats, warmup=2)
        medians = {}
        for kernel, ts in times.items():
            stats = summary(ts)
            medians[kernel] = stats["median_s"]
            emit({"shape": name, "kernel": kernel, **stats})
        speedups[name] = {
            "speedup_vs_math": medians["math"] / medians["mm1"],
            "speedup_vs_flash": medians["flash"] / medians["mm1"],
        }
    emit({"speedups": speedups})


def main(argv: list[str] | None = None) -> int:
    return cli(__doc__, add_arguments, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
