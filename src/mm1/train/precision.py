"""Which `train.precision` a command picks when the user says `native`: bf16 where it runs natively.

`train.precision` itself is `auto | fp32 | bf16` (auto = bf16 on CUDA, fp32 on CPU). The commands
that run many short trainings (`mm1 demo`, `mm1 lessons`, benchmarks/grounding.py) also accept
`native`: bf16 autocast where bf16 matrix products run natively (CUDA; a CPU with AVX512-BF16 or
AMX), else fp32. On the 2-core AVX512-BF16 test machine a tiny pre-training step took 0.62 s in bf16
against 0.77 s in fp32 at equal losses (docs/grounding.md); on a CPU without those kernels bf16 is
emulated and slower, which is why `native` is not simply `bf16`.
"""

from __future__ import annotations

import torch

PRECISIONS = ("native", "fp32", "bf16")


def native_bf16() -> bool:
    """Whether bf16 matrix products run natively here (CUDA, or oneDNN's AVX512-BF16 / AMX kernels)."""
    return torch.cuda.is_available() or bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def resolve_precision(choice: str, what: str = "precision") -> str:
    """`native` -> bf16 or fp32 for this machine; fp32 / bf16 unchanged; anything else a clear error."""
    if choice not in PRECISIONS:
        raise ValueError(f"{what} must be one of {', '.join(PRECISIONS)}, got {choice!r}")
    if choice == "native":
        return "bf16" if native_bf16() else "fp32"
    return choice


def matmul_gflops(precision: str, seconds: float = 1.0, shape: tuple[int, int, int] = (2048, 256, 688)) -> float:
    """This host's matrix-product speed right now, in GFLOP/s: the median over ~`seconds` of one
    [m, k] @ [k, n] product in `precision` ("fp32" or "bf16"; default shape: a 2,048-token batch
    through the tiny LM's FFN). A demo's wall time alone cannot be compared across hosts, nor across
    hours of one VM (the same code ran 1.7 x slower on one than another); this figure, measured in the
    same run, can be (docs/grounding.md section 20)."""
    import time

    if precision not in ("fp32", "bf16"):
        raise ValueError(f"matmul_gflops: precision must be fp32 or bf16, got {precision!r}")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    m, k, n = shape
    gen = torch.Generator().manual_seed(0)
    a, b = (torch.randn(*s, generator=gen).to(dtype) for s in ((m, k), (k, n)))
    a @ b  # warm-up: the first call picks and caches oneDNN's kernel
    times: list[float] = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(times) < 3:
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    return 2.0 * m * k * n / sorted(times)[len(times) // 2] / 1e9
