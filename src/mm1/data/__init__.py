"""Data: the synthetic world, real on-disk formats, images, tokenizer, packing and mixtures.

The kinds of training data (caption, interleaved, text, sft, and any registered later) live in
`mm1.data.kinds`; a batch's `source` column is a kind's index in `KINDS.names()`."""
