"""The watchdog's inlined hot path gives exactly what its general path gives.

The server's reader decodes arm lines straight into ``Timer`` records, which take the
inlined path; the protocol's ``Arm`` messages always take the general one. So the same
random traffic is applied to two watchdogs, once with arms as ``Arm`` and once as
``Timer``, and everything observable must match: events, counters, timers, workers.
"""

from __future__ import annotations

from typing import List, Optional, Union

import hypothesis.strategies as st
import msgspec
from hypothesis import event, given, settings

from ftimer_protocol import Arm, Disarm, DisarmAll, Expire
from ftimer_server import Disarmed, Policy, RecordingSignaller, Timer, Worker
from ftimer_server.core._watchdog import Watchdog
from ftimer_server.server._edge import SystemHost

from .conftest import FakeInspector, Recorder

SERVER = 500
PIDS = (1010, 1011, 1012)  # 1013 never exists


class PidfdInspector(FakeInspector):
    """Fake processes with fake pidfds (never real descriptors: nothing is closed), so
    that disarms can take the hot path too."""

    def open(self, pid: int) -> Optional[int]:
        self._get(pid)
        return 100_000 + pid

    def close(self, worker: Worker) -> None:
        pass

    def alive(self, worker: Worker) -> bool:
        return super().alive(msgspec.structs.replace(worker, pidfd=None))


def start_of(pid: int) -> int:
    return 1000 + pid


start_times = st.sampled_from(["right", "none", "wrong"])
pids = st.sampled_from((*PIDS, 1013))
scopes = st.sampled_from("abc")


def _start(pid: int, which: str) -> Optional[int]:
    return {"right": start_of(pid), "none": None, "wrong": start_of(pid) + 1}[which]


arms = st.builds(
    lambda pid, scope, after, sig, which: Arm(pid, scope, after, sig, _start(pid, which)),
    pids,
    scopes,
    st.sampled_from([0.5, 1.0, 2.0, 100.0]),  # the deadline, relative until applied
    st.sampled_from([0, 9, 15, 3]),  # 3 is not allowed
    start_times,
)
disarms = st.builds(
    lambda pid, scope, which: Disarm(pid, scope, _start(pid, which)), pids, scopes, start_times
)
others = st.builds(lambda pid: DisarmAll(pid, start_of(pid)), pids) | st.builds(
    lambda pid, scope: Expire(pid, scope, 9, start_of(pid)), pids, scopes
)
Message = Union[Arm, Disarm, DisarmAll, Expire]
batches = st.lists(
    st.tuples(st.lists(arms | arms | disarms | disarms | others, max_size=12), st.booleans()),
    max_size=8,
)


def rig(policy: Policy) -> tuple[Watchdog, Recorder]:
    host = PidfdInspector()
    host.spawn(SERVER, start_time=5)
    for pid in PIDS:
        host.spawn(pid, start_time=start_of(pid), parent=SERVER)
    events = Recorder()
    watchdog = Watchdog(
        host=SystemHost(host, RecordingSignaller()),
        policy=policy,
        server_pid=SERVER,
        emit=events,
    )
    return watchdog, events


def key(t: Timer) -> tuple[int, str]:
    return t.pid, t.scope_id


def as_arm(m: Message, now: float) -> Message:
    """The message as sent at ``now`` (its deadline was generated relative)."""
    return msgspec.structs.replace(m, deadline=now + m.deadline) if isinstance(m, Arm) else m


def as_timer(m: Message, now: float) -> Message:
    """The same, as the server's reader decodes it."""
    m = as_arm(m, now)
    return Timer(*msgspec.structs.astuple(m)) if isinstance(m, Arm) else m


@settings(max_examples=300, deadline=None)
@given(
    batches,
    st.sampled_from([1, 2, 10_000]),
    st.sampled_from([3, 5, 1_000_000]),
    st.booleans(),
)
def test_records_and_messages_are_applied_alike(
    traffic: List[tuple[List[Message], bool]], per_pid: int, total: int, timer_events: bool
) -> None:
    policy = Policy(
        allowed_signals=frozenset({9, 15}), max_timers_per_pid=per_pid, max_timers=total
    )
    general, general_events = rig(policy)
    hot, hot_events = rig(policy)
    general.timer_events = hot.timer_events = timer_events
    now = 0.0
    for batch, tick in traffic:
        general.apply([as_arm(m, now) for m in batch], now, now)
        hot.apply([as_timer(m, now) for m in batch], now, now)
        if tick:
            now += 1.0
            general.tick(now)
            hot.tick(now)
        assert hot_events.events == general_events.events
        assert hot.stats() == general.stats()
        assert sorted(hot.armed(), key=key) == sorted(general.armed(), key=key)
        assert hot.workers() == general.workers()
        assert hot.next_wakeup() == general.next_wakeup()
        assert len(hot.table) == len(general.table) == len(hot.armed())
    requests = hot.stats().requests
    event(f"arms ok: {bool(requests.get('arm', {}).get('ok'))}")
    event(f"disarms ok: {bool(requests.get('disarm', {}).get('ok'))}")


def test_the_hot_path_is_taken() -> None:
    # Bound worker, same process, allowed signal: no general path needed.
    watchdog, _ = rig(Policy())
    pid = PIDS[0]
    watchdog.apply([Arm(pid, "first", 5.0, 9, start_of(pid))], 0.0, 0.0)  # binds
    calls = []
    watchdog._apply_one = lambda *args: calls.append(args)  # type: ignore[method-assign]
    # As decoded: int objects of its own, not the worker's.
    record = Timer(int(str(pid)), "s", 5.0, 9, int(str(start_of(pid))))
    watchdog.apply([record, Disarm(pid, "s", start_of(pid)), record], 0.0, 0.0)
    assert calls == []
    assert sorted(t.scope_id for t in watchdog.armed()) == ["first", "s"]
    assert watchdog.stats().requests == {"arm": {"ok": 3}, "disarm": {"ok": 1}}
    # The record kept shares the worker's pid and start time objects (memory).
    [worker] = watchdog.workers()
    kept = next(t for t in watchdog.armed() if t.scope_id == "s")
    assert kept == record
    assert kept.pid is worker.pid
    assert kept.start_time is worker.start_time


# Pinned by mutation testing: the differential test above cannot see these, since a
# Disarm takes the same branch in both its watchdogs.

PID = PIDS[0]


def _armed_with_a_pidfd():  # type: ignore[no-untyped-def]
    watchdog, events = rig(Policy())
    watchdog.apply([Arm(PID, "s", 5.0, 9, start_of(PID))], 0.0, 0.0)  # bound, with a pidfd
    return watchdog, events


def test_a_disarm_naming_another_start_time_leaves_the_timer_armed() -> None:
    # A disarm written by the process that held the pid before (another start time)
    # must not disarm the worker bound now: it would go unwatched, stuck or not.
    watchdog, _ = _armed_with_a_pidfd()
    watchdog.apply([Disarm(PID, "s", start_of(PID) + 1)], 0.0, 0.0)
    assert [t.scope_id for t in watchdog.armed()] == ["s"]


def test_a_disarm_of_an_unbound_pid_disarms_nothing_of_another() -> None:
    watchdog, _ = _armed_with_a_pidfd()
    watchdog.apply([Disarm(PIDS[1], "s", start_of(PIDS[1]))], 0.0, 0.0)
    assert [(t.pid, t.scope_id) for t in watchdog.armed()] == [(PID, "s")]


def test_a_hot_disarm_is_reported_and_an_unknown_one_counted() -> None:
    # Listeners (the daemon's log, metrics) saw no Disarmed, and stats no unknown disarm.
    watchdog, events = _armed_with_a_pidfd()
    watchdog.apply([Disarm(PID, "s", start_of(PID)), Disarm(PID, "x", start_of(PID))], 0.0, 0.0)
    assert [e.timer.scope_id for e in events.of(Disarmed)] == ["s"]
    assert watchdog.stats().requests["disarm"] == {"ok": 1, "unknown": 1}


def test_hot_arms_and_disarms_count_as_changes() -> None:
    # The state file is saved when the table's change count moves: arms, re-arms and
    # disarms on the hot path each count, or a daemon restarted after them restores
    # timers as they were before.
    watchdog, _ = _armed_with_a_pidfd()
    table = watchdog.table
    before = table.changes
    record = Timer(PID, "t", 5.0, 9, start_of(PID))
    watchdog.apply([record, record, Disarm(PID, "t", start_of(PID))], 0.0, 0.0)
    assert table.changes - before == 3  # an arm, a re-arm, a disarm
