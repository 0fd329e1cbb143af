"""The resync after a lost delivery: the server's view of a client's timers must end as
the client's, whatever failed between two calls (a review's findings: a disarm the
resync delivered was forgotten, a failed expire became a disarm, a failed re-arm undid
a signal handler's release). Real FIFOs and sockets; the peers only read."""

from __future__ import annotations

import os
import pathlib
import signal
import warnings
from typing import Any, Callable, Type

import pytest
from tests.conftest import wait_until

from ftimer_client import FileTimerClient, ServerStalled
from ftimer_client._resync import RECENT, Resync
from ftimer_client._wire import V2Lines
from ftimer_protocol import Arm, Expire

from .conftest import FifoPeer, Peer, SocketPeer, restart, server_state

TRANSPORTS = [
    pytest.param(FifoPeer, "timer.fifo", id="fifo"),
    pytest.param(SocketPeer, "timer.socket", id="socket"),
]


def drain(peer: Any) -> None:
    """Read what the paused peer's queue holds and drop it: the server read it (the
    peer stays paused, so what is written next stays unread)."""
    while True:
        try:
            if isinstance(peer, FifoPeer):
                if not os.read(peer.rfd, 65536):
                    return
            else:
                peer.sock.recv(65536)
        except BlockingIOError:
            return


def stalled(policy: str, call: Callable[[], object]) -> None:
    """Make ``call`` against a full queue: it fails as ``policy`` says (``ServerStalled``
    with "raise", a warning with "warn")."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            call()
        except ServerStalled:
            assert policy == "raise"


@pytest.mark.parametrize(("kind", "name"), TRANSPORTS)
@pytest.mark.parametrize("policy", ["raise", "warn"])
def test_a_disarm_the_retries_delivered_is_owed_again_after_a_restart(
    tmp_path: pathlib.Path, kind: Type[Peer], name: str, policy: str
) -> None:
    # It was not among "the last disarms delivered": the server restarted before reading
    # it, restored the timer from its state file, and the resync never disarmed it.
    peer: Any = kind(tmp_path / name)
    client = FileTimerClient(str(peer.path), write_timeout=0.1, labels={}, on_unavailable=policy)
    try:
        client.arm("released", 600)
        client.arm("kept", 600)
        saved = peer.wait_count(2)  # what the server's state file holds
        peer.pause()
        peer.fill()
        stalled(policy, lambda: client.release("released"))  # the retries owe its disarm
        channel = client._channel
        drain(peer)  # room again: the retries deliver the disarm, which stays unread
        wait_until(lambda: not channel.needs_resync, what="the retries done")
        peer = restart(peer)
        client.arm("new", 600)  # finds the restart: reconnects, resyncs
        read = peer.wait_for(lambda m: any(isinstance(x, Arm) and x.scope_id == "new" for x in m))
        assert {scope for _, scope in server_state([*saved, *read])} == {"kept", "new"}
    finally:
        client.close()
        peer.close()


@pytest.mark.parametrize(("kind", "name"), TRANSPORTS)
def test_a_disarm_a_resync_sent_survives_a_second_restart(
    tmp_path: pathlib.Path, kind: Type[Peer], name: str
) -> None:
    peer: Any = kind(tmp_path / name)
    client = FileTimerClient(str(peer.path), write_timeout=5.0, labels={})
    try:
        client.arm("released", 600)
        client.arm("kept", 600)
        saved = peer.wait_count(2)
        peer.pause()
        client.release("released")  # written, never read
        peer = restart(peer)
        peer.pause()  # the new server is slow to read...
        client.arm("new", 600)  # the resync sends the disarm again, unread
        peer = restart(peer)  # ...and restarts again (a crash loop)
        client.arm("new2", 600)
        read = peer.wait_for(lambda m: any(isinstance(x, Arm) and x.scope_id == "new2" for x in m))
        assert "released" not in {scope for _, scope in server_state([*saved, *read])}
    finally:
        client.close()
        peer.close()


@pytest.mark.parametrize(("kind", "name"), TRANSPORTS)
@pytest.mark.parametrize("policy", ["raise", "warn"])
def test_an_expire_that_failed_leaves_the_timer_it_replaced(
    tmp_path: pathlib.Path, kind: Type[Peer], name: str, policy: str
) -> None:
    # "I am stuck, reap me" that stalled was counted as a disarm: the resync removed the
    # scope's 30 s timer too, and the stuck worker was never reaped.
    peer: Any = kind(tmp_path / name)
    client = FileTimerClient(str(peer.path), write_timeout=0.1, labels={}, on_unavailable=policy)
    try:
        client.arm("stuck", 30)
        saved = peer.wait_count(1)
        peer.pause()
        peer.fill()
        stalled(policy, lambda: client.expire("stuck"))
        peer.take()
        peer.resume()
        wait_until(lambda: not client._channel.needs_resync, what="the retries done")
        read = peer.take()
        expired = any(isinstance(m, Expire) for m in read)
        assert expired or ("stuck" in {s for _, s in server_state([*saved, *read])})
    finally:
        client.close()
        peer.close()


@pytest.mark.parametrize(("kind", "name"), TRANSPORTS)
@pytest.mark.parametrize("call", ["re-arm", "expire"])
def test_a_failed_call_does_not_undo_a_signal_handlers_release(
    tmp_path: pathlib.Path, kind: Type[Peer], name: str, call: str
) -> None:
    # A failed re-arm put the scope's previous arm back, and a failed expire the timer it
    # replaced, over the release a signal handler made while they waited for room: the
    # resync re-armed a released scope on the server.
    peer: Any = kind(tmp_path / name)
    client = FileTimerClient(str(peer.path), write_timeout=0.3, labels={})
    released = []

    def handler(signum: int, frame: object) -> None:
        client.release("s")  # deferred while the call delivers; returns normally
        released.append(True)

    old = signal.signal(signal.SIGALRM, handler)
    try:
        client.arm("s", 600)
        peer.wait_count(1)
        peer.pause()
        peer.fill()
        signal.setitimer(signal.ITIMER_REAL, 0.05)  # lands while the call waits
        failing = (lambda: client.arm("s", 900)) if call == "re-arm" else lambda: client.expire("s")
        with pytest.raises(ServerStalled):
            failing()
        assert released
        assert "s" not in client._channel.armed
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
        client.close()
        peer.close()


def test_the_disarms_a_resync_delivered_make_room_before_later_ones() -> None:
    # They went out before the caller's disarm, yet were recorded after it: with 512 of
    # them, the caller's was pushed out of the last disarms delivered, and not sent again
    # after a restart that restored its timer.
    state = Resync(V2Lines(1234, 1, 15, {}, None))
    state.needs_resync = True
    state.lost_disarms([f"old{i}" for i in range(RECENT)])
    state.disarm("x")  # its line goes after the resync's
    state.delivered()
    state.failed(0.0)  # a restart before the server read them
    assert state.owed("x") == V2Lines(1234, 1, 15, {}, None).disarm("x")  # owed again
