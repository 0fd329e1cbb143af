"""A healthy worker is never reaped because of the client: disarms owed at close(), a
signal handler's call in the middle of a delivery, an interrupted arm, two paths to one
server, a slow server, misuse the client can refuse."""

from __future__ import annotations

import contextlib
import gc
import os
import pathlib
import signal
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from typing import Any, Callable

import pytest
from tests.conftest import wait_until

from ftimer_client import (
    FileTimerClient,
    ServerStalled,
    ServerUnavailableWarning,
    _shared,
    expires,
)
from ftimer_client._resync import Resync
from ftimer_protocol import Arm

from .conftest import FifoPeer, Peer, SocketPeer, restart, server_state
from .test_client_fifo import fifo_descriptors

ME = os.getpid()


def scopes(messages: list) -> set:
    return {scope for pid, scope in server_state(messages) if pid == ME}


def blocked_in_the_kernel(tid: int) -> bool:
    """Whether thread ``tid`` of this process sleeps in a system call other than a futex
    (a wait for room in a pipe or a socket's queue, not for the GIL or a lock)."""
    with open(f"/proc/self/task/{tid}/wchan") as f:
        wchan = f.read()
    return wchan not in ("", "0") and "futex" not in wchan


@pytest.fixture
def on_sigusr1() -> Iterator[Callable[[Callable[[], None]], None]]:
    """Install a SIGUSR1 handler running the given function; restored afterwards."""
    old = signal.getsignal(signal.SIGUSR1)

    def install(body: Callable[[], None]) -> None:
        signal.signal(signal.SIGUSR1, lambda *_: body())

    yield install
    signal.signal(signal.SIGUSR1, old)


def interrupt_main_when_blocked(then: Callable[[], None]) -> threading.Thread:
    """Start a thread that sends SIGUSR1 to this process's main thread (this test's
    own) once the main thread waits in the kernel for room, then runs ``then``.

    The handler runs in the middle of the wait (FIFO: poll() is interrupted) or as soon
    as the send returns (the socket's writer blocks signals while it waits).
    """
    main, tid = threading.main_thread().ident, threading.get_native_id()
    assert main == threading.get_ident()

    def run() -> None:
        wait_until(lambda: blocked_in_the_kernel(tid), what="the client waiting for room")
        assert main is not None
        signal.pthread_kill(main, signal.SIGUSR1)
        then()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


# -- close() --------------------------------------------------------------------------


@pytest.mark.parametrize("policy", ["raise", "ignore"])
def test_a_disarm_owed_at_close_is_still_delivered(server: Peer, policy: str) -> None:
    client = FileTimerClient(server.path, on_unavailable=policy, labels={})
    client.arm("step", 60)
    server.wait_count(1)
    server.close()
    server.path.unlink()
    try:
        client.close()  # the disarm is lost: no server
    except BrokenPipeError:
        assert policy == "raise"
    # A server that restored "step" from its state file must not reap this healthy
    # process: the closed client still tells it, once it is back.
    new = type(server)(server.path)
    try:
        new.wait_for(lambda m: scopes([Arm(ME, "step", 1.0, 9), *m]) == set())
        channel = client._channel
        wait_until(lambda: channel._retry is None and channel.transport is None)
    finally:
        new.close()


def test_a_closed_client_refuses_to_be_used(peer: FifoPeer) -> None:
    client = FileTimerClient(peer.path, labels={})
    client.close()
    for call in (
        lambda: client.arm("s", 60),
        lambda: client.acquire("s", time.time() + 60),
        lambda: client.release("s"),
        lambda: client.heartbeat("s", 60),
        lambda: client.expire("s"),
        client.release_all,
    ):
        with pytest.raises(RuntimeError, match="closed"):
            call()
    client.close()  # still idempotent
    assert peer.messages == []  # nothing reconnected


def test_an_arm_racing_close_is_not_left_armed(peer: FifoPeer) -> None:
    client = FileTimerClient(peer.path, labels={})

    class Closing(float):
        """A duration whose use closes the client: as another thread's close() would,
        between the arm's check that the client is open and its delivery (the arm makes
        it a plain float first)."""

        def __float__(self) -> float:
            client.close()
            return float.__float__(self)

    # Left armed, release() would refuse the closed client and the timer would reap
    # this healthy process.
    with pytest.raises(RuntimeError, match="closed"):
        client.arm("step", Closing(60))
    assert scopes(peer.wait_for(lambda m: scopes(m) == set() and len(m) >= 2)) == set()
    assert client.armed == frozenset()
    assert fifo_descriptors(peer.path) == 2  # the peer's two: the client let go


def test_a_release_racing_close_lets_go_of_the_fifo(peer: FifoPeer) -> None:
    client = FileTimerClient(peer.path, labels={})
    client.arm("step", 60)

    class Closing(str):
        """A scope whose use closes the client, as another thread's close() would."""

        __slots__ = ()

        def __hash__(self) -> int:
            client.close()
            return str.__hash__(self)

    client.release(Closing("step"))
    peer.wait_count(3)  # arm, close()'s disarm, the release's
    assert fifo_descriptors(peer.path) == 2  # not the connection the release opened


# -- a signal handler's call during a delivery --------------------------------------------


def test_a_handlers_disarm_during_a_resync_is_not_undone(
    server: Peer, on_sigusr1: Callable[[Callable[[], None]], None]
) -> None:
    client = FileTimerClient(server.path, write_timeout=10.0, labels={})
    client.arm("released-by-handler", 60)
    client.arm("kept", 60)
    server.wait_count(2)
    new = restart(server)
    try:
        new.pause()
        new.fill()  # the resync's first line waits for room
        in_handler = threading.Event()

        def handler() -> None:
            in_handler.set()
            client.release("released-by-handler")

        on_sigusr1(handler)
        helper = interrupt_main_when_blocked(new.resume)
        client.arm("step", 60)  # reconnects and resyncs; the handler runs meanwhile
        helper.join(10)
        assert in_handler.is_set()
        client.arm("sync", 60)
        messages = new.wait_for(lambda m: (ME, "sync") in server_state(m))
        assert scopes(messages) == {"kept", "step", "sync"} == client.armed
    finally:
        new.close()


def test_a_handlers_call_just_after_the_resync_is_read_is_not_undone(
    server: Peer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The window before the first write: a handler that runs just after the delivery has
    # read its resync (simulated by running its body from there) is deferred behind it,
    # not sent first and then undone by the resync's stale re-arm.
    client = FileTimerClient(server.path, write_timeout=10.0, labels={}, on_unavailable="ignore")
    client.arm("released-by-handler", 60)
    client.arm("kept", 60)
    server.wait_count(2)
    channel = client._channel
    read = Resync.backlog
    handled = []

    def read_then_handler(state: Resync, *args: Any) -> list:
        lines = read(state, *args)
        if state is channel.state and not handled:
            handled.append(1)
            client.release("released-by-handler")
        return lines

    with channel.lock:  # no retry meanwhile: the next call's delivery carries the resync
        server.close()
        client.arm("lost", 60)  # not delivered: a resync is needed
        new = restart(server)
        monkeypatch.setattr(Resync, "backlog", read_then_handler)
        client.arm("step", 60)
    try:
        assert handled
        client.arm("sync", 60)
        messages = new.wait_for(lambda m: (ME, "sync") in server_state(m))
        assert scopes(messages) == {"kept", "lost", "step", "sync"} == client.armed
    finally:
        new.close()


def test_a_retry_whose_start_was_interrupted_is_started_again(
    server: Peer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A handler's exception can interrupt Thread.start() before the thread runs: that
    # retry never runs, and must not stand in the way of the next one.
    client = FileTimerClient(server.path, labels={}, on_unavailable="ignore")
    client.arm("a", 60)
    server.wait_count(1)
    start = threading.Thread.start

    def interrupted(thread: threading.Thread) -> None:
        monkeypatch.setattr(threading.Thread, "start", start)  # once
        raise KeyboardInterrupt

    server.close()
    monkeypatch.setattr(threading.Thread, "start", interrupted)
    with pytest.raises(KeyboardInterrupt):
        client.release("a")  # not delivered; its retry's start interrupted
    client.arm("b", 60)  # not delivered either: a retry must run now
    new = restart(server)
    try:
        # The lost disarm is made good with no further call from the worker.
        messages = new.wait_for(lambda m: (ME, "b") in server_state(m))
        assert scopes(messages) == {"b"}
    finally:
        new.close()


def test_a_client_made_while_its_thread_is_in_channel_for_does_not_deadlock(
    server: Peer,
) -> None:
    # As a signal handler that makes a client, run while its thread makes another.
    made = threading.Event()

    def handler_in_channel_for() -> None:
        with _shared._shared_lock:
            FileTimerClient(server.path, labels={})
        made.set()

    threading.Thread(target=handler_in_channel_for, daemon=True).start()
    assert made.wait(10)


def test_an_exception_out_of_an_arm_leaves_nothing_armed(
    server: Peer, on_sigusr1: Callable[[Callable[[], None]], None]
) -> None:
    class Timeout(Exception):
        pass

    def handler() -> None:
        raise Timeout  # the signal.alarm() timeout idiom

    client = FileTimerClient(server.path, write_timeout=10.0, labels={})
    client.arm("warm", 60)
    client.release("warm")
    server.wait_count(2)
    server.pause()
    server.fill()
    on_sigusr1(handler)
    # A handler's exception raised while the collector runs a finalizer (a writer of an
    # earlier test) is lost, Python's way: none runs meanwhile.
    gc.collect()
    gc.disable()
    try:
        helper = interrupt_main_when_blocked(server.resume)
        ran = []
        with pytest.raises(Timeout), expires(after=60, scope="step", client=client):
            ran.append(1)
    finally:
        gc.enable()
    helper.join(10)
    assert ran == []
    assert client.armed == frozenset()  # the arm raised: it did not happen
    # Whether or not the line got out, the server comes to agree, unprompted.
    server.wait_for(lambda m: scopes([Arm(ME, "step", 1.0, 9), *m]) == set())
    client.arm("other", 60)
    messages = server.wait_for(lambda m: (ME, "other") in server_state(m))
    assert scopes([Arm(ME, "step", 1.0, 9), *messages]) == {"other"}


# -- one server, two paths ----------------------------------------------------------------


def test_clients_reaching_one_fifo_through_a_symlink_share_its_state(peer: FifoPeer) -> None:
    link = peer.path.with_name("link.fifo")
    link.symlink_to(peer.path)
    through_link = FileTimerClient(link, labels={})
    direct = FileTimerClient(peer.path, labels={})
    assert through_link._channel is direct._channel
    direct.arm("direct", 60)
    through_link.arm("linked", 60)
    peer.wait_count(2)
    new = restart(peer)
    try:
        through_link.arm("step", 60)  # resyncs: every scope armed
        messages = new.wait_for(lambda m: (ME, "step") in server_state(m))
        assert scopes(messages) == {"direct", "linked", "step"}
    finally:
        new.close()


@pytest.mark.parametrize("default_first", [True, False])
def test_a_client_given_no_path_shares_with_one_given_the_fifo(
    fifo_path: pathlib.Path,
    socket_path: pathlib.Path,
    monkeypatch: pytest.MonkeyPatch,
    default_first: bool,
) -> None:
    # torch code passes $TORCHELASTIC_TIMER_FILE; ftimer code gives no path and prefers
    # the socket beside that FIFO: one server, so one channel, over the socket.
    for name in ("FTIMER_SOCKET", "FTIMER_FIFO"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("TORCHELASTIC_TIMER_FILE", str(fifo_path))
    fifo, sock = FifoPeer(fifo_path), SocketPeer(socket_path)
    try:
        if default_first:
            default, torch_style = FileTimerClient(labels={}), FileTimerClient(fifo_path, labels={})
        else:
            torch_style, default = FileTimerClient(fifo_path, labels={}), FileTimerClient(labels={})
        assert default._channel is torch_style._channel
        torch_style.arm("torch", 60)
        default.arm("ftimer", 60)
        assert scopes(sock.wait_count(2)) == {"torch", "ftimer"}
        assert fifo.messages == []
        new = restart(sock)
        try:
            torch_style.arm("step", 60)
            messages = new.wait_for(lambda m: (ME, "step") in server_state(m))
            assert scopes(messages) == {"torch", "ftimer", "step"}
        finally:
            new.close()
    finally:
        fifo.close()
        sock.close()


# -- a slow server ------------------------------------------------------------------------


def test_write_timeout_bounds_a_whole_resync(speer: SocketPeer) -> None:
    client = FileTimerClient(speer.path, write_timeout=0.5, labels={})
    for i in range(20):
        client.arm(f"s{i}", 60)
    speer.wait_count(20)
    new = restart(speer)
    stop = threading.Event()

    def drip() -> None:
        # A server that reads one datagram every 0.15 s: each line waits less than
        # write_timeout, the 22 lines of the call more than twice as long.
        while not stop.wait(0.15):
            with contextlib.suppress(BlockingIOError):
                new.sock.recv(65536)

    try:
        new.pause()
        new.fill()
        dripping = threading.Thread(target=drip, daemon=True)
        dripping.start()
        start = time.monotonic()
        with pytest.raises(ServerStalled, match="within the write timeout"):
            client.arm("step", 60)
        # A write timeout per line instead: 22 lines, one read each 0.15 s, over 3 s.
        assert time.monotonic() - start < 0.5 + 1.5
    finally:
        stop.set()
        new.close()


# -- refused misuse -----------------------------------------------------------------------


def test_a_bool_is_not_a_time(peer: FifoPeer) -> None:
    client = FileTimerClient(peer.path, labels={})
    with pytest.raises(TypeError, match="bool"):
        client.acquire("s", True)  # would arm until 1970-01-01 00:00:01: reaped at once
    with pytest.raises(TypeError, match="bool"):
        client.arm("s", True)
    with pytest.raises(TypeError, match="bool"), expires(after=True, client=client):  # type: ignore[arg-type]
        pass
    assert client.armed == frozenset()
    assert peer.messages == []


def test_the_warning_names_the_callers_line(fifo_path: pathlib.Path) -> None:
    def warned_at(call: Callable[[FileTimerClient], None]) -> int:
        client = FileTimerClient(fifo_path, on_unavailable="warn", labels={})
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            call(client)
        (warning,) = caught
        assert warning.category is ServerUnavailableWarning
        assert warning.filename == __file__
        return warning.lineno

    here = sys._getframe().f_lineno
    assert warned_at(lambda c: c.arm("s", 60)) == here + 1
    assert warned_at(lambda c: c.release("s")) == here + 2
    assert warned_at(lambda c: c.acquire("s", 1e10)) == here + 3

    def block(c: FileTimerClient) -> None:
        with expires(after=60, client=c):
            pass

    assert warned_at(block) == block.__code__.co_firstlineno + 1
