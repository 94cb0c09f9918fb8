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
        return {PROJECTOR + k.replace("readout.0.", "linear_1.").replace("readout.2.", "linear_2."): v
                for k, v in connector.items()}
    out = {f"{PROJECTOR}connector.{k}": v for k, v in connector.items()}
    if layout.feature_norm:
        for k, v in model.vision.post_norm.state_dict().items():
            out[f"{PROJECTOR}post_norm.{k}"] = v.detach().float().contiguous()
    return out


def text_weights(model: MLLM) -> dict[str, Tensor]:
    """The decoder as a Llama / Qwen2 causal LM (`language_model.model.*`, `language_model.lm_head`);
    with tied embeddings there is no head to write (transformers ties it on load)."""
    to_hf = {ours: f"model.layers.{{i}}.{hf}" for hf, ours in LAYER_KEYS.items()}
    top = {ours: hf for hf, ours in TOP_KEYS.items()}
    out: dict[str, Tensor] = {}
    for key, value in model.lm.state_dict().items():
        value = value.detach().float().contiguous()
        if key in top:
            out[TEXT + top[key]] = value
            continue
        _, i, rest = key.split(".", 2)  # layers.{i}.attn.q.weight
        if rest not in to_hf:
            raise KeyError(f"language model parameter {key} has no transformers name; is this a dense Llama LM?")
        out[TEXT + to_hf[rest].format(i=i)] = value
    return out


def llava_state_dict(model: MLLM, layout: Layout) -> dict[str, Tensor]:
    """Every tensor of the export, keyed as transformers' LLaVA checkpoint expects."""
    return {**vision_weights(model, layout), **projector_weights(model, layout), **text_weights(model)}
