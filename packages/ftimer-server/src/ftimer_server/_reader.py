"""Bytes read from the FIFO to decode results: ``StreamDecoder``'s results, faster.

Under load a read returns thousands of lines, nearly always all of one version from
well-behaved writers. Such a run of whole lines is decoded by msgspec in one call
(``decode_lines``) instead of line by line; anything unusual (a bad line, mixed versions,
an over-long line, a partial line) goes through ``StreamDecoder``, whose results are the
reference: the fast path only applies where it gives the same ones. The one difference
is on purpose: arm lines decode straight into ``Timer`` records (an ``Arm`` subclass with
the same fields), which the table keeps as they are.
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
        out: List[DecodeResult] = []
        if self._slow.buffered:  # a line is pending: finish it the slow way
            newline = chunk.find(b"\n")
            if newline < 0:
                return self._slow.feed(chunk)
            out = self._slow.feed(chunk[: newline + 1])
            chunk = chunk[newline + 1 :]
        last = chunk.rfind(b"\n")
        if last < 0:
            out += self._slow.feed(chunk)
            return out
        whole = chunk[: last + 1]
        fast = self._fast(whole)
        out += self._slow.feed(whole) if fast is None else fast
        if last + 1 < len(chunk):
            out += self._slow.feed(chunk[last + 1 :])
        return out

    def _fast(self, whole: bytes) -> Optional[List[DecodeResult]]:
        """Decode whole lines in one call if all are valid lines of one version."""
        for prefix, decoder in _FAST:
            if whole.startswith(prefix):
                return self._decode_run(whole, prefix, decoder)
        return None

    def _decode_run(self, whole: bytes, prefix: bytes, decoder: Any) -> Optional[List[Any]]:
        if len(whole) > self._max_line + 1 and self._may_hold_a_long_line(whole):
            return None
        try:
            results: List[Any] = decoder.decode_lines(whole)
        except (msgspec.DecodeError, msgspec.ValidationError):
            return None
        # msgspec skips blank lines (as StreamDecoder does) and would take two messages
        # on one line. Every other line yields at least one value, so as many values as
        # lines opening with the prefix (a newline cannot occur inside a message, so a
        # line starts right after one) means: one message per line, all of this version.
        if whole.count(b"\n" + prefix) != len(results) - 1:
            return None
        return results

    def _may_hold_a_long_line(self, whole: bytes) -> bool:
        """False if no line of ``whole`` is longer than ``max_line`` (newline excluded).

        A line that long is a run of ``max_line + 1`` bytes without a newline, and such a
        run covers at least one whole aligned block of ``(max_line + 1) // 2`` bytes. So
        if every such block holds a newline, no line is too long: a hundred ``find``
        calls per 256 KiB, instead of splitting it into thousands of lines.
        """
        block, find = self._block, whole.find
        for start in range(0, len(whole) - block + 1, block):
            if find(b"\n", start, start + block) < 0:
                return max(map(len, whole.split(b"\n"))) > self._max_line
        return False
