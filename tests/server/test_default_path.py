"""An embedded server given no path listens where a client given no path sends, and where
the daemon listens: the same environment variables, in the same order."""

from __future__ import annotations

import os
import pathlib
from typing import Dict

import pytest

from ftimer_client import FileTimerClient, resolve_fifo_path
from ftimer_protocol import FIFO_ENV_VARS, default_fifo_path
from ftimer_server import FileTimerServer
from ftimer_server.daemon._config import resolve_config


@pytest.fixture(autouse=True)
def no_fifo_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in FIFO_ENV_VARS:
        monkeypatch.delenv(name, raising=False)


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"FTIMER_FIFO": "/srv/a/timer.fifo"}, "/srv/a/timer.fifo"),
        ({"TORCHELASTIC_TIMER_FILE": "/srv/b/timer.fifo"}, "/srv/b/timer.fifo"),
        # ftimer's own variable comes first, as in the client and the daemon.
        (
            {"FTIMER_FIFO": "/srv/a/timer.fifo", "TORCHELASTIC_TIMER_FILE": "/srv/b/timer.fifo"},
            "/srv/a/timer.fifo",
        ),
        # An empty variable is not set.
        (
            {"FTIMER_FIFO": "", "TORCHELASTIC_TIMER_FILE": "/srv/b/timer.fifo"},
            "/srv/b/timer.fifo",
        ),
        ({"FTIMER_FIFO": "rel/timer.fifo"}, "{cwd}/rel/timer.fifo"),
    ],
    ids=["ftimer", "torch", "ftimer first", "empty is unset", "relative"],
)
def test_the_server_reads_the_variables_the_client_and_the_daemon_read(
    monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path, env: Dict[str, str], expected: str
) -> None:
    monkeypatch.chdir(tmp_path)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    expected = expected.format(cwd=os.getcwd())
    assert FileTimerServer().file_path == expected
    assert FileTimerClient().file_path == expected
    assert resolve_fifo_path() == expected
    assert resolve_config({}).fifo == expected


def test_without_variables_the_server_takes_the_documented_default(
    monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path
) -> None:
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    # Where a client looks depends also on whether a root daemon's FIFO exists; the
    # daemon's default and the server's are the documented default alone.
    assert FileTimerServer().file_path == default_fifo_path()
    assert resolve_config({}).fifo == default_fifo_path()
