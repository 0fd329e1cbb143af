"""Server absent, stalled, restarted: the failure policies and the resync, over the FIFO;
the tests taking ``server`` run over each transport (the socket's own cases are in
test_socket_failures.py)."""

from __future__ import annotations

import errno
import os
import pathlib
import threading
import time
import warnings

import pytest
from tests.conftest import wait_until

from ftimer_client import (
    FileTimerClient,
    ServerStalled,
    ServerUnavailable,
    ServerUnavailableWarning,
    expires,
)
from ftimer_protocol import Arm, Disarm, DisarmAll

from .conftest import FifoPeer, Peer, restart, server_state

ME = os.getpid()


def scopes(state: dict) -> set:
    return {scope for pid, scope in state if pid == ME}


# -- absent -------------------------------------------------------------------------------


def test_no_fifo_raises_promptly(fifo_path: pathlib.Path) -> None:
    client = FileTimerClient(fifo_path)
    start = time.monotonic()
    with pytest.raises(ServerUnavailable) as info:
        client.arm("s", 5)
    assert time.monotonic() - start < 0.9  # torch retries for a second
    assert info.value.errno == errno.ENOENT
    assert str(fifo_path) in str(info.value)
    assert client.armed == frozenset()  # the arm did not happen


def test_fifo_without_reader_raises(fifo_path: pathlib.Path) -> None:
    os.mkfifo(fifo_path)
    client = FileTimerClient(fifo_path)
    with pytest.raises(ServerUnavailable, match="no ftimer server") as info:
        client.arm("s", 5)
    assert info.value.errno == errno.ENXIO
    with pytest.raises(BrokenPipeError):  # what torch users catch
        client.release("s")


def test_expires_raises_before_the_block_runs(fifo_path: pathlib.Path) -> None:
    client = FileTimerClient(fifo_path)
    ran = []
    with pytest.raises(ServerUnavailable), expires(after=5, client=client):
        ran.append(1)
    assert ran == []


@pytest.mark.parametrize("protocol", [1, 2])
def test_a_client_whose_arm_raised_closes_without_raising(
    fifo_path: pathlib.Path, protocol: int
) -> None:
    # close() delivered the resync the failed arm left due, and raised its
    # ServerUnavailable though the client had nothing armed (an arm that raised did not
    # happen); leaving its with block did too.
    client = FileTimerClient(fifo_path, protocol=protocol, labels={})
    with pytest.raises(ServerUnavailable):
        client.arm("s", 5)
    assert client.armed == frozenset()
    client.close()
    with pytest.raises(ServerUnavailable), FileTimerClient(fifo_path, labels={}) as other:
        other.arm("s", 5)


@pytest.mark.parametrize("protocol", [1, 2])
def test_a_disarm_lost_before_close_is_still_delivered(peer: FifoPeer, protocol: int) -> None:
    # close() owes nothing of its own (and does not raise), but the lost disarm is not
    # dropped: it reaches the server when it is back.
    client = FileTimerClient(peer.path, protocol=protocol, labels={})
    client.arm("s", 60)
    peer.wait_count(1)
    peer.close()
    with pytest.raises(ServerUnavailable):
        client.release("s")
    client.close()
    new = FifoPeer(peer.path, create=False)  # back on the same FIFO
    try:
        restored = peer.messages  # as from a state file
        messages = new.wait_for(lambda m: scopes(server_state([*restored, *m])) == set())
        assert messages
    finally:
        new.close()


@pytest.mark.parametrize("policy", ["warn", "ignore"])
def test_a_client_that_never_reached_a_server_leaves_no_retry_behind(
    fifo_path: pathlib.Path, policy: str
) -> None:
    # Its arms never went out, so no server holds them and no disarm is owed: each such
    # client (one per path) left a thread retrying once a second, for good.
    client = FileTimerClient(fifo_path, on_unavailable=policy, labels={})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ServerUnavailableWarning)
        with expires(after=5, scope="s", client=client):
            pass
    client.close()
    wait_until(lambda: not client._channel._retrying(), what="the retry thread to end")


def test_leaving_a_clients_with_block_never_replaces_its_exception(peer: FifoPeer) -> None:
    error = KeyError("mine")

    def block() -> None:
        with FileTimerClient(peer.path, labels={}) as client:
            client.arm("s", 60)
            peer.wait_count(1)
            peer.close()  # the server goes: close() cannot deliver the disarm
            raise error

    with pytest.raises(KeyError) as info:
        block()
    assert info.value is error
    new = FifoPeer(peer.path, create=False)  # the disarm is delivered when it is back
    try:
        new.wait_for(lambda m: any(isinstance(x, Disarm) and x.scope_id == "s" for x in m))
    finally:
        new.close()


def test_warn_once_per_outage_and_carry_on(fifo_path: pathlib.Path) -> None:
    client = FileTimerClient(fifo_path, on_unavailable="warn", labels={})
    ran = 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(5):
            with expires(after=5, scope="s", client=client):
                ran += 1
    assert ran == 5
    assert [w.category for w in caught] == [ServerUnavailableWarning]
    assert "carrying on" in str(caught[0].message)
    # The server comes; then goes again: a new outage, a new warning.
    peer = FifoPeer(fifo_path)
    client.arm("t", 5)
    assert peer.wait_for(lambda m: any(isinstance(x, Arm) and x.scope_id == "t" for x in m))
    peer.close()
    with pytest.warns(ServerUnavailableWarning):
        client.arm("t", 5)


def test_ignore_is_silent(fifo_path: pathlib.Path) -> None:
    client = FileTimerClient(fifo_path, on_unavailable="ignore")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with expires(after=5, client=client):
            pass
        client.release_all()
        client.expire("x")


def test_block_exception_propagates_unchanged_when_the_disarm_fails(peer: FifoPeer) -> None:
    client = FileTimerClient(peer.path, labels={})

    error = LookupError("mine")

    def step() -> None:
        with expires(after=60, scope="s", client=client):
            peer.close()  # the server goes away inside the block
            raise error

    with pytest.raises(LookupError) as info:
        step()
    assert info.value is error
    assert client._channel.needs_resync  # the lost disarm will be made good


# -- stalled ------------------------------------------------------------------------------


def test_a_full_queue_waits_a_bounded_time_then_fails_fast(server: Peer) -> None:
    client = FileTimerClient(server.path, write_timeout=1.0, labels={})
    client.arm("a", 60)
    server.wait_count(1)
    server.pause()
    server.fill()
    start = time.monotonic()
    with pytest.raises(ServerStalled, match="has not drained") as info:
        client.arm("b", 60)
    assert 0.95 <= time.monotonic() - start < 10
    assert info.value.errno == errno.EAGAIN
    assert not isinstance(info.value, BlockingIOError)
    # Still stalled: fail at once rather than stall every step.
    start = time.monotonic()
    with pytest.raises(ServerStalled):
        client.release("a")
    assert time.monotonic() - start < 0.9  # not the write timeout's 0.95 s and more again
    # The server drains: the next message brings it up to date first.
    server.take()
    server.resume()
    server.wait_drained()
    client.arm("c", 60)
    messages = server.wait_for(lambda m: any(getattr(x, "scope_id", "") == "c" for x in m))
    # The resync first: the disarm owed (the release of "a" that stalled; none of "b",
    # whose arm the full queue refused: it never went out), then the registry's arms.
    assert [(type(m), m.scope_id) for m in messages[:2]] == [  # type: ignore[union-attr]
        (Disarm, "a"),
        (Arm, "c"),
    ]
    assert scopes(server_state(messages)) == {"c"}  # "b" was refused, "a" released


def test_a_stall_shorter_than_the_timeout_is_invisible(server: Peer) -> None:
    client = FileTimerClient(server.path, write_timeout=5.0, labels={})
    server.pause()
    server.fill()
    server.take()
    timer = threading.Timer(0.2, server.resume)
    timer.start()
    client.arm("a", 60)  # waits for room, then goes through
    timer.join()
    (arm,) = server.wait_count(1)
    assert isinstance(arm, Arm)
    assert arm.scope_id == "a"


@pytest.mark.parametrize("policy", ["warn", "ignore"])
def test_a_stall_with_warn_or_ignore_keeps_the_arm_and_resends_it(
    server: Peer, policy: str
) -> None:
    client = FileTimerClient(server.path, write_timeout=0.1, on_unavailable=policy, labels={})
    server.pause()
    server.fill()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        client.arm("a", 60)
    assert [w.category for w in caught] == ([ServerUnavailableWarning] if policy == "warn" else [])
    assert all("drained" in str(w.message) for w in caught)
    assert client.armed == {"a"}
    server.take()
    server.resume()
    # No further call: the background resync delivers it.
    messages = server.wait_for(lambda m: (ME, "a") in server_state(m))
    assert [(type(m), m.scope_id) for m in messages] == [(Arm, "a")]  # type: ignore[union-attr]


# -- restarted ----------------------------------------------------------------------------


def test_restart_resyncs_on_the_next_message(server: Peer) -> None:
    # FIFO: the write finds no reader (EPIPE); socket: the send is refused (ECONNREFUSED).
    client = FileTimerClient(server.path, labels={})
    client.arm("a", 60)
    client.arm("b", 60)
    client.arm("gone", 60)
    client.release("gone")
    server.wait_count(4)
    new = restart(server)
    try:
        client.arm("c", 60)
        messages = new.wait_for(lambda m: (ME, "c") in server_state(m))
        # Never a disarm_all: it would wipe what other channels armed for this pid. The
        # last disarm delivered goes again: the old server may have died before reading
        # it, and the new one restored its timer.
        assert [m.scope_id for m in messages if not isinstance(m, Arm)] == ["gone"]
        assert not [m for m in messages if isinstance(m, DisarmAll)]
        assert scopes(server_state(messages)) == {"a", "b", "c"}
        # The re-sent arms carry the deadlines they were armed with.
        first = {m.scope_id: m.deadline for m in server.messages if isinstance(m, Arm)}
        again = {m.scope_id: m.deadline for m in messages if isinstance(m, Arm)}
        assert (again["a"], again["b"]) == (first["a"], first["b"])
    finally:
        new.close()


def test_a_disarm_lost_in_an_outage_is_made_good_without_another_call(server: Peer) -> None:
    client = FileTimerClient(server.path, on_unavailable="warn", labels={})
    with expires(after=60, scope="kept", client=client):
        client.arm("step", 60)
        server.wait_count(2)
        server.close()
        server.path.unlink()  # removed: ENOENT
        with pytest.warns(ServerUnavailableWarning, match="no FIFO"):
            client.release("step")  # lost: no server
    # A server that restored "step" and "kept" from its state file must not reap this
    # healthy process later: the client tells it, unprompted, as soon as it is back.
    new = type(server)(server.path)  # made again
    try:
        restored = [Arm(ME, "step", 1.0, 9), Arm(ME, "kept", 1.0, 9)]
        new.wait_for(lambda m: scopes(server_state([*restored, *m])) == set())
    finally:
        new.close()


def test_a_path_made_again_while_the_old_server_is_stopped_is_noticed_when_full(
    server: Peer,
) -> None:
    # The old server still holds its FIFO or socket but reads no more; a new one made a
    # new one at the path. Writes queue on the old one until it is full: then the client
    # compares the path's inode with the one it opened, reconnects and resyncs.
    client = FileTimerClient(server.path, write_timeout=5.0, labels={})
    client.arm("a", 60)
    server.wait_count(1)
    server.pause()
    server.path.unlink()
    new = type(server)(server.path)
    try:
        start = time.monotonic()
        for i in range(2000):
            client.arm("b", 60 + i)
            if new.messages:
                break
        assert time.monotonic() - start < 2.5  # no write_timeout spent on the old one
        messages = new.wait_for(lambda m: (ME, "b") in server_state(m))
        assert scopes(server_state(messages)) == {"a", "b"}
    finally:
        new.close()


def test_resync_after_restart_in_protocol_1(peer: FifoPeer) -> None:
    client = FileTimerClient(peer.path, protocol=1, on_unavailable="ignore")
    client.arm("a", 60)
    client.arm("b", 60)
    peer.wait_count(2)
    peer.close()
    peer.path.unlink()
    client.release("b")  # lost
    new = FifoPeer(peer.path)
    try:
        # torch's server forgets everything when it restarts: re-send what is armed.
        messages = new.wait_for(lambda m: (ME, "a") in server_state(m))
        assert scopes(server_state(messages)) == {"a"}
        assert Disarm not in {type(m) for m in messages}
    finally:
        new.close()


@pytest.mark.parametrize(("arming", "beating"), [("raise", "ignore"), ("ignore", "raise")])
def test_a_heartbeat_through_another_client_follows_the_callers_policy(
    peer: FifoPeer, arming: str, beating: str
) -> None:
    # A heartbeat of a scope another client armed followed that client's policy: a
    # caller that chose "ignore" got ServerUnavailable, one that chose "raise" nothing.
    a = FileTimerClient(peer.path, on_unavailable=arming)
    b = FileTimerClient(peer.path, on_unavailable=beating)
    a.arm("s", 60)
    peer.close()  # the server left
    if beating == "raise":
        with pytest.raises(ServerUnavailable):
            b.heartbeat("s", 60)
    else:
        b.heartbeat("s", 60)
    assert (a.armed, b.armed) == ({"s"}, frozenset())  # still the timer of a
