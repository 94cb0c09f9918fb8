"""Caption pairs: one image and its alt-text (plus an optional dense "synthetic" caption, the VeCap role).

On disk: WebDataset tar shards in img2dataset layout (`mm1.data.tars` reads them, damage included),
or a JSONL manifest of {"image": path, "caption": str}. A pair becomes `<image> caption</s>`; the
dense caption replaces the alt-text with probability `data.synthetic_caption_ratio` (decided per key,
so a resumed or re-sharded run picks the same). With `data.caption_text=tags` the text is the image's
labels instead (KEY.json "tags", as ImageNet-21k or OpenImages give them): supervised targets for an
encoder stage (`train.encoder_objective=superclass` classifies them), the third classic way to
pre-train an image encoder beside contrastive and reconstructive. Pairs are never split, and many are packed per row:
rows are bounded by `data.seq_len` alone, or 4096-token rows of 144-slot pairs could never be filled.
"""

from __future__ import annotations

import io
import os
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mm1.data import tars
from mm1.data.kinds.base import KINDS, DataKind, ReadContext
from mm1.data.readers import iter_jsonl, local_image, stem
from mm1.data.sequence import Doc, DocBuilder, SampleError, plain_text, unit_hash
from mm1.data.skips import Tally
from mm1.data.writers import dumps, tar_info


@dataclass
class CaptionRecord:
    key: str
    where: str
    image: bytes | str  # encoded bytes (tar member) or an absolute path (manifest)
    caption: str
    dense: str | None = None  # a dense "synthetic" caption (VeCap role), from KEY.json "dense"
    tags: str | None = None  # image-level labels, from KEY.json "tags" (a list of strings), space-joined


@KINDS.register("caption")
class Caption(DataKind):
    layout = (
        "WebDataset .tar shards in img2dataset layout (KEY.jpg|jpeg|png|webp + KEY.txt, optional KEY.json "
        "with a 'dense' caption and 'tags', a list of image-level labels), given as a directory, glob, "
        "brace pattern (shard-{00000..00009}.tar), list, "
        "or pipe:/http URL (with data.allow_commands=true); or a JSONL manifest of "
        '{"image": path, "caption": str} lines (paths relative to the manifest)'
    )
    suffixes = ((".tar", ".tar.gz", ".tgz"), (".jsonl", ".jsonl.gz"))  # a directory's tars, else its manifests
    streamable = True
    lookahead = 32
    images_per_row_bounded = False
    image_text_pairs = True

    def read(self, file: str, t: Tally, ctx: ReadContext) -> Iterator[CaptionRecord]:
        if file.lower().endswith((".jsonl", ".jsonl.gz")):
            yield from read_manifest(file, t, ctx)
            return
        sizes = ctx.state.setdefault("shard_sizes", tars.ShardSizes())  # what a complete shard holds
        for key, where, image, caption, dense, tags in tars.read_caption_tar(file, t, ctx.policy, sizes):
            yield CaptionRecord(key, where, image, caption, dense, tags)

    def to_docs(self, b: DocBuilder, rec: Any) -> list[Doc]:
        """`<image> caption</s>`; the dense caption with probability synthetic_caption_ratio (per key);
        with `data.caption_text=tags`, the image's labels instead (`<image> heart hexagon</s>`)."""
        if b.caption_text == "tags":
            text = getattr(rec, "tags", None) or ""
            if not text:
                raise SampleError(
                    "missing tags",
                    rec.where,
                    "data.caption_text=tags needs image-level labels: a 'tags' list of strings in KEY.json "
                    "(tar shards) or on the manifest line; this sample has none",
                )
        else:
            dense = getattr(rec, "dense", None)
            use_dense = bool(dense) and unit_hash(b.seed, "dense", rec.key) < b.synthetic_caption_ratio
            text = (dense if use_dense else rec.caption) or ""
        if not text.strip():
            raise SampleError("empty_caption", rec.where, "caption is empty")
        crops = b.crops(rec.image, rec.where)
        words = b.tokenizer.encode(" " + plain_text(text.strip())) + [b.tokenizer.eos_id]
        words = words[: b.seq_len - b.tokens_per_image]  # a caption longer than a row keeps its beginning
        ids = b.slot_run() + words
        return [Doc(ids, [False] * b.tokens_per_image + [True] * len(words), crops, rec.key)]


def read_manifest(file: str, t: Tally, ctx: ReadContext) -> Iterator[CaptionRecord]:
    base = os.path.dirname(os.path.abspath(file))
    for lineno, obj in iter_jsonl(file, t):
        where = f"{file}:line {lineno}"
        if "image" not in obj:
            t.skip("missing image", where, "no 'image' field")
            continue
        image = local_image(obj["image"], base, where, t, ctx.policy)
        if image is None:
            continue
        item = tars.check_caption(obj.get("caption"), obj.get("dense"), where, t, image, obj.get("tags"))
        if item is not None:
            t.ok()
            yield CaptionRecord(str(obj.get("key", obj.get("id", f"{stem(file)}-{lineno}"))), where, *item)


def write_caption_shard(path: str | Path, samples: Iterable[dict[str, Any]]) -> Path:
    """A tar in img2dataset layout. Each sample: {"key": str, "png"|"jpg"|...: bytes, "txt": str|bytes,
    "json": dict (optional)}; any other extension is written as given (bytes or str), so tests and
    users converting a handful of files produce exactly the layout the reader expects."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
        for sample in samples:
            key = str(sample["key"])
            for ext, value in sample.items():
                if ext == "key":
                    continue
                if ext == "json" and not isinstance(value, (bytes, str)):
                    value = dumps(value)
                data = value.encode("utf-8") if isinstance(value, str) else bytes(value)
                tar.addfile(tar_info(f"{key}.{ext}", len(data)), io.BytesIO(data))
    os.replace(tmp, path)
    return path
