"""Which transformers architecture an mm1 model maps onto *exactly*, or why none does.

An export is only useful if transformers computes what mm1 computes, so every choice here is about
exactness, not resemblance:

- vision tower: mm1's ViT with a CLS token and a pre-norm is a CLIP vision tower (its patch-conv bias,
  which CLIP lacks, is a constant per patch and moves into the patch position embeddings); without
  either it is a SigLIP tower. The other two combinations exist in neither library, so they are
  refused. Only the blocks up to `feature_layer` are exported (mm1 never builds the others), and
  LLaVA reads the last one (`vision_feature_layer=-1`).
- final norm: LLaVA takes `hidden_states[layer]`, which never includes the tower's final LayerNorm;
  an mm1 ViT that normalises its features (`post_norm` on the last block, mm1's default) therefore
  needs mm1's projector module, which applies that norm before the connector.
- connector: LLaVA's projector is Linear -> GELU -> Linear, which is mm1's `mlp` connector with
  `mlp_depth=2` and no `out_norm`. Everything else (other depths, an output norm, `avgpool`,
  `attnpool`, `c_abstractor`) runs through
  the modeling file mm1 writes beside the weights (`trust_remote_code=True`).
- language model: dense Llama (or Qwen2 when q/k/v have biases). An MoE LM is a Qwen2-MoE: its
  `decoder_sparse_step` is mm1's `moe_every` (the same layers are sparse), its router is mm1's
  (softmax over experts, top-k, renormalised: `norm_topk_prob`), and the two things mm1 lacks are
  written as exact zeros: a shared expert of width 1 whose output projection is zero, and q/k/v
  biases. Training-only settings (load-balance and z-loss coefficients) do not change the output.
- high resolution (`subimage_grid`): LLaVA feeds one crop per image; refused.
"""

from __future__ import annotations

from dataclasses import dataclass

from mm1.config import ModelConfig
from mm1.models.vision import used_blocks


class ExportError(ValueError):
    """The model cannot be exported as asked; the message says why and what would work."""


@dataclass(frozen=True)
class Layout:
    """How one model is written out."""

    tower: str  # "clip" | "siglip": the transformers vision tower its ViT becomes
    blocks: int  # ViT blocks exported (those up to feature_layer)
    feature_norm: bool  # the ViT's final LayerNorm applies to the features LLaVA reads
    text: str  # "llama" | "qwen2" | "qwen2_moe"
    plain: bool  # loads as LlavaForConditionalGeneration without remote code
    why_remote: str  # empty when plain: why the modeling file is needed

    @property
    def select_strategy(self) -> str:
        """LLaVA's `vision_feature_select_strategy`: drop the CLS token ("default") or keep all."""
        return "default" if self.tower == "clip" else "full"


def vision_tower(cfg: ModelConfig) -> str:
    v = cfg.vision
    if v.use_cls and v.pre_norm:
        return "clip"
    if not v.use_cls and not v.pre_norm:
        return "siglip"
    raise ExportError(
        f"model.vision.use_cls={v.use_cls} with pre_norm={v.pre_norm}: transformers has no vision "
        "tower with this combination (CLIP has both a CLS token and a pre-norm, SigLIP neither); "
        "only models whose ViT matches one of the two can be exported"
    )


def text_model(cfg: ModelConfig) -> str:
    if cfg.lm.n_experts:
        return "qwen2_moe"
    return "qwen2" if cfg.lm.qkv_bias else "llama"


def plan(cfg: ModelConfig) -> Layout:
    """The layout for `cfg`, or an ExportError naming what cannot be exported."""
    if cfg.subimage_grid:
        raise ExportError(
            f"model.subimage_grid={cfg.subimage_grid}: LLaVA feeds one crop per image; models "
            "trained on sub-image grids cannot be exported yet"
        )
    if cfg.vision.kind != "vit" or cfg.lm.kind != "llama":
        raise ExportError(
            f"model.vision.kind={cfg.vision.kind!r} / model.lm.kind={cfg.lm.kind!r}: "
            "only the `vit` encoder and the `llama` decoder can be exported"
        )
    if cfg.vision.stem != "patch":
        raise ExportError(
            f"model.vision.stem={cfg.vision.stem!r}: transformers' CLIP and SigLIP towers embed patches "
            "with one patchify convolution; train with model.vision.stem=patch to export"
        )
    tower = vision_tower(cfg)
    blocks = used_blocks(cfg.vision)
    if blocks == 0:
        raise ExportError(
            f"model.vision.feature_layer={cfg.vision.feature_layer}: features taken before the first "
            "ViT block (the embeddings) cannot be exported; use a feature_layer of a block"
        )
    feature_norm = cfg.vision.post_norm and blocks == cfg.vision.depth
    c = cfg.connector
    reasons = []
    if c.kind != "mlp":
        reasons.append(f"the {c.kind} connector is not LLaVA's projector")
    elif c.mlp_depth != 2:
        reasons.append(f"model.connector.mlp_depth={c.mlp_depth} (LLaVA's projector has exactly 2 layers)")
    elif c.out_norm:
        reasons.append(f"model.connector.out_norm={c.out_norm} (LLaVA's projector ends in a Linear)")
    if feature_norm:
        reasons.append(
            "model.vision.post_norm=true normalises the features, which LLaVA reads before the tower's final norm"
        )
    return Layout(
        tower=tower,
        blocks=blocks,
        feature_norm=feature_norm,
        text=text_model(cfg),
        plain=not reasons,
        why_remote="; ".join(reasons),
    )
