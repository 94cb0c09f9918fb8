"""What each stage trains and where its weights start: the module the trainer optimises.

The stages are registered by name in `STAGES` (`train.stage` picks one):
- `encoder`: `EncoderPretrainer` (ViT + text tower or AIM head), see `mm1.train.encoder`;
- `pretrain` / `sft`: the MLLM inside `MLLMObjective`, which returns per-token loss *sums* so the
  trainer can normalise by the token count of the whole global batch (exactly what one process
  with the same global batch computes, whatever the split over ranks and micro-steps).
Both return `mm1.train.objective.ObjectiveOutput`; the trainer reads a stage's `Stage` entry, never
its name.

Initialisation order: random (seeded) -> HF weights (`model.*.hf_path`, by `build_model`) ->
`train.init_from` (an encoder run gives the ViT only; a pretrain/SFT run gives the whole model, the
ViT's position embeddings re-gridded when `model.vision.image_size` changed) -> freeze flags.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mm1.config import Config
from mm1.data.kinds import KINDS
from mm1.registry import Registry, at_key, one_of
from mm1.train.checkpoint import (
    CheckpointError,
    read_checkpoint_weights,
    read_config,
    resolve_checkpoint,
    verify_checkpoint,
)
from mm1.train.distributed import DistEnv
from mm1.train.encoder import OBJECTIVES, EncoderPretrainer
from mm1.train.objective import ObjectiveOutput

log = logging.getLogger("mm1.train")


class MLLMObjective(nn.Module):
    """Wraps the MLLM for training: forward(batch) -> the token-loss sum and statistics (no mean yet);
    its units are the batch's target tokens.

    Under FSDP/DDP every rank must run the image encoder every micro-step (its parameters are
    gathered / reduced collectively); a rank whose micro-batch holds no image encodes one blank
    image and adds 0 x its output, before the main forward, so the collectives stay in step."""

    def __init__(self, mllm: nn.Module, needs_vision_every_step: bool) -> None:
        super().__init__()
        self.mllm = mllm
        self.needs_vision_every_step = needs_vision_every_step

    def units(self, batch: dict[str, torch.Tensor]) -> int:
        return int((batch["targets"] != -100).sum())

    def forward(self, batch: dict[str, torch.Tensor]) -> ObjectiveOutput:
        images = batch.get("images")
        extra = None
        if self.needs_vision_every_step and (images is None or images.shape[0] == 0):
            size = self.mllm.cfg.vision.image_size
            blank = torch.zeros(1, 3, size, size, device=batch["input_ids"].device)
            extra = self.mllm.encode_images(blank).sum() * 0.0
        out = self.mllm(
            batch["input_ids"],
            images=images if images is not None and images.shape[0] else None,
            targets=batch["targets"],
            position_ids=batch.get("position_ids"),
            doc_ids=batch.get("doc_ids"),
        )
        valid = batch["targets"] != -100  # [B, T]
        row_sum = out.token_loss.float().sum(1)  # [B]
        row_n = valid.sum(1).float()  # [B]
        src = batch["source"]
        kinds = len(KINDS.names())
        per_source = torch.zeros(2, kinds, device=row_sum.device)
        per_source[0].index_add_(0, src, row_sum.detach())
        per_source[1].index_add_(0, src, row_n)
        aux = out.aux_loss if out.aux_loss is not None else row_sum.new_zeros(())
        if extra is not None:
            aux = aux + extra
        metrics = {
            f"moe_{k}": v.detach().float()
            for k, v in (out.moe_stats or {}).items()
            if torch.is_tensor(v) and v.numel() == 1
        }
        return ObjectiveOutput(loss_sum=row_sum.sum(), aux_loss=aux, per_source=per_source, metrics=metrics)


def set_activation_checkpointing(model: nn.Module, on: bool) -> None:
    """`model.lm.activation_checkpointing` also covers the ViT (the flag lives in the LM config)."""
    for m in model.modules():
        if hasattr(m, "grad_checkpointing"):
            m.grad_checkpointing = on


def _vision_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k[len("vision.") :]: v for k, v in state.items() if k.startswith("vision.")}


def load_init(model: nn.Module, vision: nn.Module, cfg: Config) -> None:
    """Apply `train.init_from` to `model` (the MLLM or the encoder pre-trainer) in place."""
    from mm1.models.vision import resize_position_embeddings

    ckpt = resolve_checkpoint(cfg.train.init_from)
    verify_checkpoint(ckpt)
    src_cfg = read_config(ckpt)
    state = read_checkpoint_weights(ckpt)
    new_size = cfg.model.vision.image_size
    if src_cfg.model.vision.image_size != new_size:
        state = resize_position_embeddings(state, new_size)
        log.info("init: ViT position embeddings re-gridded %d px -> %d px", src_cfg.model.vision.image_size, new_size)
    src_mllm, mllm = STAGES.get(src_cfg.train.stage).trains_mllm, STAGES.get(cfg.train.stage).trains_mllm
    whole = src_mllm and mllm
    same_encoder = (
        src_cfg.train.stage == cfg.train.stage
        and not mllm
        and src_cfg.train.encoder_objective == cfg.train.encoder_objective
    )
    if whole or same_encoder:
        target, part = model, state
        what = "whole model"
    else:
        target, part = vision, _vision_state(state)
        what = "image encoder only"
    missing, unexpected = target.load_state_dict(part, strict=False)
    if missing or unexpected or not part:
        raise CheckpointError(
            f"train.init_from={cfg.train.init_from}: the weights of {ckpt} do not fit this model's "
            f"{what} (missing {list(missing)[:4]}, unexpected {list(unexpected)[:4]}); the model config "
            "(widths, depths, vocab) must match the run that wrote it"
        )
    log.info("init: %s from %s (stage %s)", what, ckpt, src_cfg.train.stage)


def apply_freeze(model: nn.Module, cfg: Config) -> dict[str, bool]:
    """Per-part freeze flags; returns which parts are frozen (for the log)."""
    flags = {"vision": cfg.train.freeze_vision, "connector": cfg.train.freeze_connector, "lm": cfg.train.freeze_lm}
    for part, frozen in flags.items():
        sub = getattr(model, part, None)
        if sub is not None and frozen:
            sub.requires_grad_(False)
    return {k: v for k, v in flags.items() if hasattr(model, k)}


@dataclass(frozen=True)
class Stage:
    """How the trainer runs one `train.stage`."""

    # (cfg, vocab_size, special_ids, env, strategy, encode, weights) ->
    #   (the module the trainer optimises, the model init_from and freezing apply to, its ViT)
    build: Callable[..., tuple[nn.Module, nn.Module, nn.Module]]
    # (the materialised model, cfg) -> its HF weights (`model.*.hf_path`), loaded after the meta build
    load_pretrained: Callable[[nn.Module, Config], None]
    # an MLLM inside `MLLMObjective`: its weights checkpointed under `mllm.`, the image probe
    # (loss_shuffled) and MFU apply (every stage is built on the meta device and materialised)
    trains_mllm: bool

    @property
    def checkpoint_prefix(self) -> str:
        return "mllm." if self.trains_mllm else ""


STAGES: Registry[Stage] = Registry("training stage", "train.stage", at_key("train.stage"))


@STAGES.validates
def _check_encoder_objective(cfg: Config) -> None:
    one_of("train.encoder_objective", cfg.train.encoder_objective, OBJECTIVES)


def _encoder_weights(model: nn.Module, cfg: Config) -> None:
    if cfg.model.vision.hf_path:
        from mm1.models.hf_vision import load_hf_vision_into

        load_hf_vision_into(model.vision, cfg.model.vision.hf_path)


def _build_encoder(
    cfg: Config, vocab_size: int, special_ids: set[int], env: DistEnv, strategy: str, encode: Any, weights: bool
) -> tuple[nn.Module, nn.Module, nn.Module]:
    module = EncoderPretrainer(cfg, vocab_size, special_ids, env, encode)
    if weights:
        _encoder_weights(module, cfg)
    return module, module, module.vision


def _mllm_weights(model: nn.Module, cfg: Config) -> None:
    from mm1.models.build import load_pretrained

    load_pretrained(model, cfg.model)


def _build_mllm(
    cfg: Config, vocab_size: int, special_ids: set[int], env: DistEnv, strategy: str, encode: Any, weights: bool
) -> tuple[nn.Module, nn.Module, nn.Module]:
    from mm1.models.build import build_model

    mllm = build_model(cfg.model, weights=weights)
    return MLLMObjective(mllm, needs_vision_every_step=strategy in ("ddp", "fsdp")), mllm, mllm.vision


STAGES.register("encoder")(Stage(_build_encoder, _encoder_weights, trains_mllm=False))
STAGES.register("pretrain")(Stage(_build_mllm, _mllm_weights, trains_mllm=True))
STAGES.register("sft")(Stage(_build_mllm, _mllm_weights, trains_mllm=True))


def build_stage_module(
    cfg: Config, vocab_size: int, special_ids: set[int], env: DistEnv, strategy: str, encode=None, weights: bool = True
) -> nn.Module:
    """The module the trainer optimises for `cfg.train.stage`, initialised and frozen as configured.
    `encode` (text -> token ids) lets the encoder stage find its hard-negative words.

    `weights=False` (a stage built on the meta device) skips HF weights and `train.init_from`:
    `load_stage_weights` applies them once the module is materialised."""
    module, inner, vision = STAGES.get(cfg.train.stage).build(
        cfg, vocab_size, special_ids, env, strategy, encode, weights
    )
    if cfg.train.init_from and weights:
        load_init(inner, vision, cfg)
    frozen = apply_freeze(inner, cfg)
    if any(frozen.values()):
        log.info("frozen: %s", ", ".join(k for k, v in frozen.items() if v))
    set_activation_checkpointing(inner, cfg.model.lm.activation_checkpointing)
    return module


def stage_model(module: nn.Module) -> nn.Module:
    """The model inside a stage module: the MLLM of an MLLM stage, the encoder pretrainer itself."""
    return module.mllm if isinstance(module, MLLMObjective) else module


def load_stage_weights(model: nn.Module, cfg: Config) -> None:
    """HF weights, then `train.init_from`, into a materialised (possibly sharded) `stage_model`."""
    STAGES.get(cfg.train.stage).load_pretrained(model, cfg)
    if cfg.train.init_from:
        load_init(model, model.vision, cfg)
