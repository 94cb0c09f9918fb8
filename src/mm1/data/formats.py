"""Readers for the four training-data kinds, in the formats real corpora ship in.

    open_source(kind, path, skips)          path: dir | file | glob | brace pattern | list | pipe:/URL
        -> SourceReader.files               sorted shards/files (what ranks and workers split)
        -> SourceReader.read(file, start)   records of one file: Caption/Interleaved/Text/SFTRecord

| kind        | on disk                                                                       |
|-------------|-------------------------------------------------------------------------------|
| caption     | WebDataset tars, img2dataset layout (`tars.py`); or JSONL {"image","caption"} |
| interleaved | parquet, OBELICS layout: texts / images lists, one non-null per position      |
| text        | JSONL {"text"} or parquet with a `text` column                                 |
| sft         | LLaVA JSON list or JSONL {"id","image","conversations"}                        |

Everything that can be checked cheaply is checked when the source is opened (the path exists, each
file has the expected format and columns), so a wrong path fails in the first second with the
expected layout spelt out. Bad *samples* are skipped and counted per reason in the `SkipCounter`;
records carry `where` (file + member/row/line) so a later failure (an image that does not decode in a
loader worker) can name the sample too. Images stay encoded (bytes) or as paths: decoding happens in
the workers (`mm1.data.images`).
"""

from __future__ import annotations

import glob
import gzip
import os
import re
import tarfile
from dataclasses import dataclass
from typing import Iterator, Sequence, Union

import braceexpand
import pyarrow as pa
import pyarrow.parquet as pq

from mm1.data import tars
from mm1.data.safety import ReadPolicy, check_regular, is_stream, stream_allowed
from mm1.data.skips import DataError, DataFileNotFoundError, SkipCounter
from mm1.registry import ConfigError


@dataclass
class CaptionRecord:
    key: str
    where: str
    image: bytes | str  # encoded bytes (tar member) or an absolute path (manifest)
    caption: str
    dense: str | None = None  # a dense "synthetic" caption (VeCap role), from KEY.json "dense"


@dataclass
class InterleavedRecord:
    key: str
    where: str
    texts: list[str | None]
    images: list[bytes | str | None]  # exactly one of texts[i], images[i] is not None


@dataclass
class TextRecord:
    key: str
    where: str
    text: str


@dataclass
class SFTRecord:
    key: str
    where: str
    images: list[bytes | str]  # absolute paths, one per `<image>` marker, in order
    conversations: list[dict[str, str]]  # [{"from": "human"|"gpt"|"system", "value": str}]


Record = Union[CaptionRecord, InterleavedRecord, TextRecord, SFTRecord]

LAYOUTS: dict[str, str] = {
    "caption": ("WebDataset .tar shards in img2dataset layout (KEY.jpg|jpeg|png|webp + KEY.txt, optional KEY.json "
                "with a 'dense' caption), given as a directory, glob, brace pattern (shard-{00000..00009}.tar), list, "
                "or pipe:/http URL (with data.allow_commands=true); or a JSONL manifest of "
                "{\"image\": path, \"caption\": str} lines (paths "
                "relative to the manifest)"),
    "interleaved": ("parquet files in OBELICS layout: columns texts: list<string|null> and images: "
                    "list<binary|string|null> (encoded image bytes or local paths), exactly one non-null per position"),
    "text": "JSONL files of {\"text\": str} lines (optional \"id\"), or parquet files with a 'text' column",
    "sft": ("LLaVA JSON (a list) or JSONL of {\"id\", \"image\": path or [paths] (optional, relative to the JSON "
            "file), \"conversations\": [{\"from\": \"human\"|\"gpt\", \"value\": str}]}"),
}
# suffixes a directory is searched for, in preference groups (caption: tars, else manifests)
_DIR_SUFFIXES: dict[str, list[tuple[str, ...]]] = {
    "caption": [(".tar", ".tar.gz", ".tgz"), (".jsonl", ".jsonl.gz")],
    "interleaved": [(".parquet",)],
    "text": [(".jsonl", ".jsonl.gz", ".parquet")],
    "sft": [(".json", ".jsonl")],
}
OPEN_CHECKS = 64  # files whose format is checked at open; a bad file further on is skipped and counted
_ROLES = {"human": "human", "user": "human", "gpt": "gpt", "assistant": "gpt", "system": "system"}
IMAGE_MARKER = "<image>"


class _Tally:
    """Routes a file's ok/skip reports to the SkipCounter, muted while replaying to `start`."""

    def __init__(self, skips: SkipCounter, muted: bool) -> None:
        self.skips, self.muted = skips, muted

    def ok(self) -> None:
        if not self.muted:
            self.skips.ok()

    def skip(self, reason: str, where: str, detail: str = "", n: int = 1) -> None:
        if not self.muted:
            self.skips.skip(reason, where, detail, lost=n)


class SourceReader:
    """The files of one source and a reader per file (format chosen by the file's suffix)."""

    def __init__(self, kind: str, files: list[str], skips: SkipCounter, image_root: str | None = None,
                 policy: ReadPolicy = ReadPolicy()) -> None:
        self.kind, self.files, self.skips, self.image_root = kind, files, skips, image_root
        self.policy = policy
        self.shard_sizes = tars.ShardSizes()  # what a complete shard holds, to count a truncated one's loss

    def read(self, file: str, start: int = 0) -> Iterator[Record]:
        """Good records of `file`, in order, from the `start`-th on. Resuming replays the first
        `start` records without counting their skips again (the SkipCounter state was restored)."""
        tally = _Tally(self.skips, muted=start > 0)
        n = 0
        for record in self._records(file, tally):
            n += 1
            if n <= start:
                tally.muted = n < start
                continue
            yield record

    def __iter__(self) -> Iterator[Record]:
        for file in self.files:
            yield from self.read(file)

    def _records(self, file: str, t: _Tally) -> Iterator[Record]:
        from mm1.data import readers  # the per-format parsers

        if self.kind == "caption":
            if _suffix(file) in (".jsonl", ".jsonl.gz"):
                yield from readers.read_caption_manifest(file, t, self.policy)
            else:
                for key, where, image, caption, dense in tars.read_caption_tar(file, t, self.policy, self.shard_sizes):
                    yield CaptionRecord(key, where, image, caption, dense)
        elif self.kind == "interleaved":
            yield from readers.read_interleaved(file, t, self.policy)
        elif self.kind == "text":
            yield from readers.read_text(file, t)
        else:
            yield from readers.read_sft(file, t, self.image_root, self.policy)

    def __repr__(self) -> str:
        return f"SourceReader({self.kind!r}, {len(self.files)} files, {self.skips.summary()})"


def open_source(kind: str, path: str | os.PathLike | Sequence[str | os.PathLike], skips: SkipCounter | None = None,
                image_root: str | None = None, policy: ReadPolicy = ReadPolicy()) -> SourceReader:
    """Resolve `path` to files, check each one's format, and return a reader.

    Raises `DataFileNotFoundError` for a path that does not exist or a pattern matching nothing, and
    `DataError` for a file in the wrong format (the first `OPEN_CHECKS` files are checked; a bad one
    further on is counted as an unreadable file when read); both name the path and the expected layout.
    `image_root` (sft only) is what relative image paths are resolved against (default: the JSON's
    directory; LLaVA's own data needs its image folder here). `policy` says what the data may make
    mm1 do (`mm1.data.safety`): by default local regular files only, paths inside the data.
    """
    if kind not in LAYOUTS:
        raise ConfigError(f"data.sources.*.kind={kind!r}: unknown source kind; allowed: {', '.join(LAYOUTS)}")
    files = resolve_files(kind, path, policy)
    for file in files[:OPEN_CHECKS]:  # a wrong path or format fails now, not an hour into the run
        check_file(kind, file)
    return SourceReader(kind, files, skips if skips is not None else SkipCounter(name=kind), image_root, policy)


def resolve_files(kind: str, path: str | os.PathLike | Sequence[str | os.PathLike],
                  policy: ReadPolicy = ReadPolicy()) -> list[str]:
    """Expand lists, brace patterns, globs and directories into a sorted, de-duplicated list of
    absolute paths of regular files (a bare name from a glob could read as `pipe:...`); streams only
    with `policy.allow_commands`."""
    specs = [path] if isinstance(path, (str, os.PathLike)) else list(path)
    if not specs:
        raise DataFileNotFoundError(f"no {kind} data path given; expected {LAYOUTS[kind]}")
    out: list[str] = []
    for spec in specs:
        spec = re.sub(r"^file:(//)?", "", os.fspath(spec))
        if is_stream(spec):
            if kind != "caption":
                raise DataError(f"{spec}: streaming URLs are supported for caption tar shards only; "
                                f"download {kind} data to a local path ({LAYOUTS[kind]})")
            stream_allowed(spec, policy)
            out.extend(braceexpand.braceexpand(spec))
            continue
        for item in braceexpand.braceexpand(os.path.expanduser(spec)):
            out.extend(_expand_local(kind, item, spec))
    return sorted(dict.fromkeys(out))


def _expand_local(kind: str, item: str, spec: str) -> list[str]:
    hint = " (the {world} placeholder was not substituted)" if "{world}" in spec else ""
    item = os.path.abspath(item)
    if glob.has_magic(item):
        found = sorted(glob.glob(item))
        for p in found:
            check_regular(p)
        matches = [p for p in found if os.path.isfile(p)]
        if not matches:
            raise DataFileNotFoundError(f"{kind} data: pattern {item} matches no files{hint}; expected {LAYOUTS[kind]}")
        return matches
    if os.path.isdir(item):
        names = sorted(os.listdir(item))
        for group in _DIR_SUFFIXES[kind]:
            found = [os.path.join(item, n) for n in names if n.endswith(group) and not n.startswith(".")]
            for p in found:
                check_regular(p)
            if found:
                return found
        wanted = ", ".join(s for g in _DIR_SUFFIXES[kind] for s in g)
        raise DataFileNotFoundError(f"{kind} data: directory {item} holds no {wanted} files "
                                    f"(it has: {', '.join(names[:8]) or 'nothing'}); expected {LAYOUTS[kind]}")
    check_regular(item)
    if os.path.isfile(item):
        return [item]
    raise DataFileNotFoundError(f"{kind} data: {item} does not exist{hint}; expected {LAYOUTS[kind]}")


def _suffix(file: str) -> str:
    name = file.lower()
    for s in (".tar.gz", ".jsonl.gz"):
        if name.endswith(s):
            return s
    return os.path.splitext(name)[1]


def check_file(kind: str, file: str) -> None:
    """Cheap open-time format check (header, schema or first byte) of one local file."""
    if is_stream(file):
        return  # streams are checked as they are read
    suffix = _suffix(file)
    allowed = {s for g in _DIR_SUFFIXES[kind] for s in g}
    if suffix not in allowed:
        raise DataError(f"{file}: a {kind} source cannot read '{suffix or 'no suffix'}' files "
                        f"(allowed: {', '.join(sorted(allowed))}); expected {LAYOUTS[kind]}")
    if suffix in (".tar", ".tar.gz", ".tgz"):
        if not _is_tar(file):
            raise DataError(f"{file}: not a tar archive; expected {LAYOUTS[kind]}")
    elif suffix == ".parquet":
        try:
            schema = pq.read_schema(file)
        except (pa.ArrowException, OSError) as e:
            raise DataError(f"{file}: not a readable parquet file ({e}); expected {LAYOUTS[kind]}") from None
        needed = {"interleaved": ("texts", "images"), "text": ("text",)}[kind]
        missing = [c for c in needed if c not in schema.names]
        if missing:
            raise DataError(f"{file}: parquet file has no column {', '.join(missing)} (it has: "
                            f"{', '.join(schema.names)}); expected {LAYOUTS[kind]}")
        if kind == "interleaved":
            for col in needed:
                if not pa.types.is_list(schema.field(col).type) and not pa.types.is_large_list(schema.field(col).type):
                    raise DataError(f"{file}: column {col} is {schema.field(col).type}, not a list; "
                                    f"expected {LAYOUTS[kind]}")
    else:  # JSON / JSONL: the first non-blank character tells the shape
        opener = gzip.open if suffix.endswith(".gz") else open
        try:
            with opener(file, "rb") as f:
                head = f.read(4096).lstrip()
        except (OSError, EOFError) as e:
            raise DataError(f"{file}: cannot read ({e}); expected {LAYOUTS[kind]}") from None
        first = head[:1]
        ok = first in (b"", b"{", b"[") if kind == "sft" and suffix == ".json" else first in (b"", b"{")
        if not ok:
            what = "a JSON list" if first == b"[" else f"text starting with {head[:20]!r}"
            raise DataError(f"{file}: found {what}, expected one JSON object per line; expected {LAYOUTS[kind]}")


def _is_tar(file: str) -> bool:
    try:
        return tarfile.is_tarfile(file)
    except OSError:
        return False
