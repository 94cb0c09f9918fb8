"""One real sweep: `mm1 ablate` on a 2-axis x 2-seed spec with a micro model, trained and evaluated for real."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from mm1.cli import main

ROOT = Path(__file__).resolve().parents[1]
MICRO = [
    "model.vision.image_size=32",
    "model.vision.width=32",
    "model.vision.depth=1",
    "model.vision.heads=2",
    "model.vision.mlp_dim=64",
    "model.lm.dim=32",
    "model.lm.n_layers=1",
    "model.lm.n_heads=2",
    "model.lm.n_kv_heads=1",
    "model.lm.ffn_dim=64",
    "data.seq_len=96",
    "data.batch_size=2",
    "train.steps=2",
    "train.warmup_steps=1",
    "train.save_every=2",
    "eval.max_new_tokens=3",
    "eval.batch_size=4",
]


@pytest.mark.slow
def test_ablate_trains_evaluates_and_reports_a_real_two_axis_two_seed_sweep(tiny_world: Path, tmp_path: Path, capsys):
    spec = {
        "name": "e2e",
        "base": str(ROOT / "configs" / "tiny.yaml"),
        "overrides": MICRO + [f"data.world={tiny_world}"],
        "axes": {"model.connector.kind": ["avgpool", "attnpool"], "model.connector.num_tokens": [1, 4]},
        "seeds": [0, 1],
        "eval": {"tasks": ["world_vqa"], "shots": [0], "limit": 2},
    }
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    out = tmp_path / "sweep"
    assert main(["ablate", str(path), "--out", str(out)]) == 0
    done = sorted(out.glob("points/*/done.json"))
    assert len(done) == 8
    rec = json.loads(done[0].read_text())
    assert rec["results"][0]["task"] == "world_vqa" and "predictions" not in rec["results"][0]
    text = (out / "report.md").read_text()
    assert "world_vqa vqa@0" in text and "pretrain loss" in text
    assert re.search(r"\| avgpool \| 4 \| [0-9.]+ (± [0-9.e-]+ )?\(2\)", text), text
    for rel in re.findall(r"!\[[^]]*\]\(([^)]+)\)", text):
        assert (out / rel).is_file()
    # a rerun finds everything finished and only rewrites the report
    before = {p: p.stat().st_mtime_ns for p in done}
    assert main(["ablate", str(path), "--out", str(out)]) == 0
    assert {p: p.stat().st_mtime_ns for p in done} == before
