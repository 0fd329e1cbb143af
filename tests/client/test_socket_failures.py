"""Over the socket: server absent or stalled, the wait for room. What holds alike on
both transports (a stall under warn or ignore, restart, removal, a path made again, fork) is in
test_failures.py and test_fork.py, run over each."""

from __future__ import annotations

import errno
import os
import pathlib
import threading
import time
import warnings

import pytest

from ftimer_client import (
    FileTimerClient,
    ServerStalled,
    ServerUnavailable,
    ServerUnavailableWarning,
    _resync,
    expires,
)
from ftimer_protocol import Arm

from .conftest import SocketPeer, server_state

ME = os.getpid()

pytestmark = pytest.mark.skipif(
    not hasattr(os, "pidfd_open"), reason="the socket transport is Linux's (pidfds)"
)


def scopes(messages: list) -> set:
    return {scope for pid, scope in server_state(messages) if pid == ME}


# -- absent -------------------------------------------------------------------------------


def test_no_socket_raises_promptly(socket_path: pathlib.Path) -> None:
    client = FileTimerClient(socket_path, transport="socket")
    start = time.monotonic()
    with pytest.raises(ServerUnavailable, match="no socket") as info:
        client.arm("s", 5)
    assert time.monotonic() - start < 0.9  # not a second's retries, as torch's client
    assert info.value.errno == errno.ENOENT
    assert str(socket_path) in str(info.value)
    assert client.armed == frozenset()


def test_a_socket_nobody_is_bound_to_is_refused(speer: SocketPeer) -> None:
    speer.close()  # the server died: its file stays
    client = FileTimerClient(speer.path)
    with pytest.raises(ServerUnavailable, match="no ftimer server is bound") as info:
        client.arm("s", 5)
    assert info.value.errno == errno.ECONNREFUSED
    with pytest.raises(BrokenPipeError):  # what torch users catch
        client.release("s")


@pytest.mark.parametrize("policy", ["warn", "ignore"])
def test_warn_and_ignore_carry_on_and_deliver_when_the_server_is_back(
    socket_path: pathlib.Path, policy: str
) -> None:
    client = FileTimerClient(socket_path, transport="socket", on_unavailable=policy, labels={})
    ran = 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            with expires(after=60, scope="s", client=client):
                ran += 1
        client.arm("kept", 60)
    assert ran == 3
    assert [w.category for w in caught] == ([ServerUnavailableWarning] if policy == "warn" else [])
    assert client.armed == {"kept"}
    peer = SocketPeer(socket_path)
    try:
        # No further call: the background resync delivers it.
        messages = peer.wait_for(lambda m: (ME, "kept") in server_state(m))
        assert scopes(messages) == {"kept"}
    finally:
        peer.close()


# -- stalled: the server stops reading ---------------------------------------------------


def test_a_sender_waits_for_room_in_the_kernels_queue_where_it_is_woken_alone(
    speer: SocketPeer,
) -> None:
    """poll(POLLOUT) on a full queue wakes every waiting sender at each datagram the
    server reads (with 16 waiting, the server spent 4x as long per datagram waking them
    as reading it); a blocking send waits in unix_wait_for_peer, woken one at a time."""
    client = FileTimerClient(speer.path, write_timeout=30.0, labels={})
    speer.pause()
    speer.fill()
    tids: list = []

    def arm() -> None:
        tids.append(threading.get_native_id())
        client.arm("a", 60)

    sender = threading.Thread(target=arm)
    sender.start()
    seen = set()
    deadline = time.monotonic() + 10
    while "unix_wait_for_peer" not in seen and time.monotonic() < deadline:
        if tids:
            with open(f"/proc/self/task/{tids[0]}/wchan") as f:
                seen.add(f.read())
        time.sleep(0.005)
    speer.resume()
    sender.join(30)
    if seen <= {"0", ""}:
        pytest.skip("this kernel does not name what a sleeping thread waits in (wchan)")
    assert "unix_wait_for_peer" in seen, seen
    messages = speer.wait_for(lambda m: any(isinstance(x, Arm) for x in m))
    assert [m.scope_id for m in messages if isinstance(m, Arm)] == ["a"]


def test_a_write_timeout_under_a_microsecond_fails_at_once(speer: SocketPeer) -> None:
    # A send timeout of zero (SO_SNDTIMEO) means no timeout at all: the client must not
    # round a tiny write_timeout down to it.
    client = FileTimerClient(speer.path, write_timeout=1e-7, labels={})
    speer.pause()
    speer.fill()
    start = time.monotonic()
    with pytest.raises(ServerStalled):
        client.arm("a", 60)
    assert time.monotonic() - start < 2.0  # the bug waited for good


@pytest.mark.parametrize("transport", ["socket", "fifo"])
def test_what_a_stalled_server_is_owed_goes_as_soon_as_it_reads_again(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, transport: str
) -> None:
    # The retry slept out its backoff (up to a second) after the server came back, but a
    # server back from a stop judges the arms it read a moment later: a healthy worker
    # whose disarm was still owed was reaped.
    monkeypatch.setattr(_resync, "RETRY_FIRST", 60.0)  # a backoff no test waits out
    monkeypatch.setattr(_resync, "RETRY_MAX", 60.0)
    peer = request.getfixturevalue("speer" if transport == "socket" else "peer")
    client = FileTimerClient(peer.path, on_unavailable="ignore", write_timeout=0.05, labels={})
    client.arm("warm", 60)  # connected
    peer.wait_for(lambda m: (ME, "warm") in server_state(m))
    peer.pause()
    peer.fill()
    client.arm("s", 60)  # no room: owed
    client.release("s")  # owed too, as its disarm
    client.release("warm")
    peer.resume()
    messages = peer.wait_for(lambda m: scopes(m) == set(), timeout=10.0)
    assert scopes(messages) == set()
