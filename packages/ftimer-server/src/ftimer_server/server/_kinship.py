"""Whom a datagram's sender may name as a timer's subject by passing a pidfd of it: only
a process of its own uid that is its descendant or its parent (``ftimer exec``'s command,
or the shell that runs ``ftimer arm``), nothing it could not already do with ``kill(2)``.
Judged with the server's inspector of processes: ``subject`` never raises, what the
inspector raises is a refusal."""

from __future__ import annotations

from typing import Dict, Optional, Tuple

from ftimer_server.core._events import RejectReason

from ._process import ProcessInspector

__all__ = ["may_name", "subject"]


def subject(
    sender: int,
    uid: int,
    *,
    named: Optional[int],
    parents: Dict[int, int],
    processes: ProcessInspector,
) -> Tuple[Optional[RejectReason], int, str]:
    """The process a datagram's one pidfd names (``named``, as read with it), or why the
    sender may not name it."""
    target = named
    if target == -1:
        return RejectReason.NO_SUCH_PROCESS, sender, "the process it names has exited"
    if target is None or target <= 0:
        return RejectReason.FOREIGN_SUBJECT, sender, "not a pidfd of a live process"
    if target == sender:  # its own pidfd: as if it carried none
        return None, target, ""
    try:
        refusal = may_name(sender, uid, target, parents, processes)
    except (ProcessLookupError, FileNotFoundError):  # reaped while it was examined
        return RejectReason.NO_SUCH_PROCESS, sender, "the process it names has exited"
    except Exception as e:  # an inspector's (NotImplementedError, say): refuse, never raise
        return RejectReason.UNVERIFIABLE, sender, f"cannot examine process {target}: {e!r}"
    if refusal is not None:
        return RejectReason.FOREIGN_SUBJECT, sender, refusal
    return None, target, ""


def may_name(
    sender: int, uid: int, target: int, parents: Dict[int, int], processes: ProcessInspector
) -> Optional[str]:
    """Why ``sender`` (of ``uid``) may not arm a timer for ``target``, or None: only a
    process of its own uid that is its descendant or its parent. ``parents`` caches the
    parents read for one batch: a sender naming a descendant many generations down, in
    datagram after datagram, has its line of descent read from /proc once a batch.

    Raises:
        ProcessLookupError, FileNotFoundError: ``target`` is gone.
    """

    def parent(pid: int) -> int:
        found = parents.get(pid)
        if found is None:
            found = parents[pid] = processes.parent(pid)
        return found

    try:
        if processes.uid(target) != uid:  # ProcessLookupError: target is gone
            return f"process {target} is not of the sender's user"
        if parent(sender) == target:
            return None
        pid = target
        for _ in range(256):
            pid = parent(pid)
            if pid == sender:
                return None
            if pid <= 1:
                break
    except (ProcessLookupError, FileNotFoundError):
        # The target itself gone, or only an ancestor between it and the sender?
        try:
            processes.start_time(target)
        except (ProcessLookupError, FileNotFoundError):
            raise
        except Exception as e:
            return f"cannot examine process {target}: {e}"
        return f"process {target} is neither a descendant nor the parent of the sender"
    except OSError as e:
        return f"cannot examine process {target}: {e.strerror}"
    return f"process {target} is neither a descendant nor the parent of the sender"
