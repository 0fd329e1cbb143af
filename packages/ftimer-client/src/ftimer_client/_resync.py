"""What one process has armed on one server, and what to send so the server agrees.

Sans-I/O: no descriptor, no thread, no clock of its own (``now`` is passed in). The
channel asks it which lines to send and tells it what happened; the writers do the I/O.

The server keys timers by pid. Whenever a line may not have reached it (no server, a
full queue, a reconnection after a restart), its view of this process is unknown, and
the next delivery first resynchronises it: the disarms that may have been lost (and the
arms that may have gone out though they raised), then every armed scope again with its
original deadline. So an arm lost in an outage is re-sent, and a lost disarm cannot
later get a healthy process reaped by a server that restored the timer from its state
file. Never a ``disarm_all``: other channels arm for this pid too (``ftimer exec``'s
timer for its command, a client of the other protocol or transport), and a resync must
not wipe theirs. The last disarms delivered count as lost too: a server that died may not
have read them (a socket's queue dies with it) and restore their timers from its state
file. Until that delivery succeeds, a retry is due from time to time (backing off) while
something is armed or a disarm was lost.

An arm that is not sent on the hot path goes last, after any resync, and the resync of
that delivery carries the scope's previous line in its place (``arming``): if its own line
does not get through, the arm did not happen, and no copy of it went out ahead of it.

A call made while a delivery is in progress (from a signal handler, in the thread that
delivers) is deferred: its lines go after the lines of that delivery, which may contradict
them (the re-arm of a scope the handler disarms).

A resync keeps its progress. Every line the connection accepted while the server's view
is unknown is recorded against its scope (``accepted``): a datagram accepted is queued,
a FIFO write accepted is in the pipe, and the server applies them in the order they were
accepted. So the server's view of a scope is the last line recorded for it, and the
resync owes, for each scope armed or whose disarm was lost, its line now (``owed``)
unless that is what was last recorded: what a resync still has to say is derived from
the registry at the moment it is said, never a list made earlier, and a caller's arm or
disarm meanwhile changes it in place (its line recorded when it went through). Only a
connection lost or replaced forgets that progress (``forget_progress``): the lines it
held may have died with it.
"""

from __future__ import annotations

import collections
from typing import Deque, Dict, FrozenSet, Iterable, List, Optional, Set, Tuple, Union

from ._wire import V1Lines, V2Lines

__all__ = [
    "RETRY_CHUNK",
    "RETRY_FIRST",
    "RETRY_LINE_WAIT",
    "RETRY_MAX",
    "RETRY_PAUSE",
    "Armed",
    "Arming",
    "Line",
    "Resync",
]

Lines = Union[V1Lines, V2Lines]
#: A scope's arm line, and the client that armed it.
Armed = Tuple[bytes, object]
#: A scope whose arm is being delivered, and what the registry held for it before.
Arming = Tuple[str, Optional[Armed]]
#: A line to send, and the scope it is about (None: no scope the resync keeps track of).
Line = Tuple[Optional[str], bytes]

# Backoff of the retries while the server is away: the first, then the cap (seconds).
RETRY_FIRST = 0.05
RETRY_MAX = 1.0
#: How long the retry thread (never a caller) waits for room for one line, without the
#: channel's lock (seconds); a retry fails only when a line found none in that time, and
#: the next one goes on from there. Stalled or not: a caller's delivery waits no more
#: once a stall was seen, and a resync longer than the queue would then only go through
#: if the server drained it while the sender yields the CPU twice a line.
RETRY_LINE_WAIT = 0.05
#: The lines the retry thread sends per hold of the channel's lock, and the pause between
#: two holds (seconds): Python's lock is not fair, and one released and taken again at
#: once would rarely pass to a caller waiting for it.
RETRY_CHUNK = 64
RETRY_PAUSE = 0.0002
#: The last disarms delivered that a resync sends again: as many as a server may not
#: have read when it died (a datagram socket's queue holds ``net.unix.max_dgram_qlen``,
#: 10 by default and 512 at most on common systems; a pipe's unread lines survive in it).
RECENT = 512


class Resync:
    """The armed registry of one channel and its resynchronisation state.

    Args:
        base: line builder of the channel's process (its disarm lines); rebound in place
            after a fork, so this keeps it.

    Attributes:
        armed: scope -> (its arm line, the client that armed it).
        needs_resync: the server's view is unknown: the next delivery resynchronises.
        stalled: the last delivery waited for room in vain: do not wait again until a
            delivery succeeds (fail fast instead of stalling every step).
        outages: how many times the server became unreachable (a client warns once per
            outage).
    """

    __slots__ = (
        "_base",
        "_cursor",
        "_deferred",
        "_delay",
        "_expired",
        "_lost",
        "_plan",
        "_recent",
        "_retry_at",
        "_synced",
        "_unsent",
        "armed",
        "needs_resync",
        "outages",
        "stalled",
    )

    def __init__(self, base: Lines) -> None:
        self._base = base
        self.armed: Dict[str, Armed] = {}
        self.outages = 0
        self.reset()

    def reset(self) -> None:
        """Forget everything armed and every failure (a forked child starts afresh)."""
        self.armed.clear()
        self.needs_resync = False
        self.stalled = False
        self._lost: Dict[str, bytes] = {}  # scope -> its disarm, maybe not delivered
        self._recent: Deque[str] = collections.deque(maxlen=RECENT)  # scopes disarmed
        # scope -> its expire line, for the scopes of ``_recent`` expired (not released):
        # a reconnection sends that again, not a disarm (the worker asked to be reaped).
        self._expired: Dict[str, bytes] = {}
        self._deferred: List[Line] = []  # lines to send after the delivery in progress
        # Scopes armed while the server's view was unknown whose arm no connection took,
        # and that had no arm before: no server holds them, so a disarm of one that fails
        # is owed to none (a loop of distinct scopes through an outage would otherwise
        # pile up a disarm a block, and send them all once the server is back).
        self._unsent: Set[str] = set()
        self._retry_at: Optional[float] = None
        self._delay = RETRY_FIRST
        # The resync's progress: scope -> the last line about it the connection accepted
        # while the server's view is unknown; and the retry thread's way through the
        # scopes (``next_owed``): their order, and how far it went.
        self._synced: Dict[str, bytes] = {}
        self._plan: List[str] = []
        self._cursor = 0

    # -- the registry -------------------------------------------------------------------

    def arm(self, scope_id: str, line: bytes, owner: object) -> Optional[Armed]:
        """Record ``scope_id`` as armed with ``line``; return what it was before (for
        ``unarm``), or None. (``Channel.arm`` does the same inline, on the hot path.)"""
        armed = self.armed
        previous = armed.get(scope_id)
        armed[scope_id] = (line, owner)
        return previous

    def unarm(self, scope_id: str, previous: Optional[Armed]) -> None:
        """Undo ``arm``: an arm that was refused did not happen."""
        self._expired.pop(scope_id, None)  # armed since: it asked for no reap then
        if previous is None:
            self.armed.pop(scope_id, None)
        else:
            self.armed[scope_id] = previous

    def unsent(self, scope_id: str) -> None:
        """``scope_id``, armed now and not before, is about to be sent the slow way: until
        a connection takes a line about it, no server holds it (see ``disarm``)."""
        self._unsent.add(scope_id)

    def arm_left(self, scope_id: str) -> bool:
        """Whether the arm of ``scope_id`` may have reached a server: not one that no
        connection took (``unsent``), which this forgets."""
        if scope_id in self._unsent:
            self._unsent.discard(scope_id)
            return False
        return True

    def disarm(self, scope_id: str) -> bool:
        """Forget ``scope_id``, released; unknown scopes are ignored. Returns whether a
        server may hold its arm (``arm_left``), whose disarm it then owes: counted among
        the recent, and the caller's to count lost if it does not go through."""
        self.armed.pop(scope_id, None)
        self._expired.pop(scope_id, None)
        unsent = self._unsent
        if unsent and scope_id in unsent:  # ``arm_left``, inline: every block comes here
            unsent.discard(scope_id)
            return False
        self._recent.append(scope_id)
        return True

    def expired(self, scope_id: str, line: bytes) -> None:
        """Forget ``scope_id``, expired now with ``line``: until delivered again, a
        reconnection owes that line, not a disarm (its arm sent or not: the worker asks
        to be reaped)."""
        self.armed.pop(scope_id, None)
        self._unsent.discard(scope_id)
        self._recent.append(scope_id)
        self._expired[scope_id] = line
        while len(self._expired) > RECENT:
            del self._expired[next(iter(self._expired))]

    # A signal handler may arm or disarm (through any client of the channel) between two
    # rounds of a Python loop: every loop over the registry goes over a copy of it, made
    # in one C call (list(), tuple()), never over the dict itself ("dictionary changed
    # size during iteration").

    def scopes_of(self, owner: Optional[object] = None) -> List[str]:
        """The scopes ``owner`` armed (None: every scope)."""
        return [s for s, (_, o) in list(self.armed.items()) if owner is None or o is owner]

    def disarm_all(self, scopes: List[str]) -> Tuple[List[bytes], List[str]]:
        """Forget ``scopes`` (``scopes_of(owner)``: those an owner armed, or all), each as
        ``disarm`` does; return the lines that disarm them on the server, one per scope,
        and the scopes whose disarm is owed.

        Never a ``disarm_all``, even for every scope: it would wipe what other channels
        armed for this pid (``ftimer exec``'s timer of the command that calls this).
        """
        owed = [s for s in scopes if self.disarm(s)]  # (a handler may have disarmed one)
        return [self._base.disarm(s) for s in scopes], owed

    def armed_by(self, owner: object) -> FrozenSet[str]:
        """The scopes ``owner`` armed and that are still armed."""
        return frozenset(self.scopes_of(owner))

    # -- what to send ---------------------------------------------------------------------

    def owed(self, scope_id: str, arming: Optional[Arming] = None) -> Optional[bytes]:
        """The line that makes the server's view of ``scope_id`` this registry's: its arm,
        else its lost disarm, else None (nothing owed: the server is taken not to hold it).

        Args:
            arming: as ``resync``: for that scope, what it held before.
        """
        if arming is not None and arming[0] == scope_id:
            previous = arming[1]
            if previous is not None:
                return previous[0]
        else:
            entry = self.armed.get(scope_id)
            if entry is not None:
                return entry[0]
        return self._lost.get(scope_id)

    def resync(self, arming: Optional[Arming] = None) -> List[Line]:
        """What the resync still owes the server, that it makes its view of this process
        this registry: the lost disarms, then the arms, one line per scope, without those
        already delivered since its view became unknown (none after ``forget_progress``).

        Args:
            arming: (scope, what the registry held for it before) of an arm whose line is
                sent after these: the scope's previous line instead of the one just
                recorded (nothing, when it had none).
        """
        synced, lost, owed = self._synced, self._lost, self.owed
        lines: List[Line] = []
        for scope_id in (*tuple(lost), *[s for s in tuple(self.armed) if s not in lost]):
            line = owed(scope_id, arming)
            if line is not None and synced.get(scope_id) != line:
                lines.append((scope_id, line))
        return lines

    def backlog(self, arming: Optional[Arming] = None) -> List[Line]:
        """The lines to send before the next one: the resync when it is needed (with
        ``arming``, as ``resync``), then the deferred lines (``take_deferred``)."""
        lines = self.resync(arming) if self.needs_resync else []
        lines += self.take_deferred()
        return lines

    def next_owed(self) -> Optional[Line]:
        """The next line the resync owes (the retry thread's, one at a time: ``accepted``
        moves on), or None once it owes nothing.

        It goes through the scopes in the order of a ``resync`` made when it started,
        each with what it owes now (skipping those it owes nothing any more), then makes
        another for what changed meanwhile, until one is empty: each scope looked at
        once per round, however often this is called.
        """
        synced, owed = self._synced, self.owed
        while True:
            plan, cursor = self._plan, self._cursor
            while cursor < len(plan):
                scope_id = plan[cursor]
                line = owed(scope_id)
                if line is not None and synced.get(scope_id) != line:
                    self._cursor = cursor
                    return scope_id, line
                cursor += 1
            self._plan, self._cursor = [s for s, _ in self.resync() if s is not None], 0
            if not self._plan:
                return None

    def defer(self, lines: Iterable[Line], disarmed: Optional[Iterable[str]] = None) -> None:
        """Send ``lines`` after those of the delivery in progress (a call made from a
        signal handler while it writes). Until they are delivered, the disarms in them
        (``disarmed``, as for ``lost_disarms``; None: none) count as lost."""
        self._deferred.extend(lines)
        if disarmed is not None:
            self.lost_disarms(disarmed)

    def take_deferred(self) -> List[Line]:
        """Return the deferred lines, in order, and forget them."""
        deferred, self._deferred = self._deferred, []
        return deferred

    def timeout(self, timeout: float) -> float:
        """How long the next delivery may wait for room: ``timeout``, or 0 while stalled."""
        return 0.0 if self.stalled else timeout

    # -- what happened --------------------------------------------------------------------

    def delivered(self) -> None:
        """Everything asked for went through, resync included: the server agrees."""
        self.needs_resync = self.stalled = False
        # The lost disarms the resync delivered are among the last disarms delivered: a
        # restart before the server read them owes them again (see RECENT). They went
        # before the disarms recorded since: older, the first to make room.
        armed = self.armed
        delivered = [s for s in tuple(self._lost) if s not in armed]
        self._recent = collections.deque([*delivered, *self._recent], maxlen=RECENT)
        self._lost.clear()
        self._unsent.clear()
        self.forget_progress()
        self._retry_at = None
        self._delay = RETRY_FIRST

    def accepted(self, scope_id: Optional[str], line: bytes) -> None:
        """The connection accepted ``line``, about ``scope_id``: while the server's view is
        unknown, the resync counts it delivered (the server reads it before any line sent
        after it), until ``forget_progress``."""
        if scope_id is not None:
            self._unsent.discard(scope_id)
            if self.needs_resync:
                self._synced[scope_id] = line

    def unsure(self, scope_id: Optional[str], *, refused: bool) -> None:
        """The line about ``scope_id`` was ``refused`` (the connection took none of it),
        or whether it went out is unknown (an exception came as it was written): the
        resync sends what that scope owes again."""
        if scope_id is not None:
            self._synced.pop(scope_id, None)
            if not refused:
                self._unsent.discard(scope_id)

    def forget_progress(self) -> None:
        """The connection the resync's lines went to is lost or replaced: they may have
        died with it, and the next resync starts from the beginning."""
        self._synced.clear()
        self._plan = []
        self._cursor = 0

    def lost_disarms(self, scopes: Iterable[str]) -> None:
        """The disarms of ``scopes`` may not have been delivered, or the arms of
        ``scopes`` that raised may have: the resync must make them good."""
        for scope_id in scopes:
            self._lost[scope_id] = self._base.disarm(scope_id)

    @property
    def recent(self) -> bool:
        """Whether disarms were delivered of late (the last ``RECENT``): a server that
        died before it read them may restore their timers from its state file, so a
        reconnection sends them again."""
        return bool(self._recent)

    def owe_no_disarms(self) -> None:
        """No server has ever taken a line of this channel: none holds an arm of it, so
        no disarm is owed (a retry for one would go on for good where none ever runs)."""
        self._lost.clear()
        self._recent.clear()

    def failed(self, now: float, *, stalled: bool = False) -> None:
        """A delivery failed at ``now`` (``stalled``: after waiting for room in vain), or
        was interrupted: what reached the server is unknown."""
        # The resync makes the deferred lines good (their scopes are in the registry or
        # lost); sent after it they could only undo a later re-arm.
        self._deferred.clear()
        # A stall's server still holds its pipe or queue, and reads what it took: an
        # expire sent again would reap (or report) the worker a second time.
        self._owe_recent(expires=not stalled)
        if not self.needs_resync:
            self.needs_resync = True
            self.outages += 1
            self.forget_progress()  # (nothing recorded while in sync)
        if stalled:
            self.stalled = True
        if self._retry_at is None:
            self._retry_at = now + self._delay

    def reconnected(self) -> None:
        """The connection was lost (the server left or restarted) and is being made
        again: what it held may never be read, the last disarms delivered included."""
        self._owe_recent()
        self.forget_progress()

    def _owe_recent(self, *, expires: bool = True) -> None:
        # The last disarms delivered may not have been read (see RECENT): sent again.
        # An expire is sent again only where it may have died unread (``expires``: the
        # connection lost); else its scope stays among the recent, for such a loss.
        armed, expired, unsent = self.armed, self._expired, self._unsent
        every = tuple(self._recent)
        recent = [s for s in every if s not in armed]
        # Armed again the slow way, by an arm no connection took yet: one refused (undone)
        # or released unsent owes nothing itself, and only this disarm then undoes the
        # timer a server that died before reading it restores.
        self.lost_disarms([s for s in every if s in armed and s in unsent])
        kept = [] if expires else [s for s in recent if s in expired]
        self.lost_disarms([s for s in recent if expires or s not in expired])
        if expires:
            for scope_id in recent:
                line = expired.get(scope_id)
                if line is not None:  # an expire that may have died unread: sent again
                    self._lost[scope_id] = line
        self._recent.clear()
        self._recent.extend(kept)

    # -- retries --------------------------------------------------------------------------

    @property
    def retry_wanted(self) -> bool:
        """Whether the server must be brought up to date without waiting for the next
        message: it is out of date, and something is armed or a disarm was lost."""
        return self.needs_resync and bool(self.armed or self._lost)

    def next_retry(self, now: float) -> Optional[float]:
        """Seconds from ``now`` until a retry is due (0: now); None when none is wanted."""
        if not self.retry_wanted:
            return None
        if self._retry_at is None:
            self._retry_at = now + self._delay
        return max(0.0, self._retry_at - now)

    def retry_progressed(self) -> None:
        """A retry delivered lines: the server drains, a retry that then fails starts
        backing off from the first delay again."""
        self._delay = RETRY_FIRST

    def retry_failed(self, now: float) -> None:
        """A retry at ``now`` failed: the next is due after twice the delay, at most
        ``RETRY_MAX``."""
        self._delay = min(self._delay * 2, RETRY_MAX)
        self._retry_at = now + self._delay
