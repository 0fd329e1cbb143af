"""Shared fixtures. Tests that need the real torch carry the `interop` marker."""

from __future__ import annotations

import os
import pathlib
import tempfile
from collections.abc import Iterator
from types import ModuleType

import pytest


@pytest.fixture
def torch_timer() -> ModuleType:
    """torch.distributed.elastic.timer; a hard failure in the interop session if missing."""
    try:
        import torch.distributed.elastic.timer as timer
    except ImportError as e:
        if os.environ.get("FTIMER_REQUIRE_TORCH"):
            pytest.fail(f"torch is required in this session but cannot be imported: {e}")
        pytest.skip("torch is not installed (run `nox -s interop`)")
    return timer


@pytest.fixture
def fifo_path() -> Iterator[pathlib.Path]:
    """A path for a FIFO in a fresh private directory (short, to stay under AF_UNIX limits)."""
    with tempfile.TemporaryDirectory(prefix="ftimer-") as d:
        yield pathlib.Path(d) / "timer.fifo"
