"""The channel's retry and watch threads at their edges (``_channel.py``; each test seen
to fail with a mutant of the code that no other test caught): a connection's watch ends
as soon as the connection is let go of, and quietly when its client was dropped while it
probed; protocol 1's retry forgets its progress when the reader left; a retry that got a
line through backs off from the first delay again, and retries after an early one wait
out their backoff; the retry pauses between two chunks, is no longer counted once it
ends, and lets go of the connection of a client closed meanwhile. A watch whose finding
was not acted on (a delivery failed meanwhile) goes on watching (it ended: a bug). Every
server here is a recording peer: nothing is ever signalled."""

from __future__ import annotations

import gc
import os
import threading
import time
import weakref
from typing import Any, Callable, List, Tuple

import pytest
from tests.conftest import wait_until

from ftimer_client import FileTimerClient, ServerUnavailable, _channel, _resync
from ftimer_client._resync import Resync
from ftimer_client._writer import Writer
from ftimer_protocol import PIPE_BUF, TimerRequestV1

from .conftest import FifoPeer, Peer, SocketPeer, restart, server_state
from .test_channel_retry_loop import lose_server, retrying
from .test_watch import watches

ME = os.getpid()


@pytest.mark.parametrize("how", ["closed", "reconnected"])
def test_a_connections_watch_ends_as_soon_as_the_connection_is_let_go_of(
    server: Peer, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    # _channel.py _connect: self._watching = ended, which _disconnect() sets. Without
    # it, the watch of a connection closed (close()) or replaced (a reconnection) was
    # never told: it lingered a whole WATCH_EVERY (here made long) before it looked
    # and found its connection gone, a thread and the old writer held meanwhile.
    monkeypatch.setattr(_channel, "WATCH_EVERY", 60.0)
    before = watches()
    client = FileTimerClient(server.path, labels={})
    client.arm("s", 60)
    server.wait_count(1)
    [watch] = watches() - before
    new = server
    try:
        if how == "reconnected":
            new = restart(server)
            client.arm("t", 60)  # finds the connection lost: reconnects, resyncs
            messages = new.wait_for(lambda m: (ME, "t") in server_state(m))
            assert {s for p, s in server_state(messages) if p == ME} == {"s", "t"}
        else:
            client.close()
        watch.join(10)
        assert not watch.is_alive()
        if how == "reconnected":
            client.close()
    finally:
        if new is not server:
            new.close()


def test_a_client_dropped_while_its_watch_probes_a_lost_connection_ends_the_watch_quietly(
    peer: FifoPeer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # _channel.py _watch: the probe is made holding neither the channel nor its lock,
    # and the channel is looked up again after it ("if held is None: return"). A client
    # dropped without close() meanwhile (its channel collected): without the look-up,
    # or acting on it regardless, the watch raised AttributeError as it ended, a
    # traceback on stderr (threading.excepthook) of a program that did nothing wrong.
    monkeypatch.setattr(_channel, "WATCH_EVERY", 0.02)
    raised: List[Any] = []
    monkeypatch.setattr(threading, "excepthook", raised.append)
    client = FileTimerClient(peer.path, labels={})
    client.arm("s", 60)
    peer.wait_count(1)
    writer = client._channel._writer
    assert writer is not None
    probing, go = threading.Event(), threading.Event()
    watch: List[threading.Thread] = []
    lost = type(writer).lost

    def held_probe(self: Any) -> bool:
        if self is writer and not watch:
            watch.append(threading.current_thread())
            probing.set()
            go.wait(10)
        return lost(self)

    monkeypatch.setattr(type(writer), "lost", held_probe)
    new = restart(peer)  # the probe finds the connection gone
    try:
        assert probing.wait(10)
        dropped = weakref.ref(client._channel)
        del client
        gc.collect()
        assert dropped() is None
        go.set()
        watch[0].join(10)
        assert not watch[0].is_alive()
        assert raised == []
        assert new.messages == []  # nothing was resent for a client gone
    finally:
        go.set()
        new.close()


def test_a_protocol_1_retry_resends_what_died_in_a_fifo_its_reader_left(
    peer: FifoPeer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # _channel.py _retry_step: protocol 1's "self.state.forget_progress()" when a step's
    # line found the reader gone. A step (a line per step here) had sent the lost
    # disarm of "t" into the FIFO of a server that stopped reading; the server left
    # between the next step's open and its write (the hook closes it there), so what
    # the pipe held died unread once the step closed its writer, and another server
    # opened the same FIFO (not made anew: nothing tells the client). Progress kept,
    # the retry went on after the disarm, and the new server never had it: any line
    # of the resync sent before the reader left (an arm as well) was lost so.
    monkeypatch.setattr(_channel, "RETRY_CHUNK", 1)
    # The disarm of "t" is owed: it may have gone out.
    client = retrying(peer, "abc", "t", protocol=1)
    channel = client._channel
    peers: List[FifoPeer] = []
    opens = [0]
    open_once, close_once = _channel.Channel._open_once, _channel.Channel._close_once

    def opening(self: _channel.Channel) -> Writer:
        writer = open_once(self)
        if self is channel and peers:
            opens[0] += 1
            if opens[0] == 2:  # the second step: its server leaves before it writes
                peers[0].close()
        return writer

    def closing(self: _channel.Channel, writer: Writer) -> None:
        close_once(self, writer)
        if self is channel and opens[0] == 2 and len(peers) == 1:
            peers.append(FifoPeer(peer.path, create=False))  # the same FIFO, read again

    monkeypatch.setattr(_channel.Channel, "_open_once", opening)
    monkeypatch.setattr(_channel.Channel, "_close_once", closing)
    with channel.lock:  # the retry waits: the server is there, not reading, first
        peers.append(FifoPeer(peer.path))
        peers[0].pause()
    try:
        wait_until(lambda: len(peers) == 2, what="the server to come back")
        messages = peers[1].wait_for(
            lambda m: (
                {(ME, s) for s in "abc"} <= set(server_state(m))
                and any(
                    isinstance(x, TimerRequestV1) and x.is_release and x.scope_id == "t" for x in m
                )
            )
        )
        wait_until(lambda: not channel._retrying(), what="the retry thread to end")
        assert {s for p, s in server_state(messages) if p == ME} == {"a", "b", "c"}
        client.close()
    finally:
        for server in peers:
            server.close()


def test_a_retry_that_got_lines_through_backs_off_from_the_first_delay_again(
    speer: SocketPeer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # _channel.py _retry_lines: "if sent: state.retry_progressed()". A stalled server
    # that makes room for a line (here: one datagram taken off its full queue) drains:
    # the retry that got a line through, then found the queue full again, backs off
    # from RETRY_FIRST once more. Without it, the backoff kept growing to RETRY_MAX
    # (a second between tries) on a server that was draining, slow as it was.
    client = FileTimerClient(speer.path, transport="socket", write_timeout=0.05, labels={})
    client.arm("a", 60)
    client.arm("c", 60)
    speer.wait_count(2)
    channel = client._channel
    delays: List[Tuple[float, bool]] = []  # each failed retry's delay, and whether
    fails = threading.Semaphore(0)  # a line of the resync had gone through before it
    retry_failed = Resync.retry_failed

    def failing(state: Resync, now: float) -> None:
        retry_failed(state, now)
        if state is channel.state:  # (other tests' channels may still retry)
            delays.append((state._retry_at - now, bool(state._synced)))  # type: ignore[operator]
            fails.release()

    monkeypatch.setattr(Resync, "retry_failed", failing)
    speer.pause()
    speer.fill()
    with pytest.raises(ServerUnavailable):
        client.arm("b", 60)  # the resync owes two lines: the arms of "a" and "c"
    for _ in range(3):  # three retries in vain: 0.1 + 0.2 + 0.4 s of backoff
        assert fails.acquire(timeout=10)
    speer.sock.recv(PIPE_BUF)  # room for one datagram: a retry gets a line through
    wait_until(lambda: any(through for _, through in delays), what="a line through")
    speer.resume()
    messages = speer.wait_for(lambda m: {(ME, "a"), (ME, "c")} <= set(server_state(m)))
    wait_until(lambda: not channel._retrying(), what="the retry thread to end")
    assert {s for p, s in server_state(messages) if p == ME} == {"a", "c"}
    client.close()
    assert [d for d, _ in delays[:3]] == pytest.approx([0.1, 0.2, 0.4])
    after = next(d for d, through in delays if through)  # then the queue full again
    assert after == pytest.approx(0.1)  # from the first delay again


@pytest.mark.parametrize("by", ["the retry", "a caller"])
def test_an_outage_while_the_last_retry_thread_is_still_ending_gets_a_retry_of_its_own(
    server: Peer, monkeypatch: pytest.MonkeyPatch, by: str
) -> None:
    # _channel.py _retry_loop: "self._retry = None", under the lock, before the thread
    # ends (once back in sync, whether its step or a caller's delivery made it so).
    # Left set, the thread counted as retrying (_retrying: is_alive()) until it had
    # ended: a delivery that failed in between (the hook holds the ending thread) found
    # a retry running and started none, and the timers of a worker that then sent
    # nothing more never reached the server once it was back.
    client = FileTimerClient(server.path, labels={})
    client.arm("s", 60)
    server.wait_count(1)
    channel = client._channel
    ending, release = threading.Event(), threading.Event()
    started = [0]
    start_helper = _channel.start_helper

    def helper(target: Callable[..., None], args: Tuple[Any, ...], name: str) -> threading.Thread:
        if getattr(target, "__self__", None) is not channel or started[0]:
            return start_helper(target, args, name)
        started[0] += 1

        def first_retry() -> None:
            try:
                target(*args)
            finally:  # the lock let go of: ending, not ended yet
                ending.set()
                release.wait(10)

        return start_helper(first_retry, (), name)

    monkeypatch.setattr(_channel, "start_helper", helper)
    lose_server(client, server, "t")
    first = channel._retry
    assert first is not None
    peers: List[Peer] = []
    try:
        with channel.lock:  # the retry waits
            peers.append(type(server)(server.path))
            if by == "a caller":
                client.arm("u", 60)  # delivers the resync, then its own line
        assert ending.wait(10)
        lose_server(client, peers[0], "v")  # the server goes again: a retry is due
        release.set()
        first.join(10)
        assert not first.is_alive()
        assert channel._retrying()
        peers.append(type(server)(server.path))
        armed = {"s", "u"} if by == "a caller" else {"s"}
        messages = peers[1].wait_for(lambda m: {(ME, s) for s in armed} <= set(server_state(m)))
        wait_until(lambda: not channel._retrying(), what="the retry thread to end")
        assert {s for p, s in server_state(messages) if p == ME} == armed
        client.close()
    finally:
        release.set()
        for peer in peers:
            peer.close()


def test_a_retry_that_ends_after_the_last_client_closed_lets_go_of_the_connection(
    server: Peer,
) -> None:
    # _channel.py _retry_loop: "self._let_go()" as the retry ends with nothing owed any
    # more (a caller's delivery resynced). The last client closed while the retry ran
    # (detach() leaves the connection to it: disarms lost in the outage are still
    # owed); its close() delivered everything, and the retry then found nothing to
    # send. Without it, the connection (a descriptor, its watch thread) stayed open
    # for a channel no client used any more.
    client = retrying(server, labels={})
    channel = client._channel
    before = watches()
    with channel.lock:  # the retry waits: the close comes first
        back = type(server)(server.path)
        client.close()  # delivers the resync and its disarm, and detaches
        assert not channel.needs_resync
        assert channel.transport is not None  # left to the retry, still running
        [watch] = watches() - before
    try:
        wait_until(lambda: not channel._retrying(), what="the retry thread to end")
        assert channel.transport is None
        watch.join(10)
        assert not watch.is_alive()
        messages = back.wait_count(2)
        assert {s for p, s in server_state(messages) if p == ME} == set()
    finally:
        back.close()


def test_retries_after_a_stalled_server_went_away_wait_out_their_backoff(
    peer: FifoPeer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # _channel.py _retry_loop: "early = False" once a step runs. A stalled server is
    # sent what it is owed as soon as it makes room (early), not at the backoff's end;
    # here it went away instead (its pipe polls in error: woken early), and every
    # retry after that one must wait out its backoff. Left True, each retry came at
    # once after the last one failed: a loop of open() attempts on a server that is
    # not there, using a CPU for as long as it stays away.
    client = FileTimerClient(peer.path, write_timeout=0.05, labels={})
    client.arm("s", 60)
    peer.wait_count(1)
    channel = client._channel
    steps: List[Tuple[float, float]] = []  # (when a step ran, when it was due)
    retry_step = _channel.Channel._retry_step

    def step(self: _channel.Channel) -> object:
        if self is channel:
            steps.append((time.monotonic(), self.state._retry_at))  # type: ignore[arg-type]
        return retry_step(self)

    monkeypatch.setattr(_channel.Channel, "_retry_step", step)
    peer.pause()
    peer.fill()
    with pytest.raises(ServerUnavailable):
        client.arm("t", 60)  # a stall: the retry waits for room
    assert channel.state.stalled
    with channel.lock:  # the retry waits: the server goes before it looks
        peer.close()
        peer.path.unlink()
        steps.clear()
    wait_until(lambda: len(steps) >= 4, what="four retries")
    back = FifoPeer(peer.path)
    try:
        back.wait_for(lambda m: (ME, "s") in server_state(m))
        wait_until(lambda: not channel._retrying(), what="the retry thread to end")
        client.close()
    finally:
        back.close()
    late = [when >= due for when, due in steps[1:4]]  # the first: woken early
    assert late == [True, True, True]


def test_the_retry_lets_go_of_the_lock_for_a_pause_between_two_chunks(
    server: Peer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # _channel.py _retry_loop: "wait, parked = RETRY_PAUSE, None" once a step sent a
    # chunk and more is owed. Python's lock is not fair: let go of and taken again at
    # once, it rarely passes to a caller waiting for it. Without the pause, the next
    # chunk followed at once (a sleep of the due retry's 0 s), and a caller (a signal
    # handler) could wait for the whole resync, not a chunk. (A sleep is never shorter
    # than asked: the gaps below are a lower bound, not a guess at timing.)
    monkeypatch.setattr(_channel, "RETRY_CHUNK", 1)
    monkeypatch.setattr(_channel, "RETRY_PAUSE", 0.1)
    client = retrying(server, "abc", "d", labels={})
    channel = client._channel
    steps: List[float] = []
    retry_step = _channel.Channel._retry_step

    def step(self: _channel.Channel) -> object:
        if self is channel:
            steps.append(time.monotonic())
        return retry_step(self)

    monkeypatch.setattr(_channel.Channel, "_retry_step", step)
    with channel.lock:  # the retry waits: the steps counted are those that send
        back = type(server)(server.path)
        steps.clear()
    try:
        messages = back.wait_for(lambda m: {(ME, s) for s in "abc"} <= set(server_state(m)))
        wait_until(lambda: not channel._retrying(), what="the retry thread to end")
        assert {s for p, s in server_state(messages) if p == ME} == {"a", "b", "c"}
        client.close()
    finally:
        back.close()
    assert len(steps) >= 4  # the disarm of "d", then "a", "b", "c": a line a step
    assert min(b - a for a, b in zip(steps, steps[1:])) >= 0.1


def test_a_watch_whose_finding_came_while_a_delivery_failed_goes_on_watching(
    peer: FifoPeer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The watch ended once it handed a finding to _found_lost, which ignores one made
    # while the server's view is unknown (needs_resync: a delivery failed during the
    # probe, here a stall). When the retry then resynced on that same connection (the
    # old server, replaced at the path but still reading, drained its FIFO), the
    # connection was in sync and watched by nobody: the new server never learned the
    # stuck worker's timer.
    monkeypatch.setattr(_channel, "WATCH_EVERY", 0.02)
    # The retry's first step waits for room (held below), not for a short backoff.
    first = _resync.RETRY_FIRST
    monkeypatch.setattr(_resync, "RETRY_FIRST", 10.0)
    client = FileTimerClient(peer.path, write_timeout=0.05, labels={})
    client.arm("s", 60)
    peer.wait_count(1)
    channel = client._channel
    writer = channel._writer
    assert writer is not None
    probing, go, found = threading.Event(), threading.Event(), threading.Event()
    ignored: List[bool] = []
    lost, wait_room = type(writer).lost, type(writer).wait_room
    found_lost = _channel.Channel._found_lost

    def held_probe(self: Any) -> bool:
        if self is writer and not probing.is_set():
            probing.set()
            go.wait(10)
        return lost(self)

    def finding(self: _channel.Channel, lost_writer: Writer) -> None:
        if self is channel:
            ignored.append(self.state.needs_resync)
        found_lost(self, lost_writer)
        if self is channel:
            _resync.RETRY_FIRST = first  # the next outage's backoff, as it was
            found.set()

    def held_wait(self: Any, timeout: float) -> bool:
        if self is writer and threading.current_thread().name == "ftimer-client-resync":
            found.wait(10)  # the retry resyncs once the watch handed its finding over
        return bool(wait_room(self, timeout))

    monkeypatch.setattr(type(writer), "lost", held_probe)
    monkeypatch.setattr(type(writer), "wait_room", held_wait)
    monkeypatch.setattr(_channel.Channel, "_found_lost", finding)
    assert probing.wait(10)  # the watch looks, the server's view known
    peer.pause()
    peer.fill()
    with pytest.raises(ServerUnavailable):
        client.arm("t", 60)  # a stall: the view is unknown, the retry waits for room
    assert channel.needs_resync
    peer.resume()
    peer.wait_drained()
    peer.path.unlink()  # a new server at the path; the old one still reads its own
    new = FifoPeer(peer.path)
    try:
        go.set()  # the probe finds the path naming another FIFO
        assert found.wait(10)
        assert ignored == [True]
        wait_until(lambda: not channel._retrying(), what="the retry thread to end")
        assert channel._writer is writer  # resynced on the old connection
        new.wait_for(lambda m: (ME, "s") in server_state(m), timeout=5)
        client.close()
    finally:
        go.set()
        new.close()
