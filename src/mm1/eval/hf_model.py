"""A transformers LLaVA folder behind mm1's model interface, so `mm1 eval --hf PATH` scores a peer's
model (or an mm1 export) with exactly the code that scores mm1's own checkpoints.

The runner (`mm1.eval.runner`), generation and option scoring only touch a model through:
`model.cfg` (image size, mean/std, slots per image, the slot id), `model(input_ids, images,
attention_mask=, cache=, logits_to_keep=).logits`, `model.lm.new_cache(B, max_len)`, `eval()`/
`train()` and `parameters()`. `HFLlava` provides those around `AutoModelForImageTextToText`:

    mm1 ids [B,T] (left padded, <image> already expanded to k slots) + pixels [N,3,S,S]
        --> position ids restart after the padding (as mm1's do), the padding mask is kept in the
            cache and grows by one column per decoded token --> transformers forward --> logits

Prompts are tokenised by mm1's `Tokenizer` from the folder's tokenizer.json and images preprocessed by
mm1 with the folder's size, mean, std and crop/pad choice: the same code for every model compared.
transformers is an optional dependency (`pip install mm1[hf]`), imported only here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor, nn

from mm1.config import ConnectorConfig, LMConfig, ModelConfig, VisionConfig
from mm1.data.tokenizer import Tokenizer


@dataclass
class HFCache:
    """transformers' KV cache plus what mm1's cache tracks itself: every key's padding and the next
    position of each row."""

    past: Any = None
    mask: Tensor | None = None  # [B, S] True = real token, for every key so far
    next_pos: Tensor | None = None  # [B]


class _Caches(nn.Module):
    """What the runner reaches as `model.lm`: it only asks it for a new cache."""

    def new_cache(self, batch_size: int, max_len: int | None = None) -> HFCache:
        return HFCache()


class HFLlava(nn.Module):
    """`forward(input_ids, images, attention_mask, cache, logits_to_keep) -> .logits` on a transformers
    LLaVA-format model; `cfg` describes its image input the way mm1's ModelConfig does."""

    def __init__(self, hf_model: nn.Module, cfg: ModelConfig) -> None:
        super().__init__()
        self.hf = hf_model
        self.cfg = cfg
        self.lm = _Caches()

    def forward(
        self,
        input_ids: Tensor,
        images: Tensor | None = None,
        attention_mask: Tensor | None = None,
        cache: HFCache | None = None,
        logits_to_keep: int = 0,
        **unused: Any,
    ) -> SimpleNamespace:
        if unused.get("targets") is not None:
            raise ValueError("HFLlava scores and generates; it does not compute training losses")
        B, T = input_ids.shape
        step = torch.ones(B, T, dtype=torch.bool, device=input_ids.device)
        if cache is not None and cache.mask is not None:  # decoding: new tokens continue every row
            mask = torch.cat([cache.mask, step], dim=1)  # [B, S+T]
            pos = cache.next_pos[:, None] + torch.arange(T, device=input_ids.device)  # [B, T]
        else:
            mask = attention_mask.bool() if attention_mask is not None else step
            pos = (mask.long().cumsum(-1) - 1).clamp(min=0)  # [B, T]: 0 at each row's first real token
        pixels = None if images is None else images.to(self.hf.dtype)
        out = self.hf(
            input_ids=input_ids,
            pixel_values=pixels,
            attention_mask=mask.long(),
            position_ids=pos,
            past_key_values=None if cache is None else cache.past,
            use_cache=cache is not None,
            logits_to_keep=logits_to_keep,
        )
        if cache is not None:
            cache.past, cache.mask, cache.next_pos = out.past_key_values, mask, pos[:, -1] + 1
        return SimpleNamespace(logits=out.logits)


def _read(folder: Path, name: str) -> dict:
    path = folder / name
    return json.loads(path.read_text()) if path.is_file() else {}


def image_input(folder: Path, config: dict) -> tuple[int, list[float], list[float], str, int]:
    """(image size, mean, std, data.resize, slots per image) from the folder's processor files."""
    pre, proc = _read(folder, "preprocessor_config.json"), _read(folder, "processor_config.json")
    if not pre:
        raise FileNotFoundError(
            f"{folder}: no preprocessor_config.json; mm1 needs it for the image size, mean "
            "and std (save the processor beside the model: processor.save_pretrained)"
        )
    crop, size = pre.get("crop_size") or {}, pre.get("size") or {}
    side = (
        crop.get("height")
        if pre.get("do_center_crop", True) and crop
        else size.get("height", size.get("shortest_edge"))
    )
    if not side or (crop and crop.get("width", side) != side):
        raise ValueError(
            f"{folder}/preprocessor_config.json: mm1 evaluates square inputs; found size={size} crop_size={crop}"
        )
    patch = proc.get("patch_size")
    if patch:
        slots = (side // patch) ** 2 + proc.get("num_additional_image_tokens", 0)
        slots -= proc.get("vision_feature_select_strategy", config.get("vision_feature_select_strategy")) == "default"
    else:
        slots = config.get("image_seq_length", 576)
    return int(side), pre["image_mean"], pre["image_std"], "pad" if pre.get("do_pad") else "crop", int(slots)


def load_hf_llava(path: str | Path, trust_remote_code: bool = False) -> tuple[HFLlava, Tokenizer, str]:
    """(model, tokenizer, data.resize) for a local LLaVA-format folder (config.json, safetensors,
    tokenizer.json, preprocessor_config.json). Remote code runs only when asked for."""
    try:
        from transformers import AutoModelForImageTextToText
    except ImportError:
        raise ImportError("mm1 eval --hf needs transformers: pip install 'mm1[hf]'") from None
    folder = Path(path)
    config = _read(folder, "config.json")
    if not config:
        raise FileNotFoundError(f"{folder}: no config.json; --hf takes a local transformers LLaVA folder")
    if config.get("auto_map") and not trust_remote_code:
        raise ValueError(
            f"{folder} carries its own modeling code (auto_map in config.json); read it, then pass "
            "--trust-remote-code to run it"
        )
    size, mean, std, resize, slots = image_input(folder, config)
    tok = Tokenizer.load(folder)
    slot_id = config.get("image_token_index", config.get("image_token_id"))
    if tok.image_id != slot_id:
        raise ValueError(
            f"{folder}: the tokenizer's <image> id is {tok.image_id} but config.json's "
            f"image_token_index is {slot_id}; mm1 expands the literal <image> into the model's slots"
        )
    hf = AutoModelForImageTextToText.from_pretrained(
        folder, trust_remote_code=trust_remote_code, dtype=torch.float32
    ).eval()
    vision, text = config.get("vision_config", {}), config.get("text_config", {})
    mm1_connector = config.get("mm1_connector")
    connector = ConnectorConfig(**mm1_connector) if mm1_connector else ConnectorConfig(kind="mlp", num_tokens=slots)
    if connector.num_tokens != slots:
        raise ValueError(
            f"{folder}: mm1_connector makes {connector.num_tokens} tokens but the processor "
            f"expands <image> into {slots}"
        )
    cfg = ModelConfig(
        vision=VisionConfig(
            image_size=size,
            patch_size=vision.get("patch_size", size),
            width=vision.get("hidden_size", 1),
            mean=[float(m) for m in mean],
            std=[float(s) for s in std],
        ),
        connector=connector,
        lm=LMConfig(
            vocab_size=text.get("vocab_size", tok.vocab_size),
            dim=text.get("hidden_size", 1),
            max_seq_len=text.get("max_position_embeddings", 2048),
        ),
        image_token_id=slot_id,
    )
    return HFLlava(hf, cfg), tok, resize
