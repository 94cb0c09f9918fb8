"""Opening a source of any data kind: its path resolved to files, each file checked, a reader per file.

    open_source(kind, path, skips)          path: dir | file | glob | brace pattern | list | pipe:/URL
        -> SourceReader.files               sorted shards/files (what ranks and workers split)
        -> SourceReader.read(file, start)   records of one file, parsed by the kind (`mm1.data.kinds`)

Everything that can be checked cheaply is checked when the source is opened (the path exists, each
file has the expected format and columns), so a wrong path fails in the first second with the
kind's expected layout spelt out. Bad *samples* are skipped and counted per reason in the
`SkipCounter`; records carry `where` (file + member/row/line) so a later failure (an image that does
not decode in a loader worker) can name the sample too. Images stay encoded (bytes) or as paths:
decoding happens in the workers (`mm1.data.images`).
"""

from __future__ import annotations

import glob
import os
import re
from collections.abc import Iterator, Sequence
from typing import Any

import braceexpand

from mm1.data.kinds import KINDS, DataKind, ReadContext, get_kind
from mm1.data.safety import ReadPolicy, check_regular, is_stream, stream_allowed
from mm1.data.skips import DataError, DataFileNotFoundError, SkipCounter, Tally

OPEN_CHECKS = 64  # files whose format is checked at open; a bad file further on is skipped and counted


class SourceReader:
    """The files of one source and the kind's reader per file."""

    def __init__(
        self,
        kind: DataKind,
        files: list[str],
        skips: SkipCounter,
        image_root: str | None = None,
        policy: ReadPolicy = ReadPolicy(),
    ) -> None:
        self.kind, self.files, self.skips = kind, files, skips
        self.context = ReadContext(policy, image_root)

    def read(self, file: str, start: int = 0, replay: int = 0) -> Iterator[Any]:
        """Good records of `file`, in order, from the `start`-th on. Resuming replays the first
        `start` records, and the `replay` after them that were read before (a shuffle block), without
        counting their skips again (the SkipCounter state was restored)."""
        quiet = start + replay
        tally = Tally(self.skips, muted=quiet > 0)
        n = 0
        for record in self.kind.read(file, tally, self.context):
            n += 1
            tally.muted = n < quiet
            if n <= start:
                continue
            yield record

    def __iter__(self) -> Iterator[Any]:
        for file in self.files:
            yield from self.read(file)

    def __repr__(self) -> str:
        return f"SourceReader({self.kind.name!r}, {len(self.files)} files, {self.skips.summary()})"


def open_source(
    kind: str,
    path: str | os.PathLike | Sequence[str | os.PathLike],
    skips: SkipCounter | None = None,
    image_root: str | None = None,
    policy: ReadPolicy = ReadPolicy(),
) -> SourceReader:
    """Resolve `path` to files, check each one's format, and return a reader.

    Raises `DataFileNotFoundError` for a path that does not exist or a pattern matching nothing, and
    `DataError` for a file in the wrong format (the first `OPEN_CHECKS` files are checked; a bad one
    further on is counted as an unreadable file when read); both name the path and the expected layout.
    `image_root` (sft only) is what relative image paths are resolved against (default: the JSON's
    directory; LLaVA's own data needs its image folder here). `policy` says what the data may make
    mm1 do (`mm1.data.safety`): by default local regular files only, paths inside the data.
    """
    files = resolve_files(kind, path, policy)  # an unknown kind is a ConfigError listing the registered ones
    for file in files[:OPEN_CHECKS]:  # a wrong path or format fails now, not an hour into the run
        check_file(kind, file)
    return SourceReader(
        get_kind(kind), files, skips if skips is not None else SkipCounter(name=kind), image_root, policy
    )


def resolve_files(
    kind: str, path: str | os.PathLike | Sequence[str | os.PathLike], policy: ReadPolicy = ReadPolicy()
) -> list[str]:
    """Expand lists, brace patterns, globs and directories into a sorted, de-duplicated list of
    absolute paths of regular files (a bare name from a glob could read as `pipe:...`); streams only
    with `policy.allow_commands`."""
    impl = get_kind(kind)
    specs = [path] if isinstance(path, (str, os.PathLike)) else list(path)
    if not specs:
        raise DataFileNotFoundError(f"no {kind} data path given; expected {impl.layout}")
    out: list[str] = []
    for spec in specs:
        spec = re.sub(r"^file:(//)?", "", os.fspath(spec))
        if is_stream(spec):
            if not impl.streamable:
                streamable = ", ".join(n for n in KINDS.names() if get_kind(n).streamable)
                raise DataError(
                    f"{spec}: streaming URLs are supported for {streamable} data only; "
                    f"download {kind} data to a local path ({impl.layout})"
                )
            stream_allowed(spec, policy)
            out.extend(braceexpand.braceexpand(spec))
            continue
        for item in braceexpand.braceexpand(os.path.expanduser(spec)):
            out.extend(_expand_local(impl, item, spec))
    return sorted(dict.fromkeys(out))


def _expand_local(kind: DataKind, item: str, spec: str) -> list[str]:
    hint = " (the {world} placeholder was not substituted)" if "{world}" in spec else ""
    item = os.path.abspath(item)
    if glob.has_magic(item):
        found = sorted(glob.glob(item))
        for p in found:
            check_regular(p)
        matches = [p for p in found if os.path.isfile(p)]
        if not matches:
            raise DataFileNotFoundError(
                f"{kind.name} data: pattern {item} matches no files{hint}; expected {kind.layout}"
            )
        return matches
    if os.path.isdir(item):
        names = sorted(os.listdir(item))
        for group in kind.suffixes:
            found = [os.path.join(item, n) for n in names if n.endswith(group) and not n.startswith(".")]
            for p in found:
                check_regular(p)
            if found:
                return found
        wanted = ", ".join(s for g in kind.suffixes for s in g)
        raise DataFileNotFoundError(
            f"{kind.name} data: directory {item} holds no {wanted} files "
            f"(it has: {', '.join(names[:8]) or 'nothing'}); expected {kind.layout}"
        )
    check_regular(item)
    if os.path.isfile(item):
        return [item]
    raise DataFileNotFoundError(f"{kind.name} data: {item} does not exist{hint}; expected {kind.layout}")


def _suffix(file: str) -> str:
    name = file.lower()
    for s in (".tar.gz", ".jsonl.gz"):
        if name.endswith(s):
            return s
    return os.path.splitext(name)[1]


def check_file(kind: str, file: str) -> None:
    """Cheap open-time format check of one local file: its suffix, then the kind's own check."""
    if is_stream(file):
        return  # streams are checked as they are read
    impl = get_kind(kind)
    suffix = _suffix(file)
    allowed = {s for g in impl.suffixes for s in g}
    if suffix not in allowed:
        raise DataError(
            f"{file}: a {kind} source cannot read '{suffix or 'no suffix'}' files "
            f"(allowed: {', '.join(sorted(allowed))}); expected {impl.layout}"
        )
    impl.check_file(file, suffix)
