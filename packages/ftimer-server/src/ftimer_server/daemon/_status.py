"""The daemon's status document, as ``ftimer-server status`` and the control socket's
``health`` read it."""

from __future__ import annotations

import heapq
import operator
import os
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import msgspec

from ftimer_server._version import __version__
from ftimer_server.core._records import Timer
from ftimer_server.core._stats import Stats
from ftimer_server.server._server import FileTimerServer

from ._config import DaemonConfig

__all__ = ["STATUS_TIMERS", "status_document"]

#: Seconds the status request waits for the server loop to answer a sync.
_HEALTH_TIMEOUT = 2.0
#: Seconds the status waits for the loop to let go of the table, each time it reads it.
_TABLE_WAIT = 0.5
#: The armed timers a status lists at most, the soonest deadlines first: all of them
#: (hundreds of thousands, as the limits allow) would take seconds and hundreds of MB
#: to build and send, and a liveness probe's timeout and memory limit with them.
STATUS_TIMERS = 1000


def status_document(
    server: FileTimerServer,
    c: DaemonConfig,
    lost: List[str],
    started: float,
    timers: bool,
    *,
    state_failing: Optional[str] = None,
    reload_failed: Optional[str] = None,
    restart_needed: Sequence[str] = (),
) -> Dict[str, Any]:
    """The daemon's status document: its health, its paths and settings, the server's
    counters and, with ``timers``, the soonest timers (``status``; not ``health``).

    Args:
        lost: the server's paths found no longer to name its FIFO or socket.
        started: when the daemon started (``time.monotonic()``).
        state_failing: why the last save of the state file failed, or None. Not a
            matter of health: a restart would not mend it, and a liveness probe would.
        reload_failed: what the last reload (SIGHUP) failed to do, and why, or None.
        restart_needed: the settings the config file changes that wait for a restart.
    """
    caught_up, healthy = _reading(server)
    try:
        # Wait no longer for a loop stalled holding the table (a reap step, a
        # blocked log): the status says so instead of timing out.
        stats: Optional[Stats] = server.stats(timeout=_TABLE_WAIT)
        table = server.armed(timeout=_TABLE_WAIT) if timers else None
    except TimeoutError:
        stats = table = None
    armed = None  # null: unknown, the loop held the table
    if stats is not None:
        armed = stats.armed if table is None else len(table)
    now = time.monotonic()
    doc: Dict[str, Any] = {
        "version": __version__,
        "pid": os.getpid(),
        "healthy": healthy and not lost,
        "lost_paths": lost,
        "caught_up": caught_up,
        "fifo": c.fifo,
        "socket": c.socket,
        "control_socket": c.control_socket,
        "state_file": c.state_file,
        "state_failing": state_failing,
        "incidents_failing": server.incidents_failing,
        "reload_failed": reload_failed,
        "restart_needed": list(restart_needed),
        "dry_run": c.dry_run,
        "signal": c.signal,
        "grace": c.grace,
        "uptime": now - started,
        "monotonic": now,
        "last_progress": server.get_last_progress_time(),
        "armed": armed,
        "stats": msgspec.to_builtins(stats, str_keys=True),
    }
    if timers:  # null: unknown, as the count
        doc["timers"] = None if table is None else _soonest(table, now)
    return doc


def _soonest(table: List[Timer], now: float) -> List[Dict[str, Any]]:
    """The first ``STATUS_TIMERS`` timers of ``table`` to expire, soonest first, as the
    status document lists them at monotonic time ``now``."""
    return [
        {
            "pid": t.pid,
            "scope_id": t.scope_id,
            "signal": t.signal,
            "deadline": t.deadline,
            "remaining": t.deadline - now,
            "start_time": t.start_time,
            "labels": t.labels,
        }
        for t in heapq.nsmallest(STATUS_TIMERS, table, key=operator.attrgetter("deadline"))
    ]


def _reading(server: FileTimerServer) -> Tuple[bool, bool]:
    """Whether the server's loop has caught up with its FIFO (a ``Sync`` marker written to
    it is applied within ``_HEALTH_TIMEOUT``), and whether it reads it (caught up, or it
    read lines meanwhile; with no descriptor left to write the marker with, its loop is
    not stuck in one iteration)."""
    before = _fifo_lines(server)
    try:
        server.sync(timeout=_HEALTH_TIMEOUT)
    except TimeoutError:
        # Behind a flood (anyone who may write the FIFO can make one) the marker waits
        # its turn: a loop reading lines meanwhile is busy, not wedged.
        if before is None:  # the loop held its table then too
            return False, False
        after = _fifo_lines(server)
        return False, after is not None and after > before
    except OSError:
        # EMFILE: no descriptor to write the marker with. Judged by the loop's iteration
        # instead: one that has run this long is stuck; an idle or busy loop reads (out of
        # descriptors, it went on reaping; only a liveness probe's restart would stop it).
        return False, server.stalled_for() < _HEALTH_TIMEOUT
    except RuntimeError:  # stopped meanwhile
        return False, False
    return True, True


def _fifo_lines(server: FileTimerServer) -> Optional[int]:
    """The lines the server has read from its FIFO so far; None if its loop holds the
    table longer than ``_TABLE_WAIT``."""
    try:
        return server.stats(timeout=_TABLE_WAIT).received.get("fifo", 0)
    except TimeoutError:
        return None
