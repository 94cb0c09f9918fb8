"""Exact resume: a real `mm1 train` process is SIGKILLed mid-training after it wrote a checkpoint;
`--resume` then produces the same per-step losses as an uninterrupted run of the same length."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from mm1.config import load_config
from mm1.train.metrics import read_metrics
from mm1.train.trainer import train

STEPS = 12
ARGS = [
    "model.lm.n_layers=2",
    "model.vision.depth=2",
    "data.seq_len=128",
    "data.batch_size=1",
    "train.warmup_steps=5",
    f"train.steps={STEPS}",
    "train.save_every=3",
    "train.keep_last=2",
]


def _lines(path: Path) -> int:
    try:
        return sum(1 for line in path.read_text().splitlines() if line.endswith("}"))
    except FileNotFoundError:
        return 0


def test_sigkill_then_resume_reproduces_the_uninterrupted_losses(tiny_world, tmp_path):
    args = [f"data.world={tiny_world}", *ARGS]
    ref = tmp_path / "ref"
    train(load_config("configs/tiny.yaml", args), ref)
    expected = [(r["step"], r["loss"]) for r in read_metrics(ref)]
    assert len(expected) == STEPS

    run = tmp_path / "killed"
    cmd = [sys.executable, "-m", "mm1", "train", "configs/tiny.yaml", *args, "--out", str(run)]
    env = {**os.environ, "PYTHONPATH": str(Path("src").resolve()) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    try:
        # kill once a checkpoint exists and at least one step after it was logged (mid-training)
        while time.time() < deadline and proc.poll() is None:
            ckpts = sorted((run / "checkpoints").glob("step-*")) if (run / "checkpoints").is_dir() else []
            if ckpts and _lines(run / "metrics.jsonl") >= 4:
                break
            time.sleep(0.02)
        assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    done = _lines(run / "metrics.jsonl")
    assert 4 <= done < STEPS

    resumed = subprocess.run(cmd + ["--resume"], env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr
    got = [(r["step"], r["loss"]) for r in read_metrics(run)]
    assert got == expected  # bit-for-bit on CPU: same losses, same steps, nothing repeated or lost
    info = json.loads((run / "run.json").read_text())
    assert 3 <= info["start_step"] < STEPS and info["start_step"] % 3 == 0
