"""Fixes from a review of ftimer-protocol as a library user and a third-party writer
read it: torch's lines written in ASCII (as torch's client writes them, for a server
that decodes its FIFO with the locale's encoding), torch's times however they are
spaced, and a stream decoder's own line limit above PIPE_BUF."""

from __future__ import annotations

import json

import pytest

from ftimer_protocol import (
    MAX_TIME,
    PIPE_BUF,
    Arm,
    MessageTooLarge,
    StreamDecoder,
    TimerRequestV1,
    decode,
    encode,
)


@pytest.mark.parametrize("scope", ["caf\u00e9#1", "\U0001f642 step", "\u2028line"])
def test_a_torch_line_is_ascii_as_torchs_client_writes_it(scope: str) -> None:
    # Raw UTF-8 made torch's server, under an ASCII locale, fail its whole read
    # (UnicodeDecodeError: other workers' requests lost with it), and under Latin-1 read
    # another scope than its own client's release named.
    message = TimerRequestV1(4242, scope, 2e9, 9)
    line = encode(message)
    assert line.isascii()
    assert decode(line) == message
    assert json.loads(line)["scope_id"] == scope  # as torch's json.loads reads it


def test_a_torch_line_counts_its_escapes_against_pipe_buf() -> None:
    # 700 "é" take 1,400 bytes of UTF-8 and 4,200 escaped ("\u00e9"): too long escaped.
    with pytest.raises(MessageTooLarge):
        encode(TimerRequestV1(4242, "\u00e9" * 700, 2e9, 9))


@pytest.mark.parametrize("value", [b"Infinity", b"NaN"])
@pytest.mark.parametrize("where", ["after the colon", "before the colon"])
def test_torchs_time_is_read_however_it_is_spaced(value: bytes, where: str) -> None:
    # docs/protocol.md: read "however it is spaced, as torch's server does"; past 64
    # bytes of white space, the line was refused, the arm lost.
    pad = b" " * 60
    member = b'"expiration_time"' + (b":" + pad if where == "after the colon" else pad + b":")
    line = (
        b'{"version": 1, "pid": 4242, "scope_id": "step", ' + member + value + b', "signal": 9}\n'
    )
    assert StreamDecoder().feed(line) == [TimerRequestV1(4242, "step", MAX_TIME, 9)]


def test_a_stream_decoders_own_limit_above_pipe_buf_is_its_limit() -> None:
    # max_line is "the longest line accepted", encode(limit=...) writes such lines: each
    # was still held to PIPE_BUF, and refused as LineTooLong.
    limit = 2 * PIPE_BUF
    labels = {f"l{i:02d}": "v" * 128 for i in range(16)}
    message = Arm(pid=4242, scope_id="s" * 4000, deadline=5.0, signal=9, labels=labels)
    line = encode(message, limit=limit)
    assert PIPE_BUF < len(line) - 1 <= limit
    assert StreamDecoder(max_line=limit).feed(line) == [message]
