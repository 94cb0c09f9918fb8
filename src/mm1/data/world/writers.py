"""The world's bulk writers: caption shards, interleaved parquet parts and VQAv2 records.

Byte-deterministic like every writer in `mm1.data.writers` (tar headers and JSON come from there);
parquet is written with fixed compression, row-group size and no statistics timestamps (parquet has
none). So the same records always give the same bytes, and a user's checksum of a world identifies it.
"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from mm1.data.writers import tar_info


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
            self._tar.addfile(tar_info(f"{key}.{ext}", len(data)), io.BytesIO(data))
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


INTERLEAVED_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("texts", pa.list_(pa.string())),
        ("images", pa.list_(pa.binary())),
    ]
)


def write_parquet(path: Path, rows: list[dict]) -> None:
    """OBELICS layout: `texts` and `images` lists of equal length, exactly one non-null per position."""
    table = pa.Table.from_pylist(rows, schema=INTERLEAVED_SCHEMA)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(
        table,
        path,
        compression="zstd",
        compression_level=3,
        row_group_size=128,
        write_statistics=False,
        use_dictionary=["id"],
        data_page_version="1.0",
    )


def vqa_records(image_id: int, file_name: str, vqa: list[dict]) -> tuple[list[dict], list[dict]]:
    """One image's VQAv2 `questions` and `annotations` entries (question ids image_id * 10 + j), the
    layout every world size writes, so the eval readers see one format."""
    questions, annotations = [], []
    for j, q in enumerate(vqa):
        qid = image_id * 10 + j
        questions.append({"question_id": qid, "image_id": image_id, "question": q["question"], "file_name": file_name})
        annotations.append(
            {
                "question_id": qid,
                "image_id": image_id,
                "question_type": q["question_type"],
                "answer_type": q["answer_type"],
                "multiple_choice_answer": q["answer"],
                "answers": q["answers"],
            }
        )
    return questions, annotations
