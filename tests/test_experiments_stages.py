"""Stage-level sharing in sweeps, with the real trainer on a micro model: an encoder pre-training that
two points share trains once, a killed stage resumes from its checkpoint, and the stage key leaves
out only what the stage never reads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mm1.config import Config, load_config
from mm1.experiments.ablate import expand, parse_spec
from mm1.experiments.results import run_ablation
from mm1.experiments.sweep import InProcessRunner, stage_dir, stage_keys, write_commands
from mm1.train.checkpoint import read_checkpoint_weights

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
    "train.steps=4",
    "train.warmup_steps=1",
    "train.save_every=2",
    "train.log_every=1",
    "eval.max_new_tokens=3",
    "eval.batch_size=4",
]


class Recording(InProcessRunner):
    """The in-process runner, noting which stage dirs it trained and whether it resumed them."""

    def __init__(self) -> None:
        self.trained: list[tuple[str, bool]] = []

    def train(self, cfg: Config, config_path: Path, out: Path, resume: bool) -> None:
        self.trained.append((out.name, resume))
        super().train(cfg, config_path, out, resume)


def _spec(world: Path) -> dict:
    return {
        "name": "share",
        "base": str(ROOT / "configs" / "tiny.yaml"),
        "overrides": MICRO + [f"data.world={world}"],
        "stages": ["encoder", "pretrain"],
        "stage_overrides": {"encoder": ["train.steps=2"]},
        "axes": {"model.connector.kind": ["avgpool", "attnpool"]},
        "seeds": [0],
        "eval": {"tasks": ["world_vqa"], "shots": [0], "limit": 2},
    }


def test_two_points_share_one_encoder_and_a_killed_stage_resumes_from_its_checkpoint(tiny_world, tmp_path, monkeypatch):
    from mm1.train import trainer as trainer_mod

    spec = parse_spec(_spec(tiny_world))
    points = expand(spec)
    out = tmp_path / "sweep"
    enc = {stage_keys(p)["encoder"] for p in points}
    pre = [stage_keys(p)["pretrain"] for p in points]
    assert len(enc) == 1 and len(set(pre)) == 2  # the connector does not enter the encoder stage's key
    commands = write_commands(points, out).read_text()
    assert commands.count(" train ") == 3 and commands.count(f"--out {out / 'stages' / enc.pop()}\n") == 1

    # kill the sweep right after the first pretrain stage wrote its step-2 checkpoint (of 4)
    save = trainer_mod.Trainer._save

    def save_then_die(self, step: int) -> None:
        save(self, step)
        if self.cfg.train.stage == "pretrain" and step == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(trainer_mod.Trainer, "_save", save_then_die)
    first = Recording()
    with pytest.raises(KeyboardInterrupt):
        run_ablation(spec, out, first, log=lambda s: None)
    monkeypatch.setattr(trainer_mod.Trainer, "_save", save)
    assert [s for s, _ in first.trained] == [stage_keys(points[0])["encoder"], pre[0]]
    half = stage_dir(points[0], out, "pretrain")
    assert (half / "checkpoints" / "step-2").is_dir() and not (out / "stages" / f"{half.name}.done.json").exists()

    rerun = Recording()
    run_ablation(spec, out, rerun, log=lambda s: None)
    assert rerun.trained == [(pre[0], True), (pre[1], False)]  # no encoder: it was finished and is shared
    steps = [json.loads(line)["step"] for line in (half / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]  # resumed at step 2, not restarted
    for p in points:
        cfg = json.loads((out / "points" / p.run / "done.json").read_text())
        assert cfg["stage_dirs"]["encoder"] == f"stages/{stage_keys(points[0])['encoder']}"
    assert (out / "report.md").is_file()


def _encoder_weights(world: Path, out: Path, extra: list[str]) -> dict[str, torch.Tensor]:
    from mm1.train.trainer import train

    cfg = load_config(
        str(ROOT / "configs" / "tiny.yaml"),
        MICRO + [f"data.world={world}", "train.stage=encoder", "train.steps=2", "train.seed=3"] + extra,
    )
    train(cfg, out)
    return read_checkpoint_weights(out / "checkpoints" / "step-2")


def test_what_the_encoder_key_leaves_out_does_not_change_the_encoder(tiny_world, tmp_path):
    from mm1.experiments.sweep import stage_view

    base = _encoder_weights(tiny_world, tmp_path / "a", [])
    ignored = [
        "model.connector.kind=avgpool",
        "model.lm.dim=48",
        "model.lm.n_heads=3",
        "model.lm.n_kv_heads=3",
        "data.sources.interleaved.weight=0.7",
        "data.sources.caption.weight=0.2",
        "eval.limit=5",
    ]
    other = _encoder_weights(tiny_world, tmp_path / "b", ignored)
    assert base.keys() == other.keys() and all(torch.equal(base[k], other[k]) for k in base)
    cfg = lambda ov: load_config(str(ROOT / "configs" / "tiny.yaml"), MICRO + ov)  # noqa: E731
    assert stage_view("encoder", cfg([])) == stage_view("encoder", cfg(ignored))
    # what it keeps does matter: the slot count lays out the caption batches, the seed and size the weights
    for kept in (["model.connector.num_tokens=4"], ["train.seed=1"], ["model.vision.image_size=64"]):
        assert stage_view("encoder", cfg([])) != stage_view("encoder", cfg(kept))
    assert stage_view("pretrain", cfg([])) != stage_view("pretrain", cfg(["model.connector.kind=avgpool"]))
