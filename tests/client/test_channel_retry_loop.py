"""The channel's retry thread through servers that leave during a retry step
(``_channel.py`` ``_retry_step``, ``_retry_loop``; each test seen to fail with a mutant
of the code that no other test caught). Every server here is a recording peer that
restarts (closes, its path made anew): nothing is ever signalled."""

from __future__ import annotations

import os
import threading
from typing import Any, List, Optional

import pytest
from tests.conftest import wait_until

from ftimer_client import FileTimerClient, ServerUnavailable, _channel
from ftimer_client._fifo import FifoWriter
from ftimer_client._resync import Resync
from ftimer_client._writer import Writer

from .conftest import FifoPeer, Peer, descriptors_on, held_only, restart, server_state
from .test_fork import in_child

ME = os.getpid()


def lose_server(client: FileTimerClient, server: Peer, scope: str) -> None:
    """``scope`` armed, the server goes (its path removed with it): the client's release
    of ``scope`` fails, its disarm is owed, and the retry thread takes over."""
    client.arm(scope, 60)
    server.wait_for(lambda m: any(getattr(x, "scope_id", "") == scope for x in m))
    server.close()
    server.path.unlink()
    with pytest.raises(ServerUnavailable):
        client.release(scope)


def retrying(server: Peer, armed: str = "s", lost: str = "t", **options: Any) -> FileTimerClient:
    """A client (``options``: ``FileTimerClient``'s) that armed each scope of ``armed``,
    then lost its server (``lose_server``) on the arm of ``lost``: its retry thread runs."""
    client = FileTimerClient(server.path, **options)
    for scope in armed:
        client.arm(scope, 60)
    server.wait_count(len(armed))
    lose_server(client, server, lost)
    assert client._channel._retrying()
    return client


def restart_after(
    monkeypatch: pytest.MonkeyPatch,
    method: str,
    channel: _channel.Channel,
    peers: List[Peer],
    restarts: int,
) -> None:
    """Have ``channel``'s ``Channel.<method>`` (a connect or an open) run, then restart
    the last of ``peers`` (the new one appended), ``restarts`` times in all: the first
    line after it finds the connection lost for real."""
    real = getattr(_channel.Channel, method)

    def then_restart(self: _channel.Channel) -> Writer:
        writer = real(self)
        if self is channel and len(peers) <= restarts:
            peers.append(restart(peers[-1]))
        return writer

    monkeypatch.setattr(_channel.Channel, method, then_restart)


@pytest.mark.parametrize("restarts", [1, 2])
def test_a_server_that_leaves_as_a_retry_step_connects_still_gets_the_resync(
    server: Peer, monkeypatch: pytest.MonkeyPatch, restarts: int
) -> None:
    # _channel.py _retry_step: "for reconnecting in (False, True)". Each server here
    # restarts right after the retry connected to it, before its first line (the hook
    # runs the real connect, then restarts the server: the write finds the connection
    # lost for real). Once: the step connects once more and delivers; without that
    # second try, the first loss raised: a failed retry, and the resync waited out a
    # backoff (up to RETRY_MAX) for nothing. Twice in one step: the second loss raises
    # ServerUnavailable (a failed retry, backing off); without the raise, the step fell
    # through to "unreachable": the AssertionError ended the retry thread, and a stuck
    # worker's timer never reached the server that then stayed.
    client = retrying(server, labels={})
    channel = client._channel
    failed: List[float] = []
    retry_failed = Resync.retry_failed

    def failing(state: Resync, now: float) -> None:
        retry_failed(state, now)
        if state is channel.state:
            failed.append(now)

    monkeypatch.setattr(Resync, "retry_failed", failing)
    peers: List[Peer] = []
    restart_after(monkeypatch, "_connect", channel, peers, restarts=restarts)
    with channel.lock:  # the retry waits: the peer is in the list before it connects
        peers.append(type(server)(server.path))
        failed.clear()  # the retries while no server was there failed
    try:
        wait_until(lambda: len(peers) == restarts + 1, what="the restarts")
        messages = peers[-1].wait_for(lambda m: (ME, "s") in server_state(m))
        wait_until(lambda: not channel._retrying(), what="the retry thread to end")
        if restarts == 1:
            assert failed == []  # the step that met the restart reconnected, and delivered
        assert not channel.needs_resync
        assert {s for p, s in server_state(messages) if p == ME} == {"s"}  # "t" raised
        client.close()
    finally:
        for peer in peers:
            peer.close()


def test_a_child_forked_while_another_thread_delivers_sends_its_own_lines(
    peer: FifoPeer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # _channel.py _after_fork: self._sending = False. A thread of the parent was in a
    # delivery (its write waiting, here held by a hook in the writer) at the fork: the
    # child's copy said a delivery was under way that no thread of the child would ever
    # end, and put every line of the child's aside (Resync.defer), never sent.
    client = FileTimerClient(peer.path, labels={})
    writing, release = threading.Event(), threading.Event()
    write = FifoWriter.write

    def held(self: FifoWriter, line: bytes, timeout: float) -> None:
        if threading.current_thread() is holder:
            writing.set()
            release.wait(10)
        write(self, line, timeout)

    monkeypatch.setattr(FifoWriter, "write", held)
    holder = threading.Thread(target=client.arm, args=("parent", 60))
    holder.start()
    try:
        assert writing.wait(10)
        pid = in_child(lambda: client.arm("child", 60))
    finally:
        release.set()
        holder.join(10)
    messages = peer.wait_for(lambda m: {(pid, "child"), (ME, "parent")} <= set(server_state(m)))
    assert {s for p, s in server_state(messages) if p == pid} == {"child"}
    client.close()


def test_a_protocol_1_server_that_leaves_between_the_retrys_open_and_write_gets_the_resync(
    peer: FifoPeer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # _channel.py _retry_step: "keep = False" before the try. Protocol 1's retry opens
    # the FIFO for each step; a server that left before the step's first line (the hook
    # runs the real open, then restarts the server: the write finds its reader gone for
    # real) made _retry_lines raise. Without the line, the finally (closing the writer)
    # raised UnboundLocalError: the retry thread ended, and a stuck worker's timer never
    # reached the server that then stayed. With "keep = True", the writer of the step
    # that failed was never closed: a descriptor left open on the old FIFO.
    client = retrying(peer, protocol=1)
    channel = client._channel
    peers: List[Peer] = []
    restart_after(monkeypatch, "_open_once", channel, peers, restarts=1)
    with channel.lock:  # the retry waits: the peer is in the list before it opens
        peers.append(FifoPeer(peer.path))
        first = os.stat(peer.path)
    try:
        wait_until(lambda: len(peers) == 2, what="a restart")
        messages = peers[-1].wait_for(lambda m: (ME, "s") in server_state(m))
        wait_until(lambda: not channel._retrying(), what="the retry thread to end")
        assert not channel.needs_resync
        assert {s for p, s in server_state(messages) if p == ME} == {"s"}  # "t" raised
        assert descriptors_on(first) == []  # the step that failed closed its writer
        client.close()
    finally:
        for server in peers:
            server.close()


def test_the_retry_sends_a_chunk_at_most_per_hold_of_the_lock(
    server: Peer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # _channel.py _retry_lines: "sent += 1". Uncounted, one step sent the whole resync
    # under the lock, however long (a caller, or a signal handler, waited for all of it,
    # not a chunk), and never reset the backoff after progress (retry_progressed).
    monkeypatch.setattr(_channel, "RETRY_CHUNK", 1)
    client = retrying(server, "abc", "d", labels={})
    channel = client._channel
    steps: List[int] = []
    lines = [0]
    accepted, retry_step = Resync.accepted, _channel.Channel._retry_step

    def counted(state: Resync, scope_id: Optional[str], line: bytes) -> None:
        accepted(state, scope_id, line)
        if state is channel.state:
            lines[0] += 1

    def step(self: _channel.Channel) -> object:
        lines[0] = 0
        try:
            return retry_step(self)
        finally:
            if self is channel:
                steps.append(lines[0])

    monkeypatch.setattr(Resync, "accepted", counted)
    monkeypatch.setattr(_channel.Channel, "_retry_step", step)
    back = type(server)(server.path)
    try:
        messages = back.wait_for(lambda m: {(ME, s) for s in "abc"} <= set(server_state(m)))
        wait_until(lambda: not channel._retrying(), what="the retry thread to end")
        assert {s for p, s in server_state(messages) if p == ME} == {"a", "b", "c"}
        assert sum(steps) >= 3
        assert max(steps) == 1  # a line per hold of the lock
        client.close()
    finally:
        back.close()


def test_a_protocol_1_retry_closes_the_fifo_after_each_chunk(
    peer: FifoPeer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # _channel.py _retry_lines: "return False" once a chunk went out. Returning None,
    # _retry_step took it for a writer to wait on and kept protocol 1's writer open:
    # every chunk of the resync left a descriptor open for writing on the FIFO.
    monkeypatch.setattr(_channel, "RETRY_CHUNK", 1)
    client = retrying(peer, "abc", "d", protocol=1)
    channel = client._channel
    back = FifoPeer(peer.path)
    try:
        fifo = os.stat(peer.path)
        messages = back.wait_for(lambda m: {(ME, s) for s in "abc"} <= set(server_state(m)))
        wait_until(lambda: not channel._retrying(), what="the retry thread to end")
        assert {s for p, s in server_state(messages) if p == ME} == {"a", "b", "c"}
        ours = (back.rfd, back.wfd)
        assert [fd for fd in descriptors_on(fifo) if fd not in ours and not held_only(fd)] == []
        client.close()
    finally:
        back.close()
