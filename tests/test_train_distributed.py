"""`torchrun --nproc_per_node 2` on CPU (gloo): DDP and FSDP2 reproduce one process with the same
global batch, and an FSDP2 run resumes its sharded optimizer state exactly."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

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
def single(tiny_world, tmp_path_factory) -> list[float]:
    out = tmp_path_factory.mktemp("single") / "run"
    train(load_config("configs/tiny.yaml", [f"data.world={tiny_world}", *COMMON, "data.batch_size=2"]), out)
    return [r["loss"] for r in read_metrics(out)]


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_match_one_process_with_the_same_global_batch(strategy, single, tiny_world, tmp_path):
    out = tmp_path / strategy
    done = torchrun(tiny_world, out, f"train.strategy={strategy}", "train.save_every=2")
    assert f"{strategy} on 2 x cpu" in done.stderr
    losses = [r["loss"] for r in read_metrics(out)]
    assert len(losses) == STEPS
    assert losses[-1] == pytest.approx(single[-1], rel=1e-4)
    assert losses == pytest.approx(single, rel=1e-4)
    assert single[-1] < single[0]  # it trained: the comparison is not between two untouched models
    if strategy == "fsdp":  # drop the last checkpoint and redo the last step from the sharded state
        shutil.rmtree(out / "checkpoints" / f"step-{STEPS}")
        done = torchrun(tiny_world, out, f"train.strategy={strategy}", "train.save_every=2", "--resume")
        assert "resumed from" in done.stderr
        again = [r["loss"] for r in read_metrics(out)]
        assert again == pytest.approx(losses, rel=1e-6, abs=0)
