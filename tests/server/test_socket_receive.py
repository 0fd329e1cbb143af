"""Behaviour of server/_socket.py pinned by a second round of mutation testing (each test
fails with the mutant that found it, and passes on the code as it is): who a datagram's
subject is, what is refused, which descriptors are closed. Real sockets and processes;
nothing is signalled (only ``receive()`` and ``_judge()`` are called, never a server's
loop)."""

from __future__ import annotations

import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import time
from typing import List, Optional

import pytest

from ftimer_protocol import PIPE_BUF, Arm, Disarm, DisarmAll, Sync, TimerRequestV1, encode
from ftimer_server import RejectReason, SystemInspector
from ftimer_server.core._events import Refused
from ftimer_server.server._socket import open_socket

from .conftest import pidfds_of

_SO_PASSCRED = getattr(socket, "SO_PASSCRED", 16)
_SO_PASSPIDFD = getattr(socket, "SO_PASSPIDFD", 76)


def arm(pid: int, scope: str = "s") -> bytes:
    return encode(Arm(pid=pid, scope_id=scope, deadline=1e9, signal=9))


def test_a_truncated_datagram_is_too_long_even_where_it_was_cut_after_a_newline(
    tmp_path: pathlib.Path,
) -> None:
    # recvmsg() reads PIPE_BUF + 1 bytes: of a longer datagram whose byte PIPE_BUF is a
    # newline, what is read is a whole line of PIPE_BUF bytes. Only MSG_TRUNC says the
    # rest was lost: without it the datagram's head was taken for its message.
    sock = open_socket(str(tmp_path / "s.socket"))
    body = encode(Disarm(pid=os.getpid(), scope_id="s"))[:-1]
    padded = body[:-1] + b" " * (PIPE_BUF - len(body)) + b"}"  # PIPE_BUF bytes, valid
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sender:
            sender.connect(sock.path)
            sender.send(padded + b"\n")  # whole: accepted
            sender.send(padded + b"\n" + b"trailing bytes cut off")
        results = sock.receive()
    finally:
        sock.close()
    assert [type(r).__name__ for r in results] == ["Disarm", "LineTooLong"], results


def test_a_datagram_without_credentials_is_a_protocol_error_not_an_exception(
    tmp_path: pathlib.Path,
) -> None:
    # The kernel gives none once the socket no longer asks for them (SO_PASSCRED and
    # SO_PASSPIDFD off): receive() "never raises", and such a datagram is a malformed
    # one, counted, never a message of nobody.
    sock = open_socket(str(tmp_path / "s.socket"))
    try:
        sock._sock.setsockopt(socket.SOL_SOCKET, _SO_PASSCRED, 0)
        if sock.passes_pidfds:
            sock._sock.setsockopt(socket.SOL_SOCKET, _SO_PASSPIDFD, 0)
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sender:
            sender.connect(sock.path)
            sender.send(arm(os.getpid()))
        results = sock.receive()
    finally:
        sock.close()
    assert [type(r).__name__ for r in results] == ["MalformedMessage"], results
    assert "without credentials" in str(results[0])


def test_a_live_sender_is_taken_on_its_pid_where_the_kernel_gives_no_pidfds(
    tmp_path: pathlib.Path,
) -> None:
    # Before Linux 6.5 (no SO_PASSPIDFD) no datagram comes with a pidfd of its sender:
    # that is no sign the sender is gone, and its arm is its own, as over the FIFO.
    sock = open_socket(str(tmp_path / "s.socket"))
    try:
        if sock.passes_pidfds:
            sock._sock.setsockopt(socket.SOL_SOCKET, _SO_PASSPIDFD, 0)
            sock.passes_pidfds = False  # as open_socket() says on such a kernel
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sender:
            sender.connect(sock.path)
            sender.send(arm(os.getpid()))
        results = sock.receive()
        vouched = dict(sock.vouched)
    finally:
        sock.close()
    assert [type(r).__name__ for r in results] == ["Timer"], results
    assert results[0].pid == os.getpid()  # type: ignore[union-attr]
    assert vouched == {}  # no descriptor of the kernel's: none vouches (stdout never)


# Binds the socket argv[1] (in the PID namespace this runs in), says "ready", waits for
# a line on stdin (the test has sent), and prints how what was queued was judged.
SERVER_INSIDE = """
import sys
import time
from typing import List, Optional
from ftimer_server.server._socket import open_socket
sock = open_socket(sys.argv[1])
print("ready", flush=True)
sys.stdin.readline()
for result in sock.receive():
    reason = getattr(result, "reason", None)
    print(type(result).__name__, getattr(reason, "value", reason), getattr(result, "pid", None))
sock.close()
"""


def test_a_sender_the_server_s_pid_namespace_cannot_see_is_refused_never_pid_0(
    tmp_path: pathlib.Path,
) -> None:
    # A server in a child PID namespace, a sender outside it: the kernel says pid 0. Were
    # it taken, the message's subject would be pid 0 (and kill(0) the server's own
    # process group); it is refused, and said why.
    if (
        shutil.which("unshare") is None
        or subprocess.run(["unshare", "--pid", "--fork", "true"], check=False).returncode
    ):
        pytest.skip("cannot create a PID namespace here")
    path = str(tmp_path / "s.socket")
    server = subprocess.Popen(
        ["unshare", "--pid", "--fork", "--kill-child", sys.executable, "-c", SERVER_INSIDE, path],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None
        assert server.stdout.readline() == "ready\n"
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sender:
            sender.connect(path)
            sender.send(arm(os.getpid()))
            sender.send(encode(Disarm(pid=os.getpid(), scope_id="s")))
        out, _ = server.communicate("sent\n", timeout=30)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    refused = f"Refused {RejectReason.SENDER_NOT_VISIBLE.value} 0"
    assert out.splitlines() == [refused, refused], out
    assert server.returncode == 0


def test_a_live_process_proc_hides_is_unverifiable_never_counted_as_exited(
    tmp_path: pathlib.Path,
) -> None:
    # A pidfd of the sender's child, alive (its pidfd says so), that /proc does not show
    # (hidepid=, another mount): the sender may not name it, and the refusal says the
    # server could not tell, never that the process had exited.
    child = subprocess.Popen(["sleep", "60"])

    class Hiding(SystemInspector):
        def uid(self, pid: int) -> int:
            if pid == child.pid:
                raise ProcessLookupError(pid)
            return super().uid(pid)

        def start_time(self, pid: int) -> Optional[int]:
            if pid == child.pid:
                raise ProcessLookupError(pid)
            return super().start_time(pid)

    sock = open_socket(str(tmp_path / "s.socket"), processes=Hiding())
    pidfd = os.pidfd_open(child.pid)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sender:
            sender.connect(sock.path)
            socket.send_fds(sender, [arm(child.pid)], [pidfd])
        [result] = sock.receive()
    finally:
        os.close(pidfd)
        sock.close()
        child.kill()
        child.wait()
    assert isinstance(result, Refused), result
    assert result.reason is RejectReason.UNVERIFIABLE
    assert f"/proc hides process {child.pid}" in result.detail


# Sends argv[2:], each line with a pidfd of its parent (unshare, whose child it is),
# to the socket argv[1]; says "sent" and waits for its stdin to close.
NAMES_ITS_PARENT = """
import os, socket, sys
sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
sock.connect(sys.argv[1])
pidfd = os.pidfd_open(os.getppid())
for line in sys.argv[2:]:
    socket.send_fds(sock, [line.encode()], [pidfd])
print("sent", flush=True)
sys.stdin.read()
"""


def _time_namespaces() -> bool:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return False
    probe = ["unshare", "--time", "--monotonic", "1", "--fork", "true"]
    return subprocess.run(probe, capture_output=True, check=False).returncode == 0


@pytest.mark.skipif(not _time_namespaces(), reason="needs root, unshare(1), time namespaces")
def test_what_only_spares_a_worker_is_taken_from_a_sender_on_other_clocks(
    tmp_path: pathlib.Path,
) -> None:
    # A shell's `ftimer disarm`, run in another time namespace, names the shell by a
    # pidfd: a disarm has no deadline read on the sender's clocks, and refused it would
    # leave a healthy worker to be reaped. Torch's requests are on the wall clock, which
    # no time namespace moves. An arm, on the sender's CLOCK_MONOTONIC, is refused.
    sock = open_socket(str(tmp_path / "s.socket"))
    lines: List[bytes] = [
        encode(Disarm(pid=1, scope_id="d")),
        encode(DisarmAll(pid=1)),
        encode(TimerRequestV1(pid=1, scope_id="t", expiration_time=time.time() + 600, signal=9)),
        encode(Arm(pid=1, scope_id="a", deadline=1e6, signal=9)),
    ]
    argv = [sys.executable, "-c", NAMES_ITS_PARENT, sock.path, *(x.decode() for x in lines)]
    sender = subprocess.Popen(
        ["unshare", "--time", "--monotonic", "5000", "--fork", "--kill-child", *argv],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert sender.stdout is not None
        assert sender.stdout.readline() == "sent\n"
        results = sock.receive()
    finally:
        sock.close()
        sender.communicate("", timeout=30)
    assert [type(r).__name__ for r in results] == [
        "Disarm",
        "DisarmAll",
        "TimerRequestV1",
        "Refused",
    ], results
    assert {r.pid for r in results[:3]} == {sender.pid}  # type: ignore[union-attr]
    assert results[3].reason is RejectReason.OTHER_CLOCK  # type: ignore[union-attr]


def test_each_receive_lets_go_of_the_last_batch_s_pidfds(tmp_path: pathlib.Path) -> None:
    # A batch's pidfds (the one a datagram carried and vouches with) are closed by
    # release(), or at the latest by the next receive(): a caller that never released
    # leaked one descriptor a datagram, and kept the old batch's vouches for new pids.
    sock = open_socket(str(tmp_path / "s.socket"))
    child = subprocess.Popen(["sleep", "60"])
    pidfd = os.pidfd_open(child.pid)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sender:
            sender.connect(sock.path)
            socket.send_fds(sender, [arm(child.pid)], [pidfd])
            [timer] = sock.receive()
            assert timer.pid == child.pid  # type: ignore[union-attr]
            assert child.pid in sock.vouched
            assert pidfds_of(child.pid) == 2  # the test's, and the one that vouches
            sender.send(encode(Disarm(pid=os.getpid(), scope_id="next")))
            [disarm] = sock.receive()  # no release() in between
        assert disarm.scope_id == "next"  # type: ignore[union-attr]
        assert child.pid not in sock.vouched
        assert pidfds_of(child.pid) == 1  # the test's own
    finally:
        os.close(pidfd)
        sock.close()
        child.kill()
        child.wait()


def test_a_queue_full_read_says_full_one_short_does_not(tmp_path: pathlib.Path) -> None:
    # full: the last receive() read a queue-full (net.unix.max_dgram_qlen datagrams) or
    # more, and senders may be waiting for room. Exactly a queue-full counts.
    sock = open_socket(str(tmp_path / "s.socket"))
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sender:
            sender.connect(sock.path)
            for count in (sock.queue_length - 1, sock.queue_length):
                for i in range(count):
                    sender.send(encode(Disarm(pid=os.getpid(), scope_id=str(i))))
                assert len(sock.receive()) == count
                assert sock.full is (count == sock.queue_length), count
                sock.release()
    finally:
        sock.close()


# Starts a grandchild of the test (sleep), prints its pid, and exits on a line of stdin,
# leaving it to be reparented.
MIDDLE = """
import subprocess, sys
grandchild = subprocess.Popen(["sleep", "60"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
print(grandchild.pid, flush=True)
sys.stdin.readline()
"""


def _parent(pid: int) -> int:
    with open(f"/proc/{pid}/stat", "rb") as f:
        return int(f.read().rsplit(b")", 1)[1].split()[1])


def test_a_descendant_reparented_since_the_last_batch_is_a_stranger(
    tmp_path: pathlib.Path,
) -> None:
    # The parents read while judging a batch are kept for that batch only: once the
    # process between the sender and a descendant has exited, the descendant is
    # another's (init's, a subreaper's), and the sender may no longer name it.
    sock = open_socket(str(tmp_path / "s.socket"))
    middle = subprocess.Popen(
        [sys.executable, "-c", MIDDLE], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert middle.stdout is not None
    grandchild = int(middle.stdout.readline())
    pidfd = os.pidfd_open(grandchild)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sender:
            sender.connect(sock.path)
            socket.send_fds(sender, [arm(grandchild)], [pidfd])
            [first] = sock.receive()
            sock.release()
            assert first.pid == grandchild  # type: ignore[union-attr]
            middle.communicate("\n", timeout=30)  # it exits; the grandchild lives on
            if _parent(grandchild) == os.getpid():
                pytest.skip(
                    "this process adopts orphans (a subreaper, or its PID namespace's init)"
                )
            socket.send_fds(sender, [arm(grandchild, scope="again")], [pidfd])
            [second] = sock.receive()
            sock.release()
    finally:
        sock.close()
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)  # the test's own grandchild
        os.close(pidfd)
        if middle.poll() is None:
            middle.kill()
            middle.wait()
    assert isinstance(second, Refused), second
    assert second.reason is RejectReason.FOREIGN_SUBJECT


def test_a_sync_without_a_receipt_is_answered_and_keeps_nothing(tmp_path: pathlib.Path) -> None:
    # Only a sync that carried a pipe has a receipt to keep until the batch is applied;
    # one that carried nothing (a resync's) is a Sync like any other.
    sock = open_socket(str(tmp_path / "s.socket"))
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sender:
            sender.connect(sock.path)
            sender.send(encode(Sync(token="plain")))
            sender.send(encode(Disarm(pid=os.getpid(), scope_id="after")))
        results = sock.receive()
    finally:
        sock.close()
    assert [type(r).__name__ for r in results] == ["Sync", "Disarm"], results
    assert results[0].token == "plain"  # type: ignore[union-attr]
