"""The bytes a client sends: every line built here is a valid message of at most PIPE_BUF.

Sans-I/O. ``ftimer_protocol.encode()`` validates by a round trip, which is most of the
cost of a message; an ``expires`` block sends two, so this module builds lines without
one and caches each scope's. A v2 arm line differs between calls only in its deadline, so
the cache holds a format with the deadline left open; the deadline itself is checked
(finite, within the schema's bounds) before it is formatted, which keeps every line
valid without a round trip.

A scope never seen before (``scope=f"step-{i}"``) costs one JSON string encoding: its
lines are the pieces of a line encoded (and validated) once per process, signal and
labels, around the scope's JSON string. A scope can only be invalid by its type, its
length in characters, its encoding (a lone surrogate) or its size in bytes, each checked
here; the validating encoder words any refusal.
"""

from __future__ import annotations

import math
from json.encoder import encode_basestring, encode_basestring_ascii
from typing import Dict, Optional, Tuple

from ftimer_protocol import (
    MAX_FD,
    MAX_PID,
    MAX_SCOPE,
    MAX_SIGNAL,
    MAX_TIME,
    PIPE_BUF,
    Arm,
    Disarm,
    DumpHook,
    Expire,
    LocalProtocolError,
    MessageTooLarge,
    TimerRequestV1,
    encode,
)

__all__ = ["CACHE_SIZE", "DEADLINE_FORMAT", "V1Lines", "V2Lines", "check_signal", "fix_deadline"]

#: Deadlines go on the wire with microsecond resolution: fast to format, and exact enough.
DEADLINE_FORMAT = b"%.6f"
# The longest a deadline in [0, MAX_TIME] is once formatted ("1000000000000000.000000").
_DEADLINE_WIDTH = len(DEADLINE_FORMAT % MAX_TIME)
# The widest pid, start time and descriptor number of a dump hook (the schema's bounds):
# a forked child has another pid, start time and hook descriptor, and a scope that fits
# in the parent must fit in the child.
_PID_WIDTH = len(str(MAX_PID))
_START_TIME_WIDTH = len(str(2**63 - 1))  # ftimer_protocol has no name for this bound
_FD_WIDTH = len(str(MAX_FD))
# What msgspec writes for an empty scope, a part of every line with a scope: the pieces
# of a line are what is around it. The scope comes before labels in every message, so
# the first occurrence is the scope's even when a label is named scope_id.
_EMPTY_SCOPE = b'"scope_id":""'
_SCOPE_KEY = b'"scope_id":'
_DEADLINE = b'"deadline":0.0'
# Scopes whose lines are cached per client. A job uses a handful; past this many the cache
# starts over rather than grow without bound (scopes built from changing values).
CACHE_SIZE = 1024


def check_signal(signal: int) -> int:
    """Return ``signal`` as the int to send. Negative becomes 0 ("do not kill"), as torch
    documents for its client.

    Raises:
        ValueError: not an integer, or above the highest signal number.
    """
    if isinstance(signal, bool) or not isinstance(signal, int):
        raise ValueError(f"signal must be an integer, not {signal!r}")
    number = int(signal)  # a signal.Signals member becomes a plain int
    if number > MAX_SIGNAL:
        raise ValueError(f"signal {number} is above the highest signal number {MAX_SIGNAL}")
    return max(number, 0)


def fix_deadline(deadline: float) -> float:
    """Return a deadline (or a version 1 expiration time) outside [0, MAX_TIME] made
    valid: negative (already past) becomes 0, and beyond MAX_TIME (infinite included:
    torch arms ``math.inf``, a timer that never fires) becomes MAX_TIME, about 31 million
    years away, the furthest the protocol carries.

    Raises:
        ValueError: NaN, or minus infinity (neither is a time: torch's server reads the
            one as a timer that never fires and the other as a release).
    """
    if deadline > MAX_TIME:
        return MAX_TIME
    if not deadline > -math.inf:  # NaN or -inf
        raise ValueError(
            f"timer duration must be a number of seconds (math.inf: a timer that never "
            f"fires), not {deadline!r}"
        )
    return 0.0 if deadline < 0.0 else float(deadline)


class V2Lines:
    """Version 2 lines of one process (``pid``, ``start_time``) for one signal and label set.

    Args:
        pid: the process the timers belong to.
        start_time: its start time in clock ticks since boot, or None.
        signal: the checked signal of arm and expire lines.
        labels: labels of arm and expire lines, or None.
        dump: the process's stack-dump hook, announced by arm and expire lines; None: no
            announcement, ever (even after ``rebind`` with a hook).

    Raises:
        ValueError: (``LocalProtocolError``) the pid, labels or hook break the schema.
        MessageTooLarge: an arm line with no scope could exceed PIPE_BUF.
    """

    __slots__ = (
        "__weakref__",
        "_announces",
        "_arm_post",
        "_arm_pre",
        "_arm_size",
        "_cache",
        "_disarm_post",
        "_disarm_pre",
        "_dump",
        "_labels",
        "_pid",
        "_signal",
        "_start_time",
    )

    def __init__(
        self,
        pid: int,
        start_time: Optional[int],
        signal: int,
        labels: Optional[Dict[str, str]],
        dump: Optional[DumpHook] = None,
    ) -> None:
        self._signal, self._labels = signal, labels or None
        self._announces = dump is not None
        self._cache: Dict[str, Tuple[bytes, bytes]] = {}
        self.rebind(pid, start_time, dump)

    @property
    def dump(self) -> Optional[DumpHook]:
        """The stack-dump hook the arm and expire lines announce, or None."""
        return self._dump

    def rebind(self, pid: int, start_time: Optional[int], dump: Optional[DumpHook] = None) -> None:
        """Build lines for another process from now on (a forked child).

        Args:
            dump: that process's stack-dump hook (a child's has a file of its own), or
                None; announced only by lines built with a hook.

        Raises:
            ValueError: (``LocalProtocolError``) the pid, labels or hook break the schema.
            MessageTooLarge: an arm line with no scope could exceed PIPE_BUF.
        """
        self._pid, self._start_time = pid, start_time
        self._dump = dump if self._announces else None
        self._cache.clear()
        # The validating encoder checks pid, signal, labels and hook once, here.
        arm = encode(Arm(pid, "", 0.0, self._signal, start_time, self._labels, self._dump))
        head, found, tail = arm.partition(_EMPTY_SCOPE)
        # msgspec writes fields in declaration order: the deadline follows the scope.
        between, found_deadline, rest = tail.partition(_DEADLINE)
        assert found, arm
        assert found_deadline, arm
        self._arm_pre = (head + _SCOPE_KEY).replace(b"%", b"%%")
        self._arm_post = b"%b%b%b" % (
            (between + b'"deadline":').replace(b"%", b"%%"),
            DEADLINE_FORMAT,
            rest.replace(b"%", b"%%"),
        )
        # The longest arm line of an empty scope (quotes included): any deadline in
        # bounds, and room kept for the widest pid, start time and descriptor number
        # (see _PID_WIDTH). A disarm line is shorter than its arm line: it has a subset of
        # its members, and "disarm" is 3 bytes longer than "arm" where the arm has ~20
        # more for its deadline and signal.
        slack = _PID_WIDTH - len(str(pid))
        if start_time is not None:
            slack += _START_TIME_WIDTH - len(str(start_time))
        if self._dump is not None:
            slack += _FD_WIDTH - len(str(self._dump.fd))
        self._arm_size = len(arm) - len(b"0.0") + _DEADLINE_WIDTH + slack
        if self._arm_size > PIPE_BUF:
            raise MessageTooLarge(self._arm_size, PIPE_BUF)
        disarm = encode(Disarm(pid, "", start_time))
        head, found, tail = disarm.partition(_EMPTY_SCOPE)
        assert found, disarm
        self._disarm_pre, self._disarm_post = head + _SCOPE_KEY, tail

    def entry(self, scope_id: str) -> Tuple[bytes, bytes]:
        """Return ``(arm_format, disarm_line)`` of ``scope_id``; ``arm_format % deadline``
        is its arm line. Validated and cached on first use.

        Raises:
            ValueError: (``LocalProtocolError``) the scope is not a string, is longer
                than MAX_SCOPE characters, or cannot be encoded (a lone surrogate).
            MessageTooLarge: an arm line of this scope could exceed PIPE_BUF.
        """
        cached = self._cache.get(scope_id)
        if cached is not None:
            return cached
        scope_id = _plain(scope_id)
        if len(scope_id) > MAX_SCOPE:
            return self._validated(scope_id)
        try:
            quoted = encode_basestring(scope_id).encode()
        except UnicodeEncodeError:
            return self._validated(scope_id)
        size = self._arm_size - 2 + len(quoted)  # the empty scope's quotes were counted
        if size > PIPE_BUF:
            raise MessageTooLarge(size, PIPE_BUF)
        entry = (
            b"%b%b%b" % (self._arm_pre, quoted.replace(b"%", b"%%"), self._arm_post),
            b"%b%b%b" % (self._disarm_pre, quoted, self._disarm_post),
        )
        cache = self._cache
        if len(cache) >= CACHE_SIZE:
            cache.clear()
        cache[scope_id] = entry
        return entry

    def _validated(self, scope_id: str) -> Tuple[bytes, bytes]:
        """Raise why ``scope_id`` (a ``str``) cannot be sent, in terms of the scope alone:
        ``release()`` names no arm.

        Raises:
            MessageTooLarge: longer than ``MAX_SCOPE``: its arm line is over ``PIPE_BUF``
                (as the size ``entry`` counts).
            ValueError: (``LocalProtocolError``) otherwise.
        """
        if len(scope_id) > MAX_SCOPE:  # its arm is over PIPE_BUF: what torch's client raises
            quoted = encode_basestring(scope_id).encode(errors="surrogatepass")
            raise MessageTooLarge(self._arm_size - 2 + len(quoted), PIPE_BUF)
        raise _surrogate_error(scope_id) or LocalProtocolError(
            f"scope {scope_id!r:.80} cannot be sent"
        )

    def arm(self, scope_id: str, deadline: float, signal: int) -> bytes:
        """Return the arm line for a monotonic deadline in [0, MAX_TIME] and a checked
        ``signal`` (the uncached, fully validated path, for a signal other than the usual).

        Raises:
            ValueError: the scope breaks the schema.
            MessageTooLarge: the line exceeds PIPE_BUF.
        """
        return encode(
            Arm(
                self._pid,
                _plain(scope_id),
                deadline,
                signal,
                self._start_time,
                self._labels,
                self._dump,
            )
        )

    def disarm(self, scope_id: str) -> bytes:
        """Return the disarm line of ``scope_id`` (cached).

        Raises:
            ValueError: as ``entry``.
        """
        # The cache first, without a call of entry(): every expires block ends here.
        cached = self._cache.get(scope_id)
        return (self.entry(scope_id) if cached is None else cached)[1]

    def expire(self, scope_id: str, signal: int) -> bytes:
        """Return the expire-now line of ``scope_id`` with a checked ``signal``.

        Raises:
            ValueError: the scope breaks the schema.
            MessageTooLarge: the line exceeds PIPE_BUF.
        """
        return encode(
            Expire(self._pid, _plain(scope_id), signal, self._start_time, self._labels, self._dump)
        )


def _plain(scope_id: object) -> str:
    """``scope_id`` as a plain ``str`` (a subclass of ``str`` is a scope too; the encoder
    takes only ``str`` itself).

    Raises:
        ValueError: (``LocalProtocolError``) not a ``str``.
    """
    if type(scope_id) is str:
        return scope_id
    if isinstance(scope_id, str):
        return str.__str__(scope_id)
    raise LocalProtocolError(f"a scope is a str, not {type(scope_id).__name__} ({scope_id!r:.80})")


#: torch's client writes ``json.dumps()`` of its request: these members in this order,
#: its separators, ASCII escapes (``encode_basestring_ascii``, its own), floats as repr.
_V1_LINE = b'{"version": 1, "pid": %d, "scope_id": %b, "expiration_time": %b, "signal": %d}\n'


class V1Lines:
    """Version 1 (torch's format) lines of one process for one signal, byte for byte
    those of torch's client: its ``json.dumps()`` (ASCII only: any other character of a
    scope is a ``\\uXXXX`` escape; torch's server decodes its FIFO with the locale's
    encoding, and a UTF-8 byte under an ASCII locale fails its whole batch), then a
    newline. Built without the validating encoder's round trip, as version 2's: what
    can be wrong (the scope's length and encoding, the time, the signal) is checked, and
    the encoder words a refusal.

    Raises:
        ValueError: (``LocalProtocolError``) the pid breaks the schema.
    """

    __slots__ = ("__weakref__", "_pid", "_signal")

    def __init__(self, pid: int, signal: int) -> None:
        self._signal = signal
        self.rebind(pid, None)

    def rebind(self, pid: int, start_time: Optional[int], dump: Optional[DumpHook] = None) -> None:
        """Build lines for another process from now on; version 1 has no start time and
        no stack-dump hook.

        Raises:
            ValueError: (``LocalProtocolError``) the pid breaks the schema.
        """
        encode(TimerRequestV1(pid, "", -1.0, 0))  # the validating encoder checks it once
        self._pid = pid

    def arm(self, scope_id: str, expiration_time: float, signal: Optional[int] = None) -> bytes:
        """Return the line arming ``scope_id`` until ``expiration_time`` (epoch seconds).

        Raises:
            ValueError: the scope or time breaks the schema, or the time is negative
                (which version 1 reads as a release).
            MessageTooLarge: the line exceeds PIPE_BUF.
        """
        if not expiration_time >= 0.0:
            raise ValueError(f"expiration time must be >= 0, not {expiration_time!r}")
        sig = self._signal if signal is None else signal
        return self._line(_plain(scope_id), float(expiration_time), sig)

    def disarm(self, scope_id: str) -> bytes:
        """Return the release line of ``scope_id``."""
        return self.release(scope_id)

    def release(self, scope_id: str) -> bytes:
        """Return the line releasing ``scope_id`` (expiration time -1, as torch).

        Raises:
            ValueError: the scope breaks the schema.
            MessageTooLarge: the line exceeds PIPE_BUF.
        """
        return self._line(_plain(scope_id), -1, 0)

    def _line(self, scope_id: str, expiration_time: float, signal: int) -> bytes:
        """Raises ValueError (``LocalProtocolError``), ``MessageTooLarge``."""
        surrogate = None if scope_id.isascii() else _surrogate_error(scope_id)
        if surrogate is not None:  # in terms of the scope alone: release() names no time
            raise surrogate
        if (
            len(scope_id) > MAX_SCOPE
            or not -MAX_TIME <= expiration_time <= MAX_TIME
            or type(signal) is not int
            or not -(2**63) <= signal <= MAX_SIGNAL
        ):
            # Raises, in the validating encoder's words.
            encode(TimerRequestV1(self._pid, scope_id, float(expiration_time), signal))
            raise LocalProtocolError(f"invalid version 1 request for scope {scope_id!r:.80}")
        line = _V1_LINE % (
            self._pid,
            encode_basestring_ascii(scope_id).encode(),
            repr(expiration_time).encode(),  # json.dumps's float (and int) format
            signal,
        )
        if len(line) > PIPE_BUF:  # the escapes count: what is written is what must fit
            raise MessageTooLarge(len(line), PIPE_BUF)
        return line


def _surrogate_error(scope_id: str) -> Optional[LocalProtocolError]:
    """The error for ``scope_id`` if it holds a lone surrogate, which UTF-8 cannot carry
    (json.dumps would escape it, but no reader's UTF-8 could hold it); None if not."""
    try:
        scope_id.encode()
    except UnicodeEncodeError as e:
        return LocalProtocolError(
            f"scope {scope_id!r:.80} holds a lone surrogate (at {e.start}), which UTF-8 "
            "cannot carry"
        )
    return None
