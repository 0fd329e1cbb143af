"""Signal names as people write them: ``USR2``, ``SIGUSR2``, ``12``, ``SIGRTMIN+2``.

Pure: names are those of this platform's ``signal`` module (real-time signals have no
names of their own there: ``SIGRTMIN+N`` and ``SIGRTMAX-N`` name them). Shared by every
command line and configuration file that takes a signal, client's and server's.
"""

from __future__ import annotations

import signal as _signal
from typing import Optional, Union

from ._limits import MAX_SIGNAL

__all__ = ["parse_signal", "signal_name"]

_RTMIN: Optional[int] = getattr(_signal, "SIGRTMIN", None)
_RTMAX: Optional[int] = getattr(_signal, "SIGRTMAX", None)
_HINT = "a name like USR2 or SIGUSR2, SIGRTMIN+N, or a number"


def _ascii_int(text: str) -> Optional[int]:
    # str.isdigit() is true for "²", which int() refuses, and int() takes "٢" (Arabic-
    # Indic two) and "1_2": a number is ASCII digits, nothing else.
    return int(text) if text.isascii() and text.isdecimal() else None


def parse_signal(value: Union[int, str], *, allow_zero: bool = False) -> int:
    """Return the number of the signal ``value`` names.

    Args:
        value: a number (an ``int``, a ``signal.Signals`` member, or ASCII digits), or a
            name in any case, with or without ``SIG`` (``USR2``, ``sigusr2``), including
            ``SIGRTMIN+N`` and ``SIGRTMAX-N`` within the real-time range.
        allow_zero: accept 0 ("no signal": a report-only timer).

    Raises:
        ValueError: ``value`` names no signal of this platform, or is a number outside
            1..MAX_SIGNAL (0..MAX_SIGNAL with ``allow_zero``), or is neither an int nor a
            string (a ``bool`` included).
    """
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"a signal is a number or a name, not {value!r}")
    if isinstance(value, int):
        number: Optional[int] = int(value)
    else:
        number = _ascii_int(value.strip())
        if number is None:
            number = _by_name(value)
    assert number is not None
    if not (0 if allow_zero else 1) <= number <= MAX_SIGNAL:
        raise ValueError(f"{number} is not a signal number (1..{MAX_SIGNAL})")
    return number


def _by_name(text: str) -> int:
    """Raises ValueError: ``text`` names no signal."""
    name = text.strip().upper()
    name = name if name.startswith("SIG") else "SIG" + name
    for base, sign, bound in (("SIGRTMIN", "+", _RTMAX), ("SIGRTMAX", "-", _RTMIN)):
        head, found, offset = name.partition(sign)
        n = _ascii_int(offset)
        if head == base and found and n is not None and bound is not None:
            number = int(getattr(_signal, base)) + (n if sign == "+" else -n)
            # SIGRTMIN+N stays within SIGRTMAX, and SIGRTMAX-N within SIGRTMIN.
            if (number <= bound) if sign == "+" else (number >= bound):
                return number
    member = _signal.Signals.__members__.get(name)
    if member is None:
        # Cut: no signal's name is long, and the error may end in a status line.
        shown = repr(text) if len(text) <= 32 else f"{text[:32]!r}..."
        raise ValueError(f"unknown signal: {shown} ({_HINT})")
    return int(member)


def signal_name(number: int) -> str:
    """Return the name of signal ``number`` (``SIGUSR2``, ``SIGRTMIN+3``), else the number
    as text (``"0"``, or a number this platform has no name for)."""
    if _RTMIN is not None and _RTMAX is not None and _RTMIN < number < _RTMAX:
        return f"SIGRTMIN+{number - _RTMIN}"
    try:
        return _signal.Signals(number).name
    except ValueError:
        return str(number)
