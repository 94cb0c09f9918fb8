"""The image encoder: a plain ViT whose position embeddings follow the input resolution.

MM1's first lesson is that image resolution matters more than encoder size, and its SFT stage runs
the pre-trained encoder at a higher resolution than it was trained at. So the position embeddings
are learned for `cfg.image_size` and interpolated bicubically (on the 2-D grid, CLS position kept
apart, the same recipe as DINO / HF `interpolate_pos_encoding`) to whatever patch grid the pixels
give, at run time (`ViT.forward`) or once at load time (`resize_position_embeddings`).

The layout mirrors HF CLIP / SigLIP vision towers (optional CLS token, optional pre-norm, pre-norm
blocks, optional post-norm) so that `mm1.models.hf_vision` can load them exactly.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from mm1.config import VisionConfig
from mm1.models.attention import sdpa
from mm1.models.registry import ENCODERS
from mm1.models.stems import STEMS, stem_problem
from mm1.registry import ConfigError, check, one_of

log = logging.getLogger(__name__)


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """OpenAI CLIP's sigmoid approximation of GELU."""
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {
    "gelu": F.gelu,
    "quick_gelu": quick_gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),  # SigLIP's gelu_pytorch_tanh
}


def interpolate_grid_embeddings(pos: torch.Tensor, src: tuple[int, int], dst: tuple[int, int]) -> torch.Tensor:
    """Resample per-patch embeddings laid out row-major on a `src` grid to a `dst` grid.

    pos: [..., src_h*src_w, D] -> [..., dst_h*dst_w, D]. Bicubic, align_corners=False, in fp32 (bicubic
    on bf16 is lossy), so it matches HF's `interpolate_pos_encoding` when given a target size."""
    if tuple(src) == tuple(dst):
        return pos
    lead, dim = pos.shape[:-2], pos.shape[-1]
    grid = pos.reshape(-1, src[0], src[1], dim).permute(0, 3, 1, 2).float()  # [B, D, h, w]
    grid = F.interpolate(grid, size=dst, mode="bicubic", align_corners=False)
    return grid.permute(0, 2, 3, 1).reshape(*lead, dst[0] * dst[1], dim).to(pos.dtype)


def used_blocks(cfg: VisionConfig) -> int:
    """How many blocks feed the features: `feature_layer` indexes HF's `hidden_states` (0 = embeddings,
    -1 = last block, -2 = penultimate). Blocks after it are never built: they would get no gradient
    (which breaks DDP) and cost memory for nothing."""
    n = cfg.feature_layer if cfg.feature_layer >= 0 else cfg.depth + 1 + cfg.feature_layer
    if not 0 <= n <= cfg.depth:
        raise ConfigError(
            f"model.vision.feature_layer={cfg.feature_layer}: must index the {cfg.depth + 1} hidden states "
            f"of a depth-{cfg.depth} ViT, i.e. lie in [{-cfg.depth - 1}, {cfg.depth}] (-1 = last block)"
        )
    return n


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln1(x)); x + mlp(ln2(x))."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        d = cfg.width
        self.heads = cfg.heads
        self.ln1 = nn.LayerNorm(d, eps=cfg.norm_eps)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d, eps=cfg.norm_eps)
        self.fc1 = nn.Linear(d, cfg.mlp_dim)
        self.fc2 = nn.Linear(cfg.mlp_dim, d)
        self.act = ACTIVATIONS[cfg.act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = sdpa(q, k, v)  # [B, H, T, hd]
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(self.act(self.fc1(self.ln2(x))))


def check_vit(v: VisionConfig) -> None:
    """The ViT's rules on its config (run at config load and when a ViT is built)."""
    check(
        v.image_size % v.patch_size == 0,
        "model.vision.image_size",
        v.image_size,
        f"must be divisible by model.vision.patch_size={v.patch_size}",
    )
    check(v.width % v.heads == 0, "model.vision.heads", v.heads, f"must divide model.vision.width={v.width}")
    one_of("model.vision.act", v.act, list(ACTIVATIONS))
    problem = stem_problem(v)
    check(not problem, "model.vision.stem", v.stem, problem)
    check(
        len(v.mean) == 3 and len(v.std) == 3 and all(s > 0 for s in v.std),
        "model.vision.std",
        v.std,
        "mean and std need 3 values (RGB), std > 0",
    )
    check(
        -v.depth <= v.feature_layer < v.depth,
        "model.vision.feature_layer",
        v.feature_layer,
        f"must be in [-{v.depth}, {v.depth - 1}] (a block of the {v.depth}-block encoder)",
    )


@ENCODERS.register("vit", validate=lambda cfg: check_vit(cfg.model.vision))
class ViT(nn.Module):
    """`forward(pixels [N,3,H,W]) -> [N, h*w, width]` patch features (CLS dropped), H and W any
    multiple of the patch size."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        check_vit(cfg)
        self.cfg = cfg
        d, g = cfg.width, cfg.grid
        self.n_prefix = 1 if cfg.use_cls else 0
        self.patch_embed = STEMS[cfg.stem](cfg)  # pixels -> [N, D, h, w] (mm1.models.stems)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d)) if cfg.use_cls else None
        self.pos_embed = nn.Parameter(torch.zeros(1, self.n_prefix + g * g, d))  # CLS position first
        self.pre_norm = nn.LayerNorm(d, eps=cfg.norm_eps) if cfg.pre_norm else None
        n = used_blocks(cfg)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(n))
        # The tower's final norm belongs to the last block's output; an earlier feature layer skips it
        # (as LLaVA's hidden_states[-2] does), so it is only built when it is used.
        self.post_norm = nn.LayerNorm(d, eps=cfg.norm_eps) if cfg.post_norm and n == cfg.depth else None
        self.grad_checkpointing = False  # set by the trainer (activation checkpointing)
        self._pos_cache: dict[tuple[Any, ...], torch.Tensor] = {}
        self.reset_parameters()

    @property
    def grid(self) -> int:
        """Side of the patch grid the position embeddings are stored for."""
        return self.cfg.grid

    def reset_parameters(self) -> None:
        # Position embeddings start at the scale of the patch embeddings (unit variance per channel
        # for normalised pixels, see below) by default: `pos_init_std` (config.py says why).
        # (Plain normal: torch's rejection-sampled trunc_normal_ at +-2 std is not reproducible under
        # the per-parameter seeded init of mm1.train.materialise.)
        nn.init.normal_(self.pos_embed, std=self.cfg.pos_init_std)
        if self.cls_token is not None:
            nn.init.trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                m.reset_parameters()
        self.patch_embed.reset_parameters()
        self._pos_cache.clear()

    def position_embeddings(self, h: int, w: int) -> torch.Tensor:
        """Position embeddings for an h x w patch grid: [1, n_prefix + h*w, D].

        Interpolated tensors are cached per grid only where no gradient must flow into them (frozen
        encoder, inference); the key holds the parameter's version so an optimizer step invalidates it."""
        pos, g = self.pos_embed, self.grid
        if (h, w) == (g, g):
            return pos
        cacheable = not (torch.is_grad_enabled() and pos.requires_grad) and pos.device.type != "meta"
        key = (h, w, pos.device, pos.dtype, pos._version, pos.data_ptr()) if cacheable else ()
        if cacheable and key in self._pos_cache:
            return self._pos_cache[key]
        patches = interpolate_grid_embeddings(pos[:, self.n_prefix :], (g, g), (h, w))
        out = torch.cat([pos[:, : self.n_prefix], patches], dim=1)
        if cacheable:
            self._pos_cache = {k: v for k, v in self._pos_cache.items() if k[2:] == key[2:]}  # drop stale
            self._pos_cache[key] = out = out.detach()
        return out

    def embed_patches(self, pixels: torch.Tensor) -> torch.Tensor:
        """[N, 3, H, W] pixels -> [N, D, H/p, W/p] patch embeddings, in the weights' dtype."""
        return self.patch_embed(pixels.to(self.pos_embed.dtype))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        n, _, height, width = pixels.shape
        p = self.cfg.patch_size
        if height % p or width % p:
            raise ValueError(
                f"ViT: image of {height}x{width} px is not divisible by the patch size {p}; "
                f"resize or pad it to a multiple of {p}"
            )
        x = self.embed_patches(pixels)  # [N, D, h, w]
        h, w = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)  # [N, h*w, D]
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(n, -1, -1).to(x.dtype), x], dim=1)
        x = x + self.position_embeddings(h, w).to(x.dtype)  # [N, prefix + h*w, D]
        if self.pre_norm is not None:
            x = self.pre_norm(x)
        for block in self.blocks:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        if self.post_norm is not None:
            x = self.post_norm(x)
        return x[:, self.n_prefix :]  # [N, h*w, D]

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any, **kwargs: Any) -> None:
        """Position embeddings saved for another square grid are re-gridded on load (a pre-training
        checkpoint loaded for SFT at a higher resolution), as `resize_position_embeddings` would."""
        self._pos_cache.clear()
        regrid_on_load(state_dict, prefix + "pos_embed", self.pos_embed, self.n_prefix, (self.grid, self.grid))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def regrid_on_load(state_dict: dict, key: str, own: torch.Tensor, n_prefix: int, grid: tuple[int, int]) -> None:
    """Replace `state_dict[key]` ([1, n_prefix + s*s, D] for another square side s) by its bicubic
    re-gridding to `grid`; leave anything else for load_state_dict to judge."""
    saved = state_dict.get(key)
    if saved is None or saved.shape == own.shape or saved.dim() != 3 or saved.shape[-1] != own.shape[-1]:
        return
    side = math.isqrt(saved.shape[1] - n_prefix)
    if side * side != saved.shape[1] - n_prefix:
        return
    patches = interpolate_grid_embeddings(saved[:, n_prefix:], (side, side), grid)
    state_dict[key] = torch.cat([saved[:, :n_prefix], patches], dim=1)
    log.info("%s: re-gridded from %dx%d to %dx%d patches", key, side, side, *grid)


def resize_position_embeddings(state_dict_or_module: dict[str, torch.Tensor] | ViT, new_image_size: int):
    """Re-grid stored position embeddings for `new_image_size` (e.g. SFT at a higher resolution).

    Module: resized in place (its `cfg.image_size` updated; the parameter is replaced, so do this
    before building the optimizer), returned. State dict (a bare ViT's or a
    whole model's, any prefix): a shallow copy with every `<prefix>pos_embed` resized, using the patch
    size read from the sibling `<prefix>patch_embed.*` stem weights."""
    if isinstance(state_dict_or_module, ViT):
        vit = state_dict_or_module
        p = vit.cfg.patch_size
        if new_image_size % p:
            raise ValueError(f"new image size {new_image_size} is not a multiple of the patch size {p}")
        g = new_image_size // p
        patches = interpolate_grid_embeddings(vit.pos_embed.data[:, vit.n_prefix :], (vit.grid, vit.grid), (g, g))
        new = torch.cat([vit.pos_embed.data[:, : vit.n_prefix], patches], dim=1)
        vit.pos_embed = nn.Parameter(new, requires_grad=vit.pos_embed.requires_grad)
        vit.cfg.image_size = new_image_size
        vit._pos_cache.clear()
        return vit
    out = dict(state_dict_or_module)
    found = False
    for key, pos in state_dict_or_module.items():
        if not key.endswith("pos_embed"):
            continue
        prefix = key[: -len("pos_embed")]
        p = _stored_patch_size(state_dict_or_module, prefix + "patch_embed.")
        if p is None:
            continue  # some other module's pos_embed (e.g. a connector's): not a ViT's
        found = True
        if new_image_size % p:
            raise ValueError(f"{key}: new image size {new_image_size} is not a multiple of the patch size {p}")
        n_prefix = 1 if (prefix + "cls_token") in state_dict_or_module else 0
        old = math.isqrt(pos.shape[1] - n_prefix)
        g = new_image_size // p
        patches = interpolate_grid_embeddings(pos[:, n_prefix:], (old, old), (g, g))
        out[key] = torch.cat([pos[:, :n_prefix], patches], dim=1)
    if not found:
        raise ValueError(
            "resize_position_embeddings: no ViT `pos_embed` (with sibling `patch_embed.*` stem weights) "
            "in the state dict; is this an mm1 checkpoint?"
        )
    return out


def _stored_patch_size(state: dict[str, torch.Tensor], stem: str) -> int | None:
    """The patch size of the stem stored under the key prefix `stem` (None: no ViT stem there): the
    patchify kernel's side, or 2 ** (the conv stem's stride-2 convolutions)."""
    patchify = state.get(stem + "weight")
    if patchify is not None:
        return int(patchify.shape[-1])
    convs = [k for k, v in state.items() if k.startswith(stem + "convs.") and v.dim() == 4]
    return 2 ** len(convs) if convs else None
