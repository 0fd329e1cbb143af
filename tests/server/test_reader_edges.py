"""Edges of the server's line reader, and of its records, that other tests leave open.

Found by mutation testing. Pinned here: a line holding two messages is an error even inside
a run of one version; a line one byte too long is refused even alone in a read; label count
and value bounds hold on the fast path; distinct lines with one error are one error value
that counts each line once, and a junk line after another error is not counted as that
error; a message behind junk is never lost to a run; lines are cut at newlines only; JSON
nested too deep is an error, never an exception; after a pending line the rest of the read
still takes the fast path; and the rules of ``extends_run`` and ``request_of``.
"""

from __future__ import annotations

import msgspec

from ftimer_protocol import (
    MAX_LABEL_VALUE,
    MAX_LABELS,
    PIPE_BUF,
    Arm,
    DecodeResult,
    Disarm,
    DisarmAll,
    Expire,
    LineTooLong,
    MalformedMessage,
    RemoteProtocolError,
    StreamDecoder,
    Sync,
    TimerRequestV1,
    UnsupportedVersion,
    encode,
)
from ftimer_server import Timer
from ftimer_server.core._reader import LineReader, decode_one, extends_run
from ftimer_server.core._records import ABOUT_A_PROCESS, request_of


def per_line(results: list[DecodeResult]) -> list[object]:
    """Arms as ``Arm`` and each error as (class, reason) once per line it stands for."""
    out: list[object] = []
    for r in results:
        if type(r) is Timer:
            out.append(Arm(*msgspec.structs.astuple(r)))
        elif isinstance(r, RemoteProtocolError):
            out += [(type(r), r.reason)] * r.lines
        else:
            out.append(r)
    return out


def test_two_messages_on_one_line_are_an_error_even_in_a_run_of_one_version() -> None:
    # Every line opens with the v2 prefix and the run has one "}\n{" per line break, so
    # only the count of values against the count of lines tells this line from two.
    two = b'{"version":2,"op":"sync","token":"a"}{"version":2,"op":"sync","token":"b"}\n'
    disarm = Disarm(pid=5, scope_id="s")
    stream = two + encode(disarm)
    results = LineReader().feed(stream)
    assert per_line(results) == per_line(StreamDecoder().feed(stream))
    assert isinstance(results[0], MalformedMessage)
    assert Sync(token="a") not in results
    assert results[1:] == [Sync(token="b"), disarm]  # the valid line is not lost


def test_distinct_lines_with_one_error_are_one_error_value() -> None:
    # Not one line repeated (that has its own shortcut): each line differs, the error does
    # not, so a flood of them costs one error (one event, one log line).
    stream = b"".join(b'{"version":3,"op":"arm","pid":%d}\n' % i for i in range(50))
    [error] = LineReader().feed(stream)
    assert isinstance(error, UnsupportedVersion)
    assert error.lines == 50


def test_a_junk_line_after_another_error_is_not_counted_as_that_error() -> None:
    # "y" and "n" are junk of one kind, but the line between them has another error: "n"
    # starts a new run instead of being counted in the version 3 line's.
    stream = b'y\n{"version":3,"op":"arm","pid":1}\nn\n'
    results = LineReader().feed(stream)
    assert per_line(results) == per_line(StreamDecoder().feed(stream))
    assert [type(r) for r in results] == [MalformedMessage, UnsupportedVersion, MalformedMessage]


def test_after_a_pending_line_a_junk_flood_is_still_one_error() -> None:
    reader = LineReader()
    assert reader.feed(b"garb") == []
    assert (reader.buffered, reader.unfinished) == (4, b"garb")
    first, flood = reader.feed(b"age\n" + b"y\n" * 1000)
    assert first == MalformedMessage("not a JSON object", b"garbage")
    assert flood == MalformedMessage("not a JSON object", b"y", lines=1000)
    assert reader.buffered == 0


def test_after_a_pending_line_the_arms_of_the_read_are_timers() -> None:
    arms = [Arm(pid=7, scope_id=f"s{i}", deadline=1.0, signal=9) for i in range(20)]
    line = encode(arms[0])
    reader = LineReader()
    assert reader.feed(line[:10]) == []
    results = reader.feed(line[10:] + b"".join(encode(a) for a in arms[1:]))
    assert per_line(results) == arms
    assert all(type(r) is Timer for r in results[1:])  # the fast path's records


def test_extends_run_only_for_the_same_error() -> None:
    run = MalformedMessage("not a JSON object", b"y")
    assert extends_run(run, MalformedMessage("not a JSON object", b"n"))
    assert not extends_run(None, MalformedMessage("not a JSON object", b"n"))
    assert not extends_run(run, MalformedMessage('no "version" member', b"{}"))
    assert not extends_run(run, LineTooLong("not a JSON object", b"y"))  # another class
    assert not extends_run(run, Sync(token="t"))


def test_distinct_junk_lines_of_one_kind_are_each_counted() -> None:
    # Not one line repeated: each is counted once in its run, none dropped or twice.
    [not_objects] = LineReader().feed(b"y\nn\n  q\n")
    assert not_objects == MalformedMessage("not a JSON object", b"y", lines=3)
    [no_version] = LineReader().feed(b'{}\n{"a":1}\n {"b":2}\n{"c":3}\n')
    assert no_version == MalformedMessage('no "version" member', b"{}", lines=4)


def test_a_message_behind_junk_is_not_lost_in_a_run_of_that_junk() -> None:
    # The second line's junk extends the first line's error; its message is still read.
    arm = Arm(pid=7, scope_id="s", deadline=1.0, signal=9)
    stream = b"y\n" + b"y" + encode(arm)
    results = LineReader().feed(stream)
    assert results == [MalformedMessage("not a JSON object", b"y", lines=2), arm]
    assert per_line(results) == per_line(StreamDecoder().feed(stream))


def test_a_repeated_line_of_junk_and_a_message_gives_each_message() -> None:
    # The line's last result is a message, so the next, equal line is no flood of an error.
    arm = Arm(pid=7, scope_id="s", deadline=1.0, signal=9)
    stream = (b"xx" + encode(arm)) * 2
    results = LineReader().feed(stream)
    assert per_line(results) == per_line(StreamDecoder().feed(stream))
    assert results.count(arm) == 2


def test_a_line_one_byte_too_long_is_refused_in_a_run_of_its_own() -> None:
    # The read is the line alone: max_line + 1 bytes and its newline, a valid message but
    # for its length. The fast path must not take it.
    for max_line in (50, 51, PIPE_BUF):
        body = b'{"version":2,"op":"disarm","pid":5,"scope_id":"'
        line = body + b"y" * (max_line + 1 - len(body) - 2) + b'"}'
        assert len(line) == max_line + 1
        for stream in (line + b"\n", b"\n" + line + b"\n"):
            results = LineReader(max_line).feed(stream)
            assert [type(r) for r in results] == [LineTooLong]
        ok = line[:-3] + b'"}\n'  # one byte shorter: taken
        scope = "y" * (max_line - len(body) - 2)
        assert LineReader(max_line).feed(ok) == [Disarm(pid=5, scope_id=scope)]


def test_junk_with_white_space_before_its_object_keeps_its_own_error() -> None:
    # " {}" holds an object (without "version"): not counted in the "y" line's run.
    stream = b"y\n {}\n\t{}\n"
    results = LineReader().feed(stream)
    assert results == [
        MalformedMessage("not a JSON object", b"y"),
        MalformedMessage('no "version" member', b" {}", lines=2),
    ]
    assert per_line(results) == per_line(StreamDecoder().feed(stream))


def test_lines_are_cut_at_newlines_only() -> None:
    # A carriage return is JSON white space inside a message, not a line break.
    stream = b'y\n{"version":2,\r"op":"sync","token":"t"}\n'
    assert LineReader().feed(stream) == [
        MalformedMessage("not a JSON object", b"y"),
        Sync(token="t"),
    ]


def test_json_nested_too_deep_is_an_error_not_an_exception() -> None:
    # msgspec raises RecursionError for it: feed() and decode_one() never raise.
    line = b'{"version":2,"op":"sync","token":"t","x":' + b"[" * 1500 + b"]" * 1500 + b"}"
    assert len(line) <= PIPE_BUF
    for results in (LineReader().feed(line + b"\n"), [decode_one(line)]):
        [error] = results
        assert isinstance(error, MalformedMessage)
    sync = encode(Sync(token="u"))
    assert LineReader().feed(line + b"\n" + sync)[1:] == [Sync(token="u")]


def test_label_bounds_hold_on_the_fast_path_as_on_the_slow_one() -> None:
    # A Timer's labels drop only the key pattern: the count and value bounds still apply.
    def arm_line(labels: dict[str, str], pid: int = 5) -> bytes:
        head = b'{"version":2,"op":"arm","pid":%d,"scope_id":"s","deadline":1,"signal":9,' % pid
        return head + b'"labels":' + msgspec.json.encode(labels) + b"}\n"

    ok = {f"k{i}": "v" * MAX_LABEL_VALUE for i in range(MAX_LABELS)}
    too_long = {"job": "v" * (MAX_LABEL_VALUE + 1)}
    too_many = {f"k{i}": "v" for i in range(MAX_LABELS + 1)}
    for labels in (ok, too_long, too_many):
        valid = labels is ok
        line = arm_line(labels)
        stream = arm_line({}, 1) + line + arm_line({}, 2)  # one run of one version
        results = LineReader().feed(stream)
        assert per_line(results) == per_line(StreamDecoder().feed(stream))
        assert isinstance(results[1], Timer if valid else MalformedMessage)
        assert isinstance(decode_one(line[:-1]), Timer if valid else MalformedMessage)


def test_request_of_names_what_each_message_asks() -> None:
    # A version 1 request disarms only with a negative time (torch's release); zero arms.
    v1 = TimerRequestV1
    assert request_of(v1(pid=1, scope_id="s", expiration_time=-1, signal=0)) == "disarm"
    assert request_of(v1(pid=1, scope_id="s", expiration_time=-0.5, signal=0)) == "disarm"
    assert request_of(v1(pid=1, scope_id="s", expiration_time=0, signal=9)) == "arm"
    assert request_of(v1(pid=1, scope_id="s", expiration_time=0.5, signal=9)) == "arm"
    arm = Arm(pid=1, scope_id="s", deadline=1.0, signal=9)
    assert request_of(arm) == "arm"
    assert request_of(Timer(*msgspec.structs.astuple(arm))) == "arm"
    assert request_of(Disarm(pid=1, scope_id="s")) == "disarm"
    assert request_of(DisarmAll(pid=1)) == "disarm_all"
    assert request_of(Expire(pid=1, scope_id="s", signal=9)) == "expire"
    assert request_of(Sync(token="t")) == "sync"


def test_every_message_naming_a_pid_is_about_a_process() -> None:
    # The watchdog's journal and the socket's senders go by this set: a type left out
    # (a fast-path Timer above all) would be skipped there.
    for kind in (Timer, Arm, Disarm, DisarmAll, Expire, TimerRequestV1):
        assert "pid" in kind.__struct_fields__
        assert kind in ABOUT_A_PROCESS
    assert "pid" not in Sync.__struct_fields__
    assert Sync not in ABOUT_A_PROCESS
