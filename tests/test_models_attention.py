"""The document / padding / causal mask, and FlexAttention agreeing with the dense SDPA mask."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mm1.models.attention import (
    KVCache,
    attend,
    build_mask,
    choose_backend,
    dense_mask,
    merge_doc_ids,
    positions_from_docs,
)

DOCS = torch.tensor(
    [
        [0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, -1, -1],  # three packed documents, right padding
        [-1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],  # left padding, one document
    ]
)


def _qkv(B=2, H=4, H_kv=2, T=15, hd=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(B, H, T, hd, generator=g),
        torch.randn(B, H_kv, T, hd, generator=g),
        torch.randn(B, H_kv, T, hd, generator=g),
    )


def test_mask_is_block_diagonal_causal_and_skips_padding_keys():
    m = dense_mask(DOCS, DOCS.shape[1])[:, 0]  # [B, Q, S]
    for b in range(2):
        for q in range(15):
            for k in range(15):
                dq, dk = int(DOCS[b, q]), int(DOCS[b, k])
                expected = (k <= q and dq == dk and dk >= 0) or k == q
                assert bool(m[b, q, k]) == expected, (b, q, k)


def test_no_query_row_is_fully_masked_so_padding_gives_no_nan():
    q, k, v = _qkv()
    out = attend(q, k, v, build_mask(DOCS, 15, 15, "sdpa"))
    assert dense_mask(DOCS, 15).any(dim=-1).all()
    assert torch.isfinite(out).all()


def test_queries_of_a_cache_step_are_the_last_keys():
    full = dense_mask(DOCS, 15)  # [B, 1, 15, 15]
    tail = dense_mask(DOCS, 4)  # queries 11..14
    assert torch.equal(tail, full[:, :, -4:])


@pytest.mark.parametrize("q_len", [15, 5, 1])
@pytest.mark.parametrize("h_kv", [4, 2])
def test_flex_attention_matches_dense_sdpa_mask_within_1e5(q_len, h_kv):
    q, k, v = _qkv(H_kv=h_kv)
    q = q[:, :, -q_len:]
    dense = attend(q, k, v, build_mask(DOCS, q_len, 15, "sdpa"))
    flex_mask = build_mask(DOCS, q_len, 15, "flex")
    assert flex_mask.kind == "flex"
    flex = attend(q, k, v, flex_mask)
    torch.testing.assert_close(flex, dense, atol=1e-5, rtol=0)


def test_flex_attention_matches_for_sequences_longer_than_one_block():
    T = 300  # > the 128-token block size: full, partial and empty blocks all occur
    doc = torch.tensor([[0] * 100 + [1] * 150 + [2] * 40 + [-1] * 10])
    q, k, v = _qkv(B=1, H=2, H_kv=1, T=T, hd=8)
    dense = attend(q, k, v, build_mask(doc, T, T, "sdpa"))
    flex = attend(q, k, v, build_mask(doc, T, T, "flex"))
    torch.testing.assert_close(flex, dense, atol=1e-5, rtol=0)


def test_unpacked_sequences_take_the_is_causal_fast_path_with_the_same_result():
    q, k, v = _qkv()
    one_doc = torch.zeros(2, 15, dtype=torch.long)
    fast = build_mask(one_doc, 15, 15, "sdpa")
    assert fast.kind == "causal"
    explicit = F.scaled_dot_product_attention(
        q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), attn_mask=dense_mask(one_doc, 15)
    )
    torch.testing.assert_close(attend(q, k, v, fast), explicit, atol=1e-6, rtol=0)
    assert build_mask(None, 1, 15, "sdpa").kind == "none"  # one decoded token sees every key


def test_auto_backend_uses_flex_only_on_cuda_for_packed_training_passes():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert choose_backend("auto", cpu, packed=True, cached=False) == "sdpa"
    assert choose_backend("auto", cuda, packed=True, cached=False) == "flex"
    assert choose_backend("auto", cuda, packed=False, cached=False) == "sdpa"
    assert choose_backend("auto", cuda, packed=True, cached=True) == "sdpa"
    assert choose_backend("auto", cuda, packed=True, cached=False, training=False) == "sdpa"
    assert choose_backend("flex", cpu, packed=False, cached=True) == "flex"  # an explicit choice is kept
    with pytest.raises(ValueError, match="model.lm.attention"):
        choose_backend("xformers", cpu, True, False)


def test_positions_restart_at_every_document_and_after_left_padding():
    pos = positions_from_docs(DOCS)
    assert pos[0].tolist()[:13] == [0, 1, 2, 0, 1, 2, 3, 0, 1, 2, 3, 4, 5]
    assert pos[1].tolist()[4:] == list(range(11))


def test_attention_mask_marks_left_padding_as_no_document():
    attn = torch.tensor([[False, True, True], [True, True, True]])
    assert merge_doc_ids(None, attn).tolist() == [[-1, 0, 0], [0, 0, 0]]
    assert merge_doc_ids(torch.tensor([[0, 0, 1], [0, 1, 1]]), attn).tolist() == [[-1, 0, 1], [0, 1, 1]]
    assert merge_doc_ids(None, None) is None


def test_kv_cache_grows_past_its_capacity_and_keeps_earlier_keys():
    cache = KVCache(n_layers=1, batch_size=1, capacity=2)
    ks = [torch.randn(1, 2, 3, 4) for _ in range(3)]
    for step, k in enumerate(ks):
        cache.append_docs(None, 1, 3, torch.device("cpu"))
        k_all, v_all = cache.update(0, k, -k)
        cache.advance(3, torch.tensor([3 * (step + 1)]))
        assert torch.equal(k_all, torch.cat(ks[: step + 1], dim=2))
    assert cache.capacity >= 9 and cache.length == 9


def test_flex_on_cpu_with_gradients_uses_the_exact_dense_rule():
    q, k, v = (t.requires_grad_() for t in _qkv())
    out = attend(q, k, v, build_mask(DOCS, 15, 15, "flex"))  # eager CPU flex has no backward
    out.sum().backward()
    ref = attend(q.detach(), k.detach(), v.detach(), build_mask(DOCS, 15, 15, "sdpa"))
    torch.testing.assert_close(out.detach(), ref, atol=1e-6, rtol=0)
    assert q.grad is not None and torch.isfinite(q.grad).all()


def test_a_shape_the_flex_compiler_rejects_falls_back_to_sdpa_with_a_warning(monkeypatch):
    import mm1.models.attention as A

    def broken(*args, **kwargs):
        raise RuntimeError("NoValidChoicesError")

    monkeypatch.setattr(A, "_use_compiled", lambda q: True)
    monkeypatch.setattr(A, "_compiled_flex", broken)
    monkeypatch.setattr(A, "_flex_rejected", set())
    q, k, v = _qkv()
    with pytest.warns(UserWarning, match="did not compile"):
        out = attend(q, k, v, build_mask(DOCS, 15, 15, "flex"))
    torch.testing.assert_close(out, attend(q, k, v, build_mask(DOCS, 15, 15, "sdpa")), atol=1e-6, rtol=0)
    assert len(A._flex_rejected) == 1  # the shape is remembered: no recompiling on every call


def test_decoding_mask_kept_by_the_cache_equals_the_dense_rule_as_it_grows():
    cache = KVCache(n_layers=1, batch_size=2, capacity=16)  # grows during the loop below
    cache.append_docs(DOCS, 2, 15, torch.device("cpu"))  # a packed row and a left-padded row
    cache.advance(15, torch.tensor([6, 11]))
    for _ in range(3):
        kv_doc = cache.append_docs(None, 2, 1, torch.device("cpu"))  # one token continuing each row
        got = cache.continuation_mask()
        assert got.kind == "dense" and torch.equal(got.mask, dense_mask(kv_doc, 1))
        cache.advance(1, cache.next_pos + 1)
    cache = KVCache(n_layers=1, batch_size=1, capacity=2)  # no padding, one document: no mask at all
    cache.append_docs(torch.zeros(1, 2, dtype=torch.long), 1, 2, torch.device("cpu"))
    cache.advance(2, torch.tensor([2]))
    cache.append_docs(None, 1, 1, torch.device("cpu"))
    assert cache.continuation_mask().kind == "none"


def test_cpu_attention_takes_math_only_for_short_calls_that_need_gradients(monkeypatch):
    from torch.nn.attention import SDPBackend

    from mm1.models import attention

    chosen: list = []
    real = attention.sdpa_kernel
    monkeypatch.setattr(attention, "sdpa_kernel", lambda backends: chosen.append(backends) or real(backends))
    gen = torch.Generator().manual_seed(0)

    def qkv(t: int, grad: bool) -> list[torch.Tensor]:
        return [torch.randn(2, 4, t, 16, generator=gen).requires_grad_(grad) for _ in range(3)]

    short = attention.CPU_FLASH_MIN_KEYS - 1
    q, k, v = qkv(short, True)
    mask = torch.ones(short, short, dtype=torch.bool).tril()
    y = attention.sdpa(q, k, v, attn_mask=mask)
    assert chosen == [[SDPBackend.MATH]]  # a ViT-length call that trains: math (flash's backward is slow)
    reference = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    got = torch.autograd.grad((y * y).sum(), (q, k, v))
    want = torch.autograd.grad((reference * reference).sum(), (q, k, v))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    attention.sdpa(*qkv(attention.CPU_FLASH_MIN_KEYS, True), is_causal=True)  # LM rows: torch's flash
    attention.sdpa(*qkv(short, False))  # a frozen ViT's forward: nothing to differentiate
    with torch.no_grad():
        attention.sdpa(*qkv(short, True))  # inference
    assert chosen == [[SDPBackend.MATH]]
