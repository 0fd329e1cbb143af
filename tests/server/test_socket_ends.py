"""Behaviour of server/_sockdiag.py and of the ends of server/_socket.py (making the
socket, telling what is at its path) pinned by mutation testing: each test fails with
the mutant that found it, and passes on the code as it is. Real sockets, processes and
network namespaces; nothing is signalled."""

from __future__ import annotations

import errno
import os
import pathlib
import shutil
import socket
import stat
import subprocess
import sys
from typing import List, Optional, Tuple, Union

import pytest
from tests.server.conftest import needs_unix_diag

from ftimer_server import FifoError, RejectReason, SystemInspector
from ftimer_server.core._events import Refused
from ftimer_server.server import _socket as socket_module
from ftimer_server.server._sockdiag import peer_of, reached_at
from ftimer_server.server._socket import forgo_socket, open_socket

_SO_PASSPIDFD = getattr(socket, "SO_PASSPIDFD", 76)


@needs_unix_diag
def test_the_kernel_s_errno_is_raised_for_a_descriptor_that_is_no_socket() -> None:
    # A pipe's inode is no socket's (both are numbered from one counter): the kernel
    # answers with an error message (ENOENT), raised as its errno, never taken for a
    # reply of another kind (EPROTO) nor given a sign it does not have.
    read, write = os.pipe()
    try:
        with pytest.raises(FileNotFoundError) as raised:
            peer_of(read)
    finally:
        os.close(read)
        os.close(write)
    assert raised.value.errno == errno.ENOENT
    assert raised.value.strerror == os.strerror(errno.ENOENT)


# Binds a socket at argv[1] and asks, twice, whether it is reached there, with the
# kernel refusing to be asked (as under RestrictAddressFamilies= without AF_NETLINK),
# in a process that has asked nothing before: prints the log, then the answers.
UNASKED = """
import errno, logging, os, socket, sys
from ftimer_server.server import _sockdiag
logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stdout)
def refused(fd):
    raise OSError(errno.EAFNOSUPPORT, os.strerror(errno.EAFNOSUPPORT))
_sockdiag.peer_of = refused
with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
    sock.bind(sys.argv[1])
    print(_sockdiag.reached_at(sock, sys.argv[1]), _sockdiag.reached_at(sock, sys.argv[1]))
"""


def test_a_server_that_cannot_ask_the_kernel_says_so_the_first_time(
    tmp_path: pathlib.Path,
) -> None:
    # Said once per process, from its start: not already taken as said.
    path = str(tmp_path / "s.socket")
    done = subprocess.run(
        [sys.executable, "-c", UNASKED, path], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    *said, answers = done.stdout.splitlines()
    assert answers == "True True"
    assert len(said) == 1, said
    assert said[0].startswith(f"cannot ask the kernel which socket {path} leads to")


def test_a_symlink_to_the_socket_at_its_path_is_not_taken_for_it(tmp_path: pathlib.Path) -> None:
    # The socket's file moved and a symlink to it put in its place: a sender still reaches
    # it through the path, but what is at the path is no socket, so it is neither taken
    # over (its path then chmod-ed through the link) nor removed as left over.
    path = tmp_path / "s.socket"
    moved = tmp_path / "moved.socket"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        sock.bind(str(path))
        os.rename(path, moved)
        os.symlink(moved, path)
        assert not reached_at(sock, str(path))
        with pytest.raises(FifoError, match="the socket given is not bound there"):
            open_socket(str(path), adopt=(sock.fileno(), 10))
        assert sock.fileno() >= 0
        fd = sock.detach()
    finally:
        sock.close()
    forgo_socket(str(path), fd)
    assert os.path.islink(path)


def _network_namespaces() -> bool:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return False
    return subprocess.run(["unshare", "--net", "true"], capture_output=True).returncode == 0


# In a network namespace of its own (net.unix.max_dgram_qlen is one's own), sets the
# queue length to argv[2], opens the socket at argv[1], fills its queue from one sender,
# and prints the queue length, the datagrams sent, and what one receive() read and left.
QUEUE = """
import os, socket, sys
with open("/proc/sys/net/unix/max_dgram_qlen", "w") as f:
    f.write(sys.argv[2])
from ftimer_protocol import Arm, encode
from ftimer_server.server._socket import open_socket
sock = open_socket(sys.argv[1])
sent = 0
with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sender:
    sender.connect(sys.argv[1])
    sender.setblocking(False)
    try:
        while True:
            sender.send(encode(Arm(pid=os.getpid(), scope_id=f"s{sent}", deadline=1e9, signal=9)))
            sent += 1
    except BlockingIOError:
        pass
results = sock.receive()
print(sock.queue_length, sent, len(results), sock.queued(), sock.full)
sock.release()
sock.close()
"""


@pytest.mark.skipif(not _network_namespaces(), reason="needs root, unshare(1), net namespaces")
@pytest.mark.parametrize(
    ("qlen", "said"),
    [
        # Raised past READ_BATCH: the queue holds qlen + 1, and one receive() reads
        # them all (what was sent before it), a queue-full.
        ("100", "100 101 101 False True"),
        # None: the queue holds one datagram all the same, and one is a queue-full.
        ("0", "1 1 1 False True"),
    ],
)
def test_one_receive_reads_a_whole_queue_of_any_length_and_says_it_was_full(
    qlen: str, said: str, tmp_path: pathlib.Path
) -> None:
    path = str(tmp_path / "s.socket")
    done = subprocess.run(
        ["unshare", "--net", sys.executable, "-c", QUEUE, path, qlen],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == said.split()


# Sends an arm with a pidfd of its parent (the test) to the socket argv[1], says "sent",
# and exits once its stdin closes.
NAMES_ITS_PARENT = """
import os, socket, sys
from ftimer_protocol import Arm, encode
sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
sock.connect(sys.argv[1])
line = encode(Arm(pid=1, scope_id="a", deadline=1e6, signal=9))
socket.send_fds(sock, [line], [os.pidfd_open(os.getppid())])
print("sent", flush=True)
sys.stdin.read()
"""


def before_6_5(monkeypatch: pytest.MonkeyPatch) -> None:
    """As a kernel before Linux 6.5: SO_PASSPIDFD refused, no pidfd of a sender."""
    real = socket.socket.setsockopt

    def refused(self, level, option, *args):  # type: ignore[no-untyped-def]
        if level == socket.SOL_SOCKET and option == _SO_PASSPIDFD:
            raise OSError(errno.ENOPROTOOPT, os.strerror(errno.ENOPROTOOPT))
        return real(self, level, option, *args)

    monkeypatch.setattr(socket.socket, "setsockopt", refused)


class ExitsAsItsClocksAreRead(SystemInspector):
    """The host, but the sender exits just as its clocks are read (after its datagram
    was read and its pidfd polled alive): ``then`` is what becomes of it first, "exited"
    (a zombie, whose clocks read as the server's), "reaped" (no /proc), or an exception
    that reading them raises."""

    def __init__(self, then: Union[str, Exception]) -> None:
        super().__init__()
        self.then = then
        self.sender: Optional[subprocess.Popen[str]] = None
        self.read: List[int] = []

    def clock_offsets(self, pid: int) -> Optional[Tuple[int, int]]:
        self.read.append(pid)  # the test checks it was the sender's
        if isinstance(self.then, Exception):
            raise self.then
        assert self.sender is not None
        assert self.sender.stdin is not None
        self.sender.stdin.close()
        if self.then == "reaped":
            self.sender.wait(timeout=30)
        else:
            os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)
        return super().clock_offsets(pid)


def _named_by_a_sender_that(then: Union[str, Exception], tmp_path: pathlib.Path) -> Refused:
    inspector = ExitsAsItsClocksAreRead(then)
    sock = open_socket(str(tmp_path / "s.socket"), processes=inspector)
    sender = inspector.sender = subprocess.Popen(
        [sys.executable, "-c", NAMES_ITS_PARENT, sock.path],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert sender.stdout is not None
        assert sender.stdout.readline() == "sent\n"
        [result] = sock.receive()
        assert inspector.read == [sender.pid]  # judged with the sender's clocks
    finally:
        sock.close()
        for pipe in (sender.stdin, sender.stdout):
            if pipe is not None:
                pipe.close()
        sender.wait(timeout=30)
    assert isinstance(result, Refused), result
    assert result.pid == sender.pid
    assert not sock.vouched
    return result


@pytest.mark.parametrize("then", ["exited", "reaped"])
def test_a_sender_that_exits_as_its_clocks_are_read_is_refused_as_gone(
    then: str, tmp_path: pathlib.Path
) -> None:
    # An arm for its parent, on the sender's clocks: read of a zombie they are the
    # server's (0, 0), which says nothing of the ones it read its deadline on; of a
    # process reaped, /proc has nothing. Either way it is refused as gone, never taken
    # on clocks it did not have, nor refused for another reason.
    refused = _named_by_a_sender_that(then, tmp_path)
    assert refused.reason is RejectReason.SENDER_GONE, refused
    assert refused.detail == "it exited before its message was read"


def test_a_sender_reaped_as_its_clocks_are_read_is_refused_without_a_pidfd_of_it(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Before Linux 6.5 no pidfd of it says it exited: /proc having nothing says so, and
    # nothing is raised for the clocks never read.
    before_6_5(monkeypatch)
    refused = _named_by_a_sender_that("reaped", tmp_path)
    assert refused.reason is RejectReason.SENDER_GONE, refused
    assert refused.detail == "it exited before its message was read"


def test_a_sender_whose_clocks_cannot_be_read_is_refused_never_raised(
    tmp_path: pathlib.Path,
) -> None:
    refused = _named_by_a_sender_that(PermissionError(errno.EACCES, "hidden"), tmp_path)
    assert refused.reason is RejectReason.UNVERIFIABLE, refused
    assert refused.detail.startswith("cannot read the sender's clocks: PermissionError")


def test_a_sender_naming_its_parent_is_served_on_a_kernel_without_sender_pidfds(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Before Linux 6.5 no datagram comes with a pidfd of its sender (-1): its clocks are
    # read from /proc alone, never its pidfd polled.
    before_6_5(monkeypatch)
    sock = open_socket(str(tmp_path / "s.socket"))
    sender = subprocess.Popen(
        [sys.executable, "-c", NAMES_ITS_PARENT, sock.path],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert not sock.passes_pidfds
        assert sender.stdout is not None
        assert sender.stdout.readline() == "sent\n"
        results = sock.receive()
    finally:
        sock.close()
        sender.communicate("", timeout=30)
    assert [(type(r).__name__, r.pid) for r in results] == [("Timer", os.getpid())], results  # type: ignore[union-attr]


def test_a_seqpacket_socket_served_at_the_path_is_never_removed(tmp_path: pathlib.Path) -> None:
    # Neither a datagram nor a stream probe can connect to it (EPROTOTYPE each): what
    # cannot be asked counts as held, never as left over and removed.
    path = tmp_path / "s.socket"
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as served:
        served.bind(str(path))
        served.listen()
        with pytest.raises(FifoError, match="a process is bound to the socket there"):
            open_socket(str(path))
        assert stat.S_ISSOCK(os.lstat(path).st_mode)
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as client:
            client.connect(str(path))  # still reached there


def test_a_socket_left_at_the_path_and_removed_as_it_is_replaced_is_no_error(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Found unanswered, then removed before the server's own unlink (its last server's
    # stop): a bare FileNotFoundError escaped open_socket(), where a FifoError or a
    # socket is all it gives.
    path = tmp_path / "s.socket"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as left:
        left.bind(str(path))

    def gone_meanwhile(at: str) -> bool:
        os.unlink(at)
        return False

    monkeypatch.setattr(socket_module, "_answers", gone_meanwhile)
    sock = open_socket(str(path))
    try:
        assert stat.S_ISSOCK(os.lstat(path).st_mode)
    finally:
        sock.close()
