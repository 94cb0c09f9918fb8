"""Training FLOPs of an MLLM, counted the way MFU papers do (PaLM appendix B), for every part.

One home for FLOP counting: `mm1 info` prints it and the trainer / GPU benchmark divide by it for
MFU. Training = 3x forward (forward + backward of activations and weights); a matmul of an
(m x n) by (n x p) costs 2mnp. Dense weight FLOPs per token are 6 * (matmul parameters), attention
scores add 12 * layers * width * context per token. For MoE only the top-k experts a token visits
count (the *active* parameters).
"""

from __future__ import annotations

from dataclasses import dataclass

from mm1.config import ModelConfig
from mm1.models.vision import used_blocks


@dataclass(frozen=True)
class FlopsBreakdown:
    lm_per_token: float  # LM training FLOPs per sequence token at the given context
    vision_per_image: float  # encoder training FLOPs per image (crop)
    connector_per_image: float

    def per_step(self, tokens: int, images: int) -> float:
        return self.lm_per_token * tokens + (self.vision_per_image + self.connector_per_image) * images


def _lm_matmul_params(cfg: ModelConfig) -> float:
    lm = cfg.lm
    head_dim = lm.dim // lm.n_heads
    attn = lm.dim * head_dim * (2 * lm.n_heads + 2 * lm.kv_heads)  # q, o + k, v
    dense_ffn = 3 * lm.dim * lm.ffn_dim
    n_moe = lm.n_layers // lm.moe_every if lm.n_experts else 0
    active_moe_ffn = lm.moe_top_k * dense_ffn + lm.dim * lm.n_experts  # k experts + router
    ffn = (lm.n_layers - n_moe) * dense_ffn + n_moe * active_moe_ffn
    return lm.n_layers * attn + ffn + lm.dim * lm.vocab_size  # + output projection


def training_flops(cfg: ModelConfig, context: int) -> FlopsBreakdown:
    """FLOPs for one training token / image of `cfg` at sequence length `context`."""
    lm = cfg.lm
    lm_per_token = 6 * _lm_matmul_params(cfg) + 12 * lm.n_layers * lm.dim * context
    v = cfg.vision
    patches = v.grid**2 + (1 if v.use_cls else 0)
    depth = used_blocks(v)  # blocks after the feature layer are never built
    vit_matmul = depth * (4 * v.width**2 + 2 * v.width * v.mlp_dim)
    vision = patches * (6 * vit_matmul + 12 * depth * v.width * patches) + 6 * patches * 3 * v.patch_size**2 * v.width
    c = cfg.connector
    hidden = c.hidden_dim or v.width
    readout = c.num_tokens * 6 * (hidden * lm.dim + (c.mlp_depth - 1) * lm.dim * lm.dim)
    if c.kind == "c_abstractor":  # bottleneck blocks ~ (1x1 + 3x3 + 1x1) convs at full then pooled grid
        mix = 6 * c.depth * (v.grid**2 + c.num_tokens) * (2 * hidden * hidden + 9 * hidden * hidden)
    elif c.kind == "attnpool":
        mix = 6 * c.num_tokens * (4 * lm.dim * lm.dim) + 6 * patches * 2 * v.width * lm.dim
    else:
        mix = 0
    return FlopsBreakdown(float(lm_per_token), float(vision), float(readout + mix))


# Dense bf16 peak of known accelerators (no sparsity), for MFU.
PEAK_BF16_FLOPS: dict[str, float] = {
    "H200": 989e12,
    "H100": 989e12,  # SXM; the PCIe card is lower (756e12) and matched first below
    "H100 PCIe": 756e12,
    "A100": 312e12,
    "L40S": 362e12,
    "A10G": 125e12,
}


def peak_flops(device_name: str) -> float | None:
    """The dense bf16 peak for a CUDA device name, or None when unknown (then no MFU is logged)."""
    for key in sorted(PEAK_BF16_FLOPS, key=len, reverse=True):
        if key.lower() in device_name.lower():
            return PEAK_BF16_FLOPS[key]
    return None
