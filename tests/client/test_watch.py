"""The client's watch of its connection (the thread that finds a server gone while the
worker sends nothing), and what a channel that never reached a server owes: with real
FIFOs, sockets and forked children."""

from __future__ import annotations

import contextlib
import errno
import gc
import os
import pathlib
import socket
import subprocess
import sys
import threading
import warnings
from typing import Any, Iterator, Set, Tuple

import pytest
from tests.conftest import wait_until

from ftimer_client import FileTimerClient, ServerUnavailableWarning, _channel, _socket
from ftimer_protocol import Disarm

from .conftest import FifoPeer, SocketPeer, server_state
from .test_fork import in_child

ME = os.getpid()


@pytest.fixture
def other() -> Iterator[int]:
    """The pid of a process of this test's own, for a client given ``pid=`` (the servers
    here only record)."""
    with subprocess.Popen(["sleep", "600"]) as proc:
        try:
            yield proc.pid
        finally:
            proc.kill()


def watches() -> Set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name == "ftimer-client-watch"}


def test_a_disarm_in_a_forked_child_of_a_client_for_a_pid_is_still_owed(
    peer: FifoPeer, other: int
) -> None:
    # The child's channel counted as never having reached a server, so its failed
    # disarm was dropped: the server, restored from its state file, reaped the worker.
    client = FileTimerClient(peer.path, pid=other, on_unavailable="warn", labels={})
    client.arm("w", 60)
    peer.wait_count(1)
    peer.close()  # the server goes, as for a restart

    def child() -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ServerUnavailableWarning)
            client.release("w")
        back = FifoPeer(peer.path, create=False)
        try:  # the child's retries deliver it to the server once it is back
            back.wait_for(lambda m: any(isinstance(x, Disarm) and x.pid == other for x in m))
        finally:
            back.close()

    in_child(child)


def test_clients_dropped_without_close_let_their_watch_and_connection_go(
    peer: FifoPeer, other: int
) -> None:
    # The watch held its channel: each dropped client left a thread and a descriptor.
    # Their own watches: others' (earlier tests' clients, collected) may end meanwhile.
    before = watches()
    clients = [FileTimerClient(peer.path, pid=other, labels={}) for _ in range(20)]
    for client in clients:  # each a channel of its own
        client.arm("s", 60)
        client.release("s")
    theirs = watches() - before
    assert len(theirs) >= 20
    del client, clients
    gc.collect()
    wait_until(lambda: not theirs & watches(), what="the dropped clients' watches gone")


def test_a_long_socket_path_is_not_taken_for_a_lost_server(
    speer: SocketPeer, tmp_path: pathlib.Path
) -> None:
    # The probe connected to the path itself, which an AF_UNIX address cannot hold:
    # the watch found the server gone every second, and resynced each time.
    deep = tmp_path / ("d" * 60) / ("e" * 60)  # the server's directory, further away
    deep.parent.mkdir()
    deep.symlink_to(speer.path.parent)
    client = FileTimerClient(deep / speer.path.name, transport="socket", labels={})
    client.arm("s", 60)
    writer = client._channel._writer
    assert writer is not None
    assert not writer.lost()
    speer.close()  # nobody reads it now
    assert writer.lost()


def test_a_probe_with_no_descriptor_left_cannot_tell(
    speer: SocketPeer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The probe's socket() raised EMFILE out of the watch, which ended for good: a
    # stuck worker then lost its timer at the next restart.
    client = FileTimerClient(speer.path, transport="socket", labels={})
    client.arm("s", 60)
    writer = client._channel._writer
    assert writer is not None

    def no_descriptor(*_: object) -> socket.socket:
        raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setattr(_socket.socket, "socket", no_descriptor)
    assert not writer.lost()


def test_a_connection_without_a_thread_for_its_watch_still_serves(
    peer: FifoPeer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # At a pids limit no thread can start: the first arm raised RuntimeError, though
    # its line had gone out.
    def no_thread(*_: object) -> threading.Thread:
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(_channel, "start_helper", no_thread)
    client = FileTimerClient(peer.path, labels={})
    client.arm("s", 60)
    client.release("s")
    assert len(peer.wait_count(2)) == 2


def test_a_socket_file_chmodded_or_touched_is_not_taken_for_a_new_server(
    speer: SocketPeer,
) -> None:
    # Its change time was compared too (against a new socket given the old one's inode
    # number): a mode re-applied by config management made every client resync.
    client = FileTimerClient(speer.path, transport="socket", labels={})
    client.arm("s", 60)
    writer = client._channel._writer
    assert writer is not None
    os.chmod(speer.path, 0o600)
    os.utime(speer.path)
    assert not writer.lost()
    speer.close()
    speer.path.unlink()
    again = SocketPeer(speer.path)  # a new server, bound anew at the path
    try:
        assert writer.lost()
    finally:
        again.close()


# With one descriptor left (argv[1]: a socket to connect to), a writer is made.
ONE_LEFT = """
import os, resource, sys
from ftimer_client._socket import SocketWriter
resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
held = []
try:
    while True:
        held.append(os.open("/dev/null", os.O_RDONLY))
except OSError:
    pass
os.close(held.pop())
SocketWriter(sys.argv[1]).write(b"x\\n", 1.0)
print("sent")
"""


def test_a_writer_with_one_descriptor_left_connects_as_a_socket_does(speer: SocketPeer) -> None:
    # Its hold on the socket file (a second descriptor) failed with EMFILE, reported as
    # a failed connect, where a plain connect worked: the inode is then only read.
    done = subprocess.run(
        [sys.executable, "-c", ONE_LEFT, str(speer.path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.stdout == "sent\n", done.stderr


@contextlib.contextmanager
def taken_by_a_file(
    request: pytest.FixtureRequest, tmp_path: pathlib.Path, transport: str
) -> Iterator[Tuple[Any, FileTimerClient, object]]:
    """A client that armed "first" over ``transport``, whose connection's number a file
    (``tmp_path / "theirs"``) then took, as code that closed descriptors it did not own
    and opened one would: (the peer, the client, its writer then). At the end, the
    number is still that file's: the client never closed it."""
    peer = request.getfixturevalue("peer" if transport == "fifo" else "speer")
    client = FileTimerClient(peer.path, transport=transport, labels={})
    client.arm("first", 60)
    peer.wait_for(lambda m: (ME, "first") in server_state(m))
    writer = client._channel._writer
    fd = writer._fd if transport == "fifo" else writer._sock.fileno()  # type: ignore[union-attr]
    with open(tmp_path / "theirs", "w+b") as theirs:
        os.dup2(theirs.fileno(), fd)
    try:
        yield peer, client, writer
        os.write(fd, b"theirs\n")  # still open: not the client's to close
        assert (tmp_path / "theirs").read_bytes() == b"theirs\n"
    finally:
        os.close(fd)


@pytest.mark.parametrize("transport", ["fifo", "socket"])
def test_a_connection_closed_under_the_client_is_left_alone_and_made_again(
    request: pytest.FixtureRequest, tmp_path: pathlib.Path, transport: str
) -> None:
    # Code that closed descriptors it did not own (os.closerange(3, ...), as daemonising
    # code does), then opened a file that got the connection's number: every arm and
    # disarm went into that file, the server heard nothing (a stuck worker escaped),
    # and close() closed the file (over the socket, raising EBADF too).
    with taken_by_a_file(request, tmp_path, transport) as (peer, client, writer):
        wait_until(lambda: client._channel._writer is not writer, what="the connection found lost")
        client.arm("second", 60)
        messages = peer.wait_for(lambda m: (ME, "second") in server_state(m))
        assert {s for p, s in server_state(messages) if p == ME} == {"first", "second"}
        client.close()


@pytest.mark.parametrize("transport", ["fifo", "socket"])
def test_close_leaves_a_descriptor_closed_under_it_to_its_new_owner(
    request: pytest.FixtureRequest, tmp_path: pathlib.Path, transport: str
) -> None:
    with taken_by_a_file(request, tmp_path, transport) as (_, client, _):
        client.close()  # before the watch looked
