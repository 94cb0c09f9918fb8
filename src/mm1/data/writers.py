"""Small writers for the formats `formats.py` reads: a caption tar shard, an interleaved parquet file,
JSONL. They exist so tests (and users converting a handful of files) produce exactly the layouts
the readers expect; bulk corpus building is the synthetic world's job (`mm1.data.world`).
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path
from typing import Any, Iterable

import pyarrow as pa
import pyarrow.parquet as pq


def write_caption_shard(path: str | Path, samples: Iterable[dict[str, Any]]) -> Path:
    """A tar in img2dataset layout. Each sample: {"key": str, "png"|"jpg"|...: bytes, "txt": str|bytes,
    "json": dict (optional)}; any other extension is written as given (bytes or str)."""
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
                    value = json.dumps(value, ensure_ascii=False)
                data = value.encode("utf-8") if isinstance(value, str) else bytes(value)
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mode, info.mtime = len(data), 0o644, 0  # mtime 0: byte-identical reruns
                tar.addfile(info, io.BytesIO(data))
    os.replace(tmp, path)
    return path


def write_interleaved_parquet(path: str | Path, docs: Iterable[dict[str, Any]], row_group_size: int = 64,
                              image_type: str = "binary") -> Path:
    """OBELICS layout: each doc {"texts": [str|None], "images": [bytes|str|None], "id": str (optional)}.
    `image_type` "binary" (encoded bytes) or "string" (paths). Lists are written as given, unchecked,
    so tests can write malformed rows on purpose."""
    docs = list(docs)
    columns: dict[str, pa.Array] = {
        "texts": pa.array([d["texts"] for d in docs], type=pa.list_(pa.string())),
        "images": pa.array([d["images"] for d in docs],
                           type=pa.list_(pa.binary() if image_type == "binary" else pa.string())),
    }
    if any("id" in d for d in docs):
        columns["id"] = pa.array([str(d.get("id", i)) for i, d in enumerate(docs)], type=pa.string())
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path, row_group_size=row_group_size)
    return Path(path)


def write_text_parquet(path: str | Path, texts: list[Any], row_group_size: int = 1024) -> Path:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"text": pa.array(texts, type=pa.string())}), path, row_group_size=row_group_size)
    return Path(path)


def write_jsonl(path: str | Path, rows: Iterable[Any]) -> Path:
    """One JSON value per line; a `str` row is written verbatim (for deliberately malformed lines)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write((row if isinstance(row, str) else json.dumps(row, ensure_ascii=False)) + "\n")
    return Path(path)
