"""Turning an expiry into signals: the reap, then the escalation if the worker survives.

A reap is a short pipeline: expiry -> what the host does before the signal
(diagnostics) -> signal -> escalation. The clock is passed in and the signals go through
the ``Host``, so the whole sequence runs in tests with a fake clock and nothing real
signalled.
"""

from __future__ import annotations

import heapq
import itertools
from typing import Dict, List, Optional, Tuple

from ._events import Escalated, Reaped
from ._host import KILL, Host
from ._records import Worker
from ._table import Expiry

__all__ = ["Reaper"]


class Reaper:
    """Signals expired workers and escalates to SIGKILL after a grace period.

    Args:
        host: delivers the signals, and tells whether a reaped worker is still alive
            when its grace ends.
        escalate_after: seconds to wait after the first signal before SIGKILL;
            ``None`` (torch's behaviour) never escalates. No escalation follows a SIGKILL.
        signal_override: if set, the signal every reap sends, instead of the deciding
            timer's own (the host's choice, e.g. SIGTERM so workers can clean up).

    Raises:
        ValueError: ``escalate_after`` is negative, or ``signal_override`` is not a
            signal of this platform.
    """

    def __init__(
        self,
        host: Host,
        escalate_after: Optional[float] = None,
        signal_override: Optional[int] = None,
    ) -> None:
        if escalate_after is not None and escalate_after < 0:
            raise ValueError("escalate_after must be >= 0")
        if signal_override is not None and signal_override not in host.signals:
            raise ValueError(f"signal_override {signal_override} is not a signal here")
        self._host = host
        self._escalate_after = escalate_after
        self._override = signal_override
        # pid -> (due time, worker, labels); the heap orders due times, lazily deleted.
        self._pending: Dict[int, Tuple[float, Worker, Optional[Dict[str, str]]]] = {}
        self._heap: List[Tuple[float, int, int]] = []
        self._seq = itertools.count()

    def reap(self, worker: Worker, expiry: Expiry, now: float) -> Reaped:
        """Signal ``worker`` as ``expiry`` decides (its ``decider`` must be set), or with
        the override signal."""
        decider = expiry.decider
        assert decider is not None, "a report-only expiry is not reaped"
        signal = decider.signal if self._override is None else self._override
        delivery = self._host.reap(worker, signal, expiry, now)
        if delivery.delivered and self._escalate_after is not None and signal != KILL:
            due = now + self._escalate_after
            self._pending[worker.pid] = (due, worker, decider.labels)
            heapq.heappush(self._heap, (due, next(self._seq), worker.pid))
        return Reaped(
            pid=worker.pid,
            start_time=worker.start_time,
            signal=signal,
            scope_id=decider.scope_id,
            late=now - decider.deadline,
            delivered=delivery.delivered,
            timers=expiry.cleared,
            labels=decider.labels,
            error=delivery.error,
        )

    def pending(self, pid: int) -> bool:
        """True while an escalation of ``pid`` is scheduled."""
        return pid in self._pending

    def forget(self, pid: int) -> None:
        """Cancel any escalation of ``pid`` (it exited)."""
        self._pending.pop(pid, None)

    def next_deadline(self) -> Optional[float]:
        """When the next escalation is due, or ``None``."""
        heap = self._heap
        while heap:
            due, _, pid = heap[0]
            entry = self._pending.get(pid)
            if entry is not None and entry[0] == due:
                return due
            heapq.heappop(heap)
        return None

    def escalate(self, now: float) -> List[Tuple[Worker, Optional[Escalated]]]:
        """SIGKILL the reaped workers whose grace period ended at or before ``now``.

        Returns (worker, event) pairs; the event is ``None`` for a worker found dead.
        """
        out: List[Tuple[Worker, Optional[Escalated]]] = []
        heap = self._heap
        while heap and heap[0][0] <= now:
            due, _, pid = heapq.heappop(heap)
            entry = self._pending.get(pid)
            if entry is None or entry[0] != due:
                continue
            del self._pending[pid]
            _, worker, labels = entry
            if not self._host.alive(worker):
                out.append((worker, None))
                continue
            delivery = self._host.signal(worker, KILL)
            event = Escalated(
                pid=pid,
                start_time=worker.start_time,
                signal=KILL,
                after=self._escalate_after or 0.0,
                delivered=delivery.delivered,
                labels=labels,
                error=delivery.error,
            )
            out.append((worker, event))
        return out
