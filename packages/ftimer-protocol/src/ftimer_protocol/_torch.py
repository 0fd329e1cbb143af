"""torch's ``FileTimerRequest``, for code written against
``torch.distributed.elastic.timer``: the same constructor, attributes, equality and
``to_json()`` (byte for byte), without importing torch.

A request is version 1 of the wire protocol (``TimerRequestV1``): ``expiration_time``
is on the wall clock, and a negative one releases the scope.
"""

from __future__ import annotations

import json

from ._messages import TimerRequestV1

__all__ = ["FileTimerRequest"]


class FileTimerRequest:
    """A timer acquisition (``expiration_time`` >= 0, wall-clock seconds) or release
    (negative) for process ``worker_pid``, as torch's ``FileTimerRequest``.

    Args:
        worker_pid: the worker process.
        scope_id: the timer's name within the process.
        expiration_time: ``time.time()`` at which it expires; negative: a release.
        signal: what the server sends on expiry; 0: report only.
    """

    __slots__ = ("expiration_time", "scope_id", "signal", "version", "worker_id")

    def __init__(
        self, worker_pid: int, scope_id: str, expiration_time: float, signal: int = 0
    ) -> None:
        self.version = 1
        self.worker_id = worker_pid
        self.scope_id = scope_id
        self.expiration_time = expiration_time
        self.signal = signal

    @property
    def worker_pid(self) -> int:
        """The worker's pid (torch's ``TimerRequest`` calls it ``worker_id``)."""
        return self.worker_id

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, FileTimerRequest):
            return False
        return (
            self.worker_id == other.worker_id
            and self.scope_id == other.scope_id
            and self.expiration_time == other.expiration_time
            and self.version == other.version
            and self.signal == other.signal
        )

    __hash__ = None  # type: ignore[assignment]  # mutable, like torch's

    def to_json(self) -> str:
        """The line torch's client writes for this request (without its newline)."""
        return json.dumps(
            {
                "version": self.version,
                "pid": self.worker_pid,
                "scope_id": self.scope_id,
                "expiration_time": self.expiration_time,
                "signal": self.signal,
            }
        )

    def to_message(self) -> TimerRequestV1:
        """The same request as a protocol message."""
        return TimerRequestV1(self.worker_id, self.scope_id, self.expiration_time, self.signal)

    def __repr__(self) -> str:
        return f"FileTimerRequest({self.to_json()})"
