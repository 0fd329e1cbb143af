"""``ftimer-server incidents``: list, show and merge the incidents the daemon wrote.

- ``incidents`` (or ``incidents list``): one line per incident in the daemon's incident
  directory, oldest first: its time, id, pid, labels, and the first group of its summary
  (the outlier when the stacks differ).
- ``incidents show [ID]``: the incident as text (the newest without an ID; an ID may be
  cut short when its start is unique), or its record with ``--json``.
- ``incidents merge PATH...``: the incidents of one job taken on several hosts (their
  directories or files, on a shared file system or collected) as one report, the
  workers of every host grouped by stack; an incident found at several paths (a
  directory and a copy of it) counts once.

Nothing here writes: a person may run these commands as any user who can read the
directory. Exit codes: 0 done; 1 nothing to show (no such directory or incident, an
unreadable record); 2 bad options (including incidents of several jobs to merge without
``--job``).
"""

from __future__ import annotations

import json
import logging
import os
import stat
import sys
import time
from collections.abc import Sequence
from typing import Dict, List, Optional, TextIO, Tuple

from ftimer_server._files import file_kind
from ftimer_server.core._incident import Incident
from ftimer_server.core._report import printable, render, render_merged
from ftimer_server.incidents._store import (
    IncidentError,
    IncidentStore,
    IncidentSummary,
    load_incidents,
    read_record,
)

__all__ = [
    "DEFAULT_WINDOW",
    "format_incident_list",
    "list_incidents",
    "merge_incidents",
    "select_job",
    "show_incident",
]

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
#: Seconds before the newest incident of a job within which ``merge`` takes the job's
#: incidents: the ranks of one hang expire together, an older incident is another hang.
DEFAULT_WINDOW = 600.0

_log = logging.getLogger("ftimer_server.incidents")


def _error(message: str, err: TextIO) -> None:
    # Messages quote file names and what a record holds: made printable, as every text.
    err.write(f"ftimer-server: error: {printable(message)}\n")


class _Warnings(logging.Handler):
    """Skipped records, said on stderr in the command's voice."""

    def __init__(self, err: TextIO) -> None:
        super().__init__(logging.WARNING)
        self.err = err
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.count += 1
        self.err.write(f"ftimer-server: warning: {printable(record.getMessage())}\n")


def _warnings_to(err: TextIO) -> _Warnings:
    handler = _Warnings(err)
    _log.addHandler(handler)
    _log.propagate = False
    return handler


def _done(handler: _Warnings) -> None:
    _log.removeHandler(handler)
    _log.propagate = True


def _none_read(where: str, skipped: int) -> str:
    return f"none of the incident records in {where} could be read ({skipped} skipped, above)"


def _missing(directory: str, err: TextIO) -> bool:
    """Whether ``directory`` is not a directory this user can reach, said on ``err``:
    missing, something else, or kept from this user (a parent it may not search)."""
    try:
        st = os.stat(directory)
    except FileNotFoundError:
        _error(
            f"no incident directory {directory}: the daemon makes it at its first incident "
            "(is this the daemon's config, -c FILE, or its --incident-dir? give --dir)",
            err,
        )
        return True
    except OSError as e:  # EACCES: run as the daemon's user, or one its directories let in
        _error(f"cannot reach the incident directory {directory}: {e.strerror or e}", err)
        return True
    if not stat.S_ISDIR(st.st_mode):
        _error(f"the incident directory {directory} is {file_kind(st.st_mode)}", err)
        return True
    return False


def list_incidents(
    directory: str, out: Optional[TextIO] = None, err: Optional[TextIO] = None
) -> int:
    """Print one line per incident of ``directory``, oldest first; return the exit code."""
    out, err = out or sys.stdout, err or sys.stderr
    summaries = _summaries(IncidentStore(directory, create=False), directory, err)
    if summaries is None:
        return EXIT_FAILURE
    if not summaries:
        out.write(printable(f"no incidents in {directory}") + "\n")
        return EXIT_OK
    out.write(format_incident_list(summaries))
    return EXIT_OK


def _summaries(
    store: IncidentStore, directory: str, err: TextIO
) -> Optional[List[IncidentSummary]]:
    """The store's incidents, oldest first, its warnings written to ``err``; None, said
    on ``err``, when the directory is missing or cannot be listed, or it holds records
    and none could be read (another user's, say): not "no incidents"."""
    if _missing(directory, err):
        return None
    handler = _warnings_to(err)
    try:
        found = store.list()
    except OSError as e:
        _error(f"cannot list {directory}: {e.strerror or e}", err)
        return None
    finally:
        _done(handler)
    if not found and handler.count:
        _error(_none_read(directory, handler.count), err)
        return None
    return found


#: Characters of an incident's labels its line shows (``show`` shows them all).
_LABELS_SHOWN = 60


def format_incident_list(summaries: Sequence[IncidentSummary]) -> str:
    """A table: time (UTC), id, pid, labels, and the first line of what was found; the
    cells made `printable` (labels and summaries quote what the worker sent)."""
    rows: List[Tuple[str, ...]] = [("TIME (UTC)", "ID", "PID", "LABELS", "SUMMARY")]
    for s in summaries:
        labels = " ".join(f"{k}={v}" for k, v in sorted((s.labels or {}).items()))
        cells = (
            time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(s.created)),
            s.id,
            str(s.pid),
            labels or "-",
            _headline(s),
        )
        row = list(map(printable, cells))
        # The worker's labels, escaped: up to kilobytes, padding every line to their width.
        if len(row[3]) > _LABELS_SHOWN:
            row[3] = row[3][: _LABELS_SHOWN - 3] + "..."
        rows.append(tuple(row))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    lines = ["  ".join([*(c.ljust(w) for c, w in zip(r, widths)), r[-1]]).rstrip() for r in rows]
    return "\n".join(lines) + "\n"


def _headline(s: IncidentSummary) -> str:
    """The first group of the summary (indented there), else its first line."""
    group = next((line.strip() for line in s.summary if line.startswith("  ")), None)
    headline = group or (s.summary[0] if s.summary else f"timer {s.scope_id!r} expired")
    return headline + (" [capture ran out of its budget]" if s.timed_out else "")


def _say_earlier(summaries: Sequence[IncidentSummary], directory: str, err: TextIO) -> None:
    """Say on ``err`` that the newest of ``summaries`` (oldest first) is not the first
    of its job's hang: its ranks are reaped one after another, the one that hung first,
    and the newest incident is a rank that waited on it."""
    newest = summaries[-1]
    if newest.job is None:
        return
    since = newest.created - DEFAULT_WINDOW
    earlier = [s for s in summaries[:-1] if s.job == newest.job and s.created >= since]
    if not earlier:
        return
    first = earlier[0]
    err.write(
        "ftimer-server: "
        + printable(
            f"the newest of {len(earlier) + 1} incidents of job {newest.job} within "
            f"{DEFAULT_WINDOW:g} s; the first, {first.id} (pid {first.pid}): "
            f"{_headline(first)}. All of them: ftimer-server incidents merge --job "
            f"{newest.job} {directory}"
        )
        + "\n"
    )


def show_incident(
    directory: str,
    ident: Optional[str],
    as_json: bool = False,
    out: Optional[TextIO] = None,
    err: Optional[TextIO] = None,
) -> int:
    """Print the incident ``ident`` (the newest if None) as text, or its record with
    ``as_json``; return the exit code."""
    out, err = out or sys.stdout, err or sys.stderr
    store = IncidentStore(directory, create=False)
    if ident is None:
        summaries = _summaries(store, directory, err)
        if summaries is None:
            return EXIT_FAILURE
        if not summaries:
            _error(f"no incidents in {directory}", err)
            return EXIT_FAILURE
        ident = summaries[-1].path
        _say_earlier(summaries, directory, err)
    try:
        path = store.path_of(ident)
        incident, record = read_record(path)
    except IncidentError as e:
        _error(str(e), err)
        return EXIT_FAILURE
    if as_json:
        try:
            # The same record, every character past ASCII escaped (\u009b, \u202e): what
            # a worker wrote never reaches the terminal as a control or a reordering.
            text = json.dumps(json.loads(record), ensure_ascii=True, separators=(",", ":"))
        except (ValueError, RecursionError) as e:  # nested deeper than json reads
            _error(f"cannot read {path}: {e}", err)
            return EXIT_FAILURE
        out.write(text + "\n")
    else:
        out.write(render(incident))
    return EXIT_OK


#: Jobs an error message names at most: a shared directory holds incidents of hundreds.
_JOBS_NAMED = 10


def _newest_jobs(incidents: Sequence[Incident], counts: bool) -> str:
    """The jobs of ``incidents`` ("" for those without a job label), the one with the
    newest incident first, each with its count of incidents if ``counts``: the first
    `_JOBS_NAMED`, then how many more, so that the message stays one readable line."""
    newest: Dict[str, float] = {}
    count: Dict[str, int] = {}
    for i in incidents:
        j = i.job or ""
        newest[j] = max(newest.get(j, i.created), i.created)
        count[j] = count.get(j, 0) + 1
    jobs = sorted(newest, key=lambda j: (-newest[j], j))
    named = [
        (j or "(no job label)") + (f": {count[j]}" if counts else "") for j in jobs[:_JOBS_NAMED]
    ]
    if len(jobs) > _JOBS_NAMED:
        named.append(f"and {len(jobs) - _JOBS_NAMED} more")
    return ", ".join(named)


def select_job(incidents: Sequence[Incident], job: Optional[str], window: float) -> List[Incident]:
    """The incidents of ``job`` (all of them if None) created within ``window`` seconds
    before the newest of them (0: all), oldest first.

    Raises:
        ValueError: ``job`` is None and the incidents are of several jobs; the message
            names them (the newest first, `_JOBS_NAMED` of them at most) with their
            counts of incidents.
    """
    if job is None:
        jobs = {i.job or "" for i in incidents}
        if len(jobs) > 1:
            raise ValueError(
                f"these are incidents of {len(jobs)} jobs ({_newest_jobs(incidents, True)}): "
                "choose one with --job"
            )
        chosen = list(incidents)
    else:
        chosen = [i for i in incidents if i.job == job]
    if chosen and window > 0:
        newest = max(i.created for i in chosen)
        chosen = [i for i in chosen if i.created >= newest - window]
    return sorted(chosen, key=lambda i: (i.created, i.host, i.id))


def _distinct(incidents: Sequence[Incident]) -> List[Incident]:
    """``incidents`` with each one found at several paths (a directory and a copy of it:
    the same record) once, in their order. Records of one host and id that differ are
    all kept: containers that share their node's host name repeat small pids."""
    seen: Dict[Tuple[str, str], List[Incident]] = {}
    distinct = []
    for i in incidents:
        same = seen.setdefault((i.host, i.id), [])  # an id is unique on its host only
        if i not in same:  # records compare by value
            same.append(i)
            distinct.append(i)
    return distinct


def merge_incidents(
    paths: Sequence[str],
    job: Optional[str] = None,
    window: float = DEFAULT_WINDOW,
    out: Optional[TextIO] = None,
    err: Optional[TextIO] = None,
) -> int:
    """Print one report over the incidents of one job at ``paths`` (directories or
    record files); return the exit code."""
    out, err = out or sys.stdout, err or sys.stderr
    handler = _warnings_to(err)
    try:
        found = load_incidents(paths)
    except IncidentError as e:
        _error(str(e), err)
        return EXIT_FAILURE
    finally:
        _done(handler)
    if not found:
        where = ", ".join(paths)
        _error(
            _none_read(where, handler.count)
            if handler.count
            else f"no incident records in {where}",
            err,
        )
        return EXIT_FAILURE
    # Collected copies overlap (a directory and a copy of it, one path given twice): a
    # copy is the same record (written once), not another rank, so it goes unsaid.
    found = _distinct(found)
    try:
        chosen = select_job(found, job, window)
    except ValueError as e:
        _error(str(e), err)
        return EXIT_USAGE
    if not chosen:
        labelled = [i for i in found if i.job is not None]
        _error(
            f"no incident of job {job!r} in {', '.join(paths)}"
            + (
                f" (their jobs: {_newest_jobs(labelled, False)})"
                if labelled
                else " (none has a job label)"
            ),
            err,
        )
        return EXIT_FAILURE
    left_out = sum(1 for i in found if (job is None or i.job == job)) - len(chosen)
    if left_out:
        err.write(
            f"ftimer-server: note: {left_out} older incident{'s' if left_out != 1 else ''} "
            f"of the job left out (more than {window:g} s before the newest; --window 0 "
            "takes them all)\n"
        )
    out.write(render_merged(chosen, job if job is not None else chosen[0].job))
    return EXIT_OK
