"""mm1 parameter names -> the names of a transformers LLaVA checkpoint (the llava-hf layout).

The keys are written in the layout of the llava-hf checkpoints on the Hub (`language_model.model.*`,
`vision_tower.vision_model.*`, `multi_modal_projector.*`), which every transformers version since
LLaVA's addition loads, and which vLLM and lmms-eval expect. The per-part names are not spelled
out again here: they are the importers' tables (`mm1.models.hf_vision.hf_name`,
`mm1.models.hf_lm.LAYER_KEYS` / `TOP_KEYS`) read backwards, so import and export cannot drift apart.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mm1.export.hf_layout import Layout
from mm1.models.hf_lm import LAYER_KEYS, TOP_KEYS
from mm1.models.hf_vision import hf_name
from mm1.models.mllm import MLLM

VISION = "vision_tower.vision_model."
PROJECTOR = "multi_modal_projector."
TEXT = "language_model."
SHARED_EXPERT_WIDTH = 1  # Qwen2-MoE's shared expert, which mm1's MoE lacks: written as zeros


def vision_weights(model: MLLM, layout: Layout) -> dict[str, Tensor]:
    """The ViT as a CLIP or SigLIP tower. CLIP's patch convolution has no bias: mm1's bias adds the
    same vector to every patch token before anything else, so it is added to the patch rows of the
    position table instead (the CLS row keeps its own). The tower's `post_layernorm` only makes the
    pooled output LLaVA never reads: it is written as identity (mm1's final norm, when there is one,
    is the projector's, see `projector_weights`)."""
    out: dict[str, Tensor] = {}
    state = {k: v.detach().float().contiguous() for k, v in model.vision.state_dict().items()}
    bias = state.pop("patch_embed.bias")
    if layout.tower == "clip":
        pos = state["pos_embed"].clone()
        pos[:, 1:] += bias
        state["pos_embed"] = pos
    else:
        out[VISION + "embeddings.patch_embedding.bias"] = bias
    for key, value in state.items():
        if key.startswith("post_norm."):
            continue
        name = hf_name(key, VISION)
        if key == "cls_token":
            value = value.reshape(-1)
        elif key == "pos_embed":
            value = value[0]
        if "{q,k,v}" in name:
            for part, chunk in zip("qkv", value.chunk(3, dim=0)):
                out[name.replace("{q,k,v}", part)] = chunk.clone()  # own storage: safetensors refuses views
        else:
            out[name] = value
    out[f"{VISION}post_layernorm.weight"] = torch.ones(model.cfg.vision.width)
    out[f"{VISION}post_layernorm.bias"] = torch.zeros(model.cfg.vision.width)
    return out


def projector_weights(model: MLLM, layout: Layout) -> dict[str, Tensor]:
    """LLaVA's `linear_1`/`linear_2` for a plain export; otherwise mm1's connector (and the ViT's final
    norm when it shapes the features) under the names of the modeling file's projector."""
    connector = {k: v.detach().float().contiguous() for k, v in model.connector.state_dict().items()}
    if layout.plain:  # mlp, depth 2: readout.0 = Linear, readout.1 = GELU, readout.2 = Linear
        return {
            PROJECTOR + k.replace("readout.0.", "linear_1.").replace("readout.2.", "linear_2."): v
            for k, v in connector.items()
        }
    out = {f"{PROJECTOR}connector.{k}": v for k, v in connector.items()}
    if layout.feature_norm:
        for k, v in model.vision.post_norm.state_dict().items():
            out[f"{PROJECTOR}post_norm.{k}"] = v.detach().float().contiguous()
    return out


def moe_weights(layer: str, ffn: dict[str, Tensor], dim: int) -> dict[str, Tensor]:
    """One MoE layer as Qwen2-MoE's `mlp`: the router is its `gate`, stacked experts become one
    module per expert, and its shared expert is written as zeros (mm1 has none; a zero output
    projection makes it add exactly nothing)."""
    out = {f"{layer}.mlp.gate.weight": ffn["router.weight"]}
    for name in ("gate", "up", "down"):
        for e, w in enumerate(ffn[f"experts.{name}"]):
            out[f"{layer}.mlp.experts.{e}.{name}_proj.weight"] = w.clone()
    width = SHARED_EXPERT_WIDTH
    out.update(
        {
            f"{layer}.mlp.shared_expert.gate_proj.weight": torch.zeros(width, dim),
            f"{layer}.mlp.shared_expert.up_proj.weight": torch.zeros(width, dim),
            f"{layer}.mlp.shared_expert.down_proj.weight": torch.zeros(dim, width),
            f"{layer}.mlp.shared_expert_gate.weight": torch.zeros(1, dim),
        }
    )
    return out


def text_weights(model: MLLM, layout: Layout) -> dict[str, Tensor]:
    """The decoder as a Llama / Qwen2 / Qwen2-MoE causal LM (`language_model.model.*`,
    `language_model.lm_head`); with tied embeddings there is no head to write (transformers ties it
    on load). Qwen2-MoE always has q/k/v biases: zeros when mm1's LM has none."""
    to_hf = {ours: f"model.layers.{{i}}.{hf}" for hf, ours in LAYER_KEYS.items()}
    top = {ours: hf for hf, ours in TOP_KEYS.items()}
    cfg = model.cfg.lm
    out: dict[str, Tensor] = {}
    moe: dict[str, dict[str, Tensor]] = {}
    for key, value in model.lm.state_dict().items():
        value = value.detach().float().contiguous()
        if key in top:
            out[TEXT + top[key]] = value
            continue
        _, i, rest = key.split(".", 2)  # layers.{i}.attn.q.weight
        if rest.startswith("ffn.") and rest not in to_hf:  # ffn.router.weight, ffn.experts.gate ...
            moe.setdefault(i, {})[rest.removeprefix("ffn.")] = value
        elif rest in to_hf:
            out[TEXT + to_hf[rest].format(i=i)] = value
        else:
            raise KeyError(f"language model parameter {key} has no transformers name")
        if (
            layout.text == "qwen2_moe"
            and not cfg.qkv_bias
            and rest in ("attn.q.weight", "attn.k.weight", "attn.v.weight")
        ):
            out[TEXT + to_hf[rest].format(i=i).replace(".weight", ".bias")] = torch.zeros(value.shape[0])
    for i, ffn in moe.items():
        out.update(moe_weights(f"{TEXT}model.layers.{i}", ffn, cfg.dim))
    return out


def llava_state_dict(model: MLLM, layout: Layout) -> dict[str, Tensor]:
    """Every tensor of the export, keyed as transformers' LLaVA checkpoint expects."""
    return {**vision_weights(model, layout), **projector_weights(model, layout), **text_weights(model, layout)}
