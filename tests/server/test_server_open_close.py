"""Behaviour of FileTimerServer's opening and closing (server/_server.py: _open_locked,
_open_ends, _unlock, _close, _release, _check_arguments, _lock_wait) pinned by mutation
testing: each test fails with the mutant that found it and passes on the code as it is.
Real FIFOs, sockets, lock files and processes; nothing is signalled but the test's own
children."""

from __future__ import annotations

import fcntl
import math
import os
import pathlib
import struct
import subprocess
import sys
import termios
import threading
from typing import List

import pytest
from tests.conftest import wait_until

from ftimer_protocol import Arm, Disarm, encode
from ftimer_server import Armed, FileTimerServer, Lifecycle, RecordingSignaller, Timer, WorkerGone
from ftimer_server.server import _server

from .conftest import Recorder, pidfds_of, proc_start_time, send, wait_exit

# Closes its descriptor 0 (a server started with stdin closed), then starts and stops a
# server on the FIFO argv[1]: its lock file is opened as descriptor 0. A second server on
# the path then starts in the same process only if the first let go of that lock.
LOCK_ON_DESCRIPTOR_0 = """
import os, sys
from ftimer_server import FifoBusy, FileTimerServer
os.close(0)
first = FileTimerServer(sys.argv[1])
first.start()
print("lock", os.readlink("/proc/self/fd/0").endswith(".lock"), flush=True)
first.stop()
try:
    os.fstat(0)
    print("descriptor 0 still open", flush=True)
except OSError:
    print("descriptor 0 closed", flush=True)
try:
    with FileTimerServer(sys.argv[1]) as second:
        second.sync()
    print("second served", flush=True)
except FifoBusy as e:
    print("second refused:", e, flush=True)
"""


def test_a_lock_taken_on_descriptor_0_is_released_at_stop(fifo_path: pathlib.Path) -> None:
    # An embedded server in a process with stdin closed gets its lock file as descriptor
    # 0. Taken for "no lock held" (> 0, not >= 0), it was never closed: the FIFO stayed
    # locked by a stopped server, and every later server on the path was refused.
    done = subprocess.run(
        [sys.executable, "-c", LOCK_ON_DESCRIPTOR_0, str(fifo_path)],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "lock True",
        "descriptor 0 closed",
        "second served",
    ], done.stderr


def test_a_start_interrupted_after_the_socket_is_bound_leaves_no_socket(
    fifo_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A signal handler's sys.exit() landing once the socket was bound (here: as the loop
    # is made): the socket stayed open and bound at its path, its descriptor lost; and
    # the server went on naming the closed FIFO and socket as its own.
    def interrupted(*args: object, **kwargs: object) -> None:
        raise SystemExit(143)  # as the handler would, at this point of the start

    sock_path = fifo_path.parent / "t.socket"
    before = set(os.listdir("/proc/self/fd"))
    monkeypatch.setattr(_server, "Loop", interrupted)
    server = FileTimerServer(fifo_path, socket_path=sock_path, remove_fifo=True)
    with pytest.raises(SystemExit):
        server.start()
    assert server.state is Lifecycle.NEW
    assert server.fifo is None
    assert server.socket is None
    assert not sock_path.exists()  # closed and unbound
    assert not fifo_path.exists()  # made by this start: not left behind
    assert set(os.listdir("/proc/self/fd")) <= before  # nothing left open
    monkeypatch.undo()
    # Not lost either: the server can start now, and binds its socket anew.
    with server:
        server.sync()
        assert server.socket is not None
        assert sock_path.exists()
    assert not sock_path.exists()


def _tick() -> None:
    pass


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"tick_interval": 1.0}, "^tick_interval and on_tick go together$"),
        ({"on_tick": _tick}, "^tick_interval and on_tick go together$"),
        ({"tick_interval": 0.0, "on_tick": _tick}, "^tick_interval must be a finite number"),
        ({"tick_interval": -1.0, "on_tick": _tick}, "^tick_interval must be a finite number"),
        ({"restore_grace": -0.5}, "^restore_grace must be between 0 and 3600 seconds$"),
        ({"restore_grace": 3600.5}, "^restore_grace must be between 0 and 3600 seconds$"),
        ({"restore_grace": math.nan}, "^restore_grace must be between 0 and 3600 seconds$"),
        ({"adopt_socket": (3, 10)}, "^adopt_socket is a socket bound at socket_path"),
        (
            {"dry_run": True, "signaller": RecordingSignaller()},
            "^dry_run replaces the signaller: give one or the other$",
        ),
    ],
)
def test_arguments_that_contradict_or_are_out_of_range_are_refused(
    fifo_path: pathlib.Path, kwargs: dict, match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        FileTimerServer(fifo_path, **kwargs)
    assert not os.path.exists(fifo_path)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"restore_grace": 0.0},
        {"restore_grace": 0.5},
        {"restore_grace": 3600.0},
        {"tick_interval": 0.5, "on_tick": _tick},
        {"tick_interval": 1e-9, "on_tick": _tick},
        {"dry_run": True},
        {"signaller": RecordingSignaller()},
    ],
)
def test_arguments_at_the_edges_of_their_ranges_are_taken(
    fifo_path: pathlib.Path, kwargs: dict
) -> None:
    server = FileTimerServer(fifo_path, **kwargs)
    server.stop()
    assert server.state is Lifecycle.STOPPED


def test_adopt_socket_is_taken_with_a_socket_path(tmp_path: pathlib.Path) -> None:
    # Checked, not used, before start(): a server never started leaves the descriptor be.
    r, w = os.pipe()
    try:
        server = FileTimerServer(
            tmp_path / "t.fifo", socket_path=tmp_path / "t.socket", adopt_socket=(r, 10)
        )
        server.stop()
        os.fstat(r)
    finally:
        os.close(r)
        os.close(w)


@pytest.mark.parametrize(
    ("timeout", "wait"),
    [
        (None, -1.0),  # no limit
        (math.inf, -1.0),  # more than Lock.acquire() can wait: no limit
        (threading.TIMEOUT_MAX * 2, -1.0),
        (2.5, 2.5),
        (0.0, 0.0),
        (-0.5, 0.0),  # acquire() raises for a negative one other than -1
        (-1.0, 0.0),  # ... and takes -1 for no limit: not waiting at all is asked
        (-math.inf, 0.0),
    ],
)
def test_a_timeout_is_what_a_lock_waits(timeout: float, wait: float) -> None:
    assert _server._lock_wait(timeout) == wait
    if wait >= 0:  # acquire() takes it (a lock held by nobody: at once)
        lock = threading.Lock()
        assert lock.acquire(timeout=wait)
        lock.release()


def test_a_nan_timeout_is_refused() -> None:
    with pytest.raises(ValueError, match=r"^timeout is NaN$"):
        _server._lock_wait(math.nan)


def test_stop_closes_the_pidfds_of_the_workers_it_watched(
    fifo_path: pathlib.Path, children
) -> None:
    # The watchdog's workers were not released at the end: each armed worker's pidfd
    # stayed open in the process that embedded the server, one per worker per server.
    child = children()
    server = FileTimerServer(fifo_path)
    with server:
        send(fifo_path, Arm(pid=child.pid, scope_id="s", deadline=1e9, signal=9))
        server.sync()
        assert pidfds_of(child.pid) >= 1  # held while its timer is armed
    assert server.state is Lifecycle.STOPPED
    assert pidfds_of(child.pid) == 0
    assert [t.pid for t in server.armed()] == [child.pid]  # timers stay, for armed()
    assert child.poll() is None  # never signalled


def test_a_sync_written_after_the_last_read_ends_with_the_stop(
    fifo_path: pathlib.Path, children
) -> None:
    # A sync whose marker went into the FIFO after the loop's last read (the loop ended
    # by a signal handler's SystemExit, then applied what the FIFO held): nothing reads
    # it again. The stop wakes its caller as "stopped"; it waited out its whole timeout
    # instead, and was told the loop had not reached it in time.
    child = children()
    hit, go, in_finish, go_on = (threading.Event() for _ in range(4))
    errors: List[BaseException] = []

    def on_event(event: object) -> None:
        if isinstance(event, Armed) and event.timer.scope_id == "boom":
            hit.set()
            go.wait(30)
            raise SystemExit(143)  # as a signal handler's, in run()'s thread
        if isinstance(event, Armed) and event.timer.scope_id == "late":  # in the last read
            in_finish.set()
            go_on.wait(30)

    server = FileTimerServer(fifo_path, on_event=on_event)

    def sync() -> None:
        try:
            server.sync(timeout=10)
        except BaseException as e:  # handed to the test's thread
            errors.append(e)

    def drive() -> None:
        wait_until(lambda: server.state is Lifecycle.RUNNING)
        send(fifo_path, Arm(pid=child.pid, scope_id="boom", deadline=1e9, signal=9))
        assert hit.wait(30)
        send(fifo_path, Arm(pid=child.pid, scope_id="late", deadline=1e9, signal=9))
        go.set()
        assert in_finish.wait(30)  # the loop's last read is done: it reads no more
        reader = os.open(fifo_path, os.O_RDONLY | os.O_NONBLOCK)
        try:
            caller.start()
            wait_until(lambda: _queued(reader), what="the sync's marker in the FIFO")
        finally:
            os.close(reader)
        go_on.set()

    caller = threading.Thread(target=sync)
    driver = threading.Thread(target=drive)
    driver.start()
    try:
        with pytest.raises(SystemExit):
            server.run()
    finally:
        go.set()
        go_on.set()
        driver.join(30)
    caller.join(30)
    assert not caller.is_alive()
    assert [type(e) for e in errors] == [RuntimeError]
    assert str(errors[0]) == "the server stopped before the sync completed"
    assert child.poll() is None  # never signalled


def _queued(fd: int) -> int:
    """How many bytes the pipe ``fd`` reads holds."""
    return struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0"))[0]


def test_a_server_never_started_lets_go_of_the_workers_restore_bound(
    fifo_path: pathlib.Path, children
) -> None:
    # restore() binds each timer's worker (its pidfd) at once; a server stopped without
    # ever starting kept those pidfds open for good.
    child = children()
    server = FileTimerServer(fifo_path)
    server.restore([Timer(child.pid, "s", 1e9, 9, proc_start_time(child.pid))])
    assert pidfds_of(child.pid) >= 1
    server.stop()
    assert server.state is Lifecycle.STOPPED
    assert pidfds_of(child.pid) == 0
    assert [t.pid for t in server.armed()] == [child.pid]  # kept for armed()
    assert not fifo_path.exists()  # never opened
    assert child.poll() is None


def test_an_on_tick_that_raises_system_exit_does_not_end_the_loop(
    fifo_path: pathlib.Path, children, caplog: pytest.LogCaptureFixture
) -> None:
    # on_tick is called through the callbacks' guard, as every callback: off the main
    # thread a SystemExit it raises (a keep-alive that gives up) is logged and the loop
    # serves on. Called as given, it ended the loop's thread: no timer enforced.
    ticks: List[float] = []

    def on_tick() -> None:
        ticks.append(1.0)
        if len(ticks) == 1:
            raise SystemExit(1)

    with FileTimerServer(fifo_path, tick_interval=0.01, on_tick=on_tick) as server:
        wait_until(lambda: len(ticks) >= 3, what="ticks after the one that raised")
        assert server.state is Lifecycle.RUNNING
        child = children()
        send(fifo_path, Arm(pid=child.pid, scope_id="s", deadline=0.0, signal=9))
        assert wait_exit(child)[0] == -9  # still enforced
    assert "on_tick callback failed" in caplog.text


def test_a_line_replayed_in_part_is_finished_by_what_the_fifo_holds(
    fifo_path: pathlib.Path, children
) -> None:
    # The last server read a line in part and kept that part at its checkpoint: the rest
    # is in the FIFO. Not fed to the new loop's reader, the rest was read as a line of
    # its own and refused: here a disarm lost, and the healthy worker reaped at its
    # deadline.
    child = children()
    start = proc_start_time(child.pid)
    server = FileTimerServer(fifo_path, restore_grace=0.0)
    server.restore([Timer(child.pid, "s", 1e9, 9, start)])
    disarm = encode(Disarm(pid=child.pid, scope_id="s"))
    assert server.replay([disarm[:7]]) == 7
    with server:
        send(fifo_path, raw=disarm[7:])
        server.sync()
        assert server.armed() == []
        assert server.stats().decode_errors == {}
    assert child.poll() is None


def test_a_worker_restored_before_start_is_watched_for_its_exit(
    fifo_path: pathlib.Path, children
) -> None:
    # restore() binds the worker before the loop exists; the start hands it to the loop
    # to watch. Not handed, its exit went unseen: its timers stayed armed until their
    # deadline, and it stayed counted among the workers.
    child = children()
    events = Recorder()
    server = FileTimerServer(fifo_path, on_event=events)
    server.restore([Timer(child.pid, "s", 1e9, 9, proc_start_time(child.pid))])
    with server:
        assert [w.pid for w in server.workers()] == [child.pid]
        child.kill()  # the test's own child
        child.wait()
        wait_until(lambda: server.armed() == [], what="the exited worker's timers dropped")
        assert server.workers() == []
    assert [e.pid for e in events.of(WorkerGone)] == [child.pid]  # type: ignore[attr-defined]


def test_timers_restored_while_running_wait_out_the_restore_grace(
    fifo_path: pathlib.Path, children
) -> None:
    # restore() while running holds expiries for restore_grace seconds from now: the
    # restored workers' clients re-send what they could not write meanwhile (a disarm).
    # Held until as long before now, a restored timer already due was reaped at once.
    child = children()
    with FileTimerServer(fifo_path, restore_grace=60.0) as server:
        server.restore([Timer(child.pid, "s", 0.0, 9, proc_start_time(child.pid))])
        server.sync()  # the loop iterated since: a due timer not held was reaped
        assert [t.pid for t in server.armed()] == [child.pid]
        assert server.stats().reaps == {}
        assert child.poll() is None


def test_a_stop_from_the_started_callback_does_not_wait_for_the_loop(
    fifo_path: pathlib.Path, caplog: pytest.LogCaptureFixture
) -> None:
    # "watchdog started" is logged by start()'s thread before the loop's thread exists:
    # a stop() from it is the opener's, and returns at once (the loop stops as soon as
    # it runs). Not known for the opener's, it waited for a loop that could not start
    # until it returned: all of stop_timeout, then a warning that the loop was busy.
    stops: List[Lifecycle] = []

    def log_event(name: str, request: object) -> None:
        if name == "watchdog started":
            server.stop()
            stops.append(server.state)

    server = FileTimerServer(fifo_path, log_event=log_event)
    server.stop_timeout = 5.0
    server.start()
    assert stops == [Lifecycle.STOPPING]
    server.stop_timeout = None
    server.stop()  # waits for the loop, which ended as soon as it ran
    assert server.state is Lifecycle.STOPPED
    assert "has not ended" not in caplog.text
