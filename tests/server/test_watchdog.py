"""The sans-I/O core: messages in, timers, reaps and events out. Fake processes, fake clock,
a recording signaller: nothing real is signalled, nothing sleeps."""

from __future__ import annotations

import itertools
import signal
import threading
from typing import List, Optional, Sequence, Tuple

import hypothesis.strategies as st
import msgspec
import pytest
from hypothesis import given, settings

from ftimer_protocol import (
    Arm,
    Disarm,
    DisarmAll,
    Expire,
    LineTooLong,
    MalformedMessage,
    Sync,
    TimerRequestV1,
    UnsupportedVersion,
)
from ftimer_server import (
    Armed,
    DecodeFailed,
    Disarmed,
    Escalated,
    Expired,
    Policy,
    Reaped,
    RecordingSignaller,
    Rejected,
    RejectReason,
    ResendsOver,
    SystemInspector,
    Timer,
    Unkillable,
    Worker,
    WorkerGone,
)
from ftimer_server.core._horizon import BLOCKED_WRITE, SETTLE
from ftimer_server.core._host import Delivery
from ftimer_server.core._policy import clocks_apart
from ftimer_server.core._reader import LineReader
from ftimer_server.core._reaper import KILL_CHECK
from ftimer_server.core._records import Descendant
from ftimer_server.core._table import Expiry
from ftimer_server.core._watchdog import REFUSAL_TTL, RESYNC_QUIET, RESYNC_WAIT, Watchdog
from ftimer_server.daemon._state import decode_state, encode_state
from ftimer_server.server._edge import SystemHost

from .conftest import FakeInspector, Recorder

SERVER = 500
PARENT = 400
WALL = 1_700_000_000.0  # the wall clock at monotonic time 0 in these tests


class Rig:
    def __init__(
        self,
        policy: Optional[Policy] = None,
        escalate_after: Optional[float] = None,
        signal_override: Optional[int] = None,
        signaller: Optional[RecordingSignaller] = None,
        inspector: Optional[FakeInspector] = None,
    ):
        self.host = FakeInspector() if inspector is None else inspector
        self.host.spawn(SERVER, start_time=5, parent=PARENT)
        self.host.spawn(PARENT, start_time=4, parent=1)
        self.signaller = RecordingSignaller() if signaller is None else signaller
        self.events = Recorder()
        self.wd = Watchdog(
            host=SystemHost(self.host, self.signaller),
            policy=policy,
            server_pid=SERVER,
            ancestors=frozenset({PARENT}),
            emit=self.events,
            escalate_after=escalate_after,
            signal_override=signal_override,
        )
        self.now = 0.0

    def apply(self, *messages: object) -> None:
        self.wd.apply(messages, self.now, WALL + self.now)  # type: ignore[arg-type]

    def at(self, now: float) -> None:
        self.now = now
        self.wd.tick(now)


@pytest.fixture
def rig() -> Rig:
    r = Rig()
    r.host.spawn(1000, start_time=100, parent=SERVER)
    return r


def arm(pid: int = 1000, scope: str = "s", deadline: float = 10.0, signal: int = 9, **kw):  # type: ignore[no-untyped-def]
    return Arm(pid=pid, scope_id=scope, deadline=deadline, signal=signal, **kw)


def test_arm_then_expiry_reaps_once_and_clears(rig: Rig) -> None:
    rig.apply(arm(scope="a", deadline=10.0), arm(scope="b", deadline=50.0))
    assert rig.wd.next_wakeup() == 10.0
    rig.at(9.9)
    assert rig.signaller.sent == []
    rig.at(10.25)
    assert rig.signaller.sent == [(1000, 9)]
    [reaped] = rig.events.of(Reaped)
    assert isinstance(reaped, Reaped)
    assert reaped.late == pytest.approx(0.25)
    assert reaped.delivered
    assert reaped.start_time == 100
    assert {t.scope_id for t in reaped.timers} == {"a", "b"}
    assert rig.wd.armed() == []
    rig.at(100.0)
    assert rig.signaller.sent == [(1000, 9)]
    assert rig.wd.next_wakeup() is None


def test_disarm_before_the_deadline_prevents_the_reap(rig: Rig) -> None:
    rig.apply(arm(), Disarm(pid=1000, scope_id="s"))
    rig.at(20.0)
    assert rig.signaller.sent == []
    assert [type(e) for e in rig.events.events] == [Armed, Disarmed]
    # Bound without a pidfd (fake processes have none): released once idle, table too.
    assert rig.wd.workers() == []
    assert rig.wd.table._by_pid == {}


class CountingInspector(FakeInspector):
    """Fake processes with (pretend) pidfds; counts every look at a process."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def start_time(self, pid: int) -> Optional[int]:
        self.calls += 1
        return super().start_time(pid)

    def open(self, pid: int) -> Optional[int]:
        self.calls += 1
        self._get(pid)
        return 100_000 + pid

    def alive(self, worker: Worker) -> bool:
        self.calls += 1
        return worker.pid in self.processes

    def close(self, worker: Worker) -> None:
        pass


def test_a_bound_worker_is_looked_at_once_not_per_message() -> None:
    host = CountingInspector()
    host.spawn(1000, start_time=100)
    wd = Watchdog(host=SystemHost(host, RecordingSignaller()), server_pid=SERVER)
    wd.apply([arm(start_time=100)], 0.0, WALL)
    bound = host.calls
    assert bound > 0
    for i in range(100):
        wd.apply([arm(scope=f"s{i % 3}", start_time=100), Disarm(pid=1000, scope_id="s")], 0, WALL)
        wd.apply([Disarm(pid=1000, scope_id=f"s{i % 3}", start_time=100)], 0.0, WALL)
    assert host.calls == bound  # identity was checked once, at binding
    assert wd.stats().requests == {"arm": {"ok": 101}, "disarm": {"ok": 101, "unknown": 99}}


def test_v1_deadlines_are_converted_from_the_wall_clock(rig: Rig) -> None:
    rig.now = 3.0
    rig.apply(TimerRequestV1(pid=1000, scope_id="t", expiration_time=WALL + 8.0, signal=15))
    [t] = rig.wd.armed()
    assert t.deadline == pytest.approx(8.0)
    assert t.start_time == 100  # bound to the process that held the pid
    rig.apply(TimerRequestV1(pid=1000, scope_id="t", expiration_time=-1, signal=0))
    assert rig.wd.armed() == []
    rig.apply(TimerRequestV1(pid=1000, scope_id="unknown", expiration_time=-1, signal=0))
    assert rig.wd.stats().requests["disarm"] == {"ok": 1, "unknown": 1}


def test_a_v1_expiry_long_past_is_due_now_and_can_be_saved(rig: Rig) -> None:
    # 1970 on the wall clock: before the monotonic clock's zero. Saved as it was, a
    # negative deadline made the whole state file unreadable at the next start.
    rig.now = 3.0
    rig.apply(TimerRequestV1(pid=1000, scope_id="t", expiration_time=1.0, signal=9))
    [t] = rig.wd.armed()
    assert t.deadline == 0.0
    assert decode_state(encode_state(rig.wd.armed(), "boot", 3.0)).timers == [t]
    rig.at(3.0)
    assert rig.signaller.sent == [(1000, 9)]


def test_a_v1_negative_signal_is_report_only(rig: Rig) -> None:
    # torch's client: "a negative or zero signal will not kill the process". Such a line
    # was refused as malformed, so the re-arm it carried was lost: the timer armed before
    # it expired on time, with its old signal, and the worker was killed.
    rig.apply(TimerRequestV1(pid=1000, scope_id="t", expiration_time=WALL + 1.0, signal=9))
    line = b'{"version": 1, "pid": 1000, "scope_id": "t", "expiration_time": %f, "signal": -1}\n'
    [request] = LineReader().feed(line % (WALL + 100.0))  # as the server reads it
    rig.apply(request)
    [t] = rig.wd.armed()
    assert (t.deadline, t.signal) == (pytest.approx(100.0), 0)
    rig.at(101.0)
    assert rig.signaller.sent == []
    [expired] = rig.events.of(Expired)
    assert isinstance(expired, Expired)


def test_what_a_journal_keeps_names_the_process_bound_to_the_pid(rig: Rig) -> None:
    # The socket's messages name no start time (the kernel vouches for the sender); kept
    # so, a restart would bind them to whatever process held the pid by then.
    arm_ = Arm(pid=1000, scope_id="s", deadline=5.0, signal=9)
    disarm = Disarm(pid=1000, scope_id="other")
    v1 = TimerRequestV1(pid=1000, scope_id="t", expiration_time=WALL + 8.0, signal=-1)
    refused = Arm(pid=1, scope_id="s", deadline=5.0, signal=9)  # never bound
    stranger = Disarm(pid=4321, scope_id="s")  # nobody's: kept, it can signal nobody
    junk = MalformedMessage("not JSON", b"x")
    batch = [arm_, disarm, v1, refused, stranger, Sync(token="t"), junk]
    rig.apply(*batch)
    assert rig.wd.as_bound(batch, 0.0, WALL) == [
        msgspec.structs.replace(arm_, start_time=100),
        msgspec.structs.replace(disarm, start_time=100),
        Arm(pid=1000, scope_id="t", deadline=8.0, signal=0, start_time=100),
        stranger,
    ]


class OpenCounting(CountingInspector):
    """Counts the pidfds opened: one per look at a process by pid."""

    def __init__(self) -> None:
        super().__init__()
        self.opens = 0

    def open(self, pid: int) -> Optional[int]:
        self.opens += 1
        return super().open(pid)

    def alive(self, worker: Worker) -> bool:  # as a pidfd would tell: that very process
        process = self.processes.get(worker.pid)
        return process is not None and process.start_time == worker.start_time


@pytest.mark.parametrize(
    ("policy", "reason", "allowed"),
    [
        (Policy(allowed_uids=frozenset({0})), RejectReason.UID_NOT_ALLOWED, {"uid": 0}),
        (Policy(descendants_only=True), RejectReason.NOT_DESCENDANT, {"parent": SERVER}),
    ],
)
def test_a_refused_process_is_looked_at_once_in_a_while_not_per_line(
    policy: Policy, reason: RejectReason, allowed: dict
) -> None:
    # A flood of lines for a process the policy refuses had each look at /proc (ms each
    # with a deep ancestry): the pipe stayed full, a healthy worker's heartbeat timed out
    # waiting to be written, and the worker was reaped.
    host = OpenCounting()
    host.spawn(1000, start_time=100)
    wd = Watchdog(host=SystemHost(host, RecordingSignaller()), policy=policy, server_pid=SERVER)
    wd.apply([arm(scope=f"s{i}") for i in range(100)], 0.0, WALL)
    assert (host.opens, wd.stats().rejections) == (1, {reason.value: 100})
    wd.apply([arm(start_time=99)], 0.5, WALL)  # names another process: said so
    assert wd.stats().rejections[RejectReason.IDENTITY_MISMATCH.value] == 1
    wd.apply([arm()], REFUSAL_TTL + 0.1, WALL)  # remembered a while only
    assert host.opens == 2
    host.exit(1000)  # and only while that process holds the pid
    host.spawn(1000, start_time=200, **allowed)
    wd.apply([arm(deadline=30.0)], REFUSAL_TTL + 0.2, WALL)
    assert host.opens == 3
    [timer] = wd.armed()
    assert timer.start_time == 200


def test_a_refusal_past_its_time_lets_go_of_its_pidfd() -> None:
    # Dropped only when the pid came again: a refused process's pidfd stayed open for
    # good, after the process was gone too.
    closed: list[int] = []

    class Closing(OpenCounting):
        def close(self, worker: Worker) -> None:
            closed.append(worker.pid)

    host = Closing()
    host.spawn(1000, start_time=100)
    policy = Policy(allowed_uids=frozenset({0}))
    wd = Watchdog(host=SystemHost(host, RecordingSignaller()), policy=policy, server_pid=SERVER)
    wd.apply([arm()], 0.0, WALL)
    wd.tick(REFUSAL_TTL - 0.01)
    assert closed == []
    wd.tick(REFUSAL_TTL)
    assert closed == [1000]


def test_a_threads_id_is_refused_once_in_a_while_not_per_line() -> None:
    class Counting(SystemInspector):
        opens = 0

        def open(self, pid: int) -> Optional[int]:
            self.opens += 1
            return super().open(pid)

    host = Counting()
    stop = threading.Event()
    thread = threading.Thread(target=stop.wait)
    thread.start()
    try:
        assert thread.native_id is not None
        tid = thread.native_id
        wd = Watchdog(host=SystemHost(host, RecordingSignaller()), server_pid=SERVER)
        wd.apply([arm(pid=tid, scope=f"s{i}") for i in range(50)], 0.0, WALL)
    finally:
        stop.set()
        thread.join()
    assert wd.stats().rejections == {RejectReason.NOT_A_PROCESS.value: 50}
    assert host.opens == 1


def test_nothing_expires_while_held(rig: Rig) -> None:
    # After a restart: a deadline that fell in the outage is judged after the grace.
    rig.apply(arm(deadline=5.0))
    rig.wd.hold(12.0)
    assert rig.wd.next_wakeup() == 12.0
    rig.now = 11.0
    rig.apply(arm(scope="other", deadline=100.0))  # its worker is heard from
    rig.at(11.9)
    assert rig.signaller.sent == []
    rig.at(12.0)
    assert rig.signaller.sent == [(1000, 9)]


def restored_rig() -> Rig:
    """Three workers' timers restored, due in the outage (5.0), the grace until 12.0."""
    rig = Rig()
    for pid in (1000, 1001, 1002):
        rig.host.spawn(pid, start_time=100, parent=SERVER)
    rig.wd.restore([Timer(pid, "s", 5.0, 9, 100, None) for pid in (1000, 1001, 1002)])
    rig.wd.hold(12.0)
    rig.wd.horizon.read(11.9, False, 11.9)  # the loop reads
    return rig


def test_a_restored_timer_waits_for_its_worker_while_the_resends_fill_the_queue() -> None:
    # After a restart at 150k timers, the clients' re-sends kept the queues full for
    # seconds: a healthy worker's disarm, lost in the outage, came after the grace, and
    # it was reaped. Its timer waits for its re-send now (the disarms come first).
    rig = restored_rig()
    rig.wd.horizon.read(12.5, True, 12.6)  # the re-sends fill the queue
    rig.at(13.0)
    assert rig.signaller.sent == []
    assert sorted(t.pid for t in rig.wd.armed()) == [1000, 1001, 1002]  # saved meanwhile
    assert rig.wd.stats().armed == 3
    rig.now = 13.5
    rig.apply(Disarm(pid=1000, scope_id="s"))  # the healthy worker's lost disarm
    rig.apply(arm(pid=1001, scope="s", deadline=5.0))  # the stuck one re-sends its arm
    rig.at(13.5)
    assert rig.signaller.sent == [(1001, 9)]  # heard from: judged at once
    rig.wd.horizon.read(14.0, True, 14.1)  # still full
    assert rig.wd.next_wakeup() == 14.1 + RESYNC_QUIET  # 1002's wait
    rig.at(14.1 + RESYNC_QUIET - 0.001)
    assert rig.signaller.sent == [(1001, 9)]
    rig.at(14.1 + RESYNC_QUIET)  # the queues had room long enough: never heard from
    assert rig.signaller.sent == [(1001, 9), (1002, 9)]
    assert rig.wd.armed() == []
    # Said, before the expiry it explains.
    [over] = rig.events.of(ResendsOver)
    assert over == ResendsOver(1, 1, pytest.approx(14.1 + RESYNC_QUIET - 12.0))
    events = rig.events.events
    assert events.index(over) < max(i for i, e in enumerate(events) if isinstance(e, Expired))


def test_a_restored_timer_waits_for_its_own_scope_not_its_workers_other_channel() -> None:
    # A worker with a client on each transport: the FIFO one's re-sends got through in a
    # second, the socket one's lost disarm of "short" in seven; the worker was heard from,
    # and "short" expired (4 of 6 such workers reaped in a review's restart).
    rig = Rig()
    rig.host.spawn(1000, start_time=100, parent=SERVER)
    restored = [Timer(1000, "long", 100.0, 9, 100, None), Timer(1000, "short", 5.0, 9, 100, None)]
    rig.wd.restore(restored)
    rig.wd.hold(12.0)
    rig.wd.horizon.read(11.9, False, 11.9)
    rig.wd.horizon.read(12.5, True, 12.6)  # the re-sends fill the queue
    rig.now = 12.7
    rig.apply(arm(scope="long", deadline=100.0))  # the FIFO client's re-send
    rig.at(12.7)
    rig.wd.horizon.read(13.0, True, 13.1)
    rig.at(13.1)
    assert rig.signaller.sent == []
    rig.now = 13.2
    rig.apply(Disarm(pid=1000, scope_id="short"))  # the socket client's, late
    rig.at(13.2)
    rig.at(20.0)  # the re-sends long over
    assert rig.signaller.sent == []
    assert [t.scope_id for t in rig.wd.armed()] == ["long"]


def test_a_restored_timer_waits_no_longer_than_resync_wait() -> None:
    rig = restored_rig()
    for t in range(13, 50):  # a queue full for good
        rig.wd.horizon.read(t, True, t + 0.1)
        rig.at(t + 0.1)
        if t + 0.1 < 12.0 + RESYNC_WAIT:
            assert rig.signaller.sent == []
    assert sorted(rig.signaller.sent) == [(1000, 9), (1001, 9), (1002, 9)]


def test_without_a_full_queue_restored_timers_wait_for_the_grace_alone() -> None:
    # A hung worker's client has nothing to re-send: it is reaped when the grace ends.
    rig = restored_rig()
    rig.at(12.0)
    assert sorted(rig.signaller.sent) == [(1000, 9), (1001, 9), (1002, 9)]
    assert rig.events.of(ResendsOver) == []


def test_a_second_restart_while_timers_wait_still_waits_for_the_re_sends() -> None:
    # The state saved while timers waited (or in the first grace) holds them overdue:
    # a first version took a timer overdue when saved for a reap under way, and a second
    # restart reaped the healthy at its grace's end, under the same flood of re-sends.
    first = restored_rig()
    first.wd.horizon.read(12.5, True, 12.6)
    first.at(13.0)
    assert first.signaller.sent == []
    rig = Rig()
    for pid in (1000, 1001, 1002):
        rig.host.spawn(pid, start_time=100, parent=SERVER)
    rig.wd.restore(first.wd.saved())
    rig.wd.hold(30.0)
    rig.wd.horizon.read(29.9, False, 29.9)
    rig.wd.horizon.read(30.5, True, 30.6)  # the re-sends fill the queue again
    rig.at(31.0)
    assert rig.signaller.sent == []


def test_a_worker_with_two_lost_disarms_heard_across_two_reads_is_not_reaped() -> None:
    # Its client re-sends both disarms first, but the queue is full: one read each. A
    # first version let the first unpark the worker, and the tick after it reaped it.
    rig = Rig()
    rig.host.spawn(1000, start_time=100, parent=SERVER)
    rig.wd.restore([Timer(1000, "a", 5.0, 9, 100, None), Timer(1000, "b", 5.0, 9, 100, None)])
    rig.wd.hold(12.0)
    rig.wd.horizon.read(11.9, False, 11.9)
    rig.wd.horizon.read(12.5, True, 12.6)
    rig.at(13.0)
    rig.now = 13.1
    rig.apply(Disarm(pid=1000, scope_id="a"))
    rig.wd.horizon.read(13.1, True, 13.2)  # still full: the second waits for room
    rig.at(13.2)
    rig.now = 13.3
    rig.apply(Disarm(pid=1000, scope_id="b"))
    rig.at(13.3)
    rig.at(20.0)
    assert rig.signaller.sent == []
    assert rig.wd.armed() == []


def test_a_waiting_timer_goes_back_past_the_cap_its_room_was_given_to() -> None:
    # While a stuck worker's timer waited out of the table, another worker took its
    # room: the timer, put back, was refused by the cap without a word, and the stuck
    # worker never reaped.
    rig = Rig(policy=Policy(max_timers=3))
    for pid in (1000, 1001, 1002, 1003):
        rig.host.spawn(pid, start_time=100, parent=SERVER)
    rig.wd.restore(
        [Timer(1000, "s", 5.0, 9, 100, None)]
        + [Timer(p, "s", 100.0, 9, 100, None) for p in (1001, 1002)]
    )
    rig.wd.hold(12.0)
    rig.wd.horizon.read(11.9, False, 11.9)
    rig.wd.horizon.read(12.5, True, 12.6)
    rig.at(13.0)
    rig.now = 13.1
    rig.apply(arm(pid=1003, scope="s", deadline=100.0))  # takes the room
    rig.now = 13.2
    rig.apply(arm(pid=1000, scope="s", deadline=5.0))  # the stuck one's re-send
    rig.at(13.2)
    assert rig.signaller.sent == [(1000, 9)]
    assert rig.events.of(Rejected) == []


def test_a_worker_gone_while_its_restored_timer_waits_drops_it() -> None:
    rig = Rig()
    rig.host.spawn(1000, start_time=100, parent=SERVER)
    rig.wd.restore([Timer(1000, "s", 5.0, 9, 100, None)])
    rig.wd.hold(12.0)
    rig.wd.horizon.read(11.9, False, 11.9)
    rig.wd.horizon.read(12.5, True, 12.6)
    rig.at(13.0)
    assert rig.signaller.sent == []
    [worker] = rig.wd.workers()
    rig.host.exit(1000)
    rig.wd.worker_gone(worker)
    [gone] = rig.events.of(WorkerGone)
    assert [t.scope_id for t in gone.timers] == ["s"]  # type: ignore[attr-defined]
    assert rig.wd.armed() == []
    assert rig.wd.next_wakeup() is None


def test_after_a_full_queue_judgement_waits_for_the_writers_it_held() -> None:
    # A writer that found the pipe full waits for room with a disarm it began before its
    # deadline: it goes in only after the read that made room. Until then, judgement
    # stays at the last moment known safe.
    rig = Rig()
    rig.host.spawn(1000, start_time=100, parent=SERVER)
    rig.apply(arm(scope="a", deadline=5.0), arm(scope="b", deadline=5.2))
    rig.wd.horizon.read(4.9, False, 4.9)  # all read: safe up to 4.9
    rig.wd.horizon.read(5.5, True, 5.6)  # found full at 5.5, read until 5.6
    assert rig.wd.next_wakeup() == 5.6 + SETTLE  # not 5.0: no busy loop meanwhile
    rig.wd.tick(5.6, 5.5)
    assert rig.signaller.sent == []
    rig.apply(Disarm(pid=1000, scope_id="a"))  # the waiting writer got in
    rig.wd.horizon.read(5.7, False, 5.7)  # room, and the woken writers' turn is over
    rig.wd.tick(5.7, 5.7)
    assert rig.signaller.sent == [(1000, 9)]
    assert [e.timer.scope_id for e in rig.events.of(Expired)] == ["b"]  # type: ignore[attr-defined]


def test_a_queue_kept_full_holds_judgement_back_a_blocked_write_at_most() -> None:
    # A flood that never ends must not stop every reap: a writer of ftimer's client gives
    # up after its write_timeout (BLOCKED_WRITE by default), and its policy applies.
    rig = Rig()
    rig.host.spawn(1000, start_time=100, parent=SERVER)
    rig.apply(arm(deadline=5.0))
    rig.wd.horizon.read(4.0, False, 4.0)
    for at in (5.0, 5.5, 5.9):
        rig.wd.horizon.read(at, True, at + 0.05)
        rig.wd.tick(at + 0.05, at)
    assert rig.signaller.sent == []
    assert rig.wd.next_wakeup() == pytest.approx(5.95 + SETTLE)  # should room be found
    rig.wd.horizon.read(6.0, True, 6.05)
    rig.wd.tick(6.05, 6.0)
    assert rig.signaller.sent == [(1000, 9)]


def test_back_from_an_absence_to_a_full_queue_judgement_waits_for_the_writers_that_gave_up() -> (
    None
):
    # The server stopped for 3 s (SIGSTOP) while a healthy worker's arm filled the queue's
    # last place: its disarm found no room and was given up. The arm, read on the
    # return, was 2 s overdue and judged at once; the disarm its client re-sent a moment
    # later came too late, and the healthy worker was reaped.
    rig = Rig()
    rig.host.spawn(1000, start_time=100, parent=SERVER)
    rig.wd.horizon.read(1.0, False, 1.0)  # the last read before the absence
    rig.apply(arm(scope="healthy", deadline=2.0), arm(scope="stuck", deadline=2.1))
    rig.wd.horizon.read(4.0, True, 4.01)  # back at 4.0: the queue is full
    rig.wd.tick(4.01, 4.0)
    rig.wd.horizon.read(4.02, False, 4.02)  # room, and the woken writers' turn is over
    rig.wd.tick(4.02, 4.02)
    assert rig.signaller.sent == []
    assert rig.wd.next_wakeup() == pytest.approx(4.01 + BLOCKED_WRITE)
    rig.apply(Disarm(pid=1000, scope_id="healthy"))  # re-sent by its client
    rig.wd.horizon.read(4.5, False, 4.5)
    rig.wd.tick(4.5, 4.5)
    assert rig.signaller.sent == []
    rig.wd.horizon.read(5.02, False, 5.02)  # a blocked write's time after the return
    rig.wd.tick(5.02, 5.02)
    assert [e.timer.scope_id for e in rig.events.of(Expired)] == ["stuck"]  # type: ignore[attr-defined]
    assert rig.signaller.sent == [(1000, 9)]


def test_a_loop_away_at_every_turn_still_reaps_a_blocked_write_behind_its_turns() -> None:
    # Each return to a full queue holds judgement where it was when the loop left: a
    # loop that is away at every turn must not hold it for good.
    rig = Rig()
    rig.host.spawn(1000, start_time=100, parent=SERVER)
    rig.apply(arm(deadline=5.0))
    reaped_at = None
    for at in (4.0, 5.5, 7.0, 8.5, 10.0):
        rig.wd.horizon.read(at, True, at + 0.01)
        rig.wd.tick(at + 0.01, at)
        if rig.signaller.sent and reaped_at is None:
            reaped_at = at
    # At 8.5, judged up to where the last turn left (7.01) less a blocked write's time.
    assert reaped_at == 8.5


def test_report_only_timers_are_reported_not_signalled(rig: Rig) -> None:
    rig.apply(arm(scope="report", deadline=5.0, signal=0), arm(scope="kill", deadline=30.0))
    rig.at(6.0)
    assert rig.signaller.sent == []
    [expired] = rig.events.of(Expired)
    assert isinstance(expired, Expired)
    assert expired.timer.scope_id == "report"
    assert [t.scope_id for t in rig.wd.armed()] == ["kill"]
    rig.at(30.0)
    assert rig.signaller.sent == [(1000, 9)]


def test_expire_now_reaps_at_the_next_tick(rig: Rig) -> None:
    rig.now = 2.0
    rig.apply(arm(deadline=1000.0), Expire(pid=1000, scope_id="stuck", signal=6))
    rig.at(2.0)
    assert rig.signaller.sent == [(1000, 6)]
    [reaped] = rig.events.of(Reaped)
    assert isinstance(reaped, Reaped)
    assert reaped.scope_id == "stuck"


def test_disarm_all_clears_the_worker(rig: Rig) -> None:
    rig.apply(arm(scope="a"), arm(scope="b"), DisarmAll(pid=1000))
    assert rig.wd.armed() == []
    assert len(rig.events.of(Disarmed)) == 2


def test_labels_travel_with_every_event_about_the_timer(rig: Rig) -> None:
    labels = {"job": "llm", "rank": "3"}
    rig.apply(arm(deadline=1.0, labels=labels), arm(pid=4242, labels=labels))
    rig.at(2.0)
    for kind in (Armed, Expired, Reaped):
        assert rig.events.of(kind)[0].labels == labels
    [rejected] = rig.events.of(Rejected)
    assert rejected.labels == labels


@pytest.mark.parametrize(
    ("pid", "reason"),
    [
        (1, RejectReason.RESERVED_PID),
        (SERVER, RejectReason.SERVER_PROCESS),
        (PARENT, RejectReason.SERVER_ANCESTOR),
        (4242, RejectReason.NO_SUCH_PROCESS),
    ],
)
def test_hostile_pids_are_refused_and_never_signalled(
    rig: Rig, pid: int, reason: RejectReason
) -> None:
    rig.apply(arm(pid=pid, deadline=1.0), Expire(pid=pid, scope_id="x", signal=9))
    rig.apply(TimerRequestV1(pid=pid, scope_id="y", expiration_time=0.0, signal=9))
    rig.at(100.0)
    assert rig.signaller.sent == []
    assert rig.wd.armed() == []
    rejected = rig.events.of(Rejected)
    assert [(e.reason, e.request) for e in rejected] == [  # type: ignore[attr-defined]
        (reason, "arm"),
        (reason, "expire"),
        (reason, "arm"),
    ]
    assert rig.wd.stats().rejections == {reason.value: 3}


def test_pids_below_two_are_refused_even_without_the_decoder(rig: Rig) -> None:
    # The protocol's bounds stop pid <= 0 at decoding; the core refuses them regardless.
    for pid in (0, -1, -1000):
        rig.wd.restore([Timer(pid, "s", 0.0, 9)])
    rig.at(1.0)
    assert rig.signaller.sent == []
    assert {e.reason for e in rig.events.of(Rejected)} == {RejectReason.RESERVED_PID}  # type: ignore[attr-defined]


def test_signals_outside_the_policy_are_refused() -> None:
    rig = Rig(policy=Policy(allowed_signals=frozenset({15})))
    rig.host.spawn(1000, parent=SERVER)
    rig.apply(arm(signal=9), arm(scope="ok", signal=15), arm(scope="report", signal=0))
    assert {t.scope_id for t in rig.wd.armed()} == {"ok", "report"}
    [rejected] = rig.events.of(Rejected)
    assert rejected.reason is RejectReason.SIGNAL_NOT_ALLOWED  # type: ignore[attr-defined]


def test_signal_numbers_the_platform_lacks_are_refused(rig: Rig) -> None:
    missing = sorted(set(range(1, 65)) - set(signal.valid_signals()))
    if not missing:
        pytest.skip("every number up to 64 is a signal here")
    rig.apply(arm(signal=missing[0]))
    assert rig.wd.armed() == []
    assert rig.wd.stats().rejections == {"signal_not_allowed": 1}


def test_descendants_only_and_uid_policies() -> None:
    rig = Rig(policy=Policy(descendants_only=True, allowed_uids=frozenset({1000})))
    rig.host.spawn(1000, parent=SERVER)  # child
    rig.host.spawn(1001, parent=1000)  # grandchild
    rig.host.spawn(1002, parent=1)  # someone else's
    rig.host.spawn(1003, parent=SERVER, uid=0)  # ours, but root's
    rig.apply(*(arm(pid=p) for p in (1000, 1001, 1002, 1003)))
    assert sorted(t.pid for t in rig.wd.armed()) == [1000, 1001]
    assert [(e.pid, e.reason) for e in rig.events.of(Rejected)] == [  # type: ignore[attr-defined]
        (1002, RejectReason.NOT_DESCENDANT),
        (1003, RejectReason.UID_NOT_ALLOWED),
    ]


def test_caps_per_pid_and_total() -> None:
    rig = Rig(policy=Policy(max_timers_per_pid=2, max_timers=3))
    rig.host.spawn(1000)
    rig.host.spawn(1001)
    rig.apply(*(arm(scope=s) for s in "abc"), *(arm(pid=1001, scope=s) for s in "ab"))
    assert len(rig.wd.armed()) == 3
    assert rig.wd.stats().rejections == {"pid_timer_limit": 1, "timer_limit": 1}
    assert [e.detail for e in rig.events.of(Rejected)] == ["limit 2", "limit 3"]  # type: ignore[attr-defined]


def test_a_start_time_that_does_not_match_is_refused(rig: Rig) -> None:
    rig.apply(arm(start_time=99))
    assert rig.wd.armed() == []
    [rejected] = rig.events.of(Rejected)
    assert rejected.reason is RejectReason.IDENTITY_MISMATCH  # type: ignore[attr-defined]
    rig.apply(arm(start_time=100))
    assert len(rig.wd.armed()) == 1


def test_a_reused_pid_is_never_signalled(rig: Rig) -> None:
    # Worker 1000 arms, exits without a word; another process gets pid 1000.
    rig.apply(arm(deadline=5.0))
    rig.host.exit(1000)
    rig.host.spawn(1000, start_time=777)
    rig.at(6.0)
    assert rig.signaller.sent == []
    [gone] = rig.events.of(WorkerGone)
    assert isinstance(gone, WorkerGone)
    assert (gone.pid, gone.start_time, len(gone.timers)) == (1000, 100, 1)


def test_a_reused_pid_with_a_new_identity_replaces_the_dead_binding(rig: Rig) -> None:
    rig.apply(arm(scope="old", deadline=50.0, start_time=100))
    rig.host.exit(1000)
    rig.host.spawn(1000, start_time=777)
    rig.apply(arm(scope="new", deadline=60.0, start_time=777))
    [timer] = rig.wd.armed()
    assert (timer.scope_id, timer.start_time) == ("new", 777)
    assert len(rig.events.of(WorkerGone)) == 1


def test_a_live_process_cannot_be_impersonated(rig: Rig) -> None:
    rig.apply(arm(scope="mine", start_time=100))
    rig.apply(arm(scope="forged", start_time=5), Disarm(pid=1000, scope_id="mine", start_time=5))
    assert [t.scope_id for t in rig.wd.armed()] == ["mine"]
    assert [e.reason for e in rig.events.of(Rejected)] == [  # type: ignore[attr-defined]
        RejectReason.IDENTITY_MISMATCH
    ] * 2


@pytest.mark.parametrize(
    ("clocks", "detail"),
    [
        ((-5_000 * 10**9, 0), "CLOCK_MONOTONIC -5000 s from the server's"),
        ((0, 7 * 10**9), "CLOCK_BOOTTIME +7 s from the server's"),
        (None, "offsets of its own time namespace cannot be read"),
    ],
)
def test_a_process_on_other_clocks_is_refused_never_reaped(
    clocks: Optional[tuple[int, int]], detail: str
) -> None:
    # A time namespace with other offsets: the deadline it means is 5,000 s later than
    # the number says, or its start time reads 7 s (700 ticks) later than the server's.
    rig = Rig()
    rig.host.spawn(1000, start_time=100, parent=SERVER, clocks=clocks)
    claimed = 100 + 700 * (clocks is not None and clocks[1] > 0)
    rig.apply(arm(deadline=1.0, start_time=claimed), arm(scope="again", start_time=claimed))
    rig.at(100.0)
    assert rig.signaller.sent == []
    assert rig.wd.armed() == []
    assert rig.wd.workers() == []
    rejected = rig.events.of(Rejected)
    assert [e.reason for e in rejected] == [RejectReason.OTHER_CLOCK] * 2  # type: ignore[attr-defined]
    assert all(detail in e.detail for e in rejected)  # type: ignore[attr-defined]
    # torch's deadline is on the wall clock, which no time namespace offsets: armed (the
    # refusal just remembered notwithstanding), and reaped when due; an arm on the
    # process's clocks is still refused once it is bound, the server reader's too
    # (a Timer, which the table applies itself for workers on the server's clocks).
    rig.apply(TimerRequestV1(pid=1000, scope_id="t", expiration_time=WALL + 110.0, signal=9))
    rig.apply(Timer(pid=1000, scope_id="v2", deadline=101.0, signal=9, start_time=claimed))
    rig.apply(Expire(pid=1000, scope_id="now", signal=9, start_time=claimed))
    assert [t.scope_id for t in rig.wd.armed()] == ["t"]
    assert [e.reason for e in rig.events.of(Rejected)][2:] == [RejectReason.OTHER_CLOCK] * 2  # type: ignore[attr-defined]
    rig.at(109.9)
    assert rig.signaller.sent == []
    rig.at(110.0)
    assert rig.signaller.sent == [(1000, 9)]


def test_an_expire_without_a_start_time_reaps_a_process_on_other_clocks() -> None:
    # Its deadline is the server's "now": nothing in it is read on the process's clocks.
    rig = Rig()
    rig.host.spawn(1000, start_time=100, parent=SERVER, clocks=(-5_000 * 10**9, 0))
    rig.apply(Expire(pid=1000, scope_id="stuck", signal=9))
    rig.at(0.0)
    assert rig.signaller.sent == [(1000, 9)]
    assert rig.events.of(Rejected) == []


def test_a_pid_reused_after_a_process_on_other_clocks_is_bound_afresh() -> None:
    # Bound for torch's timers on other clocks, it exits; before its exit is seen, a
    # process on the server's clocks takes the pid and arms: refused, it ran unwatched.
    rig = Rig()
    rig.host.spawn(1000, start_time=100, parent=SERVER, clocks=(-5_000 * 10**9, 0))
    rig.apply(TimerRequestV1(pid=1000, scope_id="t", expiration_time=WALL + 50.0, signal=9))
    rig.host.exit(1000)
    rig.host.spawn(1000, start_time=777, parent=SERVER)
    rig.apply(arm(deadline=1.0, start_time=777))
    assert rig.events.of(Rejected) == []
    rig.at(1.0)
    assert rig.signaller.sent == [(1000, 9)]
    [reaped] = rig.events.of(Reaped)
    assert reaped.start_time == 777  # type: ignore[attr-defined]


def test_a_timer_saved_on_the_servers_clocks_is_restored_whatever_the_process_s() -> None:
    rig = Rig()
    rig.host.spawn(1000, start_time=100, parent=SERVER, clocks=(-5_000 * 10**9, 0))
    rig.wd.restore([Timer(pid=1000, scope_id="s", deadline=10.0, signal=9, start_time=100)])
    assert [t.scope_id for t in rig.wd.armed()] == ["s"]
    rig.at(10.0)
    assert rig.signaller.sent == [(1000, 9)]


@pytest.mark.parametrize(
    ("offsets", "said"),
    [
        ((1_000, 0), "CLOCK_MONOTONIC +0.000001 s"),
        ((-1_234_567_000_000, 0), "CLOCK_MONOTONIC -1234.567 s"),
        ((31_536_000 * 10**9,) * 2, "CLOCK_MONOTONIC +31536000 s, CLOCK_BOOTTIME +31536000 s"),
    ],
)
def test_the_clocks_apart_are_said_in_plain_seconds(offsets: tuple[int, int], said: str) -> None:
    assert clocks_apart(offsets) == f"{said} from the server's: another time namespace"


def test_worker_that_exits_loses_its_timers(rig: Rig) -> None:
    rig.apply(arm(scope="a"), arm(scope="b"))
    [worker] = rig.wd.workers()
    rig.host.exit(1000)
    rig.wd.worker_gone(worker)
    assert rig.wd.armed() == []
    [gone] = rig.events.of(WorkerGone)
    assert len(gone.timers) == 2  # type: ignore[attr-defined]
    rig.wd.worker_gone(worker)  # a second notice is ignored
    assert len(rig.events.of(WorkerGone)) == 1


def test_escalation_sends_sigkill_after_the_grace_period() -> None:
    rig = Rig(escalate_after=2.0)
    rig.host.spawn(1000)
    rig.apply(arm(signal=15, deadline=1.0))
    rig.at(1.0)
    assert rig.signaller.sent == [(1000, 15)]
    assert rig.wd.next_wakeup() == 3.0
    rig.at(2.9)
    assert rig.signaller.sent == [(1000, 15)]
    rig.at(3.0)
    assert rig.signaller.sent == [(1000, 15), (1000, 9)]
    [esc] = rig.events.of(Escalated)
    assert isinstance(esc, Escalated)
    assert (esc.signal, esc.after, esc.delivered) == (9, 2.0, True)
    assert rig.wd.next_wakeup() is None


def test_reaps_again_in_the_grace_period_do_not_put_off_the_sigkill() -> None:
    # Each reap restarted the grace: a worker that ignores SIGTERM and expires again
    # sooner than the grace (its monitor thread's expire(), a short timer re-armed) was
    # never sent SIGKILL.
    rig = Rig(escalate_after=5.0)
    rig.host.spawn(1000)
    for tick in range(13):  # every half second for 6 s, an expiry every 3 s
        rig.now = tick / 2
        if tick % 6 == 0:
            rig.apply(Expire(pid=1000, scope_id="hang", signal=15))
        rig.at(tick / 2)
        if tick == 9:
            assert rig.signaller.sent == [(1000, 15), (1000, 15)]
    assert rig.signaller.sent[:3] == [(1000, 15), (1000, 15), (1000, 9)]
    [esc, *_] = rig.events.of(Escalated)
    assert esc.after == 5.0  # type: ignore[attr-defined]


def test_no_escalation_when_the_worker_died_or_got_sigkill() -> None:
    rig = Rig(escalate_after=2.0)
    rig.host.spawn(1000)
    rig.host.spawn(1001)
    rig.apply(arm(signal=15, deadline=1.0), arm(pid=1001, signal=9, deadline=1.0))
    rig.at(1.0)
    rig.host.exit(1000)  # died of its SIGTERM
    rig.at(5.0)
    assert sorted(rig.signaller.sent) == [(1000, 15), (1001, 9)]
    assert rig.events.of(Escalated) == []


class Killing(RecordingSignaller):
    """Records, and says its SIGKILLs end processes (the fake ones live on regardless)."""

    kills = True


class Waiting(FakeInspector):
    def waiting(self, pid: int) -> Optional[str]:
        return "thread 7: D in request_wait_answer"


@pytest.mark.parametrize("escalated", [False, True], ids=["reaped with SIGKILL", "escalated"])
def test_a_worker_alive_long_after_its_sigkill_is_unkillable(escalated: bool) -> None:
    # A worker in a wait the kernel does not interrupt (a hung FUSE or NFS mount) took
    # its SIGKILL and lived on: said "reaped", it was never looked at again.
    rig = Rig(signaller=Killing(), escalate_after=2.0 if escalated else None, inspector=Waiting())
    rig.host.spawn(1000, start_time=100, parent=SERVER)
    rig.apply(arm(signal=15 if escalated else 9, deadline=1.0, labels={"rank": "3"}))
    rig.at(1.0)
    killed = 3.0 if escalated else 1.0
    rig.at(killed)
    assert rig.signaller.sent[-1] == (1000, signal.SIGKILL)
    assert rig.wd.next_wakeup() == killed + KILL_CHECK
    rig.at(killed + KILL_CHECK - 0.001)
    assert rig.events.of(Unkillable) == []
    rig.at(killed + KILL_CHECK)
    assert rig.events.of(Unkillable) == [
        Unkillable(1000, 100, KILL_CHECK, {"rank": "3"}, "thread 7: D in request_wait_answer")
    ]
    assert (rig.wd.stats().unkillable, rig.wd.stats().unkillable_alive) == (1, 1)
    rig.at(killed + 10 * KILL_CHECK)  # said once, looked at again
    assert len(rig.events.of(Unkillable)) == 1
    assert rig.events.of(WorkerGone) == []
    # Its wait ends at last: said, so that the operator (and the alert) know.
    rig.host.exit(1000)
    assert rig.wd.next_wakeup() == killed + 11 * KILL_CHECK
    rig.at(killed + 11 * KILL_CHECK)
    [gone] = rig.events.of(WorkerGone)
    assert isinstance(gone, WorkerGone)
    # Said with the labels of the timer whose reap it outlived (it holds no timer).
    assert (gone.pid, gone.start_time, gone.timers, gone.unkillable) == (1000, 100, (), True)
    assert gone.decider is not None
    assert (gone.decider.scope_id, gone.labels) == ("s", {"rank": "3"})
    assert (rig.wd.stats().unkillable, rig.wd.stats().unkillable_alive) == (1, 0)
    assert rig.wd.next_wakeup() is None


def exits_at_last(rig: Rig) -> List[Tuple[int, Optional[int], float]]:
    """(pid, start time, deadline of the timer whose reap it outlived) of each worker
    said unkillable that exited at last."""
    return [
        (e.pid, e.start_time, e.decider.deadline)
        for e in rig.events.of(WorkerGone)
        if isinstance(e, WorkerGone) and e.unkillable and e.decider is not None
    ]


def unkillable_rig(inspector: Optional[Waiting] = None) -> Rig:
    """pid 1000 (start time 100) reaped with SIGKILL at 1.0 and said unkillable."""
    rig = Rig(signaller=Killing(), inspector=inspector or Waiting())
    rig.host.spawn(1000, start_time=100, parent=SERVER)
    rig.apply(arm(deadline=1.0))
    rig.at(1.0)
    rig.at(1.0 + KILL_CHECK)
    assert len(rig.events.of(Unkillable)) == 1
    return rig


def test_an_unkillable_workers_pid_taken_by_another_unkillable_one_is_told_apart() -> None:
    # Without pidfds a pid is reused unseen: the second worker's SIGKILL took the first
    # one's place, was never said unkillable, and its end was said as the first one's.
    rig = unkillable_rig()
    rig.host.exit(1000)  # between two looks
    rig.host.spawn(1000, start_time=200, parent=SERVER)
    rig.apply(arm(deadline=40.0))
    rig.at(40.0)
    rig.at(40.0 + KILL_CHECK)
    assert [(e.pid, e.start_time) for e in rig.events.of(Unkillable)] == [(1000, 100), (1000, 200)]  # type: ignore[attr-defined]
    assert exits_at_last(rig) == [(1000, 100, 1.0)]
    assert rig.wd.stats().unkillable_alive == 1


def test_another_worker_of_an_unkillable_workers_pid_exits_as_itself() -> None:
    rig = unkillable_rig()
    rig.host.exit(1000)
    rig.host.spawn(1000, start_time=200, parent=SERVER)
    rig.apply(arm(signal=15, deadline=100.0))
    rig.host.exit(1000)
    rig.at(100.0)  # its expiry finds it gone
    gone = {e.start_time: e for e in rig.events.of(WorkerGone)}  # type: ignore[attr-defined]
    assert not gone[200].unkillable  # type: ignore[attr-defined]
    rig.at(1.0 + 3 * KILL_CHECK)  # the first one's next look finds it gone
    assert gone[200] in rig.events.of(WorkerGone)
    assert exits_at_last(rig) == [(1000, 100, 1.0)]
    assert rig.wd.stats().unkillable_alive == 0


def test_a_worker_that_dies_of_its_sigkill_is_not_unkillable() -> None:
    rig = Rig(signaller=Killing())
    rig.host.spawn(1000, start_time=100, parent=SERVER)
    rig.apply(arm(deadline=1.0))
    rig.at(1.0)
    rig.host.exit(1000)
    rig.at(1.0 + KILL_CHECK)
    assert rig.events.of(Unkillable) == []


def test_no_worker_is_unkillable_where_nothing_is_signalled(rig: Rig) -> None:
    # A dry run (a RecordingSignaller): its workers all live on after their "SIGKILL".
    rig.apply(arm(deadline=1.0))
    rig.at(1.0)
    assert rig.wd.next_wakeup() is None
    rig.at(1.0 + KILL_CHECK)
    assert rig.events.of(Unkillable) == []


class TreeSignaller(RecordingSignaller):
    """Records, and answers each reap's request for a worker's tree with the next of
    ``trees`` (then none: the escalation's walk finds those left the tree)."""

    def __init__(self, *trees: List[Descendant]) -> None:
        super().__init__()
        self.tree = list(trees)

    def send_tree(self, worker: Worker, signal: int) -> List[Descendant]:
        super().send_tree(worker, signal)
        return self.tree.pop(0) if self.tree else []

    def send_again(self, descendants: Sequence[Descendant], signal: int) -> List[Descendant]:
        super().send_again(descendants, signal)
        return list(descendants)  # as if all of them had outlived the grace


def tree_rig(signaller: TreeSignaller, delivered: bool = True) -> Rig:
    rig = Rig(escalate_after=2.0)
    rig.signaller = signaller
    signaller.delivered = delivered
    rig.wd = Watchdog(
        host=SystemHost(rig.host, signaller, tree=True),
        server_pid=SERVER,
        ancestors=frozenset({PARENT}),
        emit=rig.events,
        escalate_after=2.0,
    )
    rig.host.spawn(1000)
    return rig


class SlowHost(SystemHost):
    """A host whose every reap says it took ``took`` seconds before the worker's own
    signal (a tree's walk)."""

    took = 0.25

    def reap(self, worker: Worker, signal: int, expiry: Expiry, now: float) -> Delivery:
        return msgspec.structs.replace(super().reap(worker, signal, expiry, now), took=self.took)


def test_a_reap_s_lateness_counts_what_the_host_took_before_the_signal() -> None:
    # With --reap-tree the walk runs before the worker's own signal: with 3,000
    # descendants the worker was signalled 0.9 s after the reap was decided, and the
    # log said "13.6 ms late".
    rig = Rig(escalate_after=2.0)
    rig.host.spawn(1000, parent=SERVER)
    rig.wd = Watchdog(
        host=SlowHost(rig.host, rig.signaller),
        server_pid=SERVER,
        ancestors=frozenset({PARENT}),
        emit=rig.events,
        escalate_after=2.0,
    )
    rig.apply(arm(signal=15, deadline=1.0))
    rig.at(1.01)
    [reaped] = rig.events.of(Reaped)
    assert reaped.late == pytest.approx(0.26)  # type: ignore[attr-defined]
    assert rig.wd.next_wakeup() == pytest.approx(3.01)  # the grace runs from the decision


@pytest.mark.parametrize("exits", [False, True], ids=["lives", "exits in its grace"])
def test_the_descendants_a_reap_signalled_get_the_escalation_too(exits: bool) -> None:
    # With --reap-tree, the escalation's SIGKILL went to the worker alone: its
    # descendants that ignored SIGTERM lived on, for good once it had died of it.
    rig = tree_rig(TreeSignaller([Descendant(2000, 300)]))
    rig.apply(arm(signal=15, deadline=1.0))
    rig.at(1.0)
    [reaped] = rig.events.of(Reaped)
    assert reaped.descendants == (2000,)  # type: ignore[attr-defined]
    if exits:
        [worker] = rig.wd.workers()
        rig.host.exit(1000)
        rig.wd.worker_gone(worker)
    assert rig.wd.next_wakeup() == 3.0
    rig.at(2.9)
    assert rig.signaller.again == []
    rig.at(3.0)
    [esc] = rig.events.of(Escalated)
    assert esc.descendants == (2000,)  # type: ignore[attr-defined]
    assert rig.signaller.again == [(2000, 9)]
    if exits:  # its own pid is never signalled again: it may be another's by now
        assert rig.signaller.sent == [(1000, 15)]
        assert rig.signaller.trees == [(1000, 15)]
        assert (esc.exited, esc.delivered) == (True, False)  # type: ignore[attr-defined]
    else:
        assert rig.signaller.sent == [(1000, 15), (1000, 9)]
        assert rig.signaller.trees == [(1000, 15), (1000, 9)]
        assert (esc.exited, esc.delivered) == (False, True)  # type: ignore[attr-defined]
    assert rig.wd.next_wakeup() is None


def test_the_descendants_of_every_reap_in_the_grace_get_the_escalation() -> None:
    # Reaped again in its grace (another timer expired), a worker's tree held children
    # forked meanwhile: those were forgotten, and lived on once it died.
    rig = tree_rig(TreeSignaller([Descendant(2000, 300)], [Descendant(2001, 301)]))
    rig.apply(arm(scope="a", signal=15, deadline=1.0), arm(scope="b", signal=15, deadline=50))
    rig.at(1.0)
    rig.apply(arm(scope="b", signal=15, deadline=2.0))
    rig.at(2.0)
    [worker] = rig.wd.workers()
    rig.host.exit(1000)
    rig.wd.worker_gone(worker)
    rig.at(3.0)
    assert rig.signaller.again == [(2000, 9), (2001, 9)]


def test_the_descendants_of_a_worker_gone_at_its_signal_get_the_escalation() -> None:
    # The worker exited between the walk of its tree and its own signal: no grace
    # began, and its descendants that ignored SIGTERM lived on.
    rig = tree_rig(TreeSignaller([Descendant(2000, 300)]), delivered=False)
    rig.apply(arm(signal=15, deadline=1.0))
    rig.at(1.0)
    assert rig.wd.next_wakeup() == 3.0
    rig.at(3.0)
    assert rig.signaller.again == [(2000, 9)]


def test_signal_override_replaces_the_timers_signal_and_escalates() -> None:
    rig = Rig(escalate_after=2.0, signal_override=signal.SIGTERM)
    rig.host.spawn(1000)
    rig.apply(arm(scope="a", signal=9, deadline=1.0, labels={"k": "v"}))
    rig.at(1.0)
    assert rig.signaller.sent == [(1000, signal.SIGTERM)]
    [reaped] = rig.events.of(Reaped)
    assert isinstance(reaped, Reaped)
    assert (reaped.signal, reaped.scope_id, reaped.labels) == (signal.SIGTERM, "a", {"k": "v"})
    assert rig.wd.stats().reaps == {signal.SIGTERM: 1}
    rig.at(3.0)  # still alive after the grace: SIGKILL, though the timer asked for it first
    assert rig.signaller.sent == [(1000, signal.SIGTERM), (1000, signal.SIGKILL)]
    assert len(rig.events.of(Escalated)) == 1


def test_signal_override_keeps_report_only_timers_report_only() -> None:
    rig = Rig(escalate_after=2.0, signal_override=signal.SIGTERM)
    rig.host.spawn(1000)
    rig.apply(arm(scope="watch", signal=0, deadline=1.0), arm(scope="step", deadline=9.0))
    rig.at(1.0)
    assert rig.signaller.sent == []
    assert len(rig.events.of(Expired)) == 1
    assert [t.scope_id for t in rig.wd.armed()] == ["step"]


def test_signal_override_sigkill_never_escalates() -> None:
    rig = Rig(escalate_after=2.0, signal_override=signal.SIGKILL)
    rig.host.spawn(1000)
    rig.apply(arm(signal=signal.SIGTERM, deadline=1.0))
    rig.at(1.0)
    rig.at(10.0)
    assert rig.signaller.sent == [(1000, signal.SIGKILL)]
    assert rig.wd.next_wakeup() is None
    assert rig.events.of(Escalated) == []


@pytest.mark.parametrize("bad", [0, -1, 32, 10_000])
def test_signal_override_must_be_a_signal(bad: int) -> None:
    with pytest.raises(ValueError, match="signal_override"):
        Rig(signal_override=bad)


class RefusingSignaller(RecordingSignaller):
    def send(self, worker: Worker, signal: int) -> bool:
        super().send(worker, signal)
        raise PermissionError(1, "Operation not permitted")


def test_undeliverable_signals_are_reported() -> None:
    rig = Rig(signaller=RefusingSignaller())
    rig.host.spawn(1000)
    rig.apply(arm(deadline=1.0))
    rig.at(1.0)
    [reaped] = rig.events.of(Reaped)
    assert isinstance(reaped, Reaped)
    assert (reaped.delivered, reaped.gone) == (False, False)
    assert "not permitted" in (reaped.error or "")
    assert rig.wd.stats().reap_failures == 1


def test_a_worker_gone_at_its_signal_is_not_a_reap_failure() -> None:
    # It exited between its expiry (or its capture) and its signal: it was counted a
    # reap failure, logged as an error and alerted on as a hung worker left running.
    rig = Rig()
    rig.signaller.delivered = False  # the signaller's "that process is gone"
    rig.host.spawn(1000)
    rig.apply(arm(deadline=1.0))
    rig.at(1.0)
    [reaped] = rig.events.of(Reaped)
    assert isinstance(reaped, Reaped)
    assert (reaped.delivered, reaped.gone) == (False, True)
    assert rig.wd.stats().reap_failures == 0


def test_decode_errors_are_counted_by_kind(rig: Rig) -> None:
    rig.apply(
        MalformedMessage("bad", b"xx"),
        LineTooLong("long", b"yy"),
        UnsupportedVersion(3, b"zz"),
        MalformedMessage("bad again"),
    )
    assert rig.wd.stats().decode_errors == {
        "MalformedMessage": 2,
        "LineTooLong": 1,
        "UnsupportedVersion": 1,
    }
    assert all(isinstance(e, DecodeFailed) for e in rig.events.events)


def test_sync_returns_its_token(rig: Rig) -> None:
    assert rig.wd.apply([Sync(token="t1"), arm(), Sync(token="t2")], 0.0, WALL) == ["t1", "t2"]
    assert rig.wd.apply([arm()], 0.0, WALL) == []


def test_restore_rebinds_and_drops_timers_of_workers_gone_since(rig: Rig) -> None:
    # Timers of workers that ended while no server ran were refused: a routine restart
    # counted a refusal for each, enough to fire FtimerRefusalsClimbing.
    rig.host.spawn(1001, start_time=200)
    rig.host.spawn(1003, start_time=400, uid=0)
    saved = [
        Timer(1000, "a", 10.0, 9, start_time=100, labels={"rank": "0"}),
        Timer(1001, "b", 10.0, 9, start_time=199),  # pid reused since it was saved
        Timer(1002, "c", 10.0, 9, start_time=300),  # process gone
        Timer(1002, "d", 10.0, 9, start_time=300),
        Timer(1003, "e", 10.0, 9, start_time=400),  # refused by the policy
    ]
    rig.wd.policy = Policy(allowed_uids=frozenset({1000}))
    rig.wd.restore(saved)
    assert rig.wd.armed() == [saved[0]]
    assert [(e.pid, e.timers) for e in rig.events.of(WorkerGone)] == [  # type: ignore[attr-defined]
        (1001, (saved[1],)),
        (1002, (saved[2], saved[3])),
    ]
    assert [(e.pid, e.reason, e.request) for e in rig.events.of(Rejected)] == [  # type: ignore[attr-defined]
        (1003, RejectReason.UID_NOT_ALLOWED, "restore"),
    ]
    stats = rig.wd.stats()
    assert stats.requests["restore"] == {"ok": 1, "exited": 3, "rejected": 1}
    assert stats.rejections == {"uid_not_allowed": 1}


def test_a_replayed_line_of_a_worker_gone_since_is_not_a_refusal(rig: Rig) -> None:
    # A journal's lines of workers that ended while no server ran were refused
    # (no_such_process) with a warning each, at every restart after a kill -9.
    rig.host.spawn(1001, start_time=200)
    lines = [
        arm(pid=1002, start_time=300),  # process gone
        Disarm(pid=1002, scope_id="s", start_time=300),
        arm(pid=1001, start_time=199),  # pid reused since
        TimerRequestV1(pid=1003, scope_id="s", expiration_time=WALL + 10, signal=9),
    ]
    with rig.wd.catching_up(None):
        rig.apply(*lines)
    assert rig.events.of(Rejected) == []
    assert rig.wd.stats().requests == {
        "arm": {"exited": 3},
        "disarm": {"unknown": 1},
    }
    rig.apply(*lines)  # read live, the same lines are refused
    assert [e.reason for e in rig.events.of(Rejected)] == [  # type: ignore[attr-defined]
        RejectReason.NO_SUCH_PROCESS,
        RejectReason.IDENTITY_MISMATCH,
        RejectReason.NO_SUCH_PROCESS,
    ]


def test_requests_are_counted_by_type_and_result(rig: Rig) -> None:
    rig.apply(arm(), arm(), Disarm(pid=1000, scope_id="s"), Disarm(pid=1000, scope_id="s"))
    rig.apply(arm(pid=4242))
    assert rig.wd.stats().requests == {
        "arm": {"ok": 2, "rejected": 1},
        "disarm": {"ok": 1, "unknown": 1},
    }
    assert rig.events.of(Armed)[1].rearmed  # type: ignore[attr-defined]


# -- property: any sequence of messages against a simple model -------------------------

ops = st.lists(
    st.tuples(
        st.sampled_from(["arm", "disarm", "disarm_all", "expire", "v1", "v1_release", "tick"]),
        st.sampled_from([1000, 1001, 1002]),
        st.sampled_from(["a", "b", "c"]),
        st.floats(min_value=0, max_value=20).map(lambda x: round(x, 1)),
        st.sampled_from([0, 9, 15]),
    ),
    max_size=60,
)


@settings(max_examples=150)
@given(ops)
def test_core_matches_a_model(ops_list: list[tuple[str, int, str, float, int]]) -> None:
    rig = Rig()
    for pid in (1000, 1001, 1002):
        rig.host.spawn(pid)
    model: dict[tuple[int, str], tuple[float, int]] = {}
    reaps: list[tuple[int, int]] = []
    seq: dict[tuple[int, str], int] = {}
    counter = itertools.count()
    for op, pid, scope, t, sig in ops_list:
        if op == "tick":
            rig.now += t
            # Ties on the deadline go to the timer armed first (its latest arm).
            due = sorted(
                (d, seq[p, sc], s, p, sc) for (p, sc), (d, s) in model.items() if d <= rig.now
            )
            pids_due = {p for _, _, _, p, _ in due}
            for p in sorted(pids_due, key=lambda p: min(d for d, _, _, q, _ in due if q == p)):
                mine = [(d, s, sc) for d, _, s, q, sc in due if q == p]
                decider = next((s for _, s, _ in mine if s > 0), 0)
                if decider:
                    reaps.append((p, decider))
                    for k in [k for k in model if k[0] == p]:
                        del model[k]
                else:
                    for _, _, sc in mine:
                        del model[p, sc]
            rig.wd.tick(rig.now)
            continue
        if op == "arm":
            rig.apply(arm(pid=pid, scope=scope, deadline=rig.now + t, signal=sig))
            model[pid, scope] = (rig.now + t, sig)
            seq[pid, scope] = next(counter)
        elif op == "v1":
            rig.apply(
                TimerRequestV1(
                    pid=pid, scope_id=scope, expiration_time=WALL + rig.now + t, signal=sig
                )
            )
            # The wall -> monotonic conversion rounds: the model takes the armed deadline.
            [armed] = [x for x in rig.wd.armed() if (x.pid, x.scope_id) == (pid, scope)]
            assert armed.deadline == pytest.approx(rig.now + t, abs=1e-6)
            model[pid, scope] = (armed.deadline, sig)
            seq[pid, scope] = next(counter)
        elif op == "expire":
            rig.apply(Expire(pid=pid, scope_id=scope, signal=sig))
            model[pid, scope] = (rig.now, sig)
            seq[pid, scope] = next(counter)
        elif op in ("disarm", "v1_release"):
            m = (
                Disarm(pid=pid, scope_id=scope)
                if op == "disarm"
                else TimerRequestV1(pid=pid, scope_id=scope, expiration_time=-1, signal=0)
            )
            rig.apply(m)
            model.pop((pid, scope), None)
        else:
            rig.apply(DisarmAll(pid=pid))
            for k in [k for k in model if k[0] == pid]:
                del model[k]
        got = {(x.pid, x.scope_id): (x.deadline, x.signal) for x in rig.wd.armed()}
        assert got.keys() == model.keys()
        for k, (d, s) in model.items():
            assert got[k][0] == pytest.approx(d, abs=1e-6)
            assert got[k][1] == s
    assert sorted(rig.signaller.sent) == sorted(reaps)


# Pinned by mutation testing: each test below fails with a one-line change to the core
# (a comparison flipped, a statement dropped) that every other test let through.


def test_tick_judges_no_deadline_past_the_horizon(rig: Rig) -> None:
    rig.apply(arm(deadline=7.0))
    rig.now = 10.0
    rig.wd.tick(10.0, horizon=5.0)  # a disarm written before 7.0 may still be unread
    assert rig.signaller.sent == []
    rig.wd.tick(10.0, horizon=7.0)
    assert rig.signaller.sent == [(1000, 9)]


def test_next_wakeup_is_the_earlier_of_expiry_and_escalation() -> None:
    rig = Rig(escalate_after=2.0)
    rig.host.spawn(1000, parent=SERVER)
    rig.host.spawn(1001, parent=SERVER)
    rig.apply(arm(1000, signal=15, deadline=1.0), arm(1001, deadline=50.0))
    rig.at(1.0)
    assert rig.wd.next_wakeup() == 3.0  # the SIGKILL, not the other timer at 50
    rig.apply(arm(1001, deadline=2.0))
    assert rig.wd.next_wakeup() == 2.0


def test_an_arm_over_the_limit_is_neither_counted_ok_nor_reported_armed() -> None:
    rig = Rig(policy=Policy(max_timers=1))
    rig.host.spawn(1000, parent=SERVER)
    rig.host.spawn(1001, parent=SERVER)
    rig.apply(arm(1000), arm(1001))
    assert rig.wd.stats().requests["arm"] == {"ok": 1, "rejected": 1}
    assert [e.timer.pid for e in rig.events.of(Armed)] == [1000]
    assert [w.pid for w in rig.wd.workers()] == [1000]  # 1001 not left bound


def test_journal_keeps_the_start_time_a_refused_arm_named(rig: Rig) -> None:
    rig.apply(arm(start_time=100))
    other = arm(scope="x", start_time=999)  # another process's: refused
    rig.apply(other)
    [kept] = rig.wd.as_bound([other], 0.0, WALL)
    assert kept.start_time == 999


def test_journal_drops_a_v1_arm_of_an_unbound_pid(rig: Rig) -> None:
    req = TimerRequestV1(pid=1013, scope_id="s", expiration_time=WALL + 5, signal=9)
    assert rig.wd.as_bound([req], 0.0, WALL) == []


def test_a_worker_found_dead_at_escalation_is_dropped() -> None:
    rig = Rig(escalate_after=2.0)
    rig.host.spawn(1000, parent=SERVER)
    rig.apply(arm(signal=15, deadline=1.0))
    rig.at(1.0)
    rig.host.exit(1000)
    rig.at(3.0)
    assert rig.signaller.sent == [(1000, 15)]
    assert [e.pid for e in rig.events.of(WorkerGone)] == [1000]
    assert rig.wd.workers() == []


def test_a_disarm_before_settle_is_not_resurrected(rig: Rig) -> None:
    rig.apply(arm(scope="keep", deadline=100.0, start_time=100))
    # As the reader decodes it: int objects of its own, not the worker's.
    rec = Timer(int("1000"), "s", 5.0, 9, int("100"))
    rig.apply(rec, Disarm(1000, "s", 100))  # no pidfd: the disarm goes the general way
    rig.at(6.0)
    assert rig.signaller.sent == []


def test_a_rearm_before_settle_keeps_the_later_deadline(rig: Rig) -> None:
    rig.apply(arm(scope="keep", deadline=100.0, start_time=100))
    rec = Timer(int("1000"), "s", 5.0, 9, int("100"))
    rig.apply(rec, arm(scope="s", deadline=50.0))  # re-armed (general path)
    rig.at(6.0)
    assert rig.signaller.sent == []


def test_sighup_decides_an_expiry(rig: Rig) -> None:
    rig.apply(arm(signal=1, deadline=1.0))
    rig.at(1.0)
    assert rig.signaller.sent == [(1000, 1)]


def test_a_queue_left_full_keeps_judgement_behind(rig: Rig) -> None:
    rig.apply(arm(deadline=5.8))
    rig.wd.horizon.read(4.9, False, 4.9)  # all read: safe up to 4.9
    rig.wd.horizon.read(5.5, True, 5.6)  # found full; no read since
    rig.at(6.0)  # past the woken writers' turn, but the queue was full at the last read
    assert rig.signaller.sent == []  # judged only up to max(4.9, 6.0 - BLOCKED_WRITE)
    rig.at(6.8)
    assert rig.signaller.sent == [(1000, 9)]


def test_every_pidfd_opened_is_watched_and_released() -> None:
    # Dropping a bind's watch, a release, or close()'s went unnoticed: pidfds leaked in
    # a long-lived daemon, or exits were never seen.
    opened: List[int] = []
    closed: List[int] = []
    watched: List[int] = []

    class Pidfds(FakeInspector):
        def open(self, pid: int) -> Optional[int]:
            self._get(pid)
            opened.append(pid)
            return 100_000 + pid

        def alive(self, worker: Worker) -> bool:
            return super().alive(msgspec.structs.replace(worker, pidfd=None))

        def close(self, worker: Worker) -> None:
            if worker.pidfd is not None:
                closed.append(worker.pid)

    host = Pidfds()
    host.spawn(SERVER, start_time=5)
    for pid in (1000, 1001, 1002):
        host.spawn(pid, start_time=100, parent=SERVER)
    watch = SystemHost(host, RecordingSignaller(), watch=lambda w: watched.append(w.pid))
    wd = Watchdog(host=watch, server_pid=SERVER)
    wd.apply([arm(1000), arm(1001), arm(1002)], 0.0, WALL)
    assert sorted(watched) == [1000, 1001, 1002]
    [w1001] = [w for w in wd.workers() if w.pid == 1001]
    host.exit(1001)
    wd.worker_gone(w1001)
    assert closed == [1001]
    wd.close()
    assert sorted(closed) == sorted(opened)
    assert wd.workers() == []


def test_the_hot_path_keeps_the_total_limit() -> None:
    rig = Rig(policy=Policy(max_timers=2))
    rig.host.spawn(1000, start_time=100, parent=SERVER)
    rig.apply(arm(scope="a", start_time=100))  # binds (general path)
    rig.apply(Timer(1000, "b", 10.0, 9, 100), Timer(1000, "c", 10.0, 9, 100))  # as decoded
    assert len(rig.wd.armed()) == 2
    assert rig.wd.stats().requests["arm"] == {"ok": 2, "rejected": 1}
