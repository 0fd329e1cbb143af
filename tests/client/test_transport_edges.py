"""Edges of choosing a writer (``_transport.py``), each seen to fail with a mutant no other
client test caught: a preferred socket that refuses for another reason than nobody
bound to it."""

from __future__ import annotations

import errno
import pathlib
import socket

import pytest

from ftimer_client import ServerUnavailable
from ftimer_client._paths import Route
from ftimer_client._transport import open_writer

from .conftest import FifoPeer


def test_a_preferred_socket_refusing_otherwise_than_unbound_is_not_traded_for_the_fifo(
    peer: FifoPeer, socket_path: pathlib.Path
) -> None:
    """Transport auto: only ECONNREFUSED falls back to the FIFO; a stream socket's is said."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind(str(socket_path))
        listener.listen(1)
        route = Route(str(peer.path), "auto", prefer=str(socket_path))
        with pytest.raises(ServerUnavailable) as refused:
            open_writer(route, keep_open=True, pidfd=lambda: -1).close()
        assert refused.value.errno == errno.EPROTOTYPE
    finally:
        listener.close()
