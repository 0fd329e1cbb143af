"""Behaviour of server/_loop.py (the server's event loop) that no test pinned, found by
mutation testing (each test fails with the mutant that found it).

Some drive a ``Loop`` directly, on a real FIFO (and socket) with a fake host and a
recording signaller: one iteration at a time, no thread, nothing signalled for real, and
the loop's clock (``Clock``) moved by the test where its timing is asked."""

from __future__ import annotations

import contextlib
import logging
import os
import pathlib
import selectors
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from typing import Callable, List, Optional, Tuple

import pytest
from tests.conftest import not_pid_1, wait_until

from ftimer_protocol import Arm, Disarm, Sync, encode
from ftimer_server import (
    Armed,
    Disarmed,
    Event,
    Expired,
    FileTimerServer,
    RecordingSignaller,
    Worker,
    WorkerGone,
)
from ftimer_server.core import _horizon
from ftimer_server.core._reader import LineReader
from ftimer_server.core._watchdog import Watchdog
from ftimer_server.server import _loop
from ftimer_server.server._edge import SystemHost
from ftimer_server.server._fifo import open_fifo
from ftimer_server.server._journal import Journal
from ftimer_server.server._loop import Loop
from ftimer_server.server._socket import DatagramSocket, open_socket

from .conftest import FAKE_PID, FakeInspector, Recorder, proc_start_time, send

SERVER = 500  # the pretend server's pid (the fake host's)


class Clock:
    """The loop's clock (``_loop.time``), moved by the test: monotonic time stands still
    until told, so what a test asks of the loop's timing holds on any host's load."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now

    def time(self) -> float:
        return time.time()

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


@contextlib.contextmanager
def bare_loop(
    fifo_path: pathlib.Path,
    *,
    after: Callable[[List[str]], None] = lambda tokens: None,
    emit: Optional[Callable[[Event], None]] = None,
    with_socket: bool = False,
    escalate_after: Optional[float] = None,
    capture_budget: Optional[float] = None,
    journal: Optional[Journal] = None,
) -> Iterator[tuple[Loop, Watchdog, RecordingSignaller, Optional[DatagramSocket]]]:
    """A Loop on a real FIFO (and socket), its watchdog on a fake host of pretend pids
    FAKE_PID... with a recording signaller; ``after`` gets each iteration's tokens,
    ``emit`` its events (a fresh ``Recorder`` if not given)."""
    host = FakeInspector(auto=range(FAKE_PID, FAKE_PID + 10))
    host.spawn(SERVER, start_time=5)
    host.spawn(os.getpid(), start_time=proc_start_time(os.getpid()), parent=os.getppid())
    signaller = RecordingSignaller()
    watchdog = Watchdog(
        host=SystemHost(host, signaller, capture=lambda request: "incident-1"),
        server_pid=SERVER,
        emit=Recorder() if emit is None else emit,
        escalate_after=escalate_after,
        capture_budget=capture_budget,
    )
    fifo = open_fifo(str(fifo_path))
    sock = open_socket(str(fifo_path.with_suffix(".socket"))) if with_socket else None
    loop = Loop(fifo, watchdog, threading.RLock(), after, socket=sock, journal=journal)
    try:
        yield loop, watchdog, signaller, sock
    finally:
        loop.close()
        if sock is not None:
            sock.close()
        fifo.close(remove=True)


def test_a_keep_alive_tick_does_not_delay_a_nearer_deadline(fifo_path: pathlib.Path) -> None:
    # With tick_interval set, the wait lasts until the nearer of the next tick and the
    # next deadline: a timer due in 0.1 s is enforced then, not at the tick an hour
    # away (a systemd keep-alive must never postpone a reap).
    host = FakeInspector(auto=range(FAKE_PID, FAKE_PID + 1))
    signaller, events = RecordingSignaller(), Recorder()
    with FileTimerServer(
        fifo_path,
        inspector=host,
        signaller=signaller,
        on_event=events,
        tick_interval=3600.0,
        on_tick=lambda: None,
    ) as server:
        server.sync()  # the loop waits now, its wake-up set by the tick alone
        send(fifo_path, Arm(pid=FAKE_PID, scope_id="s", deadline=time.monotonic() + 0.1, signal=9))
        wait_until(lambda: events.of(Expired), timeout=5, what="the timer to expire")
    assert signaller.sent == [(FAKE_PID, 9)]


def test_an_interrupted_loop_still_applies_what_was_written_and_finishes_its_reaps(
    fifo_path: pathlib.Path,
) -> None:
    # Ctrl-C (KeyboardInterrupt, no Exception) ends run(): before it is raised again,
    # the FIFO is read one last time (an arm written before it is applied), a reap in
    # its grace period is finished now (SIGKILL: nothing would signal it once the loop
    # is gone) and the façade gets its last results.
    calls: List[List[str]] = []

    def after(tokens: List[str]) -> None:
        calls.append(tokens)
        if len(calls) == 1:  # the first iteration: the reap began, its grace is an hour
            send(fifo_path, Arm(pid=FAKE_PID + 1, scope_id="late", deadline=1e9, signal=9))
            raise KeyboardInterrupt

    with bare_loop(fifo_path, after=after, escalate_after=3600.0) as (loop, wd, sig, _):
        send(fifo_path, Arm(pid=FAKE_PID, scope_id="s", deadline=time.monotonic(), signal=15))
        with pytest.raises(KeyboardInterrupt):
            loop.run()
        assert [(t.pid, t.scope_id) for t in wd.armed()] == [(FAKE_PID + 1, "late")]
    assert sig.sent == [(FAKE_PID, 15), (FAKE_PID, 9)]
    assert len(calls) == 2


def test_a_datagram_the_selector_did_not_report_is_read_in_the_same_iteration(
    fifo_path: pathlib.Path,
) -> None:
    # The selector woke for something else (here: nothing at all) and a datagram
    # arrived since: it was sent before the iteration noted its horizon, so it must be
    # read and applied before any deadline is judged against that horizon (a disarm
    # left in the queue would let its timer expire).
    with bare_loop(fifo_path, with_socket=True) as (loop, wd, _, sock):
        assert sock is not None
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sender:
            sender.sendto(encode(Sync("probe")), sock.path)
        loop._iterate([])  # the selector reported nothing
        assert wd.counters.received["socket"] == 1
        assert not sock.queued()


def test_a_deadline_is_judged_against_the_moment_before_the_read_not_after_it(
    fifo_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The iteration notes the time, then reads: a deadline that passed while it was
    # reading (and applying) is not judged in that iteration, since a disarm for it
    # may have been written after the read began; it is judged in the next one.
    clock = Clock()
    monkeypatch.setattr(_loop, "time", clock)
    deadline = clock.now + 0.2

    def emit(event: Event) -> None:
        events.append(event)
        if isinstance(event, Armed):  # applying takes until past the deadline
            clock.now = deadline + 0.05

    events: List[Event] = []
    with bare_loop(fifo_path, emit=emit) as (loop, _wd, sig, _):
        send(fifo_path, Arm(pid=FAKE_PID, scope_id="s", deadline=deadline, signal=9))
        loop._iterate([])
        assert [e for e in events if isinstance(e, Expired)] == []
        assert sig.sent == []
        loop._iterate([])  # judged now, against a moment after its deadline
        assert [e.timer.pid for e in events if isinstance(e, Expired)] == [FAKE_PID]
    assert sig.sent == [(FAKE_PID, 9)]


def exited(worker: Worker) -> list:
    """What the selector gives for ``worker``'s pidfd turning readable."""
    key = selectors.SelectorKey(fileobj=0, fd=0, events=selectors.EVENT_READ, data=worker)
    return [(key, selectors.EVENT_READ)]


def test_each_exit_waits_its_own_hold_for_its_last_words(
    fifo_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Two workers exit one after the other. When the first one's hold is over, only the
    # first one's exit is applied: the second one's wrapper may still disarm it (its
    # last words, written after the exit), and that disarm must find its timer, not a
    # worker already dropped with its timers.
    clock = Clock()
    monkeypatch.setattr(_loop, "time", clock)
    events = Recorder()
    with bare_loop(fifo_path, emit=events) as (loop, wd, sig, _):
        first, second = FAKE_PID, FAKE_PID + 1
        for pid in (first, second):
            send(fifo_path, Arm(pid=pid, scope_id="s", deadline=1e9, signal=9))
        loop._iterate([])
        workers = {w.pid: w for w in wd.workers()}
        loop._iterate(exited(workers[first]))
        clock.now += _loop.EXIT_HOLD / 2
        loop._iterate(exited(workers[second]))  # the second exit, half a hold later
        clock.now += _loop.EXIT_HOLD / 2
        loop._iterate([])  # the first hold over, not the second
        assert [e.pid for e in events.of(WorkerGone)] == [first]
        send(fifo_path, Disarm(pid=second, scope_id="s"))  # the second one's last words
        loop._iterate([])
        assert [e.timer.pid for e in events.of(Disarmed)] == [second]
    assert sig.sent == []


def test_a_worker_that_exits_during_its_capture_is_not_signalled_when_the_capture_ends(
    fifo_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A hung worker is captured before its signal; it exits meanwhile, and its capture
    # ends while its exit is held (for its last words). The exit, once applied, ends the
    # reap: the end of the capture must not signal a process already gone (its pid may
    # be another's by then).
    monkeypatch.setattr(_loop, "EXIT_HOLD", 0.3)
    events = Recorder()
    with bare_loop(fifo_path, emit=events, capture_budget=60.0) as (loop, wd, sig, _):
        send(fifo_path, Arm(pid=FAKE_PID, scope_id="s", deadline=time.monotonic(), signal=9))
        loop._iterate([])
        assert events.of(Expired), "expired, its capture under way"
        [worker] = wd.workers()
        loop._iterate(exited(worker))
        loop.captured(FAKE_PID)
        loop._iterate([])  # the capture's end, while the exit is held
        assert sig.sent == []
        wait_until(lambda: (loop._iterate([]), events.of(WorkerGone))[1], what="the exit")
        [gone] = events.of(WorkerGone)
        assert gone.incident == "incident-1"
    assert sig.sent == []


def test_after_a_wake_up_the_idle_loop_waits_again(fifo_path: pathlib.Path) -> None:
    # A wake-up (a stop, a capture's end, a timer registered) is consumed by the
    # iteration it woke: with nothing armed the next wait must block again, not return
    # at once (an idle server that spins on a stale wake-up burns a core for ever).
    with bare_loop(fifo_path) as (loop, _wd, _sig, _):
        loop.wake()
        loop.wake()
        ready = loop._selector.select(0)
        assert ready, "the wake-up is seen"
        loop._iterate(ready)
        assert loop._selector.select(0) == []


def test_a_datagram_sent_after_the_stop_time_read_fails_instead_of_being_lost(
    fifo_path: pathlib.Path,
) -> None:
    # On stop the socket is shut for reading before its last read: a send after that
    # read fails (the client resyncs with the next server), where it would succeed and
    # its datagram (a disarm, say) be dropped with the socket.
    with bare_loop(fifo_path, with_socket=True) as (loop, wd, _sig, sock):
        assert sock is not None
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sender:
            sender.sendto(encode(Sync("before")), sock.path)
            loop.request_stop()
            loop.run()
            assert wd.counters.received["socket"] == 1  # read by the stop
            with pytest.raises(BrokenPipeError):
                sender.sendto(encode(Sync("after")), sock.path)


@not_pid_1  # the datagram's sender, this process, is its subject
def test_a_datagram_journaled_while_the_fifo_holds_half_a_line_replays_whole(
    fifo_path: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    # The journal keeps the FIFO's bytes as read, and the socket's messages as applied.
    # A datagram applied while the FIFO's last read ended inside a line goes before
    # that unfinished part, not after it: else a replay (a restart) reads the two as one
    # line, refused, and loses both (a disarm among them: a healthy worker reaped).
    journal = Journal(str(tmp_path / "state"))
    first = journal.seq
    line = encode(Arm(pid=FAKE_PID, scope_id="fifo", deadline=1e9, signal=0))
    with bare_loop(fifo_path, with_socket=True, journal=journal) as (loop, wd, _sig, sock):
        assert sock is not None
        send(fifo_path, raw=line[:10])
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sender:
            arm = Arm(pid=os.getpid(), scope_id="socket", deadline=1e9, signal=0)
            sender.sendto(encode(arm), sock.path)  # signal 0: reported, never sent
        loop._iterate([])
        send(fifo_path, raw=line[10:])
        loop._iterate([])
        assert sorted(t.scope_id for t in wd.armed()) == ["fifo", "socket"]
        journal.checkpoint()
        replayed = LineReader().feed(b"".join(journal.replay(first)))
    journal.close()
    assert not [r for r in replayed if isinstance(r, Exception)]
    assert len(replayed) == 2


def test_after_reading_a_full_fifo_judgement_waits_for_the_writers_it_woke(
    fifo_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A full pipe may hold back a writer with a line begun before the iteration began
    # (a disarm, say): the read makes room, and the writers it woke are given SETTLE
    # from the moment the read *ended*, not began, before a deadline is judged. Here
    # the read outlasts the deadline (applying is slow) by far more than SETTLE.
    clock = Clock()
    monkeypatch.setattr(_loop, "time", clock)
    settle = _horizon.SETTLE
    deadline = clock.now + settle

    def emit(event: Event) -> None:
        events.append(event)
        if isinstance(event, Armed):  # the read lasts until long past the deadline
            clock.now += 10 * settle

    events: List[Event] = []
    with bare_loop(fifo_path, emit=emit) as (loop, _wd, sig, _):
        loop._iterate([])  # the loop is running (the first read is a return from absence)
        send(fifo_path, Arm(pid=FAKE_PID, scope_id="s", deadline=deadline, signal=9))
        fd = os.open(fifo_path, os.O_WRONLY | os.O_NONBLOCK)
        try:
            with contextlib.suppress(BlockingIOError):
                while True:  # junk lines of a page each, until no page is left
                    os.write(fd, b"x" * 4000 + b"\n")
        finally:
            os.close(fd)
        loop._iterate([])  # the full pipe read, ended long past the deadline
        clock.now += settle / 2  # settled, counted from the read's start; not from its end
        loop._iterate([])
        assert [e for e in events if isinstance(e, Expired)] == []
        clock.now += settle
        loop._iterate([])
        assert [e.timer.pid for e in events if isinstance(e, Expired)] == [FAKE_PID]
    assert sig.sent == [(FAKE_PID, 9)]


def test_the_end_of_a_capture_signals_its_worker_in_the_iteration_it_wakes(
    fifo_path: pathlib.Path,
) -> None:
    # A hung worker is captured before it is signalled; the capture's end (from another
    # thread) wakes the loop, which signals it then, not when the budget runs out.
    events = Recorder()
    with bare_loop(fifo_path, emit=events, capture_budget=60.0) as (loop, _wd, sig, _):
        send(fifo_path, Arm(pid=FAKE_PID, scope_id="s", deadline=time.monotonic(), signal=9))
        loop._iterate([])
        assert events.of(Expired), "expired, its capture under way"
        assert sig.sent == []
        loop.captured(FAKE_PID)
        loop._iterate(loop._selector.select(0))  # woken
        assert sig.sent == [(FAKE_PID, 9)]


def test_a_stop_whose_last_read_fails_still_finishes_and_returns(
    fifo_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A bug in the stop-time read (it never raises on bad input) is logged: run() still
    # signals the reaps not done and hands the façade its (empty) results, then returns
    # as a stop does, not as a loop that ended on an error.
    calls: List[List[str]] = []
    with bare_loop(fifo_path, after=calls.append) as (loop, _wd, _sig, _):

        def broken(socket_ready: bool = True) -> None:
            raise RuntimeError("a bug")

        monkeypatch.setattr(loop, "_ingest", broken)
        loop.request_stop()
        loop.run()
    assert calls == [[]]


def test_the_liveness_probe_sees_an_iteration_only_while_it_runs(
    fifo_path: pathlib.Path,
) -> None:
    # torch's get_last_progress_time() and stalled_for() read busy_since: the start of
    # the iteration under way (wall clock, monotonic), None between them. Never set, a
    # loop stuck in an iteration looks healthy; never cleared, an idle healthy one looks
    # stuck since its last one.
    seen: List[Optional[Tuple[float, float]]] = []
    with bare_loop(fifo_path) as (loop, _wd, _sig, _):

        def after(tokens: List[str]) -> None:  # in the iteration, then in the stop's read
            seen.append(loop.busy_since)
            loop.request_stop()

        loop._after = after
        began = (time.time(), time.monotonic())
        loop.wake()
        loop.run()  # one iteration (the wake-up), then the stop
        assert loop.busy_since is None
    assert len(seen) == 2
    busy, stopping = seen
    assert busy is not None
    assert began[0] <= busy[0] <= time.time()
    assert began[1] <= busy[1] <= time.monotonic()
    assert stopping is None


def test_a_full_socket_queue_holds_judgement_back_for_the_senders_waiting_for_room(
    fifo_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A datagram socket's queue found full may hold back a sender with a datagram it
    # began before the iteration noted the time (a disarm, before its deadline): it gets
    # in only once the read has made room. So a deadline passed by then is not judged in
    # that iteration, but once the woken senders have had their turn (SETTLE after the
    # read) and the queue was found with room: as for a full FIFO, the socket's fullness
    # counts too (else a healthy worker whose disarm was waiting for room is reaped).
    clock = Clock()
    monkeypatch.setattr(_loop, "time", clock)
    events: List[Event] = []
    with bare_loop(fifo_path, emit=events.append, with_socket=True) as (loop, _wd, sig, sock):
        assert sock is not None
        loop._iterate([])  # the loop is running (the first read is a return from absence)
        deadline = clock.now + 0.5
        send(fifo_path, Arm(pid=FAKE_PID, scope_id="s", deadline=deadline, signal=9))
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sender:
            sender.setblocking(False)
            filled = 0
            try:
                while filled < 10 * sock.batch:  # junk, until the queue has no room
                    sender.sendto(b"junk\n", sock.path)
                    filled += 1
            except BlockingIOError:
                pass
            assert sock.queue_length <= filled < 10 * sock.batch, "the queue is full"
            clock.now = deadline + 0.1  # the deadline passes while the senders wait
            loop._iterate([])  # reads the full queue (and the FIFO's arm)
            assert not sock.queued(), "read to the end: room for the waiting senders"
            assert [e for e in events if isinstance(e, Expired)] == []
            assert sig.sent == []
            clock.now += _horizon.SETTLE  # their turn is over, and nothing came
            loop._iterate([])
        assert [e.timer.pid for e in events if isinstance(e, Expired)] == [FAKE_PID]
    assert sig.sent == [(FAKE_PID, 9)]


def test_a_single_byte_in_the_fifo_is_read_and_the_idle_loop_waits_again(
    fifo_path: pathlib.Path,
) -> None:
    # The FIFO holds one byte: the end of a line whose start an earlier iteration read
    # (a writer that split its line). It is read like any other bytes: the line is
    # applied, and the FIFO left empty, so the next wait blocks (a byte left behind
    # keeps the FIFO readable: a loop that spins for ever, and a line never applied).
    line = encode(Arm(pid=FAKE_PID, scope_id="s", deadline=1e9, signal=9))
    with bare_loop(fifo_path) as (loop, wd, sig, _):
        send(fifo_path, raw=line[:-1])
        loop._iterate([])
        assert wd.armed() == []  # half a line: nothing yet
        send(fifo_path, raw=line[-1:])
        loop._iterate([])
        assert [(t.pid, t.scope_id) for t in wd.armed()] == [(FAKE_PID, "s")]
        assert loop._selector.select(0) == []
    assert sig.sent == []


def test_a_worker_s_exit_is_seen_once_and_the_loop_waits_again(
    fifo_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A worker's pidfd turns readable when it exits, and stays so: the iteration that
    # sees it stops waiting for it. Else every later wait returns at once (a loop that
    # spins for ever) and the same exit is queued again in each iteration.
    monkeypatch.setattr(_loop, "time", Clock())  # the exit stays held
    child = subprocess.Popen(["true"])  # this test's own child, never signalled
    pidfd = os.pidfd_open(child.pid)
    try:
        child.wait()
        worker = Worker(child.pid, None, pidfd)
        with bare_loop(fifo_path) as (loop, _wd, sig, _):
            loop.watch(worker)
            ready = loop._selector.select(0)
            assert [key.data for key, _ in ready] == [worker]
            loop._iterate(ready)
            assert loop._selector.select(0) == []
            loop._iterate(loop._selector.select(0))
            assert [w for _, w in loop._exits] == [worker]
        assert sig.sent == []
    finally:
        os.close(pidfd)


def test_a_failing_iteration_is_logged_and_the_loop_pauses_before_the_next(
    fifo_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # A bug in an iteration (bad input never raises) is logged and the loop keeps
    # serving, but it pauses before the next iteration: a failure that repeats must not
    # make the loop spin (a core burnt for ever), nor go unseen.
    clock = Clock()
    slept: List[float] = []
    monkeypatch.setattr(clock, "sleep", slept.append)  # the pause, not slept
    monkeypatch.setattr(_loop, "time", clock)
    calls: List[object] = []
    with bare_loop(fifo_path) as (loop, _wd, _sig, _):

        def broken(ready: object) -> float:
            calls.append(ready)
            if len(calls) == 1:
                raise RuntimeError("a bug")
            loop.request_stop()
            return clock.now

        monkeypatch.setattr(loop, "_iterate", broken)
        loop.wake()  # each wait returns at once: the wake-up is never drained
        with caplog.at_level(logging.ERROR, logger="ftimer_server"):
            loop.run()
    assert len(calls) == 2
    assert len(slept) == 1
    assert slept[0] > 0
    assert "RuntimeError: a bug" in caplog.text


def test_the_end_of_a_capture_wakes_the_waiting_loop(fifo_path: pathlib.Path) -> None:
    # captured() comes from the capture's thread while the loop waits: it must wake
    # that wait, else the captured worker is signalled only at the loop's next wake-up
    # for something else (its capture budget's end, a minute later, on an idle server).
    events = Recorder()
    with bare_loop(fifo_path, emit=events, capture_budget=60.0) as (loop, _wd, sig, _):
        send(fifo_path, Arm(pid=FAKE_PID, scope_id="s", deadline=time.monotonic(), signal=9))
        loop._iterate(loop._selector.select(0))
        assert events.of(Expired), "expired, its capture under way"
        assert loop._selector.select(0) == []  # nothing to read: the loop would wait
        loop.captured(FAKE_PID)
        ready = loop._selector.select(0)
        assert ready, "woken"
        loop._iterate(ready)
        assert sig.sent == [(FAKE_PID, 9)]


def test_a_loop_not_run_yet_is_idle_and_of_no_thread(fifo_path: pathlib.Path) -> None:
    # The server publishes its loop before the loop's thread runs it: meanwhile torch's
    # liveness probe reads busy_since (None: healthy, the probe says now) and a stop()
    # from another thread compares ident with its own (None: no thread's), where a
    # missing attribute would raise out of both.
    with bare_loop(fifo_path) as (loop, _wd, _sig, _):
        assert loop.busy_since is None
        assert loop.ident is None


def test_close_lets_go_of_its_descriptors_and_a_later_wake_up_writes_nowhere(
    fifo_path: pathlib.Path,
) -> None:
    # A server opened and closed again and again (an agent's restarts, a test suite)
    # must not leave its wake-up pipe and selector open each time; and a wake-up from
    # another thread after the close (a capture ending late) must write nowhere, not to
    # a descriptor the program has since opened under the same number (0, say).
    with bare_loop(fifo_path) as (loop, _wd, _sig, _):
        fds = [loop._wake_r, loop._wake_w, loop._selector.fileno()]
        inodes = [os.fstat(fd).st_ino for fd in fds]
        loop.close()
        for fd, inode in zip(fds, inodes):
            assert not still_open(fd, inode), f"descriptor {fd} left open"
        r, w = os.pipe()
        stdin = os.dup(0)
        try:
            os.dup2(w, 0)  # what descriptor 0 is now: a pipe the test reads
            loop.wake()
        finally:
            os.dup2(stdin, 0)
            os.close(stdin)
            os.close(w)
        try:
            assert os.read(r, 1) == b"", "the wake-up was written to descriptor 0"
        finally:
            os.close(r)


def still_open(fd: int, inode: int) -> bool:
    """Whether ``fd`` is still the descriptor of ``inode`` (not closed, nor reused)."""
    try:
        return os.fstat(fd).st_ino == inode
    except OSError:
        return False
