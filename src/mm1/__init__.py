"""mm1: build, pre-train, fine-tune, evaluate and ablate multimodal LLMs the MM1 way."""

__version__ = "0.1.0"
