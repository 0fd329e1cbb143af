"""One ``expires`` object decorating several functions arms a timer for each; a
``write_timeout`` longer than ``poll()`` takes waits instead of raising; an int too large
for a float arms a timer that never fires (a negative one is refused); ``expires``
refuses NaN and minus infinity whatever the client. Every server here is a recording
peer: nothing is ever signalled."""

from __future__ import annotations

import contextlib
import functools
import math
import os
import sys
from collections.abc import Iterator
from typing import Any, Callable, Dict, List, Tuple

import pytest

from ftimer_client import FileTimerClient, expires
from ftimer_client._fifo import FifoWriter
from ftimer_client._socket import SocketWriter
from ftimer_protocol import MAX_TIME, Arm, TimerRequestV1

from .conftest import FifoPeer, Peer, server_state

ME = os.getpid()
HERE = __file__
HUGE = 10**400  # no float holds it


class Recorder:
    """A client with torch's surface only (not ftimer's): records what it is asked."""

    def __init__(self) -> None:
        self.calls: List[Tuple[str, str, Any]] = []

    def acquire(self, scope_id: str, expiration_time: float) -> None:
        self.calls.append(("acquire", scope_id, expiration_time))

    def release(self, scope_id: str) -> None:
        self.calls.append(("release", scope_id, None))


# -- 1: one object decorating two functions -------------------------------------------------


def test_one_object_decorating_two_functions_arms_a_timer_for_each(peer: FifoPeer) -> None:
    # Both had the scope of the line that made the object: load_batch's exit disarmed
    # train_step's timer while train_step still ran.
    watchdog = expires(after=60, client=FileTimerClient(peer.path, labels={}))
    load_line = sys._getframe().f_lineno + 2

    @watchdog
    def load_batch() -> None:
        pass

    step_line = sys._getframe().f_lineno + 2

    @watchdog
    def train_step() -> Dict[Tuple[int, str], float]:
        load_batch()
        return server_state(peer.wait_count(3))  # arm, arm, disarm

    assert list(train_step()) == [(ME, f"{HERE}#{step_line}")]
    messages = peer.wait_count(4)
    assert [m.scope_id for m in messages if isinstance(m, Arm)] == [
        f"{HERE}#{step_line}",
        f"{HERE}#{load_line}",
    ]
    assert server_state(messages) == {}


def test_one_object_applied_by_a_helper_arms_a_timer_for_each_function(peer: FifoPeer) -> None:
    # The scope was the line that called the decorator: applied inside a helper (or a
    # framework's registration), every function got the helper's line, one timer.
    watchdog = expires(after=60, client=FileTimerClient(peer.path, labels={}))

    def watched(func: Callable[[], None]) -> Callable[[], None]:
        @functools.wraps(func)  # and under another decorator: the function's own line
        def wrapper() -> None:
            func()

        return watchdog(wrapper)

    first = sys._getframe().f_lineno + 2

    @watched
    def load_batch() -> None:
        pass

    second = sys._getframe().f_lineno + 2

    @watched
    def train_step() -> None:
        load_batch()

    train_step()
    arms = [m.scope_id for m in peer.wait_count(4) if isinstance(m, Arm)]
    assert arms == [f"{HERE}#{second}", f"{HERE}#{first}"]


# -- 2: a write_timeout longer than poll() takes, an int beyond any float -------------------


@contextlib.contextmanager
def resumed_at_poll(peer: Peer) -> Iterator[List[str]]:
    """Profile this thread: as it calls ``poll()`` (its wait for room), ``peer`` reads
    again. Yields the list of the polls seen, to show that the wait happened."""
    polls: List[str] = []

    def profile(frame: Any, event: str, arg: Any) -> None:
        if event == "c_call" and getattr(arg, "__name__", None) == "poll":
            polls.append(event)
            peer.resume()

    sys.setprofile(profile)
    try:
        yield polls
    finally:
        sys.setprofile(None)


@pytest.mark.parametrize("write_timeout", [3e6, 1e300])
def test_a_write_timeout_longer_than_poll_takes_waits_for_room(
    peer: FifoPeer, write_timeout: float
) -> None:
    # poll() takes at most 2**31 - 1 ms (24.8 days): a longer wait raised OverflowError
    # as soon as the pipe was full.
    client = FileTimerClient(peer.path, write_timeout=write_timeout, labels={})
    peer.pause()
    peer.fill()
    peer.take()
    with resumed_at_poll(peer) as polls:
        client.arm("a", 60)
    assert polls
    (arm,) = peer.wait_count(1)
    assert isinstance(arm, Arm)
    assert arm.scope_id == "a"


def test_a_wait_for_room_longer_than_poll_takes_waits(server: Peer) -> None:
    # The retry thread's wait (Writer.wait_room), on either transport.
    path = str(server.path)
    writer = FifoWriter(path) if isinstance(server, FifoPeer) else SocketWriter(path)
    try:
        server.pause()
        server.fill()
        with resumed_at_poll(server) as polls:
            assert writer.wait_room(3e6)
        assert polls
    finally:
        writer.close()


@pytest.mark.parametrize("protocol", [1, 2])
def test_an_int_beyond_any_float_arms_a_timer_that_never_fires(
    peer: FifoPeer, protocol: int
) -> None:
    # float + 10**400 raised OverflowError from arm(), acquire() and expires.
    client = FileTimerClient(peer.path, protocol=protocol, labels={})
    client.arm("arm", HUGE)
    client.acquire("acquire", HUGE)
    with expires(after=HUGE, scope="expires", client=client):
        pass
    messages = peer.wait_count(4)
    kept = [m for m in messages if isinstance(m, (Arm, TimerRequestV1))][:3]
    assert [m.scope_id for m in kept] == ["arm", "acquire", "expires"]
    for m in kept:
        assert (m.deadline if isinstance(m, Arm) else m.expiration_time) == MAX_TIME
    assert set(server_state(messages)) == {(ME, "arm"), (ME, "acquire")}


@pytest.mark.parametrize("protocol", [1, 2])
def test_a_negative_int_beyond_any_float_is_refused_as_minus_infinity(
    peer: FifoPeer, protocol: int
) -> None:
    client = FileTimerClient(peer.path, protocol=protocol, labels={})
    with pytest.raises(ValueError, match="below any float"):
        client.arm("arm", -HUGE)
    with (
        pytest.raises(ValueError, match="below any float"),
        expires(after=-HUGE, scope="expires", client=client),
    ):
        pass
    client.arm("end", 60)
    messages = peer.wait_count(1)
    assert [m.scope_id for m in messages] == ["end"]  # type: ignore[union-attr]


def test_an_int_beyond_any_float_with_a_foreign_client() -> None:
    recorder = Recorder()
    with expires(after=HUGE, scope="s", client=recorder) as block:
        block.beat(HUGE)
    assert recorder.calls == [
        ("acquire", "s", math.inf),
        ("acquire", "s", math.inf),
        ("release", "s", None),
    ]
    with (
        pytest.raises(ValueError, match="below any float"),
        expires(after=-HUGE, scope="s", client=recorder),
    ):
        pass
    assert len(recorder.calls) == 3  # nothing asked of the client


# -- 3: NaN and minus infinity, whatever the client -----------------------------------------


@pytest.mark.parametrize("after", [math.nan, -math.inf])
def test_expires_refuses_nan_and_minus_infinity_with_a_foreign_client(after: float) -> None:
    # They went to the client's acquire() as time.time() + after: torch's server reads
    # NaN as a timer that never fires and minus infinity as a release.
    recorder = Recorder()
    with (
        pytest.raises(ValueError, match="number of seconds"),
        expires(after=after, scope="s", client=recorder),
    ):
        pass
    assert recorder.calls == []
    with (
        expires(after=60, scope="s", client=recorder) as block,
        pytest.raises(ValueError, match="number of seconds"),
    ):
        block.beat(after)
    assert [call[0] for call in recorder.calls] == ["acquire", "release"]
