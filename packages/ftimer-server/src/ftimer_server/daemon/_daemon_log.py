"""One log line per server event: its level, its words, and its fields for JSON logs.

Armed and disarmed timers are routine (debug); expiries, reaps, escalations, refusals and
bad input are what an operator must see (warning). `describe` only formats (it reads
the clock when not given ``now``).
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable, Dict, Optional, Tuple

import msgspec
import msgspec.structs

from ftimer_protocol import signal_name
from ftimer_server.core._events import (
    Armed,
    DecodeFailed,
    Disarmed,
    Escalated,
    Event,
    Expired,
    Reaped,
    Rejected,
    ResendsOver,
    Unkillable,
    WorkerGone,
)
from ftimer_server.core._report import some_pids

__all__ = ["describe", "event_fields", "signal_label"]

Line = Tuple[int, str, Tuple[Any, ...]]


def signal_label(num: int) -> str:
    """``9`` -> ``"SIGKILL"``, ``0`` -> ``"report-only"``; an unnamed number stays a number."""
    return "report-only" if num == 0 else signal_name(num)


def describe(
    event: Event, dry_run: bool = False, restoring: bool = False, now: Optional[float] = None
) -> Line:
    """Return (level, format, args) of the log line for ``event``.

    The format string is the line's kind for flood control (`RepeatFilter`): lines that
    differ only in their arguments (pid, scope, excerpt) are one kind, so a refusal's
    reason and a bad line's error class are part of the format, not arguments. A timer's
    labels (torchrun's ``rank=... local_rank=...``) end the line.

    Args:
        event: what the server reported.
        dry_run: the daemon signals nothing; reaps are worded as what would have happened.
        restoring: the event comes from restoring the state file.
        now: monotonic time, for "expires in"; defaults to the clock.
    """
    labels = _labels(event.labels)
    # By the event's class, else its nearest base in the table: a subclass of an event is
    # worded as that event.
    for cls in type(event).__mro__:
        line = _LINES.get(cls)
        if line is not None:
            return line(event, labels, dry_run, restoring, now)
    return logging.INFO, "%r", (event,)  # pragma: no cover - an event type added later


def _armed(event: Armed, labels: str, dry_run: bool, restoring: bool, now: Optional[float]) -> Line:
    """The line of an armed, re-armed or restored timer."""
    t = event.timer
    left = t.deadline - (time.monotonic() if now is None else now)
    if restoring:
        return (
            logging.INFO,
            "restored timer: pid %d scope %r, %s in %.3f s%s",
            (t.pid, _shown(t.scope_id), signal_label(t.signal), left, labels),
        )
    verb = "re-armed" if event.rearmed else "armed"
    return (
        logging.DEBUG,
        "%s: pid %d scope %r, %s in %.3f s%s",
        (verb, t.pid, _shown(t.scope_id), signal_label(t.signal), left, labels),
    )


def _disarmed(
    event: Disarmed, labels: str, dry_run: bool, restoring: bool, now: Optional[float]
) -> Line:
    """The line of a disarmed timer."""
    t = event.timer
    return logging.DEBUG, "disarmed: pid %d scope %r%s", (t.pid, _shown(t.scope_id), labels)


def _expired(
    event: Expired, labels: str, dry_run: bool, restoring: bool, now: Optional[float]
) -> Line:
    """The line of a timer past its deadline."""
    t = event.timer
    return (
        logging.WARNING,
        "expired: pid %d scope %r (%s), %.1f ms after its deadline%s",
        (t.pid, _shown(t.scope_id), signal_label(t.signal), event.late * 1e3, labels),
    )


def _reaped(
    event: Reaped, labels: str, dry_run: bool, restoring: bool, now: Optional[float]
) -> Line:
    """The line of a reap: done, failed, moot (the worker had exited) or dry run."""
    args = (event.pid, signal_label(event.signal), _shown(event.scope_id), event.late * 1e3)
    labels = _too(event.descendants) + labels
    if dry_run:
        return (
            logging.WARNING,
            "DRY RUN, not signalled: would have reaped pid %d with %s (timer %r, %.1f ms late)%s",
            (*args, labels),
        )
    incident = "" if event.incident is None else f", incident {event.incident}"
    if event.gone:  # not a failure: nothing was left to reap
        return (
            logging.WARNING,
            "not reaped: pid %d exited before its %s (timer %r, %.1f ms late)%s%s",
            (*args, incident, labels),
        )
    if not event.delivered:
        return (
            logging.ERROR,
            "could not reap pid %d with %s (timer %r, %.1f ms late): %s%s%s",
            (*args, event.error or "the process is gone", incident, labels),
        )
    return (
        logging.WARNING,
        "reaped: pid %d with %s (timer %r, %.1f ms late)%s%s",
        (*args, incident, labels),
    )


def _escalated(
    event: Escalated, labels: str, dry_run: bool, restoring: bool, now: Optional[float]
) -> Line:
    """The line of a reap's escalation after its grace period."""
    sig = signal_label(event.signal)
    if dry_run:  # nothing was sent, neither the reap's signal nor this one
        return (
            logging.WARNING,
            "DRY RUN, not signalled: would have escalated to %s: pid %d, %.1f s after its reap%s",
            (sig, event.pid, event.after, labels),
        )
    if event.exited:  # it did not outlive its grace, they did
        return (
            logging.WARNING,
            "escalated: pid %d exited within its grace period, but %s outlived it: "
            "sent %s %.1f s after its signal%s",
            (event.pid, _descendants(event.descendants), sig, event.after, labels),
        )
    outcome = "" if event.delivered else f" (not delivered: {event.error or 'gone'})"
    outcome += _too(event.descendants)
    return (
        logging.WARNING,
        "escalated: pid %d still alive %.1f s after its signal, sent %s%s%s",
        (event.pid, event.after, sig, outcome, labels),
    )


def _unkillable(
    event: Unkillable, labels: str, dry_run: bool, restoring: bool, now: Optional[float]
) -> Line:
    """The line of a worker that outlived its SIGKILL."""
    return (
        logging.ERROR,
        "unkillable: pid %d still alive %.0f s after its SIGKILL, in %s: it dies only when "
        "that wait in the kernel ends (a hung file system, device or driver), holding its "
        "memory and devices until then%s",
        (event.pid, event.after, event.waiting or "a wait that could not be read", labels),
    )


def _resends_over(
    event: ResendsOver, labels: str, dry_run: bool, restoring: bool, now: Optional[float]
) -> Line:
    """The line of the restored timers that waited for re-sends in vain."""
    return (
        logging.WARNING,
        "re-sends over %.1f s after the restore grace: %d restored timer(s) of %d worker(s) "
        "no client re-sent, held back meanwhile (the queues were full), are judged now: "
        "their clients could not re-send (a worker stopped, or torch's client)",
        (event.waited, event.timers, event.workers),
    )


def _worker_gone(
    event: WorkerGone, labels: str, dry_run: bool, restoring: bool, now: Optional[float]
) -> Line:
    """The line of a worker that exited with (or without) timers, or before a restore."""
    n = len(event.timers)
    if restoring:
        return (
            logging.INFO,
            "saved timers not restored: pid %d exited while no server ran, %d timer(s) dropped%s",
            (event.pid, n, labels),
        )
    if event.unkillable:
        return (
            logging.WARNING,
            "worker exited at last: pid %d, which had outlived its SIGKILL (unkillable)%s",
            (event.pid, labels),
        )
    level = logging.INFO if n else logging.DEBUG
    return level, "worker exited: pid %d, %d timer(s) dropped%s", (event.pid, n, labels)


def _rejected(
    event: Rejected, labels: str, dry_run: bool, restoring: bool, now: Optional[float]
) -> Line:
    """The line of a refused request, or of a saved timer a restore refused."""
    detail = f" ({event.detail})" if event.detail else ""
    reason = _literal(event.reason.value)
    if event.request == "restore":
        return (
            logging.WARNING,
            f"saved timer not restored: pid %d scope %r: {reason}%s%s",
            (event.pid, _shown(event.scope_id), detail, labels),
        )
    return (
        logging.WARNING,
        f"refused %s: pid %d scope %r: {reason}%s%s",
        (event.request, event.pid, _shown(event.scope_id), detail, labels),
    )


def _decode_failed(
    event: DecodeFailed, labels: str, dry_run: bool, restoring: bool, now: Optional[float]
) -> Line:
    """The line of one invalid line dropped, or of a run of them."""
    error = _literal(event.error)
    if event.lines > 1:
        return (
            logging.WARNING,
            f"dropped %d invalid lines in a row: {error}: %s: first %r",
            (event.lines, event.reason, event.excerpt),
        )
    return (
        logging.WARNING,
        f"dropped an invalid line: {error}: %s: %r",
        (event.reason, event.excerpt),
    )


#: `describe`'s line for each event type: (event, labels, dry_run, restoring, now) -> Line.
_LINES: Dict[type, Callable[[Any, str, bool, bool, Optional[float]], Line]] = {
    Armed: _armed,
    Disarmed: _disarmed,
    Expired: _expired,
    Reaped: _reaped,
    Escalated: _escalated,
    Unkillable: _unkillable,
    ResendsOver: _resends_over,
    WorkerGone: _worker_gone,
    Rejected: _rejected,
    DecodeFailed: _decode_failed,
}


def _labels(labels: Optional[Dict[str, str]]) -> str:
    """``{"rank": "1"}`` -> ``", rank=1"``: the end of a line; empty without labels."""
    if not labels:
        return ""
    text = " ".join(f"{k}={v}" for k, v in sorted(labels.items()))
    return ", " + (text if len(text) <= SHOWN else f"{text[:SHOWN]}... ({len(text)} chars)")


#: Characters of a scope (or of the labels) a text log line shows: a worker may send 4 KiB
#: of either, and flood control counts lines, not bytes. The JSON lines' fields, the
#: status and the incidents keep them whole.
SHOWN = 200
#: Timers of a worker a JSON line lists (a reap's, an exit's): a worker may hold 10,000,
#: each with a 4 KiB scope, and journald splits a line beyond 48 KiB (LineMax=);
#: ``timers_total`` says how many it had.
LISTED = 4


class _Cut:
    """A long scope as ``%r`` shows it in a line: its start, and how long it is."""

    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return f"{self.text[:SHOWN]!r}... ({len(self.text)} chars)"


def _descendants(pids: Tuple[int, ...]) -> str:
    """A worker's descendants ``pids``, for a log line: "2 descendants (pids 9, 10)"."""
    if len(pids) == 1:
        return f"1 descendant (pid {pids[0]})"
    return f"{len(pids)} descendants (pids {some_pids(pids)})"


def _too(pids: Tuple[int, ...]) -> str:
    """The end of a reap's line that names the descendants its signal went to, if any."""
    return f"; the signal went to {_descendants(pids)} too" if pids else ""


def _shown(scope: Optional[str]) -> object:
    """``scope`` for a ``%r`` of a log line: whole, or cut after ``SHOWN`` characters."""
    return scope if scope is None or len(scope) <= SHOWN else _Cut(scope)


def _literal(text: str) -> str:
    """``text`` as literal text inside a %-format string."""
    return text.replace("%", "%%")


def event_fields(event: Event) -> Dict[str, Any]:
    """The event as flat fields for JSON logs: ``event`` (its tag), then its members, with
    those of its ``timer`` (pid, scope_id, deadline, ...) lifted to the top."""
    # Every timer of a worker (a reap's, an exit's): flood control counts lines, not bytes.
    timers = getattr(event, "timers", ())
    cut = len(timers) > LISTED
    if cut:
        event = msgspec.structs.replace(event, timers=timers[:LISTED])
    fields: Dict[str, Any] = msgspec.to_builtins(event, str_keys=True)
    if cut:
        fields["timers_total"] = len(timers)
    if "incident" in fields and fields["incident"] is None:
        del fields["incident"]  # only reaps that were diagnosed name one
    timer = fields.pop("timer", None)
    if timer is not None:
        del timer["op"]  # a Timer is an Arm message: its tag says nothing here
        fields.update(timer)
    if "decider" in fields:  # a WorkerGone's: only an unkillable worker's exit has one
        decider = fields.pop("decider")
        if decider is not None:
            del decider["op"]
            fields["decider"] = decider
            fields["labels"] = decider["labels"]  # as on the lines of its reap
    if isinstance(event, DecodeFailed) and event.excerpt is not None:
        fields["excerpt"] = event.excerpt.decode("utf-8", "backslashreplace")
    return fields
