"""configure() and expires: context manager, decorator, default scopes."""

from __future__ import annotations

import asyncio
import os
import sys
import threading
from typing import AsyncIterator, Iterator

import pytest

from ftimer_client import FileTimerClient, TimerClient, configure, expires
from ftimer_protocol import Arm, Disarm

from .conftest import FifoPeer, server_state

ME = os.getpid()
HERE = __file__


def armed_scopes(messages: list) -> list:
    return [m.scope_id for m in messages if isinstance(m, Arm)]


def test_without_a_client_it_raises_as_torch_does() -> None:
    with pytest.raises(RuntimeError, match="Configure timer client"), expires(after=1):
        pass


def test_configure_none_unconfigures(peer: FifoPeer) -> None:
    configure(FileTimerClient(peer.path, labels={}))
    with expires(after=1):
        pass
    configure(None)
    with pytest.raises(RuntimeError), expires(after=1):
        pass


def test_default_scope_is_the_call_site(peer: FifoPeer) -> None:
    configure(FileTimerClient(peer.path, labels={}))
    with expires(after=60) as block:
        line = sys._getframe().f_lineno - 1
        assert block.scope == f"{HERE}#{line}"
    assert block.scope is None
    arm, disarm = peer.wait_count(2)
    assert isinstance(arm, Arm)
    assert arm.scope_id == f"{HERE}#{line}"
    assert disarm == Disarm(ME, arm.scope_id, arm.start_time)


def test_explicit_client_and_scope(peer: FifoPeer) -> None:
    client = FileTimerClient(peer.path, labels={})
    with expires(after=60, scope="named", client=client):
        pass
    assert armed_scopes(peer.wait_count(2)) == ["named"]


def test_exceptions_propagate_unchanged_and_the_timer_is_released(peer: FifoPeer) -> None:
    configure(FileTimerClient(peer.path, labels={}))
    error = KeyError("mine")
    with pytest.raises(KeyError) as info, expires(after=60, scope="s"):
        raise error
    assert info.value is error
    assert server_state(peer.wait_count(2)) == {}


def test_a_client_closed_in_the_block_never_replaces_the_block_s_exception(
    peer: FifoPeer,
) -> None:
    # The exit's release of a closed client raised RuntimeError in place of the block's
    # own exception. close() disarmed the timer already: nothing is left armed either.
    client = FileTimerClient(peer.path, labels={})
    error = KeyError("mine")

    def block() -> None:
        with expires(after=60, scope="s", client=client):
            client.close()
            raise error

    with pytest.raises(KeyError) as info:
        block()
    assert info.value is error
    assert server_state(peer.wait_count(2)) == {}


def test_a_client_closed_in_the_block_lets_the_block_end_normally(peer: FifoPeer) -> None:
    # The exit's release raised "this FileTimerClient is closed" out of a block that
    # did nothing wrong (another thread's, say): close() had disarmed its timer.
    client = FileTimerClient(peer.path, labels={})
    with expires(after=60, scope="s", client=client):
        client.close()
    assert server_state(peer.wait_count(2)) == {}
    with pytest.raises(RuntimeError, match="closed"):
        client.release("s")  # outside a block, a closed client still says so


def test_recursion_at_one_call_site_rearms_the_same_timer(peer: FifoPeer) -> None:
    configure(FileTimerClient(peer.path, labels={}))

    def recurse(depth: int) -> None:
        with expires(after=60):
            if depth:
                recurse(depth - 1)

    recurse(2)
    messages = peer.wait_count(6)
    assert len(set(armed_scopes(messages))) == 1
    assert [type(m) for m in messages] == [Arm, Arm, Arm, Disarm, Disarm, Disarm]


def test_decorator_arms_around_each_call_at_the_decorator_line(peer: FifoPeer) -> None:
    client = FileTimerClient(peer.path, labels={})
    decorator_line = sys._getframe().f_lineno + 2

    @expires(after=60, client=client)
    def step(x: int) -> int:
        """Doc."""
        if x < 0:
            raise ValueError(x)
        return x * 2

    assert step.__doc__ == "Doc."
    assert step.__name__ == "step"
    assert step(21) == 42
    with pytest.raises(ValueError, match="-1"):
        step(-1)
    messages = peer.wait_count(4)
    assert armed_scopes(messages) == [f"{HERE}#{decorator_line}"] * 2
    assert server_state(messages) == {}


def test_decorator_on_a_coroutine_function(peer: FifoPeer) -> None:
    client = FileTimerClient(peer.path, labels={})

    @expires(after=60, scope="async-step", client=client)
    async def step() -> str:
        await asyncio.sleep(0)
        return "done"

    assert asyncio.run(step()) == "done"
    assert armed_scopes(peer.wait_count(2)) == ["async-step"]


def test_decorating_a_generator_function_is_refused() -> None:
    # A call only makes the generator: the block armed and disarmed around that, and
    # the steps ran with no timer at all.
    def batches() -> Iterator[int]:
        yield 1

    async def async_batches() -> AsyncIterator[int]:
        yield 1

    for func in (batches, async_batches):
        with pytest.raises(TypeError, match=r"generator function .*with expires"):
            expires(after=60, scope="s")(func)


def test_the_configured_client_is_looked_up_when_the_block_is_entered(peer: FifoPeer) -> None:
    @expires(after=60, scope="late")
    def step() -> None:
        pass

    with pytest.raises(RuntimeError):
        step()
    configure(FileTimerClient(peer.path, labels={}))
    step()
    assert armed_scopes(peer.wait_count(2)) == ["late"]


def test_beat_extends_the_blocks_timer(peer: FifoPeer) -> None:
    configure(FileTimerClient(peer.path, labels={}))
    with expires(after=1, scope="s") as block:
        block.beat()
        block.beat(after=100)
    first, second, third, _ = peer.wait_count(4)
    assert isinstance(first, Arm)
    assert isinstance(second, Arm)
    assert isinstance(third, Arm)
    assert third.deadline - first.deadline > 98
    with pytest.raises(RuntimeError, match="outside"):
        block.beat()


def test_an_expires_object_cannot_be_entered_twice(peer: FifoPeer) -> None:
    block = expires(after=60, scope="s", client=FileTimerClient(peer.path, labels={}))
    with block, pytest.raises(RuntimeError, match="already"), block:
        pass


def test_expires_drives_any_torch_style_client() -> None:
    calls = []

    class TorchLike:
        def acquire(self, scope_id: str, expiration_time: float) -> None:
            calls.append(("acquire", scope_id))

        def release(self, scope_id: str) -> None:
            calls.append(("release", scope_id))

    with expires(after=5, scope="s", client=TorchLike()):
        pass
    assert calls == [("acquire", "s"), ("release", "s")]


# -- per thread and per task --------------------------------------------------------------


def test_threads_at_one_line_hold_distinct_timers(peer: FifoPeer) -> None:
    configure(FileTimerClient(peer.path, labels={}))
    inside = threading.Barrier(3)
    leave_b = threading.Event()
    scopes: dict = {}

    def run(name: str, wait: threading.Event) -> None:
        with expires(after=60) as block:
            scopes[name] = block.scope
            inside.wait(10)
            wait.wait(10)

    left = threading.Event()
    a = threading.Thread(target=run, args=("a", left))
    b = threading.Thread(target=run, args=("b", leave_b))
    a.start()
    b.start()
    inside.wait(10)
    leave_b.set()
    b.join(10)
    # b left the same line: a's timer must still be armed.
    state = server_state(peer.wait_count(3))
    assert (ME, scopes["a"]) in state
    assert (ME, scopes["b"]) not in state
    left.set()
    a.join(10)
    assert scopes["a"] != scopes["b"]
    assert scopes["a"].rsplit("@tid-", 1)[0] == scopes["b"].rsplit("@tid-", 1)[0]
    assert server_state(peer.wait_count(4)) == {}


def test_many_threads_many_blocks(peer: FifoPeer) -> None:
    configure(FileTimerClient(peer.path, labels={}))

    def run() -> None:
        for _ in range(300):
            with expires(after=60):
                pass

    threads = [threading.Thread(target=run) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    messages = peer.wait_count(6 * 300 * 2, timeout=30)
    assert peer.errors == []
    assert len(set(armed_scopes(messages))) == 6
    assert server_state(messages) == {}


def test_asyncio_tasks_at_one_line_hold_distinct_timers(peer: FifoPeer) -> None:
    configure(FileTimerClient(peer.path, labels={}))
    seen: list = []

    async def worker(gate: asyncio.Event, both_in: asyncio.Event) -> None:
        with expires(after=60) as block:
            seen.append(block.scope)
            if len(seen) == 2:
                both_in.set()
            await gate.wait()

    async def main() -> None:
        first, second, both_in = asyncio.Event(), asyncio.Event(), asyncio.Event()
        t1 = asyncio.create_task(worker(first, both_in))
        t2 = asyncio.create_task(worker(second, both_in))
        await both_in.wait()
        second.set()
        await t2
        state = server_state(peer.wait_count(3))
        assert (ME, seen[0]) in state
        assert (ME, seen[1]) not in state
        first.set()
        await t1

    asyncio.run(main())
    assert seen[0] != seen[1]
    assert "@task-" in seen[0]
    assert server_state(peer.wait_count(4)) == {}


def test_one_object_in_two_threads_is_refused_not_leaked() -> None:
    # The second thread to enter is refused while the first is still arming; were both
    # let in, one's exit would release the other's scope and leave its own armed.
    arming, go = threading.Event(), threading.Event()
    armed: list = []
    released: list = []

    class Slow:
        def acquire(self, scope_id: str, expiration_time: float) -> None:
            armed.append(scope_id)
            if len(armed) == 1:
                arming.set()
                go.wait(10)

        def release(self, scope_id: str) -> None:
            released.append(scope_id)

    guard = expires(after=60, client=Slow())

    def block() -> None:
        with guard:
            pass

    first = threading.Thread(target=block)
    first.start()
    assert arming.wait(10)
    try:
        with pytest.raises(RuntimeError, match="already in use"), guard:
            pass
    finally:
        go.set()
        first.join(10)
    assert len(armed) == 1
    assert released == armed


def test_timer_client_is_checkable_at_runtime() -> None:
    class Recorder:
        def acquire(self, scope_id: str, expiration_time: float) -> None: ...

        def release(self, scope_id: str) -> None: ...

    assert isinstance(Recorder(), TimerClient)
    assert isinstance(FileTimerClient("/nonexistent/timer.fifo"), TimerClient)
    assert not isinstance(object(), TimerClient)


class Interrupted(FileTimerClient):
    """A client whose arm is interrupted once it went out, as by a signal handler that
    raises KeyboardInterrupt at the arm's last step."""

    def _check_still_open(self) -> None:
        super()._check_still_open()
        raise KeyboardInterrupt


class InterruptedTorchClient:
    """torch's interface: the acquire is sent, then the interrupt lands."""

    def __init__(self) -> None:
        self.calls: list = []

    def acquire(self, scope_id: str, expiration_time: float) -> None:
        self.calls.append(("acquire", scope_id))
        raise KeyboardInterrupt

    def release(self, scope_id: str) -> None:
        self.calls.append(("release", scope_id))


def test_an_interrupt_after_the_arm_went_out_disarms_the_block(peer: FifoPeer) -> None:
    # No __exit__ follows a failed __enter__: the timer stayed armed, and a program that
    # caught the interrupt and carried on was reaped when it expired.
    client = Interrupted(peer.path, labels={})
    with pytest.raises(KeyboardInterrupt), expires(after=60, scope="s", client=client):
        pass
    arm, disarm = peer.wait_count(2)
    assert (type(arm), disarm) == (Arm, Disarm(ME, "s", arm.start_time))
    assert client.armed == frozenset()
    other = InterruptedTorchClient()
    with pytest.raises(KeyboardInterrupt), expires(after=60, scope="t", client=other):
        pass
    assert other.calls == [("acquire", "t"), ("release", "t")]


class ReleaseInterrupted(FileTimerClient):
    """A client into whose release a signal handler's exception lands once, before it
    sent anything."""

    interrupts = 1

    def release(self, scope_id: str) -> None:
        if self.interrupts:
            self.interrupts = 0
            raise KeyboardInterrupt
        super().release(scope_id)


class ReleaseInterruptedTorchClient(InterruptedTorchClient):
    def acquire(self, scope_id: str, expiration_time: float) -> None:
        self.calls.append(("acquire", scope_id))

    def release(self, scope_id: str) -> None:
        self.calls.append(("release", scope_id))
        if len(self.calls) == 2:
            raise KeyboardInterrupt


def test_an_interrupt_in_the_exits_release_disarms_the_block_all_the_same(
    peer: FifoPeer,
) -> None:
    # The exit let the interrupt through with the disarm never sent: a program that
    # caught it and carried on was reaped when the block's timer expired.
    client = ReleaseInterrupted(peer.path, labels={})
    with pytest.raises(KeyboardInterrupt), expires(after=60, scope="s", client=client):
        pass
    assert client.armed == frozenset()
    client.arm("end", 60)
    sent = peer.wait_for(lambda m: bool(m) and m[-1].scope_id == "end")
    assert set(server_state(sent)) == {(ME, "end")}
    other = ReleaseInterruptedTorchClient()
    with pytest.raises(KeyboardInterrupt), expires(after=60, scope="t", client=other):
        pass
    assert other.calls == [("acquire", "t"), ("release", "t"), ("release", "t")]


def test_an_arm_refused_sends_no_disarm(peer: FifoPeer) -> None:
    client = FileTimerClient(peer.path, labels={})
    client.arm("s", 60)  # an outer block's timer of the same scope
    with pytest.raises(ValueError, match="duration"), expires(float("nan"), "s", client):
        pass
    assert client.armed == frozenset({"s"})  # the outer timer is left alone
    client.arm("end", 60)  # the FIFO keeps order: whatever was sent comes before it
    sent = peer.wait_for(lambda m: bool(m) and m[-1].scope_id == "end")
    assert [(type(m), m.scope_id) for m in sent] == [(Arm, "s"), (Arm, "end")]
