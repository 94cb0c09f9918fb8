"""Byte-deterministic file writers shared by the synthetic world and the data kinds' own writers.

Every source of byte-level nondeterminism is pinned: tar members get mtime 0, uid/gid 0, empty
owner names and mode 0644; JSON is dumped with a fixed separator style, `ensure_ascii=False` and a
trailing newline. So the same records always give the same bytes, and a checksum of a world
identifies it. The writers of one kind's format (a caption tar, an interleaved parquet) live in that
kind's module (`mm1.data.kinds`); bulk corpus building is the world's job (`mm1.data.world`).
"""

from __future__ import annotations

import json
import tarfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any


def tar_info(name: str, size: int) -> tarfile.TarInfo:
    """A regular tar member header with nothing in it that depends on the machine or the time."""
    ti = tarfile.TarInfo(name)
    ti.size = size
    ti.mtime = 0
    ti.mode = 0o644
    ti.uid = ti.gid = 0
    ti.uname = ti.gname = ""
    ti.type = tarfile.REGTYPE
    return ti


def dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(", ", ": "))


def write_json(path: Path, obj: Any, indent: int | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(obj, ensure_ascii=False, indent=indent) if indent else dumps(obj)
    path.write_text(text + "\n", encoding="utf-8")


def write_jsonl(path: str | Path, rows: Iterable[Any]) -> Path:
    """One JSON value per line; a `str` row is written verbatim (tests write malformed lines on purpose)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write((row if isinstance(row, str) else dumps(row)) + "\n")
    return path


def write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
