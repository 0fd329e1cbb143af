"""A relative FIFO or socket path is the one it named when the client was made: a worker
that changes directory later still reconnects to its server after a restart."""

from __future__ import annotations

import os
import pathlib

import pytest

from ftimer_client import FileTimerClient, resolve_fifo_path
from ftimer_client._paths import resolve_route
from ftimer_protocol import Arm

from .conftest import FifoPeer, Peer, restart, server_state

ME = os.getpid()


def test_relative_paths_are_made_absolute_once(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    here = str(tmp_path)
    assert resolve_fifo_path(environ={"FTIMER_FIFO": "timer.fifo"}) == f"{here}/timer.fifo"
    assert resolve_fifo_path("d/../timer.fifo") == f"{here}/d/../timer.fifo"  # not folded
    route = resolve_route(environ={"FTIMER_FIFO": "timer.fifo"})
    assert route.path == f"{here}/timer.fifo"
    assert route.prefer == f"{here}/timer.socket"
    assert resolve_route(environ={"FTIMER_SOCKET": "s.sock"}).path == f"{here}/s.sock"
    assert resolve_route("x.fifo", transport="fifo").path == f"{here}/x.fifo"
    assert resolve_route("/abs/x.fifo").path == "/abs/x.fifo"


@pytest.mark.parametrize("given", ["argument", "environment"])
def test_a_worker_that_changed_directory_reconnects_to_its_server(
    server: Peer,
    tmp_path: pathlib.Path,
    monkeypatch: pytest.MonkeyPatch,
    given: str,
) -> None:
    monkeypatch.chdir(server.path.parent)
    name = server.path.name
    if given == "environment":
        variable = "FTIMER_FIFO" if isinstance(server, FifoPeer) else "FTIMER_SOCKET"
        monkeypatch.setenv(variable, name)
        client = FileTimerClient(labels={}, signal=0)
    else:
        client = FileTimerClient(name, labels={}, signal=0)
    client.arm("a", 60)
    server.wait_count(1)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    server = restart(server)
    try:
        # The restart shows at this message (EPIPE, or ECONNREFUSED): reconnect, resync.
        client.arm("b", 60)
        messages = server.wait_for(lambda m: (ME, "b") in server_state(m))
        assert {s for p, s in server_state(messages) if p == ME} == {"a", "b"}
        assert any(isinstance(m, Arm) for m in messages)
        assert client.file_path == str(server.path)
        client.close()
    finally:
        server.close()
