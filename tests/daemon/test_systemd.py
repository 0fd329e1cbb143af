"""sd_notify over a real AF_UNIX datagram socket, and reading systemd's environment."""

from __future__ import annotations

import os
import pathlib
import socket
from collections.abc import Iterator

import pytest

from ftimer_server.daemon._systemd import MAX_STATUS, SystemdNotifier


@pytest.fixture
def notify_socket(tmp_path: pathlib.Path) -> Iterator[tuple[str, socket.socket]]:
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(5)
    yield path, sock
    sock.close()


def test_notifications_arrive_as_datagrams(notify_socket: tuple[str, socket.socket]) -> None:
    path, sock = notify_socket
    n = SystemdNotifier.from_environ({"NOTIFY_SOCKET": path})
    assert n.enabled
    assert n.watchdog_interval is None
    assert n.ready("watching /x")
    assert sock.recv(4096).decode().split("\n") == [
        "READY=1",
        f"MAINPID={os.getpid()}",
        "STATUS=watching /x",
    ]
    assert n.watchdog()
    assert sock.recv(4096) == b"WATCHDOG=1"
    assert n.reloading()
    assert sock.recv(4096).startswith(b"RELOADING=1\nMONOTONIC_USEC=")
    assert n.stopping()
    assert sock.recv(4096) == b"STOPPING=1"
    n.close()


def test_the_status_is_one_short_line(notify_socket: tuple[str, socket.socket]) -> None:
    # systemd reads each line as an assignment, and drops a notification of 4096 bytes
    # or more whole: READY=1 with a long status, and a reload never ended.
    path, sock = notify_socket
    n = SystemdNotifier.from_environ({"NOTIFY_SOCKET": path})
    assert n.ready("bad host x\nSTOPPING=1\n" + "é" * 5000)
    lines = sock.recv(8192).decode().split("\n")
    assert lines[:2] == ["READY=1", f"MAINPID={os.getpid()}"]
    [status] = lines[2:]
    assert status.startswith("STATUS=bad host x\\nSTOPPING=1\\néé")
    assert len(status) == len("STATUS=") + MAX_STATUS
    assert status.endswith("é…")
    n.close()


def test_abstract_namespace_socket() -> None:
    name = f"ftimer-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        n = SystemdNotifier.from_environ({"NOTIFY_SOCKET": "@" + name})
        assert n.stopping()
        assert sock.recv(4096) == b"STOPPING=1"
        n.close()


def test_no_socket_means_no_op() -> None:
    n = SystemdNotifier.from_environ({})
    assert not n.enabled
    assert not n.ready()
    assert n.watchdog_interval is None


def test_unreachable_socket_is_not_an_error(
    tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture
) -> None:
    n = SystemdNotifier(str(tmp_path / "gone.sock"))
    assert not n.ready()
    assert not n.watchdog()
    n.close()
    assert len([r for r in caplog.records if "cannot notify systemd" in r.message]) == 1


@pytest.mark.parametrize(
    ("env", "interval"),
    [
        ({"WATCHDOG_USEC": "2000000"}, 1.0),
        ({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "1234"}, 1.0),
        ({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "999"}, None),  # another process's
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        # Digits to str.isdigit() but not to int(): ignored, never a crash.
        ({"WATCHDOG_USEC": "\u00b2"}, None),
        ({"WATCHDOG_USEC": "\u0662000000"}, None),
    ],
)
def test_watchdog_environment(env: dict[str, str], interval: float | None) -> None:
    n = SystemdNotifier.from_environ({"NOTIFY_SOCKET": "/run/x", **env}, pid=1234)
    assert n.watchdog_interval == interval


def test_unsupported_address_is_ignored(caplog: pytest.LogCaptureFixture) -> None:
    n = SystemdNotifier.from_environ({"NOTIFY_SOCKET": "vsock:2:1234"})
    assert not n.enabled
    assert "not supported" in caplog.text
