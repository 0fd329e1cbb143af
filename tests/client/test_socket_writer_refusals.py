"""What the socket writer says when it cannot deliver, and where its edges are, pinned by
the second round of mutation testing of ``_socket.py``: a full queue at a path that
names another socket (lost) or nothing (a stall); refusals in their own words
(permission denied, no pidfd_open, descriptors refused for a pidfd numbered 0, another
send error with a pidfd); the path lengths at the edges of an address and of the way
through a directory; the descriptors let go of (a receipt's pipe, a number closed under
a writer and reused); a probe with no descriptor for a long path's directory, which
cannot tell."""

from __future__ import annotations

import errno
import os
import pathlib
import socket
import subprocess
import sys
from typing import Iterator

import pytest

from ftimer_client import ServerStalled, ServerUnavailable, _socket
from ftimer_client._socket import SocketWriter
from ftimer_client._writer import ConnectionLost

from .conftest import SocketPeer
from .test_socket_writer import LINE, ME, delivered, fds

pytestmark = pytest.mark.skipif(
    not hasattr(os, "pidfd_open"), reason="the socket transport is Linux's (pidfds)"
)


# -- a full queue: the server's end gone, or stalled --------------------------------------


def test_a_full_queue_of_a_socket_replaced_at_the_path_is_a_lost_connection(
    speer: SocketPeer,
) -> None:
    # The old server stopped (its queue full, its socket open) and a new one bound the
    # path: the writer reconnects at once, not after waiting out the timeout for room
    # that will never come (ServerStalled).
    writer = SocketWriter(str(speer.path))
    try:
        speer.pause()
        speer.fill()
        speer.path.unlink()
        again = SocketPeer(speer.path)
        try:
            with pytest.raises(ConnectionLost):
                writer.write(LINE, 5.0)
        finally:
            again.close()
    finally:
        writer.close()


def test_a_full_queue_of_a_socket_whose_path_was_removed_is_a_stall(
    speer: SocketPeer,
) -> None:
    # Nothing at the path is no other socket there (as for the FIFO): the server, alive
    # but stopped, is stalled, not gone.
    writer = SocketWriter(str(speer.path))
    try:
        speer.pause()
        speer.fill()
        speer.path.unlink()
        with pytest.raises(ServerStalled) as info:
            writer.write(LINE, 0.2)
        assert info.value.errno == errno.EAGAIN
    finally:
        writer.close()


# -- refusals, in words -------------------------------------------------------------------


# Connects to the socket argv[1] as user nobody where run as root; prints the refusal.
CONNECT_AS_NOBODY = """
import os, sys
from ftimer_client import ServerUnavailable
from ftimer_client._socket import SocketWriter
if os.geteuid() == 0:
    os.setgid(65534)
    os.setuid(65534)
try:
    SocketWriter(sys.argv[1])
except ServerUnavailable as e:
    print(e.errno, e.strerror, flush=True)
"""


def test_a_socket_this_user_may_not_write_is_said_so(speer: SocketPeer) -> None:
    speer.path.chmod(0)  # and, for nobody, in a directory of root's only
    done = subprocess.run(
        [sys.executable, "-c", CONNECT_AS_NOBODY, str(speer.path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.stdout == (
        f"{errno.EACCES} this user may not write the socket, or enter its directory "
        "(permission denied): the server's --fifo-mode and --fifo-group say who may\n"
    ), done.stderr


def test_no_pidfd_open_is_said_so(monkeypatch: pytest.MonkeyPatch) -> None:
    # Python 3.8 has no os.pidfd_open: "'NoneType' object is not callable" (TypeError)
    # came out, not the words that send the caller to the FIFO.
    monkeypatch.delattr(os, "pidfd_open")
    with pytest.raises(ServerUnavailable) as info:
        _socket.open_pidfd(ME)
    assert info.value.errno == errno.ENOSYS
    assert info.value.strerror == (
        f"cannot name process {ME} to the server: pidfd_open: os.pidfd_open is missing (over "
        "the socket, another process's timers need a pidfd; use the FIFO instead)"
    )
    assert info.value.filename == f"/proc/{ME}"


#: Linux 6.16's SO_PASSRIGHTS (unnamed by Python 3.11): off, the socket refuses
#: descriptors at their senders (EPERM), as a server with too many waiting to close does.
_SO_PASSRIGHTS = getattr(socket, "SO_PASSRIGHTS", 83)


def refuse_descriptors(peer: SocketPeer) -> None:
    try:
        peer.sock.setsockopt(socket.SOL_SOCKET, _SO_PASSRIGHTS, 0)
    except OSError:
        pytest.skip("SO_PASSRIGHTS needs Linux 6.16")


@pytest.fixture
def pidfd_0(sleeper: subprocess.Popen[bytes]) -> Iterator[int]:
    """A pidfd of ``sleeper`` numbered 0 (descriptor 0 put back after)."""
    fd = os.pidfd_open(sleeper.pid)
    saved = os.dup(0)
    try:
        os.dup2(fd, 0)
        yield 0
    finally:
        os.dup2(saved, 0)
        os.close(saved)
        os.close(fd)


def test_a_server_refusing_a_pidfd_numbered_0_is_said_so(speer: SocketPeer, pidfd_0: int) -> None:
    # A descriptor numbered 0 is one: refused (EPERM), the words say why.
    refuse_descriptors(speer)
    writer = SocketWriter(str(speer.path), pidfd_0)
    try:
        with pytest.raises(ServerUnavailable) as info:
            writer.write(LINE, 1.0)
        assert info.value.errno == errno.EPERM
        assert info.value.strerror.startswith("the server probably refuses descriptors for now")
    finally:
        writer.close()


def test_a_datagram_too_long_with_a_pidfd_is_not_blamed_on_descriptors(
    speer: SocketPeer, sleeper: subprocess.Popen[bytes]
) -> None:
    # Another error of a send carrying a pidfd is said as it is (EMSGSIZE here), not as
    # the server refusing descriptors.
    pidfd = os.pidfd_open(sleeper.pid)
    writer = SocketWriter(str(speer.path), pidfd)
    try:
        with pytest.raises(ServerUnavailable) as info:
            writer.write(b"x" * (1 << 22), 1.0)
        assert info.value.errno == errno.EMSGSIZE
        assert info.value.strerror == f"cannot send ({os.strerror(errno.EMSGSIZE)})"
    finally:
        writer.close()
        os.close(pidfd)


# -- a path as long as an address holds, or the way through its directory -----------------


def test_a_path_as_long_as_an_address_holds_is_reached_whatever_its_name(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 107 bytes, all of them the name: connected to directly, where the way through the
    # directory (/proc/self/fd/N/NAME) would be too long for it.
    name = "n" * 107
    monkeypatch.chdir(tmp_path)
    delivered(name, SocketPeer(pathlib.Path(name)))


def test_a_long_path_whose_name_just_fits_the_way_through_its_directory_is_reached(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A name of 82 bytes: /proc/self/fd/2147483647/NAME is 107 bytes, as long as an
    # address holds.
    name = "n" * (107 - len("/proc/self/fd/2147483647/"))
    monkeypatch.chdir(tmp_path)
    peer = SocketPeer(pathlib.Path(name))  # bound relative to its directory
    path = str(tmp_path / name)
    assert len(os.fsencode(path)) > 107
    delivered(path, peer)


def test_a_name_too_long_for_a_directory_numbered_high_is_refused_in_its_own_words(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The way through the directory is judged for the longest descriptor number: with
    # over 100 descriptors open, a name of 90 bytes (/proc/self/fd/NNN/NAME: 108 bytes)
    # came out as "cannot connect to the socket (None)" (Python's "AF_UNIX path too
    # long" has no errno).
    name = "n" * 90
    monkeypatch.chdir(tmp_path)
    peer = SocketPeer(pathlib.Path(name))
    held = [os.dup(2) for _ in range(128)]  # the next numbers have 3 digits or more
    try:
        with pytest.raises(ServerUnavailable) as info:
            SocketWriter(str(tmp_path / name))
        assert info.value.errno == errno.ENAMETOOLONG
        assert info.value.strerror.startswith("the socket's path is ")
    finally:
        for fd in held:
            os.close(fd)
        peer.close()


# -- the receipt (``wait_read``) ----------------------------------------------------------


def test_a_receipt_leaves_no_descriptor_behind(speer: SocketPeer) -> None:
    # The pipe's read end, polled for the receipt, is closed once it came.
    writer = SocketWriter(str(speer.path))
    try:
        writer.write(LINE, 1.0)
        before = fds()
        assert writer.wait_read(10.0) is True
        assert fds() <= before  # nothing left open (others' may close meanwhile)
    finally:
        writer.close()


# -- the watch's probe --------------------------------------------------------------------


# Connected to the long path argv[1], then at its descriptor limit, one left (the probe's
# socket takes it, none is left for the directory): prints whether the writer takes its
# server for gone.
LOST_AT_THE_LIMIT = """
import os, resource, sys
from ftimer_client._socket import SocketWriter
writer = SocketWriter(sys.argv[1])
resource.setrlimit(resource.RLIMIT_NOFILE, (64, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
held = []
try:
    while True:
        held.append(os.dup(2))
except OSError:
    pass
os.close(held.pop())
print(writer.lost(), flush=True)
"""


def test_a_probe_with_no_descriptor_left_for_a_long_paths_directory_cannot_tell(
    tmp_path: pathlib.Path,
) -> None:
    # The directory could not be opened (EMFILE): a server that still reads its socket
    # was taken for gone, and the client reconnected over and over.
    parent = tmp_path / ("d" * 60)
    parent.mkdir()
    (parent / ("e" * 60)).symlink_to(tmp_path)
    peer = SocketPeer(tmp_path / "timer.socket")
    try:
        path = str(parent / ("e" * 60) / "timer.socket")
        assert len(os.fsencode(path)) > 108
        done = subprocess.run(
            [sys.executable, "-c", LOST_AT_THE_LIMIT, path],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.stdout == "False\n", done.stderr
    finally:
        peer.close()


# -- closing ------------------------------------------------------------------------------


# A writer whose socket is numbered 0 (descriptor 0 free), closed under it and the number
# given to a file of the process's own (argv[2]): closing the writer leaves that file
# open; prints what is read from it.
SOCKET_0 = """
import os, sys
from ftimer_client._socket import SocketWriter
os.close(0)
writer = SocketWriter(sys.argv[1])
assert writer.hot_fd == 0, writer.hot_fd
os.close(0)
assert os.open(sys.argv[2], os.O_RDONLY) == 0
writer.close()
print(os.read(0, 100).decode(), flush=True)
"""


def test_closing_a_writer_whose_socket_numbered_0_was_closed_under_it_leaves_the_number_alone(
    speer: SocketPeer, tmp_path: pathlib.Path
) -> None:
    kept = tmp_path / "kept"
    kept.write_text("still open")
    done = subprocess.run(
        [sys.executable, "-c", SOCKET_0, str(speer.path), str(kept)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == "still open\n"
