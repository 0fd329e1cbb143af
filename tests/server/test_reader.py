"""The server's fast line reader gives exactly StreamDecoder's results, however split."""

from __future__ import annotations

import json
import re

import hypothesis.strategies as st
import msgspec
from hypothesis import assume, given, settings

from ftimer_protocol import (
    LABEL_KEY_PATTERN,
    PIPE_BUF,
    Arm,
    DecodeResult,
    Disarm,
    MalformedMessage,
    RemoteProtocolError,
    StreamDecoder,
    TimerRequestV1,
    decode_value,
    encode,
)
from ftimer_server import Timer
from ftimer_server.core import _records
from ftimer_server.core._reader import LineReader, decode_one
from ftimer_server.core._records import valid_label_keys


def as_messages(results: list[DecodeResult]) -> list[DecodeResult]:
    """The fast path's arms are Timer records (an Arm subclass): compare them as Arms."""
    return [Arm(*msgspec.structs.astuple(r)) if type(r) is Timer else r for r in results]


def per_line(results: list[DecodeResult]) -> list[object]:
    """Messages as Arms, and each error as (class, reason) once per line it stands for:
    the reader reports a run of lines with one error as one value."""
    out: list[object] = []
    for r in as_messages(results):
        if isinstance(r, RemoteProtocolError):
            out += [(type(r), r.reason)] * r.lines
        else:
            out.append(r)
    return out


v2_lines = st.builds(
    lambda pid, scope, sig: encode(Arm(pid=pid, scope_id=scope, deadline=5.5, signal=sig)),
    st.integers(1, 2**31 - 1),
    st.text(max_size=20),
    st.integers(0, 64),
) | st.builds(
    lambda pid, scope: encode(Disarm(pid=pid, scope_id=scope)),
    st.integers(1, 100),
    st.text(max_size=5),
)
# Label keys the reader must refuse as the protocol does (a Timer's decoding leaves them
# to it), beside valid ones; any text, too.
label_keys = (
    st.sampled_from(["job", "rank", "local_rank", "_", "a" * 32])
    | st.sampled_from(["bad key", "job\n", "1x", "", "a" * 33, "rank-0", "é"])
    | st.text(max_size=8)
)
labelled_lines = st.builds(
    lambda pid, name, labels: (
        b'{"version":2,"op":"arm","pid":%d,"scope_id":"s","deadline":1,'
        b'"signal":9,%s:%s}\n' % (pid, name, msgspec.json.encode(labels))
    ),
    st.integers(1, 100),
    # JSON may escape any character of a name: the check is on what was decoded.
    st.sampled_from([b'"labels"', b'"label\\u0073"']),
    st.dictionaries(label_keys, st.text(max_size=4), max_size=4),
)
v1_lines = st.builds(
    lambda pid, t: encode(TimerRequestV1(pid=pid, scope_id="s", expiration_time=t, signal=9)),
    st.integers(1, 100),
    st.floats(-1, 1e10),
) | st.builds(
    lambda pid: (
        json.dumps(
            {"version": 1, "pid": pid, "scope_id": "a.py#1", "expiration_time": -1, "signal": 0}
        )
        + "\n"
    ).encode(),
    st.integers(1, 100),
)
junk = st.sampled_from(
    [
        b"\n",
        b" \t\r\n",
        b"\x0b\n",
        b"garbage\n",
        # two messages on one line: msgspec's decode_lines would take both
        b'{"version":2,"op":"sync","token":"a"} {"version":2,"op":"sync","token":"b"}\n',
        b'{"op":"sync","token":"no version"}\n',
        b'{"version":2,"op":"arm"',  # partial
        b'{"version":3,"op":"arm","pid":1}\n',
        b'{"version":2,"op":"arm","pid":0,"scope_id":"x","deadline":1,"signal":9}\n',
        b"x" * (PIPE_BUF + 10) + b"\n",
        b'{"version":2,"op":"disarm","pid":5,"scope_id":"' + b"y" * PIPE_BUF + b'"}\n',
        b'{"version": 1, "pid": 3}\n',
        b"\xff\xfe\x00",
        b"y\n" * 5,  # a yes flood
        b"[]\n{}\n{}\n",
        b'{"version":2,"op":"bogus"}\n' * 3,  # one bad line, repeated
        # a label named "version": its "{\"version\"" is inside a valid message
        b'junk{"version":2,"op":"arm","pid":9,"scope_id":"s","deadline":1,"signal":9,'
        b'"labels":{"version":"x"}}\n',
        # one JSON object spread over two lines is two bad lines, not a message
        b'{"version":2,"op":"disarm",\n"pid":5,"scope_id":"s"}\n',
    ]
)


@settings(max_examples=300)
@given(
    st.lists(st.one_of(v2_lines, v2_lines, v1_lines, labelled_lines, junk), max_size=40),
    st.lists(st.integers(1, 600), max_size=30),
)
def test_same_results_as_the_stream_decoder(parts: list[bytes], cuts: list[int]) -> None:
    stream = b"".join(parts)
    expected = StreamDecoder().feed(stream)
    reader, got, pos = LineReader(), [], 0
    for cut in cuts:
        got += reader.feed(stream[pos : pos + cut])
        pos += cut
    got += reader.feed(stream[pos:])
    assert per_line(got) == per_line(expected)


@settings(max_examples=300)
@given(st.one_of(v2_lines, v1_lines, labelled_lines, junk))
def test_one_line_decodes_as_decode_value_does_with_arms_as_timers(line: bytes) -> None:
    # How the socket decodes a datagram: its arms, as Timers, take the table's batch path.
    body = line[:-1] if line.endswith(b"\n") else line
    assume(len(body) <= PIPE_BUF)  # the socket refuses a longer one before decoding it
    got = decode_one(body)
    expected = decode_value(body)
    assert per_line([got]) == per_line([expected])
    assert (type(got) is Timer) == isinstance(expected, Arm)


def test_a_run_of_one_version_is_decoded_in_one_call() -> None:
    lines = [encode(Arm(pid=7, scope_id=f"s{i}", deadline=1.0, signal=9)) for i in range(100)]
    reader, run = LineReader(), b"".join(lines)
    assert reader._fast(run, 0, len(run)) is not None
    assert reader._fast(b"junk\n" + run, 5, len(run) + 5) is not None
    assert reader._fast(run + b"junk\n", 0, len(run) + 5) is None
    results = reader.feed(b"".join(lines))
    assert all(type(r) is Timer for r in results)
    assert as_messages(results) == StreamDecoder().feed(b"".join(lines))


@settings(max_examples=300)
@given(st.lists(st.integers(0, 150), min_size=1, max_size=30), st.integers(10, 200))
def test_over_long_lines_are_found_by_the_block_scan(lengths: list[int], max_line: int) -> None:
    # A run of valid lines of every length around max_line: only length can refuse one.
    stream = b"".join(encode(Disarm(pid=5, scope_id="y" * n)) for n in lengths)
    reader = LineReader(max_line)
    too_long = max(map(len, stream.split(b"\n"))) > max_line
    assert reader._may_hold_a_long_line(stream, 0, len(stream)) == too_long
    assert per_line(reader.feed(stream)) == per_line(StreamDecoder(max_line).feed(stream))


@given(st.lists(st.integers(0, 3), max_size=20), st.integers(10, 40), st.integers(-2, 2))
def test_the_block_scan_is_exact(lines: list[int], max_line: int, delta: int) -> None:
    # Lines of random lengths, with one of about max_line among them.
    whole = b"".join(b"a" * n + b"\n" for n in [*lines, max_line + delta, *lines])
    too_long = max(map(len, whole.split(b"\n"))) > max_line
    chunk = b"ab\n" + whole + b"cd"  # the run as part of a chunk
    assert LineReader(max_line)._may_hold_a_long_line(chunk, 3, 3 + len(whole)) == too_long


def test_a_flood_of_junk_is_one_error_per_run() -> None:
    arm = encode(Arm(pid=7, scope_id="s", deadline=1.0, signal=9))
    stream = b"y\n" * 1000 + arm + b"n\n" * 10 + b"{}\n" * 3 + b"y\n"
    results = LineReader().feed(stream)
    assert [(type(r).__name__, getattr(r, "lines", None)) for r in results] == [
        ("MalformedMessage", 1000),
        ("Arm", None),  # lines around junk take the slow path: an Arm, not a Timer
        ("MalformedMessage", 10),  # "n": not a JSON object either, so one run
        ("MalformedMessage", 3),  # {}: an object without "version"
        ("MalformedMessage", 1),
    ]
    assert results[0] == MalformedMessage("not a JSON object", b"y", lines=1000)


def test_blank_lines_after_junk_are_not_junk() -> None:
    # Found by the property test: a blank line equal to the last blank one was counted.
    [error] = LineReader().feed(b"\x0b\n\n\n \n\x0b\n")
    assert error.lines == 2  # type: ignore[union-attr]


def test_a_json_object_over_two_lines_is_not_a_message() -> None:
    # msgspec's decode_lines reads values separated by any white space, newlines included.
    stream = b'{"version":2,"op":"disarm",\n"pid":5,"scope_id":"s"}\n'
    assert [type(r) for r in LineReader().feed(stream)] == [MalformedMessage, MalformedMessage]


def test_an_object_spread_over_lines_that_each_open_as_a_message_is_no_message() -> None:
    # Each line opens with the prefix and there are as many values as lines, so the fast
    # path took it: the first line's object, closed on the second line, was an arm.
    stream = (
        b'{"version":2,"op":"arm","pid":4242,"scope_id":"a","deadline":1,"signal":9,"x":[\n'
        b'{"version":2,"op":"disarm"}]}{"version":2,"op":"sync","token":"t"}\n'
    )
    assert per_line(LineReader().feed(stream)) == per_line(StreamDecoder().feed(stream))
    assert not any(isinstance(r, Arm) for r in LineReader().feed(stream))


@settings(max_examples=100)
@given(st.lists(labelled_lines, min_size=1, max_size=20))
def test_a_run_of_labelled_arms_is_refused_as_the_protocol_refuses_it(
    lines: list[bytes],
) -> None:
    # The run decoded in one call: any arm whose label key the protocol refuses sends
    # the run the slow way, which refuses that line alone and says why.
    stream = b"".join(lines)
    assert per_line(LineReader().feed(stream)) == per_line(StreamDecoder().feed(stream))


@settings(max_examples=1000)
@given(st.text(max_size=40) | st.from_regex(LABEL_KEY_PATTERN))
def test_label_keys_are_valid_as_the_protocol_pattern_says(key: str) -> None:
    assert valid_label_keys({key: "v"}) == bool(re.search(LABEL_KEY_PATTERN, key))
    assert not valid_label_keys({"job": "v", key: "v", "bad key": "v"})


def test_label_keys_found_valid_are_remembered_within_a_bound() -> None:
    # Valid keys are remembered (a worker sends the same few on every arm); a flood of
    # distinct ones neither grows the server's memory without bound nor lets an invalid
    # key through beside remembered ones.
    for i in range(5000):
        assert valid_label_keys({f"k{i}": "v", f"n{i}": "v", "job": "v"})
    assert 3 <= len(_records._VALID_KEYS) <= _records._MAX_VALID_KEYS
    assert "k4999" not in _records._VALID_KEYS
    assert valid_label_keys({"k4999": "v", "job": "v"})
    for bad in ("bad key", "x" * 33, "ключ", "9lives", ""):
        assert not valid_label_keys({"job": "v", bad: "v"})
        assert bad not in _records._VALID_KEYS


def test_a_label_named_version_does_not_cost_the_message() -> None:
    arm = Arm(pid=9, scope_id="s", deadline=1.0, signal=9, labels={"version": "x"})
    line = encode(arm)
    assert line.count(b'{"version"') == 2
    for reader in (LineReader(), StreamDecoder()):
        results = reader.feed(b'{"version":2,"op":"ar' + line)  # a writer died mid-line
        assert isinstance(results[0], MalformedMessage)
        assert as_messages(results[1:]) == [arm]
