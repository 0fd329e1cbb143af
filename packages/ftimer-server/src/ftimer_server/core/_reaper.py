"""Turning an expiry into signals: the reap, then the escalation if the worker survives.

A reap is a short pipeline: expiry -> capture (diagnostics, off the loop, bounded by a
budget) -> signal -> escalation. The clock is passed in and the capture and the signals
go through the ``Host``, so the whole sequence runs in tests with a fake clock and
nothing real signalled.
"""

from __future__ import annotations

import heapq
import itertools
from typing import Dict, List, Optional, Sequence, Tuple, Union

from ._events import Escalated, Reaped
from ._host import KILL, CaptureRequest, Host, Peer
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
        capture_budget: seconds a capture may take before the signal goes anyway;
            ``None``: the host is never asked to capture.

    Raises:
        ValueError: ``escalate_after`` is negative, or ``signal_override`` is not a
            signal of this platform.
    """

    def __init__(
        self,
        host: Host,
        escalate_after: Optional[float] = None,
        signal_override: Optional[int] = None,
        capture_budget: Optional[float] = None,
    ) -> None:
        if escalate_after is not None and escalate_after < 0:
            raise ValueError("escalate_after must be >= 0")
        if capture_budget is not None and capture_budget < 0:
            raise ValueError("capture_budget must be >= 0")
        if signal_override is not None and signal_override not in host.signals:
            raise ValueError(f"signal_override {signal_override} is not a signal here")
        self._host = host
        self._escalate_after = escalate_after
        self._override = signal_override
        # pid -> (due time, worker, labels); the heap orders due times, lazily deleted.
        self._pending: Dict[int, Tuple[float, Worker, Optional[Dict[str, str]]]] = {}
        self._heap: List[Tuple[float, int, int]] = []
        self._seq = itertools.count()
        self._capture_budget = capture_budget
        # pid -> the reap waiting for its capture; the heap orders their budgets' ends.
        self._capturing: Dict[int, _Capture] = {}
        self._capture_heap: List[Tuple[float, int, int]] = []

    def reap(
        self,
        worker: Worker,
        expiry: Expiry,
        now: float,
        peers: Sequence[Peer] = (),
        job: Optional[str] = None,
    ) -> Union[str, Reaped]:
        """Reap ``worker`` as ``expiry`` decides (its ``decider`` must be set), with its
        signal or the override.

        Returns:
            The id of the incident the host is capturing (the signal then follows
            ``captured()`` or the budget's end, see ``due()``), or the ``Reaped`` event
            of a reap signalled at once.
        """
        decider = expiry.decider
        assert decider is not None, "a report-only expiry is not reaped"
        signal = decider.signal if self._override is None else self._override
        if self._capture_budget is not None:
            request = CaptureRequest(
                worker=worker,
                timer=decider,
                signal=signal,
                now=now,
                budget=self._capture_budget,
                job=job,
                peers=tuple(peers),
                dump=decider.dump or next((t.dump for t in expiry.cleared if t.dump), None),
            )
            incident = self._host.capture(request)
            if incident is not None:
                due = now + self._capture_budget
                self._capturing[worker.pid] = _Capture(due, worker, expiry, signal, incident)
                heapq.heappush(self._capture_heap, (due, next(self._seq), worker.pid))
                return incident
        return self._signal(worker, expiry, signal, now, None)

    def captured(self, pid: int, now: float) -> Optional[Reaped]:
        """The host finished capturing ``pid``: signal it now (``None`` if it was not
        waiting: its budget ran out first, or it exited)."""
        pending = self._capturing.pop(pid, None)
        if pending is None:
            return None
        return self._signal(pending.worker, pending.expiry, pending.signal, now, pending.incident)

    def due(self, now: float) -> List[Reaped]:
        """Signal the workers whose capture budget ended at or before ``now``."""
        out: List[Reaped] = []
        heap = self._capture_heap
        while heap and heap[0][0] <= now:
            due, _, pid = heapq.heappop(heap)
            pending = self._capturing.get(pid)
            if pending is None or pending.due != due:
                continue
            del self._capturing[pid]
            p = pending
            out.append(self._signal(p.worker, p.expiry, p.signal, now, p.incident))
        return out

    def _signal(
        self, worker: Worker, expiry: Expiry, signal: int, now: float, incident: Optional[str]
    ) -> Reaped:
        decider = expiry.decider
        assert decider is not None
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
            incident=incident,
        )

    def pending(self, pid: int) -> bool:
        """True while a capture or an escalation of ``pid`` is pending."""
        return pid in self._pending or pid in self._capturing

    def forget(self, pid: int) -> Optional[str]:
        """Cancel what is pending for ``pid`` (it exited); return the id of the incident
        whose capture it exited during, if any."""
        self._pending.pop(pid, None)
        pending = self._capturing.pop(pid, None)
        return None if pending is None else pending.incident

    def next_deadline(self) -> Optional[float]:
        """When the next capture budget ends or escalation is due, or ``None``."""
        ends = self._capture_heap
        while ends and (
            ends[0][2] not in self._capturing or self._capturing[ends[0][2]].due != ends[0][0]
        ):
            heapq.heappop(ends)
        escalation = self._next_escalation()
        if not ends:
            return escalation
        return ends[0][0] if escalation is None else min(ends[0][0], escalation)

    def _next_escalation(self) -> Optional[float]:
        heap = self._heap
        while heap:
            due, _, pid = heap[0]
            entry = self._pending.get(pid)
            if entry is not None and entry[0] == due:
                return due
            heapq.heappop(heap)
        return None

    def finish(self, now: float) -> Tuple[List[Reaped], List[Tuple[Worker, Optional[Escalated]]]]:
        """Do now what is pending, for a server that stops (it could not do it later: a
        stuck worker would live on). Reaps waiting for their capture are signalled, and
        reaped workers still in their grace period are sent SIGKILL.

        Returns:
            The reaps, and the escalations as ``escalate()`` returns them.
        """
        captures = sorted(self._capturing.values(), key=lambda c: c.due)
        self._capturing.clear()
        self._capture_heap.clear()
        reaped = [self._signal(c.worker, c.expiry, c.signal, now, c.incident) for c in captures]
        return reaped, self.escalate(now, early=True)

    def escalate(
        self, now: float, *, early: bool = False
    ) -> List[Tuple[Worker, Optional[Escalated]]]:
        """SIGKILL the reaped workers whose grace period ended at or before ``now``
        (``early``: all of them, see ``finish()``).

        Returns (worker, event) pairs; the event is ``None`` for a worker found dead.
        """
        out: List[Tuple[Worker, Optional[Escalated]]] = []
        heap = self._heap
        while heap and (early or heap[0][0] <= now):
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
                after=(self._escalate_after or 0.0) - max(0.0, due - now),
                delivered=delivery.delivered,
                labels=labels,
                error=delivery.error,
            )
            out.append((worker, event))
        return out


class _Capture:
    """A reap waiting for its capture: signalled at ``due`` at the latest."""

    __slots__ = ("due", "expiry", "incident", "signal", "worker")

    def __init__(
        self, due: float, worker: Worker, expiry: Expiry, signal: int, incident: str
    ) -> None:
        self.due = due
        self.worker = worker
        self.expiry = expiry
        self.signal = signal
        self.incident = incident
