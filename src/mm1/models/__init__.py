"""The model: image encoder -> connector -> language model, each chosen by name from a registry.

Importing this package fills the registries (`mm1.models.registry`)."""

from mm1.models import (
    connectors,  # noqa: F401,E402  (registers CONNECTORS)
    lm,  # noqa: F401,E402  (registers "llama")
    registry,  # noqa: F401  (first: the modules below register into it)
    vision,  # noqa: F401,E402  (registers ENCODERS 'vit')
)
from mm1.models.build import build_model  # noqa: E402
from mm1.models.mllm import MLLM, MLLMOutput  # noqa: E402

__all__ = ["MLLM", "MLLMOutput", "build_model"]
