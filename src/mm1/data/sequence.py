"""Documents -> packed rows -> batches: how every kind of sample becomes a training sequence.

A `Doc` is one packable unit: token ids with `<image>` already expanded to slot runs, which tokens
are learned, and the image crops that fill the slot runs. Each data kind turns its records into docs
with the `DocBuilder` helpers (`mm1.data.kinds`: a long interleaved or text record becomes several
docs, cut only between slot runs); `RowPacker` fills rows
of `seq_len` tokens from a small look-ahead buffer (oldest doc first so nothing starves, then
best-fit, which keeps caption packing above 95 %); `collate` writes the batch table of
CONTRIBUTING.md. Position ids restart and doc ids increment at every doc, so no token attends across
documents and the model never learns to predict one document from another.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from mm1.data.tokenizer import IMAGE_TOKEN, Tokenizer

ImageFn = Callable[[Any, str], list[torch.Tensor]]  # (bytes | path, where) -> crops [3,S,S] each


class SampleError(ValueError):
    """A record that cannot become a sequence; the loader counts it by `reason` and moves on."""

    def __init__(self, reason: str, where: str, message: str) -> None:
        super().__init__(f"{where}: {message}")
        self.reason, self.where = reason, where


@dataclass
class Doc:
    """A packable unit. learn[t] = token t is a prediction target (never a slot, prompt or pad)."""

    ids: list[int]
    learn: list[bool]
    images: list[torch.Tensor] = field(default_factory=list)  # [3,S,S] per crop, in order
    key: str = ""

    def __len__(self) -> int:
        return len(self.ids)


def unit_hash(*parts: Any) -> float:
    """A deterministic value in [0, 1) from `parts` (Python's hash() is salted per process)."""
    digest = hashlib.blake2b("\x1f".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64


def plain_text(text: str) -> str:
    """Raw text may contain a literal `<image>`; it must not turn into slots without an image."""
    return text.replace(IMAGE_TOKEN, "<image >")


@dataclass
class DocBuilder:
    """What every kind needs to turn its records into docs (`DataKind.to_docs`): one tokenizer, one
    image pipeline, the row limits, and the cutting of a long doc into pieces that fit a row."""

    tokenizer: Tokenizer
    images: ImageFn
    seq_len: int
    max_images: int
    tokens_per_image: int
    crops_per_image: int = 1
    synthetic_caption_ratio: float = 0.0
    seed: int = 0
    caption_text: str = "caption"  # data.caption_text: "caption" (alt-text / dense) or "tags"

    def slot_run(self) -> list[int]:
        """The slot ids one `<image>` expands to."""
        return [self.tokenizer.image_id] * self.tokens_per_image

    def crops(self, raw: Any, where: str) -> list[torch.Tensor]:
        """The image's crops, each [3, S, S] (a failure raises `SampleError`, counted by the loader)."""
        crops = self.images(raw, where)
        if len(crops) != self.crops_per_image:
            raise RuntimeError(f"{where}: image pipeline gave {len(crops)} crops, expected {self.crops_per_image}")
        return crops

    def cut(self, doc: Doc) -> list[Doc]:
        """`doc` in pieces that fit a row; pieces with nothing to learn (a trailing image) are dropped."""
        return [p for p in self.pieces(doc) if any(p.learn[1:])]

    def pieces(self, doc: Doc) -> list[Doc]:
        """Split `doc` into pieces of <= seq_len tokens and <= max_images images, never inside a
        slot run (an image that does not fit starts the next piece); each piece restarts at 0."""
        pieces, start = [], 0
        while start < len(doc):
            end = self.prefix_end(doc, start, self.seq_len, self.max_images)
            if end == start:  # cannot happen when seq_len > tokens_per_image (validated config)
                raise RuntimeError(
                    f"{doc.key}: an image's {self.tokens_per_image} slots do not fit data.seq_len={self.seq_len}"
                )
            pieces.append(self.slice(doc, start, end))
            start = end
        return pieces

    def prefix_end(self, doc: Doc, start: int, max_tokens: int, max_images: int) -> int:
        """End of the longest piece doc[start:end] with <= max_tokens tokens and <= max_images images
        that does not end inside a slot run (`start` must be on a run boundary)."""
        image_id, k = self.tokenizer.image_id, self.tokens_per_image
        t, images, n = start, 0, len(doc.ids)
        while t < n:
            if doc.ids[t] == image_id:  # pieces start on run boundaries, so this starts a run
                if t + k - start > max_tokens or images + 1 > max_images:
                    break
                images, t = images + 1, t + k
            elif t + 1 - start > max_tokens:
                break
            else:
                t += 1
        return t

    def slice(self, doc: Doc, start: int, end: int | None = None) -> Doc:
        """doc[start:end] as a doc of its own, with the crops of the slot runs inside it."""
        end = len(doc) if end is None else end
        runs_before = doc.ids[:start].count(self.tokenizer.image_id) // self.tokens_per_image
        runs = doc.ids[start:end].count(self.tokenizer.image_id) // self.tokens_per_image
        c0, c1 = runs_before * self.crops_per_image, (runs_before + runs) * self.crops_per_image
        return Doc(doc.ids[start:end], doc.learn[start:end], doc.images[c0:c1], doc.key)


class RowPacker:
    """Fills one row from a buffer: the oldest doc first, then repeatedly the longest doc that fits.

    With `split` (text and interleaved data), a row that no whole doc fits any more is topped up
    with the head of the oldest waiting doc, whose tail waits for the next row as a doc of its own
    (cut only between slot runs, exactly like a document longer than a row). Caption pairs and SFT
    conversations are never split: a caption without its image, or an answer without its question,
    teaches nothing.
    """

    MIN_SPLIT = 16  # don't split a doc to fill fewer tokens than this

    def __init__(self, seq_len: int, max_images: int, crops_per_image: int = 1) -> None:
        self.seq_len, self.max_images, self.crops = seq_len, max_images, crops_per_image

    def fill(
        self,
        buffer: list[Any],
        doc_of: Callable[[Any], Doc],
        refill: Callable[[], None],
        split: Callable[[Any, int, int], tuple[Any, Any] | None] | None = None,
    ) -> list[Any]:
        """Pop the entries of one row from `buffer` (refilled before each pick), in row order.

        split(entry, max_tokens, max_crops) -> (head, tail) or None when no useful head fits.
        """
        refill()
        if not buffer:
            raise RuntimeError("row packer got an empty buffer")
        row = [buffer.pop(0)]
        used = len(doc_of(row[0]))
        crops, max_crops = len(doc_of(row[0]).images), self.max_images * self.crops
        while used < self.seq_len:
            refill()
            best, best_len = -1, 0
            for i, entry in enumerate(buffer):
                doc = doc_of(entry)
                fits = len(doc) <= self.seq_len - used and crops + len(doc.images) <= max_crops
                if fits and len(doc) > best_len:
                    best, best_len = i, len(doc)
            if best < 0:
                if split is None or not buffer or self.seq_len - used < self.MIN_SPLIT:
                    break
                parts = split(buffer[0], self.seq_len - used, max_crops - crops)
                if parts is None:
                    break
                best, buffer[0] = 0, parts[1]
                buffer.insert(0, parts[0])
                best_len = len(doc_of(parts[0]))
            entry = buffer.pop(best)
            row.append(entry)
            used += best_len
            crops += len(doc_of(entry).images)
        return row


def collate(
    rows: Sequence[Sequence[Doc]], seq_len: int, pad_id: int, image_id: int, sources: Sequence[int], image_size: int = 1
) -> dict[str, torch.Tensor]:
    """The batch table of CONTRIBUTING.md from rows of docs (targets shifted, -100 where no loss)."""
    B = len(rows)
    input_ids = torch.full((B, seq_len), pad_id, dtype=torch.long)  # [B, T]
    targets = torch.full((B, seq_len), -100, dtype=torch.long)  # [B, T]
    position_ids = torch.zeros((B, seq_len), dtype=torch.long)  # [B, T]
    doc_ids = torch.full((B, seq_len), -1, dtype=torch.long)  # [B, T]
    images: list[torch.Tensor] = []
    for b, row in enumerate(rows):
        t = 0
        for d, doc in enumerate(row):
            n = len(doc)
            if t + n > seq_len:
                raise RuntimeError(f"row {b} overflows data.seq_len={seq_len} at doc {doc.key}")
            ids = torch.tensor(doc.ids, dtype=torch.long)
            nxt = ids[1:].clone()
            nxt[~torch.tensor(doc.learn[1:], dtype=torch.bool) | (nxt == image_id)] = -100
            input_ids[b, t : t + n] = ids
            targets[b, t : t + n - 1] = nxt  # the doc's last token predicts nothing: doc end
            position_ids[b, t : t + n] = torch.arange(n)
            doc_ids[b, t : t + n] = d
            images += doc.images
            t += n
    slots = int((input_ids == image_id).sum())
    if images and slots % len(images):
        raise RuntimeError(f"{slots} image slots do not split evenly over {len(images)} crops")
    return {
        "input_ids": input_ids,
        "targets": targets,
        "position_ids": position_ids,
        "doc_ids": doc_ids,
        "images": torch.stack(images) if images else torch.zeros(0, 3, image_size, image_size),  # [N, 3, H, W]
        "source": torch.tensor(list(sources), dtype=torch.long),  # [B]
    }


def packing_efficiency(batch: dict[str, torch.Tensor]) -> float:
    """Share of the batch's token positions holding a real (non-pad) token."""
    return float((batch["doc_ids"] >= 0).float().mean())
