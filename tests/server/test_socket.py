"""The datagram socket: the kernel says who sent each message (SCM_CREDENTIALS, a pidfd
of the sender), so the subject of a timer is the sender, never the pid it names. Real
sockets, real processes (one in a private PID namespace), real signals to the test's
own children only."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import gc
import logging
import os
import pathlib
import re
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import warnings
import weakref
from collections.abc import Iterator
from typing import Callable, Dict, List, Optional, Sequence

import pytest
from tests.conftest import children_of, not_pid_1, open_descriptors, opened_since, wait_until

from ftimer_protocol import PIPE_BUF, Arm, Disarm, Expire, Sync, encode
from ftimer_server import (
    Armed,
    Event,
    FifoBusy,
    FifoError,
    FileTimerServer,
    Reaped,
    Rejected,
    RejectReason,
    SystemInspector,
)
from ftimer_server.core._events import Moot, Refused
from ftimer_server.server import _closer as closer_module
from ftimer_server.server import _socket as socket_module
from ftimer_server.server._socket import open_socket

from .conftest import OwnChildrenSignaller, is_open, run_as_nobody, wait_exit

# Sends one line to the socket argv[1]: argv[2] is the line; with argv[3], also a pidfd
# of that pid (SCM_RIGHTS). Then waits for its stdin to close (it is the sender).
SENDER = """
import os, socket, sys
sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
sock.connect(sys.argv[1])
line = sys.argv[2].encode()
if len(sys.argv) > 3:
    socket.send_fds(sock, [line], [os.pidfd_open(int(sys.argv[3]))])
else:
    sock.send(line)
print("sent", flush=True)
sys.stdin.read()
"""


class Events:
    def __init__(self) -> None:
        self.all: List[Event] = []

    def __call__(self, event: Event) -> None:
        self.all.append(event)

    def of(self, kind: type) -> List[Event]:
        return [e for e in self.all if isinstance(e, kind)]


@pytest.fixture
def served(fifo_path: pathlib.Path) -> Iterator[tuple[FileTimerServer, Events, str]]:
    """A server on the socket that reaps the test's children, and only them (its tests
    send pid 1 too)."""
    events = Events()
    path = str(fifo_path.with_suffix(".socket"))
    signaller = OwnChildrenSignaller()
    with FileTimerServer(
        fifo_path, on_event=events, socket_path=path, signaller=signaller
    ) as server:
        yield server, events, path
    assert signaller.refused == []


@pytest.fixture
def senders() -> Iterator[Callable[..., subprocess.Popen[str]]]:
    started: List[subprocess.Popen[str]] = []

    def send(
        path: str, line: bytes, *extra: str, prefix: Sequence[str] = ()
    ) -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            [*prefix, sys.executable, "-c", SENDER, path, line.decode(), *extra],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        started.append(proc)
        assert proc.stdout is not None
        assert proc.stdout.readline() == "sent\n"
        return proc

    yield send
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        for stream in (proc.stdin, proc.stdout):
            if stream is not None:
                stream.close()


def soon() -> float:
    """A deadline after the sender has said it sent: its start (an unshare's too) takes
    a loaded machine well over the half second it was given once."""
    return time.monotonic() + 2.0


def arm(pid: int, after: float = 1e9, scope: str = "step") -> bytes:
    return encode(Arm(pid=pid, scope_id=scope, deadline=after, signal=9))


def test_the_subject_is_the_sender_not_the_pid_it_names(served, senders, children) -> None:  # type: ignore[no-untyped-def]
    server, events, path = served
    bystander = children()
    sender = senders(path, arm(bystander.pid, soon()))  # names another process
    code, _ = wait_exit(sender)
    assert code == -9  # the sender itself was reaped
    assert bystander.poll() is None
    server.sync()  # the event follows the signal
    [reaped] = events.of(Reaped)
    assert reaped.pid == sender.pid  # type: ignore[attr-defined]
    stats = server.stats()
    assert stats.received["socket"] == 1
    assert stats.pid_overridden == 1  # the pid it named was counted as overridden


def test_a_message_naming_its_own_sender_is_not_counted_as_overridden(served) -> None:  # type: ignore[no-untyped-def]
    server, events, path = served
    worker = f"""
from ftimer_client import FileTimerClient
with FileTimerClient({path!r}, transport="socket") as client:
    client.arm("own", 60)
    client.release("own")
"""
    subprocess.run([sys.executable, "-c", worker], check=True)
    wait_until(lambda: server.stats().received.get("socket") == 2)
    assert len(events.of(Armed)) == 1
    assert server.stats().pid_overridden == 0


def test_a_pidfd_names_the_senders_parent_never_a_stranger(served, senders) -> None:  # type: ignore[no-untyped-def]
    server, events, path = served
    child = subprocess.Popen(["sleep", "60"])
    try:
        stranger = senders(path, arm(1), str(child.pid))  # the test's child: not the sender's
        wait_until(lambda: events.of(Rejected))
        [refused] = events.of(Rejected)
        assert refused.reason.value == "foreign_subject"  # type: ignore[attr-defined]
        assert "neither a descendant nor the parent" in refused.detail  # type: ignore[attr-defined]
        assert refused.scope_id == "step"  # type: ignore[attr-defined]
        assert stranger.poll() is None
        assert child.poll() is None
    finally:
        child.kill()
        child.wait()
    # A shell whose child sends its parent's pidfd: the shell is the subject. The child
    # lives until the server has read it (it waits for the shell's stdin to close).
    command = f'"{sys.executable}" -c "$0" "$1" "$2" "$$" > /dev/null; sleep 60'
    shell = subprocess.Popen(
        ["sh", "-c", command, SENDER, path, arm(1).decode()], stdin=subprocess.PIPE
    )
    try:
        wait_until(lambda: events.of(Armed))
        shell.stdin.close()  # type: ignore[union-attr]
        [armed] = events.of(Armed)
        assert armed.timer.pid == shell.pid  # type: ignore[attr-defined]
    finally:
        shell.kill()
        shell.wait()
    del server


def test_a_sender_may_name_itself_by_its_own_pidfd(served) -> None:  # type: ignore[no-untyped-def]
    # It was refused: its own process is neither its descendant nor its parent.
    server, events, path = served
    worker = f"""
import os, socket
from ftimer_protocol import Arm, encode
with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
    s.connect({path!r})
    line = encode(Arm(pid=os.getpid(), scope_id="own", deadline=1e9, signal=9))
    socket.send_fds(s, [line], [os.pidfd_open(os.getpid())])
    print("sent", flush=True)
    input()
"""
    proc = subprocess.Popen(
        [sys.executable, "-c", worker], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == "sent\n"
        wait_until(lambda: events.of(Armed) or events.of(Rejected))
        assert [e.timer.pid for e in events.of(Armed)] == [proc.pid]  # type: ignore[attr-defined]
    finally:
        proc.kill()
        proc.wait()
        for stream in (proc.stdin, proc.stdout):
            if stream is not None:
                stream.close()
    del server


def test_a_sender_in_a_private_pid_namespace_is_known_by_its_host_pid(
    served,
    senders,  # type: ignore[no-untyped-def]
) -> None:
    if (
        shutil.which("unshare") is None
        or subprocess.run(["unshare", "--pid", "--fork", "true"], check=False).returncode
    ):
        pytest.skip("cannot create a PID namespace here")
    server, events, path = served
    # Inside, the sender is pid 1 (with --fork, unshare's child) and names itself so.
    sender = senders(path, arm(1, soon()), prefix=["unshare", "--pid", "--fork", "--kill-child"])
    wait_until(lambda: events.of(Reaped))
    [reaped] = events.of(Reaped)
    host_pid = reaped.pid  # type: ignore[attr-defined]
    assert host_pid not in (1, sender.pid)  # its host pid: unshare's child
    assert server.stats().pid_overridden == 1
    with open(f"/proc/{sender.pid}/status") as f:  # unshare itself lives on, unsignalled
        assert "State:" in f.read()
    assert sender.wait(10) != 0  # its child was killed, so unshare ends
    del server


def test_a_sender_that_exits_before_it_is_read_is_never_taken_for_its_pid(
    fifo_path: pathlib.Path, senders
) -> None:  # type: ignore[no-untyped-def]
    # Its pid may be another process's by then. About itself, its message is moot (its
    # timers went with it): it was refused, a warning and a counted refusal for every
    # worker that ended right after its last step (12 to 17% of a job's short-lived
    # workers' messages). About another process (its parent here: this one), refused.
    events = Events()
    gate, held = threading.Event(), threading.Event()

    def hold(event: Event) -> None:
        events(event)
        if isinstance(event, Armed) and not held.is_set():
            held.set()
            gate.wait(10)

    path = str(fifo_path.with_suffix(".socket"))
    signaller = OwnChildrenSignaller()  # a gone sender's pid may be anyone's now
    with FileTimerServer(fifo_path, on_event=hold, socket_path=path, signaller=signaller) as server:
        if not server.socket.passes_pidfds:  # type: ignore[union-attr]
            pytest.skip("the kernel gives no pidfd of a sender (SO_PASSPIDFD, Linux 6.5)")
        first = senders(path, arm(1))
        assert held.wait(10)  # the loop is held; the next datagrams wait in the queue
        gone = [
            senders(path, arm(1, scope="late")),
            senders(path, encode(Disarm(pid=1, scope_id="late"))),
            senders(path, arm(1, scope="parent's"), str(os.getpid())),
        ]
        for sender in gone:
            sender.kill()
            sender.wait()
        gate.set()
        wait_until(lambda: server.stats().received.get("socket") == 4)
        stats = server.stats()
    [refused] = events.of(Rejected)
    assert (refused.reason.value, refused.scope_id) == ("sender_gone", "parent's")  # type: ignore[attr-defined]
    assert [e.timer.pid for e in events.of(Armed)] == [first.pid]  # type: ignore[attr-defined]
    assert stats.requests == {
        "arm": {"ok": 1, "exited": 1, "rejected": 1},
        "disarm": {"unknown": 1},
    }
    assert events.of(Reaped) == []
    assert signaller.refused == []


def test_bad_datagrams_are_counted_and_no_descriptor_leaks(served) -> None:  # type: ignore[no-untyped-def]
    server, events, path = served
    before = open_descriptors()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.connect(path)
    pidfd = os.pidfd_open(os.getpid())
    try:
        sock.send(b"y" * 5000)  # longer than PIPE_BUF: truncated
        sock.send(b"not a message\n")
        for _ in range(50):  # descriptors that are refused must still be closed
            socket.send_fds(sock, [encode(Expire(pid=1, scope_id="x", signal=9))], [pidfd, pidfd])
        server.sync()
        stats = server.stats()
    finally:
        os.close(pidfd)
        sock.close()
    assert stats.decode_errors == {"LineTooLong": 1, "MalformedMessage": 1}
    assert stats.rejections == {"foreign_subject": 50}
    assert stats.received["socket"] == 52
    # Closed by the server's closer thread, off the loop: soon, not necessarily yet.
    wait_until(lambda: not opened_since(before), what="every descriptor closed")
    del events


def test_a_run_of_datagrams_with_one_error_is_one_error(fifo_path: pathlib.Path) -> None:
    # As a run of such lines on the FIFO: a flood costs one error value, one event.
    receiver = open_socket(str(fifo_path.with_suffix(".socket")))
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(receiver.path)
            for line in [b"y\n"] * 5 + [arm(os.getpid()), b"junk\n", b"y\n", b"{}\n"]:
                sock.send(line)
            received = receiver.receive()
    finally:
        receiver.close()
    assert [(type(r).__name__, getattr(r, "lines", None)) for r in received] == [
        ("MalformedMessage", 5),
        ("Timer", None),  # an arm, decoded as the FIFO's fast path decodes it
        ("MalformedMessage", 2),  # "junk" and "y": neither is a JSON object
        ("MalformedMessage", 1),  # no "version": another error
    ]


def test_an_empty_datagram_is_counted_and_the_loop_does_not_spin(served) -> None:  # type: ignore[no-untyped-def]
    # The loop reads the socket when the selector saw it readable or a datagram is
    # queued (FIONREAD), which reads 0 for an empty one: it must still be taken, once.
    server, events, path = served
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.connect(path)
        sock.send(b"")
        server.sync()
        assert server.stats().decode_errors == {"MalformedMessage": 1}
        cpu = time.process_time()
        time.sleep(0.3)  # a window to measure the idle loop's CPU in, not a wait
        assert time.process_time() - cpu < 0.1
        sock.send(b"")
        sock.send(b'{"version":2,"op":"bogus","pid":1}\n')  # another error: never one run
        server.sync()
    stats = server.stats()
    assert stats.decode_errors == {"MalformedMessage": 3}
    assert stats.received["socket"] == 3
    del events


# Forks a child, opens its pidfd, reaps it (argv[3] "reaped") or leaves it a zombie,
# then sends the message argv[2] with that pidfd: what `ftimer exec` does when its
# command has exited. Waits for stdin to close.
EXITED_SUBJECT = """
import os, socket, sys
sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
sock.connect(sys.argv[1])
child = os.fork()
if child == 0:
    os._exit(0)
pidfd = os.pidfd_open(child)
if sys.argv[3] == "reaped":
    os.waitpid(child, 0)
else:
    os.waitid(os.P_PID, child, os.WEXITED | os.WNOWAIT)
socket.send_fds(sock, [sys.argv[2].encode()], [pidfd])
print("sent", flush=True)
sys.stdin.read()
"""


@pytest.mark.parametrize("state", ["reaped", "zombie"])
@pytest.mark.parametrize(
    ("message", "result"),
    [
        (Disarm(pid=12345, scope_id="s"), {"disarm": {"unknown": 1}}),
        (Arm(pid=12345, scope_id="s", deadline=1e9, signal=9), {"arm": {"exited": 1}}),
    ],
)
def test_a_request_for_a_process_that_exited_is_moot_not_refused(  # type: ignore[no-untyped-def]
    served, state, message, result
) -> None:
    """`ftimer exec` disarms after its command exited, and reaps it once the datagram is
    read: the server may find a pidfd of a reaped process; and a quick command may have
    exited before its arm was read. Its timers went with it: a disarm of no timer, an arm
    of a process that exited, neither a refusal (a warning each time) nor a stranger
    named."""
    server, events, path = served
    sender = subprocess.Popen(
        [sys.executable, "-c", EXITED_SUBJECT, path, encode(message).decode(), state],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        assert sender.stdout.readline() == b"sent\n"  # type: ignore[union-attr]
        wait_until(lambda: server.stats().received.get("socket") == 1)
    finally:
        sender.communicate()
    assert events.of(Rejected) == []
    assert server.stats().requests == result
    assert server.armed() == []


def test_deeply_nested_json_is_a_malformed_datagram(served) -> None:  # type: ignore[no-untyped-def]
    # It raised RecursionError out of receive(): the batch it came in was lost, uncounted.
    server, _, path = served
    worker = f"""
import socket
from ftimer_client import FileTimerClient
with FileTimerClient({path!r}, transport="socket") as client:
    client.arm("s", 60)
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as junk:
        junk.connect({path!r})
        junk.send(b'{{"version":2,"op":"arm","pid":1,"x":' + b"[" * 1000)
    client.release("s")
    input()  # alive until read: a sender gone before that is refused as gone
"""
    with subprocess.Popen([sys.executable, "-c", worker], stdin=subprocess.PIPE) as sender:
        wait_until(lambda: server.stats().received.get("socket") == 3)
        sender.communicate(b"\n")
    assert sender.returncode == 0
    stats = server.stats()
    assert stats.decode_errors == {"MalformedMessage": 1}
    assert stats.requests["disarm"] == {"ok": 1}
    assert server.armed() == []


# Pid 1 of a private PID namespace (its pids are its own to hand out): a sender's
# datagram is read, then the sender dies and a new process is given its pid before the
# server binds it. Prints how the host resolves that pid.
REUSED = """
import os, socket, subprocess, sys, time
from ftimer_protocol import Arm, encode
from ftimer_server import RecordingSignaller
from ftimer_server.server._edge import SystemHost
from ftimer_server.server._process import SystemInspector
from ftimer_server.server._socket import open_socket

sock = open_socket(sys.argv[1])
code = "import socket, sys; s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM); "
code += "s.connect(sys.argv[1]); s.send(sys.argv[2].encode()); sys.stdin.read()"
line = encode(Arm(pid=1, scope_id="s", deadline=1e9, signal=9)).decode()
sender = subprocess.Popen([sys.executable, "-c", code, sys.argv[1], line], stdin=subprocess.PIPE)
while not sock.queued():
    time.sleep(0.001)
[message] = sock.receive()
assert message.pid == sender.pid and sender.pid in sock.vouched
sender.kill()
sender.wait()
with open("/proc/sys/kernel/ns_last_pid", "w") as f:
    f.write(str(sender.pid - 1))
impostor = subprocess.Popen(["sleep", "60"])
assert impostor.pid == sender.pid, (impostor.pid, sender.pid)
host = SystemHost(SystemInspector(), RecordingSignaller())
host.vouched = sock.vouched
print(getattr(host.resolve(sender.pid), "reason", "bound to the impostor"))
impostor.kill()
"""


def test_a_pid_reused_between_the_read_and_the_bind_is_not_bound(tmp_path: pathlib.Path) -> None:
    # The kernel named the sender by a pidfd; the host opened a pidfd by number later,
    # and bound whatever process held that number by then.
    if (
        shutil.which("unshare") is None
        or subprocess.run(["unshare", "--pid", "--fork", "true"], check=False).returncode
    ):
        pytest.skip("cannot create a PID namespace here")
    run = ["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-c", REUSED]
    done = subprocess.run(
        [*run, str(tmp_path / "s.socket")], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == "RejectReason.NO_SUCH_PROCESS\n"


# Connects to the TCP address argv[2:4], makes its close linger 60 s over unsent data,
# sends that socket to the datagram socket argv[1] with a line, and exits without
# closing it (an exit never lingers): the receiver's copy is the last one.
LINGERER = """
import os, socket, struct, sys
tcp = socket.create_connection((sys.argv[2], int(sys.argv[3])))
tcp.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 60))
tcp.setblocking(False)
try:
    while True:
        tcp.send(b"x" * 65536)
except BlockingIOError:
    pass
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.connect(sys.argv[1])
before = [os.open("/dev/null", os.O_RDONLY) for _ in range(int(sys.argv[4]))]
socket.send_fds(s, [b"junk\\n"], before + [tcp.fileno()])
os._exit(0)
"""


@pytest.mark.parametrize("before", [0, 8])
def test_a_descriptor_whose_close_blocks_is_not_closed_by_the_reader(
    tmp_path: pathlib.Path, before: int
) -> None:
    # A TCP socket with SO_LINGER and unsent data blocks its last close() for the linger
    # time: the server closed what senders passed it in its loop, and stalled as long.
    # After 8 other descriptors it found no room in the control data, and the kernel
    # closed it inside recvmsg(), in the loop's thread all the same.
    sock = open_socket(str(tmp_path / "s.socket"))
    with socket.create_server(("127.0.0.1", 0)) as listener:
        host, port = listener.getsockname()
        lingerer = [LINGERER, sock.path, host, str(port), str(before)]
        subprocess.run([sys.executable, "-c", *lingerer], check=True)
        peer, _ = listener.accept()  # never reads
        try:
            results: List[object] = []
            reader = threading.Thread(target=lambda: results.extend(sock.receive()))
            reader.start()
            reader.join(10)  # the close would take 60 s
            assert not reader.is_alive()
            assert [type(r).__name__ for r in results] == ["MalformedMessage"]
        finally:
            peer.close()  # the lingering close ends (reset)
            reader.join(10)
            sock.close()


def test_a_line_of_descent_is_read_once_a_batch(tmp_path: pathlib.Path) -> None:
    # A sender naming a descendant many generations down had every generation's parent
    # read from /proc again for each datagram (2.7 ms a datagram at 250 generations).
    depth = 20
    script = 'f() { if [ "$1" -gt 0 ]; then f $(($1 - 1)) & wait; else exec sleep 60; fi; }; f "$0"'
    # A session and group of its own (bash without job control puts its background
    # jobs in its group): killed at once, by a group id the unreaped chain holds.
    chain = subprocess.Popen(["bash", "-c", script, str(depth)], start_new_session=True)
    try:
        pid = chain.pid
        for _ in range(depth):  # down to the sleep at the bottom
            pid = wait_until(lambda p=pid: children_of(p), what="the next generation")[0]
        wait_until(lambda: pathlib.Path(f"/proc/{pid}/comm").read_text() == "sleep\n")
        reads: List[int] = []

        class Counting(SystemInspector):
            def parent(self, pid: int) -> int:
                reads.append(pid)
                return super().parent(pid)

        sock = open_socket(str(tmp_path / "s.socket"), processes=Counting())
        pidfd = os.pidfd_open(pid)
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sender:
                sender.connect(sock.path)
                for i in range(10):
                    socket.send_fds(sender, [arm(pid, scope=f"s{i}")], [pidfd])
            results = sock.receive()
        finally:
            os.close(pidfd)
            sock.close()
        assert [getattr(r, "pid", r) for r in results] == [pid] * 10  # all accepted
        assert len(reads) <= depth + 2  # once, not once a datagram
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(chain.pid, signal.SIGKILL)
        chain.wait()


def test_a_datagram_is_too_long_as_a_line_of_the_fifo_is(tmp_path: pathlib.Path) -> None:
    # PIPE_BUF bytes and a newline at most; 4097 bytes with no newline passed before.
    sock = open_socket(str(tmp_path / "s.socket"))
    body = encode(Disarm(pid=os.getpid(), scope_id="s"))[:-1]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sender:
            sender.connect(sock.path)
            padded = body[:-1] + b" " * (PIPE_BUF - len(body)) + b"}"  # PIPE_BUF bytes
            for datagram in (padded + b"\n", padded, padded + b" ", padded + b" \n"):
                sender.send(datagram)
        results = sock.receive()
    finally:
        sock.close()
    assert [type(r).__name__ for r in results] == ["Disarm", "Disarm", "LineTooLong"]
    assert results[2].lines == 2  # type: ignore[union-attr]


def test_a_sender_the_kernel_gives_no_pidfd_for_is_never_taken_for_its_pid(
    tmp_path: pathlib.Path,
) -> None:
    # Before Linux 6.17 a sender already reaped comes with -errno in SCM_PIDFD, not a
    # pidfd: it was accepted, with nothing to vouch that its pid was still its own. About
    # itself, its message is moot; about another process (a pidfd carried), refused; and
    # with no word of the kernel at all (-1), refused.
    sock = open_socket(str(tmp_path / "s.socket"))
    r, w = os.pipe()  # a descriptor that is not read: the verdict comes first
    try:
        if not sock.passes_pidfds:
            pytest.skip("this kernel gives no pidfd of a sender (SO_PASSPIDFD, Linux 6.5)")
        line, creds = arm(os.getpid()), (os.getpid(), 0, 0)
        itself = sock._judge((line, 0, creds, -errno.EINVAL, [], None), False)
        another = sock._judge((line, 0, creds, -errno.ESRCH, [r], os.getppid()), False)
        unknown = sock._judge((line, 0, creds, -1, [], None), False)
    finally:
        os.close(r)
        os.close(w)
        sock.close()
    assert itself == Moot("arm")
    for result in (another, unknown):
        assert isinstance(result, Refused)
        assert result.reason is RejectReason.SENDER_GONE


def test_the_closer_thread_is_made_again_in_a_forked_child(tmp_path: pathlib.Path) -> None:
    # The child had the parent's variable saying a closer thread runs, and no thread:
    # every descriptor a sender passed leaked there.
    r, w = os.pipe()
    closer_module.CLOSER.close([r])  # the parent's closer thread runs from now on
    wait_until(lambda: not is_open(r), what="the parent's descriptor closed")
    os.close(w)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fork() with threads running
        pid = os.fork()
    if pid == 0:  # pragma: no cover (the child)
        r2, _ = os.pipe()
        closer_module.CLOSER.close([r2])
        deadline = time.monotonic() + 10
        while is_open(r2) and time.monotonic() < deadline:
            time.sleep(0.001)
        os._exit(1 if is_open(r2) else 0)
    assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0


def test_a_batch_that_fails_to_apply_still_releases_its_pidfds(
    served, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    # A bug in applying a batch (the loop logs it and goes on) left its pidfds open, and
    # vouching for their pids in later binds.
    server, _, path = served
    failed = threading.Event()

    def fail(*_: object) -> List[str]:
        failed.set()
        raise RuntimeError("a bug")

    monkeypatch.setattr(server._watchdog, "apply", fail)
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sender:
        sender.connect(path)
        sender.send(arm(os.getpid(), scope="x"))
    assert failed.wait(10)
    wait_until(lambda: server.socket.vouched == {}, what="the batch's pidfds released")


def test_a_batch_s_pidfds_are_released_under_the_server_s_lock(
    served, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    # The host reads a vouching pidfd under the lock, for a register_timers() call on
    # another thread too: closed outside it, that pidfd could be polled as it closed (or
    # after its number was reused).
    server, _, path = served
    sock = server.socket
    taken_elsewhere: List[bool] = []
    released = threading.Event()

    def release() -> None:
        if sock.vouched:  # a batch's, not the empty release at the start of a receive
            other = threading.Thread(
                target=lambda: taken_elsewhere.append(server._lock.acquire(blocking=False))
            )
            other.start()
            other.join()
            if taken_elsewhere[-1]:
                server._lock.release()
            released.set()
        type(sock).release(sock)

    monkeypatch.setattr(sock, "release", release)
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sender:
        sender.connect(path)
        sender.send(arm(os.getpid(), scope="x"))
    assert released.wait(10)
    assert taken_elsewhere == [False]


def test_a_group_the_user_may_not_give_is_a_fifo_error_and_no_socket_is_left(
    nobody_dir: pathlib.Path,
) -> None:
    # Before: "cannot bind the socket: Operation not permitted" (it was bound), and the
    # socket left at the path.
    path = nobody_dir / "timer.socket"
    script = """
import os, sys
from ftimer_server import FifoError
from ftimer_server.server._socket import open_socket
try:
    open_socket(sys.argv[1], group=0).close()
    print("bound")
except FifoError as e:
    print(e)
print(os.listdir(os.path.dirname(sys.argv[1])))
"""
    result = run_as_nobody(script, str(path))
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        f"{path}: cannot give the socket group 0: Operation not permitted",
        "[]",
    ]


def test_a_datagram_with_several_descriptors_is_refused_for_them_not_as_gone(
    tmp_path: pathlib.Path,
) -> None:
    # Three or more descriptors leave no room for the kernel's pidfd of the sender, which
    # comes after them: a live sender was refused as one that had exited.
    sock = open_socket(str(tmp_path / "s.socket"))
    pidfd = os.pidfd_open(os.getpid())
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sender:
            sender.connect(sock.path)
            for count in (2, 3, 8, 20):
                socket.send_fds(sender, [arm(os.getpid(), scope=str(count))], [pidfd] * count)
        results = sock.receive()
    finally:
        os.close(pidfd)
        sock.close()
    assert [(r.reason, r.detail) for r in results] == [  # type: ignore[union-attr]
        (RejectReason.FOREIGN_SUBJECT, "more than one descriptor")
    ] * 4


@not_pid_1
def test_descriptors_lost_in_the_control_data_never_leave_the_sender_the_subject(
    tmp_path: pathlib.Path,
) -> None:
    # Out of descriptors, the kernel gives none of those a datagram carried and says
    # MSG_CTRUNC: its message went to the sender, as if it had carried none (a shell's
    # `ftimer disarm` then disarmed the ftimer process, and the shell was reaped).
    sock = open_socket(str(tmp_path / "s.socket"))
    sock.passes_pidfds = False  # a kernel before 6.5: credentials alone
    try:
        line = encode(Disarm(pid=os.getppid(), scope_id="s"))
        datagram = (line, socket.MSG_CTRUNC, (os.getpid(), os.getuid(), 0), -1, [], None)
        result = sock._judge(datagram, False)
    finally:
        sock.close()
    assert isinstance(result, Refused)
    assert result.reason is RejectReason.UNVERIFIABLE


# Binds a socket, has a child send it argv[3], an arm, one with the child's start time
# or a disarm (naming the child's parent, this process, by a pidfd if argv[2] is
# "carry"), and receives it with no descriptor free. Prints how it was judged.
NO_DESCRIPTORS = """
import os, resource, socket, subprocess, sys
from ftimer_protocol import Arm, Disarm, encode
from ftimer_server.server._socket import open_socket

sock = open_socket(sys.argv[1])
code = "import os, socket, sys; s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM); "
code += "s.connect(sys.argv[1]); carried = [os.pidfd_open(os.getppid())] if sys.argv[3] else []; "
code += "start = open('/proc/self/stat').read().rsplit(')', 1)[1].split()[19]; "
code += "line = sys.argv[2].replace('START', start).encode(); "
code += "socket.send_fds(s, [line], carried); print('sent', flush=True); "
code += "sys.stdin.read()"
if sys.argv[3] == "arm":
    line = encode(Arm(pid=os.getpid(), scope_id="s", deadline=1e9, signal=9)).decode()
elif sys.argv[3] == "arm with its start time":  # the sender's, put in by the sender
    arm = Arm(pid=os.getpid(), scope_id="s", deadline=1e9, signal=9, start_time=123456789)
    line = encode(arm).decode().replace("123456789", "START")
else:
    line = encode(Disarm(pid=os.getpid(), scope_id="s")).decode()
sender = subprocess.Popen(
    [sys.executable, "-c", code, sys.argv[1], line, "x" if sys.argv[2] == "carry" else ""],
    stdin=subprocess.PIPE,
    stdout=subprocess.PIPE,
)
assert sender.stdout.readline() == b"sent\\n"
used = max(int(fd) for fd in os.listdir("/proc/self/fd")) + 1
resource.setrlimit(resource.RLIMIT_NOFILE, (used, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
filler = []
try:
    while True:
        filler.append(os.open("/dev/null", os.O_RDONLY))
except OSError:
    pass
[result] = sock.receive()
for fd in filler:
    os.close(fd)
sender.communicate()
if hasattr(result, "reason"):
    print(result.reason.value, result.detail, sep=": ")
else:
    print(type(result).__name__, "of the sender" if result.pid == sender.pid else result.pid)
"""


@pytest.mark.parametrize(
    ("carried", "message", "judged"),
    [
        # The pidfd it carried was lost: its subject cannot be known, and is never taken
        # to be the sender.
        ("carry", "arm", "unverifiable: the descriptors it carried could not be received"),
        # Only the kernel's pidfd of the sender could not be made, which says nothing of
        # whether it lives (since 6.17 the kernel makes one for a sender reaped too): an
        # arm is refused, a disarm, which signals nobody, is the sender's. Both were
        # refused as a sender that had exited (a disarm so refused leaves a healthy
        # worker to be reaped).
        ("none", "arm", "unverifiable: no pidfd of the sender: Too many open files"),
        ("none", "disarm", "Disarm of the sender"),
        # An arm naming the sender's start time is taken as on a kernel without pidfds:
        # the start time is checked at binding (a process that took the pid of a sender
        # that exited has another). Refused, a healthy worker's heartbeats left its last
        # deadline standing, and it was reaped.
        ("none", "arm with its start time", "Timer of the sender"),
    ],
)
def test_a_server_out_of_descriptors(
    tmp_path: pathlib.Path, carried: str, message: str, judged: str
) -> None:
    done = subprocess.run(
        [sys.executable, "-c", NO_DESCRIPTORS, str(tmp_path / "s.socket"), carried, message],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(judged), done.stdout


def test_a_lingering_socket_a_sender_passes_is_reset_not_waited_for(
    tmp_path: pathlib.Path,
) -> None:
    # A TCP socket with SO_LINGER and unsent data held a closing thread for its linger
    # time: eight such held every thread, and the descriptors passed after them piled up
    # until the server ran out (its healthy workers' arms then refused, and they reaped).
    sock = open_socket(str(tmp_path / "s.socket"))
    with socket.create_server(("127.0.0.1", 0)) as listener:
        host, port = listener.getsockname()
        lingerer = [LINGERER, sock.path, host, str(port), "0"]
        subprocess.run([sys.executable, "-c", *lingerer], check=True)
        peer, _ = listener.accept()  # never reads: the close would linger 60 s
        try:
            assert [type(x).__name__ for x in sock.receive()] == ["MalformedMessage"]
            wait_until(lambda: _reset(peer), what="the passed socket's connection reset")
        finally:
            peer.close()
            sock.close()


def _reset(peer: socket.socket) -> bool:
    try:
        while peer.recv(1 << 20, socket.MSG_DONTWAIT):
            pass
    except ConnectionResetError:
        return True
    except BlockingIOError:
        pass
    return False


def test_pidfds_senders_pass_are_closed_at_once(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A pidfd's close never blocks: it is not handed to a closer thread, so legitimate
    # traffic never waits behind a sender's descriptor whose close blocks.
    handed: List[int] = []
    monkeypatch.setattr(closer_module.CLOSER, "close", handed.append)
    sock = open_socket(str(tmp_path / "s.socket"))
    pidfd = os.pidfd_open(os.getpid())
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sender:
            sender.connect(sock.path)
            for scope in ("a", "b", "c"):  # the first vouches; the others are closed
                socket.send_fds(sender, [arm(os.getpid(), scope=scope)], [pidfd])
            socket.send_fds(sender, [b"junk\n"], [pidfd])
        received = _received_descriptors(monkeypatch)
        results = sock.receive()
        sock.release()
    finally:
        os.close(pidfd)
    assert len(results) == 4
    assert handed == []
    assert len(received) == 4
    assert not [fd for fd in received if is_open(fd)]
    sock.close()


def _received_descriptors(monkeypatch: pytest.MonkeyPatch) -> List[int]:
    """The descriptors senders pass, as the socket receives them (from now on)."""
    received: List[int] = []
    parse = socket_module._parse

    def recording(data, ancillary, flags, sender_fds, chosen):  # type: ignore[no-untyped-def]
        before = len(chosen)
        datagram = parse(data, ancillary, flags, sender_fds, chosen)
        received.extend(chosen[before:])
        return datagram

    monkeypatch.setattr(socket_module, "_parse", recording)
    return received


def test_descriptors_senders_pass_arrive_close_on_exec(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Until it is closed, a passed descriptor must not reach a program a thread of the
    # server's process (an agent embedding it) runs meanwhile.
    handed: List[int] = []
    monkeypatch.setattr(closer_module.CLOSER, "close", handed.extend)
    sock = open_socket(str(tmp_path / "s.socket"))
    read_end, write_end = os.pipe()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sender:
            sender.connect(sock.path)
            socket.send_fds(sender, [arm(os.getpid())], [read_end])
        [refused] = sock.receive()
        assert isinstance(refused, Refused)
        [passed] = handed
        try:
            assert fcntl.fcntl(passed, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
        finally:
            os.close(passed)
    finally:
        os.close(read_end)
        os.close(write_end)
        sock.close()


class BlockingClose:
    """A close for ``Closer`` that blocks on the descriptors in ``stuck`` until
    ``release()``, and records what it closed."""

    def __init__(self, *stuck: int) -> None:
        self.stuck = set(stuck)
        self.closed: List[int] = []
        self._free = threading.Event()

    def __call__(self, fd: int) -> None:
        if fd in self.stuck:
            self._free.wait(30)
        self.closed.append(fd)

    def release(self) -> None:
        self._free.set()


def test_a_close_that_blocks_holds_back_no_other_while_a_thread_can_be_had() -> None:
    # Its idle threads were counted by a semaphore that every finished close raised:
    # after a thread that could not be started, it counted one idle that was not, and a
    # descriptor waited behind a blocked close though more threads were allowed.
    close = BlockingClose(100, 101)
    closer = closer_module.Closer(close)
    start = threading.Thread.start
    failed: List[bool] = []

    def fails_once(thread: threading.Thread) -> None:
        if not failed:
            failed.append(True)
            raise RuntimeError("can't start new thread")
        start(thread)

    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(threading.Thread, "start", fails_once)
            closer.close([1])  # no thread: it waits, and nothing is raised
            closer.close([2])  # a thread, which closes both
        wait_until(lambda: sorted(close.closed) == [1, 2], what="1 and 2 closed")
        closer.close([100])  # blocks its thread
        closer.close([3])
        wait_until(lambda: 3 in close.closed, what="3 closed beside the blocked close")
        # Nor in one hand-off (a datagram's descriptors): one thread was started for all.
        closer.close([101, 4, 5])
        wait_until(lambda: {4, 5} <= set(close.closed), what="4 and 5 beside 101")
    finally:
        close.release()
    wait_until(lambda: {100, 101} <= set(close.closed), what="the blocked closes done")


def test_every_closer_thread_blocked_is_said_once_a_minute(
    caplog: pytest.LogCaptureFixture,
) -> None:
    stuck = range(100, 100 + closer_module.Closer.MAX_THREADS)
    close = BlockingClose(*stuck)
    closer = closer_module.Closer(close)
    closer.SLOW = 0.0  # type: ignore[misc]
    try:
        for fd in stuck:
            closer.close([fd])
        wait_until(lambda: len(closer._closing) == closer.MAX_THREADS, what="all busy")
        with caplog.at_level(logging.WARNING, logger="ftimer_server"):
            closer.close([1])
            closer.close([2])
        said = [r.getMessage() for r in caplog.records if "is busy" in r.getMessage()]
        assert len(said) == 1  # once a minute: not again for the second descriptor
        assert re.fullmatch(
            r"every thread that closes descriptors senders passed to the socket is busy, one "
            r"for \d+\.\d s \(a sender may be passing descriptors whose close blocks\); "
            r"descriptors waiting: 1",
            said[0],
        )
    finally:
        close.release()
    wait_until(lambda: sorted(close.closed) == [1, 2, *stuck], what="all closed")


def test_a_forked_child_s_closer_closes_what_the_parent_had_yet_to() -> None:
    close = BlockingClose(100)
    closer = closer_module.Closer(close)
    try:
        closer.close([100])  # being closed when the process forked
        wait_until(lambda: closer._closing, what="100 being closed")
        closer.MAX_THREADS = 1  # type: ignore[misc]
        closer.close([1])  # waiting then
        child = closer.for_child()
        wait_until(lambda: not child._pending and not child._closing, what="the child idle")
    finally:
        close.release()
    wait_until(lambda: not closer._pending and not closer._closing, what="the parent idle")
    # 100 by the parent alone: its number may be another file's by the fork (below).
    assert sorted(close.closed) == [1, 1, 100]


def test_a_forked_child_s_closer_leaves_alone_the_number_of_a_close_that_blocked() -> None:
    # The kernel frees a descriptor's number as its close begins: while the close of a
    # socket lingering on unsent data blocked in the parent, a file opened there took its
    # number, and a child forked then had its copy of that file closed by its closer.
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    sender = socket.create_connection(listener.getsockname())
    peer, _ = listener.accept()
    listener.close()
    sender.setblocking(False)
    with contextlib.suppress(BlockingIOError):
        while True:  # both buffers full: the peer reads nothing
            sender.send(b"x" * 65536)
    sender.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 60))
    fd = sender.detach()
    closer = closer_module.Closer(os.close)  # the linger left on: its close blocks
    try:
        closer.close([fd])
        wait_until(lambda: closer._closing and not is_open(fd), what="the close begun")
        taken = os.open(os.devnull, os.O_RDONLY)  # the freed number taken by another file
        if taken != fd:  # (the lowest free number: fd, unless another was freed meanwhile)
            os.dup2(taken, fd)
            os.close(taken)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # fork() with threads running
            pid = os.fork()
        if pid == 0:  # pragma: no cover (the child)
            try:
                child = closer.for_child()
                deadline = time.monotonic() + 10
                while (child._pending or child._closing) and time.monotonic() < deadline:
                    time.sleep(0.001)
                os._exit(0 if is_open(fd) else 1)
            finally:
                os._exit(2)
        assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0, "the child's copy closed"
        assert is_open(fd)
    finally:
        peer.close()  # resets the connection, unread data and all: the close returns
        wait_until(lambda: not closer._closing, what="the parent's close returned")
    os.close(fd)


def test_only_a_descriptor_vouches_for_a_pid(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A kernel error in place of the sender's pidfd (EMFILE) was kept as the pid's vouch,
    # barring the real pidfd of a later datagram of the batch from vouching.
    parse = socket_module._parse
    calls: List[int] = []

    def first_without_pidfd(data, ancillary, flags, sender_fds, chosen):  # type: ignore[no-untyped-def]
        datagram = parse(data, ancillary, flags, sender_fds, chosen)
        calls.append(1)
        if len(calls) == 1:  # as if the kernel could not make it: -EMFILE in its place
            return (datagram[0], datagram[1], datagram[2], -errno.EMFILE, *datagram[4:])
        return datagram

    monkeypatch.setattr(socket_module, "_parse", first_without_pidfd)
    sock = open_socket(str(tmp_path / "s.socket"))
    if not sock.passes_pidfds:
        sock.close()
        pytest.skip("the kernel gives no pidfd of a sender (SO_PASSPIDFD, Linux 6.5)")
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sender:
            sender.connect(sock.path)
            sender.send(encode(Disarm(pid=os.getpid(), scope_id="a")))  # taken on its pid
            sender.send(encode(Arm(pid=os.getpid(), scope_id="b", deadline=1e9, signal=9)))
        results = sock.receive()
        assert [type(r).__name__ for r in results] == ["Disarm", "Timer"]
        assert sock.vouched[os.getpid()] >= 0
    finally:
        sock.close()


@pytest.mark.parametrize(
    "kind", [socket.SOCK_DGRAM, socket.SOCK_STREAM], ids=["datagram", "stream"]
)
def test_a_socket_another_process_is_bound_to_is_never_replaced(
    tmp_path: pathlib.Path, kind: int
) -> None:
    # Another server's socket (or its control socket) given as --socket was removed and
    # bound anew: that server's workers reached the new one, and it reaped them.
    path = str(tmp_path / "taken.socket")
    with socket.socket(socket.AF_UNIX, kind) as other:
        other.bind(path)
        if kind == socket.SOCK_STREAM:
            other.listen()
        before = os.stat(path).st_ino
        with pytest.raises(FifoError, match="a process is bound to the socket there"):
            open_socket(path)
        assert os.stat(path).st_ino == before
    # Nobody holds it now (the server that bound it died): it is replaced.
    sock = open_socket(path)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sender:
            sender.sendto(b"x", path)
        assert select.select([sock.fd], [], [], 10)[0]
    finally:
        sock.close()


def test_an_inspector_that_fails_refuses_the_datagram_and_the_batch_goes_on(
    tmp_path: pathlib.Path,
) -> None:
    # Its error escaped receive() ("never raises"): the loop logged it, and every
    # datagram of the batch, disarms too, was lost.
    class Broken(SystemInspector):
        def parent(self, pid: int) -> int:
            raise NotImplementedError("no parents on this platform")

    child = subprocess.Popen(["sleep", "60"])
    sock = open_socket(str(tmp_path / "s.socket"), processes=Broken())
    pidfd = os.pidfd_open(child.pid)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sender:
            sender.connect(sock.path)
            socket.send_fds(sender, [arm(child.pid)], [pidfd])
            sender.send(arm(os.getpid(), scope="mine"))
        named, mine = sock.receive()
    finally:
        os.close(pidfd)
        sock.close()
        child.kill()
        child.wait()
    assert isinstance(named, Refused)
    assert named.reason is RejectReason.UNVERIFIABLE
    assert "no parents on this platform" in named.detail
    assert (mine.pid, mine.scope_id) == (os.getpid(), "mine")  # type: ignore[union-attr]


def test_a_socket_whose_listener_never_accepts_is_not_waited_for_nor_replaced(
    tmp_path: pathlib.Path,
) -> None:
    # The probe's connect() had no timeout: a server whose backlog was full held the
    # start for good; and any error but "refused" took the socket for a dead one's.
    path = str(tmp_path / "busy.socket")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as busy:
        busy.bind(path)
        busy.listen(0)
        queued = []
        with contextlib.suppress(BlockingIOError):
            for _ in range(8):  # fill the backlog
                client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                client.setblocking(False)
                queued.append(client)
                client.connect(path)
        outcome: List[object] = []
        thread = threading.Thread(target=lambda: outcome.append(_open_or_error(path)))
        thread.start()
        thread.join(30)
        for client in queued:
            client.close()
    assert not thread.is_alive()
    [error] = outcome
    assert isinstance(error, FifoError)
    assert "a process is bound to the socket there" in str(error)


def _open_or_error(path: str) -> object:
    try:
        return open_socket(path)
    except FifoError as e:
        return e


# Arms "step" over the socket argv[1] for argv[2] seconds, says when it is due; then, at
# each line on its stdin, says it is releasing, releases it, and says so.
SOCKET_WORKER = """
import sys, time
from ftimer_client import FileTimerClient
client = FileTimerClient(sys.argv[1], transport="socket", write_timeout=10.0)
after = float(sys.argv[2])
due = time.monotonic() + after
client.arm("step", after)
print(due, flush=True)
sys.stdin.readline()
print("releasing", flush=True)
client.release("step")
print("released", flush=True)
sys.stdin.read()
"""


def test_a_full_queue_holds_judgement_back_for_the_senders_waiting_for_room(
    fifo_path: pathlib.Path,
) -> None:
    # net.unix.max_dgram_qlen is 10 by default: a queue the loop finds full has senders
    # waiting for room, a disarm begun before its deadline among them. They get in only
    # as the loop reads, after it noted the time: the deadlines they answer are judged
    # once the read that made room, and their turn after it, are over.
    held, resume = threading.Event(), threading.Event()
    events = Events()

    def gate(event: Event) -> None:
        events(event)
        if isinstance(event, Armed) and not held.is_set():
            held.set()
            resume.wait(30)

    path = str(fifo_path.with_suffix(".socket"))
    workers: List[subprocess.Popen[str]] = []
    fillers: List[threading.Thread] = []
    try:
        with FileTimerServer(fifo_path, on_event=gate, socket_path=path) as server:
            for _ in range(2):
                workers.append(
                    subprocess.Popen(
                        [sys.executable, "-c", SOCKET_WORKER, path, "1.5"],
                        stdin=subprocess.PIPE,
                        stdout=subprocess.PIPE,
                        text=True,
                    )
                )
            healthy, hung = workers
            due = max(float(w.stdout.readline()) for w in workers)  # type: ignore[union-attr]
            assert held.wait(10)

            sent: List[int] = []

            def fill() -> None:
                # (refused once the server is gone: a failing test's)
                with (
                    socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s,
                    contextlib.suppress(ConnectionRefusedError),
                ):
                    s.connect(path)
                    for _ in range(3):
                        s.send(b"junk\n")  # blocks while the queue is full
                        sent.append(1)

            fillers += [threading.Thread(target=fill) for _ in range(40)]
            for f in fillers:
                f.start()
            wait_until(lambda: len(sent) >= socket_module._queue_length() - 1)  # the arm's
            assert len(sent) < 120  # full: the rest wait
            healthy.stdin.write("go\n")  # type: ignore[union-attr]
            healthy.stdin.flush()  # type: ignore[union-attr]
            assert healthy.stdout.readline() == "releasing\n"  # type: ignore[union-attr]
            assert time.monotonic() < due
            time.sleep(max(0.0, due - time.monotonic()) + 0.1)  # the deadline passes
            resumed = time.monotonic()
            resume.set()
            code, died = wait_exit(hung)
            assert healthy.stdout.readline() == "released\n"  # type: ignore[union-attr]
            server.sync()
            assert code == -9
            assert died - resumed < 5  # not held back for long either
            assert healthy.poll() is None
            assert [e.pid for e in events.of(Reaped)] == [hung.pid]  # type: ignore[attr-defined]
    finally:
        resume.set()
        for f in fillers:
            f.join(10)
        for w in workers:
            w.kill()
            w.wait()
            for stream in (w.stdin, w.stdout):
                if stream is not None:
                    stream.close()


def test_an_empty_datagram_at_the_head_hides_nothing_queued_behind_it(
    tmp_path: pathlib.Path,
) -> None:
    # FIONREAD gives the size of the head datagram only: an empty one made the loop
    # judge deadlines without reading the disarm queued behind it.
    sock = open_socket(str(tmp_path / "s.socket"))
    try:
        assert not sock.queued()
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sender:
            sender.connect(sock.path)
            sender.send(b"")
            sender.send(encode(Disarm(pid=os.getpid(), scope_id="s")))
        assert sock.queued()
        assert [type(x).__name__ for x in sock.receive()] == ["MalformedMessage", "Disarm"]
        assert not sock.queued()
    finally:
        sock.close()


def test_only_a_pidfd_s_fdinfo_is_read(monkeypatch: pytest.MonkeyPatch) -> None:
    # An epoll descriptor's fdinfo lists every file it watches (1.4 MB, 35 ms for 19,000):
    # a sender passing such descriptors, one a datagram, held the loop that long each.
    from ftimer_server.incidents import _procfs

    opened: List[str] = []
    real_open = open

    def recording_open(path, *args, **kwargs):  # type: ignore[no-untyped-def]
        opened.append(str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(_procfs, "open", recording_open, raising=False)
    pidfd = os.pidfd_open(os.getpid())
    with select.epoll() as epoll:
        epoll.register(pidfd, select.EPOLLIN)
        try:
            assert _procfs.pidfd_pid(epoll.fileno()) is None
            assert opened == []
            assert _procfs.pidfd_pid(pidfd) == os.getpid()
            assert opened == [f"/proc/self/fdinfo/{pidfd}"]
        finally:
            os.close(pidfd)


def _refuses_rights(path: str) -> bool:
    """Whether the socket at ``path`` refuses a descriptor (EPERM); a datagram without
    one must still go through."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sender:
        sender.connect(path)
        sender.send(b"plain\n")
        try:
            socket.send_fds(sender, [b"carrying\n"], [0])
        except PermissionError:
            return True
        return False


def test_descriptors_piling_up_are_refused_at_the_senders(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Descriptors whose close never returns (a FUSE file) held every closing thread, and
    # those passed after them piled up unbounded: the server ran out of descriptors, and
    # healthy workers' arms were refused.
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as probe:
        try:
            probe.setsockopt(socket.SOL_SOCKET, closer_module._SO_PASSRIGHTS, 1)
        except OSError:
            pytest.skip("SO_PASSRIGHTS needs Linux 6.16")
    stuck = range(100, 100 + closer_module.Closer.MAX_THREADS)
    close = BlockingClose(*stuck)
    closer = closer_module.Closer(close)
    monkeypatch.setattr(closer_module, "CLOSER", closer)
    sock = open_socket(str(tmp_path / "s.socket"))
    try:
        for fd in stuck:
            closer.close([fd])
        wait_until(lambda: len(closer._closing) == closer.MAX_THREADS, what="all busy")
        for fd in range(1000, 1000 + closer.BACKLOG):  # not closed: the close is a stub
            closer.close([fd])
        assert not _refuses_rights(sock.path)
        with caplog.at_level(logging.ERROR, logger="ftimer_server"):
            closer.close([1000 + closer.BACKLOG])
        assert _refuses_rights(sock.path)
        assert "the socket refuses descriptors until they are" in caplog.text
    finally:
        close.release()
    wait_until(lambda: not closer.refusing, what="the backlog closed")
    assert not _refuses_rights(sock.path)
    [junk] = sock.receive()
    assert junk.lines == 5  # of 6 datagrams: the one carrying a descriptor was refused
    sock.close()
    fake = {*stuck, *range(1000, 1001 + closer.BACKLOG)}
    wait_until(lambda: len(close.closed) == len(fake) + 2, what="what the senders passed")
    for fd in set(close.closed) - fake:  # the stub closed nothing
        os.close(fd)


def test_descriptors_piling_up_for_want_of_threads_are_refused_too(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Refusal came only once every closing thread was busy: with none to be had (a
    # thread limit), descriptors piled up without end and the socket never refused.
    def no_thread(thread: threading.Thread) -> None:
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(threading.Thread, "start", no_thread)
    closer = closer_module.Closer(lambda fd: None)
    for fd in range(1000, 1001 + closer.BACKLOG):  # made up: the close is a stub
        closer.close([fd])
    assert closer.refusing


def test_a_socket_dropped_without_close_is_not_kept_by_the_closer(
    tmp_path: pathlib.Path,
) -> None:
    sock = open_socket(str(tmp_path / "s.socket"))
    watched = weakref.ref(sock._sock)
    sock.release()
    with pytest.warns(ResourceWarning, match="unclosed"):  # noqa: PT031 - as any socket left so
        del sock
        gc.collect()
    assert watched() is None


# In a network namespace of its own (net.unix.max_dgram_qlen is the namespace's): one
# sender sends datagrams of argv[2] bytes until it would wait; then one receive().
SEND_BUFFER_FULL = """
import socket, sys
with open("/proc/sys/net/unix/max_dgram_qlen", "w") as f:
    f.write("512")  # as server.md advises for many workers
from ftimer_server.server._socket import open_socket
receiver = open_socket(sys.argv[1])
sender = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
sender.connect(sys.argv[1])
sender.setblocking(False)
sent = 0
try:
    while True:
        sender.send(b"x" * int(sys.argv[2]) + b"\\n")
        sent += 1
except BlockingIOError:
    pass
receiver.receive()
print(sent, receiver.full)
"""


@pytest.mark.parametrize("size", [100, 3000])
def test_a_sender_waiting_for_its_send_buffer_counts_as_a_full_queue(
    tmp_path: pathlib.Path, size: int
) -> None:
    # Only a queue-full counted: with the queue raised to 512, a sender of 3 KB
    # datagrams waits for room after 49 of them, and a disarm it was sending when the
    # server resumed from a stop was judged late, and its worker reaped.
    unshare = shutil.which("unshare")
    if unshare is None:
        pytest.skip("needs unshare(1) from util-linux")
    done = subprocess.run(
        [unshare, "--net", sys.executable, "-c", SEND_BUFFER_FULL, str(tmp_path / "s"), str(size)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if done.returncode != 0 and "Traceback" not in done.stderr:
        pytest.skip(f"no network namespace of its own here: {done.stderr.strip()}")
    assert done.returncode == 0, done.stderr
    sent, full = done.stdout.split()
    assert int(sent) < 512  # the send buffer, not the queue, made it wait
    assert full == "True"


# Arms a timer of its parent (the test) over the socket argv[1], then waits for the
# server's receipt, as the `ftimer` command does before it exits; prints what it got.
RECEIPT_SENDER = """
import os, sys
from ftimer_client._socket import SocketWriter
from ftimer_protocol import Arm, encode
parent = os.getppid()
writer = SocketWriter(sys.argv[1], os.pidfd_open(parent))
writer.write(encode(Arm(pid=parent, scope_id="shell", deadline=1e9, signal=9)), 5.0)
print("sent", flush=True)
print(writer.wait_read(10.0), flush=True)
"""


def test_a_sender_waits_for_its_datagrams_to_be_judged_not_only_read(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A datagram naming another process is refused if its sender has exited by the time
    # it is judged. The `ftimer` command waited only until its datagram was read and then
    # exited; a reader held between the read and the judgement (another thread holding
    # the GIL) then refused the shell's disarm, and the shell was reaped.
    sock = open_socket(str(tmp_path / "s.socket"))
    try:
        if not sock.passes_pidfds:
            pytest.skip("the kernel gives no pidfd of a sender (SO_PASSPIDFD, Linux 6.5)")
        with subprocess.Popen(
            [sys.executable, "-c", RECEIPT_SENDER, sock.path], stdout=subprocess.PIPE, text=True
        ) as sender:
            assert sender.stdout is not None
            assert sender.stdout.readline() == "sent\n"
            exited = socket_module._exited

            def held(fds: List[int]) -> object:
                # The reader is held after its read: a sender that took the read for a
                # receipt exits meanwhile.
                with contextlib.suppress(subprocess.TimeoutExpired):
                    sender.wait(timeout=1.0)
                return exited(fds)

            monkeypatch.setattr(socket_module, "_exited", held)
            [armed, *results] = sock.receive()
            assert isinstance(armed, Arm), armed
            assert (armed.pid, armed.scope_id) == (os.getpid(), "shell")
            monkeypatch.setattr(socket_module, "_exited", exited)
            sock.release()
            while sender.poll() is None:  # the receipt, if it was not in the same batch
                select.select([sock.fd], [], [], 0.1)
                results += sock.receive()
            assert sender.stdout.read() == "True\n"
        # The receipt (a sync carrying a pipe) is taken as such, never refused.
        assert [type(r).__name__ for r in results] == ["Sync"]
    finally:
        sock.close()


def test_a_socket_s_own_refusals_are_not_wrapped_again(tmp_path: pathlib.Path) -> None:
    # FifoError became an OSError: the socket's handlers of OSErrors wrapped the one its
    # group lookup raises, and said "cannot make the socket mode 0600: no such group".
    path = str(tmp_path / "s.socket")
    with pytest.raises(FifoError) as refused:
        open_socket(path, group="ftimer-no-such-group")
    assert str(refused.value) == "ftimer-no-such-group: no such group"
    assert not os.path.exists(path)  # what it bound is not left behind
    elsewhere = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    elsewhere.bind(str(tmp_path / "other.socket"))
    try:
        with pytest.raises(FifoError) as refused:
            open_socket(path, adopt=(elsewhere.fileno(), 10))
        assert str(refused.value) == f"{path}: the socket given is not bound there"
        elsewhere.getsockname()  # the caller's descriptor, still open
    finally:
        elsewhere.close()


def test_a_socket_error_keeps_its_errno(tmp_path: pathlib.Path) -> None:
    with pytest.raises(OSError, match="cannot") as missing:  # as torch's server's
        open_socket(str(tmp_path / "missing" / "s.socket"))
    assert isinstance(missing.value, FifoError)
    assert missing.value.errno == errno.ENOENT


def test_each_bad_line_or_datagram_of_a_run_is_counted_received(served, fifo_path) -> None:  # type: ignore[no-untyped-def]
    # A run of them is one error value: ftimer_received_total counted it once, where
    # ftimer_decode_errors_total counted every line (1 against 1000 for `yes`).
    server, _, path = served
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.connect(path)
        for _ in range(5):
            sock.send(b"y\n")
    fd = os.open(fifo_path, os.O_WRONLY | os.O_NONBLOCK)
    try:
        os.write(fd, b"y\n" * 1000)
    finally:
        os.close(fd)
    server.sync()
    stats = server.stats()
    assert stats.decode_errors == {"MalformedMessage": 1005}
    assert stats.received["socket"] == 5
    assert stats.received["fifo"] == 1000 + 1  # and the marker sync() wrote


class HeldClose:
    """A close for ``Closer`` that holds every descriptor until ``release()``, then
    closes it."""

    def __init__(self) -> None:
        self.free = threading.Event()

    def __call__(self, fd: int) -> None:
        self.free.wait(30)
        os.close(fd)


def test_a_receipt_is_given_while_every_closer_thread_is_held(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A receipt's pipe went to the closer threads: 8 descriptors whose close blocks (a
    # file of a FUSE mount that never answers), sent by anyone, held them all, and every
    # `ftimer arm` then failed for want of its receipt.
    close = HeldClose()
    monkeypatch.setattr(closer_module, "CLOSER", closer_module.Closer(close))
    sock = open_socket(str(tmp_path / "s.socket"))
    read_end, write_end = os.pipe()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sender:
            sender.connect(sock.path)
            sync = encode(Sync(token="t"))
            for _ in range(closer_module.Closer.MAX_THREADS):
                with open("/dev/null", "rb") as held:  # a file: only a thread closes it
                    socket.send_fds(sender, [sync], [held.fileno()])
            socket.send_fds(sender, [sync], [write_end])
        os.close(write_end)
        results = sock.receive()
        assert [type(r).__name__ for r in results] == ["Refused"] * 8 + ["Sync"]
        assert select.select([read_end], [], [], 0)[0] == []  # given once the batch is applied
        sock.release()
        assert select.select([read_end], [], [], 0)[0] == [read_end]  # given
        assert os.read(read_end, 2) == b"\n"  # written, then closed
        assert os.read(read_end, 1) == b""
    finally:
        close.free.set()
        os.close(read_end)
        sock.close()


class GatedInspector(SystemInspector):
    """A ``SystemInspector`` whose ``open()`` of a gated pid says it was reached, then
    waits for its gate: the server held as it starts to bind that pid's timer."""

    def __init__(self) -> None:
        super().__init__()
        self.reached: Dict[int, threading.Event] = {}
        self.gates: Dict[int, threading.Event] = {}

    def gate(self, pid: int) -> None:
        self.reached[pid], self.gates[pid] = threading.Event(), threading.Event()

    def open(self, pid: int) -> Optional[int]:
        if pid in self.gates:
            self.reached[pid].set()
            self.gates[pid].wait(30)
        return super().open(pid)


def test_a_receipt_is_given_once_the_arms_before_it_are_bound(fifo_path, children) -> None:  # type: ignore[no-untyped-def]
    # It was given once they were judged, before they were bound: ftimer exec opened its
    # gate on it, a quick command exited in between, and its arm was refused
    # (no_such_process): the command ran unwatched.
    inspector = GatedInspector()
    path = str(fifo_path.with_suffix(".socket"))
    first, second = children(), children()
    inspector.gate(first.pid)
    inspector.gate(second.pid)
    signaller = OwnChildrenSignaller()
    server = FileTimerServer(fifo_path, socket_path=path, inspector=inspector, signaller=signaller)
    read_end, write_end = os.pipe()
    try:
        with server, socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sender:
            sender.connect(path)
            socket.send_fds(sender, [arm(first.pid)], [os.pidfd_open(first.pid)])
            assert inspector.reached[first.pid].wait(30)  # the server held: the rest queue
            socket.send_fds(sender, [arm(second.pid)], [os.pidfd_open(second.pid)])
            socket.send_fds(sender, [encode(Sync(token="ftimer-receipt"))], [write_end])
            os.close(write_end)
            write_end = -1
            inspector.gates[first.pid].set()
            # Read in one batch with its receipt, the second arm is being bound.
            assert inspector.reached[second.pid].wait(30)
            assert select.select([read_end], [], [], 0)[0] == []
            inspector.gates[second.pid].set()
            assert select.select([read_end], [], [], 30)[0] == [read_end]
            assert sorted(t.pid for t in server.armed()) == sorted([first.pid, second.pid])
    finally:
        for gate in inspector.gates.values():
            gate.set()
        os.close(read_end)
        if write_end >= 0:
            os.close(write_end)
    assert signaller.refused == []


def test_a_sender_reaped_between_the_read_and_the_bind_is_moot_not_refused(  # type: ignore[no-untyped-def]
    fifo_path, senders, children
) -> None:
    # Alive when its datagram was judged, reaped before its timer was bound: its pid
    # names no process now, and the kernel had vouched it was the sender's. It was
    # refused no_such_process, a warning for a worker that had simply ended.
    inspector = GatedInspector()
    path = str(fifo_path.with_suffix(".socket"))
    first = children()
    inspector.gate(first.pid)
    events = Events()
    with (
        FileTimerServer(
            fifo_path, socket_path=path, inspector=inspector, on_event=events
        ) as server,
        socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock,
    ):
        try:
            if not server.socket.passes_pidfds:  # type: ignore[union-attr]
                pytest.skip("the kernel gives no pidfd of a sender (SO_PASSPIDFD, Linux 6.5)")
            sock.connect(path)
            socket.send_fds(sock, [arm(first.pid)], [os.pidfd_open(first.pid)])
            assert inspector.reached[first.pid].wait(30)  # the server held
            sender = senders(path, arm(1, scope="ended"))  # queued meanwhile
            inspector.gate(sender.pid)
            inspector.gates[first.pid].set()
            assert inspector.reached[sender.pid].wait(30)  # judged alive, being bound
            sender.kill()
            sender.wait()
        finally:
            for gate in inspector.gates.values():
                gate.set()
        server.sync()
        stats = server.stats()
    assert events.of(Rejected) == []
    assert stats.requests == {"arm": {"ok": 1, "exited": 1}, "sync": {"ok": 1}}


# -- a socket given to be taken over, when nothing was restored ------------------------


def _kept(path: pathlib.Path) -> int:
    """A datagram socket bound at ``path`` (as the last server's, kept by systemd): its
    descriptor, the caller's to give."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    return sock.detach()


def test_a_start_tried_again_keeps_its_lock(tmp_path: pathlib.Path) -> None:
    # The kept socket was closed at the first start, which then failed; the second
    # closed its number again, by then the FIFO's lock file's: a second server started
    # on the same FIFO, and the first's stop failed closing the lock (EBADF).
    path = tmp_path / "s.socket"
    fd = _kept(path)
    path.unlink()
    path.mkdir()  # something other than a socket there: the start fails
    server = FileTimerServer(tmp_path / "t.fifo", socket_path=path, adopt_socket=(fd, 10))
    with pytest.raises(FifoError, match="something other than a socket"):
        server.start()
    path.rmdir()
    with server, pytest.raises(FifoBusy):
        FileTimerServer(tmp_path / "t.fifo").start()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: a socket of another user")
def test_a_socket_of_another_user_at_the_path_is_not_removed(tmp_path: pathlib.Path) -> None:
    # The kept socket's path named another socket by then (its own removed, another
    # bound there): it was unlinked all the same, where a start refuses to.
    path = tmp_path / "s.socket"
    fd = _kept(path)
    path.unlink()
    theirs = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    theirs.bind(str(path))
    os.chown(path, 4263, 4263)
    try:
        server = FileTimerServer(tmp_path / "t.fifo", socket_path=path, adopt_socket=(fd, 10))
        with pytest.raises(FifoError, match="a socket of uid 4263 is there"):
            server.start()
        assert path.exists()
    finally:
        theirs.close()
