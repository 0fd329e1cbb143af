"""torch's ``log_event`` callback: its event names, and a stand-in for its request type.

torch's ``FileTimerServer`` calls ``log_event(name, request)`` with a
``FileTimerRequest`` (or ``None``). ftimer does not import torch; ``TorchRequest`` has
the same attributes and ``to_json()``, with the deadline back on the wall clock.
"""

from __future__ import annotations

import json
import time
from typing import Callable, Optional

from ftimer_server.core._events import Event, Expired, Reaped
from ftimer_server.core._records import Timer

__all__ = ["LogEvent", "TorchRequest", "torch_log_event"]


class TorchRequest:
    """What torch's ``FileTimerRequest`` holds: pid, scope, wall-clock expiry, signal."""

    __slots__ = ("expiration_time", "scope_id", "signal", "version", "worker_id")

    def __init__(self, worker_pid: int, scope_id: str, expiration_time: float, signal: int):
        self.version = 1
        self.worker_id = worker_pid
        self.scope_id = scope_id
        self.expiration_time = expiration_time
        self.signal = signal

    @property
    def worker_pid(self) -> int:
        """The worker's pid (torch's name)."""
        return self.worker_id

    @classmethod
    def from_timer(cls, timer: Timer) -> TorchRequest:
        """The request for ``timer``, its monotonic deadline turned into wall-clock time."""
        wall = time.time() - (time.monotonic() - timer.deadline)
        return cls(timer.pid, timer.scope_id, wall, timer.signal)

    def to_json(self) -> str:
        """The JSON line torch's client writes for this request."""
        return json.dumps(
            {
                "version": self.version,
                "pid": self.worker_pid,
                "scope_id": self.scope_id,
                "expiration_time": self.expiration_time,
                "signal": self.signal,
            }
        )

    def __repr__(self) -> str:
        return f"TorchRequest({self.to_json()})"


LogEvent = Callable[[str, Optional[TorchRequest]], None]


def torch_log_event(log_event: LogEvent, event: Event) -> None:
    """Give ``event`` to torch's callback under torch's name, if torch reports it."""
    if type(event) is Expired:
        assert isinstance(event, Expired)
        log_event("timer expired", TorchRequest.from_timer(event.timer))
    elif type(event) is Reaped:
        assert isinstance(event, Reaped)
        if event.delivered:
            expired_at = time.time() - event.late
            request = TorchRequest(event.pid, event.scope_id, expired_at, event.signal)
            log_event("kill worker process", request)
