"""The FIFO writer: a non-blocking descriptor, one ``write()`` per line.

A write of at most PIPE_BUF bytes with O_NONBLOCK is atomic: all of it, or EAGAIN. The
reader leaving shows as EPIPE; a server that recreated its FIFO while something still
holds the old one open shows only as the old pipe filling up, so the path's inode is
compared with the descriptor's then (never per message).

A write to a pipe nobody reads also raises SIGPIPE in the writing thread, which kills a
process whose SIGPIPE is not ignored (Python ignores it at startup; a CLI tool that puts
back the default, or a host embedding Python, may not), and a FIFO write has no
MSG_NOSIGNAL. So when SIGPIPE is not ignored at connection, every write goes through
``write()``, which blocks SIGPIPE in the calling thread around it and takes back the
SIGPIPE the write raised (never one that was already pending): the reader leaving is
then EPIPE, as with SIGPIPE ignored. Blocking and unblocking costs two system calls per
message, so a process that ignores SIGPIPE (every Python program by default) keeps its
one ``os.write()`` per message on ``hot_fd``.
"""

from __future__ import annotations

import errno
import os
import select
import signal
import stat
import time
from typing import Callable, Tuple

from ._errors import ServerStalled, ServerUnavailable
from ._paths import hidden_system_dir
from ._signals import getsignal, sigmask
from ._writer import ConnectionLost, is_fifo, is_socket, owns, poll_ms, poll_room

__all__ = ["FifoWriter"]


class FifoWriter:
    """An open FIFO (see ``Writer``).

    Args:
        path: the FIFO.
        check_replaced: on a full pipe, check whether the path now names another FIFO
            (a descriptor kept open across messages; pointless for one opened just now).
        or_socket: a socket would have done too (transport "auto"): said when there is
            nothing at the path.

    Raises:
        ServerUnavailable: the FIFO cannot be opened (no FIFO, no reader, not a FIFO,
            permission denied).
    """

    kind = "fifo"

    def __init__(self, path: str, *, check_replaced: bool = True, or_socket: bool = False) -> None:
        self.path = path
        self._check_replaced = check_replaced
        try:
            fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as e:
            raise _unavailable(e, path, "FIFO or socket" if or_socket else "FIFO") from e
        try:
            st = os.fstat(fd)
            if not stat.S_ISFIFO(st.st_mode):
                raise ServerUnavailable(errno.EINVAL, "not a FIFO", path)
            # SIGPIPE not ignored: each write blocks it, so none may go to the hot path.
            # A descriptor kept open looks at the kernel's disposition (a host embedding
            # Python may have changed it behind Python's back); one opened per message,
            # only at Python's (a read of /proc per message would cost more than the
            # write).
            self._guard = not sigpipe_ignored(thorough=check_replaced)
        except BaseException:
            # Let go of at once, on a KeyboardInterrupt too: the collector never would
            # (``__del__`` closes a descriptor the writer keeps, and it kept none yet).
            os.close(fd)
            raise
        self._fd = fd
        self._inode = (st.st_dev, st.st_ino)
        self.hot_fd = -1 if self._guard else fd

    def write(self, line: bytes, timeout: float) -> None:
        """Write ``line`` (at most PIPE_BUF bytes) in one ``write()``, waiting up to
        ``timeout`` seconds for room in a full pipe.

        Raises:
            ConnectionLost: the reader left (EPIPE), or the path names another FIFO now.
            ServerStalled: the pipe stayed full for ``timeout`` seconds.
            ServerUnavailable: another error.
        """
        if not self._guard:
            try:
                self._write(line, timeout)
            except _ReaderGone:
                raise ConnectionLost from None
            return
        # SIGPIPE blocked in this thread while it writes: an EPIPE's SIGPIPE stays
        # pending, and is taken back unless one was pending already (blocked before:
        # not this write's to take). The mask is read apart, before the try that puts it
        # back: the call that blocks SIGPIPE runs pending handlers once it has, and one
        # that raised would leave SIGPIPE blocked (see ``sigmask``).
        was_blocked = signal.SIGPIPE in sigmask(signal.SIG_BLOCK, ())
        try:
            if not was_blocked:
                sigmask(signal.SIG_BLOCK, _SIGPIPE)
            pending = was_blocked and signal.SIGPIPE in signal.sigpending()
            try:
                self._write(line, timeout)
            except _ReaderGone:
                if not pending:
                    signal.sigtimedwait(_SIGPIPE, 0)
                raise ConnectionLost from None
        finally:
            if not was_blocked:
                sigmask(signal.SIG_UNBLOCK, _SIGPIPE)

    def _write(self, line: bytes, timeout: float) -> None:
        """``write``, SIGPIPE taken care of by the caller.

        Raises:
            _ReaderGone: EPIPE (not ConnectionLost: the caller takes its SIGPIPE first).
            ConnectionLost: the path names another FIFO now.
            ServerStalled, ServerUnavailable: as ``write``.
        """
        if self._attempt(line):
            return
        if self._check_replaced and self._replaced():
            raise ConnectionLost
        if not _wait_for_room(self._fd, timeout, lambda: self._attempt(line)):
            raise ServerStalled(
                errno.EAGAIN,
                "the ftimer server has not drained the FIFO within the write timeout",
                self.path,
            )

    def _attempt(self, line: bytes) -> bool:
        """Raises _ReaderGone (EPIPE), ServerUnavailable."""
        try:
            os.write(self._fd, line)
            return True
        except BlockingIOError:
            return False
        except BrokenPipeError:
            raise _ReaderGone from None
        except OSError as e:
            raise ServerUnavailable(e.errno, f"cannot write ({e.strerror})", self.path) from e

    def _replaced(self) -> bool:
        """Whether the path names another file now. Not when it names nothing this
        process can look at: a process that dropped its privileges or chrooted, or a FIFO
        removed while its server reads on (by a cleaner of ``/tmp``), still reaches the
        server through the descriptor; a server gone shows as the pipe's error."""
        try:
            st = os.stat(self.path)
        except OSError:
            return False
        return (st.st_dev, st.st_ino) != self._inode

    @property
    def end(self) -> Tuple[int, int]:
        """The FIFO's (device, inode) (see ``Writer``)."""
        return self._inode

    def wait_room(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for room in the pipe (see ``Writer``)."""
        return poll_room(self._fd, timeout)

    def wait_read(self, timeout: float) -> bool:
        """True: a FIFO's line names its subject by pid, whoever wrote it and whether or
        not the writer still lives when the server reads it."""
        return True

    def owned(self) -> bool:
        """Whether the descriptor is still the FIFO's (see ``Writer``)."""
        return owns(self._fd, self._inode)

    def lost(self) -> bool:
        """Whether the FIFO has no reader any more (it polls in error), the path names
        another one, or the descriptor is no longer the FIFO's (see ``Writer``)."""
        if not self.owned():
            return True
        poller = select.poll()
        poller.register(self._fd, select.POLLOUT)
        return any(event & select.POLLERR for _, event in poller.poll(0)) or self._replaced()

    def close(self) -> None:
        """Close the descriptor (idempotent), unless it is not the FIFO's any more: code
        that did not own it closed it, and the number may be another file's now."""
        self.hot_fd = -1
        fd, self._fd = self._fd, -1
        if owns(fd, self._inode):
            os.close(fd)

    def __del__(self) -> None:
        if getattr(self, "_fd", -1) >= 0:
            self.close()


_SIGPIPE = frozenset((signal.SIGPIPE,))


class _ReaderGone(Exception):
    """A write failed with EPIPE (not a BrokenPipeError: ``ServerUnavailable`` is one)."""


def sigpipe_ignored(*, thorough: bool = True) -> bool:
    """Whether SIGPIPE is ignored in this process, so a write to a pipe nobody reads is
    only EPIPE.

    Python's view first (``signal.getsignal``: what Python found at startup or set
    since); when that says ignored and ``thorough``, the kernel's (``SigIgn`` of
    /proc/self/status), which C code of a host embedding Python may have changed
    behind Python's back. Unreadable /proc: Python's view.
    """
    if getsignal(signal.SIGPIPE) != signal.SIG_IGN:
        return False
    if not thorough:
        return True
    try:
        with open("/proc/self/status", "rb") as f:
            for row in f:
                if row.startswith(b"SigIgn:"):
                    return bool(int(row[7:], 16) >> (signal.SIGPIPE - 1) & 1)
    except (OSError, ValueError):
        pass
    return True


def _unavailable(e: OSError, path: str, what: str) -> ServerUnavailable:
    if e.errno == errno.ENXIO:
        if is_socket(path):
            reason = (
                "a socket, not a FIFO: this client was told to use a FIFO (transport "
                "'fifo', or protocol 1: torch's format is spoken over a FIFO only)"
            )
        else:
            reason = "no ftimer server is reading the FIFO"
    elif e.errno == errno.ENOENT:
        reason = f"no {what} (is the ftimer server running?)" + hidden_system_dir(path)
    elif e.errno == errno.EACCES:
        if is_fifo(path):  # else its directory hides what it is
            what = "FIFO"
        reason = (
            f"this user may not write the {what}, or enter its directory (permission "
            "denied): the server's --fifo-mode and --fifo-group say who may"
        )
    else:
        reason = f"cannot open the FIFO ({e.strerror})"
    return ServerUnavailable(e.errno, reason, path)


def _wait_for_room(fd: int, timeout: float, attempt: Callable[[], bool]) -> bool:
    """Poll ``fd`` for POLLOUT and call ``attempt`` each time it may have room, until it
    returns True or ``timeout`` seconds have passed; return whether it succeeded.

    ``attempt`` raises what it raises (the writer's own errors).
    """
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    end = time.monotonic() + timeout
    remaining = timeout
    while remaining > 0:
        poller.poll(poll_ms(remaining))
        if attempt():
            return True
        remaining = end - time.monotonic()
    return False
