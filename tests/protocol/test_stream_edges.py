"""The stream decoder at its edges: a line of exactly ``max_line`` bytes, a message longer
than ``max_line`` behind junk, the second-to-last message start, what is held of an
unfinished line (from mutation testing of _stream.py)."""

from __future__ import annotations

import pytest

from ftimer_protocol import (
    MESSAGE_START,
    Arm,
    LineTooLong,
    MalformedMessage,
    StreamDecoder,
    decode_line,
    encode,
)

ARM = Arm(pid=10, scope_id="step", deadline=5.0, signal=9)
LINE = encode(ARM)[:-1]  # without its newline


def test_messages_start_with_the_documented_bytes() -> None:
    """``MESSAGE_START`` is ``{"version"``, and a decoder's line holds at least that."""
    assert MESSAGE_START == b'{"version"'
    StreamDecoder(max_line=len(MESSAGE_START))
    with pytest.raises(ValueError, match="max_line must be at least 10"):
        StreamDecoder(max_line=len(MESSAGE_START) - 1)


def test_a_message_with_a_label_named_version_is_found_behind_junk() -> None:
    """Behind junk, a message whose labels begin with a label named ``version`` is found at
    the second-to-last ``{"version"`` of the line, the last being its labels."""
    message = Arm(pid=10, scope_id="step", deadline=5.0, signal=9, labels={"version": "3"})
    line = b"junk" + encode(message)[:-1]
    assert line.count(MESSAGE_START) == 2
    results = decode_line(line)
    assert isinstance(results[0], MalformedMessage)
    assert results[1:] == [message]
    results = StreamDecoder().feed(line + b"\n")
    assert results[1:] == [message]


def test_a_message_longer_than_max_line_is_not_taken_from_behind_junk() -> None:
    """A line over ``max_line`` gives the message it ends with only if that message fits in
    ``max_line`` bytes."""
    line = b"j" + LINE
    assert decode_line(line, max_line=len(LINE)) == [
        LineTooLong(f"line longer than {len(LINE)} bytes", line[:64]),
        ARM,
    ]
    assert decode_line(line, max_line=len(LINE) - 1) == [
        LineTooLong(f"line longer than {len(LINE) - 1} bytes", line[:64]),
    ]


def test_a_line_of_exactly_max_line_bytes_whose_newline_comes_later_is_no_error() -> None:
    """A message of exactly ``max_line`` bytes, its newline in the next read, is read
    without an error: only a longer line is too long."""
    decoder = StreamDecoder(max_line=len(LINE))
    assert decoder.feed(LINE) == []
    assert decoder.feed(b"\n") == [ARM]
    decoder = StreamDecoder(max_line=len(LINE))
    assert decoder.feed(LINE) == []
    assert decoder.close() == [ARM]


def test_unfinished_is_what_is_held_of_the_current_line() -> None:
    """``unfinished`` holds the bytes of a line whose newline has not come, up to its last
    ``max_line`` bytes, and nothing once it is done."""
    decoder = StreamDecoder(max_line=len(LINE))
    assert decoder.unfinished == b""
    decoder.feed(LINE[:7])
    assert decoder.unfinished == LINE[:7]
    decoder.feed(LINE[7:] + b"\n" + b"x" * 3)
    assert decoder.unfinished == b"xxx"
    decoder.feed(b"y" * (2 * len(LINE)))
    assert decoder.unfinished == b"y" * len(LINE)
    assert decoder.buffered == len(LINE)
    decoder.feed(b"\n")
    assert decoder.unfinished == b""
