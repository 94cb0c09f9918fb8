"""Shared fixtures. `tiny_world` builds the default synthetic world once per test session, so any
test file can read real caption shards, parquet, SFT JSON and eval sets without building its own."""

from __future__ import annotations

import time
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The `tiny` world (seed 0), built once; its build time is in `<parent>/build_seconds.txt`."""
    from mm1.data.world import build_world

    root = tmp_path_factory.mktemp("world")
    out = root / "world-tiny"
    start = time.perf_counter()
    build_world(out, "tiny", seed=0, verbose=False)
    (root / "build_seconds.txt").write_text(f"{time.perf_counter() - start:.3f}\n")
    return out
