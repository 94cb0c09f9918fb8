"""A run whose configured paths are all real never builds the synthetic world (data.sft's
`{world}/...` default included: a pretrain run does not read it)."""

from __future__ import annotations

from mm1.config import load_config
from mm1.train.metrics import read_metrics
from mm1.train.trainer import train


def test_a_real_sources_config_never_builds_the_world(tiny_world, tmp_path):
    nowhere = tmp_path / "world-that-must-not-exist"
    real = [
        f"data.world={nowhere}",
        f"data.tokenizer={tiny_world / 'tokenizer.json'}",
        f"data.sources.caption.path={tiny_world / 'caption'}",
        f"data.sources.interleaved.path={tiny_world / 'interleaved'}",
        f"data.sources.text.path={tiny_world / 'text'}",
    ]
    cfg = load_config(
        "configs/tiny.yaml",
        [
            *real,
            "model.lm.n_layers=1",
            "model.vision.depth=1",
            "data.seq_len=128",
            "data.batch_size=1",
            "train.steps=1",
            "train.warmup_steps=1",
        ],
    )
    assert "{world}" in cfg.data.sft  # the default stays, unused by this stage
    train(cfg, tmp_path / "run")
    assert len(read_metrics(tmp_path / "run")) == 1
    assert not nowhere.exists()
