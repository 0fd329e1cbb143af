"""encode()/decode(): round trips, schema bounds, version dispatch and the PIPE_BUF guard."""

from __future__ import annotations

import json
import math
from typing import List

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from ftimer_protocol import (
    MAX_SCOPE,
    MAX_TIME,
    PIPE_BUF,
    SUPPORTED_VERSIONS,
    Arm,
    Disarm,
    DisarmAll,
    Expire,
    LineTooLong,
    LocalProtocolError,
    MalformedMessage,
    Message,
    MessageTooLarge,
    ProtocolError,
    RemoteProtocolError,
    StreamDecoder,
    Sync,
    TimerRequestV1,
    UnsupportedVersion,
    decode,
    decode_value,
    encode,
    surrogates_as_text,
    torch_request,
)

from .strategies import messages


@given(messages)
def test_round_trip(message: Message) -> None:
    try:
        line = encode(message)
    except MessageTooLarge:
        assert len(encode(message, limit=1 << 20)) > PIPE_BUF
        return
    assert line.endswith(b"\n")
    assert line.count(b"\n") == 1
    assert len(line) <= PIPE_BUF
    assert decode(line) == message
    assert type(decode(line)) is type(message)


@given(messages)
def test_every_encoded_message_starts_with_its_version(message: Message) -> None:
    try:
        line = encode(message)
    except MessageTooLarge:
        return
    version = 1 if isinstance(message, TimerRequestV1) else 2
    assert line.startswith(b'{"version":%d,' % version)


def test_v1_is_torchs_format_field_for_field() -> None:
    line = encode(TimerRequestV1(pid=42, scope_id="train.py#7", expiration_time=1.5, signal=9))
    assert json.loads(line) == {
        "version": 1,
        "pid": 42,
        "scope_id": "train.py#7",
        "expiration_time": 1.5,
        "signal": 9,
    }


def test_v2_wire_form() -> None:
    arm = Arm(pid=7, scope_id="s", deadline=12.25, signal=15, start_time=99, labels={"rank": "3"})
    assert encode(arm) == (
        b'{"version":2,"op":"arm","pid":7,"scope_id":"s","deadline":12.25,"signal":15,'
        b'"start_time":99,"labels":{"rank":"3"}}\n'
    )
    # Optional members are left out when unset.
    assert encode(DisarmAll(pid=7)) == b'{"version":2,"op":"disarm_all","pid":7}\n'


@pytest.mark.parametrize(
    "line",
    [
        # What torch 2.13's FileTimerRequest.to_json() writes (json.dumps, with spaces).
        b'{"version": 1, "pid": 42, "scope_id": "a.py#3", "expiration_time": 17.5, "signal": 9}',
        b'{"version": 1, "pid": 42, "scope_id": "a.py#3", "expiration_time": -1, "signal": 0}',
        # Members in another order, an integer time, a newline.
        b'{"signal": 9, "expiration_time": 17, "scope_id": "a.py#3", "pid": 42, "version": 1}\n',
    ],
)
def test_decodes_torch_v1_lines(line: bytes) -> None:
    message = decode(line)
    assert isinstance(message, TimerRequestV1)
    assert message.pid == 42
    assert message.scope_id == "a.py#3"
    assert message.is_release == (message.expiration_time < 0)


def test_unknown_members_are_ignored() -> None:
    line = b'{"version":2,"op":"disarm","pid":5,"scope_id":"x","future":[1,{"a":2}]}'
    assert decode(line) == Disarm(pid=5, scope_id="x")
    line = b'{"version": 1, "pid": 5, "scope_id": "x", "expiration_time": 1, "signal": 9, "z": 1}'
    assert decode(line) == TimerRequestV1(pid=5, scope_id="x", expiration_time=1.0, signal=9)


@pytest.mark.parametrize("version", [0, 3, 99, "2", None, 1.0, True])
def test_unknown_version_is_a_typed_error(version: object) -> None:
    line = json.dumps({"version": version, "op": "arm", "pid": 1}).encode()
    with pytest.raises(UnsupportedVersion) as info:
        decode(line)
    assert info.value.version == version
    assert isinstance(info.value, RemoteProtocolError)
    assert "unsupported protocol version" in str(info.value)


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        (b"", "not a JSON object"),
        (b"not json", "not a JSON object"),
        (b"[1, 2]", "not a JSON object"),
        (b"{}", 'no "version"'),
        (b'{"\\u0076ersion": 2}', 'no "version"'),  # the name is spelled out, never escaped
        (b'{"version" 2}', "malformed"),
        (b'{"version":2,"op":"nap","pid":1}', "op"),
        (b'{"version":2,"op":"arm","pid":1,"scope_id":"s","signal":9}', "deadline"),
        (b'{"version":2,"op":"arm","pid":0,"scope_id":"s","deadline":1,"signal":9}', "pid"),
        (b'{"version":2,"op":"arm","pid":-1,"scope_id":"s","deadline":1,"signal":9}', "pid"),
        (b'{"version":2,"op":"arm","pid":1,"scope_id":"s","deadline":1,"signal":65}', "signal"),
        (b'{"version":2,"op":"arm","pid":1,"scope_id":"s","deadline":-1,"signal":9}', "deadline"),
        (b'{"version":2,"op":"arm","pid":1,"scope_id":"s","deadline":1e400,"signal":9}', "range"),
        (b'{"version":2,"op":"arm","pid":1,"scope_id":"s","deadline":NaN,"signal":9}', "malformed"),
        (b'{"version":2,"op":"arm","pid":1,"scope_id":7,"deadline":1,"signal":9}', "scope_id"),
        (
            b'{"version":2,"op":"arm","pid":1,"scope_id":"s","deadline":1,"signal":9,'
            b'"labels":{"bad key":"v"}}',
            "labels",
        ),
        (
            b'{"version":2,"op":"arm","pid":1,"scope_id":"s","deadline":1,"signal":9,'
            b'"labels":{"job\\n":"v"}}',
            "labels",
        ),
        (b'{"version": 1, "pid": 0, "scope_id": "s", "expiration_time": 1, "signal": 9}', "pid"),
        (b'{"version": 1, "pid": 1, "scope_id": "s", "expiration_time": 1}', "signal"),
        (b'{"version":2,"op":"disarm","pid":1,"scope_id":"s"}trailing', "malformed"),
    ],
)
def test_malformed_lines_are_typed_errors(line: bytes, reason: str) -> None:
    with pytest.raises(MalformedMessage) as info:
        decode(line)
    assert reason.lower() in str(info.value).lower()
    assert info.value.excerpt == line[:64]


@pytest.mark.parametrize(
    "message",
    [
        Arm(pid=0, scope_id="s", deadline=1.0, signal=9),
        Arm(pid=2**31, scope_id="s", deadline=1.0, signal=9),
        Arm(pid=1, scope_id="s", deadline=math.nan, signal=9),
        Arm(pid=1, scope_id="s", deadline=math.inf, signal=9),
        Arm(pid=1, scope_id="s", deadline=-0.5, signal=9),
        Arm(pid=1, scope_id="s", deadline=1.0, signal=65),
        Arm(pid=1, scope_id="s", deadline=1.0, signal=-1),
        Arm(pid=1, scope_id="x" * (MAX_SCOPE + 1), deadline=1.0, signal=9),
        Arm(pid=1, scope_id="s", deadline=1.0, signal=9, labels={"a-b": "v"}),
        Arm(pid=1, scope_id="s", deadline=1.0, signal=9, labels={"job\n": "v"}),
        Arm(pid=1, scope_id=b"bytes", deadline=1.0, signal=9),  # type: ignore[arg-type]
        Disarm(pid=1, scope_id="s", start_time=-5),
        TimerRequestV1(pid=1, scope_id="s", expiration_time=math.nan, signal=9),
        Expire(pid=1, scope_id="s", signal=99),
        Sync(token="t" * 129),
        # A lone surrogate: UTF-8 cannot carry it.
        Arm(pid=1, scope_id="a\ud800", deadline=1.0, signal=9),
        TimerRequestV1(pid=1, scope_id="\udfff", expiration_time=1.0, signal=9),
        Arm(pid=1, scope_id="s", deadline=1.0, signal=9, labels={"job": "\ud800"}),
    ],
)
def test_encode_refuses_messages_outside_the_schema(message: Message) -> None:
    with pytest.raises(LocalProtocolError):
        encode(message)


def test_encode_refuses_what_is_not_a_message() -> None:
    with pytest.raises(LocalProtocolError):
        encode({"version": 1})  # type: ignore[arg-type]
    with pytest.raises(LocalProtocolError):
        encode(object())  # type: ignore[arg-type]


def test_errors_say_whose_fault() -> None:
    assert issubclass(MessageTooLarge, LocalProtocolError)
    assert issubclass(LocalProtocolError, ProtocolError)
    assert issubclass(MalformedMessage, RemoteProtocolError)
    assert issubclass(UnsupportedVersion, RemoteProtocolError)
    assert not issubclass(RemoteProtocolError, LocalProtocolError)
    # msgspec's own errors never escape.
    assert not issubclass(MalformedMessage, msgspec.MsgspecError)


def _arm_of_size(size: int, wide: int = 0) -> Arm:
    """An Arm framed in exactly ``size`` bytes, its scope holding ``wide`` two-byte "é"."""
    base = len(encode(Arm(pid=1, scope_id="", deadline=1.0, signal=9)))
    scope = "é" * wide + "x" * (size - base - 2 * wide)
    return Arm(pid=1, scope_id=scope, deadline=1.0, signal=9)


def test_guard_counts_multibyte_scopes_in_bytes() -> None:
    exact = _arm_of_size(PIPE_BUF, wide=100)
    assert len(exact.scope_id.encode()) == len(exact.scope_id) + 100
    assert len(encode(exact)) == PIPE_BUF
    with pytest.raises(MessageTooLarge) as info:
        encode(Arm(pid=1, scope_id=exact.scope_id + "é", deadline=1.0, signal=9))
    assert info.value.size == PIPE_BUF + 2


def test_the_error_names_the_limit_that_was_given() -> None:
    # encode(limit=512) said "over the 512-byte PIPE_BUF limit": PIPE_BUF is another.
    arm = Arm(pid=1, scope_id="x" * 600, deadline=1.0, signal=9)
    with pytest.raises(
        MessageTooLarge, match=r"^framed message is \d+ bytes, over the 512-byte limit$"
    ):
        encode(arm, limit=512)
    big = Arm(pid=1, scope_id="x" * PIPE_BUF, deadline=1.0, signal=9)
    with pytest.raises(MessageTooLarge, match=f"over the {PIPE_BUF}-byte PIPE_BUF limit$"):
        encode(big)


def test_guard_counts_bytes_and_the_newline() -> None:
    exact = _arm_of_size(PIPE_BUF)
    assert len(encode(exact)) == PIPE_BUF
    one_more = Arm(pid=1, scope_id=exact.scope_id + "x", deadline=1.0, signal=9)
    with pytest.raises(MessageTooLarge) as info:
        encode(one_more)
    assert info.value.size == PIPE_BUF + 1
    # The same number of characters, some of them two bytes wide, no longer fits.
    wide = Arm(pid=1, scope_id="é" + exact.scope_id[1:], deadline=1.0, signal=9)
    with pytest.raises(MessageTooLarge):
        encode(wide)


def test_guard_limit_can_be_lowered_for_macos_pipe_buf() -> None:
    message = _arm_of_size(513)
    with pytest.raises(MessageTooLarge):
        encode(message, limit=512)
    assert len(encode(_arm_of_size(512), limit=512)) == 512


@given(st.integers(0, 200))
def test_decoder_accepts_every_line_torch_can_write(pad: int) -> None:
    # torch's guard allows PIPE_BUF characters before the newline, and json.dumps writes
    # ASCII only, so torch can write PIPE_BUF bytes plus the newline.
    head = '{"version": 1, "pid": 42, "scope_id": "'
    tail = '", "expiration_time": 17.5, "signal": 9}'
    scope = "s" * (PIPE_BUF - len(head) - len(tail) - pad)
    line = (head + scope + tail).encode()
    assert len(line) == PIPE_BUF - pad
    message = decode(line + b"\n")
    assert message == TimerRequestV1(pid=42, scope_id=scope, expiration_time=17.5, signal=9)


@pytest.mark.parametrize(
    "opening", [b'{"version":2,"op":"arm","x":', b'{"version": 1, "x": ', b'{"version":']
)
def test_json_nested_deeper_than_the_decoder_recurses_is_malformed(opening: bytes) -> None:
    # msgspec raises RecursionError there: the decoder must return it as a value.
    line = opening + b"[" * 1000
    assert isinstance(decode_value(line), MalformedMessage)
    assert [type(r) for r in StreamDecoder().feed(line + b"\n")] == [MalformedMessage]


def torch_line(expiration_time: float) -> bytes:
    """What torch's client writes (``json.dumps``) for an arm at ``expiration_time``."""
    body = {"version": 1, "pid": 42, "scope_id": "train.py#9", "expiration_time": expiration_time}
    return (json.dumps({**body, "signal": 9}) + "\n").encode()


@pytest.mark.parametrize(
    ("expiration_time", "read_as"),
    [
        # Timers torch's server never expires: "no limit" (time.time() + sys.maxsize).
        (math.inf, MAX_TIME),
        (math.nan, MAX_TIME),
        (1e300, MAX_TIME),
        (float(2**63), MAX_TIME),
        (1e15 + 1, MAX_TIME),
        # Releases, as any negative time.
        (-math.inf, -1.0),
        (-1e300, -1.0),
        # Within the bounds: unchanged.
        (MAX_TIME, MAX_TIME),
        (1764000000.5, 1764000000.5),
    ],
)
def test_torch_times_beyond_the_bounds_are_read_as_torchs_server_reads_them(
    expiration_time: float, read_as: float
) -> None:
    line = torch_line(expiration_time)
    expected = TimerRequestV1(pid=42, scope_id="train.py#9", expiration_time=read_as, signal=9)
    assert decode(line) == expected
    # Also with a lone surrogate escape in the scope, the other retry of a failed line.
    surrogate = line.replace(b"#9", b"\\udce9")
    assert decode(surrogate) == msgspec.structs.replace(expected, scope_id="train.py\\xe9")


def test_only_the_time_of_a_version_1_line_is_forgiven() -> None:
    # Another field wrong as well, or a version 2 line: refused as before.
    wrong_scope = torch_line(math.inf).replace(b'"train.py#9"', b"5")
    assert isinstance(decode_value(wrong_scope), MalformedMessage)
    v2 = b'{"version":2,"op":"arm","pid":42,"scope_id":"s","deadline":Infinity,"signal":9}'
    assert isinstance(decode_value(v2), MalformedMessage)
    assert isinstance(decode_value(b'{"version": true, "expiration_time": NaN}'), MalformedMessage)
    with pytest.raises(MalformedMessage, match="scope_id"):
        torch_request({"pid": 42, "scope_id": 5, "expiration_time": 1.0, "signal": 9})


def test_only_torchs_lines_refused_for_their_time_are_parsed_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Any failed line holding "NaN" or "Infinity" anywhere was parsed again by json.loads
    # (up to three times with the stream decoder's retries): 4 KiB of such junk cost ~80
    # valid lines each. And a version 2 line naming version 1 again was taken as one.
    from ftimer_protocol import _codec

    parsed: List[bytes] = []
    retry = _codec._with_torch_time
    monkeypatch.setattr(_codec, "_with_torch_time", lambda line: parsed.append(line) or retry(line))
    junk = [
        b'{"version":2,"op":"bogus","NaN":"Infinity"}',
        b'{"version": 1, "pid": 42, "scope_id": "NaN", "expiration_time": 1, "signal": "x"}',
        b'{"version":2,"op":"arm","version":1,"pid":5,"scope_id":"s","expiration_time":NaN,'
        b'"signal":9}',
    ]
    for line in junk:
        assert isinstance(decode_value(line), MalformedMessage)
    assert parsed == []
    assert decode(torch_line(math.nan)).expiration_time == MAX_TIME  # type: ignore[union-attr]
    assert len(parsed) == 1


def _spaced(line: bytes) -> bytes:
    """``line`` as another writer may space it: no fast path's prefix matches."""
    assert line.startswith(b"{")
    return b"{ " + line[1:]


@pytest.mark.parametrize(
    "line",
    [
        # More than one "version": the first decides, as a reader reads it first. The
        # slow path took msgspec's last: a version 1 line read as a version 2 message,
        # a version 2 one refused as version 3.
        b'{"version":1,"op":"sync","token":"t","version":2}',
        b'{"version":2,"op":"sync","token":"t","version":1}',
        b'{"version":2,"op":"sync","token":"t","version":3}',
        b'{"version":2,"op":"sync","token":"t","\\u0076ersion":3}',
        b'{"version":1,"pid":1,"scope_id":"","expiration_time":0.5,"signal":0,"version":3}',
        # torch's time forgiven with or without torch's spacing.
        b'{"version":1,"pid":1,"scope_id":"","expiration_time":Infinity,"signal":0}',
        b'{"version":1,"pid":1,"scope_id":"","expiration_time":1e400,"signal":0}',
        # ... but nothing else: a member repeated (the first one invalid), or a number
        # JSON lacks in another member.
        b'{"version":1,"pid":"x","scope_id":"","expiration_time":NaN,"signal":0,"pid":7}',
        b'{"version":1,"expiration_time":true,"pid":1,"scope_id":"","expiration_time":0.5,'
        b'"signal":0}',
        b'{"version":1,"pid":1,"scope_id":"","expiration_time":NaN,"signal":9,"x":Infinity}',
        b'{"version":1,"pid":1,"scope_id":"","expiration_time":1e400,"signal":9,"x":NaN}',
    ],
)
def test_a_line_reads_the_same_with_or_without_a_fast_path_s_prefix(line: bytes) -> None:
    fast, slow = decode_value(line), decode_value(_spaced(line))
    assert type(fast) is type(slow)
    if isinstance(fast, MalformedMessage):
        return  # the same kind of error; its excerpt is of the line as written
    assert fast == slow


def test_the_first_version_decides_also_beside_bytes_that_are_not_utf_8() -> None:
    # msgspec skips an unknown member's string whatever its bytes; json.loads refused
    # them, and the line was read by its last "version".
    v1_then_2 = b'{"j":"\xff","version":1,"op":"sync","token":"a","version":2}'
    assert isinstance(decode_value(v1_then_2), MalformedMessage)
    v2_then_3 = b'{"j":"\xff","version":2,"op":"sync","token":"a","version":3}'
    assert decode_value(v2_then_3) == Sync(token="a")


@pytest.mark.parametrize(
    "time",
    [
        b'"expiration_time" : Infinity,',
        b'"expiration_time":  NaN,',
        b'"expiration_time":\tInfinity ,',
    ],
)
def test_torch_s_constant_time_is_forgiven_however_it_is_spaced(time: bytes) -> None:
    line = b'{"version": 1, "pid": 42, "scope_id": "s", ' + time + b' "signal": 9}'
    assert decode_value(line) == TimerRequestV1(
        pid=42, scope_id="s", expiration_time=MAX_TIME, signal=9
    )
    at_the_end = b'{"version": 1, "pid": 42, "scope_id": "s", "signal": 9, ' + time[:-1] + b"}"
    assert decode_value(at_the_end) == decode_value(line)


@pytest.mark.parametrize(
    "line",
    [
        b'{"version":1,"pid":"x","scope_id":"","expiration_time":NaN,"signal":0,"pid":7}',
        b'{"version":1,"pid":1,"scope_id":"","expiration_time":NaN,"signal":9,"x":Infinity}',
    ],
)
def test_only_the_time_of_a_version_1_line_is_forgiven_not_a_repeat_or_another_constant(
    line: bytes,
) -> None:
    # json.loads took the last of a repeated member and NaN anywhere: both were accepted.
    assert isinstance(decode_value(line), MalformedMessage)
    assert isinstance(decode_value(line.replace(b'":', b'": ')), MalformedMessage)  # torch's


# -- what a third party's review of protocol.md found ------------------------------------


def _padded(length: int) -> bytes:
    """A valid sync line of exactly ``length`` bytes (newline excluded)."""
    head, tail = b'{"version":2,"op":"sync","token":"x","pad":"', b'"}'
    return head + b"a" * (length - len(head) - len(tail)) + tail


def test_decode_refuses_a_line_longer_than_pipe_buf_as_the_stream_decoder_does() -> None:
    # decode() returned the message: a reader built on it took what no writer may send.
    for line in (_padded(PIPE_BUF + 1), _padded(PIPE_BUF + 1) + b"\n"):
        with pytest.raises(LineTooLong, match=f"longer than {PIPE_BUF} bytes"):
            decode(line)
        assert isinstance(decode_value(line), LineTooLong)
        assert isinstance(StreamDecoder().feed(line + b"\n")[0], LineTooLong)
    for line in (_padded(PIPE_BUF), _padded(PIPE_BUF) + b"\n"):  # the longest there is
        assert isinstance(decode(line), Sync)


def test_every_bound_of_the_schema_is_exported() -> None:
    # MAX_TOKEN was left out, though protocol.md lists "the other MAX_*".
    import ftimer_protocol
    from ftimer_protocol import _limits

    assert set(_limits.__all__) <= set(ftimer_protocol.__all__)


def test_a_line_of_pipe_buf_bytes_with_a_high_surrogate_escape_still_decodes() -> None:
    # Read as text, "\ud800" (6 bytes) becomes 3 bytes of UTF-8 and a backslash escape of
    # more: the line retried was longer than PIPE_BUF, and refused, though the line sent
    # was not.
    def line(pad: int) -> bytes:
        scope = "\ud800" + "a" * pad
        return json.dumps(
            {"version": 1, "pid": 5, "scope_id": scope, "expiration_time": 1.0, "signal": 9}
        ).encode()

    short = line(0)
    exact = line(PIPE_BUF - len(short))
    assert len(exact) == PIPE_BUF
    for decoded in (decode(exact), StreamDecoder().feed(exact + b"\n")[0]):
        assert isinstance(decoded, TimerRequestV1)
        assert decoded.scope_id.startswith("\\ud800")  # as text (protocol.md)


# Pinned by mutation testing: each test below fails with a one-line change to the codec
# that every other test let through.


@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview])
def test_decode_takes_every_buffer_it_is_typed_for(kind: type) -> None:
    # A reader that hands decode() a memoryview of its receive buffer (no copy) got an
    # AttributeError, not a message.
    line = encode(Arm(42, "s", 1.0, 9, 7))
    assert decode(kind(line)) == Arm(42, "s", 1.0, 9, 7)


def test_supported_versions_are_those_decoded() -> None:
    assert SUPPORTED_VERSIONS == (1, 2)
    with pytest.raises(UnsupportedVersion):
        decode(b'{"version":3,"pid":1}')


def _time(t: float) -> float:
    return torch_request(
        {"pid": 42, "scope_id": "s", "expiration_time": t, "signal": 9}
    ).expiration_time


def test_torch_request_reads_times_as_torchs_server_does() -> None:
    # register_timers(): a time within the bound is kept as it is, even at the bound
    # (-MAX_TIME stays a release, not a timer that never fires); beyond it, one torch's
    # server never expires arms at MAX_TIME and one below -MAX_TIME releases.
    for t in (1.5, -1.0, MAX_TIME, -MAX_TIME):
        assert _time(t) == t
    assert _time(math.inf) == MAX_TIME
    assert _time(math.nan) == MAX_TIME
    assert _time(MAX_TIME * 2) == MAX_TIME
    assert _time(-math.inf) == -1.0
    assert _time(-MAX_TIME * 2) == -1.0
    request = torch_request({"pid": 42, "scope_id": "s", "expiration_time": 1.0, "signal": 9})
    assert request == TimerRequestV1(pid=42, scope_id="s", expiration_time=1.0, signal=9)


def test_only_the_surrogates_of_non_utf8_bytes_are_written_as_bytes() -> None:
    # U+DC80..U+DCFF are how Python holds bytes 0x80..0xFF of a non-UTF-8 path; U+DD00
    # is no byte: "\x100" named a scope nobody wrote.
    assert surrogates_as_text("\udcff\udd00\udc7f") == "\\xff\\udd00\\udc7f"


def test_a_torch_request_of_other_number_types_is_read_as_torch_reads_it() -> None:
    # torch's server keeps a request whose time is a float subclass (numpy's float64) or
    # whose pid is a numpy integer, and computes with them; the schema refused both, and
    # register_timers() dropped the request: its worker unwatched (numpy's own types are
    # tried in the interop tests, where torch brings numpy).
    class Seconds(float):
        pass

    request = torch_request(
        {"pid": 42, "scope_id": "s", "expiration_time": Seconds(1.5), "signal": 9}
    )
    assert type(request.expiration_time) is float
    assert request.expiration_time == 1.5
    with pytest.raises(MalformedMessage, match="pid"):  # a bool is no pid, as before
        torch_request({"pid": True, "scope_id": "s", "expiration_time": 1.0, "signal": 9})
