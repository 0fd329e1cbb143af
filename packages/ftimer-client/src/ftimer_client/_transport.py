"""Which writer a route gets: decided at each connection by what is on disk then.

``"fifo"`` and ``"socket"`` are what they say. ``"auto"`` takes the preferred socket when
one is there (the socket beside a FIFO found by the default resolution) and a server is
bound to it, else what is at the path: a socket, or else a FIFO (whose opening reports
anything else).
"""

from __future__ import annotations

import errno
import os
from typing import Callable

from ._errors import ServerUnavailable
from ._fifo import FifoWriter
from ._paths import Route
from ._socket import SocketWriter
from ._writer import Writer, is_socket

__all__ = ["open_writer"]


def open_writer(route: Route, *, keep_open: bool, pidfd: Callable[[], int]) -> Writer:
    """Connect to the server ``route`` names.

    Args:
        keep_open: the connection is kept across messages (protocol 2): a FIFO writer
            then watches for a replaced FIFO.
        pidfd: returns the pidfd the socket sends with every datagram, or -1 for none;
            called only for a socket.

    Raises:
        ServerUnavailable: nothing can be connected to (see the writers), or the
            per-user default's directory is another user's.
    """
    if route.owner is not None:
        _check_owner(route.path, route.owner)
    if route.transport == "auto":
        if route.prefer is not None and is_socket(route.prefer):
            try:
                return SocketWriter(route.prefer, pidfd())
            except ServerUnavailable as refused:
                # Bound to nobody (a server restarted with --no-socket leaves the file):
                # the FIFO beside it, if a server reads that; else the socket's refusal.
                if refused.errno != errno.ECONNREFUSED:
                    raise
                try:
                    return FifoWriter(route.path, check_replaced=keep_open, or_socket=True)
                except ServerUnavailable:
                    raise refused from None
        if is_socket(route.path):
            return SocketWriter(route.path, pidfd())
        return FifoWriter(route.path, check_replaced=keep_open, or_socket=True)
    if route.transport == "socket":
        return SocketWriter(route.path, pidfd())
    return FifoWriter(route.path, check_replaced=keep_open)


def _check_owner(path: str, owner: int) -> None:
    """Refuse the per-user default ``path`` if its directory is not ``owner``'s: another
    user who made it first (``/tmp/ftimer-UID`` is a guessable name in a directory all
    may write) would read every timer sent there, and the worker would go unwatched.

    Raises:
        ServerUnavailable: (EPERM) the directory is another user's.
    """
    directory = os.path.dirname(path)
    try:
        uid = os.lstat(directory).st_uid
    except OSError:  # nothing there: opening the path says so
        return
    if uid != owner:
        raise ServerUnavailable(
            errno.EPERM,
            f"its directory {directory} is uid {uid}'s, not this user's ({owner}): another "
            "user made it, and would read these timers; remove it, or give the server's "
            "path ($FTIMER_FIFO)",
            path,
        )
