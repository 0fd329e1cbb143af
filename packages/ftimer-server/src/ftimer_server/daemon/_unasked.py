"""The connections a server of a few slots serves that have not asked yet.

Anyone who may connect to the control socket or the metrics endpoint can open
connections that say nothing, and open them again. A peer that asks sends its request at
once, so with every slot taken the oldest of the silent gives up its slot for a new
connection: they never keep out a liveness probe or a scraper.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from typing import Dict

__all__ = ["Unasked", "shut"]


def shut(conn: socket.socket) -> None:
    """Shut ``conn`` down both ways: the read or write its thread waits in ends at once
    (a close would not wake it); errors (already shut, reset) are ignored."""
    with contextlib.suppress(OSError):
        conn.shutdown(socket.SHUT_RDWR)


class Unasked:
    """Connections being served that have not sent their request yet, oldest first;
    thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._conns: Dict[socket.socket, None] = {}  # a dict keeps their order

    def add(self, conn: socket.socket) -> None:
        """``conn`` is being served, and has not asked yet."""
        with self._lock:
            self._conns[conn] = None

    def asked(self, conn: socket.socket) -> None:
        """``conn`` sent its request, or is done: it keeps its slot."""
        with self._lock:
            self._conns.pop(conn, None)

    def shut_oldest(self) -> bool:
        """Shut the oldest down (``shut``: its thread ends, and frees its slot); False if
        every connection served has asked."""
        with self._lock:
            oldest = next(iter(self._conns), None)
            if oldest is None:
                return False
            del self._conns[oldest]
        shut(oldest)
        return True
