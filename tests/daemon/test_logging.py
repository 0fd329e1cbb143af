"""The daemon's logging: JSON lines, flood control with a count, reopening after logrotate."""

from __future__ import annotations

import io
import json
import logging
import pathlib

import pytest

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
    # A different message is not affected by the flood.
    assert f.filter(record("bad line from %s", "elsewhere"))
    assert f.next_flush() == pytest.approx(110.0)
    assert f.flush() == []  # the window has not ended yet
    clock.now = 110.0
    (summary,) = f.flush()
    assert summary.getMessage() == "bad line from fifo [repeated 7 more times in 10.0 s]"
    assert summary.levelno == logging.WARNING
    assert f.next_flush() is None
    # A new window starts clean.
    assert f.filter(record("bad line from %s", "fifo"))


def test_repeat_filter_summarises_when_the_message_comes_back_after_its_window() -> None:
    clock = FakeClock()
    f = RepeatFilter(burst=1, window=5.0, clock=clock)
    assert f.filter(record("x"))
    assert not f.filter(record("x"))
    clock.now += 6
    assert f.filter(record("x"))
    (summary,) = f.flush()
    assert "repeated 1 more times" in summary.getMessage()


def test_repeat_filter_levels_are_distinct_and_keys_are_bounded() -> None:
    clock = FakeClock()
    f = RepeatFilter(burst=1, window=5.0, clock=clock, max_keys=4)
    assert f.filter(record("x", level=logging.WARNING))
    assert f.filter(record("x", level=logging.ERROR))
    for i in range(20):
        assert f.filter(record("distinct %d", i))
    assert len(f._seen) <= 4


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
    assert [key[2] for key in f._seen] == ["a", "c"]
    (summary,) = f.flush()  # a's first window, summarised when it restarted
    assert summary.getMessage() == "a [repeated 1 more times in 5.0 s]"


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


def test_logging_setup_floods_are_held_and_summarised() -> None:
    stream = io.StringIO()
    clock = FakeClock()
    setup = LoggingSetup("text", "info", stream=stream, repeat_filter=RepeatFilter(2, 1, clock))
    try:
        log = logging.getLogger("ftimer_server.test")
        for _ in range(50):
            log.warning("garbage on the FIFO")
        log.debug("not shown at info")
        clock.now += 1
        setup.flush_repeats()
    finally:
        setup.close()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 3
    assert lines[-1].endswith("garbage on the FIFO [repeated 48 more times in 1.0 s]")


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
