"""Mixture-of-experts feed-forward layer (MM1's MoE: top-2 routing, load-balance + router z-loss,
experts upcycled from the dense FFN).

Each token's router distribution picks its top-k experts; their SwiGLU outputs are mixed with the
chosen probabilities renormalised to sum to one. Dispatch is sort-based: the (token, expert) pairs
are sorted by expert, gathered into one contiguous buffer, pushed through each expert's weights as
one matmul per expert, and scattered back with `index_add_` -- a loop over experts, never tokens.

Auxiliary losses (returned, weighted by their coefficients):
- load balance (Switch / GShard): E * sum_i f_i * P_i, f_i = share of routed (token, slot) pairs that
  went to expert i (no gradient), P_i = mean router probability of expert i (gradient). It is 1 when
  routing is uniform and grows to E when every token picks the same expert.
- router z-loss (ST-MoE): mean over tokens of logsumexp(router logits)^2, keeping logits small.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor


class StackedExperts(nn.Module):
    """E SwiGLU experts as stacked weights, laid out like nn.Linear ([out, in]) per expert."""

    def __init__(self, n_experts: int, dim: int, hidden: int) -> None:
        super().__init__()
        self.gate = nn.Parameter(torch.empty(n_experts, hidden, dim))
        self.up = nn.Parameter(torch.empty(n_experts, hidden, dim))
        self.down = nn.Parameter(torch.empty(n_experts, dim, hidden))

    def reset_parameters(self, std: float = 0.02, out_std: float = 0.02) -> None:
        nn.init.normal_(self.gate, std=std)
        nn.init.normal_(self.up, std=std)
        nn.init.normal_(self.down, std=out_std)

    def forward(self, x: Tensor, counts: list[int]) -> Tensor:
        """x [sum(counts), D], rows grouped by expert (counts[e] rows for expert e) -> same shape."""
        outs = []
        for e, chunk in enumerate(torch.split(x, counts)):
            if chunk.shape[0] == 0:
                continue
            h = F.silu(chunk @ self.gate[e].t()) * (chunk @ self.up[e].t())  # [n_e, H]
            outs.append(h @ self.down[e].t())  # [n_e, D]
        return torch.cat(outs) if outs else x.new_zeros(0, self.down.shape[1])


class MoEFeedForward(nn.Module):
    """Top-k routed SwiGLU experts. forward(x [B,T,D], valid [B,T] | None) -> (y, aux_loss, stats)."""

    def __init__(
        self, dim: int, hidden: int, n_experts: int, top_k: int, lb_coef: float = 0.01, z_coef: float = 0.001
    ) -> None:
        super().__init__()
        if not 1 <= top_k <= n_experts:
            raise ValueError(f"MoE top_k={top_k} must be between 1 and n_experts={n_experts}")
        self.n_experts, self.top_k = n_experts, top_k
        self.lb_coef, self.z_coef = lb_coef, z_coef
        self.router = nn.Linear(dim, n_experts, bias=False)
        self.experts = StackedExperts(n_experts, dim, hidden)

    def reset_parameters(self, std: float = 0.02, out_std: float = 0.02) -> None:
        nn.init.normal_(self.router.weight, std=std)
        self.experts.reset_parameters(std, out_std)

    @torch.no_grad()
    def upcycle_from(self, dense_ffn: nn.Module) -> None:
        """Copy a dense SwiGLU FFN (`gate`, `up`, `down` nn.Linear) into every expert (MM1 upcycling).
        With renormalised top-k weights the layer then computes exactly the dense FFN, whatever the
        router says; training makes the experts diverge."""
        for name in ("gate", "up", "down"):
            w = getattr(dense_ffn, name).weight  # [out, in]
            target = getattr(self.experts, name)
            if tuple(target.shape[1:]) != tuple(w.shape):
                raise ValueError(
                    f"upcycle: dense {name} weight {tuple(w.shape)} does not match expert shape "
                    f"{tuple(target.shape[1:])}; dim/ffn_dim of the MoE and dense models differ"
                )
            target.copy_(w.unsqueeze(0).expand_as(target))

    def route(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x [N,D] -> router logits [N,E] (fp32), chosen experts [N,k], mixing weights [N,k]."""
        logits = self.router(x).float()  # [N, E]
        probs = logits.softmax(dim=-1)
        top_p, top_i = probs.topk(self.top_k, dim=-1)  # [N, k]
        weights = top_p / top_p.sum(dim=-1, keepdim=True)
        return logits, top_i, weights

    def forward(self, x: Tensor, valid: Tensor | None = None) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        B, T, D = x.shape
        flat = x.reshape(-1, D)  # [N, D]
        N, k, E = flat.shape[0], self.top_k, self.n_experts
        logits, top_i, weights = self.route(flat)

        # dispatch: sort the N*k (token, expert) pairs by expert, run each expert on its block
        expert_of = top_i.reshape(-1)  # [N*k]
        order = torch.argsort(expert_of, stable=True)
        token_of = torch.arange(N, device=x.device).repeat_interleave(k)[order]  # [N*k]
        counts = torch.bincount(expert_of, minlength=E)  # [E]
        y = self.experts(flat[token_of], counts.tolist())  # [N*k, D]
        y = y * weights.reshape(-1)[order, None].to(y.dtype)
        out = flat.new_zeros(N, D, dtype=y.dtype).index_add_(0, token_of, y)  # [N, D] (bf16 under autocast)

        aux, stats = self.aux_losses(logits, top_i, None if valid is None else valid.reshape(-1))
        return out.view(B, T, D), aux, stats

    def aux_losses(self, logits: Tensor, top_i: Tensor, valid: Tensor | None) -> tuple[Tensor, dict[str, Tensor]]:
        """Weighted load-balance + z-loss over the non-padding tokens, and detached stats."""
        if valid is not None:
            logits, top_i = logits[valid], top_i[valid]
        E = self.n_experts
        if logits.shape[0] == 0:  # a batch of padding only
            zero = logits.sum() * 0.0
            return zero, {"lb_loss": zero.detach(), "z_loss": zero.detach(), "expert_fraction": logits.new_zeros(E)}
        probs = logits.softmax(dim=-1)  # [N, E]
        fraction = torch.bincount(top_i.reshape(-1), minlength=E).float() / top_i.numel()  # f_i, sums to 1
        lb = E * (fraction * probs.mean(dim=0)).sum()
        z = torch.logsumexp(logits, dim=-1).pow(2).mean()
        aux = self.lb_coef * lb + self.z_coef * z
        return aux, {"lb_loss": lb.detach(), "z_loss": z.detach(), "expert_fraction": fraction.detach()}
