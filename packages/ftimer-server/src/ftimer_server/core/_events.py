"""What the server reports: small frozen, typed events, and the reasons for a refusal.

Every event goes to the ``on_event`` callback of ``FileTimerServer`` in the order things
happened. Events are msgspec structs tagged by an ``"event"`` member, so
``msgspec.json.encode(event)`` is a ready JSON log line.
"""

from __future__ import annotations

import enum
from typing import Dict, Optional, Tuple, Type, Union

import msgspec

from ftimer_protocol import DecodeResult

from ._records import Timer

__all__ = [
    "EVENT_TYPES",
    "Incoming",
    "Moot",
    "Refused",
    "Armed",
    "DecodeFailed",
    "Disarmed",
    "Escalated",
    "Event",
    "Expired",
    "Reaped",
    "RejectReason",
    "Rejected",
    "ResendsOver",
    "Unkillable",
    "WorkerGone",
]


class RejectReason(str, enum.Enum):
    """Why a request was refused (the value is the counter and log label)."""

    #: pid 1, never a worker. (pid 0 and negative pids, process groups, would be too; a
    #: line naming one is outside the protocol's schema: a ``DecodeFailed``, not this.)
    RESERVED_PID = "reserved_pid"
    #: the server's own process, or one it runs for itself (its capture helper).
    SERVER_PROCESS = "server_process"
    #: a parent, grandparent, ... of the server.
    SERVER_ANCESTOR = "server_ancestor"
    #: ``Policy.descendants_only`` is set and the process is not one of the server's.
    NOT_DESCENDANT = "not_descendant"
    #: ``Policy.allowed_uids`` is set and the process runs as another user.
    UID_NOT_ALLOWED = "uid_not_allowed"
    #: not a signal of this platform, or not in ``Policy.allowed_signals``.
    SIGNAL_NOT_ALLOWED = "signal_not_allowed"
    #: no process has that pid.
    NO_SUCH_PROCESS = "no_such_process"
    #: the pid is a thread's id, not a process's (its thread group leader is another).
    NOT_A_PROCESS = "not_a_process"
    #: (socket) the sender is in a PID namespace the server cannot see: its pid is 0.
    SENDER_NOT_VISIBLE = "sender_not_visible"
    #: (socket) the sender exited before its message was read.
    SENDER_GONE = "sender_gone"
    #: (socket) the pidfd a datagram carries names a process the sender may not arm
    #: for: not of its uid, or neither its descendant nor its parent.
    FOREIGN_SUBJECT = "foreign_subject"
    #: the server could not examine the process (a ``/proc`` file it may not read, out
    #: of file descriptors, ...): refused, since nothing unverified is ever signalled.
    UNVERIFIABLE = "unverifiable"
    #: the message's start time is not that of the process holding the pid (a reused
    #: pid, or a stale saved timer).
    IDENTITY_MISMATCH = "identity_mismatch"
    #: the process (or over the socket, the sender naming it) reads CLOCK_MONOTONIC or
    #: CLOCK_BOOTTIME with other offsets than the server, or ones that cannot be told
    #: (another time namespace): its deadlines and start times mean other times.
    OTHER_CLOCK = "other_clock"
    #: the process already holds ``Policy.max_timers_per_pid`` timers.
    PID_TIMER_LIMIT = "pid_timer_limit"
    #: the server already holds ``Policy.max_timers`` timers.
    TIMER_LIMIT = "timer_limit"


class Event(msgspec.Struct, frozen=True, tag_field="event"):
    """Base class of every event."""

    @property
    def labels(self) -> Optional[Dict[str, str]]:
        """The labels of the timer or message the event is about, if it had any."""
        return None


class Armed(Event, frozen=True, tag="armed"):
    """A timer was armed, or re-armed.

    Attributes:
        timer: the timer armed.
        rearmed: it replaced an armed timer of the same key (a heartbeat, an extension).
    """

    timer: Timer
    rearmed: bool = False

    @property
    def labels(self) -> Optional[Dict[str, str]]:
        return self.timer.labels


class Disarmed(Event, frozen=True, tag="disarmed"):
    """An armed timer was disarmed by its worker (disarming an unknown scope is silent).

    Attributes:
        timer: the timer disarmed.
    """

    timer: Timer

    @property
    def labels(self) -> Optional[Dict[str, str]]:
        return self.timer.labels


class Expired(Event, frozen=True, tag="expired"):
    """A timer's deadline passed.

    Attributes:
        timer: the timer that expired.
        late: seconds from its deadline to the server noticing.
        incident: the id of the incident captured about it, if any.
    """

    timer: Timer
    late: float
    incident: Optional[str] = None

    @property
    def labels(self) -> Optional[Dict[str, str]]:
        return self.timer.labels


class Reaped(Event, frozen=True, tag="reaped"):
    """A worker was signalled because its timers expired.

    Attributes:
        pid: the worker.
        start_time: the worker's start time (clock ticks since boot), if known.
        signal: the signal sent: that of its earliest expired timer with a signal, or
            the server's ``signal_override``.
        scope_id: that timer's scope.
        late: seconds from that timer's deadline to the signal (the reap latency).
        delivered: False when the signal could not be delivered (``error`` says why).
        gone: not delivered because the worker had exited (while it was captured, say):
            nothing was left to reap, and it is not a reap failure.
        timers: every timer of the worker, all cleared by the reap.
        labels: the labels of the deciding timer.
        error: why the signal was not delivered.
        incident: the id of the incident captured before the signal, if any (``late``
            then includes the capture).
        descendants: the worker's descendants the signal went to as well (``--reap-tree``).
    """

    pid: int
    start_time: Optional[int]
    signal: int
    scope_id: str
    late: float
    delivered: bool
    timers: Tuple[Timer, ...]
    labels: Optional[Dict[str, str]] = None
    error: Optional[str] = None
    incident: Optional[str] = None
    descendants: Tuple[int, ...] = ()
    gone: bool = False


class Escalated(Event, frozen=True, tag="escalated"):
    """A reaped worker outlived the grace period and got ``signal`` (SIGKILL).

    Attributes:
        pid: the worker.
        start_time: the worker's start time (clock ticks since boot), if known.
        signal: the signal sent.
        after: seconds the worker had since its reap: the grace period (less when the
            server stopped first).
        delivered: False when the signal could not be delivered (``error`` says why).
        labels: the labels of the timer that decided its reap.
        error: why the signal was not delivered.
        descendants: its descendants that got the signal too (``--reap-tree``: those its
            reap signalled that outlived the grace, and those it has then).
        exited: the worker itself had exited within its grace, and only such
            descendants got the signal.
    """

    pid: int
    start_time: Optional[int]
    signal: int
    after: float
    delivered: bool
    labels: Optional[Dict[str, str]] = None
    error: Optional[str] = None
    descendants: Tuple[int, ...] = ()
    exited: bool = False


class Unkillable(Event, frozen=True, tag="unkillable"):
    """A worker sent SIGKILL (by its reap or its escalation) still lives ``after``
    seconds later: a thread of it is in a wait the kernel does not interrupt (a hung
    file system or device, a driver), and it dies only when that wait ends, holding its
    memory, devices and files meanwhile. Said once per SIGKILL.

    Attributes:
        pid: the worker.
        start_time: the worker's start time (clock ticks since boot), if known.
        after: seconds since its SIGKILL.
        labels: the labels of the timer that decided its reap.
        waiting: what it waits in, as the server read it: its threads in uninterruptible
            sleep and their kernel wait channels (``"thread 15: D in
            request_wait_answer"``), else its own state; ``None`` if unread.
    """

    pid: int
    start_time: Optional[int]
    after: float
    labels: Optional[Dict[str, str]] = None
    waiting: Optional[str] = None


class ResendsOver(Event, frozen=True, tag="resends_over"):
    """After a restart, the timers that waited past the restore grace for their clients'
    re-sends (the queues were full) and were not re-sent go back to be judged: the
    re-sends are taken to be over (the queues had room for ``RESYNC_QUIET`` seconds, or
    ``RESYNC_WAIT`` passed). Their workers' clients could not re-send (a worker stopped,
    or torch's client, which never does): expired, they are reaped as late.

    Attributes:
        timers: the timers that waited and were not re-sent.
        workers: how many workers they are of.
        waited: seconds since the grace ended.
    """

    timers: int
    workers: int
    waited: float


class WorkerGone(Event, frozen=True, tag="worker_gone"):
    """A bound worker exited; the timers it still held are dropped unsignalled. Also a
    reaped worker said ``Unkillable`` that exited at last.

    Also given by ``restore()`` for the saved timers of a worker that exited while no
    server ran.

    Attributes:
        pid: the worker.
        start_time: the worker's start time (clock ticks since boot), if known.
        timers: the timers it still held.
        incident: the id of the incident it exited during the capture of (it is not
            signalled), if any.
        unkillable: it had been said ``Unkillable``: the wait that outlived its SIGKILL
            ended (seen within ``KILL_CHECK`` seconds where the server has no pidfd of it).
        decider: with ``unkillable``, the timer whose reap it outlived (its labels are
            the event's).
    """

    pid: int
    start_time: Optional[int]
    timers: Tuple[Timer, ...] = ()
    incident: Optional[str] = None
    unkillable: bool = False
    decider: Optional[Timer] = None

    @property
    def labels(self) -> Optional[Dict[str, str]]:
        if self.decider is not None and self.decider.labels:
            return self.decider.labels
        return next((t.labels for t in self.timers if t.labels), None)


class Rejected(Event, frozen=True, tag="rejected"):
    """A request was refused; nothing changed.

    Attributes:
        reason: why.
        request: what was asked: ``"arm"``, ``"disarm"``, ``"disarm_all"``, ``"expire"``
            (version 1 acquires and releases count as ``"arm"`` and ``"disarm"``), or
            ``"restore"`` for a saved timer given to ``restore()``.
        pid: the process the request named.
        scope_id: the request's scope, if it names one.
        labels: the request's labels, if it had any.
        detail: a precision for people, possibly empty (the signal, the limit).
    """

    reason: RejectReason
    request: str
    pid: int
    scope_id: Optional[str] = None
    labels: Optional[Dict[str, str]] = None
    detail: str = ""


class DecodeFailed(Event, frozen=True, tag="decode_failed"):
    """Lines read from the FIFO, or datagrams, were not valid messages; they were dropped
    and counted.

    Attributes:
        error: the protocol error's class: ``"MalformedMessage"``, ``"LineTooLong"`` or
            ``"UnsupportedVersion"``.
        reason: what was wrong.
        excerpt: the first bytes of the (first) line.
        lines: how many consecutive lines with this same error the event stands for (a
            flood of junk is reported in runs, not line by line).
    """

    error: str
    reason: str
    excerpt: Optional[bytes] = None
    lines: int = 1


class Refused(msgspec.Struct, frozen=True, gc=False):
    """A message the edge refused before the core saw it (a socket's sender may not
    name that process, or cannot be seen): reported and counted as a rejection.

    Attributes:
        reason: why.
        request: what the message asked (``request_of``).
        pid: the sender's pid, as the server sees it (0: not visible).
        detail: for people.
        scope_id: the message's scope, if it names one.
    """

    reason: RejectReason
    request: str
    pid: int
    detail: str = ""
    scope_id: Optional[str] = None


class Moot(msgspec.Struct, frozen=True, gc=False):
    """A request the edge found to be about a process that has exited (over the socket,
    its sender or the process its pidfd names, gone before it was read: a worker that
    ended right after its last step, ``ftimer exec``'s command): its timers went with it,
    and an arm would have nothing to watch. Counted as a disarm of no timer (``unknown``)
    or an arm of a process that had exited (``exited``), not as a rejection.

    Attributes:
        request: what the message asked (``request_of``).
    """

    request: str


#: What the core applies: a decoded message or a decode error, or an edge's refusal, or
#: a request the edge found moot.
Incoming = Union[DecodeResult, Refused, Moot]


#: Every event class.
EVENT_TYPES: Tuple[Type[Event], ...] = (
    Armed,
    Disarmed,
    Expired,
    Reaped,
    Escalated,
    Unkillable,
    WorkerGone,
    Rejected,
    DecodeFailed,
    ResendsOver,
)
