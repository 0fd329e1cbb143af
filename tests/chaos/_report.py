"""Measurements of a chaos run turned into its one table: what each row promises, what
was measured, and whether the promise held."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import List, Optional, Tuple

__all__ = ["Interval", "Row", "late_beyond", "render"]


@dataclass(frozen=True)
class Interval:
    """A stretch of time in which the daemon could not be expected to reap on time: it
    was down (restart), stopped (SIGSTOP, full pipe), or reading a junk flood."""

    kind: str
    start: float
    end: float


@dataclass(frozen=True)
class Row:
    """One line of the table. ``ok`` is None for a figure that promises nothing."""

    promise: str
    measured: str
    ok: Optional[bool]


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


def render(title: str, rows: Sequence[Row]) -> str:
    """The table as text, aligned, with a verdict column."""
    verdict = {True: "ok", False: "FAILED", None: "-"}
    header = ("promise", "measured", "verdict")
    cells = [header] + [(r.promise, r.measured, verdict[r.ok]) for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(2)]
    lines = [title, ""]
    for i, (promise, measured, ok) in enumerate(cells):
        lines.append(f"{promise:<{widths[0]}}  {measured:<{widths[1]}}  {ok}")
        if i == 0:
            lines.append(f"{'-' * widths[0]}  {'-' * widths[1]}  -------")
    return "\n".join(lines)
