"""Over the socket: server absent, stalled, restarted, replaced; the failure policies and
the resync, as on the FIFO (test_failures.py)."""

from __future__ import annotations

import errno
import os
import pathlib
import threading
import time
import warnings

import pytest

from ftimer_client import (
    FileTimerClient,
    ServerStalled,
    ServerUnavailable,
    ServerUnavailableWarning,
    expires,
)
from ftimer_protocol import Arm, DisarmAll

from .conftest import SocketPeer, restart_socket, server_state
from .test_fork import from_pid, in_child

ME = os.getpid()

pytestmark = pytest.mark.skipif(
    not hasattr(os, "pidfd_open"), reason="the socket transport is Linux's (pidfds)"
)


def scopes(messages: list) -> set:
    return {scope for pid, scope in server_state(messages) if pid == ME}


# -- absent -------------------------------------------------------------------------------


def test_no_socket_raises_promptly(socket_path: pathlib.Path) -> None:
    client = FileTimerClient(socket_path, transport="socket")
    start = time.monotonic()
    with pytest.raises(ServerUnavailable, match="no socket") as info:
        client.arm("s", 5)
    assert time.monotonic() - start < 0.5
    assert info.value.errno == errno.ENOENT
    assert str(socket_path) in str(info.value)
    assert client.armed == frozenset()


def test_a_socket_nobody_is_bound_to_is_refused(speer: SocketPeer) -> None:
    speer.close()  # the server died: its file stays
    client = FileTimerClient(speer.path)
    with pytest.raises(ServerUnavailable, match="no ftimer server is bound") as info:
        client.arm("s", 5)
    assert info.value.errno == errno.ECONNREFUSED
    with pytest.raises(BrokenPipeError):  # what torch users catch
        client.release("s")


@pytest.mark.parametrize("policy", ["warn", "ignore"])
def test_warn_and_ignore_carry_on_and_deliver_when_the_server_is_back(
    socket_path: pathlib.Path, policy: str
) -> None:
    client = FileTimerClient(socket_path, transport="socket", on_unavailable=policy, labels={})
    ran = 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            with expires(after=60, scope="s", client=client):
                ran += 1
        client.arm("kept", 60)
    assert ran == 3
    assert [w.category for w in caught] == ([ServerUnavailableWarning] if policy == "warn" else [])
    assert client.armed == {"kept"}
    peer = SocketPeer(socket_path)
    try:
        # No further call: the background resync delivers it.
        messages = peer.wait_for(lambda m: (ME, "kept") in server_state(m))
        assert isinstance(messages[0], DisarmAll)
        assert scopes(messages) == {"kept"}
    finally:
        peer.close()


# -- stalled: the server stops reading ---------------------------------------------------


def test_full_queue_waits_a_bounded_time_then_fails_fast(speer: SocketPeer) -> None:
    client = FileTimerClient(speer.path, write_timeout=1.0, labels={})
    client.arm("a", 60)
    speer.wait_count(1)
    speer.pause()
    assert speer.fill() > 0
    start = time.monotonic()
    with pytest.raises(ServerStalled, match="has not drained its socket") as info:
        client.arm("b", 60)
    assert 0.95 <= time.monotonic() - start < 10
    assert info.value.errno == errno.EAGAIN
    assert not isinstance(info.value, BlockingIOError)
    # Still stalled: fail at once rather than stall every step.
    start = time.monotonic()
    with pytest.raises(ServerStalled):
        client.release("a")
    assert time.monotonic() - start < 0.5
    # The server reads again: the next message brings it up to date first.
    speer.take()
    speer.resume()
    speer.wait_drained()
    client.arm("c", 60)
    messages = speer.wait_for(lambda m: any(getattr(x, "scope_id", "") == "c" for x in m))
    assert isinstance(messages[0], DisarmAll)
    assert scopes(messages) == {"c"}  # "b" was refused, "a" released


def test_a_stall_shorter_than_the_timeout_is_invisible(speer: SocketPeer) -> None:
    client = FileTimerClient(speer.path, write_timeout=5.0, labels={})
    speer.pause()
    speer.fill()
    timer = threading.Timer(0.2, speer.resume)
    timer.start()
    client.arm("a", 60)  # waits for room (a blocking send), then sends
    timer.join()
    messages = speer.wait_for(lambda m: any(isinstance(x, Arm) for x in m))
    assert [m.scope_id for m in messages if isinstance(m, Arm)] == ["a"]


def test_a_sender_waits_for_room_in_the_kernels_queue_where_it_is_woken_alone(
    speer: SocketPeer,
) -> None:
    """poll(POLLOUT) on a full queue wakes every waiting sender at each datagram the
    server reads (with 16 waiting, the server spent 4x as long per datagram waking them
    as reading it); a blocking send waits in unix_wait_for_peer, woken one at a time."""
    client = FileTimerClient(speer.path, write_timeout=30.0, labels={})
    speer.pause()
    speer.fill()
    tids: list = []

    def arm() -> None:
        tids.append(threading.get_native_id())
        client.arm("a", 60)

    sender = threading.Thread(target=arm)
    sender.start()
    seen = set()
    deadline = time.monotonic() + 10
    while "unix_wait_for_peer" not in seen and time.monotonic() < deadline:
        if tids:
            with open(f"/proc/self/task/{tids[0]}/wchan") as f:
                seen.add(f.read())
        time.sleep(0.005)
    speer.resume()
    sender.join(30)
    if seen <= {"0", ""}:
        pytest.skip("this kernel does not name what a sleeping thread waits in (wchan)")
    assert "unix_wait_for_peer" in seen, seen
    messages = speer.wait_for(lambda m: any(isinstance(x, Arm) for x in m))
    assert [m.scope_id for m in messages if isinstance(m, Arm)] == ["a"]


@pytest.mark.parametrize("policy", ["warn", "ignore"])
def test_a_stall_with_warn_or_ignore_keeps_the_arm_and_resends_it(
    speer: SocketPeer, policy: str
) -> None:
    client = FileTimerClient(speer.path, write_timeout=0.1, on_unavailable=policy, labels={})
    speer.pause()
    speer.fill()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        client.arm("a", 60)
    assert [w.category for w in caught] == ([ServerUnavailableWarning] if policy == "warn" else [])
    assert client.armed == {"a"}
    speer.take()
    speer.resume()
    messages = speer.wait_for(lambda m: (ME, "a") in server_state(m))
    assert isinstance(messages[0], DisarmAll)


# -- restarted, removed, replaced ---------------------------------------------------------


def test_restart_is_noticed_by_a_refused_send_and_resyncs(speer: SocketPeer) -> None:
    client = FileTimerClient(speer.path, labels={})
    client.arm("a", 60)
    client.arm("b", 60)
    client.arm("gone", 60)
    client.release("gone")
    speer.wait_count(4)
    new = restart_socket(speer, speer.path)
    try:
        client.arm("c", 60)  # the old connection is refused: reconnect, then resync
        messages = new.wait_for(lambda m: (ME, "c") in server_state(m))
        assert messages[0] == DisarmAll(ME, messages[1].start_time)  # type: ignore[union-attr]
        assert scopes(messages) == {"a", "b", "c"}
        # The re-sent arms carry the deadlines they were armed with.
        first = {m.scope_id: m.deadline for m in speer.messages if isinstance(m, Arm)}
        again = {m.scope_id: m.deadline for m in messages if isinstance(m, Arm)}
        assert (again["a"], again["b"]) == (first["a"], first["b"])
    finally:
        new.close()


def test_a_disarm_lost_while_the_server_was_away_is_made_good_unprompted(
    speer: SocketPeer,
) -> None:
    client = FileTimerClient(speer.path, on_unavailable="warn", labels={})
    with expires(after=60, scope="kept", client=client):
        client.arm("step", 60)
        speer.wait_count(2)
        speer.close()
        speer.path.unlink()  # removed: ENOENT
        with pytest.warns(ServerUnavailableWarning, match="no FIFO or socket"):
            client.release("step")  # lost: no server
    # A server that restored "step" and "kept" from its state file must not reap this
    # healthy process later: the client tells it, unprompted, as soon as it is back.
    new = SocketPeer(speer.path)  # recreated
    try:
        messages = new.wait_for(lambda m: any(isinstance(x, DisarmAll) for x in m))
        restored = [Arm(ME, "step", 1.0, 9), Arm(ME, "kept", 1.0, 9)]
        assert scopes([*restored, *messages]) == set()
    finally:
        new.close()


def test_a_socket_replaced_while_the_old_server_is_stopped_is_noticed_when_full(
    speer: SocketPeer,
) -> None:
    # The old server still holds its socket but reads no more; a new one bound a new
    # socket at the path. Sends queue on the old one until it is full: then the client
    # compares the path's inode with the one it connected to, reconnects and resyncs.
    client = FileTimerClient(speer.path, write_timeout=5.0, labels={})
    client.arm("a", 60)
    speer.wait_count(1)
    speer.pause()
    speer.path.unlink()
    new = SocketPeer(speer.path)
    try:
        start = time.monotonic()
        for i in range(100):
            client.arm("b", 60 + i)
            if new.messages:
                break
        assert time.monotonic() - start < 2.5  # no write_timeout spent on the old one
        messages = new.wait_for(lambda m: (ME, "b") in server_state(m))
        assert isinstance(messages[0], DisarmAll)
        assert scopes(messages) == {"a", "b"}
    finally:
        new.close()


# -- fork ---------------------------------------------------------------------------------


def test_a_forked_child_speaks_as_itself_and_not_its_parents_scopes(speer: SocketPeer) -> None:
    client = FileTimerClient(speer.path, labels={})
    client.arm("parent", 60)
    speer.wait_count(1)

    def child() -> None:
        assert client.armed == frozenset()
        with expires(after=60, scope="block", client=client):
            pass

    pid = in_child(child)
    messages = speer.wait_count(3)
    assert [(type(m).__name__, m.scope_id) for m in from_pid(messages, pid)] == [  # type: ignore[union-attr]
        ("Arm", "block"),
        ("Disarm", "block"),
    ]
    assert {d.pid for d in speer.datagrams} == {ME, pid}  # the kernel agrees
    client.arm("parent-2", 60)
    assert set(server_state(speer.wait_count(4))) == {(ME, "parent"), (ME, "parent-2")}
    # The parent's connection survived the child's exit (it closed its copy only).
    assert client._channel.transport == "socket"
    assert not client._channel.needs_resync
