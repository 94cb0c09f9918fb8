"""What a data kind is: the interface every kind module implements, and the registry that holds them.

A kind (caption, interleaved, text, sft, ...) owns everything that differs between kinds of training
data, so the mixture, the readers' plumbing and the packer never branch on a kind's name:

    on disk     layout (for error messages), suffixes a directory is searched for, check_file()
    records     read(file, tally, ctx) -> its own record dataclass, bad samples counted in the tally
    documents   to_docs(builder, record) -> list[Doc], with the shared `DocBuilder` helpers
    packing     lookahead (docs buffered for best-fit), splittable (may a doc be cut to fill a row),
                images_per_row_bounded (data.max_images caps a row's images, not only seq_len)
    stages      image_text_pairs (train.stage=encoder learns from these sources only)

A kind is a `DataKind` subclass registered by name, `@KINDS.register("caption")`; the config's
`data.sources.*.kind` picks it. `mm1.data.kinds` imports the built-in kind modules (one line each).
"""

from __future__ import annotations

import gzip
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import pyarrow as pa
import pyarrow.parquet as pq

from mm1.data.safety import ReadPolicy
from mm1.data.sequence import Doc, DocBuilder
from mm1.data.skips import DataError, Tally
from mm1.registry import Registry


@dataclass
class ReadContext:
    """What a reader may need besides the file: the trust policy, the folder relative image paths
    resolve against (sft: data.sft's image root), and per-source state (sizes of complete shards)."""

    policy: ReadPolicy = field(default_factory=ReadPolicy)
    image_root: str | None = None
    state: dict[str, Any] = field(default_factory=dict)


class DataKind:
    """One kind of training data: its on-disk layouts, its records, its documents, its packing."""

    layout: ClassVar[str] = ""  # the accepted layouts, spelt out in every format error
    suffixes: ClassVar[tuple[tuple[str, ...], ...]] = ()  # preference groups for a directory's files
    streamable: ClassVar[bool] = False  # may be read from pipe:/URL streams (data.allow_commands)
    lookahead: ClassVar[int] = 8  # docs kept waiting for best-fit packing
    splittable: ClassVar[bool] = False  # a doc may be cut to top up a row (text, interleaved)
    images_per_row_bounded: ClassVar[bool] = True  # data.max_images caps a row (else only seq_len does)
    image_text_pairs: ClassVar[bool] = False  # one image and its text per record: encoder pre-training reads it

    def __init__(self, name: str) -> None:
        self.name = name  # the registered name, as the config spells it

    def read(self, file: str, t: Tally, ctx: ReadContext) -> Iterator[Any]:
        """The good records of `file` in order; each bad sample is reported to `t.skip` and dropped."""
        raise NotImplementedError

    def to_docs(self, b: DocBuilder, record: Any) -> list[Doc]:
        """The packable documents of one record (raise `SampleError` for one that cannot become any)."""
        raise NotImplementedError

    def check_file(self, file: str, suffix: str) -> None:
        """Cheap open-time check of one local file whose suffix is allowed (header, schema, first byte)."""
        if suffix in (".tar", ".tar.gz", ".tgz"):
            if not _is_tar(file):
                raise DataError(f"{file}: not a tar archive; expected {self.layout}")
        elif suffix == ".parquet":
            self.check_parquet(file, pq_schema(file, self.layout))
        else:
            check_json_head(file, suffix, self.layout, lists=False)

    def check_parquet(self, file: str, schema: pa.Schema) -> None:
        """A kind that reads parquet checks its columns here."""
        raise DataError(f"{file}: a {self.name} source cannot read parquet files; expected {self.layout}")


KINDS: Registry[type[DataKind]] = Registry("data kind", "data.sources.*.kind")  # a batch's `source`: index in names()


def get_kind(name: str) -> DataKind:
    """The registered kind `name` (a `ConfigError` listing the allowed names if there is none)."""
    return KINDS.get(name)(name)


def pq_schema(file: str, layout: str) -> pa.Schema:
    try:
        return pq.read_schema(file)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{file}: not a readable parquet file ({e}); expected {layout}") from None


def require_columns(file: str, schema: pa.Schema, needed: tuple[str, ...], layout: str, lists: bool = False) -> None:
    """Raise `DataError` naming the missing columns (or a column that is not a list, with `lists`)."""
    missing = [c for c in needed if c not in schema.names]
    if missing:
        raise DataError(
            f"{file}: parquet file has no column {', '.join(missing)} (it has: "
            f"{', '.join(schema.names)}); expected {layout}"
        )
    for col in needed if lists else ():
        if not pa.types.is_list(schema.field(col).type) and not pa.types.is_large_list(schema.field(col).type):
            raise DataError(f"{file}: column {col} is {schema.field(col).type}, not a list; expected {layout}")


def check_json_head(file: str, suffix: str, layout: str, lists: bool) -> None:
    """JSON / JSONL: the first non-blank character tells the shape (`lists`: a .json list is fine)."""
    opener = gzip.open if suffix.endswith(".gz") else open
    try:
        with opener(file, "rb") as f:
            head = f.read(4096).lstrip()
    except (OSError, EOFError) as e:
        raise DataError(f"{file}: cannot read ({e}); expected {layout}") from None
    first = head[:1]
    ok = first in (b"", b"{", b"[") if lists and suffix == ".json" else first in (b"", b"{")
    if not ok:
        what = "a JSON list" if first == b"[" else f"text starting with {head[:20]!r}"
        raise DataError(f"{file}: found {what}, expected one JSON object per line; expected {layout}")


def _is_tar(file: str) -> bool:
    try:
        return tarfile.is_tarfile(file)
    except OSError:
        return False
