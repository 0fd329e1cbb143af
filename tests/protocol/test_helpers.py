"""The pure helpers clients and servers share: where a server listens, the environment
variables that say so, ``/proc/PID/stat`` and ``status`` parsing, signal names, the fast-path
prefixes."""

from __future__ import annotations

import os
import signal
import threading
from typing import List, Tuple

import pytest
from hypothesis import given
from hypothesis import strategies as st

import ftimer_protocol
from ftimer_protocol import (
    ENV_FIFO,
    ENV_SOCKET,
    ENV_TORCH_FIFO,
    FIFO_ENV_VARS,
    LABEL_KEY_PATTERN,
    MAX_FD,
    MAX_SIGNAL,
    SYSTEM_FIFO_PATH,
    SYSTEM_SOCKET_PATH,
    V1_PREFIXES,
    V2_PREFIX,
    Arm,
    DumpHook,
    FileTimerRequest,
    ProcStat,
    Sync,
    TimerRequestV1,
    default_fifo_path,
    default_socket_path,
    encode,
    parse_proc_stat,
    parse_proc_status,
    parse_signal,
    parse_start_time,
    proc_status_field,
    signal_name,
    socket_path_for,
)

RTMIN = int(signal.SIGRTMIN)
RTMAX = int(signal.SIGRTMAX)


def test_the_helpers_are_public() -> None:
    for name in (
        "socket_path_for",
        "default_socket_path",
        "SYSTEM_SOCKET_PATH",
        "ENV_FIFO",
        "ENV_TORCH_FIFO",
        "ENV_SOCKET",
        "FIFO_ENV_VARS",
        "ProcStat",
        "parse_proc_stat",
        "parse_proc_status",
        "parse_start_time",
        "proc_status_field",
        "parse_signal",
        "signal_name",
        "LABEL_KEY_PATTERN",
        "MAX_FD",
        "V1_PREFIXES",
        "V2_PREFIX",
    ):
        assert name in ftimer_protocol.__all__, name


# -- where a server listens -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("fifo", "socket"),
    [
        ("/run/ftimer/timer.fifo", "/run/ftimer/timer.socket"),
        ("/tmp/ftimer-1000/timer.fifo", "/tmp/ftimer-1000/timer.socket"),
        ("relative.fifo", "relative.socket"),
        ("/x/pipe", "/x/pipe.socket"),
        ("/x/timer.fifo.d/pipe", "/x/timer.fifo.d/pipe.socket"),
        ("/x/timer.FIFO", "/x/timer.FIFO.socket"),
        (".fifo", ".socket"),
    ],
)
def test_the_socket_is_beside_the_fifo(fifo: str, socket: str) -> None:
    assert socket_path_for(fifo) == socket
    # Never the daemon's control socket, <fifo>.sock.
    assert socket_path_for(fifo) != fifo + ".sock"


def test_default_socket_paths() -> None:
    assert SYSTEM_SOCKET_PATH == socket_path_for(SYSTEM_FIFO_PATH) == default_socket_path(0)
    env = {"XDG_RUNTIME_DIR": "/run/user/1000"}
    assert default_socket_path(1000, env) == "/run/user/1000/ftimer/timer.socket"
    assert default_socket_path(1000, {}) == "/tmp/ftimer-1000/timer.socket"
    for uid, environ in ((0, {}), (1000, env), (1000, {"XDG_RUNTIME_DIR": "relative"})):
        assert default_socket_path(uid, environ) == socket_path_for(default_fifo_path(uid, environ))


def test_environment_variable_names() -> None:
    assert (ENV_FIFO, ENV_TORCH_FIFO, ENV_SOCKET) == (
        "FTIMER_FIFO",
        "TORCHELASTIC_TIMER_FILE",
        "FTIMER_SOCKET",
    )
    assert FIFO_ENV_VARS == (ENV_FIFO, ENV_TORCH_FIFO)  # in order of precedence


# -- /proc/PID/stat -------------------------------------------------------------------------

# Fields 3 onwards of a real line (proc(5)): state S, ppid 1, ... 20 threads 7,
# 22 starttime 12345, 24 rss 2048.
_TAIL = "S 1 1234 1234 0 -1 4194560 100 0 0 0 5 3 0 0 20 0 7 0 12345 1000000 2048 " + (
    "18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 17 1 0 0 0 0 0"
)


@pytest.mark.parametrize(
    "comm", ["python", "my prog", "a) b (c", ")", "((", "x) S 9 9 9", "\u00e9\u00e8"]
)
def test_proc_stat_fields_are_counted_from_the_last_parenthesis(comm: str) -> None:
    data = f"4242 ({comm}) {_TAIL}\n".encode()
    assert parse_proc_stat(data) == ProcStat("S", 1, 7, 12345, 2048)
    assert parse_start_time(data) == 12345


def test_proc_stat_of_this_process() -> None:
    with open("/proc/self/stat", "rb") as f:
        stat = parse_proc_stat(f.read())
    assert stat.ppid == os.getppid()
    assert stat.state == "R"  # reading its own stat: running
    assert stat.num_threads >= 1
    assert stat.rss_pages > 0
    with open("/proc/self/stat", "rb") as f:
        assert parse_start_time(f.read()) == stat.start_time


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"garbage",
        b"12 (x) S 1",  # too few fields
        ("12 (x) " + _TAIL.replace(" 12345 ", " 1x345 ")).encode(),  # not a number
        ("12 (x) " + _TAIL.replace("S 1 ", "SS 1 ")).encode(),  # not a state
        ("12 (x) " + _TAIL.replace("S 1 ", "S -1 ")).encode(),
        b"12 x S " + _TAIL[2:].encode(),  # no parenthesis
    ],
)
def test_proc_stat_of_another_shape_is_refused(data: bytes) -> None:
    with pytest.raises(ValueError, match="not the contents of a /proc/PID/stat file"):
        parse_proc_stat(data)
    if b"1x345" in data or b")" not in data or len(data.split()) < 22:
        assert parse_start_time(data) is None


@given(st.binary(max_size=600))
def test_proc_stat_parsing_never_fails_otherwise(data: bytes) -> None:
    try:
        stat = parse_proc_stat(data)
    except ValueError:
        pass
    else:
        assert stat.start_time == parse_start_time(data)
    start = parse_start_time(data)
    assert start is None or start >= 0


# -- /proc/PID/status ------------------------------------------------------------------------

# The start of a real file (proc(5)): a command name with a space and bytes that are not
# UTF-8, as the kernel shows them.
_STATUS = (
    b"Name:\tmy \xff prog\nUmask:\t0022\nState:\tS (sleeping)\nTgid:\t4242\n"
    b"Ngid:\t0\nPid:\t4243\nPPid:\t1\nTracerPid:\t0\nUid:\t1000\t0\t0\t0\n"
    b"Gid:\t100\t100\t100\t100\nSigBlk:\t0000000000000000\n"
)


def test_proc_status_fields() -> None:
    status = parse_proc_status(_STATUS)
    assert status["Name"] == "my \ufffd prog"
    assert status["Tgid"] == "4242"
    assert status["Uid"] == "1000\t0\t0\t0"
    assert status["State"] == "S (sleeping)"
    assert proc_status_field(_STATUS, "Tgid") == "4242"
    assert proc_status_field(_STATUS, "Pid") == "4243"  # not Tgid's, nor PPid's
    assert proc_status_field(_STATUS, "Uid") == "1000"  # the real uid
    assert proc_status_field(_STATUS, "Name") == "my"
    assert proc_status_field(_STATUS, "Gid") == "100"
    for missing in ("Seccomp", "gid", "id", "Tgi"):
        assert proc_status_field(_STATUS, missing) is None
    assert proc_status_field(b"", "Tgid") is None
    assert proc_status_field(b"Tgid:\n", "Tgid") is None  # no value
    assert parse_proc_status(b"no colon\n") == {}


def test_proc_status_of_this_process_and_a_thread() -> None:
    pid = os.getpid()
    with open("/proc/self/status", "rb") as f:
        data = f.read()
    status = parse_proc_status(data)
    assert status["Tgid"] == status["Pid"] == str(pid)
    assert int(status["Uid"].split()[0]) == os.getuid()
    for name, value in status.items():
        first = value.split()
        assert proc_status_field(data, name) == (first[0] if first else None)
    ready, done = threading.Event(), threading.Event()
    thread = threading.Thread(target=lambda: (ready.set(), done.wait()))
    thread.start()
    try:
        ready.wait()
        assert thread.native_id is not None
        with open(f"/proc/{thread.native_id}/status", "rb") as f:
            data = f.read()
    finally:
        done.set()
        thread.join()
    assert proc_status_field(data, "Tgid") == str(pid)
    assert proc_status_field(data, "Pid") == str(thread.native_id)


_FIELDS = ["Name", "Tgid", "Pid", "PPid", "TracerPid", "Uid"]


@given(
    st.lists(
        st.tuples(st.sampled_from(_FIELDS), st.text(alphabet=" \t0123456789ab:", max_size=12)),
        max_size=8,
    ),
    st.binary(max_size=200),
)
def test_proc_status_field_reads_the_first_as_the_whole_parse(
    lines: List[Tuple[str, str]], junk: bytes
) -> None:
    data = "".join(f"{key}:{value}\n" for key, value in lines).encode()
    status = parse_proc_status(data)
    for name in _FIELDS:
        values = [value for key, value in lines if key == name]
        words = values[0].split() if values else []
        assert proc_status_field(data, name) == (words[0] if words else None)
        if values:
            assert status[name] == values[-1].strip()
    assert isinstance(parse_proc_status(junk), dict)  # never fails
    proc_status_field(junk, "Tgid")


# -- signal names ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "number", "name"),
    [
        ("USR2", signal.SIGUSR2, "SIGUSR2"),
        ("sigusr2", signal.SIGUSR2, "SIGUSR2"),
        (" SIGUSR2 ", signal.SIGUSR2, "SIGUSR2"),
        ("12", 12, "SIGUSR2"),
        (" 12 ", 12, "SIGUSR2"),
        (12, 12, "SIGUSR2"),
        (signal.SIGTERM, 15, "SIGTERM"),
        ("KILL", 9, "SIGKILL"),
        ("SIGRTMIN", RTMIN, "SIGRTMIN"),
        ("rtmin+2", RTMIN + 2, "SIGRTMIN+2"),
        ("SIGRTMAX-1", RTMAX - 1, f"SIGRTMIN+{RTMAX - 1 - RTMIN}"),
        ("RTMAX", RTMAX, "SIGRTMAX"),
        (str(MAX_SIGNAL), MAX_SIGNAL, signal_name(MAX_SIGNAL)),
    ],
)
def test_signal_names(value: object, number: int, name: str) -> None:
    assert parse_signal(value) == number  # type: ignore[arg-type]
    assert type(parse_signal(value)) is int  # type: ignore[arg-type]
    assert signal_name(number) == name


@pytest.mark.parametrize(
    "text",
    ["", "SIG", "USR9", "RTMIN+99", "RTMAX-99", "RTMIN+x", "RTMIN+-1", "__class__", "SIG_DFL"],
)
def test_unknown_signal_names(text: str) -> None:
    with pytest.raises(ValueError, match=r"^unknown signal: "):
        parse_signal(text)


@pytest.mark.parametrize("text", ["\u0661\u0662", "\u00b2", "1_2", "+12", "12.0", "0x0c"])
def test_a_number_is_ascii_digits_only(text: str) -> None:
    with pytest.raises(ValueError, match=r"^unknown signal: "):
        parse_signal(text)


@pytest.mark.parametrize("value", [0, "0", -1, MAX_SIGNAL + 1, str(MAX_SIGNAL + 1), 2**40])
def test_numbers_out_of_range_are_refused(value: object) -> None:
    with pytest.raises(ValueError, match=rf"is not a signal number \(1\.\.{MAX_SIGNAL}\)"):
        parse_signal(value)  # type: ignore[arg-type]


def test_zero_only_when_allowed() -> None:
    assert parse_signal(0, allow_zero=True) == 0
    assert parse_signal("0", allow_zero=True) == 0
    with pytest.raises(ValueError, match="not a signal number"):
        parse_signal(-1, allow_zero=True)
    assert signal_name(0) == "0"


@pytest.mark.parametrize("value", [True, False, 9.0, None, b"KILL"])
def test_only_ints_and_strings_are_signals(value: object) -> None:
    with pytest.raises(ValueError, match="a signal is a number or a name"):
        parse_signal(value)  # type: ignore[arg-type]


# -- bounds and prefixes ----------------------------------------------------------------------


def test_bounds_are_the_schemas() -> None:
    assert LABEL_KEY_PATTERN == r"^[A-Za-z_][A-Za-z0-9_]{0,31}\Z"
    assert MAX_FD == 2**31 - 1
    encode(Arm(1, "s", 1.0, 9, dump=DumpHook(12, MAX_FD)))
    with pytest.raises(ValueError, match="invalid Arm"):
        encode(Arm(1, "s", 1.0, 9, dump=DumpHook(12, MAX_FD + 1)))


def test_lines_begin_with_the_fast_path_prefixes() -> None:
    assert encode(Arm(1, "s", 1.0, 9)).startswith(V2_PREFIX)
    assert encode(Sync("t")).startswith(V2_PREFIX)
    assert encode(TimerRequestV1(1, "s", 1.0, 9)).startswith(V1_PREFIXES)
    torch_line = FileTimerRequest(1, "s", 1.0, 9).to_json().encode()
    assert torch_line.startswith(V1_PREFIXES)
