"""Batched decoding for interleaved image-text prompts: greedy (or sampled), KV cache, left padding.

Prompts of different lengths are left-padded so that every row's last prompt token sits in the
last column: the next-token logits of the whole batch are then `logits[:, -1]`, and each decoding
step appends one column. The padding is marked in `attention_mask` (False), which the language
model turns into document id -1: padded keys are never attended to and positions restart at 0 where
each prompt really begins, so a batched row computes what it would compute alone (tested).
Tokens that cannot be generated (image slots, padding, BOS, chat start) are masked out of the
logits; a row stops at EOS, at a stop string, or after `max_new_tokens`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Union

import torch
from PIL import Image

from mm1.config import ModelConfig
from mm1.data.images import image_tensors, mean_color, normalize, preprocess, subimages
from mm1.data.tokenizer import Tokenizer
from mm1.models.decode_layout import prepare_decode_layout

ImageSource = Union[Image.Image, str, Path, bytes]
PromptLike = Union[str, list]  # text with <image> markers, or a conversation [{"role", "content"}, ...]


@dataclass
class GenerationConfig:
    max_new_tokens: int = 20
    stop: list[str] = field(default_factory=lambda: ["\n"])  # the text is cut at the first of these
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0  # 0 = no top-k filter
    top_p: float = 1.0
    seed: int = 0  # sampling RNG
    use_cache: bool = True  # False recomputes the whole sequence each step (the reference path)
    add_bos: bool = False
    stop_ids: list[int] = field(default_factory=list)  # token ids that end a row besides EOS (e.g. <|im_end|>)
    batch_size: int = 16
    resize: str = "crop"  # image preprocessing, as in training (data.resize)
    # On CPU, store the LM's weights [in, out], which decodes small batches faster or as fast
    # (`mm1.models.decode_layout`: values unchanged, products bit-identical); False keeps [out, in].
    cpu_decode_layout: bool = True


def cut_at_stops(text: str, stops: Sequence[str]) -> str:
    """Post-processing: the text before the earliest stop string (all of it when none occurs)."""
    ends = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return text[: min(ends)] if ends else text


def image_batch(cfg: ModelConfig, images: Sequence[ImageSource], resize: str = "crop") -> torch.Tensor:
    """Every image of one prompt -> [N, 3, S, S] (N = images x crops at high resolution)."""
    v, out = cfg.vision, []
    for n, src in enumerate(images):
        if isinstance(src, Image.Image):
            img = src.convert("RGB")
            if cfg.subimage_grid:
                crops = subimages(img, cfg.subimage_grid, v.image_size, cfg.overview_first, resize, mean_color(v.mean))
                out.append(torch.stack([normalize(c, v.mean, v.std) for c in crops]))
            else:
                out.append(preprocess(img, v.image_size, v.mean, v.std, resize).unsqueeze(0))
        else:
            where = str(src) if not isinstance(src, bytes) else f"image {n}"
            out.append(
                image_tensors(src, where, v.image_size, v.mean, v.std, resize, cfg.subimage_grid, cfg.overview_first)
            )
    if not out:
        return torch.zeros(0, 3, v.image_size, v.image_size)
    return torch.cat(out)


def encode_prompt(tokenizer: Tokenizer, prompt: PromptLike, tokens_per_image: int, add_bos: bool = False) -> list[int]:
    """Ids of a text prompt, or of a conversation in the chat template with an open assistant turn."""
    if isinstance(prompt, str):
        return tokenizer.encode(prompt, tokens_per_image, bos=add_bos)
    ids, _ = tokenizer.chat(prompt, tokens_per_image, add_generation_prompt=True)
    bos = add_bos and ids[:1] != [tokenizer.bos_id]  # a tokenizer's own template may put BOS first itself
    return ([tokenizer.bos_id] if bos else []) + ids


def image_markers(prompt: PromptLike) -> int:
    if isinstance(prompt, str):
        return prompt.count("<image>")
    return sum(str(t.get("content", t.get("value", ""))).count("<image>") for t in prompt)


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, T] ids with padding on the left, and the mask (True = real token)."""
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.bool)
    for i, r in enumerate(rows):
        if r:
            ids[i, T - len(r) :] = torch.tensor(r, dtype=torch.long)
            mask[i, T - len(r) :] = True
    return ids, mask


def banned_ids(tokenizer: Tokenizer) -> list[int]:
    ids = [tokenizer.image_id, tokenizer.pad_id, tokenizer.bos_id, tokenizer.im_start_id]
    return sorted({int(i) for i in ids if i is not None and i >= 0})


def _pick(logits: torch.Tensor, gcfg: GenerationConfig, gen: torch.Generator | None) -> torch.Tensor:
    """[B, V] -> [B] next tokens."""
    if not gcfg.do_sample:
        return logits.argmax(-1)
    logits = logits.float() / max(gcfg.temperature, 1e-6)
    if gcfg.top_k > 0:
        kth = logits.topk(min(gcfg.top_k, logits.shape[-1]), dim=-1).values[:, -1:]  # [B, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if gcfg.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > gcfg.top_p  # keep the smallest prefix reaching top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return torch.multinomial(logits.softmax(-1), 1, generator=gen).squeeze(-1)


@torch.inference_mode()
def generate_ids(
    model,
    tokenizer: Tokenizer,
    prompts: list[PromptLike],
    images: list[Sequence[ImageSource]],
    gcfg: GenerationConfig,
    scores: list[torch.Tensor] | None = None,
) -> list[list[int]]:
    """Generated token ids per prompt (one batch; EOS and what follows are dropped). With a
    `scores` list, each step's next-token logits [B, V] are appended to it (for inspection).

    The loop stays on tensors: a row's output is always a prefix of the tokens picked for it (it
    runs until it picks an ending token), so only a [B] count of emitted tokens is kept per step,
    and the host reads tokens back per step only when there are stop strings to look for."""
    cfg: ModelConfig = model.cfg
    device = next(model.parameters()).device
    rows = [encode_prompt(tokenizer, p, cfg.tokens_per_image, gcfg.add_bos) for p in prompts]
    ids, mask = left_pad(rows, tokenizer.pad_id)
    ids, mask = ids.to(device), mask.to(device)  # [B, T]
    pixels = torch.cat([image_batch(cfg, imgs, gcfg.resize) for imgs in images]).to(device)  # [N, 3, S, S]
    pixels = pixels if pixels.shape[0] else None
    B, ban = ids.shape[0], torch.tensor(banned_ids(tokenizer), dtype=torch.long, device=device)
    enders = torch.tensor(sorted({tokenizer.eos_id, *gcfg.stop_ids}), dtype=torch.long, device=device)
    stops = [s for s in gcfg.stop if s]
    gen = torch.Generator(device=device).manual_seed(gcfg.seed) if gcfg.do_sample else None
    cache = model.lm.new_cache(B, ids.shape[1] + gcfg.max_new_tokens) if gcfg.use_cache else None
    if cache is not None and gcfg.cpu_decode_layout and device.type == "cpu" and not model.training:
        prepare_decode_layout(model.lm, B)
    picked: list[torch.Tensor] = []  # [B] per step
    emitted = torch.zeros(B, dtype=torch.long, device=device)  # tokens kept per row so far
    running = torch.ones(B, dtype=torch.bool, device=device)
    texts: list[list[int]] = [[] for _ in range(B)]  # host copies, only kept for the stop-string check
    step_ids = ids
    for step in range(gcfg.max_new_tokens):
        if cache is not None:
            logits = model(
                step_ids,
                pixels if step == 0 else None,
                attention_mask=mask if step == 0 else None,
                cache=cache,
                logits_to_keep=1,
            ).logits[:, -1]  # [B, V]
        else:
            logits = model(ids, pixels, attention_mask=mask, logits_to_keep=1).logits[:, -1]  # [B, V]
        if scores is not None:
            scores.append(logits.float().cpu().clone())
        logits.index_fill_(1, ban, float("-inf"))
        nxt = _pick(logits, gcfg, gen).masked_fill(~running, tokenizer.eos_id)  # [B]; finished rows feed EOS
        running &= ~torch.isin(nxt, enders)  # an ending token is not part of the output
        emitted += running
        picked.append(nxt)
        if stops:
            for i, tok in enumerate(nxt.tolist()):
                texts[i].append(tok)
            for i in running.nonzero().flatten().tolist():
                if any(s in tokenizer.decode(texts[i]) for s in stops):
                    running[i] = False  # the token that completed the stop string is kept
        if not bool(running.any()):
            break
        step_ids = nxt[:, None]  # [B, 1]
        if cache is None:
            ids = torch.cat([ids, step_ids], dim=1)
            mask = torch.cat([mask, torch.ones_like(step_ids, dtype=torch.bool)], dim=1)
    if not picked:
        return [[] for _ in range(B)]
    tokens = torch.stack(picked, dim=1).tolist()  # [B, steps]
    return [row[:n] for row, n in zip(tokens, emitted.tolist())]


def batch_order(prompts: Sequence[PromptLike]) -> list[int]:
    """The order `generate` processes prompts in (by length, so a batch pads little); its batches are
    consecutive runs of `batch_size` in this order (`mm1.eval.parallel` splits ranks along them)."""
    return sorted(range(len(prompts)), key=lambda i: (len(str(prompts[i])), i))


def generate(
    model,
    tokenizer: Tokenizer,
    prompts: list[PromptLike],
    images: list[Sequence[ImageSource]] | None = None,
    gcfg: GenerationConfig | None = None,
    **overrides,
) -> list[str]:
    """Continuations of `prompts` (texts with `<image>` markers; `images[i]` fills prompt i's
    markers in order; a prompt may also be a conversation, see `encode_prompt`), cut at the first
    stop string. Prompts are grouped by length into batches of
    `batch_size`; the result keeps the input order. Keyword overrides patch `gcfg`."""
    gcfg = gcfg or GenerationConfig()
    for k, v in overrides.items():
        if not hasattr(gcfg, k):
            raise TypeError(f"generate: unknown option {k!r}")
        setattr(gcfg, k, v)
    images = images if images is not None else [[] for _ in prompts]
    if len(images) != len(prompts):
        raise ValueError(f"generate: {len(prompts)} prompts but {len(images)} image lists")
    for i, (p, imgs) in enumerate(zip(prompts, images)):
        if image_markers(p) != len(imgs):
            raise ValueError(f"generate: prompt {i} has {image_markers(p)} <image> markers but {len(imgs)} images")
    was_training = model.training
    model.eval()
    order = batch_order(prompts)
    texts: list[str] = [""] * len(prompts)
    try:
        for start in range(0, len(order), max(1, gcfg.batch_size)):
            chunk = order[start : start + gcfg.batch_size]
            ids = generate_ids(model, tokenizer, [prompts[i] for i in chunk], [images[i] for i in chunk], gcfg)
            for i, row in zip(chunk, ids):
                texts[i] = cut_at_stops(tokenizer.decode(row), gcfg.stop)
    finally:
        model.train(was_training)
    return texts
