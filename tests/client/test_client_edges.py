"""FileTimerClient at its edges (from mutation testing of ``_client.py``).

Pins: close() of a closed client lets go of nothing a sibling still uses; leaving a
``with`` block cleanly, release_all(), and an arm or a heartbeat racing close() raise the
disarm that did not get through (policy "raise"); a closed protocol 1 client sends
nothing; a heartbeat refuses a bool; pids 0, negative, 1 (but a socket's parent init)
and beyond MAX_PID are refused, 2 and MAX_PID taken; acquire() takes times in [0, 1) and
refuses any negative one, sending nothing; a deadline just below 0 is made 0; near-miss
constructor arguments; the most labels at their longest; the properties.
"""

from __future__ import annotations

import os
import pathlib
import signal
import time
from typing import Callable, Optional

import pytest
from tests.conftest import not_pid_1

from ftimer_client import FileTimerClient, ServerUnavailable
from ftimer_client._client import _check_pid
from ftimer_protocol import (
    MAX_LABEL_VALUE,
    MAX_LABELS,
    MAX_PID,
    Arm,
    Disarm,
    Expire,
    TimerRequestV1,
)

from .conftest import FifoPeer, server_state
from .test_client_fifo import fifo_descriptors

ME = os.getpid()


def test_closing_a_closed_client_again_keeps_a_siblings_connection(peer: FifoPeer) -> None:
    first = FileTimerClient(peer.path, labels={})
    second = FileTimerClient(peer.path, labels={})
    second.arm("kept", 30)  # connects: one descriptor, shared
    peer.wait_count(1)
    first.close()
    first.close()  # idempotent: counts no second client gone
    assert fifo_descriptors(peer.path) == 3  # the peer's two, and the clients' one
    second.close()
    assert fifo_descriptors(peer.path) == 2


def test_leaving_a_with_block_cleanly_raises_the_disarm_that_did_not_get_through(
    peer: FifoPeer,
) -> None:
    # No exception of the block's own to keep: the policy ("raise") speaks for close().
    client = FileTimerClient(peer.path, labels={})

    def block() -> None:
        with client:
            client.arm("s", 60)
            peer.wait_count(1)
            peer.close()  # the server goes: close() cannot deliver the disarm

    with pytest.raises(ServerUnavailable):
        block()
    assert client.armed == frozenset()
    new = FifoPeer(peer.path, create=False)  # the disarm is delivered when it is back
    try:
        new.wait_for(lambda m: any(isinstance(x, Disarm) and x.scope_id == "s" for x in m))
    finally:
        new.close()


def test_a_heartbeat_refuses_a_bool_and_sends_nothing(peer: FifoPeer) -> None:
    client = FileTimerClient(peer.path, labels={})
    client.arm("s", 60)
    (arm,) = peer.wait_count(1)
    with pytest.raises(TypeError, match="bool"):
        client.heartbeat("s", True)  # not a 1 s timer
    client.expire("marker")  # in order behind anything the heartbeat sent
    messages = peer.wait_count(2)
    assert messages[0] == arm
    assert [type(m) for m in messages] == [Arm, Expire], messages
    client.close()


def test_a_closed_protocol_1_client_acquires_nothing(peer: FifoPeer) -> None:
    client = FileTimerClient(peer.path, protocol=1)
    client.close()
    with pytest.raises(RuntimeError, match="closed"):
        client.acquire("s", time.time() + 60)
    other = FileTimerClient(peer.path, protocol=1)
    other.acquire("marker", time.time() + 60)  # in order behind anything sent before
    (only,) = peer.wait_count(1)
    assert only.scope_id == "marker", peer.messages
    other.close()


def test_a_protocol_1_acquire_racing_close_leaves_nothing_armed(
    peer: FifoPeer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Another thread's close() lands after acquire() saw the client open, before its arm
    # goes out: close()'s disarms went first, and nothing would ever release the arm.
    client = FileTimerClient(peer.path, protocol=1)
    channel = client._channel
    real_arm = channel.arm

    def closed_meanwhile(*args: object) -> None:
        client.close()
        real_arm(*args)

    monkeypatch.setattr(channel, "arm", closed_meanwhile)
    with pytest.raises(RuntimeError, match="closed"):
        client.acquire("s", time.time() + 600)
    monkeypatch.undo()
    other = FileTimerClient(peer.path, protocol=1)
    other.acquire("end", time.time() + 60)
    messages = peer.wait_for(lambda m: any(x.scope_id == "end" for x in m))
    assert set(server_state(messages)) == {(ME, "end")}
    other.close()


# With pytest as pid 1, pid 1 is this process, which may arm for itself.
@pytest.mark.parametrize("pid", [0, -1, pytest.param(1, marks=not_pid_1), MAX_PID + 1])
@pytest.mark.parametrize("transport", ["fifo", "socket"])
@pytest.mark.parametrize("parent", [4321, 0])
def test_a_pid_naming_a_group_init_or_nothing_is_refused(
    fifo_path: pathlib.Path, transport: str, pid: int, parent: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 0 and negative ids signal process groups; 1 is init. The parent is faked, whatever
    # runs the tests: an ordinary process, or 0 as a PID namespace's init (a container's
    # first process) sees it (a pid 0 that "is the parent" names a group all the same).
    monkeypatch.setattr(os, "getppid", lambda: parent)
    with pytest.raises(ValueError, match=r"^pid must be the id of a process other than init"):
        FileTimerClient(fifo_path, labels={}, transport=transport, pid=pid)


@not_pid_1
@pytest.mark.parametrize("transport", ["fifo", "socket"])
def test_pid_1_as_this_processs_parent_is_taken_over_the_socket_only(
    fifo_path: pathlib.Path, transport: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A process whose parent is its PID namespace's init (a container's shell): over the
    # socket a pidfd names that init, which the server tells from the host's; over the
    # FIFO a bare 1 is the host's init.
    monkeypatch.setattr(os, "getppid", lambda: 1)
    if transport == "fifo":
        with pytest.raises(ValueError, match="1 is init"):
            FileTimerClient(fifo_path, labels={}, transport=transport, pid=1)
    else:
        client = FileTimerClient(fifo_path, labels={}, transport=transport, pid=1)
        client.close()  # nothing was sent: nothing armed


@pytest.mark.parametrize("pid", [2, MAX_PID])
def test_the_lowest_and_highest_pids_are_taken(pid: int) -> None:
    # Checked as given (the checks of a pid do not depend on whether it runs).
    _check_pid(pid, "fifo")
    _check_pid(pid, "socket")


@pytest.mark.parametrize("protocol", [1, 2])
@pytest.mark.parametrize("when", [0, 0.5])
def test_acquire_takes_a_time_in_the_first_second_of_the_epoch(
    peer: FifoPeer, protocol: int, when: float
) -> None:
    # Long past, but a time: an expired timer, not a refusal.
    client = FileTimerClient(peer.path, protocol=protocol, labels={})
    client.acquire("s", when)
    (arm,) = peer.wait_count(1)
    assert server_state([arm]).keys() == {(ME, "s")}
    if protocol == 1:
        assert arm == TimerRequestV1(ME, "s", when, signal.SIGKILL)
    else:
        assert arm.deadline == 0.0  # already past
    client.close()


@pytest.mark.parametrize("protocol", [1, 2])
@pytest.mark.parametrize("when", [-0.5, -1, -1e-300])
def test_acquire_refuses_a_negative_time_and_sends_nothing(
    peer: FifoPeer, protocol: int, when: float
) -> None:
    # torch's wire format reads a negative time as a release.
    client = FileTimerClient(peer.path, protocol=protocol, labels={})
    with pytest.raises(ValueError, match="must be >= 0"):
        client.acquire("s", when)
    client.expire("marker")  # in order behind anything the acquire sent
    (only,) = peer.wait_count(1)
    assert only.scope_id == "marker", peer.messages
    client.close()


@pytest.mark.parametrize(
    ("protocol", "sig", "clock"),
    [(2, None, time.monotonic), (2, signal.SIGTERM, time.monotonic), (1, None, time.time)],
    ids=["v2", "v2-own-signal", "v1"],
)
def test_an_arm_just_under_zero_on_its_clock_arms_an_expired_timer(
    peer: FifoPeer, protocol: int, sig: Optional[int], clock: Callable[[], float]
) -> None:
    # A deadline (version 1: an expiration time) within a second below 0 is made 0 as
    # any past one: a negative one breaks the schema (or reads as a release), and the
    # arm would be lost.
    client = FileTimerClient(peer.path, protocol=protocol, labels={})
    client.arm("s", -clock() - 0.5, signal=sig)
    client.expire("marker")
    arm, _ = peer.wait_count(2, timeout=5)
    assert peer.errors == []
    assert server_state([arm]) == {(ME, "s"): 0.0}, arm
    client.close()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"protocol": 0}, "^protocol must be 1 or 2"),  # falsy: not the default
        ({"write_timeout": -0.5}, "^write_timeout must be finite and >= 0"),
        ({"write_timeout": -1e-9}, "^write_timeout must be finite and >= 0"),
        ({"write_timeout": "1"}, "^write_timeout must be finite and >= 0"),
    ],
)
def test_construction_refuses_near_misses(
    fifo_path: pathlib.Path, kwargs: dict, match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        FileTimerClient(fifo_path, labels={}, **kwargs)


@pytest.mark.parametrize("write_timeout", [0, 0.5])
def test_a_write_timeout_under_a_second_is_taken(
    fifo_path: pathlib.Path, write_timeout: float
) -> None:
    FileTimerClient(fifo_path, labels={}, write_timeout=write_timeout).close()


def test_the_most_labels_at_their_longest_are_taken_and_sent(peer: FifoPeer) -> None:
    labels = {f"k{i}": "v" * MAX_LABEL_VALUE for i in range(MAX_LABELS)}
    client = FileTimerClient(peer.path, labels=labels)
    assert client.labels == labels
    client.arm("s", 60)
    (arm,) = peer.wait_count(1)
    assert arm.labels == labels
    client.close()


@pytest.mark.parametrize("labels", [{7: "x"}, {"job": 7}, {None: None}])
def test_labels_that_are_not_strings_are_named(fifo_path: pathlib.Path, labels: dict) -> None:
    with pytest.raises(ValueError, match=r"^labels map strings to strings"):
        FileTimerClient(fifo_path, labels=labels)


def test_release_all_raises_when_its_disarms_do_not_get_through(peer: FifoPeer) -> None:
    client = FileTimerClient(peer.path, labels={})
    client.arm("s", 60)
    peer.wait_count(1)
    peer.close()  # the server goes
    with pytest.raises(ServerUnavailable):
        client.release_all()
    assert client.armed == frozenset()  # released all the same: owed to the server
    new = FifoPeer(peer.path, create=False)  # delivered when it is back
    try:
        new.wait_for(lambda m: any(not isinstance(x, Arm) for x in m))
        assert server_state([*peer.messages, *new.messages]) == {}
    finally:
        new.close()
    client.close()


def disarm_delivered_when_back(peer: FifoPeer) -> None:
    """A server back on ``peer``'s FIFO (it left) gets the disarm owed: nothing is left
    armed of what either server read."""
    new = FifoPeer(peer.path, create=False)
    try:
        new.wait_for(lambda m: len(m) > 0)
        assert server_state([*peer.messages, *new.messages]) == {}
    finally:
        new.close()


def test_an_arm_racing_close_raises_the_disarm_that_did_not_get_through(
    peer: FifoPeer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # close() lands after arm() saw the client open; the arm goes out, and the server
    # goes before the disarm that makes up for it: under "raise", that is what is said.
    client = FileTimerClient(peer.path, labels={})
    channel = client._channel
    real_arm = channel.arm

    def closed_meanwhile(*args: object) -> None:
        client.close()
        real_arm(*args)
        peer.wait_count(1)
        peer.close()

    monkeypatch.setattr(channel, "arm", closed_meanwhile)
    with pytest.raises(ServerUnavailable):
        client.arm("s", 600)
    monkeypatch.undo()
    disarm_delivered_when_back(peer)


def test_a_heartbeat_racing_the_arming_clients_close_raises_a_lost_disarm(
    peer: FifoPeer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The arming client is closed (by a handler) before the heartbeat's arm goes out,
    # and the server goes before the disarm making up for it: under the caller's
    # "raise", that is what is said.
    arming = FileTimerClient(peer.path, labels={})
    caller = FileTimerClient(peer.path, labels={})
    arming.arm("s", 600)
    peer.wait_count(1)
    channel = caller._channel
    real_arm = channel.arm

    def closed_meanwhile(*args: object) -> None:
        arming.close()
        real_arm(*args)
        peer.wait_count(3)  # arm, disarm (close), arm (heartbeat)
        peer.close()

    monkeypatch.setattr(channel, "arm", closed_meanwhile)
    with pytest.raises(ServerUnavailable):
        caller.heartbeat("s", 60)
    monkeypatch.undo()
    disarm_delivered_when_back(peer)
    caller.close()


@pytest.mark.parametrize("protocol", [1, 2])
@pytest.mark.parametrize("policy", ["raise", "warn", "ignore"])
def test_the_properties_say_what_the_client_was_made_with(
    fifo_path: pathlib.Path, protocol: int, policy: str
) -> None:
    labels = {"job": "j"} if protocol == 2 else {}
    client = FileTimerClient(fifo_path, protocol=protocol, on_unavailable=policy, labels=labels)
    assert (client.protocol, client.on_unavailable, client.labels) == (protocol, policy, labels)
    assert client.file_path == str(fifo_path)
    client.close()
