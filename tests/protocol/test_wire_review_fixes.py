"""Fixes from a review of the wire: torch's lines for a scope holding lone surrogates (a
path that is not UTF-8) are read, each surrogate as text."""

from __future__ import annotations

import os
import sys
from types import ModuleType

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ftimer_protocol import (
    Disarm,
    FileTimerRequest,
    MalformedMessage,
    StreamDecoder,
    TimerRequestV1,
    UnsupportedVersion,
    decode_value,
    encode,
)
from ftimer_server.core._reader import LineReader

# What Python makes of /data/caf\xe9/train.py (os.fsdecode), and what a reader makes of it.
SCOPE = "/data/caf\udce9/train.py#6"
TEXT = "/data/caf\\xe9/train.py#6"


def torch_line(scope: str, expiration_time: float, pid: int = 4242) -> bytes:
    """torch's client's line, byte for byte (its ``json.dumps``: ASCII escapes)."""
    return FileTimerRequest(pid, scope, expiration_time, 9).to_json().encode() + b"\n"


def test_torch_lines_with_a_lone_surrogate_name_one_readable_scope() -> None:
    arm, release = torch_line(SCOPE, 2e9), torch_line(SCOPE, -1)
    assert b'"/data/caf\\udce9/train.py#6"' in arm  # what torch's server json.loads()
    armed, released = decode_value(arm), decode_value(release)
    assert armed == TimerRequestV1(4242, TEXT, 2e9, 9)
    assert released == TimerRequestV1(4242, TEXT, -1.0, 9)
    # Valid text: a journal, a state file, an event can write it out again.
    assert decode_value(encode(armed)) == armed  # type: ignore[arg-type]


def test_the_server_reader_and_the_stream_decoder_read_them_too() -> None:
    other = torch_line("plain", 2e9, pid=7)
    # A run of lines of one version (the reader's fast path), one of them refused by
    # msgspec as it stands; then the same split across reads.
    stream = other + torch_line(SCOPE, 2e9) + other + torch_line(SCOPE, -1)
    expected = [
        TimerRequestV1(7, "plain", 2e9, 9),
        TimerRequestV1(4242, TEXT, 2e9, 9),
        TimerRequestV1(7, "plain", 2e9, 9),
        TimerRequestV1(4242, TEXT, -1.0, 9),
    ]
    assert LineReader().feed(stream) == expected
    assert StreamDecoder().feed(stream) == expected
    reader = LineReader()
    assert reader.feed(stream[:60]) + reader.feed(stream[60:]) == expected


@pytest.mark.parametrize(
    ("scope_json", "scope"),
    [
        # Every lone surrogate: a byte's escape, another low one, a high one alone, a
        # high one followed by what is not a low one; a pair stays one character.
        (rb"\udc80\udcff", "\\x80\\xff"),
        (rb"\udc41", "\\udc41"),
        (rb"a\ud800", "a\\ud800"),
        (rb"\uD800\u0041", "\\ud800A"),
        (rb"\ud83d\ude00\udce9", "\U0001f600\\xe9"),
        (rb"\ude00\ud83d", "\\ude00\\ud83d"),
        # An escaped backslash followed by "udce9" is text, not an escape.
        (rb"caf\\udce9\udce9", "caf\\udce9\\xe9"),
    ],
)
def test_each_lone_surrogate_reads_as_documented(scope_json: bytes, scope: str) -> None:
    line = b'{"version":2,"op":"disarm","pid":1,"scope_id":"%b"}' % scope_json
    assert decode_value(line) == Disarm(1, scope)


def test_lone_surrogates_elsewhere_and_out_of_order_members() -> None:
    # In a label, in an unknown member's name and value, and with "version" not first
    # (the slow path, which reads the version alone first).
    line = (
        b'{"version":2,"op":"arm","pid":1,"scope_id":"s","deadline":1.0,"signal":9,'
        b'"labels":{"job":"\\udce9"},"x\\udce9":"\\ud800"}'
    )
    arm = decode_value(line)
    assert arm.labels == {"job": "\\xe9"}  # type: ignore[union-attr]
    line = b'{"pid": 1, "version": 1, "scope_id": "\\udce9", "expiration_time": 1, "signal": 0}'
    assert decode_value(line) == TimerRequestV1(1, "\\xe9", 1.0, 0)


def test_a_line_bad_for_another_reason_keeps_its_error() -> None:
    line = b'{"version": 1, "pid": 0, "scope_id": "\\udce9", "expiration_time": 1, "signal": 0}'
    error = decode_value(line)
    assert isinstance(error, MalformedMessage)
    assert "pid" in error.reason
    assert error.excerpt == line[:64]  # the line as it came
    line = b'{"version": 1, "pid": 1, "scope_id": "\\udce9", "expiration_time": 1}'
    assert isinstance(decode_value(line), MalformedMessage)
    assert isinstance(decode_value(b'{"version":3,"s":"x"}'), UnsupportedVersion)


@pytest.mark.skipif(sys.getfilesystemencoding() != "utf-8", reason="a UTF-8 file system")
@settings(max_examples=300)
@given(path=st.binary(min_size=1, max_size=200))
def test_a_path_reads_as_its_bytes_with_backslashreplace(path: bytes) -> None:
    # torch's scope for a file at ``path`` (Python names it os.fsdecode(path)) reads as
    # the path's bytes decoded with backslashreplace, the text ftimer's client writes.
    scope = os.fsdecode(path) + "#1"
    assert decode_value(torch_line(scope, 1.0)) == TimerRequestV1(
        4242, path.decode("utf-8", "backslashreplace") + "#1", 1.0, 9
    )


@pytest.mark.interop
def test_torch_own_lines_with_a_lone_surrogate(torch_timer: ModuleType) -> None:
    line = torch_timer.FileTimerRequest(4242, SCOPE, 2e9, 9).to_json().encode() + b"\n"
    assert line == torch_line(SCOPE, 2e9)
    assert LineReader().feed(line) == [TimerRequestV1(4242, TEXT, 2e9, 9)]
