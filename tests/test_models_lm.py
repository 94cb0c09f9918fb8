"""The Llama-style decoder: packing isolation, KV-cache decoding, checkpointing, meta-device build."""

from __future__ import annotations

import pytest
import torch

import mm1.models  # noqa: F401  (fills the registries)
from mm1.config import LMConfig
from mm1.models.attention import positions_from_docs
from mm1.models.lm import LanguageModel, LMOutput
from mm1.models.registry import LANGUAGE_MODELS

V = 64


def _model(seed: int = 0, **kw) -> LanguageModel:
    torch.manual_seed(seed)
    cfg = LMConfig(
        **{**dict(vocab_size=V, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48, attention="sdpa"), **kw}
    )
    return LanguageModel(cfg).eval()


def _packed_row():
    doc = torch.tensor([[0] * 5 + [1] * 7 + [2] * 4 + [-1] * 2])  # [1, 18]
    ids = torch.randint(1, V, doc.shape, generator=torch.Generator().manual_seed(3))
    return ids, doc


def test_llama_is_registered_and_follows_the_lm_interface():
    assert LANGUAGE_MODELS.get("llama") is LanguageModel
    m = _model()
    out = m(m.tok_embeddings(torch.randint(0, V, (2, 6))))
    assert isinstance(out, LMOutput) and out.logits.shape == (2, 6, V)
    assert out.aux_loss.shape == () and out.moe_stats == {}


@pytest.mark.parametrize("attention", ["sdpa", "flex"])
def test_packed_documents_do_not_attend_to_each_other(attention):
    m = _model(attention=attention, n_experts=0)
    ids, doc = _packed_row()
    pos = positions_from_docs(doc)
    with torch.no_grad():
        base = m.forward_ids(ids, position_ids=pos, doc_ids=doc).logits
        perturbed_ids = ids.clone()
        perturbed_ids[0, 5:12] = (perturbed_ids[0, 5:12] + 7) % V  # rewrite document 1 only
        perturbed = m.forward_ids(perturbed_ids, position_ids=pos, doc_ids=doc).logits
    others = doc[0] != 1
    assert (base[0, others] - perturbed[0, others]).abs().max() <= 1e-6
    assert (base[0, 5:12] - perturbed[0, 5:12]).abs().max() > 1e-3  # the edited document did change


@pytest.mark.parametrize("attention", ["sdpa", "flex"])
@pytest.mark.parametrize("grad", [False, True], ids=["inference", "training"])
def test_fully_packed_rows_without_padding_still_separate_documents(attention, grad):
    """The normal case for long-sequence training: every row full, no -1 anywhere in the batch."""
    m = _model(attention=attention).train(grad)
    doc = torch.tensor([[0] * 6 + [1] * 5 + [2] * 7, [0] * 9 + [1] * 9])  # [2, 18], no padding
    ids = torch.randint(1, V, doc.shape, generator=torch.Generator().manual_seed(4))
    pos = positions_from_docs(doc)
    edited = ids.clone()
    edited[0, 6:11] = (edited[0, 6:11] + 5) % V  # row 0, document 1
    edited[1, 0:9] = (edited[1, 0:9] + 3) % V  # row 1, document 0
    with torch.set_grad_enabled(grad):
        base = m.forward_ids(ids, position_ids=pos, doc_ids=doc).logits.detach()
        after = m.forward_ids(edited, position_ids=pos, doc_ids=doc).logits.detach()
    untouched = torch.ones_like(doc, dtype=torch.bool)
    untouched[0, 6:11] = False
    untouched[1, 0:9] = False
    assert (base[untouched] - after[untouched]).abs().max() <= 1e-6
    assert (base[0, 6:11] - after[0, 6:11]).abs().max() > 1e-3  # the edits did reach their own documents
    assert (base[1, :9] - after[1, :9]).abs().max() > 1e-3


def test_a_packed_document_gives_the_same_logits_as_when_run_alone():
    m = _model()
    ids, doc = _packed_row()
    with torch.no_grad():
        packed = m.forward_ids(ids, doc_ids=doc).logits  # default positions restart per document
        alone = m.forward_ids(ids[:, 5:12]).logits
    torch.testing.assert_close(packed[:, 5:12], alone, atol=1e-5, rtol=0)


def test_qkv_bias_and_untied_output_exist_only_when_configured():
    names = set(_model(qkv_bias=True, tie_embeddings=False).state_dict())
    assert {"layers.0.attn.q.bias", "output.weight"} <= names
    names = set(_model().state_dict())
    assert "layers.0.attn.q.bias" not in names and "output.weight" not in names


def _greedy(m: LanguageModel, ids: torch.Tensor, attn: torch.Tensor | None, steps: int, use_cache: bool):
    """Greedy decoding; returns the chosen tokens and each step's last logits."""
    tokens, logits_seen = [], []
    cache = m.new_cache(ids.shape[0], max_len=4) if use_cache else None  # small: forces growth
    seq, mask = ids, attn
    step_ids, step_mask = ids, attn
    with torch.no_grad():
        for _ in range(steps):
            if use_cache:
                out = m.forward_ids(step_ids, attention_mask=step_mask, cache=cache)
            else:
                out = m.forward_ids(seq, attention_mask=mask)
            last = out.logits[:, -1]
            nxt = last.argmax(-1, keepdim=True)
            tokens.append(nxt)
            logits_seen.append(last)
            seq = torch.cat([seq, nxt], 1)
            if mask is not None:
                mask = torch.cat([mask, torch.ones_like(nxt, dtype=torch.bool)], 1)
            step_ids, step_mask = nxt, None
    return torch.cat(tokens, 1), torch.stack(logits_seen, 1)


@pytest.mark.parametrize("n_experts", [0, 4])
def test_kv_cache_decoding_matches_recomputing_the_full_sequence(n_experts):
    m = _model(n_experts=n_experts, moe_every=1)
    ids = torch.randint(1, V, (2, 5), generator=torch.Generator().manual_seed(5))
    toks_full, logits_full = _greedy(m, ids, None, 6, use_cache=False)
    toks_cache, logits_cache = _greedy(m, ids, None, 6, use_cache=True)
    torch.testing.assert_close(logits_cache, logits_full, atol=1e-5, rtol=0)
    assert torch.equal(toks_cache, toks_full)


def test_kv_cache_decoding_of_a_left_padded_batch_matches_each_prompt_alone():
    m = _model()
    g = torch.Generator().manual_seed(9)
    short, long = torch.randint(1, V, (1, 3), generator=g), torch.randint(1, V, (1, 6), generator=g)
    batch = torch.cat([torch.cat([torch.zeros(1, 3, dtype=torch.long), short], 1), long])  # left-pad `short`
    attn = batch != 0
    attn[1] = True
    toks_cache, logits_cache = _greedy(m, batch, attn, 5, use_cache=True)
    toks_full, logits_full = _greedy(m, batch, attn, 5, use_cache=False)
    torch.testing.assert_close(logits_cache, logits_full, atol=1e-5, rtol=0)
    assert torch.equal(toks_cache, toks_full)
    toks_short, logits_short = _greedy(m, short, None, 5, use_cache=True)  # padding changes nothing
    torch.testing.assert_close(logits_cache[:1], logits_short, atol=1e-5, rtol=0)
    assert torch.equal(toks_cache[:1], toks_short)


def test_activation_checkpointing_gives_the_same_loss_and_gradients():
    ids, doc = _packed_row()
    grads = []
    for ckpt in (False, True):
        m = _model(activation_checkpointing=ckpt, n_experts=4, moe_every=2).train()
        calls, attn_forward = [], m.layers[0].attn.forward
        m.layers[0].attn.forward = lambda *a: calls.append(1) or attn_forward(*a)
        out = m.forward_ids(ids, doc_ids=doc)
        (out.logits.logsumexp(-1).mean() + out.aux_loss).backward()
        assert len(calls) == (2 if ckpt else 1)  # checkpointed blocks run again during backward
        grads.append({n: p.grad.clone() for n, p in m.named_parameters()})
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, atol=1e-6, rtol=1e-5, msg=name)


def test_builds_on_the_meta_device_without_allocating():
    cfg = LMConfig(
        vocab_size=32000, dim=2048, n_layers=16, n_heads=16, n_kv_heads=4, ffn_dim=5632, n_experts=8, moe_every=2
    )
    with torch.device("meta"):
        m = LanguageModel(cfg)
    assert all(p.is_meta for p in m.parameters())
    n = sum(p.numel() for p in m.parameters())
    attn = 16 * (2048 * 2048 * 2 + 2048 * 512 * 2)
    ffn = 8 * 3 * 2048 * 5632 + 8 * (8 * 3 * 2048 * 5632 + 2048 * 8)
    assert n == 32000 * 2048 + attn + ffn + 16 * 2 * 2048 + 2048
    assert sum(p.numel() for name, p in m.named_parameters() if ".experts." in name) == 8 * 8 * 3 * 2048 * 5632


@torch.no_grad()
def test_residual_projections_start_smaller_than_the_others():
    m = _model(n_layers=8, dim=64, ffn_dim=128)
    assert m.layers[0].attn.o.weight.std() < 0.5 * m.layers[0].attn.q.weight.std()
    assert abs(float(m.layers[0].attn.q.weight.std()) - 0.02) < 0.004


def test_cached_decoding_continues_explicit_positions_beyond_the_cache_capacity():
    m = _model()
    ids = torch.randint(1, V, (1, 5), generator=torch.Generator().manual_seed(3))
    pos = 100 + torch.arange(5)[None]  # larger than the cache will ever hold
    cache = m.new_cache(1, max_len=8)
    with torch.no_grad():
        m.forward_ids(ids[:, :4], position_ids=pos[:, :4], cache=cache)
        step = m.forward_ids(ids[:, 4:], cache=cache).logits[:, -1]  # default positions: 104
        full = m.forward_ids(ids, position_ids=pos).logits[:, -1]
    torch.testing.assert_close(step, full, atol=1e-5, rtol=0)
