"""The control socket: owner-only, one daemon per path, stale sockets replaced."""

from __future__ import annotations

import contextlib
import errno
import io
import os
import pathlib
import shutil
import socket
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator
from typing import Any, Callable, List

import pytest
from tests.conftest import wait_until

from ftimer_server.daemon import _control
from ftimer_server.daemon._cli import main
from ftimer_server.daemon._control import (
    ControlServer,
    ControlSocketBusy,
    DaemonNotRunning,
    query_status,
)

from .conftest import PATIENCE, PYTHON, DaemonProcess


@pytest.fixture
def path(tmp_path: pathlib.Path) -> str:
    return str(tmp_path / "timer.fifo.sock")


def test_status_round_trip_and_cleanup(path: str) -> None:
    calls = []

    def status(timers: bool) -> dict[str, object]:
        calls.append(timers)
        return {"pid": os.getpid(), **({"timers": [{"scope_id": "s"}]} if timers else {})}

    server = ControlServer(path, status)
    server.start()
    try:
        assert stat.S_IMODE(os.lstat(path).st_mode) == 0o600
        assert query_status(path) == {"pid": os.getpid(), "timers": [{"scope_id": "s"}]}
        assert query_status(path, health=True) == {"pid": os.getpid()}
        assert calls == [True, False]
    finally:
        server.stop()
    assert not os.path.exists(path)
    assert os.listdir(os.path.dirname(path)) == []
    with pytest.raises(DaemonNotRunning):
        query_status(path)


def test_health_asks_an_older_daemon_for_its_status(
    path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A daemon from before "health" answers it with an error, which `status --health`
    # read as a reply missing its fields: exit 1, a healthy daemon reported dead.
    monkeypatch.setattr(_control, "_REQUESTS", (b"status",))
    server = ControlServer(path, lambda timers: {"pid": os.getpid(), "timers": []})
    server.start()
    try:
        assert query_status(path, health=True) == {"pid": os.getpid(), "timers": []}
    finally:
        server.stop()


def test_a_second_daemon_on_the_same_socket_is_refused(path: str) -> None:
    first = ControlServer(path, lambda _: {})
    first.start()
    try:
        with pytest.raises(ControlSocketBusy, match="already running"):
            ControlServer(path, lambda _: {}).start()
        assert query_status(path) == {}  # the first one still answers
    finally:
        first.stop()


def test_a_stale_socket_is_replaced(path: str) -> None:
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(path)  # bound, never listening: what a killed daemon leaves behind
    dead.close()
    server = ControlServer(path, lambda _: {"ok": True})
    server.start()
    try:
        assert query_status(path) == {"ok": True}
    finally:
        server.stop()


def test_a_regular_file_at_the_path_is_not_replaced(path: str) -> None:
    pathlib.Path(path).write_text("precious")
    with pytest.raises(ControlSocketBusy, match="not a socket"):
        ControlServer(path, lambda _: {}).start()
    assert pathlib.Path(path).read_text() == "precious"


def test_peers_of_other_users_are_refused(path: str) -> None:
    server = ControlServer(
        path, lambda _: {"secret": 1}, allowed_uids=frozenset({os.geteuid() + 1})
    )
    server.start()
    try:
        with pytest.raises(PermissionError, match="only the daemon's user and root may ask"):
            query_status(path)
    finally:
        server.stop()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root, to ask as another user")
def test_a_user_the_socket_keeps_out_is_told_who_may_ask(path: str) -> None:
    server = ControlServer(path, lambda _: {})  # 0600: root's
    server.start()
    os.chmod(os.path.dirname(path), 0o755)  # nobody may enter, not connect
    r, w = os.pipe()
    try:
        pid = os.fork()
        if pid == 0:  # pragma: no cover (the child, as nobody)
            err = io.StringIO()
            with contextlib.redirect_stderr(err):
                os.setuid(65534)
                code = main(["status", "--fifo", path[: -len(".sock")]])
            os.write(w, f"{code} {err.getvalue()}".encode())
            os._exit(0)
        os.close(w)
        with os.fdopen(r) as f:
            said = f.read()
        os.waitpid(pid, 0)
    finally:
        server.stop()
    assert said == (
        "1 ftimer-server: error: permission denied: only the daemon's user and root may "
        f"ask {path} for the status\n"
    )


def test_unknown_request_and_a_failing_callback_do_not_stop_the_server(path: str) -> None:
    def broken(timers: bool) -> dict[str, object]:
        raise RuntimeError("bug")

    server = ControlServer(path, broken)
    server.start()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(path)
            s.sendall(b"reboot\n")
            assert b"unknown request" in s.recv(4096)
        # The broken callback: the connection is closed with no reply.
        with pytest.raises(ValueError, match="Expecting value"):
            query_status(path)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(path)  # still serving
    finally:
        server.stop()


@pytest.fixture
def idle() -> Iterator[Callable[[str], socket.socket]]:
    """Connect to a control socket and say nothing; every connection is closed at the end."""
    peers: List[socket.socket] = []

    def connect(path: str) -> socket.socket:
        peer = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        peers.append(peer)
        peer.connect(path)
        return peer

    yield connect
    for peer in peers:
        peer.close()


def test_status_answers_while_idle_peers_are_connected(
    spawn: Callable[..., DaemonProcess], idle: Callable[[str], socket.socket]
) -> None:
    # Served one at a time, each idle peer held the socket for its 2 s timeout: the
    # status command (the systemd / Kubernetes health check) timed out behind five.
    d = spawn("--capture", "none").ready()
    for _ in range(5):
        idle(f"{d.fifo}.sock")
    result = subprocess.run(
        [PYTHON, "-m", "ftimer_server", "status", "--fifo", str(d.fifo)],
        capture_output=True,
        text=True,
        timeout=PATIENCE,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ftimer-server ")
    assert d.stop() == 0


def test_peers_beyond_those_served_at_once_wait_their_turn_and_stop_does_not(
    path: str, idle: Callable[[str], socket.socket], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_control, "_MAX_PEERS", 2)
    monkeypatch.setattr(_control, "_PEER_TIMEOUT", 0.5)
    server = ControlServer(path, lambda _: {"ok": True})
    server.start()
    try:
        idle(path)
        idle(path)
        wait_until(lambda: server._serving == 2, what="both idle peers served")
        # Waits for a slot (an idle peer's 0.5 s), rather than being turned away.
        assert query_status(path, timeout=PATIENCE) == {"ok": True}
        wait_until(lambda: server._serving == 0, what="every peer done")
        monkeypatch.setattr(_control, "_PEER_TIMEOUT", PATIENCE)
        idle(path)
        idle(path)
        wait_until(lambda: server._serving == 2, what="both new idle peers served")
        idle(path)  # waits for a slot until the idle peers time out, or stop()
    finally:
        started = time.monotonic()
        server.stop()
    assert time.monotonic() - started < PATIENCE / 2  # not after the idle peers' timeouts
    assert not os.path.exists(path)


def test_status_out_of_descriptors_answers_instead_of_failing(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch, text_log: Any
) -> None:
    # The status's round trip through the FIFO needs a descriptor: out of them (EMFILE),
    # the reply was no reply, and `ftimer-server status` failed decoding nothing. An
    # idle loop is reading: it is healthy, not caught up (that could not be told).
    from ftimer_server import FileTimerServer
    from ftimer_server.daemon._config import DaemonConfig
    from ftimer_server.daemon._daemon import Daemon
    from ftimer_server.server import _server

    fifo = tmp_path / "timer.fifo"
    daemon = Daemon(DaemonConfig(fifo=str(fifo)), text_log, environ={})
    with FileTimerServer(fifo) as server:
        daemon._server = server

        def out_of_descriptors(fd: int) -> int:
            raise OSError(errno.EMFILE, "Too many open files")

        monkeypatch.setattr(_server.os, "dup", out_of_descriptors)
        status = daemon._status(True)
        monkeypatch.undo()
        assert (status["healthy"], status["caught_up"]) == (True, False)
        server.sync()  # no token left behind: the next sync still completes
        assert daemon._status(True)["healthy"] is True


def test_status_of_a_loop_stalled_holding_the_table_answers_and_says_so(
    tmp_path: pathlib.Path, text_log: Any
) -> None:
    # A reap step (or a blocked log) runs under the loop's lock: the status's sync timed
    # out, then waited for the lock without end to take its token back, and then for
    # the timers: `ftimer-server status` said "timed out" and the control thread hung.
    import threading

    from ftimer_protocol import Expire, encode
    from ftimer_server import FileTimerServer, RecordingSignaller
    from ftimer_server.daemon._cli import format_status
    from ftimer_server.daemon._config import DaemonConfig
    from ftimer_server.daemon._daemon import Daemon

    gate, entered = threading.Event(), threading.Event()

    def stuck(worker: object, expiry: object, now: float) -> None:
        entered.set()
        gate.wait(PATIENCE)

    fifo = tmp_path / "timer.fifo"
    daemon = Daemon(DaemonConfig(fifo=str(fifo)), text_log, environ={})
    server = FileTimerServer(fifo, signaller=RecordingSignaller(), reap_steps=[stuck])
    child = subprocess.Popen(["sleep", "60"])
    try:
        with server:
            daemon._server = server
            assert daemon._status(True)["timers"] == []
            fd = os.open(fifo, os.O_WRONLY)
            os.write(fd, encode(Expire(pid=child.pid, scope_id="s", signal=9)))
            os.close(fd)
            assert entered.wait(PATIENCE)
            began = time.monotonic()
            status = daemon._status(True)
            assert time.monotonic() - began < PATIENCE / 2  # not the stall's
            assert (status["healthy"], status["timers"], status["stats"]) == (False, None, None)
            assert status["armed"] is None
            assert status["last_progress"] <= time.time()
            assert "armed timers unknown: the server's loop is busy" in format_status(status)
            gate.set()
            server.sync()  # the timed-out token was taken back: the next sync completes
            status = daemon._status(True)
            assert status["healthy"] is True
            assert status["stats"]["reaps"] == {"9": 1}
    finally:
        gate.set()
        child.kill()
        child.wait()


# Answers one status request on argv[1] with a forged document, as whoever runs it.
FORGER = """
import json, os, socket, sys
with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
    s.bind(sys.argv[1])
    s.listen(1)
    print("ready", flush=True)
    conn, _ = s.accept()
    with conn:
        conn.recv(64)
        conn.sendall(json.dumps({"version": "9", "pid": 1, "healthy": True}).encode() + b"\\n")
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root, to answer as another user")
def test_status_refuses_an_answer_from_another_user(monkeypatch: pytest.MonkeyPatch) -> None:
    # A user's default control socket is in /tmp/ftimer-UID, which another user may make
    # first: whatever answered there was shown, "healthy", with exit 0.
    python = next((p for p in (PYTHON, "/usr/bin/python3") if _runs_as_nobody(p)), None)
    if python is None:
        pytest.skip("no Python that uid 65534 may run")
    squatted = pathlib.Path(tempfile.mkdtemp(prefix="ftq-", dir="/tmp"))  # as /tmp/ftimer-UID
    os.chown(squatted, 65534, 65534)
    path = str(squatted / "timer.fifo.sock")
    forger = subprocess.Popen(
        [python, "-c", FORGER, path], user=65534, group=65534, stdout=subprocess.PIPE, text=True
    )
    try:
        assert forger.stdout is not None
        assert forger.stdout.readline() == "ready\n"
        monkeypatch.setattr(_control.os, "geteuid", lambda: 4242)  # asks as uid 4242
        with pytest.raises(PermissionError, match="runs as uid 65534, not as this user"):
            query_status(path)
    finally:
        forger.kill()
        forger.wait()
        if forger.stdout is not None:
            forger.stdout.close()
        shutil.rmtree(squatted, ignore_errors=True)


def _runs_as_nobody(python: str) -> bool:
    try:
        probe = subprocess.run([python, "-c", "pass"], user=65534, group=65534, check=False)
    except OSError:
        return False
    return probe.returncode == 0


def test_the_socket_is_made_0600_in_a_directory_of_its_own(
    path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # chmod follows a symlink: made under a fixed name in the FIFO's directory, the
    # socket could be swapped for a link to any file, by another user who may write
    # there, between the bind and the chmod, and a root daemon made that file 0600.
    seen: List[tuple[str, int, int]] = []
    chmod = os.chmod

    def watched(target: str, mode: int) -> None:
        st = os.stat(os.path.dirname(target))
        seen.append((target, stat.S_IMODE(st.st_mode), st.st_uid))
        chmod(target, mode)

    monkeypatch.setattr(_control.os, "chmod", watched)
    server = ControlServer(path, lambda _: {})
    server.start()
    try:
        [(target, mode, owner)] = seen
        assert os.path.dirname(target) != os.path.dirname(path)
        assert (mode, owner) == (0o700, os.geteuid())
        assert stat.S_IMODE(os.lstat(path).st_mode) == 0o600
        assert os.listdir(os.path.dirname(path)) == [os.path.basename(path)]  # none left
        assert query_status(path) == {}
    finally:
        server.stop()
