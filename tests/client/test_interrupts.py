"""A signal handler's exception (KeyboardInterrupt), or a handler's own calls, landing at
the client's awkward points: the call is left as if it failed, and the server is brought
to agree (docs/client.md). Each test puts the interrupt where a handler can run (as a
method returns, or at a loop's backward jump), deterministically."""

from __future__ import annotations

import contextlib
import dis
import os
import sys
from types import FrameType, ModuleType
from typing import Any, Callable, Iterator, List, Tuple

import pytest

from ftimer_client import FileTimerClient, _resync
from ftimer_client._channel import Channel
from ftimer_client._resync import Resync

from .conftest import FifoPeer, restart, server_state

ME = os.getpid()


def interrupt_once_after(monkeypatch: pytest.MonkeyPatch, cls: type, name: str) -> List[Any]:
    """Make ``cls.name`` raise KeyboardInterrupt the first time it is called, once it has
    done its work: a signal handler's exception landing as it returns. Returns the list
    of the calls' arguments so far."""
    original: Callable[..., Any] = getattr(cls, name)
    calls: List[Any] = []

    def interrupted(self: Any, *args: Any) -> Any:
        result = original(self, *args)
        calls.append(args)
        if len(calls) == 1:
            raise KeyboardInterrupt
        return result

    monkeypatch.setattr(cls, name, interrupted)
    return calls


def wait_for_scope(peer: FifoPeer, scope: str) -> list:
    """Wait until the peer has read a message of ``scope``; return its messages."""
    return peer.wait_for(lambda m: any(x.scope_id == scope for x in m if hasattr(x, "scope_id")))


class InterruptedRegistry(dict):  # type: ignore[type-arg]
    """A registry into which a signal handler's exception lands right after ``key`` is
    stored, once."""

    def __init__(self, key: str) -> None:
        super().__init__()
        self.key = key

    def __setitem__(self, key: str, value: Any) -> None:
        super().__setitem__(key, value)
        if key == self.key:
            self.key = ""
            raise KeyboardInterrupt


@pytest.mark.parametrize("protocol", [1, 2])
def test_an_interrupt_once_the_registry_forgot_a_scope_still_disarms_it(
    peer: FifoPeer, monkeypatch: pytest.MonkeyPatch, protocol: int
) -> None:
    # The registry forgot the scope before the channel's try: the disarm was neither
    # sent nor counted lost, so no resync ever sent it, and the server reaped a healthy
    # process that caught the interrupt and carried on.
    client = FileTimerClient(peer.path, labels={}, protocol=protocol)
    client.arm("s", 60)
    calls = interrupt_once_after(monkeypatch, Resync, "disarm")
    with pytest.raises(KeyboardInterrupt):
        client.release("s")
    assert calls[0] == ("s",)
    assert client.armed == frozenset()  # released, as a release that failed is
    client.arm("t", 60)  # the program carries on
    assert set(server_state(wait_for_scope(peer, "t"))) == {(ME, "t")}


def test_an_interrupt_once_the_registry_recorded_an_arm_undoes_it(peer: FifoPeer) -> None:
    # The arm was recorded before the channel's try: the caller was told it failed, yet
    # the registry kept it, and a resync would have armed a timer nobody releases.
    client = FileTimerClient(peer.path, labels={})
    channel = client._channel
    channel.armed = channel.state.armed = InterruptedRegistry("s")
    with pytest.raises(KeyboardInterrupt):
        client.arm("s", 60)
    assert client.armed == frozenset()  # an arm that raised did not happen
    client.arm("t", 60)
    assert set(server_state(wait_for_scope(peer, "t"))) == {(ME, "t")}


def test_an_interrupted_rearm_leaves_the_first_arm(peer: FifoPeer) -> None:
    client = FileTimerClient(peer.path, labels={})
    client.arm("s", 60)
    channel = client._channel
    first = channel.armed["s"]
    registry = InterruptedRegistry("s")
    registry.update(channel.armed)
    channel.armed = channel.state.armed = registry
    with pytest.raises(KeyboardInterrupt):
        client.arm("s", 600)
    assert channel.armed == {"s": first}
    client.arm("t", 60)
    messages = wait_for_scope(peer, "t")
    state = server_state(messages)
    assert state == {(ME, "s"): messages[0].deadline, (ME, "t"): messages[-1].deadline}


@contextlib.contextmanager
def handler_in_a_loop_of(module: ModuleType, handler: Callable[[], None]) -> Iterator[None]:
    """While in the block, run ``handler`` once, where a signal handler runs in a loop of
    ``module``'s code: at its first backward jump (the next round of the loop), in the
    thread of the block."""
    path = module.__file__
    done: List[bool] = []

    def in_frame(frame: FrameType, event: str, arg: Any) -> Any:
        code = frame.f_code.co_code
        if event == "opcode" and not done and dis.opname[code[frame.f_lasti]] in BACKWARD_JUMPS:
            done.append(True)
            handler()  # not traced: a trace function runs untraced
        return in_frame

    def on_call(frame: FrameType, event: str, arg: Any) -> Any:
        if frame.f_code.co_filename != path:
            return None
        frame.f_trace_opcodes = True
        frame.f_trace = in_frame  # 3.13 sends opcode events only to a frame's own f_trace
        return in_frame

    previous = sys.gettrace()
    # 3.12 sends opcode events only if some frame asked for them before settrace().
    here = sys._getframe()
    here.f_trace_opcodes = True
    sys.settrace(on_call)
    try:
        yield
    finally:
        sys.settrace(previous)
        here.f_trace_opcodes = False
    assert done, "no loop ran"


BACKWARD_JUMPS = {"JUMP_BACKWARD", "JUMP_ABSOLUTE"}  # 3.11+, 3.9 and 3.10


@pytest.fixture
def two_clients(peer: FifoPeer) -> Iterator[Tuple[FileTimerClient, FileTimerClient]]:
    """A client with ten scopes armed, and another of the same channel (a library's own,
    used by its signal handler)."""
    client = FileTimerClient(peer.path, labels={})
    other = FileTimerClient(peer.path, labels={})
    assert other._channel is client._channel
    for i in range(10):
        client.arm(f"k{i}", 600)
    yield client, other
    other.close()
    client.close()


def test_a_handler_arming_while_close_goes_through_the_registry(
    peer: FifoPeer, two_clients: Tuple[FileTimerClient, FileTimerClient]
) -> None:
    # close() raised "dictionary changed size during iteration" and left every scope of
    # the closed client armed, for ever.
    client, other = two_clients
    with handler_in_a_loop_of(_resync, lambda: other.arm("handler's", 600)):
        client.close()
    assert client._channel.armed.keys() == {"handler's"}
    other.arm("end", 60)
    assert set(server_state(wait_for_scope(peer, "end"))) == {(ME, "handler's"), (ME, "end")}


def test_a_handler_arming_while_armed_goes_through_the_registry(
    two_clients: Tuple[FileTimerClient, FileTimerClient],
) -> None:
    client, other = two_clients
    with handler_in_a_loop_of(_resync, lambda: other.arm("handler's", 600)):
        armed = client.armed
    assert armed == {f"k{i}" for i in range(10)}


def test_a_handler_arming_while_a_resync_goes_through_the_registry(
    peer: FifoPeer, two_clients: Tuple[FileTimerClient, FileTimerClient]
) -> None:
    client, other = two_clients
    new = restart(peer)  # the next write fails: the client reconnects and resyncs
    try:
        with handler_in_a_loop_of(_resync, lambda: other.arm("handler's", 600)):
            client.arm("end", 60)
        expected = {(ME, f"k{i}") for i in range(10)} | {(ME, "end"), (ME, "handler's")}
        # (The handler's arm goes last: put aside until the resync and "end" are sent.)
        assert set(server_state(wait_for_scope(new, "handler's"))) == expected
        other.close()
        client.close()
    finally:
        new.close()


def test_an_interrupt_before_close_forgot_anything_still_disarms_it_all(
    peer: FifoPeer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A closed client's scopes stayed armed for ever: no method of it would disarm them.
    client = FileTimerClient(peer.path, labels={})
    client.arm("a", 600)
    client.arm("b", 600)
    original = Channel.disarm_all
    calls: List[Any] = []

    def interrupted(self: Channel, timeout: float, owner: object = None) -> None:
        calls.append(owner)
        if len(calls) == 1:
            raise KeyboardInterrupt  # a handler's, landing as it begins
        original(self, timeout, owner)

    monkeypatch.setattr(Channel, "disarm_all", interrupted)
    with pytest.raises(KeyboardInterrupt):
        client.close()
    assert client._channel.armed == {}
    other = FileTimerClient(peer.path, labels={})
    other.arm("end", 60)
    assert set(server_state(wait_for_scope(peer, "end"))) == {(ME, "end")}
    other.close()


@pytest.mark.parametrize("protocol", [1, 2])
def test_an_interrupt_once_close_forgot_the_scopes_still_disarms_them(
    peer: FifoPeer, monkeypatch: pytest.MonkeyPatch, protocol: int
) -> None:
    # They were forgotten before the channel's try: neither sent nor counted lost.
    client = FileTimerClient(peer.path, labels={}, protocol=protocol)
    client.arm("a", 600)
    client.arm("b", 600)
    interrupt_once_after(monkeypatch, Resync, "disarm_all")
    with pytest.raises(KeyboardInterrupt):
        client.close()
    assert client._channel.armed == {}
    other = FileTimerClient(peer.path, labels={}, protocol=protocol)
    other.arm("end", 60)
    assert set(server_state(wait_for_scope(peer, "end"))) == {(ME, "end")}
    other.close()


class SendingInterrupted(Channel):
    """A channel into which a signal handler's exception lands once, right after a
    delivery began (``_sending`` set)."""

    interrupts = 1

    @property  # type: ignore[override]
    def _sending(self) -> bool:
        return bool(self.__dict__["_sending"])

    @_sending.setter
    def _sending(self, value: bool) -> None:
        self.__dict__["_sending"] = value
        if value and self.interrupts:
            self.interrupts = 0
            raise KeyboardInterrupt


def test_an_interrupt_as_a_delivery_begins_does_not_silence_the_channel(
    peer: FifoPeer,
) -> None:
    # _sending stayed set: every later arm and disarm was put aside, never sent.
    client = FileTimerClient(peer.path, labels={})
    client._channel.__class__ = SendingInterrupted
    with pytest.raises(KeyboardInterrupt):
        client.arm("s", 60)  # the first message delivers: it connects
    assert client.armed == frozenset()
    assert not client._channel._sending
    client.arm("t", 60)
    assert set(server_state(wait_for_scope(peer, "t"))) == {(ME, "t")}
    client.close()
