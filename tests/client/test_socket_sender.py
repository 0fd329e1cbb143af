"""A datagram about another process is only good while its sender lives: the server
refuses one whose sender exited before it was read (``sender_gone``), since it can no
longer check that the subject is the sender's parent or descendant. So the ``ftimer``
command, which exits right after it sends, waits until the server has taken its datagram
(at most ``--write-timeout``), and says so when the server did not."""

from __future__ import annotations

import errno
import os
import pathlib
import socket
import subprocess

import pytest
from tests.conftest import wait_until

from ftimer_client import ServerUnavailable
from ftimer_client._cli import EXIT_UNAVAILABLE
from ftimer_client._socket import SocketWriter
from ftimer_protocol import Arm

from .conftest import FTIMER, SocketPeer

#: Linux 6.16's, which Python's socket module may not name yet.
SO_PASSRIGHTS = getattr(socket, "SO_PASSRIGHTS", 83)

pytestmark = pytest.mark.skipif(
    not hasattr(os, "pidfd_open"), reason="the socket transport is Linux's (pidfds)"
)


def start_arm(speer: SocketPeer, timeout: str) -> subprocess.Popen[str]:
    args = ["--scope", "s", "--after", "30", "--write-timeout", timeout]
    return subprocess.Popen(
        [*FTIMER, "arm", "--socket", str(speer.path), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_ftimer_arm_lives_until_a_stalled_server_reads_its_datagram(speer: SocketPeer) -> None:
    speer.pause()
    with start_arm(speer, "30") as proc:
        try:
            wait_until(speer.unread, what="the datagram queued")
            # Queued, not read: the command still waits (were it gone, the server would
            # refuse the timer when it reads it).
            with pytest.raises(subprocess.TimeoutExpired):
                proc.wait(0.3)
            speer.resume()
            assert proc.wait(30) == 0, proc.stderr.read()  # type: ignore[union-attr]
        finally:
            proc.kill()
    (arm,) = speer.wait_count(1)
    assert isinstance(arm, Arm)
    (datagram,) = speer.datagrams
    assert datagram.pid == proc.pid  # the sender the kernel named


def test_ftimer_arm_fails_when_the_server_does_not_read_in_time(speer: SocketPeer) -> None:
    speer.pause()
    with start_arm(speer, "0.2") as proc:
        try:
            _, err = proc.communicate(timeout=30)
        finally:
            proc.kill()
    assert proc.returncode == EXIT_UNAVAILABLE
    assert "has not confirmed" in err


def test_ftimer_arm_with_on_unavailable_warn_warns_and_succeeds(speer: SocketPeer) -> None:
    speer.pause()
    args = ["--scope", "s", "--after", "30", "--write-timeout", "0.2", "--on-unavailable", "warn"]
    result = subprocess.run(
        [*FTIMER, "arm", "--socket", str(speer.path), *args],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0
    assert result.stderr.startswith("ftimer: warning: ")
    assert "has not confirmed" in result.stderr


def test_a_server_refusing_descriptors_is_said_so(tmp_path: pathlib.Path) -> None:
    # A server whose closing threads are held refuses descriptors (SO_PASSRIGHTS): the
    # sender of a timer for another process was told "cannot send (Operation not
    # permitted)", which says nothing of why.
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(str(tmp_path / "s.socket"))
    try:
        server.setsockopt(socket.SOL_SOCKET, SO_PASSRIGHTS, 0)
    except OSError:
        server.close()
        pytest.skip("SO_PASSRIGHTS needs Linux 6.16")
    pidfd = os.pidfd_open(os.getpid())
    writer = SocketWriter(str(tmp_path / "s.socket"), pidfd)
    try:
        with pytest.raises(ServerUnavailable) as refused:
            writer.write(b"line\n", 0.0)
        assert refused.value.errno == errno.EPERM
        assert "the server probably refuses descriptors for now" in str(refused.value)
    finally:
        writer.close()
        os.close(pidfd)
        server.close()
