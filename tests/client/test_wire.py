"""The lines the client builds without a validating round trip are valid messages.

Property tests over scope names and durations at the schema's limits.
"""

from __future__ import annotations

import enum
import math
import os
import time

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from ftimer_client import FileTimerClient
from ftimer_client._proc import default_labels, process_start_time
from ftimer_client._wire import DEADLINE_FORMAT, V1Lines, V2Lines, check_signal, fix_deadline
from ftimer_protocol import (
    MAX_LABEL_VALUE,
    MAX_PID,
    MAX_SCOPE,
    MAX_TIME,
    PIPE_BUF,
    Arm,
    Disarm,
    DumpHook,
    FileTimerRequest,
    LocalProtocolError,
    MessageTooLarge,
    TimerRequestV1,
    decode,
    encode,
    parse_start_time,
)

from .conftest import FifoPeer

PID, START = 4242, 123456
LABELS = {"job": "j" * 128, "rank": "7"}
deadlines = st.one_of(
    st.floats(min_value=0.0, max_value=MAX_TIME),
    st.sampled_from([0.0, 5e-324, 1e-7, 0.5, 1e6, MAX_TIME, math.nextafter(MAX_TIME, 0)]),
)
scopes = st.one_of(
    st.text(max_size=300),
    st.text(alphabet='%"\\\n\x00\u2028é😀{}', max_size=60),
    st.sampled_from(['"deadline":0.0', "%s%r%b%%", "x" * MAX_SCOPE]),
)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(scope=scopes, deadline=deadlines, labels=st.sampled_from([None, LABELS]))
def test_cached_arm_line_is_the_message(scope: str, deadline: float, labels: dict) -> None:
    lines = V2Lines(PID, START, 9, labels)
    try:
        arm_format, disarm = lines.entry(scope)
    except MessageTooLarge:
        # Refused only when the widest deadline would not fit.
        sample = encode(Arm(PID, scope, 0.0, 9, START, labels), limit=2**20)
        assert len(sample) - len(b"0.0") + len(DEADLINE_FORMAT % MAX_TIME) > PIPE_BUF
        return
    line = arm_format % deadline
    assert len(line) <= PIPE_BUF
    assert line.endswith(b"\n")
    assert line.count(b"\n") == 1
    expected = Arm(PID, scope, float(DEADLINE_FORMAT % deadline), 9, START, labels)
    assert decode(line) == expected
    assert len(arm_format % MAX_TIME) <= PIPE_BUF
    assert decode(disarm) == Disarm(PID, scope, START)
    assert lines.entry(scope) == (arm_format, disarm)  # cached


# Labels and hooks whose encoding holds what the line builder splits on: a label named
# scope_id whose value is empty, '%', quotes.
ODD_LABELS = {"scope_id": "", "deadline": "0.0", "p": "%s%%", "q": '"scope_id":""'}


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(
    scope=scopes,
    labels=st.sampled_from([None, LABELS, ODD_LABELS]),
    dump=st.sampled_from([None, DumpHook(12, 5), DumpHook(34, 2**31 - 1)]),
    signal=st.sampled_from([0, 9, 64]),
)
def test_a_new_scopes_lines_are_the_encoders_byte_for_byte(
    scope: str, labels: dict, dump: DumpHook, signal: int
) -> None:
    # The lines of a scope never seen are built from pieces around its JSON string; the
    # validating encoder is the reference.
    lines = V2Lines(PID, START, signal, labels, dump)
    deadline = 12345.678901
    try:
        arm_format, disarm = lines.entry(scope)
    except MessageTooLarge:
        sample = encode(Arm(PID, scope, 0.0, signal, START, labels, dump), limit=2**20)
        assert len(sample) - len(b"0.0") + len(DEADLINE_FORMAT % MAX_TIME) > PIPE_BUF - (
            0 if dump is None else len(str(2**31 - 1)) - len(str(dump.fd))
        )
        return
    assert arm_format % deadline == encode(Arm(PID, scope, deadline, signal, START, labels, dump))
    assert disarm == encode(Disarm(PID, scope, START))


def test_what_makes_a_scope_invalid_is_refused_as_the_encoder_does() -> None:
    lines = V2Lines(PID, START, 9, None)
    for bad in ("\ud800", "a\udfffb"):
        with pytest.raises(LocalProtocolError):
            lines.entry(bad)
    for not_str in (None, b"bytes", 5):
        with pytest.raises(LocalProtocolError, match=r"^a scope is a str, not "):
            lines.entry(not_str)  # type: ignore[arg-type]
        with pytest.raises(LocalProtocolError, match=r"^a scope is a str, not "):
            V1Lines(PID, 9).arm(not_str, 1.0)  # type: ignore[arg-type]


def test_a_str_subclass_is_a_scope_as_for_torch() -> None:
    class Phase(str, enum.Enum):  # the encoder takes only str itself; torch's any str
        STEP = "step"

        def __str__(self) -> str:
            return "Phase.STEP"

    lines = V2Lines(PID, START, 9, None)
    assert lines.entry(Phase.STEP) == lines.entry("step")
    assert lines.arm(Phase.STEP, 1.0, 9) == lines.arm("step", 1.0, 9)
    assert lines.expire(Phase.STEP, 9) == lines.expire("step", 9)
    assert V1Lines(PID, 9).arm(Phase.STEP, 1.0) == V1Lines(PID, 9).arm("step", 1.0)


def test_scope_length_limits() -> None:
    # The widest pid and start time: the longest scope fills PIPE_BUF (see
    # test_wire_review_fixes.py for the room kept for a forked child's).
    lines = V2Lines(MAX_PID, 2**63 - 1, 9, None)
    overhead = len(lines.entry("")[0] % MAX_TIME)
    longest = "x" * (PIPE_BUF - overhead)
    assert len(lines.entry(longest)[0] % MAX_TIME) == PIPE_BUF
    with pytest.raises(MessageTooLarge):
        lines.entry(longest + "x")
    with pytest.raises(LocalProtocolError):
        lines.entry("x" * (MAX_SCOPE + 1))
    with pytest.raises(LocalProtocolError):
        lines.entry(42)  # type: ignore[arg-type]


def test_v1_lines() -> None:
    v1 = V1Lines(PID, 15)
    assert decode(v1.arm("s", 1.7e9)) == TimerRequestV1(PID, "s", 1.7e9, 15)
    assert decode(v1.release("s")) == TimerRequestV1(PID, "s", -1.0, 0)
    with pytest.raises(ValueError, match=">= 0"):
        v1.arm("s", -5.0)
    with pytest.raises(ValueError, match=">= 0"):
        v1.arm("s", math.nan)


@pytest.mark.parametrize("scope", ["s", "schritt-\u00fc", "\u6b65", "emoji-\U0001f600", 'tab\t"q"'])
def test_v1_lines_are_torchs_byte_for_byte(scope: str) -> None:
    # They were msgspec's compact UTF-8: torch's server reads its FIFO in the locale's
    # encoding, and under an ASCII locale a UTF-8 byte failed its whole batch (other
    # workers' releases included). torch's client writes json.dumps(): ASCII escapes.
    v1 = V1Lines(PID, 9)
    arm, release = v1.arm(scope, 1.7e9 + 0.25), v1.release(scope)
    assert arm == (FileTimerRequest(PID, scope, 1.7e9 + 0.25, 9).to_json() + "\n").encode()
    assert release == (FileTimerRequest(PID, scope, -1, 0).to_json() + "\n").encode()
    assert arm.isascii()
    assert decode(arm) == TimerRequestV1(PID, scope, 1.7e9 + 0.25, 9)
    assert decode(release) == TimerRequestV1(PID, scope, -1.0, 0)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(scope=scopes, time=deadlines, signal=st.sampled_from([0, 9, 64]))
def test_any_v1_line_is_torchs_json_dumps(scope: str, time: float, signal: int) -> None:
    v1 = V1Lines(PID, signal)
    for line, request in (
        (lambda: v1.arm(scope, time), FileTimerRequest(PID, scope, time, signal)),
        (lambda: v1.release(scope), FileTimerRequest(PID, scope, -1, 0)),
    ):
        expected = (request.to_json() + "\n").encode()
        if len(expected) > PIPE_BUF:
            with pytest.raises(MessageTooLarge):
                line()
        else:
            assert line() == expected
            assert decode(expected) == request.to_message()


def test_a_v1_line_must_fit_pipe_buf_with_its_escapes() -> None:
    v1 = V1Lines(PID, 9)
    scope = "\u00fc" * 1000  # 2000 bytes in UTF-8, 6000 escaped
    with pytest.raises(MessageTooLarge):
        v1.arm(scope, 1.7e9)
    with pytest.raises(MessageTooLarge):
        v1.release(scope)
    with pytest.raises(LocalProtocolError):
        v1.arm("\ud800", 1.7e9)  # json.dumps escapes it; UTF-8 cannot carry it
    with pytest.raises(LocalProtocolError):
        v1.arm("x", MAX_TIME * 2)
    with pytest.raises(LocalProtocolError):
        v1.arm("x", 1.0, -(2**64))
    with pytest.raises(LocalProtocolError):
        V1Lines(0, 9)


@pytest.mark.parametrize("bad", [math.nan, -math.inf])
def test_fix_deadline_refuses_what_is_not_a_time(bad: float) -> None:
    with pytest.raises(ValueError, match="must be a number of seconds"):
        fix_deadline(bad)


def test_fix_deadline_clamps_the_past() -> None:
    assert fix_deadline(-1e9) == 0.0


@pytest.mark.parametrize("far", [math.inf, MAX_TIME * 1.0001, 1e300])
def test_fix_deadline_clamps_beyond_max_time_to_a_timer_that_never_fires(far: float) -> None:
    assert fix_deadline(far) == MAX_TIME


@given(after=st.floats(allow_nan=True, allow_infinity=True))
@settings(max_examples=150, suppress_health_check=[HealthCheck.function_scoped_fixture])
@example(after=0.0)
@example(after=-1e300)
@example(after=MAX_TIME)
@example(after=math.inf)
@example(after=-math.inf)
@example(after=math.nan)
@example(after=1e-9)
def test_any_duration_arms_or_is_refused(after: float, peer: FifoPeer) -> None:
    client = FileTimerClient(peer.path, labels={})
    try:
        before = time.monotonic()
        client.arm("s", after)
        after_call = time.monotonic()
    except ValueError:
        assert math.isnan(after) or after == -math.inf
        assert client.armed == frozenset()
        return
    finally:
        client.close()
    (arm, _) = peer.wait_count(2)
    peer.take()
    assert isinstance(arm, Arm)
    low = min(MAX_TIME, max(0.0, before + after))
    high = min(MAX_TIME, max(0.0, after_call + after))
    assert low - 1e-6 <= arm.deadline <= high + 1e-6


def test_check_signal() -> None:
    assert check_signal(9) == 9
    assert check_signal(-3) == 0
    with pytest.raises(ValueError, match="integer"):
        check_signal(True)
    with pytest.raises(ValueError, match="highest"):
        check_signal(65)


def test_start_time_parsing() -> None:
    fields = " ".join(str(i) for i in range(3, 53))
    assert parse_start_time(f"12 (a) b (c)) {fields}".encode()) == 22
    assert parse_start_time(b"12 (x) S 1") is None
    assert parse_start_time(b"garbage") is None
    if os.path.exists("/proc/self/stat"):
        assert process_start_time() == process_start_time(os.getpid()) is not None
    assert process_start_time(2**31 - 1) is None


def test_default_labels_from_torchrun() -> None:
    assert default_labels({"RANK": "3", "LOCAL_RANK": "1"}) == {"rank": "3", "local_rank": "1"}
    assert default_labels({"RANK": "x", "LOCAL_RANK": ""}) == {}
    assert default_labels({"RANK": "\u00b2", "LOCAL_RANK": "\u0662"}) == {}  # not integers
    assert default_labels({}) == {}


def test_default_job_label_from_torchruns_run_id() -> None:
    env = {"RANK": "3", "LOCAL_RANK": "1", "TORCHELASTIC_RUN_ID": "3f2a-llm"}
    assert default_labels(env) == {"rank": "3", "local_rank": "1", "job": "3f2a-llm"}
    assert default_labels({"TORCHELASTIC_RUN_ID": ""}) == {}
    # Cut to the protocol's bound on a label value, never refused.
    assert default_labels({"TORCHELASTIC_RUN_ID": "j" * 300}) == {"job": "j" * MAX_LABEL_VALUE}
    # Bytes of the environment that are not UTF-8 (lone surrogates in os.environ).
    assert default_labels({"TORCHELASTIC_RUN_ID": "run-\udcff"}) == {"job": "run-?"}


def test_the_job_label_goes_with_every_arm_by_default(
    peer: FifoPeer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RANK", "5")
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "\u00e9" * 200)  # 2 bytes a character
    client = FileTimerClient(peer.path)
    assert client.labels == {"rank": "5", "job": "\u00e9" * MAX_LABEL_VALUE}
    client.arm("s", 60)
    (arm,) = peer.wait_count(1)
    assert isinstance(arm, Arm)
    assert arm.labels == {"rank": "5", "job": "\u00e9" * MAX_LABEL_VALUE}
    explicit = FileTimerClient(peer.path, labels={"job": "mine"})
    assert explicit.labels == {"job": "mine"}  # given labels replace the defaults
