"""``ftimer arm --fifo FIFO`` over the socket beside that FIFO: from a shell that is pid
1 of its PID namespace (a container's first process), which the server refuses from the
FIFO, naming the shell by its pidfd; and with ``--transport socket``."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
from typing import Iterator, Tuple

import pytest
from tests.conftest import in_private_pid_namespace

from ftimer_protocol import Arm, socket_path_for

from .conftest import SocketPeer


@pytest.fixture
def fifo_and_socket(tmp_path: pathlib.Path) -> Iterator[Tuple[pathlib.Path, SocketPeer]]:
    """A FIFO with nobody reading it, and a peer on the socket beside it."""
    fifo = tmp_path / "timer.fifo"
    os.mkfifo(fifo, 0o600)
    peer = SocketPeer(pathlib.Path(socket_path_for(str(fifo))))
    try:
        yield fifo, peer
    finally:
        peer.close()


def test_a_pid_1_shell_naming_the_fifo_arms_over_the_socket_beside_it(
    fifo_and_socket: Tuple[pathlib.Path, SocketPeer],
) -> None:
    # It failed with "not a socket but a FIFO (this client was told to use a socket)".
    fifo, peer = fifo_and_socket
    # `; echo` keeps the shell from exec'ing the command: the shell stays pid 1.
    arm = f"{sys.executable} -m ftimer_client arm --fifo {fifo} --scope s --after 30"
    done = in_private_pid_namespace("sh", "-c", f"{arm}; echo $?")
    assert (done.stdout, done.stderr) == ("0\n", "")
    [message] = peer.wait_count(1)
    assert isinstance(message, Arm)
    assert (message.pid, message.scope_id) == (1, "s")  # the shell, as it knows itself
    assert len(peer.datagrams[0].pidfds) == 1  # and by its pidfd, for the server


def test_the_fifo_named_with_transport_socket_means_the_socket_beside_it(
    fifo_and_socket: Tuple[pathlib.Path, SocketPeer],
) -> None:
    # It failed (status 3) with "not a socket but a FIFO", though --fifo names "the
    # server's FIFO, or its socket".
    fifo, peer = fifo_and_socket
    arm = ["arm", "--fifo", str(fifo), "--transport", "socket", "--scope", "s"]
    done = subprocess.run(
        [sys.executable, "-m", "ftimer_client", *arm, "--after", "30", "--signal", "0"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert (done.returncode, done.stderr) == (0, "")
    [message] = peer.wait_count(1)
    assert isinstance(message, Arm)
    assert (message.pid, message.scope_id) == (os.getpid(), "s")
