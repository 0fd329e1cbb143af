"""The reap with a capture, in the sans-I/O core: expiry -> capture (bounded by a budget)
-> signal -> escalation. A fake host records what it is asked to capture; a fake clock;
nothing real is signalled."""

from __future__ import annotations

from typing import List, Optional

import pytest

from ftimer_protocol import Arm, Expire
from ftimer_server import (
    Escalated,
    Expired,
    Policy,
    Reaped,
    RecordingSignaller,
    Rejected,
    Timer,
    WorkerGone,
)
from ftimer_server.core._host import CaptureRequest
from ftimer_server.core._watchdog import MAX_PEERS, PEER_SCAN_PER_PID, Watchdog
from ftimer_server.server._edge import SystemHost

from .conftest import FakeInspector, Recorder

SERVER = 500


class CapturingHost(SystemHost):
    """Records each capture asked for and names its incident."""

    def __init__(self, inspector: FakeInspector, signaller: RecordingSignaller) -> None:
        super().__init__(inspector, signaller)
        self.requests: List[CaptureRequest] = []

    def capture(self, request: CaptureRequest) -> Optional[str]:
        self.requests.append(request)
        return f"incident-{len(self.requests)}"


class Rig:
    def __init__(
        self,
        budget: Optional[float] = 2.0,
        escalate_after: Optional[float] = None,
        policy: Optional[Policy] = None,
    ):
        self.inspector = FakeInspector()
        self.signaller = RecordingSignaller()
        self.host = CapturingHost(self.inspector, self.signaller)
        self.events = Recorder()
        self.wd = Watchdog(
            host=self.host,
            server_pid=SERVER,
            policy=policy,
            emit=self.events,
            capture_budget=budget,
            escalate_after=escalate_after,
        )
        for pid in (1000, 1001, 1002, 1003):
            self.inspector.spawn(pid)

    def arm(self, pid: int, deadline: float, job: Optional[str] = "j1", signal: int = 9) -> None:
        labels = {"job": job, "rank": str(pid - 1000)} if job else None
        arm = Arm(pid=pid, scope_id="step", deadline=deadline, signal=signal, labels=labels)
        self.wd.apply([arm], 0.0, 0.0)


def test_the_signal_follows_the_capture() -> None:
    rig = Rig()
    rig.arm(1000, 5.0)
    rig.wd.tick(5.0)
    assert rig.signaller.sent == []  # capturing first
    [request] = rig.host.requests
    assert (request.worker.pid, request.signal, request.budget, request.now) == (1000, 9, 2.0, 5.0)
    [expired] = rig.events.of(Expired)
    assert expired.incident == "incident-1"  # type: ignore[attr-defined]
    assert rig.wd.next_wakeup() == 7.0  # the budget's end
    rig.wd.captured(1000, 5.4)
    assert rig.signaller.sent == [(1000, 9)]
    [reaped] = rig.events.of(Reaped)
    assert (reaped.incident, round(reaped.late, 6)) == ("incident-1", 0.4)  # type: ignore[attr-defined]
    rig.wd.tick(7.0)  # the budget's end does not signal twice
    assert rig.signaller.sent == [(1000, 9)]
    assert rig.wd.next_wakeup() is None


def test_a_capture_that_hangs_never_delays_the_signal_past_its_budget() -> None:
    rig = Rig(budget=2.0, escalate_after=1.0)
    rig.arm(1000, 5.0, signal=15)
    rig.wd.tick(5.0)
    rig.wd.tick(6.999)
    assert rig.signaller.sent == []
    rig.wd.tick(7.0)
    assert rig.signaller.sent == [(1000, 15)]
    rig.wd.captured(1000, 7.5)  # late: nothing more
    assert rig.signaller.sent == [(1000, 15)]
    assert rig.wd.next_wakeup() == 8.0  # escalation, from the signal on
    rig.wd.tick(8.0)
    assert rig.signaller.sent == [(1000, 15), (1000, 9)]


def test_a_worker_that_exits_during_the_capture_is_not_signalled() -> None:
    rig = Rig()
    rig.arm(1000, 5.0)
    rig.wd.tick(5.0)
    [worker] = rig.wd.workers()
    rig.inspector.exit(1000)
    rig.wd.worker_gone(worker)
    rig.wd.captured(1000, 5.5)
    rig.wd.tick(10.0)
    assert rig.signaller.sent == []
    [gone] = rig.events.of(WorkerGone)
    assert gone.incident == "incident-1"  # type: ignore[attr-defined]


def test_the_peers_are_the_other_workers_of_the_job() -> None:
    rig = Rig()
    rig.arm(1000, 5.0)
    rig.arm(1001, 50.0)
    rig.arm(1002, 50.0)
    rig.arm(1003, 50.0, job="another")
    rig.wd.tick(5.0)
    [request] = rig.host.requests
    assert request.job == "j1"
    assert sorted(p.worker.pid for p in request.peers) == [1001, 1002]
    assert rig.signaller.sent == []  # peers are captured, never signalled
    rig.wd.captured(1000, 5.1)
    assert rig.signaller.sent == [(1000, 9)]


def test_without_a_budget_nothing_is_captured() -> None:
    rig = Rig(budget=None)
    rig.arm(1000, 5.0)
    rig.wd.tick(5.0)
    assert rig.host.requests == []
    assert rig.signaller.sent == [(1000, 9)]
    [reaped] = rig.events.of(Reaped)
    assert reaped.incident is None  # type: ignore[attr-defined]


def test_report_only_timers_are_not_captured() -> None:
    rig = Rig()
    rig.arm(1000, 5.0, signal=0)
    rig.wd.tick(5.0)
    assert rig.host.requests == []
    assert len(rig.events.of(Expired)) == 1


def test_ranks_that_expire_together_are_each_others_peers() -> None:
    rig = Rig()
    for pid in (1000, 1001, 1002):
        rig.arm(pid, 5.0)
    rig.wd.tick(5.0)
    assert [sorted(p.worker.pid for p in r.peers) for r in rig.host.requests] == [
        [1001, 1002],
        [1000, 1002],
        [1000, 1001],
    ]


def test_ranks_that_expire_a_scan_apart_are_each_others_peers_while_captured() -> None:
    # Ranks hung in one collective expire within milliseconds, not always in one scan: a
    # rank whose capture was underway was no peer of the next, whose incident then
    # showed fewer and fewer of the job (8, 6, 6, 4, 3, 2 ranks of eight).
    rig = Rig(budget=2.0)
    rig.arm(1000, 5.0)
    rig.arm(1001, 5.001)
    rig.arm(1002, 5.002)
    rig.arm(1003, 50.0, job="another")
    rig.wd.tick(5.0)
    rig.wd.tick(5.001)
    rig.wd.captured(1000, 5.0015)  # signalled: no longer a peer
    rig.wd.tick(5.002)
    assert [sorted(p.worker.pid for p in r.peers) for r in rig.host.requests] == [
        [1001, 1002],
        [1000, 1002],
        [1001],
    ]
    assert [pid for pid, _ in rig.signaller.sent] == [1000]  # peers are never signalled


def test_a_peer_whose_timer_runs_is_told_from_one_that_expired() -> None:
    # The outlier of a job hung in a collective was shown first with no word that its
    # own timer still ran: the rank the others wait for, or one about to disarm.
    rig = Rig(budget=2.0)
    rig.arm(1000, 5.0)
    rig.arm(1001, 5.001)
    rig.arm(1002, 50.0)
    rig.wd.tick(5.0)
    rig.wd.tick(5.001)
    running = [{p.worker.pid: p.timer_running for p in r.peers} for r in rig.host.requests]
    assert running == [{1001: True, 1002: True}, {1000: False, 1002: True}]


def test_a_stop_signals_at_once_what_was_pending() -> None:
    # A server stopped during a capture, or during a grace period, left the stuck worker
    # running: the signal, or the SIGKILL that follows it, was in the stopped server's
    # memory only.
    rig = Rig(budget=2.0, escalate_after=10.0)
    rig.arm(1000, 5.0, signal=15)  # signalled at the budget's end: in its grace at the stop
    rig.arm(1001, 7.0, signal=15)  # still capturing at the stop
    rig.wd.tick(5.0)
    rig.wd.tick(7.0)
    assert rig.signaller.sent == [(1000, 15)]
    assert rig.wd.finish(7.5) == 2
    assert rig.signaller.sent == [(1000, 15), (1001, 15), (1000, 9), (1001, 9)]
    escalated = rig.events.of(Escalated)
    assert [(e.pid, e.after) for e in escalated] == [(1000, 0.5), (1001, 0.0)]  # type: ignore[attr-defined]
    [_, late] = rig.events.of(Reaped)
    assert late.incident == "incident-2"  # type: ignore[attr-defined]
    assert rig.wd.next_wakeup() is None
    assert rig.wd.finish(8.0) == 0  # nothing twice
    assert len(rig.signaller.sent) == 4


def test_a_reap_not_finished_is_saved_and_a_restarted_server_finishes_it() -> None:
    # A daemon killed (kill -9, out of memory) between an expiry and its signal, or its
    # SIGKILL after the grace period: the expiry had cleared the worker's timers, and
    # what was still due lived in memory only. The restarted daemon never reaped it.
    rig = Rig(budget=2.0, escalate_after=3.0)
    rig.arm(1000, 5.0, signal=15)
    rig.arm(1001, 5.0, signal=15, job="j2")
    changes = rig.wd.changes
    rig.wd.tick(5.0)  # both capturing
    assert rig.wd.changes != changes  # a cue to save
    rig.wd.captured(1001, 5.5)  # 1001: SIGTERM now, SIGKILL due at 8.5
    assert rig.signaller.sent == [(1001, 15)]
    saved = rig.wd.saved()
    assert rig.wd.armed() == []
    # The timers that decided the reaps, as armed: a restart reaps again.
    assert sorted((t.pid, t.signal, t.deadline) for t in saved) == [
        (1000, 15, 5.0),
        (1001, 15, 5.0),
    ]

    # The restarted server, whose policy allows the workers SIGTERM alone: its own
    # escalation is no worker's request, and is not refused.
    again = Rig(budget=None, escalate_after=3.0, policy=Policy(allowed_signals=frozenset({15})))
    again.wd.restore(saved)
    again.wd.tick(6.0)  # reaped again, at once
    assert again.signaller.sent == [(1000, 15), (1001, 15)]
    assert again.events.of(Rejected) == []
    again.wd.tick(9.0)  # the grace period's end: SIGKILL for those still alive
    assert again.signaller.sent == [(1000, 15), (1001, 15), (1000, 9), (1001, 9)]

    changes = rig.wd.changes
    rig.wd.tick(8.5)  # the first server's own: done, nothing left to save of 1001
    assert rig.signaller.sent == [(1001, 15), (1000, 15), (1001, 9)]
    assert rig.wd.changes != changes
    assert [(t.pid, t.signal) for t in rig.wd.saved()] == [(1000, 15)]  # its SIGKILL due


def test_another_expiry_during_the_capture_joins_the_reap_underway() -> None:
    # It started a second capture, whose budget replaced the first's: one expiry sooner
    # than every budget put the signal off for ever, and the first incident was never
    # signalled (so never written).
    rig = Rig(budget=5.0)
    expire = Expire(pid=1000, scope_id="a", signal=15)
    rig.wd.apply([expire], 0.0, 0.0)
    rig.wd.tick(0.0)
    rig.wd.apply([expire], 4.0, 4.0)
    rig.wd.tick(4.0)
    assert [r.now for r in rig.host.requests] == [0.0]  # one capture
    assert [e.incident for e in rig.events.of(Expired)] == ["incident-1"] * 2  # type: ignore[attr-defined]
    rig.wd.tick(5.0)  # the first budget's end
    assert rig.signaller.sent == [(1000, 15)]
    [reaped] = rig.events.of(Reaped)
    assert reaped.incident == "incident-1"  # type: ignore[attr-defined]


def test_a_worker_reaped_again_in_its_grace_is_not_captured_again() -> None:
    rig = Rig(budget=1.0, escalate_after=5.0)
    expire = Expire(pid=1000, scope_id="a", signal=15)
    rig.wd.apply([expire], 0.0, 0.0)
    rig.wd.tick(0.0)
    rig.wd.captured(1000, 0.5)
    rig.wd.apply([expire], 2.0, 2.0)
    rig.wd.tick(2.0)
    assert len(rig.host.requests) == 1
    assert rig.signaller.sent == [(1000, 15), (1000, 15)]  # signalled again, at once
    rig.wd.tick(5.5)  # the grace, from the first signal
    assert rig.signaller.sent[-1] == (1000, 9)


def test_an_incident_captures_at_most_max_peers_of_a_large_job() -> None:
    # Every worker of the job was a peer: 5,000 of one job on one host made each reap
    # capture them all, from the loop, and reaps came seconds late, then not at all.
    rig = Rig()
    workers = range(2000, 2000 + MAX_PEERS + 10)
    for pid in workers:
        rig.inspector.spawn(pid)
        rig.arm(pid, 50.0)
    rig.arm(1000, 5.0)
    rig.arm(1001, 5.0)  # expires with the stuck one: a peer first
    rig.wd.tick(5.0)
    request = rig.host.requests[0]
    assert len(request.peers) == MAX_PEERS
    assert request.peers[0].worker.pid == 1001
    assert {p.worker.pid for p in request.peers[1:]} <= set(workers)


def test_the_peers_are_found_from_a_few_timers_of_each_worker_not_every_timer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Each reap looked for the job's other ranks through every armed timer, on the
    # loop's thread: a writer of the FIFO that armed a full table, then sent a line per
    # reap with a job of its own, held the loop 78 ms a reap at 200,000 timers.
    rig = Rig()
    for pid in (1001, 1002, 1003):
        rig.wd.apply(
            [Arm(pid, f"s{i}", 50.0, 9, labels={"job": "j1"}) for i in range(500)], 0.0, 0.0
        )
    looked = [0]
    job_of = Watchdog._job_of

    def counting(self: Watchdog, timer: Timer) -> Optional[str]:
        looked[0] += 1
        return job_of(self, timer)

    monkeypatch.setattr(Watchdog, "_job_of", counting)
    rig.arm(1000, 5.0, job="alone")
    rig.wd.tick(5.0)
    [request] = rig.host.requests
    assert not request.peers
    assert looked[0] <= 2 + 3 * PEER_SCAN_PER_PID  # the stuck one's own, then each worker's
    rig.arm(1000, 10.0, job="j1")  # and the job's ranks are still found
    rig.wd.captured(1000, 5.1)
    rig.wd.tick(10.0)
    assert sorted(p.worker.pid for p in rig.host.requests[-1].peers) == [1001, 1002, 1003]


def test_a_rank_whose_first_timers_carry_no_job_label_is_still_a_peer() -> None:
    # Kills _watchdog.py `PEER_SCAN_PER_PID = 16` made 1: a rank whose first timer was
    # armed by a client without the job label (a library's own client) was no peer.
    rig = Rig()
    rig.wd.apply(
        [Arm(1001, "lib", 50.0, 9, labels={}), Arm(1001, "lib2", 50.0, 9, labels={"x": "y"}),
         Arm(1001, "step", 50.0, 9, labels={"job": "j1"})], 0.0, 0.0,
    )  # fmt: skip
    rig.arm(1000, 5.0)  # job j1
    rig.wd.tick(5.0)
    [request] = rig.host.requests
    assert request.job == "j1"
    assert [p.worker.pid for p in request.peers] == [1001]
