"""Registries of model components, filled when `mm1.models` is imported; each entry may carry the
rules a config choosing it must meet (`mm1.registry`)."""

from mm1.registry import Registry, at_key

ENCODERS: Registry = Registry("image encoder", "model.vision.kind", at_key("model.vision.kind"))
CONNECTORS: Registry = Registry("connector", "model.connector.kind", at_key("model.connector.kind"))
LANGUAGE_MODELS: Registry = Registry("language model", "model.lm.kind", at_key("model.lm.kind"))
