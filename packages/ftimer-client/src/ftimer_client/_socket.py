"""The socket writer: a non-blocking AF_UNIX datagram socket, connected once, one
datagram per line (docs/protocol.md, "Socket binding").

The server learns the sender's pid and uid from the kernel, so on the socket the timers
a process arms are its own whatever pid its messages name. To arm timers of another
process (what the ``ftimer`` command does for its parent shell or for the command it
runs), every datagram carries a pidfd of that process (SCM_RIGHTS), opened once: it keeps
naming that process even if the pid is reused later.

How the server's end shows here: no file at the path, ENOENT; a file nobody is bound to
(the server died or is restarting), ECONNREFUSED; a full receive queue (a stopped or
stalled server), EAGAIN, and a blocking send waits for room. A server that restarted
bound a new socket: the old connection's next send is refused (ECONNREFUSED, then
ENOTCONN), and a server that replaced its socket while the old one lives on (stopped)
shows as a full queue and another inode at the path, checked only then.
"""

from __future__ import annotations

import errno
import os
import select
import signal
import socket
import stat
import struct
import time
from typing import Tuple

from ftimer_protocol import Sync, encode

from ._errors import ServerStalled, ServerUnavailable
from ._paths import hidden_system_dir
from ._signals import BLOCKABLE, sigmask
from ._writer import ConnectionLost, identity, is_socket, owns, poll_ms, poll_room

__all__ = ["SocketWriter", "open_pidfd"]

# Errors of a send that mean the server's end is gone: reconnect.
_LOST = frozenset(
    (errno.ECONNREFUSED, errno.ENOTCONN, errno.ECONNRESET, errno.EPIPE, errno.EDESTADDRREQ)
)
#: Times a sender yields the CPU, retrying, before it waits for room in a full queue.
_YIELDS = 2
_TIMEVAL = struct.Struct("@ll")  # struct timeval, for SO_SNDTIMEO
#: The datagram whose descriptor (a pipe's write end) the server writes a byte into once
#: it has applied every datagram before it: a sender's receipt (``SocketWriter.wait_read``).
_RECEIPT = encode(Sync(token="ftimer-receipt"))
#: The longest path an AF_UNIX socket can be reached at: ``sun_path``'s 108 bytes, less
#: the NUL Python's socket module keeps room for (it refuses 108, errno None).
_SUN_PATH = 107


class SocketWriter:
    """A datagram socket connected to the server's (see ``Writer``).

    Args:
        path: the server's socket.
        pidfd: a pidfd sent with every datagram (the process the timers are for), or -1
            for none (the sender's own timers).

    Raises:
        ServerUnavailable: no socket at the path, nobody bound to it, not a datagram
            socket, permission denied.
    """

    kind = "socket"

    def __init__(self, path: str, pidfd: int = -1) -> None:
        self.path = path
        self._pidfd = pidfd
        self._file = -1
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        try:
            sock.setblocking(False)
            # The inode first: a socket replaced after this is noticed, never the reverse.
            # Held (O_PATH) while connected: a file system may give a socket bound anew
            # the number of one unlinked (ext4), and the new one would pass for the old.
            self._file, self._inode = _pin(path)
            _connect(sock, path)
            self._identity = identity(sock.fileno())  # to tell it is still ours (owned)
        except BaseException as e:
            # Let go of at once, on a KeyboardInterrupt too: the collector would close
            # the socket with a ResourceWarning, and hold the file until it ran.
            sock.close()
            self._unpin()
            if isinstance(e, OSError) and not isinstance(e, ServerUnavailable):
                raise _unavailable(e, path) from e
            raise  # ServerUnavailable is said in its own words already
        self._sock = sock
        # write() on a connected datagram socket sends one datagram, as send() does, at
        # the cost of os.write: the hot path is the FIFO's. Not with a pidfd to attach.
        self.hot_fd = sock.fileno() if pidfd < 0 else -1

    @property
    def end(self) -> Tuple[int, int]:
        """The socket file's (device, inode) (see ``Writer``)."""
        return self._inode

    def write(self, line: bytes, timeout: float) -> None:
        """Send ``line`` as one datagram, waiting up to ``timeout`` seconds for room in a
        full queue.

        Raises:
            ConnectionLost: the server's socket is gone (it died or restarted).
            ServerStalled: the server's queue stayed full for ``timeout`` seconds.
            ServerUnavailable: another error.
        """
        self._send(line, timeout, self._pidfd)

    def _send(self, line: bytes, timeout: float, fd: int) -> None:
        """``write``, with descriptor ``fd`` attached to the datagram (-1: none)."""
        if self._attempt(line, fd):
            return
        if self._replaced():
            raise ConnectionLost
        # A full queue is usually one the server is draining: yielding the CPU lets it
        # run if it shares this one, and the retry then finds room without the sleep and
        # wake-up of a wait (4 senders on 2 cores, to a reader that only receives: 236k
        # datagrams/s read, 139k without).
        for _ in range(_YIELDS):
            os.sched_yield()
            if self._attempt(line, fd):
                return
        if not self._send_waiting(line, timeout, fd):
            raise ServerStalled(
                errno.EAGAIN,
                "the ftimer server has not drained its socket within the write timeout",
                self.path,
            )

    def _send_waiting(self, line: bytes, timeout: float, fd: int) -> bool:
        """Send ``line``, blocking up to ``timeout`` seconds for room; False if none came.

        A blocking send waits in the kernel's queue of senders to the server's socket,
        each woken alone as a datagram is read; poll(POLLOUT) would wake every waiting
        sender at each datagram, and with 16 of them the server spent 4x as long per
        datagram waking them as reading it (to a reader that only receives: 39k datagrams/s
        read, 118k this way).

        Raises:
            ConnectionLost, ServerUnavailable: as ``write``.
        """
        if timeout < 1e-6:  # SO_SNDTIMEO's zero would wait forever
            return False
        # At most a year: the seconds must fit a timeval, and that is forever here.
        seconds, fraction = divmod(min(timeout, 365 * 86400.0), 1.0)
        sock = self._sock
        timeval = _TIMEVAL.pack(int(seconds), int(fraction * 1e6))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)
        # Python restarts a send a signal interrupted (PEP 475), with the whole of
        # SO_SNDTIMEO again: signals arriving faster than the timeout would keep it
        # waiting for good. So the signals that can interrupt it are blocked in this
        # thread while it waits, and delivered (their handlers run) once it returns: the
        # wait is SO_SNDTIMEO's, at most ``timeout``. The mask is read apart, before the
        # try that puts it back: the call that blocks them runs pending handlers once it
        # has, and one that raised would leave them blocked for good (see ``sigmask``).
        old_mask = sigmask(signal.SIG_BLOCK, ())
        try:
            sigmask(signal.SIG_BLOCK, BLOCKABLE)  # while the send waits for room
            sock.setblocking(True)  # the channel's lock is held: no other thread sends here
            try:
                return self._attempt(line, fd)  # EAGAIN: the time ran out
            finally:
                sock.setblocking(False)
        finally:
            sigmask(signal.SIG_SETMASK, old_mask)

    def wait_room(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for room in the server's queue (see ``Writer``):
        a connected datagram socket polls writable once the peer's queue has room."""
        return poll_room(self._sock.fileno(), timeout)

    def wait_read(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds until the server has read and applied every
        datagram sent here; return whether it has.

        Only a sender about to exit needs it (the ``ftimer`` command): the server refuses
        a datagram naming another process if its sender has exited by the time it judges
        it (it can no longer check their kinship), a moment after reading it. So a sync
        datagram follows, carrying a pipe's write end, into which the server writes a
        byte once it has applied every datagram before it, and which it then closes
        (docs/protocol.md, "Socket binding"): that byte is the receipt.

        Raises:
            ServerUnavailable: as ``write`` (not when the time runs out, nor when the
                server has gone: False).
        """
        end = time.monotonic() + timeout
        read_end, write_end = os.pipe2(os.O_CLOEXEC)
        try:
            try:
                self._send(_RECEIPT, timeout, write_end)
            except (ConnectionLost, ServerStalled):  # what came before went with it
                return False
            finally:
                os.close(write_end)
            poller = select.poll()
            poller.register(read_end, select.POLLIN)
            if not poller.poll(poll_ms(end - time.monotonic())):
                return False
            # An end of file alone is a receipt closed unread: by the kernel, the server
            # out of descriptors (MSG_CTRUNC) or gone with the datagram in its queue.
            return os.read(read_end, 1) != b""
        finally:
            os.close(read_end)

    def lost(self) -> bool:
        """Whether no server reads the socket this writer sends to any more, the path
        names another socket, or the descriptor is no longer this writer's socket (see
        ``Writer``): a probe connects, and sends nothing."""
        return not self.owned() or not self._bound()

    def owned(self) -> bool:
        """Whether the descriptor is still this writer's socket (see ``Writer``)."""
        return owns(self._sock.fileno(), self._identity)

    def _bound(self) -> bool:
        """Whether a server still reads the socket this writer sends to: yes, too, where
        the probe cannot tell (no descriptor left for it, say), or a path this process
        cannot look at (see ``_replaced``)."""
        try:
            if _inode(self.path) != self._inode:
                return False
        except OSError:
            return True
        try:
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        except OSError:  # EMFILE, ENOBUFS
            return True
        try:
            _connect(probe, self.path)  # through its directory, as the writer's own
        except (ConnectionRefusedError, FileNotFoundError):  # nobody reads it any more
            return False
        except OSError:  # ServerUnavailable (a path too long even so) too
            return True
        finally:
            probe.close()
        return True

    def _attempt(self, line: bytes, fd: int) -> bool:
        """Send ``line``, with descriptor ``fd`` unless it is -1; False when the queue is
        full.

        Raises:
            ConnectionLost, ServerUnavailable: as ``write``.
        """
        try:
            if fd < 0:
                self._sock.send(line)
            else:
                socket.send_fds(self._sock, [line], [fd])
            return True
        except BlockingIOError:
            return False
        except OSError as e:
            if e.errno in _LOST:
                raise ConnectionLost from None
            reason = f"cannot send ({e.strerror})"
            if e.errno == errno.EPERM and fd >= 0:
                reason = (
                    "the server probably refuses descriptors for now (too many that senders "
                    "passed it wait to be closed: see its log; a security module may also "
                    "deny passing them), so no timer of another process can be sent over "
                    "its socket meanwhile"
                )
            raise ServerUnavailable(e.errno, reason, self.path) from e

    def _replaced(self) -> bool:
        """Whether the path names another file now (as the FIFO's: not when it names
        nothing this process can look at)."""
        try:
            return _inode(self.path) != self._inode
        except OSError:
            return False

    def _unpin(self) -> None:
        fd, self._file = self._file, -1
        if fd >= 0 and owns(fd, self._inode):  # else closed under it: not its own now
            os.close(fd)

    def close(self) -> None:
        """Close the socket (idempotent), unless its descriptor was closed under it (the
        number may be another file's now); a pidfd given to it is not its to close."""
        self.hot_fd = -1
        sock = self._sock
        if sock.fileno() >= 0 and not self.owned():
            sock.detach()
        sock.close()
        self._unpin()

    def __del__(self) -> None:
        # A client dropped without close() lets go of its connection quietly, as the
        # FIFO writer does (no ResourceWarning from the socket).
        if getattr(self, "_sock", None) is not None:
            self.close()
        elif getattr(self, "_file", -1) >= 0:
            self._unpin()


def open_pidfd(pid: int) -> int:
    """Return a new pidfd of process ``pid`` (close-on-exec).

    Raises:
        ServerUnavailable: the process does not exist, or this system has no pidfds
            (Linux 5.3, Python 3.9): another process's timers cannot be sent over the
            socket, only over a FIFO.
    """
    pidfd_open = getattr(os, "pidfd_open", None)
    try:
        if pidfd_open is None:
            raise OSError(errno.ENOSYS, "os.pidfd_open is missing")
        fd: int = pidfd_open(pid)
    except OSError as e:
        if e.errno == errno.ESRCH:
            reason = f"process {pid} does not exist, so no timer of it can be armed"
        else:
            reason = (
                f"cannot name process {pid} to the server: pidfd_open: {e.strerror} (over "
                "the socket, another process's timers need a pidfd; use the FIFO instead)"
            )
        raise ServerUnavailable(e.errno, reason, f"/proc/{pid}") from e
    return fd


def _connect(sock: socket.socket, path: str) -> None:
    """Connect ``sock`` to the socket at ``path``, however long the path.

    An AF_UNIX address holds at most ``_SUN_PATH`` bytes of path: a longer one (a
    server's directory mounted deep inside a container) is reached through a descriptor
    of its directory, as ``/proc/self/fd/N/NAME``.

    Raises:
        OSError: as connect().
        ServerUnavailable: the path is too long even so (ENAMETOOLONG).
    """
    if len(os.fsencode(path)) <= _SUN_PATH:
        sock.connect(path)
        return
    directory, name = os.path.split(path)
    short = f"/proc/self/fd/{{}}/{name}"
    if len(os.fsencode(short.format(2**31 - 1))) <= _SUN_PATH and os.path.isdir("/proc/self/fd"):
        dirfd = os.open(directory or ".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            sock.connect(short.format(dirfd))
        finally:
            os.close(dirfd)
        return
    raise ServerUnavailable(
        errno.ENAMETOOLONG,
        f"the socket's path is {len(os.fsencode(path))} bytes, longer than an AF_UNIX "
        f"address holds ({_SUN_PATH}), and cannot be reached through its directory: "
        "give the server a socket at a shorter path",
        path,
    )


def _inode(path: str) -> Tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


def _pin(path: str) -> Tuple[int, Tuple[int, int]]:
    """Open the socket file at ``path`` to hold its inode (``O_PATH``: no I/O, any file
    type; -1 where there is none, or no descriptor left for it: the inode is then only
    read), and return the descriptor and the inode.

    Raises:
        OSError: as stat().
    """
    try:
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    except (AttributeError, OSError):  # no O_PATH (macOS); no descriptor left (EMFILE)
        return -1, _inode(path)
    return fd, identity(fd)


def _what_is(path: str) -> str:
    """What is at ``path``, in words: "a FIFO", "a directory", "a regular file"..."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return "nothing that can be looked at"
    for test, words in (
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISREG, "a regular file"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
    ):
        if test(mode):
            return words
    return "another kind of file"


def _unavailable(e: OSError, path: str) -> ServerUnavailable:
    if e.errno == errno.ENOENT:
        reason = "no socket (is the ftimer server running?)" + hidden_system_dir(path)
    elif e.errno == errno.ECONNREFUSED and not is_socket(path):
        reason = f"not a socket but {_what_is(path)} (this client was told to use a socket)"
    elif e.errno == errno.ECONNREFUSED:
        reason = (
            "no ftimer server is bound to the socket (it stopped, or is restarting: it "
            "binds again when it starts)"
        )
    elif e.errno == errno.EACCES:
        reason = (
            "this user may not write the socket, or enter its directory (permission "
            "denied): the server's --fifo-mode and --fifo-group say who may"
        )
    elif e.errno == errno.EPROTOTYPE:
        reason = "not an ftimer server's socket (not a datagram socket)"
    else:
        reason = f"cannot connect to the socket ({e.strerror})"
    return ServerUnavailable(e.errno, reason, path)
