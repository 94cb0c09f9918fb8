"""Weight storage order for decoding on CPU.

A decoding step multiplies a few rows (one per sequence) by every weight matrix of the language
model. `nn.Linear` keeps a weight as [out, in] and computes x @ W^T, which MKL's sgemm runs as a
transposed-B product; stored [in, out] instead (W^T contiguous) the same product is a plain one.
Measured in whole greedy generations on a 2-core AMD EPYC (torch 2.13, MKL, 1 thread, 4 rows,
same tokens asserted), the [in, out] order took:

- 0.87-0.90x the time for the tiny preset's LM inside `benchmarks/generate.py`, and 0.97x for a
  freshly built model of the same shape;
- 0.99-1.01x for LMs 512, 1024 and 2048 wide (no loss, no gain).

(Timing single matrices in isolation does not predict this: there, some shapes are faster and some
up to 1.4x slower in either order. Only whole decoding steps showed a consistent picture.)

So generation on CPU re-stores the LM's weights [in, out] (`prepare_decode_layout`), but only for
shapes whose products are bit-identical in both orders at the batch's row count: they are for
several rows, while one row takes a gemv path whose sums differ, so batch-1 decoding keeps the
standard order (also when it is a later, smaller batch of the same generation), and the choice
never changes a generated token. The parameters keep their names,
shapes and values; only their strides change (`weight` becomes a transposed view of [in, out]
storage), so state dicts, checkpoints (written contiguous) and the HF converters are unaffected.
`restore_standard_layout` puts every weight back; the language model calls it whenever it is
switched to training mode, because optimisers and distributed wrappers expect the standard order.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class DecodeLayout:
    """What `prepare_decode_layout` did to a model."""

    checked_rows: list[int] = field(default_factory=list)  # batch sizes the products were checked at
    transposed: list[str] = field(default_factory=list)  # modules whose weight is now stored [in, out]
    excluded: dict[tuple[int, int], str] = field(default_factory=dict)  # weight shape -> why it was left out


def _candidates(model: nn.Module) -> dict[str, nn.Linear]:
    """Linear layers with plain, contiguous CPU float weights (sharded DTensor, quantised or GPU
    weights are left alone: cuBLAS takes either order natively)."""
    found = {}
    for name, module in model.named_modules():
        w = getattr(module, "weight", None)
        if (
            isinstance(module, nn.Linear)
            and type(w) is nn.Parameter
            and w.device.type == "cpu"
            and w.dtype.is_floating_point
            and w.is_contiguous()
        ):
            found[name] = module
    return found


def _relayout(modules: list[nn.Linear], transposed: bool) -> None:
    """Re-store each weight [in, out] (transposed) or [out, in]; one matrix at a time, so memory
    grows by one matrix at most."""
    for module in modules:
        w = module.weight.data
        module.weight.data = w.t().contiguous().t() if transposed else w.contiguous()


def _same_products(w: torch.Tensor, rows: int) -> bool:
    """Whether `rows` rows times `w` give bit-identical results with `w` stored in either order."""
    x = torch.randn(rows, w.shape[1], dtype=w.dtype)
    return torch.equal(F.linear(x, w.contiguous()), F.linear(x, w.t().contiguous().t()))


def _keep_where_identical(modules: dict[str, nn.Linear], layout: DecodeLayout, rows: int) -> list[str]:
    """Names of `modules` whose weight shape gives identical products at `rows` rows in both
    orders; the other shapes are recorded in `layout.excluded`."""
    verdict: dict[tuple[int, int], bool] = {}
    kept = []
    for name, module in modules.items():
        shape = (module.weight.shape[0], module.weight.shape[1])
        if shape not in verdict:
            verdict[shape] = _same_products(module.weight, rows)
            if not verdict[shape]:
                layout.excluded[shape] = f"products of {rows} rows differ between the two orders"
        if verdict[shape]:
            kept.append(name)
    return kept


def prepare_decode_layout(model: nn.Module, rows: int) -> DecodeLayout:
    """Store `model`'s CPU linear weights [in, out] wherever products of `rows` rows are
    bit-identical in both orders. The first call re-stores; a later call with a batch size not yet
    checked puts back [out, in] every shape that differs at that size (a 1-row batch takes a gemv
    path), so no batch size ever decodes differently from the standard order. The layout lives in
    `model.decode_layout` until `restore_standard_layout` (or training mode) resets it."""
    layout = getattr(model, "decode_layout", None)
    if layout is not None and rows in layout.checked_rows:
        return layout
    with torch.inference_mode(False), torch.no_grad():  # new storage must stay usable outside inference mode
        if layout is None:
            layout = DecodeLayout()
            candidates = _candidates(model)
            layout.transposed = _keep_where_identical(candidates, layout, rows)
            _relayout([candidates[n] for n in layout.transposed], transposed=True)
        else:
            modules = dict(model.named_modules())
            current = {n: modules[n] for n in layout.transposed}
            kept = set(_keep_where_identical(current, layout, rows))
            _relayout([m for n, m in current.items() if n not in kept], transposed=False)
            layout.transposed = [n for n in layout.transposed if n in kept]
    layout.checked_rows.append(rows)
    model.decode_layout = layout
    return layout


def restore_standard_layout(model: nn.Module) -> None:
    """Every weight re-stored [out, in] (contiguous), values unchanged; forgets the layout."""
    layout = getattr(model, "decode_layout", None)
    if layout is None:
        return
    modules = dict(model.named_modules())
    with torch.inference_mode(False), torch.no_grad():
        _relayout([modules[name] for name in layout.transposed], transposed=False)
    model.decode_layout = None
