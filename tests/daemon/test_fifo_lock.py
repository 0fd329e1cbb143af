"""One daemon per FIFO: the lock file ``<fifo>.lock``, taken before anything else.

A daemon that loses (to one running, or to one starting at the same moment) exits 3 with
one line and leaves the FIFO, the sockets, the state file and the journal as they were.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import pathlib
import signal
import stat
import subprocess
import time
from typing import Callable, Dict, List, Optional, Tuple

import pytest
from tests.conftest import wait_until

from ftimer_server.daemon import _daemon
from ftimer_server.daemon._daemon import StartupError
from ftimer_server.server import _fifo

from .conftest import PATIENCE, PYTHON, DaemonProcess, Worker, plant_lock

Spawn = Callable[..., DaemonProcess]
StartWorker = Callable[..., Worker]
Entry = Tuple[int, int, int, int, Optional[bytes]]


def refused(fifo: pathlib.Path) -> str:
    return f"cannot start: another ftimer-server is running on FIFO {fifo} (it holds {fifo}.lock)"


def snapshot(directory: pathlib.Path) -> Dict[str, Entry]:
    """Every file in ``directory`` but the daemons' logs and notify sockets: its inode,
    mode, size, modification time, and the bytes of a regular file."""
    found = {}
    for p in directory.iterdir():
        if p.suffix in (".log", ".notify"):
            continue
        st = os.lstat(p)
        data = p.read_bytes() if stat.S_ISREG(st.st_mode) else None
        found[p.name] = (st.st_ino, st.st_mode, st.st_size, st.st_mtime_ns, data)
    return found


def errors(d: DaemonProcess) -> List[str]:
    return [r["msg"] for r in d.records() if r["level"] in ("warning", "error")]


def wait_ready_or_exited(daemons: List[DaemonProcess]) -> None:
    """Wait until each of ``daemons`` has sent READY=1 or exited."""
    deadline = time.monotonic() + PATIENCE
    for d in daemons:
        while d.proc.poll() is None and not d.notify.has("READY=1"):
            assert time.monotonic() < deadline, "a daemon neither ready nor exited"
            d.notify.receive(0.05)


def test_a_daemon_that_loses_the_start_race_touches_nothing(
    spawn: Spawn, worker: StartWorker, short_dir: pathlib.Path
) -> None:
    # What a killed daemon leaves behind, which the next one replays and reuses: the
    # FIFO, a journal segment holding an arm, stale sockets.
    state = str(short_dir / "state.json")
    a = spawn("--state-file", state, "--capture", "none", name="a").ready()
    worker(a.fifo, "s", 60, 60)
    wait_until(lambda: a.armed_scopes() == ["s"], what="the timer armed")
    assert a.stop(signal.SIGKILL) == -signal.SIGKILL
    # A new daemon has taken the lock and not yet bound its control socket (it is
    # replaying the journal, say): the race the control socket alone did not see.
    lock = os.open(short_dir / "timer.fifo.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        before = snapshot(short_dir)
        assert {"timer.fifo", "timer.fifo.sock", "timer.socket"} <= set(before)
        assert any(name.startswith("state.json.journal.") for name in before)
        b = spawn("--state-file", state, "--capture", "none", name="b")
        wait_ready_or_exited([b])
        assert snapshot(short_dir) == before
        assert b.proc.returncode == 3
        assert errors(b) == [refused(b.fifo)]
    finally:
        os.close(lock)
    # Released (the lock file stays, unlocked): the next daemon replays the journal.
    c = spawn("--state-file", state, "--capture", "none", name="c").ready()
    assert c.armed_scopes() == ["s"]
    assert c.stop() == 0


def test_of_daemons_started_together_one_serves_the_fifo_at_the_path(
    spawn: Spawn, worker: StartWorker, short_dir: pathlib.Path
) -> None:
    state = str(short_dir / "state.json")
    daemons = [spawn("--state-file", state, "--capture", "none", name=f"d{i}") for i in range(3)]
    wait_ready_or_exited(daemons)
    (survivor,) = [d for d in daemons if d.proc.poll() is None]
    for d in daemons:
        if d is not survivor:
            assert d.proc.returncode == 3
            assert errors(d) == [refused(d.fifo)]
    # The FIFO the survivor reads is the one at the path (not one a loser replaced).
    at_path = os.stat(survivor.fifo)
    fds = f"/proc/{survivor.pid}/fd"
    held = set()
    for fd in os.listdir(fds):
        with contextlib.suppress(FileNotFoundError):  # closed meanwhile
            st = os.stat(f"{fds}/{fd}")
            held.add((st.st_dev, st.st_ino))
    assert (at_path.st_dev, at_path.st_ino) in held
    assert survivor.status()["healthy"]
    assert worker(survivor.fifo, "s", 0.2, 60).wait() == -signal.SIGKILL
    assert survivor.stop() == 0


@pytest.mark.parametrize("kind", ["symlink", "FIFO", "directory", "another user's file"])
def test_a_lock_file_that_is_not_the_daemons_regular_file_is_refused(
    short_dir: pathlib.Path, kind: str
) -> None:
    fifo = short_dir / "timer.fifo"
    lock = short_dir / "timer.fifo.lock"
    what = plant_lock(lock, kind)
    before = os.lstat(lock)
    result = subprocess.run(
        [PYTHON, "-m", "ftimer_server", "run", "--fifo", str(fifo), "--capture", "none"],
        capture_output=True,
        text=True,
        timeout=PATIENCE,
    )
    assert result.returncode == 3, result.stderr
    assert f"FIFO {fifo}: refusing the lock file {lock}: it is {what}\n" in result.stderr
    after = os.lstat(lock)
    assert (after.st_ino, after.st_mode, after.st_uid) == (
        before.st_ino,
        before.st_mode,
        before.st_uid,
    )
    assert (short_dir / "target").read_text() == "precious"
    assert sorted(p.name for p in short_dir.iterdir()) == ["target", "timer.fifo.lock"]


def test_the_lock_is_made_in_the_default_fifos_directory_before_the_fifo(
    short_dir: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The default path's directory is made by the server when it opens the FIFO, which
    # comes after the lock: the lock makes it first (the tests cannot use /run/ftimer).
    fifo = str(short_dir / "ftimer" / "timer.fifo")
    monkeypatch.setattr(_fifo, "manages_parent", lambda path: path == fifo)
    fd = _daemon._lock_fifo(fifo)
    try:
        assert stat.S_IMODE(os.stat(short_dir / "ftimer").st_mode) == 0o700
        assert stat.S_IMODE(os.stat(fifo + ".lock").st_mode) == 0o600
        with pytest.raises(StartupError) as refusal:
            _daemon._lock_fifo(fifo)
        assert str(refusal.value) == (
            f"another ftimer-server is running on FIFO {fifo} (it holds {fifo}.lock)"
        )
    finally:
        os.close(fd)
    os.close(_daemon._lock_fifo(fifo))  # released with its descriptor; the file stays
    assert os.listdir(short_dir / "ftimer") == ["timer.fifo.lock"]


def test_an_embedded_server_refuses_the_fifo_a_daemon_serves(
    spawn: Spawn, worker: StartWorker
) -> None:
    # Before: FileTimerServer.start() on the daemon's path replaced its FIFO; the daemon
    # read a deleted FIFO while the clients talked to the embedded server.
    from ftimer_server import FifoError, FileTimerServer

    d = spawn("--capture", "none").ready()
    served = os.stat(d.fifo).st_ino
    embedded = FileTimerServer(d.fifo, dry_run=True)
    with pytest.raises(FifoError) as refusal:
        embedded.start()
    assert str(refusal.value) == (
        f"{d.fifo}: another ftimer server is serving this FIFO (it holds the lock file "
        f"{d.fifo}.lock)"
    )
    assert os.stat(d.fifo).st_ino == served
    assert d.status()["healthy"]  # a sync through the FIFO at the path
    stuck = worker(d.fifo, "stuck", 0.2, 60)
    assert stuck.wait() == -signal.SIGKILL
    d.wait_for_record(event="reaped", pid=stuck.pid)
    assert d.stop() == 0
    # The daemon gone, the same server starts (and a daemon is refused meanwhile).
    with embedded:
        result = subprocess.run(
            [PYTHON, "-m", "ftimer_server", "run", "--fifo", str(d.fifo), "--capture", "none"],
            capture_output=True,
            text=True,
            timeout=PATIENCE,
        )
        assert result.returncode == 3, result.stderr
        assert refused(d.fifo) in result.stderr
        embedded.sync()
