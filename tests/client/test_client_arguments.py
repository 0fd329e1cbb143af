"""FileTimerClient's constructor arguments (from mutation testing of ``_client.py``).

Pins: labels still go with every arm after ``client.signal`` is assigned; a client not
told its protocol speaks 2, and shares its connection with one told 2; a client at torch's
own server (``TORCHELASTIC_ENABLE_FILE_TIMER=1``) names the one setting it ignores in the
singular, at the caller's line, keeps to the FIFO and sends protocol 1 lines.
"""

from __future__ import annotations

import signal
import time
from typing import Dict

import pytest

from ftimer_client import FileTimerClient
from ftimer_protocol import Arm, TimerRequestV1

from .conftest import FifoPeer
from .test_client_fifo import fifo_descriptors


def test_a_client_not_told_its_protocol_speaks_2_on_the_connection_of_one_told_2(
    peer: FifoPeer,
) -> None:
    default = FileTimerClient(peer.path, labels={})
    told = FileTimerClient(peer.path, protocol=2, labels={})
    assert default.protocol == 2
    default.arm("a", 60)
    told.arm("b", 60)
    peer.wait_count(2)
    assert fifo_descriptors(peer.path) == 3  # the peer's two, and the clients' one
    default.close()
    told.close()


def test_labels_still_go_with_every_arm_after_the_signal_is_assigned(peer: FifoPeer) -> None:
    client = FileTimerClient(peer.path, labels={"job": "x"})
    client.signal = signal.SIGTERM  # as torch code does
    client.arm("s", 60)
    (arm,) = peer.wait_count(1)
    assert isinstance(arm, Arm)
    assert (arm.signal, arm.labels) == (signal.SIGTERM, {"job": "x"})
    client.close()


@pytest.fixture
def torch_agent(monkeypatch: pytest.MonkeyPatch, peer: FifoPeer) -> FifoPeer:
    """``peer``'s FIFO as the one torch's agent serves itself, with no ftimer settings."""
    for name in ("FTIMER_FIFO", "FTIMER_SOCKET", "FTIMER_DUMP_SIGNAL"):
        monkeypatch.delenv(name, raising=False)
    for name in ("RANK", "LOCAL_RANK", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("TORCHELASTIC_ENABLE_FILE_TIMER", "1")
    monkeypatch.setenv("TORCHELASTIC_TIMER_FILE", str(peer.path))
    return peer


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [({"labels": {"job": "x"}}, "labels"), ({"dump_signal": "SIGUSR2"}, "dump_signal")],
)
def test_the_one_setting_torchs_own_server_ignores_is_named_at_the_callers_line(
    torch_agent: FifoPeer, kwargs: Dict[str, object], named: str
) -> None:
    match = f"^{named} is ignored: the FIFO is served by torch's own server"
    with pytest.warns(RuntimeWarning, match=match) as w:
        client = FileTimerClient(**kwargs)  # type: ignore[arg-type]
    assert len(w) == 1
    assert w[0].filename == __file__  # the construction, not the client's module
    assert (client.protocol, client.transport) == (1, "fifo")
    assert (client.labels, client.dump_hook) == ({}, None)
    client.acquire("s", time.time() + 60)
    (line,) = torch_agent.wait_count(1)
    assert isinstance(line, TimerRequestV1)
    assert line.scope_id == "s"
    client.close()
