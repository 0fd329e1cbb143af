"""What mutation testing of the client's outage handling found no test pinned: a
release of everything in an outage owes only the disarms of arms that left, and every
one of those, past the recent; an arm a lost connection refused owes none. Real FIFOs
and sockets; the timers are report-only."""

from __future__ import annotations

import pathlib

from tests.client.conftest import FifoPeer
from tests.conftest import wait_until

from ftimer_client import FileTimerClient
from ftimer_protocol import Arm, Disarm


def test_release_all_in_an_outage_owes_no_disarm_of_an_arm_that_never_left(
    fifo_path: pathlib.Path,
) -> None:
    # Kills _channel.py disarm_all: `lines, owed = state.disarm_all(scopes)` made to drop
    # the owed list (recomputed after the scopes were forgotten: every one then owed).
    peer = FifoPeer(fifo_path)
    client = FileTimerClient(str(fifo_path), signal=0, on_unavailable="ignore")
    try:
        client.arm("held", 60)
        peer.wait_for(lambda m: any(isinstance(x, Arm) and x.scope_id == "held" for x in m))
        peer.close()
        fifo_path.unlink()  # the server is gone
        client.arm("never", 60)  # ignored: this arm never left
        client.release_all()  # ignored: not delivered
        peer = FifoPeer(fifo_path)
        client.arm("back", 60)
        client.release("back")
        wait_until(lambda: not client._channel.needs_resync, what="the resync")
        peer.wait_for(lambda m: any(isinstance(x, Disarm) and x.scope_id == "back" for x in m))
        assert any(isinstance(m, Disarm) and m.scope_id == "held" for m in peer.messages)
        assert not [m for m in peer.messages if m.scope_id == "never"], peer.messages
    finally:
        client.close()
        peer.close()


def test_an_arm_the_lost_connection_refused_owes_no_disarm(tmp_path: pathlib.Path) -> None:
    # Kills _channel.py _write_all: `refused=isinstance(e, (ServerUnavailable,
    # ConnectionLost))` made `isinstance(e, ServerUnavailable)` (an arm the dead socket
    # refused counted as maybe sent: its release owed the server back a disarm).
    import os

    if not hasattr(os, "pidfd_open"):
        import pytest

        pytest.skip("the socket transport is Linux's")
    from tests.client.conftest import SocketPeer

    path = tmp_path / "timer.socket"
    peer = SocketPeer(path)
    client = FileTimerClient(str(path), signal=0, on_unavailable="ignore")
    try:
        client.arm("held", 60)
        peer.wait_for(lambda m: any(isinstance(x, Arm) and x.scope_id == "held" for x in m))
        peer.close()
        path.unlink()  # the server is gone
        client.arm("never", 60)  # ignored: the connection took none of it
        client.release("never")
        client.release("held")
        peer = SocketPeer(path)
        client.arm("back", 60)
        client.release("back")
        wait_until(lambda: not client._channel.needs_resync, what="the resync")
        peer.wait_for(lambda m: any(isinstance(x, Disarm) and x.scope_id == "back" for x in m))
        assert any(isinstance(m, Disarm) and m.scope_id == "held" for m in peer.messages)
        assert not [m for m in peer.messages if m.scope_id == "never"], peer.messages
    finally:
        client.close()
        peer.close()


def test_release_all_in_an_outage_owes_every_disarm_beyond_the_recent(
    fifo_path: pathlib.Path,
) -> None:
    # Kills _channel.py disarm_all: `state.lost_disarms(owed)` dropped from its except
    # (only the last RECENT disarms were then owed: the rest of the scopes stayed armed on
    # the server back, and reaped a healthy process).
    from ftimer_client._resync import RECENT

    scopes = [f"s{i}" for i in range(RECENT + 40)]
    peer = FifoPeer(fifo_path)
    client = FileTimerClient(str(fifo_path), signal=0, on_unavailable="ignore")
    try:
        for s in scopes:
            client.arm(s, 60)
        peer.wait_for(lambda m: sum(isinstance(x, Arm) for x in m) >= len(scopes))
        peer.close()
        fifo_path.unlink()  # the server is gone
        client.release_all()  # ignored: not delivered
        peer = FifoPeer(fifo_path)
        client.arm("back", 60)
        client.release("back")
        wait_until(lambda: not client._channel.needs_resync, what="the resync")
        peer.wait_for(lambda m: any(isinstance(x, Disarm) and x.scope_id == "back" for x in m))
        disarmed = {m.scope_id for m in peer.messages if isinstance(m, Disarm)}
        assert set(scopes) <= disarmed, sorted(set(scopes) - disarmed)[:5]
    finally:
        client.close()
        peer.close()
