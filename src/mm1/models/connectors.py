"""Vision-language connectors: patch features [N, h*w, D_v] -> image tokens [N, k, D_lm].

MM1's second lesson is that the number of image tokens and the resolution matter, and the connector
type barely does; these four let an ablation check that. All accept any input grid (SFT runs the
encoder at a higher resolution): the pooling ones still emit k tokens, `mlp` emits one per patch.

- `avgpool`: adaptive average pool to sqrt(k) x sqrt(k), then an MLP readout.
- `attnpool`: k learned queries cross-attend to the patches, then an MLP readout.
- `c_abstractor`: Honeybee's (Cha et al. 2023) locality-preserving abstractor: learned position
  embedding, RegNet bottleneck blocks (depthwise 3x3, squeeze-excitation, LayerNorm2d, SiLU),
  adaptive average pool, more blocks, MLP readout. Written here in plain PyTorch (no timm).
- `mlp`: LLaVA-1.5's per-patch MLP (k = h*w).

The MLP readout follows LLaVA / Honeybee: Linear(in, D_lm), then (act, Linear(D_lm, D_lm)) x
(mlp_depth - 1). `hidden_dim` is the C-Abstractor's convolution width (0 = the vision width).
With `out_norm` > 0 the readout ends in an RMSNorm whose gain starts at out_norm / sqrt(D_lm), so
image tokens enter the LM at a per-token L2 norm of `out_norm` (text embeddings of the tiny LM sit
near 1; an unnormalised readout drifts to ~10 in pre-training), see docs/grounding.md.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from mm1.config import Config, ConnectorConfig
from mm1.models.registry import CONNECTORS
from mm1.models.vision import interpolate_grid_embeddings, regrid_on_load
from mm1.registry import ConfigError, check


def _pair(grid: int | tuple[int, int]) -> tuple[int, int]:
    return (grid, grid) if isinstance(grid, int) else (int(grid[0]), int(grid[1]))


def infer_grid(n_patches: int, grid: int | tuple[int, int] | None = None) -> tuple[int, int]:
    """The (h, w) patch grid of a [N, h*w, D] input: given, or square."""
    if grid is not None:
        h, w = _pair(grid)
        if h * w != n_patches:
            raise ValueError(f"connector: grid {h}x{w} does not match the {n_patches} input patches")
        return h, w
    side = math.isqrt(n_patches)
    if side * side != n_patches:
        raise ValueError(f"connector: {n_patches} patches is not a square grid; pass grid=(h, w) for non-square images")
    return side, side


# ----------------------------------------------------------------------------- rules (run at config load)


@CONNECTORS.validates
def _check_any(cfg: Config) -> None:
    c = cfg.model.connector
    check(c.num_tokens > 0, "model.connector.num_tokens", c.num_tokens, "must be positive")
    check(c.out_norm >= 0, "model.connector.out_norm", c.out_norm, "must be >= 0 (0 = no output norm)")


def _pooled_side(cfg: ConnectorConfig) -> int:
    side = math.isqrt(cfg.num_tokens)
    check(
        side * side == cfg.num_tokens,
        "model.connector.num_tokens",
        cfg.num_tokens,
        f"must be a perfect square for {cfg.kind} (it pools to sqrt(k) x sqrt(k)), e.g. 16, 64, 144",
    )
    return side


def _check_pooling(cfg: Config) -> None:
    c, grid = cfg.model.connector, cfg.model.vision.grid
    check(
        _pooled_side(c) <= grid,
        "model.connector.num_tokens",
        c.num_tokens,
        f"pooling cannot make more tokens than the {grid}x{grid} patch grid",
    )


def _check_every_patch(cfg: Config) -> None:
    c, grid = cfg.model.connector, cfg.model.vision.grid
    check(
        c.num_tokens == grid**2,
        "model.connector.num_tokens",
        c.num_tokens,
        f"the mlp connector keeps every patch: must equal grid^2 = {grid**2}",
    )


def _check_heads(heads: int, lm_dim: int) -> None:
    check(lm_dim % heads == 0, "model.connector.heads", heads, f"must divide model.lm.dim={lm_dim}")


class OutputNorm(nn.RMSNorm):
    """RMSNorm whose gain starts at norm / sqrt(dim): every token leaves at L2 norm `norm`."""

    def __init__(self, dim: int, norm: float) -> None:
        self.start = norm / math.sqrt(dim)
        super().__init__(dim, eps=1e-6)

    def reset_parameters(self) -> None:
        nn.init.constant_(self.weight, self.start)


def readout(
    in_dim: int, out_dim: int, depth: int, act: Callable[[], nn.Module] = nn.GELU, out_norm: float = 0.0
) -> nn.Sequential:
    """LLaVA / Honeybee MLP: Linear(in, out) then (act, Linear(out, out)) x (depth - 1) [+ OutputNorm]."""
    if depth < 1:
        raise ConfigError(f"model.connector.mlp_depth={depth}: must be >= 1")
    layers: list[nn.Module] = [nn.Linear(in_dim, out_dim)]
    for _ in range(depth - 1):
        layers += [act(), nn.Linear(out_dim, out_dim)]
    if out_norm > 0:
        layers.append(OutputNorm(out_dim, out_norm))
    return nn.Sequential(*layers)


class _Connector(nn.Module):
    """Shared `reset_parameters`: re-initialise every layer, then the connector's own parameters, so a
    meta-built connector can be materialised (`to_empty` + `reset_parameters`) like the LM."""

    def reset_parameters(self) -> None:
        for m in self.modules():
            if m is not self and hasattr(m, "reset_parameters"):
                m.reset_parameters()
        for p in self._parameters.values():
            if p is not None:
                nn.init.trunc_normal_(p, std=0.02)


class MLPConnector(_Connector):
    """LLaVA-1.5: every patch becomes one LM token through a small MLP."""

    def __init__(self, cfg: ConnectorConfig, vision_dim: int, lm_dim: int, grid: int | tuple[int, int]) -> None:
        super().__init__()
        self.num_tokens = math.prod(_pair(grid))
        self.readout = readout(vision_dim, lm_dim, cfg.mlp_depth, out_norm=cfg.out_norm)

    def forward(self, x: torch.Tensor, grid: int | tuple[int, int] | None = None) -> torch.Tensor:
        return self.readout(x)  # [N, h*w, D_lm]


class AvgPoolConnector(_Connector):
    """Adaptive average pooling of the patch grid to sqrt(k) x sqrt(k), then an MLP."""

    def __init__(self, cfg: ConnectorConfig, vision_dim: int, lm_dim: int, grid: int | tuple[int, int]) -> None:
        super().__init__()
        self.side = _pooled_side(cfg)
        self.num_tokens = cfg.num_tokens
        self.readout = readout(vision_dim, lm_dim, cfg.mlp_depth, out_norm=cfg.out_norm)

    def forward(self, x: torch.Tensor, grid: int | tuple[int, int] | None = None) -> torch.Tensor:
        n, length, d = x.shape
        h, w = infer_grid(length, grid)
        x = x.transpose(1, 2).reshape(n, d, h, w)  # [N, D_v, h, w]
        x = F.adaptive_avg_pool2d(x, self.side).flatten(2).transpose(1, 2)  # [N, k, D_v]
        return self.readout(x)  # [N, k, D_lm]


class AttnPoolConnector(_Connector):
    """k learned queries read the patches with one cross-attention layer, then an MLP.

    The patches already carry the encoder's position embeddings, so any grid works unchanged."""

    def __init__(self, cfg: ConnectorConfig, vision_dim: int, lm_dim: int, grid: int | tuple[int, int]) -> None:
        super().__init__()
        _check_heads(cfg.heads, lm_dim)
        self.num_tokens, self.heads = cfg.num_tokens, cfg.heads
        self.queries = nn.Parameter(torch.empty(cfg.num_tokens, lm_dim))
        self.ln_q = nn.LayerNorm(lm_dim)
        self.ln_kv = nn.LayerNorm(vision_dim)
        self.q = nn.Linear(lm_dim, lm_dim)
        self.kv = nn.Linear(vision_dim, 2 * lm_dim)
        self.out = nn.Linear(lm_dim, lm_dim)
        self.ln_out = nn.LayerNorm(lm_dim)
        self.readout = readout(lm_dim, lm_dim, cfg.mlp_depth, out_norm=cfg.out_norm)
        self.reset_parameters()

    def forward(self, x: torch.Tensor, grid: int | tuple[int, int] | None = None) -> torch.Tensor:
        n, length, _ = x.shape
        k, d = self.queries.shape
        hd = d // self.heads
        lat = self.queries.unsqueeze(0).expand(n, k, d).to(x.dtype)  # [N, k, D_lm]
        q = self.q(self.ln_q(lat)).view(n, k, self.heads, hd).transpose(1, 2)  # [N, H, k, hd]
        kv = self.kv(self.ln_kv(x)).view(n, length, 2, self.heads, hd).permute(2, 0, 3, 1, 4)  # [2, N, H, L, hd]
        # torch's own SDPA, not mm1.models.attention.sdpa: `mm1 export` copies this class's source into a
        # self-contained modeling file (mm1.export.hf_remote)
        a = F.scaled_dot_product_attention(q, kv[0], kv[1]).transpose(1, 2).reshape(n, k, d)
        lat = lat + self.out(a)
        return self.readout(self.ln_out(lat))  # [N, k, D_lm]


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an [N, C, H, W] map."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class SqueezeExcite(nn.Module):
    """Channel gating from globally pooled features."""

    def __init__(self, channels: int, reduced: int) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(channels, reduced, 1)
        self.fc2 = nn.Conv2d(reduced, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = F.silu(self.fc1(x.mean((2, 3), keepdim=True)))  # [N, r, 1, 1]
        return x * torch.sigmoid(self.fc2(s))


class RegBottleneck(nn.Module):
    """RegNet-Y bottleneck as Honeybee configures it (bottleneck ratio 1, group width 1 = depthwise 3x3,
    SE ratio 0.25 of the input width, LayerNorm2d, SiLU): 1x1 -> dw 3x3 -> SE -> 1x1, residual."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(in_dim, out_dim, 1, bias=False), LayerNorm2d(out_dim), nn.SiLU())
        self.conv2 = nn.Sequential(
            nn.Conv2d(out_dim, out_dim, 3, padding=1, groups=out_dim, bias=False), LayerNorm2d(out_dim), nn.SiLU()
        )
        self.se = SqueezeExcite(out_dim, max(1, round(in_dim * 0.25)))
        self.conv3 = nn.Sequential(nn.Conv2d(out_dim, out_dim, 1, bias=False), LayerNorm2d(out_dim))
        self.shortcut = (
            nn.Identity()
            if in_dim == out_dim
            else nn.Sequential(nn.Conv2d(in_dim, out_dim, 1, bias=False), LayerNorm2d(out_dim))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv3(self.se(self.conv2(self.conv1(x))))  # [N, C_out, h, w]
        return F.silu(y + self.shortcut(x))


def reg_stage(depth: int, in_dim: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(*(RegBottleneck(in_dim if i == 0 else out_dim, out_dim) for i in range(depth)))


class CAbstractor(_Connector):
    """Honeybee's C-Abstractor (MM1's choice): convolutions keep local structure while pooling to k."""

    def __init__(self, cfg: ConnectorConfig, vision_dim: int, lm_dim: int, grid: int | tuple[int, int]) -> None:
        super().__init__()
        if cfg.depth < 0:
            raise ConfigError(f"model.connector.depth={cfg.depth}: must be >= 0")
        hidden = cfg.hidden_dim or vision_dim
        self.side = _pooled_side(cfg)
        self.num_tokens = cfg.num_tokens
        self.grid = _pair(grid)
        self.pos_embed = nn.Parameter(torch.empty(1, self.grid[0] * self.grid[1], vision_dim))
        self.stage1 = reg_stage(cfg.depth, vision_dim, hidden)
        self.stage2 = reg_stage(cfg.depth, hidden, hidden)
        self.readout = readout(hidden if cfg.depth else vision_dim, lm_dim, cfg.mlp_depth, nn.SiLU, cfg.out_norm)
        self.reset_parameters()

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args, **kwargs) -> None:
        """A checkpoint from another encoder resolution (pre-training -> high-res SFT) re-grids."""
        regrid_on_load(state_dict, prefix + "pos_embed", self.pos_embed, 0, self.grid)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: torch.Tensor, grid: int | tuple[int, int] | None = None) -> torch.Tensor:
        n, length, d = x.shape
        h, w = infer_grid(length, grid)
        x = x + interpolate_grid_embeddings(self.pos_embed, self.grid, (h, w)).to(x.dtype)  # [N, h*w, D_v]
        x = x.transpose(1, 2).reshape(n, d, h, w)  # [N, D_v, h, w]
        x = self.stage1(x)
        x = F.adaptive_avg_pool2d(x, self.side)  # [N, C, s, s]
        x = self.stage2(x).flatten(2).transpose(1, 2)  # [N, k, C]
        return self.readout(x)  # [N, k, D_lm]


CONNECTORS.register("mlp", validate=_check_every_patch)(MLPConnector)
CONNECTORS.register("avgpool", validate=_check_pooling)(AvgPoolConnector)
CONNECTORS.register("attnpool", validate=lambda cfg: _check_heads(cfg.model.connector.heads, cfg.model.lm.dim))(
    AttnPoolConnector
)
CONNECTORS.register("c_abstractor", validate=_check_pooling)(CAbstractor)


def build_connector(cfg: ConnectorConfig, vision_dim: int, lm_dim: int, grid: int | tuple[int, int]) -> nn.Module:
    """The connector named by `cfg.kind`; `grid` is the encoder's native patch grid (side or (h, w))."""
    return CONNECTORS.get(cfg.kind)(cfg, vision_dim, lm_dim, grid)
