"""The prepared GPU training check (benchmarks/gpu_train_check.py) in its CPU dry-run mode: the same
subprocess plumbing, with single-process FSDP2 in fp32 required to match the plain fp32 run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.slow
def test_gpu_train_check_dry_run_agrees_with_the_cpu_reference(tiny_world, tmp_path):
    out = tmp_path / "check.json"
    done = subprocess.run(
        [sys.executable, "benchmarks/gpu_train_check.py", "--dry-run", "--world", str(tiny_world), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=400,
        cwd=Path(__file__).parents[1],
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["ok"] and result["dry_run"]
    assert result["tiny_device"]["run"] == "tiny cpu fp32 fsdp"
    assert result["tiny_max_rel_gap"] <= 1e-5
    assert result["tiny_cpu_fp32"]["steps"] == 2
