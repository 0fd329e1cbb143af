"""The server's decisions, without I/O of its own: messages in, timers, reaps and events out.

``Watchdog`` applies decoded messages with the time passed in, binds each worker to its
process from the facts its ``Host`` resolved, enforces the policy, and on ``tick()``
expires timers and reaps through the ``Reaper``. Everything it does is reported as an
event. The I/O loop feeds it and sleeps until ``next_wakeup()``; tests drive it directly
with a fake clock and a fake host.
"""

from __future__ import annotations

import contextlib
import itertools
from typing import (
    Callable,
    Container,
    Dict,
    FrozenSet,
    Iterable,
    Iterator,
    List,
    NamedTuple,
    Optional,
    Sequence,
    Set,
    Tuple,
    Union,
    cast,
)

import msgspec

from ftimer_protocol import (
    Arm,
    Disarm,
    DisarmAll,
    DumpHook,
    Expire,
    Message,
    Sync,
    TimerRequestV1,
)

from ._events import (
    Armed,
    DecodeFailed,
    Disarmed,
    Escalated,
    Event,
    Expired,
    Incoming,
    Moot,
    Reaped,
    Refused,
    Rejected,
    RejectReason,
    ResendsOver,
    WorkerGone,
)
from ._horizon import Horizon
from ._host import Facts, Host, Peer, Unresolved
from ._policy import Policy, check_pid, clocks_apart, judge
from ._reaper import Reaper
from ._records import ABOUT_A_PROCESS, Timer, Worker
from ._stats import Counters, Stats
from ._table import Expiry, TimerTable

__all__ = ["Watchdog"]

#: How long a refusal of a live process for what it is (a thread, of a user not allowed,
#: not the server's descendant) is remembered, and for how many pids at most: a flood of
#: lines for such a pid then costs a lookup each, not a look at /proc each (up to ms
#: with a deep ancestry), which kept the pipe full and the healthy waiting to write.
#: Short, so that a process whose user or parent changes is judged again soon. A thread
#: (no pidfd holds one) is remembered by its id alone: were the thread to end and a new
#: process get its id within that time, that process's arms would be refused until then.
REFUSAL_TTL = 1.0
MAX_REFUSALS = 1024
#: After a restart, a restored timer that no client has re-sent since (re-armed or
#: disarmed) waits for it past the restore grace while the queues are found full (the
#: clients' re-sends, which begin with what may have been lost: a disarm of the outage),
#: until they have had room for ``RESYNC_QUIET`` seconds (the client's longest back-off
#: and a margin), and at most ``RESYNC_WAIT`` seconds: on a host with many timers the
#: re-sends of all queue up for seconds (75k timers over the socket took 7-12 s on 2
#: cores), and one worker's disarm came after the grace: a healthy worker reaped.
RESYNC_QUIET = 1.5
RESYNC_WAIT = 30.0
#: The most peers a stuck worker's incident captures (the first found): a job of
#: thousands of workers on one host made each reap capture them all, from the loop,
#: and reaps came seconds late, then not at all. An incident holds a few captures'
#: stacks whole anyway, and a host's ranks of one job are rarely more.
MAX_PEERS = 15
#: The timers of each armed worker a reap looks at for its job label (`_peers`).
PEER_SCAN_PER_PID = 16
#: Refusals that are facts about the process holding the pid, not about one message.
_LASTING = frozenset(
    (
        RejectReason.NOT_A_PROCESS,
        RejectReason.OTHER_CLOCK,
        RejectReason.UID_NOT_ALLOWED,
        RejectReason.NOT_DESCENDANT,
    )
)

#: Requests that disarm: about a process that has exited, they are of no timer (its
#: timers went with it).
_DISARMS = frozenset(("disarm", "disarm_all"))

#: What a saved timer or a journal's line meets when its worker exited while no server
#: ran: its pid is free, or another process's (a start time that differs, or born after
#: the save). Nothing was asked amiss: not a refusal.
_GONE_SINCE = frozenset((RejectReason.NO_SUCH_PROCESS, RejectReason.IDENTITY_MISMATCH))

#: Why a journal's line naming no start time (torch's) is not applied to a process born
#: after the snapshot the journal follows: the line may be its own, or of a worker that
#: exited and whose pid it took; neither can be told.
_BORN_SINCE = (
    "the process was born after the last saved state, and the line names no start time "
    "(torch's): it may be its own or an exited worker's whose pid it took; not applied "
    "(a live worker is unwatched until it arms again)"
)

#: Why an arm on its clocks is refused for a worker bound for timers not on them.
_BOUND_ON_OTHER_CLOCKS = (
    "its time namespace's offsets are not the server's (bound for timers on other clocks: "
    "torch's, or saved ones)"
)

Labels = Optional[Dict[str, str]]


def _v1_deadline(request: TimerRequestV1, now: float, wall: float) -> float:
    """The monotonic deadline of torch's wall-clock ``expiration_time``, at ``now``
    (``wall``). A time long past would make a negative deadline, outside the schema of
    what is saved: it is simply due now."""
    return max(0.0, now + (request.expiration_time - wall))


def _v1_message(
    request: TimerRequestV1, now: float, wall: float, start_time: Optional[int]
) -> Union[Arm, Disarm]:
    """torch's request as the disarm or arm it is, at ``now`` (``wall``), as
    ``Watchdog._apply_one`` applies it without making it (on the path of every line
    torch's clients write): its negative signal (torch's "will not kill") as 0."""
    pid, scope_id = request.pid, request.scope_id
    if request.is_release:
        return Disarm(pid, scope_id, start_time)
    deadline = _v1_deadline(request, now, wall)
    return Arm(pid, scope_id, deadline, max(request.signal, 0), start_time)


def _ignore(_: object) -> None:
    pass


class _Refusal(NamedTuple):
    """A pid refused for a while (``REFUSAL_TTL``): its next requests are answered with
    the same refusal, unread."""

    why: RejectReason
    detail: str
    #: When it ends (the watchdog's clock).
    until: float
    #: The process refused, held so that its pid is not taken for another's meanwhile;
    #: None for a thread, which no pidfd holds.
    process: Optional[Worker]


class Watchdog:
    """Armed timers, bound workers, reaps and counters, driven by the caller.

    Args:
        host: the edge: resolves pids into facts, watches bound workers, signals.
        policy: what may be armed and signalled.
        server_pid: the server's process, never signalled.
        ancestors: the server's ancestors, never signalled.
        own: the processes the server runs for itself (its capture helper, which may be
            started again with another pid): never signalled.
        emit: receives every event, in order.
        escalate_after: grace period before SIGKILL (``None``: never escalate).
        timer_events: emit ``Armed`` and ``Disarmed`` (one per request: the bulk of all
            events); without them the counters still count every request. An attribute
            of the same name changes it later.
        signal_override: the signal every reap sends instead of the deciding timer's
            (report-only timers stay report-only).
        capture_budget: ask the host to capture diagnostics before each reap, and signal
            when it is done or after this many seconds; ``None``: never.
        job_label: the label whose value names a worker's job: the other workers of the
            stuck one's job are its peers, captured too. ``None``: no peers.

    Raises:
        ValueError: ``escalate_after`` or ``capture_budget`` is not a finite number >= 0,
            or ``signal_override`` is not a signal of this platform.
    """

    def __init__(
        self,
        *,
        host: Host,
        policy: Optional[Policy] = None,
        server_pid: int,
        ancestors: FrozenSet[int] = frozenset(),
        own: Container[int] = (),
        emit: Callable[[Event], None] = _ignore,
        escalate_after: Optional[float] = None,
        timer_events: bool = True,
        signal_override: Optional[int] = None,
        capture_budget: Optional[float] = None,
        job_label: Optional[str] = "job",
    ) -> None:
        policy = policy or Policy()
        self.policy = policy
        self.table = TimerTable(policy.max_timers_per_pid, policy.max_timers)
        self.counters = Counters()
        self._host = host
        self._reaper = Reaper(host, escalate_after, signal_override, capture_budget)
        self._job_label = job_label
        self._captures = capture_budget is not None
        self._server_pid = server_pid
        self._ancestors = ancestors
        self._own = own
        self._signals = policy.signals(host.signals)
        self._emit_to = emit
        self._workers: Dict[int, Worker] = {}
        #: pid -> its refusal, in the order they end: REFUSAL_TTL after the last ``now``
        #: given to ``apply()``, which never goes back (before any, a restore's at once).
        self._refused: Dict[int, _Refusal] = {}
        self._now = 0.0
        self._hold_until = 0.0
        #: After a restart, until ``_unheard_until`` (``hold()``): pid -> the scopes of
        #: its restored timers not heard of since (neither re-armed nor disarmed: its
        #: clients, one per transport or protocol, re-send each), and the timers of
        #: workers that came due meanwhile, all unheard of, out of the table (``_park()``).
        self._unheard: Dict[int, Set[str]] = {}
        self._unheard_until = 0.0
        self._parked: Dict[int, Tuple[Timer, ...]] = {}
        #: Holds judgement back after a queue was found full (the I/O loop tells it what
        #: it read): a writer may be waiting for room with a disarm.
        self.horizon = Horizon()
        self.timer_events = timer_events
        #: While set (a restore, or a replay of a journal, written by then, in clock ticks
        #: since boot), a process that started later is not bound for a line naming it
        #: without a start time (torch's): an identity mismatch, counted as the writer's
        #: exit for saved timers (it holds a reused pid), refused for a journal's lines
        #: (see ``catching_up()``).
        self.written_at_tick: Optional[int] = None
        #: A restore or a replay is being applied: requests were read by a server before,
        #: and a worker found gone exited since (see ``catching_up()``).
        self._catching_up = False
        #: What is caught up on was written since ``written_at_tick`` (a journal).
        self._since = False

    # -- input -------------------------------------------------------------------------

    def apply(self, results: Sequence[Incoming], now: float, wall: float) -> List[str]:
        """Apply decoded messages (and count decode errors), in order, at time ``now``.

        Args:
            results: what the stream decoder produced.
            now: ``time.monotonic()``.
            wall: ``time.time()`` at the same instant, to convert version 1 deadlines.

        Returns:
            The tokens of the ``Sync`` messages among them.
        """
        tokens: List[str] = []
        self._now = now
        if self._unheard and not self._catching_up:
            self._heard(results)
        table, workers, signals, counters = self.table, self._workers, self._signals, self.counters
        emit = self._emit_to if self.timer_events else None
        i, n = 0, len(results)
        try:
            while True:
                # The common case, arms and disarms of bound workers, in one call; the
                # first message it leaves goes the general way, in order.
                i = table.apply_batch(
                    results, i, workers=workers, signals=signals, counters=counters, emit=emit
                )
                if i >= n:
                    break
                self._apply_one(results[i], now, wall, tokens)
                i += 1
        finally:
            table.settle(workers)
        return tokens

    def _apply_one(self, m: Incoming, now: float, wall: float, tokens: List[str]) -> None:
        """Apply one message (or count one decode error) the general way."""
        if isinstance(m, Arm):  # a Timer (decoded by the server's reader) is an Arm
            self._arm(
                "arm", m.pid, m.scope_id, m.deadline, m.signal, m.start_time, m.labels, m.dump
            )
        elif isinstance(m, Disarm):
            self._disarm("disarm", m.pid, m.scope_id, m.start_time)
        elif isinstance(m, TimerRequestV1):  # as _v1_message() makes it
            if m.is_release:
                self._disarm("disarm", m.pid, m.scope_id, None)
            else:
                signal = max(m.signal, 0)  # torch's "will not kill" is negative
                deadline = _v1_deadline(m, now, wall)  # the wall clock: no time namespace's
                self._arm("arm", m.pid, m.scope_id, deadline, signal, None, None, its_clocks=False)
        elif isinstance(m, DisarmAll):
            self._disarm("disarm_all", m.pid, None, m.start_time)
        elif isinstance(m, Expire):
            # Its deadline is the server's "now": only a start time is the process's reading.
            args = (m.pid, m.scope_id, now, m.signal, m.start_time, m.labels, m.dump)
            self._arm("expire", *args, its_clocks=m.start_time is not None)
        elif isinstance(m, Sync):
            self.counters.requests["sync", "ok"] += 1
            tokens.append(m.token)
        elif isinstance(m, Refused):
            self._reject(m.reason, m.request, m.pid, m.scope_id, None, m.detail)
        elif isinstance(m, Moot):
            self._moot(m.request)
        else:
            self._emit(DecodeFailed(type(m).__name__, m.reason, m.excerpt, m.lines))

    @contextlib.contextmanager
    def catching_up(self, written_at_tick: Optional[int], *, since: bool = False) -> Iterator[None]:
        """Apply, within it, what an earlier server read (its journal's lines; ``restore()``
        takes it itself): a request whose worker is gone now (its pid free or another
        process's) counts ``exited``, not a refusal: the worker ended while no server ran.

        Args:
            written_at_tick: when it was written, in clock ticks since boot (``None``:
                not known): a process born later holds a reused pid.
            since: it was written since ``written_at_tick`` instead (a journal after its
                snapshot): a process born later may have written a line itself, or hold
                a pid of a worker that exited. A line naming it without a start time
                (torch's) is refused, not bound and not counted ``exited``: logged, as
                its worker may be alive and unwatched.
        """
        self.written_at_tick, self._catching_up, self._since = written_at_tick, True, since
        try:
            yield
        finally:
            self.written_at_tick, self._catching_up, self._since = None, False, False

    def restore(self, timers: Iterable[Timer], written_at_tick: Optional[int] = None) -> None:
        """Arm saved timers again (a restarted daemon's state), checking each process.

        The timers of a process that is gone now (no process holds its pid, or another
        one: another start time) are dropped with a ``WorkerGone`` event and counted
        ``("restore", "exited")``; a timer the policy refuses is dropped with a
        ``Rejected`` event (request ``"restore"``); the others are armed with an
        ``Armed`` event.

        Args:
            timers: the saved timers.
            written_at_tick: when they were saved, in clock ticks since boot: a timer saved
                without a start time is refused for a process that started later (it
                holds a reused pid), as a journal's line is in a replay.
        """
        # Each start time of a pid checked on its own (a state file names one a pid, but
        # a damaged one may name two: only the process holding the pid now is bound);
        # torch's timers (none) last, with the process bound by then.
        by_process: Dict[Tuple[int, Optional[int]], List[Timer]] = {}
        for timer in sorted(timers, key=lambda t: t.start_time is None):
            by_process.setdefault((timer.pid, timer.start_time), []).append(timer)
        confirmed: Dict[int, bool] = {}  # pid -> whether a start time of it was bound
        with self.catching_up(written_at_tick):
            for (pid, start_time), group in by_process.items():
                worker = self._workers.get(pid)
                # torch's timers of a pid whose start times all named another process:
                # nothing says the process holding it is theirs.
                unconfirmed = start_time is None and confirmed.get(pid) is False
                if unconfirmed or worker is None or start_time not in (None, worker.start_time):
                    bound = None if unconfirmed else self._bind(pid, start_time, its_clocks=False)
                    if bound is None or (not isinstance(bound, Worker) and self._ended(bound)):
                        self.counters.requests["restore", "exited"] += len(group)
                        self._emit(WorkerGone(pid, start_time, tuple(group)))
                        if start_time is not None:
                            confirmed.setdefault(pid, False)
                        continue
                if start_time is not None:
                    confirmed[pid] = True
                for t in group:
                    self._arm(
                        "restore",
                        pid,
                        t.scope_id,
                        t.deadline,
                        t.signal,
                        start_time,
                        t.labels,
                        t.dump,
                        its_clocks=False,  # saved on the server's clocks
                    )

    def worker_gone(self, worker: Worker) -> None:
        """The I/O loop saw ``worker`` exit (its pidfd became readable): drop its timers."""
        if self._workers.get(worker.pid) is worker:
            self._gone(worker)

    def captured(self, pid: int, now: float) -> None:
        """The host finished the capture it was asked for about ``pid``: signal it now
        (unless its budget ran out first, or it exited)."""
        reaped = self._reaper.captured(pid, now)
        if reaped is not None:
            self._signalled([reaped], [])

    # -- time --------------------------------------------------------------------------

    def hold(self, until: float) -> None:
        """Expire nothing before ``until``: after a restart, the workers' clients need
        that long to re-send what they could not write while no server read the FIFO
        (a disarm written during the outage), so a deadline that fell in the outage is
        judged only then. And a timer armed now (restored) not heard of since (its
        scope neither re-armed nor disarmed) waits for it while the clients' re-sends
        fill the queues (they begin with what may have been lost): see
        ``RESYNC_QUIET``."""
        self._hold_until = max(self._hold_until, until)
        self._unheard = {}
        for t in itertools.chain(self.table, self._parked_timers()):
            self._unheard.setdefault(t.pid, set()).add(t.scope_id)
        self._unheard_until = self._hold_until + RESYNC_WAIT

    def next_wakeup(self) -> Optional[float]:
        """The next time ``tick()`` has something to do, or ``None`` (nothing armed)."""
        deadline = self.horizon.wakeup(self.table.next_deadline())
        if deadline is not None and deadline < self._hold_until:
            deadline = self._hold_until
        if self._parked and (deadline is None or self._resynced_by() < deadline):
            deadline = self._resynced_by()
        escalation = self._reaper.next_deadline()
        if deadline is None:
            return escalation
        if escalation is None:
            return deadline
        return min(deadline, escalation)

    def tick(self, now: float, horizon: Optional[float] = None) -> None:
        """Expire the timers due, reap their workers, escalate where due at ``now``.

        Args:
            now: the time.
            horizon: expire only timers whose deadline is at or before it (``now`` by
                default), or, after a queue was found full, at or before the last
                moment known safe (see ``Horizon``). The I/O loop passes the last
                moment before which it has read everything written to it, so that no
                timer expires while a disarm written before its deadline still waits to
                be read.
        """
        if self._unheard and now >= self._resynced_by():
            self._heard_all(now)
        if now >= self._hold_until:
            judged = self.horizon.judged(now if horizon is None else min(horizon, now))
            expiries = self.table.expire(judged)
            if self._unheard:
                expiries = self._park(expiries)
            # Ranks that hang together expire together: each is the others' peer, though
            # their timers just left the table.
            together = [t for e in expiries for t in e.cleared] if len(expiries) > 1 else []
            for expiry in expiries:
                self._expired(expiry, now, together)
        # Captures whose budget ran out, and grace periods that ended: signal now.
        self._signalled(self._reaper.due(now), self._reaper.escalate(now))
        for event in self._reaper.unkillable(now):
            self._emit(event)
        refused = self._refused  # in the order they end: let go of the pidfds of those past
        while refused and next(iter(refused.values())).until <= now:
            self._forget_refusal(next(iter(refused)))

    def finish(self, now: float) -> int:
        """The server stops: signal now the reaps waiting for their capture, and SIGKILL
        the reaped workers still in their grace period (``Reaper.finish()``); return how
        many workers that concerned."""
        reaped, escalated = self._reaper.finish(now)
        self._signalled(reaped, escalated)
        return len({r.pid for r in reaped} | {w.pid for w, event in escalated if event})

    def _signalled(
        self, reaped: Sequence[Reaped], escalated: Sequence[Tuple[Worker, Optional[Escalated]]]
    ) -> None:
        for event in reaped:
            self._emit(event)
            worker = self._workers.get(event.pid)
            if worker is not None:
                self._release_if_idle(worker)
        for worker, escalation in escalated:
            if escalation is None or escalation.exited:
                self.worker_gone(worker)  # nothing if it was seen gone before
            if escalation is not None:
                self._emit(escalation)
                self._release_if_idle(worker)

    # -- views -------------------------------------------------------------------------

    def armed(self) -> List[Timer]:
        """A snapshot of the armed timers."""
        return list(self.table) + self._parked_timers()

    @property
    def changes(self) -> int:
        """Counts the changes to what ``saved()`` returns (the table's and the reaps')."""
        return self.table.changes + self._reaper.changes

    def saved(self) -> List[Timer]:
        """What a restart must restore: the armed timers, then the reaps not finished
        (``Reaper.unfinished()``: a capture or a SIGKILL still due), which win over an
        armed timer of the same key."""
        return list(self.table) + self._parked_timers() + self._reaper.unfinished()

    def as_bound(self, results: Sequence[Incoming], now: float, wall: float) -> List[Message]:
        """What a journal keeps of ``results``, just applied at ``now`` (``wall``): their
        messages about a process, each naming the start time of the process its pid is
        bound to (a restart applies them to that process only), a version 1 request as
        the arm or disarm it was. An arm or expire whose pid is bound to nobody now (it
        was refused) is left out: at a restart it could bind a process that took the pid.
        """
        out: List[Message] = []
        for result in results:
            kind = type(result)
            if kind not in ABOUT_A_PROCESS:
                continue
            m = cast(Union[Arm, Disarm, DisarmAll, Expire, TimerRequestV1], result)
            worker = self._workers.get(m.pid)
            start_time = None if worker is None else worker.start_time
            if isinstance(m, TimerRequestV1):
                m = _v1_message(m, now, wall, start_time)
                if worker is None and isinstance(m, Arm):
                    continue
            elif worker is None:
                if not isinstance(m, (Disarm, DisarmAll)):
                    continue
            elif m.start_time is None and start_time is not None:
                m = msgspec.structs.replace(m, start_time=start_time)
            out.append(m)
        return out

    def workers(self) -> List[Worker]:
        """The processes bound now."""
        return list(self._workers.values())

    def stats(self) -> Stats:
        """A snapshot of the counters."""
        armed = len(self.table) + sum(map(len, self._parked.values()))
        return self.counters.snapshot(armed, len(self._workers), self._reaper.outliving)

    def close(self) -> None:
        """Release every bound worker (closes pidfds); timers stay, for ``armed()``."""
        for worker in list(self._workers.values()):
            self._release(worker)
        self._workers.clear()
        while self._refused:
            self._forget_refusal(next(iter(self._refused)))

    # -- internals ---------------------------------------------------------------------

    def _emit(self, event: Event) -> None:
        self.counters.count(event)
        self._emit_to(event)

    def _reject(  # noqa: PLR0917 - positional, like Rejected's fields
        self,
        reason: RejectReason,
        request: str,
        pid: int,
        scope_id: Optional[str],
        labels: Labels,
        detail: str = "",
    ) -> None:
        self.counters.requests[request, "rejected"] += 1
        self._emit(Rejected(reason, request, pid, scope_id, labels, detail))

    def _arm(  # noqa: PLR0917 - positional on the hot path
        self,
        request: str,
        pid: int,
        scope_id: str,
        deadline: float,
        signal: int,
        start_time: Optional[int],
        labels: Labels,
        dump: Optional[DumpHook] = None,
        *,
        its_clocks: bool = True,
    ) -> None:
        if signal not in self._signals:
            reason = RejectReason.SIGNAL_NOT_ALLOWED
            self._reject(reason, request, pid, scope_id, labels, f"signal {signal}")
            return
        worker = self._workers.get(pid)
        # torch's arm (no start time) for a worker whose exit is held goes to that worker
        # and is dropped with it: its own last words are what the hold is for, and
        # nothing tells them from an arm of a process that took the pid since (which
        # re-arms at its next step). Bound to that one, they reaped who never asked.
        if worker is None or (
            start_time is not None
            and worker.start_time is not None
            and worker.start_time != start_time
        ):
            bound = self._bind(pid, start_time, its_clocks)
            if not isinstance(bound, Worker):
                if self._ended(bound):
                    self._moot(request)
                else:
                    self._reject(bound.reason, request, pid, scope_id, labels, bound.detail)
                return
            worker = bound
        elif its_clocks and worker.other_clocks:
            reason, detail = RejectReason.OTHER_CLOCK, _BOUND_ON_OTHER_CLOCKS
            self._reject(reason, request, pid, scope_id, labels, detail)
            return
        # The worker's pid and start time objects are shared by all its timers.
        timer = Timer(worker.pid, scope_id, deadline, signal, worker.start_time, labels, dump)
        previous, limit = self.table.arm(timer)
        if limit is not None:
            table = self.table
            n = table.max_total if limit is RejectReason.TIMER_LIMIT else table.max_per_pid
            self._reject(limit, request, pid, scope_id, labels, f"limit {n}")
            self._release_if_idle(worker)
            return
        self.counters.requests[request, "ok"] += 1
        if self.timer_events:
            self._emit_to(Armed(timer, previous is not None))

    def _ended(self, unresolved: Unresolved) -> bool:
        """Whether the process a request was about has ended: seen exited, or, for what
        an earlier server read, its pid found free or another process's."""
        return unresolved.exited or (
            self._catching_up
            and unresolved.reason in _GONE_SINCE
            and unresolved.detail != _BORN_SINCE  # maybe its own line: never said exited
        )

    def _moot(self, request: str) -> None:
        """Count a request about a process that exited before it was read: its timers went
        with it, and an arm has nothing left to watch (``ftimer exec``'s quick command).
        Not a refusal: nothing was asked amiss."""
        self.counters.requests[request, "unknown" if request in _DISARMS else "exited"] += 1

    def _disarm(
        self, request: str, pid: int, scope_id: Optional[str], start_time: Optional[int]
    ) -> None:
        worker = self._workers.get(pid)
        if worker is None:
            self.counters.requests[request, "unknown"] += 1
            return
        if (
            start_time is not None
            and worker.start_time is not None
            and worker.start_time != start_time
        ):
            if self._host.alive(worker):
                self._reject(RejectReason.IDENTITY_MISMATCH, request, pid, scope_id, None)
            else:  # the bound process exited and its pid was reused by the sender
                self._gone(worker)
                self.counters.requests[request, "unknown"] += 1
            return
        if scope_id is None:
            timers = self.table.disarm_all(pid)
        else:
            timer = self.table.disarm(pid, scope_id)
            timers = [timer] if timer is not None else []
        self.counters.requests[request, "ok" if timers else "unknown"] += 1
        if self.timer_events:
            for timer in timers:
                self._emit_to(Disarmed(timer))
        if worker.pidfd is None:
            self._release_if_idle(worker)

    def _bind(
        self, pid: int, start_time: Optional[int], its_clocks: bool = True
    ) -> Union[Worker, Unresolved]:
        """Bind ``pid`` to the process holding it now, from the facts the host resolved;
        or say why not. ``its_clocks``: as ``judge()`` takes it."""
        reason = check_pid(pid, self._server_pid, self._ancestors, self._own)
        if reason is not None:
            return Unresolved(reason)
        old = self._workers.get(pid)
        if old is not None:
            # The message names another process than the one bound to this pid.
            if self._host.alive(old):
                if its_clocks and old.other_clocks:  # its start times read otherwise
                    return Unresolved(RejectReason.OTHER_CLOCK, _BOUND_ON_OTHER_CLOCKS)
                return Unresolved(RejectReason.IDENTITY_MISMATCH)
            self._gone(old)
        refused = self._refused.get(pid)
        if refused is not None and refused.why is RejectReason.OTHER_CLOCK and not its_clocks:
            self._forget_refusal(pid)  # refused for what this request does not carry
            refused = None
        if refused is not None:
            why, detail, until, process = refused
            if until > self._now and (process is None or self._host.alive(process)):
                known = None if process is None else process.start_time
                if (
                    start_time is not None
                    and known not in (None, start_time)
                    and why is not RejectReason.OTHER_CLOCK  # its start times read otherwise
                ):
                    return Unresolved(RejectReason.IDENTITY_MISMATCH)  # as judge() would say first
                return Unresolved(why, detail)
            self._forget_refusal(pid)
        facts = self._host.resolve(pid, ancestry=self.policy.descendants_only)
        if isinstance(facts, Unresolved) and facts.scarce and self._let_go_of_idle():
            # Processes with no timer (named once by anyone who may write the FIFO) or
            # refused a moment ago held them: a worker that arms now is watched first.
            facts = self._host.resolve(pid, ancestry=self.policy.descendants_only)
        if not isinstance(facts, Facts):
            if facts.reason is RejectReason.NOT_A_PROCESS:
                self._remember_refusal(pid, facts.reason, facts.detail, None)
            return facts
        other_clocks = facts.clock_offsets != (0, 0)
        worker = Worker(pid, facts.start_time, facts.pidfd, other_clocks)
        reason = judge(facts, start_time, self.policy, self._server_pid, its_clocks)
        later = self.written_at_tick is not None and (facts.start_time or 0) > self.written_at_tick
        detail = ""
        if reason is None and start_time is None and later:
            reason = RejectReason.IDENTITY_MISMATCH
            detail = _BORN_SINCE if self._since else ""
        if reason is not None:
            if reason is RejectReason.OTHER_CLOCK:
                detail = clocks_apart(facts.clock_offsets)
            if reason in _LASTING:
                self._remember_refusal(pid, reason, detail, worker)
            else:
                self._host.release(worker)
            return Unresolved(reason, detail)
        self._workers[pid] = worker
        self._host.bound(worker)
        return worker

    def _remember_refusal(
        self, pid: int, why: RejectReason, detail: str, process: Optional[Worker]
    ) -> None:
        if len(self._refused) >= MAX_REFUSALS:
            self._forget_refusal(next(iter(self._refused)))  # the oldest
        self._refused[pid] = _Refusal(why, detail, self._now + REFUSAL_TTL, process)

    def _forget_refusal(self, pid: int) -> None:
        process = self._refused.pop(pid).process
        if process is not None:
            self._host.release(process)

    def _release(self, worker: Worker) -> None:
        self._host.release(worker)

    def _let_go_of_idle(self) -> bool:
        """Close the pidfds held for nothing: of the refusals remembered, and of the
        bound workers with no timer, none parked and no reap pending (bound again at
        their next arm). Returns whether any was closed."""
        refused = [pid for pid, r in self._refused.items() if r.process is not None]
        for pid in refused:
            self._forget_refusal(pid)
        idle = [w for w in self._workers.values() if w.pidfd is not None and self._idle(w.pid)]
        for worker in idle:
            self._unbind(worker)
        return bool(refused or idle)

    def _heard(self, results: Sequence[Incoming]) -> None:
        """The scopes that ``results`` (applied next) arm or disarm are heard of since the
        restart: their workers' parked timers go back to the table first, for what they
        say to apply to them (those still unheard of are parked again at the next
        tick)."""
        unheard = self._unheard
        for m in results:
            if type(m) not in ABOUT_A_PROCESS or m.pid not in unheard:  # type: ignore[union-attr]
                continue
            pid = m.pid  # type: ignore[union-attr]
            scopes = unheard[pid]
            if isinstance(m, DisarmAll):
                scopes.clear()
            else:
                scopes.discard(m.scope_id)  # type: ignore[union-attr]
            if not scopes:
                del unheard[pid]
            self._unpark(pid)

    def _resynced_by(self) -> float:
        """When the clients' re-sends after the restart are taken to be over: the queues
        have had room for ``RESYNC_QUIET`` seconds since the grace, or ``RESYNC_WAIT``
        is over."""
        quiet = max(self._hold_until, self.horizon.full_at + RESYNC_QUIET)
        return min(quiet, self._unheard_until)

    def _heard_all(self, now: float) -> None:
        """The re-sends are over: the parked timers go back to the table, to expire."""
        if self._parked:
            timers = sum(map(len, self._parked.values()))
            self._emit(ResendsOver(timers, len(self._parked), now - self._hold_until))
        for pid in list(self._parked):
            self._unpark(pid)
        self._unheard.clear()

    def _park(self, expiries: List[Expiry]) -> List[Expiry]:
        """``expiries`` but those whose expired timers are all unheard of since the
        restart, kept out of the table until one of the worker's is (``_heard``)."""
        out = []
        for expiry in expiries:
            scopes = self._unheard.get(expiry.pid, ())
            if all(t.scope_id in scopes for t in expiry.expired):
                self._parked[expiry.pid] = self._parked.get(expiry.pid, ()) + expiry.cleared
            else:
                out.append(expiry)
        return out

    def _unpark(self, pid: int) -> None:
        for timer in self._parked.pop(pid, ()):
            self.table.arm(timer, capped=False)  # its room may be another's by now

    def _parked_timers(self) -> List[Timer]:
        return [t for timers in self._parked.values() for t in timers]

    def _release_if_idle(self, worker: Worker) -> None:
        # A worker bound with a pidfd stays bound until it exits: binding costs a few
        # system calls, and workers arm and disarm in a loop. Without a pidfd there is
        # nothing to hold, and nothing would tell us it exited: let it go when idle.
        if (
            worker.pidfd is None
            and self._idle(worker.pid)
            and self._workers.get(worker.pid) is worker
        ):
            self._unbind(worker)

    def _idle(self, pid: int) -> bool:
        """Whether the worker bound to ``pid`` has no timer, none parked, no reap pending."""
        return pid not in self.table and pid not in self._parked and not self._reaper.pending(pid)

    def _unbind(self, worker: Worker) -> List[Timer]:
        """Forget ``worker``, close what the host holds of it, and disarm its timers;
        return them."""
        pid = worker.pid
        del self._workers[pid]
        self._release(worker)
        return self.table.disarm_all(pid)  # (also drops an empty entry)

    def _gone(self, worker: Worker, dropped: Sequence[Timer] = ()) -> None:
        pid = worker.pid
        armed = self._unbind(worker)
        incident, outlived = self._reaper.forget(worker)
        self._unheard.pop(pid, None)
        parked = self._parked.pop(pid, ())
        timers = tuple(dropped) + parked + tuple(armed)
        unkillable = outlived is not None
        self._emit(WorkerGone(pid, worker.start_time, timers, incident, unkillable, outlived))

    def _expired(self, expiry: Expiry, now: float, together: Sequence[Timer] = ()) -> None:
        worker = self._workers.get(expiry.pid)
        outcome: Optional[Union[str, Reaped]] = None
        if worker is not None and expiry.decider is not None and self._host.alive(worker):
            # Peers matter only to a capture (and finding them looks at every worker).
            job = self._job_of(expiry.decider) if self._captures else None
            peers = self._peers(job, worker, now, together)
            outcome = self._reaper.reap(worker, expiry, now, peers, job)
        incident = outcome if isinstance(outcome, str) else None
        for timer in expiry.expired:
            self._emit(Expired(timer, now - timer.deadline, incident))
        if worker is None:  # pragma: no cover - timers exist only for bound workers
            return
        if isinstance(outcome, Reaped):
            self._emit(outcome)
        elif outcome is None and expiry.decider is not None:  # it exited
            self._gone(worker, expiry.cleared)
            return
        self._release_if_idle(worker)

    def _job_of(self, timer: Timer) -> Optional[str]:
        if self._job_label is None or not timer.labels:
            return None
        return timer.labels.get(self._job_label)

    def _peers(
        self, job: Optional[str], stuck: Worker, now: float, together: Sequence[Timer] = ()
    ) -> List[Peer]:
        """The other bound workers with a timer labelled with ``job``: expiring with the
        stuck one's (``together``), expired before it and still being captured (ranks
        that hung together, their expiries a scan apart), or armed; ``MAX_PEERS`` at most,
        in that order; none without a job."""
        if job is None:
            return []
        found: Dict[int, Peer] = {}
        workers = self._workers

        def bound(timers: Iterable[Timer]) -> Iterator[Tuple[Optional[Worker], Timer]]:
            return ((workers.get(t.pid), t) for t in timers)

        def armed() -> Iterator[Tuple[Optional[Worker], Timer]]:
            # A few timers of each bound worker, not every timer: a worker's job label is
            # the same on all its timers (its client adds it), and a scan of the whole
            # table per reap held the loop (0.4 s a reap with 1M timers armed, for as
            # many reaps as one line each asks).
            for pid, scopes in self.table.by_pid():
                worker = workers.get(pid)
                if worker is not None and pid != stuck.pid:
                    for timer in itertools.islice(scopes, PEER_SCAN_PER_PID):
                        yield worker, timer

        capturing = self._reaper.capturing()
        for worker, timer in itertools.chain(bound(together), capturing, armed()):
            if (
                worker is not None
                and worker.pid != stuck.pid
                and worker.pid not in found
                and self._job_of(timer) == job
            ):
                found[worker.pid] = Peer(worker, timer.labels, timer.deadline > now)
                if len(found) == MAX_PEERS:
                    break
        return list(found.values())
