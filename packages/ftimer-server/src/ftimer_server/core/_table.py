"""The armed timers: a sans-I/O table keyed by (pid, scope_id) and ordered by deadline.

A dict of dicts (pid -> scope -> Timer) answers per-key and per-pid questions; a binary
heap of (deadline, seq, timer) entries answers "what expires next". Disarming and re-arming
leave the old heap entry in place (lazy deletion): an entry is live while the table still
maps its key to that very Timer object. The heap is rebuilt when stale entries outnumber
live ones, so every operation stays O(log n) amortised and nothing scans the table per loop.

A timer enters the heap only at the next ``settle()``: workers arm and disarm in bursts,
and a timer disarmed before then (most of them, under load) never costs a heap entry.

Timers and heap entries are ``gc=False`` structs in dicts and lists the garbage collector
need not traverse, so 100k armed timers add little to a collection's work, and a timer
costs about 300 bytes (labels included, in a table of thousands: a worker's equal ones are
held once).

``apply_batch()`` is the server's hot path: under load nearly every message is an arm or
a disarm of a worker already bound, and at two million messages a second every call and
attribute lookup shows, so it applies a run of those inline, with the table's invariants
kept in this one module.
"""

from __future__ import annotations

import heapq
import itertools
from typing import (
    AbstractSet,
    Any,
    Callable,
    Dict,
    Iterable,
    Iterator,
    List,
    Mapping,
    Optional,
    Sequence,
    Set,
    Tuple,
)

import msgspec

from ftimer_protocol import Disarm

from ._events import Armed, Disarmed, Event, RejectReason
from ._records import Timer, Worker, shared_labels
from ._stats import Counters

__all__ = ["Expiry", "TimerTable"]

#: Armed timers from which a settled timer's labels are shared with its worker's others:
#: below, their memory is a few MB at most, and the check (~0.3 us a timer) is spared to
#: a host that arms and disarms at a high rate.
SHARE_LABELS_AT = 10_000

# Below this many heap entries, stale ones are never worth a rebuild.
_COMPACT_MIN = 1024


class _Entry(msgspec.Struct, order=True, gc=False):
    """A heap entry: ordered by deadline, then arming order (``seq``) among equals."""

    deadline: float
    seq: int
    timer: Timer


class Expiry:
    """What the expiry of one worker's timers calls for (torch's rules).

    Attributes:
        pid: the worker.
        expired: its timers whose deadline passed, earliest first.
        decider: the earliest of those with a signal, or ``None`` (report only).
        cleared: every timer removed from the table: all the worker's timers when
            ``decider`` is set (a reap clears the worker), else only ``expired``.
    """

    __slots__ = ("cleared", "decider", "expired", "pid")

    def __init__(
        self,
        pid: int,
        expired: Tuple[Timer, ...],
        decider: Optional[Timer],
        cleared: Tuple[Timer, ...],
    ) -> None:
        self.pid = pid
        self.expired = expired
        self.decider = decider
        self.cleared = cleared

    @property
    def signal(self) -> int:
        """The signal to deliver: the decider's, or 0 (report only)."""
        return self.decider.signal if self.decider is not None else 0

    def __repr__(self) -> str:
        return f"Expiry(pid={self.pid}, signal={self.signal}, expired={self.expired!r})"


class TimerTable:
    """Armed timers by key, with their deadlines in order. Pure: no clock, no I/O.

    Args:
        max_per_pid: timers one pid may hold.
        max_total: timers the table may hold.
    """

    def __init__(self, max_per_pid: int = 10_000, max_total: int = 1_000_000) -> None:
        self.max_per_pid = max_per_pid
        self.max_total = max_total
        # pid -> scope_id -> Timer. A pid's (maybe empty) dict stays until disarm_all().
        self._by_pid: Dict[int, Dict[str, Timer]] = {}
        # Timers armed since the last settle(), in arming order; not in the heap yet.
        self._fresh: List[Timer] = []
        self._count = 0  # armed timers
        self._changes = 0
        self._heap: List[_Entry] = []
        self._seq = 0  # arming order, among equal deadlines (see settle())
        self._labels: Dict[int, Dict[str, str]] = {}  # pid -> the labels its timers share
        # Rebuild the heap when it grows past this (stale entries dominate by then).
        self._compact_at = _COMPACT_MIN

    def __len__(self) -> int:
        return self._count

    @property
    def changes(self) -> int:
        """Bumped by every change of the armed timers (so a saver knows when to save)."""
        return self._changes

    def __iter__(self) -> Iterator[Timer]:
        for scopes in self._by_pid.values():
            yield from scopes.values()

    def by_pid(self) -> Iterator[Tuple[int, Iterable[Timer]]]:
        """Each pid with armed timers, and its timers (a view: not to be kept)."""
        for pid, scopes in self._by_pid.items():
            if scopes:
                yield pid, scopes.values()

    def __contains__(self, pid: object) -> bool:
        """True if ``pid`` has armed timers."""
        return bool(self._by_pid.get(pid))  # type: ignore[call-overload]

    def arm(
        self, timer: Timer, *, capped: bool = True
    ) -> Tuple[Optional[Timer], Optional[RejectReason]]:
        """Arm ``timer``, replacing the one with the same key, if any.

        Args:
            capped: the limits apply (False: a timer admitted before, taken out a while).

        Returns:
            (the replaced timer or ``None``, ``None``) when armed, or
            (``None``, the reason) when a limit refuses a new key (a re-arm never is).
        """
        scopes = self._by_pid.get(timer.pid)
        if scopes is None:
            previous = None
            if capped and self._count >= self.max_total:
                return None, RejectReason.TIMER_LIMIT
            scopes = self._by_pid[timer.pid] = {}
        else:
            previous = scopes.get(timer.scope_id)
            if previous is timer:
                return previous, None
            if previous is None and capped:
                if len(scopes) >= self.max_per_pid:
                    return None, RejectReason.PID_TIMER_LIMIT
                if self._count >= self.max_total:
                    return None, RejectReason.TIMER_LIMIT
        if previous is None:
            self._count += 1
        scopes[timer.scope_id] = timer
        self._fresh.append(timer)
        self._changes += 1
        return previous, None

    def disarm(self, pid: int, scope_id: str) -> Optional[Timer]:
        """Disarm (``pid``, ``scope_id``); return the timer, or ``None`` if none was armed.

        The pid's (now maybe empty) entry stays, since workers arm and disarm in a loop;
        ``disarm_all(pid)`` removes it when the process goes.
        """
        scopes = self._by_pid.get(pid)
        if scopes is None:
            return None
        timer = scopes.pop(scope_id, None)
        if timer is not None:
            self._count -= 1
            self._changes += 1
        return timer

    def disarm_all(self, pid: int) -> List[Timer]:
        """Disarm every timer of ``pid`` and forget the pid; return the timers."""
        scopes = self._by_pid.pop(pid, None)
        self._labels.pop(pid, None)
        if not scopes:
            return []
        self._count -= len(scopes)
        self._changes += 1
        return list(scopes.values())

    def settle(self, workers: Optional[Mapping[int, Worker]] = None) -> None:
        """Put the timers armed since the last call, and still armed, in deadline order.

        Args:
            workers: the bound processes by pid. A timer decoded straight from the wire
                has its own pid and start time objects; one whose worker is given is
                re-made to share the worker's (56 bytes less per armed timer). A timer
                with labels is re-made to share its worker's dict of them, if equal (see
                ``shared_labels``: ~580 bytes less), once `SHARE_LABELS_AT` are armed.
        """
        fresh, by_pid, heap = self._fresh, self._by_pid, self._heap
        if not fresh:
            return  # the heap is as the last call left it (within its bound)
        held = self._labels if self._count >= SHARE_LABELS_AT else None
        # The arming order among equal deadlines, without an int object per entry: the
        # entries of one call share ``seq`` (past every earlier call's), and only a
        # deadline met again within the call takes a later one of its own.
        seq = self._seq + 1
        deadlines: Set[float] = set()
        ties = 0
        for armed in fresh:
            scopes = by_pid.get(armed.pid)
            if scopes is None or scopes.get(armed.scope_id) is not armed:
                continue  # disarmed or replaced since
            timer = armed
            labels = armed.labels
            if labels and held is not None:
                labels = shared_labels(held, armed.pid, labels)
            worker = workers.get(armed.pid) if workers is not None else None
            if labels is not armed.labels or (
                worker is not None
                and (armed.pid is not worker.pid or armed.start_time is not worker.start_time)
            ):
                timer = scopes[armed.scope_id] = Timer(
                    armed.pid if worker is None else worker.pid,
                    armed.scope_id,
                    armed.deadline,
                    armed.signal,
                    armed.start_time if worker is None else worker.start_time,
                    labels,
                    armed.dump,
                )
            deadline = timer.deadline
            if deadline in deadlines:
                ties += 1
                heapq.heappush(heap, _Entry(deadline, seq + ties, timer))
            else:
                deadlines.add(deadline)
                heapq.heappush(heap, _Entry(deadline, seq, timer))
        self._seq = seq + ties
        fresh.clear()
        if len(heap) > self._compact_at:
            self._compact()

    def apply_batch(
        self,
        messages: Sequence[Any],
        start: int,
        *,
        workers: Mapping[int, Worker],
        signals: AbstractSet[int],
        counters: Counters,
        emit: Optional[Callable[[Event], None]],
    ) -> int:
        """Apply ``messages[start:]`` up to the first that needs more than the table.

        Applied here: a ``Timer`` (an arm the server's reader decoded) of a bound worker
        on the server's clocks with its start time and an allowed signal, and a
        ``Disarm`` of a worker bound with a pidfd (its start time, if given, matching);
        each is counted in ``counters`` and, with ``emit``, reported as ``Armed`` or
        ``Disarmed``. Anything else (an unbound worker, a limit reached, another message
        type) is left to the caller.

        Returns:
            The index of the first message not applied (``len(messages)`` if none).
        """
        by_pid_get = self._by_pid.get
        workers_get = workers.get
        fresh_append, fresh_pop = self._fresh.append, self._fresh.pop
        last = None  # the record fresh_append() took last, while it is fresh's last
        per_pid = self.max_per_pid
        # Each message arms at most one timer: with this much room left, the total limit
        # cannot refuse any of them, and only the per-pid one needs checking.
        room = self.max_total - self._count >= len(messages) - start
        armed = rearmed = disarmed = unknown = 0
        # ``m`` is untyped so no isinstance() is paid per message: each branch knows the
        # exact type it checked.
        m: Any
        try:
            for m in itertools.islice(messages, start, None) if start else messages:
                t = type(m)
                if t is Timer:
                    worker = workers_get(m.pid)
                    if worker is None or m.start_time != worker.start_time or worker.other_clocks:
                        break
                    scopes = by_pid_get(m.pid)
                    if scopes is None or m.signal not in signals:
                        break
                    previous = scopes.get(m.scope_id)
                    if previous is None and not (room and len(scopes) < per_pid):
                        break
                    scopes[m.scope_id] = m
                    fresh_append(m)
                    last = m
                    if previous is None:
                        armed += 1
                    else:
                        rearmed += 1
                    if emit is not None:
                        emit(Armed(m, previous is not None))
                elif t is Disarm:
                    worker = workers_get(m.pid)
                    if (
                        worker is None
                        or worker.pidfd is None
                        or (m.start_time is not None and m.start_time != worker.start_time)
                    ):
                        break
                    scopes = by_pid_get(m.pid)
                    gone = None if scopes is None else scopes.pop(m.scope_id, None)
                    if gone is None:
                        unknown += 1
                    else:
                        disarmed += 1
                        if gone is last:  # armed just before: it need not settle
                            fresh_pop()
                            last = None
                        if emit is not None:
                            emit(Disarmed(gone))
                else:
                    break
        finally:
            self._count += armed - disarmed
            self._changes += armed + rearmed + disarmed
            counters.arm_ok += armed + rearmed
            counters.disarm_ok += disarmed
            counters.disarm_unknown += unknown
        return start + armed + rearmed + disarmed + unknown

    def next_deadline(self) -> Optional[float]:
        """The earliest deadline of an armed timer, or ``None`` when none is armed."""
        if self._fresh:
            self.settle()
        heap = self._heap
        while heap:
            timer = heap[0].timer
            if self._is_live(timer):
                return timer.deadline
            heapq.heappop(heap)
        return None

    def expire(self, now: float) -> List[Expiry]:
        """Remove the timers whose deadline is at or before ``now``; say what they call for.

        Per pid, torch's rules: the earliest expired timer with a signal decides it, and
        then every timer of that pid is cleared; with none, only the expired ones go.
        Results are in the order of each pid's earliest expired deadline.
        """
        if self._fresh:
            self.settle()
        heap = self._heap
        # pid -> scope -> timer: a record armed twice has two live entries, expired once.
        expired: Dict[int, Dict[str, Timer]] = {}
        while heap and heap[0].deadline <= now:
            timer = heapq.heappop(heap).timer
            if self._is_live(timer):
                expired.setdefault(timer.pid, {})[timer.scope_id] = timer
        out: List[Expiry] = []
        for pid, by_scope in expired.items():
            timers = tuple(by_scope.values())
            decider = next((t for t in timers if t.signal > 0), None)
            if decider is not None:
                cleared = tuple(self.disarm_all(pid))
            else:
                for t in timers:
                    self.disarm(pid, t.scope_id)
                cleared = timers
            out.append(Expiry(pid, timers, decider, cleared))
        return out

    def _is_live(self, timer: Timer) -> bool:
        scopes = self._by_pid.get(timer.pid)
        return scopes is not None and scopes.get(timer.scope_id) is timer

    def _compact(self) -> None:
        # Called when the heap outgrew the last bound; rebuilt only if stale entries now
        # outnumber live ones. Either way the next rebuild waits until the heap doubles
        # the live count again, so each costs O(1) per entry pushed since the last.
        if len(self._heap) > 2 * self._count:
            # Keep the live entries as they are (their seq: the arming order among equal
            # deadlines).
            self._heap = [e for e in self._heap if self._is_live(e.timer)]
            heapq.heapify(self._heap)
        self._compact_at = max(_COMPACT_MIN, 2 * self._count)
