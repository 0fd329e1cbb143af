"""The daemon's JSON log lines stay bounded, however many timers a worker holds: a line
is counted by flood control, not by its bytes, and journald splits one past 48 KiB."""

from __future__ import annotations

import json
import logging
import pathlib

from ftimer_protocol import PIPE_BUF, Arm, encode
from ftimer_server import Reaped, Timer, WorkerGone
from ftimer_server.daemon._daemon_log import describe, event_fields
from ftimer_server.daemon._logging import LoggingSetup, RepeatFilter

#: Timers one process may hold by default (Policy.max_timers_per_pid).
PER_PID = 10_000
#: journald's default LineMax=: a longer line is split into entries that are not JSON.
#: (Flood control counts lines, not bytes.)
LINE_BOUND = 48 * 1024


def _worker_timers(n: int) -> tuple[Timer, ...]:
    # The largest scope an arm a worker sends over the FIFO may carry (PIPE_BUF framed).
    timers = tuple(Timer(4242, f"{i:06d}".ljust(3990, "s"), 1.0, 9, 1234) for i in range(n))
    arm = Arm(pid=4242, scope_id=timers[0].scope_id, deadline=1.0, signal=9, start_time=1234)
    assert len(encode(arm)) <= PIPE_BUF  # a message a worker can really send
    return timers


def test_a_json_log_line_of_a_worker_with_many_timers_is_bounded(tmp_path: pathlib.Path) -> None:
    # A worker arms the timers the default policy allows (10,000, each with a ~4 KiB
    # scope, one FIFO message each), then exits (or, report-only, expires and re-arms):
    # its worker_gone / reaped JSON line carries every timer whole, ~40 MB per line
    # (json.dumps holds the GIL ~0.3 s for it), ten such lines per 10 s of flood control
    # (64 for reaps); the text line is a few hundred bytes.
    timers = _worker_timers(PER_PID)
    log_file = tmp_path / "ftimer.log"
    setup = LoggingSetup("json", "info", str(log_file), repeat_filter=RepeatFilter())
    events_log = logging.getLogger("ftimer_server.events")
    try:
        for event in (
            WorkerGone(4242, 1234, timers),
            Reaped(4242, 1234, 9, timers[0].scope_id, 0.001, True, timers),
        ):
            level, msg, args = describe(event, now=0.0)
            events_log.log(level, msg, *args, extra=event_fields(event))
        assert setup.drain()
    finally:
        setup.close()
    lines = log_file.read_bytes().splitlines()
    docs = [json.loads(line) for line in lines]
    assert {d.get("event") for d in docs} >= {"worker_gone", "reaped"}
    longest = max(map(len, lines))
    assert longest < LINE_BOUND, f"a JSON log line of {longest} bytes"
