"""`build_model`: the one place a config becomes an MLLM, with HF weights when a config names them.

Building on the meta device (`with torch.device("meta")`) allocates nothing, which is how
`mm1 info` sizes a 30B preset in seconds and how FSDP2 materialises shards.
"""

from __future__ import annotations

import contextlib
import logging

import torch

from mm1.config import ModelConfig
from mm1.models.mllm import MLLM

log = logging.getLogger(__name__)


def build_model(cfg: ModelConfig, device: str | torch.device | None = None, weights: bool = True) -> MLLM:
    """Build the MLLM described by `cfg`; load HF vision / LM weights from local dirs if named
    (`weights=False` leaves that to `load_pretrained`, after a meta-built model is materialised)."""
    with torch.device(device) if device is not None else contextlib.nullcontext():
        model = MLLM(cfg)
    if weights:
        load_pretrained(model, cfg)
    return model


def load_pretrained(model: MLLM, cfg: ModelConfig) -> None:
    """Fill the parts whose config names a local HF dir (`model.vision.hf_path`, `model.lm.hf_path`)."""
    if cfg.vision.hf_path:
        from mm1.models.hf_vision import load_hf_vision_into

        load_hf_vision_into(model.vision, cfg.vision.hf_path)
        log.info("image encoder weights from %s", cfg.vision.hf_path)
    if cfg.lm.hf_path:
        from mm1.models.hf_lm import load_hf_lm_into

        load_hf_lm_into(model.lm, cfg.lm.hf_path)
        log.info("language model weights from %s", cfg.lm.hf_path)
