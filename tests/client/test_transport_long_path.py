"""A socket whose path is longer than an AF_UNIX address holds (108 bytes): reached
through its directory, or refused with a clear error, never "errno None"."""

from __future__ import annotations

import errno
import os
import pathlib
from typing import Iterator

import pytest

from ftimer_client import FileTimerClient, ServerUnavailable

from .conftest import SocketPeer, server_state

pytestmark = pytest.mark.skipif(
    not hasattr(os, "pidfd_open"), reason="the socket transport is Linux's (pidfds)"
)

ME = os.getpid()


@pytest.fixture
def deep(tmp_path: pathlib.Path) -> pathlib.Path:
    """A directory reached by a path of more than 108 bytes: the server's directory
    mounted deep inside a container (here, a symlink to it)."""
    parent = tmp_path / ("d" * 60)
    parent.mkdir()
    link = parent / ("e" * 60)
    link.symlink_to(tmp_path)
    return link


@pytest.fixture
def speer_(tmp_path: pathlib.Path) -> Iterator[SocketPeer]:
    p = SocketPeer(tmp_path / "timer.socket")
    yield p
    p.close()


@pytest.mark.parametrize("transport", ["auto", "socket"])
def test_a_socket_at_a_path_too_long_for_af_unix_is_reached(
    speer_: SocketPeer, deep: pathlib.Path, transport: str
) -> None:
    path = deep / "timer.socket"
    assert len(os.fsencode(str(path))) > 108
    client = FileTimerClient(path, transport=transport, labels={}, signal=0)
    client.arm("a", 60)
    assert client._channel.transport == "socket"
    messages = speer_.wait_for(lambda m: (ME, "a") in server_state(m))
    assert speer_.datagrams[0].pid == ME
    client.close()
    speer_.wait_for(lambda m: len(m) > len(messages))


def test_a_name_too_long_even_from_its_directory_is_a_clear_error(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    name = "n" * 100
    monkeypatch.chdir(tmp_path)
    peer = SocketPeer(pathlib.Path(name))  # bound relative to its directory
    try:
        client = FileTimerClient(tmp_path / name, transport="socket", labels={}, signal=0)
        with pytest.raises(ServerUnavailable, match="longer than an AF_UNIX address") as info:
            client.arm("a", 60)
        assert info.value.errno == errno.ENAMETOOLONG
        assert str(tmp_path / name) in str(info.value)
    finally:
        peer.close()
