"""Behaviour of server/_server.py that no test pinned, found by mutation testing (each test
fails with the mutant that found it)."""

from __future__ import annotations

import pathlib
import threading

import pytest

from ftimer_server import FileTimerServer, Lifecycle
from ftimer_server.server import _server

from .conftest import on_thread_start


def test_a_start_with_no_thread_to_be_had_leaves_nothing_behind(
    fifo_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Thread.start() raising (systemd's TasksMax): no loop runs, so start() itself must
    # close the FIFO and let go of its lock; taking the thread for a running one (it
    # exists, it is not alive) left the lock held and the server RUNNING with no loop.
    def refuse(thread: threading.Thread) -> None:
        raise RuntimeError("can't start new thread")

    on_thread_start(monkeypatch, _server, refuse)
    server = FileTimerServer(fifo_path, remove_fifo=True)
    with pytest.raises(RuntimeError, match="can't start new thread"):
        server.start()
    assert server.state is Lifecycle.STOPPED
    assert not fifo_path.exists()
    monkeypatch.undo()
    with FileTimerServer(fifo_path) as next_one:  # the lock was let go of
        next_one.sync()


@pytest.mark.parametrize("stop_timeout", [0.0, -0.5])
def test_a_stop_that_waits_not_at_all_returns_at_once_while_log_event_blocks(
    fifo_path: pathlib.Path, children, stop_timeout: float
) -> None:
    # stop_timeout 0 or negative: "not at all". The loop blocked in a callback outside
    # the table's lock: stop() takes the lock, then must not wait for the end (a wait of
    # 0 taken for "no limit" hung the caller for as long as the callback blocked).
    import time

    from tests.conftest import wait_until

    from .test_server import assert_lock_released, blocked_in_log_event

    server, release = blocked_in_log_event(fifo_path, children, stop_timeout=stop_timeout)
    try:
        stopper = threading.Thread(target=server.stop)
        began = time.monotonic()
        stopper.start()
        stopper.join(10)
        assert not stopper.is_alive(), "stop() waited for the blocked callback"
        assert time.monotonic() - began < 0.9  # not at all: not a second either
        assert server.state is Lifecycle.STOPPING
    finally:
        release.set()
    wait_until(lambda: server.state is Lifecycle.STOPPED)
    assert_lock_released(fifo_path)


def test_replay_counts_its_bytes_and_holds_what_it_armed_for_the_grace(
    fifo_path: pathlib.Path, children
) -> None:
    # replay() returns the bytes it replayed (the daemon logs them), 0 for none; a replay
    # that armed a timer already due (its deadline passed while no server ran) holds it
    # for restore_grace, so that its client's disarm, lost in the outage, can arrive.
    import time

    from ftimer_protocol import TimerRequestV1, encode
    from ftimer_server import RecordingSignaller

    worker = children()
    line = encode(TimerRequestV1(pid=worker.pid, scope_id="s", expiration_time=0.0, signal=9))
    signaller = RecordingSignaller()
    nothing = FileTimerServer(fifo_path)
    assert nothing.replay([]) == 0
    nothing.stop()
    server = FileTimerServer(fifo_path, signaller=signaller, restore_grace=60)
    assert server.replay([line[:5], line[5:]], written_by=time.time() + 1) == len(line)
    assert [t.pid for t in server.armed()] == [worker.pid]
    with server:
        server.sync()  # an iteration of the loop has run: within the grace, nothing expires
        assert [t.pid for t in server.armed()] == [worker.pid]
    assert signaller.sent == []


def test_sync_from_the_loops_own_thread_is_refused_at_once(
    fifo_path: pathlib.Path, children
) -> None:
    # A callback's sync() would wait for the loop it blocks: RuntimeError at once, not a
    # TimeoutError after the whole timeout (the loop frozen meanwhile).
    from ftimer_protocol import Arm

    from .conftest import send

    raised: list = []
    done = threading.Event()

    def on_event(event: object) -> None:
        if not done.is_set():
            try:
                server.sync(timeout=3)
            except Exception as e:
                raised.append(e)
            done.set()

    server = FileTimerServer(fifo_path, on_event=on_event, dry_run=True)
    with server:
        send(fifo_path, Arm(pid=children().pid, scope_id="s", deadline=1e9, signal=9))
        assert done.wait(10)
    [error] = raised
    assert isinstance(error, RuntimeError)
    assert "own thread" in str(error)


@pytest.mark.parametrize("timeout", [0.0, 0.3])
def test_sync_gives_up_within_its_timeout_while_the_loop_is_blocked(
    fifo_path: pathlib.Path, children, timeout: float
) -> None:
    # The loop blocked in a callback (outside the table's lock): sync(timeout) raises
    # TimeoutError within about timeout seconds; 0 is no wait, not "as long as it takes".
    import time

    from .test_server import blocked_in_log_event

    server, release = blocked_in_log_event(fifo_path, children, stop_timeout=None)
    raised: list = []

    def call() -> None:
        try:
            server.sync(timeout)
        except Exception as e:
            raised.append(e)

    try:
        caller = threading.Thread(target=call)
        began = time.monotonic()
        caller.start()
        caller.join(10)
        assert not caller.is_alive(), "sync() waited for the blocked loop"
        assert time.monotonic() - began < timeout + 0.9
        [error] = raised
        assert isinstance(error, TimeoutError)
    finally:
        release.set()
        server.stop()


def test_a_checkpoint_without_a_journal_names_no_segment(fifo_path: pathlib.Path) -> None:
    server = FileTimerServer(fifo_path)
    assert server.checkpoint() == ([], 0)  # 0: no journal to replay from
    server.stop()


def test_sync_leaves_no_descriptor_behind(fifo_path: pathlib.Path) -> None:
    # Each sync() writes through a dup of the FIFO's write end: a daemon's health check
    # that syncs every second ran out of descriptors if it were kept.
    import os

    with FileTimerServer(fifo_path) as server:
        server.sync()
        before = len(os.listdir("/proc/self/fd"))
        for _ in range(50):
            server.sync()
        assert len(os.listdir("/proc/self/fd")) < before + 10


def test_run_once_on_a_new_server_starts_it_and_reaps_what_is_due(
    fifo_path: pathlib.Path, children
) -> None:
    # torch's tests call run_once() on a server never started: it starts it, runs one
    # pass (reaping what registered timers made due), then stops it.
    import time

    from ftimer_server import FileTimerRequest, RecordingSignaller

    worker = children()
    signaller = RecordingSignaller()
    logged: list = []
    server = FileTimerServer(
        fifo_path, signaller=signaller, log_event=lambda name, request: logged.append(name)
    )
    server.register_timers([FileTimerRequest(worker.pid, "s", time.time() - 1, 9)])
    server.run_once()
    assert server.state is Lifecycle.STOPPED
    assert signaller.sent == [(worker.pid, 9)]
    assert logged[0] == "watchdog started"
    assert logged[-1] == "watchdog stopped"


def test_a_timer_registered_with_an_idle_running_server_is_enforced(
    fifo_path: pathlib.Path, children
) -> None:
    # The loop waits for its next deadline or the FIFO, no longer: register_timers()
    # from another thread must wake it, or a timer earlier than any it knew (none, here)
    # would never fire.
    import time

    from tests.conftest import wait_until

    from ftimer_server import FileTimerRequest, RecordingSignaller

    worker = children()
    signaller = RecordingSignaller()
    with FileTimerServer(fifo_path, signaller=signaller) as server:
        server.sync()  # the loop is idle, waiting for the FIFO alone
        server.register_timers([FileTimerRequest(worker.pid, "s", time.time() + 0.1, 9)])
        wait_until(lambda: signaller.sent == [(worker.pid, 9)])


def test_clear_timers_on_an_idle_running_server_delivers_its_events_now(
    fifo_path: pathlib.Path, children
) -> None:
    # clear_timers() from another thread: its Disarmed events (and on_change, the
    # daemon's cue to save) come from the loop, which must be woken for them.
    import time

    from tests.conftest import wait_until

    from ftimer_server import Disarmed, FileTimerRequest

    worker = children()
    events: list = []
    with FileTimerServer(fifo_path, on_event=events.append, dry_run=True) as server:
        server.register_timers([FileTimerRequest(worker.pid, "s", time.time() + 600, 9)])
        server.sync()  # armed, and the loop idle until its deadline, 600 s away
        server.clear_timers([worker.pid])
        wait_until(lambda: any(isinstance(e, Disarmed) for e in events))


def test_is_process_running_is_true_for_live_processes_only(children) -> None:
    # torch's static probe: init (pid 1) and this process are alive; a zombie (exited,
    # not yet waited for), pid 0 and negative pids are not.
    import os
    import subprocess

    from tests.conftest import wait_until

    assert FileTimerServer.is_process_running(1)
    assert FileTimerServer.is_process_running(os.getpid())
    assert not FileTimerServer.is_process_running(0)
    assert not FileTimerServer.is_process_running(-1)
    zombie = subprocess.Popen(["true"])
    try:
        stat = pathlib.Path(f"/proc/{zombie.pid}/stat")
        wait_until(lambda: stat.read_text().rsplit(")", 1)[1].split()[0] == "Z")
        assert not FileTimerServer.is_process_running(zombie.pid)
    finally:
        zombie.wait()


def test_a_server_that_captures_nothing_has_written_no_incident(fifo_path: pathlib.Path) -> None:
    server = FileTimerServer(fifo_path)  # incidents=None: the daemon's metrics read these
    assert server.incident_writes == (0, 0)
    assert server.incidents_failing is None
    server.stop()
