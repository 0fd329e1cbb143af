"""How far deadlines may be judged, given what the reader has seen of its queues.

The reading rule (see ``ftimer_server.server._loop``) holds for lines that are in the
pipe or the socket's queue: what it holds when the loop notes the time holds every
message written before. A queue found full breaks it: a writer then waits for room with
a line it began to write before that moment (a disarm, before its deadline), and the
line goes in only once the loop has read, made room and woken it. So after a queue is
found full, deadlines are judged no later than the last moment the queues were known to
hold everything (``trusted``) until the read that made room has ended and ``SETTLE``
more has passed (the woken writers' turn), and the queues are found with room again.
Never more than ``BLOCKED_WRITE`` behind, though: a queue kept full for good (a flood)
must not stop every reap, and a writer of ftimer's client waits no longer than that for
room (its ``write_timeout``, 1 s by default) before its failure policy applies.

Except when the loop itself was away, reading nothing for longer than that (the server
stopped, starved of CPU, or busy) and finds a queue full on its return: writers gave up
waiting for room meanwhile through no fault of theirs, and a line queued before the
absence (an arm) may be older than ``BLOCKED_WRITE`` while the disarm that followed it is
still owed. ftimer's client re-sends what it owes as soon as it finds room, so
judgement then stays where it was when the loop left, for ``BLOCKED_WRITE`` after the
read that found the queue full: behind by the absence and a second, at most two
absences and a second when they follow one another (it moves on with every read).
"""

from __future__ import annotations

import math
from typing import Optional

__all__ = ["BLOCKED_WRITE", "SETTLE", "Horizon"]

#: Seconds a writer that found the queue full may wait for room: the client's default
#: ``write_timeout``. Judgement never lags further behind.
BLOCKED_WRITE = 1.0
#: Seconds the writers woken by a read are given to write, once it has ended (a woken
#: thread runs within milliseconds, on a loaded host too).
SETTLE = 0.01


class Horizon:
    """Tracks whether the queues may hold back a writer. Sans-I/O: times are passed in
    (monotonic seconds)."""

    def __init__(self) -> None:
        #: The last moment everything written before it was known read.
        self.trusted = -math.inf
        #: When the writers woken by the last read of a full queue have had their turn.
        self.settled_at = -math.inf
        #: After the loop came back to a full queue: until when judgement stays at
        #: ``_held_at`` (what it was when the loop left), for the writers that gave up.
        self._held_until = -math.inf
        self._held_at = -math.inf
        self._full = False  # at the last read
        #: When the last read of a full queue ended (none yet: -inf).
        self.full_at = -math.inf
        self._ended = -math.inf  # when the last read ended (none yet: away until the first)

    def read(self, at: float, full: bool, ended: float) -> None:
        """The loop noted the time ``at`` and read, until ``ended``, what the queues held
        then; one of them was ``full`` (writers may be waiting for room)."""
        if full and at - self._ended > BLOCKED_WRITE:  # back from an absence
            self._held_at = max(self.trusted, self._ended - BLOCKED_WRITE)
            self._held_until = ended + BLOCKED_WRITE
        self._full, self._ended = full, ended
        if full:
            self.settled_at = ended + SETTLE
            self.full_at = ended
        elif at >= self.settled_at and at >= self._held_until:
            self.trusted = at

    def judged(self, read_at: float) -> float:
        """The latest deadline that may be judged now that everything queued at
        ``read_at`` has been read."""
        if read_at < self._held_until:
            return self._held_at
        if not self._full and read_at >= self.settled_at:
            return read_at
        return max(self.trusted, read_at - BLOCKED_WRITE)

    def wakeup(self, deadline: Optional[float]) -> Optional[float]:
        """When a timer due at ``deadline`` can be judged (``None``: nothing due)."""
        if deadline is None or deadline <= self.trusted:
            return deadline
        # Once the queues have settled, or once the deadline lags BLOCKED_WRITE behind.
        at = max(deadline, min(self.settled_at, deadline + BLOCKED_WRITE))
        return at if deadline <= self._held_at else max(at, self._held_until)
