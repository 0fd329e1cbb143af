"""Turning an expiry into signals: the reap, then the escalation if the worker survives.

A reap is a short pipeline: expiry -> steps before the signal -> signal -> escalation.
The steps are where diagnostics (stack dumps, core dumps) slot in; there are none yet.
The clock is passed in and signals go through the injected ``Signaller``, so the whole
sequence runs in tests with a fake clock and nothing real signalled.
"""

from __future__ import annotations

import heapq
import itertools
import signal as _signal
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from ._events import Escalated, Reaped
from ._policy import valid_signals
from ._process import ProcessInspector
from ._records import Worker
from ._signaller import Signaller
from ._table import Expiry

__all__ = ["ReapStep", "Reaper"]

#: A step run between the expiry and the signal: (worker, expiry, now) -> None.
ReapStep = Callable[[Worker, Expiry, float], None]

KILL = int(getattr(_signal, "SIGKILL", 9))


class Reaper:
    """Signals expired workers and escalates to SIGKILL after a grace period.

    Args:
        signaller: delivers the signals.
        inspector: tells whether a reaped worker is still alive when its grace ends.
        escalate_after: seconds to wait after the first signal before SIGKILL;
            ``None`` (torch's behaviour) never escalates. No escalation follows a SIGKILL.
        steps: run in order before each signal (diagnostics).
        signal_override: if set, the signal every reap sends, instead of the deciding
            timer's own (the host's choice, e.g. SIGTERM so workers can clean up).

    Raises:
        ValueError: ``escalate_after`` is negative, or ``signal_override`` is not a
            signal of this platform.
    """

    def __init__(
        self,
        signaller: Signaller,
        inspector: ProcessInspector,
        escalate_after: Optional[float] = None,
        steps: Sequence[ReapStep] = (),
        signal_override: Optional[int] = None,
    ) -> None:
        if escalate_after is not None and escalate_after < 0:
            raise ValueError("escalate_after must be >= 0")
        if signal_override is not None and signal_override not in valid_signals():
            raise ValueError(f"signal_override {signal_override} is not a signal here")
        self._signaller = signaller
        self._inspector = inspector
        self._escalate_after = escalate_after
        self._steps = tuple(steps)
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
        for step in self._steps:
            step(worker, expiry, now)
        delivered, error = self._send(worker, signal)
        if delivered and self._escalate_after is not None and signal != KILL:
            due = now + self._escalate_after
            self._pending[worker.pid] = (due, worker, decider.labels)
            heapq.heappush(self._heap, (due, next(self._seq), worker.pid))
        return Reaped(
            pid=worker.pid,
            start_time=worker.start_time,
            signal=signal,
            scope_id=decider.scope_id,
            late=now - decider.deadline,
            delivered=delivered,
            timers=expiry.cleared,
            labels=decider.labels,
            error=error,
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
            if not self._inspector.alive(worker):
                out.append((worker, None))
                continue
            delivered, error = self._send(worker, KILL)
            event = Escalated(
                pid=pid,
                start_time=worker.start_time,
                signal=KILL,
                after=self._escalate_after or 0.0,
                delivered=delivered,
                labels=labels,
                error=error,
            )
            out.append((worker, event))
        return out

    def _send(self, worker: Worker, signal: int) -> Tuple[bool, Optional[str]]:
        try:
            if self._signaller.send(worker, signal):
                return True, None
            return False, "the process is gone"
        except OSError as e:
            return False, f"{type(e).__name__}: {e}"
