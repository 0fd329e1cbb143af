"""One log line per server event: its level, its words, and its fields for JSON logs.

Armed and disarmed timers are routine (debug); expiries, reaps, escalations, refusals and
bad input are what an operator must see (warning). Pure: `describe` only formats.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Dict, Optional, Tuple

import msgspec

from ftimer_server.core._events import (
    Armed,
    DecodeFailed,
    Disarmed,
    Escalated,
    Event,
    Expired,
    Reaped,
    Rejected,
    RejectReason,
    WorkerGone,
)

from ._config import signal_label

__all__ = ["describe", "event_fields"]

Line = Tuple[int, str, Tuple[Any, ...]]

# Refusals of a saved timer whose worker died while the daemon was down are expected.
_ROUTINE_RESTORE = (RejectReason.NO_SUCH_PROCESS, RejectReason.IDENTITY_MISMATCH)


def describe(
    event: Event, dry_run: bool = False, restoring: bool = False, now: Optional[float] = None
) -> Line:
    """Return (level, format, args) of the log line for ``event``.

    Args:
        event: what the server reported.
        dry_run: the daemon signals nothing; reaps are worded as what would have happened.
        restoring: the event comes from restoring the state file.
        now: monotonic time, for "expires in"; defaults to the clock.
    """
    if isinstance(event, Armed):
        t = event.timer
        left = t.deadline - (time.monotonic() if now is None else now)
        if restoring:
            return (
                logging.INFO,
                "restored timer: pid %d scope %r, %s in %.3f s",
                (t.pid, t.scope_id, signal_label(t.signal), left),
            )
        verb = "re-armed" if event.rearmed else "armed"
        return (
            logging.DEBUG,
            "%s: pid %d scope %r, %s in %.3f s",
            (verb, t.pid, t.scope_id, signal_label(t.signal), left),
        )
    if isinstance(event, Disarmed):
        return logging.DEBUG, "disarmed: pid %d scope %r", (event.timer.pid, event.timer.scope_id)
    if isinstance(event, Expired):
        t = event.timer
        return (
            logging.WARNING,
            "expired: pid %d scope %r (%s), %.1f ms after its deadline",
            (t.pid, t.scope_id, signal_label(t.signal), event.late * 1e3),
        )
    if isinstance(event, Reaped):
        args = (event.pid, signal_label(event.signal), event.scope_id, event.late * 1e3)
        if dry_run:
            return (
                logging.WARNING,
                "DRY RUN, not signalled: would have reaped pid %d with %s (timer %r, %.1f ms late)",
                args,
            )
        if not event.delivered:
            return (
                logging.ERROR,
                "could not reap pid %d with %s (timer %r, %.1f ms late): %s",
                (*args, event.error or "the process is gone"),
            )
        return logging.WARNING, "reaped: pid %d with %s (timer %r, %.1f ms late)", args
    if isinstance(event, Escalated):
        prefix = "DRY RUN, not signalled: " if dry_run else ""
        outcome = "" if event.delivered else f" (not delivered: {event.error or 'gone'})"
        return (
            logging.WARNING,
            "%sescalated: pid %d still alive %.1f s after its signal, sent %s%s",
            (prefix, event.pid, event.after, signal_label(event.signal), outcome),
        )
    if isinstance(event, WorkerGone):
        n = len(event.timers)
        level = logging.INFO if n else logging.DEBUG
        return level, "worker exited: pid %d, %d timer(s) dropped", (event.pid, n)
    if isinstance(event, Rejected):
        detail = f" ({event.detail})" if event.detail else ""
        if event.request == "restore":
            level = logging.INFO if event.reason in _ROUTINE_RESTORE else logging.WARNING
            return (
                level,
                "saved timer not restored: pid %d scope %r: %s%s",
                (event.pid, event.scope_id, event.reason.value, detail),
            )
        return (
            logging.WARNING,
            "refused %s: pid %d scope %r: %s%s",
            (event.request, event.pid, event.scope_id, event.reason.value, detail),
        )
    if isinstance(event, DecodeFailed):
        if event.lines > 1:
            return (
                logging.WARNING,
                "dropped %d invalid lines in a row from the FIFO: %s: %s: first %r",
                (event.lines, event.error, event.reason, event.excerpt),
            )
        return (
            logging.WARNING,
            "dropped an invalid line from the FIFO: %s: %s: %r",
            (event.error, event.reason, event.excerpt),
        )
    return logging.INFO, "%r", (event,)  # pragma: no cover - an event type added later


def event_fields(event: Event) -> Dict[str, Any]:
    """The event as flat fields for JSON logs: ``event`` (its tag), then its members, with
    those of its ``timer`` (pid, scope_id, deadline, ...) lifted to the top."""
    fields: Dict[str, Any] = msgspec.to_builtins(event, str_keys=True)
    timer = fields.pop("timer", None)
    if timer is not None:
        del timer["op"]  # a Timer is an Arm message: its tag says nothing here
        fields.update(timer)
    if isinstance(event, DecodeFailed) and event.excerpt is not None:
        fields["excerpt"] = event.excerpt.decode("utf-8", "backslashreplace")
    return fields
