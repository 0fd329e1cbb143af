"""The background retry keeps its progress and lets go of the channel's lock between
lines: a resync longer than a busy server reads in a second goes through, a caller is
held no longer than its own write_timeout meanwhile, and whatever callers arm and
disarm while a resync is partly sent, the server ends holding exactly the registry.
Every server here is a recording peer: nothing is ever signalled."""

from __future__ import annotations

import contextlib
import os
import pathlib
import random
import socket
import threading
import time
from typing import Dict, Iterator, List, Tuple

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ftimer_client import FileTimerClient, ServerStalled, ServerUnavailable, _channel, _socket
from ftimer_client._resync import Resync
from ftimer_client._wire import V1Lines, V2Lines
from ftimer_protocol import PIPE_BUF, Arm, Message, Sync, decode, decode_value

from .conftest import FifoPeer, SocketPeer, server_state

ME = os.getpid()

needs_pidfd = pytest.mark.skipif(
    not hasattr(os, "pidfd_open"), reason="the socket transport is Linux's (pidfds)"
)

SCOPES = 400
#: How long the retries may take to bring the slow server up to date: it reads the 400
#: scopes in about 2 s; before the fix they never went through.
CONVERGED_WITHIN = 30.0


class SlowPeer(SocketPeer):
    """A busy server: about a datagram every 4 ms (400 of them: more than a second)."""

    def _read(self) -> None:
        super()._read()
        time.sleep(0.004)  # pacing, not synchronisation


def registry_view(client: FileTimerClient) -> Dict[Tuple[int, str], float]:
    """What the server must hold: every scope of the channel's registry, its deadline."""
    with client._channel.lock:
        lines = [line for line, _ in client._channel.armed.values()]
    return server_state([decode(line) for line in lines])


def mine(messages: List[Message]) -> Dict[Tuple[int, str], float]:
    return {k: v for k, v in server_state(messages).items() if k[0] == ME}


def wait_resynced(client: FileTimerClient, timeout: float = CONVERGED_WITHIN) -> None:
    """Wait until the retry thread has brought the server up to date (it exits then)."""
    retry = client._channel._retry
    if retry is not None:
        retry.join(timeout)
    assert not client._channel.needs_resync, "the retries never went through"


@pytest.fixture
def stalled_slow_server(
    socket_path: pathlib.Path,
) -> Iterator[Tuple[FileTimerClient, SlowPeer]]:
    """A client with SCOPES scopes armed on a slow server that stalled once (its arm
    of "stalled" raised) and reads again: the retry thread has SCOPES lines to send."""
    peer = SlowPeer(socket_path)
    # Armed with time to spare (a loaded machine may be slow to read them); the stall
    # and what follows with the write_timeout of an expires block.
    client = FileTimerClient(peer.path, write_timeout=10.0, labels={})
    try:
        for i in range(SCOPES):
            client.arm(f"s{i}", 600)
        peer.wait_count(SCOPES, timeout=30)
        client._timeout = 0.01
        peer.pause()
        peer.fill()
        with pytest.raises(ServerStalled):
            client.arm("stalled", 600)
        assert client._channel.needs_resync
        peer.resume()
        yield client, peer
        with contextlib.suppress(ServerUnavailable):  # 400 disarms to a slow server
            client.close()
    finally:
        peer.close()


@needs_pidfd
def test_a_resync_longer_than_a_slow_server_reads_in_a_second_goes_through(
    stalled_slow_server: Tuple[FileTimerClient, SlowPeer],
) -> None:
    # Each retry sent the whole resync again from its start, within 1 s in all: 400
    # datagrams to a server reading one every 4 ms never went through, and every call
    # of the process failed for good (ServerStalled).
    client, peer = stalled_slow_server
    wait_resynced(client)
    expected = registry_view(client)
    assert set(expected) == {(ME, f"s{i}") for i in range(SCOPES)}
    peer.wait_for(lambda m: mine(m) == expected, timeout=CONVERGED_WITHIN)
    client.arm("after", 600)  # back on the hot path
    assert not client._channel.needs_resync


@needs_pidfd
def test_callers_are_held_no_longer_than_their_write_timeout_during_a_retry(
    stalled_slow_server: Tuple[FileTimerClient, SlowPeer], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The retry thread held the channel's lock for its whole delivery (up to 1 s): an
    # arm with write_timeout=0.01 (an expires block, a signal handler) waited for it.
    # Told by what the retry does with the lock held, not by a call's time (a loaded
    # machine makes any call slow): it never waits for room, nor sleeps, then. Meanwhile the caller
    # releases and re-arms scopes the resync is re-arming: the server must end with
    # exactly the registry (no released scope left armed).
    client, peer = stalled_slow_server
    lock = client._channel.lock
    waits: List[Tuple[str, float, bool]] = []  # the retry's: (what, timeout, lock held)
    write, wait_room = _socket.SocketWriter.write, _socket.SocketWriter.wait_room

    def retry(what: str, timeout: float) -> None:
        if threading.current_thread().name == "ftimer-client-resync":
            waits.append((what, timeout, lock._is_owned()))  # type: ignore[attr-defined]

    def writing(self: _socket.SocketWriter, line: bytes, timeout: float) -> None:
        retry("write", timeout)
        write(self, line, timeout)

    def waiting(self: _socket.SocketWriter, timeout: float) -> bool:
        retry("wait_room", timeout)
        return wait_room(self, timeout)

    sleep = time.sleep

    def sleeping(seconds: float) -> None:
        retry("sleep", seconds)
        sleep(seconds)

    monkeypatch.setattr(_socket.SocketWriter, "write", writing)
    monkeypatch.setattr(_socket.SocketWriter, "wait_room", waiting)
    monkeypatch.setattr(time, "sleep", sleeping)
    rng = random.Random(7)
    calls = 0
    end = time.monotonic() + CONVERGED_WITHIN
    while client._channel.needs_resync and time.monotonic() < end:
        scope = f"s{rng.randrange(SCOPES)}"
        with contextlib.suppress(ServerUnavailable):
            if rng.random() < 0.5:
                client.release(scope)
            else:
                client.arm(scope, 600)
        calls += 1
        time.sleep(0.002)  # pacing the caller
    wait_resynced(client)
    assert calls > 0
    assert any(what == "write" for what, _, _ in waits)  # the retry delivered
    held = {(what, timeout) for what, timeout, locked in waits if locked}
    assert held <= {("write", 0.0)}, held  # with the lock held, no wait for room
    expected = registry_view(client)
    peer.wait_for(lambda m: mine(m) == expected, timeout=CONVERGED_WITHIN)


# -- a partly sent resync, stepped by hand against callers' arms and disarms ---------------


def drain(sock: socket.socket, count: int, into: List[Message]) -> int:
    """Read up to ``count`` datagrams queued on the (paused) peer's socket into ``into``
    (fill lines dropped); return how many were read."""
    read = 0
    for _ in range(count):
        try:
            data = sock.recv(PIPE_BUF + 1)
        except BlockingIOError:
            break
        read += 1
        message = decode_value(data)
        assert not isinstance(message, Exception), message
        if not isinstance(message, Sync):
            into.append(message)
    return read


@needs_pidfd
@pytest.mark.parametrize("seed", range(12))
def test_callers_interleaved_with_a_partial_resync_leave_the_server_holding_the_registry(
    socket_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch, seed: int
) -> None:
    # The retry thread's steps (a few lines per hold of the lock) are run here by hand,
    # between callers' arms and releases of the very scopes being resynchronised, and
    # the server's reads: a resync line chosen before a caller's release and sent after
    # it would leave the released scope armed on the server (a healthy worker reaped).
    monkeypatch.setattr(_channel, "RETRY_CHUNK", 3)
    monkeypatch.setattr(_channel.Channel, "_retry_loop", lambda self: None)  # no thread
    rng = random.Random(seed)
    peer = SocketPeer(socket_path)
    try:
        client = FileTimerClient(peer.path, write_timeout=10.0, labels={})  # time to spare
        scopes = [f"k{i}" for i in range(40)]
        for scope in scopes:
            client.arm(scope, 600)
        applied = peer.wait_count(len(scopes))
        client._timeout = 0.05
        peer.pause()
        peer.fill()
        drain(peer.sock, 1000, [])
        peer.fill()
        with pytest.raises(ServerStalled):
            client.arm("stalled", 600)
        channel = client._channel
        steps = 0
        for _ in range(300):
            op = rng.random()
            if op < 0.3:
                drain(peer.sock, rng.randrange(1, 6), applied)
            elif op < 0.6:
                with channel.lock:
                    try:
                        channel._retry_step()
                        steps += 1
                    except ServerUnavailable:
                        pass
            else:
                scope = rng.choice(scopes)
                try:
                    if op < 0.8:
                        client.release(scope)
                    else:
                        client.arm(scope, rng.randrange(100, 10_000))
                except ServerUnavailable:
                    pass
        # The server reads again; the retries go on until it agrees.
        for _ in range(10_000):
            if not channel.needs_resync:
                break
            drain(peer.sock, 1000, applied)
            with channel.lock, contextlib.suppress(ServerUnavailable):
                channel._retry_step()
        assert not channel.needs_resync
        assert steps
        drain(peer.sock, 1000, applied)  # room for the last arm
        client.arm("end", 600)
        expected = registry_view(client)
        while not any(isinstance(m, Arm) and m.scope_id == "end" for m in applied):
            if not drain(peer.sock, 1000, applied):
                time.sleep(0.001)
        assert mine(applied) == expected
        peer.resume()
        client._timeout = 10.0
        client.close()
    finally:
        peer.close()


# -- the same over a FIFO, in both protocols ----------------------------------------------


@pytest.mark.parametrize("protocol", [1, 2])
def test_a_retry_over_a_fifo_keeps_its_progress(fifo_path: pathlib.Path, protocol: int) -> None:
    # About 250 kB of resync: two seconds of this server's reading, which no retry of
    # 1 s in all ever got through.
    peer = FifoPeer(fifo_path)
    try:
        client = FileTimerClient(peer.path, write_timeout=10.0, labels={}, protocol=protocol)
        scopes = [f"f{i}-{'x' * 200}" for i in range(800)]
        for scope in scopes:
            client.arm(scope, 600)
        peer.wait_count(len(scopes), timeout=CONVERGED_WITHIN)
        client._timeout = 0.01  # from the stall on, an expires block's
        peer.read_size, peer.delay = 512, 0.004  # a busy server: 128 kB/s
        peer.pause()
        peer.fill()
        with pytest.raises(ServerStalled):
            client.release(scopes[0])
        peer.resume()
        wait_resynced(client)
        expected = registry_view(client)
        assert len(expected) == len(scopes) - 1
        peer.wait_for(lambda m: mine(m) == expected, timeout=CONVERGED_WITHIN)
        peer.read_size, peer.delay = FifoPeer.read_size, 0.0
        client._timeout = 10.0  # 799 disarms at close, with time to spare (as the arms)
        client.close()
    finally:
        peer.close()


# -- the resync's bookkeeping, every interleaving ----------------------------------------

PID, START = 4242, 99

STEPS = st.lists(
    st.tuples(
        st.sampled_from(["retry", "read", "arm", "disarm", "lose"]),
        st.sampled_from(["a", "b", "c", "d"]),
        st.integers(0, 4),  # room for this many lines at that moment
    ),
    max_size=60,
)


@settings(max_examples=1000, deadline=None)
@given(STEPS, st.booleans())
def test_any_interleaving_of_retry_steps_and_callers_ends_with_the_registry(
    steps: List[Tuple[str, str, int]], version_2: bool
) -> None:
    # A model of the channel's use of Resync: a connection with room for a few lines
    # (what it accepted is applied in order, unless the connection is lost before the
    # server read it), the retry thread sending one owed line at a time, and callers
    # whose delivery sends the backlog then their own line, stopping at the first line
    # without room. Whatever the order, once the retries are done the server holds
    # exactly the registry.
    lines: object = V2Lines(PID, START, 9, None) if version_2 else V1Lines(PID, 9)
    state = Resync(lines)  # type: ignore[arg-type]
    server: List[bytes] = []  # applied
    queue: List[bytes] = []  # accepted, not read yet
    deadline = 0.0

    def arm_line(scope: str) -> bytes:
        nonlocal deadline
        deadline += 1.0
        if version_2:
            return lines.entry(scope)[0] % deadline  # type: ignore[attr-defined,no-any-return]
        return lines.arm(scope, deadline)  # type: ignore[attr-defined,no-any-return]

    def write(items: List[Tuple[object, bytes]], room: int) -> bool:
        """Accept as many as there is room for; whether all went."""
        for scope, line in items:
            if room <= 0:
                state.unsure(scope, refused=True)  # type: ignore[arg-type]
                return False
            room -= 1
            queue.append(line)
            state.accepted(scope, line)  # type: ignore[arg-type]
        return True

    def delivered() -> None:
        # What went before a delivery that went through counts as read (the recent
        # disarms a failure sends again are test_resync.py's): a restart loses only
        # the lines of the resync in progress.
        state.delivered()
        server.extend(queue)
        queue.clear()

    for scope in "ab":
        line = arm_line(scope)
        state.arm(scope, line, owner=1)
        server.append(line)
    state.failed(0.0, stalled=True)
    for op, scope, room in steps:
        if op == "read":
            server.extend(queue)
            queue.clear()
        elif op == "lose":  # a restart: the queue dies; a state file keeps a stale copy
            queue.clear()
            if room % 2:
                server.clear()
            state.forget_progress()  # as the channel's reconnection does
            state.failed(0.0)
        elif op == "retry":  # a retry step: up to ``room`` lines
            for _ in range(room):
                owed = state.next_owed() if state.needs_resync else None
                if owed is None:
                    break
                write([owed], 1)
            if state.needs_resync and state.next_owed() is None:
                delivered()
        elif op == "arm":
            line = arm_line(scope)
            previous = state.arm(scope, line, owner=1)
            if write([*state.backlog((scope, previous)), (scope, line)], room):
                delivered()
            else:  # it raised: it did not happen (as the channel does)
                state.unarm(scope, previous)
                if previous is None:
                    state.lost_disarms([scope])
                state.failed(0.0, stalled=True)
        else:
            state.disarm(scope)
            disarm = lines.disarm(scope)  # type: ignore[attr-defined]
            if write([*state.backlog(), (scope, disarm)], room):
                delivered()
            else:
                state.lost_disarms([scope])
                state.failed(0.0, stalled=True)
    # The server reads again: the retries go on until nothing is owed.
    while state.needs_resync:
        owed = state.next_owed()
        if owed is None:
            delivered()
            break
        write([owed], 1)
    server.extend(queue)
    expected = server_state([decode(line) for line, _ in state.armed.values()])
    assert server_state([decode(line) for line in server]) == expected
