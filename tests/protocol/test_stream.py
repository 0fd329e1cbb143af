"""StreamDecoder: chunking invariance, resynchronisation, over-long lines, bounded memory."""

from __future__ import annotations

from typing import List

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ftimer_protocol import (
    PIPE_BUF,
    Arm,
    DecodeResult,
    Disarm,
    LineTooLong,
    MalformedMessage,
    Message,
    RemoteProtocolError,
    StreamDecoder,
    TimerRequestV1,
    decode_line,
    encode,
)

from .strategies import messages

ARM = Arm(pid=10, scope_id="step", deadline=5.0, signal=9)


def _encoded(message: Message) -> bytes:
    return encode(message, limit=1 << 20)[:-1]  # a line, without its newline


def _lines_of(stream: bytes, max_line: int = PIPE_BUF) -> List[DecodeResult]:
    """The reference: split into complete lines and decode each on its own."""
    return [r for line in stream.split(b"\n")[:-1] for r in decode_line(line, max_line)]


def _feed_in_chunks(stream: bytes, cuts: List[int], max_line: int = PIPE_BUF) -> List[DecodeResult]:
    decoder = StreamDecoder(max_line)
    out: List[DecodeResult] = []
    previous = 0
    for cut in [*sorted(cuts), len(stream)]:
        out += decoder.feed(stream[previous:cut])
        previous = cut
        assert decoder.buffered <= max_line
    return out


# A line of the stream: a valid message, short garbage, or long junk (possibly over-long).
junk = st.builds(lambda unit, n: (unit or b"j") * n, st.binary(max_size=16), st.integers(1, 700))
lines = st.one_of(
    messages.filter(lambda m: len(encode(m, limit=1 << 20)) <= PIPE_BUF).map(_encoded),
    st.binary(max_size=40),
    junk,
    st.just(b'{"version":2,"op":"arm","pid":1'),  # a message cut short by a dying writer
)


@given(st.lists(lines, max_size=12), st.data())
def test_chunking_invariance(parts: List[bytes], data: st.DataObject) -> None:
    stream = b"".join(p + b"\n" for p in parts)
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=20))
    expected = _lines_of(stream)
    assert _feed_in_chunks(stream, cuts) == expected
    assert _feed_in_chunks(stream, list(range(len(stream)))) == expected  # byte by byte


@given(st.lists(lines, max_size=12), st.data())
def test_chunking_invariance_with_a_small_line_limit(
    parts: List[bytes], data: st.DataObject
) -> None:
    stream = b"".join(p + b"\n" for p in parts)
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=20))
    assert _feed_in_chunks(stream, cuts, max_line=64) == _lines_of(stream, max_line=64)


@given(
    st.binary(max_size=9000).filter(lambda b: b"\n" not in b),
    messages.filter(lambda m: len(encode(m, limit=1 << 20)) <= PIPE_BUF),
    st.data(),
)
def test_junk_without_newline_never_costs_the_next_message(
    junk_bytes: bytes, message: Message, data: st.DataObject
) -> None:
    stream = junk_bytes + encode(message) + encode(ARM)
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=10))
    results = _feed_in_chunks(stream, cuts)
    assert results[-2:] == [message, ARM]
    errors = [r for r in results if isinstance(r, RemoteProtocolError)]
    # JSON allows white space before a value: such "junk" is part of a valid line.
    assert len(errors) == (1 if junk_bytes.strip(b" \t\r") else 0)


def test_resync_after_a_dying_writers_partial_message() -> None:
    partial = encode(Disarm(pid=3, scope_id="dead"))[:25]
    results = StreamDecoder().feed(partial + encode(ARM))
    assert len(results) == 2
    assert isinstance(results[0], MalformedMessage)
    assert results[0].excerpt == (partial + encode(ARM))[:64]
    assert results[1] == ARM


def test_resync_on_torch_v1_lines() -> None:
    torch_line = b'{"version": 1, "pid": 4, "scope_id": "a", "expiration_time": 9.5, "signal": 9}\n'
    results = StreamDecoder().feed(b"\x00\xff junk" + torch_line)
    assert results[1:] == [TimerRequestV1(pid=4, scope_id="a", expiration_time=9.5, signal=9)]


def test_over_long_line_is_one_error_and_memory_stays_bounded() -> None:
    decoder = StreamDecoder()
    for _ in range(1000):
        assert decoder.feed(b"x" * 1000) == []
        assert decoder.buffered <= PIPE_BUF
    results = decoder.feed(b"tail\n" + encode(ARM))
    assert results == [LineTooLong(f"line longer than {PIPE_BUF} bytes", b"x" * 64), ARM]


def test_over_long_junk_then_a_message_on_the_same_line() -> None:
    decoder = StreamDecoder()
    decoder.feed(b"y" * (3 * PIPE_BUF))
    results = decoder.feed(encode(ARM))
    assert isinstance(results[0], LineTooLong)
    assert results[1:] == [ARM]


def test_a_longest_message_after_junk_does_not_depend_on_where_the_reads_end() -> None:
    # Junk, then a message of exactly max_line bytes whose newline came in a read of its
    # own: only the message was kept of the line, and it was lost with the junk.
    v1 = TimerRequestV1(pid=10, scope_id="s", expiration_time=5.0, signal=9)
    line = _encoded(v1)
    message = line.replace(b'"s"', b'"' + b"s" * (PIPE_BUF - len(line) + 1) + b'"')
    assert len(message) == PIPE_BUF
    whole = StreamDecoder().feed(b"j" + message + b"\n")
    decoder = StreamDecoder()
    split = decoder.feed(b"j") + decoder.feed(message) + decoder.feed(b"\n")
    assert [type(r) for r in split] == [type(r) for r in whole] == [LineTooLong, TimerRequestV1]
    assert split[1] == whole[1]


def test_blank_lines_are_ignored_and_close_flushes_the_last_line() -> None:
    decoder = StreamDecoder()
    assert decoder.feed(b"\n\n \t\r\n\r\n") == []
    assert decoder.feed(encode(ARM)[:-1] + b"\r\n") == [ARM]
    assert decoder.feed(b"\x0b\n") != []  # not JSON white space: junk
    assert decoder.feed(encode(ARM)[:-1]) == []
    assert decoder.close() == [ARM]
    assert decoder.buffered == 0
    assert decoder.close() == []


def test_max_line_must_hold_a_message_start() -> None:
    with pytest.raises(ValueError, match="max_line"):
        StreamDecoder(max_line=4)


@given(st.lists(st.binary(max_size=2000), max_size=30))
def test_fuzz_never_raises_and_stays_bounded(chunks: List[bytes]) -> None:
    decoder = StreamDecoder()
    for chunk in chunks:
        for result in decoder.feed(chunk):
            assert isinstance(result, (RemoteProtocolError, *Message.__args__))  # type: ignore[attr-defined]
        assert decoder.buffered <= PIPE_BUF
    decoder.close()
