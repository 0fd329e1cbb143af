"""FileTimerClient against a real FIFO and a real reader."""

from __future__ import annotations

import os
import pathlib
import signal
import threading
import time

import pytest

from ftimer_client import FileTimerClient, ServerUnavailable
from ftimer_client._proc import process_start_time
from ftimer_protocol import Arm, Disarm, Expire, TimerRequestV1

from .conftest import FifoPeer, held_only, server_state

ME = os.getpid()


def fifo_descriptors(path: pathlib.Path) -> int:
    """How many descriptors of this process are open on ``path`` (an O_PATH one, which
    only holds it, aside)."""
    target = os.stat(path)
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            st = os.stat(f"/proc/self/fd/{fd}")
            same = (st.st_dev, st.st_ino) == (target.st_dev, target.st_ino)
            count += same and not held_only(int(fd))
        except OSError:
            continue
    return count


def test_arm_and_release_reach_the_server(peer: FifoPeer) -> None:
    client = FileTimerClient(peer.path, signal.SIGTERM, labels={"job": "j"})
    before = time.monotonic()
    client.arm("step", 30)
    assert client.armed == {"step"}
    client.release("step")
    arm, disarm = peer.wait_count(2)
    start = process_start_time()
    assert isinstance(arm, Arm)
    assert (arm.pid, arm.scope_id, arm.signal, arm.start_time) == (ME, "step", 15, start)
    assert arm.labels == {"job": "j"}
    assert before + 30 <= arm.deadline + 1e-6 <= time.monotonic() + 30 + 1e-6
    assert disarm == Disarm(ME, "step", start)
    assert client.armed == frozenset()


def test_acquire_takes_torchs_epoch_time_and_sends_a_monotonic_deadline(peer: FifoPeer) -> None:
    client = FileTimerClient(peer.path, labels={})
    client.acquire("s", time.time() + 100)
    (arm,) = peer.wait_count(1)
    assert isinstance(arm, Arm)
    assert abs(arm.deadline - (time.monotonic() + 100)) < 1.0
    assert arm.signal == signal.SIGKILL


def test_one_write_per_message_on_a_descriptor_kept_open(
    peer: FifoPeer, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = FileTimerClient(peer.path, labels={})
    client.arm("warm-up", 5)  # connects
    fd = client._channel._fd
    writes: list[bytes] = []
    real_write = os.write

    def counting_write(to: int, data: bytes) -> int:
        if to == fd:
            writes.append(bytes(data))
        return real_write(to, data)

    monkeypatch.setattr(os, "write", counting_write)
    for i in range(50):
        client.arm(f"s{i}", 5)
        client.release(f"s{i}")
    monkeypatch.undo()
    assert len(writes) == 100
    assert all(w.count(b"\n") == 1 and w.endswith(b"\n") for w in writes)
    assert client._channel._fd == fd
    assert fifo_descriptors(peer.path) == 3  # the peer's two, and the client's one
    peer.wait_count(101)
    assert peer.errors == []


def test_protocol_1_speaks_torchs_format_and_opens_per_message(peer: FifoPeer) -> None:
    client = FileTimerClient(peer.path, signal.SIGTERM, protocol=1)
    client.arm("a", 60)
    assert fifo_descriptors(peer.path) == 2  # only the peer's
    client.acquire("b", 1.7e9)
    client.release("a")
    before = time.time()
    client.expire("b")
    after = time.time()
    messages = peer.wait_count(4)
    assert all(isinstance(m, TimerRequestV1) for m in messages)
    a, b, release, expire = messages
    assert isinstance(a, TimerRequestV1)
    assert (a.pid, a.scope_id, a.signal) == (ME, "a", 15)
    assert abs(a.expiration_time - (time.time() + 60)) < 5
    assert b == TimerRequestV1(ME, "b", 1.7e9, 15)
    assert release == TimerRequestV1(ME, "a", -1.0, 0)
    # Expire now: the present as the expiration time (version 1 has no expire message).
    assert isinstance(expire, TimerRequestV1)
    assert (expire.pid, expire.scope_id, expire.signal) == (ME, "b", 15)
    assert before <= expire.expiration_time <= after
    assert fifo_descriptors(peer.path) == 2
    with pytest.raises(ValueError, match=">= 0"):
        client.acquire("c", -1)


def test_heartbeat_extends_an_armed_scope_only(peer: FifoPeer) -> None:
    client = FileTimerClient(peer.path, labels={})
    client.arm("s", 1)
    client.heartbeat("s", 100)
    first, second = peer.wait_count(2)
    assert isinstance(first, Arm)
    assert isinstance(second, Arm)
    assert second.deadline - first.deadline > 98
    client.release("s")
    with pytest.raises(KeyError):
        client.heartbeat("s", 100)


@pytest.mark.parametrize("protocol", [1, 2])
def test_heartbeat_keeps_the_timer_as_it_was_armed(peer: FifoPeer, protocol: int) -> None:
    # A heartbeat used to re-arm with the client's own signal (a SIGTERM timer became a
    # SIGKILL one), and through another client took the timer from the one that armed
    # it: that one's close() then left it armed.
    labels = (lambda job: {"job": job}) if protocol == 2 else (lambda job: None)
    a = FileTimerClient(peer.path, signal.SIGKILL, labels=labels("a"), protocol=protocol)
    b = FileTimerClient(peer.path, signal.SIGKILL, labels=labels("b"), protocol=protocol)
    a.arm("s", 1, signal=signal.SIGTERM)
    a.heartbeat("s", 100)
    b.heartbeat("s", 100)
    assert (a.armed, b.armed) == ({"s"}, set())
    a.close()
    messages = peer.wait_count(4)
    if protocol == 1:
        assert [m.signal for m in messages[:3]] == [signal.SIGTERM] * 3  # type: ignore[union-attr]
        assert isinstance(messages[3], TimerRequestV1)
        assert messages[3].expiration_time < 0  # torch's release
    else:
        arms = messages[:3]
        assert all(isinstance(m, Arm) for m in arms)
        assert [(m.signal, m.labels) for m in arms] == [  # type: ignore[union-attr]
            (signal.SIGTERM, {"job": "a"})
        ] * 3
        assert isinstance(messages[3], Disarm)
    with pytest.raises(KeyError):
        b.heartbeat("s", 100)
    b.close()


def test_expire_now_and_per_timer_signal(peer: FifoPeer) -> None:
    client = FileTimerClient(peer.path, labels={"job": "j"})
    client.arm("s", 60, signal=signal.SIGABRT)
    client.expire("s", signal=0)
    arm, expire = peer.wait_count(2)
    assert isinstance(arm, Arm)
    assert arm.signal == signal.SIGABRT
    assert expire == Expire(ME, "s", 0, process_start_time(), {"job": "j"})
    assert client.armed == frozenset()


def test_release_all_disarms_everything_the_process_armed(peer: FifoPeer) -> None:
    one = FileTimerClient(peer.path, labels={})
    two = FileTimerClient(peer.path, labels={})
    one.arm("a", 60)
    two.arm("b", 60)
    one.release_all()
    messages = peer.wait_count(4)
    # One disarm per scope, never a disarm_all of the pid (test_review_fixes.py).
    assert messages[2:] == [Disarm(ME, s, process_start_time()) for s in ("a", "b")]
    assert one.armed == two.armed == frozenset()


def test_close_disarms_only_what_this_client_armed(peer: FifoPeer) -> None:
    with FileTimerClient(peer.path, labels={}) as one:
        two = FileTimerClient(peer.path, labels={})
        one.arm("a", 60)
        two.arm("b", 60)
    two.arm("c", 60)  # the shared descriptor is still good for the other client
    messages = peer.wait_count(4)
    assert server_state(messages) == {
        (ME, "b"): messages[1].deadline,  # type: ignore[union-attr]
        (ME, "c"): messages[3].deadline,  # type: ignore[union-attr]
    }
    two.close()
    assert server_state(peer.wait_count(6)) == {}
    assert fifo_descriptors(peer.path) == 2  # the last client let go of the FIFO


def test_a_path_that_is_not_a_fifo_is_refused_and_left_alone(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "regular"
    path.write_bytes(b"precious")
    client = FileTimerClient(path)
    with pytest.raises(ServerUnavailable, match="not a FIFO"):
        client.arm("s", 5)
    assert path.read_bytes() == b"precious"


def test_negative_expiration_time_is_refused_in_both_protocols(peer: FifoPeer) -> None:
    for protocol in (1, 2):
        client = FileTimerClient(peer.path, protocol=protocol)
        with pytest.raises(ValueError, match=">= 0"):
            client.acquire("s", -1)


def test_a_signal_handler_may_use_the_client_while_it_is_busy(peer: FifoPeer) -> None:
    client = FileTimerClient(peer.path, labels={})

    def handler(signum: int, frame: object) -> None:
        client.release_all()

    previous = signal.signal(signal.SIGUSR1, handler)
    try:
        with client._channel.lock:  # as if interrupted inside a write
            client.arm("s", 60)
            signal.raise_signal(signal.SIGUSR1)  # this process: the handler runs here
    finally:
        signal.signal(signal.SIGUSR1, previous)
    arm, disarm = peer.wait_count(2)
    assert isinstance(arm, Arm)
    assert disarm == Disarm(ME, "s", arm.start_time)


def test_a_heartbeat_racing_the_arming_clients_close_never_says_the_caller_is_closed(
    peer: FifoPeer,
) -> None:
    # The heartbeat checked that the arming client was open, then armed through it: a
    # close() in between raised "this FileTimerClient is closed" out of the open caller.
    beating = FileTimerClient(peer.path, labels={})
    outcomes = set()
    for _ in range(2000):
        arming = FileTimerClient(peer.path, labels={})
        arming.arm("s", 100)
        go = threading.Event()
        closer = threading.Thread(target=lambda c=arming, g=go: (g.wait(), c.close()))
        closer.start()
        go.set()
        try:
            beating.heartbeat("s", 100)
            outcomes.add("extended")  # before the close: which then disarmed it
        except KeyError:
            outcomes.add("released")  # after it
        closer.join()
        assert "s" not in beating._channel.armed  # the close disarmed it, either way
    assert outcomes <= {"extended", "released"}


def test_a_heartbeat_during_which_a_handler_closes_the_arming_client_leaves_nothing_armed(
    peer: FifoPeer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A signal handler of the same thread (the channel's lock is reentrant) closing the
    # arming client inside the heartbeat: its close() disarmed first, then the heartbeat
    # re-armed the scope as that closed client's, which nothing could disarm.
    from ftimer_client import _client

    arming = FileTimerClient(peer.path, labels={})
    beating = FileTimerClient(peer.path, labels={})
    arming.arm("s", 100)
    decode = _client.decode

    def closing(line: bytes):  # type: ignore[no-untyped-def]
        arming.close()  # as the handler would, at this point of the heartbeat
        return decode(line)

    monkeypatch.setattr(_client, "decode", closing)
    beating.heartbeat("s", 100)
    assert "s" not in beating._channel.armed
    assert isinstance(peer.wait_count(4)[-1], Disarm)  # arm, disarm, re-arm, disarm


def test_a_protocol_1_arm_checks_its_signal_first() -> None:
    client = FileTimerClient("/nonexistent/fifo", protocol=1)
    with pytest.raises(ValueError, match="signal"):
        client.arm("s", "5", signal=65)  # type: ignore[arg-type]


@pytest.mark.parametrize("after", [0, 1.5, 60, -1e300, float("inf"), 10**400, 1e308])
def test_arm_s_inlined_line_is_the_line_arm_would_build(
    peer: FifoPeer, monkeypatch: pytest.MonkeyPatch, after: float
) -> None:
    # arm() builds its line inline (every expires block goes through it): it must stay
    # byte for byte what _line() builds, for every number of seconds.
    from ftimer_client import _client

    monkeypatch.setattr(_client, "_monotonic", lambda: 1000.25)
    with FileTimerClient(str(peer.path), labels={}) as client:
        client.arm("s", after)
        assert client._channel.armed["s"][0] == client._line("s", after, None)
        bad_ones = [(float("nan"), ValueError), (-(10**400), ValueError), ("5", TypeError)]
        for bad, error in bad_ones:
            with pytest.raises(error):
                client.arm("bad", bad)  # type: ignore[arg-type]
            with pytest.raises(error):
                client._line("bad", bad, None)  # type: ignore[arg-type]
