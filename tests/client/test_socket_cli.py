"""The ``ftimer`` command over the socket: its timers are for another process (the calling
shell, ``--pid``, or CMD), so every datagram carries that process's pidfd, and the kernel
names the command itself as the sender."""

from __future__ import annotations

import contextlib
import os
import pathlib
import select
import shlex
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from typing import Tuple

import pytest
from tests.conftest import in_private_pid_namespace, not_pid_1, parent_not_init

from ftimer_client._cli import EXIT_UNAVAILABLE, EXIT_USAGE, main
from ftimer_protocol import Arm, Disarm, socket_path_for

from .conftest import FTIMER, FifoPeer, SocketPeer, ftimer, server_state

ME = os.getpid()

pytestmark = pytest.mark.skipif(
    not hasattr(os, "pidfd_open"), reason="the socket transport is Linux's (pidfds)"
)


def test_arm_names_the_calling_shell_by_its_pidfd(speer: SocketPeer) -> None:
    # The test process stands for the shell: it runs the command, so it is its parent.
    path = str(speer.path)
    assert ftimer("arm", "--socket", path, "--scope", "job", "--after", "30").returncode == 0
    assert ftimer("disarm", "--fifo", path, "--scope", "job").returncode == 0  # auto: a socket
    arm, disarm = speer.wait_count(2)
    assert isinstance(arm, Arm)
    assert isinstance(disarm, Disarm)
    assert (arm.pid, disarm.pid) == (ME, ME)  # the message names the shell, for logs
    senders = [d.pid for d in speer.datagrams]
    assert ME not in senders  # the kernel names each command's own process as the sender
    assert len(set(senders)) == 2
    assert [d.pidfds for d in speer.datagrams] == [(ME,), (ME,)]  # the subject: the shell


def test_arm_with_pid_of_another_process_never_goes_to_the_socket(
    speer: SocketPeer, peer: FifoPeer, capsys: pytest.CaptureFixture[str]
) -> None:
    """The server takes from a socket only the sender's parent or descendants: `--pid` of
    any other process is a usage error on the socket, and goes over the FIFO by default."""
    with subprocess.Popen(["sleep", "30"]) as other:
        try:
            args = ("--scope", "s", "--pid", str(other.pid), "--after", "5")
            assert main(["arm", "--socket", str(speer.path), *args]) == EXIT_USAGE
            assert "not this command's parent" in capsys.readouterr().err
            assert main(["arm", "--fifo", str(peer.path), "--transport", "socket", *args]) == (
                EXIT_USAGE
            )
            assert speer.datagrams == []
            assert ftimer("arm", "--fifo", str(peer.path), *args).returncode == 0
            (arm,) = peer.wait_count(1)
            assert isinstance(arm, Arm)
            assert arm.pid == other.pid
        finally:
            other.kill()


def test_with_ftimer_socket_set_another_process_s_pid_is_refused_not_sent_to_the_fifo(
    speer: SocketPeer,
    peer: FifoPeer,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # A container's worker: its pids mean nothing to the server over the FIFO. It went
    # to the default FIFO (exit 0), refused there, and the process ran unwatched.
    monkeypatch.setenv("FTIMER_SOCKET", str(speer.path))
    monkeypatch.setenv("FTIMER_FIFO", str(peer.path))
    with subprocess.Popen(["sleep", "30"]) as other:
        try:
            args = ("--scope", "s", "--pid", str(other.pid), "--after", "5")
            for transport in ((), ("--transport", "auto")):  # auto is the default
                assert main(["arm", *transport, *args]) == EXIT_USAGE
                err = capsys.readouterr().err
                assert "not this command's parent" in err
                assert "$FTIMER_SOCKET names it" in err
                assert "ftimer exec" in err
            assert ftimer("arm", "--fifo", str(peer.path), *args).returncode == 0  # said so
            (arm,) = peer.wait_count(1)
            assert isinstance(arm, Arm)
            assert arm.pid == other.pid
            assert speer.datagrams == []
        finally:
            other.kill()


def test_a_disarm_for_a_process_gone_succeeds_whatever_the_transport(
    speer: SocketPeer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Its timers went with it: with FTIMER_SOCKET set it was a usage error (status 2).
    monkeypatch.setenv("FTIMER_SOCKET", str(speer.path))
    gone = subprocess.Popen(["true"])
    gone.wait()
    assert main(["disarm", "--scope", "s", "--pid", str(gone.pid)]) == 0
    assert speer.datagrams == []


def test_another_process_s_pid_with_transport_auto_goes_over_the_fifo(peer: FifoPeer) -> None:
    # Never the socket beside it, which would refuse it (foreign_subject) unseen.
    fifo = str(peer.path)
    beside = SocketPeer(pathlib.Path(socket_path_for(fifo)))
    with subprocess.Popen(["sleep", "30"]) as other:
        try:
            args = ("--fifo", fifo, "--transport", "auto", "--scope", "s", "--after", "5")
            assert ftimer("arm", *args, "--pid", str(other.pid)).returncode == 0
            (arm,) = peer.wait_count(1)
            assert isinstance(arm, Arm)
            assert arm.pid == other.pid
            assert beside.datagrams == []
        finally:
            other.kill()
            beside.close()


@parent_not_init
def test_pid_1_is_refused_unless_it_is_the_calling_shell(
    speer: SocketPeer, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["arm", "--socket", str(speer.path), "--scope", "s", "--after", "5", "--pid", "1"]
    assert main(args) == EXIT_USAGE
    assert "--pid 1 names the first process of this PID namespace" in capsys.readouterr().err
    # A container's shell (`sh -c '...'`) is pid 1: `--pid $$` is 1, and names it. It
    # was refused as "not a process id other than 1".
    arm = f"{sys.executable} -m ftimer_client {shlex.join(args)}"
    # --transport auto (the default, said) went on to refuse pid 1 ("other than init").
    done = in_private_pid_namespace("sh", "-c", f"{arm}; {arm} --transport auto; echo $?")
    assert (done.stdout, done.stderr) == ("0\n", "")
    [message, _] = speer.wait_count(2)
    assert isinstance(message, Arm)
    assert message.pid == 1  # the shell, as it knows itself
    assert len(speer.datagrams[0].pidfds) == 1  # and by its pidfd, for the server


def test_exec_names_the_command_by_its_pidfd(speer: SocketPeer) -> None:
    done = ftimer(
        "exec", "--fifo", str(speer.path), "--after", "60", "--", "sh", "-c", "echo $$; exit 7"
    )
    assert done.returncode == 7, done.stderr
    child = int(done.stdout)
    arm, disarm = speer.wait_count(2)
    assert isinstance(arm, Arm)
    assert (arm.pid, arm.scope_id) == (child, "exec:sh")
    assert disarm == Disarm(child, "exec:sh", arm.start_time)
    (sender,) = {d.pid for d in speer.datagrams}  # the wrapper, CMD's parent
    assert sender not in (ME, child)
    # Each carries CMD's pidfd; by the time the disarm's is read, CMD has exited, and
    # a pidfd of an exited process names no pid (-1 in its fdinfo).
    assert [d.pidfds for d in speer.datagrams] in ([(child,), (child,)], [(child,), (-1,)])


def test_exec_sends_nothing_more_to_a_server_still_there_while_its_command_runs(
    speer: SocketPeer,
) -> None:
    # It sent a line a second to keep its timer with a server that restarted: while
    # the server paused (stopped, swapped out), a few of them filled its queue, and a
    # healthy worker's arm failed. The connection is checked without sending now.
    done = ftimer("exec", "--socket", str(speer.path), "--after", "60", "--", "sleep", "2.5")
    assert done.returncode == 0, done.stderr
    assert len(speer.wait_count(2)) == 2  # the arm and the disarm
    assert speer.receipts == 2  # theirs, and no other sync


def test_exec_in_process_passes_the_pidfd_of_its_child(speer: SocketPeer) -> None:
    # main() here: the sender is this process, the subject its child (a descendant).
    code = main(["exec", "--socket", str(speer.path), "--after", "60", "--", "true"])
    assert code == 0
    arm, disarm = speer.wait_count(2)
    assert isinstance(arm, Arm)
    assert arm.pid != ME
    first, second = speer.datagrams
    assert (first.pid, first.pidfds) == (ME, (arm.pid,))
    assert (second.pid, second.pidfds) in ((ME, (arm.pid,)), (ME, (-1,)))  # exited (above)
    assert server_state([arm, disarm]) == {}


@not_pid_1
def test_no_server_on_the_socket_fails_with_status_3_and_exec_does_not_run(
    socket_path: object, tmp_path: object, capsys: pytest.CaptureFixture[str]
) -> None:
    marker = os.path.join(str(tmp_path), "ran")
    args = ["--socket", str(socket_path), "--after", "5"]
    assert main(["exec", *args, "--", "touch", marker]) == EXIT_UNAVAILABLE
    assert not os.path.exists(marker)
    assert "no socket" in capsys.readouterr().err
    # The policies as on the FIFO.
    assert main(["arm", *args, "--scope", "s", "--pid", str(ME), "--on-unavailable", "ignore"]) == 0


def test_exec_runs_its_command_once_the_server_has_judged_its_arm(
    socket_path: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    # CMD ran as soon as its arm was sent: an arm judged after a quick CMD had exited was
    # refused (its subject gone), and a stopped server was never noticed.
    stopped = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    stopped.bind(str(socket_path))  # a server that reads nothing: no receipt comes
    marker = tmp_path / "ran"
    try:
        args = ["exec", "--socket", str(socket_path), "--after", "5", "--write-timeout", "0.2"]
        done = ftimer(*args, "--on-unavailable", "raise", "--", "touch", str(marker))
        assert done.returncode == EXIT_UNAVAILABLE
        assert "has not confirmed the message in 0.2 s (is it stopped?): the command was " in (
            done.stderr
        )
        assert not marker.exists()
        # As the policy says: run it without a watchdog.
        done = ftimer(*args, "--on-unavailable", "ignore", "--", "touch", str(marker))
        assert done.returncode == 0
        assert marker.exists()
    finally:
        stopped.close()


@contextlib.contextmanager
def exec_awaiting_its_receipt(
    socket_path: pathlib.Path, *args: str
) -> Iterator[Tuple[subprocess.Popen[str], socket.socket]]:
    """``ftimer exec ARGS`` over a socket that no server reads, once its arm has been taken
    off the queue and its receipt's datagram waits there; and that socket."""
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(str(socket_path))
    command = [*FTIMER, "exec", "--socket", str(socket_path), "--after", "5"]
    proc = subprocess.Popen(
        [*command, "--write-timeout", "30", *args], stderr=subprocess.PIPE, text=True
    )
    try:
        poller = select.poll()
        poller.register(server, select.POLLIN)
        assert poller.poll(30_000), "no arm came"
        _, fds, _, _ = socket.recv_fds(server, 4096, 4)  # the arm, CMD's pidfd with it
        for fd in fds:
            os.close(fd)
        assert poller.poll(30_000), "no receipt was asked for"
        yield proc, server
    finally:
        server.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("path_removed", [False, True])
def test_a_server_gone_with_the_receipt_unread_gives_no_receipt(
    socket_path: pathlib.Path, tmp_path: pathlib.Path, path_removed: bool
) -> None:
    # Its socket closed, the kernel closes the descriptors still queued on it, the
    # receipt's pipe among them: that end of file was taken for the receipt, and CMD ran
    # unwatched with status 0 under --on-unavailable raise. Its path removed as it went
    # too (a loop ended by an error; a cleaner of /tmp, then a kill), a path not there
    # was taken for one out of reach, and the server for still bound.
    marker = tmp_path / "ran"
    raising = ("--on-unavailable", "raise", "--", "touch", str(marker))
    with exec_awaiting_its_receipt(socket_path, *raising) as (proc, server):
        if path_removed:
            socket_path.unlink()  # first: the end of file finds no path
        server.close()  # dies with the receipt's datagram unread
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == EXIT_UNAVAILABLE, err
    assert "the command was not run" in err
    assert not marker.exists()


def test_ctrl_c_while_exec_waits_for_its_receipt_runs_nothing_and_says_no_traceback(
    socket_path: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    marker = tmp_path / "ran"
    with exec_awaiting_its_receipt(socket_path, "--", "touch", str(marker)) as (proc, _):
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    # Dies of it (a shell's $? is 130 all the same): the calling script stops, where an
    # exit(130) told bash the command had handled Ctrl-C, and its script ran on.
    assert (proc.returncode, err) == (-signal.SIGINT, "")
    assert not marker.exists()


@not_pid_1
def test_transport_options(
    fifo_path: object, socket_path: object, capsys: pytest.CaptureFixture[str]
) -> None:
    fifo, sock = FifoPeer(fifo_path), SocketPeer(socket_path)  # type: ignore[arg-type]
    try:
        base = ["arm", "--scope", "s", "--after", "5", "--pid", str(ME)]
        assert main([*base, "--fifo", str(fifo_path)]) == 0
        assert main([*base, "--socket", str(socket_path)]) == 0
        assert [type(m) for m in fifo.wait_count(1)] == [Arm]
        assert [type(m) for m in sock.wait_count(1)] == [Arm]
        assert main([*base, "--socket", str(socket_path), "--transport", "fifo"]) == EXIT_USAGE
        assert "contradicts" in capsys.readouterr().err
        assert main([*base, "--fifo", "x", "--socket", "y"]) == EXIT_USAGE
        assert "not allowed with" in capsys.readouterr().err
        code = main([*base, "--socket", str(socket_path), "--protocol", "1"])
        assert code == EXIT_USAGE
        assert "FIFO only" in capsys.readouterr().err
    finally:
        fifo.close()
        sock.close()
