"""Which FIFO a client writes to when not told."""

from __future__ import annotations

import os

import pytest

from ftimer_client import FileTimerClient, resolve_fifo_path
from ftimer_protocol import SYSTEM_FIFO_PATH


def no(path: str) -> bool:
    return False


def test_argument_wins() -> None:
    env = {"FTIMER_FIFO": "/a", "TORCHELASTIC_TIMER_FILE": "/b"}
    assert resolve_fifo_path("/x", environ=env) == "/x"


def test_ftimer_fifo_then_torchelastic() -> None:
    env = {"FTIMER_FIFO": "/a", "TORCHELASTIC_TIMER_FILE": "/b"}
    assert resolve_fifo_path(environ=env, exists=no) == "/a"
    assert resolve_fifo_path(environ={"TORCHELASTIC_TIMER_FILE": "/b"}, exists=no) == "/b"
    assert resolve_fifo_path(environ={"FTIMER_FIFO": ""}, uid=1000, exists=no) == (
        "/tmp/ftimer-1000/timer.fifo"
    )


@pytest.mark.parametrize(
    ("uid", "env", "system_exists", "expected"),
    [
        (0, {}, False, SYSTEM_FIFO_PATH),
        (1000, {}, True, SYSTEM_FIFO_PATH),
        (1000, {}, False, "/tmp/ftimer-1000/timer.fifo"),
        (1000, {"XDG_RUNTIME_DIR": "/run/user/1000"}, False, "/run/user/1000/ftimer/timer.fifo"),
        (1000, {"XDG_RUNTIME_DIR": "/run/user/1000"}, True, SYSTEM_FIFO_PATH),
    ],
)
def test_server_default(uid: int, env: dict, system_exists: bool, expected: str) -> None:
    checked = []

    def exists(path: str) -> bool:
        checked.append(path)
        return system_exists

    assert resolve_fifo_path(environ=env, uid=uid, exists=exists) == expected
    assert checked in ([], [SYSTEM_FIFO_PATH])


def test_client_reads_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCHELASTIC_TIMER_FILE", "/from/torch")
    assert FileTimerClient().file_path == "/from/torch"
    monkeypatch.setenv("FTIMER_FIFO", "/from/ftimer")
    assert FileTimerClient().file_path == "/from/ftimer"
    assert FileTimerClient(os.fsencode("/p").decode()).file_path == "/p"
