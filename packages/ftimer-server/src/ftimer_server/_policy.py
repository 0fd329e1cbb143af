"""Which processes and signals the server may act on, and how many timers it keeps.

Some refusals are not optional: pid <= 1 (``kill(0)`` and ``kill(-1)`` mean process
groups or everything, pid 1 is init), the server itself and its ancestors (reaping them
would take down the supervisor that restarts workers). The rest is configurable.
"""

from __future__ import annotations

import signal as _signal
from typing import AbstractSet, FrozenSet, Optional

import msgspec

from ._events import RejectReason
from ._process import ProcessInspector

__all__ = ["Policy", "ancestors_of", "check_pid", "check_process", "valid_signals"]

# The walk up to an ancestor is bounded: a process tree deeper than this is not ours.
_MAX_DEPTH = 256


def valid_signals() -> FrozenSet[int]:
    """The signal numbers of this platform (1 .. SIGRTMAX on Linux)."""
    return frozenset(int(s) for s in _signal.valid_signals())


class Policy(msgspec.Struct, frozen=True, kw_only=True):
    """What the server agrees to do. The defaults suit a host with one user's workers.

    Attributes:
        allowed_uids: if set, only processes whose real uid is in it get timers.
        descendants_only: only processes descended from the server get timers (an agent
            that launches its workers itself, as torchrun does).
        allowed_signals: signals a timer may carry (0, report only, is always allowed);
            ``None`` means every signal of the platform.
        max_timers_per_pid: timers one process may hold at once.
        max_timers: timers the server holds at once, in total.

    Raises:
        ValueError: a limit is below 1.
    """

    allowed_uids: Optional[FrozenSet[int]] = None
    descendants_only: bool = False
    allowed_signals: Optional[FrozenSet[int]] = None
    max_timers_per_pid: int = 10_000
    max_timers: int = 1_000_000

    def __post_init__(self) -> None:
        if self.max_timers_per_pid < 1 or self.max_timers < 1:
            raise ValueError("timer limits must be at least 1")


def check_pid(pid: int, server_pid: int, ancestors: AbstractSet[int]) -> Optional[RejectReason]:
    """Return why ``pid`` may never hold timers, or ``None``. Looks at nothing but numbers."""
    if pid <= 1:
        return RejectReason.RESERVED_PID
    if pid == server_pid:
        return RejectReason.SERVER_PROCESS
    if pid in ancestors:
        return RejectReason.SERVER_ANCESTOR
    return None


def check_process(
    pid: int, policy: Policy, inspector: ProcessInspector, server_pid: int
) -> Optional[RejectReason]:
    """Return why process ``pid`` may not hold timers under ``policy``, or ``None``.

    Call it after ``check_pid``; it asks ``inspector`` about the process.

    Raises:
        ProcessLookupError: the process does not exist (or vanished while checked).
    """
    if policy.allowed_uids is not None:
        try:
            uid: Optional[int] = inspector.uid(pid)
        except NotImplementedError:
            uid = None  # cannot be verified here: refuse
        if uid not in policy.allowed_uids:
            return RejectReason.UID_NOT_ALLOWED
    if policy.descendants_only and not is_descendant(pid, server_pid, inspector):
        return RejectReason.NOT_DESCENDANT
    return None


def is_descendant(pid: int, ancestor: int, inspector: ProcessInspector) -> bool:
    """True if ``ancestor`` is the parent, grandparent, ... of ``pid``.

    False when that cannot be established: a process of the chain exited, or the platform
    does not tell a process's parent.
    """
    for _ in range(_MAX_DEPTH):
        try:
            pid = inspector.parent(pid)
        except (ProcessLookupError, NotImplementedError):
            return False
        if pid == ancestor:
            return True
        if pid <= 1:
            return False
    return False


def ancestors_of(pid: int, inspector: ProcessInspector) -> FrozenSet[int]:
    """The parent, grandparent, ... of ``pid`` (pid 1 and 0 excluded)."""
    found = set()
    for _ in range(_MAX_DEPTH):
        try:
            pid = inspector.parent(pid)
        except (ProcessLookupError, NotImplementedError):
            break
        if pid <= 1:
            break
        found.add(pid)
    return frozenset(found)
