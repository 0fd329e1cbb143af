"""Message types of both protocol versions: small frozen msgspec structs.

Bounds live in the types (``Meta``), so a decoded message is always within the schema and
every valid message of bounded fields is provably small. Structs do not validate on
construction; ``encode()`` does, and the decoder does on every line.
"""

from __future__ import annotations

from typing import Annotated, Dict, Optional, Union

import msgspec
from msgspec import Meta

from ._limits import (
    LABEL_KEY_PATTERN,
    MAX_FD,
    MAX_LABEL_VALUE,
    MAX_LABELS,
    MAX_PID,
    MAX_SCOPE,
    MAX_SIGNAL,
    MAX_TIME,
    MAX_TOKEN,
)

__all__ = [
    "Arm",
    "Disarm",
    "DisarmAll",
    "DumpHook",
    "Expire",
    "Message",
    "MessageV2",
    "Sync",
    "TimerRequestV1",
]

Pid = Annotated[int, Meta(ge=1, le=MAX_PID)]
Signal = Annotated[int, Meta(ge=0, le=MAX_SIGNAL)]
ScopeId = Annotated[str, Meta(max_length=MAX_SCOPE)]
#: Clock ticks since boot, field 22 of /proc/PID/stat.
StartTime = Annotated[int, Meta(ge=0, le=2**63 - 1)]
#: CLOCK_MONOTONIC seconds (Python's time.monotonic() on the same host).
Monotonic = Annotated[float, Meta(ge=0, le=MAX_TIME)]
Labels = Annotated[
    Dict[
        Annotated[str, Meta(pattern=LABEL_KEY_PATTERN)],
        Annotated[str, Meta(max_length=MAX_LABEL_VALUE)],
    ],
    Meta(max_length=MAX_LABELS),
]


class TimerRequestV1(msgspec.Struct, frozen=True, gc=False, tag_field="version", tag=1):
    """Version 1: torch's ``FileTimerRequest``, field for field.

    A negative ``expiration_time`` means "release ``scope_id``"; otherwise the scope is
    armed until ``expiration_time`` (wall-clock epoch seconds, ``time.time()``). A
    negative ``signal`` means report only, as 0 does: torch's client documents it ("a
    negative or zero signal will not kill the process") and its server reaps only on a
    signal above 0.

    Attributes:
        pid: the worker process.
        scope_id: names the timer within the process; (``pid``, ``scope_id``) is the key.
        expiration_time: wall-clock epoch seconds (``time.time()``) at which the timer
            expires; negative: release ``scope_id``.
        signal: what to deliver on expiry; 0 or negative reports only.
    """

    pid: Pid
    scope_id: ScopeId
    expiration_time: Annotated[float, Meta(ge=-MAX_TIME, le=MAX_TIME)]
    signal: Annotated[int, Meta(ge=-(2**63), le=MAX_SIGNAL)]

    @property
    def is_release(self) -> bool:
        """True when this request releases its scope (negative expiration time)."""
        return self.expiration_time < 0


class DumpHook(msgspec.Struct, frozen=True, gc=False):
    """How a worker has its own stacks dumped: the signal on which it registered Python's
    ``faulthandler`` (all threads), and the descriptor, open in the worker, of the file
    the dump goes to. A server that captures diagnostics before a reap may send that
    signal (only if the worker really handles it) and read the file through
    ``/proc/PID/fd/FD``: no ptrace needed, and it works while a thread holds the GIL.

    Attributes:
        signal: the signal the worker registered ``faulthandler`` on.
        fd: the worker's descriptor of the file the dump goes to.
    """

    signal: Annotated[int, Meta(ge=1, le=MAX_SIGNAL)]
    fd: Annotated[int, Meta(ge=0, le=MAX_FD)]


# Version 2 messages share the tag field "op"; the encoder prepends {"version":2, ...}.
class _V2(msgspec.Struct, frozen=True, gc=False, tag_field="op", omit_defaults=True):
    pass


class Arm(_V2, frozen=True, tag="arm"):
    """Arm (or re-arm: heartbeat, extend) timer ``scope_id`` of process ``pid``.

    ``deadline`` is in CLOCK_MONOTONIC seconds of the host; when it passes, the server
    delivers ``signal`` (0: report only). Re-arming an armed scope replaces its deadline,
    signal and labels.

    Attributes:
        pid: the worker process.
        scope_id: names the timer within the process; (``pid``, ``scope_id``) is the key.
        deadline: when the timer expires, in CLOCK_MONOTONIC seconds of the host
            (``time.monotonic()``).
        signal: what to deliver on expiry; 0 reports only.
        start_time: the worker's start time in clock ticks since boot (``/proc/PID/stat``
            field 22), so that a server refuses the message for a process that reused
            the pid; ``None`` where unknown.
        labels: short labels (job id, rank) a server attaches to the timer's events,
            logs and metrics.
        dump: how the worker has its own stacks dumped, if it has a hook.
    """

    pid: Pid
    scope_id: ScopeId
    deadline: Monotonic
    signal: Signal
    start_time: Optional[StartTime] = None
    labels: Optional[Labels] = None
    dump: Optional[DumpHook] = None


class Disarm(_V2, frozen=True, tag="disarm"):
    """Disarm timer ``scope_id`` of process ``pid``; disarming an unknown scope is a no-op.

    Attributes:
        pid: the worker process.
        scope_id: the timer to disarm.
        start_time: the worker's start time in clock ticks since boot, as in ``Arm``;
            ``None`` where unknown.
    """

    pid: Pid
    scope_id: ScopeId
    start_time: Optional[StartTime] = None


class DisarmAll(_V2, frozen=True, tag="disarm_all"):
    """Disarm every timer of process ``pid``: a clean exit, or the first step of a resync.

    Attributes:
        pid: the worker process.
        start_time: the worker's start time in clock ticks since boot, as in ``Arm``;
            ``None`` where unknown.
    """

    pid: Pid
    start_time: Optional[StartTime] = None


class Expire(_V2, frozen=True, tag="expire"):
    """Expire timer ``scope_id`` of process ``pid`` now: "reap me" (a stuck-state report).

    Attributes:
        pid: the worker process.
        scope_id: the timer that expires.
        signal: what to deliver; 0 reports only.
        start_time: the worker's start time in clock ticks since boot, as in ``Arm``;
            ``None`` where unknown.
        labels: short labels a server attaches to the expiry's events, logs and metrics.
        dump: how the worker has its own stacks dumped, if it has a hook.
    """

    pid: Pid
    scope_id: ScopeId
    signal: Signal
    start_time: Optional[StartTime] = None
    labels: Optional[Labels] = None
    dump: Optional[DumpHook] = None


class Sync(_V2, frozen=True, tag="sync"):
    """A marker with no effect on timers; a reader reports when it has read ``token``.

    A server writes one into its own FIFO to learn that everything written before it has
    been applied.

    Attributes:
        token: an opaque marker, at most ``MAX_TOKEN`` characters.
    """

    token: Annotated[str, Meta(max_length=MAX_TOKEN)]


#: A version 2 message.
MessageV2 = Union[Arm, Disarm, DisarmAll, Expire, Sync]
#: A message of either version: what ``decode()`` returns and ``encode()`` takes.
Message = Union[TimerRequestV1, Arm, Disarm, DisarmAll, Expire, Sync]
