"""The parsing every kind's reader shares: JSONL lines, parquet rows, image cells (`mm1.data.kinds`).

A kind's reader walks one file with these, validates every sample against its layout, reports it to
the tally as ok or as a skip with a short reason, and yields the good ones as records. Parquet is
read one row group at a time in small batches, never a whole file at once, so an OBELICS shard with
megabytes of image bytes per row stays within a worker's memory, and a damaged row group costs only
its own rows.
"""

from __future__ import annotations

import gzip
import json
import os
from collections.abc import Iterator
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from mm1.data.safety import ReadPolicy, inside_root
from mm1.data.skips import Tally

PARQUET_BATCH_ROWS = 64  # rows per Arrow batch; OBELICS rows can hold several MB of images


def stem(file: str) -> str:
    """A file's name without its suffixes: the default key prefix of its records."""
    return os.path.basename(file).split(".")[0]


def iter_jsonl(file: str, t: Tally) -> Iterator[tuple[int, dict[str, Any]]]:
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
                    t.skip(
                        "malformed json line",
                        f"{file}:line {lineno}",
                        f"expected a JSON object, got {type(obj).__name__}",
                    )
                    continue
                yield lineno, obj
    except (OSError, EOFError) as e:  # a truncated .gz, an unreadable file
        t.skip("truncated file", f"{file}:line {lineno + 1}", f"{e}; the rest of the file is lost")
    except MemoryError:  # one line of gigabytes
        t.skip("line too large", f"{file}:line {lineno + 1}", "out of memory reading it; the rest of the file is lost")


def iter_parquet(file: str, required: list[str], optional: list[str], t: Tally) -> Iterator[tuple[int, dict[str, Any]]]:
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
            t.skip(
                "corrupt parquet row group",
                f"{file}:row group {rg}",
                f"{e or type(e).__name__}; {lost} of its {n_rows} rows are lost",
                lost,
            )
            row = sum(pf.metadata.row_group(i).num_rows for i in range(rg + 1))


def local_image(value: Any, base: str, where: str, t: Tally, policy: ReadPolicy) -> bytes | str | None:
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
