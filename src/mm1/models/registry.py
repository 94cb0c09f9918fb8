"""Registries of model components, filled when `mm1.models` is imported."""

from mm1.registry import Registry

ENCODERS: Registry = Registry("image encoder", "model.vision.kind")
CONNECTORS: Registry = Registry("connector", "model.connector.kind")
LANGUAGE_MODELS: Registry = Registry("language model", "model.lm.kind")
