"""The I/O loop: waits for bytes, exits and deadlines, and feeds the core.

One iteration is a fixed sequence: wait (epoll) until the next deadline, bytes in the
FIFO, a worker's pidfd turning readable (it exited) or a wake-up; read and apply what
the FIFO holds; apply the exits; expire and escalate; hand the results to the façade
(events, sync callers). The wait has no fixed interval: with nothing armed it has no
timeout at all, so an idle server never wakes up.

The reading rule: **a deadline is judged only against everything written before it.**
Each iteration notes the time, then asks the pipe how many bytes it holds (``FIONREAD``)
and reads at least that many before expiring anything, and only timers whose deadline is
at or before the noted time (the horizon) expire. Every message is one atomic write, so
the bytes the pipe held then end at a message boundary and hold every message written
before that moment: a disarm written before its deadline is always applied before the
deadline is judged, however much junk or backlog is in front of it. A pipe (or socket
queue) found full is the exception: a writer may then be waiting for room with a line it
began before that moment, so judgement stays at the last moment known safe until the
read that made room, and the woken writers' turn after it, are over (``core._horizon``;
never more than a second behind). What one iteration reads is bounded by the pipe's
size, so a flood delays reaps by at most the time it takes to read one pipe-full (and
those few milliseconds); it never makes a healthy worker look hung. On stop, the same
read applies everything written before the stop.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import selectors
import threading
import time
from typing import Callable, Deque, List, Optional, Sequence, Tuple

from ftimer_server.core._events import Incoming
from ftimer_server.core._reader import LineReader
from ftimer_server.core._records import Worker
from ftimer_server.core._watchdog import Watchdog

from ._fifo import Fifo
from ._journal import Journal
from ._socket import DatagramSocket

__all__ = ["MAX_WAIT", "READ_CHUNK", "Loop"]

logger = logging.getLogger("ftimer_server")

#: Bytes read from the FIFO at once: big enough to drain a burst in a few system calls,
#: small enough that the lock is released every few milliseconds.
READ_CHUNK = 256 * 1024
#: The longest single wait: a deadline days away costs one wake-up an hour, and no
#: timeout overflows epoll's.
MAX_WAIT = 3600.0
#: Seconds an exit waits before it is applied, for the worker's last words written by
#: someone else after it (``ftimer exec`` disarms once its command has exited).
EXIT_HOLD = 0.05
_FIFO = object()
_SOCKET = object()
_WAKE = object()


class Loop:
    """Runs ``watchdog`` on ``fifo`` until ``request_stop()``.

    Args:
        fifo: the open FIFO (the caller closes it after ``close()``).
        watchdog: the core; every call into it holds ``lock``.
        lock: shared with the façade's readers (``armed()``, ``stats()``, ...).
        after: called after each iteration (and after the stop-time read), without the
            lock, with the tokens of the ``Sync`` messages applied in it.
        tick_interval, on_tick: call ``on_tick()`` at least every ``tick_interval``
            seconds (a systemd watchdog keep-alive).
        journal: where every byte read goes before it is applied (the daemon's state).
        socket: the datagram socket, read in the same iterations as the FIFO.
    """

    def __init__(
        self,
        fifo: Fifo,
        watchdog: Watchdog,
        lock: threading.RLock,
        after: Callable[[List[str]], None],
        *,
        tick_interval: Optional[float] = None,
        on_tick: Optional[Callable[[], None]] = None,
        journal: Optional[Journal] = None,
        socket: Optional[DatagramSocket] = None,
    ) -> None:
        self._fifo = fifo
        self._journal = journal
        self._socket = socket
        self._watchdog = watchdog
        self._lock = lock
        self._after = after
        self._tick_interval = tick_interval
        self._on_tick = on_tick
        #: The decoder of the FIFO's stream (its unfinished line is kept at checkpoints).
        self.reader = LineReader()
        self._stopping = False
        #: The loop's thread, once it runs.
        self.ident: Optional[int] = None
        #: When the current iteration started (wall clock, monotonic), or None between
        #: them: one assignment, read whole by other threads.
        self.busy_since: Optional[Tuple[float, float]] = None
        self._wake_r, self._wake_w = os.pipe()
        for fd in (self._wake_r, self._wake_w):
            os.set_blocking(fd, False)
        # (when to apply, worker), in order
        self._exits: Deque[Tuple[float, Worker]] = collections.deque()
        self._captured: Deque[int] = collections.deque()  # pids whose capture is done
        self._selector = selectors.DefaultSelector()
        self._selector.register(fifo.read_fd, selectors.EVENT_READ, _FIFO)
        self._selector.register(self._wake_r, selectors.EVENT_READ, _WAKE)
        if socket is not None:
            self._selector.register(socket.fd, selectors.EVENT_READ, _SOCKET)

    # -- called from any thread ---------------------------------------------------------

    def watch(self, worker: Worker) -> None:
        """Wait for ``worker``'s pidfd too: readable means it exited."""
        if worker.pidfd is not None:
            self._selector.register(worker.pidfd, selectors.EVENT_READ, worker)

    def unwatch(self, worker: Worker) -> None:
        """Stop waiting for ``worker``'s pidfd."""
        if worker.pidfd is not None:
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(worker.pidfd)

    def wake(self) -> None:
        """Make the current or next wait return at once."""
        with contextlib.suppress(BlockingIOError, OSError):  # pending already, or closed
            os.write(self._wake_w, b"w")

    def captured(self, pid: int) -> None:
        """The capture of ``pid`` is done (from any thread): the loop signals it."""
        self._captured.append(pid)
        self.wake()

    def request_stop(self) -> None:
        """Make ``run()`` apply what was written so far and return."""
        self._stopping = True
        self.wake()

    # -- the loop's own thread -----------------------------------------------------------

    def run(self) -> None:
        """Iterate until ``request_stop()``; then read and apply what the FIFO holds, and
        signal the reaps not done (``Watchdog.finish()``).

        What ends the iterations otherwise (Ctrl-C's ``KeyboardInterrupt``, a signal
        handler's ``SystemExit``: no ``Exception``, which an iteration logs) is raised
        again after that same read and those same signals.
        """
        self.ident = threading.get_ident()
        try:
            self._iterate_until_stopped()
        except BaseException:
            # A stuck worker whose reap waits for its capture, or for its SIGKILL after
            # its grace, would escape: nothing signals it once the loop is gone.
            try:
                self._finish()
            except BaseException:  # a second Ctrl-C, say: the first one is what ends run()
                logger.exception("ftimer server: stopping after an interruption failed")
            raise
        self._finish()

    def _iterate_until_stopped(self) -> None:
        """The iterations, until ``request_stop()``."""
        watchdog, tick_interval = self._watchdog, self._tick_interval
        next_tick = None if tick_interval is None else time.monotonic() + tick_interval
        while not self._stopping:
            with self._lock:
                wakeup = watchdog.next_wakeup()
            if self._exits:
                due = self._exits[0][0]
                wakeup = due if wakeup is None else min(wakeup, due)
            if next_tick is not None:
                wakeup = next_tick if wakeup is None else min(wakeup, next_tick)
            timeout = None
            if wakeup is not None:
                timeout = min(max(0.0, wakeup - time.monotonic()), MAX_WAIT)
            try:
                ready = self._selector.select(timeout)
                self.busy_since = (time.time(), time.monotonic())
                now = self._iterate(ready)
                if next_tick is not None and now >= next_tick:
                    assert self._on_tick is not None
                    assert tick_interval is not None
                    next_tick = now + tick_interval
                    self._on_tick()
            except Exception:
                # A bug, not a worker's doing (bad input never raises): keep serving, but
                # never spin on a failure that repeats.
                logger.exception("ftimer server loop iteration failed; continuing")
                time.sleep(0.01)
            finally:
                self.busy_since = None

    def _finish(self) -> None:
        """Read and apply what the FIFO and the socket hold, signal the reaps not done,
        and hand the results to the façade."""
        if self._socket is not None:
            # Sends fail from now on, and their senders resync with the next server: a
            # datagram sent after this read was taken, then dropped with the socket (a
            # disarm lost, the timer saved, and the worker reaped after a restart).
            self._socket.stop_receiving()
        try:
            tokens, _ = self._ingest()
        except Exception:
            logger.exception("ftimer server: reading the FIFO on stop failed")
            tokens = []
        with self._lock:
            finished = self._watchdog.finish(time.monotonic())
        if finished:
            logger.warning(
                "ftimer server stopping: %d reaps finished now, not after their capture "
                "or grace period (a stopped server could not finish them later)",
                finished,
            )
        self._after(tokens)

    def close(self) -> None:
        """Release the selector and the wake-up pipe (after ``run()`` returned)."""
        self._selector.close()
        fds, self._wake_r, self._wake_w = (self._wake_r, self._wake_w), -1, -1
        for fd in fds:  # wake() now writes to -1 (EBADF), never to a reused number
            with contextlib.suppress(OSError):
                os.close(fd)

    def _iterate(self, ready: List[Tuple[selectors.SelectorKey, int]]) -> float:
        """Messages, then exits, then expiries; returns the time the timers were checked.

        Messages first, and an exit only ``EXIT_HOLD`` after it was seen: a worker's last
        words (its own disarm before it exited, or its wrapper's after) are applied
        before its death is, so its timers are disarmed, not dropped.
        """
        watchdog = self._watchdog
        socket_ready = False
        for key, _ in ready:
            if key.data is _WAKE:
                _drain(self._wake_r)
            elif key.data is _SOCKET:
                socket_ready = True
            elif key.data is not _FIFO:  # a pidfd: it exited
                self.unwatch(key.data)  # readable from now on: stop waiting for it
                self._exits.append((time.monotonic() + EXIT_HOLD, key.data))
        tokens, horizon = self._ingest(socket_ready)
        with self._lock:
            now = time.monotonic()
            while self._exits and self._exits[0][0] <= now:
                watchdog.worker_gone(self._exits.popleft()[1])
            if self._captured:
                exiting = {worker.pid for _, worker in self._exits}
                while self._captured:
                    pid = self._captured.popleft()
                    if pid not in exiting:  # else its exit, after the hold, ends the reap
                        watchdog.captured(pid, now)
            watchdog.tick(now, horizon)
        self._after(tokens)
        return now

    def _ingest(self, socket_ready: bool = True) -> Tuple[List[str], float]:
        """Read and apply at least what the FIFO and the socket hold now.

        ``socket_ready``: the selector saw the socket readable; if not, it is read only
        if a datagram arrived since (a failed read costs 4x that check, in every
        iteration of a busy FIFO).

        Returns:
            The ``Sync`` tokens applied, and the horizon: a moment before which
            everything written to the FIFO has now been applied.
        """
        fifo, watchdog, feed = self._fifo, self._watchdog, self.reader.feed
        read = os.read if self._journal is None else self._journal.read
        tokens: List[str] = []
        horizon = time.monotonic()
        pending = fifo.pending()
        full = fifo.full(pending)
        while pending > 0:
            # Read and apply under one lock: a checkpoint (snapshot plus journal position)
            # never falls between the two.
            with self._lock:
                try:
                    chunk = read(fifo.read_fd, READ_CHUNK)
                except BlockingIOError:
                    break
                if not chunk:
                    break
                results = feed(chunk)
                tokens += self._apply("fifo", results, time.monotonic(), time.time())
            pending -= len(chunk)
        sock = self._socket
        if sock is not None and (socket_ready or sock.queued()):
            # Everything queued now (a sender whose datagram would overflow the queue
            # waits): sent before the horizon, so read before judging it.
            received = sock.receive()
            full = full or sock.full
            with self._lock:
                # Released under the lock: the host reads a vouching pidfd under it too
                # (register_timers() from another thread), never one being closed.
                try:
                    if received:
                        watchdog.counters.pid_overridden = sock.overridden
                        now, wall = time.monotonic(), time.time()
                        tokens += self._apply("socket", received, now, wall)
                        if self._journal is not None:  # under the lock, as a checkpoint
                            kept = watchdog.as_bound(received, now, wall)
                            self._journal.keep(kept, self.reader.buffered)
                finally:
                    sock.release()  # the batch's pidfds vouch for nothing after it
        watchdog.horizon.read(horizon, full, time.monotonic() if full else horizon)
        return tokens, horizon

    def _apply(
        self, transport: str, results: Sequence[Incoming], now: float, wall: float
    ) -> List[str]:
        """``Watchdog.apply()`` what ``transport`` gave, counting each line or datagram
        received (a run of bad ones is one result). Under ``_lock``."""
        counters = self._watchdog.counters
        folded = counters.folded
        tokens = self._watchdog.apply(results, now, wall)
        counters.received[transport] += len(results) + counters.folded - folded
        return tokens


def _drain(fd: int) -> None:
    with contextlib.suppress(BlockingIOError):
        while os.read(fd, 4096):
            pass
