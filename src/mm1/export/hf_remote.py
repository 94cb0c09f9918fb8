"""The modeling file an export carries when LLaVA's own projector cannot express the model.

transformers' LLaVA already has everything else (CLIP/SigLIP tower, Llama/Qwen2 decoder, slot
scatter, generation); only the projector differs. So the file subclasses `LlavaForConditionalGeneration`
and swaps its `multi_modal_projector` for one that runs mm1's connector (after the ViT's final norm
when mm1 applies one). The connector code is not re-written for the export: the file is assembled
from the source of `mm1.models.connectors` itself (`inspect.getsource`), so the exported model runs
the very code mm1 trained, and the folder works without mm1 installed.
"""

from __future__ import annotations

import inspect
import textwrap

from mm1 import registry
from mm1.models import connectors, vision
from mm1.models.registry import CONNECTORS

MODULE = "modeling_mm1_llava"
MODEL_TYPE = "mm1_llava"

# What the connector classes need, in dependency order.
_FROM_REGISTRY = [registry.check]  # the rule helper the connectors' own checks call
_FROM_VISION = [vision.interpolate_grid_embeddings, vision.regrid_on_load]
_FROM_CONNECTORS = [
    connectors._pair,
    connectors.infer_grid,
    connectors._pooled_side,
    connectors._check_heads,
    connectors.OutputNorm,
    connectors.readout,
    connectors._Connector,
    connectors.MLPConnector,
    connectors.AvgPoolConnector,
    connectors.AttnPoolConnector,
    connectors.LayerNorm2d,
    connectors.SqueezeExcite,
    connectors.RegBottleneck,
    connectors.reg_stage,
    connectors.CAbstractor,
]

_HEADER = '''"""mm1's connector in front of transformers' LLaVA (written by `mm1 export --format hf`).

Load with `AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True)`. Everything but
the projector is transformers' own LlavaForConditionalGeneration; the projector applies the vision
tower's final LayerNorm when mm1 did (`mm1_feature_norm`) and then mm1's connector (`mm1_connector`).
The connector code below is mm1's, copied verbatim from mm1.models.connectors at export time.
"""

from __future__ import annotations

import logging
import math
from types import SimpleNamespace
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlavaConfig, LlavaForConditionalGeneration

log = logging.getLogger(__name__)
ConfigError = ValueError
'''

_GLUE = '''

class MM1LlavaConfig(LlavaConfig):
    """LlavaConfig plus `mm1_connector` (mm1's ConnectorConfig fields) and `mm1_feature_norm`."""

    model_type = "{model_type}"


class MM1Projector(nn.Module):
    """[N, h*w, D_v] tower features -> [N, k, D_lm] slot embeddings, as mm1 computes them."""

    def __init__(self, config: MM1LlavaConfig) -> None:
        super().__init__()
        v, t = config.vision_config, config.text_config
        spec = dict(config.mm1_connector)
        self.post_norm = nn.LayerNorm(v.hidden_size, eps=v.layer_norm_eps) if config.mm1_feature_norm else None
        self.connector = CONNECTORS[spec["kind"]](SimpleNamespace(**spec), v.hidden_size, t.hidden_size,
                                                  v.image_size // v.patch_size)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if self.post_norm is not None:
            features = self.post_norm(features)
        return self.connector(features)


class MM1LlavaForConditionalGeneration(LlavaForConditionalGeneration):
    config_class = MM1LlavaConfig

    def __init__(self, config: MM1LlavaConfig) -> None:
        super().__init__(config)
        self.model.multi_modal_projector = MM1Projector(config)
        self.post_init()
'''


def _source(obj: object) -> str:
    return textwrap.dedent(inspect.getsource(obj)).rstrip() + "\n"


def modeling_source() -> str:
    """The text of `modeling_mm1_llava.py`."""
    unlisted = [n for n in CONNECTORS.names() if CONNECTORS.get(n) not in _FROM_CONNECTORS]
    if unlisted:  # a connector added to mm1 but not here: its class would be missing from the file
        raise RuntimeError(f"mm1.export.hf_remote: add the source of connector(s) {unlisted} to _FROM_CONNECTORS")
    parts = [_HEADER] + [_source(f) for f in _FROM_REGISTRY + _FROM_VISION + _FROM_CONNECTORS]
    table = ", ".join(f'"{name}": {CONNECTORS.get(name).__name__}' for name in CONNECTORS.names())
    parts.append(f"CONNECTORS = {{{table}}}\n")
    parts.append(_GLUE.format(model_type=MODEL_TYPE))
    return "\n\n".join(parts)


def remote_config_fields(connector: dict, feature_norm: bool) -> dict:
    """What config.json needs for transformers to find and build the modeling file's classes."""
    return {
        "architectures": ["MM1LlavaForConditionalGeneration"],
        "model_type": MODEL_TYPE,
        "auto_map": {
            "AutoConfig": f"{MODULE}.MM1LlavaConfig",
            "AutoModelForImageTextToText": f"{MODULE}.MM1LlavaForConditionalGeneration",
        },
        "mm1_connector": connector,
        "mm1_feature_norm": feature_norm,
    }
