"""Shared fixtures. `tiny_world` builds the default synthetic world once per test session, so any
test file can read real caption shards, parquet, SFT JSON and eval sets without building its own."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The `tiny` world (seed 0), built once per session (its build time is benchmarks/world.py's job)."""
    from mm1.data.world import build_world

    out = tmp_path_factory.mktemp("world") / "world-tiny"
    build_world(out, "tiny", seed=0, verbose=False)
    return out
