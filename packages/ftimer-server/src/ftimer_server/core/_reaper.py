"""Turning an expiry into signals: the reap, then the escalation if the worker survives.

A reap is a short pipeline: expiry -> capture (diagnostics, off the loop, bounded by a
budget) -> signal -> escalation. The clock is passed in and the capture and the signals
go through the ``Host``, so the whole sequence runs in tests with a fake clock and
nothing real signalled.
"""

from __future__ import annotations

import heapq
import itertools
import math
from typing import Dict, Generic, Iterator, List, Optional, Sequence, Tuple, TypeVar, Union

from ._events import Escalated, Reaped, Unkillable, WorkerGone
from ._host import KILL, CaptureRequest, Delivery, Host, Peer
from ._records import Descendant, Timer, Worker
from ._table import Expiry

__all__ = ["KILL_CHECK", "Reaper"]

T = TypeVar("T")

#: Seconds after a worker's SIGKILL at which it is looked at again: one still alive
#: then is ``Unkillable``. A process with much memory, or a GPU's, can take seconds to
#: die; one in an uninterruptible wait dies only when that wait ends.
KILL_CHECK = 30.0


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
        ValueError: ``escalate_after`` or ``capture_budget`` is not a finite number >= 0,
            or ``signal_override`` is not a signal of this platform.
    """

    def __init__(
        self,
        host: Host,
        escalate_after: Optional[float] = None,
        signal_override: Optional[int] = None,
        capture_budget: Optional[float] = None,
    ) -> None:
        for name, value in (("escalate_after", escalate_after), ("capture_budget", capture_budget)):
            if value is not None and not 0 <= value < math.inf:  # NaN too: never due
                raise ValueError(f"{name} must be a finite number of seconds >= 0, not {value!r}")
        if signal_override is not None and signal_override not in host.signals:
            raise ValueError(f"signal_override {signal_override} is not a signal here")
        self._host = host
        self._escalate_after = escalate_after
        self._override = signal_override
        self._capture_budget = capture_budget
        #: The reaps waiting for their capture, due at their budget's end.
        self._capturing: _Schedule[_Capture] = _Schedule()
        #: The reaped workers in their grace period (the timers that decided their reaps,
        #: the descendants those signalled), due for SIGKILL at its end.
        self._pending: _Schedule[_Grace] = _Schedule()
        #: The same, of workers that exited within it leaving descendants it signalled:
        #: (due, seq, grace), a heap. Kept by no pid: the pid may be bound anew meanwhile.
        self._orphans: List[Tuple[float, int, _Grace]] = []
        self._seq = itertools.count()
        #: The workers sent SIGKILL (with the timer that decided their reap), due to be
        #: looked at again ``KILL_CHECK`` seconds later.
        self._killed: _Schedule[Tuple[Worker, Timer]] = _Schedule()
        #: The workers said ``Unkillable`` and not yet seen to exit, looked at again
        #: every ``KILL_CHECK`` seconds.
        self._outliving: _Schedule[Tuple[Worker, Timer]] = _Schedule()

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

        Another expiry of a worker whose reap is underway joins it: during its capture,
        the capture's signal follows as planned; in its grace period, the signal goes
        again but the SIGKILL stays due when it was (expiries that recur faster than a
        capture's budget, or the grace, would put them off for ever).

        Returns:
            The id of the incident the host is capturing (the signal then follows
            ``captured()`` or the budget's end, see ``due()``), or the ``Reaped`` event
            of a reap signalled at once.
        """
        decider = expiry.decider
        assert decider is not None, "a report-only expiry is not reaped"
        underway = self._capturing.get(worker.pid)
        if underway is not None:
            return underway[1].incident
        signal = decider.signal if self._override is None else self._override
        # In its grace period the worker was captured (or not) when first reaped.
        if self._capture_budget is not None and worker.pid not in self._pending:
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
                capture = _Capture(worker, expiry, signal, incident)
                self._capturing.put(worker.pid, now + self._capture_budget, capture)
                return incident
        return self._signal(worker, expiry, signal, now, None)

    def captured(self, pid: int, now: float) -> Optional[Reaped]:
        """The host finished capturing ``pid``: signal it now (``None`` if it was not
        waiting: its budget ran out first, or it exited)."""
        capture = self._capturing.pop(pid)
        return None if capture is None else self._signal_captured(capture, now)

    def due(self, now: float) -> List[Reaped]:
        """Signal the workers whose capture budget ended at or before ``now``."""
        return [self._signal_captured(c, now) for _, c in self._capturing.pop_due(now)]

    def _signal_captured(self, capture: _Capture, now: float) -> Reaped:
        c = capture
        return self._signal(c.worker, c.expiry, c.signal, now, c.incident)

    def _signal(
        self, worker: Worker, expiry: Expiry, signal: int, now: float, incident: Optional[str]
    ) -> Reaped:
        decider = expiry.decider
        assert decider is not None
        delivery = self._host.reap(worker, signal, expiry, now)
        grace = self._escalate_after
        if signal == KILL:
            self._sent_kill(worker, decider, delivery, now)
        elif grace is not None:
            self._grace(worker, decider, delivery, now + grace)
        return Reaped(
            pid=worker.pid,
            start_time=worker.start_time,
            signal=signal,
            scope_id=decider.scope_id,
            late=now + delivery.took - decider.deadline,
            delivered=delivery.delivered,
            timers=expiry.cleared,
            labels=decider.labels,
            error=delivery.error,
            incident=incident,
            descendants=tuple(d.pid for d in delivery.descendants),
            gone=delivery.gone,
        )

    def _grace(self, worker: Worker, decider: Timer, delivery: Delivery, due: float) -> None:
        """Start the grace period of a reap (its SIGKILL due at ``due``), or, in one
        underway (reaped again), add the descendants this reap signalled: the grace runs
        on from the first signal. A worker gone (its signal not delivered) leaves the
        descendants its reap signalled to theirs."""
        underway = self._pending.get(worker.pid)
        if underway is not None:
            due, (bound, first, known) = underway
            new = tuple(d for d in delivery.descendants if d not in known)
            if new:
                self._pending.put(worker.pid, due, (bound, first, known + new))
        elif delivery.delivered:
            self._pending.put(worker.pid, due, (worker, decider, delivery.descendants))
        elif delivery.descendants:
            grace = (worker, decider, delivery.descendants)
            heapq.heappush(self._orphans, (due, next(self._seq), grace))

    def _sent_kill(self, worker: Worker, decider: Timer, delivery: Delivery, now: float) -> None:
        if delivery.delivered and self._host.kills:
            self._killed.put(worker.pid, now + KILL_CHECK, (worker, decider))

    def unkillable(self, now: float) -> List[Union[Unkillable, WorkerGone]]:
        """The workers sent SIGKILL ``KILL_CHECK`` seconds or more before ``now`` that
        still live (each said once), and those said so before that are found to have
        exited at last (``WorkerGone``, ``unkillable`` set; where the host watches a
        pidfd, ``forget()`` learns it first)."""
        out: List[Union[Unkillable, WorkerGone]] = []
        for _, outliving in self._outliving.pop_due(now):
            worker, decider = outliving
            if self._host.alive(worker):
                self._outliving.put(worker.pid, now + KILL_CHECK, outliving)
            else:
                out.append(_exited_at_last(worker, decider))
        for due, (worker, decider) in self._killed.pop_due(now):
            if not self._host.alive(worker):
                continue
            held = self._outliving.pop(worker.pid)
            if held is not None:  # its pid is another's now: it is gone
                out.append(_exited_at_last(*held))
            self._outliving.put(worker.pid, now + KILL_CHECK, (worker, decider))
            out.append(
                Unkillable(
                    pid=worker.pid,
                    start_time=worker.start_time,
                    after=now - (due - KILL_CHECK),
                    labels=decider.labels,
                    waiting=self._host.waiting(worker),
                )
            )
        return out

    @property
    def outliving(self) -> int:
        """How many workers said ``Unkillable`` are not yet seen to exit."""
        return len(self._outliving)

    def pending(self, pid: int) -> bool:
        """True while a capture or an escalation of ``pid`` is pending."""
        return pid in self._pending or pid in self._capturing

    def capturing(self) -> List[Tuple[Worker, Timer]]:
        """The workers whose capture is underway, each with the timer that decided its
        reap."""
        return [(c.worker, c.decider) for _, c in self._capturing.items()]

    def forget(self, worker: Worker) -> Tuple[Optional[str], Optional[Timer]]:
        """Cancel what is pending for ``worker`` (it exited); return the id of the
        incident whose capture it exited during, if any, and, if it had been said
        ``Unkillable``, the timer whose reap it outlived. The descendants its reap
        signalled get SIGKILL at the end of its grace all the same (see ``escalate()``)."""
        pid = worker.pid
        pending = self._pending.get(pid)
        self._pending.pop(pid)
        if pending is not None and pending[1][2]:
            heapq.heappush(self._orphans, (pending[0], next(self._seq), pending[1]))
        self._killed.pop(pid)
        capture = self._capturing.pop(pid)
        held = self._outliving.get(pid)
        # Another process of that pid (without pidfds, pids are reused unseen) is left
        # to its next look, which finds it gone.
        outlived = None
        if held is not None:
            _, (said, decider) = held
            if said.start_time == worker.start_time:
                self._outliving.pop(pid)
                outlived = decider
        return (None if capture is None else capture.incident), outlived

    def next_deadline(self) -> Optional[float]:
        """When the next capture budget ends, escalation is due or SIGKILL is looked at
        again (``unkillable()``), or ``None``."""
        orphan = self._orphans[0][0] if self._orphans else None
        ends = (
            self._capturing.next_due(),
            self._pending.next_due(),
            orphan,
            self._killed.next_due(),
            self._outliving.next_due(),
        )
        return min((t for t in ends if t is not None), default=None)

    def finish(self, now: float) -> Tuple[List[Reaped], List[Tuple[Worker, Optional[Escalated]]]]:
        """Do now what is pending, for a server that stops (it could not do it later: a
        stuck worker would live on). Reaps waiting for their capture are signalled, and
        reaped workers still in their grace period are sent SIGKILL.

        Returns:
            The reaps, and the escalations as ``escalate()`` returns them.
        """
        reaped = [self._signal_captured(c, now) for _, c in self._capturing.pop_due(math.inf)]
        return reaped, self.escalate(now, early=True)

    def escalate(
        self, now: float, *, early: bool = False
    ) -> List[Tuple[Worker, Optional[Escalated]]]:
        """SIGKILL the reaped workers whose grace period ended at or before ``now``
        (``early``: all of them, see ``finish()``), and the descendants their reaps
        signalled that outlived it (``Host.kill_descendants``), the workers' descendants
        first: once a worker is killed, its children are re-parented away from it.

        Returns (worker, event) pairs; the event is ``None`` for a worker found dead,
        unless descendants were killed (``exited`` then).
        """
        until = math.inf if early else now
        out: List[Tuple[Worker, Optional[Escalated]]] = []
        host = self._host
        # (due, grace, whether the worker may be alive): an orphan's is gone, and its pid
        # may be another's by now.
        ended = [(due, grace, True) for due, grace in self._pending.pop_due(until)]
        while self._orphans and self._orphans[0][0] <= until:
            due, _, grace = heapq.heappop(self._orphans)
            ended.append((due, grace, False))
        for due, (worker, decider, signalled), bound in ended:
            alive = bound and host.alive(worker)
            killed, delivery = _kill(host, worker if alive else None, signalled)
            if delivery is not None:
                self._sent_kill(worker, decider, delivery, now)
            event = None
            if alive or killed:
                event = self._escalated(worker, decider, due, now, killed, delivery=delivery)
            out.append((worker, event))
        return out

    def _escalated(
        self,
        worker: Worker,
        decider: Timer,
        due: float,
        now: float,
        descendants: Tuple[Descendant, ...],
        *,
        delivery: Optional[Delivery],
    ) -> Escalated:
        """The event of an escalation; ``delivery``: the worker's SIGKILL (None: it had
        exited, and only ``descendants`` got one)."""
        return Escalated(
            pid=worker.pid,
            start_time=worker.start_time,
            signal=KILL,
            after=(self._escalate_after or 0.0) - max(0.0, due - now),
            delivered=delivery is not None and delivery.delivered,
            labels=decider.labels,
            error=None if delivery is None else delivery.error,
            descendants=tuple(d.pid for d in descendants),
            exited=delivery is None,
        )

    @property
    def changes(self) -> int:
        """Counts the changes to what ``unfinished()`` returns."""
        return self._capturing.changes + self._pending.changes

    def unfinished(self) -> List[Timer]:
        """What is pending, as timers a restarted server can be given (``restore()``): a
        server that dies (``kill -9``, out of memory) between a reap's expiry and its
        signal, or its SIGKILL, must not leave the stuck worker to live on.

        Each is the timer that decided the reap, as the worker armed it (past its
        deadline): a restarted server reaps again, and escalates after the grace period.
        Not a SIGKILL timer of its own making: restored as a worker's request, it would
        be refused where the policy allows the workers SIGTERM alone.
        """
        timers = [c.decider for _, c in self._capturing.items()]
        return timers + [decider for _, (_, decider, _) in self._pending.items()]


#: A reaped worker's grace period: the worker, the timer that decided its reap, and the
#: descendants its reaps signalled.
_Grace = Tuple[Worker, Timer, Tuple[Descendant, ...]]


class _Capture:
    """A reap waiting for its capture."""

    __slots__ = ("expiry", "incident", "signal", "worker")

    def __init__(self, worker: Worker, expiry: Expiry, signal: int, incident: str) -> None:
        self.worker = worker
        self.expiry = expiry
        self.signal = signal
        self.incident = incident

    @property
    def decider(self) -> Timer:
        """The timer that decided the reap."""
        decider = self.expiry.decider
        assert decider is not None, "a report-only expiry is not reaped"
        return decider


class _Schedule(Generic[T]):
    """Items by pid, each due at a time: a dict, and a heap of due times whose entries
    for items replaced or removed meanwhile are skipped when met."""

    def __init__(self) -> None:
        self._items: Dict[int, Tuple[float, T]] = {}
        #: Counts the items put and removed: what a saved state holds changed.
        self.changes = 0
        self._heap: List[Tuple[float, int, int]] = []
        self._seq = itertools.count()  # ties in due time: first put, first due

    def __contains__(self, pid: int) -> bool:
        return pid in self._items

    def __len__(self) -> int:
        return len(self._items)

    def put(self, pid: int, due: float, item: T) -> None:
        """Schedule ``item`` of ``pid`` at ``due``, replacing the one it had."""
        self._items[pid] = (due, item)
        self.changes += 1
        heapq.heappush(self._heap, (due, next(self._seq), pid))

    def get(self, pid: int) -> Optional[Tuple[float, T]]:
        """The item of ``pid`` and when it is due, as (due, item), if any."""
        return self._items.get(pid)

    def items(self) -> List[Tuple[float, T]]:
        """The items, as (due, item), in no order."""
        return list(self._items.values())

    def pop(self, pid: int) -> Optional[T]:
        """Remove and return the item of ``pid``, if any."""
        entry = self._items.pop(pid, None)
        if entry is None:
            return None
        self.changes += 1
        return entry[1]

    def next_due(self) -> Optional[float]:
        """The earliest due time, or ``None``."""
        heap = self._heap
        while heap and not self._current(heap[0]):
            heapq.heappop(heap)
        return heap[0][0] if heap else None

    def pop_due(self, now: float) -> Iterator[Tuple[float, T]]:
        """Remove the items due at or before ``now`` and yield them, as (due, item),
        earliest first."""
        heap = self._heap
        while heap and heap[0][0] <= now:
            entry = heapq.heappop(heap)
            if self._current(entry):
                self.changes += 1
                yield self._items.pop(entry[2])

    def _current(self, entry: Tuple[float, int, int]) -> bool:
        item = self._items.get(entry[2])
        return item is not None and item[0] == entry[0]


def _kill(
    host: Host, worker: Optional[Worker], signalled: Tuple[Descendant, ...]
) -> Tuple[Tuple[Descendant, ...], Optional[Delivery]]:
    """SIGKILL the descendants of a reaped worker (``Host.kill_descendants``), then the
    worker unless it is ``None`` (it exited), before the walk of its tree lets it run
    again; return whom the descendants' reached and the worker's delivery (None: none
    sent)."""
    deliveries: List[Delivery] = []

    def kill() -> None:
        if worker is not None and not deliveries:
            deliveries.append(host.signal(worker, KILL))

    killed = host.kill_descendants(worker, signalled, kill)
    kill()  # where the host did not
    return killed, deliveries[0] if deliveries else None


def _exited_at_last(worker: Worker, decider: Timer) -> WorkerGone:
    """A worker said ``Unkillable`` is seen gone: ``decider`` decided the reap it outlived."""
    return WorkerGone(worker.pid, worker.start_time, unkillable=True, decider=decider)
