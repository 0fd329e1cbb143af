"""Bytes read from the FIFO to decode results: ``StreamDecoder``'s results, faster.

Under load a read returns thousands of lines, nearly always all of one version from
well-behaved writers. Such a run of whole lines is decoded by msgspec in one call
(``decode_lines``) instead of line by line; anything unusual (a bad line, mixed versions,
an over-long line, a partial line) goes through ``StreamDecoder``, whose results are the
reference: the fast path only applies where it gives exactly the same ones.
"""

from __future__ import annotations

from typing import Any, List, Optional, Tuple

import msgspec

from ftimer_protocol import PIPE_BUF, DecodeResult, MessageV2, StreamDecoder, TimerRequestV1

__all__ = ["LineReader"]

_V2 = msgspec.json.Decoder(MessageV2)
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
        lines = whole.count(b"\n")
        # A newline cannot occur inside a JSON message, so every line starts right after
        # one: all of them must open with the same version's prefix.
        if whole.count(b"\n" + prefix) != lines - 1:
            return None
        if len(whole) > self._max_line + 1 and self._may_hold_a_long_line(whole):
            return None
        try:
            return decoder.decode_lines(whole)  # type: ignore[no-any-return]
        except (msgspec.DecodeError, msgspec.ValidationError):
            return None

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
