"""The model: image encoder -> connector -> language model, each chosen by name from a registry.

Importing this package fills the registries (`mm1.models.registry`)."""

from mm1.models import registry  # noqa: F401  (first: the modules below register into it)
