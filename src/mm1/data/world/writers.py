"""Writers for the real on-disk formats, with every source of byte-level nondeterminism pinned.

tar members get mtime 0, uid/gid 0, empty owner names and mode 0644; parquet is written with fixed
compression, row-group size and no statistics timestamps (parquet has none); JSON is dumped with a
fixed separator style and a trailing newline. So the same records always give the same bytes, and
a user's checksum of a world identifies it.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from typing import Any, Iterable

import pyarrow as pa
import pyarrow.parquet as pq


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.size = size
    ti.mtime = 0
    ti.mode = 0o644
    ti.uid = ti.gid = 0
    ti.uname = ti.gname = ""
    ti.type = tarfile.REGTYPE
    return ti


class ShardWriter:
    """WebDataset shards in img2dataset layout: `KEY.png`, `KEY.txt`, `KEY.json`, `per_shard` samples each."""

    def __init__(self, folder: Path, per_shard: int) -> None:
        self.folder = folder
        self.per_shard = per_shard
        self.folder.mkdir(parents=True, exist_ok=True)
        self.count = 0
        self.shards: list[Path] = []
        self._tar: tarfile.TarFile | None = None

    def write(self, key: str, members: dict[str, bytes]) -> None:
        if self.count % self.per_shard == 0:
            self._open(self.count // self.per_shard)
        assert self._tar is not None
        for ext, data in members.items():
            self._tar.addfile(_tarinfo(f"{key}.{ext}", len(data)), io.BytesIO(data))
        self.count += 1

    def _open(self, shard: int) -> None:
        self.close()
        path = self.folder / f"shard-{shard:06d}.tar"
        self._tar = tarfile.open(path, "w", format=tarfile.USTAR_FORMAT)
        self.shards.append(path)

    def close(self) -> None:
        if self._tar is not None:
            self._tar.close()
            self._tar = None


INTERLEAVED_SCHEMA = pa.schema([
    ("id", pa.string()),
    ("texts", pa.list_(pa.string())),
    ("images", pa.list_(pa.binary())),
])


def write_parquet(path: Path, rows: list[dict]) -> None:
    """OBELICS layout: `texts` and `images` lists of equal length, exactly one non-null per position."""
    table = pa.Table.from_pylist(rows, schema=INTERLEAVED_SCHEMA)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, compression="zstd", compression_level=3, row_group_size=128,
                   write_statistics=False, use_dictionary=["id"], data_page_version="1.0")


def dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(", ", ": "))


def write_json(path: Path, obj: Any, indent: int | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(obj, ensure_ascii=False, indent=indent) if indent else dumps(obj)
    path.write_text(text + "\n", encoding="utf-8")


def write_jsonl(path: Path, rows: Iterable[dict]) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(dumps(row) + "\n")
            n += 1
    return n


def write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def vqa_records(image_id: int, file_name: str, vqa: list[dict]) -> tuple[list[dict], list[dict]]:
    """One image's VQAv2 `questions` and `annotations` entries (question ids image_id * 10 + j), the
    layout every world size writes, so the eval readers see one format."""
    questions, annotations = [], []
    for j, q in enumerate(vqa):
        qid = image_id * 10 + j
        questions.append({"question_id": qid, "image_id": image_id, "question": q["question"], "file_name": file_name})
        annotations.append({"question_id": qid, "image_id": image_id, "question_type": q["question_type"],
                            "answer_type": q["answer_type"], "multiple_choice_answer": q["answer"],
                            "answers": q["answers"]})
    return questions, annotations
