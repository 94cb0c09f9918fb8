"""Mixture-of-experts FFN: routing, dispatch, auxiliary losses, upcycling."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mm1.config import LMConfig
from mm1.models.lm import FeedForward, LanguageModel
from mm1.models.moe import MoEFeedForward


def _moe(E=4, k=2, D=16, H=24, seed=0) -> MoEFeedForward:
    torch.manual_seed(seed)
    m = MoEFeedForward(D, H, E, k, lb_coef=0.01, z_coef=0.001)
    m.reset_parameters()
    return m


def _reference(m: MoEFeedForward, x: torch.Tensor) -> torch.Tensor:
    """Token-by-token loop: sum over the chosen experts of weight * SwiGLU_e(x)."""
    flat = x.reshape(-1, x.shape[-1])
    _, top_i, w = m.route(flat)
    out = torch.zeros_like(flat)
    for n in range(flat.shape[0]):
        for j in range(m.top_k):
            e = int(top_i[n, j])
            h = F.silu(flat[n] @ m.experts.gate[e].t()) * (flat[n] @ m.experts.up[e].t())
            out[n] += w[n, j] * (h @ m.experts.down[e].t())
    return out.view_as(x)


def test_each_token_goes_to_exactly_top_k_distinct_experts_with_weights_summing_to_one():
    m = _moe(E=6, k=2)
    _, top_i, w = m.route(torch.randn(50, 16))
    assert top_i.shape == (50, 2)
    assert (top_i[:, 0] != top_i[:, 1]).all()
    torch.testing.assert_close(w.sum(-1), torch.ones(50))
    _, _, stats = m(torch.randn(5, 10, 16))
    torch.testing.assert_close(stats["expert_fraction"].sum(), torch.tensor(1.0))


def test_sorted_dispatch_equals_a_per_token_loop():
    m = _moe(E=5, k=2)
    x = torch.randn(3, 7, 16)
    y, _, _ = m(x)
    torch.testing.assert_close(y, _reference(m, x), atol=1e-5, rtol=1e-5)


def test_aux_losses_reach_the_router_gradient():
    m = _moe()
    _, aux, _ = m(torch.randn(2, 8, 16))
    aux.backward()  # aux only: the gradient must come from the load-balance and z losses
    assert m.router.weight.grad is not None and m.router.weight.grad.abs().sum() > 0


def test_load_balance_loss_grows_with_imbalance():
    m = _moe(E=4, k=1)
    x = torch.randn(4, 16, 16)
    x[..., 0] = 1.0  # a constant feature the router can use to favour expert 0
    losses = []
    with torch.no_grad():
        m.router.weight.mul_(1e-3)  # start near uniform routing
        for strength in (0.0, 1.0, 3.0, 30.0):
            m.router.weight[0, 0] = strength
            _, aux, stats = m(x)
            losses.append((float(stats["lb_loss"]), float(aux)))
    lb = [a for a, _ in losses]
    assert lb[0] < 1.1  # uniform: E * sum(1/E * 1/E) = 1
    assert lb == sorted(lb) and lb[-1] > 3.9  # collapsed onto one expert: E
    assert losses[-1][1] > losses[0][1]  # the weighted aux loss grows too


def test_padding_tokens_do_not_count_in_the_balance_stats():
    m = _moe(E=4, k=1)
    x = torch.randn(1, 6, 16)
    valid = torch.tensor([[True, True, False, False, False, False]])
    _, _, stats = m(x, valid)
    assert torch.allclose(stats["expert_fraction"].sum(), torch.tensor(1.0))
    assert (stats["expert_fraction"] * 2).round().eq(stats["expert_fraction"] * 2).all()  # 2 tokens: halves


def test_upcycled_moe_model_reproduces_the_dense_model():
    dense_cfg = LMConfig(vocab_size=64, dim=32, n_layers=4, n_heads=4, ffn_dim=40)
    moe_cfg = LMConfig(**{**dense_cfg.__dict__, "n_experts": 4, "moe_every": 2, "moe_top_k": 2})
    torch.manual_seed(0)
    dense = LanguageModel(dense_cfg).eval()
    moe = LanguageModel(moe_cfg).eval()
    assert [b.is_moe for b in moe.layers] == [False, True, False, True]
    own = {k: v for k, v in dense.state_dict().items() if k in moe.state_dict()}
    moe.load_state_dict(own, strict=False)
    for i in (1, 3):
        moe.layers[i].ffn.upcycle_from(dense.layers[i].ffn)
    ids = torch.randint(0, 64, (2, 12))
    with torch.no_grad():
        ref = dense.forward_ids(ids)
        out = moe.forward_ids(ids)
    torch.testing.assert_close(out.logits, ref.logits, atol=1e-5, rtol=1e-5)
    assert ref.moe_stats == {} and float(ref.aux_loss) == 0.0
    assert out.moe_stats["expert_fraction"].shape == (2, 4) and out.aux_loss > 0


def test_upcycling_refuses_a_dense_ffn_of_another_shape():
    m = _moe(D=16, H=24)
    with pytest.raises(ValueError, match="gate"):
        m.upcycle_from(FeedForward(16, 32))
