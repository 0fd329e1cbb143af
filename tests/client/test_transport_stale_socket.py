"""transport="auto" with a stale socket beside the FIFO (a server that died, restarted
with --no-socket): the client falls back to the FIFO a server reads.

The choice is ``_transport.open_writer``'s.
"""

from __future__ import annotations

import errno
import os
import pathlib

import pytest

from ftimer_client import FileTimerClient, ServerUnavailable

from .conftest import FifoPeer, SocketPeer, server_state

ME = os.getpid()

pytestmark = pytest.mark.skipif(
    not hasattr(os, "pidfd_open"), reason="the socket transport is Linux's (pidfds)"
)


def test_a_stale_socket_beside_a_served_fifo_falls_back_to_the_fifo(
    fifo_path: pathlib.Path, socket_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    SocketPeer(socket_path).close()  # the file stays, bound to nobody
    peer = FifoPeer(fifo_path)
    try:
        monkeypatch.setenv("FTIMER_FIFO", str(fifo_path))
        client = FileTimerClient(labels={}, signal=0)
        client.arm("a", 60)
        assert client._channel.transport == "fifo"
        peer.wait_for(lambda m: (ME, "a") in server_state(m))
        client.close()
    finally:
        peer.close()


def test_a_stale_socket_and_no_fifo_reader_is_still_the_sockets_refusal(
    fifo_path: pathlib.Path, socket_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    SocketPeer(socket_path).close()
    os.mkfifo(fifo_path)  # nobody reads it either: a server restarting
    monkeypatch.setenv("FTIMER_FIFO", str(fifo_path))
    client = FileTimerClient(labels={}, signal=0)
    with pytest.raises(ServerUnavailable) as info:
        client.arm("a", 60)
    assert info.value.errno == errno.ECONNREFUSED
