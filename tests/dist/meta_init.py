"""Run under `torchrun --nproc_per_node 2` (gloo): build a ~100 MB model on the meta device, shard
it with FSDP2 and materialise it; write rank 0's findings (host memory the build took per rank, the
size of a replica, whether the weights equal an eager seeded build) to the JSON file in argv[1]."""

from __future__ import annotations

import json
import sys
from functools import partial

import torch

from mm1.config import load_config
from mm1.models.build import build_model
from mm1.train.distributed import gather_objects, init_distributed, shutdown, wrap_model
from mm1.train.materialise import materialise, peak_rss_mb, reset_peak_rss, rss_mb, seeded_init

SEED = 7
SHAPE = ["model.lm.dim=512", "model.lm.n_layers=8", "model.lm.n_heads=8", "model.lm.ffn_dim=1376"]


def main(out: str) -> None:
    env = init_distributed("fsdp")
    cfg = load_config("configs/tiny.yaml", SHAPE)
    with torch.device("meta"):  # allocates nothing; the imports it triggers are not the model's memory
        model = build_model(cfg.model, weights=False)
    from torch.distributed.fsdp import fully_shard  # noqa: F401  (same: an import, measured apart)

    reset_peak_rss()
    before = rss_mb()
    wrap_model(model, "fsdp", env, bf16=False,
               materialise=partial(materialise, model, env.device, lambda: seeded_init(model, SEED)))
    growth = gather_objects(peak_rss_mb() - before, env)
    sharded = {n: p.full_tensor() for n, p in model.named_parameters()}  # collective: every rank
    if env.is_main:
        del model
        reset_peak_rss()
        before = rss_mb()
        torch.manual_seed(SEED)
        eager = build_model(cfg.model)
        seeded_init(eager, SEED)
        eager_growth = peak_rss_mb() - before
        params = dict(eager.named_parameters())
        result = {"build_rss_mb_per_rank": growth, "eager_build_rss_mb": eager_growth,
                  "replica_mb": sum(p.numel() * p.element_size() for p in params.values()) / 2**20,
                  "names_equal": sorted(sharded) == sorted(params),
                  "mismatched": [n for n, p in params.items() if not torch.equal(p.detach(), sharded[n])]}
        with open(out, "w") as f:
            json.dump(result, f)
    shutdown(env)


if __name__ == "__main__":
    main(sys.argv[1])
