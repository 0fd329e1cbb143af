"""The resync state machine, without I/O: which lines to send, what a failure leaves to
make good, and when a retry is due (the clock passed in)."""

from __future__ import annotations

from typing import Any, Dict, List, Tuple

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ftimer_client._resync import RETRY_FIRST, RETRY_MAX, Resync
from ftimer_client._wire import V1Lines, V2Lines
from ftimer_protocol import Arm, Disarm, TimerRequestV1, decode

from .conftest import server_state

PID, START = 4242, 99


def v2() -> Tuple[Resync, V2Lines]:
    lines = V2Lines(PID, START, 9, None)
    return Resync(lines), lines


def lines_of(items: List[Tuple[Any, bytes]]) -> List[bytes]:
    """The lines of (scope, line) pairs."""
    return [line for _, line in items]


def arm_line(lines: V2Lines, scope: str, deadline: float = 100.0) -> bytes:
    return lines.entry(scope)[0] % deadline


def test_in_sync_there_is_no_backlog() -> None:
    state, lines = v2()
    state.arm("a", arm_line(lines, "a"), owner=1)
    assert lines_of(state.backlog()) == []
    assert not state.needs_resync
    assert state.next_retry(0.0) is None


def test_a_resync_is_the_lost_disarms_then_every_armed_scope_with_its_line() -> None:
    state, lines = v2()
    state.arm("a", arm_line(lines, "a", 10.0), owner=1)
    state.arm("b", arm_line(lines, "b", 20.0), owner=2)
    state.arm("a", arm_line(lines, "a", 30.0), owner=1)  # re-armed: the last line counts
    state.arm("c", arm_line(lines, "c", 40.0), owner=1)
    state.disarm("c")
    state.lost_disarms(["c"])
    state.failed(5.0)
    assert state.needs_resync
    assert state.outages == 1
    sent = [decode(line) for line in lines_of(state.backlog())]
    assert sent == [
        Disarm(PID, "c", START),
        Arm(PID, "a", 30.0, 9, START),
        Arm(PID, "b", 20.0, 9, START),
    ]
    state.delivered()
    assert lines_of(state.backlog()) == []


def test_a_refused_arm_is_undone() -> None:
    state, lines = v2()
    first = arm_line(lines, "a", 10.0)
    state.arm("a", first, owner=1)
    previous = state.arm("a", arm_line(lines, "a", 20.0), owner=1)
    state.unarm("a", previous)
    assert state.armed == {"a": (first, 1)}
    state.unarm("b", state.arm("b", arm_line(lines, "b"), owner=1))
    assert set(state.armed) == {"a"}


def test_disarm_all_is_one_line_per_scope_of_one_owner_or_of_everyone() -> None:
    state, lines = v2()
    for scope, owner in (("a", 1), ("b", 2), ("c", 1)):
        state.arm(scope, arm_line(lines, scope), owner)
    assert state.armed_by(1) == {"a", "c"}
    forgotten = state.scopes_of(1)
    sent, owed = state.disarm_all(forgotten)
    assert [decode(line) for line in sent] == [Disarm(PID, "a", START), Disarm(PID, "c", START)]
    assert forgotten == owed == ["a", "c"]
    assert set(state.armed) == {"b"}
    state.arm("d", arm_line(lines, "d"), owner=2)
    forgotten = state.scopes_of(None)
    sent, owed = state.disarm_all(forgotten)
    # Never a disarm_all: other channels arm for the pid too (ftimer exec's timer).
    assert [decode(line) for line in sent] == [Disarm(PID, "b", START), Disarm(PID, "d", START)]
    assert forgotten == owed == ["b", "d"]  # what a resync disarms, should lines be lost
    assert state.armed == {}


def test_the_resync_sent_before_an_arm_carries_the_scopes_previous_line() -> None:
    # The arm's own line goes after the resync: were a copy of it in the resync, it could
    # reach the server while the arm's own line failed, and the arm raised ("did not
    # happen") with its timer armed on the server.
    state, lines = v2()
    state.arm("old", arm_line(lines, "old", 10.0), owner=1)
    state.failed(1.0)
    previous = state.arm("old", arm_line(lines, "old", 20.0), owner=1)  # re-armed
    assert [decode(line) for line in lines_of(state.backlog(("old", previous)))] == [
        Arm(PID, "old", 10.0, 9, START)
    ]
    previous = state.arm("new", arm_line(lines, "new", 30.0), owner=1)
    assert [decode(line) for line in lines_of(state.resync(("new", previous)))] == [
        Arm(PID, "old", 20.0, 9, START)
    ]
    assert len(lines_of(state.resync())) == 2  # for a reconnection once the arm went out


def test_version_1_resends_the_releases_it_lost_then_the_arms() -> None:
    lines = V1Lines(PID, 9)
    state = Resync(lines)
    state.arm("a", lines.arm("a", 1000.0), owner=1)
    state.arm("b", lines.arm("b", 2000.0), owner=1)
    state.disarm("b")
    state.lost_disarms(["b"])
    state.failed(0.0)
    sent = [decode(line) for line in lines_of(state.backlog())]
    assert sent == [TimerRequestV1(PID, "b", -1.0, 0), TimerRequestV1(PID, "a", 1000.0, 9)]
    state.delivered()
    assert lines_of(state.resync()) == [lines.arm("a", 1000.0)]


def test_a_stall_is_waited_for_once() -> None:
    state, _ = v2()
    assert state.timeout(1.5) == 1.5
    state.failed(0.0, stalled=True)
    assert state.timeout(1.5) == 0.0  # fail fast until a delivery gets through
    state.failed(0.1)
    assert state.outages == 1  # the same outage
    state.delivered()
    assert state.timeout(1.5) == 1.5


def test_outages_are_counted_once_each() -> None:
    state, _ = v2()
    for now in (0.0, 0.1, 0.2):
        state.failed(now)
    assert state.outages == 1
    state.delivered()
    state.failed(1.0)
    assert state.outages == 2


def test_retries_back_off_to_the_cap_and_stop_when_nothing_is_owed() -> None:
    state, lines = v2()
    state.failed(10.0)
    assert state.next_retry(10.0) is None  # nothing armed, nothing lost: nothing to redo
    state.arm("a", arm_line(lines, "a"), owner=1)
    assert state.retry_wanted
    assert state.next_retry(10.0) == pytest.approx(RETRY_FIRST)
    assert state.next_retry(10.0 + RETRY_FIRST) == 0.0
    delays = []
    now = 10.0 + RETRY_FIRST
    for _ in range(8):
        state.retry_failed(now)
        delay = state.next_retry(now)
        assert delay is not None
        delays.append(delay)
        now += delay
    assert delays[:4] == pytest.approx(
        [2 * RETRY_FIRST, 4 * RETRY_FIRST, 8 * RETRY_FIRST, 16 * RETRY_FIRST]
    )
    assert delays[-1] == pytest.approx(RETRY_MAX)
    state.delivered()
    assert state.next_retry(now) is None
    state.failed(now)  # a new outage starts from the first delay again
    assert state.next_retry(now) == pytest.approx(RETRY_FIRST)


def test_a_lost_disarm_alone_is_worth_a_retry() -> None:
    state, _ = v2()
    state.lost_disarms(["a"])
    state.failed(0.0)
    assert state.retry_wanted
    assert [decode(line) for line in lines_of(state.backlog())] == [Disarm(PID, "a", START)]


def test_a_resync_leaves_what_other_channels_armed_for_the_pid() -> None:
    # `ftimer exec` arms for its command's pid through a channel of its own, and writes
    # nothing more until the command ends; the command's own client resynchronised after
    # a server restart with a disarm_all of its pid, which wiped the outer timer: the
    # command, hung outside any step of its own, was never reaped.
    outer, lines = v2()  # exec's channel, naming the command's pid
    own, _ = v2()  # the command's own channel
    server = [arm_line(lines, "exec:train", 100.0)]
    outer.arm("exec:train", server[0], owner=1)
    own.arm("step", arm_line(lines, "step", 50.0), owner=2)
    own.disarm("step")
    own.lost_disarms(["step"])  # the server restarted (state restored) meanwhile
    own.failed(1.0)
    server += [arm_line(lines, "step", 50.0), *lines_of(own.backlog())]
    own.delivered()
    assert server_state([decode(line) for line in server]) == {(PID, "exec:train"): 100.0}


def test_the_last_disarms_delivered_are_sent_again_after_a_failure() -> None:
    # A server killed before it read them (a socket's queue dies with it) restores their
    # timers from its state file: the resync's disarm_all used to wipe them, and a resync
    # without one must disarm them again, or the healthy worker is reaped.
    state, lines = v2()
    for scope in ("a", "b", "c"):
        state.arm(scope, arm_line(lines, scope), owner=1)
    state.disarm("a")  # delivered, as far as the client knows
    state.disarm_all(["b"])
    state.failed(1.0)  # the server went away: the next delivery resynchronises
    restored = [arm_line(lines, s) for s in ("a", "b", "c")]  # its state file
    server = [decode(line) for line in [*restored, *lines_of(state.backlog())]]
    assert server_state(server) == {(PID, "c"): 100.0}
    state.delivered()
    # A later failure: the disarms the resync delivered are among the last delivered, and
    # may be unread again (a second restart restores their timers once more).
    state.failed(2.0)
    assert [decode(line) for line in lines_of(state.backlog())] == [
        Disarm(PID, "a", START),
        Disarm(PID, "b", START),
        Arm(PID, "c", 100.0, 9, START),
    ]


def test_reset_forgets_everything_but_the_outage_count() -> None:
    state, lines = v2()
    state.arm("a", arm_line(lines, "a"), owner=1)
    state.failed(0.0, stalled=True)
    state.reset()
    assert (state.armed, state.needs_resync, state.stalled) == ({}, False, False)
    assert state.next_retry(0.0) is None
    assert state.outages == 1


# -- every failure pattern ends with the server agreeing --------------------------------------

OPS = st.lists(
    st.tuples(
        st.sampled_from(["arm", "disarm", "disarm_all", "disarm_mine", "restart"]),
        st.sampled_from(["a", "b", "c"]),
        st.sampled_from([1, 2]),
        st.booleans(),  # delivered?
        st.integers(0, 8),  # if not: how many of its lines went through first
    ),
    max_size=40,
)


@given(OPS, st.booleans())
def test_after_a_resync_the_server_holds_exactly_the_registry(
    ops: List[Tuple[str, str, int, bool, int]], version_2: bool
) -> None:
    # A model of the channel's use of the machine: each delivery goes through, or stops
    # after some of its lines; a restart loses the server's state or (a state file) keeps
    # a stale copy. Whatever happened, once a delivery goes through after the backlog
    # the server agrees; and an arm that failed never reached it.
    lines: object = V2Lines(PID, START, 9, None) if version_2 else V1Lines(PID, 9)
    state = Resync(lines)  # type: ignore[arg-type]
    server: List[bytes] = []  # what the server applied, in order
    now = 0.0

    def deliver(new: List[bytes], ok: bool, cut: int = 0, arming: Any = None) -> None:
        nonlocal now
        now += 0.01
        lines = lines_of(state.backlog(arming)) + new
        if ok:
            server.extend(lines)
            state.delivered()
        else:
            server.extend(lines[: min(cut, len(lines) - 1)])  # not the last one, at least
            state.failed(now)

    deadline = 0.0
    for op, scope, owner, ok, cut in ops:
        deadline += 1.0
        if op == "arm":
            line = (
                lines.entry(scope)[0] % deadline  # type: ignore[attr-defined]
                if version_2
                else lines.arm(scope, deadline)  # type: ignore[attr-defined]
            )
            previous = state.arm(scope, line, owner)
            deliver([line], ok, cut, (scope, previous))
            if not ok and owner == 1:  # owner 1 stands for on_unavailable="raise"
                assert line not in server  # the arm raised: it did not happen
                state.unarm(scope, previous)
                if previous is None:
                    state.lost_disarms([scope])  # as the channel does
        elif op == "disarm":
            state.disarm(scope)
            disarm = lines.disarm(scope)  # type: ignore[attr-defined]
            deliver([disarm], ok, cut)
            if not ok:
                state.lost_disarms([scope])
        elif op in ("disarm_all", "disarm_mine"):
            scopes = state.scopes_of(owner if op == "disarm_mine" else None)
            sent, owed = state.disarm_all(scopes)
            deliver(sent, ok, cut)
            if not ok:
                state.lost_disarms(owed)
        elif ok:  # a restart that kept a state file: a stale copy survives
            state.failed(now)
        else:  # a restart without one: everything is gone
            server.clear()
            state.failed(now)
    deliver([], True)  # the server is back: the next delivery, or the retry thread
    expected: Dict[Tuple[int, str], float] = {
        (PID, s): _deadline(line) for s, (line, _) in state.armed.items()
    }
    assert server_state([decode(line) for line in server]) == expected


def _deadline(line: bytes) -> float:
    message = decode(line)
    if isinstance(message, Arm):
        return message.deadline
    assert isinstance(message, TimerRequestV1)
    return message.expiration_time


# Pinned by mutation testing: each test below fails with a line of Resync dropped.


def test_a_line_unsure_of_is_owed_again_though_recorded_before() -> None:
    r, _ = v2()
    line = b"arm-s\n"
    r.arm("s", line, None)
    r.failed(0.0)
    r.accepted("s", line)  # the resync delivered the arm
    r.unsure("s", refused=False)  # a later line about s raised as it was written
    assert r.resync() == [("s", line)]


def test_a_failure_drops_the_deferred_lines() -> None:
    r, lines = v2()
    d = lines.disarm("s")
    r.defer([("s", d)], ["s"])  # a handler's disarm, during a delivery
    r.arm("s", b"arm-s\n", None)  # re-armed after it
    r.failed(1.0)
    assert r.backlog() == [("s", b"arm-s\n")]  # not followed by the stale disarm


def test_a_reconnection_forgets_what_the_old_connection_took() -> None:
    r, _ = v2()
    r.arm("s", b"arm-s\n", None)
    r.failed(0.0)
    r.accepted("s", b"arm-s\n")
    r.reconnected()  # the queue that held it died with the server
    assert r.resync() == [("s", b"arm-s\n")]


# A scope armed during an outage whose arm never left owes no server a disarm; any sign
# that its line may have gone out makes the disarm owed again.


def unsent_then_released(*events: str) -> Tuple[Resync, bool]:
    """Arm "s" the slow way during an outage, apply ``events`` to its line, release it;
    return the state and whether its disarm is owed."""
    state, lines = v2()
    state.failed(0.0)  # the server is gone
    line = arm_line(lines, "s")
    state.arm("s", line, owner=1)
    state.unsent("s")
    for event in events:
        if event == "accepted":
            state.accepted("s", line)
        elif event == "refused":
            state.unsure("s", refused=True)
        elif event == "interrupted":
            state.unsure("s", refused=False)
    owed = state.disarm("s")
    if owed:
        state.lost_disarms(["s"])
    return state, owed


def test_a_disarm_of_an_arm_that_never_left_is_owed_to_no_server() -> None:
    state, owed = unsent_then_released("refused")
    assert not owed
    state.reconnected()  # not among the recent disarms either
    assert state.resync() == []
    assert state.next_retry(1.0) is None  # nothing to retry for


@pytest.mark.parametrize("event", ["accepted", "interrupted"])
def test_a_disarm_is_owed_once_the_arm_may_have_left(event: str) -> None:
    state, owed = unsent_then_released("refused", event)
    assert owed
    assert [decode(line) for line in lines_of(state.resync())] == [Disarm(PID, "s", START)]


def test_a_disarm_delivered_before_the_arm_that_never_left_stays_owed() -> None:
    # "s" was disarmed (delivered: among the recent) before the outage: a server that
    # died unread may restore it, and the arm that never left changes nothing to that.
    state, lines = v2()
    state.arm("s", arm_line(lines, "s"), owner=1)
    state.disarm("s")
    state.failed(0.0)
    state.arm("s", arm_line(lines, "s", 200.0), owner=1)
    state.unsent("s")
    assert not state.disarm("s")
    assert [decode(line) for line in lines_of(state.resync())] == [Disarm(PID, "s", START)]


def test_a_refused_arm_leaves_the_disarm_delivered_before_it_owed() -> None:
    # The refused arm's scope was taken back from the recent as if its own disarm had
    # just put it there: the earlier disarm, delivered and maybe unread by a server that
    # died, was owed no more, and a restored timer kept a healthy process armed.
    state, lines = v2()
    state.arm("s", arm_line(lines, "s"), owner=1)
    state.disarm("s")  # delivered: among the recent
    state.arm("s", arm_line(lines, "s", 200.0), owner=1)
    state.unsent("s")  # the slow way, and refused (nothing written)
    state.unarm("s", None)
    assert not state.arm_left("s")
    state.failed(0.0)
    assert [decode(line) for line in lines_of(state.resync())] == [Disarm(PID, "s", START)]


def test_a_rearm_found_lost_and_refused_leaves_the_disarm_before_it_owed() -> None:
    # The reconnection the re-arm met dropped the recent disarm of its scope (armed
    # again, tentatively), and the refused arm then owed nothing itself.
    state, lines = v2()
    state.arm("s", arm_line(lines, "s"), owner=1)
    assert state.disarm("s")  # delivered: among the recent
    state.arm("s", arm_line(lines, "s", 200.0), owner=1)  # again, the slow way
    state.unsent("s")
    state.reconnected()  # its connection found lost as it went
    state.unarm("s", None)  # ... and refused: it did not happen
    assert not state.arm_left("s")
    state.failed(0.0)
    assert [decode(line) for line in lines_of(state.resync())] == [Disarm(PID, "s", START)]
