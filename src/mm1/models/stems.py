"""How the ViT turns pixels into patch tokens: `model.vision.stem`.

`patch` (the default) is the ViT/CLIP/SigLIP patchify: one convolution with kernel = stride = the
patch size, the only stem a pre-trained HF tower has. `conv` is the convolutional stem of Xiao et
al. 2021 ("Early convolutions help transformers see better"): log2(patch) 3x3 stride-2 convolutions,
each followed by a GELU, channels doubling up to the ViT width, then a 1x1 projection; the output grid
is patchify's. It has no normalisation, unlike the paper's BatchNorm (which ties a sample's features
to its batch): a GroupNorm version standardised each channel over the image, so colour was only seen
relative to the background, and the MLLM trained on it lost colour (connector colour probe 34 %).

Measured on the tiny world (docs/grounding.md section 10): supervised, the conv stem learns the
shapes of small objects that patchify hardly does (`benchmarks/learnability.py --scenes tiny`), and in
`mm1 demo` it made the model read count and position from the image; but the demo's captions got
worse (pre-trained CIDEr 52 at 128 px, 33 at 64 px, against 84 with patchify) and shape stayed at
chance after SFT. With the ViT at 0.3 x the LR in MLLM pre-training it came back to CIDEr 77 and
0-shot VQA 41.6 (patchify 39.6), not yet measured further. So the tiny preset keeps patchify for now.

Both stems map [N, 3, H, W] to [N, width, H/p, W/p] and own their initialisation (`reset_parameters`,
through `nn.init` so that `mm1.train.materialise` can seed it per parameter).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from mm1.config import VisionConfig

STEM_MIN_CHANNELS = 16  # the first convolutions of a narrow ViT keep at least this many channels


class PatchStem(nn.Conv2d):
    """Patchify: kernel = stride = patch size. State keys `weight`, `bias`, as HF's patch embedding."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__(3, cfg.width, kernel_size=cfg.patch_size, stride=cfg.patch_size)

    def reset_parameters(self) -> None:
        # unit-variance patch embeddings for unit-variance pixels: the scale the position embeddings
        # are initialised at (model.vision.pos_init_std)
        nn.init.trunc_normal_(self.weight, std=1.0 / math.sqrt(self.weight[0].numel()))
        nn.init.zeros_(self.bias)


class ConvStem(nn.Module):
    """log2(p) x [3x3 stride-2 conv, GELU], channels doubling to `width`, then a 1x1 conv."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        n = int(math.log2(cfg.patch_size))
        widths = [max(STEM_MIN_CHANNELS, cfg.width >> (n - i)) for i in range(1, n + 1)]
        layers: list[nn.Module] = []
        c_in = 3
        for c in widths:
            layers += [nn.Conv2d(c_in, c, 3, stride=2, padding=1), nn.GELU()]
            c_in = c
        self.convs = nn.Sequential(*layers)
        self.proj = nn.Conv2d(c_in, cfg.width, kernel_size=1)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for m in self.convs:
            if isinstance(m, nn.Conv2d):  # He init: the GELU halves the variance the next conv sees
                nn.init.trunc_normal_(m.weight, std=math.sqrt(2.0 / m.weight[0].numel()))
                nn.init.zeros_(m.bias)
        nn.init.trunc_normal_(self.proj.weight, std=1.0 / math.sqrt(self.proj.weight[0].numel()))
        nn.init.zeros_(self.proj.bias)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.proj(self.convs(pixels))


STEMS: dict[str, type[nn.Module]] = {"patch": PatchStem, "conv": ConvStem}


def stem_problem(cfg: VisionConfig) -> str:
    """Why `cfg` cannot build its stem ("" when it can): the config check's message."""
    if cfg.stem not in STEMS:
        return f"must be one of {', '.join(STEMS)}"
    p = cfg.patch_size
    if cfg.stem == "conv" and (p < 2 or p & (p - 1)):
        return f"the conv stem halves the grid per 3x3 convolution: model.vision.patch_size={p} must be a power of 2"
    if cfg.stem == "conv" and cfg.hf_path:
        return "a pre-trained HF vision tower (model.vision.hf_path) has a patchify stem: use stem=patch"
    return ""
