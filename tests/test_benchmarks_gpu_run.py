"""The prepared GPU run (benchmarks/gpu_run.py) rehearsed on CPU: every stage the GPU run has -
throughput, train + checkpoint + resume from a copy of the checkpoint alone, eval in bf16 and fp32 -
on the tiny preset, and a missing dependency named with the pip line before anything runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path("benchmarks/gpu_run.py").resolve()


def run_script(*argv: str, pythonpath: str = "") -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "CUDA_VISIBLE_DEVICES": "",
        "PYTHONPATH": os.pathsep.join(
            p for p in (pythonpath, str(Path("src").resolve()), os.environ.get("PYTHONPATH", "")) if p
        ),
    }
    return subprocess.run([sys.executable, str(SCRIPT), *argv], env=env, capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_the_cpu_rehearsal_runs_every_stage_and_resumes_to_the_uninterrupted_losses(tiny_world, tmp_path):
    done = run_script(
        "--cpu-rehearsal",
        "--world",
        str(tiny_world),
        "--work",
        str(tmp_path / "work"),
        "--out",
        str(tmp_path / "run.json"),
    )
    assert done.returncode == 0, done.stderr[-4000:]
    r = json.loads(done.stdout.strip().splitlines()[-1])
    assert r == json.loads((tmp_path / "run.json").read_text())
    assert r["rehearsal"] is True and r["ok"] is True and r["machine"]["gpu"] is None
    tp = r["throughput"]
    assert tp["ok"] and tp["variants_ok"] == ["eager", "eager+ckpt"] and tp["best_tokens_per_s"] > 0
    tr = r["train"]
    assert tr["steps"] == 4 and tr["resumed_from"] == 2 and tr["resumed_steps"] is True
    assert tr["resume_max_rel_gap"] <= 1e-5 and tr["resume_ok"] is True
    assert (tmp_path / "work" / "resumed" / "checkpoints" / "step-4").is_dir()  # the resumed run saved its end
    ev = r["eval"]
    assert ev["ok"] and {ev["cpu-bf16"]["dtype"], ev["cpu-fp32"]["dtype"]} == {"bf16", "fp32"}
    for name in ("cpu-bf16", "cpu-fp32"):
        scores = ev[name]["scores"]
        assert set(scores) == {"world_caption@0", "world_vqa@0"}
        assert all(set(s) == {"metric", "score", "score_shuffled", "image_gain"} for s in scores.values())
    assert ev["max_score_gap"] >= 0


def test_a_missing_dependency_is_named_with_the_pip_line_before_anything_runs(tmp_path):
    fake = tmp_path / "fake"
    (fake / "omegaconf").mkdir(parents=True)  # omegaconf 2.3 installed without its antlr4 runtime
    (fake / "omegaconf" / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'antlr4'\")\n")
    done = run_script("--cpu-rehearsal", "--work", str(tmp_path / "work"), pythonpath=str(fake))
    assert done.returncode == 2
    assert "gpu_run.py: missing Python packages: antlr4-python3-runtime==4.9.*" in done.stderr
    assert "pip install 'antlr4-python3-runtime==4.9.*'" in done.stderr
    assert not (tmp_path / "work").exists() and done.stdout == ""  # nothing ran
