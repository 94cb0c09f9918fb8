"""The language model: a Llama-style decoder (RMSNorm, RoPE, GQA, SwiGLU), optionally MoE.

Parameter layout (names used by checkpoints and the HF converter in `mm1.models.hf_lm`):

    tok_embeddings.weight                          [V, D]
    layers.{i}.attn_norm.weight                    [D]
    layers.{i}.attn.{q,k,v}.weight (+ .bias)       [H*hd | H_kv*hd, D]   (bias: Qwen2)
    layers.{i}.attn.o.weight                       [D, H*hd]
    layers.{i}.ffn_norm.weight                     [D]
    layers.{i}.ffn.{gate,up,down}.weight           dense SwiGLU
    layers.{i}.ffn.router.weight, ffn.experts.*    MoE layers ((i+1) % moe_every == 0)
    norm.weight, output.weight                     (output absent when embeddings are tied)

RoPE follows the HF Llama convention (rotate_half over two halves of each head), so HF weights load
without permuting q/k. Positions come per token: packed documents restart at 0. Every attention
call goes through `mm1.models.attention`, which owns the document/padding/causal mask.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from mm1.config import LMConfig
from mm1.models.attention import (
    BACKENDS,
    AttentionMask,
    KVCache,
    attend,
    build_mask,
    choose_backend,
    merge_doc_ids,
    positions_from_docs,
)
from mm1.models.decode_layout import restore_standard_layout
from mm1.models.moe import MoEFeedForward
from mm1.models.registry import LANGUAGE_MODELS
from mm1.registry import check, one_of

__all__ = ["KVCache", "LMOutput", "LanguageModel", "RMSNorm", "rope_cos_sin"]


@dataclass
class LMOutput:
    logits: Tensor | None  # [B, T, V]; None when forward(..., logits=False)
    aux_loss: Tensor  # scalar: weighted MoE losses summed over layers (0 for a dense model)
    moe_stats: dict[str, Tensor] = field(default_factory=dict)  # detached; empty for a dense model
    hidden: Tensor | None = None  # [B, T, D] final-norm states, set when forward(..., logits=False)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            # One fused kernel (forward and backward), bit-identical to the lines below in fp32.
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)  # normalise in fp32 (as HF)
        return self.weight * h.to(x.dtype)


def llama3_inv_freq(inv_freq: Tensor, factor: float, low: float, high: float, old_len: int) -> Tensor:
    """Llama-3.1's RoPE scaling: wavelengths longer than old_len/low are stretched by `factor`, those
    shorter than old_len/high kept, and the band between interpolated smoothly."""
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    mixed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(medium, mixed, scaled)


def rope_cos_sin(
    position_ids: Tensor, head_dim: int, theta: float, dtype: torch.dtype, cfg: LMConfig | None = None
) -> tuple[Tensor, Tensor]:
    """cos, sin [B,T,hd] for per-token positions [B,T]. Computed on the fly (no buffers), so the
    model builds on the meta device and positions may restart anywhere. `cfg.rope_original_max_len`
    > 0 applies Llama-3's frequency scaling."""
    exponent = torch.arange(0, head_dim, 2, device=position_ids.device, dtype=torch.float32) / head_dim
    inv_freq = 1.0 / (theta**exponent)  # [hd/2]
    if cfg is not None and cfg.rope_original_max_len > 0:
        inv_freq = llama3_inv_freq(
            inv_freq, cfg.rope_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor, cfg.rope_original_max_len
        )
    freqs = position_ids.float()[..., None] * inv_freq  # [B, T, hd/2]
    emb = torch.cat([freqs, freqs], dim=-1)  # [B, T, hd]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rope_tables(cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """[B,T,hd] cos, sin -> [B,1,T,hd] cos and sign-folded sin for `apply_rope`, made once per
    forward and shared by every layer: rotate_half(x) * sin == roll(x, hd/2) * cat(-sin1, sin2)."""
    s1, s2 = sin.chunk(2, dim=-1)
    return cos[:, None], torch.cat([-s1, s2], dim=-1)[:, None]


def apply_rope(x: Tensor, cos: Tensor, signed_sin: Tensor) -> Tensor:
    """x [B,H,T,hd] with tables from `rope_tables`; the rotate_half convention (first half paired
    with the second), bit-identical to x*cos + cat(-x2, x1)*sin in four ops instead of six."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * signed_sin


class Attention(nn.Module):
    def __init__(self, cfg: LMConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv, self.hd = cfg.n_heads, cfg.kv_heads, cfg.dim // cfg.n_heads
        self.q = nn.Linear(cfg.dim, self.n_heads * self.hd, bias=cfg.qkv_bias)
        self.k = nn.Linear(cfg.dim, self.n_kv * self.hd, bias=cfg.qkv_bias)
        self.v = nn.Linear(cfg.dim, self.n_kv * self.hd, bias=cfg.qkv_bias)
        self.o = nn.Linear(self.n_heads * self.hd, cfg.dim, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: AttentionMask, cache: KVCache | None) -> Tensor:
        B, T, _ = x.shape
        q = self.q(x).view(B, T, self.n_heads, self.hd).transpose(1, 2)  # [B, H, T, hd]
        k = self.k(x).view(B, T, self.n_kv, self.hd).transpose(1, 2)  # [B, H_kv, T, hd]
        v = self.v(x).view(B, T, self.n_kv, self.hd).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)  # [B, H_kv, S, hd]: every key so far
        y = attend(q, k, v, mask)  # [B, H, T, hd]
        return self.o(y.transpose(1, 2).reshape(B, T, self.n_heads * self.hd))


class FeedForward(nn.Module):
    """SwiGLU: down(silu(gate x) * up x)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.gate = nn.Linear(dim, hidden, bias=False)
        self.up = nn.Linear(dim, hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


def is_moe_layer(cfg: LMConfig, i: int) -> bool:
    return cfg.n_experts > 0 and (i + 1) % cfg.moe_every == 0


class Block(nn.Module):
    def __init__(self, cfg: LMConfig, layer_idx: int) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = Attention(cfg, layer_idx)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.is_moe = is_moe_layer(cfg, layer_idx)
        self.ffn: nn.Module = (
            MoEFeedForward(cfg.dim, cfg.ffn_dim, cfg.n_experts, cfg.moe_top_k, cfg.moe_lb_coef, cfg.moe_z_coef)
            if self.is_moe
            else FeedForward(cfg.dim, cfg.ffn_dim)
        )

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, mask: AttentionMask, cache: KVCache | None, valid: Tensor | None
    ) -> tuple[Tensor, Tensor | None, dict[str, Tensor]]:
        x = x + self.attn(self.attn_norm(x), cos, sin, mask, cache)
        if self.is_moe:
            y, aux, stats = self.ffn(self.ffn_norm(x), valid)
            return x + y, aux, stats
        return x + self.ffn(self.ffn_norm(x)), None, {}


def check_llama(lm: LMConfig) -> None:
    """The decoder's rules on its config (run at config load)."""
    check(lm.dim % lm.n_heads == 0, "model.lm.n_heads", lm.n_heads, f"must divide model.lm.dim={lm.dim}")
    check((lm.dim // lm.n_heads) % 2 == 0, "model.lm.n_heads", lm.n_heads, "head dim must be even for RoPE")
    check(
        lm.n_heads % lm.kv_heads == 0,
        "model.lm.n_kv_heads",
        lm.n_kv_heads,
        f"must divide model.lm.n_heads={lm.n_heads}",
    )
    if lm.n_experts:
        check(
            1 <= lm.moe_top_k <= lm.n_experts,
            "model.lm.moe_top_k",
            lm.moe_top_k,
            f"must be between 1 and model.lm.n_experts={lm.n_experts}",
        )
        check(lm.moe_every >= 1, "model.lm.moe_every", lm.moe_every, "must be >= 1")
    one_of("model.lm.attention", lm.attention, BACKENDS)


@LANGUAGE_MODELS.register("llama", validate=lambda cfg: check_llama(cfg.model.lm))
class LanguageModel(nn.Module):
    """Decoder-only LM over input embeddings (the MLLM splices image features into them)."""

    def __init__(self, cfg: LMConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.head_dim = cfg.dim // cfg.n_heads
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = None if cfg.tie_embeddings else nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Llama init: N(0, 0.02) everywhere, residual projections (attn.o, ffn.down) scaled by
        1/sqrt(2 * n_layers) so the residual stream's variance does not grow with depth."""
        std, out_std = 0.02, 0.02 / math.sqrt(2 * self.cfg.n_layers)
        nn.init.normal_(self.tok_embeddings.weight, std=std)
        for block in self.layers:
            for lin in (block.attn.q, block.attn.k, block.attn.v):
                nn.init.normal_(lin.weight, std=std)
                if lin.bias is not None:
                    nn.init.zeros_(lin.bias)
            nn.init.normal_(block.attn.o.weight, std=out_std)
            if block.is_moe:
                block.ffn.reset_parameters(std, out_std)
            else:
                nn.init.normal_(block.ffn.gate.weight, std=std)
                nn.init.normal_(block.ffn.up.weight, std=std)
                nn.init.normal_(block.ffn.down.weight, std=out_std)
            nn.init.ones_(block.attn_norm.weight)
            nn.init.ones_(block.ffn_norm.weight)
        nn.init.ones_(self.norm.weight)
        if self.output is not None:
            nn.init.normal_(self.output.weight, std=std)

    def train(self, mode: bool = True) -> LanguageModel:
        """Training mode also puts every weight back in the standard [out, in] storage, in case
        decoding re-stored some (`mm1.models.decode_layout`): optimisers and distributed wrappers
        expect it."""
        if mode:
            restore_standard_layout(self)
        return super().train(mode)

    def new_cache(self, batch_size: int, max_len: int | None = None) -> KVCache:
        """An empty KV cache for this model (buffers are allocated on the first step, in the
        device/dtype of the keys; they grow if `max_len` is exceeded)."""
        return KVCache(self.cfg.n_layers, batch_size, max_len or self.cfg.max_seq_len)

    def forward(
        self,
        inputs_embeds: Tensor,
        position_ids: Tensor | None = None,
        doc_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        cache: KVCache | None = None,
        logits: bool = True,
    ) -> LMOutput:
        """inputs_embeds [B,T,D]; position_ids [B,T] (default: restart at each document / after left
        padding, continuing the cache); doc_ids [B,T] (-1 = padding); attention_mask [B,T] bool
        (False = left padding); cache: KVCache to read and extend (incremental decoding).
        logits=False returns the final hidden states instead, for a caller that applies `head` to
        only the positions it needs (the training loss: positions with a target)."""
        x = inputs_embeds
        B, T, _ = x.shape
        doc = merge_doc_ids(doc_ids, attention_mask)  # [B, T] or None
        start = cache.length if cache is not None else 0
        # one token continuing each row's document (a decoding step): the cache keeps its mask
        continuing = (
            cache is not None
            and doc is None
            and T == 1
            and choose_backend(self.cfg.attention, x.device, packed=True, cached=True, training=torch.is_grad_enabled())
            == "sdpa"
        )
        if cache is not None:
            doc = cache.append_docs(doc, B, T, x.device)  # [B, start+T]: every key's document
        explicit_positions = position_ids is not None
        if position_ids is None:
            position_ids = self.default_positions(doc, cache, B, T, x.device)
        if continuing:
            mask = cache.continuation_mask()
        else:
            mask = build_mask(doc, T, start + T, self.cfg.attention, x.device, cached=cache is not None)
        valid = None if doc is None else doc[:, start:] >= 0  # [B, T] tokens that count for MoE stats
        cos, sin = self.rope(position_ids, x.dtype, None if explicit_positions else cache)

        aux_total = x.new_zeros((), dtype=torch.float32)
        moe_layers: list[dict[str, Tensor]] = []
        use_ckpt = self.cfg.activation_checkpointing and self.training and cache is None and torch.is_grad_enabled()
        for block in self.layers:
            if use_ckpt:
                x, aux, stats = checkpoint(block, x, cos, sin, mask, cache, valid, use_reentrant=False)
            else:
                x, aux, stats = block(x, cos, sin, mask, cache, valid)
            if aux is not None:
                aux_total = aux_total + aux
                moe_layers.append(stats)
        if cache is not None:
            cache.advance(T, position_ids[:, -1] + 1, explicit_positions)
        x = self.norm(x)
        if not logits:
            return LMOutput(None, aux_total, summarise_moe(moe_layers), hidden=x)
        return LMOutput(self.head(x), aux_total, summarise_moe(moe_layers))

    def rope(self, position_ids: Tensor, dtype: torch.dtype, cache: KVCache | None = None) -> tuple[Tensor, Tensor]:
        """[B,1,T,hd] cos and signed sin (`rope_tables`) of positions [B,T]. With a cache that has only
        seen default positions (each below its capacity), they are gathered from tables of every
        position the cache can hold, built once per generation instead of once per decoding step
        (the same values: the tables are elementwise in the position)."""
        if cache is None or cache.explicit_positions:
            return rope_tables(*rope_cos_sin(position_ids, self.head_dim, self.cfg.rope_theta, dtype, self.cfg))
        if cache.rope is None or cache.rope[0].dtype != dtype or cache.rope[0].device != position_ids.device:
            every = torch.arange(cache.capacity, device=position_ids.device)[None]  # [1, C]
            cos, sin = rope_tables(
                *rope_cos_sin(every, self.head_dim, self.cfg.rope_theta, dtype, self.cfg)
            )  # [1,1,C,hd]
            cache.rope = (cos[0, 0], sin[0, 0])  # [C, hd]
        cos, sin = cache.rope
        return cos[position_ids][:, None], sin[position_ids][:, None]  # [B, 1, T, hd]

    def head(self, x: Tensor) -> Tensor:
        """Final-norm hidden states [..., D] -> logits [..., V] (through the embedding matrix when tied)."""
        return self.output(x) if self.output is not None else F.linear(x, self.tok_embeddings.weight)

    def forward_ids(self, input_ids: Tensor, **kwargs) -> LMOutput:
        """Text-only convenience: embed token ids [B,T] and run `forward`."""
        return self.forward(self.tok_embeddings(input_ids), **kwargs)

    @staticmethod
    def default_positions(doc: Tensor | None, cache: KVCache | None, B: int, T: int, device: torch.device) -> Tensor:
        """Positions when the caller gives none: a cached step continues each row from the last
        position it saw; otherwise positions restart at every document (and after left padding)."""
        if cache is not None and cache.length > 0:
            return cache.next_pos[:, None] + torch.arange(T, device=device)  # [B, T]
        if doc is None:
            return torch.arange(T, device=device).expand(B, T)
        return positions_from_docs(doc[:, -T:])


def summarise_moe(layers: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """Per-layer router stats -> what the trainer logs: mean losses, per-layer expert fractions, and
    the imbalance max_i f_i * E (1 = perfectly balanced, E = collapsed onto one expert)."""
    if not layers:
        return {}
    fraction = torch.stack([s["expert_fraction"] for s in layers])  # [L_moe, E]
    return {
        "lb_loss": torch.stack([s["lb_loss"] for s in layers]).mean(),
        "z_loss": torch.stack([s["z_loss"] for s in layers]).mean(),
        "expert_fraction": fraction,
        "imbalance": (fraction.max(dim=-1).values * fraction.shape[-1]).mean(),
    }
