"""Load HF CLIP / SigLIP vision towers from a local directory into `mm1.models.vision.ViT`.

MM1 starts from a pre-trained contrastive encoder; most people will start from an open CLIP or SigLIP
checkpoint. Loading is exact (features match transformers' to fp32 round-off) and strict: every key of
the checkpoint is either mapped, or named in `SKIPPED_*` with the reason we do not use it, or reported
in a ValueError — nothing is dropped silently. transformers itself is never imported here.

Semantics that matter:
- CLIP: CLS token, `pre_layrnorm`, quick_gelu (or what `hidden_act` says); its `post_layernorm` only
  normalises the pooled CLS output, so `last_hidden_state` (what LLaVA / MM1 feed on) is un-normed.
- SigLIP: no CLS, no pre-norm, `gelu_pytorch_tanh`; `post_layernorm` IS applied to last_hidden_state.
  The attention-pooling `head` only makes the pooled output.
"""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path

import torch

from mm1.config import CLIP_MEAN, CLIP_STD, VisionConfig
from mm1.models.vision import ViT, resize_position_embeddings

log = logging.getLogger(__name__)

# HF hidden_act -> ours. gelu_new / gelu_fast are tanh approximations too (equal to ~1e-7).
HF_ACTIVATIONS = {
    "quick_gelu": "quick_gelu",
    "gelu": "gelu",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_new": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
}

# Defaults of transformers' configs, for config.json files that omit a field.
_DEFAULTS = {
    "clip": dict(
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        image_size=224,
        patch_size=32,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
    ),
    "siglip": dict(
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        image_size=224,
        patch_size=16,
        hidden_act="gelu_pytorch_tanh",
        layer_norm_eps=1e-6,
    ),
}
_FAMILIES = {"clip": "clip", "clip_vision_model": "clip", "siglip": "siglip", "siglip_vision_model": "siglip"}

# Keys we deliberately do not load, by prefix: outside the vision tower (CLIPModel / SiglipModel) ...
SKIPPED_OUTSIDE_TOWER = {
    "text_model.": "text tower of a CLIPModel / SiglipModel",
    "visual_projection.": "CLIP image projection into the contrastive space (pooled output only)",
    "text_projection.": "CLIP text projection",
    "logit_scale": "contrastive temperature",
    "logit_bias": "SigLIP sigmoid-loss bias",
}
# ... and inside it (relative to the tower's prefix, e.g. `vision_model.`).
SKIPPED_IN_TOWER = {
    "head.": "SigLIP attention-pooling head (pooled output only)",
    "embeddings.position_ids": "index buffer, not a weight",
    "post_layernorm.": "CLIP post_layernorm (pooled CLS output only), or a feature_layer before the last block",
    "encoder.layers.": "blocks after feature_layer (never run, so not built)",
}


def _family(config: dict) -> tuple[str, dict]:
    """('clip' | 'siglip', the vision sub-config) of a config.json dict."""
    model_type = config.get("model_type", "")
    if model_type not in _FAMILIES:
        raise ValueError(
            f"config.json model_type={model_type!r}: mm1 loads CLIP and SigLIP vision towers "
            f"({', '.join(_FAMILIES)}); convert other encoders to one of these layouts"
        )
    family = _FAMILIES[model_type]
    vision = config.get("vision_config", config) if model_type in ("clip", "siglip") else config
    return family, {**_DEFAULTS[family], **(vision or {})}


def vision_config_from_hf(config: dict, preprocessor: dict | None = None, feature_layer: int = -1) -> VisionConfig:
    """A `VisionConfig` equal to the HF vision tower described by `config` (a config.json dict of a
    CLIP/SigLIP vision model or of the full model); mean/std from a preprocessor_config.json dict."""
    family, v = _family(config)
    size, patch = v["image_size"], v["patch_size"]
    if isinstance(size, (list, tuple)):
        if len(set(size)) != 1:
            raise ValueError(f"config.json image_size={size}: only square input sizes are supported")
        size = size[0]
    if isinstance(patch, (list, tuple)):
        patch = patch[0]
    if v.get("num_channels", 3) != 3:
        raise ValueError(f"config.json num_channels={v['num_channels']}: mm1 encodes RGB images (3 channels)")
    act = v["hidden_act"]
    if act not in HF_ACTIVATIONS:
        raise ValueError(f"config.json hidden_act={act!r}: supported are {', '.join(HF_ACTIVATIONS)}")
    clip = family == "clip"
    pre = preprocessor or {}
    mean = pre.get("image_mean", CLIP_MEAN if clip else [0.5, 0.5, 0.5])
    std = pre.get("image_std", CLIP_STD if clip else [0.5, 0.5, 0.5])
    return VisionConfig(
        kind="vit",
        image_size=int(size),
        patch_size=int(patch),
        width=v["hidden_size"],
        depth=v["num_hidden_layers"],
        heads=v["num_attention_heads"],
        mlp_dim=v["intermediate_size"],
        act=HF_ACTIVATIONS[act],
        use_cls=clip,
        pre_norm=clip,
        post_norm=not clip,
        norm_eps=float(v["layer_norm_eps"]),
        feature_layer=feature_layer,
        mean=[float(m) for m in mean],
        std=[float(s) for s in std],
    )


def _skip_reason(key: str, table: dict[str, str]) -> str:
    return next((why for prefix, why in table.items() if key.startswith(prefix)), "?")


def _tower_key(key: str, n_blocks: int, post_norm: bool) -> str | None:
    """Our name for a vision-tower key (prefix stripped), or None when it is skipped on purpose."""
    parts = key.split(".")
    if parts[:2] == ["encoder", "layers"] and len(parts) >= 4 and parts[2].isdigit():
        i = int(parts[2])
        if i >= n_blocks:
            return None
        rest = ".".join(parts[3:])
        names = {
            "layer_norm1": "ln1",
            "layer_norm2": "ln2",
            "self_attn.out_proj": "proj",
            "mlp.fc1": "fc1",
            "mlp.fc2": "fc2",
        }
        for hf, ours in names.items():
            if rest.startswith(hf + "."):
                return f"blocks.{i}.{ours}{rest[len(hf) :]}"
        for proj in ("q_proj", "k_proj", "v_proj"):
            if rest.startswith(f"self_attn.{proj}."):
                return f"blocks.{i}.qkv.{proj[0]}.{parts[-1]}"  # fused below
        return ""  # unknown
    fixed = {
        "embeddings.class_embedding": "cls_token",
        "embeddings.patch_embedding.weight": "patch_embed.weight",
        "embeddings.patch_embedding.bias": "patch_embed.bias",
        "embeddings.position_embedding.weight": "pos_embed",
        "pre_layrnorm.weight": "pre_norm.weight",
        "pre_layrnorm.bias": "pre_norm.bias",
    }
    if key in fixed:
        return fixed[key]
    if key.startswith("post_layernorm."):
        return "post_norm." + key.split(".", 1)[1] if post_norm else None
    return None if key.startswith(("head.", "embeddings.position_ids")) else ""


def hf_name(ours: str, prefix: str) -> str:
    """The checkpoint key(s) one of our parameters is loaded from (error messages; the exporter writes
    them): `{q,k,v}` stands for the three projections our fused `qkv` splits into."""
    fixed = {
        "cls_token": "embeddings.class_embedding",
        "pos_embed": "embeddings.position_embedding.weight",
        "patch_embed.weight": "embeddings.patch_embedding.weight",
        "patch_embed.bias": "embeddings.patch_embedding.bias",
    }
    if ours in fixed:
        return prefix + fixed[ours]
    head, leaf = ours.rsplit(".", 1)
    if head in ("pre_norm", "post_norm"):
        return f"{prefix}{'pre_layrnorm' if head == 'pre_norm' else 'post_layernorm'}.{leaf}"
    _, i, part = head.split(".")
    hf = {
        "ln1": "layer_norm1",
        "ln2": "layer_norm2",
        "proj": "self_attn.out_proj",
        "fc1": "mlp.fc1",
        "fc2": "mlp.fc2",
        "qkv": "self_attn.{q,k,v}_proj",
    }[part]
    return f"{prefix}encoder.layers.{i}.{hf}.{leaf}"


def convert_hf_vision_state_dict(
    hf: dict[str, torch.Tensor], cfg: VisionConfig, where: str = "checkpoint"
) -> dict[str, torch.Tensor]:
    """Map an HF CLIP/SigLIP (vision or full) state dict onto `ViT(cfg)`'s names and shapes.

    Raises ValueError naming every unknown key, missing key and shape mismatch."""
    anchors = [k for k in hf if k.endswith("embeddings.patch_embedding.weight") and "text_model" not in k]
    if len(anchors) != 1:
        raise ValueError(
            f"{where}: expected one vision tower (a key ending in embeddings.patch_embedding.weight), "
            f"found {len(anchors)}; is this a CLIP/SigLIP checkpoint?"
        )
    prefix = anchors[0][: -len("embeddings.patch_embedding.weight")]
    with torch.device("meta"):
        expected = ViT(cfg).state_dict()
    n_blocks, post_norm = len([k for k in expected if k.endswith(".ln1.weight")]), "post_norm.weight" in expected
    out: dict[str, torch.Tensor] = {}
    qkv: dict[str, dict[str, torch.Tensor]] = {}
    unknown: list[str] = []
    skipped: dict[str, int] = {}
    for key, value in hf.items():
        if not key.startswith(prefix):
            why = _skip_reason(key, SKIPPED_OUTSIDE_TOWER)
            if why == "?":
                unknown.append(key)
            skipped[why] = skipped.get(why, 0) + 1
            continue
        ours = _tower_key(key[len(prefix) :], n_blocks, post_norm)
        if ours == "":
            unknown.append(key)
        elif ours is None:
            why = _skip_reason(key[len(prefix) :], SKIPPED_IN_TOWER)
            skipped[why] = skipped.get(why, 0) + 1
        elif ours is not None and ".qkv." in ours:
            base, part, leaf = ours.rsplit(".", 2)
            qkv.setdefault(f"{base}.{leaf}", {})[part] = value
        elif ours is not None:
            out[ours] = value
    for name, parts in qkv.items():
        if set(parts) == {"q", "k", "v"}:  # else reported as missing below
            out[name] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    if "cls_token" in out:
        out["cls_token"] = out["cls_token"].reshape(1, 1, -1)
    if "pos_embed" in out:
        out["pos_embed"] = out["pos_embed"].unsqueeze(0)
    if "patch_embed.bias" not in out and "patch_embed.weight" in out:  # CLIP's patch conv has no bias
        w = out["patch_embed.weight"]
        out["patch_embed.bias"] = torch.zeros(w.shape[0], dtype=w.dtype)
    missing = [f"{k} (HF: {hf_name(k, prefix)})" for k in expected if k not in out]
    extra = [k for k in out if k not in expected]  # e.g. CLS in a config that says SigLIP
    bad = [
        f"{k}: checkpoint {tuple(out[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected
        if k in out and out[k].shape != expected[k].shape
    ]
    problems = [
        f"{what}: {keys}"
        for what, keys in [
            ("unknown keys (not a CLIP/SigLIP vision weight, not in the skip list)", unknown),
            ("missing keys", missing),
            ("keys the config does not use (our names)", extra),
            ("shape mismatches", bad),
        ]
        if keys
    ]
    if problems:
        raise ValueError(
            f"{where}: cannot load into ViT({cfg.width}w x {cfg.depth}, patch {cfg.patch_size}, "
            f"{cfg.image_size}px): " + "; ".join(problems)
        )
    for why, count in skipped.items():
        log.info("%s: not loading %d key(s): %s", where, count, why)
    return {k: v.float() for k, v in out.items()}


def read_hf_weights(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a local HF model dir (single or sharded safetensors, or pytorch_model.bin)."""
    from safetensors.torch import load_file

    if (path / "model.safetensors").is_file():
        return load_file(path / "model.safetensors")
    index = path / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return {k: v for shard in shards for k, v in load_file(path / shard).items()}
    if (path / "pytorch_model.bin").is_file():
        return torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True)
    raise FileNotFoundError(
        f"{path}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin; "
        "point model.vision.hf_path at a local HF CLIP/SigLIP model directory"
    )


def _read_configs(path: Path) -> tuple[dict, dict | None]:
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"{path}: no config.json; expected a local HF CLIP/SigLIP model directory "
            "(save one with `model.save_pretrained(dir)`)"
        )
    pre_file = path / "preprocessor_config.json"
    pre = json.loads(pre_file.read_text()) if pre_file.is_file() else None
    return json.loads((path / "config.json").read_text()), pre


ARCH_FIELDS = (
    "patch_size",
    "width",
    "depth",
    "heads",
    "mlp_dim",
    "act",
    "use_cls",
    "pre_norm",
    "post_norm",
    "norm_eps",
)


def load_hf_vision_into(vit: ViT, path: str | Path) -> ViT:
    """Fill an existing `ViT` (built from the run's config, possibly on the meta device) with the HF
    tower in `path`. The architecture fields must match the checkpoint (the error lists the overrides
    that make them match); a different `image_size` resizes the position embeddings at load time."""
    path = Path(path)
    config, pre = _read_configs(path)
    hf_cfg = vision_config_from_hf(config, pre, vit.cfg.feature_layer)
    wrong = [
        f"model.vision.{f}={getattr(hf_cfg, f)!r}"
        for f in ARCH_FIELDS
        if (
            abs(getattr(vit.cfg, f) - getattr(hf_cfg, f)) > 1e-12
            if f == "norm_eps"
            else getattr(vit.cfg, f) != getattr(hf_cfg, f)
        )
    ]
    if wrong:
        raise ValueError(
            f"{path}: the checkpoint's vision tower differs from model.vision; set {' '.join(wrong)} "
            "(or build the config with mm1.models.hf_vision.vision_config_from_hf)"
        )
    state = convert_hf_vision_state_dict(read_hf_weights(path), hf_cfg, where=str(path))
    if vit.cfg.image_size != hf_cfg.image_size:
        state = resize_position_embeddings(state, vit.cfg.image_size)
    if (list(vit.cfg.mean), list(vit.cfg.std)) != (hf_cfg.mean, hf_cfg.std):
        log.warning(
            "%s: model.vision.mean/std %s/%s differ from the checkpoint's preprocessing %s/%s; images "
            "will be normalised with the config's values",
            path,
            vit.cfg.mean,
            vit.cfg.std,
            hf_cfg.mean,
            hf_cfg.std,
        )
    on_meta = any(p.is_meta for p in vit.parameters())
    vit.load_state_dict(state, strict=True, assign=on_meta)  # assign: materialise a meta-built tower
    return vit


def load_hf_vision(path: str | Path, feature_layer: int = -1, image_size: int | None = None) -> ViT:
    """A `ViT` with the weights of the HF CLIP/SigLIP vision tower in `path` (local dir, no downloads),
    its config (incl. mean/std from preprocessor_config.json) taken from the checkpoint.

    `image_size` other than the checkpoint's resizes the position embeddings once at load time (the
    returned model's `cfg.image_size` says which); `feature_layer` picks the hidden state to return."""
    path = Path(path)
    cfg = vision_config_from_hf(*_read_configs(path), feature_layer)
    cfg = replace(cfg, image_size=image_size or cfg.image_size, hf_path=str(path))
    with torch.device("meta"):
        vit = ViT(cfg)
    return load_hf_vision_into(vit, path)
