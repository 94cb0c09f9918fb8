"""The one home of the attention mask for packed, padded and cached sequences.

A packed row holds several documents; a token may only see earlier tokens *of its own document*
(block-diagonal causal mask), never padding. Everything that attends in the language model goes
through `build_mask` + `attend`, so the rule lives here once:

    allowed(q, k) = (k <= q  and  doc[k] == doc[q]  and  doc[k] >= 0)  or  k == q

where `doc` is the per-key document id (-1 = padding, left padding included) and q is the query's
absolute index among the keys (with a KV cache the queries are the last q_len of kv_len keys).
The `k == q` term lets a padding query attend to itself, so no softmax row is empty (no NaNs).

Two implementations of the same rule:
- a dense boolean mask for `F.scaled_dot_product_attention` (any device, any step of decoding);
- a FlexAttention `BlockMask` (the fast path on CUDA: fully masked 128x128 blocks are skipped, so
  packed documents cost what their own lengths cost). On CPU FlexAttention runs eagerly (forward
  only); on CUDA it is compiled once per shape. Measured on one H200 (torch 2.11, bf16, forward +
  backward of one attention, B=4, T=4096, 16 heads / 4 kv heads of 128, 8 documents per row):
  flex 1.7 ms, SDPA with the dense mask 6.7 ms, SDPA is_causal on the same unpacked rows 2.2 ms.
When there are no documents and no padding, SDPA's own `is_causal=True` path is used (no mask).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from mm1.registry import one_of

BACKENDS = ("auto", "sdpa", "flex")


def merge_doc_ids(doc_ids: Tensor | None, attention_mask: Tensor | None) -> Tensor | None:
    """One [B,T] long tensor of document ids with -1 where `doc_ids` or the left-padding mask say
    padding; None when neither is given (one causal document per row)."""
    if doc_ids is None and attention_mask is None:
        return None
    if doc_ids is None:
        return torch.where(attention_mask.bool(), 0, -1).long()  # [B, T]
    doc_ids = doc_ids.long()
    if attention_mask is not None:
        doc_ids = torch.where(attention_mask.bool(), doc_ids, -1)
    return doc_ids


def positions_from_docs(doc: Tensor) -> Tensor:
    """Position ids that restart at 0 at every document start (each run of equal ids): [B,T] -> [B,T].
    Padding gets the positions of its own run, which nothing ever sees."""
    B, T = doc.shape
    idx = torch.arange(T, device=doc.device).expand(B, T)  # [B, T]
    starts = torch.ones_like(doc, dtype=torch.bool)
    starts[:, 1:] = doc[:, 1:] != doc[:, :-1]
    run_start = torch.where(starts, idx, 0).cummax(dim=1).values  # [B, T] index where each run began
    return idx - run_start


def dense_mask(kv_doc: Tensor, q_len: int) -> Tensor:
    """Boolean SDPA mask [B,1,q_len,kv_len] (True = may attend) for queries that are the last
    `q_len` of the `kv_len` keys whose document ids are `kv_doc` [B,kv_len]."""
    B, S = kv_doc.shape
    k_idx = torch.arange(S, device=kv_doc.device)  # [S]
    q_idx = k_idx[S - q_len :]  # [Q] absolute index of each query
    q_doc = kv_doc[:, S - q_len :]  # [B, Q]
    causal = k_idx[None, :] <= q_idx[:, None]  # [Q, S]
    same = (q_doc[:, :, None] == kv_doc[:, None, :]) & (kv_doc[:, None, :] >= 0)  # [B, Q, S]
    diagonal = k_idx[None, :] == q_idx[:, None]  # [Q, S]
    return ((causal[None] & same) | diagonal[None])[:, None]  # [B, 1, Q, S]


def doc_mask_mod(kv_doc: Tensor, q_len: int) -> Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]:
    """The same rule as `dense_mask`, as a FlexAttention mask_mod(b, h, q_idx, kv_idx)."""
    offset = kv_doc.shape[1] - q_len

    def mask_mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        q_abs = q_idx + offset
        k_doc = kv_doc[b, kv_idx]
        same = (kv_doc[b, q_abs] == k_doc) & (k_doc >= 0)
        return ((kv_idx <= q_abs) & same) | (kv_idx == q_abs)

    return mask_mod


_compiled_block_mask: Callable[..., Any] | bool | None = None  # False: compiling failed once


def flex_block_mask(kv_doc: Tensor, q_len: int) -> Any:
    """A FlexAttention BlockMask for the document rule (heads broadcast). On CUDA the mask is built
    by a compiled create_block_mask (H200, T=4096, B=4: about 0.2 ms instead of 5.5 ms eager)."""
    global _compiled_block_mask
    from torch.nn.attention.flex_attention import create_block_mask

    B, S = kv_doc.shape
    args = (doc_mask_mod(kv_doc, q_len), B, None, q_len, S)
    if kv_doc.device.type == "cuda" and _compiled_block_mask is not False:
        if _compiled_block_mask is None:
            _compiled_block_mask = torch.compile(create_block_mask)
        try:
            return _compiled_block_mask(*args, device=kv_doc.device)
        except Exception as e:  # noqa: BLE001  (the eager build below is the same mask)
            warnings.warn(
                f"compiled create_block_mask failed ({type(e).__name__}); building masks eagerly", stacklevel=2
            )
            _compiled_block_mask = False
    return create_block_mask(*args, device=kv_doc.device)


@dataclass
class AttentionMask:
    """What one forward pass attends with, built once and shared by every layer.

    kind: "causal" (SDPA is_causal fast path, q_len == kv_len), "none" (attend to every key: one
    decoded token without padding), "dense" (`mask` is the boolean [B,1,Q,S] tensor) or "flex"
    (`mask` is a BlockMask)."""

    kind: str
    mask: Any = None
    kv_doc: Tensor | None = None  # flex: kept so a shape the compiler rejects can fall back to SDPA
    q_len: int = 0


def choose_backend(backend: str, device: torch.device, packed: bool, cached: bool, training: bool = True) -> str:
    """ "auto" takes FlexAttention on CUDA for packed training passes (fixed shapes, gradients, no
    cache) and SDPA elsewhere: the compiled kernel is specialised to one shape, while inference
    shapes (decoding, prompts of every length) change from call to call."""
    one_of("model.lm.attention", backend, BACKENDS)
    if backend == "auto":
        return "flex" if device.type == "cuda" and packed and not cached and training else "sdpa"
    return backend


def build_mask(
    kv_doc: Tensor | None,
    q_len: int,
    kv_len: int,
    backend: str = "auto",
    device: torch.device | None = None,
    cached: bool = False,
) -> AttentionMask:
    """The mask for queries that are the last `q_len` of `kv_len` keys.

    kv_doc: [B,kv_len] document ids of every key (-1 = padding), or None for one causal document
    per row."""
    device = device if device is not None else (kv_doc.device if kv_doc is not None else torch.device("cpu"))
    packed = kv_doc is not None and bool((kv_doc != kv_doc[:, :1]).any() or (kv_doc < 0).any())
    chosen = choose_backend(backend, device, packed, cached, training=torch.is_grad_enabled())
    if not packed and chosen == "sdpa":
        if q_len == kv_len:
            return AttentionMask("causal")
        if q_len == 1:
            return AttentionMask("none")
    if kv_doc is None:
        kv_doc = torch.zeros(1, kv_len, dtype=torch.long, device=device)
    if chosen == "flex":
        return AttentionMask("flex", flex_block_mask(kv_doc, q_len), kv_doc, q_len)
    return AttentionMask("dense", dense_mask(kv_doc, q_len))


_compiled_flex: Callable[..., Tensor] | None = None
_flex_rejected: set[tuple] = set()  # shapes the compiler failed on (seen: torch 2.11, fp32, T=100)


def _use_compiled(q: Tensor) -> bool:
    return q.device.type == "cuda"


def _flex(q: Tensor, k: Tensor, v: Tensor, mask: AttentionMask) -> Tensor:
    """flex_attention, compiled on CUDA (the fused kernel) and eager elsewhere. The eager CPU kernel
    has no backward, so a CPU pass that needs gradients uses the dense SDPA mask (the same rule,
    exact), as does a shape the compiler rejects (with a warning, once per shape)."""
    global _compiled_flex
    from torch.nn.attention.flex_attention import flex_attention

    gqa = q.shape[1] != k.shape[1]

    def dense() -> AttentionMask:  # built only when needed: it is what flex avoids materialising
        return AttentionMask("dense", dense_mask(mask.kv_doc, mask.q_len))

    if not _use_compiled(q):
        if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
            return attend(q, k, v, dense())
        with warnings.catch_warnings():  # "called without torch.compile": expected off CUDA
            warnings.filterwarnings("ignore", message=".*without torch.compile.*")
            return flex_attention(q, k, v, block_mask=mask.mask, enable_gqa=gqa)
    key = (tuple(q.shape), tuple(k.shape), q.dtype)
    if key not in _flex_rejected:
        if _compiled_flex is None:  # one static kernel per shape: training shapes are fixed
            _compiled_flex = torch.compile(flex_attention, dynamic=False)
        try:
            return _compiled_flex(q, k, v, block_mask=mask.mask, enable_gqa=gqa)
        except Exception as e:  # noqa: BLE001  (inductor raises several types; the fallback is exact)
            _flex_rejected.add(key)
            warnings.warn(
                f"FlexAttention did not compile for q {tuple(q.shape)}, k {tuple(k.shape)}, {q.dtype} "
                f"({type(e).__name__}); using SDPA with the dense document mask for this shape",
                stacklevel=3,
            )
    return attend(q, k, v, dense())


CPU_FLASH_MIN_KEYS = 192  # CPU attention that needs a backward: math below this many keys, flash from it


def sdpa(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
    """`F.scaled_dot_product_attention` with the CPU kernel chosen per call by what it costs.

    On CPU the fused flash kernel's forward is 3-6 x faster than the math backend's, but its backward
    is slow on short sequences: a ViT's 64 tokens (50 images, bf16, 1 thread) 38.7 ms against math's
    8.2, while at the LM's 512-token rows flash's forward + backward (32 ms) beats math's (71 ms); the
    two cross near 192 keys (benchmarks/RESULTS.md). So a CPU call whose inputs need gradients takes
    math below CPU_FLASH_MIN_KEYS keys and flash from there; every other call (inference, a frozen
    ViT's forward, CUDA) keeps torch's own choice. The rule depends only on the call's tensors, so
    activation checkpointing's recomputation picks the same kernel as the forward it replays."""
    needs_backward = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    ctx: contextlib.AbstractContextManager = contextlib.nullcontext()
    if q.device.type == "cpu" and needs_backward and k.shape[-2] < CPU_FLASH_MIN_KEYS:
        ctx = sdpa_kernel([SDPBackend.MATH])
    with ctx:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)


def attend(q: Tensor, k: Tensor, v: Tensor, mask: AttentionMask) -> Tensor:
    """Scaled dot-product attention. q [B,H,Q,hd], k/v [B,H_kv,S,hd] (H a multiple of H_kv: GQA)
    -> [B,H,Q,hd]."""
    if mask.kind == "flex":
        return _flex(q, k, v, mask)
    B, H, Q, hd = q.shape
    H_kv = k.shape[1]
    if H != H_kv and Q == 1 and mask.kind != "causal":
        # One decoded token with GQA: fold each kv head's query heads into its query rows, so the
        # cached keys/values are read in place instead of copied rep times per layer per step.
        # The [B,1,1,S] mask broadcasts over the folded rows as it is (expanding it costs a third of
        # the call on CPU).
        rep = H // H_kv
        attn_mask = None if mask.kind == "none" else mask.mask
        y = F.scaled_dot_product_attention(q.reshape(B, H_kv, rep, hd), k, v, attn_mask=attn_mask)
        return y.reshape(B, H, 1, hd)  # row r of kv head g is query head g*rep + r
    if H != H_kv:  # repeat kv heads: works on every SDPA backend and torch version
        rep = H // H_kv
        k = k.repeat_interleave(rep, dim=1)  # [B, H, S, hd]
        v = v.repeat_interleave(rep, dim=1)
    if mask.kind == "causal":
        return sdpa(q, k, v, is_causal=True)
    return sdpa(q, k, v, attn_mask=None if mask.kind == "none" else mask.mask)


class KVCache:
    """Keys/values of every layer for incremental decoding, plus each key's document id.

    Buffers [B, H_kv, capacity, hd] per layer are allocated on first use in the keys' own device and
    dtype (so autocast and bf16 work unchanged) and grow when a step would overflow them. `doc`
    [B, capacity] remembers which keys are padding (-1, e.g. left padding of a batched prompt), so
    later steps never attend to them. `next_pos` [B] is the position the next token of each row gets.
    """

    def __init__(self, n_layers: int, batch_size: int, capacity: int) -> None:
        self.batch_size, self.capacity = batch_size, max(1, capacity)
        self.keys: list[Tensor | None] = [None] * n_layers
        self.values: list[Tensor | None] = [None] * n_layers
        self.doc: Tensor | None = None
        self.next_pos: Tensor | None = None
        self.length = 0  # keys stored so far (padding included)
        # [B, capacity] keys a token continuing each row's last document may see; None = not built
        self.visible: Tensor | None = None
        self.all_visible = False
        self.rope: tuple[Tensor, Tensor] | None = None  # the model's RoPE tables of positions [0, capacity)
        self.explicit_positions = False  # a step passed its own position ids: they may exceed the capacity

    def _grow(self, needed: int) -> None:
        new_cap = max(2 * self.capacity, needed)

        def widen(buf: Tensor, dim: int, fill: float) -> Tensor:
            shape = list(buf.shape)
            shape[dim] = new_cap - self.capacity
            return torch.cat([buf, buf.new_full(shape, fill)], dim=dim)

        self.doc = widen(self.doc, 1, -1) if self.doc is not None else None
        self.visible = widen(self.visible, 1, False) if self.visible is not None else None
        self.rope = None
        self.keys = [widen(b, 2, 0.0) if b is not None else None for b in self.keys]
        self.values = [widen(b, 2, 0.0) if b is not None else None for b in self.values]
        self.capacity = new_cap

    def append_docs(self, doc: Tensor | None, batch_size: int, T: int, device: torch.device) -> Tensor:
        """Record the new tokens' document ids ([B,T], or None = the row's current document) and
        return the ids of every key so far [B, length+T]."""
        if batch_size != self.batch_size:
            raise ValueError(f"KVCache was made for batch size {self.batch_size}, got a step of {batch_size} rows")
        if self.doc is None:
            self.doc = torch.full((batch_size, self.capacity), -1, dtype=torch.long, device=device)
        if self.length + T > self.capacity:
            self._grow(self.length + T)
        if doc is None:
            current = self.doc[:, self.length - 1].clamp(min=0) if self.length else self.doc.new_zeros(batch_size)
            doc = current[:, None].expand(batch_size, T)
            if self.visible is not None:  # the new keys belong to the document they continue
                self.visible[:, self.length : self.length + T] = True
        else:
            self.visible = None
        self.doc[:, self.length : self.length + T] = doc
        return self.doc[:, : self.length + T]

    def continuation_mask(self) -> AttentionMask:
        """The mask of one new token that continues its row's last document (a decoding step, after
        `append_docs(None, ...)`): the `dense_mask` rule then reduces to "keys of that document",
        which only grows by the new key each step. So it is built once per prompt and extended in
        place, and is no mask at all when every key is visible (no padding, one document)."""
        end = self.length + 1
        if self.visible is None:
            self.visible = self.doc == self.doc[:, end - 1 : end]  # [B, capacity]; that document is >= 0
            self.all_visible = bool(self.visible[:, :end].all())
        if self.all_visible:
            return AttentionMask("none")
        return AttentionMask("dense", self.visible[:, None, None, :end])  # [B, 1, 1, S]

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store this step's k, v [B,H_kv,T,hd] for `layer`; return all keys/values [B,H_kv,S,hd]."""
        B, H, T, hd = k.shape
        if self.keys[layer] is None:
            self.keys[layer] = k.new_zeros(B, H, self.capacity, hd)
            self.values[layer] = v.new_zeros(B, H, self.capacity, hd)
        end = self.length + T
        self.keys[layer][:, :, self.length : end] = k
        self.values[layer][:, :, self.length : end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def advance(self, T: int, next_pos: Tensor, explicit_positions: bool = False) -> None:
        """Called once per forward, after every layer stored its keys."""
        self.length += T
        self.next_pos = next_pos
        self.explicit_positions |= explicit_positions
