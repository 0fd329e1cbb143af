"""The message schema at its bounds, as docs/protocol.md gives them, and the message
structs themselves: frozen, their positional order, the documented lines (from mutation
testing of _messages.py and _limits.py)."""

from __future__ import annotations

import math
import typing
from typing import Any, Dict

import pytest

from ftimer_protocol import (
    MAX_LABEL_VALUE,
    MAX_LABELS,
    MAX_PID,
    MAX_SCOPE,
    MAX_SIGNAL,
    MAX_TIME,
    MAX_TOKEN,
    PIPE_BUF,
    Arm,
    Disarm,
    DisarmAll,
    DumpHook,
    Expire,
    Message,
    MessageV2,
    Sync,
    TimerRequestV1,
    decode,
    encode,
)

# Large enough for any message here: the schema, not the framed size, is under test.
_NO_LIMIT = 1 << 20


def _labels(count: int, value: str = "v") -> Dict[str, str]:
    return {f"k{i}": value for i in range(count)}


def test_the_limits_are_the_documented_numbers() -> None:
    """pid 1..2^31-1, scope_id and label values and tokens of at most 4096, 128 and 128
    characters, at most 16 labels, times within 10^15 (docs/protocol.md's tables)."""
    assert MAX_PID == 2147483647
    assert MAX_SCOPE == 4096
    assert MAX_TIME == 1e15
    assert MAX_LABELS == 16
    assert MAX_LABEL_VALUE == 128
    assert MAX_TOKEN == 128


# (a message at the bound, the same message one step past it)
_BOUNDS: Dict[str, Any] = {
    "pid at most MAX_PID": (
        Disarm(MAX_PID, "s"),
        Disarm(MAX_PID + 1, "s"),
    ),
    "scope_id at most MAX_SCOPE characters": (
        Disarm(1, "x" * MAX_SCOPE),
        Disarm(1, "x" * (MAX_SCOPE + 1)),
    ),
    "deadline at most MAX_TIME": (
        Arm(1, "s", MAX_TIME, 9),
        Arm(1, "s", math.nextafter(MAX_TIME, math.inf), 9),
    ),
    "start_time from 0": (
        Arm(1, "s", 1.0, 9, start_time=0),
        Arm(1, "s", 1.0, 9, start_time=-1),
    ),
    "start_time at most 2**63-1": (
        DisarmAll(1, start_time=2**63 - 1),
        DisarmAll(1, start_time=2**63),
    ),
    "a label value at most MAX_LABEL_VALUE characters": (
        Arm(1, "s", 1.0, 9, labels={"job": "v" * MAX_LABEL_VALUE}),
        Arm(1, "s", 1.0, 9, labels={"job": "v" * (MAX_LABEL_VALUE + 1)}),
    ),
    "at most MAX_LABELS labels": (
        Expire(1, "s", 9, labels=_labels(MAX_LABELS)),
        Expire(1, "s", 9, labels=_labels(MAX_LABELS + 1)),
    ),
    "a version 1 time from -MAX_TIME": (
        TimerRequestV1(1, "s", -MAX_TIME, 9),
        TimerRequestV1(1, "s", math.nextafter(-MAX_TIME, -math.inf), 9),
    ),
    "a version 1 signal from -2**63": (
        TimerRequestV1(1, "s", 1.0, -(2**63)),
        TimerRequestV1(1, "s", 1.0, -(2**63) - 1),
    ),
    "a version 1 signal at most MAX_SIGNAL": (
        TimerRequestV1(1, "s", 1.0, MAX_SIGNAL),
        TimerRequestV1(1, "s", 1.0, MAX_SIGNAL + 1),
    ),
    "a dump signal from 1": (
        Arm(1, "s", 1.0, 9, dump=DumpHook(1, 3)),
        Arm(1, "s", 1.0, 9, dump=DumpHook(0, 3)),
    ),
    "a dump signal at most MAX_SIGNAL": (
        Expire(1, "s", 9, dump=DumpHook(MAX_SIGNAL, 3)),
        Expire(1, "s", 9, dump=DumpHook(MAX_SIGNAL + 1, 3)),
    ),
    "a dump fd from 0": (
        Arm(1, "s", 1.0, 9, dump=DumpHook(12, 0)),
        Arm(1, "s", 1.0, 9, dump=DumpHook(12, -1)),
    ),
    "a token at most MAX_TOKEN characters": (
        Sync("t" * MAX_TOKEN),
        Sync("t" * (MAX_TOKEN + 1)),
    ),
}


@pytest.mark.parametrize("bound", list(_BOUNDS))
def test_each_bound_of_the_schema_is_where_the_docs_put_it(bound: str) -> None:
    """A message at a documented bound is valid and survives a round trip; one step past
    it is refused."""
    at, past = _BOUNDS[bound]
    line = encode(at, limit=_NO_LIMIT)
    if len(line) <= PIPE_BUF:  # a reader takes no longer line
        assert decode(line) == at
    with pytest.raises(ValueError, match="invalid "):
        encode(past, limit=_NO_LIMIT)


def test_a_negative_version_1_signal_is_report_only_and_valid() -> None:
    """torch's client sends a negative signal for "will not kill": version 1 takes it."""
    message = TimerRequestV1(4242, "s", 1.0, -1)
    assert decode(encode(message)) == message
    assert decode(
        b'{"version": 1, "pid": 4242, "scope_id": "s", "expiration_time": 1.0, "signal": -9}'
    ) == TimerRequestV1(4242, "s", 1.0, -9)


@pytest.mark.parametrize(
    ("time", "release"), [(-1.0, True), (-1e-9, True), (0.0, False), (0.5, False), (1.0, False)]
)
def test_only_a_negative_time_releases(time: float, release: bool) -> None:
    """A version 1 request releases its scope when its time is negative; 0 arms."""
    assert TimerRequestV1(1, "s", time, 9).is_release is release


_DOCUMENTED = [
    (
        Arm(4242, "step", 81234.5, 9, 1234567, {"job": "llm", "rank": "3"}),
        b'{"version":2,"op":"arm","pid":4242,"scope_id":"step","deadline":81234.5,"signal":9,'
        b'"start_time":1234567,"labels":{"job":"llm","rank":"3"}}',
    ),
    (
        Disarm(4242, "step", 1234567),
        b'{"version":2,"op":"disarm","pid":4242,"scope_id":"step","start_time":1234567}',
    ),
    (
        DisarmAll(4242, 1234567),
        b'{"version":2,"op":"disarm_all","pid":4242,"start_time":1234567}',
    ),
    (
        Expire(4242, "step", 6, 1234567),
        b'{"version":2,"op":"expire","pid":4242,"scope_id":"step","signal":6,"start_time":1234567}',
    ),
    (Sync("c5e1"), b'{"version":2,"op":"sync","token":"c5e1"}'),
    (
        TimerRequestV1(4242, "train.py#57", 1764000000.5, 9),
        b'{"version":1,"pid":4242,"scope_id":"train.py#57","expiration_time":1764000000.5,'
        b'"signal":9}',
    ),
]


@pytest.mark.parametrize(("message", "line"), _DOCUMENTED)
def test_the_documented_lines_are_these_messages(message: Message, line: bytes) -> None:
    """The example lines of docs/protocol.md are the messages built from their members in
    the documented order, written byte for byte as the docs show them."""
    assert encode(message) == line + b"\n"
    assert decode(line) == message


def test_arm_and_expire_take_the_dump_hook_last() -> None:
    """Arm's and Expire's optional members come in the order start_time, labels, dump."""
    hook = DumpHook(12, 3)
    arm = Arm(1, "s", 2.0, 9, 7, {"job": "j"}, hook)
    expire = Expire(1, "s", 9, 7, {"job": "j"}, hook)
    for message in (arm, expire):
        assert (message.start_time, message.labels, message.dump) == (7, {"job": "j"}, hook)
        assert decode(encode(message)) == message


@pytest.mark.parametrize("message", [row[0] for row in _DOCUMENTED] + [DumpHook(12, 3)])
def test_messages_are_frozen_and_hashable(message: Any) -> None:
    """Every message (and a dump hook) is immutable, and equal ones hash alike."""
    field = type(message).__struct_fields__[0]
    with pytest.raises(AttributeError):
        setattr(message, field, getattr(message, field))
    twin = type(message)(*(getattr(message, f) for f in type(message).__struct_fields__))
    if getattr(message, "labels", None) is None:  # labels are a dict
        assert hash(twin) == hash(message)
    assert twin == message


def test_the_message_unions_name_every_message() -> None:
    """``Message`` is every message of either version, ``MessageV2`` those of version 2."""
    v2 = {Arm, Disarm, DisarmAll, Expire, Sync}
    assert set(typing.get_args(MessageV2)) == v2
    assert set(typing.get_args(Message)) == v2 | {TimerRequestV1}
