"""`torchrun --nproc_per_node 2` on CPU (gloo): DDP and FSDP2 reproduce one process with the same
global batch (losses, gradient norms and final weights), and an FSDP2 run resumes its sharded
optimizer state exactly. Losses alone would not do: a gradient off by a uniform factor (say the
world size) leaves AdamW's steps, and so the losses, almost unchanged; the gradient norm does not."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import mm1.train
from mm1.config import load_config
from mm1.train.metrics import read_metrics
from mm1.train.trainer import train

STEPS = 3
COMMON = ["model.lm.n_layers=2", "model.vision.depth=2", "data.seq_len=128", "train.warmup_steps=2",
          f"train.steps={STEPS}", "train.data_shards=2", "train.lr=1e-3"]


def torchrun(world: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "mm1", "train", "configs/tiny.yaml", f"data.world={world}", *COMMON, "data.batch_size=1",
           *extra, "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(Path("src").resolve()) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done


@pytest.fixture(scope="module")
def single(tiny_world, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("single") / "run"
    train(load_config("configs/tiny.yaml", [f"data.world={tiny_world}", *COMMON, "data.batch_size=2"]), out)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_match_one_process_with_the_same_global_batch(strategy, single, tiny_world, tmp_path):
    out = tmp_path / strategy
    done = torchrun(tiny_world, out, f"train.strategy={strategy}", "train.save_every=2")
    assert f"{strategy} on 2 x cpu" in done.stderr
    rows, one = read_metrics(out), read_metrics(single)
    losses = [r["loss"] for r in rows]
    assert len(losses) == STEPS
    assert losses == pytest.approx([r["loss"] for r in one], rel=1e-4)
    assert one[-1]["loss"] < one[0]["loss"]  # it trained: the comparison is not between two untouched models
    assert [r["grad_norm"] for r in rows] == pytest.approx([r["grad_norm"] for r in one], rel=1e-3)
    assert [r["tokens"] for r in rows] == [r["tokens"] for r in one]
    ours, theirs = mm1.train.load_checkpoint(out)[0].state_dict(), mm1.train.load_checkpoint(single)[0].state_dict()
    assert ours.keys() == theirs.keys()
    for name, value in ours.items():
        torch.testing.assert_close(value, theirs[name], rtol=1e-3, atol=1e-5, msg=lambda m: f"{name}: {m}")
    if strategy == "fsdp":  # drop the last checkpoint and redo the last step from the sharded state
        shutil.rmtree(out / "checkpoints" / f"step-{STEPS}")
        done = torchrun(tiny_world, out, f"train.strategy={strategy}", "train.save_every=2", "--resume")
        assert "resumed from" in done.stderr
        again = [r["loss"] for r in read_metrics(out)]
        assert again == pytest.approx(losses, rel=1e-6, abs=0)
