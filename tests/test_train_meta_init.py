"""Meta-device init: a model built on meta, sharded and materialised holds the same weights as the
eager build for the same seed, and each rank's host memory is about its shard, not a replica."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mm1.config import load_config
from mm1.models.build import build_model
from mm1.train.distributed import DistEnv
from mm1.train.encoder import LOGIT_INIT
from mm1.train.materialise import materialise, seeded_init
from mm1.train.stages import build_stage_module


@pytest.mark.parametrize(
    "overrides",
    [
        [],
        ["model.lm.n_experts=4", "model.connector.kind=attnpool"],
        [
            "model.connector.kind=mlp",
            "model.connector.num_tokens=64",
            "model.lm.tie_embeddings=false",
            "model.vision.use_cls=true",
        ],
    ],
)
def test_meta_build_then_seeded_init_equals_the_eager_build(overrides):
    cfg = load_config("configs/tiny.yaml", overrides)
    torch.manual_seed(0)
    eager = build_model(cfg.model)
    seeded_init(eager, 5)
    with torch.device("meta"):
        lazy = build_model(cfg.model, weights=False)
    materialise(lazy, torch.device("cpu"), lambda: seeded_init(lazy, 5))
    want, got = eager.state_dict(), lazy.state_dict()
    assert sorted(want) == sorted(got)
    assert [k for k in want if not torch.equal(want[k], got[k])] == []
    other = build_model(cfg.model)
    seeded_init(other, 6)  # the seed matters: a different one gives different weights
    assert not torch.equal(other.lm.tok_embeddings.weight, eager.lm.tok_embeddings.weight)


@pytest.mark.slow
def test_two_fsdp_ranks_materialise_the_eager_weights_with_about_half_the_memory_each(tmp_path):
    out = tmp_path / "meta.json"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "tests/dist/meta_init.py",
        str(out),
    ]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(Path("src").resolve()) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    }
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-4000:]
    r = json.loads(out.read_text())
    assert r["names_equal"] and r["mismatched"] == []
    assert r["replica_mb"] > 80  # a model of ~100 MB, so the memory figures below are not noise
    assert r["eager_build_rss_mb"] >= 0.95 * r["replica_mb"]  # the measure sees a replica when there is one
    assert max(r["build_rss_mb_per_rank"]) < 0.8 * r["replica_mb"], r  # each rank: its half + temporaries


@pytest.mark.parametrize("objective", ["clip", "siglip", "aim", "superclass"])
def test_the_encoder_stage_builds_on_meta_and_its_init_writes_every_weight(objective):
    cfg = load_config("configs/tiny.yaml", ["train.stage=encoder", f"train.encoder_objective={objective}"])
    eager = build_stage_module(cfg, 64, set(), DistEnv(), "single")
    with torch.no_grad():
        for p in eager.parameters():
            p.fill_(float("nan"))  # whatever reset_parameters leaves out stays NaN
    seeded_init(eager, 5)
    with torch.device("meta"):
        lazy = build_stage_module(cfg, 64, set(), DistEnv(), "single", weights=False)
    assert all(p.is_meta for p in lazy.parameters())  # nothing allocated before sharding
    materialise(lazy, torch.device("cpu"), lambda: seeded_init(lazy, 5))
    want, got = eager.state_dict(), lazy.state_dict()
    assert [k for k, v in want.items() if v.isnan().any()] == []
    assert sorted(want) == sorted(got) and [k for k in want if not torch.equal(want[k], got[k])] == []
    if objective in ("clip", "siglip"):
        assert float(got["logit_scale"]) == pytest.approx(LOGIT_INIT[objective][0])
        assert float(got["text.pos"].std()) == pytest.approx(0.01, rel=0.1)
        attn = lazy.text.layers[0].self_attn
        assert torch.equal(attn.out_proj.bias, torch.zeros_like(attn.out_proj.bias))  # torch's own MHA init
