"""One server per FIFO: an embedded ``FileTimerServer`` holds ``<fifo>.lock`` (the daemon's
lock, see tests/daemon/test_fifo_lock.py) from ``start()`` until its loop ends, and one
that finds it held refuses instead of replacing the FIFO under the server that holds it."""

from __future__ import annotations

import fcntl
import os
import pathlib

import pytest

from ftimer_protocol import Arm
from ftimer_server import FifoBusy, FifoError, FileTimerServer, Lifecycle, Reaped
from ftimer_server.server import _fifo

from .conftest import Recorder, send, wait_exit


def identity(path: pathlib.Path) -> tuple[int, int]:
    st = os.lstat(path)
    return st.st_dev, st.st_ino


def test_a_second_embedded_server_on_the_path_refuses_and_the_first_serves_on(
    fifo_path: pathlib.Path, children
) -> None:
    events = Recorder()
    first = FileTimerServer(fifo_path, on_event=events)
    first.start()
    try:
        serving = identity(fifo_path)
        second = FileTimerServer(fifo_path)
        with pytest.raises(FifoBusy) as refusal:
            second.start()
        assert isinstance(refusal.value, FifoError)  # what start() is documented to raise
        assert str(refusal.value) == (
            f"{fifo_path}: another ftimer server is serving this FIFO "
            f"(it holds the lock file {fifo_path}.lock)"
        )
        assert second.state is Lifecycle.NEW
        # Nothing was replaced: the first server still reads the FIFO at the path.
        assert identity(fifo_path) == serving
        child = children()
        send(fifo_path, Arm(pid=child.pid, scope_id="s", deadline=0.0, signal=9))
        assert wait_exit(child)[0] == -9
        first.sync()
        assert [e.pid for e in events.of(Reaped)] == [child.pid]  # type: ignore[attr-defined]
    finally:
        first.stop()
    # Released with the stop: the refused server can start now, and a new one after it.
    second.start()
    second.stop()
    with FileTimerServer(fifo_path) as third:
        third.sync()


def test_the_lock_is_the_daemons_and_is_released_by_a_failed_start(
    fifo_path: pathlib.Path,
) -> None:
    # A daemon holds the lock (here: a descriptor of ours locked as the daemon locks it).
    lock = os.open(f"{fifo_path}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(FifoBusy):
            FileTimerServer(fifo_path).start()
        assert not fifo_path.exists()  # no FIFO made beside the daemon's
    finally:
        os.close(lock)
    # A start that fails after taking the lock (a socket path already taken by a file)
    # releases it: the next server on the path is not refused.
    blocker = fifo_path.parent / "taken"
    blocker.write_text("")
    with pytest.raises(FifoError, match="something other than a socket"):
        FileTimerServer(fifo_path, socket_path=blocker).start()
    with FileTimerServer(fifo_path) as server:
        server.sync()


def test_remove_fifo_removes_the_lock_file_too(fifo_path: pathlib.Path) -> None:
    # torch's agent pattern (docs/torchelastic.md): a FIFO in a private directory that
    # the agent removes after stop(): nothing of the server may be left in it.
    with FileTimerServer(fifo_path, remove_fifo=True) as server:
        server.sync()
        assert sorted(os.listdir(fifo_path.parent)) == ["timer.fifo", "timer.fifo.lock"]
    assert os.listdir(fifo_path.parent) == []
    # Without remove_fifo the lock file stays, unlocked, as the daemon's does.
    with FileTimerServer(fifo_path):
        pass
    assert sorted(os.listdir(fifo_path.parent)) == ["timer.fifo", "timer.fifo.lock"]
    with FileTimerServer(fifo_path) as again:
        again.sync()


def test_a_lock_taken_on_a_lock_file_removed_meanwhile_is_taken_again(
    fifo_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A server with remove_fifo removes the lock file under its lock; a server that had
    # opened that file before must not keep a lock on a file no longer at the path.

    real_flock = fcntl.flock
    removed = []

    def flock(fd: int, operation: int) -> None:
        if not removed:  # between our open and our lock, the holder removes the file
            os.unlink(f"{fifo_path}.lock")
            removed.append(True)
        real_flock(fd, operation)

    monkeypatch.setattr(_fifo.fcntl, "flock", flock)
    fd = _fifo.lock_fifo(str(fifo_path))
    try:
        assert os.fstat(fd).st_ino == os.stat(f"{fifo_path}.lock").st_ino
    finally:
        os.close(fd)


@pytest.mark.parametrize("kind", ["file", "directory", "empty"])
def test_no_lock_file_is_made_beside_what_is_no_fifo(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    # The lock was taken first: /dev/null.lock (as root), `.lock` in the working
    # directory for "", isdir/.lock.
    monkeypatch.chdir(tmp_path)
    target = tmp_path / "target"
    if kind == "file":
        target.write_bytes(b"")
    elif kind == "directory":
        target.mkdir()
    path = "" if kind == "empty" else str(target)
    with pytest.raises(FifoError, match=r"refusing an? .*expected a FIFO"):
        FileTimerServer(path).start()
    assert sorted(p.name for p in tmp_path.iterdir()) == ([] if kind == "empty" else ["target"])


def test_a_relative_path_is_removed_on_stop_after_a_chdir(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "run").mkdir()
    monkeypatch.chdir(tmp_path / "run")
    server = FileTimerServer("timer.fifo", remove_fifo=True, socket_path="timer.sock")
    assert server.file_path == str(tmp_path / "run" / "timer.fifo")
    server.start()
    monkeypatch.chdir(tmp_path)  # the agent moved on
    server.stop()
    assert list((tmp_path / "run").iterdir()) == []  # nor the FIFO, its lock, the socket


def test_a_forked_child_holds_no_lock_once_its_server_stopped(fifo_path: pathlib.Path) -> None:
    # An agent that embeds the server and forks its workers (multiprocessing's "fork"):
    # a worker, or a child of one that outlived it, kept the lock after the server
    # stopped, and the agent's next server on the path refused to start.
    first = FileTimerServer(fifo_path)
    first.start()
    ready_r, ready_w = os.pipe()
    hold_r, hold_w = os.pipe()
    child = os.fork()
    if child == 0:  # a forked worker: lives on while the agent starts its next server
        try:
            os.close(hold_w)
            os.write(ready_w, b"x")
            os.read(hold_r, 1)  # until the parent closes its end
        finally:
            os._exit(0)
    os.close(ready_w)
    os.close(hold_r)
    try:
        assert os.read(ready_r, 1) == b"x"
        first.stop()
        second = FileTimerServer(fifo_path)
        second.start()
        second.stop()
    finally:
        os.close(hold_w)  # the child ends
        os.waitpid(child, 0)
        os.close(ready_r)


def test_a_forked_child_closes_no_descriptor_that_reused_a_lock_s_number(
    fifo_path: pathlib.Path,
) -> None:
    # A lock closed without unlock_fifo() (the daemon did so at exit) left its number on
    # the list: a later fork closed, in the child, whatever file had taken the number.
    fd = _fifo.lock_fifo(str(fifo_path))
    os.close(fd)
    r, w = os.pipe()
    reused = os.dup2(r, fd)  # the lock's number, another file's now
    try:
        child = os.fork()
        if child == 0:
            try:
                os.fstat(reused)
                os._exit(0)
            except OSError:
                os._exit(1)
        _, status = os.waitpid(child, 0)
        assert os.WEXITSTATUS(status) == 0, "the child lost a descriptor it inherited"
    finally:
        _fifo._LOCKS.pop(fd, None)
        os.close(r)
        os.close(w)
