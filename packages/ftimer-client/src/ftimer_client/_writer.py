"""What a channel needs of a transport: one thin writer per transport (``_fifo``,
``_socket``), each holding every OS call of its transport and the errors they raise.

A writer delivers one line per call, whole or not at all (one ``write()`` of at most
PIPE_BUF bytes on a FIFO, one datagram on the socket), waits a bounded time for room,
and says how it failed: ``ConnectionLost`` when the server went away or replaced its
FIFO or socket (reconnect and resynchronise), ``ServerUnavailable`` otherwise.
"""

from __future__ import annotations

import math
import os
import select
import stat
from typing import Protocol, Tuple

__all__ = [
    "ConnectionLost",
    "Writer",
    "identity",
    "is_fifo",
    "is_socket",
    "owns",
    "poll_ms",
    "poll_room",
]


class ConnectionLost(Exception):
    """The server went away, or replaced its FIFO or socket: reconnect, then resync."""


class Writer(Protocol):
    """One open connection to a server, over one transport."""

    #: "fifo" or "socket".
    kind: str
    #: The path connected to.
    path: str
    #: A descriptor on which one ``os.write(hot_fd, line)`` delivers ``line`` (the hot
    #: path), or -1 when every line must go through ``write()``.
    hot_fd: int

    @property
    def end(self) -> Tuple[int, int]:
        """The (device, inode) of the server's FIFO or socket file connected to."""

    def write(self, line: bytes, timeout: float) -> None:
        """Deliver ``line``, waiting up to ``timeout`` seconds for room.

        Raises:
            ConnectionLost: the server went away or replaced its end.
            ServerUnavailable: not delivered (``ServerStalled``: no room in time).
        """

    def wait_room(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds until a line may find room; return whether it
        may (True at once once closed). Sends nothing, and may be called without the
        channel's lock (the retry thread's wait): a writer closed meanwhile by another
        thread only ends the wait early, or lets it run to ``timeout``."""

    def wait_read(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds until the server has read every line this
        writer delivered; return whether it has (True at once where that does not
        matter: a FIFO's line names its subject by pid)."""

    def owned(self) -> bool:
        """Whether the connection's descriptor is still the writer's: not once code that
        did not own it closed it (``os.closerange()``), and its number may name another
        file since. One ``fstat()``: the hot path does not ask."""

    def lost(self) -> bool:
        """Whether the server's end is gone (its reader exited, or the path names
        another FIFO or socket now), or the descriptor is not the writer's any more
        (``owned``): the next write would say so, or go astray. Sends nothing, so it
        takes no room from the lines of a server that is only slow."""

    def close(self) -> None:
        """Let go of the connection (idempotent), closing only the descriptors that are
        still its own."""


def identity(fd: int) -> Tuple[int, int]:
    """The (device, inode) ``fd`` names, to tell later whether it still does (``owns``).

    Raises:
        OSError: as fstat().
    """
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


def owns(fd: int, what: Tuple[int, int]) -> bool:
    """Whether descriptor ``fd`` still names ``what`` (its ``identity`` when opened):
    not once code that does not own it closed it, or made the number name another file
    (``os.closerange()``, then an ``open()`` that got the number)."""
    try:
        return fd >= 0 and identity(fd) == what
    except OSError:
        return False


def is_socket(path: str) -> bool:
    """Whether a socket is at ``path`` (following symlinks); False if nothing is."""
    try:
        return stat.S_ISSOCK(os.stat(path).st_mode)
    except OSError:
        return False


def is_fifo(path: str) -> bool:
    """Whether a FIFO is at ``path`` (following symlinks); False if nothing is."""
    try:
        return stat.S_ISFIFO(os.stat(path).st_mode)
    except OSError:
        return False


#: The most milliseconds ``poll()`` takes (a C int, about 24.8 days): more raises
#: OverflowError, and ``write_timeout`` may be longer.
_MAX_POLL_MS = 2**31 - 1


def poll_ms(timeout: float) -> int:
    """Return ``timeout`` seconds as ``poll()``'s milliseconds: rounded up, and within
    0 to ``_MAX_POLL_MS`` (a caller that must wait longer polls again)."""
    return max(0, math.ceil(min(timeout * 1000, _MAX_POLL_MS)))


def poll_room(fd: int, timeout: float) -> bool:
    """Wait up to ``timeout`` seconds (at most about 24.8 days, see ``poll_ms``) until
    ``fd`` polls writable (or in error, or closed: the next write says what happened);
    return whether it did. -1: True."""
    if fd < 0:
        return True
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    return bool(poller.poll(poll_ms(timeout)))
