"""``FileTimerServer``: the embeddable server, a drop-in for torch's.

The façade around the loop (``_loop``) and the core (``Watchdog``): torch's API, the
lifecycle (new -> running -> stopping -> stopped), events delivered to callbacks outside
the lock, ``sync()``, and the views other threads read while the loop runs.
"""

from __future__ import annotations

import contextlib
import enum
import functools
import logging
import math
import os
import threading
import time
import warnings
from types import TracebackType
from typing import (
    TYPE_CHECKING,
    Callable,
    Dict,
    Iterable,
    Iterator,
    List,
    Optional,
    Tuple,
    Type,
    Union,
)

import msgspec

from ftimer_protocol import (
    FIFO_ENV_VARS,
    Arm,
    DisarmAll,
    FileTimerRequest,
    MalformedMessage,
    TimerRequestV1,
    default_fifo_path,
    torch_request,
)
from ftimer_server.core._events import (
    Event,
    Reaped,
    WorkerGone,
)
from ftimer_server.core._host import CaptureRequest
from ftimer_server.core._incident import Incident
from ftimer_server.core._policy import Policy
from ftimer_server.core._reader import LineReader
from ftimer_server.core._records import Timer, Worker
from ftimer_server.core._stats import Stats
from ftimer_server.core._watchdog import Watchdog
from ftimer_server.incidents._options import IncidentOptions

from ._callbacks import Callbacks
from ._callbacks import event_types as resolve_event_types
from ._edge import ReapStep, SystemHost, ancestors_of
from ._fifo import Fifo, check_mode, lock_fifo, open_fifo, unlock_fifo
from ._journal import Journal
from ._loop import Loop
from ._process import (
    ProcessInspector,
    SystemInspector,
    proc_problem,
    raise_fd_limit,
    ticks_since_boot,
)
from ._signaller import OsSignaller, RecordingSignaller, Signaller
from ._socket import DatagramSocket, forgo_socket, open_socket
from ._sync import Syncs, write_all
from ._torch import LogEvent, request_of_timer

if TYPE_CHECKING:
    from ftimer_server.incidents._diagnostics import Diagnostics

__all__ = ["FileTimerServer", "Lifecycle"]

logger = logging.getLogger("ftimer_server")

#: Seconds ``stop()`` waits for the loop's thread by default (torch's default
#: ``max_interval``, within which torch's ``stop()`` returns).
STOP_TIMEOUT = 10.0
#: torch's server's hook points that its polling loop calls and ftimer's loop does not:
#: overridden in a subclass, they change nothing the server does with what it reads.
TORCH_HOOKS = (
    "_reap_worker",
    "_run_watchdog",
    "_get_requests",
    "register_timers",
    "get_expired_timers",
    "clear_timers",
)


class Lifecycle(enum.Enum):
    """Where a ``FileTimerServer`` is in its life; it only ever moves forward."""

    #: Made, not started: ``restore()`` may arm saved timers before ``start()``.
    NEW = "new"
    #: Started: its loop reads the FIFO (and the socket) and reaps.
    RUNNING = "running"
    #: ``stop()`` was called; the loop applies what was written before it, then ends.
    STOPPING = "stopping"
    #: The loop has ended and the FIFO is closed; ``armed()`` still reads the timers.
    STOPPED = "stopped"


class FileTimerServer:
    """The watchdog server: reads timer requests from a FIFO and reaps expired workers.

    Drop-in for torch's ``FileTimerServer`` (same positional arguments; ``max_interval``
    is accepted and ignored, since this server does not poll). Runs its loop in a thread
    between ``start()`` and ``stop()``, or is used as a context manager.

    Args:
        file_path: the FIFO; defaults to ``$FTIMER_FIFO``, else
            ``$TORCHELASTIC_TIMER_FILE``, else ``ftimer_protocol.default_fifo_path()``:
            the daemon's order, which a client given no path follows too, so it finds
            this server. Created if missing (see ``fifo_mode``). An existing FIFO of
            this user is reused if timers were restored before ``start()``, else
            replaced by a new one, so that clients holding the old one notice the
            restart and re-send their timers.
        run_id: torch's job id, passed to ``log_debug_info``; not used otherwise.
        max_interval: torch's polling interval; ignored.
        daemon: run the loop in a daemon thread.
        log_event: torch's callback, ``log_event(name, request)`` (``request``: the
            ``FileTimerRequest`` concerned, or ``None``), called with torch's names:
            "watchdog started", "timer expired", "kill worker process", "watchdog
            stopped".
        log_debug_info: torch's debug hook point, called as torch 2.13 calls
            ``log_debug_info_for_expired_timers(run_id, {pid: [request.to_json(), ...]})``
            whenever timers expire (pass torch's function to get its log line).
        on_event: receives every ``Event`` (from the loop thread, in order), or those of
            ``event_types``. Exceptions it raises are logged and ignored.
        event_types: the event classes ``on_event`` wants; ``None`` (default): all.
            ``Armed`` and ``Disarmed``, one per request, are not even built when not
            wanted. ``set_event_types()`` changes it later.
        on_change: called from the loop, once per iteration, when the armed timers
            changed in it (armed, re-armed, disarmed, expired, dropped) or a reap's
            capture or SIGKILL became due or was done, or the journal holds more than 16
            MiB: a cheap cue to save them (``checkpoint()``), instead of watching every
            event.
        policy: which processes and signals are allowed, and the timer limits.
        escalate_after: seconds after a signal other than SIGKILL before a surviving
            worker gets SIGKILL; ``None`` (default, torch's behaviour) never escalates.
        signal_override: the signal every reap sends, instead of the deciding timer's
            own (timers with signal 0 stay report-only); ``None`` (default): the timer's.
        signaller: delivers signals; defaults to ``OsSignaller``.
        dry_run: signal nothing (a ``RecordingSignaller`` that reports delivery); the
            events are the same.
        inspector: how processes are looked at; defaults to ``SystemInspector``.
        fifo_mode: permissions of the FIFO; 0o600 (only this user may write) by default.
        fifo_group: group name or gid to give the FIFO.
        remove_fifo: unlink the FIFO on ``stop()`` if this server created it (and the
            lock file ``<fifo>.lock``). Off by default, so a restarted server is found
            at the same path by its writers.
        lock_fifo: hold the lock file ``<fifo>.lock`` (the daemon's, see
            ``ftimer-server run``) from ``start()`` until the loop ends: ``start()``
            refuses with ``FifoBusy`` while another server (the daemon, or another
            embedded server) serves the path, instead of replacing its FIFO under it.
            False: the caller holds the lock (the daemon does, from before it starts
            until after its final save).
        kill_self_on_reap: after reaping a worker, signal this process with the same
            signal (what torch 2.13 always does). Off by default; never with a
            ``RecordingSignaller`` (or ``dry_run``), which signals nobody.
        tick_interval: call ``on_tick()`` from the loop at least every this many
            seconds (a systemd watchdog keep-alive). The only periodic wake-up the
            server ever does, and only when asked.
        on_tick: what the loop calls every ``tick_interval`` seconds.
        pipe_size: the pipe buffer size to request; defaults to the system maximum.
        reap_steps: callables ``step(worker, expiry, now)`` run between an expiry and
            its signal: the ``Worker``; what expired (an internal record, not a stable
            API: ``expired``, the worker's expired timers, earliest first, and
            ``decider``, the one whose signal is sent); the loop's ``time.monotonic()``.
        incidents: capture why a worker hangs before each reap (its stacks and its
            peers', off the loop, within ``incidents.timeout``), and write an incident
            (see docs/incidents.md); ``None`` (default): reap at once, capture nothing.
        on_incident: called with each incident once complete (from the incidents' writer
            thread: keep it short, the incidents after it wait for it).
        socket_path: also receive timer requests as datagrams on an AF_UNIX socket bound
            there (mode and group as the FIFO's): the sender's pid and uid come from
            the kernel, not the message (see docs/protocol.md); ``None`` (default): the
            FIFO alone. ``ftimer_protocol.socket_path_for(file_path)`` is the usual place.
        journal: the daemon's state-file machinery, not a stable API (its type,
            ``Journal``, is internal to ``ftimer_server``): keeps every byte read before
            it is applied, for ``checkpoint()`` and a restart's ``replay()``; ``None``
            (default): no journal.
        adopt_socket: the daemon's too, not a stable API: (a descriptor of a datagram
            socket bound at ``socket_path`` already, the queue length it was made with):
            the last daemon's, which systemd kept open, used instead of binding one,
            with the datagrams queued on it, when timers were restored (as the FIFO is
            reused then); else closed, and a new one bound (as the FIFO is replaced),
            so that its clients re-send their timers. The server owns it from
            ``start()`` on.
        restore_grace: after ``restore()`` or ``replay()`` (counted from the call, or, for
            one before ``start()``, from when it has opened the FIFO), no timer expires for
            this many seconds: clients that could not write while no server ran (a
            disarm during the outage) re-send within their retry interval (1 s at most
            for ftimer's client), and a deadline that fell in the outage is judged after.

    Raises:
        ValueError: an option is out of range, or options conflict.

    ``start()`` and ``run()`` must be called in the process that made the server: a
    forked child makes its own.
    """

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        # A torch subclass that overrides _reap_worker to log instead of kill would kill
        # for real here, silently. Through the MRO: a mixin's override counts too.
        overridden = [
            name
            for name in TORCH_HOOKS
            if getattr(cls, name, None) is not getattr(FileTimerServer, name, None)
        ]
        if overridden:
            _warn_hooks(cls.__qualname__, overridden, stacklevel=3)

    def __init__(
        self,
        file_path: Optional[Union[str, os.PathLike[str]]] = None,
        run_id: str = "",
        max_interval: float = 10,
        daemon: bool = True,
        log_event: Optional[LogEvent] = None,
        *,
        log_debug_info: Optional[Callable[[str, Dict[int, List[str]]], None]] = None,
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
        incidents: Optional[IncidentOptions] = None,
        on_incident: Optional[Callable[[Incident], None]] = None,
        socket_path: Optional[Union[str, os.PathLike[str]]] = None,
        journal: Optional[Journal] = None,
        restore_grace: float = 1.5,
        lock_fifo: bool = True,
        adopt_socket: Optional[Tuple[int, int]] = None,
    ) -> None:
        if file_path is None:
            # The daemon's and the client's order: an embedded server listens where its
            # workers' clients look when given no path.
            from_env = next((os.environ[v] for v in FIFO_ENV_VARS if os.environ.get(v)), "")
            file_path = from_env or default_fifo_path()
        _check_arguments(
            tick_interval=tick_interval,
            on_tick=on_tick,
            fifo_mode=fifo_mode,
            restore_grace=restore_grace,
            socket_path=socket_path,
            adopt_socket=adopt_socket,
            signaller=signaller,
            dry_run=dry_run,
        )
        self._journal = journal
        self._restore_grace = restore_grace
        self._hold_at_open = False  # restored before start: the grace begins at the open
        #: The unfinished line a replay ended with: the rest of it is in the FIFO.
        self._replayed_unfinished = b""
        self._socket_path = None if socket_path is None else os.path.abspath(socket_path)
        self._socket: Optional[DatagramSocket] = None
        self._adopt_socket = adopt_socket
        # Absolute: the FIFO and its lock are found again after a chdir (remove_fifo).
        #: The FIFO's absolute path: the argument, or the default it resolved to. An agent
        #: passes it to its workers (``TORCHELASTIC_TIMER_FILE``), as torch's does.
        self.file_path: str = os.path.abspath(file_path) if os.fspath(file_path) else ""
        #: torch's job id, as given; ftimer passes it to ``log_debug_info`` only.
        self.run_id: str = run_id
        #: torch's polling interval, as given; ftimer's server does not poll.
        self.max_interval: float = max_interval
        self._daemon = daemon
        self._callbacks = Callbacks(
            log_event=log_event,
            log_debug_info=log_debug_info,
            on_event=on_event,
            types=resolve_event_types(event_types),
            on_change=on_change,
        )
        self._fifo_mode = fifo_mode
        self._fifo_group = fifo_group
        self._remove_fifo = remove_fifo
        self._lock_fifo = lock_fifo
        self._lock_fd = -1
        self._stop_timeout: Optional[float] = STOP_TIMEOUT
        self._kill_self_on_reap = kill_self_on_reap
        self._tick_interval = tick_interval
        self._on_tick = on_tick
        self._pipe_size = pipe_size
        self._inspector = inspector or SystemInspector()
        if signaller is None:
            signaller = RecordingSignaller() if dry_run else OsSignaller(self._inspector)
        # A recorded reap "delivered" nothing: kill_self_on_reap follows real ones only.
        self._signals_for_real = not isinstance(signaller, RecordingSignaller)
        #: The process this server protects (itself, its ancestors): a forked child
        #: must make its own server.
        self._pid = os.getpid()
        self._lock = threading.RLock()
        # Events wait here while the lock is held; they go to the callbacks after it is
        # released, so a slow callback never blocks armed(), stats() or sync() callers.
        self._pending: List[Event] = []
        self._diagnostics: Optional[Diagnostics] = None
        if incidents is not None:
            # Imported only by a server that captures: keeps the daemon's RSS down.
            from ftimer_server.incidents._diagnostics import Diagnostics  # noqa: PLC0415

            self._diagnostics = Diagnostics(incidents, on_incident, dry_run=dry_run)
        try:  # the capture helper runs from here: not left behind by a bad argument
            self._host, self._watchdog = self._make_core(
                signaller,
                reap_steps=reap_steps,
                incidents=incidents,
                policy=policy,
                escalate_after=escalate_after,
                signal_override=signal_override,
            )
        except BaseException:
            if self._diagnostics is not None:
                self._diagnostics.close()
            raise
        self._state = Lifecycle.NEW
        self._fifo: Optional[Fifo] = None
        self._loop: Optional[Loop] = None
        self._thread: Optional[threading.Thread] = None
        self._syncs = Syncs()
        self._self_signal = 0
        self._stop_asked = False
        #: Set once the server stopped (closed its FIFO, delivered its last events).
        self._ended = threading.Event()
        self._opener: Optional[int] = None
        self._opening = False  # _open() runs (a signal handler's stop() may land in it)

    def _make_core(
        self,
        signaller: Signaller,
        *,
        reap_steps: Iterable[ReapStep],
        incidents: Optional[IncidentOptions],
        policy: Optional[Policy],
        escalate_after: Optional[float],
        signal_override: Optional[int],
    ) -> Tuple[SystemHost, Watchdog]:
        """The host (every OS call the core asks for) and the watchdog over it."""
        callbacks = self._callbacks
        host = SystemHost(
            self._inspector,
            signaller,
            tuple(functools.partial(callbacks.call, "reap step", step) for step in reap_steps),
            watch=self._watch,
            unwatch=self._unwatch,
            capture=None if self._diagnostics is None else self._capture,
            tree=incidents is not None and incidents.reap_tree,
        )
        watchdog = Watchdog(
            host=host,
            policy=policy,
            server_pid=self._pid,
            ancestors=ancestors_of(self._pid, self._inspector),
            own=() if self._diagnostics is None else self._diagnostics.processes,
            emit=self._pending.append,
            escalate_after=escalate_after,
            signal_override=signal_override,
            timer_events=callbacks.wants_timer_events,
            capture_budget=None if incidents is None else incidents.timeout,
            job_label=None if incidents is None else incidents.job_label,
        )
        return host, watchdog

    # -- lifecycle ---------------------------------------------------------------------

    @property
    def stop_timeout(self) -> Optional[float]:
        """Seconds ``stop()`` waits for the loop's thread: 10 by default (torch's default
        ``max_interval``); ``None`` or infinity: until it ends; a negative one: not at
        all. Setting it to NaN raises ``ValueError``."""
        return self._stop_timeout

    @stop_timeout.setter
    def stop_timeout(self, timeout: Optional[float]) -> None:
        _lock_wait(timeout)  # checked here: stop() never raises for it
        self._stop_timeout = timeout

    @property
    def state(self) -> Lifecycle:
        """Where the server is in its life."""
        state = self._state
        # A stop() that gave up waiting for the loop has asked it to stop all the same.
        return Lifecycle.STOPPING if state is Lifecycle.RUNNING and self._stop_asked else state

    def start(self) -> None:
        """Lock the FIFO's lock file, open the FIFO and start the loop in a thread.

        Raises:
            FifoBusy: another ftimer server (the daemon, or another embedded server)
                serves the FIFO: it holds ``<fifo>.lock``. Nothing was changed.
            FifoError: the FIFO path is unsafe or unusable (an ``OSError``: its
                directory is missing, say).
            RuntimeError: the server was already started, or was made in another
                process (this one's parent, before a fork); or ``/proc`` is another PID
                namespace's (its processes would be taken for this one's).
        """
        loop = self._open()
        try:
            self._thread = threading.Thread(
                target=self._serve, args=(loop,), name="ftimer-server", daemon=self._daemon
            )
            self._thread.start()
        except BaseException:  # no thread to be had, or a signal handler's exception
            if self._thread is not None and self._thread.is_alive():
                self._stop_asked = True  # it runs: it closes itself once asked
                loop.request_stop()
            else:
                self._close(loop)
            raise
        finally:
            if self._opener == threading.get_ident():
                self._opener = None

    def run(self) -> None:
        """Open the FIFO and run the loop in the calling thread until ``stop()``.

        ``stop()`` may be called from another thread, a signal handler or a callback;
        ``run()`` returns once the FIFO is closed. Ctrl-C (``KeyboardInterrupt``) or a
        signal handler's ``sys.exit()`` ends it as ``stop()`` would (the reaps still
        pending are signalled at once), and is raised again once the FIFO is closed.

        Raises:
            FifoBusy: another ftimer server serves the FIFO (see ``start()``).
            FifoError: the FIFO path is unsafe or unusable (an ``OSError``).
            RuntimeError: as ``start()``.
        """
        self._serve(self._open())

    def stop(self) -> None:
        """Stop the loop and close the FIFO (removed only with ``remove_fifo``).

        Everything written to the FIFO before the call is applied first (at most one
        pipe-full: writers that keep writing do not delay the stop). Armed timers stay
        readable with ``armed()``. A stopped server cannot be started again: create
        another and ``restore()``.

        Waits for the loop at most ``stop_timeout`` seconds (10 by default; ``None`` or
        ``math.inf``: until it ends; a negative one: not at all): a callback
        (``log_event``, ``on_event``, a reap step, ...) that blocks would otherwise block
        the caller too. Past it, a warning names the callback and ``stop()`` returns with
        the server ``STOPPING``: the loop delivers the remaining events, closes the FIFO
        and releases its lock once the callback returns.

        In a process forked from the one that made the server, it does nothing: the
        server runs in that one (a ``with`` block the child leaves ends there too).
        """
        if os.getpid() != self._pid:
            return
        wait = _lock_wait(self._stop_timeout)  # never NaN: the setter refuses it
        end = time.monotonic() + wait
        # A signal handler's stop() that interrupted this thread in a call holding the
        # lock: the loop cannot end before that call returns, so it is not waited for.
        holding = bool(self._lock._is_owned())  # type: ignore[attr-defined]  # Condition's test
        # Asked before any wait, without the lock: a loop busy in a reap (which it holds
        # the lock through), or a start() under way (another thread's, or this thread's
        # when a signal handler stops it), stops as soon as it can.
        self._stop_asked = True
        loop = self._loop
        if loop is not None:
            loop.request_stop()  # a flag and a wake-up
        if not self._lock.acquire(timeout=wait):
            self._busy(wait)
            return
        try:
            if self._state is Lifecycle.NEW and not self._opening:
                self._release()  # never started: release what restore() bound
                self._state = Lifecycle.STOPPED
                self._ended.set()
            if self._state is Lifecycle.RUNNING:
                self._state = Lifecycle.STOPPING
            loop = self._loop
            if loop is not None:
                loop.request_stop()
        finally:
            self._lock.release()
        me = threading.get_ident()
        if holding or me == self._opener or (loop is not None and loop.ident == me):
            return  # called by what starts or runs the loop: it stops once this returns
        # The end, not a thread's: another stop() may be waiting too, or a start()
        # may not have made its thread yet.
        if not self._ended.wait(None if wait < 0 else max(0.0, end - time.monotonic())):
            self._busy(wait)

    def _busy(self, timeout: float) -> None:
        """Warn that the loop did not stop within ``timeout`` seconds, naming the callback
        it is in."""
        calling = self._callbacks.calling
        logger.warning(
            "stop(): the server's thread has not ended within %g s: %s; returning "
            "without it (it closes the FIFO %s and delivers the remaining events "
            "once that returns)",
            timeout,
            f"it is in its {calling[0]} callback, {calling[1]!r}" if calling else "it is busy",
            self.file_path,
        )

    def __enter__(self) -> FileTimerServer:
        try:
            self.start()
        except BaseException:
            if self._state is Lifecycle.NEW:  # no __exit__ follows: release it here
                self.stop()
            raise
        return self

    def __exit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        self.stop()

    # -- queries and commands ----------------------------------------------------------

    def armed(self, timeout: Optional[float] = None) -> List[Timer]:
        """A snapshot of the armed timers (deadlines in monotonic seconds).

        Args:
            timeout: seconds to wait for the loop to let go of the table (it holds it
                while it applies a batch or reaps); ``None`` or infinity: as long as it
                takes.

        Raises:
            TimeoutError: the loop held it longer than ``timeout``.
            ValueError: ``timeout`` is NaN.
        """
        with self._table(timeout):
            return self._watchdog.armed()

    def lost_paths(self) -> List[str]:
        """The paths this running server was opened on, its FIFO's then its socket's,
        that no longer name them: removed (a cleaner of ``/tmp``, a mistaken ``rm``) or
        replaced by another file. Workers that open such a path do not reach this server
        (those that hold it open still do). ``[]`` when it is not running."""
        # Without the lock, which the loop holds through a reap: a daemon asks every second.
        if self._state is not Lifecycle.RUNNING:
            return []
        ends = [end for end in (self._fifo, self._socket) if end is not None]
        return [end.path for end in ends if not end.at_path()]

    def workers(self) -> List[Worker]:
        """A snapshot of the processes timers are bound to."""
        with self._lock:
            return self._watchdog.workers()

    def stats(self, timeout: Optional[float] = None) -> Stats:
        """A snapshot of the counters.

        Args:
            timeout: seconds to wait for the loop to let go of the table (it holds it
                while it applies a batch or reaps); ``None`` or infinity: as long as it
                takes.

        Raises:
            TimeoutError: the loop held it longer than ``timeout``.
            ValueError: ``timeout`` is NaN.
        """
        with self._table(timeout):
            return self._watchdog.stats()

    def restore(self, timers: Iterable[Timer], written_by: Optional[float] = None) -> None:
        """Arm saved timers (``armed()`` of a previous server), checking each process.

        Deadlines are monotonic seconds of this boot. The timers of a process that is
        gone, or is now another process (start time), are dropped with a
        ``WorkerGone`` event (it exited while no server ran: counted as requests
        ``restore``/``exited``, not refused); a timer the policy refuses, with a
        ``Rejected`` event (request ``"restore"``); one the FIFO would drop as malformed
        (a NaN deadline, say) is dropped and counted as the FIFO's are (a
        ``DecodeFailed`` event). For ``restore_grace`` seconds nothing expires; after
        that, while the clients' re-sends keep the queues full, a restored timer waits
        to be re-sent, re-armed or disarmed (a client re-sends first the disarms the
        restart may have lost; see ``RESYNC_QUIET``). Call it before ``start()`` or while
        running.

        Args:
            timers: the saved timers.
            written_by: when they were saved (``time.time()``): a process that started
                later holds a reused pid, and a timer naming that pid without a start
                time is not its (as in ``replay()``).

        Raises:
            RuntimeError: the server was stopped, or was made in another process.
        """
        checked: List[Timer] = []
        malformed: List[MalformedMessage] = []
        for timer in timers:
            # Timer() checks nothing: a NaN deadline would never expire, nor would any
            # timer after it in the table. Checked as the Arm it was (a Timer's decoding
            # leaves label keys unchecked). The checked copy is not kept: the table makes
            # its own timers, and a second copy of each would stay in the daemon's memory.
            try:
                msgspec.convert(msgspec.to_builtins(timer), Arm)
            except (msgspec.ValidationError, TypeError) as e:
                malformed.append(MalformedMessage(f"restore: {e}", repr(timer).encode()[:64]))
            else:
                checked.append(timer)
        with self._lock:
            self._check_usable("restore into a new one")
            if malformed:
                self._watchdog.apply(malformed, time.monotonic(), time.time())
            ticks = None if written_by is None else ticks_since_boot(written_by)
            self._watchdog.restore(checked, ticks)
            if checked:
                self._hold()
        self._loop_or_flush()

    def replay(self, chunks: Iterable[bytes], written_by: Optional[float] = None) -> int:
        """Apply bytes as if read from the FIFO before it was opened: a journal's
        segments, after ``restore()`` of the snapshot they follow. Markers of ``sync()``
        in them are ignored. For ``restore_grace`` seconds nothing expires. Call it
        before ``start()``.

        The daemon's state-file machinery (with ``journal=`` and ``checkpoint()``), not
        a stable API: it may change in any release.

        Args:
            chunks: the bytes, in the order they were read (lines may span chunks).
            written_by: when the state the bytes follow was saved (``time.time()``;
                the bytes were written since): a line naming no start time (torch's)
                is never applied to a process born later, which may hold the pid of a
                worker that exited; it is refused (``identity_mismatch``, logged: the
                line may be that process's own, and it unwatched until it arms again).
                A line about a process that is gone now (its pid free, or another
                process's by its start time) counts as requests with result ``exited``
                (``unknown`` for a disarm), not as a refusal: its worker ended while no
                server ran.

        Returns:
            The number of bytes replayed.

        Raises:
            RuntimeError: the server was started.
        """
        reader, size = LineReader(), 0
        with self._lock:
            if self._state is not Lifecycle.NEW:
                raise RuntimeError("replay() comes before start()")
            watchdog = self._watchdog
            written_at_tick = None if written_by is None else ticks_since_boot(written_by)
            with watchdog.catching_up(written_at_tick, since=True):
                for chunk in chunks:
                    watchdog.apply(reader.feed(chunk), time.monotonic(), time.time())
                    size += len(chunk)
            self._replayed_unfinished = reader.unfinished
            if size:
                self._hold()
        self._flush()
        return size

    def checkpoint(self) -> Tuple[List[Timer], int]:
        """A snapshot of the armed timers (and of the reaps not finished: a capture or a
        SIGKILL still due, as timers) and, atomically with it, the journal segment from
        which a restart that restores the snapshot must ``replay()`` (0: no journal).

        The daemon's state-file machinery (with ``journal=`` and ``replay()``), not a
        stable API: it may change in any release.

        Raises:
            OSError: the journal could not start a new segment.
        """
        with self._lock:
            timers = self._watchdog.saved()
            if self._journal is None:
                return timers, 0
            carry = b"" if self._loop is None else self._loop.reader.unfinished
            return timers, self._journal.checkpoint(carry)

    def sync(self, timeout: float = 10.0) -> None:
        """Return once everything written to the FIFO before this call has been applied
        (and the timers it made due reaped).

        Args:
            timeout: seconds to wait at most (infinity: as long as it takes).

        Raises:
            TimeoutError: that took longer than ``timeout`` seconds.
            ValueError: ``timeout`` is NaN.
            RuntimeError: the server is not running (or stopped meanwhile), or this is
                the loop's own thread.
            OSError: no descriptor to write with (``EMFILE``).
        """
        wait = _lock_wait(timeout)
        deadline = None if wait < 0 else time.monotonic() + wait
        with self._table(timeout):
            self._check_own_process()
            if self._state is not Lifecycle.RUNNING or self._fifo is None:
                raise RuntimeError("the server is not running")
            if self._loop is not None and threading.get_ident() == self._loop.ident:
                raise RuntimeError("sync() from the server's own thread would deadlock")
            # A descriptor of our own: the FIFO's may be closed (and its number reused
            # by another file) by a concurrent stop() while we wait for room to write.
            fd = os.dup(self._fifo.write_fd)
            token, line, done = self._syncs.add()
        try:
            try:
                write_all(fd, line, deadline)
            except BrokenPipeError:  # the server closed its end: it stopped meanwhile
                raise RuntimeError("the server stopped before the sync completed") from None
            if not done.wait(None if deadline is None else max(0.0, deadline - time.monotonic())):
                raise TimeoutError(f"sync() did not complete within {timeout} s")
            if self._syncs.waiting(token):  # set by the stop, not reached
                raise RuntimeError("the server stopped before the sync completed")
        finally:
            os.close(fd)
            self._syncs.forget(token)

    # -- torch's public methods ----------------------------------------------------------

    def run_once(self) -> None:
        """torch's test and tool entry: apply everything written to the FIFO so far, run
        one expiry pass, then stop (torch's ``run_once`` ends its watchdog too), whatever
        happened. Starts the server first if it was not.

        Raises:
            FifoBusy, FifoError, RuntimeError: as ``start()``.
            TimeoutError: what was written was not applied within ``sync()``'s 10 s (the
                server is stopped all the same).
        """
        if self._state is Lifecycle.NEW:
            self.start()
        try:
            with contextlib.suppress(RuntimeError):  # stopped meanwhile: nothing left to do
                self.sync()
        finally:
            self.stop()

    def register_timers(self, timer_requests: Iterable[FileTimerRequest]) -> None:
        """Apply torch's requests (ftimer's ``FileTimerRequest`` or torch's own) as if
        read from the FIFO, through the same schema, policy and identity checks (a
        negative ``expiration_time`` releases; one torch's server never expires, infinite,
        NaN or beyond ``MAX_TIME``, arms a timer that never fires, as from the FIFO). A
        request the FIFO would drop as malformed (a ``scope_id`` that is not a string, a
        pid out of range) is dropped and counted as the FIFO's are (a ``DecodeFailed``
        event); the others are applied.

        Raises:
            RuntimeError: the server was stopped (nothing would enforce them), or was
                made in another process.
        """
        messages: List[Union[TimerRequestV1, MalformedMessage]] = []
        for r in timer_requests:
            fields = {
                "pid": r.worker_pid,
                "scope_id": r.scope_id,
                "expiration_time": r.expiration_time,
                "signal": r.signal,
            }
            try:
                messages.append(torch_request(fields))
            except MalformedMessage as e:
                messages.append(MalformedMessage(f"register_timers: {e.reason}", e.excerpt))
        with self._lock:
            self._check_usable("register them with a new one")
            self._watchdog.apply(messages, time.monotonic(), time.time())
        self._loop_or_flush()

    def clear_timers(self, worker_pids: Iterable[int]) -> None:
        """Drop every timer of ``worker_pids``, and those of processes that have exited
        (as torch's does), unsignalled. A running server drops the latter as soon as
        they exit; one not started has no loop to see it.

        Raises:
            RuntimeError: the server was stopped (``armed()`` still lists its timers, to
                ``restore()`` into a new one), or was made in another process.
        """
        with self._lock:
            self._check_usable("its timers stay as armed() lists them")
            watchdog = self._watchdog
            watchdog.apply([DisarmAll(pid) for pid in set(worker_pids)], 0.0, 0.0)
            for worker in watchdog.workers():
                if not self._host.alive(worker):
                    watchdog.worker_gone(worker)
        self._loop_or_flush()

    def get_expired_timers(self, deadline: float) -> Dict[int, List[FileTimerRequest]]:
        """torch's view of the armed timers whose expiration is at or before
        ``deadline`` (wall-clock seconds, ``time.time()``), by pid; nothing is reaped."""
        wall, now = time.time(), time.monotonic()
        due = now + (deadline - wall)
        expired: Dict[int, List[FileTimerRequest]] = {}
        for timer in self.armed():
            if timer.deadline <= due:
                expired.setdefault(timer.pid, []).append(request_of_timer(timer))
        return expired

    @staticmethod
    def is_process_running(pid: int) -> bool:
        """True if ``pid`` names a live process (not a zombie, not a thread's id).
        Unlike torch's, it sends nothing (torch's ``kill(pid, 0)`` is true for a thread
        id, and for pid 0 or -1 asks about process groups)."""
        if pid <= 0:
            return False
        inspector = SystemInspector()
        try:
            inspector.start_time(pid)
            return inspector.tgid(pid) == pid
        except OSError:
            return False

    def get_last_progress_time(self) -> int:
        """torch's liveness probe: now while the loop is healthy (idle or working), else
        the wall-clock second its current iteration started."""
        busy_since = None if self._loop is None else self._loop.busy_since
        return int(time.time() if busy_since is None else busy_since[0])

    def stalled_for(self) -> float:
        """Seconds the loop's current iteration has run so far: 0.0 while the loop is
        healthy (between iterations), by the monotonic clock, which no step of the wall
        clock (nor another host's) changes."""
        busy_since = None if self._loop is None else self._loop.busy_since
        return 0.0 if busy_since is None else max(0.0, time.monotonic() - busy_since[1])

    def set_event_types(self, event_types: Optional[Iterable[Type[Event]]]) -> None:
        """Change which events ``on_event`` receives (``None``: all), from now on.

        Raises:
            TypeError: one of them is not an ``Event`` class.
            ValueError: the server has no ``on_event``.
        """
        types = resolve_event_types(event_types)
        with self._lock:
            self._callbacks.set_types(types)
            self._watchdog.timer_events = self._callbacks.wants_timer_events

    @property
    def incident_writes(self) -> Tuple[int, int]:
        """(incidents written, incidents that could not be written) since start."""
        d = self._diagnostics
        return (0, 0) if d is None else (d.written, d.write_errors)

    @property
    def incidents_failing(self) -> Optional[str]:
        """Why the last incident could not be written, or None (none failed, or one was
        written since)."""
        d = self._diagnostics
        return None if d is None else d.failing

    @property
    def socket(self) -> Optional[DatagramSocket]:
        """The datagram socket bound at ``socket_path`` while running, else ``None``.

        Its type is internal to ``ftimer_server``, not a stable API; its ``path`` is
        where it is bound, ``fd`` its descriptor, and ``passes_pidfds`` whether the kernel
        gives the server a pidfd of each sender (``SO_PASSPIDFD``).
        """
        return self._socket

    @property
    def fifo(self) -> Optional[Fifo]:
        """The open FIFO while running (path, pipe size, whether this server created it)."""
        return self._fifo

    # -- the loop ----------------------------------------------------------------------

    def _open(self) -> Loop:
        # Set on the instance (server._reap_worker = ...): never called either.
        overridden = [name for name in TORCH_HOOKS if name in vars(self)]
        if overridden:
            _warn_hooks(f"{type(self).__qualname__} instance", overridden, stacklevel=4)
        with self._lock:
            if self._state is not Lifecycle.NEW:
                raise RuntimeError(f"the server is {self._state.value}; create a new one")
            #: The thread that starts the loop (start()'s, or run()'s, which then runs it):
            #: a stop() from it (a callback's, a signal handler's) never waits.
            self._opener = threading.get_ident()
            self._opening = True  # a signal handler's stop() may land in it
            try:
                loop = self._open_locked()
            finally:
                self._opening = False
        try:
            fifo = self._fifo
            assert fifo is not None
            logger.info(
                "ftimer server listening on %s (pipe buffer %d bytes)", fifo.path, fifo.pipe_size
            )
            log_event = self._callbacks.log_event
            if log_event is not None:
                self._callbacks.call("log_event", log_event, "watchdog started", None)
        except BaseException:  # a signal handler's, before the loop ran: ended as a stop
            self._close(loop)
            raise
        return loop

    def _hold(self) -> None:
        """Expire nothing for ``restore_grace`` seconds from now, or, before ``start()``,
        from when the FIFO is open: clients can re-send only then (lock held)."""
        self._watchdog.hold(time.monotonic() + self._restore_grace)
        self._hold_at_open = self._state is Lifecycle.NEW

    def _check_usable(self, instead: str) -> None:
        """Raise ``RuntimeError`` unless timers can be changed here (lock held): not in a
        process forked from the server's, not once it is stopped (``instead``: what to
        do then)."""
        self._check_own_process()
        if self._state in (Lifecycle.STOPPING, Lifecycle.STOPPED):
            raise RuntimeError(f"the server is stopped; {instead}")

    def _check_own_process(self) -> None:
        """Raise ``RuntimeError`` in a process forked from the one that made the server."""
        if os.getpid() != self._pid:
            raise RuntimeError(
                f"this server was made in process {self._pid}, not in this one: a "
                "forked process makes its own (a server never signals its own process "
                "or its ancestors, which it learns when it is made)"
            )

    def _open_locked(self) -> Loop:
        """``_open()``'s work, under the lock.

        Raises:
            As ``start()``.
        """
        self._check_own_process()
        problem = proc_problem()
        if problem is not None:
            raise RuntimeError(f"cannot serve: {problem}")
        raise_fd_limit()
        if self._lock_fifo:  # before the FIFO is touched: never another server's
            self._lock_fd = lock_fifo(self.file_path)
        try:
            return self._open_ends()
        except BaseException:
            # Failed, or interrupted (a signal handler's exception): nothing is left
            # open or locked, and the server is as new (a stop() releases it).
            loop, fifo, sock = self._loop, self._fifo, self._socket
            self._loop = self._fifo = self._socket = None
            self._state = Lifecycle.NEW
            if loop is not None:
                loop.close()
            if sock is not None:
                sock.close()
            if fifo is not None:
                fifo.close(remove=True)  # made by this start: not left behind
            self._unlock()
            raise

    def _open_ends(self) -> Loop:
        """Open the FIFO and the socket and make the loop (under the lock; the caller
        closes what was opened if it raises)."""
        # A server that restored nothing replaces its old FIFO: clients that still hold
        # the old one then fail their next write and re-send their timers. One that
        # restored timers reuses it: its writers lose nothing.
        restored = len(self._watchdog.table) > 0
        fifo = self._fifo = open_fifo(
            self.file_path,
            mode=self._fifo_mode,
            group=self._fifo_group,
            pipe_size=self._pipe_size,
            replace=not restored,
        )
        adopt = self._adopt_socket
        if adopt is not None and not restored and self._socket_path is not None:
            # As the FIFO: clients still connected to the last server's socket would
            # never learn that this one knows none of their timers. One bound anew
            # has them reconnect and re-send (what was queued on the old is theirs).
            forgo_socket(self._socket_path, adopt[0])
            self._adopt_socket = None  # closed: a start tried again binds anew
            logger.info(
                "bound a new socket at %s (no timers restored), not the last server's "
                "kept open: its clients reconnect and re-send their timers",
                self._socket_path,
            )
            adopt = None
        if self._socket_path is not None:
            self._socket = open_socket(
                self._socket_path,
                mode=self._fifo_mode,
                group=self._fifo_group,
                processes=self._inspector,
                adopt=adopt,
            )
            self._host.vouched = self._socket.vouched
        if fifo.replaced:
            logger.info(
                "replaced the FIFO %s with a new one (no timers restored): writers "
                "holding the old one reconnect and re-send their timers",
                self.file_path,
            )
        on_tick = self._on_tick
        if on_tick is not None:  # through _call, as every callback
            on_tick = functools.partial(self._callbacks.call, "on_tick", on_tick)
        loop = Loop(
            fifo,
            self._watchdog,
            self._lock,
            self._after,
            tick_interval=self._tick_interval,
            on_tick=on_tick,
            journal=self._journal,
            socket=self._socket,
        )
        if not fifo.replaced:
            # The last server read a line in part (a read ends anywhere) and kept that
            # part at its checkpoint: the rest is in this FIFO, and would be read as a
            # line of its own, refused: a disarm lost, a healthy worker reaped.
            loop.reader.feed(self._replayed_unfinished)
        if self._hold_at_open:  # a slow start (a helper, a socket) took from the grace
            self._watchdog.hold(time.monotonic() + self._restore_grace)
        for worker in self._watchdog.workers():  # bound by restore() before start
            loop.watch(worker)
        self._loop = loop
        self._state = Lifecycle.RUNNING
        if self._stop_asked:  # by a stop() while this start was under way
            self._state = Lifecycle.STOPPING
            loop.request_stop()
        return loop

    def _unlock(self) -> None:
        """Release the FIFO's lock file, if this server holds it (under ``_lock``)."""
        if self._lock_fd >= 0:
            unlock_fifo(self.file_path, self._lock_fd, remove=self._remove_fifo)
            self._lock_fd = -1

    def _serve(self, loop: Loop) -> None:
        try:
            loop.run()
        except (KeyboardInterrupt, SystemExit):  # run() in the main thread: Ctrl-C, or a
            raise  # signal handler's sys.exit(), ends it
        except BaseException:
            logger.critical(
                "the ftimer server's loop ended without stop(): no timer is enforced now",
                exc_info=True,
            )
            raise
        finally:
            self._close(loop)

    def _close(self, loop: Loop) -> None:
        """Close the ends, release the lock and the core, deliver the last events; set
        ``_ended``, whatever interrupts it (a second Ctrl-C during a capture's end)."""
        try:
            try:
                if self._diagnostics is not None:
                    # First, outside the lock: it finishes the incidents in progress
                    # (seconds), whose captures still tell the loop when they are done.
                    self._diagnostics.close()
            finally:
                with self._lock:
                    try:
                        self._watchdog.close()
                        loop.close()
                        if self._fifo is not None:
                            self._fifo.close(remove=self._remove_fifo)
                        if self._socket is not None:
                            self._socket.close()
                    finally:
                        self._unlock()  # last: the FIFO is closed (and removed if asked)
                        self._state = Lifecycle.STOPPED
                        self._syncs.stopped()
            logger.info("ftimer server on %s stopped", self.file_path)
            self._flush()
            log_event = self._callbacks.log_event
            if log_event is not None:
                self._callbacks.call("log_event", log_event, "watchdog stopped", None)
        finally:
            self._ended.set()

    def _release(self) -> None:
        """Close the core and the capture helper (it runs from construction), under
        ``_lock``: what a server that was never started holds."""
        self._watchdog.close()
        if self._diagnostics is not None:
            self._diagnostics.close()

    def _loop_or_flush(self) -> None:
        """After a change made from another thread: the loop sees new deadlines and
        delivers the events; before the loop runs, deliver them here."""
        loop = self._loop
        if loop is not None and self._state is Lifecycle.RUNNING:
            loop.wake()
        else:
            self._flush()

    def _after(self, tokens: List[str]) -> None:
        """After each iteration: events to the callbacks, ``on_change``, ``sync()``
        callers released, and the server's own signal if it asked for one."""
        self._flush()
        self._changed()
        if tokens:
            self._syncs.reached(tokens)
        if self._self_signal:
            sig, self._self_signal = self._self_signal, 0
            logger.warning("signalling the server itself (kill_self_on_reap)")
            os.kill(os.getpid(), sig)

    # -- helpers -----------------------------------------------------------------------

    @contextlib.contextmanager
    def _table(self, timeout: Optional[float]) -> Iterator[None]:
        """Hold the table's lock, waiting at most ``timeout`` seconds (``None``: as long
        as it takes) for the loop to let go of it.

        Raises:
            TimeoutError: the loop held it longer.
            ValueError: ``timeout`` is NaN.
        """
        if not self._lock.acquire(timeout=_lock_wait(timeout)):
            raise TimeoutError(f"the server's loop has been busy for over {timeout:g} s")
        try:
            yield
        finally:
            self._lock.release()

    def _flush(self) -> None:
        """Deliver the pending events to the callbacks, outside the lock."""
        with self._lock:
            if not self._pending:
                return
            events = self._pending[:]
            self._pending.clear()
        callbacks = self._callbacks
        callbacks.debug_info(events, self.run_id)
        diagnostics = self._diagnostics
        for event in events:
            if (
                diagnostics is not None
                and isinstance(event, (Reaped, WorkerGone))
                and event.incident is not None  # its signal went, or its worker exited
            ):
                delivered: Optional[bool] = None
                descendants: Tuple[int, ...] = ()
                if isinstance(event, Reaped):
                    # One that had exited was not signalled, as one gone in its capture.
                    delivered = None if event.gone else event.delivered
                    descendants = event.descendants
                try:
                    diagnostics.signalled(event.incident, delivered, descendants)
                except Exception:  # no thread to write it (TasksMax): the events go on
                    logger.exception("incident %s could not be written", event.incident)
            if type(event) is Reaped and self._kill_self_on_reap and self._signals_for_real:
                assert isinstance(event, Reaped)
                if event.delivered:
                    self._self_signal = event.signal
            callbacks.event(event)

    def _changed(self) -> None:
        """Call ``on_change`` if the armed timers (or the reaps not finished) changed since
        it was last called, or the journal has grown enough that a checkpoint should trim
        it (a junk flood changes no timer, but fills the journal)."""
        grown = self._journal is not None and self._journal.full
        self._callbacks.changed(self._watchdog.changes, grown)

    def _capture(self, request: CaptureRequest) -> str:
        assert self._diagnostics is not None
        return self._diagnostics.start(request, self._captured)

    def _captured(self, pid: int) -> None:
        loop = self._loop
        if loop is not None:
            loop.captured(pid)

    def _watch(self, worker: Worker) -> None:
        if self._loop is not None:
            self._loop.watch(worker)

    def _unwatch(self, worker: Worker) -> None:
        if self._loop is not None:
            self._loop.unwatch(worker)


def _check_arguments(
    *,
    tick_interval: Optional[float],
    on_tick: Optional[Callable[[], None]],
    fifo_mode: int,
    restore_grace: float,
    socket_path: object,
    adopt_socket: Optional[Tuple[int, int]],
    signaller: Optional[Signaller],
    dry_run: bool,
) -> None:
    """Refuse ``FileTimerServer`` arguments that contradict each other or are out of
    range, before anything is made.

    Raises:
        ValueError: which one, and why.
    """
    if (tick_interval is None) != (on_tick is None):
        raise ValueError("tick_interval and on_tick go together")
    if tick_interval is not None and not 0 < tick_interval < math.inf:
        raise ValueError(
            f"tick_interval must be a finite number of seconds > 0, not {tick_interval!r}"
        )
    check_mode(fifo_mode)
    if not 0 <= restore_grace <= 3600:
        raise ValueError("restore_grace must be between 0 and 3600 seconds")
    if adopt_socket is not None and socket_path is None:
        raise ValueError("adopt_socket is a socket bound at socket_path: give socket_path")
    if signaller is not None and dry_run:
        raise ValueError("dry_run replaces the signaller: give one or the other")


def _lock_wait(timeout: Optional[float]) -> float:
    """``timeout`` seconds as ``Lock.acquire()`` takes them: -1 (no limit) for ``None`` or
    more than it can wait (infinity), 0 for less than 0 (``acquire`` takes -1 for no
    limit, and raises for other negative values and for more than it can wait).

    Raises:
        ValueError: ``timeout`` is NaN.
    """
    if timeout is None or timeout >= threading.TIMEOUT_MAX:
        return -1.0
    if math.isnan(timeout):
        raise ValueError("timeout is NaN")
    return max(0.0, timeout)


def _warn_hooks(who: str, overridden: List[str], stacklevel: int) -> None:
    """Warn that ``who`` overrides torch's hook points ``overridden``, which are never
    called (``stacklevel``: ``warnings.warn``'s, counted from here)."""
    warnings.warn(
        f"{who} overrides {', '.join(overridden)}: ftimer's server loop never calls these "
        "(torch's polling loop does); use the constructor's signaller=, reap_steps=, "
        "on_event= or dry_run= instead (see docs/torchelastic.md)",
        RuntimeWarning,
        stacklevel=stacklevel,
    )
