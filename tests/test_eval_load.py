"""Loading a checkpoint for eval / generate / export: built on meta, allocated once on the target
device in the target dtype, filled tensor by tensor from either layout (DCP shards or one file)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mm1.config import load_config, to_yaml
from mm1.data.tokenizer import Tokenizer
from mm1.models.build import build_model
from mm1.train.checkpoint import CheckpointError, load_checkpoint, read_checkpoint_weights, save_checkpoint
from mm1.train.distributed import DistEnv
from mm1.train.materialise import seeded_init

BIG = ["model.lm.dim=512", "model.lm.n_layers=8", "model.lm.n_heads=8", "model.lm.ffn_dim=1376"]  # ~100 MB


def write_checkpoint(out: Path, overrides: list[str], consolidated: bool = False) -> Path:
    """A step dir as the trainer writes it, from a seeded model (no training needed to test loading)."""
    words = [f"a {c} shape number {i}" for i, c in enumerate(["red", "blue", "green"] * 30)]
    tok = Tokenizer.train(words, 300, out / "tok")
    cfg = load_config("configs/tiny.yaml", [*overrides, f"model.image_token_id={tok.image_id}"])
    model = build_model(cfg.model)
    seeded_init(model, 3)
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)

    def extra(d: Path) -> None:
        (d / "config.yaml").write_text(to_yaml(cfg))
        tok.save(d / "tokenizer.json")

    return save_checkpoint(
        out / "run",
        1,
        model,
        optimizer,
        scheduler,
        env=DistEnv(),
        trainer_state={},
        rank_state={},
        extra=extra,
        consolidated=consolidated,
    )


@pytest.mark.parametrize("layout", ["dcp", "consolidated"])
def test_a_checkpoint_loads_straight_into_the_eval_dtype(tmp_path, layout):
    ckpt = write_checkpoint(tmp_path, ["model.lm.tie_embeddings=false"], consolidated=layout == "consolidated")
    if layout == "consolidated":
        assert (ckpt / "model.safetensors").is_file()
    want = read_checkpoint_weights(ckpt)
    model, cfg, _ = load_checkpoint(ckpt, dtype=torch.bfloat16)
    got = model.state_dict()
    assert sorted(got) == sorted(want)
    assert [k for k in want if not torch.equal(got[k], want[k].to(torch.bfloat16))] == []
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16} and not model.training
    fp32, _, _ = load_checkpoint(ckpt)
    assert all(torch.equal(v, want[k]) for k, v in fp32.state_dict().items())


def test_weights_of_another_model_are_refused_naming_the_checkpoint(tmp_path):
    ckpt = write_checkpoint(tmp_path, [])
    (ckpt / "config.yaml").write_text((ckpt / "config.yaml").read_text().replace("n_layers: 4", "n_layers: 5"))
    with pytest.raises(CheckpointError, match=f"{ckpt}: the weights do not match"):
        load_checkpoint(ckpt, verify=False)


@pytest.mark.slow
def test_a_bf16_load_holds_the_bf16_weights_not_an_fp32_copy_in_host_memory(tmp_path):
    ckpt = write_checkpoint(tmp_path, BIG)
    fp32_mb = sum(v.numel() * 4 for v in read_checkpoint_weights(ckpt).values()) / 2**20
    # a fixed mmap threshold: glibc then maps every large tensor and unmaps it on free, so memory
    # freed by one measurement is not silently reused by the next
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "MALLOC_MMAP_THRESHOLD_": "131072",
        "PYTHONPATH": str(Path("src").resolve()) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    }
    done = subprocess.run(
        [sys.executable, "tests/dist/eval_load.py", str(ckpt), str(tmp_path / "m.json")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    r = json.loads((tmp_path / "m.json").read_text())
    assert fp32_mb > 80  # a model of ~100 MB, so the figures are not noise
    assert r["fp32_state_dict_mb"] >= 0.95 * fp32_mb, r  # the measure sees a full copy when there is one
    assert r["bf16_load_mb"] < 0.7 * fp32_mb, r  # half for the bf16 weights + one tensor in flight
