"""Behaviour of core/_reaper.py that no test pinned, found by mutation testing (each test
fails with the mutant that found it): fake processes, a fake clock, a recording signaller."""

from __future__ import annotations

import math
import signal

import pytest

from ftimer_protocol import Arm, DumpHook
from ftimer_server import WorkerGone
from ftimer_server.core._reaper import KILL_CHECK

from .test_capture_core import Rig as CaptureRig
from .test_watchdog import (
    SERVER,
    CountingInspector,
    Killing,
    Rig,
    Waiting,
    arm,
    unkillable_rig,
)


class WaitingWithPidfds(CountingInspector, Waiting):
    """Pretend pidfds (a worker stays bound until it exits), in a kernel wait."""


def test_an_unkillable_worker_seen_to_exit_is_said_gone_once_and_not_counted_alive() -> None:
    # mutant: Reaper.forget() kept the worker among the "outliving" after its pidfd said
    # it exited: the gauge (ftimer_unkillable_workers, the FtimerWorkerUnkillable alert)
    # stayed up until the next look, which said "exited at last" a second time.
    rig = unkillable_rig(WaitingWithPidfds())
    assert rig.wd.stats().unkillable_alive == 1
    [worker] = [w for w in rig.wd.workers() if w.pid == 1000]
    rig.host.exit(1000)
    rig.wd.worker_gone(worker)  # its pidfd became readable
    assert [(e.pid, e.unkillable) for e in rig.events.of(WorkerGone)] == [(1000, True)]  # type: ignore[attr-defined]
    assert rig.wd.stats().unkillable_alive == 0
    assert rig.wd.next_wakeup() is None
    rig.at(1.0 + 3 * KILL_CHECK)
    assert len(rig.events.of(WorkerGone)) == 1


def test_the_wakeup_is_the_earliest_of_an_escalation_and_a_kill_check() -> None:
    # mutant: next_deadline() took the latest of what the reaper waits for (max for
    # min): a worker's SIGKILL escalation waited for another's 30 s kill check.
    rig = Rig(signaller=Killing(), escalate_after=5.0)
    rig.host.spawn(1000, start_time=100, parent=SERVER)
    rig.host.spawn(1001, start_time=101, parent=SERVER)
    rig.apply(arm(pid=1000, deadline=1.0, signal=9), arm(pid=1001, deadline=2.0, signal=15))
    rig.at(1.0)
    rig.at(2.0)
    assert rig.signaller.sent == [(1000, signal.SIGKILL), (1001, signal.SIGTERM)]
    assert rig.wd.next_wakeup() == 7.0  # 1001's escalation, before 1000's kill check (31)
    rig.at(7.0)
    assert rig.signaller.sent[-1] == (1001, signal.SIGKILL)
    assert rig.wd.next_wakeup() == 1.0 + KILL_CHECK


def test_the_dump_hook_of_any_timer_cleared_by_the_reap_is_used_by_its_capture() -> None:
    # mutant: "decider.dump or <a cleared timer's>" -> "and": a worker whose deciding
    # timer carried no hook had no faulthandler dump in its incident though another of
    # its expired timers announced one.
    rig = CaptureRig()
    hook = DumpHook(signal=int(signal.SIGUSR2), fd=7)
    rig.wd.apply(
        [
            Arm(pid=1000, scope_id="inner", deadline=4.0, signal=9),
            Arm(pid=1000, scope_id="outer", deadline=5.0, signal=9, dump=hook),
        ],
        0.0,
        0.0,
    )
    rig.wd.tick(6.0)
    [request] = rig.host.requests
    assert request.timer.dump is None  # the deciding timer has none
    assert request.dump == hook


def test_a_grace_of_zero_escalates_in_the_same_tick_and_says_so() -> None:
    # mutants: "0 <= value" -> "0 < value" refused escalate_after=0 (SIGKILL straight
    # after the signal) with a ValueError; "(escalate_after or 0.0)" -> "or 1.0" said
    # such an escalation came 1 s after the signal.
    from ftimer_server import Escalated

    rig = Rig(signaller=Killing(), escalate_after=0.0)
    rig.host.spawn(1000, start_time=100, parent=SERVER)
    rig.apply(arm(deadline=1.0, signal=15))
    rig.at(1.0)
    assert rig.signaller.sent == [(1000, signal.SIGTERM), (1000, signal.SIGKILL)]
    [escalated] = rig.events.of(Escalated)
    assert escalated.after == 0.0  # type: ignore[attr-defined]


@pytest.mark.parametrize("value", [math.inf, math.nan, -0.5])
@pytest.mark.parametrize("name", ["escalate_after", "capture_budget"])
def test_a_grace_or_budget_that_is_not_a_finite_number_is_refused(name: str, value: float) -> None:
    # mutant: "value < math.inf" -> "value <= math.inf": escalate_after=inf was taken
    # (never escalating, silently), and capture_budget=inf let a hung capture hold the
    # signal back for ever.
    from ftimer_server import RecordingSignaller
    from ftimer_server.core._reaper import Reaper
    from ftimer_server.server._edge import SystemHost

    from .conftest import FakeInspector

    with pytest.raises(ValueError, match=name):
        Reaper(SystemHost(FakeInspector(), RecordingSignaller()), **{name: value})


def test_a_reap_signalled_at_its_budgets_end_is_no_longer_saved() -> None:
    # mutant: _Schedule.pop_due() counted no change: a capture whose budget ran out was
    # signalled (no escalation to follow) with no on_change, so the state file kept its
    # timer as a reap still due; a daemon killed then re-reaped the worker on restart.
    rig = CaptureRig(budget=2.0, escalate_after=None)
    rig.arm(1000, 5.0, signal=15)
    rig.wd.tick(5.0)
    assert [t.pid for t in rig.wd.saved()] == [1000]  # its capture is underway
    before = rig.wd.changes
    rig.wd.tick(7.0)  # the budget ends: signalled
    assert rig.signaller.sent == [(1000, 15)]
    assert rig.wd.saved() == []
    assert rig.wd.changes != before  # on_change: the state file must drop it
