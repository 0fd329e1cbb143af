"""Fixtures of the torch interop tests: processes that are always cleaned up."""

from __future__ import annotations

import pathlib
from collections.abc import Iterator

import pytest

from ._harness import Processes


@pytest.fixture
def processes(tmp_path: pathlib.Path) -> Iterator[Processes]:
    """Starts commands (under a subreaper); ends all of them, and their children, after."""
    started = Processes(tmp_path)
    try:
        yield started
    finally:
        started.close()
