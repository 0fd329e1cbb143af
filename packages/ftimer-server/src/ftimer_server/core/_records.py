"""The server's value types: an armed timer and the process a timer is bound to.

Both are small frozen msgspec structs: cheap to create by the hundred thousand, not
tracked by the garbage collector (``gc=False``), and encodable as they are (the daemon
saves ``armed()`` to its state file and gives it back to ``restore()``).

A ``Timer`` is the ``Arm`` message that armed it: a subclass with the same fields and tag,
so the server's reader decodes arm lines straight into the records the table keeps, and
a burst of arms costs no copy.
"""

from __future__ import annotations

from typing import Annotated, Dict, FrozenSet, Optional, Set

import msgspec
from msgspec import Meta

from ftimer_protocol import (
    MAX_LABEL_VALUE,
    MAX_LABELS,
    Arm,
    Disarm,
    DisarmAll,
    Expire,
    Message,
    Sync,
    TimerRequestV1,
)

__all__ = [
    "ABOUT_A_PROCESS",
    "Descendant",
    "Timer",
    "Worker",
    "request_of",
    "shared_labels",
    "valid_label_keys",
]

#: A ``Timer``'s labels: the protocol's ``Labels`` but for the pattern of keys, which
#: ``valid_label_keys()`` checks (msgspec matched each key against it with Python's re,
#: 1.4 of the 1.8 us a labelled arm took to decode).
TimerLabels = Annotated[
    Dict[str, Annotated[str, Meta(max_length=MAX_LABEL_VALUE)]], Meta(max_length=MAX_LABELS)
]


class Timer(Arm, frozen=True, tag="arm"):
    """One armed timer, as ``FileTimerServer.armed()`` reports it: an accepted ``Arm``.

    Attributes:
        pid: the worker process.
        scope_id: names the timer within the process; (``pid``, ``scope_id``) is the key.
        deadline: when the timer expires, in CLOCK_MONOTONIC seconds of this boot
            (``time.monotonic()``); version 1 wall-clock deadlines are converted on receipt.
        signal: what to deliver on expiry; 0 reports only.
        start_time: start time (clock ticks since boot) of the process the timer is bound
            to; ``None`` where the platform does not tell.
        labels: the labels the worker attached, if any. Decoding into a ``Timer``
            does not check their keys against the protocol's pattern (an ``Arm`` does):
            the server checks them where a ``Timer`` comes in.
        dump: how the worker has its own stacks dumped (its client's faulthandler
            hook), if it announced one.
    """

    # Whoever decodes a Timer from outside checks its keys with valid_label_keys().
    labels: Optional[TimerLabels] = None


# Keys already found valid: a worker sends the same few keys on every arm, and one set
# lookup for all of them costs a third of checking each (the labelled ingest's reader:
# 0.66 -> 0.50 us a line). Bounded, so that a flood of distinct keys only costs the check.
_VALID_KEYS: Set[str] = set()
_MAX_VALID_KEYS = 1024


def valid_label_keys(labels: Dict[str, str]) -> bool:
    """Whether every key of ``labels`` follows the protocol's ``LABEL_KEY_PATTERN``: an
    ASCII identifier of at most 32 characters (a third of the pattern's cost)."""
    if _VALID_KEYS.issuperset(labels):
        return True
    if not all(len(key) <= 32 and key.isascii() and key.isidentifier() for key in labels):
        return False
    if len(_VALID_KEYS) + len(labels) <= _MAX_VALID_KEYS:
        _VALID_KEYS.update(labels)
    return True


def shared_labels(
    held: Dict[int, Dict[str, str]], pid: int, labels: Dict[str, str]
) -> Dict[str, str]:
    """``labels``, as the one dict ``held`` keeps for ``pid``'s timers: the kept one if
    equal, else a copy of ``labels``, kept from now on (never a caller's dict, which the
    caller may change).

    A worker's timers carry the same labels (its job, rank), and a dict of them is two
    thirds of a timer's memory: ~890 bytes a timer with torchrun's three labels, ~300
    with the dict shared (the bench's memory rows). Per worker, not across workers: a
    dict that someone changes (it should be read only) changes that worker's alone.
    """
    kept = held.get(pid)
    if kept is None or kept != labels:
        kept = held[pid] = dict(labels)
    return kept


class Worker(msgspec.Struct, frozen=True, gc=False):
    """A process the server has bound timers to: what a ``Signaller`` is asked to signal.

    Attributes:
        pid: its process id.
        start_time: its start time in clock ticks since boot (``/proc/PID/stat`` field
            22), or ``None`` where unknown. With ``pid`` it identifies the process even
            after the pid is reused.
        pidfd: a Linux pidfd referring to exactly this process, or ``None`` (no pidfd
            support, out of file descriptors, or a fake process in tests). Owned by the
            server: signal through it, never close it.
        other_clocks: its time namespace has other offsets than the server's, or ones
            that cannot be told: it was bound for timers not on its clocks (torch's, on
            the wall clock; saved ones), and an arm on its clocks is refused.
    """

    pid: int
    start_time: Optional[int] = None
    pidfd: Optional[int] = None
    other_clocks: bool = False


class Descendant(msgspec.Struct, frozen=True, gc=False):
    """A descendant of a worker that its reap signalled (``--reap-tree``): what the
    escalation signals again if it outlives the grace period.

    Attributes:
        pid: the process.
        start_time: its start time (clock ticks since boot): with ``pid``, it names this
            process, never another that took its pid.
        users: the uids the worker could signal it as (``kill(2)``'s rule: its real or
            saved uid must still be one of them), or ``None``: any (the worker had
            ``CAP_KILL`` over it).
    """

    pid: int
    start_time: int
    users: Optional[FrozenSet[int]] = None


#: The types of the messages that are about a process (a set: ``type(m) in`` costs less
#: than ``isinstance()``, per message of a batch).
ABOUT_A_PROCESS = frozenset((Timer, Arm, Disarm, DisarmAll, Expire, TimerRequestV1))

_REQUESTS = {Arm: "arm", Disarm: "disarm", DisarmAll: "disarm_all", Expire: "expire", Sync: "sync"}


def request_of(message: Message) -> str:
    """What ``message`` asks, as counters and rejections name it (a version 1 request
    is an ``arm``, or with a negative time a ``disarm``)."""
    if isinstance(message, TimerRequestV1):
        return "disarm" if message.expiration_time < 0 else "arm"
    return _REQUESTS.get(type(message), "arm")
