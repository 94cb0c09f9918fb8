"""Interleaved documents: text and images in reading order (the OBELICS role, MM1's few-shot driver).

On disk: parquet in OBELICS layout, columns `texts: list<string|null>` and `images:
list<binary|string|null>` (encoded bytes or paths), exactly one non-null per position. A document
becomes its texts and `<image>` slot runs in order, cut into pieces of at most `data.seq_len` tokens
and `data.max_images` images (never inside a slot run); a piece may also be cut to top up a row.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from mm1.data.kinds.base import KINDS, DataKind, ReadContext, require_columns
from mm1.data.readers import iter_parquet, local_image, stem
from mm1.data.sequence import Doc, DocBuilder, SampleError, plain_text
from mm1.data.skips import Tally


@dataclass
class InterleavedRecord:
    key: str
    where: str
    texts: list[str | None]
    images: list[bytes | str | None]  # exactly one of texts[i], images[i] is not None


@KINDS.register("interleaved")
class Interleaved(DataKind):
    layout = (
        "parquet files in OBELICS layout: columns texts: list<string|null> and images: "
        "list<binary|string|null> (encoded image bytes or local paths), exactly one non-null per position"
    )
    suffixes = ((".parquet",),)
    lookahead = 4
    splittable = True

    def check_parquet(self, file: str, schema: pa.Schema) -> None:
        require_columns(file, schema, ("texts", "images"), self.layout, lists=True)

    def read(self, file: str, t: Tally, ctx: ReadContext) -> Iterator[InterleavedRecord]:
        base = os.path.dirname(os.path.abspath(file))
        for row, cells in iter_parquet(file, ["texts", "images"], ["id"], t):
            where = f"{file}:row {row}"
            record = _record(cells, where, base, t, ctx)
            if record is not None:
                t.ok()
                yield InterleavedRecord(
                    str(cells["id"]) if cells.get("id") is not None else f"{stem(file)}-{row}", where, *record
                )

    def to_docs(self, b: DocBuilder, rec: Any) -> list[Doc]:
        """Texts and images in document order, cut into docs of <= seq_len tokens / max_images images."""
        if len(rec.texts) != len(rec.images):
            raise SampleError("bad_interleaved", rec.where, f"{len(rec.texts)} texts vs {len(rec.images)} images")
        ids: list[int] = []
        learn: list[bool] = []
        crops: list[torch.Tensor] = []
        prev_text = ""
        for i, (text, image) in enumerate(zip(rec.texts, rec.images)):
            if (text is None) == (image is None):
                raise SampleError(
                    "bad_interleaved",
                    f"{rec.where} position {i}",
                    "needs exactly one of texts[i] / images[i] to be non-null",
                )
            if image is not None:
                crops += b.crops(image, f"{rec.where} image {i}")
                ids += b.slot_run()
                learn += [False] * b.tokens_per_image
                prev_text = ""
                continue
            if prev_text and not prev_text[-1].isspace() and text[:1] and not text[0].isspace():
                text = " " + text  # two adjacent paragraphs would otherwise glue words together
            piece = b.tokenizer.encode(plain_text(text))
            ids += piece
            learn += [True] * len(piece)
            prev_text = text
        ids.append(b.tokenizer.eos_id)
        learn.append(True)
        return b.cut(Doc(ids, learn, crops, rec.key))


def _record(
    cells: dict[str, Any], where: str, base: str, t: Tally, ctx: ReadContext
) -> tuple[list[str | None], list[bytes | str | None]] | None:
    """(texts, images with paths resolved) of one row, or None after counting why it is unusable."""
    texts, images = cells["texts"], cells["images"]
    if not isinstance(texts, list) or not isinstance(images, list):
        t.skip("malformed row", where, "texts and images must both be lists")
        return None
    if len(texts) != len(images):
        t.skip("texts/images length mismatch", where, f"{len(texts)} texts vs {len(images)} images")
        return None
    bad = next((i for i, (x, y) in enumerate(zip(texts, images)) if (x is None) == (y is None)), None)
    if bad is not None:
        which = "both a text and an image" if texts[bad] is not None else "neither a text nor an image"
        t.skip("not one of text/image per position", where, f"position {bad} has {which}")
        return None
    if not any(isinstance(x, str) and x.strip() for x in texts):
        t.skip("document without text", where, f"{sum(y is not None for y in images)} images and no text")
        return None
    resolved: list[bytes | str | None] = []
    for y in images:
        image = None if y is None else local_image(y, base, where, t, ctx.policy)
        if y is not None and image is None:
            return None  # counted once for the document
        resolved.append(image)
    return texts, resolved


def write_interleaved_parquet(
    path: str | Path, docs: Iterable[dict[str, Any]], row_group_size: int = 64, image_type: str = "binary"
) -> Path:
    """OBELICS layout: each doc {"texts": [str|None], "images": [bytes|str|None], "id": str (optional)}.
    `image_type` "binary" (encoded bytes) or "string" (paths). Lists are written as given, unchecked,
    so tests can write malformed rows on purpose (the world writes its own: `mm1.data.world.writers`)."""
    docs = list(docs)
    columns: dict[str, pa.Array] = {
        "texts": pa.array([d["texts"] for d in docs], type=pa.list_(pa.string())),
        "images": pa.array(
            [d["images"] for d in docs], type=pa.list_(pa.binary() if image_type == "binary" else pa.string())
        ),
    }
    if any("id" in d for d in docs):
        columns["id"] = pa.array([str(d.get("id", i)) for i, d in enumerate(docs)], type=pa.string())
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path, row_group_size=row_group_size)
    return Path(path)
