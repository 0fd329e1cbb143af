"""The socket writer's holes found by mutation testing (``_socket.py``): which send errors
mean the server's end is gone (the client reconnects and resyncs) rather than a failure,
no receipt from a server gone or stalled, a pidfd numbered 0 still attached to every
datagram, a long path reached through a directory this user may only search, the
descriptors let go of (the directory's, a constructor's that did not finish, a closed
writer's hot path); and two bugs it found: a path of exactly 108 bytes refused, and
``_connect``'s refusal wrapped again."""

from __future__ import annotations

import contextlib
import errno
import gc
import os
import pathlib
import socket
import subprocess
import sys
import tempfile
import warnings
from typing import Iterator, List, Set

import pytest

from ftimer_client import FileTimerClient, ServerUnavailable, _channel, _socket
from ftimer_client._socket import SocketWriter
from ftimer_client._writer import ConnectionLost
from ftimer_protocol import Disarm, encode

from .conftest import SocketPeer, server_state

ME = os.getpid()
LINE = encode(Disarm(ME, "s", 0))

pytestmark = pytest.mark.skipif(
    not hasattr(os, "pidfd_open"), reason="the socket transport is Linux's (pidfds)"
)


@pytest.fixture
def unwatched(monkeypatch: pytest.MonkeyPatch) -> None:
    """Clients whose watch never looks: a server gone is found by a send, not by it."""
    monkeypatch.setattr(_channel, "WATCH_EVERY", 3600.0)


def fds() -> Set[str]:
    """This process's descriptors."""
    return set(os.listdir("/proc/self/fd"))


def holding(path: str) -> List[str]:
    """This process's descriptors that name the file at ``path``."""
    named = []
    for fd in fds():
        with contextlib.suppress(OSError):  # closed since the listing
            if os.readlink(f"/proc/self/fd/{fd}") == path:
                named.append(fd)
    return named


# -- the server's end gone: a lost connection, not a failure ------------------------------


def test_sends_to_a_server_that_died_are_a_lost_connection(speer: SocketPeer) -> None:
    # ECONNREFUSED (the peer closed), then ENOTCONN (the kernel disconnected us): both
    # are the server gone, so the channel reconnects, not a "cannot send" failure.
    writer = SocketWriter(str(speer.path))
    try:
        writer.write(LINE, 1.0)
        speer.wait_count(1)
        speer.close()  # the server died: its file stays
        with pytest.raises(ConnectionLost):
            writer.write(LINE, 1.0)
        with pytest.raises(ConnectionLost):
            writer.write(LINE, 1.0)
    finally:
        writer.close()


def test_a_client_whose_server_restarted_resyncs_with_the_new_one_at_its_next_call(
    speer: SocketPeer, sleeper: subprocess.Popen[bytes], unwatched: None
) -> None:
    # Another process's timers: every datagram goes through the writer's send (no hot
    # path), which took the old socket's ECONNREFUSED for a failure.
    who = sleeper.pid
    client = FileTimerClient(speer.path, transport="socket", pid=who, labels={})
    client.arm("a", 60)
    speer.wait_for(lambda m: (who, "a") in server_state(m))
    speer.close()
    speer.path.unlink()
    again = SocketPeer(speer.path)  # the server restarted: a new socket at the path
    try:
        client.arm("b", 60)  # refused by the old socket (ECONNREFUSED): reconnect
        again.wait_for(lambda m: {(who, "a"), (who, "b")} <= server_state(m).keys())
        client.close()
    finally:
        again.close()


def stop_receiving(peer: SocketPeer) -> None:
    """What a stopping server does (``stop_receiving``): sends fail with EPIPE from now
    on; its socket stays open, bound at the path."""
    peer.pause()  # else its reader would read the end of file over and over
    peer.sock.shutdown(socket.SHUT_RD)


def test_a_send_to_a_server_that_stopped_receiving_is_a_lost_connection(
    speer: SocketPeer,
) -> None:
    writer = SocketWriter(str(speer.path))
    try:
        stop_receiving(speer)
        with pytest.raises(ConnectionLost):
            writer.write(LINE, 1.0)
    finally:
        writer.close()


def test_a_client_whose_server_stopped_receiving_resyncs_with_the_next_one(
    speer: SocketPeer, sleeper: subprocess.Popen[bytes], unwatched: None
) -> None:
    # Its timers go to the new server, where the old one's EPIPE was taken for a
    # failure: the arm raised ServerUnavailable, and what the client held was not resent.
    who = sleeper.pid
    client = FileTimerClient(speer.path, transport="socket", pid=who, labels={})
    client.arm("a", 60)
    speer.wait_for(lambda m: (who, "a") in server_state(m))
    stop_receiving(speer)
    speer.path.unlink()
    again = SocketPeer(speer.path)
    try:
        client.arm("b", 60)
        again.wait_for(lambda m: {(who, "a"), (who, "b")} <= server_state(m).keys())
        client.close()
    finally:
        again.close()


# -- another process's timers: its pidfd with every datagram ------------------------------

# Arms timers of process argv[2] over the socket argv[1] with descriptor 0 free, so the
# client's pidfd of it is numbered 0; prints that number.
PIDFD_ZERO = """
import os, sys
from ftimer_client import FileTimerClient
os.close(0)
client = FileTimerClient(sys.argv[1], transport="socket", pid=int(sys.argv[2]), labels={})
client.arm("a", 60)
client.release("a")
client.arm("b", 60)
print(client._channel._pidfd, flush=True)
client.close()
"""


def test_a_pidfd_numbered_0_goes_with_every_datagram(
    speer: SocketPeer, sleeper: subprocess.Popen[bytes]
) -> None:
    # A writer with a pidfd has no hot path (os.write cannot attach it): one numbered 0
    # was taken for none, and the calls after the first went out without it, as timers
    # of the sender.
    done = subprocess.run(
        [sys.executable, "-c", PIDFD_ZERO, str(speer.path), str(sleeper.pid)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == "0\n"
    speer.wait_count(4)  # the arms, the release, and the close's disarm
    assert [d.pidfds for d in speer.datagrams] == [(sleeper.pid,)] * 4
    assert all(m.pid == sleeper.pid for m in speer.messages)  # type: ignore[attr-defined]


def test_a_writer_with_a_pidfd_numbered_0_has_no_hot_path(
    speer: SocketPeer, sleeper: subprocess.Popen[bytes]
) -> None:
    saved = os.dup(0)
    pidfd = os.pidfd_open(sleeper.pid)
    try:
        os.dup2(pidfd, 0)
        writer = SocketWriter(str(speer.path), 0)
        try:
            assert writer.hot_fd == -1
        finally:
            writer.close()
    finally:
        os.dup2(saved, 0)
        os.close(saved)
        os.close(pidfd)


# -- a path too long for an address -------------------------------------------------------


@pytest.fixture
def searchable_only() -> Iterator[pathlib.Path]:
    """A directory others may search but not read (0711), reached by a path of more than
    108 bytes (through a symlink in a directory of its own), outside pytest's own (0700)
    directories; yields the long path of the directory."""
    base = pathlib.Path(tempfile.mkdtemp(prefix="ftimer-"))
    try:
        deep = base / ("d" * 60)
        deep.mkdir()
        link = deep / ("e" * 60)
        link.symlink_to(base)
        for d in (base, deep):
            d.chmod(0o711)
        yield link
    finally:
        for p in (base / "timer.socket", base / ("d" * 60) / ("e" * 60)):
            p.unlink(missing_ok=True)
        (base / ("d" * 60)).rmdir()
        base.rmdir()


# Sends one datagram to the socket argv[1] as user nobody (imports first: they may be
# root's).
AS_NOBODY = """
import os, sys
from ftimer_client._socket import SocketWriter
os.setgid(65534)
os.setuid(65534)
SocketWriter(sys.argv[1]).write(b"x\\n", 1.0)
print("sent", flush=True)
"""


def test_a_long_path_is_reached_through_a_directory_that_may_only_be_searched(
    searchable_only: pathlib.Path,
) -> None:
    # Its directory was opened for reading (not O_PATH), which a directory others may
    # only search refuses: a server the path reaches was "permission denied".
    if os.geteuid() != 0:
        pytest.skip("another user's view needs root")
    path = searchable_only / "timer.socket"
    assert len(os.fsencode(str(path))) > 108
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        server.bind(os.path.join(os.path.realpath(searchable_only), "timer.socket"))
        os.chmod(path, 0o666)
        done = subprocess.run(
            [sys.executable, "-c", AS_NOBODY, str(path)], capture_output=True, text=True, timeout=60
        )
        assert done.stdout == "sent\n", done.stderr
        assert server.recv(16) == b"x\n"
    finally:
        server.close()


def test_a_path_too_long_even_through_its_directory_is_refused_in_its_own_words(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    name = "n" * 100
    monkeypatch.chdir(tmp_path)
    peer = SocketPeer(pathlib.Path(name))
    try:
        with pytest.raises(ServerUnavailable) as info:
            SocketWriter(str(tmp_path / name))
        assert info.value.errno == errno.ENAMETOOLONG
        # Not "cannot connect to the socket (the socket's path is 117 bytes, ...)".
        assert info.value.strerror.startswith("the socket's path is ")
    finally:
        peer.close()


# -- a constructor that did not finish ----------------------------------------------------


def test_a_writer_interrupted_while_connecting_lets_go_of_the_socket_and_its_file_at_once(
    speer: SocketPeer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Its hold on the socket file (an O_PATH descriptor) and the socket were left to the
    # collector: the file held while the traceback lived, the socket closed with a
    # ResourceWarning.
    connect = _socket._connect

    def interrupted(sock: socket.socket, path: str) -> None:
        if path != str(speer.path):  # an earlier test's client, still retrying: not ours
            return connect(sock, path)
        raise KeyboardInterrupt

    monkeypatch.setattr(_socket, "_connect", interrupted)
    with pytest.raises(KeyboardInterrupt) as info:
        SocketWriter(str(speer.path))
    assert not holding(str(speer.path))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        del info
        gc.collect()
    assert not [w for w in caught if issubclass(w.category, ResourceWarning)]


def test_a_closed_writer_has_no_hot_path(speer: SocketPeer) -> None:
    # Its number may be another file's once closed: nothing may be written to it.
    writer = SocketWriter(str(speer.path))
    assert writer.hot_fd >= 0
    writer.close()
    assert writer.hot_fd == -1


def test_a_refusal_by_what_is_no_longer_there_is_still_a_refusal(tmp_path: pathlib.Path) -> None:
    # Refused (ECONNREFUSED), then gone before it could be looked at: said so, where
    # the words for it raised UnboundLocalError.
    refused = OSError(errno.ECONNREFUSED, os.strerror(errno.ECONNREFUSED))
    error = _socket._unavailable(refused, str(tmp_path / "gone"))
    assert isinstance(error, ServerUnavailable)
    assert error.errno == errno.ECONNREFUSED
    assert "nothing that can be looked at" in str(error)


# -- the receipt (``wait_read``) ----------------------------------------------------------


def test_no_receipt_from_a_server_that_died(speer: SocketPeer) -> None:
    # The receipt's datagram is refused (ECONNREFUSED): what was sent before died unread
    # with the server's socket, and the `ftimer` command must not take it for applied.
    writer = SocketWriter(str(speer.path))
    try:
        writer.write(LINE, 1.0)
        speer.wait_count(1)
        speer.close()
        assert writer.wait_read(5.0) is False
    finally:
        writer.close()


def test_no_receipt_from_a_server_whose_queue_stays_full(speer: SocketPeer) -> None:
    # The receipt's datagram finds no room in time: False, as the time running out is,
    # not ServerStalled.
    speer.pause()
    speer.fill()
    writer = SocketWriter(str(speer.path))
    try:
        assert writer.wait_read(0.2) is False
    finally:
        writer.close()


# -- descriptors ----------------------------------------------------------------------------


def test_a_long_path_reached_through_its_directory_leaves_no_descriptor_behind(
    tmp_path: pathlib.Path,
) -> None:
    # The directory's descriptor, opened for each connect (the writer's and each probe
    # of the watch, every second), is closed once connected.
    parent = tmp_path / ("d" * 60)
    parent.mkdir()
    deep = parent / ("e" * 60)
    deep.symlink_to(tmp_path)
    peer = SocketPeer(tmp_path / "timer.socket")
    try:
        path = str(deep / "timer.socket")
        assert len(os.fsencode(path)) > 108
        before = fds()
        writer = SocketWriter(path)
        writer.write(LINE, 1.0)
        assert not writer.lost()  # a probe connects too
        writer.close()
        assert fds() <= before  # nothing left open (others' may close meanwhile)
        peer.wait_count(1)
    finally:
        peer.close()


def delivered(path: str, peer: SocketPeer) -> None:
    """Send ``LINE`` through a writer of its own to the socket at ``path``, and see
    ``peer`` read it; ``peer`` is closed after."""
    try:
        writer = SocketWriter(path)
        try:
            writer.write(LINE, 1.0)
        finally:
            writer.close()
        assert peer.wait_count(1) == [Disarm(ME, "s", 0)]
    finally:
        peer.close()


def reach(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch, length: int) -> None:
    """Send a datagram to a socket bound at a path of ``length`` bytes (a directory's
    name padded), and see it read."""
    directory = tmp_path / ("d" * (length - len(os.fsencode(str(tmp_path))) - len("//s")))
    directory.mkdir()
    monkeypatch.chdir(directory)
    peer = SocketPeer(pathlib.Path("s"))  # bound relative to its directory
    path = str(directory / "s")
    assert len(os.fsencode(path)) == length
    delivered(path, peer)


def test_a_path_one_byte_longer_than_an_address_holds_is_reached(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 109 bytes go through the directory; connecting to them whole raised "AF_UNIX path
    # too long" (errno None).
    reach(tmp_path, monkeypatch, 109)


def test_a_path_as_long_as_an_address_is_reached(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reach(tmp_path, monkeypatch, 108)
