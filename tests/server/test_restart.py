"""A server restarted on the same FIFO, with the real ftimer client in a worker process
that keeps the FIFO open (protocol 2) and writes nothing while the server is down."""

from __future__ import annotations

import pathlib
import subprocess
import sys
from collections.abc import Iterator

import pytest
from tests.conftest import ARMER

from ftimer_server import FileTimerServer


class Worker:
    def __init__(self, fifo: pathlib.Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", ARMER, str(fifo)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self._expect_armed()

    def arm(self, scope: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(scope + "\n")
        self.proc.stdin.flush()
        self._expect_armed()

    def _expect_armed(self) -> None:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()  # the client raises (and the worker dies) on failure
        assert line == "armed\n", f"worker exited with {self.proc.wait(5)}"

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                stream.close()


@pytest.fixture
def servers() -> Iterator[list[FileTimerServer]]:
    """Servers a test started; all stopped at the end."""
    started: list[FileTimerServer] = []
    yield started
    for server in started:
        server.stop()


@pytest.fixture
def worker(fifo_path: pathlib.Path, servers: list[FileTimerServer]) -> Iterator[Worker]:
    """A worker that armed "first" with the first server, which is then stopped."""
    first = FileTimerServer(fifo_path)
    servers.append(first)
    first.start()
    w = Worker(fifo_path)
    try:
        first.sync()
        assert scopes(first) == [(w.proc.pid, "first")]
        first.stop()
        yield w
    finally:
        w.close()


def scopes(server: FileTimerServer) -> list[tuple[int, str]]:
    return sorted((t.pid, t.scope_id) for t in server.armed())


def test_a_server_restarted_without_state_learns_the_armed_timers(
    fifo_path: pathlib.Path, worker: Worker, servers: list[FileTimerServer]
) -> None:
    old_inode = fifo_path.lstat().st_ino
    second = FileTimerServer(fifo_path)
    servers.append(second)
    second.start()
    assert second.fifo is not None
    assert second.fifo.replaced
    assert fifo_path.lstat().st_ino != old_inode
    # The worker's next message is about another scope. Its write to the old FIFO fails
    # (EPIPE): the client reopens the path and re-sends everything it has armed.
    worker.arm("second")
    second.sync()
    pid = worker.proc.pid
    assert scopes(second) == [(pid, "first"), (pid, "second")]


def test_a_server_that_restored_timers_keeps_the_fifo(
    fifo_path: pathlib.Path, worker: Worker, servers: list[FileTimerServer]
) -> None:
    old_inode = fifo_path.lstat().st_ino
    second = FileTimerServer(fifo_path)
    servers.append(second)
    second.restore(servers[0].armed())  # what the daemon does with its state file
    second.start()
    assert second.fifo is not None
    assert not second.fifo.replaced
    assert fifo_path.lstat().st_ino == old_inode
    worker.arm("second")  # straight through the FIFO it holds
    second.sync()
    pid = worker.proc.pid
    assert scopes(second) == [(pid, "first"), (pid, "second")]
