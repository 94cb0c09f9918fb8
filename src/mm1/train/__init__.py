"""Training: one trainer for encoder pre-training, MLLM pre-training and SFT (`mm1 train`).

`train(cfg, out, resume=False)` runs a stage into a run dir; `load_checkpoint(path)` returns
(model, config, tokenizer) from a run dir or a checkpoint dir. Both are imported lazily so that
`import mm1.train` stays cheap."""

from __future__ import annotations

from typing import Any

__all__ = ["train", "load_checkpoint"]


def __getattr__(name: str) -> Any:
    if name == "train":
        from mm1.train.trainer import train

        return train
    if name == "load_checkpoint":
        from mm1.train.checkpoint import load_checkpoint

        return load_checkpoint
    raise AttributeError(f"module 'mm1.train' has no attribute {name!r}")
