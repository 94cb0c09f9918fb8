"""`resolve_inputs`: the one place a run's `{world}` paths, tokenizer and sources are resolved."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from mm1.config import Config
from mm1.data.inputs import resolve_inputs
from mm1.data.tokenizer import Tokenizer
from mm1.data.world import build as world_build
from mm1.data.world.build import TINY
from mm1.registry import ConfigError

MINI = replace(TINY.scaled(0.02, "tiny"), per_shard=40, per_part=10, lexicon=16)


def test_the_world_is_built_once_and_fills_every_placeholder(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setitem(world_build.WORLD_SIZES, "tiny", MINI)
    cfg = Config()
    cfg.data.world = str(tmp_path / "w")
    calls: list[str] = []
    inputs = resolve_inputs(cfg, barrier=lambda: calls.append("barrier"))
    assert inputs.world == tmp_path / "w" and (inputs.world / "world.json").is_file()
    assert calls == ["barrier"]  # the main process built, then every process met at the barrier
    assert inputs.tokenizer is not None and inputs.tokenizer.source == str(inputs.world / "tokenizer.json")
    assert [(s.name, s.kind, s.path, s.weight) for s in inputs.sources] == [
        ("caption", "caption", f"{inputs.world}/caption", 0.45),
        ("interleaved", "interleaved", f"{inputs.world}/interleaved", 0.45),
        ("text", "text", f"{inputs.world}/text", 0.10),
    ]
    cfg.train.stage = "sft"
    assert [s.path for s in resolve_inputs(cfg).sources] == [f"{inputs.world}/sft/train.json"]


def test_no_world_is_built_when_nothing_read_names_it(tmp_path: Path) -> None:
    Tokenizer.train(["a small corpus of words"] * 20, 300, tmp_path / "tok.json")
    (tmp_path / "text").mkdir()
    cfg = Config()
    cfg.data.world = str(tmp_path / "must-not-exist")
    cfg.data.tokenizer = str(tmp_path / "tok.json")
    cfg.data.sources["caption"].weight = cfg.data.sources["interleaved"].weight = 0.0
    cfg.data.sources["text"].path = str(tmp_path / "text")
    inputs = resolve_inputs(cfg)
    assert inputs.world is None and not (tmp_path / "must-not-exist").exists()
    assert [s.name for s in inputs.sources] == ["text"]  # weight-0 sources are not read
    eval_only = resolve_inputs(cfg, inputs.tokenizer, sources=False)
    assert eval_only.sources == [] and eval_only.tokenizer is inputs.tokenizer and eval_only.world is None


def test_a_stage_without_a_positive_weight_is_a_config_error() -> None:
    cfg = Config()
    cfg.train.stage = "encoder"
    cfg.data.sources["caption"].weight = 0.0
    with pytest.raises(ConfigError, match="no source with a positive weight for train.stage=encoder"):
        resolve_inputs(cfg)
