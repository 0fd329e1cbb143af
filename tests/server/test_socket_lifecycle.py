"""Behaviour of server/_socket.py pinned by a third round of mutation testing (each test
fails with the mutant that found it, and passes on the code as it is): which descriptors
vouch and are closed, what is refused, what a socket at the path is. Real sockets and
processes; nothing is signalled but the test's own children."""

from __future__ import annotations

import errno
import os
import pathlib
import shutil
import socket
import stat
import subprocess
import sys
from typing import List

import pytest
from tests.server.conftest import needs_unix_diag

from ftimer_protocol import Arm, Sync, encode
from ftimer_server import FifoError, RejectReason
from ftimer_server.incidents._procfs import pidfd_pid
from ftimer_server.server import _closer as closer_module
from ftimer_server.server._socket import forgo_socket, open_socket, shut_for_reading

from .conftest import NOBODY, is_open, pidfds_of, run_as_nobody

_SO_PASSCRED = getattr(socket, "SO_PASSCRED", 16)
_SO_PASSPIDFD = getattr(socket, "SO_PASSPIDFD", 76)


def arm(pid: int, scope: str = "s") -> bytes:
    return encode(Arm(pid=pid, scope_id=scope, deadline=1e9, signal=9))


# Binds the socket argv[1], closes its own descriptor 0 (a server started with stdin
# closed), says "ready", waits for a datagram, and prints how it was judged and the
# descriptor that vouches for its subject, if any, with the pid that descriptor is of.
SERVER_WITHOUT_STDIN = """
import os, select, sys
from ftimer_server.incidents._procfs import pidfd_pid
from ftimer_server.server._socket import forgo_socket, open_socket, shut_for_reading
sock = open_socket(sys.argv[1])
os.close(0)
print("ready", flush=True)
select.select([sock.fd], [], [])
[result] = sock.receive()
fd = sock.vouched.get(getattr(result, "pid", None))
print(type(result).__name__, getattr(result, "pid", None), fd, fd is not None and pidfd_pid(fd))
sock.release()
sock.close()
"""


def test_a_carried_pidfd_numbered_0_vouches_like_any_other(tmp_path: pathlib.Path) -> None:
    # A server whose stdin is closed receives a pidfd a datagram carries as descriptor
    # 0 (the kernel gives the lowest free number). It is a pidfd all the same: it
    # vouches for its process until release(). Taken for the kernel's "no descriptor"
    # (< 0) it was closed at the end of receive(), and the pid was bound unvouched.
    path = str(tmp_path / "s.socket")
    server = subprocess.Popen(
        [sys.executable, "-c", SERVER_WITHOUT_STDIN, path],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        text=True,
    )
    child = subprocess.Popen(["sleep", "60"])
    pidfd = os.pidfd_open(child.pid)
    try:
        assert server.stdout is not None
        assert server.stdout.readline() == "ready\n"
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sender:
            sender.connect(path)
            socket.send_fds(sender, [arm(child.pid)], [pidfd])
        out, _ = server.communicate(timeout=30)
    finally:
        os.close(pidfd)
        child.kill()
        child.wait()
        if server.poll() is None:
            server.kill()
            server.wait()
    assert out.split() == ["Timer", str(child.pid), "0", str(child.pid)], out
    assert server.returncode == 0


# Binds the socket argv[1], says "ready", waits for a line on stdin (the test has sent),
# and prints how what was queued was judged: type, reason, pid.
SERVER = """
import sys
from ftimer_server.server._socket import forgo_socket, open_socket, shut_for_reading
sock = open_socket(sys.argv[1])
print("ready", flush=True)
sys.stdin.readline()
for result in sock.receive():
    reason = getattr(result, "reason", None)
    print(type(result).__name__, getattr(reason, "value", reason), getattr(result, "pid", None))
sock.release()
sock.close()
"""


UNSHARE_MOUNT = ["unshare", "--mount", "--propagation", "private"]


def _mount_namespaces() -> bool:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return False
    probe = [*UNSHARE_MOUNT, "true"]
    return subprocess.run(probe, capture_output=True, check=False).returncode == 0


@pytest.mark.skipif(not _mount_namespaces(), reason="needs root, unshare(1), mount namespaces")
def test_a_sync_s_descriptor_that_cannot_be_told_a_pipe_is_no_receipt(
    tmp_path: pathlib.Path,
) -> None:
    # A receipt is closed on the loop's thread, so only what is known to be a pipe is
    # one: with no /proc to tell a descriptor by (a server in a container without it),
    # a sync carrying a file (one of a FUSE mount, whose close may block) is refused,
    # never kept as a receipt for the loop to close.
    path = str(tmp_path / "s.socket")
    shell = 'mount -t tmpfs none /proc && exec "$@"'
    server = subprocess.Popen(
        [*UNSHARE_MOUNT, "sh", "-c", shell, "sh", sys.executable, "-c", SERVER, path],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None
        assert server.stdout.readline() == "ready\n"
        with (
            socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sender,
            open(tmp_path / "file", "wb") as file,
        ):
            sender.connect(path)
            socket.send_fds(sender, [encode(Sync(token="t"))], [file.fileno()])
        out, _ = server.communicate("sent\n", timeout=30)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    assert out.split() == ["Refused", RejectReason.FOREIGN_SUBJECT.value, str(os.getpid())], out
    assert server.returncode == 0


def test_close_lets_go_of_the_last_batch_s_pidfds(tmp_path: pathlib.Path) -> None:
    # A server stopping closes its socket with a batch read and never applied (or its
    # release() skipped by an error): the pidfds that vouched for it are closed with
    # the socket, not left open for the life of the process.
    sock = open_socket(str(tmp_path / "s.socket"))
    child = subprocess.Popen(["sleep", "60"])
    pidfd = os.pidfd_open(child.pid)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sender:
            sender.connect(sock.path)
            socket.send_fds(sender, [arm(child.pid)], [pidfd])
        [timer] = sock.receive()
        assert timer.pid == child.pid  # type: ignore[union-attr]
        assert pidfds_of(child.pid) == 2  # the test's, and the one that vouches
        sock.close()  # no release() first
        assert pidfds_of(child.pid) == 1  # the test's own
        assert sock.vouched == {}
    finally:
        os.close(pidfd)
        sock.close()
        child.kill()
        child.wait()


def test_a_closed_socket_is_no_longer_watched_by_the_closer(tmp_path: pathlib.Path) -> None:
    # The closer has every socket it watches refuse descriptors while closes pile up:
    # a socket closed but still referenced (a stopped server's) stays out of that, or
    # each time refusing began an error was logged for a socket long closed.
    sock = open_socket(str(tmp_path / "s.socket"))
    assert sock._sock in closer_module.CLOSER._sockets
    sock.close()
    assert sock._sock not in closer_module.CLOSER._sockets


def test_the_socket_is_made_for_its_owner_only_unless_told(tmp_path: pathlib.Path) -> None:
    # The default mode is the FIFO's: 0600, the server's user alone may send.
    path = tmp_path / "s.socket"
    sock = open_socket(str(path))
    try:
        assert stat.S_IMODE(os.lstat(path).st_mode) == 0o600
    finally:
        sock.close()


def test_no_other_user_may_connect_while_the_socket_is_bound_and_not_yet_chmod(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # bind() makes the socket's file with the umask's mode; chmod() gives it the mode
    # asked for after. In between it is the owner's alone (umask 0177), whatever the
    # caller's umask: a sender of another user never connects before the mode says so.
    path = tmp_path / "s.socket"
    modes: List[int] = []
    chmod = os.chmod

    def recording_chmod(target, mode, *args, **kwargs):  # type: ignore[no-untyped-def]
        if str(target) == str(path):
            modes.append(stat.S_IMODE(os.lstat(path).st_mode))
        return chmod(target, mode, *args, **kwargs)

    monkeypatch.setattr(os, "chmod", recording_chmod)
    old = os.umask(0)
    try:
        sock = open_socket(str(path), mode=0o666)
    finally:
        os.umask(old)
    try:
        assert modes == [0o600]
        assert stat.S_IMODE(os.lstat(path).st_mode) == 0o666
    finally:
        sock.close()


def test_the_process_s_umask_is_given_back_once_bound(tmp_path: pathlib.Path) -> None:
    # The umask is the process's: narrowed for the bind alone. Left at 0177, every file
    # the server made afterwards (its state file, a FIFO made again) was its owner's
    # alone, whatever mode was asked for.
    old = os.umask(0o022)
    try:
        sock = open_socket(str(tmp_path / "s.socket"))
        sock.close()
        after = os.umask(0o022)
    finally:
        os.umask(old)
    assert after == 0o022


def test_a_group_given_keeps_the_socket_the_server_s_own(
    nobody_dir: pathlib.Path,
) -> None:
    # group= changes the socket's group, never its owner, of a socket bound here or one
    # taken over: a server not run as root gives one of its own groups, and would fail
    # were it to ask for another owner; one run as root would hand its socket away.
    path = nobody_dir / "timer.socket"
    script = """
import os, socket, sys
from ftimer_server.server._socket import open_socket
sock = open_socket(sys.argv[1], group=os.getgid(), mode=0o660)
st = os.lstat(sys.argv[1])
print(st.st_uid == os.geteuid(), st.st_gid == os.getgid(), oct(st.st_mode & 0o777))
sock.close()
last = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
last.bind(sys.argv[1])
taken = open_socket(sys.argv[1], group=os.getgid(), mode=0o620, adopt=(last.detach(), 10))
st = os.lstat(sys.argv[1])
print(st.st_uid == os.geteuid(), st.st_gid == os.getgid(), oct(st.st_mode & 0o777))
taken.close()
"""
    result = run_as_nobody(script, str(path))
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["True", "True", "0o660", "True", "True", "0o620"]


def test_a_group_given_by_root_changes_the_group_alone(tmp_path: pathlib.Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("only root may give any group")
    path = tmp_path / "s.socket"
    sock = open_socket(str(path), group=NOBODY)
    try:
        st = os.lstat(path)
        assert (st.st_uid, st.st_gid) == (0, NOBODY)
    finally:
        sock.close()


def test_a_mode_that_cannot_be_given_is_a_fifo_error_and_no_socket_is_left(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # chmod() refused (a security module's policy, say): a FifoError that says what
    # could not be done, and the socket bound for it is gone again.
    path = tmp_path / "s.socket"

    def refusing_chmod(target, mode, *args, **kwargs):  # type: ignore[no-untyped-def]
        raise PermissionError(errno.EPERM, os.strerror(errno.EPERM), str(target))

    monkeypatch.setattr(os, "chmod", refusing_chmod)
    with pytest.raises(FifoError, match="cannot make the socket mode 0640") as raised:
        open_socket(str(path), mode=0o640)
    assert raised.value.errno == errno.EPERM
    assert not os.path.lexists(path)


def test_a_descriptor_to_take_over_that_is_not_open_is_a_fifo_error(
    tmp_path: pathlib.Path,
) -> None:
    # adopt= names a descriptor systemd kept (LISTEN_FDS): one that is not open is a
    # FifoError, for the server to bind a socket of its own; never a NameError.
    path = tmp_path / "s.socket"
    fd = os.open(os.devnull, os.O_RDONLY)
    os.close(fd)  # a number free now
    with pytest.raises(FifoError, match="cannot take over the socket given") as raised:
        open_socket(str(path), adopt=(fd, 10))
    assert raised.value.errno == errno.EBADF
    assert not os.path.lexists(path)


def test_a_stream_socket_bound_at_the_path_is_not_taken_over(tmp_path: pathlib.Path) -> None:
    # What systemd kept for the path must be the datagram socket: a stream socket bound
    # there (a unit's ListenStream= by mistake) is refused, and left open for its owner.
    path = tmp_path / "s.socket"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as stream:
        stream.bind(str(path))
        with pytest.raises(FifoError, match="not an AF_UNIX datagram socket"):
            open_socket(str(path), adopt=(stream.fileno(), 10))
        assert stream.fileno() >= 0
        assert stream.getsockname() == str(path)  # still open: never closed by the refusal


def test_a_socket_taken_over_is_served_as_one_bound_here(tmp_path: pathlib.Path) -> None:
    # The last server's socket, kept by systemd: taken over with what is queued on it,
    # given the mode and group asked for, asked for credentials (the sender is the
    # subject), and non-blocking (an empty queue is no wait for the loop).
    if os.geteuid() != 0:
        pytest.skip("only root may give any group")
    path = tmp_path / "s.socket"
    last = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    last.bind(str(path))
    last.setsockopt(socket.SOL_SOCKET, _SO_PASSCRED, 1)  # as the last server had it
    child = subprocess.Popen(["sleep", "60"])
    pidfd = os.pidfd_open(child.pid)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sender:
            sender.connect(str(path))
            socket.send_fds(sender, [arm(child.pid, scope="queued")], [pidfd])
            sock = open_socket(str(path), mode=0o620, group=NOBODY, adopt=(last.detach(), 7))
            try:
                assert sock.taken_over
                assert sock.queue_length == 7
                st = os.lstat(path)
                assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o620, 0, NOBODY)
                sender.send(arm(os.getpid(), scope="sent"))
                results = sock.receive()
                assert [(type(r).__name__, r.pid) for r in results] == [  # type: ignore[union-attr]
                    ("Timer", child.pid),
                    ("Timer", os.getpid()),
                ], results
                assert pidfd_pid(sock.vouched[child.pid]) == child.pid
                sock.release()
                assert sock.receive() == []  # nothing queued: returns at once
            finally:
                sock.close()
    finally:
        os.close(pidfd)
        child.kill()
        child.wait()
    assert not os.path.lexists(path)


def test_a_socket_to_take_over_whose_path_now_holds_a_file_is_refused(
    tmp_path: pathlib.Path,
) -> None:
    # The socket says it is bound at the path, but its file was removed and another put
    # there: it is no longer what senders reach. Refused, and the file left alone.
    path = tmp_path / "s.socket"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as last:
        last.bind(str(path))
        os.unlink(path)
        path.write_text("not a socket")
        with pytest.raises(FifoError, match="not bound there"):
            open_socket(str(path), adopt=(last.fileno(), 10))
        assert last.getsockname() == str(path)  # still open: the caller's to close
    assert path.read_text() == "not a socket"


def test_a_socket_let_go_is_closed_and_its_path_removed(tmp_path: pathlib.Path) -> None:
    # The last server's socket, not taken over (--no-socket): closed, and its path
    # removed, so that senders find no server there (and use the FIFO) rather than a
    # socket nobody reads.
    path = tmp_path / "s.socket"
    last = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    last.bind(str(path))
    fd = last.detach()
    forgo_socket(str(path), fd)
    assert not is_open(fd)
    assert not os.path.lexists(path)


def test_a_socket_let_go_leaves_what_is_not_its_own_at_the_path(tmp_path: pathlib.Path) -> None:
    # Only a socket of this user's is removed: whatever else took its place (a file,
    # another user's socket) is left. The descriptor is closed all the same.
    path = tmp_path / "s.socket"
    for replace in ("file", "other user's socket"):
        if replace == "other user's socket" and os.geteuid() != 0:
            continue
        last = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        last.bind(str(path))
        os.unlink(path)
        other = None
        if replace == "file":
            path.write_text("x")
        else:
            other = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            other.bind(str(path))
            os.chown(path, NOBODY, NOBODY)
        fd = last.detach()
        forgo_socket(str(path), fd)
        assert not is_open(fd), replace
        assert os.path.lexists(path), replace
        os.unlink(path)
        if other is not None:
            other.close()


def test_a_socket_let_go_that_is_bound_elsewhere_leaves_the_path_alone(
    tmp_path: pathlib.Path,
) -> None:
    path = tmp_path / "s.socket"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as other:
        other.bind(str(path))
        last = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        last.bind(str(tmp_path / "elsewhere.socket"))
        fd = last.detach()
        forgo_socket(str(path), fd)
        assert not is_open(fd)
        assert os.path.lexists(path)


@needs_unix_diag
def test_a_socket_let_go_leaves_a_live_socket_bound_at_its_path_since(
    tmp_path: pathlib.Path,
) -> None:
    path = tmp_path / "s.socket"
    last = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    last.bind(str(path))
    os.unlink(path)
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as other:
        other.bind(str(path))  # a live process's now: it answers
        fd = last.detach()
        forgo_socket(str(path), fd)
        assert not is_open(fd)
        assert os.path.lexists(path)


def test_letting_go_of_a_descriptor_that_is_no_socket_closes_it_and_never_raises(
    tmp_path: pathlib.Path,
) -> None:
    path = tmp_path / "s.socket"
    path.write_text("x")
    fd = os.open(os.devnull, os.O_RDONLY)
    forgo_socket(str(path), fd)  # not a socket: socket.socket(fileno=) refuses it
    assert not is_open(fd)
    assert path.read_text() == "x"
    forgo_socket(str(path), fd)  # not open at all: nothing to do, no exception


def test_a_socket_shut_for_reading_is_told_from_one_that_is_not(tmp_path: pathlib.Path) -> None:
    # A server killed as it stopped left its socket shut for reading (stop_receiving):
    # sends to it fail, and the next server binds a new one rather than take it over.
    sock = open_socket(str(tmp_path / "s.socket"))
    try:
        assert not shut_for_reading(sock.fd)
        sock.stop_receiving()
        assert shut_for_reading(sock.fd)
    finally:
        sock.close()


def test_a_socket_to_take_over_whose_path_is_gone_is_a_fifo_error(tmp_path: pathlib.Path) -> None:
    # Its file removed since (a cleanup of the runtime directory): what cannot be
    # examined is a FifoError (the server binds a new socket), with the errno, never a
    # bare FileNotFoundError; the caller's descriptor is left open.
    path = tmp_path / "s.socket"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as last:
        last.bind(str(path))
        os.unlink(path)
        with pytest.raises(FifoError, match="cannot take over the socket given") as raised:
            open_socket(str(path), adopt=(last.fileno(), 10))
        assert raised.value.errno == errno.ENOENT
        assert last.getsockname() == str(path)


def test_a_kernel_without_sender_pidfds_is_said_so_and_its_senders_served(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Before Linux 6.5 SO_PASSPIDFD is refused (ENOPROTOOPT). The socket then says it
    # passes no pidfds: taken for one that does, every datagram (none comes with a
    # pidfd of its sender) was refused as from a sender gone.
    real = socket.socket.setsockopt

    def before_6_5(self, level, option, *args):  # type: ignore[no-untyped-def]
        if level == socket.SOL_SOCKET and option == _SO_PASSPIDFD:
            raise OSError(errno.ENOPROTOOPT, os.strerror(errno.ENOPROTOOPT))
        return real(self, level, option, *args)

    monkeypatch.setattr(socket.socket, "setsockopt", before_6_5)
    sock = open_socket(str(tmp_path / "s.socket"))
    try:
        assert not sock.passes_pidfds
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sender:
            sender.connect(sock.path)
            sender.send(arm(os.getpid()))
        results = sock.receive()
    finally:
        sock.close()
    assert [(type(r).__name__, r.pid) for r in results] == [("Timer", os.getpid())], results  # type: ignore[union-attr]


def test_a_stream_socket_bound_and_never_listening_is_replaced(tmp_path: pathlib.Path) -> None:
    # A datagram probe of a stream socket fails as the wrong type (EPROTOTYPE), which
    # says nothing of whether anyone is there: it is asked again as a stream socket, and
    # one that refuses (bound, never listening) is left over, and replaced.
    path = tmp_path / "s.socket"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as stale:
        stale.bind(str(path))
        sock = open_socket(str(path))
        try:
            assert stat.S_ISSOCK(os.lstat(path).st_mode)
            assert sock.at_path()
        finally:
            sock.close()
