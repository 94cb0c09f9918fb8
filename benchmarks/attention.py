"""Where does the model look when it answers? Attention of the answer position on the query image,
the demonstrations' images and the text, per LM layer, at each number of shots.

Few-shot scores can fall with shots (docs/grounding.md: the demo's 8-shot captions borrow the
demonstrations' colours and shapes). This script measures the mechanism: for each test item it
builds the same few-shot prompt the evaluation builds (`mm1.eval.fewshot.build_prompt`, same seed),
optionally appends `--prefix` (e.g. " A picture showing a", so the position measured is the one that
names the first colour), runs the LM once and records, in every layer, the softmax attention of the
last position averaged over heads, split into three shares that sum to one:

| share   | positions                                                |
|---------|----------------------------------------------------------|
| query   | the image slots of the query's own image(s)              |
| demos   | the image slots of every demonstration's image, together |
| text    | every other position (demonstration and query text)     |

The weights are recomputed from the layer's q and k (GQA heads mapped to their kv head) and checked
against the layer's own output at that position, so a mask or kernel the recomputation does not know
fails loudly instead of reporting wrong shares.

    python benchmarks/attention.py runs/demo/pretrain --shots 0 8 --prefix " A picture showing a"

Last line JSON: {"task", "items", "prefix", "shots": {"<k>": [{"layer", "query", "demos", "text"}, ...]}}.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from common import cli, emit, machine_info  # noqa: E402

import mm1.models.lm as lm_module  # noqa: E402
from mm1.eval.fewshot import build_prompt  # noqa: E402
from mm1.eval.generate import encode_prompt, image_batch  # noqa: E402
from mm1.eval.tasks import get_task  # noqa: E402
from mm1.train.checkpoint import load_checkpoint  # noqa: E402


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="pretrain or SFT run dir (or checkpoint dir)")
    p.add_argument("--task", default="world_caption", help="evaluation task (default world_caption)")
    p.add_argument("--world", default="data/world-tiny", help="the world the task reads (default data/world-tiny)")
    p.add_argument("--shots", type=int, nargs="+", default=[0, 8], help="numbers of shots (default 0 8)")
    p.add_argument("--items", type=int, default=40, help="test items averaged over (default 40)")
    p.add_argument("--prefix", default="", help="text appended after each prompt; its last position is measured")
    p.add_argument("--seed", type=int, default=0, help="demonstration draw, as eval.seed (default 0)")


@contextlib.contextmanager
def last_row_attention(rows: list[torch.Tensor]) -> Iterator[None]:
    """While active, every LM attention call appends its last query position's weights [H, S] to
    `rows` (one entry per layer, in order), after checking they reproduce the call's output there."""
    attend = lm_module.attend

    def recording(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Any) -> torch.Tensor:
        out = attend(q, k, v, mask)
        rep = q.shape[1] // k.shape[1]
        k_full, v_full = k.repeat_interleave(rep, dim=1).float(), v.repeat_interleave(rep, dim=1).float()
        scores = q[0, :, -1:].float() @ k_full[0].transpose(-1, -2) / math.sqrt(q.shape[-1])  # [H, 1, S]
        weights = torch.softmax(scores, dim=-1)
        torch.testing.assert_close(
            (weights @ v_full[0])[:, 0],
            out[0, :, -1].float(),
            rtol=1e-2,
            atol=1e-3,
            msg=lambda m: f"attention.py: recomputed weights do not give the layer's output ({m})",
        )
        rows.append(weights[:, 0])
        return out

    lm_module.attend = recording
    try:
        yield
    finally:
        lm_module.attend = attend


def shares(weights: torch.Tensor, ids: torch.Tensor, image_id: int, per_image: int, query_images: int) -> list[float]:
    """(query, demos, text) shares of one layer's last-row weights [H, S], averaged over heads."""
    slots = (ids == image_id).nonzero().flatten()
    n_query = per_image * query_images
    query, demos = slots[len(slots) - n_query :], slots[: len(slots) - n_query]
    text = torch.ones(len(ids), dtype=torch.bool)
    text[slots] = False
    w = weights.mean(0)
    return [float(w[query].sum()), float(w[demos].sum()), float(w[text].sum())]


def run(args: argparse.Namespace) -> dict[str, Any]:
    model, cfg, tokenizer = load_checkpoint(args.checkpoint)
    model.eval()
    task = get_task(args.task, args.world)
    items = task.test[: args.items]
    per_image = cfg.model.tokens_per_image
    result: dict[str, Any] = {"task": args.task, "items": len(items), "prefix": args.prefix, "shots": {}}
    for shots in args.shots:
        total: torch.Tensor | None = None
        for ex in items:
            prompt = build_prompt(task, ex, shots, seed=args.seed)
            ids = encode_prompt(tokenizer, prompt.text + args.prefix, per_image)
            rows: list[torch.Tensor] = []
            with torch.no_grad(), last_row_attention(rows):
                model(torch.tensor([ids]), images=image_batch(cfg.model, prompt.images))
            ids_t = torch.tensor(ids)
            layer = torch.tensor(
                [shares(w, ids_t, cfg.model.image_token_id, per_image, len(ex.images)) for w in rows]
            )  # [L, 3]
            total = layer if total is None else total + layer
        mean = (total / len(items)).tolist() if total is not None else []
        result["shots"][str(shots)] = [
            {"layer": i, "query": round(q, 4), "demos": round(d, 4), "text": round(t, 4)}
            for i, (q, d, t) in enumerate(mean)
        ]
    emit({"machine": machine_info(), "checkpoint": args.checkpoint})
    emit(result)
    return result


def main(argv: list[str] | None = None) -> int:
    return cli(__doc__, add_arguments, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
