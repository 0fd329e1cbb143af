"""``/proc/PID/stat`` and ``status`` parsing at its edges: files cut short, fields that are
not what they should be, a last line with no newline (from mutation testing of
_procstat.py)."""

from __future__ import annotations

import os
from typing import List, Tuple

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ftimer_protocol import (
    ProcStat,
    parse_proc_stat,
    parse_proc_status,
    parse_start_time,
    proc_status_field,
)

# Fields 3 onwards of a real line (proc(5)): state S, ppid 1, ... 20 threads 7,
# 22 starttime 12345, 24 rss 2048.
_TAIL = "S 1 1234 1234 0 -1 4194560 100 0 0 0 5 3 0 0 20 0 7 0 12345 1000000 2048 " + (
    "18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 17 1 0 0 0 0 0"
)
_FIELDS = _TAIL.split()


@pytest.mark.parametrize("kept", range(len(_FIELDS) + 1))
def test_a_stat_line_cut_after_any_field_is_parsed_or_refused(kept: int) -> None:
    """A stat line cut short is a ProcStat once it reaches field 24, else a ValueError
    (never an IndexError); its start time is read once it reaches field 22, else None."""
    data = ("4242 (python) " + " ".join(_FIELDS[:kept])).encode()
    if kept >= 22:  # fields 3..24
        assert parse_proc_stat(data) == ProcStat("S", 1, 7, 12345, 2048)
    else:
        with pytest.raises(ValueError, match="not the contents of a /proc/PID/stat file"):
            parse_proc_stat(data)
    assert parse_start_time(data) == (12345 if kept >= 20 else None)  # fields 3..22


def test_a_stat_line_without_its_command_name_is_refused() -> None:
    """Fields with no ``(comm)`` before them are not a stat line, even when they would
    parse: counted from the wrong place they would give a wrong start time."""
    data = _TAIL.encode()
    with pytest.raises(ValueError, match="not the contents of a /proc/PID/stat file"):
        parse_proc_stat(data)
    assert parse_start_time(data) is None


@pytest.mark.parametrize("state", ["1", "0", "?", "-", "_"])
def test_a_state_that_is_not_a_letter_is_refused(state: str) -> None:
    """Field 3, the state, is one letter: a digit or a sign there is refused."""
    data = f"4242 (python) {state}{_TAIL[1:]}".encode()
    with pytest.raises(ValueError, match="not the contents of a /proc/PID/stat file"):
        parse_proc_stat(data)


def test_a_stat_line_refused_is_quoted_in_the_error() -> None:
    """The error names the bytes it refused, so a log shows what was read."""
    with pytest.raises(ValueError, match=r"file: b'garbage'$"):
        parse_proc_stat(b"garbage")
    data = f"4242 (python) 1{_TAIL[1:]}".encode()
    with pytest.raises(ValueError, match=r"file: b'4242 \(python\) 1 1 1234 "):
        parse_proc_stat(data)


def test_a_status_value_that_is_not_ascii_is_replaced_not_raised() -> None:
    """The first word of a status field never raises: a byte that is not text there
    (a command name may hold any) comes back as U+FFFD, not as some other character."""
    data = b"Name:\t\xff\xfeprog x\nTgid:\t42\n"
    assert proc_status_field(data, "Name") == "\ufffd\ufffdprog"
    assert parse_proc_status(data)["Name"] == "\ufffd\ufffdprog x"
    assert proc_status_field(data, "Tgid") == "42"


def test_the_last_status_line_needs_no_newline() -> None:
    """A status file (or a read of one) that ends without a newline still has its last
    field's whole value."""
    assert proc_status_field(b"Uid:\t1000\t0\t0\t0", "Uid") == "1000"
    assert proc_status_field(b"Name:\tx\nTgid:\t4242", "Tgid") == "4242"
    assert proc_status_field(b"Tgid:\t7", "Tgid") == "7"


def test_a_status_field_after_a_blank_first_line_is_found() -> None:
    """A field on the second line after an empty first one is read, as
    ``parse_proc_status`` reads it."""
    data = b"\nTgid:\t4242\n"
    assert parse_proc_status(data) == {"Tgid": "4242"}
    assert proc_status_field(data, "Tgid") == "4242"


_NAMES = ["Name", "Tgid", "Pid", "PPid", "Uid"]


@given(
    st.lists(
        st.one_of(
            st.tuples(st.sampled_from(_NAMES), st.text(alphabet=" \t0123456789ab", max_size=8)),
            st.just(("", "")),  # a blank line
        ),
        max_size=8,
    ),
    st.booleans(),
)
def test_proc_status_field_agrees_with_the_whole_parse_around_blank_lines(
    lines: List[Tuple[str, str]], final_newline: bool
) -> None:
    """``proc_status_field`` gives the first word of the first line of a field, as
    ``parse_proc_status`` reads that line, wherever blank lines are and whether or not
    the file ends with a newline."""
    text = "\n".join(f"{key}:{value}" if key else "" for key, value in lines)
    data = (text + "\n" if final_newline and lines else text).encode()
    for name in _NAMES:
        values = [value for key, value in lines if key == name]
        words = values[0].split() if values else []
        assert proc_status_field(data, name) == (words[0] if words else None)
        if values:
            assert parse_proc_status(data)[name] == values[-1].strip()


@pytest.mark.parametrize(
    "breaker", ["\r", "\x0b", "\x0c", "\x1c", "\x1d", "\x1e", "\x85", "\u2028", "\u2029"]
)
def test_a_status_line_ends_only_at_a_newline(breaker: str) -> None:
    """A status line ends at ``\\n`` alone: a command name holding another line break
    (the kernel writes it raw) is read whole, adding no field of its choosing."""
    name = f"job{breaker}Tgid:1"
    data = f"Name:\t{name}\nTgid:\t42\nUid:\t0\t0\t0\t0\n".encode()
    fields = parse_proc_status(data)
    assert fields["Name"] == name
    assert fields["Tgid"] == "42"
    assert set(fields) == {"Name", "Tgid", "Uid"}
    # The first word: ASCII white space ends it.
    assert proc_status_field(data, "Name") == ("job" if breaker in "\r\x0b\x0c" else name)


def test_a_real_process_cannot_add_a_status_field_through_its_name() -> None:
    """A process that names itself ``job\\x1cXyz:1`` (``/proc/self/comm``) has that name
    in its own ``/proc/PID/status``, read whole, and no field ``Xyz``."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: renames itself and reads its own status
        try:
            os.close(read_end)
            with open("/proc/self/comm", "wb") as comm:
                comm.write(b"job\x1cXyz:1")
            with open("/proc/self/status", "rb") as status:
                os.write(write_end, status.read())
        finally:
            os._exit(0)
    os.close(write_end)
    try:
        with os.fdopen(read_end, "rb") as f:
            data = f.read()
    finally:
        os.waitpid(pid, 0)
    assert data.startswith(b"Name:\tjob\x1cXyz:1\n")  # the kernel wrote it raw
    fields = parse_proc_status(data)
    assert fields["Name"] == "job\x1cXyz:1"
    assert "Xyz" not in fields
    assert fields["Tgid"] == str(pid)
    assert proc_status_field(data, "Name") == "job\x1cXyz:1"
    assert proc_status_field(data, "Xyz") is None


def test_a_utf8_command_name_reads_alike_both_ways() -> None:
    """A command name in UTF-8 is the same text from ``proc_status_field`` as from
    ``parse_proc_status``."""
    data = "Name:\tcafé\nTgid:\t42\n".encode()
    assert parse_proc_status(data)["Name"] == "café"
    assert proc_status_field(data, "Name") == "café"
