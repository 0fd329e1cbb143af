"""A tiny ``WATCHDOG_USEC`` must not make the daemon spin sending ``WATCHDOG=1``."""

from __future__ import annotations

import time
from typing import Callable

import pytest

from ftimer_server.daemon._systemd import MIN_WATCHDOG_INTERVAL, SystemdNotifier

from .conftest import DaemonProcess


@pytest.mark.parametrize("usec", ["1", "19999"])
def test_the_ping_interval_has_a_floor(usec: str, caplog: pytest.LogCaptureFixture) -> None:
    n = SystemdNotifier.from_environ({"NOTIFY_SOCKET": "/run/x", "WATCHDOG_USEC": usec})
    assert n.watchdog_interval == MIN_WATCHDOG_INTERVAL == 0.01
    assert f"WATCHDOG_USEC={usec} asks for a keep-alive every" in caplog.text


def test_an_interval_above_the_floor_is_kept(caplog: pytest.LogCaptureFixture) -> None:
    n = SystemdNotifier.from_environ({"NOTIFY_SOCKET": "/run/x", "WATCHDOG_USEC": "20000"})
    assert n.watchdog_interval == 0.01
    n = SystemdNotifier.from_environ({"NOTIFY_SOCKET": "/run/x", "WATCHDOG_USEC": "30000000"})
    assert n.watchdog_interval == 15.0
    assert "WATCHDOG_USEC" not in caplog.text


def test_the_daemon_pings_at_most_every_10_ms(spawn: Callable[..., DaemonProcess]) -> None:
    d = spawn(env={"WATCHDOG_USEC": "1"}).ready()
    d.notify.received.clear()
    # Count the pings of one second (a measurement, not a wait for something): about 100
    # at the floor; tens of thousands without one.
    end = time.monotonic() + 1.0
    while (left := end - time.monotonic()) > 0:
        d.notify.receive(left)
    pings = sum(n == "WATCHDOG=1" for n in d.notify.received)
    assert 10 <= pings <= 300
    assert d.stop() == 0
    assert any("asks for a keep-alive every" in r["msg"] for r in d.records())
