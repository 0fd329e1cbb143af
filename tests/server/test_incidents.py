"""Incidents end to end: a FileTimerServer with diagnostics, real stuck workers (through
ftimer's client), real py-spy or the workers' own faulthandler hook, real signals. The
capture comes first, the kill within the budget; one incident per reap, its peers
grouped with the outlier first."""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import pathlib
import select
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Callable, List, Optional, Tuple

import pytest
from tests.conftest import wait_until

from ftimer_protocol import Arm, Expire
from ftimer_server import (
    FileTimerServer,
    Reaped,
    RecordingSignaller,
    Rejected,
    RejectReason,
    Signaller,
    Worker,
)
from ftimer_server.core._incident import Capture, Incident
from ftimer_server.incidents._capture import CaptureOptions, find_py_spy
from ftimer_server.incidents._diagnostics import IncidentOptions
from ftimer_server.incidents._helper import MAX_UNSENT, CaptureJob, Helper, HelperGone, WriteJob

from .conftest import (
    AS_NOBODY,
    NOBODY,
    need_nobody,
    on_thread_start,
    proc_start_time,
    send,
    wait_exit,
)

# A worker of job "j": arms `after` seconds, then hangs in `where` (its stack says so).
WORKER = """
import sys, time
from ftimer_client import FileTimerClient
fifo, rank, after, where, dump = sys.argv[1:6]
after = float(after)
client = FileTimerClient(fifo, labels={"job": "j", "rank": rank}, dump_signal=dump or None)

def collective():
    time.sleep(3600)

def load_batch():
    time.sleep(3600)

client.arm("step", after)
print("armed", flush=True)
{"collective": collective, "load_batch": load_batch}[where]()
"""

needs_py_spy = pytest.mark.skipif(
    find_py_spy() is None, reason="py-spy is not installed (ftimer-server[pyspy])"
)


@pytest.fixture
def workers() -> Iterator[Callable[..., subprocess.Popen[str]]]:
    started: List[subprocess.Popen[str]] = []

    def start(
        fifo: pathlib.Path, rank: int, after: float, where: str, dump: str = ""
    ) -> subprocess.Popen[str]:
        args = [str(fifo), str(rank), str(after), where, dump]
        proc = subprocess.Popen(
            [sys.executable, "-c", WORKER, *args], stdout=subprocess.PIPE, text=True
        )
        started.append(proc)
        assert proc.stdout is not None
        assert proc.stdout.readline() == "armed\n"
        return proc

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        assert proc.stdout is not None
        proc.stdout.close()


class Collector:
    def __init__(self) -> None:
        self.incidents: List[Incident] = []
        self.reaped: List[Reaped] = []
        self.done = threading.Event()

    def incident(self, incident: Incident) -> None:
        self.incidents.append(incident)
        self.done.set()

    def event(self, event: object) -> None:
        if isinstance(event, Reaped):
            self.reaped.append(event)


def server(fifo: pathlib.Path, got: Collector, **options: object) -> FileTimerServer:
    return FileTimerServer(
        fifo,
        on_event=got.event,
        incidents=IncidentOptions(**options),  # type: ignore[arg-type]
        on_incident=got.incident,
    )


@needs_py_spy
def test_the_stuck_rank_and_its_peers_outlier_first(
    fifo_path: pathlib.Path, tmp_path: pathlib.Path, workers
) -> None:  # type: ignore[no-untyped-def]
    got = Collector()
    directory = tmp_path / "incidents"
    with server(fifo_path, got, directory=str(directory), timeout=5.0) as srv:
        # The peers first: each start takes a Python's start-up, which on a loaded
        # machine could outlast the stuck rank's timer.
        workers(fifo_path, 1, 3600, "collective")
        workers(fifo_path, 2, 3600, "load_batch")
        stuck = workers(fifo_path, 0, 0.5, "collective")
        srv.sync()
        code, _ = wait_exit(stuck)
        assert got.done.wait(15)
    assert code == -9
    [incident] = got.incidents
    [reaped] = got.reaped
    assert reaped.incident == incident.id
    assert reaped.late < 5.0  # the kill came with the capture, well within the budget
    assert [c.role for c in incident.captures] == ["stuck", "peer", "peer"]
    assert {c.method for c in incident.captures} == {"py-spy"}
    assert (incident.job, incident.delivered, incident.timed_out) == ("j", True, False)
    # The outlier (rank 2, in load_batch) first; ranks 0 and 1 share a stack.
    assert [g.ranks for g in incident.groups] == [["2"], ["0", "1"]]
    assert "load_batch" in incident.groups[0].summary
    assert any("collective" in line for line in incident.summary)
    record = json.loads((directory / f"{incident.id}.json").read_text())
    assert record["version"] == 1
    assert record["groups"][0]["ranks"] == ["2"]
    assert "load_batch" in (directory / f"{incident.id}.txt").read_text()
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700


def test_the_workers_own_hook_without_py_spy(
    fifo_path: pathlib.Path, tmp_path: pathlib.Path, workers
) -> None:  # type: ignore[no-untyped-def]
    got = Collector()
    with server(fifo_path, got, directory=str(tmp_path / "i"), method="hook", timeout=5.0):
        stuck = workers(fifo_path, 0, 0.3, "collective", dump="SIGUSR2")
        code, _ = wait_exit(stuck)
        assert got.done.wait(15)
    assert code == -9
    [incident] = got.incidents
    [capture] = incident.captures
    assert capture.method == "hook"
    frames = [f.function for t in capture.threads for f in t.frames]
    assert "collective" in frames


def test_another_users_worker_that_names_the_job_is_not_captured(
    fifo_path: pathlib.Path, tmp_path: pathlib.Path, workers
) -> None:  # type: ignore[no-untyped-def]
    # A job label is the client's to choose: a worker of another user labelled "j" is no
    # peer of this user's job "j" (else any user could have another's workers captured,
    # their stacks and command lines in its incidents, as often as its timers expire).
    need_nobody()
    fifo_path.parent.chmod(0o755)  # the other user's worker reaches the FIFO
    got = Collector()
    with server(fifo_path, got, method="facts", timeout=5.0) as srv:
        fifo_path.chmod(0o666)
        stranger = subprocess.Popen(
            [
                *AS_NOBODY,
                sys.executable,
                "-c",
                WORKER,
                str(fifo_path),
                "9",
                "3600",
                "collective",
                "",
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert stranger.stdout is not None
            assert stranger.stdout.readline() == "armed\n"
            workers(fifo_path, 1, 3600, "collective")  # a peer of this user's: captured
            stuck = workers(fifo_path, 0, 0.3, "collective")
            srv.sync()
            code, _ = wait_exit(stuck)
            assert got.done.wait(15)
            assert stranger.poll() is None  # never signalled either
        finally:
            stranger.kill()
            stranger.wait()
            assert stranger.stdout is not None
            stranger.stdout.close()
    assert code == -9
    [incident] = got.incidents
    assert [(c.role, (c.labels or {}).get("rank")) for c in incident.captures] == [
        ("stuck", "0"),
        ("peer", "1"),
    ]
    assert incident.errors == [
        f"pid {stranger.pid}: not captured: another user's process (uid {NOBODY}; the stuck "
        "worker's is uid 0)"
    ]


def test_a_capture_that_hangs_never_delays_the_kill_past_the_budget(
    fifo_path: pathlib.Path, tmp_path: pathlib.Path, workers
) -> None:  # type: ignore[no-untyped-def]
    hanging = tmp_path / "py-spy"  # a py-spy that never answers (a D-state worker)
    hanging.write_text("#!/bin/sh\nexec sleep 3600\n")
    hanging.chmod(0o755)
    got = Collector()
    budget = 0.5
    options = {"directory": str(tmp_path / "i"), "py_spy": str(hanging), "timeout": budget}
    with server(fifo_path, got, **options):
        stuck = workers(fifo_path, 0, 0.3, "collective")
        code, died = wait_exit(stuck)
        assert got.done.wait(15)
    assert code == -9
    [incident] = got.incidents
    # From the timer's own (monotonic) deadline, not from before the worker started.
    assert died - incident.deadline < budget + 0.3  # margin for a loaded 2-core machine
    assert incident.captures[0].error  # says the capture could not finish


def test_a_stop_during_a_capture_writes_the_incident_and_leaves_no_tool_behind(
    fifo_path: pathlib.Path, tmp_path: pathlib.Path, children
) -> None:  # type: ignore[no-untyped-def]
    # The stop closed the helper under the server's lock: stats() waited for it, the
    # incident was lost ("the capture helper was stopped"), and the hung tool's process
    # group outlived it.
    started = tmp_path / "tool.pids"
    hanging = tmp_path / "py-spy"  # a py-spy that never answers, with a child of its own
    hanging.write_text(f"#!/bin/sh\nsleep 3600 &\necho $$ $! > {started}\nexec sleep 3600\n")
    hanging.chmod(0o755)
    options = IncidentOptions(directory=str(tmp_path / "i"), py_spy=str(hanging), timeout=2.0)
    reaped = threading.Event()
    srv = FileTimerServer(
        fifo_path,
        signaller=RecordingSignaller(),
        incidents=options,
        on_event=lambda e: reaped.set() if isinstance(e, Reaped) else None,
    )
    srv.start()
    worker = children()
    send(fifo_path, Expire(pid=worker.pid, scope_id="s", signal=9))
    tool_pids = wait_until(lambda: started.exists() and started.read_text().split())
    stopping = threading.Thread(target=srv.stop)
    stopping.start()
    assert reaped.wait(15)  # the stop's reap, at once: the loop has ended
    srv.stats(timeout=1.0)  # not held up by the capture still running (TimeoutError)
    assert stopping.is_alive()  # the stop is still finishing the incident
    stopping.join(30)
    [written] = (tmp_path / "i").glob("*.json")
    assert json.loads(written.read_text())["pid"] == worker.pid
    for pid in map(int, tool_pids):  # killed with their group, reaped by their parents
        wait_until(lambda pid=pid: not _alive(pid) or None, what=f"tool process {pid} to end")


def test_a_helper_made_to_end_kills_its_tools_and_resumes_the_worker(
    tmp_path: pathlib.Path, children
) -> None:  # type: ignore[no-untyped-def]
    # A helper still capturing when stopped was SIGKILLed: its tool, in a session of its
    # own, lived on (attached to the worker, which py-spy leaves stopped).
    started = tmp_path / "tool.pids"
    hanging = tmp_path / "py-spy"  # stops the worker as py-spy does, then never answers
    hanging.write_text(
        "#!/bin/sh\n"
        'while [ $# -gt 0 ]; do [ "$1" = --pid ] && pid=$2; shift; done\n'
        f"kill -STOP $pid\nsleep 3600 &\necho $$ $! > {started}\nexec sleep 3600\n"
    )
    hanging.chmod(0o755)
    worker = children()
    helper = Helper()
    options = CaptureOptions(py_spy=str(hanging), wants_py_spy=True, hook=False)
    job = CaptureJob(
        worker.pid,
        proc_start_time(worker.pid),
        "stuck",
        None,
        None,
        options,
        time.monotonic() + 600,
    )
    helper.submit(job)
    tool_pids = wait_until(lambda: started.exists() and started.read_text().split())
    helper.close(timeout=0.1)
    for pid in map(int, tool_pids):
        wait_until(lambda pid=pid: not _alive(pid) or None, what=f"tool process {pid} to end")
    assert _state(worker.pid) != "T"  # resumed


def _state(pid: int) -> str:
    with open(f"/proc/{pid}/stat", "rb") as f:
        return f.read().rsplit(b")", 1)[1].split()[0].decode()


def _alive(pid: int) -> bool:
    try:
        return _state(pid) != "Z"
    except FileNotFoundError:
        return False


def test_an_unwritable_directory_costs_no_kill(
    fifo_path: pathlib.Path, tmp_path: pathlib.Path, workers, caplog
) -> None:  # type: ignore[no-untyped-def]
    directory = tmp_path / "gone"
    got = Collector()
    with server(fifo_path, got, directory=str(directory), method="facts", timeout=2.0) as srv:
        # The store made it at start; now a file stands there: nothing can be written,
        # not even by root.
        directory.rmdir()
        directory.write_text("")
        stuck = workers(fifo_path, 0, 0.2, "collective")
        code, _ = wait_exit(stuck)
        assert got.done.wait(15)
        diagnostics = srv._diagnostics  # type: ignore[attr-defined]
    assert code == -9
    [incident] = got.incidents  # still given to on_incident, annotated
    assert incident.captures[0].facts is not None
    assert incident.summary
    assert "cannot write incident" in caplog.text
    assert (diagnostics.written, diagnostics.write_errors) == (0, 1)


def test_a_worker_that_exits_during_the_capture(
    fifo_path: pathlib.Path, tmp_path: pathlib.Path, workers
) -> None:  # type: ignore[no-untyped-def]
    hanging = tmp_path / "py-spy"  # holds the capture open while the worker exits
    hanging.write_text("#!/bin/sh\nexec sleep 3600\n")
    hanging.chmod(0o755)
    got = Collector()
    events: List[object] = []
    with FileTimerServer(
        fifo_path,
        on_event=events.append,
        incidents=IncidentOptions(py_spy=str(hanging), timeout=3.0),
        on_incident=got.incident,
    ):
        stuck = workers(fifo_path, 0, 0.2, "collective")
        wait_until(lambda: any(type(e).__name__ == "Expired" for e in events))
        stuck.kill()  # exits mid-capture: never signalled by the server
        assert got.done.wait(15)
    [incident] = got.incidents
    assert incident.delivered is None
    assert (
        "; not signalled: the worker exited during the capture (SIGKILL was due)"
        in (incident.summary[0])
    )
    assert not [e for e in events if isinstance(e, Reaped)]
    gone: Optional[object] = next(e for e in events if type(e).__name__ == "WorkerGone")
    assert gone.incident == incident.id  # type: ignore[union-attr]


class ExitedSignaller(Signaller):
    """Answers every signal as a signaller does for a worker that exited after its
    capture, before its signal (it signals nobody)."""

    def send(self, worker: Worker, signal: int) -> bool:
        return False


def test_a_worker_that_exits_after_its_capture_is_not_a_failed_reap(
    fifo_path: pathlib.Path, tmp_path: pathlib.Path, workers
) -> None:  # type: ignore[no-untyped-def]
    # Its reap was counted a failure (the "reap failed" alert: a hung worker may still
    # run), logged as an error and its incident said "reaped with SIGKILL (NOT delivered)".
    got = Collector()
    options = IncidentOptions(directory=str(tmp_path / "i"), method="facts", timeout=2.0)
    with FileTimerServer(
        fifo_path,
        signaller=ExitedSignaller(),
        on_event=got.event,
        incidents=options,
        on_incident=got.incident,
    ) as running:
        workers(fifo_path, 0, 0.2, "collective")
        assert got.done.wait(15)
        stats = running.stats()
    [reaped] = got.reaped
    assert (reaped.delivered, reaped.gone) == (False, True)
    assert stats.reap_failures == 0
    [incident] = got.incidents
    assert incident.delivered is None
    assert incident.summary[0].endswith(
        "; not signalled: the worker exited during the capture (SIGKILL was due)"
    )


def test_a_dry_run_s_incident_says_nothing_was_signalled(
    fifo_path: pathlib.Path, tmp_path: pathlib.Path, workers
) -> None:  # type: ignore[no-untyped-def]
    # It said "reaped with SIGKILL" while the worker lived on, unsignalled.
    got = Collector()
    options = IncidentOptions(directory=str(tmp_path / "i"), method="facts", timeout=2.0)
    with FileTimerServer(fifo_path, dry_run=True, incidents=options, on_incident=got.incident):
        stuck = workers(fifo_path, 0, 0.2, "collective")
        assert got.done.wait(15)
        assert stuck.poll() is None
    [incident] = got.incidents
    assert (incident.dry_run, incident.delivered) == (True, None)
    assert incident.summary[0].endswith("; not signalled (dry run): would have reaped with SIGKILL")
    [written] = (tmp_path / "i").glob("*.json")
    assert json.loads(written.read_text())["dry_run"] is True


def test_an_incident_that_cannot_be_handed_on_loses_no_event(
    fifo_path: pathlib.Path, tmp_path: pathlib.Path, workers, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    # Out of threads (systemd's TasksMax), the incident's writer could not start: that
    # raised in the middle of delivering the iteration's events, and the rest of them,
    # the sync callers' release and on_change with them, were lost.
    from ftimer_server.incidents import _diagnostics

    def no_thread(self: object, incident: str, delivered: Optional[bool]) -> None:
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(_diagnostics.Diagnostics, "signalled", no_thread)
    events: list[object] = []
    options = IncidentOptions(directory=str(tmp_path / "i"), method="facts", timeout=2.0)
    with FileTimerServer(fifo_path, dry_run=True, incidents=options, on_event=events.append) as s:
        stuck = workers(fifo_path, 0, 0.2, "collective")
        wait_until(lambda: any(isinstance(e, Reaped) for e in events))
        s.sync()
        assert stuck.poll() is None  # a dry run


def test_incidents_with_no_thread_to_be_had_fail_the_start_plainly(
    fifo_path: pathlib.Path, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Out of threads (systemd's TasksMax): the incidents' two threads start with the
    # server, which then fails to start, saying why, with no capture helper left behind.

    from ftimer_server.incidents import _diagnostics, _helper

    helpers: list[_helper.Helper] = []

    class Helper(_helper.Helper):
        def __init__(self) -> None:
            super().__init__()
            helpers.append(self)

    def refuse(thread: threading.Thread) -> None:
        if thread.name == "ftimer-incident-write":
            raise RuntimeError("can't start new thread")  # what start() raises then

    on_thread_start(monkeypatch, _diagnostics, refuse)
    monkeypatch.setattr(_diagnostics, "Helper", Helper)
    options = IncidentOptions(directory=str(tmp_path / "i"), method="facts")
    with pytest.raises(OSError, match="cannot start the incidents' threads: can't start new"):
        FileTimerServer(fifo_path, dry_run=True, incidents=options)
    [helper] = helpers
    assert helper._process.wait(10) is not None


def test_the_loop_starts_no_thread_for_an_incident(
    fifo_path: pathlib.Path, tmp_path: pathlib.Path, workers, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    # A thread's start waits for the new thread to run: on a host busy with sixteen
    # ranks' captures, the loop's two starts an incident made it notice the next
    # expiries 118-164 ms late. Its captures end and it is written by the threads
    # started with the server.
    from ftimer_server.incidents import _diagnostics

    started: list[str] = []

    on_thread_start(monkeypatch, _diagnostics, lambda thread: started.append(thread.name))
    got = Collector()
    options = IncidentOptions(directory=str(tmp_path / "i"), method="facts", timeout=2.0)
    with FileTimerServer(fifo_path, dry_run=True, incidents=options, on_incident=got.incident):
        assert sorted(started) == ["ftimer-incident-write", "ftimer-incidents"]
        workers(fifo_path, 0, 0.2, "collective")
        workers(fifo_path, 1, 0.2, "collective")
        assert got.done.wait(15)
        wait_until(lambda: len(got.incidents) == 2, what="both incidents written")
    assert sorted(started) == ["ftimer-incident-write", "ftimer-incidents"]
    assert len(list((tmp_path / "i").glob("*.json"))) == 2


CHILDREN = """
import subprocess, sys, time
from ftimer_client import FileTimerClient
child = subprocess.Popen(["sleep", "3600"])  # a DataLoader worker, say
print(child.pid, flush=True)
FileTimerClient(sys.argv[1]).arm("step", 0.3)
time.sleep(3600)
"""


@contextlib.contextmanager
def children_worker(fifo: pathlib.Path) -> Iterator[Tuple[subprocess.Popen[str], int, int]]:
    """Run ``CHILDREN`` (started under a running server: an arm made before the FIFO is
    there fails, and the worker with it); yield it, its child's pid and a pidfd of the
    child, and kill both after."""
    worker = subprocess.Popen(
        [sys.executable, "-c", CHILDREN, str(fifo)], stdout=subprocess.PIPE, text=True
    )
    child_fd = -1
    try:
        assert worker.stdout is not None
        child = int(worker.stdout.readline())
        child_fd = os.pidfd_open(child)
        yield worker, child, child_fd
    finally:
        if child_fd >= 0:
            with contextlib.suppress(ProcessLookupError):  # gone with its reaped parent
                signal.pidfd_send_signal(child_fd, signal.SIGKILL)
            os.close(child_fd)
        worker.kill()
        worker.wait()
        assert worker.stdout is not None
        worker.stdout.close()


def test_reap_tree_and_a_core_before_the_kill(
    fifo_path: pathlib.Path, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The core's free space is read in the helper: on the server's loop, an incident
    # directory on a hung file system would have held every reap.
    on_the_server: List[object] = []
    monkeypatch.setattr(os, "statvfs", on_the_server.append)
    got = Collector()
    directory = tmp_path / "i"
    options = {"directory": str(directory), "core": True, "reap_tree": True, "timeout": 10.0}
    with server(fifo_path, got, **options), children_worker(fifo_path) as (worker, _, child_fd):
        code, _ = wait_exit(worker)
        assert got.done.wait(30)
        # The worker's own child went with it, though nothing waits for it here: it was
        # signalled (not orphaned to linger), and is gone once reaped by init.
        assert select.select([child_fd], [], [], 10)[0]
    assert code == -9
    [incident] = got.incidents
    core = incident.captures[0].core
    assert core == str(directory / f"{incident.id}.core")
    assert os.path.getsize(core) > 0  # taken while it lived, before the kill
    assert on_the_server == []


@pytest.mark.parametrize("dry_run", [True, False], ids=["dry run", "recording signaller"])
def test_a_signaller_that_signals_nothing_reaps_no_descendant(
    fifo_path: pathlib.Path, tmp_path: pathlib.Path, dry_run: bool
) -> None:
    # With reap_tree on, a dry run's (or a test's) signaller reached the worker's real
    # children all the same: SIGSTOP, then the reap's SIGKILL.
    got = Collector()
    recording = RecordingSignaller()
    with (
        FileTimerServer(
            fifo_path,
            on_event=got.event,
            on_incident=got.incident,
            incidents=IncidentOptions(
                directory=str(tmp_path / "i"), method="facts", reap_tree=True, timeout=2.0
            ),
            **({"dry_run": True} if dry_run else {"signaller": recording}),  # type: ignore[arg-type]
        ),
        children_worker(fifo_path) as (worker, child, _),
    ):
        assert got.done.wait(15)
        assert worker.poll() is None
        with open(f"/proc/{child}/stat") as f:
            assert f.read().rsplit(")", 1)[1].split()[0] == "S"  # neither stopped nor dead
    [incident] = got.incidents
    assert incident.delivered is (None if dry_run else True)
    if not dry_run:
        assert recording.trees == [(worker.pid, signal.SIGKILL)]


def test_a_capture_helper_that_died_is_replaced(
    fifo_path: pathlib.Path, tmp_path: pathlib.Path, workers
) -> None:  # type: ignore[no-untyped-def]
    got = Collector()
    with server(fifo_path, got, directory=str(tmp_path / "i"), method="facts") as srv:
        helper = srv._diagnostics._helper._process  # type: ignore[union-attr]
        helper.kill()  # as the OOM killer would
        helper.wait()
        stuck = workers(fifo_path, 0, 0.3, "collective")
        code, _ = wait_exit(stuck)
        assert got.done.wait(15)
    assert code == -9
    [incident] = got.incidents
    assert incident.captures[0].facts is not None  # captured by a new helper


def test_the_capture_helper_is_never_a_timers_process(fifo_path: pathlib.Path) -> None:
    # A line naming the helper's pid had it signalled (SIGSTOP: every later capture
    # waited out its budget, and the loop ended up blocked writing it jobs).
    signaller = RecordingSignaller()
    rejected: List[Rejected] = []
    with FileTimerServer(
        fifo_path,
        signaller=signaller,
        on_event=lambda e: rejected.append(e) if isinstance(e, Rejected) else None,
        incidents=IncidentOptions(method="facts"),
    ) as srv:
        helper = srv._diagnostics._helper._process.pid  # type: ignore[union-attr]
        send(fifo_path, Expire(pid=helper, scope_id="x", signal=signal.SIGSTOP))
        send(fifo_path, Arm(pid=helper, scope_id="y", deadline=0.0, signal=9))
        srv.sync()
    assert [(e.pid, e.reason) for e in rejected] == [(helper, RejectReason.SERVER_PROCESS)] * 2
    assert signaller.sent == []


def test_closing_a_helper_that_does_not_die_is_bounded(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # A helper in a wait the kernel does not interrupt (a file system that never
    # answers) outlives even SIGKILL until that wait ends: the server's stop waited for
    # it without end.
    from ftimer_server.incidents import _helper

    monkeypatch.setattr(_helper, "_KILL_WAIT", 0.2)
    helper = Helper()
    process = helper._process
    os.kill(process.pid, signal.SIGSTOP)  # our own helper: it reads no more jobs
    wait = process.wait

    def never_dies(timeout: Optional[float] = None) -> int:
        raise subprocess.TimeoutExpired(process.args, timeout or 0.0)

    monkeypatch.setattr(process, "wait", never_dies)
    began = time.monotonic()
    helper.close(timeout=0.1)
    assert time.monotonic() - began < 5
    assert "has not died 0.2 s after SIGKILL" in caplog.text
    monkeypatch.setattr(process, "wait", wait)
    # (SIGTERM, sent before, may be dequeued first by the stopped helper)
    assert process.wait(10) in (-signal.SIGTERM, -signal.SIGKILL)


def test_a_helper_that_stops_reading_never_blocks_the_submitter() -> None:
    # The loop submits captures: with the helper stopped, its pipe filled up and the
    # loop blocked for good writing to it.
    helper = Helper()
    raw = "x" * 60_000  # a frame as large as a big incident's: the pipe fills fast
    big = Incident(
        id="i",
        host="h",
        created=0.0,
        pid=7,
        scope_id="s",
        signal=9,
        deadline=0.0,
        captures=[Capture(pid=7, raw=raw)],
    )
    try:
        os.kill(helper._process.pid, signal.SIGSTOP)  # our own helper
        submitted: List[concurrent.futures.Future[bytes]] = []

        def submit_all() -> None:
            for _ in range(MAX_UNSENT + 10):
                submitted.append(helper.submit(WriteJob(big, None, True)))

        submitter = threading.Thread(target=submit_all, daemon=True)
        submitter.start()
        submitter.join(10)
        assert not submitter.is_alive()  # every submit returned at once
        # Beyond MAX_UNSENT jobs it has not read (its pipe held one), more fail at once.
        refused = [f for f in submitted if f.done()]
        assert 0 < len(refused) <= 10
        assert all(isinstance(f.exception(), HelperGone) for f in refused)
        os.kill(helper._process.pid, signal.SIGCONT)
        assert all(f.result(30) for f in submitted if f not in refused)  # once it reads
    finally:
        os.kill(helper._process.pid, signal.SIGCONT)
        helper.close()


def test_a_server_stopped_before_it_started_stops_its_capture_helper(
    fifo_path: pathlib.Path,
) -> None:
    # The daemon builds a second server when a journal cannot be replayed, and stops the
    # first without starting it: its helper ran on for the daemon's whole life.
    srv = FileTimerServer(fifo_path, incidents=IncidentOptions(method="facts"))
    helper = srv._diagnostics._helper._process  # type: ignore[union-attr]
    srv.stop()
    assert helper.wait(10) == 0


def test_a_stopped_helper_takes_no_more_jobs() -> None:
    # A job submitted after close() started a new helper that nobody stopped.
    helper = Helper()
    first = helper._process
    helper.close()
    job = WriteJob(
        Incident(id="i", host="h", created=0.0, pid=7, scope_id="s", signal=9, deadline=0.0),
        None,
        True,
    )
    assert isinstance(helper.submit(job).exception(10), HelperGone)
    assert helper._process is first
    assert first.poll() is not None  # and it is not running again


def test_a_capture_is_shared_by_the_same_process_only() -> None:
    # Shared within SHARE_WINDOW by pid and user: a pid reused meanwhile, another
    # process, got the stacks of the one before it in its incident.
    from ftimer_server import Worker
    from ftimer_server.incidents._diagnostics import Diagnostics

    diagnostics = Diagnostics(IncidentOptions(method="facts", timeout=2.0))
    try:
        before, after = Worker(2**22 + 5, 100), Worker(2**22 + 5, 200)  # no such processes
        deadline = time.monotonic() + 5
        first = diagnostics._capture(before, None, None, deadline, user=0)
        again = diagnostics._capture(before, None, None, deadline, user=0)
        other = diagnostics._capture(after, None, None, deadline, user=0)
        assert again is first
        assert other is not first
        for future in (first, other):
            future.result(10)
    finally:
        diagnostics.close()


def test_captures_older_than_the_share_window_are_let_go_oldest_first() -> None:
    # Each capture looked at every capture kept, to let go of the stale ones: a reap
    # with thousands of peers took seconds on the loop. The newest is kept last now, so
    # only the stale ones at the front are looked at.
    import concurrent.futures

    from ftimer_server import Worker
    from ftimer_server.incidents._diagnostics import SHARE_WINDOW, Diagnostics

    diagnostics = Diagnostics(IncidentOptions(method="facts", timeout=2.0))
    try:
        kept: concurrent.futures.Future[bytes] = concurrent.futures.Future()
        kept.set_result(b"")  # ended: one still running is kept whatever its age
        now = time.monotonic()
        for pid, age in ((1, 10.0), (2, SHARE_WINDOW + 0.1), (3, SHARE_WINDOW / 2)):
            diagnostics._shared[(pid, 100, 0)] = (now - age, kept, False)
        worker = Worker(2**22 + 5, 100)  # no such process
        first = diagnostics._capture(worker, None, None, now + 5, user=0)
        assert [key[0] for key in diagnostics._shared] == [3, worker.pid]
        first.result(10)
        diagnostics._shared.clear()
        diagnostics._shared[(worker.pid, 100, 0)] = (now - 10.0, first, False)  # stale
        diagnostics._shared[(3, 100, 0)] = (time.monotonic(), kept, False)
        again = diagnostics._capture(worker, None, None, now + 5, user=0)
        assert again is not first
        assert [key[0] for key in diagnostics._shared] == [3, worker.pid]  # the newest, last
        again.result(10)
    finally:
        diagnostics.close()
