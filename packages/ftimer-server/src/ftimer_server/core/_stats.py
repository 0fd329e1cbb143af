"""Counters of what the server did, and their frozen snapshot ``Stats``."""

from __future__ import annotations

from collections import Counter
from typing import Dict

import msgspec

from ._events import (
    DecodeFailed,
    Escalated,
    Event,
    Expired,
    Reaped,
    Rejected,
    Unkillable,
    WorkerGone,
)

__all__ = ["Counters", "Stats"]


class Stats(msgspec.Struct, frozen=True, kw_only=True):
    """A snapshot of the server's counters (totals since it was created) and gauges.

    Attributes:
        requests: request type (``arm``, ``disarm``, ``disarm_all``, ``expire``,
            ``sync``, ``restore``: a saved timer given to ``restore()``; version 1
            acquires and releases count as ``arm`` and ``disarm``) -> result (``ok``,
            ``rejected``, ``unknown``: a disarm of no armed timer, ``exited``: an arm or
            expire of a process that exited before it was read, a saved timer of one that
            exited while no server ran) -> count.
        rejections: rejection reason (``RejectReason`` value) -> count.
        decode_errors: error class (``MalformedMessage``, ``LineTooLong``,
            ``UnsupportedVersion``) -> count of lines dropped.
        reaps: signal number -> workers signalled with it (delivered or not).
        reap_failures: reaps whose signal could not be delivered to a worker still there
            (not those whose worker had exited: ``Reaped.gone``).
        expired: timers that expired (with or without a signal).
        escalations: workers that outlived the grace period and got SIGKILL.
        unkillable: workers still alive ``KILL_CHECK`` seconds after their SIGKILL
            (``Unkillable``).
        unkillable_alive: of those, the ones not yet seen to exit (now).
        workers_gone: bound workers seen to exit (and workers of saved timers found gone
            by ``restore()``).
        armed: timers armed now.
        workers: processes bound now.
        received: what was received, by transport ("fifo", "socket"): messages, refused
            datagrams and bad lines (a run of bad lines, or datagrams, with one error
            counting once).
        pid_overridden: messages over the socket whose ``pid`` member named another
            pid than their subject's (which the kernel gave): applied to the subject.
    """

    requests: Dict[str, Dict[str, int]]
    rejections: Dict[str, int]
    decode_errors: Dict[str, int]
    reaps: Dict[int, int]
    reap_failures: int
    expired: int
    escalations: int
    workers_gone: int
    armed: int
    workers: int
    received: Dict[str, int] = {}
    pid_overridden: int = 0
    unkillable: int = 0
    unkillable_alive: int = 0


class Counters:
    """The live counters. ``requests`` is bumped by the caller; the rest by ``count()``.

    The three results nearly every message has are plain ints, bumped by the caller's
    fast path (a tuple-keyed Counter update costs more than the rest of a disarm):
    ``arm_ok``, ``disarm_ok`` and ``disarm_unknown`` add to ``requests``.
    """

    def __init__(self) -> None:
        self.requests: Counter[tuple[str, str]] = Counter()
        self.arm_ok = 0
        self.disarm_ok = 0
        self.disarm_unknown = 0
        self.rejections: Counter[str] = Counter()
        self.decode_errors: Counter[str] = Counter()
        self.reaps: Counter[int] = Counter()
        self.reap_failures = 0
        self.expired = 0
        self.escalations = 0
        self.unkillable = 0
        self.workers_gone = 0
        #: Messages (and bad lines or datagrams) received, by transport.
        self.received: Counter[str] = Counter()
        #: Bad lines (or datagrams) counted in the ``lines`` of an error for a run of
        #: them, beyond its first: what a transport's count of results leaves out.
        self.folded = 0
        #: Messages over the socket applied to another pid than the one they named.
        self.pid_overridden = 0

    def count(self, event: Event) -> None:
        """Account for ``event`` (armed and disarmed timers are counted as requests)."""
        t = type(event)
        if t is Expired:
            self.expired += 1
        elif t is Reaped:
            assert isinstance(event, Reaped)
            self.reaps[event.signal] += 1
            self.reap_failures += not event.delivered and not event.gone
        elif t is Rejected:
            assert isinstance(event, Rejected)
            self.rejections[event.reason.value] += 1
        elif t is DecodeFailed:
            assert isinstance(event, DecodeFailed)
            self.decode_errors[event.error] += event.lines
            self.folded += event.lines - 1
        elif t is WorkerGone:
            self.workers_gone += 1
        elif t is Escalated:
            self.escalations += 1
        elif t is Unkillable:
            self.unkillable += 1

    def snapshot(self, armed: int, workers: int, unkillable_alive: int) -> Stats:
        """A frozen copy, with the current gauges."""
        counts = self.requests.copy()
        counts["arm", "ok"] += self.arm_ok
        counts["disarm", "ok"] += self.disarm_ok
        counts["disarm", "unknown"] += self.disarm_unknown
        requests: Dict[str, Dict[str, int]] = {}
        for (kind, result), n in counts.items():
            if n:
                requests.setdefault(kind, {})[result] = n
        return Stats(
            requests=requests,
            rejections=dict(self.rejections),
            decode_errors=dict(self.decode_errors),
            reaps=dict(self.reaps),
            reap_failures=self.reap_failures,
            expired=self.expired,
            escalations=self.escalations,
            workers_gone=self.workers_gone,
            armed=armed,
            workers=workers,
            received=dict(self.received),
            pid_overridden=self.pid_overridden,
            unkillable=self.unkillable,
            unkillable_alive=unkillable_alive,
        )
