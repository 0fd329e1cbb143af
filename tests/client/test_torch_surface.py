"""torch's client surface as torch's own code and tests use it (no torch needed here).

- torch's ``expires`` always calls ``client.acquire(scope, t)`` and ``client.release``:
  its ``test_client_interaction`` wraps both on the instance with ``MagicMock`` and counts
  the calls. ftimer's ``expires`` arms through ``arm()`` only while both are its own,
  looked at on each entry: overrides on the instance, or patched onto the class after the
  client was made, are called.
- torch arms ``math.inf`` (a timer that never fires); ftimer arms it at the protocol's
  furthest deadline (``MAX_TIME``) through ``arm``, ``acquire`` and ``expires`` alike.
  NaN and minus infinity are refused.
"""

from __future__ import annotations

import contextlib
import math
import pathlib
import subprocess
import sys
import textwrap
import time
from typing import Callable, Iterator, List
from unittest import mock

import pytest
from tests.conftest import wait_until

from ftimer_client import FileTimerClient, configure, expires
from ftimer_protocol import MAX_TIME, Arm, Disarm, Message, TimerRequestV1

from .conftest import FifoPeer, Peer, server_state

# -- overrides of acquire and release --------------------------------------------------


def _scopes(messages: List[Message]) -> List[str]:
    return [f"{type(m).__name__}:{m.scope_id}" for m in messages]  # type: ignore[attr-defined]


def test_expires_calls_acquire_and_release_wrapped_on_the_instance(server: Peer) -> None:
    # torch's test_client_interaction, against ftimer's client.
    client = FileTimerClient(server.path, labels={})
    client.acquire = mock.MagicMock(wraps=client.acquire)  # type: ignore[method-assign]
    client.release = mock.MagicMock(wraps=client.release)  # type: ignore[method-assign]
    with expires(after=60, scope="test", client=client):
        pass
    client.acquire.assert_called_once_with("test", mock.ANY)
    client.release.assert_called_once_with("test")
    # The wrapped methods are ftimer's: they sent the arm and the disarm.
    assert _scopes(server.wait_count(2)) == ["Arm:test", "Disarm:test"]
    client.close()


def test_an_override_on_the_instance_of_acquire_alone_or_release_alone_is_called(
    server: Peer,
) -> None:
    client = FileTimerClient(server.path, labels={})
    for name in ("acquire", "release"):
        wrapped = mock.MagicMock(wraps=getattr(client, name))
        setattr(client, name, wrapped)
        with expires(after=60, scope=name, client=client):
            pass
        wrapped.assert_called_once()
        delattr(client, name)
    assert _scopes(server.wait_count(4)) == [
        "Arm:acquire",
        "Disarm:acquire",
        "Arm:release",
        "Disarm:release",
    ]
    client.close()


@pytest.mark.parametrize("patched", [("acquire",), ("release",), ("acquire", "release")])
def test_expires_calls_methods_patched_onto_the_class_after_the_client_was_made(
    server: Peer, patched: tuple
) -> None:
    client = FileTimerClient(server.path, labels={})
    with contextlib.ExitStack() as stack:
        mocks = {
            name: stack.enter_context(
                mock.patch.object(
                    FileTimerClient,
                    name,
                    autospec=True,
                    side_effect=getattr(FileTimerClient, name),
                )
            )
            for name in patched
        }
        with expires(after=60, scope="cls", client=client):
            pass
        for m in mocks.values():
            m.assert_called_once()
    if "acquire" in mocks:
        mocks["acquire"].assert_called_once_with(client, "cls", mock.ANY)
    assert _scopes(server.wait_count(2)) == ["Arm:cls", "Disarm:cls"]
    client.close()


def test_a_configured_client_wrapped_after_configure_is_called(server: Peer) -> None:
    client = FileTimerClient(server.path, labels={})
    configure(client)
    client.acquire = mock.MagicMock(wraps=client.acquire)  # type: ignore[method-assign]
    with expires(after=60):
        pass
    client.acquire.assert_called_once()
    client.close()


def test_beat_calls_an_acquire_set_on_the_instance(server: Peer) -> None:
    client = FileTimerClient(server.path, labels={})
    with expires(after=60, scope="b", client=client) as block:
        client.acquire = mock.MagicMock(wraps=client.acquire)  # type: ignore[method-assign]
        block.beat(30)
        client.acquire.assert_called_once_with("b", mock.ANY)
    client.close()


def test_without_overrides_expires_arms_through_arm(server: Peer) -> None:
    # The fast path: no acquire() (and its wall-clock round trip), once overrides go.
    client = FileTimerClient(server.path, labels={})
    acquire = mock.MagicMock(wraps=client.acquire)
    client.acquire = acquire  # type: ignore[method-assign]
    with expires(after=60, scope="s", client=client):
        pass
    del client.acquire
    arm = mock.MagicMock(wraps=client.arm)
    client.arm = arm  # type: ignore[method-assign]  # arm() is not looked at
    with expires(after=60, scope="s", client=client):
        pass
    arm.assert_called_once_with("s", 60)
    acquire.assert_called_once()  # by the first block only
    client.close()


# -- math.inf, NaN, negative ----------------------------------------------------------


def _arm_forever_expires(client: FileTimerClient, scope: str) -> None:
    block = expires(after=math.inf, scope=scope, client=client)
    block.__enter__()  # left armed: the test releases it


FOREVER: List[Callable[[FileTimerClient, str], None]] = [
    lambda c, s: c.arm(s, math.inf),
    lambda c, s: c.arm(s, MAX_TIME * 10),  # beyond the protocol's range: the same
    lambda c, s: c.acquire(s, math.inf),
    lambda c, s: c.heartbeat(s, math.inf),
    _arm_forever_expires,
]
FOREVER_IDS = ["arm", "arm-beyond-max", "acquire", "heartbeat", "expires"]


@pytest.mark.parametrize("arm_forever", FOREVER, ids=FOREVER_IDS)
def test_inf_arms_a_timer_at_the_furthest_deadline(
    server: Peer, arm_forever: Callable[[FileTimerClient, str], None]
) -> None:
    # As torch: the scope is armed (an earlier deadline is replaced), and never fires.
    client = FileTimerClient(server.path, labels={})
    client.arm("s", 5)
    arm_forever(client, "s")
    assert client.armed == {"s"}
    (first, second) = server.wait_count(2)
    assert isinstance(second, Arm)
    assert second.deadline == MAX_TIME
    assert server_state([first, second]) == {(second.pid, "s"): MAX_TIME}
    client.release("s")
    assert isinstance(server.wait_count(3)[2], Disarm)
    client.close()


@pytest.mark.parametrize("arm_forever", FOREVER, ids=FOREVER_IDS)
def test_inf_with_protocol_1_sends_the_furthest_time_json_can_carry_to_ftimer(
    peer: FifoPeer, arm_forever: Callable[[FileTimerClient, str], None]
) -> None:
    # torch's client sends JSON Infinity, which only torch's server reads: MAX_TIME
    # (about 31 million years from 1970) never fires on either server.
    client = FileTimerClient(peer.path, protocol=1)
    client.arm("s", 5)
    arm_forever(client, "s")
    (_, second) = peer.wait_count(2)
    assert isinstance(second, TimerRequestV1)
    assert second.expiration_time == MAX_TIME
    client.close()


def test_an_expires_block_of_inf_is_disarmed_on_exit(server: Peer) -> None:
    client = FileTimerClient(server.path, labels={})
    with expires(after=math.inf, scope="forever", client=client):
        assert client.armed == {"forever"}
    (arm, disarm) = server.wait_count(2)
    assert isinstance(arm, Arm)
    assert arm.deadline == MAX_TIME
    assert isinstance(disarm, Disarm)
    assert disarm.scope_id == "forever"
    client.close()


@pytest.mark.parametrize("protocol", [1, 2])
@pytest.mark.parametrize(
    "refused",
    [
        lambda c: c.arm("s", math.nan),
        lambda c: c.arm("s", -math.inf),
        lambda c: c.heartbeat("s", math.nan),
        lambda c: c.acquire("s", math.nan),
        lambda c: c.acquire("s", -1.0),  # torch's wire reads it as a release
        lambda c: c.acquire("s", -math.inf),
        lambda c: expires(after=math.nan, scope="s", client=c).__enter__(),
        lambda c: expires(after=-math.inf, scope="s", client=c).__enter__(),
    ],
    ids=[
        "arm-nan",
        "arm-minus-inf",
        "heartbeat-nan",
        "acquire-nan",
        "acquire-negative",
        "acquire-minus-inf",
        "expires-nan",
        "expires-minus-inf",
    ],
)
def test_nan_minus_inf_and_a_negative_time_are_refused_and_change_nothing(
    peer: FifoPeer, protocol: int, refused: Callable[[FileTimerClient], None]
) -> None:
    client = FileTimerClient(peer.path, protocol=protocol)
    client.arm("s", 60)
    with pytest.raises(ValueError, match=r"nan|-inf|>= 0"):
        refused(client)
    assert client.armed == {"s"}
    client.release("s")
    # Nothing went between the arm and the release.
    messages = peer.wait_for(lambda m: bool(m) and _is_release(m[-1]))
    assert len(messages) == 2
    client.close()


def _is_release(m: Message) -> bool:
    return isinstance(m, Disarm) or (isinstance(m, TimerRequestV1) and m.is_release)


def test_a_negative_after_arms_a_timer_already_expired(server: Peer) -> None:
    # torch's expires(after=-1) arms a time one second past: the next pass reaps.
    client = FileTimerClient(server.path, labels={})
    before = time.monotonic()
    with expires(after=-1, scope="past", client=client):
        pass
    (arm, _) = server.wait_count(2)
    assert isinstance(arm, Arm)
    assert arm.deadline <= before
    client.close()


# -- against ftimer's server ----------------------------------------------------------

# The server refuses timers of its own process: the client runs in a child.
WORKER = textwrap.dedent(
    """
    import math, sys
    from unittest import mock
    from ftimer_client import FileTimerClient, expires
    client = FileTimerClient(sys.argv[1], labels={})
    # torch's test_client_interaction.
    client.acquire = mock.MagicMock(wraps=client.acquire)
    client.release = mock.MagicMock(wraps=client.release)
    with expires(after=600, scope="test", client=client):
        print("in", flush=True)
        sys.stdin.readline()
    print(client.acquire.call_count, client.release.call_count, flush=True)
    del client.acquire, client.release
    with expires(after=math.inf, scope="forever", client=client):
        print("forever", flush=True)
        sys.stdin.readline()
    print("out", flush=True)
    sys.stdin.readline()
    """
)


@contextlib.contextmanager
def _worker(path: pathlib.Path) -> Iterator[subprocess.Popen[str]]:
    with subprocess.Popen(
        [sys.executable, "-c", WORKER, str(path)],
        text=True,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    ) as proc:
        try:
            yield proc
        finally:
            proc.kill()  # ours, if still running


def test_against_ftimers_server_wrapped_methods_are_called_and_inf_never_fires(
    fifo_path: pathlib.Path,
) -> None:
    server_module = pytest.importorskip("ftimer_server")
    with server_module.FileTimerServer(fifo_path) as server, _worker(fifo_path) as proc:
        assert proc.stdin is not None
        assert proc.stdout is not None

        def step(expected: str) -> None:
            assert proc.stdout is not None
            assert proc.stdout.readline() == expected + "\n"

        def armed() -> dict:
            server.sync()
            return {(t.pid, t.scope_id): t.deadline for t in server.armed()}

        step("in")
        assert set(armed()) == {(proc.pid, "test")}
        proc.stdin.write("\n")
        proc.stdin.flush()
        step("1 1")  # acquire and release, once each
        step("forever")
        assert armed() == {(proc.pid, "forever"): MAX_TIME}
        proc.stdin.write("\n")
        proc.stdin.flush()
        step("out")
        wait_until(lambda: armed() == {}, what="the disarm")
        proc.stdin.close()
        assert proc.wait(30) == 0
