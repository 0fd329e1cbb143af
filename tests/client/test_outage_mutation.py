"""What mutation testing of the client's outage handling found no test pinned: a
release of everything in an outage owes only the disarms of arms that left, and every
one of those, past the recent; an arm a lost connection refused owes none. Real FIFOs
and sockets; the timers are report-only."""

from __future__ import annotations

import pathlib
from typing import Callable, List, Sequence, Type

from tests.client.conftest import FifoPeer, Peer, SocketPeer
from tests.conftest import wait_until

from ftimer_client import FileTimerClient
from ftimer_client._resync import RECENT
from ftimer_protocol import Arm, Disarm, Message


def through_an_outage(
    kind: Type[Peer],
    path: pathlib.Path,
    armed: Sequence[str],
    meanwhile: Callable[[FileTimerClient], None],
) -> List[Message]:
    """Arm ``armed`` under "ignore", let the server go (its path with it), run
    ``meanwhile``, bring a server back and send it a block: what it got, the resync whole."""
    peer = kind(path)
    client = FileTimerClient(str(path), signal=0, on_unavailable="ignore")
    try:
        for scope in armed:
            client.arm(scope, 60)
        peer.wait_for(lambda m: sum(isinstance(x, Arm) for x in m) >= len(armed))
        peer.close()
        path.unlink()  # the server is gone
        meanwhile(client)
        peer = kind(path)
        client.arm("back", 60)
        client.release("back")
        wait_until(lambda: not client._channel.needs_resync, what="the resync")
        peer.wait_for(lambda m: any(isinstance(x, Disarm) and x.scope_id == "back" for x in m))
        return list(peer.messages)
    finally:
        client.close()
        peer.close()


def disarmed(messages: List[Message]) -> List[str]:
    return [m.scope_id for m in messages if isinstance(m, Disarm)]  # type: ignore[union-attr]


def test_release_all_in_an_outage_owes_no_disarm_of_an_arm_that_never_left(
    fifo_path: pathlib.Path,
) -> None:
    # Kills _channel.py disarm_all: `lines, owed = state.disarm_all(scopes)` made to drop
    # the owed list (recomputed after the scopes were forgotten: every one then owed).
    def meanwhile(client: FileTimerClient) -> None:
        client.arm("never", 60)  # ignored: this arm never left
        client.release_all()  # ignored: not delivered

    messages = through_an_outage(FifoPeer, fifo_path, ["held"], meanwhile)
    assert "held" in disarmed(messages)
    assert not [m for m in messages if m.scope_id == "never"], messages  # type: ignore[union-attr]


def test_an_arm_the_lost_connection_refused_owes_no_disarm(tmp_path: pathlib.Path) -> None:
    # Kills _channel.py _write_all: `refused=isinstance(e, (ServerUnavailable,
    # ConnectionLost))` made `isinstance(e, ServerUnavailable)` (an arm the dead socket
    # refused counted as maybe sent: its release owed the server back a disarm).
    def meanwhile(client: FileTimerClient) -> None:
        client.arm("never", 60)  # ignored: the connection took none of it
        client.release("never")
        client.release("held")

    messages = through_an_outage(SocketPeer, tmp_path / "timer.socket", ["held"], meanwhile)
    assert "held" in disarmed(messages)
    assert not [m for m in messages if m.scope_id == "never"], messages  # type: ignore[union-attr]


def test_release_all_in_an_outage_owes_every_disarm_beyond_the_recent(
    fifo_path: pathlib.Path,
) -> None:
    # Kills _channel.py disarm_all: `state.lost_disarms(owed)` dropped from its except
    # (only the last RECENT disarms were then owed: the rest of the scopes stayed armed on
    # the server back, and reaped a healthy process).
    scopes = [f"s{i}" for i in range(RECENT + 40)]
    messages = through_an_outage(FifoPeer, fifo_path, scopes, FileTimerClient.release_all)
    missing = set(scopes) - set(disarmed(messages))
    assert not missing, sorted(missing)[:5]
