"""Data: the synthetic world, real on-disk formats, images, tokenizer, packing and mixtures."""

SOURCE_KINDS: tuple[str, ...] = ("caption", "interleaved", "text", "sft")
