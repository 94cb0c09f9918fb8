"""Training throughput, peak memory and MFU of a ~1B MLLM on one GPU, per variant.

The ~1B preset (`configs/mm1-1b.yaml`: ViT-L/14 at 336 px, 144-token C-Abstractor, ~1.1B Llama-style
LM) trains on synthetic *packed* batches shaped like MM1 pre-training: rows of 4096 tokens, each row
several documents (restarting positions, block-diagonal attention) holding up to 16 images. A step
is what the trainer does: bf16 autocast over fp32 master weights, forward, backward, fused AdamW
(`mm1.train.optim.build_optimizer`), optional per-block `torch.compile` (as `train.compile`) and
activation checkpointing (LM layers and ViT blocks). FLOPs come from `mm1.models.flops` (encoder,
connector and LM, the one home of FLOP counting), the peak from the device name.

Each variant builds a fresh model and runs inside try/except, so one failing variant (an OOM, a
compiler error) still leaves the others measured; one JSON line per variant, then a summary line.
Without CUDA (or with --tiny) the same code runs the `tiny` preset on CPU in seconds (tested).

    python benchmarks/gpu.py --out gpu.json                          # all variants, < 4 min on an H100
    python benchmarks/gpu.py --variants eager,compile --steps 10
    python benchmarks/gpu.py --tiny                                  # CPU smoke run
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from common import ROOT, emit, machine_info, missing_deps_message  # noqa: E402

# name -> (torch.compile the blocks, activation checkpointing, model.lm.attention)
VARIANTS: dict[str, tuple[bool, bool, str]] = {
    "eager": (False, False, "auto"),
    "eager+ckpt": (False, True, "auto"),
    "compile": (True, False, "auto"),
    "compile+ckpt": (True, True, "auto"),
    "eager+dense-mask": (False, False, "sdpa"),  # packed documents through SDPA with a dense mask
}
DEFAULT_VARIANTS = "eager,compile,eager+ckpt,eager+dense-mask,compile+ckpt"  # most wanted first


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=str(ROOT / "configs" / "mm1-1b.yaml"), help="preset to measure")
    p.add_argument("--tiny", action="store_true", help="the tiny preset on CPU (automatic without CUDA)")
    p.add_argument("--variants", default=DEFAULT_VARIANTS, help=f"comma-separated, from: {', '.join(VARIANTS)}")
    p.add_argument("--batch", type=int, default=0, help="rows per step (0 = data.batch_size of the preset)")
    p.add_argument("--seq-len", type=int, default=0, help="tokens per row (0 = data.seq_len)")
    p.add_argument("--images", type=int, default=-1, help="images per row (-1 = data.max_images)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per variant (compilation happens here)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per variant")
    p.add_argument("--budget-s", type=float, default=150.0, help="skip variants not started within this many seconds")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend (tests use 'eager')")
    p.add_argument("--out", default="", help="write every record and the summary to this JSON file")
    p.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. model.lm.n_layers=8")


# ----------------------------------------------------------------------------- data


def packed_batch(
    cfg, batch: int, seq_len: int, images_per_row: int, device: torch.device, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Rows of `seq_len` tokens packed MM1-style: `max(images_per_row, 1)` documents of jittered
    lengths per row, each `<s> [k image slots] text... </s>`; positions restart and doc ids change at
    every document; targets are the next token within the document (-100 at slots and doc ends)."""
    g = torch.Generator().manual_seed(seed)
    k, slot, vocab = cfg.model.tokens_per_image, cfg.model.image_token_id, cfg.model.lm.vocab_size
    n_docs = max(images_per_row, 1)
    min_len = (k if images_per_row else 0) + 8
    if n_docs * min_len > seq_len:
        raise ValueError(
            f"{images_per_row} images of {k} tokens (+ text) do not fit rows of {seq_len} tokens; "
            "lower --images or raise --seq-len"
        )
    ids = torch.randint(6, vocab, (batch, seq_len), generator=g)
    doc_ids = torch.empty(batch, seq_len, dtype=torch.long)
    positions = torch.empty(batch, seq_len, dtype=torch.long)
    targets = torch.full((batch, seq_len), -100, dtype=torch.long)
    for b in range(batch):
        spare = seq_len - n_docs * min_len
        cuts = sorted(torch.randint(0, spare + 1, (n_docs - 1,), generator=g).tolist())
        lengths = [min_len + hi - lo for lo, hi in zip([0] + cuts, cuts + [spare])]  # sums to seq_len
        start = 0
        for d, n in enumerate(lengths):
            end = start + n
            ids[b, start] = 1  # <s>
            if images_per_row:
                ids[b, start + 1 : start + 1 + k] = slot
            ids[b, end - 1] = 2  # </s>
            doc_ids[b, start:end] = d
            positions[b, start:end] = torch.arange(n)
            targets[b, start : end - 1] = ids[b, start + 1 : end]
            start = end
    targets[ids == slot] = -100
    targets = torch.where(torch.roll(ids, -1, dims=1) == slot, -100, targets)  # never predict a slot
    v = cfg.model.vision
    images = torch.randn(batch * images_per_row, 3, v.image_size, v.image_size, generator=g)
    out = {"input_ids": ids, "targets": targets, "position_ids": positions, "doc_ids": doc_ids, "images": images}
    return {name: t.to(device) for name, t in out.items()}


# ----------------------------------------------------------------------------- one variant


def run_variant(
    name: str,
    cfg,
    batch: dict[str, torch.Tensor],
    device: torch.device,
    args: argparse.Namespace,
    flops_per_step: float,
    peak: float | None,
) -> dict[str, Any]:
    from mm1.models import build_model
    from mm1.models.attention import choose_backend
    from mm1.train.distributed import transformer_blocks
    from mm1.train.optim import build_optimizer, count_trainable, resolve_lr

    compiled, ckpt, attention = VARIANTS[name]
    cfg = copy.deepcopy(cfg)
    cfg.model.lm.attention = attention
    cfg.model.lm.activation_checkpointing = ckpt
    torch.manual_seed(0)
    if compiled:
        torch._dynamo.reset()
    model = build_model(cfg.model, device=device)
    model.train()
    for m in model.modules():  # the ViT (and anything else) that checkpoints by flag
        if hasattr(m, "grad_checkpointing"):
            m.grad_checkpointing = ckpt
    if compiled:
        for block in transformer_blocks(model):
            block.compile(backend=args.compile_backend)
    optimizer = build_optimizer(model, cfg.train, resolve_lr(cfg.train, count_trainable(model)))
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            out = model(
                batch["input_ids"],
                batch["images"],
                batch["targets"],
                position_ids=batch["position_ids"],
                doc_ids=batch["doc_ids"],
            )
        out.loss.backward()
        optimizer.step()
        return out.loss.detach()

    times, losses = [], []
    for i in range(args.warmup + args.steps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        loss = step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        dt = time.perf_counter() - t0
        losses.append(float(loss))  # also a host sync on any device
        if i == 0:
            first_step_s = dt
        if i >= args.warmup:
            times.append(dt)
    if not all(torch.isfinite(torch.tensor(losses))):
        raise FloatingPointError(f"non-finite loss in {name}: {losses}")
    med = statistics.median(times)
    tokens = int((batch["doc_ids"] >= 0).sum())
    n_images = batch["images"].shape[0]
    record = {
        "bench": "gpu",
        "variant": name,
        "ok": True,
        "compile": compiled,
        "activation_checkpointing": ckpt,
        "attention": choose_backend(attention, device, packed=True, cached=False, training=True),
        "step_time_s": med,
        "step_time_min_s": min(times),
        "first_step_s": first_step_s,
        "tokens_per_s": tokens / med,
        "images_per_s": n_images / med,
        "mfu": flops_per_step / med / peak if peak else None,
        "peak_mem_gb": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "steps": len(times),
    }
    return record


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- driver


def load(args: argparse.Namespace, device: torch.device):
    from mm1.config import load_config

    if device.type != "cuda" or args.tiny:
        return load_config(ROOT / "configs" / "tiny.yaml", ["data.batch_size=2", *args.overrides]), True
    return load_config(args.config, args.overrides), False


def run(args: argparse.Namespace) -> dict[str, Any]:
    from mm1.models import build_model
    from mm1.models.flops import peak_flops, training_flops
    from mm1.models.mllm import count_parameters

    names = [n.strip() for n in args.variants.split(",") if n.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise SystemExit(f"--variants: unknown {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    cfg, tiny = load(args, device)
    d = cfg.data
    B, T = args.batch or d.batch_size, args.seq_len or d.seq_len
    images = d.max_images if args.images < 0 else args.images
    if tiny and args.images < 0:
        images = 4
    images = min(images, d.max_images)
    batch = packed_batch(cfg, B, T, images, device)
    flops = training_flops(cfg.model, T).per_step(B * T, batch["images"].shape[0])
    peak = peak_flops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    params = count_parameters(build_model(cfg.model, device="meta"))
    start = time.perf_counter()
    records: list[dict[str, Any]] = []
    for name in names:
        if time.perf_counter() - start > args.budget_s:
            record = {
                "bench": "gpu",
                "variant": name,
                "ok": False,
                "error": f"skipped: --budget-s {args.budget_s} spent",
            }
        else:
            t0 = time.perf_counter()
            try:
                record = run_variant(name, cfg, batch, device, args, flops, peak)
            except Exception as e:  # noqa: BLE001  (any failure of one variant is reported, the rest still run)
                record = {
                    "bench": "gpu",
                    "variant": name,
                    "ok": False,
                    "error": f"{type(e).__name__}: {e}"[:2000],
                    "trace": traceback.format_exc(limit=6)[-3000:],
                }
            record["wall_s"] = time.perf_counter() - t0
        free_memory(device)
        emit(record)
        records.append(record)
    ok = [r for r in records if r["ok"]]
    best = max(ok, key=lambda r: r["tokens_per_s"]) if ok else None
    summary = {
        "bench": "gpu_summary",
        "preset": "tiny" if tiny else cfg.name,
        "device": str(device),
        "shape": {
            "batch": B,
            "seq_len": T,
            "images_per_step": batch["images"].shape[0],
            "tokens_per_image": cfg.model.tokens_per_image,
            "image_size": cfg.model.vision.image_size,
        },
        "params": params,
        "flops_per_step": flops,
        "peak_flops": peak,
        "ok": [r["variant"] for r in ok],
        "failed": [r["variant"] for r in records if not r["ok"]],
        "best_variant": best["variant"] if best else None,
        "best_tokens_per_s": best["tokens_per_s"] if best else None,
        "best_mfu": best["mfu"] if best else None,
        "variants": {
            r["variant"]: {
                k: r.get(k) for k in ("tokens_per_s", "images_per_s", "mfu", "peak_mem_gb", "step_time_s", "error")
            }
            for r in records
        },
        "total_s": time.perf_counter() - start,
        "machine": machine_info(),
    }
    emit(summary)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"records": records, "summary": summary}, indent=1, default=str) + "\n")
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_arguments(p)
    problem = missing_deps_message("gpu.py")
    if problem:
        print(problem, file=sys.stderr)
        return 2
    summary = run(p.parse_args(argv))
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
