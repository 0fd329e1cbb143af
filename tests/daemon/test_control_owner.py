"""A stale control socket of another user's is refused, never removed (as the FIFO and
the datagram socket are)."""

from __future__ import annotations

import os
import pathlib
import socket
from typing import Callable

import pytest

from ftimer_server.daemon._control import ControlServer, ControlSocketBusy

from .conftest import PATIENCE, DaemonProcess

NOBODY = 65534
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (to chown a socket)")


def stale_socket(path: pathlib.Path) -> None:
    """Leave a socket at ``path`` that nothing listens on (a daemon that died)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(str(path))


@needs_root
def test_another_users_stale_socket_is_refused(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "timer.fifo.sock"
    stale_socket(path)
    os.chown(path, NOBODY, NOBODY)
    with pytest.raises(ControlSocketBusy) as raised:
        ControlServer(str(path), lambda _: {}).check_free()
    assert str(raised.value) == (
        f"{path} is a socket of uid {NOBODY}, not this user's; refusing to replace it"
    )
    assert os.lstat(path).st_uid == NOBODY  # still there


def test_a_socket_of_another_uid_is_refused(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Without root, no file of another user's can be made: this user's socket stands for
    # it while the daemon believes it runs as someone else.
    path = tmp_path / "timer.fifo.sock"
    stale_socket(path)
    me = os.geteuid()
    monkeypatch.setattr(os, "geteuid", lambda: me + 1)
    with pytest.raises(ControlSocketBusy, match=f"is a socket of uid {me}, not this user's"):
        ControlServer(str(path), lambda _: {}).check_free()
    assert path.is_socket()


def test_this_users_stale_socket_is_still_replaced(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "timer.fifo.sock"
    stale_socket(path)
    ControlServer(str(path), lambda _: {}).check_free()
    assert not path.exists()


@needs_root
def test_the_daemon_refuses_to_start(
    spawn: Callable[..., DaemonProcess], short_dir: pathlib.Path
) -> None:
    path = short_dir / "timer.fifo.sock"
    stale_socket(path)
    os.chown(path, NOBODY, NOBODY)
    d = spawn("--capture", "none")
    assert d.proc.wait(PATIENCE) == 3
    (record,) = [r for r in d.records() if r["level"] == "error"]
    assert record["msg"] == (
        f"cannot start: {path} is a socket of uid {NOBODY}, not this user's; refusing to replace it"
    )
    assert os.lstat(path).st_uid == NOBODY
