"""Text-only documents (MM1's 10 % that keeps the language model's text abilities).

On disk: JSONL of {"text": str} lines (optional "id"), or parquet with a `text` column. A document
becomes its tokens and `</s>`, cut into pieces of at most `data.seq_len` tokens; a piece may also
be cut to top up a row. A literal `<image>` in raw text stays text (it never becomes slots).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from mm1.data.kinds.base import KINDS, DataKind, ReadContext, require_columns
from mm1.data.readers import iter_jsonl, iter_parquet, stem
from mm1.data.sequence import Doc, DocBuilder, SampleError, plain_text
from mm1.data.skips import Tally


@dataclass
class TextRecord:
    key: str
    where: str
    text: str


@KINDS.register("text")
class Text(DataKind):
    layout = 'JSONL files of {"text": str} lines (optional "id"), or parquet files with a \'text\' column'
    suffixes = ((".jsonl", ".jsonl.gz", ".parquet"),)
    lookahead = 16
    splittable = True
    images_per_row_bounded = False  # no images: seq_len alone bounds a row

    def check_parquet(self, file: str, schema: pa.Schema) -> None:
        require_columns(file, schema, ("text",), self.layout)

    def read(self, file: str, t: Tally, ctx: ReadContext) -> Iterator[TextRecord]:
        parquet = file.endswith(".parquet")
        rows = iter_parquet(file, ["text"], ["id"], t) if parquet else iter_jsonl(file, t)
        unit = "row" if parquet else "line"
        for n, obj in rows:
            where = f"{file}:{unit} {n}"
            text = obj.get("text")
            if not isinstance(text, str):
                t.skip(
                    "missing text" if text is None else "non-string text",
                    where,
                    "" if text is None else f"text is {type(text).__name__}",
                )
                continue
            if not text.strip():
                t.skip("empty text", where)
                continue
            t.ok()
            yield TextRecord(str(obj["id"]) if obj.get("id") is not None else f"{stem(file)}-{n}", where, text)

    def to_docs(self, b: DocBuilder, rec: Any) -> list[Doc]:
        ids = b.tokenizer.encode(plain_text(rec.text)) + [b.tokenizer.eos_id]
        if len(ids) < 2:
            raise SampleError("empty_text", rec.where, "text is empty")
        return b.cut(Doc(ids, [True] * len(ids), [], rec.key))


def write_text_parquet(path: str | Path, texts: list[Any], row_group_size: int = 1024) -> Path:
    """A parquet file with one `text` column (values written as given, for tests of bad rows)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"text": pa.array(texts, type=pa.string())}), path, row_group_size=row_group_size)
    return Path(path)
