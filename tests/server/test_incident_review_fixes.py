"""Incidents, as a hostile review found them: a stuck worker's hook lost when py-spy is
refused, cores readable by the directory's readers, a lock anyone could hold stopping
every write and then every capture, a dry run that sent the hook's signal, and an
incident not written announced as stored.

Every process signalled here is one these tests started (``stuck_worker.py`` in a
session of its own, ``sleep`` children, the capture helper of a server started here).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import io
import logging
import os
import pathlib
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Callable, List

import msgspec
import pytest
from tests.conftest import wait_until

from ftimer_protocol import DumpHook, Expire
from ftimer_server import FileTimerServer, RecordingSignaller, Worker
from ftimer_server.core._host import CaptureRequest, Peer
from ftimer_server.core._incident import Capture, Incident
from ftimer_server.core._records import Timer
from ftimer_server.daemon._logging import LoggingSetup
from ftimer_server.incidents import _diagnostics, _helper
from ftimer_server.incidents._capture import PEER_HOOK, CaptureOptions, find_py_spy
from ftimer_server.incidents._diagnostics import Diagnostics, IncidentOptions, _as_stuck
from ftimer_server.incidents._options import NOT_WRITTEN
from ftimer_server.incidents._procfs import read_stat
from ftimer_server.incidents._store import LOCK, IncidentStore

from .conftest import on_thread_start, send
from .test_capture import stuck
from .test_incident_store import make, names

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs /proc")

_capture = msgspec.msgpack.Decoder(Capture)
#: A py-spy that ptrace refuses, in its own words (a server without CAP_SYS_PTRACE).
REFUSED = (
    "#!/bin/sh\n"
    'echo "Error: Failed to attach to process: Permission denied (os error 13)" >&2\n'
    "exit 1\n"
)


def executable(path: pathlib.Path, text: str) -> str:
    path.write_text(text)
    path.chmod(0o755)
    return str(path)


def as_worker(pid: int) -> Worker:
    return Worker(pid, read_stat(pid).start_time)


@contextlib.contextmanager
def diagnostics_of(options: IncidentOptions, *, dry_run: bool = False) -> Iterator[Diagnostics]:
    diagnostics = Diagnostics(options, dry_run=dry_run)
    try:
        yield diagnostics
    finally:
        diagnostics.close()


# A stuck worker captured first as another's peer -------------------------------------


def test_a_stuck_worker_captured_first_as_a_peer_still_gets_its_hook(
    tmp_path: pathlib.Path,
) -> None:
    # Three ranks of a collective expire together; rank 0's incident captures rank 1 as
    # its peer (never by its hook), py-spy refused. Rank 1's own incident then took that
    # capture as its own: no stacks, though rank 1 had announced a hook.
    refused = executable(tmp_path / "py-spy", REFUSED)
    options = IncidentOptions(py_spy=refused, timeout=5.0)
    with diagnostics_of(options) as diagnostics, stuck("sleep", hook=True) as rank1:
        me, uid = as_worker(rank1.pid), os.getuid()
        deadline = time.monotonic() + 10
        as_peer = diagnostics._capture(me, None, None, deadline, user=uid)
        assert _capture.decode(as_peer.result(10)).method == "facts"
        assert rank1.dump_text() == ""  # a peer is never sent its hook's signal
        own = diagnostics._capture(me, None, rank1.hook, deadline, user=uid, stuck="i1")
        capture = _capture.decode(own.result(10))
    assert capture.method == "hook", capture.error
    assert "stuck_in_sleep" in [f.function for t in capture.threads for f in t.frames]
    assert capture.error is not None
    assert "py-spy cannot attach" in capture.error


@pytest.mark.skipif(find_py_spy() is None, reason="py-spy is not installed")
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: py-spy attaches")
def test_a_peers_capture_with_stacks_serves_the_stuck_worker_without_its_hook() -> None:
    # Shared still, where it has the stacks: one py-spy per worker, no hook's signal.
    options = IncidentOptions(timeout=5.0)
    with diagnostics_of(options) as diagnostics, stuck("sleep", hook=True) as rank1:
        me, uid = as_worker(rank1.pid), os.getuid()
        deadline = time.monotonic() + 10
        as_peer = diagnostics._capture(me, None, None, deadline, user=uid)
        shared = as_peer.result(10)
        own = diagnostics._capture(me, None, rank1.hook, deadline, user=uid, stuck="i1")
        assert own.result(10) == shared
        assert _capture.decode(shared).method == "py-spy"
        assert rank1.dump_text() == ""


@pytest.mark.skipif(find_py_spy() is None, reason="py-spy is not installed")
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: py-spy attaches")
def test_a_peers_capture_from_before_the_deadline_is_not_the_stuck_workers() -> None:
    # A worker captured as another incident's peer, healthy, hung within the second: its
    # own incident took that capture, the stacks of a worker not yet stuck.
    options = IncidentOptions(timeout=5.0)
    with diagnostics_of(options) as diagnostics, stuck("sleep") as rank1:
        me, uid = as_worker(rank1.pid), os.getuid()
        deadline = time.monotonic() + 10
        as_peer = diagnostics._capture(me, None, None, deadline, user=uid)
        shared = as_peer.result(10)
        expired = time.monotonic()  # its timer's deadline: after the peer's capture began
        own = diagnostics._capture(me, None, None, deadline, user=uid, stuck="i1", since=expired)
        assert own is not as_peer
        assert _capture.decode(shared).role == "peer"
        assert _capture.decode(own.result(10)).role == "stuck"  # a capture of its own


@pytest.mark.skipif(find_py_spy() is None, reason="py-spy is not installed")
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: py-spy attaches")
def test_an_incident_takes_no_peers_capture_from_before_its_timers_deadline() -> None:
    # As the server asks for it: the stuck worker's timer's deadline is what decides.
    # A job of two: captures are shared between the workers of one user.
    options = IncidentOptions(timeout=5.0)
    with diagnostics_of(options) as diagnostics, stuck("sleep") as rank1, stuck("sleep") as rank2:
        me, uid = as_worker(rank1.pid), os.getuid()
        as_peer = diagnostics._capture(me, None, None, time.monotonic() + 10, user=uid)
        expired = Timer(me.pid, "step", time.monotonic(), 9, me.start_time)
        request = CaptureRequest(
            worker=me,
            timer=expired,
            signal=9,
            now=time.monotonic(),
            budget=5.0,
            peers=(Peer(as_worker(rank2.pid)),),
        )
        incident = diagnostics.start(request, lambda pid: None)
        pending = diagnostics._incidents[incident]
        own, _ = pending.futures
        assert own is not as_peer
        assert _capture.decode(own.result(10)).role == "stuck"
        # Whose it is, read as its capture began: the record says so, for pruning.
        wait_until(lambda: pending.captured is not None)
        assert pending.incident(dry_run=False).uid == uid
        diagnostics.signalled(incident, True)


def test_an_incident_of_a_worker_gone_during_its_capture_is_still_its_users() -> None:
    # No peers, so the worker's uid was not read as its capture began; its capture found
    # it gone: the record named no user, and it was pruned as one more user's.
    with diagnostics_of(IncidentOptions(method="facts", timeout=5.0)) as diagnostics:
        with stuck("sleep") as worker:
            me = as_worker(worker.pid)
            timer = Timer(me.pid, "step", time.monotonic(), 9, me.start_time)
            request = CaptureRequest(
                worker=me, timer=timer, signal=9, now=time.monotonic(), budget=5.0
            )
            incident = diagnostics.start(request, lambda pid: None)
        pending = diagnostics._incidents[incident]
        wait_until(lambda: pending.captured is not None)
        assert pending.incident(dry_run=False).uid == os.getuid()
        diagnostics.signalled(incident, None)


@pytest.mark.parametrize("to_a_directory", [False, True])
def test_an_incident_not_handed_to_a_directory_never_says_the_directory_fails(
    monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path, to_a_directory: bool
) -> None:
    # An embedded server with on_incident and no directory: a failure of the helper set
    # `incidents_failing`, which no later incident (never written to a directory) cleared.
    directory = str(tmp_path / "i") if to_a_directory else None
    with diagnostics_of(IncidentOptions(directory=directory, method="facts")) as diagnostics:
        failed: concurrent.futures.Future[bytes] = concurrent.futures.Future()
        failed.set_exception(RuntimeError("the helper is gone"))
        monkeypatch.setattr(diagnostics._helper, "submit", lambda job: failed)
        timer = Timer(7, "s", 0.0, 9)
        request = CaptureRequest(worker=Worker(7, None), timer=timer, signal=9, now=0.0, budget=1.0)
        pending = _diagnostics._Pending(request, "i1", 0.0, [failed], None, print)
        pending.captured = 0.0
        diagnostics._write_one(pending)
        assert diagnostics.write_errors == 1
        assert diagnostics.failing == ("the helper is gone" if to_a_directory else None)


def test_a_peers_capture_in_a_stuck_workers_incident_says_what_it_is() -> None:
    # It said "dump hook: not used on a peer (it is not reaped ...)" of the worker reaped.
    peer = Capture(pid=7, role="peer", method="py-spy", error=PEER_HOOK)
    shown = _as_stuck(peer)
    assert shown.error == (
        "captured as another incident's peer, after this worker's deadline: read without "
        "stopping it, no native frames; dump hook: not used (captured as another "
        "incident's peer, after this worker's deadline: its signal is not sent to a peer)"
    )


# A long budget ------------------------------------------------------------------------


def test_a_capture_with_a_long_budget_is_answered_before_its_deadline(
    tmp_path: pathlib.Path,
) -> None:
    # The helper (niced) waited for py-spy's output in one wait to the deadline, which the
    # kernel let end 0.5% of its length late: past 10 s, later than the capture keeps
    # back, and the incident had nothing, not even the facts ("no capture within the
    # budget"). Here py-spy never answers, as one stuck in the kernel would not.
    hangs = executable(tmp_path / "py-spy", "#!/bin/sh\nexec sleep 1000\n")
    budget = 11.0
    with contextlib.closing(_helper.Helper()) as helper, stuck("sleep") as worker:
        options = CaptureOptions(py_spy=hangs)
        deadline = time.monotonic() + budget
        job = _helper.CaptureJob(
            pid=worker.pid,
            start_time=None,
            role="stuck",
            labels=None,
            hook=None,
            options=options,
            deadline=deadline,
        )
        answer = helper.submit(job)
        concurrent.futures.wait([answer], timeout=deadline - time.monotonic())
        assert answer.done(), "no answer by the deadline"
        capture = _capture.decode(answer.result())
    assert capture.method == "facts"
    assert capture.facts is not None
    assert "py-spy did not finish" in (capture.error or "")


# Cores ---------------------------------------------------------------------------------

#: A gcore that writes a small core, and records the mode it was created with.
FAKE_GCORE = """#!/bin/sh
# gcore -o PREFIX PID: the core is PREFIX.PID
echo core > "$2.$3"
stat -c %a "$2.$3" > {record}
"""


@pytest.fixture
def fake_gcore(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> pathlib.Path:
    """A gcore first on PATH (for this process and the helpers it starts); the file it
    names receives the mode of each core as gcore created it."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    record = tmp_path / "created-mode"
    executable(bin_dir / "gcore", FAKE_GCORE.format(record=record))
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    return record


def test_a_core_kept_is_its_users_alone(
    tmp_path: pathlib.Path,
    fake_gcore: pathlib.Path,
    children: Callable[..., subprocess.Popen[bytes]],
) -> None:
    # It was left as the umask made it (0644): a worker's memory, readable by whoever
    # the directory lets in (0750: a group).
    directory = tmp_path / "incidents"
    directory.mkdir(0o750)
    worker = children()
    job = _helper.CaptureJob(
        pid=worker.pid,
        start_time=read_stat(worker.pid).start_time,
        role="stuck",
        labels=None,
        hook=None,
        options=CaptureOptions(py_spy=None, hook=False),
        deadline=time.monotonic() + 20,
        core=(str(directory), 1 << 30, "incident.core"),
    )
    umask = os.umask(0o022)
    try:
        capture = _capture.decode(_helper.run_capture(job))
    finally:
        os.umask(umask)
    assert fake_gcore.read_text().strip() == "644"  # as gcore made it here
    assert capture.core == str(directory / "incident.core"), capture.error
    assert stat.S_IMODE(os.stat(capture.core).st_mode) == 0o600


def test_a_core_is_private_while_gcore_writes_it(
    tmp_path: pathlib.Path,
    fake_gcore: pathlib.Path,
    children: Callable[..., subprocess.Popen[bytes]],
) -> None:
    # Before its rename too: a reader who opens it then keeps it.
    directory = tmp_path / "incidents"
    options = IncidentOptions(directory=str(directory), method="facts", core=True, timeout=10)
    umask = os.umask(0o022)  # the server's, which the helper inherits
    try:
        with diagnostics_of(options) as diagnostics:
            worker = as_worker(children().pid)
            capture = diagnostics._capture(
                worker, None, None, time.monotonic() + 10, user=None, stuck="i1"
            )
            core = _capture.decode(capture.result(10)).core
    finally:
        os.umask(umask)
    assert core == str(directory / "i1.core")
    assert fake_gcore.read_text().strip() == "600"


# The directory's lock ------------------------------------------------------------------

#: Holds an exclusive flock on argv[1] until its stdin closes: a directory opened
#: read-only, or a file it opens (made 0600 if missing, as a writer of the store would).
LOCKER = """
import fcntl, os, sys
path = sys.argv[1]
fd = os.open(path, os.O_RDONLY if os.path.isdir(path) else os.O_RDWR | os.O_CREAT, 0o600)
fcntl.flock(fd, fcntl.LOCK_EX)
print("locked", flush=True)
sys.stdin.read()
"""


@contextlib.contextmanager
def locked_by_another(path: pathlib.Path) -> Iterator[None]:
    """``path`` flocked by another process (as ``flock PATH sleep`` would) meanwhile."""
    holder = subprocess.Popen(
        [sys.executable, "-c", LOCKER, str(path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline() == "locked\n"
        yield
    finally:
        assert holder.stdin is not None
        assert holder.stdout is not None
        holder.stdin.close()  # it ends: the lock goes with it
        holder.wait(10)
        holder.stdout.close()


def test_a_lock_on_the_directory_holds_no_write(tmp_path: pathlib.Path) -> None:
    # Anyone who may read the directory (0750: its group) can flock it: every write
    # waited for it, without end.
    directory = tmp_path / "incidents"
    store = IncidentStore(str(directory))
    directory.chmod(0o750)
    written: List[str] = []
    with locked_by_another(directory):
        writer = threading.Thread(target=lambda: written.append(store.write(make())), daemon=True)
        writer.start()
        writer.join(10)
        assert written == [str(directory / f"{make().id}.json")]
    assert names(directory) == [f"{make().id}.json", f"{make().id}.txt"]  # its lock gone


def test_a_held_lock_gives_a_write_up_at_its_deadline(tmp_path: pathlib.Path) -> None:
    # Held by another writer of the server's user (a second server on the directory,
    # one on a hung file system): a write waits for it until its deadline, no longer.
    store = IncidentStore(str(tmp_path))
    store.write(make(0))
    with locked_by_another(tmp_path / LOCK):
        began = time.monotonic()
        with pytest.raises(TimeoutError, match=r"lock .*\.lock is held by another process"):
            store.write(make(1), deadline=began + 0.3)
        assert time.monotonic() - began < 5
    assert names(tmp_path) == [LOCK, f"{make(0).id}.json", f"{make(0).id}.txt"]  # none of it
    store.write(make(1))  # released (its file left behind, as by a writer killed): taken
    assert LOCK not in names(tmp_path)


def test_a_lock_file_that_is_a_symlink_is_not_followed(tmp_path: pathlib.Path) -> None:
    target = tmp_path / "elsewhere"
    target.write_text("precious")
    directory = tmp_path / "incidents"
    store = IncidentStore(str(directory))
    (directory / LOCK).symlink_to(target)
    with pytest.raises(OSError, match="Too many levels of symbolic links"):
        store.write(make())
    assert target.read_text() == "precious"
    assert [p.name for p in directory.iterdir()] == [LOCK]


def test_writes_waiting_for_the_lock_never_hold_a_capture(
    tmp_path: pathlib.Path, children: Callable[..., subprocess.Popen[bytes]]
) -> None:
    # Writes and captures shared the helper's threads: once THREADS writes waited for
    # the lock (or a slow disk), no capture ran at all.
    worker = children()
    helper = _helper.Helper()
    try:
        with locked_by_another(tmp_path / LOCK):
            writes = [
                helper.submit(
                    _helper.WriteJob(
                        make(n), (str(tmp_path), 100, 1 << 30), False, time.monotonic() + 60
                    )
                )
                for n in range(1, _helper.THREADS + 2)
            ]
            job = _helper.CaptureJob(
                pid=worker.pid,
                start_time=read_stat(worker.pid).start_time,
                role="stuck",
                labels=None,
                hook=None,
                options=CaptureOptions(py_spy=None, hook=False),
                deadline=time.monotonic() + 5,
            )
            capture = _capture.decode(helper.submit(job).result(5))
            assert capture.facts is not None
            assert not any(w.done() for w in writes)
        for write in writes:  # the lock released: every one written
            write.result(20)
    finally:
        helper.close()
    assert len([n for n in names(tmp_path) if n.endswith(".json")]) == _helper.THREADS + 1


def test_a_write_with_no_answer_is_given_up_and_said_not_written(
    fifo_path: pathlib.Path,
    tmp_path: pathlib.Path,
    children: Callable[..., subprocess.Popen[bytes]],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The incident's writer waited for the helper's answer without end (a hung file
    # system): a thread, and the incident, held per reap, and nothing said.
    monkeypatch.setattr(_diagnostics, "WRITE_TIMEOUT", 0.2)
    monkeypatch.setattr(_diagnostics, "_ANSWER_WAIT", 0.3)
    got: List[Incident] = []
    handed_on = threading.Event()

    def on_incident(incident: Incident) -> None:
        got.append(incident)
        handed_on.set()

    options = IncidentOptions(directory=str(tmp_path / "i"), method="facts", timeout=0.3)
    server = FileTimerServer(
        fifo_path, signaller=RecordingSignaller(), incidents=options, on_incident=on_incident
    )
    with server:
        helper = server._diagnostics._helper._process  # type: ignore[union-attr]
        os.kill(helper.pid, signal.SIGSTOP)  # it answers nothing, as if its disk hung
        try:
            worker = children()
            send(fifo_path, Expire(pid=worker.pid, scope_id="s", signal=9))
            assert handed_on.wait(10)
        finally:
            os.kill(helper.pid, signal.SIGCONT)
        assert server.incident_writes == (0, 1)
    [incident] = got
    [said] = [e for e in incident.errors if e.startswith(NOT_WRITTEN)]
    assert "no answer within 0.5 s: given up" in said
    assert f"cannot write incident {incident.id}: no answer" in caplog.text


def test_an_incident_not_written_says_so_to_on_incident(
    fifo_path: pathlib.Path,
    tmp_path: pathlib.Path,
    children: Callable[..., subprocess.Popen[bytes]],
) -> None:
    got: List[Incident] = []
    handed_on = threading.Event()

    def on_incident(incident: Incident) -> None:
        got.append(incident)
        handed_on.set()

    directory = tmp_path / "i"
    options = IncidentOptions(directory=str(directory), method="facts", timeout=2.0)
    with FileTimerServer(
        fifo_path, signaller=RecordingSignaller(), incidents=options, on_incident=on_incident
    ):
        directory.rmdir()  # a file in its place: nothing can be written there
        directory.write_text("")
        worker = children()
        send(fifo_path, Expire(pid=worker.pid, scope_id="s", signal=9))
        assert handed_on.wait(10)
    [incident] = got
    assert [e for e in incident.errors if e.startswith(NOT_WRITTEN)] != []


# Dry run -------------------------------------------------------------------------------


def test_a_dry_run_never_sends_the_hook_signal(caplog: pytest.LogCaptureFixture) -> None:
    # The worker a dry run leaves running had a C call cut short by the hook's signal.
    caplog.set_level(logging.WARNING)
    options = IncidentOptions(method="hook", timeout=5.0)
    with diagnostics_of(options, dry_run=True) as diagnostics, stuck("sleep", hook=True) as w:
        future = diagnostics._capture(
            as_worker(w.pid), None, w.hook, time.monotonic() + 10, user=None, stuck="i1"
        )
        capture = _capture.decode(future.result(10))
        assert w.dump_text() == ""  # faulthandler never ran: no signal came
    assert capture.method == "facts"
    assert capture.error is not None
    assert "dump hook: not used in a dry run" in capture.error


def test_a_lock_holder_never_stops_a_real_server_s_incidents(
    fifo_path: pathlib.Path,
    tmp_path: pathlib.Path,
    children: Callable[..., subprocess.Popen[bytes]],
) -> None:
    # End to end: the directory flocked by another process, reaps go on being captured
    # and written.
    directory = tmp_path / "i"
    got: List[Incident] = []
    options = IncidentOptions(directory=str(directory), method="facts", timeout=2.0)
    with (
        FileTimerServer(
            fifo_path, signaller=RecordingSignaller(), incidents=options, on_incident=got.append
        ) as server,
        locked_by_another(directory),
    ):
        for _ in range(3):
            send(fifo_path, Expire(pid=children().pid, scope_id="s", signal=9))
        wait_until(lambda: server.incident_writes == (3, 0), 15)
    assert len(got) == 3
    assert all(not any(e.startswith(NOT_WRITTEN) for e in i.errors) for i in got)


# The incidents' threads (started with the server, not by the loop) --------------------


def _request(pid: int, budget: float, peers: tuple = ()) -> CaptureRequest:  # type: ignore[type-arg]
    timer = Timer(pid, "s", time.monotonic(), 9)
    return CaptureRequest(
        worker=Worker(pid, None),
        timer=timer,
        signal=9,
        now=time.monotonic(),
        budget=budget,
        peers=tuple(Peer(Worker(p, None)) for p in peers),
    )


def test_incidents_behind_a_hung_directory_are_given_up_together(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # One writer writes them in turn: each write's time was counted from its turn, so
    # sixteen incidents behind a hung mount were given up 11 s apart, the last after
    # three minutes. It counts from the hand-over, the writes before it included.
    options = IncidentOptions(directory=str(tmp_path / "i"), method="facts", timeout=0.5)
    with diagnostics_of(options) as diagnostics:
        writes: List[_helper.WriteJob] = []
        real = diagnostics._helper.submit

        def submit(job: object) -> concurrent.futures.Future[bytes]:
            if isinstance(job, _helper.WriteJob):
                writes.append(job)
                return concurrent.futures.Future()  # a hung file system: no answer
            return real(job)  # type: ignore[arg-type]

        monkeypatch.setattr(diagnostics._helper, "submit", submit)
        monkeypatch.setattr(_diagnostics, "WRITE_TIMEOUT", 0.5)
        ids = [diagnostics.start(_request(2**22 + i, 0.2), lambda pid: None) for i in range(3)]
        for incident in ids:
            diagnostics.signalled(incident, True)
        wait_until(lambda: diagnostics.write_errors == 3, what="three writes given up")
    assert len(writes) == 3
    # Their deadlines come from their hand-overs, made together: not 1.5 s apart.
    assert max(w.deadline for w in writes) - min(w.deadline for w in writes) < 0.5  # type: ignore[operator]


def test_an_incident_is_written_though_telling_the_loop_failed() -> None:
    # Its worker exited during the capture (signalled first), then telling the loop the
    # capture ended raised: the write that follows was skipped, the incident lost.
    got: List[Incident] = []

    def done(pid: int) -> None:
        raise RuntimeError("the loop is gone")

    with diagnostics_of(IncidentOptions(method="facts", timeout=0.5)) as diagnostics:
        diagnostics._on_incident = got.append
        incident = diagnostics.start(_request(2**22, 0.2), done)
        diagnostics.signalled(incident, None)
        wait_until(lambda: got, what="the incident written")
    assert [i.id for i in got] == [incident]


def test_a_capture_still_running_is_shared_past_the_window(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A rank still being captured is a peer of the ranks expiring after it: where its
    # capture outlasted the window, each of them started another of it.
    with diagnostics_of(IncidentOptions(method="facts", timeout=5.0)) as diagnostics:
        jobs: List[_helper.CaptureJob] = []
        running: concurrent.futures.Future[bytes] = concurrent.futures.Future()

        def submit(job: _helper.CaptureJob) -> concurrent.futures.Future[bytes]:
            jobs.append(job)
            return running  # never ends: a slow capture

        monkeypatch.setattr(diagnostics._helper, "submit", submit)
        monkeypatch.setattr(_diagnostics, "SHARE_WINDOW", 0.0)  # every capture is old
        rank = Worker(2**22, None)
        deadline = time.monotonic() + 5
        first = diagnostics._capture(rank, None, None, deadline, user=0)
        assert diagnostics._capture(rank, None, None, deadline, user=0) is first
        assert len(jobs) == 1
        running.set_result(b"")  # done: a later request is captured anew
        diagnostics._capture(rank, None, None, deadline, user=0)
        assert len(jobs) == 2


def test_a_helper_without_threads_to_be_had_is_not_left_running(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Out of threads (TasksMax): its threads' start raised, its process lived on.

    started: List[subprocess.Popen[bytes]] = []
    popen = subprocess.Popen

    def remember(*args: object, **kwargs: object) -> subprocess.Popen[bytes]:
        process = popen(*args, **kwargs)  # type: ignore[call-overload]
        started.append(process)
        return process  # type: ignore[no-any-return]

    def refuse(thread: threading.Thread) -> None:
        raise RuntimeError("can't start new thread")

    on_thread_start(monkeypatch, _helper, refuse)
    monkeypatch.setattr(_helper.subprocess, "Popen", remember)
    with pytest.raises(OSError, match="capture helper's threads: can't start new thread"):
        _helper.Helper()
    [process] = started
    assert process.returncode is not None  # killed and waited for


def test_an_incident_says_which_peers_timers_were_running() -> None:
    def captured(pid: int) -> concurrent.futures.Future[bytes]:
        future: concurrent.futures.Future[bytes] = concurrent.futures.Future()
        future.set_result(msgspec.msgpack.encode(Capture(pid=pid, role="peer")))
        return future

    request = msgspec.structs.replace(
        _request(7, 1.0),
        peers=(Peer(Worker(8, None)), Peer(Worker(9, None), timer_running=True)),
    )
    pending = _diagnostics._Pending(
        request, "i1", 0.0, [captured(p) for p in (7, 8, 9)], None, print
    )
    pending.captured = 0.5
    record = pending.incident(dry_run=False)
    assert [(c.pid, c.role, c.timer_running) for c in record.captures] == [
        (7, "stuck", False),
        (8, "peer", False),
        (9, "peer", True),
    ]


@pytest.mark.parametrize("waits_for", ["hook", "core"])
def test_a_peer_never_waits_for_another_incidents_hook_or_core(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch, waits_for: str
) -> None:
    # Rank 0's own capture waits for its hook (or its core) on a hung file system; rank
    # 1, expiring meanwhile, took that capture as its peer's and waited with it: its kill
    # came up to its whole budget late (2 s in a review's run).
    options = IncidentOptions(
        directory=str(tmp_path / "i"), method="hook", timeout=5.0, core=waits_for == "core"
    )
    with diagnostics_of(options) as diagnostics:
        jobs: List[_helper.CaptureJob] = []
        running: List[concurrent.futures.Future[bytes]] = []

        def submit(job: _helper.CaptureJob) -> concurrent.futures.Future[bytes]:
            jobs.append(job)
            running.append(concurrent.futures.Future())  # never ends: a hung worker
            return running[-1]

        monkeypatch.setattr(diagnostics._helper, "submit", submit)
        rank0 = Worker(2**22, 100)
        deadline = time.monotonic() + 5
        hook = DumpHook(signal.SIGUSR2, 3) if waits_for == "hook" else None
        own = diagnostics._capture(rank0, None, hook, deadline, user=0, stuck="i0")
        as_peer = diagnostics._capture(rank0, None, None, deadline, user=0)
        assert as_peer is not own
        assert [(j.role, j.hook is not None, j.core is not None) for j in jobs] == [
            ("stuck", waits_for == "hook", waits_for == "core"),
            ("peer", False, False),
        ]
        # Peers of a peer capture still running share it: one capture of a rank.
        assert diagnostics._capture(rank0, None, None, deadline, user=0) is as_peer
        for future in running:
            future.set_result(b"")


# From a read of the incidents' code ----------------------------------------------------


def _small_incident() -> Incident:
    return Incident(id="i", host="h", created=0.0, pid=7, scope_id="s", signal=9, deadline=0.0)


def test_a_helper_whose_interpreter_prints_at_start_up_still_answers(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A sitecustomize (or a .pth file, a conda hook) that prints a line: the helper's
    # answers came on its stdout, so "site" was read as a frame of 1.9 GB, and every
    # capture and write after it waited out its budget, unsaid, for the daemon's life.
    (tmp_path / "sitecustomize.py").write_text("print('site hook says hello')\n")
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))
    )
    helper = _helper.Helper()
    try:
        answer = helper.submit(_helper.WriteJob(_small_incident(), None, True)).result(10)
        assert Incident is type(msgspec.msgpack.decode(answer, type=Incident))
    finally:
        helper.close()


def test_what_the_helper_logs_goes_into_the_servers_log(
    tmp_path: pathlib.Path, capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    # The helper set up no logging: its lines (retention's, a failed capture's
    # traceback, at a worker's every expiry) went raw onto the stderr it shares with the
    # daemon, past the daemon's format, log file, escaping and flood control.
    directory = tmp_path / "incidents"
    IncidentStore(str(directory)).write(make(1))
    orphan = directory / f"{make(2).id}.core"  # its helper killed before its record
    orphan.write_bytes(b"c")
    long_ago = time.time() - 2 * 3600
    os.utime(orphan, (long_ago, long_ago))
    helper = _helper.Helper()
    try:
        where = (str(directory), 200, 1 << 30)
        with caplog.at_level(logging.INFO, logger="ftimer_server"):
            helper.submit(_helper.WriteJob(make(3), where, False)).result(10)
    finally:
        helper.close()
    said = [r for r in caplog.records if r.name == "ftimer_server"]
    assert [(r.levelno, r.getMessage()) for r in said] == [
        (logging.WARNING, f"capture helper: removed {orphan}: a file of an incident with no record")
    ]
    assert capfd.readouterr().err == ""


def test_the_helpers_lines_keep_their_kinds_in_the_flood_control() -> None:
    # Every line forwarded was logged as "capture helper: %s", one kind: ten retention
    # warnings in a window held back a warning of another kind, never written.
    stream = io.StringIO()
    setup = LoggingSetup("text", "info", stream=stream)
    try:
        read_end, write_end = os.pipe()
        with os.fdopen(write_end, "wb") as out:
            forward = _helper._Forward(out, threading.Lock())
            store_log = logging.getLogger("ftimer_server.incidents")
            full = "the file system of %s is full: removed incident %s, to write %s"
            for args in [("/d", n, "new") for n in range(11)]:
                forward.handle(
                    store_log.makeRecord(store_log.name, logging.WARNING, "", 1, full, args, None)
                )
            other = ("/d/x.core", "Operation not permitted")
            forward.handle(
                store_log.makeRecord(
                    store_log.name, logging.WARNING, "", 1, "cannot remove %s: %s", other, None
                )
            )
            forward.handle(  # a summary of the held quotes the last one alone
                store_log.makeRecord(
                    store_log.name, logging.WARNING, "", 1, full, ("/d", 99, "new"), None
                )
            )
        helper = _helper.Helper.__new__(_helper.Helper)  # its reader of answers alone
        helper._lock = threading.Lock()
        helper._pending = {}
        with os.fdopen(read_end, "rb") as answers:
            helper._answer(answers)
    finally:
        setup.close()
    assert "capture helper: cannot remove /d/x.core: Operation not permitted" in stream.getvalue()


def test_a_helper_whose_answer_cannot_be_read_is_stopped_and_replaced(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # The thread reading the answers died with the exception: the jobs it had were never
    # ended, and the helper, alive, was never replaced.
    class Unreadable:
        def decode(self, data: bytes) -> object:
            raise msgspec.DecodeError("not an answer")

    helper = _helper.Helper()
    first = helper._process
    try:
        monkeypatch.setattr(_helper, "_answers", Unreadable())
        lost = helper.submit(_helper.WriteJob(_small_incident(), None, True))
        assert isinstance(lost.exception(10), _helper.HelperGone)
        assert first.wait(10) == 128 + signal.SIGTERM  # ours: stopped, to be started anew
        assert "cannot read the capture helper's answers" in caplog.text
        monkeypatch.undo()
        assert helper.submit(_helper.WriteJob(_small_incident(), None, True)).result(10)
        assert helper._process is not first
    finally:
        helper.close()


def test_close_tells_every_incident_before_it_returns() -> None:
    # Behind a slow on_incident, close() gave up at its budget and returned: the
    # incidents queued were told to on_incident after the server had stopped (in the
    # daemon, beside its shutdown). They fail with the helper stopped, and are told first.
    got: List[Incident] = []
    closed = threading.Event()
    after_close: List[str] = []

    def slow(incident: Incident) -> None:
        if closed.is_set():
            after_close.append(incident.id)
        got.append(incident)
        if len(got) == 1:
            time.sleep(1.5)  # a sink that is slow, past the captures' budget and a second

    diagnostics = Diagnostics(IncidentOptions(method="facts", timeout=0.2), slow)
    ids = [diagnostics.start(_request(2**22 + i, 0.2), lambda pid: None) for i in range(3)]
    for incident in ids:
        diagnostics.signalled(incident, True)
    diagnostics.close()
    closed.set()
    assert sorted(i.id for i in got) == sorted(ids)
    assert after_close == []


def test_close_with_a_write_that_never_answers_is_bounded_by_the_budget(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Waiting for each write until its own WRITE_TIMEOUT made a server's stop take 12 s
    # behind a hung incident directory (5 s before), past stop_timeout and into
    # systemd's TimeoutStopSec.
    diagnostics = Diagnostics(IncidentOptions(method="facts", timeout=0.2))
    real = diagnostics._helper.submit

    def submit(job: object) -> concurrent.futures.Future[bytes]:
        if isinstance(job, _helper.WriteJob):
            return concurrent.futures.Future()  # a hung file system: no answer
        return real(job)  # type: ignore[arg-type]

    monkeypatch.setattr(diagnostics._helper, "submit", submit)
    incident = diagnostics.start(_request(2**22, 0.2), lambda pid: None)
    diagnostics.signalled(incident, True)
    began = time.monotonic()
    diagnostics.close()
    took = time.monotonic() - began
    # The budget and _CLOSE_WAIT for the writes, then at most _CLOSE_WAIT for the
    # helper's stop and as long for the writer: 3.2 s here (about 2.3 s taken), and
    # 0.5 s for the calls between. (Under WRITE_TIMEOUT alone, 6.5 s more passed too.)
    bound = 0.2 + 3 * _diagnostics._CLOSE_WAIT + 0.5
    assert took < bound, f"close() took {took:.2f} s, over its bound of {bound:.2f} s"


def test_a_capture_that_ends_while_its_record_is_made_is_late_or_in_not_both() -> None:
    # The record asked each capture twice whether it was done: one that ended between
    # the two was listed as "no capture within the budget" in an incident not timed out.
    class EndsWhenAsked(concurrent.futures.Future):  # type: ignore[type-arg]
        def done(self) -> bool:
            was = super().done()
            if not was:
                self.set_result(msgspec.msgpack.encode(Capture(pid=7)))
            return was

    pending = _diagnostics._Pending(_request(7, 1.0), "i1", 0.0, [EndsWhenAsked()], None, print)
    pending.captured = 1.0
    record = pending.incident(dry_run=False)
    assert record.timed_out
    assert record.errors == ["pid 7: no capture within the budget"]
