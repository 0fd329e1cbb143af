"""What the core knows of processes, and the one interface through which it asks the edge.

The core never looks at a process itself. When a message names a pid it has not bound,
it asks the host to ``resolve()`` it into ``Facts`` (or an ``Unresolved`` answer saying
why not) and decides from those facts alone: is it a process and not a thread, is it the
process the message meant, does the policy allow it. Signals go the same way: the core
asks, the host answers with a ``Delivery``. No method of a ``Host`` raises: every error
of the operating system is turned into an answer at the edge, once, so bad luck with one
process never costs another message.
"""

from __future__ import annotations

import abc
from typing import Callable, Dict, FrozenSet, Optional, Tuple, Union

import msgspec

from ftimer_protocol import DumpHook

from ._events import RejectReason
from ._records import Descendant, Timer, Worker
from ._table import Expiry

__all__ = ["KILL", "CaptureRequest", "Delivery", "Facts", "Host", "Peer", "Unresolved"]

#: SIGKILL: 9 on every POSIX system.
KILL = 9


class Facts(msgspec.Struct, frozen=True, gc=False):
    """What the host found about a pid, read after a pidfd (if any) was opened for it.

    Attributes:
        pid: the pid asked about.
        tgid: its thread group id: ``pid`` itself for a process; a thread's id differs
            (Linux gives threads ids from the same space as processes).
        start_time: start time in clock ticks since boot; ``None`` where unknown.
        uid: real user id; ``None`` where the platform does not tell.
        ancestors: parent, grandparent, ... up to pid 1 (included), when asked for;
            ``None`` when not asked for or not known.
        pidfd: a pidfd for exactly this process, now owned by the core, or ``None``.
        clock_offsets: how far its CLOCK_MONOTONIC and CLOCK_BOOTTIME are ahead of the
            server's, in nanoseconds (another time namespace); ``(0, 0)``: the same clocks;
            ``None``: they cannot be told.
    """

    pid: int
    tgid: int
    start_time: Optional[int] = None
    uid: Optional[int] = None
    ancestors: Optional[Tuple[int, ...]] = None
    pidfd: Optional[int] = None
    clock_offsets: Optional[Tuple[int, int]] = (0, 0)


class Unresolved(msgspec.Struct, frozen=True):
    """Why the host could not describe a pid: no such process, a thread, or an error.

    Attributes:
        reason: the rejection this becomes.
        detail: for people: the errno and what was being read.
        exited: the pid's process was found, then found to have exited (a zombie, say):
            a request for it came too late to matter, and is not refused.
        scarce: the host ran out of file descriptors finding out (``EMFILE``,
            ``ENFILE``): once some are freed, asking again may succeed.
    """

    reason: RejectReason
    detail: str = ""
    exited: bool = False
    scarce: bool = False


class Delivery(msgspec.Struct, frozen=True):
    """The outcome of a signal: ``delivered``, or not and ``error`` says why (``gone``:
    because the process had exited, or its pid was taken: nothing was left to signal);
    ``descendants``: the worker's descendants the signal went to as well (a host that
    reaps trees); ``took``: seconds the host spent before the worker's own signal (the
    walk of its tree, which may take long: a reap's lateness counts them)."""

    delivered: bool
    error: Optional[str] = None
    descendants: Tuple[Descendant, ...] = ()
    gone: bool = False
    took: float = 0.0


DELIVERED = Delivery(True)


class Peer(msgspec.Struct, frozen=True):
    """Another live worker of the stuck worker's job: captured too, never signalled.
    ``timer_running``: its timer had not reached its deadline (it may be on its way)."""

    worker: Worker
    labels: Optional[Dict[str, str]] = None
    timer_running: bool = False


class CaptureRequest(msgspec.Struct, frozen=True, kw_only=True):
    """What the core asks the host to capture before it signals a stuck worker.

    Attributes:
        worker: the stuck worker.
        timer: its expired timer that decides the reap.
        signal: the signal the reap sends once the capture is done (or its budget spent).
        now: when the capture was asked for (CLOCK_MONOTONIC seconds).
        budget: seconds the capture may take: the signal goes then, done or not.
        job: the job label's value the peers share, if any.
        peers: the other live workers of that job on this host (captured without being
            signalled: their dump hooks are not used).
        dump: the stuck worker's dump hook, from any of its timers that announced one.
    """

    worker: Worker
    timer: Timer
    signal: int
    now: float
    budget: float
    job: Optional[str] = None
    peers: Tuple[Peer, ...] = ()
    dump: Optional[DumpHook] = None


class Host(abc.ABC):
    """The processes of the host as the core sees them. No method raises.

    Attributes:
        signals: the signal numbers of this platform.
        kills: a SIGKILL it delivers ends the process, so that one alive long after is
            ``Unkillable``; False where nothing is really signalled (a dry run).
    """

    signals: FrozenSet[int]
    kills: bool = True

    @abc.abstractmethod
    def resolve(self, pid: int, *, ancestry: bool = False) -> Union[Facts, Unresolved]:
        """Describe process ``pid``; with ``ancestry``, its ancestors too.

        A returned ``pidfd`` belongs to the caller, who gives it back with ``release()``.
        """

    @abc.abstractmethod
    def bound(self, worker: Worker) -> None:
        """``worker`` now holds timers: watch it (its exit becomes ``worker_gone``)."""

    @abc.abstractmethod
    def release(self, worker: Worker) -> None:
        """Stop watching ``worker`` and close its pidfd, if any."""

    @abc.abstractmethod
    def alive(self, worker: Worker) -> bool:
        """True while the process ``worker`` was bound to runs (a reused pid: False)."""

    @abc.abstractmethod
    def signal(self, worker: Worker, signal: int) -> Delivery:
        """Deliver ``signal`` to exactly the process ``worker`` was bound to."""

    def waiting(self, worker: Worker) -> Optional[str]:
        """What the live process ``worker`` was bound to waits in (``Unkillable.waiting``),
        or ``None`` if the host cannot tell."""
        return None

    def reap(self, worker: Worker, signal: int, expiry: Expiry, now: float) -> Delivery:
        """Reap ``worker`` for ``expiry``: whatever comes before the signal (diagnostics),
        then ``signal``. Only the signal, unless the host has more to do."""
        return self.signal(worker, signal)

    def kill_descendants(
        self,
        worker: Optional[Worker],
        signalled: Tuple[Descendant, ...],
        then: Callable[[], None],
    ) -> Tuple[Descendant, ...]:
        """The grace period of a reaped worker ended: SIGKILL those of ``signalled`` (its
        descendants its reap signalled, ``Delivery.descendants``) still alive, and, unless
        ``worker`` is ``None`` (it exited), its descendants now; return whom it reached.
        ``then`` (the worker's own SIGKILL) is called once: before the worker runs again
        where the walk of its tree stopped it, else after. Nothing else, unless the host
        reaps trees."""
        then()
        return ()

    def capture(self, request: CaptureRequest) -> Optional[str]:
        """Start capturing why ``request.worker`` hangs, off the loop; return the id of
        the incident being written, or ``None`` if this host captures nothing (the core
        then signals at once). When the capture is done, whoever runs the core calls
        ``Watchdog.captured(pid)``; the core signals then, or when the budget is spent."""
        return None
