"""The process edge: every error of the operating system becomes a counted, reported
refusal, and never costs another message. Fake processes whose /proc reads fail the way
real ones do (EACCES on a ``hidepid`` /proc, EMFILE, a bug in a custom inspector), a
recording signaller: nothing real is signalled."""

from __future__ import annotations

import errno
import itertools
import logging
import time
from typing import Dict, List, Optional

import pytest

from ftimer_protocol import Arm, Disarm, Expire
from ftimer_server import (
    Policy,
    Reaped,
    RecordingSignaller,
    Rejected,
    RejectReason,
    Worker,
)
from ftimer_server.core._records import Descendant
from ftimer_server.core._table import Expiry
from ftimer_server.core._watchdog import Watchdog
from ftimer_server.server._edge import SystemHost

from .conftest import FakeInspector, Recorder

SERVER = 500


class TroubledInspector(FakeInspector):
    """Fake processes with pidfds (fake descriptor numbers), and pids whose reads fail."""

    def __init__(self) -> None:
        super().__init__()
        self.failures: Dict[int, BaseException] = {}  # pid -> what reading it raises
        self.open_failures: Dict[int, OSError] = {}  # pid -> what pidfd_open raises
        self.threads: Dict[int, int] = {}  # tid -> its process
        self.pidfds: Dict[int, int] = {}  # open descriptor -> pid
        self._fds = itertools.count(1000)

    def _check(self, pid: int) -> None:
        if pid in self.failures:
            raise self.failures[pid]

    def open(self, pid: int) -> Optional[int]:
        if pid in self.open_failures:
            raise self.open_failures[pid]
        if pid in self.threads:
            raise OSError(errno.ENOENT, "No such file or directory")
        self._get(pid)
        fd = next(self._fds)
        self.pidfds[fd] = pid
        return fd

    def close(self, worker: Worker) -> None:
        assert worker.pidfd is not None
        del self.pidfds[worker.pidfd]

    def alive(self, worker: Worker) -> bool:
        return worker.pid in self.processes

    def tgid(self, pid: int) -> int:
        self._check(pid)
        return self.threads.get(pid, pid)

    def start_time(self, pid: int) -> Optional[int]:
        self._check(pid)
        return super().start_time(pid)

    def uid(self, pid: int) -> int:
        self._check(pid)
        return super().uid(pid)


class Rig:
    def __init__(self, policy: Optional[Policy] = None, steps=()) -> None:  # type: ignore[no-untyped-def]
        self.inspector = TroubledInspector()
        self.signaller = RecordingSignaller()
        self.events = Recorder()
        self.watchdog = Watchdog(
            host=SystemHost(self.inspector, self.signaller, steps),
            policy=policy,
            server_pid=SERVER,
            emit=self.events,
        )

    def apply(self, *messages: object) -> None:
        self.watchdog.apply(messages, 0.0, 0.0)  # type: ignore[arg-type]

    def rejections(self) -> List[tuple[RejectReason, int, str]]:
        return [(e.reason, e.pid, e.detail) for e in self.events.of(Rejected)]  # type: ignore[attr-defined]


def arm(pid: int, scope: str = "s", deadline: float = 10.0) -> Arm:
    return Arm(pid=pid, scope_id=scope, deadline=deadline, signal=9)


@pytest.mark.parametrize(
    ("error", "detail"),
    [
        (PermissionError(errno.EACCES, "Permission denied"), "EACCES"),
        (OSError(errno.EIO, "Input/output error"), "EIO"),
        (RuntimeError("a bug in a custom inspector"), "RuntimeError"),
    ],
)
def test_an_unreadable_process_is_refused_and_costs_nothing_else(
    error: BaseException, detail: str, caplog: pytest.LogCaptureFixture
) -> None:
    rig = Rig()
    for pid in (1000, 1001, 1002):
        rig.inspector.spawn(pid)
    rig.inspector.failures[1001] = error
    rig.apply(arm(1000), arm(1002))
    with caplog.at_level(logging.ERROR, logger="ftimer_server"):
        # The unreadable worker's arm sits between messages of the others, disarms too.
        rig.apply(arm(1000, "t"), arm(1001), Disarm(pid=1000, scope_id="s"), arm(1002, "t"))
    [(reason, pid, why)] = rig.rejections()
    assert (reason, pid) == (RejectReason.UNVERIFIABLE, 1001)
    assert detail in why
    assert sorted((t.pid, t.scope_id) for t in rig.watchdog.armed()) == [
        (1000, "t"),
        (1002, "s"),
        (1002, "t"),
    ]
    assert rig.watchdog.stats().rejections == {"unverifiable": 1}
    assert set(rig.inspector.pidfds.values()) == {1000, 1002}  # 1001's pidfd was closed
    if not isinstance(error, OSError):  # a bug is logged with its traceback
        assert "inspecting process 1001 failed" in caplog.text


def test_an_inspector_whose_close_raises_costs_no_other_message(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A bug in a custom inspector's close() ended the batch: the disarm after the refused
    # arm was lost, and the healthy worker was reaped at its deadline.
    rig = Rig()
    rig.inspector.spawn(1000)
    rig.inspector.spawn(1001)
    rig.apply(arm(1000))
    closing = rig.inspector.close

    def close(worker: Worker) -> None:
        closing(worker)
        raise KeyError(worker.pid)

    rig.inspector.close = close  # type: ignore[method-assign]
    stale = Arm(pid=1001, scope_id="s", deadline=10.0, signal=9, start_time=1)  # refused
    with caplog.at_level(logging.ERROR, logger="ftimer_server"):
        rig.apply(stale, Disarm(pid=1000, scope_id="s"))
    assert rig.watchdog.armed() == []
    assert [(r, p) for r, p, _ in rig.rejections()] == [(RejectReason.IDENTITY_MISMATCH, 1001)]
    assert "closing the pidfd of process 1001 failed" in caplog.text


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (OSError(errno.EMFILE, "Too many open files"), RejectReason.UNVERIFIABLE),
        (ProcessLookupError(errno.ESRCH, "No such process"), RejectReason.NO_SUCH_PROCESS),
    ],
)
def test_a_pidfd_that_cannot_be_opened_is_a_refusal_never_a_fallback(
    error: OSError, reason: RejectReason
) -> None:
    rig = Rig()
    rig.inspector.spawn(1000)
    rig.inspector.open_failures[1000] = error
    rig.apply(Expire(pid=1000, scope_id="x", signal=9))
    rig.watchdog.tick(1.0)
    assert rig.signaller.sent == []
    assert [r[:2] for r in rig.rejections()] == [(reason, 1000)]
    assert rig.watchdog.workers() == []


def test_a_thread_id_is_not_a_process() -> None:
    rig = Rig()
    rig.inspector.spawn(1000)
    rig.inspector.threads[1001] = 1000  # a thread of process 1000
    rig.inspector.spawn(1001)  # /proc/1001 exists for a thread too
    rig.apply(Expire(pid=1001, scope_id="x", signal=9), arm(1001))
    rig.watchdog.tick(100.0)
    assert rig.signaller.sent == []
    assert rig.rejections() == [
        (RejectReason.NOT_A_PROCESS, 1001, "a thread of process 1000"),
        (RejectReason.NOT_A_PROCESS, 1001, "a thread of process 1000"),
    ]


def test_a_thread_id_is_refused_without_pidfds_too() -> None:
    # Where no pidfd can be had, the thread group id read from /proc decides.
    inspector = FakeInspector()
    inspector.spawn(1000)
    inspector.spawn(1001)
    inspector.tgid = lambda pid: 1000 if pid == 1001 else pid  # type: ignore[method-assign]
    signaller, events = RecordingSignaller(), Recorder()
    watchdog = Watchdog(host=SystemHost(inspector, signaller), server_pid=SERVER, emit=events)
    watchdog.apply([Expire(pid=1001, scope_id="x", signal=9)], 0.0, 0.0)
    watchdog.tick(1.0)
    assert signaller.sent == []
    assert [e.reason for e in events.of(Rejected)] == [RejectReason.NOT_A_PROCESS]  # type: ignore[attr-defined]


def test_a_reap_step_that_raises_costs_no_other_reap(caplog: pytest.LogCaptureFixture) -> None:
    def diagnose(worker: Worker, expiry: Expiry, now: float) -> None:
        if worker.pid == 1000:
            raise RuntimeError("diagnostics failed")

    rig = Rig(steps=[diagnose])
    for pid in (1000, 1001, 1002):
        rig.inspector.spawn(pid)
    rig.apply(arm(1000), arm(1001), arm(1002))
    with caplog.at_level(logging.ERROR, logger="ftimer_server"):
        rig.watchdog.tick(10.0)
    assert sorted(rig.signaller.sent) == [(1000, 9), (1001, 9), (1002, 9)]
    assert all(e.delivered for e in rig.events.of(Reaped))  # type: ignore[attr-defined]
    assert "diagnostics failed" in caplog.text


def test_a_signaller_that_raises_is_an_undelivered_reap() -> None:
    class Broken(RecordingSignaller):
        def send(self, worker: Worker, signal: int) -> bool:
            raise RuntimeError("a bug")

    inspector = TroubledInspector()
    inspector.spawn(1000)
    inspector.spawn(1001)
    events = Recorder()
    watchdog = Watchdog(host=SystemHost(inspector, Broken()), server_pid=SERVER, emit=events)
    watchdog.apply([arm(1000), arm(1001)], 0.0, 0.0)
    watchdog.tick(10.0)
    reaped = events.of(Reaped)
    assert [(e.pid, e.delivered, e.error) for e in reaped] == [  # type: ignore[attr-defined]
        (1000, False, "RuntimeError: a bug"),
        (1001, False, "RuntimeError: a bug"),
    ]


def test_empty_policy_sets_allow_nothing() -> None:
    rig = Rig(policy=Policy(allowed_signals=frozenset(), allowed_uids=frozenset()))
    rig.inspector.spawn(1000)
    rig.apply(arm(1000), Arm(pid=1000, scope_id="r", deadline=1.0, signal=0))
    assert [r[0] for r in rig.rejections()] == [
        RejectReason.SIGNAL_NOT_ALLOWED,
        RejectReason.UID_NOT_ALLOWED,  # report-only passes the signal check, not the uid
    ]
    rig = Rig(policy=Policy(allowed_signals=frozenset()))
    rig.inspector.spawn(1000)
    rig.apply(Arm(pid=1000, scope_id="r", deadline=1.0, signal=0))
    assert rig.rejections() == []  # report-only timers are always allowed


class SlowTreeSignaller(RecordingSignaller):
    """A signaller whose walk of a worker's tree takes ``seconds`` (thousands of
    descendants take about 0.3 ms each)."""

    def __init__(self, seconds: float) -> None:
        super().__init__()
        self.seconds = seconds

    def send_tree(self, worker: Worker, signal: int) -> List[Descendant]:
        time.sleep(self.seconds)  # the walk itself, not a wait for anything
        return []


def test_a_reap_says_how_long_the_tree_s_walk_took_before_the_worker_s_signal() -> None:
    host = FakeInspector()
    host.spawn(1000)
    edge = SystemHost(host, SlowTreeSignaller(0.05), tree=True)
    expiry = Expiry(1000, (), None, ())
    delivery = edge.reap(Worker(1000, 100, None), 15, expiry, 1.0)
    assert delivery.delivered
    assert 0.05 <= delivery.took < 1.0
    assert (
        SystemHost(host, SlowTreeSignaller(0.0)).reap(Worker(1000, 100, None), 15, expiry, 1.0).took
        == 0.0
    )  # no tree: nothing before the signal
