"""FileTimerClient over a real AF_UNIX datagram socket: the binding, the kernel's word on
the sender, pidfds for another process's timers, and how the transport is chosen."""

from __future__ import annotations

import errno
import os
import pathlib
import signal
import subprocess
import threading
import time

import pytest

from ftimer_client import FileTimerClient, ServerUnavailable, expires
from ftimer_client._proc import process_start_time
from ftimer_protocol import Arm, Disarm, Expire, decode

from .conftest import FifoPeer, SocketPeer, server_state

ME = os.getpid()

pytestmark = pytest.mark.skipif(
    not hasattr(os, "pidfd_open"), reason="the socket transport is Linux's (pidfds)"
)


def test_each_line_is_one_datagram_and_the_kernel_names_the_sender(speer: SocketPeer) -> None:
    client = FileTimerClient(speer.path, signal.SIGTERM, labels={"job": "j"})
    before = time.monotonic()
    client.arm("step", 30)
    client.release("step")
    client.expire("now", signal=0)
    arm, disarm, expire = speer.wait_count(3)
    start = process_start_time()
    assert isinstance(arm, Arm)
    assert (arm.pid, arm.scope_id, arm.signal, arm.start_time) == (ME, "step", 15, start)
    assert arm.labels == {"job": "j"}
    assert before + 30 <= arm.deadline + 1e-6 <= time.monotonic() + 30 + 1e-6
    assert disarm == Disarm(ME, "step", start)
    assert expire == Expire(ME, "now", 0, start, {"job": "j"})
    for datagram in speer.datagrams:
        # Exactly one encoded line, newline included, as on the FIFO.
        assert datagram.data.endswith(b"\n")
        assert datagram.data.count(b"\n") == 1
        assert decode(datagram.data) in (arm, disarm, expire)
        assert (datagram.pid, datagram.uid) == (ME, os.geteuid())
        assert datagram.pidfds == ()
        assert datagram.others == 0
    assert client._channel.transport == "socket"


def test_a_block_of_many_scopes_sends_one_datagram_per_message(speer: SocketPeer) -> None:
    client = FileTimerClient(speer.path, labels={})
    for i in range(200):
        with expires(after=60, scope=f"step-{i}", client=client):
            pass
    messages = speer.wait_count(400)
    assert len(speer.datagrams) == 400
    assert speer.errors == []
    assert [m.scope_id for m in messages[:4]] == ["step-0", "step-0", "step-1", "step-1"]  # type: ignore[union-attr]
    assert server_state(messages) == {}


def test_another_processs_timers_carry_its_pidfd(
    speer: SocketPeer, sleeper: subprocess.Popen[bytes]
) -> None:
    client = FileTimerClient(speer.path, pid=sleeper.pid, labels={})
    client.arm("s", 60)
    client.release("s")
    arm, disarm = speer.wait_count(2)
    assert isinstance(arm, Arm)
    assert (arm.pid, disarm.pid) == (sleeper.pid, sleeper.pid)  # type: ignore[union-attr]
    for datagram in speer.datagrams:
        assert datagram.pid == ME  # the sender, from the kernel
        assert datagram.pidfds == (sleeper.pid,)  # the subject, from the pidfd
    # One pidfd, opened once and kept (it pins the process), closed with the client.
    assert client._channel._pidfd >= 0
    client.close()
    assert client._channel._pidfd == -1


def test_a_client_naming_its_own_pid_sends_no_pidfd(speer: SocketPeer) -> None:
    client = FileTimerClient(speer.path, pid=ME, labels={})
    client.arm("s", 60)
    speer.wait_count(1)
    (datagram,) = speer.datagrams
    assert (datagram.pid, datagram.pidfds) == (ME, ())


def test_a_process_that_is_gone_cannot_be_named(speer: SocketPeer) -> None:
    with subprocess.Popen(["true"]) as child:
        child.wait()  # reaped: the pid names nobody now (until reused)
    client = FileTimerClient(speer.path, pid=child.pid, labels={})
    with pytest.raises(ServerUnavailable, match="does not exist") as info:
        client.arm("s", 60)
    assert info.value.errno == errno.ESRCH
    assert speer.datagrams == []


def test_threads_share_one_connection(speer: SocketPeer) -> None:
    client = FileTimerClient(speer.path, labels={})
    start = threading.Barrier(4)

    def work(n: int) -> None:
        start.wait()
        for i in range(100):
            with expires(after=60, scope=f"t{n}-{i}", client=client):
                pass

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    messages = speer.wait_count(800)
    assert speer.errors == []
    assert len({d.pid for d in speer.datagrams}) == 1
    assert server_state(messages) == {}


# -- which transport ----------------------------------------------------------------------


def test_what_is_at_the_path_decides(fifo_path: pathlib.Path, socket_path: pathlib.Path) -> None:
    fifo, sock = FifoPeer(fifo_path), SocketPeer(socket_path)
    try:
        to_socket = FileTimerClient(socket_path, labels={})
        to_fifo = FileTimerClient(fifo_path, labels={})  # explicit: no socket preferred
        to_socket.arm("a", 60)
        to_fifo.arm("b", 60)
        assert [m.scope_id for m in sock.wait_count(1)] == ["a"]  # type: ignore[union-attr]
        assert [m.scope_id for m in fifo.wait_count(1)] == ["b"]  # type: ignore[union-attr]
        assert (to_socket.transport, to_fifo.transport) == ("auto", "auto")
        assert (to_socket._channel.transport, to_fifo._channel.transport) == ("socket", "fifo")
    finally:
        fifo.close()
        sock.close()


def test_an_explicit_transport_refuses_the_other_kind(
    fifo_path: pathlib.Path, socket_path: pathlib.Path
) -> None:
    fifo, sock = FifoPeer(fifo_path), SocketPeer(socket_path)
    try:
        with pytest.raises(ServerUnavailable, match="a socket, not a FIFO"):
            FileTimerClient(socket_path, transport="fifo").arm("s", 5)
        with pytest.raises(ServerUnavailable, match="not a socket"):
            FileTimerClient(fifo_path, transport="socket").arm("s", 5)
        assert fifo.messages == []
        assert sock.messages == []
    finally:
        fifo.close()
        sock.close()


def test_protocol_1_is_fifo_only(speer: SocketPeer) -> None:
    with pytest.raises(ValueError, match="FIFO only"):
        FileTimerClient(speer.path, protocol=1, transport="socket")
    client = FileTimerClient(speer.path, protocol=1)
    assert client.transport == "fifo"
    with pytest.raises(ServerUnavailable, match=r"a socket, not a FIFO.*protocol 1"):
        client.arm("s", 5)
    assert speer.datagrams == []


def test_the_default_path_prefers_the_socket_beside_the_fifo(
    fifo_path: pathlib.Path, socket_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FTIMER_FIFO", str(fifo_path))
    fifo = FifoPeer(fifo_path)
    try:
        alone = FileTimerClient(labels={})
        assert alone.file_path == str(fifo_path)
        alone.arm("a", 60)  # no socket yet: the FIFO
        assert [type(m) for m in fifo.wait_count(1)] == [Arm]
        # The server now offers a socket, and restarts its FIFO: the next connection
        # finds the socket, and the resync goes there.
        sock = SocketPeer(socket_path)
        try:
            fifo.close()
            alone.arm("b", 60)
            # The resync (a; not b, whose own line goes last), then b.
            messages = sock.wait_for(lambda m: len(m) >= 2)
            assert [m.scope_id for m in messages] == ["a", "b"]  # type: ignore[union-attr]
            assert set(server_state(messages)) == {(ME, "a"), (ME, "b")}
            assert alone._channel.transport == "socket"
        finally:
            sock.close()
    finally:
        fifo.close()


def test_ftimer_socket_names_the_socket(
    socket_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sock = SocketPeer(socket_path)
    try:
        monkeypatch.setenv("FTIMER_FIFO", "/nonexistent/timer.fifo")
        monkeypatch.setenv("FTIMER_SOCKET", str(socket_path))
        client = FileTimerClient(labels={})
        assert client.file_path == str(socket_path)
        client.arm("s", 60)
        assert [type(m) for m in sock.wait_count(1)] == [Arm]
        # torch's protocol ignores it: FIFO only.
        assert FileTimerClient(protocol=1).file_path == "/nonexistent/timer.fifo"
    finally:
        sock.close()
