"""The daemon's logging: text or JSON lines, a reopenable log file, and flood control.

A worker sending garbage in a loop must not fill the disk: a `RepeatFilter` lets a burst
of lines of one kind through per window, holds the rest back and then writes one summary
with their count. A kind is a format string, not a rendered line, so junk lines that all
differ (another excerpt each time) or refusals naming another pid each time are held back
as well as identical ones. The filter takes its clock as an argument so it is tested
without sleeping.

What a worker sends (labels, scopes, bytes it wrote, its command line) is quoted in log
lines: the `TextFormatter` shows it with its control characters escaped, so it can start
no line of its own and send no escape sequence to the terminal. JSON lines need nothing
more: ``json.dumps`` escapes controls, and everything beyond ASCII, by default.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import io
import json
import logging
import logging.handlers
import os
import queue
import sys
import threading
import time
from collections.abc import Mapping
from typing import Any, Callable, Dict, List, Optional, TextIO, Tuple

from ftimer_server._files import NotARegularFile, file_kind, open_regular
from ftimer_server.core._report import printable

__all__ = [
    "LOG_FORMATS",
    "LOG_LEVELS",
    "JsonFormatter",
    "LogFileError",
    "LoggingSetup",
    "ReopenableFileHandler",
    "RepeatFilter",
    "TextFormatter",
    "open_log_file",
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


class _Printable:
    """An argument of a text log line: shown (``%s``, ``%r``) with `printable`."""

    __slots__ = ("value",)

    def __init__(self, value: object) -> None:
        self.value = value

    def __str__(self) -> str:
        return printable(str(self.value))

    def __repr__(self) -> str:
        return printable(repr(self.value))


def _printable_arg(value: object) -> object:
    # %d and %.1f need the number itself; a number shows no control character anyway.
    return value if isinstance(value, (int, float)) else _Printable(value)


def _printable_args(args: Any) -> Any:
    """A record's ``args`` with each argument shown with `printable`."""
    if isinstance(args, Mapping):
        return {k: _printable_arg(v) for k, v in args.items()}
    return tuple(map(_printable_arg, args)) if args else args


class TextFormatter(logging.Formatter):
    """``time LEVEL logger: message``, the message's arguments made `printable`.

    The arguments are what the line quotes (a worker's labels, scope, the bytes it sent):
    a newline or an escape sequence among them is shown escaped, on the record's line.
    The format string is the daemon's own and kept as written; a traceback keeps its
    lines, each made printable.
    """

    def __init__(self) -> None:
        super().__init__(_TEXT_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        """Render a copy of ``record`` whose arguments are made printable."""
        shown = logging.makeLogRecord(record.__dict__)  # other handlers see the original
        shown.args = _printable_args(record.args)
        if not isinstance(record.msg, str):  # an object logged as the message is data too
            shown.msg = _Printable(record.msg)
        if record.exc_info:
            shown.exc_text = None  # formatted here, not as another formatter cached it
        return super().format(shown)

    def formatException(self, ei: Any) -> str:
        """The traceback, each of its lines made printable."""
        # split("\n"), not splitlines(): that would make a U+2028 a line of its own too.
        return "\n".join(map(printable, super().formatException(ei).split("\n")))


class LogFileError(OSError):
    """The log file's path holds something other than a regular file (or a symlink)."""


def open_log_file(
    path: str, encoding: Optional[str] = None, errors: Optional[str] = None
) -> io.TextIOWrapper:
    """Open ``path`` to append text (creating it), if it is a regular file.

    It is opened non-blocking and never through a symlink: a FIFO there would block
    ``open()`` until a reader came (the daemon wedged before READY, or on SIGHUP).

    Raises:
        LogFileError: a FIFO, socket, device, directory or symlink is there.
        OSError: it cannot be opened.
    """
    try:
        # Owner-only, whatever the umask: it tells of every user's workers (scopes,
        # labels, incidents' stacks), which a user outside the daemon's group must not
        # read. A file that exists keeps the mode the operator gave it.
        fd, _ = open_regular(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, mode=0o600)
    except NotARegularFile as e:
        raise LogFileError(f"{path} is {e.kind}, not a regular file") from None
    except OSError as e:
        if e.errno == errno.ELOOP and os.path.islink(path):
            raise LogFileError(f"{path} is a symlink: give the file's own path") from None
        if e.errno != errno.ENXIO:  # ENXIO: a FIFO nobody reads, or a socket
            raise
        try:
            kind = file_kind(os.lstat(path).st_mode)
        except OSError:
            kind = "not a regular file"
        raise LogFileError(f"{path} is {kind}, not a regular file") from None
    os.set_blocking(fd, True)  # meaningless for a regular file: cleared, as open() leaves it
    return open(fd, "a", encoding=encoding, errors=errors)


class ReopenableFileHandler(logging.FileHandler):
    """A file handler that `reopen()` points at a fresh file after logrotate moved it.

    Only a regular file is opened (see `open_log_file`).

    Raises:
        LogFileError: something other than a regular file is at the path.
        OSError: the file cannot be opened.
    """

    #: Seconds between two lines on stderr about lines the file did not take.
    SAY_EVERY = 60.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: Lines the file did not take (a full disk, a file size limit).
        self.lost = 0
        self._said = -self.SAY_EVERY
        #: How many of ``lost`` the file was told of, and since when lines were lost.
        self._told = 0
        self._lost_since = 0.0

    def _open(self) -> io.TextIOWrapper:
        return open_log_file(self.baseFilename, self.encoding, self.errors)

    def emit(self, record: logging.LogRecord) -> None:
        """Append ``record`` as a line, in one ``write()`` of the file's descriptor: not
        through a buffer, which a full disk leaves holding lines that are then lost
        uncounted, or written late. A line the disk cut short is taken back, and the
        first line written after some were lost says how many (as a warning of its own)."""
        try:
            line = self.format(record) + self.terminator
            if self.lost > self._told:
                line = self._told_of_lost() + line
            self._append(line)
        except Exception:
            self.handleError(record)
        else:
            self._told = self.lost

    def _told_of_lost(self) -> str:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self._lost_since))
        said = logging.makeLogRecord(
            {
                "name": "ftimer_server.daemon",
                "levelno": logging.WARNING,
                "levelname": "WARNING",
                "msg": "%d log line(s) could not be written to this file since %s",
                "args": (self.lost - self._told, since),
            }
        )
        return self.format(said) + self.terminator

    def _append(self, text: str) -> None:
        """Write ``text`` at the file's end, in the file's encoding, or none of it.

        Raises:
            OSError: the file did not take it all (what it took is cut off again).
            UnicodeEncodeError: the encoding cannot carry it.
        """
        if self.stream is None:  # closed: opened again, as FileHandler.emit() does
            self.stream = self._open()
        # The stream's: FileHandler's own may be "locale" (Python 3.10+), no codec's name.
        data = text.encode(self.stream.encoding, self.stream.errors or "strict")
        fd = self.stream.fileno()
        written = 0
        try:
            while written < len(data):
                written += os.write(fd, data[written:])
        except OSError:
            if written:  # O_APPEND: the part written ends the file
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, os.fstat(fd).st_size - written)
            raise

    def handleError(self, record: logging.LogRecord) -> None:
        """A line the file did not take: said on stderr once a minute at most, with the
        count lost so far, instead of logging's traceback for every line."""
        if self.lost == self._told:
            self._lost_since = time.time()
        self.lost += 1
        now = time.monotonic()
        if now - self._said >= self.SAY_EVERY:
            self._said = now
            with contextlib.suppress(OSError, ValueError):  # stderr closed or gone too
                sys.stderr.write(
                    f"ftimer-server: a line could not be written to the log file "
                    f"{self.baseFilename}: {sys.exc_info()[1]} ({self.lost} line(s) lost "
                    "so far)\n"
                )

    def close(self) -> None:
        """Close the file; say on stderr how many lines it did not take, if the file was
        not told (a disk full to the end)."""
        try:
            super().close()
        except OSError:
            self.handleError(logging.makeLogRecord({}))
        if self.lost > self._told:
            with contextlib.suppress(OSError, ValueError):
                sys.stderr.write(
                    f"ftimer-server: {self.lost - self._told} line(s) could not be written "
                    f"to the log file {self.baseFilename} before it was closed\n"
                )
            self._told = self.lost

    def reopen(self) -> None:
        """Open the path again (append), switch to it and close the old file.

        The file is opened before the handler's lock is taken: a thread logging
        meanwhile writes to the old file instead of waiting on the open.

        Raises:
            LogFileError: something other than a regular file is at the path now.
            OSError: the file cannot be opened.
            Either way the handler keeps writing to the old file.
        """
        stream = self._open()
        old = self.setStream(stream)  # flushes the old stream, under the lock
        if old is not None:
            old.close()


#: A kind of log line: logger name, level, and the format string (``record.msg``).
_Kind = Tuple[str, int, str]
#: LogRecord attributes a summary must not inherit from the line it quotes: it is made
#: (and stamped, and formatted) when it is written, after every line it summarises.
_FRESH_ATTRS = ("created", "msecs", "relativeCreated", "asctime", "message")


def _first_line(record: logging.LogRecord) -> str:
    """The first line of ``record``'s message, as a flood's summary quotes it: the line
    breaks of the daemon's own format string end it (an incident's summary follows the
    first line), those of what it quotes do not (they are escaped, as the text log shows
    them, so that the summary stays one line in either format)."""
    if not isinstance(record.msg, str) or "\n" not in record.msg:
        return record.getMessage()
    shown = logging.makeLogRecord(record.__dict__)
    shown.args = _printable_args(record.args)
    try:
        return shown.getMessage().split("\n", 1)[0]
    except (TypeError, ValueError):  # "%d" of what printable() made a string: unformatted
        return record.msg.split("\n", 1)[0]


class _Window:
    """One kind's current window: when it started, what it saw, the last line held (or
    what makes it: `RepeatFilter.hold`)."""

    __slots__ = ("held", "last", "make", "seen", "start")

    def __init__(self, start: float) -> None:
        self.start = start
        self.seen = 1
        self.held = 0
        self.last: Optional[logging.LogRecord] = None
        self.make: Optional[Callable[[], logging.LogRecord]] = None


#: Lines of one kind let through per window where each names one reaped worker (its
#: expiry, reap, escalation, incident): every rank of several 8-GPU jobs reaped at once
#: is named on a line of its own, and a fork storm's reaps still fold beyond.
WORKER_BURST = 64


class RepeatFilter(logging.Filter):
    """Lets at most ``burst`` records of one kind through per ``window`` seconds.

    Records are of one kind when their logger, level and format string (``record.msg``,
    before its arguments are filled in) are the same. Records beyond the burst are held
    back and counted; when their window ends, one summary record quotes the last line held
    back (its first line, if its format string has several: an incident's summary)
    followed by ``[N more like this in T s]`` (field ``suppressed`` in JSON).

    A record with a ``_burst`` attribute has that burst instead: the daemon's lines that
    each name one reaped worker (``WORKER_BURST``).

    A caller whose records cost to make asks `hold()` first: a record of a kind already
    holding records back is then counted without being made.

    Summaries are written as soon as they are due: by `flush()`, which the daemon's loop
    calls at `next_flush()` (``on_hold`` wakes that loop whenever a kind starts holding
    lines back, since its wait may have been computed before), and by the ``sink``, which
    gets a kind's summary just before the first record of its next window.

    Args:
        burst: records of one kind let through per window.
        window: seconds a window lasts, counted from its first record.
        clock: returns monotonic seconds.
        max_keys: kinds tracked at once; the oldest window is summarised beyond it.
        min_level: records below this level always pass (debug lines are asked for).
        on_hold: called (outside the filter's lock) when a kind holds back its first
            record of a window, i.e. when `next_flush()` may have become earlier.
        sink: where summaries go as soon as they are made; without one they wait for
            `flush()`.
    """

    def __init__(
        self,
        burst: int = 10,
        window: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
        max_keys: int = 1024,
        *,
        min_level: int = logging.INFO,
        on_hold: Optional[Callable[[], None]] = None,
        sink: Optional[Callable[[logging.LogRecord], None]] = None,
    ) -> None:
        super().__init__()
        self.burst = burst
        self.window = window
        self.min_level = min_level
        self.on_hold = on_hold
        self.sink = sink
        self._clock = clock
        self._max_keys = max_keys
        self._lock = threading.Lock()
        # Insertion order is window start order: the first key is the oldest window.
        self._windows: Dict[_Kind, _Window] = {}
        self._summaries: List[logging.LogRecord] = []
        #: Records held back since start (each window's summary line says how many).
        self.suppressed_total = 0

    def filter(self, record: logging.LogRecord) -> bool:
        """Return False for a record beyond its kind's burst in the current window."""
        if getattr(record, "_summary", False) or record.levelno < self.min_level:
            return True
        now = self._clock()
        # ``_kind``: the format string of a line logged elsewhere, passed on whole (the
        # capture helper's lines, all "capture helper: %s" here).
        kind = (record.name, record.levelno, getattr(record, "_kind", None) or str(record.msg))
        first_held = False
        with self._lock:
            window = self._windows.get(kind)
            if window is None or now - window.start >= self.window:
                if window is not None:  # re-inserted below: the dict stays in start order
                    self._summarise(kind, self._windows.pop(kind), now)
                elif len(self._windows) >= self._max_keys:
                    self._evict_oldest(now)
                self._windows[kind] = _Window(now)
                passed = True
            else:
                window.seen += 1
                passed = window.seen <= getattr(record, "_burst", self.burst)
                if not passed:
                    window.held += 1
                    window.last, window.make = record, None
                    first_held = window.held == 1
                    self.suppressed_total += 1
            ready: List[logging.LogRecord] = []
            if self.sink is not None and self._summaries:
                ready, self._summaries = self._summaries, []
        for summary in ready:  # before ``record``: the lines it summarises came first
            assert self.sink is not None
            self.sink(summary)
        if first_held and self.on_hold is not None:
            self.on_hold()
        return passed

    def hold(self, name: str, level: int, msg: str, make: Callable[[], logging.LogRecord]) -> bool:
        """Hold a record of logger ``name``, ``level`` and format ``msg`` back without it
        being made, if its kind's window holds records back already: True if so (the
        caller then logs nothing), False if the record is to be logged.

        A flood's records cost more to make than what they report did to read: only the
        last held back is made, by ``make``, and only if a summary quotes it.
        """
        if level < self.min_level:
            return False
        now = self._clock()
        with self._lock:
            window = self._windows.get((name, level, msg))
            if window is None or not window.held or now - window.start >= self.window:
                return False  # filter() decides, and writes a summary that is due
            window.seen += 1
            window.held += 1
            window.make = make
            self.suppressed_total += 1
        return True

    def next_flush(self) -> Optional[float]:
        """The clock time at which `flush()` has a summary to write, or None."""
        with self._lock:
            if self._summaries:
                return self._clock()
            ends = [w.start + self.window for w in self._windows.values() if w.held]
        return min(ends) if ends else None

    def flush(self, everything: bool = False) -> List[logging.LogRecord]:
        """Forget windows that ended (``everything``: all of them, at shutdown); return
        summary records for the lines they held back, oldest window first.

        The caller passes the records to the handler they belong to (see `LoggingSetup`).
        """
        with self._lock:
            now = self._clock()
            ended = [
                k for k, w in self._windows.items() if everything or now - w.start >= self.window
            ]
            for kind in ended:
                self._summarise(kind, self._windows.pop(kind), now)
            out, self._summaries = self._summaries, []
        return out

    def _evict_oldest(self, now: float) -> None:
        # Windows are inserted as they start, so the first key is the oldest: O(1) (a
        # min() over every key cost tens of microseconds per distinct debug line).
        kind = next(iter(self._windows))
        self._summarise(kind, self._windows.pop(kind), now)

    def _summarise(self, kind: _Kind, window: _Window, now: float) -> None:
        if not window.held:
            return
        last = window.last
        if window.make is not None:
            try:
                last = window.make()
            except Exception:  # never raised through a log() call: said by its format
                name, level, msg = kind
                last = logging.makeLogRecord(
                    {
                        "name": name,
                        "levelno": level,
                        "levelname": logging.getLevelName(level),
                        "msg": msg,
                    }
                )
        if last is None:
            return
        fields = {k: v for k, v in last.__dict__.items() if k not in _FRESH_ATTRS}
        summary = logging.makeLogRecord(fields)  # stamped now, not when ``last`` was
        summary.msg = "%s [%d more like this in %.1f s]"
        summary.args = (_first_line(last), window.held, min(now - window.start, self.window))
        summary.exc_info = None
        summary.exc_text = None
        summary.stack_info = None
        summary.suppressed = window.held
        summary._summary = True
        self._summaries.append(summary)


#: Records waiting for the log's writer thread at most: beyond, a line is lost (counted,
#: then said) rather than the logging thread held (the loop's: its reaps with it).
LOG_QUEUE = 10000
#: Seconds `LoggingSetup.close()` waits for what is queued to be written.
_CLOSE_WAIT = 2.0


class _Handoff(logging.handlers.QueueHandler):
    """Hands each record to the writer thread as it is (formatted there, by the handler
    that writes it); with the queue full (the log's reader stalled: a pipe nobody reads,
    a hung journald), the line is lost and counted, never waited for."""

    def __init__(self, records: queue.Queue[Any]) -> None:
        super().__init__(records)
        self.lost = 0

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        return record

    def enqueue(self, record: logging.LogRecord) -> None:
        try:
            self.queue.put_nowait(record)
        except queue.Full:
            self.lost += 1


class _StderrHandler(logging.Handler):
    """Writes each line to stderr's descriptor with write(2), past ``sys.stderr``'s
    buffer and the handler's lock: a writer blocked on a pipe nobody reads holds neither,
    so the exit (``logging.shutdown()``, the flush of ``sys.stderr``) never waits for it.
    Called from the writer thread alone."""

    def __init__(self, fd: int) -> None:
        super().__init__()
        self._fd = fd

    def handle(self, record: logging.LogRecord) -> bool:
        if self.filter(record):
            self.emit(record)
        return True

    def emit(self, record: logging.LogRecord) -> None:
        try:
            data = memoryview((self.format(record) + "\n").encode("utf-8", "backslashreplace"))
            while data:
                data = data[os.write(self._fd, data) :]
        except Exception:  # logging's way: said on stderr, never raised
            self.handleError(record)


class LoggingSetup:
    """Installs the daemon's single handler on the root logger and can change it later.

    Records are written by a thread of their own, so that a log whose reader stalls (a
    pipe nobody reads) costs lines, never a thread that logs; a line lost so is counted,
    and said once the writer catches up.

    Flood summaries are written by the thread that logs the next line of their kind, or
    by whoever calls `flush_repeats()` once `wake_fd` turns readable (a kind started
    holding lines back) and `RepeatFilter.next_flush()` has come.

    Args:
        fmt: "text" or "json".
        level: "debug", "info", "warning" or "error".
        log_file: append to this file instead of writing to stderr.
        stream: the stream used without a log file (stderr by default; tests pass one).
        repeat_filter: the flood filter (a default one if None); its ``on_hold`` and
            ``sink`` are set here.

    Raises:
        LogFileError: something other than a regular file is at ``log_file``.
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
        #: What writes the lines, on the writer thread.
        self._sink = self._make_handler(log_file)
        self._records: queue.Queue[Any] = queue.Queue(LOG_QUEUE)
        self.handler = _Handoff(self._records)
        self.handler.addFilter(self.filter)
        self._said_lost = 0
        self._writer = threading.Thread(target=self._write, name="ftimer-log", daemon=True)
        self._writer.start()
        # The wake-up pipe is written from any thread that logs; closing it under the
        # lock means no thread writes to a descriptor number that was closed and reused.
        self._wake_lock = threading.Lock()
        self._wake_r, self._wake_w = os.pipe()
        for fd in (self._wake_r, self._wake_w):
            os.set_blocking(fd, False)
        self.filter.on_hold = self._wake
        self.filter.sink = self._write_summary
        self.configure(fmt, level)
        self._root.addHandler(self.handler)

    @property
    def wake_fd(self) -> int:
        """Readable when a kind of line started being held back: time to look at
        `RepeatFilter.next_flush()` again (`flush_repeats()` drains it)."""
        return self._wake_r

    def _make_handler(self, log_file: Optional[str]) -> logging.Handler:
        handler: logging.Handler
        if log_file is not None:
            handler = ReopenableFileHandler(log_file, encoding="utf-8")
        elif self._stream is None and sys.stderr is not None:
            handler = _StderrHandler(sys.stderr.fileno())
        else:
            handler = logging.StreamHandler(self._stream or sys.stderr)
        return handler

    def configure(self, fmt: str, level: str) -> None:
        """Switch format and level in place (SIGHUP reload)."""
        formatter = JsonFormatter() if fmt == "json" else TextFormatter()
        self.drain()  # what was logged before is written as it was then
        self._sink.setFormatter(formatter)
        self._root.setLevel(level.upper())

    def reopen(self) -> None:
        """Reopen the log file, if logging to one (SIGHUP after logrotate).

        Raises:
            LogFileError: something other than a regular file is at its path now.
            OSError: the file cannot be opened.
            Either way, logging goes on to the file open before.
        """
        if isinstance(self._sink, ReopenableFileHandler):
            self.drain()  # what was logged before goes to the file before
            self._sink.reopen()

    def flush_repeats(self, everything: bool = False) -> None:
        """Write the filter's due "N more like this" summaries (``everything``: all)."""
        with self._wake_lock:
            if self._wake_r >= 0:
                with contextlib.suppress(BlockingIOError):
                    while os.read(self._wake_r, 512):
                        pass
        for record in self.filter.flush(everything):
            self._write_summary(record)

    def drain(self, timeout: float = _CLOSE_WAIT) -> bool:
        """Wait up to ``timeout`` seconds until what was logged before is written; return
        whether it was."""
        written = threading.Event()
        try:
            self._records.put(written, timeout=timeout)
        except queue.Full:
            return False
        return written.wait(timeout)

    def close(self) -> None:
        """Write pending summaries, detach the handler and close the writer (waiting a
        moment for what is queued: a stalled log's lines are lost), restore the root
        level."""
        self.flush_repeats(everything=True)
        self._root.removeHandler(self.handler)
        self.drain()
        with contextlib.suppress(queue.Full):
            self._records.put_nowait(None)  # the writer's end, once it is done
        self._writer.join(_CLOSE_WAIT)
        if not self._writer.is_alive():
            self._sink.close()
        self._root.setLevel(self._old_level)
        with self._wake_lock:
            for fd in (self._wake_r, self._wake_w):
                os.close(fd)
            self._wake_r = self._wake_w = -1

    def _write(self) -> None:
        """The writer thread: writes each record queued, and says how many were lost
        once it is written again."""
        while True:
            record = self._records.get()
            if record is None:
                return
            if isinstance(record, threading.Event):  # a drain() waiting
                record.set()
                continue
            self._sink.handle(record)
            lost = self.handler.lost
            if lost != self._said_lost:
                self._said_lost = lost
                said = logging.LogRecord(
                    "ftimer_server.daemon",
                    logging.WARNING,
                    __file__,
                    0,
                    "%d log line(s) lost so far: the log's reader did not keep up",
                    (lost,),
                    None,
                )
                self._sink.handle(said)

    def _write_summary(self, record: logging.LogRecord) -> None:
        if record.levelno >= self._root.getEffectiveLevel():
            self.handler.handle(record)

    def _wake(self) -> None:
        with self._wake_lock:
            if self._wake_w >= 0:
                with contextlib.suppress(BlockingIOError):  # a wake-up is pending already
                    os.write(self._wake_w, b"!")
