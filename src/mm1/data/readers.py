"""Per-format record parsers behind `mm1.data.formats.SourceReader` (JSONL, parquet, LLaVA JSON).

Each parser walks one file, validates every sample against the layout in `formats.LAYOUTS`, reports
it to the tally as ok or as a skip with a short reason, and yields the good ones as records. Parquet
is read one row group at a time in small batches, never a whole file at once, so an OBELICS shard
with megabytes of image bytes per row stays within a worker's memory, and a damaged row group costs
only its own rows.
"""

from __future__ import annotations

import gzip
import json
import os
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from mm1.data.formats import (IMAGE_MARKER, CaptionRecord, InterleavedRecord, SFTRecord, TextRecord, _ROLES,
                              _Tally)
from mm1.data.safety import ReadPolicy, inside_root
from mm1.data.skips import DataError
from mm1.data.tars import check_caption

PARQUET_BATCH_ROWS = 64  # rows per Arrow batch; OBELICS rows can hold several MB of images


def _stem(file: str) -> str:
    return os.path.basename(file).split(".")[0]


def iter_jsonl(file: str, t: _Tally) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) per JSON-object line; malformed lines are counted and skipped."""
    opener = gzip.open if file.endswith(".gz") else open
    lineno = 0
    try:
        f = opener(file, "rb")
    except OSError as e:
        t.skip("unreadable file", file, str(e))
        return
    try:
        with f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
                    t.skip("malformed json line", f"{file}:line {lineno}", str(e))
                    continue
                if not isinstance(obj, dict):
                    t.skip("malformed json line", f"{file}:line {lineno}",
                           f"expected a JSON object, got {type(obj).__name__}")
                    continue
                yield lineno, obj
    except (OSError, EOFError) as e:  # a truncated .gz, an unreadable file
        t.skip("truncated file", f"{file}:line {lineno + 1}", f"{e}; the rest of the file is lost")
    except MemoryError:  # one line of gigabytes
        t.skip("line too large", f"{file}:line {lineno + 1}", "out of memory reading it; the rest of the file is lost")


def iter_parquet(file: str, required: list[str], optional: list[str],
                 t: _Tally) -> Iterator[tuple[int, dict[str, Any]]]:
    """(row index, {column: value}) per row, one row group and batch at a time."""
    try:
        pf = pq.ParquetFile(file)
    except (pa.ArrowException, OSError) as e:
        t.skip("unreadable file", file, f"not a readable parquet file: {e}")
        return
    names = pf.schema_arrow.names
    if any(c not in names for c in required):
        t.skip("unreadable file", file, f"needs columns {', '.join(required)}; has {', '.join(names)}")
        return
    cols = required + [c for c in optional if c in names]
    row = 0
    for rg in range(pf.num_row_groups):
        n_rows, first = pf.metadata.row_group(rg).num_rows, row
        try:
            for batch in pf.iter_batches(batch_size=PARQUET_BATCH_ROWS, row_groups=[rg], columns=cols):
                values = {c: batch.column(c).to_pylist() for c in cols}
                for i in range(batch.num_rows):
                    yield row, {c: values[c][i] for c in cols}
                    row += 1
        except (pa.ArrowException, OSError, MemoryError) as e:
            lost = max(1, n_rows - (row - first))
            t.skip("corrupt parquet row group", f"{file}:row group {rg}",
                   f"{e or type(e).__name__}; {lost} of its {n_rows} rows are lost", lost)
            row = sum(pf.metadata.row_group(i).num_rows for i in range(rg + 1))


def _local_image(value: Any, base: str, where: str, t: _Tally, policy: ReadPolicy) -> bytes | str | None:
    """An image cell as bytes or an absolute existing path inside `base` (the data file's folder or
    a declared root; `mm1.data.safety.inside_root`); None after counting a skip."""
    if isinstance(value, dict):  # HF `Image` feature: {"bytes": ..., "path": ...}
        value = value.get("bytes") or value.get("path")
    if isinstance(value, (bytes, bytearray)):
        if not value:
            t.skip("corrupt image", where, "image bytes are empty")
            return None
        return bytes(value)
    if not isinstance(value, str) or not value:
        t.skip("malformed image entry", where, f"expected image bytes or a path, got {type(value).__name__}")
        return None
    if value.startswith(("http://", "https://")):
        t.skip("image URL (not downloaded)", where, f"{value}: download the images (e.g. with img2dataset) first")
        return None
    path, refused = inside_root(value, base, policy)
    if refused:
        t.skip("image path outside the data", where, refused)
        return None
    if not os.path.isfile(path):
        t.skip("missing image file", where, f"{path} does not exist or is not a regular file")
        return None
    return path


def read_caption_manifest(file: str, t: _Tally, policy: ReadPolicy = ReadPolicy()) -> Iterator[CaptionRecord]:
    base = os.path.dirname(os.path.abspath(file))
    for lineno, obj in iter_jsonl(file, t):
        where = f"{file}:line {lineno}"
        if "image" not in obj:
            t.skip("missing image", where, "no 'image' field")
            continue
        image = _local_image(obj["image"], base, where, t, policy)
        if image is None:
            continue
        item = check_caption(obj.get("caption"), obj.get("dense"), where, t, image)
        if item is not None:
            t.ok()
            yield CaptionRecord(str(obj.get("key", obj.get("id", f"{_stem(file)}-{lineno}"))), where, *item)


def read_interleaved(file: str, t: _Tally, policy: ReadPolicy = ReadPolicy()) -> Iterator[InterleavedRecord]:
    base = os.path.dirname(os.path.abspath(file))
    for row, cells in iter_parquet(file, ["texts", "images"], ["id"], t):
        where = f"{file}:row {row}"
        texts, images = cells["texts"], cells["images"]
        if not isinstance(texts, list) or not isinstance(images, list):
            t.skip("malformed row", where, "texts and images must both be lists")
            continue
        if len(texts) != len(images):
            t.skip("texts/images length mismatch", where, f"{len(texts)} texts vs {len(images)} images")
            continue
        bad = next((i for i, (x, y) in enumerate(zip(texts, images)) if (x is None) == (y is None)), None)
        if bad is not None:
            which = "both a text and an image" if texts[bad] is not None else "neither a text nor an image"
            t.skip("not one of text/image per position", where, f"position {bad} has {which}")
            continue
        if not any(isinstance(x, str) and x.strip() for x in texts):
            t.skip("document without text", where, f"{sum(y is not None for y in images)} images and no text")
            continue
        resolved: list[bytes | str | None] = []
        for y in images:
            image = None if y is None else _local_image(y, base, where, t, policy)
            if y is not None and image is None:
                break  # counted once for the document
            resolved.append(image)
        if len(resolved) != len(images):
            continue
        key = str(cells["id"]) if cells.get("id") is not None else f"{_stem(file)}-{row}"
        t.ok()
        yield InterleavedRecord(key, where, texts, resolved)


def read_text(file: str, t: _Tally) -> Iterator[TextRecord]:
    rows = (iter_parquet(file, ["text"], ["id"], t) if file.endswith(".parquet") else iter_jsonl(file, t))
    unit = "row" if file.endswith(".parquet") else "line"
    for n, obj in rows:
        where = f"{file}:{unit} {n}"
        text = obj.get("text")
        if not isinstance(text, str):
            t.skip("missing text" if text is None else "non-string text", where,
                   "" if text is None else f"text is {type(text).__name__}")
            continue
        if not text.strip():
            t.skip("empty text", where)
            continue
        t.ok()
        yield TextRecord(str(obj["id"]) if obj.get("id") is not None else f"{_stem(file)}-{n}", where, text)


def _sft_items(file: str, t: _Tally) -> Iterator[tuple[str, Any]]:
    with open(file, "rb") as f:
        head = f.read(4096).lstrip()
    if file.endswith(".json") and head[:1] == b"[":
        try:
            with open(file, "rb") as f:
                data = json.load(f)
        except MemoryError:
            raise DataError(f"{file}: out of memory parsing this JSON list; convert it to JSONL (one sample per "
                            "line) so it is read line by line") from None
        except ValueError as e:
            raise DataError(f"{file}: not valid JSON ({e}); a LLaVA JSON file is one list of samples: fix the "
                            "file, or convert it to JSONL (one sample per line) so bad lines are skipped") from None
        for i, obj in enumerate(data):
            yield f"{file}:[{i}]", obj
    else:
        for lineno, obj in iter_jsonl(file, t):
            yield f"{file}:line {lineno}", obj


def read_sft(file: str, t: _Tally, image_root: str | None = None,
             policy: ReadPolicy = ReadPolicy()) -> Iterator[SFTRecord]:
    base = os.path.abspath(image_root) if image_root else os.path.dirname(os.path.abspath(file))
    for where, obj in _sft_items(file, t):
        record = _sft_record(obj, where, base, t, policy)
        if record is not None:
            t.ok()
            yield record


def _sft_record(obj: Any, where: str, base: str, t: _Tally, policy: ReadPolicy) -> SFTRecord | None:
    if not isinstance(obj, dict):
        t.skip("malformed sample", where, f"expected an object, got {type(obj).__name__}")
        return None
    key = str(obj.get("id", where.rsplit(":", 1)[-1]))
    where = f"{where} (id {key})" if "id" in obj else where
    turns = obj.get("conversations")
    if not isinstance(turns, list) or not turns:
        t.skip("malformed conversations", where, "'conversations' must be a non-empty list")
        return None
    convo: list[dict[str, str]] = []
    for i, turn in enumerate(turns):
        role = _ROLES.get(turn.get("from")) if isinstance(turn, dict) and isinstance(turn.get("from"), str) else None
        if role is None or not isinstance(turn.get("value"), str):
            t.skip("malformed conversations", where, f"turn {i} needs 'from' in human/gpt and a string 'value'")
            return None
        convo.append({"from": role, "value": turn["value"]})
    if not any(c["from"] == "gpt" for c in convo):
        t.skip("no assistant turn", where, "nothing to learn from: no 'gpt' turn")
        return None
    raw = obj.get("image", obj.get("images"))
    paths = [] if raw is None else [raw] if isinstance(raw, str) else raw
    if not isinstance(paths, list) or not all(isinstance(p, str) and p for p in paths):
        t.skip("malformed sample", where, "'image' must be a path or a list of paths")
        return None
    images: list[bytes | str] = []
    for p in paths:
        image = _local_image(p, base, where, t, policy)
        if image is None:
            return None
        images.append(image)
    in_assistant = sum(c["value"].count(IMAGE_MARKER) for c in convo if c["from"] != "human")
    in_human = sum(c["value"].count(IMAGE_MARKER) for c in convo if c["from"] == "human")
    if in_assistant:
        t.skip("image marker mismatch", where, f"{in_assistant} {IMAGE_MARKER} markers outside human turns")
        return None
    if in_human == 0 and images:  # LLaVA's convention: the image goes before the first question
        humans = [i for i, c in enumerate(convo) if c["from"] == "human"]
        if not humans:
            t.skip("image marker mismatch", where, "images but no human turn to place them in")
            return None
        first = humans[0]
        convo[first] = {"from": "human", "value": (IMAGE_MARKER + "\n") * len(images) + convo[first]["value"]}
    elif in_human != len(images):
        t.skip("image marker mismatch", where, f"{in_human} {IMAGE_MARKER} markers but {len(images)} images")
        return None
    return SFTRecord(key, where, images, convo)
