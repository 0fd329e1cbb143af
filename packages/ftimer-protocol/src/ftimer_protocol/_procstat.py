"""The fields of ``/proc/PID/stat`` and ``/proc/PID/status`` files that clients and
servers use, from their bytes.

Sans-I/O: the caller reads the file (``/proc/PID/stat``, ``/proc/PID/task/TID/status``,
...) and passes its contents. A process's start time is what tells it from a later process
that reuses its pid, so the ``start_time`` a client sends and the one a server checks must
be parsed the same way: here.
"""

from __future__ import annotations

from typing import Dict, NamedTuple, Optional

__all__ = [
    "ProcStat",
    "parse_proc_stat",
    "parse_proc_status",
    "parse_start_time",
    "proc_status_field",
]

# The fields after the command name, counted from field 3 (state): field N is at N - 3.
_STATE, _PPID, _NUM_THREADS, _START_TIME, _RSS = 0, 1, 17, 19, 21


class ProcStat(NamedTuple):
    """What ``parse_proc_stat`` reads from a ``/proc/PID/stat`` file (proc(5) numbering)."""

    #: Field 3: ``R`` running, ``S`` sleeping, ``D`` uninterruptible, ``Z`` zombie, ...
    state: str
    #: Field 4: the parent's pid (0 for a process whose parent is outside its namespace).
    ppid: int
    #: Field 20.
    num_threads: int
    #: Field 22: clock ticks after boot when the process started.
    start_time: int
    #: Field 24: resident set size, in pages.
    rss_pages: int


def parse_proc_stat(data: bytes) -> ProcStat:
    """Return the state, parent, threads, start time and RSS of a ``/proc/PID/stat`` file.

    The command name (field 2) is in parentheses and may itself hold spaces and
    parentheses, so fields are counted from its last ``)``.

    Args:
        data: the file's contents.

    Raises:
        ValueError: ``data`` does not have the shape of such a file (no ``)``, too few
            fields, a number that is not one).
    """
    _, paren, rest = data.rpartition(b")")
    fields = rest.split()
    if not paren or len(fields) <= _RSS:
        raise ValueError(f"not the contents of a /proc/PID/stat file: {data[:64]!r}")
    state = fields[_STATE]
    numbers = [fields[i] for i in (_PPID, _NUM_THREADS, _START_TIME, _RSS)]
    # bytes.isdigit() and isalpha() are ASCII only.
    if len(state) != 1 or not state.isalpha() or not all(n.isdigit() for n in numbers):
        raise ValueError(f"not the contents of a /proc/PID/stat file: {data[:64]!r}")
    return ProcStat(
        state.decode("ascii"),
        int(numbers[0]),
        int(numbers[1]),
        int(numbers[2]),
        int(numbers[3]),
    )


def parse_start_time(data: bytes) -> Optional[int]:
    """Return field 22 (starttime) of the contents of a ``/proc/PID/stat`` file, or None
    when they do not have that shape (a reader that must never fail: a client).

    Args:
        data: the file's contents.
    """
    _, paren, rest = data.rpartition(b")")
    fields = rest.split()
    if not paren or len(fields) <= _START_TIME or not fields[_START_TIME].isdigit():
        return None
    return int(fields[_START_TIME])


def parse_proc_status(data: bytes) -> Dict[str, str]:
    """Return the fields of a ``/proc/PID/status`` file: ``"Tgid"`` -> ``"4242"``,
    ``"Uid"`` -> ``"0\t0\t0\t0"``, ... (values stripped; bytes that are not UTF-8, as a
    command name may hold, replaced). Lines without a ``:`` are left out.

    Args:
        data: the file's contents.
    """
    fields: Dict[str, str] = {}
    # Lines end at "\n" alone: a command name holds any other byte raw (a "\r", "\x1c"
    # or "\x85" that str.splitlines() would break at, ending the name early and adding
    # a field of the process's choosing).
    for line in data.decode(errors="replace").split("\n"):
        key, colon, value = line.partition(":")
        if colon:
            fields[key] = value.strip()
    return fields


def proc_status_field(data: bytes, name: str) -> Optional[str]:
    """Return the first word of field ``name``'s value (``"Tgid"``; ``"Uid"``: the real
    uid) in the contents of a ``/proc/PID/status`` file, or None when it has no such field.

    As `parse_proc_status` reads it, for one field without reading the others (a server
    asks it of each process it binds).

    Args:
        data: the file's contents.
        name: the field's name, without its ``:``.
    """
    key = name.encode("ascii") + b":"
    if data.startswith(key):
        start = len(key)
    else:
        start = data.find(b"\n" + key)
        if start < 0:
            return None
        start += 1 + len(key)
    end = data.find(b"\n", start)
    values = data[start : None if end < 0 else end].split()
    return values[0].decode(errors="replace") if values else None
