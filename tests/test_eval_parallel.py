"""`torchrun -m mm1 eval`: 2 gloo processes split each task's items (strided) and gather the
outputs; scores and per-item records equal one process exactly, for generated (CIDEr, exact match)
and multiple-choice tasks, with an item count that does not divide evenly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mm1.cli import main
from mm1.eval.parallel import Shards
from mm1.train.distributed import DistEnv

EVAL = ["--tasks", "world_caption,world_mc,world_text", "--shots", "0,2", "--limit", "5"]


def test_ranks_take_whole_batches_strided_and_together_cover_every_item_once():
    order = [4, 0, 6, 2, 1, 5, 3]  # the order one process would batch them in
    parts = [Shards(DistEnv(rank=r, world_size=2)).split(order, 2) for r in range(2)]
    assert parts == [[4, 0, 1, 5], [6, 2, 3]]
    assert sorted(parts[0] + parts[1]) == list(range(7))
    one = Shards()
    assert one.split(order, 2) == order and one.gather(order, [f"out{i}" for i in order], 7) == [
        f"out{i}" for i in range(7)
    ]


@pytest.fixture(scope="module")
def run(tiny_world, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("evalpar") / "run"
    assert (
        main(
            [
                "train",
                "configs/tiny.yaml",
                f"data.world={tiny_world}",
                "model.lm.n_layers=2",
                "model.vision.depth=2",
                "data.seq_len=128",
                "data.batch_size=2",
                "train.steps=2",
                "train.warmup_steps=1",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    return out


def results(directory: Path) -> dict[str, dict]:
    out = {}
    for f in sorted(directory.glob("*.json")):
        r = json.loads(f.read_text())
        r.pop("seconds")
        out[f.name] = r
    return out


@pytest.mark.slow
def test_two_ranks_give_exactly_the_single_process_scores_and_records(run, tmp_path):
    assert main(["eval", "--checkpoint", str(run), *EVAL, "--json", str(tmp_path / "one")]) == 0
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "mm1",
        "eval",
        "--checkpoint",
        str(run),
        *EVAL,
        "--json",
        str(tmp_path / "two"),
    ]
    # the ranks compute with the parent's thread count: sums over 1 and 2 threads differ in the last bits
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(torch.get_num_threads()),
        "PYTHONPATH": str(Path("src").resolve()) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    }
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-4000:]
    one, two = results(tmp_path / "one"), results(tmp_path / "two")
    assert len(one) == 6 and sorted(one) == sorted(two)
    assert {r["metric"] for r in one.values()} == {"cider", "option", "exact"}
    for name in one:
        assert two[name] == one[name], name
    assert done.stdout.count("world_caption    0-shot") == 1  # rank 0 alone reports
