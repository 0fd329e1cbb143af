"""Which processes and signals the server may act on, and how many timers it keeps.

Some refusals are not optional: pid <= 1 (``kill(0)`` and ``kill(-1)`` mean process
groups or everything, pid 1 is init), the server itself and its ancestors (reaping them
would take down the supervisor that restarts workers), and a thread's id (a signal sent
to it reaches its whole process). The rest is configurable, and fails closed: an empty
set allows nothing, and what cannot be verified is refused.
"""

from __future__ import annotations

from typing import AbstractSet, Container, FrozenSet, Optional, Tuple

import msgspec

from ._events import RejectReason
from ._host import Facts

__all__ = ["Policy", "check_pid", "clocks_apart", "judge"]


class Policy(msgspec.Struct, frozen=True, kw_only=True):
    """What the server agrees to do. The defaults suit a host with one user's workers.

    Attributes:
        allowed_uids: if set, only processes whose real uid is in it get timers (an
            empty set: none do). Default ``None``: any uid.
        descendants_only: only processes descended from the server get timers (an agent
            that launches its workers itself, as torchrun does). Default ``False``.
        allowed_signals: signals a timer may carry (0, report only, is always allowed);
            ``None`` means every signal of the platform, an empty set none but 0.
            Default ``None``.
        max_timers_per_pid: timers one process may hold at once. Default 10,000.
        max_timers: timers the server holds at once, in total. Default 1,000,000.

    Raises:
        ValueError: a limit is below 1.
    """

    allowed_uids: Optional[FrozenSet[int]] = None
    descendants_only: bool = False
    allowed_signals: Optional[FrozenSet[int]] = None
    max_timers_per_pid: int = 10_000
    max_timers: int = 1_000_000

    def __post_init__(self) -> None:
        for name in ("max_timers_per_pid", "max_timers"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a whole number >= 1, not {value!r}")

    def signals(self, platform: AbstractSet[int]) -> FrozenSet[int]:
        """The signals a timer may carry on a platform with signals ``platform``."""
        allowed = platform if self.allowed_signals is None else self.allowed_signals & platform
        return frozenset(allowed) | {0}


def check_pid(
    pid: int, server_pid: int, ancestors: AbstractSet[int], own: Container[int] = ()
) -> Optional[RejectReason]:
    """Return why ``pid`` may never hold timers, or ``None``. Looks at nothing but numbers:
    ``own`` holds the processes the server runs for itself (its capture helper)."""
    if pid <= 1:
        return RejectReason.RESERVED_PID
    if pid == server_pid or pid in own:
        return RejectReason.SERVER_PROCESS
    if pid in ancestors:
        return RejectReason.SERVER_ANCESTOR
    return None


def judge(
    facts: Facts,
    start_time: Optional[int],
    policy: Policy,
    server_pid: int,
    its_clocks: bool = True,
) -> Optional[RejectReason]:
    """Return why the process ``facts`` describe may not hold timers, or ``None``.

    Args:
        facts: what the host found (call ``check_pid`` first).
        start_time: the start time the message names, if any.
        policy: the policy.
        server_pid: the server's process, for ``descendants_only``.
        its_clocks: the message's deadline and start time are on the process's clocks,
            which must then be the server's (not so of torch's wall-clock deadlines
            without a start time, or of a timer the server saved).
    """
    if facts.tgid != facts.pid:
        return RejectReason.NOT_A_PROCESS
    if its_clocks and facts.clock_offsets != (0, 0):  # first: its start time reads otherwise
        return RejectReason.OTHER_CLOCK
    if start_time is not None and facts.start_time is not None and facts.start_time != start_time:
        return RejectReason.IDENTITY_MISMATCH
    # Unknown facts (None) never pass a check that needs them.
    if policy.allowed_uids is not None and facts.uid not in policy.allowed_uids:
        return RejectReason.UID_NOT_ALLOWED
    if policy.descendants_only and server_pid not in (facts.ancestors or ()):
        return RejectReason.NOT_DESCENDANT
    return None


def clocks_apart(offsets: Optional[Tuple[int, int]]) -> str:
    """Say how the clocks of a process in another time namespace differ from the
    server's.

    Args:
        offsets: ``Facts.clock_offsets`` of the process, other than ``(0, 0)``.
    """
    if offsets is None:
        return "offsets of its own time namespace cannot be read (it unshared one for its children)"
    apart = [
        f"{name} {'+' if ns > 0 else '-'}{_seconds(abs(ns))} s"
        for name, ns in zip(("CLOCK_MONOTONIC", "CLOCK_BOOTTIME"), offsets)
        if ns
    ]
    return f"{', '.join(apart)} from the server's: another time namespace"


def _seconds(ns: int) -> str:
    whole, fraction = divmod(ns, 1_000_000_000)
    return f"{whole}.{fraction:09d}".rstrip("0").rstrip(".")
