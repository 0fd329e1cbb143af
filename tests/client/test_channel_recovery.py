"""More behaviour of ftimer_client/_channel.py that no test pinned, found by mutation
testing (each test fails with the mutant that found it)."""

from __future__ import annotations

import os
import threading
import time
from collections import Counter
from typing import List

import pytest
from tests.conftest import wait_until

from ftimer_client import FileTimerClient, ServerStalled, ServerUnavailable
from ftimer_client._resync import Resync
from ftimer_protocol import Arm

from .conftest import (
    FILL_LINE,
    FifoPeer,
    Peer,
    descriptors_on,
    held_only,
    restart,
    server_state,
)

N = 300  # scopes: their resync is longer than the room the tests leave in a pipe


def _scopes(messages) -> set:
    return {s for p, s in server_state(messages) if p == os.getpid()}


def _make_room(peer: FifoPeer, nbytes: int) -> None:
    """Take whole fill lines out of a paused peer's full pipe: room for ``nbytes``."""
    os.read(peer.rfd, (nbytes // len(FILL_LINE) + 1) * len(FILL_LINE))


def _arm_many(client: FileTimerClient, peer: Peer) -> None:
    for i in range(N):
        client.arm(f"s{i}", 600)
    peer.wait_for(lambda m: len(_scopes(m)) == N)


def _interrupt_a_delivery(client: FileTimerClient, monkeypatch: pytest.MonkeyPatch) -> None:
    """A delivery interrupted (a signal handler's exception) before its line went out:
    the server's view is unknown, the connection is kept."""
    writer_type = type(client._channel._writer)

    def interrupted(self, line, timeout):
        raise KeyboardInterrupt

    monkeypatch.setattr(writer_type, "write", interrupted)
    with pytest.raises(KeyboardInterrupt):
        client.expire("e", signal=0)  # always a delivery (no hot path)
    monkeypatch.undo()
    assert client._channel.needs_resync


def _close_once_written(peer: FifoPeer, level: int) -> threading.Thread:
    """Close ``peer`` (its reader leaves) once something was written past ``level``."""

    def run() -> None:
        deadline = time.monotonic() + 10
        while peer.unread() <= level and time.monotonic() < deadline:
            time.sleep(0.001)
        peer.close()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def test_an_arm_interrupted_as_its_line_goes_out_leaves_the_server_its_previous_line(
    server: Peer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # _channel.py _write_all: state.unsure(). The resync sent first carried the scope's
    # previous arm (recorded as delivered); the new arm went out, then the interrupt came:
    # the arm is undone, so the resync must send the previous arm again. Without unsure()
    # the server keeps the new deadline of an arm the caller was told did not happen.
    client = FileTimerClient(server.path, labels={})
    client.arm("s", 60)
    old = server_state(server.wait_count(1))[(os.getpid(), "s")]
    channel = client._channel
    writer_type = type(channel._writer)
    real = writer_type.write
    previous_line = channel.armed["s"][0]
    with channel.lock:  # the retry thread waits: the test's calls come first
        _interrupt_a_delivery(client, monkeypatch)

        def written_then_interrupted(self, line, timeout):
            real(self, line, timeout)
            if b'"scope_id":"s"' in line and line != previous_line:  # the new arm
                raise KeyboardInterrupt

        monkeypatch.setattr(writer_type, "write", written_then_interrupted)
        with pytest.raises(KeyboardInterrupt):
            client.arm("s", 3600)
        monkeypatch.undo()
    assert channel.armed["s"][0] == previous_line
    client.arm("sync", 60)
    messages = server.wait_for(lambda m: (os.getpid(), "sync") in server_state(m))
    assert server_state(messages)[(os.getpid(), "s")] == old


def test_a_callers_partly_sent_resync_is_not_sent_again(peer: FifoPeer) -> None:
    # _channel.py _write_all: state.accepted(). A caller's delivery that got part of the
    # resync through before the pipe filled: the retry goes on from there ("What the
    # resync already delivered is not sent again"), not from the start.
    client = FileTimerClient(peer.path, labels={}, write_timeout=0.1)
    _arm_many(client, peer)
    peer.take()
    peer.pause()
    peer.fill()
    with pytest.raises(ServerUnavailable):
        client.arm("x", 60)  # a stall: the resync is owed, the retry thread starts
    channel = client._channel
    with channel.lock:  # the retry thread waits: this caller's delivery comes first
        level = peer.unread()
        _make_room(peer, 8192)
        with pytest.raises(ServerUnavailable):
            client.arm("y", 60)  # part of the resync, then no room
        assert peer.unread() > level - 8192  # it got some through
    peer.resume()
    peer.wait_for(lambda m: len(_scopes(m)) == N)
    wait_until(lambda: not channel.needs_resync, what="the retry's resync")
    arms = Counter(m.scope_id for m in peer.take() if isinstance(m, Arm))
    assert {s: n for s, n in arms.items() if n > 1} == {}


def test_protocol_1_resends_what_died_with_a_reader_that_left_mid_write(peer: FifoPeer) -> None:
    # _channel.py _write_all: state.forget_progress() on ConnectionLost (protocol 1).
    # The resync's lines written to a pipe whose reader left are lost with it: the next
    # server gets them all.
    client = FileTimerClient(peer.path, protocol=1, write_timeout=10)
    _arm_many(client, peer)
    peer.close()  # gone: the path stays, nobody reads it
    with pytest.raises(ServerUnavailable):
        client.arm("x", 60)  # not delivered: the resync is owed
    channel = client._channel
    with channel.lock:  # the retry thread waits: this caller's delivery comes first
        second = FifoPeer(peer.path, create=False)
        second.pause()
        second.fill()
        _make_room(second, 8192)
        closer = _close_once_written(second, second.unread())
        with pytest.raises(ServerUnavailable):
            client.arm("y", 60)  # part of the resync, waits for room, the reader leaves
        closer.join()
    third = restart(second)
    try:
        third.wait_for(lambda m: len(_scopes(m)) == N, timeout=5)
    finally:
        third.close()


def test_protocol_1_resends_what_a_stalled_reader_held_when_it_left(peer: FifoPeer) -> None:
    # _channel.py _open_once: state.forget_progress() when no reader is there. The
    # resync's lines a stalled server held unread died with it: the next server gets them.
    client = FileTimerClient(peer.path, protocol=1, write_timeout=0.1)
    _arm_many(client, peer)
    peer.pause()
    peer.fill()
    with pytest.raises(ServerUnavailable):
        client.arm("x", 60)  # a stall: the resync is owed
    channel = client._channel
    with channel.lock:
        _make_room(peer, 8192)
        level = peer.unread()
        with pytest.raises(ServerUnavailable):
            client.arm("y", 60)  # part of the resync, then no room
        assert peer.unread() > level
        peer.close()  # the stalled server goes (the path stays, nobody reads it)
    # The retry finds no reader (let it try: it backs off), then a new server comes.
    fails: List[float] = []
    failed = Resync.retry_failed

    def counting(state: Resync, now: float) -> None:
        if state is channel.state:  # (other tests' channels may still retry)
            fails.append(now)
        failed(state, now)

    mp = pytest.MonkeyPatch()
    mp.setattr(Resync, "retry_failed", counting)
    try:
        n = len(fails)
        wait_until(lambda: len(fails) >= n + 2, what="two retries that found no reader")
    finally:
        mp.undo()
    third = restart(peer)
    try:
        third.wait_for(lambda m: len(_scopes(m)) == N, timeout=5)
    finally:
        third.close()


@pytest.mark.parametrize("protocol", [1, 2])
def test_what_a_stalled_reader_held_when_it_was_replaced_is_resent(
    peer: FifoPeer, protocol: int
) -> None:
    # As above, but the new server is there before the retry looks (a restart between two
    # retries): nothing fails to open, and yet the old pipe's lines were never read.
    # Protocol 2 finds its kept connection lost and starts over; protocol 1 (one open per
    # message) never learned that the FIFO it opened now was another one (on ext4, with
    # the old one's inode number): the scopes the stalled server held unread never
    # reached the new one.
    client = FileTimerClient(peer.path, protocol=protocol, write_timeout=0.1)
    _arm_many(client, peer)
    peer.pause()
    peer.fill()
    with pytest.raises(ServerUnavailable):
        client.arm("x", 60)
    channel = client._channel
    with channel.lock:
        _make_room(peer, 8192)
        level = peer.unread()
        with pytest.raises(ServerUnavailable):
            client.arm("y", 60)
        assert peer.unread() > level
        third = restart(peer)
    try:
        third.wait_for(lambda m: len(_scopes(m)) == N, timeout=5)
    finally:
        third.close()


def test_protocol_2_resends_what_died_with_a_server_that_left_twice(
    peer: FifoPeer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # _channel.py _disconnect: state.forget_progress(). A delivery reconnects to a
    # restarted server, gets part of the resync into its pipe, and that one goes too: the
    # lines died with it, the next server gets them all.
    client = FileTimerClient(peer.path, labels={}, write_timeout=10)
    _arm_many(client, peer)
    channel = client._channel
    with channel.lock:  # the retry thread waits: this caller's delivery comes first
        _interrupt_a_delivery(client, monkeypatch)  # out of sync, connection kept
        peer.close()
        peer.path.unlink()
        second = FifoPeer(peer.path)
        second.pause()
        second.fill()
        _make_room(second, 8192)
        closer = _close_once_written(second, second.unread())
        with pytest.raises(ServerUnavailable):
            client.arm("y", 60)  # lost, reconnects, part of the resync, lost again
        closer.join()
    third = restart(second)
    try:
        third.wait_for(lambda m: len(_scopes(m)) == N, timeout=5)
    finally:
        third.close()


def test_the_retry_thread_waits_between_attempts(
    peer: FifoPeer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # _channel.py _retry_loop: time.sleep(wait). During an outage the retry thread backs
    # off between attempts; without the wait it spins, a core busy for the outage.
    client = FileTimerClient(peer.path, labels={})
    client.arm("s", 60)
    peer.wait_count(1)
    looks: List[float] = []
    fails = threading.Semaphore(0)
    next_retry, retry_failed = Resync.next_retry, Resync.retry_failed

    def counting(state: Resync, now: float):
        if state is client._channel.state:  # (other tests' channels may still retry)
            looks.append(now)
        return next_retry(state, now)

    def failing(state: Resync, now: float) -> None:
        retry_failed(state, now)
        if state is client._channel.state:
            fails.release()

    monkeypatch.setattr(Resync, "next_retry", counting)
    monkeypatch.setattr(Resync, "retry_failed", failing)
    peer.close()
    with pytest.raises(ServerUnavailable):
        client.arm("t", 60)
    for _ in range(3):  # three attempts in vain (0.05 + 0.1 + 0.2 s of backoff)
        assert fails.acquire(timeout=10)
    monkeypatch.undo()
    assert len(looks) < 50


def test_an_arm_interrupted_once_its_line_went_out_is_disarmed(
    server: Peer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # _channel.py arm(): on an interrupt, state.lost_disarms() and self._failed(None).
    # The arm's line reached the server, then a signal handler's exception came: the
    # arm is undone (the caller was told it failed), so the server must be told too, or
    # it reaps the worker for a timer nobody armed.
    from ftimer_client._fifo import FifoWriter
    from ftimer_client._socket import SocketWriter

    client = FileTimerClient(server.path, labels={})
    for cls in (FifoWriter, SocketWriter):
        real = cls.write

        def written_then_interrupted(self, line, timeout, real=real):
            real(self, line, timeout)
            raise KeyboardInterrupt

        monkeypatch.setattr(cls, "write", written_then_interrupted)
    with pytest.raises(KeyboardInterrupt):
        client.arm("s", 60)  # the first: connects, so not on the hot path
    monkeypatch.undo()
    assert client.armed == frozenset()
    server.wait_for(lambda m: (os.getpid(), "s") in server_state(m))  # it went out
    client.arm("t", 60)
    messages = server.wait_for(lambda m: (os.getpid(), "t") in server_state(m))
    assert set(server_state(messages)) == {(os.getpid(), "t")}


@pytest.mark.parametrize(
    "call",
    [
        lambda client: client.release("a"),
        lambda client: client.release_all(),
        lambda client: client.expire("e", signal=0),
    ],
    ids=["release", "release_all", "expire"],
)
def test_a_stalled_call_makes_the_next_call_fail_fast(server: Peer, call) -> None:  # type: ignore[no-untyped-def]
    # _channel.py disarm(), disarm_all() and send(): self._failed(e) with the
    # ServerStalled (not None): the stall is remembered, and the next call fails at once
    # instead of stalling again.
    client = FileTimerClient(server.path, write_timeout=1.0, labels={})
    client.arm("a", 60)
    server.wait_count(1)
    server.pause()
    server.fill()
    start = time.monotonic()
    with pytest.raises(ServerStalled):
        call(client)
    assert time.monotonic() - start >= 0.95
    start = time.monotonic()
    with pytest.raises(ServerStalled):
        client.arm("b", 60)
    assert time.monotonic() - start < 0.9
    server.resume()


def _interrupt_once_at_entry(monkeypatch: pytest.MonkeyPatch, name: str) -> List[str]:
    """Make ``Resync.name`` raise KeyboardInterrupt the first time it is called, before
    it does anything: a signal handler's exception landing as it is entered."""
    original = getattr(Resync, name)
    calls: List[str] = []

    def interrupted(self, *args):
        calls.append(name)
        if len(calls) == 1:
            raise KeyboardInterrupt
        return original(self, *args)

    monkeypatch.setattr(Resync, name, interrupted)
    return calls


def test_a_release_interrupted_before_the_registry_forgot_the_scope_still_releases_it(
    peer: FifoPeer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # _channel.py disarm(): "if not forgotten: self.state.disarm(scope_id)". The
    # interrupt came before the scope was forgotten: it still counts released (and its
    # disarm lost), or the resync re-arms it and the worker is reaped after a release.
    client = FileTimerClient(peer.path, labels={})
    client.arm("s", 60)
    assert _interrupt_once_at_entry(monkeypatch, "disarm") is not None
    with pytest.raises(KeyboardInterrupt):
        client.release("s")
    monkeypatch.undo()
    assert client.armed == frozenset()
    client.arm("t", 60)
    messages = peer.wait_for(lambda m: (os.getpid(), "t") in server_state(m))
    assert set(server_state(messages)) == {(os.getpid(), "t")}


def test_a_release_all_interrupted_before_the_registry_forgot_anything_releases_all(
    peer: FifoPeer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # _channel.py disarm_all(): "if not forgotten: ... state.disarm(scope_id)", as above
    # (close() calls disarm_all again on an interrupt; release_all() does not).
    client = FileTimerClient(peer.path, labels={})
    client.arm("a", 60)
    client.arm("b", 60)
    _interrupt_once_at_entry(monkeypatch, "disarm_all")
    with pytest.raises(KeyboardInterrupt):
        client.release_all()
    monkeypatch.undo()
    assert client._channel.armed == {}
    client.arm("t", 60)
    messages = peer.wait_for(lambda m: (os.getpid(), "t") in server_state(m))
    assert set(server_state(messages)) == {(os.getpid(), "t")}


def test_every_disarm_of_a_release_all_lost_in_an_outage_is_delivered(peer: FifoPeer) -> None:
    # _channel.py disarm_all(): state.lost_disarms(scopes). The last disarms delivered
    # are owed again anyway, but only the last RECENT (512) of them: a release_all of
    # more scopes, lost, must still disarm every one on a server back with its state.
    client = FileTimerClient(peer.path, labels={})
    n = 600
    for i in range(n):
        client.arm(f"s{i}", 600)
    peer.wait_for(lambda m: len(_scopes(m)) == n)
    peer.close()  # gone: the path stays, nobody reads it
    with pytest.raises(ServerUnavailable):
        client.release_all()
    new = restart(peer)
    try:
        new.wait_for(
            lambda m: (
                {x.scope_id for x in m if type(x).__name__ == "Disarm"}
                >= {f"s{i}" for i in range(n)}
            ),
            timeout=5,
        )
    finally:
        new.close()


def test_an_expire_lost_in_an_outage_leaves_the_timer_it_replaced_to_the_next_server(
    peer: FifoPeer,
) -> None:
    # _channel.py send(): self._failed(...). The expire of an armed scope did not get
    # through: its timer stands (the registry has it back), and the server that comes
    # back is given it by the retries, or a stuck worker is never reaped.
    client = FileTimerClient(peer.path, labels={})
    client.arm("s", 60)
    peer.wait_count(1)
    peer.close()  # gone: the path stays, nobody reads it
    with pytest.raises(ServerUnavailable):
        client.expire("s")
    assert client.armed == frozenset({"s"})
    new = restart(peer)
    try:
        new.wait_for(lambda m: (os.getpid(), "s") in server_state(m), timeout=5)
    finally:
        new.close()


def test_the_watch_leaves_a_healthy_connection_alone(
    server: Peer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # _channel.py _watch: "if not writer.lost(): continue". A look that finds the server
    # there changes nothing: no reconnection, no resync of every armed scope each second.
    import ftimer_client._channel as channel_module

    monkeypatch.setattr(channel_module, "WATCH_EVERY", 0.01)
    client = FileTimerClient(server.path, labels={})
    client.arm("s", 60)
    server.wait_count(1)
    writer = client._channel._writer
    looks = threading.Semaphore(0)
    lost = type(writer).lost

    def counted(self):
        result = lost(self)
        looks.release()
        return result

    monkeypatch.setattr(type(writer), "lost", counted)
    for _ in range(3):  # three looks, each finding the server there
        assert looks.acquire(timeout=10)
    client.arm("t", 60)
    server.wait_for(lambda m: (os.getpid(), "t") in server_state(m))
    assert client._channel._writer is writer
    assert [getattr(m, "scope_id", None) for m in server.take()] == ["s", "t"]


def test_a_dropped_client_of_another_process_closes_its_pidfd(
    speer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # _channel.py Channel.__del__: a channel let go of without close() (its clients
    # dropped) closes its pidfd: one descriptor leaked per dropped client otherwise.
    import gc
    import subprocess

    from .test_channel_edges import _pidfds

    with subprocess.Popen(["sleep", "60"]) as child:
        try:
            before = _pidfds()
            client = FileTimerClient(speer.path, pid=child.pid, labels={})
            client.arm("s", 60)
            client.release("s")
            speer.wait_count(2)
            assert len(_pidfds() - before) == 1
            del client
            gc.collect()
            deadline = time.monotonic() + 10
            while _pidfds() - before and time.monotonic() < deadline:
                gc.collect()
                time.sleep(0.01)
            assert _pidfds() - before == set()
        finally:
            child.kill()


def test_protocol_1_retries_that_wait_for_room_leave_no_writer_open(peer: FifoPeer) -> None:
    # _channel.py _retry_loop: self._close_once(full) after protocol 1's wait for room.
    # Kept open, each retry leaks a descriptor, and torch's server expires nothing
    # while a writer holds its FIFO.
    client = FileTimerClient(peer.path, protocol=1, write_timeout=0.1)
    client.arm("a", 60)
    peer.wait_count(1)
    fifo = os.stat(peer.path)
    fails = threading.Semaphore(0)
    failed = Resync.retry_failed

    def counting(state: Resync, now: float) -> None:
        failed(state, now)
        if state is client._channel.state:  # (other tests' channels may still retry)
            fails.release()

    mp = pytest.MonkeyPatch()
    mp.setattr(Resync, "retry_failed", counting)
    try:
        peer.pause()
        peer.fill()
        with pytest.raises(ServerUnavailable):
            client.arm("b", 60)
        for _ in range(3):  # retries that found no room
            assert fails.acquire(timeout=10)
    finally:
        mp.undo()
    peer.resume()
    channel = client._channel
    wait_until(lambda: not channel.needs_resync, what="the retry's resync")
    assert channel._once == set()
    # The peer's own two, and the client's hold on the FIFO (O_PATH: no writer).
    assert len(descriptors_on(fifo)) == 3
    assert held_only(channel._once_pin)
    client.close()


def test_retries_on_a_stalled_server_back_off(
    server: Peer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # _channel.py _retry_loop: state.retry_failed() after a wait for room in vain: the
    # retries on a server that stays full back off (0.05 s, 0.1 s, 0.2 s, ...), rather
    # than trying every 0.05 s for as long as it is stalled.
    from ftimer_client._channel import Channel

    client = FileTimerClient(server.path, write_timeout=0.1, labels={})
    client.arm("a", 60)
    server.wait_count(1)
    steps: List[float] = []
    step = Channel._retry_step

    def counted(self):
        if self is client._channel:  # (other tests' channels may still retry)
            steps.append(time.monotonic())
        return step(self)

    monkeypatch.setattr(Channel, "_retry_step", counted)
    server.pause()
    server.fill()
    with pytest.raises(ServerStalled):
        client.arm("b", 60)
    start = time.monotonic()
    deadline = start + 10
    while time.monotonic() < start + 1.5 and time.monotonic() < deadline:
        time.sleep(0.05)  # a stall of 1.5 s
    n = len([t for t in steps if t <= start + 1.5])
    server.resume()
    assert n <= 12  # about 6 with the backoff; about 30 at one every 0.05 s
