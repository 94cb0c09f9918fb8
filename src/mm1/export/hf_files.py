"""The JSON and tokenizer files of an exported folder, each saying what mm1 does in transformers' terms.

- config.json: a `LlavaConfig` (vision tower + text model + how many slots an image takes).
- tokenizer.json / tokenizer_config.json / chat_template.jinja: mm1's tokenizer as is, its special
  tokens named, and the chat template it trained with: the tokenizer's own, or mm1's
  (`<|im_start|>role\\ncontent<|im_end|>\\n`) in Jinja.
- preprocessor_config.json / processor_config.json: mm1's image preprocessing (resize the shorter side
  bicubic + centre crop, or pad to square with the mean colour; normalise with the encoder's mean/std),
  and a `LlavaProcessor` that expands `<image>` into exactly the slots the model fills.
- generation_config.json: the tokens mm1's generation never emits are suppressed and `<|im_end|>` ends
  a reply too, so `model.generate` decodes what `mm1 generate` decodes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mm1.config import Config
from mm1.data.tokenizer import IM_END, IM_START, IMAGE_TOKEN, Tokenizer
from mm1.eval.generate import banned_ids
from mm1.export.hf_layout import Layout
from mm1.export.hf_weights import SHARED_EXPERT_WIDTH
from mm1.models.vision import ACTIVATIONS

# mm1 activation -> transformers' ACT2FN name (the same function)
HF_ACT = {"gelu": "gelu", "quick_gelu": "quick_gelu", "gelu_tanh": "gelu_pytorch_tanh"}
assert set(HF_ACT) == set(ACTIVATIONS)

# Content may be a string with <image> markers (mm1's SFT format) or a list of typed parts (the HF
# chat format); an image part becomes "<image>\n", as in mm1's SFT data ("<image>\nWhat is ...").
# An assistant reply starts after a space unless it has one (`mm1.data.tokenizer.reply_text`).
CHAT_TEMPLATE = (
    "{% if add_bos %}{{ bos_token }}{% endif %}"
    "{% for message in messages %}" + IM_START + "{{ message['role'] }}\n"
    "{% if message['content'] is string %}{% set parts = [{'type': 'text', 'text': message['content']}] %}"
    "{% else %}{% set parts = message['content'] %}{% endif %}"
    "{% for part in parts %}"
    "{% if part['type'] == 'image' %}" + IMAGE_TOKEN + "\n"
    "{% elif part['type'] == 'text' %}"
    "{% if loop.first and message['role'] == 'assistant' and part['text'][:1] not in ' \\t\\n\\r' %}"
    "{{ ' ' }}{% endif %}"
    "{{ part['text'] }}{% endif %}"
    "{% endfor %}" + IM_END + "\n{% endfor %}"
    "{% if add_generation_prompt %}" + IM_START + "assistant\n{% endif %}"
)


def vision_config(cfg: Config, layout: Layout) -> dict[str, Any]:
    v = cfg.model.vision
    out = {
        "model_type": f"{layout.tower}_vision_model",
        "hidden_size": v.width,
        "intermediate_size": v.mlp_dim,
        "num_hidden_layers": layout.blocks,
        "num_attention_heads": v.heads,
        "image_size": v.image_size,
        "patch_size": v.patch_size,
        "hidden_act": HF_ACT[v.act],
        "layer_norm_eps": v.norm_eps,
        "num_channels": 3,
    }
    if layout.tower == "siglip":
        out["vision_use_head"] = False  # the attention-pooling head makes a pooled output LLaVA never reads
    return out


def text_config(cfg: Config, tok: Tokenizer, layout: Layout) -> dict[str, Any]:
    lm = cfg.model.lm
    out = {
        "model_type": layout.text,
        "vocab_size": lm.vocab_size,
        "hidden_size": lm.dim,
        "intermediate_size": lm.ffn_dim,
        "num_hidden_layers": lm.n_layers,
        "num_attention_heads": lm.n_heads,
        "num_key_value_heads": lm.kv_heads,
        "head_dim": lm.dim // lm.n_heads,
        "hidden_act": "silu",
        "rms_norm_eps": lm.norm_eps,
        "max_position_embeddings": lm.max_seq_len,
        "rope_theta": lm.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": lm.rope_theta},
        "tie_word_embeddings": lm.tie_embeddings,
        "bos_token_id": tok.bos_id,
        "eos_token_id": tok.eos_id,
        "pad_token_id": tok.pad_id,
    }
    if layout.text == "llama":
        out.update(attention_bias=False, mlp_bias=False)
    else:
        out.update(use_sliding_window=False)
    if layout.text == "qwen2_moe":  # see mm1.export.hf_layout: the same sparse layers, router and experts
        out.update(
            decoder_sparse_step=lm.moe_every,
            num_experts=lm.n_experts,
            num_experts_per_tok=lm.moe_top_k,
            moe_intermediate_size=lm.ffn_dim,
            norm_topk_prob=True,
            mlp_only_layers=[],
            qkv_bias=True,
            shared_expert_intermediate_size=SHARED_EXPERT_WIDTH,
            router_aux_loss_coef=lm.moe_lb_coef,
        )
    return out


def llava_config(cfg: Config, tok: Tokenizer, layout: Layout, remote: dict[str, Any] | None = None) -> dict[str, Any]:
    """config.json. `remote` (the modeling file's extra fields and auto_map) turns it into mm1's subclass."""
    out = {
        "architectures": ["LlavaForConditionalGeneration"],
        "model_type": "llava",
        "vision_config": vision_config(cfg, layout),
        "text_config": text_config(cfg, tok, layout),
        "image_token_index": cfg.model.image_token_id,
        "image_seq_length": cfg.model.tokens_per_image,
        "projector_hidden_act": "gelu",
        "multimodal_projector_bias": True,
        "vision_feature_layer": -1,
        "vision_feature_select_strategy": layout.select_strategy,
        "tie_word_embeddings": cfg.model.lm.tie_embeddings,
        "torch_dtype": "float32",
    }
    return {**out, **(remote or {})}


def processor_configs(cfg: Config, layout: Layout) -> tuple[dict[str, Any], dict[str, Any]]:
    """(preprocessor_config.json, processor_config.json). LlavaProcessor makes
    (size/patch)^2 + num_additional_image_tokens - (1 if "default") slots per image; a plain export uses
    the tower's true patch grid, a pooling connector one "patch" the size of the image plus k - 1."""
    v = cfg.model.vision
    crop = cfg.data.resize == "crop"
    pre = {
        "image_processor_type": "CLIPImageProcessor" if crop else "LlavaImageProcessor",
        "do_convert_rgb": True,
        "do_resize": True,
        "size": {"shortest_edge": v.image_size},
        "resample": 3,
        "do_center_crop": True,
        "crop_size": {"height": v.image_size, "width": v.image_size},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(v.mean),
        "image_std": list(v.std),
    }
    if not crop:
        pre["do_pad"] = True  # pad to square with the mean colour first, as data.resize=pad
    if layout.plain:
        patch, extra = v.patch_size, 1 if layout.tower == "clip" else 0
    else:
        drops_cls = layout.select_strategy == "default"
        patch, extra = v.image_size, cfg.model.tokens_per_image - 1 + drops_cls
    proc = {
        "processor_class": "LlavaProcessor",
        "image_token": IMAGE_TOKEN,
        "patch_size": patch,
        "num_additional_image_tokens": extra,
        "vision_feature_select_strategy": layout.select_strategy,
    }
    return pre, proc


def tokenizer_config(cfg: Config, tok: Tokenizer) -> dict[str, Any]:
    name = tok.id_to_token
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": name(tok.bos_id),
        "eos_token": name(tok.eos_id),
        "pad_token": name(tok.pad_id),
        "model_max_length": cfg.model.lm.max_seq_len,
        "padding_side": "left",
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "extra_special_tokens": {"image_token": IMAGE_TOKEN},
        "image_token": IMAGE_TOKEN,
        "chat_template": chat_template(cfg, tok),
    }


def chat_template(cfg: Config, tok: Tokenizer) -> str:
    """The template the model was fine-tuned with: the tokenizer's own when it has one (an HF LLM's,
    which expects string content with `<image>` markers), else mm1's, with BOS first only for models
    evaluated with one (eval.add_bos)."""
    if tok.template is not None:
        return tok.template.source
    return CHAT_TEMPLATE.replace(
        "{% if add_bos %}{{ bos_token }}{% endif %}", "{{ bos_token }}" if cfg.eval.add_bos else ""
    )


def generation_config(tok: Tokenizer) -> dict[str, Any]:
    return {
        "bos_token_id": tok.bos_id,
        "eos_token_id": [tok.eos_id, tok.im_end_id],
        "pad_token_id": tok.pad_id,
        "suppress_tokens": banned_ids(tok),
        "do_sample": False,
    }


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def write_text_files(out: Path, cfg: Config, tok: Tokenizer, layout: Layout, remote: dict[str, Any] | None) -> None:
    """Every file of the folder except the weights and the modeling file."""
    write_json(out / "config.json", llava_config(cfg, tok, layout, remote))
    tok.save(out)  # tokenizer.json exactly as trained
    write_json(out / "tokenizer_config.json", tokenizer_config(cfg, tok))
    (out / "chat_template.jinja").write_text(chat_template(cfg, tok), encoding="utf-8")
    pre, proc = processor_configs(cfg, layout)
    write_json(out / "preprocessor_config.json", pre)
    write_json(out / "processor_config.json", proc)
    write_json(out / "generation_config.json", generation_config(tok))
