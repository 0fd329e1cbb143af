"""``sync()``'s markers: a ``Sync`` line written to the server's own FIFO behind whatever
was written before it, and the callers waiting until the loop reaches it.

The token is unguessable: anyone who may write the FIFO or the socket could otherwise
send the next one ahead of a backlog and release its caller early.
"""

from __future__ import annotations

import math
import os
import select
import threading
import time
from typing import Dict, Iterable, Optional, Tuple

from ftimer_protocol import Sync, encode

__all__ = ["Syncs", "write_all"]

#: The most milliseconds ``poll()`` takes (a C int, about 24.8 days); a longer wait
#: polls again.
_MAX_POLL_MS = 2**31 - 1


class Syncs:
    """The markers written and not yet reached, each with its waiting caller; thread-safe.

    Its own lock: a ``sync()`` that timed out waiting for a stalled loop (which holds the
    table's) must still take its token back.
    """

    def __init__(self) -> None:
        self._waiting: Dict[str, threading.Event] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        """How many markers are waiting."""
        with self._lock:
            return len(self._waiting)

    def add(self) -> Tuple[str, bytes, threading.Event]:
        """A new marker: its token, its line, and what is set once it was reached (or the
        server stopped: see ``waiting``)."""
        # os.urandom, what secrets uses: importing secrets loads hashlib's OpenSSL, 4 MB
        # of the server's resident memory.
        token = f"ftimer-server-{os.urandom(16).hex()}"
        done = threading.Event()
        with self._lock:
            self._waiting[token] = done
        return token, encode(Sync(token)), done

    def waiting(self, token: str) -> bool:
        """Whether ``token`` has not been reached (after its event was set: the server
        stopped first)."""
        with self._lock:
            return token in self._waiting

    def forget(self, token: str) -> None:
        with self._lock:
            self._waiting.pop(token, None)

    def reached(self, tokens: Iterable[str]) -> None:
        """The loop read these markers: release their callers."""
        with self._lock:
            for token in tokens:
                done = self._waiting.pop(token, None)
                if done is not None:
                    done.set()

    def stopped(self) -> None:
        """The server stopped: wake every caller (their tokens stay unreached)."""
        with self._lock:
            for done in self._waiting.values():
                done.set()


def write_all(fd: int, line: bytes, deadline: Optional[float]) -> None:
    """Write ``line`` (at most PIPE_BUF: atomic) to a non-blocking pipe by ``deadline``
    (``time.monotonic()``; ``None``: however long it takes).

    Raises:
        TimeoutError: the pipe stayed full.
        OSError: as ``os.write`` (``BrokenPipeError``: no reader).
    """
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    while True:
        try:
            os.write(fd, line)
            return
        except BlockingIOError:
            if deadline is None:
                poller.poll()
                continue
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("the FIFO stayed full") from None
            poller.poll(min(math.ceil(remaining * 1000), _MAX_POLL_MS))
