"""A deadline is judged only against everything written before it: real FIFO, real
children, real signals.

The loop is held (a callback blocks on the first arm) while a flood of junk and then the
workers' disarms pile up in the pipe, and the deadline passes. When it resumes, it must
read all of that before it expires anything: the healthy workers live, the hung one is
reaped. The same holds for everything written before ``stop()``.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import threading
import time

import pytest
from tests.conftest import wait_until

from ftimer_protocol import Arm, Disarm, encode
from ftimer_server import (
    Armed,
    Disarmed,
    Event,
    FileTimerServer,
    Lifecycle,
    Reaped,
    WorkerGone,
)
from ftimer_server.server import _loop
from ftimer_server.server._loop import EXIT_HOLD, READ_CHUNK

from .conftest import send, wait_exit

HEALTHY = 12


class Gate:
    """An ``on_event`` that holds the server's loop on the first ``Armed`` until opened."""

    def __init__(self) -> None:
        self.held = threading.Event()
        self.open = threading.Event()
        self.events: list[Event] = []

    def __call__(self, event: Event) -> None:
        self.events.append(event)
        if isinstance(event, Armed) and not self.held.is_set():
            self.held.set()
            assert self.open.wait(30)


def test_disarms_behind_a_flood_save_the_healthy(fifo_path: pathlib.Path, children) -> None:
    gate = Gate()
    healthy = [children() for _ in range(HEALTHY)]
    hung = children()
    with FileTimerServer(fifo_path, on_event=gate) as server:
        deadline = time.monotonic() + 0.5
        send(
            fifo_path,
            *(Arm(pid=c.pid, scope_id="step", deadline=deadline, signal=9) for c in healthy),
            Arm(pid=hung.pid, scope_id="step", deadline=deadline, signal=9),
        )
        assert gate.held.wait(10)  # the loop applied the arms and is held
        fd = os.open(fifo_path, os.O_WRONLY)
        try:
            os.write(fd, b"y\n" * (READ_CHUNK // 2))  # what `yes > FIFO` writes
            for child in healthy:  # each disarm well before the deadline
                os.write(fd, encode(Disarm(pid=child.pid, scope_id="step")))
        finally:
            os.close(fd)
        assert time.monotonic() < deadline
        time.sleep(max(0.0, deadline - time.monotonic()) + 0.1)  # the deadline passes
        gate.open.set()
        code, _ = wait_exit(hung)
        server.sync()
        stats = server.stats()
    assert code == -9
    assert [c.poll() for c in healthy] == [None] * HEALTHY
    assert [e.pid for e in gate.events if isinstance(e, Reaped)] == [hung.pid]
    assert stats.decode_errors == {"MalformedMessage": READ_CHUNK // 2}
    assert stats.requests["disarm"] == {"ok": HEALTHY}


def test_disarms_waiting_for_room_in_a_full_pipe_save_the_healthy(
    fifo_path: pathlib.Path, children
) -> None:
    # The pipe is full when the loop comes back: the healthy workers' disarms, begun
    # before the deadline, wait for room (torch's client blocks in write(); ftimer's
    # polls for up to write_timeout), and go in only once the loop has read.
    gate = Gate()
    healthy = [children() for _ in range(3)]
    hung = children()
    with FileTimerServer(fifo_path, on_event=gate) as server:
        deadline = time.monotonic() + 0.5
        send(
            fifo_path,
            *(Arm(pid=c.pid, scope_id="step", deadline=deadline, signal=9) for c in healthy),
            Arm(pid=hung.pid, scope_id="step", deadline=deadline, signal=9),
        )
        assert gate.held.wait(10)
        fd = os.open(fifo_path, os.O_WRONLY | os.O_NONBLOCK)
        filled = 0
        try:
            for junk in (b"y\n" * 2048, b"y\n"):  # other writers' traffic, to the last byte
                with contextlib.suppress(BlockingIOError):
                    while True:
                        filled += os.write(fd, junk)
        finally:
            os.close(fd)
        began: list[float] = []

        def disarm(pid: int) -> None:
            with open(fifo_path, "wb", buffering=0) as f:  # blocking, as torch's client
                began.append(time.monotonic())
                f.write(encode(Disarm(pid=pid, scope_id="step")))

        writers = [threading.Thread(target=disarm, args=(c.pid,)) for c in healthy]
        for w in writers:
            w.start()
        wait_until(lambda: len(began) == len(healthy))
        assert max(began) < deadline
        time.sleep(max(0.0, deadline - time.monotonic()) + 0.1)  # the deadline passes
        assert all(w.is_alive() for w in writers)  # still waiting for room
        gate.open.set()
        code, _ = wait_exit(hung)
        for w in writers:
            w.join(10)
        server.sync()
        stats = server.stats()
    assert code == -9
    assert [c.poll() for c in healthy] == [None] * len(healthy)
    assert [e.pid for e in gate.events if isinstance(e, Reaped)] == [hung.pid]
    assert stats.requests["disarm"] == {"ok": len(healthy)}
    assert stats.decode_errors == {"MalformedMessage": filled // 2}


def test_stop_applies_everything_written_before_it(fifo_path: pathlib.Path, children) -> None:
    gate = Gate()
    child = children()
    server = FileTimerServer(fifo_path, on_event=gate)
    server.start()
    send(fifo_path, Arm(pid=child.pid, scope_id="held", deadline=1e9, signal=9))
    assert gate.held.wait(10)
    # More than one read's worth of junk, then a disarm and an arm: the disarm's line is
    # cut by the first read, and must still be applied.
    junk = b"x" * 100 + b"\n"
    send(
        fifo_path,
        Arm(pid=child.pid, scope_id="kept", deadline=1e9, signal=9),
        raw=junk * (READ_CHUNK // len(junk) + 7),
    )
    send(fifo_path, Disarm(pid=child.pid, scope_id="held"))
    stopper = threading.Thread(target=server.stop)
    stopper.start()
    wait_until(lambda: server.state is Lifecycle.STOPPING)
    gate.open.set()  # the loop resumes only to stop: what it applies, it applies on stop
    stopper.join(30)
    assert [t.scope_id for t in server.armed()] == ["kept"]
    assert child.poll() is None


def test_a_worker_that_disarms_then_exits_is_seen_to_disarm_first(
    fifo_path: pathlib.Path, children
) -> None:
    gate = Gate()
    # Ended here, not by a timer of its own: one that ran out before the server (started
    # slowly on a loaded machine) applied the arm made the arm a dead process's.
    child = children("sleep", "60")
    with FileTimerServer(fifo_path, on_event=gate) as server:
        send(fifo_path, Arm(pid=child.pid, scope_id="step", deadline=1e9, signal=9))
        assert gate.held.wait(10)  # held: the disarm and the exit arrive together
        send(fifo_path, Disarm(pid=child.pid, scope_id="step"))
        child.kill()
        wait_exit(child)
        gate.open.set()
        wait_until(lambda: any(isinstance(e, WorkerGone) for e in gate.events))
        server.sync()
    [gone] = [e for e in gate.events if isinstance(e, WorkerGone)]
    assert gone.timers == ()  # exited with nothing armed: not "1 timer(s) dropped"
    assert [type(e) for e in gate.events] == [Armed, Disarmed, WorkerGone]


def test_a_wrappers_disarm_after_the_exit_is_applied_first(
    fifo_path: pathlib.Path, children, monkeypatch: pytest.MonkeyPatch
) -> None:
    # `ftimer exec` disarms once its command has exited: just after the pidfd fired. The
    # hold is made long, so that this test's own lateness (a loaded machine) is never
    # what it measures.
    monkeypatch.setattr(_loop, "EXIT_HOLD", 1.0)
    events: list[Event] = []
    child = children("sleep", "60")  # ended here (see the test above)
    with FileTimerServer(fifo_path, on_event=events.append) as server:
        send(fifo_path, Arm(pid=child.pid, scope_id="exec", deadline=1e9, signal=9))
        server.sync()
        child.kill()
        wait_exit(child)
        time.sleep(EXIT_HOLD / 10)  # the wrapper's own wake-up: not instant
        send(fifo_path, Disarm(pid=child.pid, scope_id="exec"))
        wait_until(lambda: any(isinstance(e, WorkerGone) for e in events))
    [gone] = [e for e in events if isinstance(e, WorkerGone)]
    assert gone.timers == ()
    assert [type(e) for e in events] == [Armed, Disarmed, WorkerGone]
