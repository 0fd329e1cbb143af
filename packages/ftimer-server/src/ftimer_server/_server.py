"""``FileTimerServer``: the FIFO, the I/O loop and its thread around the ``Watchdog`` core.

One loop iteration: wait (epoll) until the next deadline, new bytes in the FIFO, a
worker's pidfd turning readable (it exited) or a wake-up; then apply, in that order,
exits, messages, expiries and escalations. The wait has no fixed interval: with nothing
armed it has no timeout at all, so an idle server never wakes up.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import select
import selectors
import threading
import time
from types import TracebackType
from typing import Callable, Dict, FrozenSet, Iterable, List, Optional, Type, Union

from ftimer_protocol import Sync, default_fifo_path, encode

from ._events import Armed, Disarmed, Event, Reaped
from ._fifo import Fifo, open_fifo
from ._policy import Policy, ancestors_of
from ._process import ProcessInspector, SystemInspector, raise_fd_limit
from ._reader import LineReader
from ._reaper import ReapStep
from ._records import Timer, Worker
from ._signaller import OsSignaller, RecordingSignaller, Signaller
from ._stats import Stats
from ._torch import LogEvent, torch_log_event
from ._watchdog import Watchdog

__all__ = ["FileTimerServer"]

logger = logging.getLogger("ftimer_server")

#: Bytes read from the FIFO per loop iteration: big enough to drain a burst in a few
#: system calls, small enough that deadlines are checked every few milliseconds.
READ_CHUNK = 256 * 1024
#: The longest single wait: a deadline days away costs one wake-up an hour, and no
#: timeout overflows epoll's.
MAX_WAIT = 3600.0
_FIFO = object()
_WAKE = object()
_sync_ids = itertools.count()


class FileTimerServer:
    """The watchdog server: reads timer requests from a FIFO and reaps expired workers.

    Drop-in for torch's ``FileTimerServer`` (same positional arguments; ``max_interval``
    is accepted and ignored, since this server does not poll). Runs its loop in a thread
    between ``start()`` and ``stop()``, or is used as a context manager.

    Args:
        file_path: the FIFO; defaults to ``$TORCHELASTIC_TIMER_FILE``, else
            ``ftimer_protocol.default_fifo_path()``. Created if missing (see
            ``fifo_mode``). An existing FIFO of this user is reused if timers were
            restored before ``start()``, else replaced by a new one, so that clients
            holding the old one notice the restart and re-send their timers.
        run_id: torch's job id, kept for ``log_event`` users; not used otherwise.
        max_interval: torch's polling interval; ignored.
        daemon: run the loop in a daemon thread.
        log_event: torch's callback, ``log_event(name, request)``, called with torch's
            names: "watchdog started", "timer expired", "kill worker process",
            "watchdog stopped".
        on_event: receives every ``Event`` (from the loop thread, in order), or those of
            ``event_types``. Exceptions it raises are logged and ignored.
        event_types: the event classes ``on_event`` wants; ``None`` (default): all.
            ``Armed`` and ``Disarmed``, one per request, are not even built when not
            wanted. ``set_event_types()`` changes it later.
        on_change: called from the loop, once per iteration, when the armed timers
            changed in it (armed, re-armed, disarmed, expired, dropped): a cheap cue to
            save them, instead of watching every event.
        policy: which processes and signals are allowed, and the timer limits.
        escalate_after: seconds after a signal other than SIGKILL before a surviving
            worker gets SIGKILL; ``None`` (default, torch's behaviour) never escalates.
        signal_override: the signal every reap sends, instead of the deciding timer's
            own (timers with signal 0 stay report-only); ``None`` (default): the timer's.
        signaller: delivers signals; defaults to ``OsSignaller``.
        dry_run: signal nothing (a ``RecordingSignaller`` that reports delivery); the
            events are the same.
        inspector: how processes are looked at; defaults to ``SystemInspector``.
        fifo_mode: permissions of the FIFO (0600: only this user may write).
        fifo_group: group name or gid to give the FIFO.
        remove_fifo: unlink the FIFO on ``stop()`` if this server created it. Off by
            default, so a restarted server is found at the same path by its writers.
        kill_self_on_reap: after reaping a worker, signal this process with the same
            signal (what torch 2.13 always does). Off by default.
        tick_interval, on_tick: call ``on_tick()`` from the loop at least every
            ``tick_interval`` seconds (a systemd watchdog keep-alive). The only periodic
            wake-up the server ever does, and only when asked.
        pipe_size: the pipe buffer size to request; defaults to the system maximum.
        reap_steps: callables run between an expiry and its signal (diagnostics).

    Raises:
        ValueError: an option is out of range, or options conflict.
    """

    def __init__(
        self,
        file_path: Optional[Union[str, os.PathLike[str]]] = None,
        run_id: str = "",
        max_interval: float = 10,
        daemon: bool = True,
        log_event: Optional[LogEvent] = None,
        *,
        on_event: Optional[Callable[[Event], None]] = None,
        event_types: Optional[Iterable[Type[Event]]] = None,
        on_change: Optional[Callable[[], None]] = None,
        policy: Optional[Policy] = None,
        escalate_after: Optional[float] = None,
        signal_override: Optional[int] = None,
        signaller: Optional[Signaller] = None,
        dry_run: bool = False,
        inspector: Optional[ProcessInspector] = None,
        fifo_mode: int = 0o600,
        fifo_group: Optional[Union[int, str]] = None,
        remove_fifo: bool = False,
        kill_self_on_reap: bool = False,
        tick_interval: Optional[float] = None,
        on_tick: Optional[Callable[[], None]] = None,
        pipe_size: Optional[int] = None,
        reap_steps: Iterable[ReapStep] = (),
    ) -> None:
        if file_path is None:
            file_path = os.environ.get("TORCHELASTIC_TIMER_FILE") or default_fifo_path()
        if (tick_interval is None) != (on_tick is None):
            raise ValueError("tick_interval and on_tick go together")
        if tick_interval is not None and tick_interval <= 0:
            raise ValueError("tick_interval must be > 0")
        self.file_path = os.fspath(file_path)
        self.run_id = run_id
        self.max_interval = max_interval
        self._daemon = daemon
        self._log_event = log_event
        self._on_event = on_event
        self._on_change = on_change
        self._changes = 0  # the table's change count when on_change was last called
        self._event_types = _event_types(event_types)
        if on_event is None and event_types is not None:
            raise ValueError("event_types needs on_event")
        self._fifo_mode = fifo_mode
        self._fifo_group = fifo_group
        self._remove_fifo = remove_fifo
        self._kill_self_on_reap = kill_self_on_reap
        self._tick_interval = tick_interval
        self._on_tick = on_tick
        self._pipe_size = pipe_size
        self._inspector = inspector or SystemInspector()
        if signaller is not None and dry_run:
            raise ValueError("dry_run replaces the signaller: give one or the other")
        if signaller is None:
            signaller = RecordingSignaller() if dry_run else OsSignaller(self._inspector)
        self._lock = threading.RLock()
        # Events wait here while the lock is held; they go to the callbacks after it is
        # released, so a slow callback never blocks armed(), stats() or sync() callers.
        self._pending: List[Event] = []
        self._selector: Optional[selectors.BaseSelector] = None
        self._watchdog = Watchdog(
            inspector=self._inspector,
            signaller=signaller,
            policy=policy,
            server_pid=os.getpid(),
            ancestors=ancestors_of(os.getpid(), self._inspector),
            emit=self._pending.append,
            escalate_after=escalate_after,
            signal_override=signal_override,
            watch=self._watch,
            unwatch=self._unwatch,
            steps=tuple(reap_steps),
            timer_events=self._wants_timer_events(),
        )
        self._fifo: Optional[Fifo] = None
        self._wake_r = self._wake_w = -1
        self._thread: Optional[threading.Thread] = None
        self._loop_ident: Optional[int] = None
        self._state = "new"  # -> "running" -> "stopped"
        self._stopping = False
        self._syncs: Dict[str, threading.Event] = {}
        self._self_signal = 0
        self._busy_since: Optional[float] = None

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> None:
        """Open the FIFO and start the loop in a thread.

        Raises:
            FifoError: the FIFO path is unsafe or unusable.
            RuntimeError: the server was already started.
        """
        self._open()
        self._thread = threading.Thread(
            target=self._serve, name="ftimer-server", daemon=self._daemon
        )
        self._thread.start()

    def run(self) -> None:
        """Open the FIFO and run the loop in the calling thread until ``stop()``.

        ``stop()`` may be called from another thread, a signal handler or a callback;
        ``run()`` returns once the FIFO is closed.

        Raises:
            FifoError: the FIFO path is unsafe or unusable.
            RuntimeError: the server was already started.
        """
        self._open()
        self._serve()

    def stop(self) -> None:
        """Stop the loop and close the FIFO (removed only with ``remove_fifo``).

        Prompt whatever the writers do. Armed timers stay readable with ``armed()``.
        A stopped server cannot be started again: create another and ``restore()``.
        """
        with self._lock:
            if self._state == "new":  # never started: release what restore() bound
                self._watchdog.close()
                self._state = "stopped"
            if self._state != "running":
                return
            self._stopping = True
            self._wake()
        thread = self._thread
        if thread is not None and thread.ident != threading.get_ident():
            thread.join()

    def __enter__(self) -> FileTimerServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        self.stop()

    # -- queries and commands ----------------------------------------------------------

    def armed(self) -> List[Timer]:
        """A snapshot of the armed timers (deadlines in monotonic seconds)."""
        with self._lock:
            return self._watchdog.armed()

    def workers(self) -> List[Worker]:
        """A snapshot of the processes timers are bound to."""
        with self._lock:
            return self._watchdog.workers()

    def stats(self) -> Stats:
        """A snapshot of the counters."""
        with self._lock:
            return self._watchdog.stats()

    def restore(self, timers: Iterable[Timer]) -> None:
        """Arm saved timers (``armed()`` of a previous server), checking each process.

        Deadlines are monotonic seconds of this boot. A timer whose process is gone or
        is now another process (start time) is dropped with a ``Rejected`` event
        (request ``"restore"``). Call it before ``start()`` or while running.

        Raises:
            RuntimeError: the server was stopped.
        """
        with self._lock:
            if self._state == "stopped":
                raise RuntimeError("the server is stopped; restore into a new one")
            self._watchdog.restore(timers)
            running = self._state == "running"
            if running:
                self._wake()  # the loop delivers the events and sees the new deadlines
        if not running:
            self._flush()

    def sync(self, timeout: float = 10.0) -> None:
        """Return once everything written to the FIFO before this call has been applied
        (and the timers it made due reaped).

        Raises:
            TimeoutError: that took longer than ``timeout`` seconds.
            RuntimeError: the server is not running (or stopped meanwhile), or this is
                the loop's own thread.
        """
        deadline = time.monotonic() + timeout
        token = f"ftimer-server-{os.getpid()}-{next(_sync_ids)}"
        done = threading.Event()
        line = encode(Sync(token))
        with self._lock:
            if self._state != "running" or self._stopping or self._fifo is None:
                raise RuntimeError("the server is not running")
            if threading.get_ident() == self._loop_ident:
                raise RuntimeError("sync() from the server's own thread would deadlock")
            self._syncs[token] = done
            fd = self._fifo.write_fd
        try:
            _write_all(fd, line, deadline)
            if not done.wait(max(0.0, deadline - time.monotonic())):
                raise TimeoutError(f"sync() did not complete within {timeout} s")
            with self._lock:
                if token in self._syncs:  # the loop removes the tokens it reached
                    raise RuntimeError("the server stopped before the sync completed")
        finally:
            with self._lock:
                self._syncs.pop(token, None)

    def get_last_progress_time(self) -> int:
        """torch's liveness probe: now while the loop is healthy (idle or working), else
        the wall-clock second its current iteration started."""
        busy_since = self._busy_since
        return int(time.time() if busy_since is None else busy_since)

    def set_event_types(self, event_types: Optional[Iterable[Type[Event]]]) -> None:
        """Change which events ``on_event`` receives (``None``: all), from now on.

        Raises:
            TypeError: one of them is not an ``Event`` class.
            ValueError: the server has no ``on_event``.
        """
        types = _event_types(event_types)
        if self._on_event is None:
            raise ValueError("event_types needs on_event")
        with self._lock:
            self._event_types = types
            self._watchdog.timer_events = self._wants_timer_events()

    @property
    def fifo(self) -> Optional[Fifo]:
        """The open FIFO while running (path, pipe size, whether this server created it)."""
        return self._fifo

    # -- the loop ----------------------------------------------------------------------

    def _open(self) -> None:
        with self._lock:
            if self._state != "new":
                raise RuntimeError(f"the server is {self._state}; create a new one")
            raise_fd_limit()
            # A server that restored nothing replaces its old FIFO: clients that still
            # hold the old one then fail their next write and re-send their timers.
            # One that restored timers reuses it: its writers lose nothing.
            self._fifo = open_fifo(
                self.file_path,
                mode=self._fifo_mode,
                group=self._fifo_group,
                pipe_size=self._pipe_size,
                replace=len(self._watchdog.table) == 0,
            )
            if self._fifo.replaced:
                logger.info(
                    "replaced the FIFO %s with a new one (no timers restored): writers "
                    "holding the old one reconnect and re-send their timers",
                    self.file_path,
                )
            self._wake_r, self._wake_w = os.pipe()
            for fd in (self._wake_r, self._wake_w):
                os.set_blocking(fd, False)
            selector = selectors.DefaultSelector()
            selector.register(self._fifo.read_fd, selectors.EVENT_READ, _FIFO)
            selector.register(self._wake_r, selectors.EVENT_READ, _WAKE)
            self._selector = selector
            for worker in self._watchdog.workers():  # bound by restore() before start
                self._watch(worker)
            self._state = "running"
        logger.info(
            "ftimer server listening on %s (pipe buffer %d bytes)",
            self._fifo.path,
            self._fifo.pipe_size,
        )
        if self._log_event is not None:
            self._log_event("watchdog started", None)

    def _serve(self) -> None:
        try:
            self._run()
        finally:
            self._close()

    def _close(self) -> None:
        with self._lock:
            if self._state == "stopped":
                return
            if self._selector is not None:
                self._selector.close()
                self._selector = None
            self._watchdog.close()
            if self._fifo is not None:
                self._fifo.close(remove=self._remove_fifo)
            for fd in (self._wake_r, self._wake_w):
                with contextlib.suppress(OSError):
                    os.close(fd)
            self._wake_r = self._wake_w = -1
            self._state = "stopped"
            for done in self._syncs.values():
                done.set()  # wake sync() callers: their tokens were not reached
        self._flush()
        if self._log_event is not None:
            self._log_event("watchdog stopped", None)

    def _run(self) -> None:
        self._loop_ident = threading.get_ident()
        assert self._selector is not None
        assert self._fifo is not None
        selector, reader = self._selector, LineReader()
        tick_interval = self._tick_interval
        next_tick = time.monotonic() + tick_interval if tick_interval is not None else None
        while not self._stopping:
            with self._lock:
                wakeup = self._watchdog.next_wakeup()
            if next_tick is not None:
                wakeup = next_tick if wakeup is None else min(wakeup, next_tick)
            timeout = None
            if wakeup is not None:
                timeout = min(max(0.0, wakeup - time.monotonic()), MAX_WAIT)
            try:
                ready = selector.select(timeout)
                self._busy_since = time.time()
                now = self._iterate(ready, reader)
                if next_tick is not None and now >= next_tick:
                    assert self._on_tick is not None
                    assert tick_interval is not None
                    next_tick = now + tick_interval
                    self._on_tick()
                if self._self_signal:
                    sig, self._self_signal = self._self_signal, 0
                    logger.warning("signalling the server itself (kill_self_on_reap)")
                    os.kill(os.getpid(), sig)
            except Exception:
                # A bug, not a worker's doing (bad input never raises): keep serving, but
                # never spin on a failure that repeats.
                logger.exception("ftimer server loop iteration failed; continuing")
                time.sleep(0.01)
            finally:
                self._busy_since = None
        self._drain(reader)

    def _drain(self, reader: LineReader) -> None:
        """On stop: apply what is already in the pipe, so ``armed()`` includes it. One
        chunk, like an iteration: writers that keep writing do not delay the stop."""
        assert self._fifo is not None
        try:
            with self._lock:
                chunk = os.read(self._fifo.read_fd, READ_CHUNK)
                self._watchdog.apply(reader.feed(chunk), time.monotonic(), time.time())
        except BlockingIOError:
            pass
        except Exception:
            logger.exception("ftimer server: reading the FIFO on stop failed")
        self._flush()
        self._changed()

    def _iterate(self, ready: List[tuple[selectors.SelectorKey, int]], reader: LineReader) -> float:
        """One iteration after the wait: exits, then messages, then expiries; events to the
        callbacks; sync() callers released. Returns the time the timers were checked."""
        watchdog = self._watchdog
        tokens: List[str] = []
        with self._lock:
            fifo_ready = False
            for key, _ in ready:
                if key.data is _FIFO:
                    fifo_ready = True
                elif key.data is _WAKE:
                    _drain(self._wake_r)
                else:  # a pidfd: its worker exited
                    watchdog.worker_gone(key.data)
            if fifo_ready and self._fifo is not None:
                try:
                    chunk = os.read(self._fifo.read_fd, READ_CHUNK)
                except BlockingIOError:
                    chunk = b""
                if chunk:
                    tokens = watchdog.apply(reader.feed(chunk), time.monotonic(), time.time())
            now = time.monotonic()
            watchdog.tick(now)
        self._flush()
        self._changed()
        if tokens:
            with self._lock:
                for token in tokens:
                    done = self._syncs.pop(token, None)
                    if done is not None:
                        done.set()
        return now

    # -- helpers -----------------------------------------------------------------------

    def _flush(self) -> None:
        """Deliver the pending events to the callbacks, outside the lock."""
        with self._lock:
            if not self._pending:
                return
            events = self._pending[:]
            self._pending.clear()
        on_event, log_event, types = self._on_event, self._log_event, self._event_types
        for event in events:
            if type(event) is Reaped and self._kill_self_on_reap:
                assert isinstance(event, Reaped)
                if event.delivered:
                    self._self_signal = event.signal
            try:
                if on_event is not None and (types is None or type(event) in types):
                    on_event(event)
                if log_event is not None:
                    torch_log_event(log_event, event)
            except Exception:
                logger.exception("event callback failed on %r", event)

    def _changed(self) -> None:
        """Call ``on_change`` if the armed timers changed since it was last called."""
        changes = self._watchdog.table.changes
        if self._on_change is not None and changes != self._changes:
            self._changes = changes
            try:
                self._on_change()
            except Exception:
                logger.exception("on_change callback failed")

    def _wants_timer_events(self) -> bool:
        types = self._event_types
        return self._on_event is not None and (types is None or Armed in types or Disarmed in types)

    def _watch(self, worker: Worker) -> None:
        if self._selector is not None and worker.pidfd is not None:
            self._selector.register(worker.pidfd, selectors.EVENT_READ, worker)

    def _unwatch(self, worker: Worker) -> None:
        if self._selector is not None and worker.pidfd is not None:
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(worker.pidfd)

    def _wake(self) -> None:
        with contextlib.suppress(BlockingIOError):  # already pending: enough
            os.write(self._wake_w, b"w")


def _event_types(types: Optional[Iterable[Type[Event]]]) -> Optional[FrozenSet[type]]:
    if types is None:
        return None
    out = frozenset(types)
    for t in out:
        if not (isinstance(t, type) and issubclass(t, Event)):
            raise TypeError(f"{t!r} is not an Event class")
    return out


def _drain(fd: int) -> None:
    with contextlib.suppress(BlockingIOError):
        while os.read(fd, 4096):
            pass


def _write_all(fd: int, line: bytes, deadline: float) -> None:
    """Write ``line`` (at most PIPE_BUF: atomic) to a non-blocking pipe by ``deadline``."""
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    while True:
        try:
            os.write(fd, line)
            return
        except BlockingIOError:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("the FIFO stayed full") from None
            poller.poll(remaining * 1000)
