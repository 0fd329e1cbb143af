"""The text of an incident: the summary a person reads first, and the whole report.

Pure functions over the incident schema (no I/O, no clock: times are the record's own):

- `summarize`: the first lines: what expired, what was captured, the groups of workers
  by stack (outliers first), whether the capture ran out of its budget, the errors;
- `annotate`: fills every thread's ``doing``, the groups and the summary of an incident
  (what the server does before it writes one);
- `render`: the whole incident as text (``ftimer-server incidents show`` and the
  ``.txt`` beside each record): the summary, the call-prefix tree, every worker's facts
  and every thread's stack, innermost frame last as in a Python traceback;
- `merge_captures` / `render_merged`: one report over the incidents of one job taken on
  several hosts at once (``ftimer-server incidents merge``);
- `printable`: text a worker controls (labels, scope, command line, thread names, frames,
  anything from /proc or the wire), fit for a terminal or a text log line.

The record keeps what the worker sent, exactly; its texts are made printable as they are
rendered (`render`, `render_merged`, ``incidents list``, the daemon's text log).
"""

from __future__ import annotations

import datetime
import itertools
from collections.abc import Sequence
from typing import Dict, List, Optional, Tuple

import msgspec

from ._incident import Capture, ChildState, Frame, Group, Incident, ProcessFacts, ThreadStack
from ._stacks import (
    abridged,
    call_tree,
    client_thread,
    doing,
    doing_of,
    focus,
    group,
    wait_channel,
)

__all__ = [
    "annotate",
    "merge_captures",
    "printable",
    "render",
    "render_merged",
    "some_pids",
    "summarize",
]

#: Signals with the same number on every POSIX system (the core imports no ``signal``:
#: it names what it can without asking the platform; others are shown as numbers).
_SIGNAL_NAMES = {
    1: "SIGHUP",
    2: "SIGINT",
    3: "SIGQUIT",
    6: "SIGABRT",
    9: "SIGKILL",
    14: "SIGALRM",
    15: "SIGTERM",
}


def printable(text: str) -> str:
    r"""``text`` with every character that is not printable escaped as ``repr`` escapes it.

    Not printable (``str.isprintable``): newline, carriage return, tab, ESC and the other
    C0 and C1 controls, DEL, the line and paragraph separators, bidi and other format
    characters, spaces other than " ", unpaired surrogates. A newline becomes ``\n``
    (a backslash and an n), ESC ``\x1b``, U+2028 ``\u2028``: the text stays on its
    line, and no escape sequence reaches a terminal.

    Backslashes are kept: a ``repr`` (a scope as the texts quote it) is printable already
    and passes unchanged, so whole lines can be made printable, whatever they quote.
    """
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


# -- the summary -----------------------------------------------------------------------


def summarize(incident: Incident) -> List[str]:
    """The lines a person reads first: what expired, what was captured, the groups
    (outliers first; ``incident.groups``, or `group` of its captures when it has none),
    whether the capture ran out of its budget, and the errors."""
    labels = _labels(incident.labels)
    late = _duration(incident.late)
    lines = [
        f"timer {incident.scope_id!r} of pid {incident.pid}"
        + (f" ({labels})" if labels else "")
        + f" expired {late} after its deadline; {_signal_text(incident)}"
    ]
    captures = incident.captures
    if captures:
        job = f" of job {incident.job}" if incident.job is not None else ""
        count = f"{len(captures)} worker{'s' if len(captures) != 1 else ''}"
        lines.append(
            f"captured {count}{job} in {_duration(incident.seconds)} ({_methods(captures)})"
        )
        lines += [f"  {g.summary}" for g in incident.groups or group(captures)]
    else:
        lines.append("nothing captured")
    if incident.timed_out:
        lines.append(
            f"the capture ran out of its budget after {_duration(incident.seconds)}: the "
            f"signal was {'due' if incident.delivered is None else 'sent'} then, and what "
            "was not captured by then is missing"
        )
    lines += [f"error: {e}" for e in incident.errors]
    return lines


def annotate(incident: Incident) -> Incident:
    """``incident`` with every thread's ``doing`` filled (where the capture left it
    empty), its captures grouped and its summary written."""
    captures = [
        msgspec.structs.replace(c, threads=[_with_doing(t) for t in c.threads])
        for c in incident.captures
    ]
    incident = msgspec.structs.replace(incident, captures=captures, groups=group(captures))
    return msgspec.structs.replace(incident, summary=summarize(incident))


def _with_doing(thread: ThreadStack) -> ThreadStack:
    return thread if thread.doing else msgspec.structs.replace(thread, doing=doing(thread))


def _methods(captures: Sequence[Capture]) -> str:
    counts: Dict[str, int] = {}
    for c in captures:
        counts[c.method] = counts.get(c.method, 0) + 1
    if len(counts) == 1:
        return next(iter(counts))
    return ", ".join(f"{method} {n}" for method, n in counts.items())


def _signal_text(incident: Incident) -> str:
    if incident.signal == 0:
        return "report only (no signal)"
    name = _signal_name(incident.signal)
    if incident.dry_run:
        return f"not signalled (dry run): would have reaped with {name}"
    if incident.delivered is None:
        return f"not signalled: the worker exited during the capture ({name} was due)"
    text = f"reaped with {name}" + ("" if incident.delivered else " (NOT delivered)")
    n = len(incident.descendants)
    if n:
        who = f"were {n} of its descendants (pids" if n > 1 else "was a descendant of it (pid"
        text += f", as {who} {some_pids(incident.descendants)})"
    return text


def some_pids(pids: Sequence[int], most: int = 20) -> str:
    """``pids`` for people: "9, 10, 11", the first ``most`` of them and "..." after."""
    return ", ".join(map(str, pids[:most])) + (", ..." if len(pids) > most else "")


def _signal_name(signal: int) -> str:
    return _SIGNAL_NAMES.get(signal, f"signal {signal}")


def _labels(labels: Optional[Dict[str, str]]) -> str:
    return " ".join(f"{k}={v}" for k, v in sorted((labels or {}).items()))


def _duration(seconds: float) -> str:
    """``0.0123`` -> ``"12 ms"``, ``1.5`` -> ``"1.5 s"``, ``4000`` -> ``"1h06m"``."""
    s = abs(seconds)
    sign = "-" if seconds < 0 else ""
    if s < 0.01:
        return f"{sign}{s * 1000:.1f} ms"
    if s < 1:
        return f"{sign}{s * 1000:.0f} ms"
    if s < 120:
        return f"{sign}{s:.1f} s"
    minutes, secs = divmod(int(s), 60)
    hours, minutes = divmod(minutes, 60)
    return sign + (f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s")


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"  # pragma: no cover - the loop always returns


# -- the whole text --------------------------------------------------------------------


def render(incident: Incident) -> str:
    """The incident as a person reads it (``ftimer-server incidents show``): the summary
    first, the call-prefix tree when the stacks differ, then each worker's facts and
    every thread's stack (innermost frame last, as in a Python traceback), then the
    errors. Uses ``incident.summary`` and ``incident.groups`` when the record has them."""
    groups = incident.groups or group(incident.captures)
    summary = incident.summary or summarize(msgspec.structs.replace(incident, groups=groups))
    lines = [f"incident {incident.id} on {incident.host}, {_utc(incident.created)}", ""]
    lines += summary
    lines += _tree_section(incident.captures, groups)
    for capture in incident.captures:
        lines += ["", *_worker_lines(capture)]
    if incident.errors:
        lines += ["", "errors:", *(f"  {e}" for e in incident.errors)]
    return _text(lines)


def _text(lines: Sequence[str]) -> str:
    """``lines`` joined, each made `printable`: what a worker sent (a label, a thread name,
    a frame, the summary and groups that quote them) neither breaks a line nor reaches
    the terminal."""
    return "\n".join(map(printable, lines)) + "\n"


def _tree_section(captures: Sequence[Capture], groups: Sequence[Group]) -> List[str]:
    if sum(1 for g in groups if g.frames) < 2:
        return []
    return [
        "",
        "call tree of the stuck threads (outermost first; workers through each frame):",
        *(f"  {line}" for line in call_tree(captures)),
    ]


def _utc(created: float) -> str:
    moment = datetime.datetime.fromtimestamp(created, tz=datetime.timezone.utc)
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC")


def _worker_lines(capture: Capture) -> List[str]:
    labels = capture.labels or {}
    head = f"pid {capture.pid}"
    if capture.host:
        head += f" on {capture.host}"
    if "rank" in labels:
        head += f", rank {labels['rank']}"
    role = capture.role + (" (its timer running)" if capture.timer_running else "")
    head += f": {role}, {capture.method}, {_duration(capture.seconds)}"
    if capture.exited:
        head += ", exited during the capture"
    lines = [head]
    if labels:
        lines.append(f"  labels: {_labels(labels)}")
    facts = capture.facts
    if facts is not None:
        if facts.cmdline:
            lines.append(f"  command: {' '.join(facts.cmdline)}")
        lines.append(f"  process: {_facts_text(facts)}")
    if capture.error:
        lines.append(f"  error: {capture.error}")
    if capture.core:
        lines.append(f"  core: {capture.core}")
    # The thread the summary speaks of first; the client library's own threads (its
    # connection's watch, its retries: they wait on the worker, never cause a hang) last,
    # a line each (their frames are in the record, `--json`).
    first = focus(capture)
    own = [t for t in capture.threads if client_thread(t) and t is not first]
    rest = [t for t in capture.threads if t is not first and t not in own]
    for thread in ([first] if first is not None else []) + rest:
        lines += _thread_lines(thread)
    lines += [_thread_head(t) + ": ftimer's client library" for t in own]
    if not capture.threads and capture.raw:
        lines += ["  raw output:", *(f"    {line}" for line in capture.raw.splitlines())]
    return lines


def _facts_text(f: ProcessFacts) -> str:
    parts = [f"state {f.state}"] if f.state else []
    if f.rss:
        parts.append(f"{_size(f.rss)} resident")
    if f.threads:
        parts.append(_count(f.threads, "thread"))
    if f.age:
        parts.append(f"up {_duration(f.age)}")
    if f.uid is not None:
        parts.append(f"uid {f.uid}")
    if f.children:
        states = {c.pid: c for c in f.child_states}
        parts.append(f"children {abridged(_child(pid, states.get(pid)) for pid in f.children)}")
    parts.append(f"{_count(f.fifos, 'FIFO')}, {_count(f.sockets, 'socket')}")
    return ", ".join(parts)


def _child(pid: int, state: Optional[ChildState]) -> str:
    """A child as the facts show it: "29 (pt_data_worker: D in nfs_wait_bit)"."""
    if state is None or not state.state:
        return str(pid)
    name = f"{printable(state.name)}: " if state.name else ""
    wchan = f" in {printable(state.wchan)}" if state.wchan else ""
    return f"{pid} ({name}{state.state}{wchan})"


def _count(n: int, thing: str) -> str:
    return f"{n} {thing}" if n == 1 else f"{n} {thing}s"


def _thread_head(thread: ThreadStack) -> str:
    flags = []
    if thread.state:
        flags.append(thread.state + (f" in {wait_channel(thread)}" if wait_channel(thread) else ""))
    if thread.active is not None:
        flags.append("active" if thread.active else "idle")
    if thread.gil:
        flags.append("holds the GIL")
    name = f' "{thread.name}"' if thread.name else ""
    return f"  thread {thread.tid}{name}" + (f" [{'; '.join(flags)}]" if flags else "")


def _frame_line(frame: Frame) -> str:
    if frame.native:
        where = f" in {frame.file}" if frame.file else ""
        line = f":{frame.line}" if frame.line and frame.file else ""
        return f"    [native] {frame.function}{where}{line}"
    return f'    File "{frame.file}", line {frame.line}, in {frame.function}'


#: The times a frame repeated in a row is shown before the rest is counted (Python's).
_SHOWN_REPEATS = 3


def _thread_lines(thread: ThreadStack) -> List[str]:
    what = doing_of(thread)
    head = _thread_head(thread)
    lines = [head + (f": {what}" if what else "")]
    if thread.frames_cut:  # the outermost: a traceback's top
        lines.append(f"    ... {thread.frames_cut} outer frames not shown")
    # A run of one frame (a recursion) as a Python traceback shows it: three, then the
    # count of the rest, where 200 lines of it pushed the other workers off the page.
    for frame, run in itertools.groupby(reversed(thread.frames)):
        times = sum(1 for _ in run)
        lines += [_frame_line(frame)] * min(times, _SHOWN_REPEATS)
        if times > _SHOWN_REPEATS:
            lines.append(f"    [Previous line repeated {times - _SHOWN_REPEATS} more times]")
    if not thread.frames:
        lines.append("    (no frames)")
    if thread.kernel_stack:
        lines += ["    kernel:", *(f"      {entry}" for entry in thread.kernel_stack)]
    return lines


# -- several hosts ---------------------------------------------------------------------


def merge_captures(incidents: Sequence[Incident]) -> List[Capture]:
    """The captures of ``incidents`` (taken on several hosts) as one list of workers.

    Each capture is named by its incident's host. A worker (host, pid, start time) seen
    by several incidents of its host (its own, and its peers' as a peer) counts once:
    the capture where it is the stuck worker, else the first by the incidents' time.
    Order: by incident time, each incident's stuck worker first.
    """
    chosen: Dict[Tuple[str, int, Optional[int]], Capture] = {}
    for incident in sorted(incidents, key=lambda i: (i.created, i.host, i.id)):
        for capture in incident.captures:
            named = msgspec.structs.replace(capture, host=capture.host or incident.host)
            identity = (named.host, named.pid, named.start_time)
            seen = chosen.get(identity)
            if seen is None or (seen.role != "stuck" and named.role == "stuck"):
                chosen[identity] = named
    return list(chosen.values())


def render_merged(incidents: Sequence[Incident], job: Optional[str] = None) -> str:
    """One report over ``incidents`` of one job taken on several hosts: which workers
    expired where, the workers of every host grouped together (outliers first), the
    call-prefix tree, every worker's stacks (its host named), and the errors.

    Args:
        incidents: the incidents to merge (at least one).
        job: the job's name, for the heading.
    """
    ordered = sorted(incidents, key=lambda i: (i.created, i.host, i.id))
    captures = merge_captures(ordered)
    groups = group(captures)
    hosts = sorted({i.host for i in ordered})
    first, last = ordered[0].created, ordered[-1].created
    span = _utc(first) + (f" to {_utc(last)}" if last - first >= 1 else "")
    heading = f"{len(ordered)} incident{'s' if len(ordered) != 1 else ''}"
    heading += f" of job {job}" if job is not None else ""
    lines = [
        f"{heading} on {len(hosts)} host{'s' if len(hosts) != 1 else ''} "
        f"({', '.join(hosts)}), {span}",
        "",
    ]
    for i in ordered:
        rank = (i.labels or {}).get("rank")
        who = f"rank {rank}" if rank is not None else f"pid {i.pid}"
        lines.append(
            f"{who} on {i.host} expired ({i.scope_id!r}, {_duration(i.late)} late): {i.id}"
            + (" (capture ran out of its budget)" if i.timed_out else "")
        )
    lines.append(f"{len(captures)} workers captured, grouped by stack:")
    lines += [f"  {g.summary}" for g in groups]
    lines += _tree_section(captures, groups)
    for capture in captures:
        lines += ["", *_worker_lines(capture)]
    errors = [f"  {i.host} {i.id}: {e}" for i in ordered for e in i.errors]
    if errors:
        lines += ["", "errors:", *errors]
    return _text(lines)
