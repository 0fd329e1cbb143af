"""A server that restarts restores its timers from its state file, and a disarm it had
not read died with it: a client that notices the restart at its next write must send
its last disarms again, as it does after any failure, or the healthy worker whose
disarm was lost is reaped. Recording peers: nothing is signalled."""

from __future__ import annotations

import os
import pathlib
from typing import Type

import pytest

from ftimer_client import FileTimerClient
from ftimer_protocol import Arm, Disarm

from .conftest import FifoPeer, Peer, SocketPeer, restart, server_state

needs_pidfd = pytest.mark.skipif(
    not hasattr(os, "pidfd_open"), reason="the socket transport is Linux's (pidfds)"
)


@pytest.mark.parametrize(
    ("kind", "name"),
    [(FifoPeer, "timer.fifo"), pytest.param(SocketPeer, "timer.socket", marks=needs_pidfd)],
    ids=["fifo", "socket"],
)
def test_a_restart_noticed_at_the_next_write_sends_the_last_disarms_again(
    tmp_path: pathlib.Path, kind: Type[Peer], name: str
) -> None:
    peer = kind(tmp_path / name)
    client = FileTimerClient(str(peer.path), write_timeout=5.0, labels={})
    try:
        client.arm("released", 600)
        client.arm("kept", 600)
        saved = peer.wait_count(2)  # what its state file holds
        peer.pause()
        client.release("released")  # accepted, never read
        peer = restart(peer)  # the new server holds what was saved
        client.arm("new", 600)  # notices the restart: reconnects and resynchronises
        read = peer.wait_for(lambda m: any(isinstance(x, Arm) and x.scope_id == "new" for x in m))
        assert any(isinstance(m, Disarm) and m.scope_id == "released" for m in read)
        held = {scope for _, scope in server_state([*saved, *read])}
        assert held == set(client._channel.armed) == {"kept", "new"}
        client.close()
    finally:
        peer.close()
