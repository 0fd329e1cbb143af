"""A saved timer without a start time is never restored for a process born after the save.

``restore()`` bound such a timer to whichever process held its pid at the restart, where
``replay()`` already refused one born after the journal was written: a stranger that
reused the pid of a worker gone while the daemon was down was reaped. Report-only timers
(signal 0) and a recording signaller: nothing is ever signalled.
"""

from __future__ import annotations

import pathlib
import time

from ftimer_server import FileTimerServer, RecordingSignaller, Rejected, Timer, WorkerGone


def test_a_timer_saved_without_a_start_time_is_not_restored_for_a_process_born_later(
    fifo_path: pathlib.Path, children
) -> None:
    stranger = children()
    saved = Timer(pid=stranger.pid, scope_id="s", deadline=time.monotonic() + 3600, signal=0)
    events: list = []
    server = FileTimerServer(fifo_path, signaller=RecordingSignaller(), on_event=events.append)
    server.restore([saved], written_by=time.time() - 5)  # saved before it started
    assert server.armed() == []
    [gone] = [e for e in events if isinstance(e, WorkerGone)]  # its worker, not a refusal
    assert (gone.pid, gone.timers) == (stranger.pid, (saved,))
    assert [e for e in events if isinstance(e, Rejected)] == []
    # Saved while it lived, a tick after its birth at least (a process born in the tick
    # of the save could be a stranger): its own.
    server.restore([saved], written_by=time.time() + 0.1)
    assert [t.pid for t in server.armed()] == [stranger.pid]
    server.stop()


def test_a_process_born_a_moment_after_the_save_is_not_its_worker_either(
    fifo_path: pathlib.Path, children
) -> None:
    # The save's time was read in ticks since boot through /proc/stat's boot time (to
    # the second) and rounded up: a process that took the pid within a second or two of
    # the save read as older, and got the dead worker's timer (reaped at its deadline).
    saved_at = time.time()
    stranger = children()  # born after it
    saved = Timer(pid=stranger.pid, scope_id="s", deadline=time.monotonic() + 3600, signal=0)
    events: list = []
    server = FileTimerServer(fifo_path, signaller=RecordingSignaller(), on_event=events.append)
    server.restore([saved], written_by=saved_at)
    assert server.armed() == []
    [gone] = [e for e in events if isinstance(e, WorkerGone)]
    assert gone.pid == stranger.pid
    server.stop()


def test_each_saved_start_time_of_a_pid_is_checked(fifo_path: pathlib.Path, children) -> None:
    # The pid's first start time stood for all its saved timers: one naming another
    # process (a damaged state file) was restored on the worker holding the pid, or,
    # first in the file, had the worker's own timers dropped as exited.
    from ftimer_client._proc import process_start_time

    worker = children()
    real = process_start_time(worker.pid)
    far = time.monotonic() + 3600
    own = Timer(pid=worker.pid, scope_id="own", deadline=far, signal=0, start_time=real)
    other = Timer(pid=worker.pid, scope_id="other", deadline=far, signal=0, start_time=real - 7)
    torch = Timer(pid=worker.pid, scope_id="torch", deadline=far, signal=0)
    for saved in ([other, own, torch], [own, other, torch], [torch, other, own]):
        events: list = []
        server = FileTimerServer(fifo_path, signaller=RecordingSignaller(), on_event=events.append)
        server.restore(saved, written_by=time.time() + 0.1)
        assert sorted(t.scope_id for t in server.armed()) == ["own", "torch"]
        [gone] = [e for e in events if isinstance(e, WorkerGone)]
        assert gone.timers == (other,)
        server.stop()
    # Without its own: nothing says the process holding the pid is the torch timer's.
    events = []
    server = FileTimerServer(fifo_path, signaller=RecordingSignaller(), on_event=events.append)
    server.restore([torch, other], written_by=time.time() + 0.1)
    assert server.armed() == []
    gone_timers = [t for e in events if isinstance(e, WorkerGone) for t in e.timers]
    assert sorted(t.scope_id for t in gone_timers) == ["other", "torch"]
    server.stop()
