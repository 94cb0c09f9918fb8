"""Test-only references (pycocoevalcap, Java + the Stanford PTB jar, transformers) for the tests that
compare mm1 against them.

A test that needs one skips where it is missing (a developer's plain `pytest`), but fails where
`MM1_REQUIRE_REFERENCES=1` is set: `make test`, and so CI, sets it, so a machine that lost a
reference goes red instead of passing by skipping the comparison it was meant to make."""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import pytest

ENV = "MM1_REQUIRE_REFERENCES"


def _missing(what: str, fix: str, module_level: bool) -> None:
    message = f"test-only reference missing: {what}; {fix}"
    if os.environ.get(ENV) == "1":
        pytest.fail(f"{message} ({ENV}=1, set by `make test`, turns this skip into a failure)", pytrace=False)
    pytest.skip(message, allow_module_level=module_level)


def require(module: str, module_level: bool = False) -> ModuleType:
    """Import `module` (a dev extra of pyproject.toml) or skip / fail as above."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        _missing(f"cannot import {module} ({e})", "install the dev extras: pip install -e '.[dev]'", module_level)
        raise  # unreachable: _missing raises


def require_java() -> None:
    """`java` on PATH and pycocoevalcap's Stanford PTBTokenizer jar."""
    from mm1.eval.ptb import java_available

    if not java_available():
        _missing(
            "java and pycocoevalcap's Stanford PTB jar",
            "install a Java runtime (e.g. apt-get install default-jre-headless) and pip install -e '.[dev]'",
            module_level=False,
        )
