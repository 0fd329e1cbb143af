"""Bytes read from the FIFO to decode results: ``StreamDecoder``'s results, faster.

Under load a read returns thousands of lines, nearly always all of one version from
well-behaved writers. Such a run of whole lines is decoded by msgspec in one call
(``decode_lines``) instead of line by line; anything unusual (a bad line, mixed versions,
an over-long line, a partial line) goes through ``StreamDecoder``, whose results are the
reference: the fast path only applies where it gives the same ones. One difference is
on purpose: in a fast run, arm lines decode straight into ``Timer`` records (an ``Arm``
subclass with the same fields), which the table keeps as they are; the slow path gives
``Arm`` messages, which the watchdog takes too.
"""

from __future__ import annotations

from typing import Any, List, Optional, Tuple, Union

import msgspec

from ftimer_protocol import (
    PIPE_BUF,
    DecodeResult,
    Disarm,
    DisarmAll,
    Expire,
    StreamDecoder,
    Sync,
    TimerRequestV1,
)

from ._records import Timer

__all__ = ["LineReader"]

# ftimer_protocol.MessageV2, with Timer in the place of Arm.
_V2 = msgspec.json.Decoder(Union[Timer, Disarm, DisarmAll, Expire, Sync])
_V1 = msgspec.json.Decoder(TimerRequestV1)
# Each version's exact line openings (see ftimer_protocol's codec): a line that starts
# otherwise may hold another version, so it takes the slow path.
_FAST: Tuple[Tuple[bytes, Any], ...] = (
    (b'{"version":2,', _V2),
    (b'{"version": 1,', _V1),  # torch's json.dumps
    (b'{"version":1,', _V1),
)


class LineReader:
    """Feed it chunks split anywhere; get every line's message or error, in order.

    Args:
        max_line: the longest line accepted, newline excluded (as ``StreamDecoder``).
    """

    def __init__(self, max_line: int = PIPE_BUF) -> None:
        self._slow = StreamDecoder(max_line)
        self._max_line = max_line
        self._block = max(1, (max_line + 1) // 2)

    def feed(self, chunk: bytes) -> List[DecodeResult]:
        """Consume ``chunk``; return the results of the lines it completes. Never raises."""
        # Offsets into ``chunk`` and memoryviews of it, rather than slices: no copy of a
        # few hundred KiB per read.
        view, slow = memoryview(chunk), self._slow.feed
        head: List[DecodeResult] = []
        start = 0
        if self._slow.buffered:  # a line is pending: finish it the slow way
            start = chunk.find(b"\n") + 1
            if not start:
                return slow(chunk)
            head = slow(view[:start])
        end = chunk.rfind(b"\n") + 1
        if end <= start:
            return head + slow(view[start:])
        body = self._fast(chunk, start, end)
        if body is None:
            body = slow(view[start:end])
        if head:
            body[:0] = head
        if end < len(chunk):
            body += slow(view[end:])
        return body

    def _fast(self, chunk: bytes, start: int, end: int) -> Optional[List[DecodeResult]]:
        """Decode the whole lines ``chunk[start:end]`` in one call if all are valid lines
        of one version; else ``None``."""
        found = next((f for f in _FAST if chunk.startswith(f[0], start)), None)
        if found is None:
            return None
        prefix, decoder = found
        if end - start > self._max_line + 1 and self._may_hold_a_long_line(chunk, start, end):
            return None
        try:
            results: List[Any] = decoder.decode_lines(memoryview(chunk)[start:end])
        except (msgspec.DecodeError, msgspec.ValidationError):
            return None
        # msgspec skips blank lines (as StreamDecoder does) and would take two messages
        # on one line. Every other line yields at least one value, so as many values as
        # lines opening with the prefix (a newline cannot occur inside a message, so a
        # line starts right after one) means: one message per line, all of this version.
        if chunk.count(b"\n" + prefix, start, end) != len(results) - 1:
            return None
        return results

    def _may_hold_a_long_line(self, chunk: bytes, start: int, end: int) -> bool:
        """False if no line of ``chunk[start:end]`` is longer than ``max_line`` (newline
        excluded).

        A line that long is a run of ``max_line + 1`` bytes without a newline, and such a
        run covers at least one whole aligned block of ``(max_line + 1) // 2`` bytes. So
        if every such block holds a newline, no line is too long: a hundred ``find``
        calls per 256 KiB, instead of splitting it into thousands of lines.
        """
        block, find = self._block, chunk.find
        for at in range(start, end - block + 1, block):
            if find(b"\n", at, at + block) < 0:
                lines = chunk[start:end].split(b"\n")
                return max(map(len, lines)) > self._max_line
        return False
