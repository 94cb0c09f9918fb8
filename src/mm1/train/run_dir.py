"""One training process group per run directory, enforced with an advisory lock.

Two `mm1 train --resume` on the same run dir used to interleave their steps in metrics.jsonl and
trip over each other's checkpoint temp dirs. `RunDirLock` holds an exclusive `flock` on
`RUN/.mm1-train.lock` (rank 0 of the job takes it, every rank learns the verdict) and writes the
holder's pid and host into it, so a second job stops at once with one line naming the holder. The
kernel drops the lock when the process dies, however it dies: a stale file from a killed run does
not block the next one.
"""

from __future__ import annotations

import fcntl
import os
import socket
from pathlib import Path
from types import TracebackType

from mm1.train.distributed import DistEnv, broadcast_object

LOCK_NAME = ".mm1-train.lock"


class RunDirBusy(BlockingIOError):
    """Another process is training in this run dir."""


class RunDirLock:
    """`with RunDirLock(run_dir, env):` trains with the run dir to itself; raises `RunDirBusy` otherwise."""

    def __init__(self, run_dir: str | Path, env: DistEnv | None = None) -> None:
        self.path = Path(run_dir) / LOCK_NAME
        self.env = env if env is not None else DistEnv()
        self.fd: int | None = None

    def __enter__(self) -> RunDirLock:
        error = self._acquire() if self.env.is_main else None
        error = broadcast_object(error, self.env)
        if error:
            raise RunDirBusy(error)
        return self

    def _acquire(self) -> str | None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 256, 0).decode("utf-8", "replace").strip() or "an unknown process"
            os.close(fd)
            return (
                f"{self.path.parent} is in use by another mm1 train ({holder}; lock {self.path}); wait for it "
                "to finish or stop it, or use another --out"
            )
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        self.fd = fd
        return None

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if self.fd is not None:
            os.ftruncate(self.fd, 0)
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None
