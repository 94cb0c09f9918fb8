"""The multimodal LLM: image encoder -> connector -> decoder, image tokens spliced into the text.

    input_ids  [B, T]   ... <s> The <img><img>...<img> shows ...        (k slot ids per image)
                               |                  ^
    images     [N,3,H,W] --ViT--> [N, h*w, D_v] --connector--> [N, k, D_lm] --scatter (row-major)--+
    text       [B, T] --embedding--> [B, T, D_lm] ------------------------------------------------+--> LM

Every image of the batch goes through the encoder in one call; the N*k connector outputs fill the
slot positions of the batch in order of appearance, so a sequence may hold any number of images
anywhere (and at high resolution an image is several crops, each k slots). Loss is next-token cross
entropy on `targets` (already shifted by the data pipeline; slot, pad and prompt positions are -100)
plus the MoE auxiliary losses.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from mm1.config import ModelConfig
from mm1.models.connectors import build_connector
from mm1.models.registry import ENCODERS, LANGUAGE_MODELS

IGNORE_INDEX = -100


@dataclass
class MLLMOutput:
    """What `MLLM.forward` returns. With targets, the loss only needs the LM head at positions that
    have a target (image slots, prompts and padding have none: about half of an MM1 caption row), so
    `logits` [B, T, V] is then computed on first access, from the kept hidden states."""

    _logits: torch.Tensor | None = None
    loss: torch.Tensor | None = None  # lm_loss + aux_loss
    lm_loss: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None
    token_loss: torch.Tensor | None = None  # [B, T] per-token CE, 0 where ignored
    moe_stats: dict | None = None
    _hidden: torch.Tensor | None = None  # [B, T, D] final-norm states (when logits are deferred)
    _head: Callable[[torch.Tensor], torch.Tensor] | None = None

    @property
    def logits(self) -> torch.Tensor:  # [B, T, V]
        if self._logits is None and self._hidden is not None:
            self._logits = self._head(self._hidden)
        return self._logits


class MLLM(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.vision = ENCODERS.get(cfg.vision.kind)(cfg.vision)
        self.connector = build_connector(cfg.connector, cfg.vision.width, cfg.lm.dim, cfg.vision.grid)
        self.lm = LANGUAGE_MODELS.get(cfg.lm.kind)(cfg.lm)

    def reset_parameters(self) -> None:
        """Each part's own initialisation (what `mm1.train.materialise` replays after meta build)."""
        for part in (self.vision, self.connector, self.lm):
            part.reset_parameters()

    @property
    def image_token_id(self) -> int:
        return self.cfg.image_token_id

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """[N, 3, H, W] -> [N, k, D_lm]: one encoder call for every image (crop) of the batch."""
        feats = self.vision(images)  # [N, h*w, D_v]
        return self.connector(feats)  # [N, k, D_lm]

    def embed(self, input_ids: torch.Tensor, images: torch.Tensor | None = None) -> torch.Tensor:
        """Text embeddings with the connector outputs scattered into the image-slot positions."""
        x = self.lm.tok_embeddings(input_ids)  # [B, T, D_lm]
        slots = input_ids == self.image_token_id  # [B, T]
        n_slots = int(slots.sum())
        n_images = 0 if images is None else images.shape[0]
        if n_images == 0:
            if n_slots:
                raise ValueError(
                    f"the batch has {n_slots} image-slot tokens (id {self.image_token_id}) but no images; "
                    "pass the images, or check that the tokenizer's image id matches model.image_token_id"
                )
            return x
        feats = self.encode_images(images.to(x.dtype))  # [N, k, D_lm]
        if feats.shape[0] * feats.shape[1] != n_slots:
            raise ValueError(
                f"{n_images} images x {feats.shape[1]} tokens = {feats.shape[0] * feats.shape[1]} image "
                f"embeddings, but the batch has {n_slots} slot tokens; each <image> must expand to "
                f"model.tokens_per_image={self.cfg.tokens_per_image} slots (k x crops)"
            )
        return x.masked_scatter(slots.unsqueeze(-1), feats.reshape(-1, feats.shape[-1]).to(x.dtype))

    def forward(
        self,
        input_ids: torch.Tensor,
        images: torch.Tensor | None = None,
        targets: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache=None,
        logits_to_keep: int = 0,
    ) -> MLLMOutput:
        """logits_to_keep=n > 0 (without targets) applies the LM head to the last n positions only
        ([B, n, V] logits): decoding needs 1, and the head over every prompt position costs about as
        much as a layer."""
        x = self.embed(input_ids, images)
        with_loss = targets is not None
        out = self.lm(
            x,
            position_ids=position_ids,
            doc_ids=doc_ids,
            attention_mask=attention_mask,
            cache=cache,
            logits=not with_loss and logits_to_keep <= 0,
        )
        logits = out.logits
        if logits is None and not with_loss:
            logits = self.lm.head(out.hidden[:, -logits_to_keep:])  # [B, n, V]
        result = MLLMOutput(
            logits, aux_loss=out.aux_loss, moe_stats=out.moe_stats, _hidden=out.hidden, _head=self.lm.head
        )
        if with_loss:
            valid = targets != IGNORE_INDEX  # [B, T]
            picked = self.lm.head(out.hidden[valid])  # [n, V]: logits only where there is a target
            ce = F.cross_entropy(picked.float(), targets[valid], reduction="none")  # [n]
            result.token_loss = torch.zeros(targets.shape, dtype=ce.dtype, device=ce.device).masked_scatter(valid, ce)
            result.lm_loss = ce.sum() / valid.sum().clamp(min=1)
            result.loss = result.lm_loss + out.aux_loss
        return result


def count_parameters(model: MLLM) -> dict[str, int]:
    """Parameters per part; `active` counts only top-k of each MoE layer's experts (per token)."""
    parts = {name: sum(p.numel() for p in getattr(model, name).parameters()) for name in ("vision", "connector", "lm")}
    total = sum(parts.values())
    lm_cfg = model.cfg.lm
    inactive = 0
    if lm_cfg.n_experts:
        for name, p in model.lm.named_parameters():
            if ".experts." in name or name.endswith(("experts_w1", "experts_w2", "experts_w3")):
                inactive += p.numel() * (lm_cfg.n_experts - lm_cfg.moe_top_k) // lm_cfg.n_experts
    return {**parts, "total": total, "active": total - inactive}
