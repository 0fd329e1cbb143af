"""How far deadlines may be judged, given what the reader has seen of its queues.

The reading rule (see ``ftimer_server.server._loop``) holds for lines that are in the
pipe or the socket's queue: what it holds when the loop notes the time holds every
message written before. A queue found full breaks it: a writer then waits for room with
a line it began to write before that moment (a disarm, before its deadline), and the
line goes in only once the loop has read. For as long as a queue was found full lately,
deadlines are judged ``BLOCKED_WRITE`` seconds behind: by then a waiting writer has
written, or given up (the client's ``write_timeout``, 1 s by default, after which its
failure policy applies).
"""

from __future__ import annotations

import math
from typing import Optional

__all__ = ["BLOCKED_WRITE", "Horizon"]

#: Seconds a writer that found the queue full may take to get its line in: the client's
#: default ``write_timeout``.
BLOCKED_WRITE = 1.0


class Horizon:
    """Remembers when a queue was last found full, and moves the horizon back for a while
    after. Sans-I/O: times are passed in (monotonic seconds)."""

    def __init__(self, blocked_write: float = BLOCKED_WRITE) -> None:
        self._blocked_write = blocked_write
        self._full_at = -math.inf

    def full(self, at: float) -> None:
        """A queue was found full (or nearly) at ``at``: writers may be waiting for room."""
        self._full_at = max(self._full_at, at)

    def judged(self, read_at: float) -> float:
        """The latest deadline that may be judged, all that was queued at ``read_at``
        having been read: ``read_at`` itself, or ``BLOCKED_WRITE`` before it for a while
        after a queue was found full."""
        if read_at - self._full_at >= self._blocked_write:
            return read_at
        return read_at - self._blocked_write

    def wakeup(self, deadline: Optional[float]) -> Optional[float]:
        """When a timer due at ``deadline`` can be judged (``None``: nothing due)."""
        if deadline is None:
            return None
        # Either the queues stay clear until BLOCKED_WRITE after the last full one, or
        # the deadline falls BLOCKED_WRITE behind, whichever comes first.
        return max(deadline, min(deadline, self._full_at) + self._blocked_write)
