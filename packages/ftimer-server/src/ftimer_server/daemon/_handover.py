"""What one daemon hands the next through systemd's file descriptor store: its FIFO and
its socket, held open between the two, so that what was written to them while no daemon
read is read by the next one.

A pipe's unread lines die with its last descriptor, and torch's clients (ftimer's with
protocol 1, the ``ftimer`` command) hold none between lines; a socket's queued datagrams
die with it, whoever sent them: a disarm written while the daemon stalled, then was
killed, would be lost, and the next daemon would restore the timer and reap the worker
that had disarmed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import stat
from typing import Optional, Tuple

from ftimer_server.server._sockdiag import reached_at
from ftimer_server.server._socket import DatagramSocket, shut_for_reading

from ._systemd import SystemdNotifier, stored_fds

__all__ = ["keep_for_next", "take_stored_socket"]

log = logging.getLogger("ftimer_server.daemon")

#: The socket's name in the store, followed by its queue length (which the kernel keeps
#: with the socket, and a new one bound at its path must be made with).
_SOCKET_NAME = "socket-q"


def take_stored_socket(path: Optional[str]) -> Optional[Tuple[int, int]]:
    """The last daemon's socket and its queue length, if systemd kept it open
    (``keep_for_next``: a daemon killed, not stopped) and it is bound at ``path`` (this
    daemon's socket path, absolute), which still names a socket: the server takes it
    over, with what is queued on it. Any other socket systemd kept is closed here, and by
    systemd at ``keep_for_next``."""
    taken: Optional[Tuple[int, int]] = None
    for fd, name in stored_fds():
        queue = _stored_queue(name)
        if queue is None:
            continue
        if taken is None and path is not None and _reached_at(fd, path):
            if not shut_for_reading(fd):
                taken = fd, queue
                continue
            # The last daemon was killed as it stopped, past its last read: sends to
            # its socket fail. Its path is freed for a new one.
            with contextlib.suppress(OSError):
                os.unlink(path)
        with contextlib.suppress(OSError):
            os.close(fd)
    return taken


def keep_for_next(
    notifier: SystemdNotifier, fifo: str, sock: Optional[DatagramSocket]
) -> Optional[str]:
    """Have systemd hold the FIFO at ``fifo`` and the server's socket ``sock`` open from
    now until the next daemon opens them, then let go of the FIFO it gave this one back.
    Return the name the socket is held under (to take it out of the store at a clean
    stop), if it is."""
    stored_as = None
    if notifier.enabled:
        try:
            fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as e:  # the server reads it: not expected
            log.warning("cannot give systemd the FIFO %s to hold: %s", fifo, e.strerror or e)
        else:
            try:
                if not _held("fifo", fd):
                    notifier.store("fifo", fd)
            finally:
                os.close(fd)
        if sock is not None:
            stored_as = f"{_SOCKET_NAME}{sock.queue_length}"
        # The last daemon's socket, unless it is this one, goes first: a full store (the
        # example unit's FileDescriptorStoreMax=2, the FIFO and it) would refuse this
        # one's under another queue length.
        for _, name in stored_fds():
            if _stored_queue(name) is not None and name != stored_as:
                notifier.unstore(name)
        # One taken over is held under that name still: taken out and stored again, a
        # kill in between would lose it, with what is queued on it.
        if sock is not None and stored_as is not None and not sock.taken_over:
            notifier.store(stored_as, sock.fd)  # in place of one of that name
    for fd, name in stored_fds():
        # The last daemon's FIFO: this one has it open now (or made a new one).
        with contextlib.suppress(OSError):
            if name == "fifo" and stat.S_ISFIFO(os.fstat(fd).st_mode):
                os.close(fd)
    for var in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):  # not for children
        os.environ.pop(var, None)
    return stored_as


def _held(name: str, fd: int) -> bool:
    """Whether systemd passed this process ``fd``'s file under ``name`` (and the
    descriptor it passed is open still): it holds it still. Not stored again:
    ``store()`` takes out what is held under the name first, and a kill in between
    would lose the file, with what is queued in it."""
    return any(
        held_name == name and os.path.sameopenfile(held, fd) for held, held_name in stored_fds()
    )


def _stored_queue(name: str) -> Optional[int]:
    """The queue length in the name of a socket systemd held for the daemon, or None
    for another name."""
    rest = name[len(_SOCKET_NAME) :]
    if not name.startswith(_SOCKET_NAME) or not (rest.isascii() and rest.isdecimal()):
        return None
    return int(rest)


def _reached_at(fd: int, path: str) -> bool:
    """Whether ``fd`` is an AF_UNIX datagram socket that a datagram sent to ``path``
    reaches (one stopped cleanly removed its file; another may be bound there since)."""
    try:
        sock = socket.socket(fileno=fd)
    except OSError:
        return False
    try:
        return sock.type == socket.SOCK_DGRAM and reached_at(sock, path)
    except OSError:
        return False
    finally:
        sock.detach()
