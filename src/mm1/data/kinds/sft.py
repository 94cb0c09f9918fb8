"""Supervised fine-tuning conversations (LLaVA format), loss on the assistant's turns only.

On disk: a LLaVA JSON list or JSONL of {"id", "image": path or [paths] (relative to the JSON file,
or to `data.sft`'s image root), "conversations": [{"from": "human"|"gpt", "value": str}]}. A sample
without `<image>` markers gets its images before the first question (LLaVA's convention). A
conversation becomes one chat-template document; it is never split (an answer without its question
teaches nothing), only truncated to a row, and `data.max_images` bounds its images.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from mm1.data.kinds.base import KINDS, DataKind, ReadContext, check_json_head
from mm1.data.readers import iter_jsonl, local_image
from mm1.data.sequence import Doc, DocBuilder, SampleError
from mm1.data.skips import DataError, Tally
from mm1.data.tokenizer import IMAGE_TOKEN

ROLES = {"human": "human", "user": "human", "gpt": "gpt", "assistant": "gpt", "system": "system"}


@dataclass
class SFTRecord:
    key: str
    where: str
    images: list[bytes | str]  # absolute paths, one per `<image>` marker, in order
    conversations: list[dict[str, str]]  # [{"from": "human"|"gpt"|"system", "value": str}]


@KINDS.register("sft")
class SFT(DataKind):
    layout = (
        'LLaVA JSON (a list) or JSONL of {"id", "image": path or [paths] (optional, relative to the JSON '
        'file), "conversations": [{"from": "human"|"gpt", "value": str}]}'
    )
    suffixes = ((".json", ".jsonl"),)
    lookahead = 8

    def check_file(self, file: str, suffix: str) -> None:
        check_json_head(file, suffix, self.layout, lists=True)

    def read(self, file: str, t: Tally, ctx: ReadContext) -> Iterator[SFTRecord]:
        base = os.path.abspath(ctx.image_root) if ctx.image_root else os.path.dirname(os.path.abspath(file))
        for where, obj in _items(file, t):
            record = _record(obj, where, base, t, ctx)
            if record is not None:
                t.ok()
                yield record

    def to_docs(self, b: DocBuilder, rec: Any) -> list[Doc]:
        """Chat template, loss on assistant turns only; a conversation longer than a row is truncated."""
        turns = [dict(t) for t in rec.conversations]
        markers = sum(str(t.get("value", t.get("content", ""))).count(IMAGE_TOKEN) for t in turns)
        if markers == 0 and rec.images and turns:  # LLaVA files may omit the marker: image goes first
            key = "value" if "value" in turns[0] else "content"
            turns[0][key] = IMAGE_TOKEN + "\n" + str(turns[0].get(key, ""))
            markers = len(rec.images)
        if markers != len(rec.images):
            raise SampleError(
                "image_count_mismatch", rec.where, f"{markers} {IMAGE_TOKEN} markers but {len(rec.images)} images"
            )
        try:
            ids, learn = b.tokenizer.chat(turns, b.tokens_per_image)
        except ValueError as e:
            raise SampleError("bad_conversation", rec.where, str(e)) from None
        crops = [c for i, img in enumerate(rec.images) for c in b.crops(img, f"{rec.where} image {i}")]
        doc = Doc(ids, learn, crops, rec.key)
        head = b.pieces(doc)[0] if len(ids) > b.seq_len or len(rec.images) > b.max_images else doc
        if not any(head.learn[1:]):
            raise SampleError("too_long", rec.where, f"no assistant tokens within data.seq_len={b.seq_len}")
        return [head]


def _items(file: str, t: Tally) -> Iterator[tuple[str, Any]]:
    """(where, sample) of a JSON list (read whole) or of a JSONL file (line by line)."""
    with open(file, "rb") as f:
        head = f.read(4096).lstrip()
    if file.endswith(".json") and head[:1] == b"[":
        try:
            with open(file, "rb") as f:
                data = json.load(f)
        except MemoryError:
            raise DataError(
                f"{file}: out of memory parsing this JSON list; convert it to JSONL (one sample per "
                "line) so it is read line by line"
            ) from None
        except ValueError as e:
            raise DataError(
                f"{file}: not valid JSON ({e}); a LLaVA JSON file is one list of samples: fix the "
                "file, or convert it to JSONL (one sample per line) so bad lines are skipped"
            ) from None
        for i, obj in enumerate(data):
            yield f"{file}:[{i}]", obj
    else:
        for lineno, obj in iter_jsonl(file, t):
            yield f"{file}:line {lineno}", obj


def _record(obj: Any, where: str, base: str, t: Tally, ctx: ReadContext) -> SFTRecord | None:
    if not isinstance(obj, dict):
        t.skip("malformed sample", where, f"expected an object, got {type(obj).__name__}")
        return None
    key = str(obj.get("id", where.rsplit(":", 1)[-1]))
    where = f"{where} (id {key})" if "id" in obj else where
    convo = _conversation(obj.get("conversations"), where, t)
    if convo is None:
        return None
    raw = obj.get("image", obj.get("images"))
    paths = [] if raw is None else [raw] if isinstance(raw, str) else raw
    if not isinstance(paths, list) or not all(isinstance(p, str) and p for p in paths):
        t.skip("malformed sample", where, "'image' must be a path or a list of paths")
        return None
    images: list[bytes | str] = []
    for p in paths:
        image = local_image(p, base, where, t, ctx.policy)
        if image is None:
            return None
        images.append(image)
    in_assistant = sum(c["value"].count(IMAGE_TOKEN) for c in convo if c["from"] != "human")
    in_human = sum(c["value"].count(IMAGE_TOKEN) for c in convo if c["from"] == "human")
    if in_assistant:
        t.skip("image marker mismatch", where, f"{in_assistant} {IMAGE_TOKEN} markers outside human turns")
        return None
    if in_human == 0 and images:  # LLaVA's convention: the image goes before the first question
        humans = [i for i, c in enumerate(convo) if c["from"] == "human"]
        if not humans:
            t.skip("image marker mismatch", where, "images but no human turn to place them in")
            return None
        first = humans[0]
        convo[first] = {"from": "human", "value": (IMAGE_TOKEN + "\n") * len(images) + convo[first]["value"]}
    elif in_human != len(images):
        t.skip("image marker mismatch", where, f"{in_human} {IMAGE_TOKEN} markers but {len(images)} images")
        return None
    return SFTRecord(key, where, images, convo)


def _conversation(turns: Any, where: str, t: Tally) -> list[dict[str, str]] | None:
    """The turns with roles normalised to human/gpt/system, or None after counting why not."""
    if not isinstance(turns, list) or not turns:
        t.skip("malformed conversations", where, "'conversations' must be a non-empty list")
        return None
    convo: list[dict[str, str]] = []
    for i, turn in enumerate(turns):
        role = ROLES.get(turn.get("from")) if isinstance(turn, dict) and isinstance(turn.get("from"), str) else None
        if role is None or not isinstance(turn.get("value"), str):
            t.skip("malformed conversations", where, f"turn {i} needs 'from' in human/gpt and a string 'value'")
            return None
        convo.append({"from": role, "value": turn["value"]})
    if not any(c["from"] == "gpt" for c in convo):
        t.skip("no assistant turn", where, "nothing to learn from: no 'gpt' turn")
        return None
    return convo
