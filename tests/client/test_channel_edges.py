"""Behaviour of ftimer_client/_channel.py that no test pinned, found by mutation testing
(each test fails with the mutant that found it)."""

from __future__ import annotations

import gc
import os
import subprocess
import sys

import pytest

from ftimer_client import FileTimerClient

from .conftest import Peer, SocketPeer, descriptors_on, restart, server_state

pytestmark = pytest.mark.skipif(
    not hasattr(os, "pidfd_open"), reason="the socket transport is Linux's (pidfds)"
)


def _pidfds() -> set:
    out = set()
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{name}") == "anon_inode:[pidfd]":
                out.add(int(name))
        except OSError:
            pass
    return out


def test_closing_a_client_of_another_process_closes_its_pidfd(
    speer: SocketPeer, sleeper: subprocess.Popen[bytes]
) -> None:
    # _channel.py _let_go: the pidfd is closed, not only forgotten (a leak per client
    # otherwise: a long-lived launcher arming for each of its children runs out of fds).
    before = _pidfds()
    client = FileTimerClient(speer.path, pid=sleeper.pid, labels={})
    client.arm("s", 60)
    client.release("s")
    speer.wait_count(2)
    assert len(_pidfds() - before) == 1
    client.close()
    assert _pidfds() - before == set()


def test_a_handlers_call_after_the_deliverys_last_take_is_sent(
    server, monkeypatch: pytest.MonkeyPatch
) -> None:
    # _channel.py _deliver: a signal handler's call that lands after the delivery took
    # the deferred lines for the last time, while it still counts as delivering (its
    # lines are deferred), is sent once it is done ("late"). Simulated by running the
    # handler's body as that last take returns.
    from ftimer_client._resync import Resync

    with FileTimerClient(server.path, labels={}) as client:
        client.arm("h", 60)
        server.wait_count(1)
        channel = client._channel
        take = Resync.take_deferred
        handled = []

        def take_then_handler(state: Resync) -> list:
            lines = take(state)
            caller = sys._getframe(1).f_code.co_name
            if state is channel.state and caller == "_deliver" and channel._sending and not handled:
                handled.append(1)
                client.release("h")  # deferred: the delivery is still under way
            return lines

        monkeypatch.setattr(Resync, "take_deferred", take_then_handler)
        client.expire("now", signal=0)  # always a delivery (no hot path)
        monkeypatch.undo()
        assert handled
        client.arm("sync", 60)
        messages = server.wait_for(lambda m: (os.getpid(), "sync") in server_state(m))
        assert (os.getpid(), "h") not in server_state(messages)
        assert set(client.armed) == {"sync"}


def test_a_connection_lost_to_a_restart_is_closed_when_the_client_reconnects(server) -> None:
    # _channel.py _send: the connection found lost is closed (not only replaced): a
    # descriptor leaked per server restart otherwise (and, on the FIFO, a writer kept on
    # the old pipe).
    client = FileTimerClient(server.path, labels={})
    client.arm("a", 60)
    server.wait_count(1)
    old = client._channel._writer
    connection = os.fstat(old.hot_fd)
    new = restart(server)
    try:
        assert len(descriptors_on(connection)) == 1  # only the client's connection now
        client.arm("b", 60)  # finds the connection lost: reconnects and resyncs
        messages = new.wait_for(lambda m: (os.getpid(), "b") in server_state(m))
        assert {s for _, s in server_state(messages)} == {"a", "b"}
        assert client._channel._writer is not old
        assert descriptors_on(connection) == []
    finally:
        client.close()
        new.close()


@pytest.mark.parametrize("armed", [True, False], ids=["armed", "released"])
def test_a_dropped_client_closes_its_connection_when_collected(server: Peer, armed: bool) -> None:
    # _channel.py _watch: between looks the watch thread of a client's connection holds
    # no reference to it; held, a client dropped without close() kept its descriptor
    # open until the watch's next look, up to a second later (whatever ran meanwhile,
    # such as a test comparing this process's descriptors before and after). One holding
    # a timer is in a reference cycle (its timers name it), collected by the collector;
    # one that released its timers, at once (docs/client.md).
    client = FileTimerClient(server.path, labels={})
    client.arm("step", 600)
    if not armed:
        client.release("step")
    server.wait_count(1 if armed else 2)
    fd = client._channel._writer.hot_fd
    connection = os.fstat(fd)
    del client
    if armed:
        gc.collect()
    assert fd not in descriptors_on(connection)


def test_protocol_1_keeps_no_writer_of_a_message_it_has_sent(peer) -> None:
    # _channel.py _close_once: each message's writer is forgotten once closed; kept, the
    # set grows by one writer per message for the life of the process (a long training
    # job arms and releases thousands of times), and a fork re-closes them all.
    with FileTimerClient(peer.path, protocol=1) as client:
        for i in range(50):
            client.arm(f"s{i}", 60)
            client.release(f"s{i}")
        peer.wait_count(100)
        assert client._channel._once == set()
