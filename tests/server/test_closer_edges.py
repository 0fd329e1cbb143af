"""Edges of the closer of the descriptors senders pass over the datagram socket: how many
threads it starts and wakes, what a failing close costs, when the sockets it watches
refuse descriptors and what is logged about it, and what clearing a socket's linger
leaves behind.

Each test has a ``Closer`` of its own (never the process-wide one) whose close is a stub
that blocks on chosen descriptors until released (released on the way out, pass or fail),
so no test waits on a real blocking close; the descriptors a test makes are its own.
"""

from __future__ import annotations

import errno
import logging
import os
import pathlib
import socket
import struct
import subprocess
import sys
import threading
from typing import Dict, Iterator, List, Optional, Tuple

import pytest
from tests.conftest import wait_until

from ftimer_server.server import _closer as closer_module

from .conftest import is_open, on_thread_start


class Gate:
    """A close for ``Closer`` that blocks on each descriptor in ``stuck`` until it is
    released, fails with EBADF on those in ``failing``, and records what it closed."""

    def __init__(self, stuck: Tuple[int, ...] = (), failing: Tuple[int, ...] = ()) -> None:
        self.stuck: Dict[int, threading.Event] = {fd: threading.Event() for fd in stuck}
        self.failing = set(failing)
        self.closed: List[int] = []

    def __call__(self, fd: int) -> None:
        if fd in self.stuck:
            self.stuck[fd].wait(30)
        if fd in self.failing:
            raise OSError(errno.EBADF, os.strerror(errno.EBADF))
        self.closed.append(fd)

    def release(self, *fds: int) -> None:
        for fd in fds or tuple(self.stuck):
            self.stuck[fd].set()


class WaitCountingCondition(threading.Condition):
    """A ``Condition`` that counts the threads waiting on it: for a test to know a closer
    thread went idle (blocked in ``wait()``), not merely that it finished a close."""

    def __init__(self) -> None:
        super().__init__()
        self.waiting = 0

    def wait(self, timeout: Optional[float] = None) -> bool:
        self.waiting += 1  # with the lock held, as wait() requires
        try:
            return super().wait(timeout)
        finally:
            self.waiting -= 1


@pytest.fixture
def gate() -> Iterator[Gate]:
    made = Gate()
    yield made
    made.release()  # no closer thread left blocked, whatever the test's outcome


def closer_with(gate: Gate, *stuck: int, failing: Tuple[int, ...] = ()) -> closer_module.Closer:
    """A closer of the test's own, closing through ``gate`` (``stuck`` blocking), whose
    idle threads are counted."""
    for fd in stuck:
        gate.stuck[fd] = threading.Event()
    gate.failing.update(failing)
    closer = closer_module.Closer(gate)
    closer._cond = WaitCountingCondition()  # before any thread: each takes it at start
    return closer


def idle(closer: closer_module.Closer, count: int) -> None:
    """Wait until ``count`` of ``closer``'s threads wait for work."""
    cond = closer._cond
    assert isinstance(cond, WaitCountingCondition)
    wait_until(lambda: cond.waiting == count, timeout=10, what=f"{count} threads idle")


def _refuses_rights(path: str) -> bool:
    """Whether the socket at ``path`` refuses a descriptor (EPERM)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sender:
        sender.connect(path)
        try:
            socket.send_fds(sender, [b"carrying\n"], [0])
        except PermissionError:
            return True
        return False


def _refusal_supported() -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as probe:
        try:
            probe.setsockopt(socket.SOL_SOCKET, closer_module._SO_PASSRIGHTS, 1)
        except OSError:
            return False
    return True


needs_passrights = pytest.mark.skipif(
    not _refusal_supported(), reason="SO_PASSRIGHTS needs Linux 6.16"
)


def test_every_idle_thread_is_woken_for_a_hand_off(gate: Gate) -> None:
    """A hand-off of several descriptors wakes as many idle threads: woken one at a time,
    the rest waited behind the first one's close, which may block as long as its sender
    arranged, while threads sat idle."""
    closer = closer_with(gate, 100, 101, 102)
    closer.close([100, 101])  # two threads, both held
    wait_until(lambda: len(closer._closing) == 2, timeout=10, what="both held")
    gate.release(100, 101)
    idle(closer, 2)
    closer.close([102, 3])  # 102 holds whichever thread takes it
    wait_until(lambda: 3 in gate.closed, timeout=10, what="3 closed beside the held 102")


def test_a_thread_for_each_descriptor_held_up_to_eight(
    gate: Gate, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each descriptor of a hand-off whose close blocks gets a thread of its own, none
    waits behind another while a thread can be had; and no more than the 8 threads the
    documentation promises are started, however many wait (they wait for one)."""
    started: List[threading.Thread] = []
    on_thread_start(monkeypatch, closer_module, started.append)
    stuck = range(100, 109)
    closer = closer_with(gate, *stuck)
    closer.close([100, 101, 102])
    assert len(started) == 3  # started in close() itself, one for each
    wait_until(lambda: len(closer._closing) == 3, timeout=10, what="three held")
    closer.close(stuck[3:])
    assert len(started) == 8
    wait_until(lambda: len(closer._closing) == 8, timeout=10, what="eight held")
    assert list(closer._pending) == [108]
    gate.release()
    wait_until(lambda: sorted(gate.closed) == list(stuck), timeout=10, what="all closed")
    assert len(started) == 8


def test_a_close_that_fails_does_not_cost_its_thread(gate: Gate) -> None:
    """A close that fails (EBADF, or EIO from a file system) is the sender's problem:
    the thread goes on to the next descriptor. Ended by it, the thread was still counted,
    busy for ever, and what waited for it was never closed."""
    closer = closer_with(gate, failing=(1,))
    closer.MAX_THREADS = 1  # type: ignore[misc]
    closer.close([1, 2])
    wait_until(lambda: 2 in gate.closed, timeout=10, what="2 closed after 1 failed")
    idle(closer, 1)
    closer.close([3])
    wait_until(lambda: 3 in gate.closed, timeout=10, what="3 closed by the same thread")


@needs_passrights
def test_a_socket_watched_while_refusing_refuses_until_the_backlog_clears(
    gate: Gate, tmp_path: pathlib.Path
) -> None:
    """A socket opened while descriptors pile up (a server restarted in the process)
    refuses them as the others do, and accepts them again once the backlog clears: left
    accepting, it let a sender go on piling descriptors up."""
    closer = closer_with(gate, 100)
    closer.MAX_THREADS = 1  # type: ignore[misc]
    closer.BACKLOG = 1  # type: ignore[misc]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(tmp_path / "s.socket"))
        sock.setblocking(False)
        closer.close([100])
        wait_until(lambda: closer._closing, timeout=10, what="100 held")
        closer.close([1, 2])  # two wait: over the backlog
        assert closer.refusing
        closer.watch(sock)
        try:
            assert _refuses_rights(sock.getsockname())
            gate.release()
            wait_until(lambda: not closer.refusing, timeout=10, what="the backlog closed")
            assert not _refuses_rights(sock.getsockname())
        finally:
            closer.unwatch(sock)
        while True:  # what the probes sent, and the descriptor one carried
            try:
                _, fds, _, _ = socket.recv_fds(sock, 64, 4)
            except BlockingIOError:
                break
            for fd in fds:
                os.close(fd)


def test_refusal_begins_past_1024_waiting_descriptors(gate: Gate) -> None:
    """As the changelog tells users: the sockets refuse descriptors while more than 1,024
    wait for a thread, not sooner (a burst of closes is no reason to fail every arm over
    the socket), nor never (what senders pass would pile up until the server ran out)."""
    closer = closer_with(gate, 100)
    closer.MAX_THREADS = 1  # type: ignore[misc]
    closer.close([100])
    wait_until(lambda: closer._closing, timeout=10, what="100 held")
    closer.close(range(1000, 2024))
    assert len(closer._pending) == 1024
    assert not closer.refusing
    closer.close([2024])
    assert closer.refusing
    gate.release()
    wait_until(lambda: not closer.refusing, timeout=10, what="the backlog closed")
    assert len(gate.closed) == 1026


def test_refusing_is_said_once_and_accepting_only_after_refusing(
    gate: Gate, caplog: pytest.LogCaptureFixture
) -> None:
    """One error when the sockets begin to refuse, not one for each hand-off while they
    do (a flood of datagrams makes one each); one warning when they accept again, and
    none each time a thread goes idle without any refusal."""
    closer = closer_with(gate, 100)
    closer.MAX_THREADS = 1  # type: ignore[misc]
    closer.BACKLOG = 1  # type: ignore[misc]
    with caplog.at_level(logging.WARNING, logger="ftimer_server"):
        closer.close([1])
        idle(closer, 1)  # went idle once with nothing refused
        assert "accepts descriptors again" not in caplog.text
        closer.close([100])
        wait_until(lambda: closer._closing, timeout=10, what="100 held")
        closer.close([2, 3])
        closer.close([4])
        closer.close([5])
        gate.release()
        wait_until(lambda: not closer.refusing, timeout=10, what="the backlog closed")
        idle(closer, 1)
    refused = [r for r in caplog.records if "refuses descriptors until" in r.getMessage()]
    accepted = [r for r in caplog.records if "accepts descriptors again" in r.getMessage()]
    assert [r.levelno for r in refused] == [logging.ERROR]
    assert [r.levelno for r in accepted] == [logging.WARNING]
    assert sorted(gate.closed) == [1, 2, 3, 4, 5, 100]


def test_clearing_a_socket_s_linger_leaves_it_open_and_resetting() -> None:
    """The closing threads clear a socket's linger before they close it (so its close
    resets the connection rather than wait for unsent data): that leaves the descriptor
    open, for the close that follows, and the linger on with a zero timeout."""
    ours, theirs = socket.socketpair()
    with ours, theirs:
        ours.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 60))
        closer_module._no_linger(ours.fileno())
        assert is_open(ours.fileno())
        linger = ours.getsockopt(socket.SOL_SOCKET, socket.SO_LINGER, 8)
        assert struct.unpack("ii", linger) == (1, 0)


def test_clearing_linger_leaves_other_descriptors_alone_and_never_raises() -> None:
    """A pipe is left open and as it was; a descriptor already gone is no error: the
    closing thread calls it for whatever a sender passed, and an error there ended it."""
    read_end, write_end = os.pipe()
    try:
        closer_module._no_linger(read_end)
        assert is_open(read_end)
    finally:
        os.close(read_end)
        os.close(write_end)
    closer_module._no_linger(write_end)  # closed above: no error


# A closer whose one close never returns, in a process that then exits.
HELD_AT_EXIT = """
import os, threading
from ftimer_server.server._closer import Closer
read_end, _ = os.pipe()
Closer(lambda fd: threading.Event().wait()).close([read_end])
print("handed", flush=True)
"""


def test_a_close_that_never_returns_does_not_hold_up_the_process_s_exit() -> None:
    """The closing threads are daemons: a sender's descriptor whose close never returns
    (a file of a FUSE mount that never answers) cannot keep the server from exiting."""
    done = subprocess.run(
        [sys.executable, "-c", HELD_AT_EXIT],
        check=False,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert (done.returncode, done.stdout) == (0, "handed\n"), done.stderr
