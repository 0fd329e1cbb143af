"""The daemon's logging: text or JSON lines, a reopenable log file, and flood control.

A worker sending garbage in a loop must not fill the disk with the same warning: a
`RepeatFilter` lets a few identical lines through per window and then reports how many it
held back. The filter takes its clock as an argument so it is tested without sleeping.
"""

from __future__ import annotations

import datetime
import json
import logging
import sys
import threading
import time
from typing import Any, Callable, Dict, List, Optional, TextIO, Tuple

__all__ = [
    "LOG_FORMATS",
    "LOG_LEVELS",
    "JsonFormatter",
    "LoggingSetup",
    "ReopenableFileHandler",
    "RepeatFilter",
]

LOG_FORMATS = ("text", "json")
LOG_LEVELS = ("debug", "info", "warning", "error")

#: Attributes every LogRecord has; anything else was passed with ``extra=`` and goes into
#: the JSON line as a field of its own.
_RECORD_ATTRS = frozenset(
    logging.LogRecord("", 0, "", 0, "", None, None).__dict__.keys()
    | {"message", "asctime", "taskName"}
)

_TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, and every ``extra=`` field."""

    def format(self, record: logging.LogRecord) -> str:
        """Render ``record`` as a single JSON line (no trailing newline)."""
        ts = datetime.datetime.fromtimestamp(record.created, tz=datetime.timezone.utc)
        doc: Dict[str, Any] = {
            "ts": ts.isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _RECORD_ATTRS and not key.startswith("_"):
                doc[key] = value
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str, separators=(",", ":"))


class ReopenableFileHandler(logging.FileHandler):
    """A file handler that `reopen()` points at a fresh file after logrotate moved it."""

    def reopen(self) -> None:
        """Close the current stream and open the path again (append).

        Raises:
            OSError: the file cannot be opened; the handler then has no stream and
                reopens lazily on the next record.
        """
        self.acquire()
        try:
            if self.stream is not None:
                self.stream.close()
                self.stream = None
            self.stream = self._open()
        finally:
            self.release()


class RepeatFilter(logging.Filter):
    """Lets at most ``burst`` identical records through per ``window`` seconds.

    Records are identical when logger, level and rendered message are. Records held back
    are counted; `flush()` (called by the daemon's loop, and on the next identical record
    after the window) emits one summary line per suppressed message.

    Args:
        burst: identical records let through per window.
        window: seconds a window lasts, counted from its first record.
        clock: returns monotonic seconds.
        max_keys: distinct messages tracked at once; the oldest are flushed beyond it.
    """

    def __init__(
        self,
        burst: int = 3,
        window: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
        max_keys: int = 1024,
    ) -> None:
        super().__init__()
        self.burst = burst
        self.window = window
        self._clock = clock
        self._max_keys = max_keys
        self._lock = threading.Lock()
        # key -> [window start, records seen in the window, a record to summarise with]
        self._seen: Dict[Tuple[str, int, str], List[Any]] = {}
        self._summaries: List[logging.LogRecord] = []
        #: Records suppressed since start (a counter for status and tests).
        self.suppressed_total = 0

    def filter(self, record: logging.LogRecord) -> bool:
        """Return False for a record that exceeds its message's burst in this window."""
        if getattr(record, "_summary", False):
            return True
        now = self._clock()
        key = (record.name, record.levelno, record.getMessage())
        with self._lock:
            entry = self._seen.get(key)
            if entry is None or now - entry[0] >= self.window:
                if entry is not None:  # re-inserted below: the dict stays in start order
                    self._summarise(key, self._seen.pop(key), now)
                elif len(self._seen) >= self._max_keys:
                    self._evict_oldest(now)
                self._seen[key] = [now, 1, record]
                return True
            entry[1] += 1
            entry[2] = record
            if entry[1] <= self.burst:
                return True
            self.suppressed_total += 1
            return False

    def next_flush(self) -> Optional[float]:
        """The clock time at which `flush()` has a summary to emit, or None."""
        with self._lock:
            ends = [e[0] + self.window for e in self._seen.values() if e[1] > self.burst]
        return min(ends) if ends else None

    def flush(self, everything: bool = False) -> List[logging.LogRecord]:
        """Forget windows that ended (``everything``: all of them, at shutdown); return
        summary records for the messages they held back.

        The caller passes the records to the handler they belong to (see `LoggingSetup`).
        """
        with self._lock:
            now = self._clock()
            ended = [k for k, e in self._seen.items() if everything or now - e[0] >= self.window]
            for key in ended:
                self._summarise(key, self._seen.pop(key), now)
            out, self._summaries = self._summaries, []
        return out

    def _evict_oldest(self, now: float) -> None:
        # Windows are inserted as they start, so the first key is the oldest: O(1) (a
        # min() over every key cost tens of microseconds per distinct debug line).
        key = next(iter(self._seen))
        self._summarise(key, self._seen.pop(key), now)

    def _summarise(self, key: Tuple[str, int, str], entry: List[Any], now: float) -> None:
        held = entry[1] - self.burst
        if held <= 0:
            return
        last: logging.LogRecord = entry[2]
        summary = logging.makeLogRecord(last.__dict__)
        summary.msg = "%s [repeated %d more times in %.1f s]"
        summary.args = (key[2], held, min(now - entry[0], self.window))
        summary.exc_info = None
        summary.exc_text = None
        summary.repeated = held
        summary._summary = True
        self._summaries.append(summary)


class LoggingSetup:
    """Installs the daemon's single handler on the root logger and can change it later.

    Args:
        fmt: "text" or "json".
        level: "debug", "info", "warning" or "error".
        log_file: append to this file instead of writing to stderr.
        stream: the stream used without a log file (stderr by default; tests pass one).
        repeat_filter: the flood filter (a default one if None).

    Raises:
        OSError: the log file cannot be opened.
    """

    def __init__(
        self,
        fmt: str = "text",
        level: str = "info",
        log_file: Optional[str] = None,
        stream: Optional[TextIO] = None,
        repeat_filter: Optional[RepeatFilter] = None,
    ) -> None:
        self.filter = repeat_filter or RepeatFilter()
        self._stream = stream
        self._root = logging.getLogger()
        self._old_level = self._root.level
        self.handler: logging.Handler = self._make_handler(log_file)
        self._log_file = log_file
        self.configure(fmt, level)
        self._root.addHandler(self.handler)

    def _make_handler(self, log_file: Optional[str]) -> logging.Handler:
        handler: logging.Handler
        if log_file is not None:
            handler = ReopenableFileHandler(log_file, encoding="utf-8")
        else:
            handler = logging.StreamHandler(self._stream or sys.stderr)
        handler.addFilter(self.filter)
        return handler

    def configure(self, fmt: str, level: str) -> None:
        """Switch format and level in place (SIGHUP reload)."""
        formatter = JsonFormatter() if fmt == "json" else logging.Formatter(_TEXT_FORMAT)
        self.handler.setFormatter(formatter)
        self._root.setLevel(level.upper())

    def reopen(self) -> None:
        """Reopen the log file, if logging to one (SIGHUP after logrotate).

        Raises:
            OSError: the file cannot be opened.
        """
        if isinstance(self.handler, ReopenableFileHandler):
            self.handler.reopen()

    def flush_repeats(self, everything: bool = False) -> None:
        """Emit the filter's pending "repeated N more times" summaries."""
        for record in self.filter.flush(everything):
            if record.levelno >= self._root.getEffectiveLevel():
                self.handler.handle(record)

    def close(self) -> None:
        """Emit pending summaries, detach and close the handler, restore the root level."""
        self.flush_repeats(everything=True)
        self._root.removeHandler(self.handler)
        self.handler.close()
        self._root.setLevel(self._old_level)
