"""What untrusted data may make mm1 do: read regular local files inside the data, nothing else.

Shards, parquet and JSON come from the web; a run must not let them run a command, read a file
outside the dataset, hang on a FIFO or exhaust memory. `ReadPolicy` carries the opt-ins
(`data.allow_commands`, `data.allow_outside_paths`) and the caps (`data.max_member_bytes`,
`data.image_formats`) from the config to the readers and the image decoder. The checks themselves:

    stream_allowed(spec, policy)      pipe:/URL sources only with data.allow_commands=true
    check_regular(path)               FIFOs, devices, sockets refused with a message (they block or lie)
    open_regular(path)                open without blocking, then refuse anything but a regular file
    inside_root(value, root, policy)  a path from a data/task file, resolved (symlinks too) inside root
"""

from __future__ import annotations

import fcntl
import os
import stat
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from mm1.data.skips import DataError

STREAM_PREFIXES = ("pipe:", "http://", "https://", "gs://", "s3://", "hf://")  # opened by webdataset's gopen
DEFAULT_MAX_MEMBER_BYTES = 64 * 1024 * 1024
DEFAULT_IMAGE_FORMATS = ("JPEG", "PNG", "WEBP")


@dataclass(frozen=True)
class ReadPolicy:
    """The data section's trust settings, as the readers and decoders need them."""

    allow_commands: bool = False
    allow_outside_paths: bool = False
    max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES
    image_formats: tuple[str, ...] = field(default=DEFAULT_IMAGE_FORMATS)

    @classmethod
    def from_config(cls, data_cfg: Any) -> ReadPolicy:
        return cls(
            bool(data_cfg.allow_commands),
            bool(data_cfg.allow_outside_paths),
            int(data_cfg.max_member_bytes),
            tuple(str(f) for f in data_cfg.image_formats),
        )


def is_stream(spec: str) -> bool:
    return spec.startswith(STREAM_PREFIXES)


def stream_allowed(spec: str, policy: ReadPolicy) -> None:
    """Refuse a `pipe:CMD` or URL source unless the config opted in: `pipe:` runs CMD in a shell."""
    if not policy.allow_commands:
        what = "runs a shell command" if spec.startswith("pipe:") else "streams from the network (through curl)"
        raise DataError(
            f"data source {spec!r} {what}; mm1 reads local files only unless you opt in with "
            "data.allow_commands=true (do so only for sources you wrote yourself)"
        )


def check_regular(path: str) -> None:
    """Raise `DataError` if `path` exists but is not a regular file (a FIFO would block forever)."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return  # missing: the caller says what was expected
    if not stat.S_ISREG(mode) and not stat.S_ISDIR(mode):
        raise DataError(
            f"{path}: not a regular file ({_kind(mode)}); mm1 reads only regular files from data "
            "folders: remove it or point the data path elsewhere"
        )


def open_regular(path: str) -> BinaryIO:
    """Open `path` for reading, refusing anything but a regular file without ever blocking on it
    (O_NONBLOCK makes opening a FIFO return at once; it is cleared again for the regular file)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise DataError(
                f"{path}: not a regular file ({_kind(mode)}); mm1 reads only regular files from "
                "data folders: remove it or point the data path elsewhere"
            )
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
    ):
        if test(mode):
            return name
    return "not a file"


def inside_root(value: str, root: str, policy: ReadPolicy) -> tuple[str, str | None]:
    """(absolute path, None) for a path read from a data or task file, or (path, why refused).

    Relative paths resolve against `root` (the file's folder or a declared root). The real path
    (symlinks followed) must stay inside the real root: `../../etc/passwd`, an absolute path
    elsewhere or a symlink out of the dataset are refused unless `data.allow_outside_paths=true`."""
    path = os.path.abspath(value if os.path.isabs(value) else os.path.join(root, value))
    if policy.allow_outside_paths:
        return path, None
    real, real_root = os.path.realpath(path), os.path.realpath(root)
    if os.path.commonpath([real, real_root]) != real_root:
        return path, (
            f"{value!r} resolves to {real}, outside the data folder {real_root}; mm1 reads only files "
            "inside it (set data.allow_outside_paths=true if you trust this file)"
        )
    return path, None
