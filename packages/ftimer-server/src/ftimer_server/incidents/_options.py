"""What the server captures before a reap, and where the incidents go: the options alone.

Apart from ``_diagnostics`` (which runs the captures) so that a server that captures
nothing imports none of the capture machinery: keeps the daemon's RSS down.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

__all__ = ["CAPTURE_METHODS", "NOT_WRITTEN", "IncidentOptions"]

#: How to capture stacks: the best available, one method only, or the /proc facts alone.
CAPTURE_METHODS = ("auto", "py-spy", "hook", "facts")
#: How the error begins that an incident which could not be written to its directory
#: carries when it is handed on (``on_incident``): the daemon then says it was not kept.
NOT_WRITTEN = "not written: "


@dataclasses.dataclass(frozen=True)
class IncidentOptions:
    """What the server captures before a reap, and where the incidents go.

    Attributes:
        directory: where incidents are written (mode 0700); ``None``: not written, only
            given to ``on_incident``.
        keep: how many incidents the directory keeps in all; beyond it, the oldest of
            the user holding the most go first.
        max_bytes: how many bytes the directory's incidents may take in all, likewise.
        method: "auto" (py-spy if found, else the worker's hook, else /proc facts),
            "py-spy", "hook", or "facts" (the /proc facts alone).
        timeout: the budget of an incident in seconds: the signal follows the capture
            or this, whichever comes first.
        native: py-spy's ``--native`` (C/C++ frames; about four times slower).
        core: take a core dump with ``gcore`` before the kill, of a worker whose RSS is
            at most ``core_max_bytes``.
        core_max_bytes: the largest core, in bytes: a worker with a larger RSS gets
            none, and a core that grows to it is removed.
        reap_tree: signal the worker's descendants too (DataLoader and compile workers
            that would keep GPU memory).
        job_label: the label whose value names a worker's job (its peers share it);
            ``None``: no peers.
        py_spy: the py-spy executable; ``None``: found on PATH or beside the server's
            interpreter.

    Raises:
        ValueError: a value out of range.
    """

    directory: Optional[str] = None
    keep: int = 200
    max_bytes: int = 256 * 1024 * 1024
    method: str = "auto"
    timeout: float = 3.0
    native: bool = False
    core: bool = False
    core_max_bytes: int = 4 * 1024**3
    reap_tree: bool = False
    job_label: Optional[str] = "job"
    py_spy: Optional[str] = None

    def __post_init__(self) -> None:
        if self.method not in CAPTURE_METHODS:
            raise ValueError(f"method must be one of {CAPTURE_METHODS}, not {self.method!r}")
        if not 0 < self.timeout <= 3600:
            raise ValueError("timeout must be > 0 and at most 3600 seconds")
        if self.keep < 1 or self.max_bytes < 1 or self.core_max_bytes < 1:
            raise ValueError("keep, max_bytes and core_max_bytes must be at least 1")
