"""Regression tests of a review: callables ``expires`` did not recognise (an ``async def``
behind a sync decorator, async callable objects, ``staticmethod``/``classmethod``,
generators in disguise), and arguments checked too late (``after``, ``labels``,
``configure()``).

Whether a timer covers a body is asked of a real FIFO reader (``FifoPeer``): from the
body, the client arms and releases a marker scope, and the test waits until the reader
has both, so that it has read everything sent before them.
"""

from __future__ import annotations

import asyncio
import contextlib
import decimal
import fractions
import functools
import gc
import itertools
import warnings
from typing import Any, AsyncIterator, Callable, Iterator, List, Set

import pytest

from ftimer_client import FileTimerClient, configure, expires
from ftimer_protocol import Arm, Disarm

from .conftest import FifoPeer, server_state

_marks = itertools.count()


def held(client: FileTimerClient, peer: FifoPeer) -> Set[str]:
    """The scopes the reader holds armed now (by all that was sent before this call)."""
    mark = f"mark-{next(_marks)}"
    client.arm(mark, 60)
    client.release(mark)
    messages = peer.wait_for(
        lambda ms: any(isinstance(m, Disarm) and m.scope_id == mark for m in ms)
    )
    return {scope for _, scope in server_state(messages)}


def logged(func: Callable[..., Any]) -> Callable[..., Any]:
    """An ordinary user decorator, not async-aware."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return func(*args, **kwargs)

    return wrapper


# -- 1. async callables expires did not recognise ---------------------------------------


def test_an_async_def_behind_a_sync_wraps_decorator_runs_in_a_block(peer: FifoPeer) -> None:
    # The sync wrapper armed, got the coroutine object back and disarmed at once: the
    # coroutine then ran unwatched.
    client = FileTimerClient(peer.path, labels={})
    seen: List[Set[str]] = []

    @expires(after=60, scope="step", client=client)
    @logged
    async def step(x: int) -> int:
        await asyncio.sleep(0)
        seen.append(held(client, peer))
        return x + 1

    assert asyncio.run(step(1)) == 2
    assert seen == [{"step"}]
    assert held(client, peer) == set()


def test_a_future_returned_by_a_sync_function_is_returned_as_it_is(peer: FifoPeer) -> None:
    # It runs on its own: its caller may cancel it or add callbacks.
    client = FileTimerClient(peer.path, labels={})

    @expires(after=60, scope="submit", client=client)
    def submit(loop: asyncio.AbstractEventLoop) -> asyncio.Future[int]:
        return loop.create_future()

    async def main() -> None:
        future = submit(asyncio.get_running_loop())
        assert isinstance(future, asyncio.Future)
        future.set_result(1)
        assert await future == 1

    asyncio.run(main())
    assert held(client, peer) == set()


def test_an_awaitable_that_is_more_than_that_is_returned_as_it_is(peer: FifoPeer) -> None:
    # Anything with __await__ came back as a bare coroutine: `async with` of a request
    # (aiohttp's session.get), a Deferred's callbacks, failed. Only a coroutine is run
    # in a block of its own.
    client = FileTimerClient(peer.path, labels={})

    class Request:
        def __await__(self):  # type: ignore[no-untyped-def]
            return iter(())

        async def __aenter__(self) -> str:
            return "entered"

        async def __aexit__(self, *_: object) -> None:
            pass

    @expires(after=60, scope="get", client=client)
    def get() -> Request:
        return Request()

    async def main() -> str:
        assert type(get()) is Request
        async with get() as entered:
            return entered

    assert asyncio.run(main()) == "entered"


def test_a_coroutine_run_in_a_block_is_named_and_warned_of_as_the_user_s(
    peer: FifoPeer,
) -> None:
    # The coroutine run in a block took the wrapper's name ("_awaited_in") in a task's
    # repr and in Python's "never awaited" warning; a task cancelled before its first
    # step left the user's coroutine unawaited, with a warning of its own.
    client = FileTimerClient(peer.path, labels={})

    @expires(after=60, scope="job", client=client)
    @logged
    async def job() -> int:
        return 1

    async def cancelled_first() -> str:
        task = asyncio.get_running_loop().create_task(job())
        name = repr(task)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return name

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert "<locals>.job() running" in asyncio.run(cancelled_first())
        job()  # never awaited
        gc.collect()
    said = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(said) == 1
    assert said[0].endswith("<locals>.job' was never awaited")


def test_an_object_with_an_async_call_runs_in_a_block(peer: FifoPeer) -> None:
    client = FileTimerClient(peer.path, labels={})
    seen: List[Set[str]] = []

    class Step:
        async def __call__(self, x: int) -> int:
            await asyncio.sleep(0)
            seen.append(held(client, peer))
            return x * 2

    step = expires(after=60, scope="obj", client=client)(Step())
    assert asyncio.iscoroutinefunction(step)
    assert asyncio.run(step(4)) == 8
    assert seen == [{"obj"}]
    assert held(client, peer) == set()


def test_expires_above_staticmethod_and_classmethod_keeps_the_descriptor(
    peer: FifoPeer,
) -> None:
    # It made a plain function of the descriptor: K().s(1) passed the instance, and
    # K.c() called the classmethod object, each failing after an arm and a disarm.
    client = FileTimerClient(peer.path, labels={})
    seen: List[Set[str]] = []

    class K:
        @expires(after=60, scope="static", client=client)
        @staticmethod
        def s(x: int) -> int:
            seen.append(held(client, peer))
            return x

        @expires(after=60, scope="class", client=client)
        @classmethod
        def c(cls) -> type:
            seen.append(held(client, peer))
            return cls

        @expires(after=60, scope="async-static", client=client)
        @staticmethod
        async def a(x: int) -> int:
            await asyncio.sleep(0)
            seen.append(held(client, peer))
            return x

    assert isinstance(K.__dict__["s"], staticmethod)
    assert isinstance(K.__dict__["c"], classmethod)
    assert K.s(1) == 1
    assert K().s(2) == 2
    assert K.c() is K
    assert K().c() is K
    assert asyncio.run(K().a(3)) == 3
    assert seen == [{"static"}] * 2 + [{"class"}] * 2 + [{"async-static"}]
    assert held(client, peer) == set()


def test_the_default_scope_above_a_staticmethod_is_the_function_s(peer: FifoPeer) -> None:
    client = FileTimerClient(peer.path, labels={})

    def plain() -> None:
        pass

    first_line = plain.__code__.co_firstlineno
    wrapped = expires(after=60, client=client)(staticmethod(plain))
    wrapped.__func__()
    arm = peer.wait_count(2)[0]
    assert isinstance(arm, Arm)
    assert arm.scope_id == f"{__file__}#{first_line}"


# -- 2. generators in disguise ----------------------------------------------------------


def _gen() -> Iterator[int]:
    yield 1


async def _agen() -> AsyncIterator[int]:
    yield 1


class _GenCall:
    def __call__(self) -> Iterator[int]:
        yield 1


@pytest.mark.parametrize(
    "func",
    [staticmethod(_gen), classmethod(_gen), _GenCall()],
    ids=["staticmethod", "classmethod", "callable-object"],
)
def test_generator_functions_in_disguise_are_refused_when_decorated(func: Any) -> None:
    with pytest.raises(TypeError, match=r"generator function .*with expires"):
        expires(after=60, scope="g")(func)


def test_a_wrapper_that_returns_its_generator_is_refused_before_it_runs(
    peer: FifoPeer,
) -> None:
    # functools.wraps says a generator function is inside, not what the wrapper returns:
    # the call tells. One that returns the generator is refused; one that drains it, or a
    # function that returns a generator made elsewhere, is a function like any other.
    client = FileTimerClient(peer.path, labels={})
    ran: List[str] = []

    def gen() -> Iterator[int]:
        ran.append("gen")
        yield 1

    async def agen() -> AsyncIterator[int]:
        ran.append("agen")
        yield 1

    for hidden in (logged(gen), logged(agen)):
        decorated = expires(after=60, scope="made", client=client)(hidden)
        with pytest.raises(TypeError, match=r"generator function .*with expires"):
            decorated()
    assert ran == []

    @functools.wraps(gen)
    def drained() -> List[int]:
        return list(gen())

    def made_elsewhere() -> Iterator[int]:
        return gen()

    assert expires(after=60, scope="made", client=client)(drained)() == [1]
    assert list(expires(after=60, scope="made", client=client)(made_elsewhere)()) == [1]
    assert held(client, peer) == set()


# -- 3. after that is not a number ------------------------------------------------------

NOT_SECONDS = ["60", None, decimal.Decimal("60"), True, b"1"]


@pytest.mark.parametrize("after", NOT_SECONDS, ids=repr)
def test_after_that_is_not_a_number_is_refused_when_expires_is_made(after: Any) -> None:
    with pytest.raises(
        TypeError, match=rf"after must be a number of seconds .*{type(after).__name__}"
    ):
        expires(after=after, scope="s")


@pytest.mark.parametrize("after", ["10", decimal.Decimal("10"), b"1"], ids=repr)
def test_beat_refuses_after_that_is_not_a_number(peer: FifoPeer, after: Any) -> None:
    client = FileTimerClient(peer.path, labels={})
    with expires(after=60, scope="b", client=client) as block:
        with pytest.raises(
            TypeError, match=rf"after must be a number of seconds .*{type(after).__name__}"
        ):
            block.beat(after)
        assert held(client, peer) == {"b"}  # still armed


def test_a_real_number_other_than_int_or_float_is_taken(peer: FifoPeer) -> None:
    client = FileTimerClient(peer.path, labels={})
    with expires(after=fractions.Fraction(120), scope="f", client=client) as block:
        block.beat(fractions.Fraction(1, 2))
    arm, beat = [m for m in peer.wait_count(3) if isinstance(m, Arm)]
    assert 60 < arm.deadline - beat.deadline < 120


# -- 4. labels that are not a mapping ---------------------------------------------------


@pytest.mark.parametrize("labels", [[("job", "x")], "job=x", ("job",)], ids=repr)
@pytest.mark.parametrize("protocol", [None, 1])
def test_labels_that_are_not_a_mapping_are_refused(
    peer: FifoPeer, labels: Any, protocol: Any
) -> None:
    with pytest.raises(TypeError, match=r"labels must be a mapping of str to str"):
        FileTimerClient(peer.path, labels=labels, protocol=protocol)


# -- 5. configure() given what is not a client ------------------------------------------


@pytest.mark.parametrize("bad", [FileTimerClient, "/run/ftimer/timer.fifo", 42, object()])
def test_configure_refuses_what_is_not_a_client(peer: FifoPeer, bad: Any) -> None:
    client = FileTimerClient(peer.path, labels={})
    configure(client)
    for call in (lambda: configure(bad), lambda: configure(timer_client=bad)):
        with pytest.raises(TypeError, match=r"configure\(\) takes a timer client.*not "):
            call()
    with expires(after=60, scope="kept"):  # the client configured before is kept
        pass
    assert [m.scope_id for m in peer.wait_count(2)] == ["kept", "kept"]


def test_configure_takes_any_object_with_acquire_and_release() -> None:
    # torch's TimerClient, or a duck-typed one: what torch's own configure takes.
    calls: List[str] = []

    class Duck:
        def acquire(self, scope_id: str, expiration_time: float) -> None:
            calls.append(f"acquire {scope_id}")

        def release(self, scope_id: str) -> None:
            calls.append(f"release {scope_id}")

    configure(Duck())
    with expires(after=60, scope="d"):
        pass
    assert calls == ["acquire d", "release d"]
