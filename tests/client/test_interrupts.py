"""A signal handler's exception (KeyboardInterrupt), or a handler's own calls, landing at
the client's awkward points: the call is left as if it failed, and the server is brought
to agree (docs/client.md). Each test puts the interrupt where a handler can run (as a
method returns, or at a loop's backward jump), deterministically."""

from __future__ import annotations

import os
from typing import Any, Callable, List

import pytest

from ftimer_client import FileTimerClient
from ftimer_client._resync import Resync

from .conftest import FifoPeer, server_state

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
