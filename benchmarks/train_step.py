"""Training-step time of our MLLM vs transformers' LlavaForConditionalGeneration, same shape and weights.

One step = forward + backward + AdamW update on one synthetic multimodal batch (CLIP-style tower,
LLaVA MLP connector with k = patches, Llama LM). Before timing, both models are run on the same
batch and their losses must agree (they share every weight), so the two sides provably do the same
work. Steps then alternate A/B (order flipped every round) and the median and min are reported.

    python benchmarks/train_step.py            # tiny preset shape on CPU
    python benchmarks/train_step.py --repeats 3 --batch 2 --seq-len 128   # quick

Output: one JSON line per side, then a last line with `time_ratio` = our median / theirs (< 1 = we
are faster).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from common import add_pair_arguments, alternate, cli, emit, machine_info, multimodal_batch, pair_from_args, summary  # noqa: E402


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch", type=int, default=8, help="sequences per step (tiny preset: 8)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per sequence (tiny preset: 256)")
    p.add_argument("--images", type=int, default=2, help="images per sequence (each k = 64 slot tokens)")
    p.add_argument("--repeats", type=int, default=10, help="timed steps per side")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per side first")
    p.add_argument("--tolerance", type=float, default=1e-4, help="max |loss difference| before timing")
    add_pair_arguments(p)


def step_fns(ours, theirs, batch: dict[str, torch.Tensor]) -> dict[str, Callable[[], Any]]:
    """One closure per side doing a full training step; both optimizers are AdamW with equal settings."""
    opt_ours = torch.optim.AdamW(ours.parameters(), lr=1e-4, weight_decay=0.1)
    opt_theirs = torch.optim.AdamW(theirs.parameters(), lr=1e-4, weight_decay=0.1)

    def step_ours() -> float:
        opt_ours.zero_grad(set_to_none=True)
        loss = ours(batch["input_ids"], batch["images"], batch["targets"]).loss
        loss.backward()
        opt_ours.step()
        return loss.detach()

    def step_theirs() -> float:
        opt_theirs.zero_grad(set_to_none=True)
        loss = theirs(input_ids=batch["input_ids"], pixel_values=batch["images"], labels=batch["labels"]).loss
        loss.backward()
        opt_theirs.step()
        return loss.detach()

    return {"mm1": step_ours, "transformers": step_theirs}


def check_equal_loss(ours, theirs, batch: dict[str, torch.Tensor], tolerance: float) -> tuple[float, float]:
    """Both models in train mode on the same batch: the losses must agree (same weights, same data)."""
    with torch.no_grad():
        a = float(ours(batch["input_ids"], batch["images"], batch["targets"]).loss)
        b = float(theirs(input_ids=batch["input_ids"], pixel_values=batch["images"], labels=batch["labels"]).loss)
    if abs(a - b) > tolerance:
        raise AssertionError(
            f"losses differ before timing: mm1 {a:.6f} vs transformers {b:.6f} (tolerance "
            f"{tolerance}); the two models are not doing the same computation"
        )
    return a, b


def run(args: argparse.Namespace) -> dict[str, Any]:
    ours, theirs, vision, lm = pair_from_args(args)
    ours.train()
    theirs.train()
    batch = multimodal_batch(ours.cfg, args.batch, args.seq_len, args.images)
    loss_ours, loss_theirs = check_equal_loss(ours, theirs, batch, args.tolerance)
    times = alternate(step_fns(ours, theirs, batch), args.repeats, args.warmup)
    shape = {
        "batch": args.batch,
        "seq_len": args.seq_len,
        "images": args.batch * args.images,
        "vision": vision,
        "lm": lm,
        "connector": "mlp",
        "params": sum(p.numel() for p in ours.parameters()),
    }
    for name, t in times.items():
        emit(
            {
                "bench": "train_step",
                "impl": name,
                **summary(t),
                "tokens_per_s": args.batch * args.seq_len / summary(t)["median_s"],
            }
        )
    result = {
        "bench": "train_step",
        "time_ratio": summary(times["mm1"])["median_s"] / summary(times["transformers"])["median_s"],
        "min_ratio": min(times["mm1"]) / min(times["transformers"]),
        "mm1_median_s": summary(times["mm1"])["median_s"],
        "transformers_median_s": summary(times["transformers"])["median_s"],
        "loss_mm1": loss_ours,
        "loss_transformers": loss_theirs,
        "repeats": args.repeats,
        "shape": shape,
        "machine": machine_info(),
    }
    emit(result)
    return result


def main(argv: list[str] | None = None) -> int:
    return cli(__doc__, add_arguments, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
