"""The control socket under pressure: out of descriptors, its queue of connections full,
a request line that arrives in pieces. Real sockets, served by a ControlServer in this
process."""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import socket
import subprocess
import threading
from typing import Any, Iterator, List

import pytest
from tests.conftest import wait_until

from ftimer_server.daemon import _control
from ftimer_server.daemon._control import ControlServer, query_status

from .conftest import PATIENCE, PYTHON


@pytest.fixture
def path(tmp_path: pathlib.Path) -> str:
    return str(tmp_path / "timer.fifo.sock")


@pytest.fixture
def peers() -> Iterator[List[socket.socket]]:
    """Sockets a test opens; every one is closed at the end."""
    opened: List[socket.socket] = []
    yield opened
    for s in opened:
        s.close()


@pytest.fixture
def served(path: str, peers: List[socket.socket]) -> Iterator[ControlServer]:
    """A control server answering ``{"ok": true}``; at the end, once the test's peers are
    closed, stopped, and its peers' threads done (a connection each, closed by its thread:
    a later test comparing descriptors must not see them go)."""
    server = ControlServer(path, lambda _: {"ok": True})
    server.start()
    yield server
    for s in peers:
        s.close()
    server.stop()
    wait_until(lambda: server._serving == 0, what="the peers' threads done")


# Out of descriptors in a process of its own (another test's threads would meet the limit
# too): how many accept() calls the control thread makes in 0.5 s with a connection
# queued, whether the queued request is answered once a descriptor is free, and what was
# logged.
OUT_OF_DESCRIPTORS = r"""
import contextlib, io, json, logging, os, resource, socket, sys, time
from ftimer_server.daemon._control import ControlServer, query_status

calls = []
accept = socket.socket.accept
def counted(self):
    calls.append(1)
    return accept(self)
socket.socket.accept = counted
said = io.StringIO()
logging.basicConfig(stream=said, level=logging.WARNING, format="%(message)s")
path = sys.argv[1]
server = ControlServer(path, lambda _: {"ok": True})
server.start()
assert query_status(path) == {"ok": True}  # its thread is in its loop
calls.clear()
client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
limits = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (min(limits[0], 256), limits[1]))
held = []
with contextlib.suppress(OSError):
    while True:
        held.append(os.open(os.devnull, os.O_RDONLY))
client.connect(path)  # queued: accept() has no descriptor to give it
while not calls:
    time.sleep(0.001)
time.sleep(0.5)  # the window the attempts are counted in
attempts = len(calls)
for fd in held:
    os.close(fd)
client.settimeout(30)
client.sendall(b"status\n")
answer = client.recv(4096).decode()
client.close()
server.stop()
print(json.dumps({"attempts": attempts, "answer": answer, "said": said.getvalue()}))
"""


def test_out_of_descriptors_the_accept_thread_does_not_spin(tmp_path: pathlib.Path) -> None:
    # Out of descriptors (EMFILE: the daemon watches a pidfd per worker, docs/deploy.md),
    # a queued connection keeps the listening socket readable and every accept() fails:
    # the accepting thread tried again at once, burning a core until a descriptor was
    # freed, for as long as one probe's connection stayed queued. It says so once, and
    # tries again every 0.1 s.
    done = subprocess.run(
        [PYTHON, "-c", OUT_OF_DESCRIPTORS, str(tmp_path / "c.sock")],
        capture_output=True,
        text=True,
        timeout=PATIENCE * 4,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["attempts"] < 50, f"{result['attempts']} accept() attempts in 0.5 s: a busy loop"
    assert result["answer"] == '{"ok":true}\n'  # once a descriptor is free again
    assert result["said"] == (
        "control socket: cannot accept a connection: [Errno 24] Too many open files\n"
    )


def test_status_waits_for_a_full_accept_queue_instead_of_failing_at_once(
    served: ControlServer, monkeypatch: pytest.MonkeyPatch, peers: List[socket.socket]
) -> None:
    # "More wait to be accepted until one is done": past the 8 served, the one the
    # accepting thread holds and the kernel's queue of connections, a connect() with
    # Python's timeout (query_status's, the socket non-blocking) failed at once with
    # EAGAIN, and `ftimer-server status` said "cannot get the status ...: [Errno 11]
    # Resource temporarily unavailable" (exit 1). With a queue of 8, ten `status` at once
    # (probes, monitoring, a person) were enough when the status took a few ms.
    monkeypatch.setattr(_control, "_PEER_TIMEOUT", 0.3)  # idle peers are dropped soon
    _fill(served, peers)
    assert query_status(served.path, timeout=PATIENCE) == {"ok": True}


def test_status_of_a_daemon_whose_queue_stays_full_times_out(
    path: str, peers: List[socket.socket]
) -> None:
    # The wait for room in the queue ends with the caller's timeout, and says so. (A
    # listening socket that accepts nothing: its queue stays full.)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    peers.append(listener)
    listener.bind(path)
    listener.listen(0)
    assert _queue_full(path, peers), "the queue never filled"
    with pytest.raises(TimeoutError, match="accepted no connection"):
        query_status(path, timeout=0.2)


def _fill(server: ControlServer, peers: List[socket.socket]) -> None:
    """Have idle peers take every slot of ``server`` and fill its queue of connections."""
    assert _queue_full(server.path, peers), "the queue never filled"
    wait_until(lambda: server._serving == _control._MAX_PEERS, what="all slots busy")
    assert _queue_full(server.path, peers)


def _queue_full(path: str, peers: List[socket.socket]) -> bool:
    """Connect idle peers to ``path`` until its queue of connections is full (a
    non-blocking connect() then fails); whether it filled."""
    for _ in range(500):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.setblocking(False)
        try:
            s.connect(path)
        except BlockingIOError:
            s.close()
            return True
        peers.append(s)
    return False


def test_a_request_line_written_in_pieces_is_answered(
    served: ControlServer, monkeypatch: pytest.MonkeyPatch, peers: List[socket.socket]
) -> None:
    # "one request line": the daemon answered whatever its first recv() returned, so a
    # client whose line arrives in two writes (b"sta", b"tus\n") was told
    # "unknown request b'sta'" and its second write failed with EPIPE.
    read = threading.Event()
    recv = socket.socket.recv

    def watched(self: socket.socket, *args: Any) -> bytes:
        data = recv(self, *args)
        if threading.current_thread().name == "ftimer-control-peer":
            read.set()
        return data

    monkeypatch.setattr(socket.socket, "recv", watched)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    peers.append(s)
    s.settimeout(PATIENCE)
    s.connect(served.path)
    s.sendall(b"sta")
    assert read.wait(PATIENCE)
    with contextlib.suppress(BrokenPipeError):
        s.sendall(b"tus\n")
    assert s.recv(4096) == b'{"ok":true}\n'


def test_a_control_thread_that_cannot_start_serving_fails_the_start(
    path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The selector (an epoll descriptor) was made on the control thread: out of
    # descriptors then (EMFILE), the thread died with a traceback on stderr, start()
    # had succeeded, and the socket kept queueing connections nobody would accept:
    # every `status` timed out until a restart.
    def out_of_descriptors() -> Any:
        raise OSError(24, "Too many open files")

    monkeypatch.setattr(_control.selectors, "DefaultSelector", out_of_descriptors)
    server = ControlServer(path, lambda _: {"ok": True})
    try:
        with pytest.raises(OSError, match="Too many open files"):
            server.start()
    finally:
        server.stop()
    assert not os.path.exists(path)


def test_a_request_without_its_newline_is_still_answered_at_once(
    served: ControlServer, peers: List[socket.socket]
) -> None:
    # As a request written in pieces is now awaited: "status" with no newline, the
    # connection left open, is still answered without waiting for the peer timeout.
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    peers.append(s)
    s.settimeout(_control._PEER_TIMEOUT / 2)
    s.connect(served.path)
    s.sendall(b"status")
    assert s.recv(4096) == b'{"ok":true}\n'
