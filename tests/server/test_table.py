"""The sans-I/O timer table: examples, then a stateful comparison with a dict model."""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import hypothesis.strategies as st
import pytest
from hypothesis import settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from ftimer_server import RejectReason, Timer
from ftimer_server.core import _table
from ftimer_server.core._table import TimerTable


def timer(pid: int, scope: str, deadline: float, signal: int = 9) -> Timer:
    return Timer(pid, scope, deadline, signal)


def test_next_deadline_and_expiry_follow_deadlines() -> None:
    table = TimerTable()
    table.arm(timer(10, "late", 30.0))
    table.arm(timer(11, "early", 10.0))
    assert table.next_deadline() == 10.0
    assert table.expire(9.99) == []
    [expiry] = table.expire(10.0)  # a deadline equal to now has expired
    assert (expiry.pid, expiry.signal, expiry.decider) == (11, 9, timer(11, "early", 10.0))
    assert table.next_deadline() == 30.0
    assert len(table) == 1


def test_rearm_replaces_deadline_signal_and_labels() -> None:
    table = TimerTable()
    first = timer(10, "s", 5.0)
    assert table.arm(first) == (None, None)
    second = Timer(10, "s", 50.0, 15, labels={"rank": "3"})
    assert table.arm(second) == (first, None)
    assert table.expire(10.0) == []  # the old deadline no longer counts
    assert table.next_deadline() == 50.0
    assert list(table) == [second]


def test_earliest_expired_timer_with_a_signal_decides_and_clears_the_pid() -> None:
    # torch's rule: sorted by deadline, the first with signal > 0 decides.
    table = TimerTable()
    table.arm(timer(10, "report", 1.0, signal=0))
    table.arm(timer(10, "term", 2.0, signal=15))
    table.arm(timer(10, "kill", 3.0, signal=9))
    table.arm(timer(10, "later", 100.0, signal=9))
    [expiry] = table.expire(5.0)
    assert [t.scope_id for t in expiry.expired] == ["report", "term", "kill"]
    assert expiry.signal == 15
    assert expiry.decider is not None
    assert expiry.decider.scope_id == "term"
    assert {t.scope_id for t in expiry.cleared} == {"report", "term", "kill", "later"}
    assert len(table) == 0
    assert 10 not in table


def test_a_pid_is_kept_until_disarm_all_and_changes_are_counted() -> None:
    table = TimerTable()
    table.arm(timer(10, "step", 1.0))
    table.arm(timer(10, "step", 2.0))
    assert table.disarm(10, "step") is not None
    assert table.disarm(10, "step") is None  # nothing armed: no change
    assert (len(table), 10 in table, table.changes) == (0, False, 3)
    assert table._by_pid == {10: {}}  # kept for the worker's next arm
    assert table.disarm_all(10) == []
    assert (table._by_pid, table.changes) == ({}, 3)
    table.arm(timer(10, "a", 1.0))
    table.arm(timer(10, "b", 1.0))
    assert len(table.disarm_all(10)) == 2
    assert (table._by_pid, table.changes) == ({}, 6)


def test_report_only_expiry_removes_only_the_expired_timers() -> None:
    table = TimerTable()
    table.arm(timer(10, "report", 1.0, signal=0))
    table.arm(timer(10, "later", 100.0, signal=9))
    [expiry] = table.expire(5.0)
    assert expiry.decider is None
    assert expiry.signal == 0
    assert [t.scope_id for t in expiry.cleared] == ["report"]
    assert [t.scope_id for t in table] == ["later"]


def test_expiries_come_in_order_of_each_pids_earliest_deadline() -> None:
    table = TimerTable()
    table.arm(timer(12, "a", 3.0))
    table.arm(timer(10, "a", 1.0))
    table.arm(timer(11, "a", 2.0))
    table.arm(timer(10, "b", 4.0))
    assert [e.pid for e in table.expire(10.0)] == [10, 11, 12]


def test_disarm_unknown_is_a_no_op() -> None:
    table = TimerTable()
    assert table.disarm(10, "nothing") is None
    assert table.disarm_all(10) == []
    table.arm(timer(10, "s", 1.0))
    assert table.disarm(10, "other") is None
    assert len(table) == 1


def test_limits_refuse_new_keys_but_never_a_rearm() -> None:
    table = TimerTable(max_per_pid=2, max_total=3)
    assert table.arm(timer(10, "a", 1.0))[1] is None
    assert table.arm(timer(10, "b", 1.0))[1] is None
    assert table.arm(timer(10, "c", 1.0)) == (None, RejectReason.PID_TIMER_LIMIT)
    assert table.arm(timer(11, "a", 1.0))[1] is None
    assert table.arm(timer(12, "a", 1.0)) == (None, RejectReason.TIMER_LIMIT)
    assert table.arm(timer(11, "b", 1.0)) == (None, RejectReason.TIMER_LIMIT)
    assert table.arm(timer(10, "a", 9.0))[1] is None  # re-arm at the limit
    assert 12 not in table
    assert len(table) == 3


def test_ties_go_by_arming_order_also_after_the_heap_is_compacted() -> None:
    table = TimerTable()
    table.arm(timer(11, "b", 5.0))
    table.arm(timer(10, "a", 5.0))
    table.arm(timer(11, "b", 5.0))  # re-armed: now armed after pid 10's
    for i in range(3000):  # churn until stale entries get compacted away
        table.arm(timer(12, "churn", 100.0 + i))
    assert len(table._heap) < 3000
    assert [e.pid for e in table.expire(5.0)] == [10, 11]


def test_heap_stays_bounded_under_heartbeats() -> None:
    # A worker re-arming one scope a million times must not grow the heap without bound.
    table = TimerTable()
    for i in range(20_000):
        table.arm(timer(10, "s", float(i)))
    assert len(table._heap) <= 2 * len(table) + 1025
    assert table.next_deadline() == 19_999.0


def test_arming_the_same_record_twice_expires_it_once() -> None:
    table = TimerTable()
    t = timer(10, "s", 1.0)
    table.arm(t)
    table.arm(t)
    [expiry] = table.expire(2.0)
    assert expiry.expired == (t,)


Key = Tuple[int, str]
pids = st.integers(min_value=2, max_value=6)
scopes = st.sampled_from(["a", "b", "c", "d"])
deadlines = st.floats(min_value=0, max_value=100, allow_nan=False).map(lambda x: round(x, 1))
signals = st.sampled_from([0, 9, 15])


class TableMachine(RuleBasedStateMachine):
    """The table against a dict of key -> (deadline, signal) and torch's rules."""

    def __init__(self) -> None:
        super().__init__()
        self.table = TimerTable(max_per_pid=3, max_total=10)
        self.model: Dict[Key, Tuple[float, int]] = {}
        self.now = 0.0

    @rule(pid=pids, scope=scopes, deadline=deadlines, signal=signals)
    def arm(self, pid: int, scope: str, deadline: float, signal: int) -> None:
        deadline += self.now
        previous, reason = self.table.arm(Timer(pid, scope, deadline, signal))
        key = (pid, scope)
        if key in self.model:
            assert reason is None
            assert previous is not None
            assert (previous.deadline, previous.signal) == self.model[key]
        else:
            assert previous is None
            held = sum(1 for p, _ in self.model if p == pid)
            if held >= 3:
                assert reason is RejectReason.PID_TIMER_LIMIT
                return
            if len(self.model) >= 10:
                assert reason is RejectReason.TIMER_LIMIT
                return
            assert reason is None
        self.model[key] = (deadline, signal)

    @rule(pid=pids, scope=scopes)
    def disarm(self, pid: int, scope: str) -> None:
        removed = self.table.disarm(pid, scope)
        expected = self.model.pop((pid, scope), None)
        assert (removed is None) == (expected is None)

    @rule(pid=pids)
    def disarm_all(self, pid: int) -> None:
        removed = {(t.pid, t.scope_id) for t in self.table.disarm_all(pid)}
        expected = {k for k in self.model if k[0] == pid}
        assert removed == expected
        for k in expected:
            del self.model[k]

    @precondition(lambda self: self.model)
    @rule(step=st.floats(min_value=0, max_value=30, allow_nan=False))
    def advance(self, step: float) -> None:
        self.now += step
        expected: Dict[int, List[Tuple[float, str, int]]] = {}
        for (pid, scope), (deadline, signal) in self.model.items():
            if deadline <= self.now:
                expected.setdefault(pid, []).append((deadline, scope, signal))
        expiries = self.table.expire(self.now)
        assert {e.pid for e in expiries} == set(expected)
        for e in expiries:
            want = sorted(expected[e.pid])
            assert sorted((t.deadline, t.scope_id, t.signal) for t in e.expired) == want
            assert [t.deadline for t in e.expired] == sorted(t.deadline for t in e.expired)
            decider: Optional[Tuple[float, str, int]] = next(
                (x for x in sorted(want, key=lambda x: x[0]) if x[2] > 0), None
            )
            if decider is None:
                assert e.signal == 0
                for _, scope, _ in want:
                    del self.model[e.pid, scope]
            else:
                assert e.decider is not None
                assert e.decider.deadline == decider[0]
                cleared = {(t.pid, t.scope_id) for t in e.cleared}
                assert cleared == {k for k in self.model if k[0] == e.pid}
                for k in cleared:
                    del self.model[k]

    @invariant()
    def same_timers(self) -> None:
        assert {(t.pid, t.scope_id): (t.deadline, t.signal) for t in self.table} == self.model
        assert len(self.table) == len(self.model)

    @invariant()
    def next_deadline_is_the_minimum(self) -> None:
        expected = min((d for d, _ in self.model.values()), default=None)
        assert self.table.next_deadline() == expected


TableMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40)
test_table_against_model = TableMachine.TestCase


def test_limits_must_be_positive() -> None:
    from ftimer_server import Policy

    with pytest.raises(ValueError, match="must be a whole number >= 1"):
        Policy(max_timers=0)


@pytest.fixture
def sharing(monkeypatch: pytest.MonkeyPatch) -> None:
    """Labels shared however few timers are armed."""
    monkeypatch.setattr(_table, "SHARE_LABELS_AT", 0)


@pytest.mark.usefixtures("sharing")
def test_a_workers_equal_labels_are_held_once_and_never_the_callers() -> None:
    # A dict of labels a timer was two thirds of its memory (~890 bytes with torchrun's
    # three, ~300 shared); the bench's "bytes per timer with torchrun's three labels".
    table = TimerTable()
    given = [{"job": "j", "rank": "3"} for _ in range(3)]
    for i, labels in enumerate(given):
        table.arm(Timer(10, f"s{i}", 50.0, 9, labels=labels))
    table.arm(Timer(11, "s", 50.0, 9, labels={"job": "j", "rank": "3"}))
    table.arm(Timer(10, "other", 50.0, 9, labels={"job": "j", "rank": "4"}))
    table.settle()
    held = {(t.pid, t.scope_id): t.labels for t in table}
    assert held[10, "s0"] is held[10, "s1"] is held[10, "s2"]
    assert held[10, "s0"] == {"job": "j", "rank": "3"}
    assert held[10, "other"] == {"job": "j", "rank": "4"}
    # Another worker's are its own: a change to one worker's reaches no other.
    assert held[11, "s"] == held[10, "s0"]
    assert held[11, "s"] is not held[10, "s0"]
    given[0]["rank"] = "changed by the caller"
    assert held[10, "s0"] == {"job": "j", "rank": "3"}


@pytest.mark.usefixtures("sharing")
def test_labels_changed_by_a_reader_are_not_handed_to_later_timers() -> None:
    # armed() and events hand out the dict: one changed there was given to every timer
    # armed after it with the same labels.
    table = TimerTable()
    table.arm(Timer(10, "a", 50.0, 9, labels={"rank": "3"}))
    table.settle()
    [armed] = list(table)
    assert armed.labels is not None
    armed.labels["host"] = "changed by a reader"
    table.arm(Timer(10, "b", 50.0, 9, labels={"rank": "3"}))
    table.settle()
    assert {t.scope_id: t.labels for t in table}["b"] == {"rank": "3"}


@pytest.mark.usefixtures("sharing")
def test_a_workers_labels_are_forgotten_with_it() -> None:
    table = TimerTable()
    table.arm(Timer(10, "a", 50.0, 9, labels={"rank": "3"}))
    table.settle()
    [first] = list(table)
    table.disarm_all(10)
    table.arm(Timer(10, "a", 50.0, 9, labels={"rank": "3"}))
    table.settle()
    [again] = list(table)
    assert again.labels == first.labels
    assert again.labels is not first.labels


def test_labels_are_shared_only_once_many_timers_are_armed(monkeypatch: pytest.MonkeyPatch) -> None:
    # Below, their memory is small and a high rate of arms is spared the check.
    monkeypatch.setattr(_table, "SHARE_LABELS_AT", 3)
    table = TimerTable()
    for scope in ("a", "b"):
        table.arm(Timer(10, scope, 50.0, 9, labels={"rank": "3"}))
    table.settle()
    first = {t.scope_id: t.labels for t in table}
    assert first["a"] is not first["b"]
    table.arm(Timer(10, "c", 50.0, 9, labels={"rank": "3"}))
    table.arm(Timer(10, "d", 50.0, 9, labels={"rank": "3"}))
    table.settle()
    later = {t.scope_id: t.labels for t in table}
    assert later["c"] is later["d"]
