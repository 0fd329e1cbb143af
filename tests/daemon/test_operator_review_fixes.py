"""The daemon's operator surface as a careless operator or a hostile local user meets
it: connections to the control socket that say nothing, a supervisor's notify socket
nobody reads, the control socket's file removed. Real daemons; no timer is armed, so
they signal nothing."""

from __future__ import annotations

import contextlib
import os
import pathlib
import socket
import subprocess
import threading
import time
import types
from typing import Callable, List

import pytest

from ftimer_server.daemon import _systemd
from ftimer_server.daemon._control import query_status
from ftimer_server.daemon._systemd import SystemdNotifier

from .conftest import PATIENCE, PYTHON, DaemonProcess

Spawn = Callable[..., DaemonProcess]


def health(d: DaemonProcess) -> subprocess.CompletedProcess[str]:
    """``ftimer-server status --health``, as a liveness probe runs it."""
    return subprocess.run(
        [PYTHON, "-m", "ftimer_server", "status", "--health", "--fifo", str(d.fifo)],
        capture_output=True,
        text=True,
        timeout=PATIENCE * 2,
    )


def test_silent_connections_never_make_the_health_probe_fail(spawn: Spawn) -> None:
    # The control socket serves 8 connections at once, each given 2 s to ask: those
    # queued behind 40 connections that said nothing waited their turn, and the probe's
    # 5 s ran out ("timed out", exit 1) on a healthy daemon, which a liveness probe then
    # restarts. A silent connection now gives its slot up to a new one.
    d = spawn("--capture", "none", "--no-socket").ready()
    idle: List[socket.socket] = []
    try:
        for _ in range(40):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(str(d.fifo) + ".sock")  # and says nothing
            idle.append(s)
        probe = health(d)
    finally:
        for s in idle:
            s.close()
    assert probe.returncode == 0, probe.stderr


def test_a_notify_socket_nobody_reads_holds_neither_the_loop_nor_the_stop(
    spawn: Spawn,
) -> None:
    # A supervisor that stops reading its notify socket after READY=1 (or a busy one):
    # the reaping loop's keep-alive was a blocking send, and once the queue was full it
    # waited there for good: no line read, no timer reaped, and SIGTERM waited on it
    # too. A keep-alive that finds no room is dropped (said once in the log).
    d = spawn("--capture", "none", "--no-socket", env={"WATCHDOG_USEC": "200000"}).ready()
    fill(d.notify.path)  # nobody reads the notify socket from now on
    d.wait_for_record(where=lambda r: r["msg"].startswith("cannot notify systemd"))
    probe = health(d)
    assert probe.returncode == 0, probe.stderr
    assert d.stop() == 0


def test_a_removed_control_socket_is_made_anew(spawn: Spawn) -> None:
    # Removed (a mistaken rm, a cleaner of /tmp), `status` said "no ftimer-server is
    # running" of a daemon that went on reaping, for as long as it ran; an operator who
    # believed it and started another was refused by the FIFO's lock.
    d = spawn("--capture", "none", "--no-socket").ready()
    path = str(d.fifo) + ".sock"
    os.unlink(path)
    d.wait_for_record(where=lambda r: r["msg"].endswith("was removed; made it anew"))
    assert query_status(path, health=True)["healthy"] is True
    assert health(d).returncode == 0
    assert d.stop() == 0
    assert not os.path.exists(path)  # the new one is removed at the stop too


def test_another_file_in_the_control_sockets_place_is_left_alone(spawn: Spawn) -> None:
    d = spawn("--capture", "none", "--no-socket").ready()
    path = pathlib.Path(str(d.fifo) + ".sock")
    other = path.with_name("other")
    other.write_text("not ours")
    other.replace(path)  # in one step: the daemon's check never sees the path free
    d.wait_for_record(where=lambda r: "no longer names the daemon's control socket" in r["msg"])
    assert path.read_text() == "not ours"
    path.unlink()  # gone: made anew at the next check
    d.wait_for_record(where=lambda r: r["msg"].endswith("was removed; made it anew"))
    assert health(d).returncode == 0
    assert d.stop() == 0


def test_ready_waits_out_a_notify_socket_that_is_full_for_a_moment(
    short_dir: pathlib.Path,
) -> None:
    # With every notification sent without waiting (so that a ping never holds the
    # loop), READY=1 met a queue full for a moment (PID 1 busy at boot, when every unit
    # notifies) and was dropped: systemd kills a daemon that never says it is ready.
    # Only WATCHDOG=1 may be a ping missed.
    path = str(short_dir / "notify")
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(path)
    fill(path)
    catching_up = threading.Timer(0.3, drain, args=(receiver,))  # PID 1, a moment later
    catching_up.start()
    notifier = SystemdNotifier.from_environ({"NOTIFY_SOCKET": path})
    try:
        assert notifier.ready("ok")
    finally:
        catching_up.join()
        notifier.close()
        receiver.close()


def drain(sock: socket.socket) -> None:
    """Receive what ``sock``'s queue holds."""
    sock.setblocking(False)
    with contextlib.suppress(BlockingIOError):
        while True:
            sock.recv(4096)


def test_a_ping_never_waits_for_a_notification_waiting_for_room(
    short_dir: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # READY=1 waiting for room held the notifier's lock: the reaping loop's WATCHDOG=1,
    # which never waits, waited on the lock as long (2 s; a reload's two, 4 s).
    path = str(short_dir / "notify")
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(path)
    fill(path)
    notifier = SystemdNotifier(path, watchdog_usec=1_000_000)
    retrying, pinged, woke = threading.Event(), threading.Event(), threading.Event()

    def held_retry(seconds: float) -> None:  # READY=1's wait for room, held open
        retrying.set()
        pinged.wait(10)
        woke.set()

    # (The notifier's view of the time module alone: other threads sleep as ever.)
    monkeypatch.setattr(
        _systemd, "time", types.SimpleNamespace(monotonic=time.monotonic, sleep=held_retry)
    )
    ready = threading.Thread(target=notifier.ready)
    ready.start()
    try:
        assert retrying.wait(10)
        notifier.watchdog()  # the reaping loop's, while READY=1 waits for room
        assert not woke.is_set()  # it returned while READY=1 still waited
    finally:
        pinged.set()
        drain(receiver)
        ready.join(30)
        notifier.close()
        receiver.close()


def test_a_notify_socket_made_anew_gets_the_next_notification(short_dir: pathlib.Path) -> None:
    path = str(short_dir / "notify")
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(path)
    notifier = SystemdNotifier(path)
    try:
        assert notifier.notify("STATUS=first")
        assert receiver.recv(4096) == b"STATUS=first"
        receiver.close()
        pathlib.Path(path).unlink()
        receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)  # made anew
        receiver.bind(path)
        assert notifier.ready("back")
        assert receiver.recv(4096).startswith(b"READY=1")
    finally:
        notifier.close()
        receiver.close()


def fill(path: str) -> None:
    """Fill the queue of the datagram socket bound at ``path`` (ours)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as filler:
        filler.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            while True:
                filler.sendto(b"X=1", path)
