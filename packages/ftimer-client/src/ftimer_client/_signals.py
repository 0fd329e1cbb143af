"""Signal names as people write them: ``USR2``, ``SIGUSR2``, ``12``, ``SIGRTMIN+3``.

Sans-I/O. Shared by the ``ftimer`` command and the stack-dump hook's setting.
"""

from __future__ import annotations

import signal
from typing import Optional

__all__ = ["parse_signal", "signal_name"]

# Real-time signals have no names of their own: SIGRTMIN+N and SIGRTMAX-N name them.
_RTMIN: Optional[int] = getattr(signal, "SIGRTMIN", None)
_RTMAX: Optional[int] = getattr(signal, "SIGRTMAX", None)


def _ascii_int(text: str) -> Optional[int]:
    # str.isdigit() is true for "²", which int() refuses, and int() takes "٢" (Arabic-
    # Indic two): a number is ASCII digits, nothing else.
    return int(text) if text.isascii() and text.isdecimal() else None


def parse_signal(text: str) -> int:
    """Return the number of the signal ``text`` names: a number in ASCII digits, or a name
    in any case with or without ``SIG`` (``USR2``, ``sigusr2``), including ``SIGRTMIN+N``
    and ``SIGRTMAX-N``. The number is not range-checked.

    Raises:
        ValueError: ``text`` names no signal of this platform.
    """
    stripped = text.strip()
    number = _ascii_int(stripped)
    if number is not None:
        return number
    name = stripped.upper()
    name = name if name.startswith("SIG") else "SIG" + name
    for base, sign, bound in (("SIGRTMIN", "+", _RTMAX), ("SIGRTMAX", "-", _RTMIN)):
        head, found, offset = name.partition(sign)
        n = _ascii_int(offset)
        if head == base and found and n is not None and bound is not None:
            number = int(getattr(signal, base)) + (n if sign == "+" else -n)
            # SIGRTMIN+N stays within SIGRTMAX, and SIGRTMAX-N within SIGRTMIN.
            if (number <= bound) if sign == "+" else (number >= bound):
                return number
    member = signal.Signals.__members__.get(name)
    if member is None:
        raise ValueError(f"unknown signal: {text!r} (a name like USR2 or SIGUSR2, or a number)")
    return int(member)


def signal_name(number: int) -> str:
    """Return the name of signal ``number`` (``SIGUSR2``, ``SIGRTMIN+3``), else the number."""
    if _RTMIN is not None and _RTMAX is not None and _RTMIN < number < _RTMAX:
        return f"SIGRTMIN+{number - _RTMIN}"
    try:
        return signal.Signals(number).name
    except ValueError:
        return str(number)
