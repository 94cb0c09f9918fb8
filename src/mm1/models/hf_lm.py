"""Load Hugging Face Llama / Qwen2 causal LMs (SmolLM, TinyLlama, Qwen2/2.5 ...) from a local dir.

Reads `config.json` and `model.safetensors` (or the shards listed in `model.safetensors.index.json`)
without importing transformers. Keys are renamed to ours (see `mm1.models.lm`); RoPE needs no
permutation because our rotation uses the same rotate_half convention. Every key must be accounted
for: an unknown key or a missing parameter is a ValueError that names it, never a silent skip.
Loading into an MoE model upcycles: each MoE layer's experts all start from the dense FFN (MM1),
and only the routers keep their fresh initialisation.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from torch import Tensor

from mm1.config import LMConfig
from mm1.models.lm import LanguageModel, is_moe_layer

SUPPORTED = ("llama", "qwen2")

# HF name (within model.layers.{i}.) -> ours (within layers.{i}.); the exporter reads it backwards
LAYER_KEYS = {
    "self_attn.q_proj.weight": "attn.q.weight",
    "self_attn.q_proj.bias": "attn.q.bias",
    "self_attn.k_proj.weight": "attn.k.weight",
    "self_attn.k_proj.bias": "attn.k.bias",
    "self_attn.v_proj.weight": "attn.v.weight",
    "self_attn.v_proj.bias": "attn.v.bias",
    "self_attn.o_proj.weight": "attn.o.weight",
    "mlp.gate_proj.weight": "ffn.gate.weight",
    "mlp.up_proj.weight": "ffn.up.weight",
    "mlp.down_proj.weight": "ffn.down.weight",
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
}
TOP_KEYS = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
}
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_BUFFERS_RE = re.compile(r"\.rotary_emb\.inv_freq$")  # a non-parameter some old checkpoints saved


def _unsupported(where: str, what: str) -> ValueError:
    return ValueError(f"{where}: {what} is not supported by mm1's Llama-style decoder")


def lm_config_from_hf(hf: dict, where: str = "config.json") -> LMConfig:
    """Translate a HF LlamaConfig / Qwen2Config dict into an LMConfig (refusing features we lack)."""
    model_type = hf.get("model_type", "")
    if model_type not in SUPPORTED:
        raise _unsupported(where, f"model_type={model_type!r} (supported: {', '.join(SUPPORTED)})")
    if hf.get("hidden_act", "silu") != "silu":
        raise _unsupported(where, f"hidden_act={hf['hidden_act']!r} (SwiGLU needs silu)")
    rope = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if rope_type not in ("default", "llama3"):
        raise _unsupported(where, f"RoPE scaling {rope_type!r} (supported: llama3)")
    scale = {**scaling, **rope} if rope_type == "llama3" else {}
    if hf.get("attention_bias") and model_type == "llama":
        raise _unsupported(where, "attention_bias=true (a bias on the output projection)")
    if hf.get("mlp_bias"):
        raise _unsupported(where, "mlp_bias=true")
    if hf.get("use_sliding_window"):
        raise _unsupported(where, "use_sliding_window=true")
    dim, heads = hf["hidden_size"], hf["num_attention_heads"]
    if hf.get("head_dim") not in (None, dim // heads):
        raise _unsupported(where, f"head_dim={hf['head_dim']} != hidden_size / num_attention_heads = {dim // heads}")
    return LMConfig(
        kind="llama",
        vocab_size=hf["vocab_size"],
        dim=dim,
        n_layers=hf["num_hidden_layers"],
        n_heads=heads,
        n_kv_heads=hf.get("num_key_value_heads") or heads,
        ffn_dim=hf["intermediate_size"],
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
        max_seq_len=hf.get("max_position_embeddings", 2048),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qkv_bias=model_type == "qwen2",
        rope_original_max_len=int(scale.get("original_max_position_embeddings", 0)),
        rope_factor=float(scale.get("factor", 8.0)),
        rope_low_freq_factor=float(scale.get("low_freq_factor", 1.0)),
        rope_high_freq_factor=float(scale.get("high_freq_factor", 4.0)),
    )


def read_hf_config(path: str | Path) -> dict:
    file = Path(path) / "config.json"
    if not file.is_file():
        raise FileNotFoundError(
            f"{file} not found: model.lm.hf_path must be a local HF model dir "
            "(config.json + model.safetensors), e.g. from `huggingface-cli download`"
        )
    return json.loads(file.read_text())


def read_hf_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Every tensor of a single-file or sharded safetensors checkpoint."""
    from safetensors.torch import load_file

    path = Path(path)
    single, index = path / "model.safetensors", path / "model.safetensors.index.json"
    if single.is_file():
        return load_file(str(single))
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        sd: dict[str, Tensor] = {}
        for shard in shards:
            if not (path / shard).is_file():
                raise FileNotFoundError(f"{path / shard} is listed in {index} but missing; re-download the model")
            sd.update(load_file(str(path / shard)))
        return sd
    raise FileNotFoundError(
        f"{path}: no model.safetensors or model.safetensors.index.json; mm1 reads safetensors "
        "only (convert a pytorch_model.bin with transformers' save_pretrained)"
    )


def convert_hf_lm_state_dict(sd: dict[str, Tensor], cfg: LMConfig) -> dict[str, Tensor]:
    """HF Llama/Qwen2 keys -> ours. MoE layers get the dense FFN copied into every expert (their
    routers are not in a dense checkpoint). Raises ValueError naming any key it cannot place."""
    out: dict[str, Tensor] = {}
    unknown: list[str] = []
    for key, value in sd.items():
        if _BUFFERS_RE.search(key):
            continue
        if key in TOP_KEYS:
            if key == "lm_head.weight" and cfg.tie_embeddings:
                continue  # tied: the output projection is the embedding matrix
            out[TOP_KEYS[key]] = value
            continue
        m = _LAYER_RE.match(key)
        if m is None or m.group(2) not in LAYER_KEYS or int(m.group(1)) >= cfg.n_layers:
            unknown.append(key)
            continue
        i, ours = int(m.group(1)), LAYER_KEYS[m.group(2)]
        if ours.startswith("ffn.") and is_moe_layer(cfg, i):
            name = ours.split(".")[1]  # gate | up | down
            out[f"layers.{i}.ffn.experts.{name}"] = value.unsqueeze(0).expand(cfg.n_experts, *value.shape).clone()
        else:
            out[f"layers.{i}.{ours}"] = value
    if unknown:
        raise ValueError(
            f"HF checkpoint has {len(unknown)} key(s) with no place in mm1's LanguageModel: "
            f"{', '.join(sorted(unknown)[:10])}{' ...' if len(unknown) > 10 else ''}; "
            "is this a Llama / Qwen2 causal LM with the same number of layers?"
        )
    return out


def _check_compatible(model_cfg: LMConfig, hf_cfg: LMConfig, path: Path) -> None:
    if model_cfg.vocab_size < hf_cfg.vocab_size:
        raise ValueError(
            f"{path}/config.json has vocab_size={hf_cfg.vocab_size} but model.lm.vocab_size="
            f"{model_cfg.vocab_size}; set model.lm.vocab_size >= {hf_cfg.vocab_size} (larger adds rows "
            "for added tokens)"
        )
    fields = (
        "rope_original_max_len",
        "rope_factor",
        "rope_low_freq_factor",
        "rope_high_freq_factor",
        "dim",
        "n_layers",
        "n_heads",
        "kv_heads",
        "ffn_dim",
        "tie_embeddings",
        "qkv_bias",
        "rope_theta",
        "norm_eps",
    )
    diff = [
        (f, getattr(model_cfg, f), getattr(hf_cfg, f)) for f in fields if getattr(model_cfg, f) != getattr(hf_cfg, f)
    ]
    if diff:
        lines = ", ".join(
            f"model.lm.{'n_kv_heads' if f == 'kv_heads' else f}={theirs!r} (config has {ours!r})"
            for f, ours, theirs in diff
        )
        raise ValueError(f"{path}/config.json does not match the LM config; set {lines}")


def load_state_dict_strict(lm: LanguageModel, ours: dict[str, Tensor], where: str, assign: bool = False) -> None:
    """Load with every missing / unexpected / mis-shaped key named. Missing MoE routers are allowed
    (upcycling from a dense checkpoint keeps their initialisation)."""
    expected = lm.state_dict()
    missing = [k for k in expected if k not in ours and not k.endswith(".ffn.router.weight")]
    unexpected = [k for k in ours if k not in expected]
    shapes = [
        f"{k} {tuple(ours[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in ours and ours[k].shape != v.shape
    ]
    if missing or unexpected or shapes:
        parts = [
            f"missing: {', '.join(missing)}" if missing else "",
            f"unexpected: {', '.join(unexpected)}" if unexpected else "",
            f"shape mismatch (checkpoint vs model): {'; '.join(shapes)}" if shapes else "",
        ]
        raise ValueError(f"{where}: weights do not fit the language model; " + "; ".join(p for p in parts if p))
    lm.load_state_dict(ours, strict=False, assign=assign)


def grow_vocab(ours: dict[str, Tensor], vocab_size: int) -> dict[str, Tensor]:
    """Rows for tokens the checkpoint lacks (`<image>`, chat markers added by the tokenizer): each new
    embedding / LM-head row is the mean of the old ones, so a new token starts as an average token
    and the logits of the original vocabulary are unchanged (new columns are only appended)."""
    out = dict(ours)
    for key in ("tok_embeddings.weight", "output.weight"):
        w = out.get(key)
        if w is not None and w.shape[0] < vocab_size:
            mean = w.float().mean(0, keepdim=True).to(w.dtype)
            out[key] = torch.cat([w, mean.expand(vocab_size - w.shape[0], -1)])
    return out


def load_hf_lm_into(lm: LanguageModel, path: str | Path) -> None:
    """Load a local HF checkpoint into an existing LanguageModel (dense or MoE -> upcycled); a larger
    `model.lm.vocab_size` than the checkpoint's gets mean-initialised rows (`grow_vocab`)."""
    path = Path(path)
    hf_cfg = lm_config_from_hf(read_hf_config(path), str(path / "config.json"))
    _check_compatible(lm.cfg, hf_cfg, path)
    ours = grow_vocab(convert_hf_lm_state_dict(read_hf_state_dict(path), lm.cfg), lm.cfg.vocab_size)
    load_state_dict_strict(lm, ours, str(path))


def load_hf_lm(
    path: str | Path, device: str | torch.device | None = None, dtype: torch.dtype = torch.float32
) -> LanguageModel:
    """A LanguageModel built from a local HF dir's config.json with its weights, in `dtype`."""
    path = Path(path)
    cfg = lm_config_from_hf(read_hf_config(path), str(path / "config.json"))
    with torch.device("meta"):
        lm = LanguageModel(cfg)  # no random init cost: every tensor is replaced below
    ours = convert_hf_lm_state_dict(read_hf_state_dict(path), cfg)
    ours = {k: v.to(device=device, dtype=dtype) for k, v in ours.items()}
    load_state_dict_strict(lm, ours, str(path), assign=True)
    return lm
