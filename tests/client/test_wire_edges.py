"""Edges of the client's line building: signal and deadline bounds, scope refusals, caching."""

from __future__ import annotations

import pytest

from ftimer_client._wire import CACHE_SIZE, V1Lines, V2Lines, check_signal, fix_deadline
from ftimer_protocol import (
    MAX_SCOPE,
    MAX_SIGNAL,
    PIPE_BUF,
    DumpHook,
    LocalProtocolError,
    MessageTooLarge,
)

PID, START = 4242, 123456


def test_the_highest_signal_number_is_a_signal() -> None:
    """check_signal() passes MAX_SIGNAL itself through; only above it is refused."""
    assert check_signal(MAX_SIGNAL) == MAX_SIGNAL
    with pytest.raises(ValueError, match="highest"):
        check_signal(MAX_SIGNAL + 1)


@pytest.mark.parametrize("signal", [9.0, "9", None])
def test_a_signal_that_is_not_an_int_is_refused(signal: object) -> None:
    """A float, a string or None is no signal number, even one int() would take."""
    with pytest.raises(ValueError, match="signal must be an integer"):
        check_signal(signal)  # type: ignore[arg-type]


def test_a_deadline_in_bounds_is_kept_and_a_past_one_becomes_zero() -> None:
    """Deadlines in [0, 1) are kept as they are; any negative one, however small, becomes 0."""
    assert fix_deadline(0.5) == 0.5
    assert fix_deadline(5e-324) == 5e-324
    assert fix_deadline(-0.5) == 0.0
    assert fix_deadline(-1e-9) == 0.0
    assert fix_deadline(-2.0) == 0.0


def test_the_lines_announce_the_hook_they_were_built_with() -> None:
    """V2Lines.dump is the hook given (after rebind too), and None without one."""
    hook = DumpHook(10, 3)
    lines = V2Lines(PID, START, 9, None, hook)
    assert lines.dump == hook
    lines.rebind(PID + 1, START, DumpHook(10, 4))
    assert lines.dump == DumpHook(10, 4)
    assert V2Lines(PID, START, 9, None).dump is None


def test_a_scopes_lines_are_built_once_and_cached() -> None:
    """entry() of a scope seen before returns the very lines it built, for each scope kept."""
    lines = V2Lines(PID, START, 9, None)
    first, other = lines.entry("a"), lines.entry("b")
    assert lines.entry("a") is first
    assert lines.entry("b") is other
    assert lines.disarm("a") is first[1]


def test_the_cache_starts_over_past_its_size() -> None:
    """Past CACHE_SIZE scopes the cache is emptied, not grown: a scope's lines are built anew."""
    lines = V2Lines(PID, START, 9, None)
    first = lines.entry("scope-0")
    for i in range(1, CACHE_SIZE):
        lines.entry(f"scope-{i}")
    assert lines.entry("scope-0") is first  # CACHE_SIZE scopes: all kept
    lines.entry(f"scope-{CACHE_SIZE}")  # one more: the cache starts over
    again = lines.entry("scope-0")
    assert again == first
    assert again is not first


def test_a_lone_surrogate_in_a_scope_of_any_allowed_length_is_named() -> None:
    """A scope with a lone surrogate, up to MAX_SCOPE characters, is refused for it."""
    lines = V2Lines(PID, START, 9, None)
    for scope in ("\udcff", "x" * (MAX_SCOPE - 1) + "\udcff"):
        with pytest.raises(LocalProtocolError, match="lone surrogate") as refused:
            lines.entry(scope)
        assert not isinstance(refused.value, MessageTooLarge)


def test_a_scope_longer_than_max_scope_is_too_large_surrogate_or_not() -> None:
    """Over MAX_SCOPE characters, a scope is refused as too large, a lone surrogate or not."""
    lines = V2Lines(PID, START, 9, None)
    for scope in ("x" * (MAX_SCOPE + 1), "\udcff" + "x" * MAX_SCOPE):
        with pytest.raises(MessageTooLarge):
            lines.entry(scope)


def test_a_version_1_line_of_exactly_pipe_buf_bytes_is_built() -> None:
    """A torch-format line may be PIPE_BUF bytes long (a write of that size is atomic)."""
    lines = V1Lines(PID, 9)
    empty = len(lines.arm("", 100.0))
    line = lines.arm("x" * (PIPE_BUF - empty), 100.0)
    assert len(line) == PIPE_BUF
    with pytest.raises(MessageTooLarge):
        lines.arm("x" * (PIPE_BUF - empty + 1), 100.0)


@pytest.mark.parametrize("expiration_time", [-0.5, -1e-9, -1.0])
def test_a_version_1_arm_never_has_a_negative_time(expiration_time: float) -> None:
    """A negative expiration time (torch's server reads it as a release) is refused by arm()."""
    with pytest.raises(ValueError, match="expiration time must be >= 0"):
        V1Lines(PID, 9).arm("s", expiration_time)
