"""What mutation testing of the codec and the stream decoder found no test pinned:
torch's time found after a scope named like its member, junk not parsed twice, and a
message found after junk on its line held to the decoder's own limit."""

from __future__ import annotations

import json
import math
from typing import List

import pytest

from ftimer_protocol import (
    Arm,
    MalformedMessage,
    StreamDecoder,
    _codec,
    decode,
    decode_value,
    encode,
)
from ftimer_protocol._codec import PIPE_BUF


def _torch_line(scope: str, expiration_time: float) -> bytes:
    body = {"version": 1, "pid": 42, "scope_id": scope, "expiration_time": expiration_time}
    return (json.dumps({**body, "signal": 9}) + "\n").encode()


def test_a_scope_named_expiration_time_does_not_hide_torchs_time() -> None:
    # Kills _codec.py _time_at_fault: `line.rfind(b'"expiration_time"', 0, where)` made
    # `line.find(...)` (the scope's value, the first such bytes, was taken for the member:
    # torch's arm at NaN/Infinity refused as malformed).
    plain = decode(_torch_line("train", math.inf))
    named = decode(_torch_line("expiration_time", math.inf))
    assert named.scope_id == "expiration_time"  # type: ignore[union-attr]
    assert named.expiration_time == plain.expiration_time  # type: ignore[union-attr]


def test_junk_refused_before_any_time_member_is_not_parsed_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Kills _codec.py _time_at_fault: `if start < 0: return False` made `return True`
    # (every malformed version 1 line with no time member before msgspec's stop was
    # parsed a second time).
    parsed: List[bytes] = []
    retry = _codec._with_torch_time
    monkeypatch.setattr(_codec, "_with_torch_time", lambda line: parsed.append(line) or retry(line))
    line = b'{"version": 1, "pid": tru, "scope_id": "s", "expiration_time": 1, "signal": 9}'
    assert isinstance(decode_value(line), MalformedMessage)
    assert parsed == []


def test_a_long_message_after_junk_on_its_line_is_read_under_the_decoders_own_limit() -> None:
    # Kills _stream.py _resync: `decode_value(line[start:], max_line)` made
    # `decode_value(line[start:])` (the message found after junk held to PIPE_BUF).
    limit = 2 * PIPE_BUF
    labels = {f"l{i:02d}": "v" * 128 for i in range(16)}
    message = Arm(pid=4242, scope_id="s" * 4000, deadline=5.0, signal=9, labels=labels)
    line = encode(message, limit=limit)
    assert len(line) - 1 > PIPE_BUF
    junk = b"junk "
    assert len(junk) + len(line) - 1 <= limit
    results = StreamDecoder(max_line=limit).feed(junk + line)
    assert results[-1] == message, results
    assert len(results) == 2
