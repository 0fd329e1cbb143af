"""``--reap-tree`` with a grace period: the escalation's SIGKILL reaches the worker's
descendants too, those its reap signalled that outlived the grace (a worker that died of
the reap's SIGTERM too: its children left its tree) and those it forked meanwhile; and
the events name every descendant signalled.

Real processes, all started here: the worker and children that ignore SIGTERM. A
descendant is signalled by its pid and start time, so nothing that took a pid of theirs
could be.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import pathlib
import select
import signal
import subprocess
import sys
import threading
from typing import Iterator, List, Optional, Tuple

import pytest

from ftimer_server import Escalated, Event, FileTimerServer, OsSignaller, Reaped, Worker
from ftimer_server.core._incident import Incident
from ftimer_server.incidents._diagnostics import IncidentOptions

# A worker with a child that ignores SIGTERM, which prints the child's pid and arms a
# short timer. "survives": it ignores SIGTERM too, and forks a second such child when it
# gets it (in its grace period). "dies": it dies of SIGTERM, leaving its child behind.
WORKER = """
import os, signal, sys, time
from ftimer_client import FileTimerClient

def child():
    pid = os.fork()
    if pid == 0:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        while True:
            time.sleep(60)
    return pid

def on_term(*_):
    print(child(), flush=True)

print(child(), flush=True)
if sys.argv[2] == "survives":
    signal.signal(signal.SIGTERM, on_term)
client = FileTimerClient(sys.argv[1])
client.arm("step", 0.3)
while True:
    time.sleep(60)
"""
GRACE = 0.5
PR_SET_CHILD_SUBREAPER = 36


@contextlib.contextmanager
def subreaper() -> Iterator[None]:
    """This process as a child subreaper: a child of the worker's, orphaned when it
    dies, stays this process's zombie until waited for, so its pid (read from the
    worker's output, then opened) names nobody else meanwhile, however slow the test
    (init would reap it as soon as the escalation killed it, half a second on)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        pytest.skip(f"cannot be a child subreaper: {os.strerror(ctypes.get_errno())}")
    try:
        yield
    finally:
        libc.prctl(PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)


def _reap(
    fifo: pathlib.Path, tmp: pathlib.Path, mode: str
) -> Tuple[List[Event], Incident, List[int]]:
    """Run a ``WORKER`` under a server that reaps trees with SIGTERM, then SIGKILL after
    ``GRACE``; return the server's events, the incident and the pids of the children,
    once every one of them and the worker have died (each waited for through a pidfd)."""
    events: List[Event] = []
    incidents: List[Incident] = []
    escalated = threading.Event()

    def on_event(event: Event) -> None:
        events.append(event)
        if isinstance(event, Escalated):
            escalated.set()

    pidfds: List[int] = []
    worker: Optional[subprocess.Popen[str]] = None
    children: List[int] = []
    try:
        with (
            subreaper(),
            FileTimerServer(
                fifo,
                on_event=on_event,
                on_incident=incidents.append,
                incidents=IncidentOptions(directory=str(tmp / "i"), method="facts", reap_tree=True),
                signal_override=signal.SIGTERM,
                escalate_after=GRACE,
            ),
        ):
            # Started under the running server: an arm made before its FIFO is there
            # fails, and the worker with it.
            worker = subprocess.Popen(
                [sys.executable, "-c", WORKER, str(fifo), mode],
                stdout=subprocess.PIPE,
                text=True,
                start_new_session=True,
            )
            assert worker.stdout is not None
            children.append(int(worker.stdout.readline()))
            if mode == "survives":  # forked on the reap's SIGTERM
                children.append(int(worker.stdout.readline()))
            pidfds = [os.pidfd_open(pid) for pid in children]
            assert worker.wait(30) in (-signal.SIGTERM, -signal.SIGKILL)
            assert escalated.wait(30)
            for fd in pidfds:  # every child has died
                assert select.select([fd], [], [], 10)[0]
        [incident] = incidents  # written when the reap's signal went
        return events, incident, children
    finally:
        for fd in pidfds:
            signal.pidfd_send_signal(fd, signal.SIGKILL)  # ours: a no-op once dead
            os.close(fd)
        for pid in children:  # orphaned to this process: its zombies until waited for
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
        if worker is not None:
            if worker.poll() is None:
                worker.kill()
                worker.wait()
            assert worker.stdout is not None
            worker.stdout.close()


@pytest.mark.skipif(not hasattr(os, "pidfd_open"), reason="needs pidfds (Linux 5.3, Python 3.9)")
def test_the_escalation_kills_the_tree_of_a_worker_that_survives(
    fifo_path: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    # The SIGKILL went to the worker alone: its child that ignored SIGTERM, and the one
    # it forked in its grace period, ran on.
    events, incident, (first, forked) = _reap(fifo_path, tmp_path, "survives")
    [reaped] = [e for e in events if isinstance(e, Reaped)]
    [escalation] = [e for e in events if isinstance(e, Escalated)]
    assert reaped.descendants == (first,)
    assert incident.descendants == [first]
    assert f"as was a descendant of it (pid {first})" in incident.summary[0]
    assert escalation.delivered
    assert sorted(escalation.descendants) == sorted((first, forked))


@pytest.mark.skipif(not hasattr(os, "pidfd_open"), reason="needs pidfds (Linux 5.3, Python 3.9)")
def test_the_escalation_kills_the_descendants_of_a_worker_that_died(
    fifo_path: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    # The worker died of SIGTERM; its child, which ignored it, left the tree (re-parented)
    # and ran on for good, though the reap had signalled it.
    events, _, (child,) = _reap(fifo_path, tmp_path, "dies")
    [reaped] = [e for e in events if isinstance(e, Reaped)]
    [escalation] = [e for e in events if isinstance(e, Escalated)]
    assert reaped.descendants == (child,)
    assert (escalation.pid, escalation.exited, escalation.delivered) == (reaped.pid, True, False)
    assert escalation.descendants == (child,)
    assert escalation.after == pytest.approx(GRACE, abs=0.2)


_STOP = 1 << (signal.SIGSTOP - 1)  # its bit in /proc/PID/status's masks


class _SaysWhetherStopped(OsSignaller):
    """Signals as ``OsSignaller``, and records, for each signal a worker is sent, whether
    that worker was stopped then (or its stop still pending)."""

    def __init__(self) -> None:
        super().__init__()
        self.stopped: List[Tuple[int, bool]] = []

    def send(self, worker: Worker, signal: int) -> bool:
        status = pathlib.Path(f"/proc/{worker.pid}/status").read_text()
        fields = dict(line.split(":\t", 1) for line in status.splitlines())
        stopping = bool(int(fields["ShdPnd"], 16) & _STOP)
        self.stopped.append((signal, fields["State"][0] in "Tt" or stopping))
        return super().send(worker, signal)


@pytest.mark.skipif(not hasattr(os, "pidfd_open"), reason="needs pidfds (Linux 5.3, Python 3.9)")
@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        ("dies", [(signal.SIGTERM, True)]),
        ("survives", [(signal.SIGTERM, True), (signal.SIGKILL, True)]),  # escalated
    ],
)
def test_the_worker_is_signalled_before_the_walk_lets_it_run_again(
    fifo_path: pathlib.Path, tmp_path: pathlib.Path, mode: str, expected: List[Tuple[int, bool]]
) -> None:
    # The walk continued the worker, then signalled it, at the reap and at the
    # escalation: in between it ran, and could act on its children's deaths (a shell's
    # `wait` returned, and it went on to its next command, or exited) before its signal.
    signaller = _SaysWhetherStopped()
    options = IncidentOptions(directory=str(tmp_path / "i"), method="facts", reap_tree=True)
    pids: List[int] = []
    with (
        subreaper(),
        FileTimerServer(
            fifo_path,
            incidents=options,
            signal_override=signal.SIGTERM,
            escalate_after=GRACE,
            signaller=signaller,
        ),
    ):
        worker = subprocess.Popen(
            [sys.executable, "-c", WORKER, str(fifo_path), mode],
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        assert worker.stdout is not None
        # Its children ignore SIGTERM; a survivor forks another on its own SIGTERM.
        # Orphaned to this process (a subreaper): its zombies until waited for, so the
        # pids read stay theirs however slow the test, and a signal to one is a no-op.
        pids = [int(worker.stdout.readline()) for _ in expected]
        children = [os.pidfd_open(pid) for pid in pids]
        try:
            assert worker.wait(30) == -expected[-1][0]
        finally:
            for child in children:
                signal.pidfd_send_signal(child, signal.SIGKILL)  # ours: a no-op once dead
                os.close(child)
            for pid in pids:
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, 0)
            if worker.poll() is None:
                worker.kill()
                worker.wait()
            worker.stdout.close()
    assert signaller.stopped == expected
