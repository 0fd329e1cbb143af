"""What a chaos run measured, and its one table: what each row promises, what was
measured, and whether the promise held (docs/reliability.md explains every row)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

from _fleet import Fleet, Hung
from _procs import Child

__all__ = ["Flood", "Interval", "Row", "Tally", "late_beyond", "render", "rows"]

#: A hung worker reaped later than this beyond every excused interval breaks a promise.
#: The daemon itself reaps within milliseconds; the margin is for a loaded 2-core machine
#: and for a worker whose arm was re-sent by its client after an outage (the client
#: retries with a back-off of up to 1 s).
LATE_LIMIT = 1.5


@dataclass(frozen=True)
class Interval:
    """A stretch of time in which the daemon could not be expected to reap on time: it
    was down (restart), stopped (SIGSTOP, full pipe) and reading its backlog, or reading
    a junk flood (and, after a full pipe, the woken writers' turn)."""

    kind: str
    start: float
    end: float


@dataclass(frozen=True)
class Flood:
    """A junk flood: ``lines`` invalid lines in ``size`` bytes, read in ``seconds``
    (from the writer's start until a status request written after it was answered)."""

    kind: str
    size: int
    lines: int
    seconds: float

    @property
    def label(self) -> str:
        """For people: ``1024 KiB of y``."""
        return f"{self.size >> 10} KiB {'of y' if self.kind == 'yes' else 'mixed'}"

    def rate(self) -> float:
        """Lines read per second."""
        return self.lines / self.seconds


@dataclass
class Tally:
    """Everything the faults measured, besides the workers themselves."""

    started: float
    timeline: List[Tuple[float, str]] = field(default_factory=list)  # (start, fault)
    excused: List[Interval] = field(default_factory=list)
    restarts: int = 0
    outages: List[float] = field(default_factory=list)  # of kill -9 and SIGTERM restarts
    long_outages: List[float] = field(default_factory=list)  # made long on purpose
    unplanned: List[Optional[int]] = field(default_factory=list)  # exit statuses
    damaged: List[Tuple[str, bool]] = field(default_factory=list)  # (how, set aside)
    junk_sent: int = 0
    junk_counted: int = 0
    floods: List[Flood] = field(default_factory=list)
    hostile_sent: int = 0
    hostile_reasons: Counter[str] = field(default_factory=Counter)
    hostile_undecodable: int = 0
    hostile_accepted: int = 0
    stops: List[float] = field(default_factory=list)  # seconds stopped
    full_pipes: List[Tuple[int, float]] = field(default_factory=list)  # (bytes, seconds)
    rounds: Tuple[int, int] = (0, 0)  # (done, planned)
    aborted: str = ""

    def fault_at(self, when: float) -> str:
        """The fault that began last before ``when``."""
        return max((t, name) for t, name in self.timeline if t <= when)[1]

    def beyond(self, h: Hung) -> float:
        """How late a reaped hung worker died beyond every excused interval."""
        assert h.child.died is not None
        return late_beyond(h.deadline, h.child.died, self.excused)


def _merged(intervals: Iterable[Interval]) -> List[Tuple[float, float]]:
    spans: List[Tuple[float, float]] = []
    for start, end in sorted((i.start, i.end) for i in intervals):
        if spans and start <= spans[-1][1]:
            spans[-1] = (spans[-1][0], max(spans[-1][1], end))
        else:
            spans.append((start, end))
    return spans


def late_beyond(deadline: float, died: float, excused: Sequence[Interval]) -> float:
    """Seconds from ``deadline`` to ``died`` that no interval in ``excused`` covers: how
    late a reap was while the daemon was up and not busy with a flood."""
    late = died - deadline
    for start, end in _merged(excused):
        late -= max(0.0, min(end, died) - max(start, deadline))
    return late


def why_killed(child: Child, fleet: Fleet, tally: Tally) -> str:
    """Where a healthy worker that died belongs: a quiet one to the fault that followed
    its disarm, a looping one to the fault running when it died."""
    for fault, quiet in fleet.quiet:
        if quiet is child:
            return f"quiet, disarmed just before {fault}"
    return f"looping, during {'?' if child.died is None else tally.fault_at(child.died)}"


def failures(fleet: Fleet, tally: Tally) -> List[str]:
    """What broke a promise, one line each, with what is needed to look into it."""
    lines = []
    for child in fleet.healthy + fleet.quiet_workers():
        if child.status != 0:
            why = why_killed(child, fleet, tally)
            lines.append(f"healthy worker pid {child.pid} ended with {child.status}: {why}")
    for h in fleet.hung:
        if not h.reaped:
            lines.append(f"hung worker pid {h.child.pid} ({h.fault}, {h.phase}) not reaped")
        elif tally.beyond(h) > LATE_LIMIT:
            arm = "re-sent" if h.warned else "delivered"
            lines.append(
                f"hung worker pid {h.child.pid} ({h.fault}, {h.phase}, arm {arm}) reaped "
                f"{tally.beyond(h):.3f} s late beyond outages"
            )
    for summary in fleet.summaries:
        lines += [f"exception in a healthy step: {e}" for e in summary["errors"][:3]]
    return lines


@dataclass(frozen=True)
class Row:
    """One line of the table. ``ok`` is None for a figure that promises nothing."""

    promise: str
    measured: str
    ok: Optional[bool]


def rows(
    fleet: Fleet, tally: Tally, canaries_alive: int, elapsed: float, limit: float
) -> List[Row]:
    """The table's rows."""
    return [
        Row("scenario completed", tally.aborted or "yes", not tally.aborted),
        *_worker_rows(fleet, tally, canaries_alive),
        *_daemon_rows(tally),
        Row(f"run time (<= {limit:.0f} s)", f"{elapsed:.0f} s", elapsed <= limit),
    ]


def _worker_rows(fleet: Fleet, tally: Tally, canaries_alive: int) -> List[Row]:
    workers = fleet.healthy + fleet.quiet_workers()
    killed = [c for c in workers if c.status != 0]
    killed_why = Counter(why_killed(c, fleet, tally) for c in killed)
    blocks = sum(s["blocks"] for s in fleet.summaries)
    errors = sum(len(s["errors"]) for s in fleet.summaries)
    warned = sum(s["warnings"] for s in fleet.summaries)
    reaped = [h for h in fleet.hung if h.reaped]
    beyond = max((tally.beyond(h) for h in reaped), default=0.0)
    raw = max((h.child.died - h.deadline for h in reaped if h.child.died), default=0.0)
    return [
        Row(
            "healthy workers killed (must be 0)",
            f"{len(killed)} of {len(workers)}"
            + "".join(f"; {n} {why}" for why, n in killed_why.items()),
            not killed,
        ),
        Row(
            "exceptions in healthy steps (must be 0)",
            f"{errors} in {blocks:,} blocks ({warned:,} outage warnings)",
            errors == 0,
        ),
        Row(
            "hung workers reaped (must be all)",
            f"{len(reaped)} of {len(fleet.hung)}",
            len(reaped) == len(fleet.hung),
        ),
        Row(
            f"worst reap lateness beyond outages (<= {LATE_LIMIT} s)",
            f"{beyond:.3f} s (raw worst {raw:.2f} s)",
            beyond <= LATE_LIMIT,
        ),
        Row(
            "canaries alive at the end (must be all)",
            f"{canaries_alive} of {len(fleet.canaries)}",
            canaries_alive == len(fleet.canaries),
        ),
    ]


def _daemon_rows(tally: Tally) -> List[Row]:
    refused = sum(tally.hostile_reasons.values()) + tally.hostile_undecodable
    set_aside = sum(ok for _, ok in tally.damaged)
    yes = [f for f in tally.floods if f.kind == "yes"]
    biggest = max((f.size for f in yes), default=0)
    slowest = min((f for f in yes if f.size == biggest), key=Flood.rate, default=None)
    long_outage = ", ".join(f"{s:.1f}" for s in tally.long_outages) or "none"
    full = max(tally.full_pipes, default=(0, 0.0))
    return [
        Row(
            "daemon restarts (each one ready again)",
            f"{tally.restarts}; worst outage {max(tally.outages, default=0):.2f} s "
            f"(+ long on purpose: {long_outage} s)",
            tally.restarts > 0,
        ),
        Row(
            "unplanned daemon exits (must be 0)",
            f"{len(tally.unplanned)} {tally.unplanned or ''}",
            not tally.unplanned,
        ),
        Row(
            "unreadable state files set aside (must be all)",
            f"{set_aside} of {len(tally.damaged)} ({', '.join(h for h, _ in tally.damaged)})",
            set_aside == len(tally.damaged),
        ),
        Row(
            "junk lines sent (counted by the daemon)",
            f"{tally.junk_sent:,} ({tally.junk_counted:,})",
            None,
        ),
        Row(
            "junk read rate (slowest largest y flood)",
            "none"
            if slowest is None
            else f"{slowest.rate():,.0f} lines/s ({slowest.label} in {slowest.seconds:.3f} s)",
            None,
        ),
        Row(
            "hostile requests refused (must be all)",
            f"{refused} of {tally.hostile_sent} ({sum(tally.hostile_reasons.values())} policy, "
            f"{tally.hostile_undecodable} undecodable, {tally.hostile_accepted} accepted)",
            refused == tally.hostile_sent and tally.hostile_accepted == 0,
        ),
        Row(
            "SIGSTOP / full pipe",
            f"{len(tally.stops)} x {max(tally.stops, default=0):.1f} s stopped; "
            f"{len(tally.full_pipes)} x {full[0] >> 10} KiB full for {full[1]:.1f} s",
            None,
        ),
    ]


def render(title: str, table: Sequence[Row]) -> str:
    """The table as text, aligned, with a verdict column."""
    verdict = {True: "ok", False: "FAILED", None: "-"}
    header = ("promise", "measured", "verdict")
    cells = [header] + [(r.promise, r.measured, verdict[r.ok]) for r in table]
    widths = [max(len(c[i]) for c in cells) for i in range(2)]
    lines = [title, ""]
    for i, (promise, measured, ok) in enumerate(cells):
        lines.append(f"{promise:<{widths[0]}}  {measured:<{widths[1]}}  {ok}")
        if i == 0:
            lines.append(f"{'-' * widths[0]}  {'-' * widths[1]}  -------")
    return "\n".join(lines)
