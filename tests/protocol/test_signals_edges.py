"""Signal names and numbers at their edges: signal 1, the ends of the real-time range,
what an error says (from mutation testing of _signals.py)."""

from __future__ import annotations

import signal

import pytest

from ftimer_protocol import parse_signal

RTMIN = int(signal.SIGRTMIN)
RTMAX = int(signal.SIGRTMAX)


@pytest.mark.parametrize("value", [1, "1", "HUP", "SIGHUP", signal.SIGHUP])
def test_signal_one_is_a_signal(value: object) -> None:
    """1 (SIGHUP), the lowest signal, is accepted, with or without ``allow_zero``."""
    assert parse_signal(value) == 1  # type: ignore[arg-type]
    assert parse_signal(value, allow_zero=True) == 1  # type: ignore[arg-type]


def test_the_real_time_range_is_reached_from_both_ends() -> None:
    """``SIGRTMIN+N`` reaches SIGRTMAX itself, and ``SIGRTMAX-N`` SIGRTMIN itself; one
    further is refused."""
    span = RTMAX - RTMIN
    assert parse_signal(f"SIGRTMIN+{span}") == RTMAX
    assert parse_signal(f"RTMAX-{span}") == RTMIN
    assert parse_signal("RTMIN+0") == RTMIN
    assert parse_signal("rtmax-0") == RTMAX
    for text in (f"SIGRTMIN+{span + 1}", f"SIGRTMAX-{span + 1}"):
        with pytest.raises(ValueError, match=r"^unknown signal: "):
            parse_signal(text)


def test_an_unknown_name_is_quoted_whole_with_the_forms_accepted() -> None:
    """The error for an unknown name quotes it whole and says which forms are signals."""
    with pytest.raises(ValueError, match=r"^unknown signal: 'USR9' \(") as info:
        parse_signal("USR9")
    message = str(info.value)
    assert "..." not in message
    for form in ("USR2", "SIGUSR2", "SIGRTMIN+N", "a number"):
        assert form in message


def test_a_long_unknown_value_is_cut_in_the_error() -> None:
    """A long value (a status line, say) is cut in the error, not repeated whole."""
    with pytest.raises(ValueError, match=r"^unknown signal: 'x{8,64}'\.\.\. \(") as info:
        parse_signal("x" * 1000)
    assert len(str(info.value)) < 200


def test_a_value_of_the_wrong_type_is_named_in_the_error() -> None:
    """The error for a value that is neither an int nor a string shows the value."""
    with pytest.raises(ValueError, match=r"^a signal is a number or a name, not 9\.5$"):
        parse_signal(9.5)  # type: ignore[arg-type]
