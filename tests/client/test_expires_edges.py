"""``expires`` edges pinned by mutation testing of ``_expires.py``.

The block's disarm: one object is entered again after a block, and after a failed
entry; an ``__exit__`` with no block entered (or run twice) does nothing; a torch-style
client's acquire that raised one of the "not armed" errors is followed by no release
(it would disarm an outer block's timer); a failed release never replaces the block's
exception, and is raised after a clean block (over a real FIFO too). ``configure()``:
both keywords refused, the older ``client=`` taken, an object with only one of the two
methods refused. ``beat()``: a bool refused whatever the client, ftimer's own client
armed through ``arm()``. Default scopes: a file name that is not ASCII, a decorated
callable without code of its own, a class decorated, a thread's native id, a task in a
thread, a child forked by a thread other than the main one. Servers are the recording
peers of ``conftest.py`` or clients that only record: nothing is ever signalled.
"""

from __future__ import annotations

import asyncio
import functools
import pathlib
import sys
import threading
from typing import Any, Dict, List, Optional, Tuple
from unittest import mock

import pytest

from ftimer_client import FileTimerClient, ServerUnavailable, configure, expires
from ftimer_client._expires import default_scope_suffix
from ftimer_protocol import Arm, Disarm

from .conftest import FifoPeer, server_state
from .test_fork import in_child

#: What an arm that sent nothing kept raises, as torch's clients do (BrokenPipeError:
#: torch's FileTimerClient with no server).
NOT_ARMED = [ValueError, TypeError, RuntimeError, BrokenPipeError]


class Recorder:
    """A client with torch's surface only: records its calls, and raises ``acquire_error``
    from ``acquire`` or ``release_error`` from ``release`` when set."""

    def __init__(
        self,
        acquire_error: Optional[BaseException] = None,
        release_error: Optional[BaseException] = None,
    ) -> None:
        self.calls: List[Tuple[str, str]] = []
        self.acquire_error = acquire_error
        self.release_error = release_error

    def acquire(self, scope_id: str, expiration_time: float) -> None:
        self.calls.append(("acquire", scope_id))
        if self.acquire_error is not None:
            raise self.acquire_error

    def release(self, scope_id: str) -> None:
        self.calls.append(("release", scope_id))
        if self.release_error is not None:
            raise self.release_error


@pytest.mark.parametrize("error", NOT_ARMED)
def test_an_acquire_that_raised_a_not_armed_error_is_followed_by_no_release(
    error: type,
) -> None:
    # The acquire kept nothing: a release of the scope would disarm an outer block's
    # timer of the same scope, leaving that block's stuck worker unwatched.
    client = Recorder(acquire_error=error("refused"))
    with pytest.raises(error, match="refused"), expires(after=60, scope="s", client=client):
        pass
    assert client.calls == [("acquire", "s")]


@pytest.mark.parametrize("error", NOT_ARMED)
def test_a_release_that_raised_a_not_armed_error_never_replaces_the_block_s_exception(
    error: type,
) -> None:
    client = Recorder(release_error=error("lost"))
    mine = KeyError("mine")
    with pytest.raises(KeyError) as info, expires(after=60, scope="s", client=client):
        raise mine
    assert info.value is mine
    assert client.calls == [("acquire", "s"), ("release", "s")]  # not tried again


@pytest.mark.parametrize("error", NOT_ARMED)
def test_a_release_that_raised_a_not_armed_error_after_a_clean_block_is_raised(
    error: type,
) -> None:
    client = Recorder(release_error=error("lost"))
    with pytest.raises(error, match="lost"), expires(after=60, scope="s", client=client):
        pass
    assert client.calls == [("acquire", "s"), ("release", "s")]


def test_configure_refuses_both_keywords_and_keeps_the_client_it_had(peer: FifoPeer) -> None:
    kept = FileTimerClient(peer.path, labels={})
    configure(kept)
    other = Recorder()
    with pytest.raises(TypeError, match="not both"):
        configure(timer_client=other, client=other)
    with expires(after=60, scope="kept"):
        pass
    assert [m.scope_id for m in peer.wait_count(2)] == ["kept", "kept"]
    assert other.calls == []


class AcquireOnly:
    def acquire(self, scope_id: str, expiration_time: float) -> None: ...


class ReleaseOnly:
    def release(self, scope_id: str) -> None: ...


class ReleaseNotCallable(AcquireOnly):
    release = None


@pytest.mark.parametrize("half", [AcquireOnly, ReleaseOnly, ReleaseNotCallable])
@pytest.mark.parametrize("keyword", ["timer_client", "client"])
def test_configure_refuses_an_object_with_one_of_the_two_methods(
    peer: FifoPeer, half: type, keyword: str
) -> None:
    # Refused when configured, not at the first block's exit, its timer left armed.
    configure(FileTimerClient(peer.path, labels={}))
    with pytest.raises(TypeError, match=r"configure\(\) takes a timer client"):
        configure(**{keyword: half()})
    with expires(after=60, scope="kept"):  # the client configured before is kept
        pass
    assert [m.scope_id for m in peer.wait_count(2)] == ["kept", "kept"]


def test_configure_takes_a_client_under_its_older_keyword(peer: FifoPeer) -> None:
    configure(client=FileTimerClient(peer.path, labels={}))
    with expires(after=60, scope="older"):
        pass
    assert [m.scope_id for m in peer.wait_count(2)] == ["older", "older"]


def test_an_exit_with_no_block_entered_does_nothing() -> None:
    # contextlib.ExitStack.push(block), say: its __exit__ runs though it was never
    # entered. Nothing to disarm, and the object stays one block at a time; an exit run
    # twice disarms once.
    client = Recorder()
    block = expires(after=60, scope="s", client=client)
    assert block.__exit__(None, None, None) is None
    assert client.calls == []
    with block:
        with pytest.raises(RuntimeError, match="already in use"), block:
            pass
        block.__exit__(None, None, None)  # a stray exit inside: the with's own does nothing
    assert client.calls == [("acquire", "s"), ("release", "s")]


def test_one_object_is_entered_again_once_its_block_ended(peer: FifoPeer) -> None:
    # One object, one block at a time, any number of times: a loop's step guarded by one
    # object made before the loop.
    guard = expires(after=60, scope="step", client=FileTimerClient(peer.path, labels={}))
    for _ in range(3):
        with guard:
            pass
    messages = peer.wait_count(6)
    assert [type(m) for m in messages] == [Arm, Disarm] * 3
    assert server_state(messages) == {}


def test_a_clean_block_whose_disarm_was_not_delivered_raises(peer: FifoPeer) -> None:
    # The worker must learn that its server may still hold the timer (on_unavailable
    # "raise", the default): a block with an exception of its own keeps that one
    # (test_failures.py), one without raises the failed disarm's.
    client = FileTimerClient(peer.path, labels={})
    with pytest.raises(ServerUnavailable), expires(after=60, scope="s", client=client):
        peer.close()  # the server goes away inside the block
    assert client._channel.needs_resync  # the lost disarm will be made good
    assert client.armed == frozenset()


def test_a_child_forked_by_another_thread_names_its_blocks_as_its_main_thread_s() -> None:
    # The thread that forks is the child's main thread: its default scopes end in no
    # "@tid-", as the same line's in a child forked by the main thread.
    def named_as_the_main_thread() -> None:
        assert default_scope_suffix() == ""

    assert default_scope_suffix() == ""
    forked: List[int] = []  # the child's pid, once it exited cleanly
    forker = threading.Thread(target=lambda: forked.append(in_child(named_as_the_main_thread)))
    forker.start()
    forker.join(30)
    assert forked


@pytest.mark.parametrize("after", [True, False])
def test_beat_refuses_a_bool_whatever_the_client(after: bool) -> None:
    # True would push a torch-style client's deadline to 1 s from now (False: now): the
    # check is expires' own, not left to ftimer's arm().
    client = Recorder()
    block = expires(after=60, scope="s", client=client)
    with block, pytest.raises(TypeError, match="bool"):
        block.beat(after)
    assert client.calls == [("acquire", "s"), ("release", "s")]


def test_outside_the_main_thread_a_default_scope_names_the_native_thread_id(
    peer: FifoPeer,
) -> None:
    # The id the kernel knows the thread by (ps -L, /proc/<pid>/task): the one a person
    # reading the server's log can find.
    configure(FileTimerClient(peer.path, labels={}))
    seen: List[Tuple[Optional[str], int, str]] = []

    def run() -> None:
        with expires(after=60) as block:
            seen.append((block.scope, threading.get_native_id(), default_scope_suffix()))

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(10)
    [(scope, native_id, suffix)] = seen
    assert suffix == f"@tid-{native_id}"
    assert scope is not None
    assert scope.endswith(f"#{run.__code__.co_firstlineno + 1}{suffix}")
    assert [m.scope_id for m in peer.wait_count(2)] == [scope, scope]


def test_one_object_whose_entry_failed_is_entered_again(fifo_path: pathlib.Path) -> None:
    # A worker that retries its step once the server is up, with the object it made
    # before: the failed entry must not leave the object "already in use".
    client = FileTimerClient(fifo_path, labels={})
    guard = expires(after=60, scope="step", client=client)
    with pytest.raises(ServerUnavailable), guard:  # no server yet
        pass
    peer = FifoPeer(fifo_path)
    try:
        with guard:
            pass
        messages = peer.wait_count(2)
    finally:
        peer.close()
    assert [(type(m), m.scope_id) for m in messages] == [(Arm, "step"), (Disarm, "step")]


def test_beat_with_ftimer_s_own_acquire_arms_through_arm(peer: FifoPeer) -> None:
    # As the entry: the caller's after as it is, no wall-clock round trip through
    # acquire() (which a wall-clock step in between would move).
    client = FileTimerClient(peer.path, labels={})
    with expires(after=60, scope="b", client=client) as block:
        arm = mock.MagicMock(wraps=client.arm)
        client.arm = arm  # type: ignore[method-assign]  # arm() is not looked at
        block.beat(30)
        block.beat()
    assert arm.call_args_list == [mock.call("b", 30), mock.call("b", 60)]
    assert [type(call.args[1]) for call in arm.call_args_list] == [int, int]
    client.close()


SCRIPT = """\
with expires(after=60, client=client) as block:
    seen.append(block.scope)
@expires(after=60, client=client)
def step():
    pass
step()
"""


@pytest.mark.parametrize(
    ("name", "text"),
    [("caf\u00e9", "caf\u00e9"), ("caf\udce9", "caf\\xe9")],
    ids=["utf8", "not-utf8"],
)
def test_the_default_scope_of_a_file_whose_name_is_not_ascii(name: str, text: str) -> None:
    # A file name that is valid text is the scope's as it is; one holding a byte that
    # is not UTF-8 (a lone surrogate) as the server reads torch's line for it.
    client = Recorder()
    seen: List[Optional[str]] = []
    namespace: Dict[str, Any] = {"expires": expires, "client": client, "seen": seen}
    exec(compile(SCRIPT, f"/nonexistent/{name}/train.py", "exec"), namespace)
    site = f"/nonexistent/{text}/train.py"
    assert seen == [f"{site}#1"]
    assert client.calls == [
        ("acquire", f"{site}#1"),
        ("release", f"{site}#1"),
        ("acquire", f"{site}#3"),
        ("release", f"{site}#3"),
    ]


class AsyncJob:
    """A class whose instances' call is a coroutine function: decorated, its calls make
    instances, as any class's."""

    async def __call__(self) -> str:
        return "ran"


class BatchJob:
    def __call__(self) -> Any:
        yield 1


@pytest.mark.parametrize("cls", [AsyncJob, BatchJob])
def test_a_decorated_class_makes_its_instances_in_a_block(cls: type) -> None:
    # What runs when a class is called is its construction, not its instances' __call__:
    # not a coroutine to await, nor a generator function to refuse.
    client = Recorder()
    made = expires(after=60, scope="make", client=client)(cls)
    assert isinstance(made(), cls)
    assert client.calls == [("acquire", "make"), ("release", "make")]


def test_a_decorated_callable_without_code_is_named_by_the_decorating_line() -> None:
    # A partial (or a builtin) has no first line: the line that decorates it names it.
    client = Recorder()
    step = expires(after=60, client=client)(functools.partial(int, "7"))
    line = sys._getframe().f_lineno - 1
    assert step() == 7
    assert client.calls == [("acquire", f"{__file__}#{line}"), ("release", f"{__file__}#{line}")]


def test_a_task_outside_the_main_thread_is_named_by_its_thread_and_its_task() -> None:
    # Both: the doc's "@tid-<native thread id>" then "@task-<id>".
    seen: List[Tuple[str, int, str]] = []

    async def step() -> None:
        task = asyncio.current_task()
        assert task is not None
        seen.append((default_scope_suffix(), threading.get_native_id(), f"{id(task):x}"))

    thread = threading.Thread(target=asyncio.run, args=(step(),))
    thread.start()
    thread.join(10)
    [(suffix, native_id, task_id)] = seen
    assert suffix == f"@tid-{native_id}@task-{task_id}"
