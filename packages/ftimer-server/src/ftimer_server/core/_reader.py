"""Bytes read from the FIFO to decode results: ``StreamDecoder``'s results, faster.

Under load a read returns thousands of lines, nearly always all of one version from
well-behaved writers. Such a run of whole lines is decoded by msgspec in one call
(``decode_lines``) instead of line by line; anything unusual (a bad line, mixed versions,
an over-long line, a partial line) goes line by line through ``decode_line``, and lines
split across reads through ``StreamDecoder``, whose results are the reference: the
fast path only applies where it gives the same ones. Two differences are on purpose: in
a fast run, arm lines decode straight into ``Timer`` records (an ``Arm`` subclass with
the same fields), which the table keeps as they are (the slow path gives ``Arm``
messages, which the watchdog takes too); and a run of consecutive lines that cannot
hold a message at all (not a JSON object, no ``{"version"``: what ``yes`` writes) is
reported as one error whose ``lines`` counts them, so a flood of junk costs about what
the same number of valid lines costs, events and logs included.
"""

from __future__ import annotations

from typing import Any, Iterable, List, Optional, Tuple, Union

import msgspec

from ftimer_protocol import (
    PIPE_BUF,
    V1_PREFIXES,
    V2_PREFIX,
    DecodeResult,
    Disarm,
    DisarmAll,
    Expire,
    RemoteProtocolError,
    StreamDecoder,
    Sync,
    TimerRequestV1,
    decode_line,
    decode_value,
)

from ._records import Timer, valid_label_keys

__all__ = ["LineReader", "decode_one", "extends_run"]

# JSON's white space, newline aside (as the stream decoder's blank lines).
_BLANK = b" \t\r"
# ftimer_protocol.MessageV2, with Timer in the place of Arm.
_V2Message = Union[Timer, Disarm, DisarmAll, Expire, Sync]
# Typed: with msgspec 0.20 (the newest for Python 3.9), a Union's decoder decodes Any.
_V2: msgspec.json.Decoder[_V2Message] = msgspec.json.Decoder(_V2Message)
_V1 = msgspec.json.Decoder(TimerRequestV1)
# Each version's exact line openings (see ftimer_protocol's codec): a line that starts
# otherwise may hold another version, so it takes the slow path.
_CLOSE = ord("}")
_FAST: Tuple[Tuple[bytes, Any], ...] = ((V2_PREFIX, _V2), *((p, _V1) for p in V1_PREFIXES))
# msgspec's, and RecursionError for JSON nested deeper than it recurses.
_DECODE_ERRORS = (msgspec.DecodeError, msgspec.ValidationError, RecursionError)


def decode_one(line: bytes) -> DecodeResult:
    """``decode_value(line)`` for one whole line (no newline), with an arm as a
    ``Timer``, as in a fast run: what the socket's datagrams are decoded with, so that
    their arms too take the table's batch path."""
    if line.startswith(V2_PREFIX):
        try:
            result = _V2.decode(line)
        except _DECODE_ERRORS:
            pass  # decode_value() says why
        else:
            if _keys_valid((result,)):
                return result
    return decode_value(line)


def extends_run(run: Optional[RemoteProtocolError], result: object) -> bool:
    """Whether ``result`` is the same error as ``run`` (the last result, if an error):
    then it is counted in ``run.lines`` instead of reported again, so that a flood of
    one bad line, or datagram, costs one error value (one event, one log line)."""
    return (
        run is not None
        and isinstance(result, RemoteProtocolError)
        and type(result) is type(run)
        and result.reason == run.reason
    )


def _keys_valid(results: Iterable[object]) -> bool:
    """Whether the label keys of every ``Timer`` in ``results`` are valid: the one check
    a ``Timer`` does not make as it is decoded (``Timer.labels``). If not, the lines are
    decoded again the slow way, which says why."""
    return all(valid_label_keys(r.labels) for r in results if type(r) is Timer and r.labels)


class LineReader:
    """Feed it chunks split anywhere; get every line's message or error, in order.

    Args:
        max_line: the longest line accepted, newline excluded (as ``StreamDecoder``).
    """

    def __init__(self, max_line: int = PIPE_BUF) -> None:
        self._slow = StreamDecoder(max_line)
        self._max_line = max_line
        self._block = max(1, (max_line + 1) // 2)

    @property
    def buffered(self) -> int:
        """Bytes held of a line whose newline has not arrived yet."""
        return self._slow.buffered

    @property
    def unfinished(self) -> bytes:
        """The bytes held of a line whose newline has not arrived yet."""
        return self._slow.unfinished

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
            body = self._lines(chunk[start : end - 1])
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
        except _DECODE_ERRORS:
            return None
        # msgspec skips blank lines, takes two values on one line and one value spread
        # over two lines. As many values as lines, every line opening with the prefix
        # and closing with "}" means one message per line, all of this version: inside
        # a value, JSON puts no "{" after a "}" (only "," or a closing bracket), so each
        # newline between "}" and "{" is between two values.
        lines = chunk.count(b"\n", start, end)
        if lines != len(results) or chunk[end - 2] != _CLOSE:
            return None
        if chunk.count(b"}\n" + prefix, start, end) != lines - 1:
            return None
        if decoder is _V2 and not _keys_valid(results):
            return None
        return results

    def _lines(self, lines: bytes) -> List[DecodeResult]:
        """Decode whole lines (newline-separated, no trailing newline) one by one; a run
        of consecutive lines with the same error is reported as one error."""
        out: List[DecodeResult] = []
        max_line = self._max_line
        run: Optional[RemoteProtocolError] = None  # the last result, if an error
        # When ``run`` is the error of a line without "version": whether it held "{".
        junk: Optional[bool] = None
        last_line = b""  # the line ``run`` came from
        for line in lines.split(b"\n"):
            if run is not None and line == last_line:  # a flood of one line: no parse
                run.lines += 1
                continue
            if len(line) <= max_line and b'"version"' not in line:
                # No message, not even after junk: found without parsing, and a run of
                # them of one kind (as a yes flood) costs one error value.
                stripped = line.lstrip(_BLANK)
                if not stripped:
                    continue  # blank
                last_line = line
                kind = stripped[:1] == b"{"
                if run is not None and junk is kind:
                    run.lines += 1
                    continue
                results = [decode_value(line)]
                junk = kind
            else:
                last_line = line
                results = decode_line(line, max_line)
                junk = None
            if extends_run(run, results[0]):
                run.lines += 1  # type: ignore[union-attr]
                del results[0]
                if not results:
                    continue
            out += results
            last = results[-1]
            run = last if isinstance(last, RemoteProtocolError) else None
        return out

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
