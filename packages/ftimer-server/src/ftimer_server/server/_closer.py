"""The closing of descriptors senders pass to the datagram socket, off the loop's thread.

A sender may pass a descriptor whose close blocks as long as it likes (a file of a FUSE
mount it serves, a TCP socket lingering on unsent data): each is closed by a thread of
its own, a socket's linger cleared first; while such closes pile up, the sockets watched
refuse descriptors at their senders (``SO_PASSRIGHTS``), so the server never runs out of
them.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import math
import os
import socket
import struct
import threading
import time
import weakref
from typing import Callable, Deque, Dict, Sequence

__all__ = ["CLOSER", "Closer"]

logger = logging.getLogger("ftimer_server")

_SO_PASSRIGHTS = getattr(socket, "SO_PASSRIGHTS", 83)  # Linux 6.16, unnamed by Python 3.11
_SO_LINGER_NONE = struct.pack("ii", 1, 0)  # close at once, resetting the connection


def _no_linger(fd: int) -> None:
    """Have a socket's close return at once (its connection reset), never wait for its
    unsent data; anything else is left as it is. Never raises."""
    try:
        if not os.readlink(f"/proc/self/fd/{fd}").startswith("socket:"):
            return
        sock = socket.socket(fileno=fd)
    except OSError:
        return
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _SO_LINGER_NONE)
    except OSError:  # a socket without linger (a datagram socket's close never waits)
        pass
    finally:
        sock.detach()


def _close_without_linger(fd: int) -> None:
    """The closing threads' close (a socket's linger cleared first, off the loop)."""
    _no_linger(fd)
    os.close(fd)


class Closer:
    """Closes the descriptors senders passed that may not be pidfds, off the loop: closing
    one can block as long as its sender arranged (a file of a FUSE mount that never
    answers, a TCP socket with SO_LINGER and unsent data: a socket's linger is cleared
    first, so its close never waits). Each goes to a thread that is idle, or to a new one,
    up to ``MAX_THREADS``. Daemon threads, so a close that never returns never holds up
    the process's exit.

    While more than ``BACKLOG`` descriptors wait (every thread held by a close that
    blocks), the sockets it ``watch``es refuse descriptors at their senders
    (``SO_PASSRIGHTS``: their ``sendmsg()`` fails with EPERM), until none waits: what
    senders pass then can no longer pile up in the server until it runs out of
    descriptors, and every other datagram still comes through.

    Args:
        close: closes a descriptor (tests pass one that blocks).
    """

    MAX_THREADS = 8
    #: Descriptors waiting for a thread before the sockets refuse more.
    BACKLOG = 1024
    #: Every thread busy with a close this old: logged (at most once a minute).
    SLOW = 1.0

    def __init__(self, close: Callable[[int], None] = _close_without_linger) -> None:
        self._close = close
        self._cond = threading.Condition()
        self._pending: Deque[int] = collections.deque()
        #: When each busy thread's close began, by thread.
        self._closing: Dict[int, float] = {}
        self._threads = 0
        self._said = -math.inf
        #: Weakly: a socket dropped without close() is not kept open by its watch.
        self._sockets: weakref.WeakSet[socket.socket] = weakref.WeakSet()
        self.refusing = False

    def watch(self, sock: socket.socket) -> None:
        """Have ``sock`` refuse descriptors while the backlog is over ``BACKLOG``."""
        with self._cond:
            self._sockets.add(sock)
            if self.refusing:
                _pass_rights(sock, False)

    def unwatch(self, sock: socket.socket) -> None:
        with self._cond:
            self._sockets.discard(sock)

    def close(self, fds: Sequence[int]) -> None:
        """Close ``fds`` in closer threads. Never raises: if no thread can be started,
        they wait for one."""
        with self._cond:
            self._pending.extend(fds)
            self._dispatch()
            # Whatever holds them back: closes that block, or no thread to be had.
            if len(self._pending) > self.BACKLOG and not self.refusing:
                self._refuse(True)

    def for_child(self) -> Closer:
        """The closer of a forked child: the parent's threads are not there, the
        descriptors they had yet to close are, and are its to close. Not those they were
        closing: the kernel frees a descriptor's number as its close begins, so by the
        fork the number may be another file's (a close that blocks, what the threads are
        for, leaves it free for as long as it blocks). The parent's sockets are the
        parent's to watch."""
        child = Closer(self._close)
        child._pending.extend(self._pending)
        with child._cond:
            child._dispatch()
        return child

    def _dispatch(self) -> None:
        """Wake an idle thread for each descriptor waiting, and start threads for those
        left (up to ``MAX_THREADS``): none waits behind a close that blocks while a
        thread can be had. Said (at most once a minute) when every thread is held by a
        slow close. Called with ``_cond`` held."""
        idle = self._threads - len(self._closing)
        self._cond.notify(min(idle, len(self._pending)))
        short = len(self._pending) - idle
        while short > 0 and self._threads < self.MAX_THREADS and self._start():
            short -= 1
        if short > 0 and self._threads == self.MAX_THREADS:
            oldest = min(self._closing.values(), default=math.inf)
            self._say(
                "every thread that closes descriptors senders passed to the socket is "
                "busy, one for %.1f s (a sender may be passing descriptors whose close "
                "blocks); descriptors waiting: %d",
                time.monotonic() - oldest,
                len(self._pending),
                when=time.monotonic() - oldest >= self.SLOW,
            )

    def _refuse(self, refuse: bool) -> None:
        self.refusing = refuse
        for sock in self._sockets:
            _pass_rights(sock, not refuse)
        if refuse:
            logger.error(
                "%d descriptors senders passed are waiting to be closed: the socket "
                "refuses descriptors until they are (a sender may be passing descriptors "
                "whose close blocks; meanwhile no timer of another process can be armed "
                "or disarmed over the socket: ftimer exec, ftimer arm and disarm fail)",
                len(self._pending),
            )
        else:
            logger.warning("the socket accepts descriptors again")

    def _start(self) -> bool:
        try:
            threading.Thread(target=self._run, name="ftimer-closer", daemon=True).start()
        except RuntimeError as e:  # no thread to be had (a limit, interpreter exit)
            self._say("cannot start a thread to close a descriptor a sender passed: %s", e)
            return False
        self._threads += 1
        return True

    def _say(self, message: str, *args: object, when: bool = True) -> None:
        now = time.monotonic()
        if when and now - self._said >= 60:
            self._said = now
            logger.warning(message, *args)

    def _run(self) -> None:
        cond, closing, me = self._cond, self._closing, threading.get_ident()
        while True:
            with cond:
                while not self._pending:
                    if self.refusing:
                        self._refuse(False)
                    cond.wait()
                fd = self._pending.popleft()
                closing[me] = time.monotonic()
            with contextlib.suppress(OSError):
                self._close(fd)
            with cond:
                del closing[me]


def _pass_rights(sock: socket.socket, on: bool) -> None:
    try:
        sock.setsockopt(socket.SOL_SOCKET, _SO_PASSRIGHTS, int(on))
    except OSError as e:  # before Linux 6.16 (ENOPROTOOPT): descriptors keep coming
        logger.error("cannot have the socket %s descriptors: %s", "accept" if on else "refuse", e)


#: One for the process; a forked child gets its own (see ``Closer.for_child``): reach it
#: as ``_closer.CLOSER``, never imported by name, which would keep the parent's in a child.
CLOSER = Closer()


def _closer_for_child() -> None:
    global CLOSER
    CLOSER = CLOSER.for_child()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_closer_for_child)
