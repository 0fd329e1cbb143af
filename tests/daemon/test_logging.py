"""The daemon's logging: JSON lines, flood control with a count, reopening after logrotate."""

from __future__ import annotations

import contextlib
import decimal
import io
import json
import logging
import os
import pathlib
import select
import signal
import stat
import threading
import time

import pytest
from tests.conftest import wait_until

from ftimer_server.daemon._config import DaemonConfig
from ftimer_server.daemon._daemon import Daemon
from ftimer_server.daemon._logging import JsonFormatter, LoggingSetup, RepeatFilter


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def record(msg: str, *args: object, level: int = logging.WARNING) -> logging.LogRecord:
    return logging.LogRecord("ftimer_server.test", level, __file__, 1, msg, args, None)


def test_repeat_filter_lets_a_burst_through_then_counts() -> None:
    clock = FakeClock()
    f = RepeatFilter(burst=3, window=10.0, clock=clock)
    passed = [f.filter(record("bad line from %s", "fifo")) for _ in range(10)]
    assert passed == [True] * 3 + [False] * 7
    assert f.suppressed_total == 7
    # Another kind of line (another format string) is not affected by the flood.
    assert f.filter(record("another line from %s", "fifo"))
    assert f.next_flush() == pytest.approx(110.0)
    assert f.flush() == []  # the window has not ended yet
    clock.now = 110.0
    (summary,) = f.flush()
    assert summary.getMessage() == "bad line from fifo [7 more like this in 10.0 s]"
    assert summary.levelno == logging.WARNING
    assert summary.suppressed == 7
    assert f.next_flush() is None
    # A new window starts clean.
    assert f.filter(record("bad line from %s", "fifo"))


def test_a_record_with_a_burst_of_its_own_is_held_back_beyond_it() -> None:
    # The daemon's lines that each name one reaped worker (WORKER_BURST).
    f = RepeatFilter(burst=3, window=10.0, clock=FakeClock())

    def reaped() -> logging.LogRecord:
        line = record("reaped: pid %d", 7)
        line._burst = 5  # type: ignore[attr-defined]
        return line

    assert [f.filter(reaped()) for _ in range(7)] == [True] * 5 + [False] * 2
    assert [f.filter(record("bad line from %s", "fifo")) for _ in range(4)] == [True] * 3 + [False]


def test_repeat_filter_holds_back_distinct_lines_of_one_kind() -> None:
    # A worker writing junk that differs on every line (another excerpt), or refused
    # requests naming another pid each time: one format string, many messages.
    clock = FakeClock()
    f = RepeatFilter(burst=3, window=10.0, clock=clock)
    passed = [f.filter(record("invalid line: %r", f"junk {i}".encode())) for i in range(100)]
    passed += [f.filter(record("refused arm: pid %d", pid)) for pid in range(1000, 1100)]
    assert passed == ([True] * 3 + [False] * 97) * 2
    assert f.suppressed_total == 194
    clock.now = 110.0
    junk, refused = f.flush()
    # The summary quotes the last line held back, then the count.
    assert junk.getMessage() == "invalid line: b'junk 99' [97 more like this in 10.0 s]"
    assert refused.getMessage() == "refused arm: pid 1099 [97 more like this in 10.0 s]"


def test_repeat_filter_kinds_are_per_logger_and_level_and_debug_lines_pass() -> None:
    clock = FakeClock()
    f = RepeatFilter(burst=1, window=5.0, clock=clock)
    assert f.filter(record("x %d", 1, level=logging.WARNING))
    assert f.filter(record("x %d", 2, level=logging.ERROR))
    other = record("x %d", 3)
    other.name = "ftimer_server.other"
    assert f.filter(other)
    assert not f.filter(record("x %d", 4, level=logging.WARNING))
    # Debug lines are asked for (--log-level debug, every arm and disarm): never held.
    assert all(f.filter(record("armed %d", i, level=logging.DEBUG)) for i in range(50))


def test_repeat_filter_summarises_when_the_kind_comes_back_after_its_window() -> None:
    clock = FakeClock()
    written: list[logging.LogRecord] = []
    f = RepeatFilter(burst=1, window=5.0, clock=clock, sink=written.append)
    assert f.filter(record("x %d", 1))
    assert not f.filter(record("x %d", 2))
    clock.now += 6
    # The summary goes to the sink before the line that opens the next window passes.
    assert f.filter(record("x %d", 3))
    (summary,) = written
    assert summary.getMessage() == "x 2 [1 more like this in 5.0 s]"
    assert f.flush() == []


def test_repeat_filter_wakes_its_flusher_once_per_window_that_holds_lines() -> None:
    clock = FakeClock()
    wakes: list[float] = []
    f = RepeatFilter(burst=2, window=5.0, clock=clock, on_hold=lambda: wakes.append(clock.now))
    for _ in range(2):
        assert f.filter(record("a"))
    assert wakes == []
    assert f.next_flush() is None  # nothing held: no summary will be due
    for _ in range(10):
        f.filter(record("a"))
    assert wakes == [100.0]  # the first line held back, not every one
    assert f.next_flush() == 105.0
    clock.now = 101.0
    for _ in range(3):
        f.filter(record("b"))
    assert wakes == [100.0, 101.0]


def test_repeat_filter_summary_is_stamped_when_written_not_when_quoted() -> None:
    clock = FakeClock()
    f = RepeatFilter(burst=1, window=5.0, clock=clock)
    f.filter(record("a"))
    held = record("a")
    held.created -= 60  # as if the held line had been logged a minute ago
    assert not f.filter(held)
    clock.now += 5
    (summary,) = f.flush()
    assert summary.created > held.created + 30


def test_repeat_filter_keys_are_bounded() -> None:
    clock = FakeClock()
    f = RepeatFilter(burst=1, window=5.0, clock=clock, max_keys=4)
    for i in range(20):
        # An f-string message is its own format string: each is a kind of its own.
        assert f.filter(record(f"distinct {i}"))
    assert len(f._windows) <= 4


def test_repeat_filter_evicts_the_oldest_window() -> None:
    clock = FakeClock()
    f = RepeatFilter(burst=1, window=5.0, clock=clock, max_keys=2)
    assert f.filter(record("a"))  # a's window: 100 .. 105
    assert not f.filter(record("a"))  # held back
    clock.now = 103.0
    assert f.filter(record("b"))  # b's window: 103 .. 108
    clock.now = 105.5
    assert f.filter(record("a"))  # a's window ended: a new one, the newest
    clock.now = 106.0
    assert f.filter(record("c"))  # one key too many: b's window is the oldest
    assert [key[2] for key in f._windows] == ["a", "c"]
    (summary,) = f.flush()  # a's first window, summarised when it restarted
    assert summary.getMessage() == "a [1 more like this in 5.0 s]"


def test_json_formatter_one_object_per_line_with_extra_fields() -> None:
    rec = record("reaped pid %d", 42)
    rec.event = "reaped"
    rec.pid = 42
    line = JsonFormatter().format(rec)
    assert "\n" not in line
    doc = json.loads(line)
    assert doc["msg"] == "reaped pid 42"
    assert doc["level"] == "warning"
    assert doc["event"] == "reaped"
    assert doc["pid"] == 42
    assert doc["ts"].endswith("+00:00")


#: A label value as a worker may send it: escape sequences, and a line of its own.
HOSTILE = "0\x1b]0;PWNED\x07\x1b[2J\nFAKE LOG LINE: reaped pid 1\r\u2028\x9b"
HOSTILE_SHOWN = r"0\x1b]0;PWNED\x07\x1b[2J\nFAKE LOG LINE: reaped pid 1\r\u2028\x9b"


def test_text_lines_show_what_a_worker_sent_escaped_on_the_line_that_quotes_it() -> None:
    stream = io.StringIO()
    setup = LoggingSetup("text", "info", stream=stream)
    try:
        log = logging.getLogger("ftimer_server.test")
        log.warning(
            "reaped: pid %d (timer %r, %.1f ms late)%s", 42, "s\x1b[2J\n", 1.25, ", rank=" + HOSTILE
        )
        log.warning("job %(job)s", {"job": HOSTILE})
        log.warning(ValueError(HOSTILE))  # an object as the message
        log.warning("incident %s:\n  %s", "20261202T000000.000Z-42-s", "first")
        try:  # a traceback keeps its lines (the daemon's own failures have one)
            raise OSError("\x1b]0;PWNED\x07\u2028")
        except OSError:
            log.exception("cannot write %s", "x")
    finally:
        setup.close()
    lines = stream.getvalue().rstrip("\n").split("\n")  # splitlines() would cut at U+2028
    assert [line for line in lines if not line.isprintable()] == []
    assert [line for line in lines if line.startswith("FAKE")] == []
    assert lines[0].endswith(
        rf"reaped: pid 42 (timer 's\x1b[2J\n', 1.2 ms late), rank={HOSTILE_SHOWN}"
    )  # the scope's repr as before, not escaped twice
    assert lines[1].endswith(f"job {HOSTILE_SHOWN}")
    assert lines[2].endswith(f"ftimer_server.test: {HOSTILE_SHOWN}")
    assert lines[4] == "  first"  # the daemon's own newline stays
    assert lines[-1] == r"OSError: \x1b]0;PWNED\x07\u2028"


def test_json_lines_escape_control_characters_and_keep_the_value() -> None:
    rec = record("reaped: pid %d, rank=%s", 42, HOSTILE)
    rec.labels = {"rank": HOSTILE}
    line = JsonFormatter().format(rec)
    assert line.isascii()
    assert line.isprintable()
    doc = json.loads(line)
    assert (doc["msg"], doc["labels"]) == (f"reaped: pid 42, rank={HOSTILE}", {"rank": HOSTILE})


def test_logging_setup_floods_are_held_and_summarised() -> None:
    stream = io.StringIO()
    clock = FakeClock()
    setup = LoggingSetup("text", "info", stream=stream, repeat_filter=RepeatFilter(2, 1, clock))
    try:
        log = logging.getLogger("ftimer_server.test")
        for i in range(50):
            log.warning("garbage on the FIFO: %r", f"junk {i}")
        log.debug("not shown at info")
        clock.now += 1
        setup.flush_repeats()
    finally:
        setup.close()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 3
    assert lines[-1].endswith("garbage on the FIFO: 'junk 49' [48 more like this in 1.0 s]")


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_a_flood_summary_quotes_the_first_line_of_a_multi_line_message(fmt: str) -> None:
    # An incident is logged with its summary on the lines after the first: the flood's
    # summary once quoted all of them on its one line, each break shown as a literal \n.
    stream = io.StringIO()
    clock = FakeClock()
    setup = LoggingSetup(fmt, "info", stream=stream, repeat_filter=RepeatFilter(1, 1, clock))
    try:
        log = logging.getLogger("ftimer_server.test")
        for pid in (900, 901, 902):
            # The directory is what a line quotes: its newline is escaped, not a line end.
            log.warning(
                "incident %s (%s):\n  %s\n  %s", f"T-{pid}-step", "/inc\nX", "timer", "captured"
            )
        clock.now += 1
        setup.flush_repeats()
    finally:
        setup.close()
    lines = stream.getvalue().splitlines()
    # The first incident (its 3 lines; one JSON line), then the summary on a line alone.
    assert len(lines) == (4 if fmt == "text" else 2)
    summary = lines[-1] if fmt == "text" else json.loads(lines[-1])["msg"]
    assert summary.endswith(r"incident T-902-step (/inc\nX): [2 more like this in 1.0 s]")


def test_a_flood_summary_of_a_message_its_printable_arguments_do_not_fit_is_still_said() -> None:
    # "%d" of an argument printable() turns into a string (a Decimal): the summary's
    # formatting raised TypeError out of the logging call that held the line back.
    stream = io.StringIO()
    clock = FakeClock()
    setup = LoggingSetup("json", "info", stream=stream, repeat_filter=RepeatFilter(1, 1, clock))
    try:
        log = logging.getLogger("ftimer_server.test")
        for n in range(3):
            log.warning("%d workers:\n  %s", decimal.Decimal(n), "detail")
        clock.now += 1
        setup.flush_repeats()
    finally:
        setup.close()
    summary = json.loads(stream.getvalue().splitlines()[-1])["msg"]
    assert summary == "%d workers: [2 more like this in 1.0 s]"


def test_logging_setup_wake_fd_turns_readable_when_a_line_is_held_back() -> None:
    stream = io.StringIO()
    clock = FakeClock()
    setup = LoggingSetup("text", "info", stream=stream, repeat_filter=RepeatFilter(1, 5, clock))
    try:
        log = logging.getLogger("ftimer_server.test")
        log.warning("flood %d", 1)
        assert select.select([setup.wake_fd], [], [], 0)[0] == []
        log.warning("flood %d", 2)  # held back: a summary will be due at 105
        assert select.select([setup.wake_fd], [], [], 0)[0] == [setup.wake_fd]
        setup.flush_repeats()  # drains the wake-up; nothing is due yet
        assert select.select([setup.wake_fd], [], [], 0)[0] == []
        assert setup.filter.next_flush() == 105.0
        # The kind comes back after its window: its summary precedes the new line.
        clock.now = 106.0
        log.warning("flood %d", 3)
    finally:
        setup.close()
    summary, last = stream.getvalue().splitlines()[-2:]
    assert summary.endswith("flood 2 [1 more like this in 5.0 s]")
    assert last.endswith("flood 3")


def test_logging_setup_reopens_the_log_file(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "ftimer.log"
    setup = LoggingSetup("json", "debug", log_file=str(path))
    try:
        log = logging.getLogger("ftimer_server.test")
        log.info("before rotation")
        path.rename(tmp_path / "ftimer.log.1")
        setup.reopen()
        log.info("after rotation")
        setup.configure("text", "warning")
        log.info("hidden")
        log.warning("plain text now")
    finally:
        setup.close()
    old = (tmp_path / "ftimer.log.1").read_text().splitlines()
    new = path.read_text().splitlines()
    assert [json.loads(line)["msg"] for line in old] == ["before rotation"]
    assert json.loads(new[0])["msg"] == "after rotation"
    assert len(new) == 2
    assert new[1].endswith("WARNING ftimer_server.test: plain text now")


def test_the_daemon_loop_writes_a_summary_when_due_without_another_wake_up() -> None:
    # The loop's wait starts before any line is held back; the summary must still come
    # out when its window ends, not at the next signal (it once came minutes late).
    stream = io.StringIO()
    window = 0.3  # real time: this is the loop's own clock
    setup = LoggingSetup("text", "info", stream=stream, repeat_filter=RepeatFilter(1, window))
    daemon = Daemon(DaemonConfig(fifo="/nonexistent/timer.fifo"), setup, environ={})
    signals_r, signals_w = os.pipe()
    os.set_blocking(signals_r, False)  # as run() sets it up
    result: list[int] = []
    loop = threading.Thread(target=lambda: result.append(daemon._loop(signals_r)))
    loop.start()
    try:
        log = logging.getLogger("ftimer_server.test")
        started = time.monotonic()
        for pid in range(100, 105):
            log.warning("refused: pid %d", pid)
        text = wait_until(
            lambda: "more like this" in stream.getvalue() and stream.getvalue(),
            timeout=10,
            what="the summary",
        )
        assert time.monotonic() - started < 5  # well before anything else woke the loop
        assert text.splitlines()[-1].endswith("refused: pid 104 [4 more like this in 0.3 s]")
    finally:
        os.write(signals_w, bytes([signal.SIGTERM]))
        loop.join(10)
        os.close(signals_r)
        os.close(signals_w)
        setup.close()
    assert result == [0]


def test_the_log_file_is_made_owner_only(tmp_path: pathlib.Path) -> None:
    # It was 0644 under the usual umask: any user could read every other user's scopes,
    # labels and incident summaries (stacks), kept 0600 in the incident directory.
    path = tmp_path / "ftimer.log"
    old_umask = os.umask(0o022)
    try:
        setup = LoggingSetup("text", "info", log_file=str(path))
        setup.close()
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


class StalledStream(io.StringIO):
    """A stream whose reader has stalled (a pipe nobody reads): every write waits until
    ``flowing`` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.flowing = threading.Event()

    def write(self, text: str) -> int:
        self.flowing.wait()
        return super().write(text)


def test_a_stalled_log_costs_lines_never_the_thread_that_logs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # stderr to a pipe nobody read: the loop blocked in its first log line after the
    # pipe filled, and no stuck worker was reaped again (0 of 20 in 46 s).
    from ftimer_server.daemon import _logging

    monkeypatch.setattr(_logging, "LOG_QUEUE", 5)
    stream = StalledStream()
    setup = LoggingSetup("text", "info", stream=stream, repeat_filter=RepeatFilter(1000, 1))
    log = logging.getLogger("ftimer_server.test")
    try:
        logger_thread = threading.Thread(target=lambda: [log.info("line %d", i) for i in range(20)])
        logger_thread.start()
        logger_thread.join(10)
        assert not logger_thread.is_alive(), "a thread that logs waited for the stalled log"
        stream.flowing.set()
        assert setup.drain(10)
    finally:
        stream.flowing.set()
        setup.close()
    lines = stream.getvalue().splitlines()
    assert lines[0].endswith("ftimer_server.test: line 0")
    written = [line for line in lines if "ftimer_server.test: line" in line]
    assert 5 <= len(written) < 20
    said = f"{20 - len(written)} log line(s) lost so far: the log's reader did not keep up"
    assert next(line for line in lines if "lost so far" in line).endswith(said)


def test_a_daemon_whose_stderr_nobody_reads_still_stops(tmp_path: pathlib.Path) -> None:
    # Its log writer blocked on the full pipe holding the handler's lock, and at exit
    # logging.shutdown() waited for that lock for ever: a SIGTERM never ended it.
    import fcntl
    import subprocess

    from .conftest import PATIENCE, PYTHON

    held, stderr = os.pipe()  # ``held`` is never read
    try:
        fcntl.fcntl(stderr, getattr(fcntl, "F_SETPIPE_SZ", 1031), 4096)  # Python 3.10's name
        os.set_blocking(stderr, False)
        with contextlib.suppress(BlockingIOError):
            while True:
                os.write(stderr, b"x" * 512)
        os.set_blocking(stderr, True)
        fifo = tmp_path / "t.fifo"
        daemon = subprocess.Popen(
            [PYTHON, "-m", "ftimer_server", "run", "--fifo", str(fifo), "--log-level", "debug"],
            stderr=stderr,
            stdout=subprocess.DEVNULL,
        )
        os.close(stderr)
        stderr = -1
        try:
            wait_until(lambda: os.path.exists(f"{fifo}.sock"), what="the control socket")
            daemon.send_signal(signal.SIGTERM)
            assert daemon.wait(PATIENCE) == 0
        finally:
            daemon.kill()
            daemon.wait()
    finally:
        os.close(held)
        if stderr >= 0:
            os.close(stderr)


# Logs 50 lines into a log file limited to 2 KiB (RLIMIT_FSIZE: EFBIG, as a full disk's
# ENOSPC), then, if told, lifts the limit and logs one more; prints what it counted lost.
FULL_LOG = """
import logging, resource, sys
from ftimer_server.daemon._logging import JsonFormatter, ReopenableFileHandler
path, lift = sys.argv[1], sys.argv[2] == "lift"
handler = ReopenableFileHandler(path, encoding="utf-8")
handler.setFormatter(JsonFormatter())
log = logging.getLogger("t")
log.addHandler(handler)
log.propagate = False
resource.setrlimit(resource.RLIMIT_FSIZE, (2048, resource.RLIM_INFINITY))
for i in range(50):
    log.warning("line %d %s", i, "x" * 60)
print(handler.lost)
if lift:
    resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY,) * 2)
    log.warning("after")
handler.close()
"""


@pytest.mark.parametrize("lift", [True, False])
def test_a_log_file_that_takes_no_more_loses_whole_lines_and_says_how_many(
    tmp_path: pathlib.Path, lift: bool
) -> None:
    # Lines went through a buffer that the full disk left holding some: 1 line counted
    # lost where 7 were, a line cut short in the file, and nothing said of it after.
    import subprocess
    import sys

    path = tmp_path / "daemon.log"
    mode = "lift" if lift else "full"
    result = subprocess.run(
        [sys.executable, "-c", FULL_LOG, str(path), mode],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    lost = int(result.stdout)
    records = [json.loads(line) for line in path.read_text().splitlines()]  # whole lines
    written = [r["msg"] for r in records if r["msg"].startswith("line ")]
    assert len(written) + lost == 50
    assert written == [f"line {i} {'x' * 60}" for i in range(len(written))]
    assert 0 < lost < 50
    assert result.stderr.count("ftimer-server: a line could not be written") == 1
    if lift:
        assert [r["msg"] for r in records[len(written) :]][1:] == ["after"]
        told = records[len(written)]
        assert told["level"] == "warning"
        assert told["msg"].startswith(
            f"{lost} log line(s) could not be written to this file since "
        )
        assert "before it was closed" not in result.stderr
    else:
        assert len(records) == len(written)
        assert result.stderr.endswith(
            f"ftimer-server: {lost} line(s) could not be written to the log file {path} "
            "before it was closed\n"
        )


def test_a_log_file_handler_given_no_encoding_writes_its_lines(tmp_path: pathlib.Path) -> None:
    # Its own encoding is "locale" then (Python 3.10+), which is no codec: every line
    # was counted lost.
    from ftimer_server.daemon._logging import ReopenableFileHandler

    path = tmp_path / "daemon.log"
    handler = ReopenableFileHandler(str(path))
    log = logging.getLogger("ftimer-test-no-encoding")
    log.addHandler(handler)
    log.propagate = False
    try:
        log.warning("written")
    finally:
        log.removeHandler(handler)
        handler.close()
    assert handler.lost == 0
    assert path.read_text() == "written\n"


def test_a_held_line_that_cannot_be_made_is_summarised_by_its_format() -> None:
    # Only the last line held back is made, when its summary is written: a failure to
    # make it raised through the log() call that closed its window (the loop's).
    clock = FakeClock()
    f = RepeatFilter(burst=1, window=5.0, clock=clock)
    assert f.filter(record("reaped: pid %s"))
    assert f.filter(record("reaped: pid %s")) is False  # the window holds lines back now

    def broken() -> logging.LogRecord:
        raise ValueError("an event the daemon cannot render")

    assert f.hold("ftimer_server.test", logging.WARNING, "reaped: pid %s", broken)
    clock.now = 105.0
    assert f.filter(record("reaped: pid %s"))  # a new window: the summary is made here
    (summary,) = f.flush()
    assert summary.getMessage() == "reaped: pid %s [2 more like this in 5.0 s]"
    assert summary.levelno == logging.WARNING
