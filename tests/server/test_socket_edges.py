"""Behaviour of server/_socket.py that no test pinned, found by mutation testing (each test
fails with the mutant that found it): real sockets and processes; nothing is signalled."""

from __future__ import annotations

import os
import pathlib
import socket
import subprocess
import sys

import pytest

from ftimer_protocol import Arm, Disarm, encode
from ftimer_server.incidents._procfs import pidfd_pid
from ftimer_server.server._socket import open_socket


def test_a_carried_pidfd_that_vouches_stays_open_until_release(tmp_path: pathlib.Path) -> None:
    # A datagram carrying a pidfd of the sender's child (ftimer exec): that pidfd vouches
    # for the child's pid until the batch is applied. Closed at the end of receive(), its
    # number was free for the host's own pidfd_open() of the pid, which then "vouched" for
    # whatever held the pid, and release() closed the host's descriptor.
    sock = open_socket(str(tmp_path / "s.socket"))
    child = subprocess.Popen(
        [sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE
    )
    try:
        if not sock.passes_pidfds:
            pytest.skip("the kernel gives no pidfd of a sender (SO_PASSPIDFD, Linux 6.5)")
        pidfd = os.pidfd_open(child.pid)
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sender:
            sender.connect(sock.path)
            line = encode(Arm(pid=child.pid, scope_id="x", deadline=1e9, signal=9))
            socket.send_fds(sender, [line], [pidfd])
        os.close(pidfd)
        results = sock.receive()
        assert [type(r).__name__ for r in results] == ["Timer"], results
        assert results[0].pid == child.pid
        vouch = sock.vouched[child.pid]
        assert pidfd_pid(vouch) == child.pid  # open, and still the child's
        sock.release()
        with pytest.raises(OSError, match="Bad file descriptor"):
            os.fstat(vouch)
    finally:
        sock.close()
        child.stdin.close()
        child.wait()


def test_a_socket_shut_for_reading_yields_what_was_queued_and_nothing_more(
    tmp_path: pathlib.Path,
) -> None:
    # stop_receiving() before the last read (a server stopping): recvmsg() then says b""
    # with no control data, the end. Read past it, up to a batch of "datagrams without
    # credentials" were counted as one sent at every stop.
    sock = open_socket(str(tmp_path / "s.socket"))
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sender:
            sender.connect(sock.path)
            sender.send(encode(Disarm(pid=os.getpid(), scope_id="a")))
            sock.stop_receiving()
            with pytest.raises(BrokenPipeError):
                sender.send(encode(Disarm(pid=os.getpid(), scope_id="b")))
        results = sock.receive()
        assert [type(r).__name__ for r in results] == ["Disarm"], results
        assert sock.receive() == []
    finally:
        sock.close()


class RecordingCloser:
    """In place of the closer threads: records what it is given, closes nothing (the
    test closes it), synchronously: what receive() hands it is known when it returns."""

    def __init__(self) -> None:
        self.given: list = []

    def watch(self, sock: socket.socket) -> None:
        pass

    def unwatch(self, sock: socket.socket) -> None:
        pass

    def close(self, fds) -> None:  # type: ignore[no-untyped-def]
        self.given.extend(fds)


def test_a_receipt_is_never_handed_to_the_closer_threads(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A receipt (a sync carrying a pipe) is closed by release(), once the batch is
    # applied, on the loop's thread. Handed to the closer threads as well, it was closed
    # twice: by release() and by a thread at any moment, early (ftimer exec's gate opened
    # before the arms read with it were bound) or late (a descriptor that reused its
    # number, the host's pidfd of a worker say, closed under the server).
    from ftimer_protocol import Sync
    from ftimer_server.server import _closer as closer_module

    closer = RecordingCloser()
    monkeypatch.setattr(closer_module, "CLOSER", closer)
    sock = open_socket(str(tmp_path / "s.socket"))
    read_end, write_end = os.pipe()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sender:
            sender.connect(sock.path)
            socket.send_fds(sender, [encode(Sync(token="t"))], [write_end])
        os.close(write_end)
        results = sock.receive()
        assert [type(r).__name__ for r in results] == ["Sync"]
        assert closer.given == []
        sock.release()
        assert os.read(read_end, 2) == b"\n"  # given, once: written, then closed
        assert os.read(read_end, 1) == b""
    finally:
        for fd in closer.given:
            with __import__("contextlib").suppress(OSError):
                os.close(fd)
        os.close(read_end)
        sock.close()


def test_close_removes_the_socket_it_bound_and_nothing_else(tmp_path: pathlib.Path) -> None:
    # A socket left at the path after a stop: senders' datagrams are refused
    # (ECONNREFUSED) rather than find no server (ENOENT), and its file outlives every
    # server that stopped, in the workers' directory.
    path = str(tmp_path / "s.socket")
    open_socket(path).close()
    assert not os.path.lexists(path)
    sock = open_socket(path)
    os.unlink(path)
    with open(path, "w"):
        pass  # something else at the path meanwhile: never removed
    sock.close()
    assert os.path.isfile(path)
