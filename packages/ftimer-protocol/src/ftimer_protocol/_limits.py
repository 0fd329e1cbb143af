"""Limits of the wire format. Every bound here is part of the schema (docs/protocol.md)."""

from __future__ import annotations

import select

__all__ = [
    "LABEL_KEY_PATTERN",
    "MAX_LABELS",
    "MAX_LABEL_VALUE",
    "MAX_PID",
    "MAX_SCOPE",
    "MAX_SIGNAL",
    "MAX_TIME",
    "MAX_FD",
    "MAX_TOKEN",
    "PIPE_BUF",
]

#: Largest write the OS makes atomic on a pipe: 4096 on Linux, 512 on macOS (POSIX minimum).
PIPE_BUF: int = getattr(select, "PIPE_BUF", 512)

#: pid_t is a signed 32-bit integer; Linux's pid_max is at most 2**22.
MAX_PID = 2**31 - 1
#: Highest signal number on any supported platform (Linux SIGRTMAX).
MAX_SIGNAL = 64
#: Scope length in characters. Generous enough for torch's "path#line" scopes; the framed
#: byte count checked by encode() is the final word.
MAX_SCOPE = 4096
#: Any time field (seconds) must be finite and within +-MAX_TIME (about 31 million years).
MAX_TIME = 1e15
#: Labels one message may carry.
MAX_LABELS = 16
#: A label's value length in characters.
MAX_LABEL_VALUE = 128
#: Label names follow Prometheus' rule, so servers can export them as metric labels.
#: ``\Z``, not ``$``: the schema searches with Python's ``re``, whose ``$`` also matches
#: before a final newline ("job\n" would pass).
LABEL_KEY_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]{0,31}\Z"
#: A ``Sync`` token's length in characters.
MAX_TOKEN = 128
#: A file descriptor number (an ``int`` in C).
MAX_FD = 2**31 - 1
