"""Greedy decoding speed of `mm1.eval.generate` vs transformers' `generate`, same model and weights.

Both sides decode the same left-padded batch of image+text prompts with a KV cache, greedily, with
the same banned tokens (image slot, padding, BOS, chat start) and EOS. Before timing, the generated
token ids must be identical row by row (up to EOS), so the two sides provably do the same work.
Runs then alternate A/B; tokens/s counts the tokens both produced (EOS excluded).

    python benchmarks/generate.py                      # tiny preset shape, batch 4, 64 new tokens
    python benchmarks/generate.py --batch 1 --new-tokens 32

Output: one JSON line per side, then a last line with `speedup` = our tokens/s / theirs (> 1 = we
are faster).
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from common import add_pair_arguments, alternate, cli, emit, machine_info, pair_from_args, summary  # noqa: E402
from PIL import Image  # noqa: E402

WORDS = (
    "red blue green yellow circle square triangle star small large left right top bottom the a of "
    "and with on near two three four shows picture image scene object label description short"
).split()


def toy_tokenizer(vocab_size: int, seed: int = 0):
    """A byte-level BPE trained in a temp dir on random sentences of WORDS (ids 0-5 reserved, as in
    the world's tokenizer), so the benchmark needs no world on disk."""
    from mm1.data.tokenizer import Tokenizer

    rng = random.Random(seed)
    texts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 16))) for _ in range(2000)]
    with tempfile.TemporaryDirectory() as tmp:
        return Tokenizer.train(texts, vocab_size, Path(tmp) / "tokenizer.json")


def prompts_and_images(batch: int, image_size: int, seed: int = 0) -> tuple[list[str], list[list[Image.Image]]]:
    """`batch` prompts of different lengths (so the batch is left-padded), one image each."""
    rng = np.random.default_rng(seed)
    prompts = [
        f"<image>{' '.join(WORDS[(i + j) % len(WORDS)] for j in range(2 + 3 * i))} A short description:"
        for i in range(batch)
    ]
    images = [
        [Image.fromarray(rng.integers(0, 255, (image_size, image_size, 3), dtype=np.uint8))] for _ in range(batch)
    ]
    return prompts, images


def layout_summary(lm: torch.nn.Module) -> dict[str, Any] | None:
    """What `mm1.models.decode_layout` did to our LM during the first run."""
    layout = getattr(lm, "decode_layout", None)
    if layout is None:
        return None
    return {
        "checked_rows": layout.checked_rows,
        "transposed_weights": len(layout.transposed),
        "excluded_shapes": [list(s) for s in layout.excluded],
    }


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch", type=int, default=4, help="prompts decoded together (left-padded)")
    p.add_argument("--new-tokens", type=int, default=64, help="max new tokens per prompt")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per side")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs per side first")
    add_pair_arguments(p)


def run(args: argparse.Namespace) -> dict[str, Any]:
    from mm1.eval.generate import GenerationConfig, banned_ids, generate_ids, image_batch, left_pad

    ours, theirs, vision, lm = pair_from_args(args)
    ours.eval()
    theirs.eval()
    tok = toy_tokenizer(lm["vocab_size"])
    cfg = ours.cfg
    prompts, images = prompts_and_images(args.batch, vision["image_size"])
    gcfg = GenerationConfig(max_new_tokens=args.new_tokens, stop=[], use_cache=True, batch_size=args.batch)

    # The peer's inputs are exactly ours: the same ids, left padding and preprocessed pixels.
    ids, mask = left_pad([tok.encode(p, cfg.tokens_per_image) for p in prompts], tok.pad_id)
    pixels = torch.cat([image_batch(cfg, imgs) for imgs in images])
    hf_kwargs = dict(
        input_ids=ids,
        attention_mask=mask.long(),
        pixel_values=pixels,
        max_new_tokens=args.new_tokens,
        do_sample=False,
        eos_token_id=tok.eos_id,
        pad_token_id=tok.pad_id,
        suppress_tokens=banned_ids(tok),
        use_cache=True,
    )

    def run_ours() -> list[list[int]]:
        return generate_ids(ours, tok, prompts, images, gcfg)

    def run_theirs() -> list[list[int]]:
        with torch.no_grad():
            out = theirs.generate(**hf_kwargs)[:, ids.shape[1] :].tolist()
        return [row[: row.index(tok.eos_id)] if tok.eos_id in row else row for row in out]

    a, b = run_ours(), run_theirs()
    if a != b:
        first = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
        raise AssertionError(f"generated tokens differ (row {first}): mm1 {a[first]} vs transformers {b[first]}")
    n_tokens = sum(len(r) for r in a)
    times = alternate({"mm1": run_ours, "transformers": run_theirs}, args.repeats, args.warmup)
    tps = {name: n_tokens / summary(t)["median_s"] for name, t in times.items()}
    for name, t in times.items():
        emit(
            {
                "bench": "generate",
                "impl": name,
                **summary(t),
                "tokens_per_s": tps[name],
                "best_tokens_per_s": n_tokens / min(t),
            }
        )
    result = {
        "bench": "generate",
        "speedup": tps["mm1"] / tps["transformers"],
        "best_speedup": min(times["transformers"]) / min(times["mm1"]),
        "mm1_tokens_per_s": tps["mm1"],
        "transformers_tokens_per_s": tps["transformers"],
        "generated_tokens": n_tokens,
        "same_tokens": True,
        "repeats": args.repeats,
        "decode_layout": layout_summary(ours.lm),
        "shape": {
            "batch": args.batch,
            "prompt_len": ids.shape[1],
            "new_tokens": args.new_tokens,
            "vision": vision,
            "lm": lm,
            "connector": "mlp",
        },
        "machine": machine_info(),
    }
    emit(result)
    return result


def main(argv: list[str] | None = None) -> int:
    return cli(__doc__, add_arguments, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
