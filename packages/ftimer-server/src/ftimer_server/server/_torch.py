"""torch's ``log_event`` callback and its event names, with torch's request type.

torch's ``FileTimerServer`` calls ``log_event(name, request)`` with a
``FileTimerRequest`` (or ``None``); ftimer gives ``ftimer_protocol.FileTimerRequest``,
which has the same attributes and ``to_json()``, with the deadline back on the wall
clock.
"""

from __future__ import annotations

import time
from typing import Callable, Optional

from ftimer_protocol import FileTimerRequest
from ftimer_server.core._events import Event, Expired, Reaped
from ftimer_server.core._records import Timer

__all__ = ["LogEvent", "request_of_timer", "torch_log_event"]


def request_of_timer(timer: Timer) -> FileTimerRequest:
    """torch's request for ``timer``: its monotonic deadline back on the wall clock."""
    wall = time.time() - (time.monotonic() - timer.deadline)
    return FileTimerRequest(timer.pid, timer.scope_id, wall, timer.signal)


LogEvent = Callable[[str, Optional[FileTimerRequest]], None]


def torch_log_event(log_event: LogEvent, event: Event) -> None:
    """Give ``event`` to torch's callback under torch's name, if torch reports it."""
    if type(event) is Expired:
        assert isinstance(event, Expired)
        log_event("timer expired", request_of_timer(event.timer))
    elif type(event) is Reaped:
        assert isinstance(event, Reaped)
        if event.delivered:
            expired_at = time.time() - event.late
            request = FileTimerRequest(event.pid, event.scope_id, expired_at, event.signal)
            log_event("kill worker process", request)
