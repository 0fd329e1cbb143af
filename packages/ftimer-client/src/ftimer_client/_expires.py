"""``configure()`` and ``expires``: torch's module-level API, plus a decorator form.

The default scope names the line that called ``expires(...)``, or the first decorator
line of the function it decorates (torch's ``file#line``), read with ``sys._getframe``
rather than torch's ``inspect.stack()`` (0.1 to over 1 ms).
Outside the main thread it ends in ``@tid-<native thread id>`` and inside an asyncio task
in ``@task-<id>``, so two threads or tasks running the same line hold distinct timers.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import math
import numbers
import os
import sys
import threading
import time
import types
import weakref
from types import TracebackType
from typing import Any, Callable, Optional, Protocol, Tuple, Type, TypeVar, runtime_checkable

from ftimer_protocol import surrogates_as_text

from ._client import FileTimerClient, beyond_float, not_seconds, plain_seconds

__all__ = ["TimerClient", "configure", "default_scope_suffix", "expires"]

F = TypeVar("F", bound=Callable[..., Any])


@runtime_checkable
class TimerClient(Protocol):
    """Anything with torch's ``TimerClient`` methods: ``expires`` accepts torch's clients
    (and ``isinstance(client, TimerClient)`` tells, as with torch's abstract class)."""

    def acquire(self, scope_id: str, expiration_time: float) -> None:
        """Arm timer ``scope_id`` of this process to expire at ``expiration_time``
        (wall-clock seconds, ``time.time()``)."""

    def release(self, scope_id: str) -> None:
        """Disarm timer ``scope_id`` of this process."""


_configured: Optional[TimerClient] = None
_main_thread = threading.main_thread().ident


def _after_fork_in_child() -> None:
    global _main_thread
    _main_thread = threading.get_ident()  # the thread that forked is the child's main


os.register_at_fork(after_in_child=_after_fork_in_child)


def configure(
    timer_client: Optional[TimerClient] = None, *, client: Optional[TimerClient] = None
) -> None:
    """Make ``timer_client`` (torch's keyword) the one ``expires`` uses when it is given
    none; None un-configures. ``client=`` is the same, under ftimer's older keyword.

    Raises:
        TypeError: both keywords are given, or what is given is not a client (a class,
            or something without callable ``acquire`` and ``release``).
    """
    global _configured
    if timer_client is not None and client is not None:
        raise TypeError("configure() takes timer_client or client, not both")
    given = timer_client if timer_client is not None else client
    # Said now, not at the first block's entry, far from the mistake. torch's
    # TimerClient has both methods: any of its clients passes.
    if given is not None:
        _check_client(given, "configure()")
    _configured = given


def _check_client(given: Any, who: str) -> None:
    """Raises TypeError: ``given`` is not a timer client (a class, such as
    ``FileTimerClient`` itself, a path, anything without callable ``acquire`` and
    ``release``)."""
    if (
        isinstance(given, type)
        or not callable(getattr(given, "acquire", None))
        or not callable(getattr(given, "release", None))
    ):
        raise TypeError(
            f"{who} takes a timer client, an object with acquire() and release() "
            f"such as FileTimerClient(...), not {given!r}"
        )


def default_scope_suffix() -> str:
    """Return what tells this thread and asyncio task apart in a default scope:
    ``""`` in the main thread outside any task."""
    ident = threading.get_ident()
    suffix = "" if ident == _main_thread else f"@tid-{threading.get_native_id()}"
    asyncio = sys.modules.get("asyncio")  # never import it: it costs ~10 ms
    if asyncio is not None and asyncio._get_running_loop() is not None:
        task = asyncio.current_task()
        if task is not None:
            suffix += f"@task-{id(task):x}"
    return suffix


@functools.lru_cache(maxsize=256)  # a lookup (~60 ns) a block, not an encode or a search
def _text(filename: str) -> str:
    """``filename`` as valid text (UTF-8 cannot carry a lone surrogate, which stands for
    a byte of a path that is not UTF-8): the scope ftimer's server reads for torch's line
    naming the same file (docs/protocol.md, "Lone surrogates")."""
    try:
        filename.encode()
    except UnicodeEncodeError:
        return surrogates_as_text(filename)
    return filename


def _site(filename: str, line: int) -> str:
    """The default scope's ``<file>#<line>``."""
    if not filename.isascii():  # O(1): a flag of the str
        filename = _text(filename)
    return f"{filename}#{line}"


def _decorated_site(func: Callable[..., Any]) -> str:
    """The default scope of a function ``expires`` decorates: where the function is
    defined, its first decorator's line (whoever applies the decorator, a helper
    included), else the caller's line (a callable without code of its own)."""
    code = getattr(inspect.unwrap(func), "__code__", None)
    if isinstance(code, types.CodeType):
        return _site(code.co_filename, code.co_firstlineno)
    frame = sys._getframe(2)
    return _site(frame.f_code.co_filename, frame.f_lineno)


def _check_after(after: Any) -> None:
    """Refuse what is not a number of seconds when ``expires`` is made (or ``beat()``
    called), not deep in a block's entry.

    Raises:
        TypeError: ``after`` is not a real number (``numbers.Real``), or is a bool.
    """
    if type(after) is bool or not isinstance(after, numbers.Real):
        raise not_seconds("after", after)


def _expiration_time(after: float) -> float:
    """Return ``time.time() + after``, the expiration time of torch's ``acquire``, for
    a client whose ``acquire`` is not ftimer's own (an int too large for a float: as
    ``math.inf``).

    Raises:
        ValueError: ``after`` is NaN or minus infinity (or an int below any float), as
            ``arm()`` refuses them: none is a time, and torch's server reads NaN as a
            timer that never fires and minus infinity as a release.
    """
    try:
        when: float = time.time() + plain_seconds(after)
    except OverflowError:  # an int beyond any float
        when = beyond_float(after)
    if not when > -math.inf:  # NaN or -inf
        raise ValueError(
            f"timer duration must be a number of seconds (math.inf: a timer that never "
            f"fires), not {after!r}"
        )
    return when


#: What an arm raises when it sent nothing (a refused argument, a closed client) or
#: nothing that was kept (``ServerUnavailable`` and torch's ``BrokenPipeError``); what a
#: release raises when trying again would change nothing (the client counts a disarm
#: it could not deliver as lost, and makes it good itself).
_NOT_ARMED = (ValueError, TypeError, RuntimeError, BrokenPipeError)

# What ``_own_acquire`` compares with: the method ``expires`` may skip.
_ACQUIRE = FileTimerClient.acquire
_Method = types.MethodType


def _own_acquire(client: TimerClient) -> bool:
    """Whether ``client.acquire`` is ``FileTimerClient.acquire`` bound to ``client``, so
    that a block may arm through ``arm()`` instead (the same message, without a
    wall-clock round trip). Looked at on every use, as torch's ``expires`` calls
    ``client.acquire`` every time: an override (a subclass's, one set on the instance,
    such as torch's tests' ``MagicMock(wraps=client.acquire)``, or one patched onto the
    class at any time) is called. ``release`` needs no look: every block calls
    ``client.release``. ``expires.__enter__`` has this inline (its hot path).

    The bound method tells, for ~30 ns; not ``"acquire" in client.__dict__``: on
    CPython 3.11 reading an instance's ``__dict__`` makes it a real dict for good, and
    every attribute read of the client slower (~0.5 us a block)."""
    method = client.acquire
    return type(method) is _Method and method.__func__ is _ACQUIRE


class expires:
    """Arm a timer for a block (``with``) or for each call of a function (decorator;
    not of a generator function, whose calls only make the generator: put the ``with``
    inside it).

    ``with expires(after=60): step()`` arms timer ``scope`` to expire in 60 s and
    disarms it when the block exits, however it exits: an exception in the block
    propagates unchanged, and a failure to disarm does not replace it. An interrupt
    (``KeyboardInterrupt``) while entering disarms it too, and one that lands in the
    disarm while leaving is followed by the disarm again before it propagates.

    As torch's ``expires``, the block calls ``client.acquire(scope, time.time() +
    after)`` on entry and ``client.release(scope)`` on exit, whatever they are (torch's
    client, a subclass's override, one set on the instance or patched onto the class,
    looked at on each entry); with an ftimer client whose ``acquire`` is its own, it
    arms through ``arm()`` instead, the same message.

    Args:
        after: seconds until the timer expires; negative: already expired;
            ``math.inf``: never (as with torch, a timer armed that never fires).
        scope: the timer's name; default: the call site of ``expires(...)`` (for a
            decorator, the decorated function's first decorator line, so that one
            object decorating two functions arms a timer for each), per thread and
            asyncio task.
        client: the client to use; default: the one given to ``configure()``, looked up
            when the block is entered.

    Raises:
        TypeError: ``after`` is not a real number of seconds (a str, None, a Decimal,
            a bool).
        RuntimeError: on entering, no client given and none configured; or this object
            is already in a ``with`` (in this thread or another: one object is one
            block at a time).
        ServerUnavailable: on entering, the arm was not delivered and the client's
            policy is "raise".
        ValueError: on entering, ``after`` is NaN or minus infinity, or the scope breaks
            the protocol's schema.
    """

    __slots__ = ("_active", "_after", "_client", "_free", "_scope", "_site")

    def __init__(
        self, after: float, scope: Optional[str] = None, client: Optional[TimerClient] = None
    ) -> None:
        if type(after) is not float and type(after) is not int:  # 2 compares a block
            _check_after(after)
        if client is not None and type(client) is not FileTimerClient:
            _check_client(client, "expires(client=...)")
        self._after = after
        self._scope = scope
        self._client = client
        self._active: Optional[Tuple[TimerClient, str]] = None
        # One ticket: the thread that takes it is in the block. list.pop() is one step,
        # so of threads sharing this object one gets in (a lock costs ~0.3 us a block).
        self._free = [True]
        if scope is None:
            # _site() of the caller's line, inlined: a block's hot path.
            frame = sys._getframe(1)
            filename = frame.f_code.co_filename
            if not filename.isascii():  # O(1): a flag of the str
                filename = _text(filename)
            self._site = f"{filename}#{frame.f_lineno}"

    @property
    def scope(self) -> Optional[str]:
        """The scope of the armed timer while in the block, else None."""
        return None if self._active is None else self._active[1]

    def __enter__(self) -> expires:
        try:
            self._free.pop()
        except IndexError:
            raise RuntimeError("this expires object is already in use") from None
        client = self._client if self._client is not None else _configured
        scope = self._scope
        try:
            if client is None:
                raise RuntimeError("Configure timer client before using countdown timers.")
            if scope is None:
                scope = self._site + default_scope_suffix()
            # _own_acquire(client), inlined: torch's acquire() unless it is ftimer's own.
            method = client.acquire
            if type(method) is _Method and method.__func__ is _ACQUIRE:
                client.arm(scope, self._after)  # type: ignore[attr-defined]
            else:
                client.acquire(scope, _expiration_time(self._after))
        except BaseException as e:
            self._free.append(True)
            if client is not None and scope is not None and not isinstance(e, _NOT_ARMED):
                # Something else (a signal handler's KeyboardInterrupt, say) may have
                # landed after the arm went out: no __exit__ follows a failed __enter__,
                # so disarm here, or a program that carries on is reaped for this block.
                with contextlib.suppress(Exception):
                    client.release(scope)
            raise
        self._active = (client, scope)
        return self

    def __exit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        active = self._active
        if active is None:
            return
        client, scope = active
        try:
            self._active = None
            self._free.append(True)
            client.release(scope)
        except _NOT_ARMED:
            # The block's own exception matters more than a disarm that did not get
            # through (the client makes the server agree, a resync, when it is back).
            # A client closed while in the block (by this thread or another) disarmed
            # the timer itself: nothing failed, whichever way the block ends.
            closed = isinstance(client, FileTimerClient) and client._closed
            if exc_type is None and not closed:
                raise
        except BaseException:
            # Something else (a signal handler's KeyboardInterrupt, say) landed in the
            # release: the disarm may not have gone out, and a program that carries on
            # would be reaped for this block. Releasing is idempotent: once more.
            with contextlib.suppress(Exception):
                client.release(scope)
            raise

    def beat(self, after: Optional[float] = None) -> None:
        """Heartbeat: push the block's deadline to ``after`` (default: the block's own
        duration) seconds from now.

        Raises:
            RuntimeError: not inside the block.
            ServerUnavailable: not delivered, with the client's policy "raise".
            TypeError: ``after`` is not a real number of seconds, or is a bool.
            ValueError: ``after`` is NaN or minus infinity.
        """
        active = self._active
        if active is None:
            raise RuntimeError("beat() outside the expires block")
        client, scope = active
        if after is None:
            after = self._after
        elif type(after) is not float and type(after) is not int:
            _check_after(after)
        if _own_acquire(client):
            client.arm(scope, after)  # type: ignore[attr-defined]
        else:
            client.acquire(scope, _expiration_time(after))
        if self._active != active:
            # The block ended while this beat (from another thread: a heartbeat thread)
            # was on its way: its disarm may have gone out before this arm, which would
            # leave the timer armed for a process that left the block, and reap it.
            with contextlib.suppress(Exception):
                client.release(scope)
            raise RuntimeError("beat() outside the expires block (it ended meanwhile)")

    def __call__(self, func: F) -> F:
        """Decorate ``func``: each call runs in its own ``expires`` block.

        An ``async def`` (or an object whose ``__call__`` is one) gets an ``async def``
        whose block covers the coroutine's run. ``staticmethod`` and ``classmethod``
        objects give the same kind of descriptor around the decorated function. A call
        of anything else that returns a coroutine (an ``async def`` behind an ordinary
        decorator, say) returns one that runs it in a block of its own, when it is
        awaited: the timer covers the coroutine's run, not only its making. Any other
        awaitable (an asyncio Future, which runs on its own) is returned as it is.

        Raises:
            TypeError: ``func`` is a generator or async generator function. A call of
                one only makes the generator: the block would end before its first step.
                Put ``with expires(...)`` inside it, around the steps to watch. A call of
                a wrapper of one (``functools.wraps``) that returns its generator raises
                it too, before the generator runs.
        """
        target: Any = func
        descriptor: Any = None
        if isinstance(target, (staticmethod, classmethod)):
            # Neither is callable (before 3.10) nor binds: decorate the function inside.
            descriptor, target = type(target), target.__func__
        # The function's, not the line that made this object: one object decorating two
        # functions must arm a timer for each.
        site = _decorated_site(target) if self._scope is None else ""
        run = self._wrap(target, site)
        return run if descriptor is None else descriptor(run)  # type: ignore[return-value]

    def _wrap(self, func: Callable[..., Any], site: str) -> Callable[..., Any]:
        """``func`` decorated (see ``__call__``), its default scope ``site``."""
        runs = _runs(func)
        if _makes_generators(func) or _makes_generators(runs):
            raise TypeError(_generator_refused(func))
        # A wrapper (functools.wraps) of a generator function may return the generator,
        # or drain it itself: its calls tell.
        hides_generators = _makes_generators(inspect.unwrap(func))
        after, scope, client = self._after, self._scope, self._client

        def block() -> expires:
            new = expires.__new__(expires)
            new._after, new._scope, new._client, new._active = after, scope, client, None
            new._free = [True]
            new._site = site
            return new

        if inspect.iscoroutinefunction(func) or inspect.iscoroutinefunction(runs):

            @functools.wraps(func)
            async def run_async(*args: Any, **kwargs: Any) -> Any:
                with block():
                    return await func(*args, **kwargs)

            return run_async

        @functools.wraps(func)
        def run(*args: Any, **kwargs: Any) -> Any:
            with block():
                result = func(*args, **kwargs)
            if hides_generators and isinstance(result, _GENERATORS):
                raise TypeError(_generator_refused(func))
            # Not a coroutine function, yet the call made a coroutine (a sync wrapper of
            # an ``async def``): its block just ended, so it runs in one of its own. Any
            # other awaitable (a Future, an object that is more than that) is returned
            # as it is: its caller may use it otherwise (cancel it, ``async with`` it).
            if type(result) is types.CoroutineType:
                return _awaited_in(block(), result)
            return result

        return run


_GENERATORS = (types.GeneratorType, types.AsyncGeneratorType)


def _makes_generators(func: Callable[..., Any]) -> bool:
    return inspect.isgeneratorfunction(func) or inspect.isasyncgenfunction(func)


def _awaited_in(block: expires, coroutine: types.CoroutineType[Any, Any, Any]) -> Any:
    """A coroutine that runs ``coroutine`` in ``block``, entered when awaited (in the
    awaiting task), under ``coroutine``'s name (in warnings, in a task's repr). Never
    started (a task cancelled first, a call never awaited), it closes ``coroutine``
    with it: Python's "never awaited" warning is said once, of the outer one."""
    outer: Any = _await_in(block, coroutine)  # an async def's: a CoroutineType
    outer.__name__, outer.__qualname__ = coroutine.__name__, coroutine.__qualname__
    weakref.finalize(outer, coroutine.close)
    return outer


async def _await_in(block: expires, coroutine: types.CoroutineType[Any, Any, Any]) -> Any:
    with block:
        return await coroutine


def _runs(func: Callable[..., Any]) -> Callable[..., Any]:
    """What runs when ``func`` is called: a callable object's ``__call__`` (not a
    class's, whose call makes an instance), else ``func``."""
    if isinstance(func, (type, functools.partial)) or inspect.isroutine(func):
        return func
    return getattr(func, "__call__", func)  # noqa: B004 (what runs, not a callable test)


def _generator_refused(func: Callable[..., Any]) -> str:
    name = getattr(func, "__qualname__", func)
    return (
        f"expires cannot decorate generator function {name}: a call only makes the "
        "generator, so the timer would be disarmed before its first step; put "
        "'with expires(...):' inside the generator instead"
    )
