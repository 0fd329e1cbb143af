"""``ftimer-server run``: the server core plus what a host daemon needs around it.

Start-up, in order: lock the FIFO's lock file (``<fifo>.lock``, held until exit: another
daemon on the FIFO is refused before it touches anything); refuse if another daemon
answers on the control socket; bind the metrics address (a port taken fails a start
that changed nothing); check the state file's directory (the daemon's alone),
then load the state file; create the server and restore the saved timers (a timer that
expired while the daemon was down fires when the restore grace ends); open the FIFO (a
new one in place of the old if nothing was restored, so clients holding the old one
re-send their timers) and start; bind the control socket; start the state saver and
serve the metrics; tell systemd READY=1.

The main thread then only waits for signals. Handlers do nothing but wake it (the signal
number arrives on a wake-up pipe); the loop acts: SIGTERM / SIGINT shut down cleanly
(STOPPING=1, server stopped, state saved), SIGHUP wakes the reload thread, which reopens
the log file and reloads the config file (either may wait on a mount that hangs, and a
SIGTERM must not). Everything else runs on the server's own thread, which also sends
systemd's WATCHDOG=1, so a wedged server loop is noticed.
"""

from __future__ import annotations

import contextlib
import faulthandler
import gc
import logging
import math
import os
import select
import signal
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any, Dict, FrozenSet, List, Optional, Tuple, Type, Union

from ftimer_server._files import remove_leftovers
from ftimer_server._version import __version__
from ftimer_server.core._events import (
    EVENT_TYPES,
    Armed,
    Disarmed,
    Escalated,
    Event,
    Expired,
    Reaped,
    Unkillable,
)
from ftimer_server.core._incident import Incident
from ftimer_server.core._policy import Policy
from ftimer_server.core._records import Timer
from ftimer_server.core._report import printable
from ftimer_server.core._stats import Stats
from ftimer_server.incidents._options import NOT_WRITTEN, IncidentOptions
from ftimer_server.server._fifo import (
    FifoBusy,
    FifoError,
    lock_fifo,
    unlock_fifo,
    unreachable_by_writers,
)
from ftimer_server.server._journal import Journal, JournalIncomplete
from ftimer_server.server._process import proc_problem
from ftimer_server.server._server import FileTimerServer

from ._config import (
    ConfigError,
    DaemonConfig,
    hidden_warning,
    host_port,
    load_config_file,
    overridden,
    resolve_config,
    setting_text,
)
from ._control import ControlServer, ControlSocketBusy
from ._daemon_log import describe, event_fields, signal_label
from ._handover import keep_for_next, take_stored_socket
from ._logging import WORKER_BURST, LoggingSetup
from ._metrics import Metrics, MetricsUnavailable
from ._state import (
    StateBusy,
    StateLoad,
    StatePathError,
    StateSaver,
    check_state_dir,
    fifo_identity,
    load_state,
    lock_state,
    max_state_bytes,
    read_boot_id,
    set_aside_state,
)
from ._status import status_document
from ._systemd import SystemdNotifier
from ._warnings import startup_warnings

__all__ = [
    "EXIT_FAILURE",
    "EXIT_OK",
    "EXIT_STARTUP",
    "EXIT_USAGE",
    "Daemon",
    "defer_sighup",
    "run_daemon",
]

log = logging.getLogger("ftimer_server.daemon")
events_log = logging.getLogger("ftimer_server.events")

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_STARTUP = 3

_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
#: Events whose lines each name one reaped worker: folded later than others.
_OF_A_REAP = (Expired, Reaped, Escalated, Unkillable)
#: Seconds a metrics scrape waits for a busy loop's counters before serving the last.
SCRAPE_WAIT = 1.0
#: Seconds between two looks whether the FIFO's and the socket's paths still name them.
_PATHS_EVERY = 1.0
#: Settings a SIGHUP applies in place; any other change needs a restart.
_RELOADABLE = ("log_format", "log_level", "config_file")


#: A SIGHUP that came after `defer_sighup` and before the daemon's own handler.
_EARLY_HUP = threading.Event()


def _early_hup(signum: int, frame: object) -> None:
    _EARLY_HUP.set()


def defer_sighup() -> None:
    """Until `Daemon.run` installs its handlers, take a SIGHUP as a reload to make once
    started, not as its default action (the end of the process): `kill -HUP` from
    logrotate or an operator during the start-up killed the daemon it meant to reload."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGHUP, _early_hup)


class StartupError(Exception):
    """The daemon cannot start (exit code 3); the message says what to fix."""


class Daemon:
    """One run of the daemon with ``config``.

    Args:
        config: the settings.
        logging_setup: the installed log handler (reopened and reconfigured on SIGHUP).
        cli: the command-line settings, re-applied over the config file on SIGHUP.
        environ: for systemd's variables; ``os.environ`` by default.
    """

    def __init__(
        self,
        config: DaemonConfig,
        logging_setup: LoggingSetup,
        cli: Optional[Mapping[str, Any]] = None,
        environ: Optional[Mapping[str, str]] = None,
    ) -> None:
        self.config = config
        self._logging = logging_setup
        self._cli = dict(cli or {})
        self._notifier = SystemdNotifier.from_environ(environ)
        self._server: Optional[FileTimerServer] = None
        #: The last daemon's socket, which systemd kept open, and the queue length it
        #: was made with (``take_stored_socket``).
        self._adopt_socket: Optional[Tuple[int, int]] = None
        #: The name systemd holds this daemon's socket under (``keep_for_next``).
        self._stored_as: Optional[str] = None
        self._control: Optional[ControlServer] = None
        self._saver: Optional[StateSaver] = None
        self._journal: Optional[Journal] = None
        self._metrics: Optional[Metrics] = None
        self._metrics_address: Optional[Tuple[str, int]] = None  # bound
        self._lock_fd: Optional[int] = None
        self._state_lock_fd: Optional[int] = None
        self._restoring = False
        #: Until when the restore grace held the saved timers (monotonic; none: -inf;
        #: inf until the server's start, where the grace begins).
        self._held_until = -math.inf
        self._started = time.monotonic()
        #: The paths found no longer naming the FIFO or the socket (``_watch_paths``).
        self._lost: List[str] = []
        self._control_lost = False  # its path names another file (said once)
        self._paths_done = threading.Event()
        #: What the last reload (SIGHUP) failed to do, and why (None: nothing, or none ran).
        self._reload_failed: Optional[str] = None
        #: The settings the config file changes that wait for a restart ("name (old -> new)").
        self._restart_needed: List[str] = []
        #: A SIGHUP for the reload thread (``_reloads``), or the stop.
        self._hup = threading.Event()
        #: Held while a reload applies what it read, and by the stop: none applies after.
        self._applying = threading.Lock()
        self._stopping = False

    # -- the run -----------------------------------------------------------------------

    def run(self) -> int:
        """Start, serve until SIGTERM or SIGINT, shut down; return the exit code.

        Must be called from the main thread (it installs signal handlers).
        """
        wake_r, wake_w = os.pipe()
        for fd in (wake_r, wake_w):
            os.set_blocking(fd, False)
        old_wakeup = signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
        handled = (*_STOP_SIGNALS, signal.SIGHUP)
        old_handlers = {sig: signal.signal(sig, _wake_only) for sig in handled}
        if _EARLY_HUP.is_set():  # the reload thread, started by the loop, makes it
            _EARLY_HUP.clear()
            self._hup.set()
        try:
            try:
                self._start()
            except StartupError as e:
                return self._refused(f"cannot start: {e}", EXIT_STARTUP)
            except ConfigError as e:
                return self._refused(str(e), EXIT_USAGE)
            # Everything loaded so far (modules, restored timers, ...) lives as long as
            # the daemon: keep it out of every later garbage collection.
            gc.collect()
            gc.freeze()
            self._ready()
            return self._loop(wake_r)
        finally:
            self._shutdown()
            signal.set_wakeup_fd(old_wakeup)
            for sig, handler in old_handlers.items():
                signal.signal(sig, handler)
            os.close(wake_r)
            os.close(wake_w)

    def _refused(self, why: str, code: int) -> int:
        """Say why the start was refused, on stderr too when logging to a file (where
        systemd's journal would show the exit code alone); return ``code``."""
        log.error("%s", why)
        if self.config.log_file is not None and sys.stderr is not None:
            print(f"ftimer-server: {why}", file=sys.stderr, flush=True)
        return code

    def _start(self) -> None:
        """Start up, in the order the module's docstring tells (``_ready`` then tells
        systemd).

        Raises:
            StartupError: something cannot be used (exit code 3).
            ConfigError: the settings ask for what cannot be had (exit code 2).
        """
        self._make_metrics()
        # Kept at once: a start that fails later stops it (removes the socket it bound).
        self._control = control = self._claim_fifo()
        self._bind_metrics()
        boot_id = read_boot_id()
        saved, journal = self._load_state(boot_id)
        socket_path = None if self.config.socket is None else os.path.abspath(self.config.socket)
        self._adopt_socket = take_stored_socket(socket_path)
        server = self._restored_server(saved, journal)
        self._serve(server, control, boot_id, journal)

    def _make_metrics(self) -> None:
        """Make the metrics (bound by ``_bind_metrics``, served by ``_serve``), if an
        address is set.

        Raises:
            ConfigError: the metrics need a package that is not installed.
        """
        c = self.config
        if c.metrics_address is not None:
            try:
                self._metrics = Metrics(
                    self._stats,
                    state_saves=self._state_saves,
                    dry_run=c.dry_run,
                    incident_writes=self._incident_writes,
                    last_progress=self._last_progress,
                    stalled_for=self._stalled_for,
                )
            except MetricsUnavailable as e:
                raise ConfigError(f"--metrics-address: {e}") from None

    def _claim_fifo(self) -> ControlServer:
        """Refuse a ``/proc`` of another PID namespace (``proc_problem``) and a FIFO its
        writers cannot reach, lock the FIFO's lock file and check that no daemon answers
        on the control socket; return the control server (bound by ``_serve``).

        Raises:
            StartupError: any of those.
        """
        c = self.config
        problem = proc_problem()
        if problem is not None:
            raise StartupError(problem)
        # A FIFO its workers may write but cannot reach fails them all with EACCES, or
        # sends them to their per-user default path: refuse to start instead.
        unreachable = unreachable_by_writers(c.fifo, c.fifo_mode, c.fifo_group)
        if unreachable is not None:
            raise StartupError(f"FIFO {c.fifo}: {unreachable}")
        # Before anything is created, replaced or removed: the control socket is bound
        # only after the FIFO and the journal are opened, so checking it is no guard
        # against a daemon starting at the same moment (the loser replaced the winner's
        # FIFO and removed its journal segment before it saw the socket taken).
        self._lock_fd = _lock_fifo(c.fifo)
        control = ControlServer(c.control_socket, self._status)
        try:
            control.check_free()
        except (ControlSocketBusy, OSError) as e:
            raise StartupError(str(e)) from None
        return control

    def _bind_metrics(self) -> None:
        """Bind the metrics address, if one is set: before the state is loaded and the
        FIFO opened, so that a taken port fails every restart before it replaced the
        FIFO (its writers' timers lost each time).

        Raises:
            StartupError: it cannot be bound (in use, or not an address of this host).
        """
        address = self.config.metrics_address
        if self._metrics is not None and address is not None:
            try:
                self._metrics_address = self._metrics.bind(address)
            except OSError as e:
                raise StartupError(f"cannot serve metrics on {host_port(*address)}: {e}") from None

    def _load_state(self, boot_id: str) -> Tuple[StateLoad, Optional[Journal]]:
        """What the state file holds (the saved timers, the journal segment to replay
        from) and the journal (no timers and no journal without a state file). The
        state file's directory is checked first, then its lock taken and held until
        exit: no other daemon reads, saves or journals beside it meanwhile.

        Raises:
            StartupError: the state file, its lock or its directory cannot be used, or
                another daemon holds the lock.
        """
        c = self.config
        if c.state_file is None:
            return StateLoad([]), None
        state_dir = os.path.dirname(c.state_file)
        try:
            check_state_dir(c.state_file)
        except StatePathError as e:
            # Named as both spellings: the command line's and the config file's.
            raise StartupError(f"--state-file (state-file) {c.state_file}: {e}") from None
        except OSError as e:
            raise StartupError(f"cannot use the state directory {state_dir}: {e}") from None
        try:
            self._state_lock_fd = lock_state(c.state_file)
            # Under the lock: no save of another daemon's is under way. The directory
            # is private: what matches the pattern is a save of the daemon's user's.
            for leftover in remove_leftovers(c.state_file):
                log.info("removed %s, left by a save that was interrupted", leftover)
            limit = max_state_bytes(c.max_timers or Policy().max_timers)
            loaded = load_state(c.state_file, boot_id, max_bytes=limit, fifo=c.fifo)
            journal = Journal(c.state_file + ".journal", snapshot=c.state_file)
        except StateBusy as e:
            raise StartupError(
                f"another ftimer-server is using the state file {c.state_file} "
                f"(it holds {e.lock_path})"
            ) from None
        except StatePathError as e:
            raise StartupError(str(e)) from None
        except OSError as e:
            raise StartupError(f"cannot use the state directory {state_dir}: {e}") from None
        if loaded.ignored:
            log.info("state file %s not used: %s", c.state_file, loaded.ignored)
            journal.discard_before(journal.seq)  # it follows a state that is gone
        return loaded, journal

    def _restored_server(self, saved: StateLoad, journal: Optional[Journal]) -> FileTimerServer:
        """A new server (not started) holding the ``saved`` timers and what ``journal``
        holds from the segment ``saved`` names; one with no timers if the replay fails.

        Raises:
            StartupError: the incident directory is unsafe, or the server cannot be made.
        """
        incidents = _incidents(self.config)
        server = self._new_server(journal, incidents)
        timers, replay_from = saved.timers, saved.journal
        if timers:
            self._restoring = True
            try:
                server.restore(timers, saved.written_at)
            finally:
                self._restoring = False
            log.info("restored %d of %d saved timers", len(server.armed()), len(timers))
        if journal is not None and replay_from:
            # What the last server read after its last save (it was killed): applied again
            # in order, so not even a disarm it had read is lost.
            try:
                # Judged by the snapshot's time, not the segments' last write: a pid
                # taken by a process that started after an arm of a dead worker was kept
                # (torch's lines name no start time) would get that worker's timer.
                size = server.replay(journal.replay(replay_from), saved.written_at)
            except Exception as e:
                # Half a replay may hold an arm without its disarm: start with no timers
                # (a new FIFO, to which clients re-send theirs) rather than fail every
                # restart on the same journal. The state file goes aside first, then the
                # segments that complete it: a state file kept without them would be
                # restored, without their disarms, by a restart before the first save.
                assert self.config.state_file is not None  # a journal is the state file's
                why = f": {e}" if isinstance(e, JournalIncomplete) else ""
                set_aside_state(self.config.state_file, f"its journal cannot be replayed{why}")
                log.error(
                    "cannot replay the journal from segment %d%s; set aside as %s; starting "
                    "without the saved timers",
                    replay_from,
                    why,
                    ", ".join(journal.set_aside(replay_from)) or "(nothing could be moved)",
                    exc_info=not why,  # a bug's traceback; a missing segment is said
                )
                server.stop()
                server = self._new_server(journal, incidents)
            else:
                log.info(
                    "replayed %d byte(s) of the journal from segment %d: %d timer(s) armed now",
                    size,
                    replay_from,
                    len(server.armed()),
                )
        if timers or (journal is not None and replay_from):  # held as the server holds them
            self._held_until = math.inf
        # Restored timers were logged; from now on, arms and disarms only at debug level.
        server.set_event_types(self._event_types())
        return server

    def _new_server(
        self, journal: Optional[Journal], incidents: Optional[IncidentOptions]
    ) -> FileTimerServer:
        """A new server (not started) with the daemon's settings and callbacks, after
        checking the incident directory.

        Raises:
            StartupError: the incident directory is unsafe, or the server (its capture
                helper) cannot be started.
        """
        c = self.config
        tick = self._notifier.watchdog_interval
        if incidents is not None and incidents.directory is not None:
            _check_incident_dir(incidents)
        try:
            server = FileTimerServer(
                c.fifo,
                on_event=self._on_event,
                on_change=self._changed,
                policy=_policy(c),
                escalate_after=c.grace,
                signal_override=c.signal,
                dry_run=c.dry_run,
                fifo_mode=c.fifo_mode,
                fifo_group=c.fifo_group,
                tick_interval=tick,
                on_tick=self._keepalive if tick is not None else None,
                journal=journal,
                restore_grace=c.restore_grace,
                incidents=incidents,
                socket_path=c.socket,
                adopt_socket=self._adopt_socket,
                on_incident=self._incident,
                lock_fifo=False,  # the daemon holds it, from before the server
            )
        except OSError as e:
            # The incident directory was checked just above: what remains that can
            # fail is starting the capture helper (a process of its own).
            what = "the incident capture helper" if incidents is not None else "the server"
            raise StartupError(f"cannot start {what}: {_os_error(e)}") from None
        server.stop_timeout = None  # its callbacks are the daemon's: armed() final
        return server

    def _serve(
        self,
        server: FileTimerServer,
        control: ControlServer,
        boot_id: str,
        journal: Optional[Journal],
    ) -> None:
        """Start the server, then bind the control socket and start the state saver and
        serve the metrics.

        Raises:
            StartupError: the FIFO or the control socket cannot be used.
        """
        c = self.config
        try:
            server.start()
        except FifoError as e:
            what = "socket" if e.path == c.socket else "FIFO"
            raise StartupError(f"{what} {e.path}: {e.reason}") from None
        if self._held_until == math.inf:
            self._held_until = time.monotonic() + c.restore_grace
        self._server = server
        # Before the control socket is there: from then on the main thread walks no path
        # (a mount that hangs over the FIFO's directory would hold every signal with it).
        for warning in startup_warnings(c, os.geteuid()):
            log.warning("%s", warning)
        threading.Thread(
            target=self._watch_paths, args=(server,), name="ftimer-paths", daemon=True
        ).start()
        self._stored_as = keep_for_next(self._notifier, c.fifo, server.socket)
        try:
            control.start()
        except (ControlSocketBusy, OSError) as e:
            raise StartupError(f"control socket {c.control_socket}: {e}") from None
        self._journal = journal
        if c.state_file is not None:
            self._saver = StateSaver(
                c.state_file,
                server.checkpoint,
                boot_id,
                c.state_interval,
                saved=journal.saved if journal is not None else lambda _: None,
                overdue=(lambda: journal.full) if journal is not None else lambda: False,
                fifo=fifo_identity(server.fifo.read_fd) if server.fifo is not None else None,
                fifo_path=os.path.abspath(c.fifo),
            )
            self._saver.start()
        if self._metrics is not None and self._metrics_address is not None:
            self._metrics.serve()
            log.info("metrics on http://%s/metrics", host_port(*self._metrics_address))

    def _ready(self) -> None:
        c = self.config
        mode = "DRY RUN (expiries are logged, not signalled)" if c.dry_run else "enforcing"
        if c.signal is not None:
            mode += f", reaps with {signal_label(c.signal)}"
        if c.grace is not None:
            mode += f", SIGKILL {c.grace:g} s later if still alive"
        log.info(
            "ftimer-server %s ready: FIFO %s, socket %s, %s, status socket %s, state file %s",
            __version__,
            c.fifo,
            c.socket or "none",
            mode,
            c.control_socket,
            c.state_file or "none",
        )
        self._logging.drain()  # what the start-up logged is written before it says ready
        self._notifier.ready(self._systemd_status())

    def _loop(self, wake_fd: int) -> int:
        """Wait for signals and for flood summaries to come due; act on them.

        The log filter's wake-up descriptor is waited on too: a line held back after
        the wait began makes a summary due that the timeout computed before it does not
        cover.
        """
        threading.Thread(target=self._reloads, name="ftimer-reload", daemon=True).start()
        log_fd = self._logging.wake_fd
        poller = select.poll()
        for fd in (wake_fd, log_fd):
            poller.register(fd, select.POLLIN)
        while True:
            due = self._logging.filter.next_flush()
            timeout = None if due is None else math.ceil(max(0.0, due - time.monotonic()) * 1000)
            poller.poll(timeout)
            self._logging.flush_repeats()
            signals = _read_signals(wake_fd)
            for signum in signals:
                if signum in _STOP_SIGNALS:
                    log.info("%s: shutting down", signal.Signals(signum).name)
                    return EXIT_OK
            if signal.SIGHUP in signals:
                self._hup.set()

    def _reloads(self) -> None:
        """A thread of its own: reload at a SIGHUP (`_reload`); those that come during a
        reload make one more, a storm costs one. Not the main loop's: a log file or a
        path of the config on a mount that hangs holds the reload as long, and the
        SIGTERM after it must not wait. Never joined."""
        while True:
            self._hup.wait()
            self._hup.clear()
            if self._stopping:
                return
            try:
                self._reload()
            except Exception:  # a bug here must not cost the reloads to come
                log.exception("the reload failed")

    def _watch_paths(self, server: FileTimerServer) -> None:
        """A thread of its own: every ``_PATHS_EVERY`` seconds, say (an error line) when
        the FIFO's or the socket's path stops naming them, and when it names them again;
        ``status`` reports the daemon unhealthy meanwhile. Not the main loop's: a path
        on a mount that hangs holds its ``lstat`` for as long, and signals wait on none."""
        while not self._paths_done.wait(_PATHS_EVERY):
            try:
                self._check_paths(server)
            except Exception:  # a bug here must never cost the watch
                log.exception("checking the FIFO's and the socket's paths failed")

    def _check_paths(self, server: FileTimerServer) -> None:
        lost = server.lost_paths()
        for path in lost:
            if path not in self._lost:
                log.error(
                    "%s no longer names the daemon's %s (removed, or replaced by another "
                    "file): workers that open it now cannot reach the daemon, those that "
                    "hold it open still do; restart the daemon to make it anew",
                    path,
                    "FIFO" if path == server.file_path else "socket",
                )
        for path in self._lost:
            if path not in lost:
                log.info("%s names the daemon's own again", path)
        self._lost = lost
        # `status` finds no daemon without its control socket: one removed is made
        # anew (no worker holds it); another file put in its place is left alone.
        control = self._control
        if control is None or not control.lost():
            self._control_lost = False
            return
        why = "another file is there"
        if not os.path.lexists(control.path):  # (else left alone: no bind tried each second)
            try:
                if control.rebind():
                    log.error("the control socket %s was removed; made it anew", control.path)
                return
            except OSError as e:
                why = e.strerror or str(e)
        if not self._control_lost:
            log.error(
                "%s no longer names the daemon's control socket, and none can be made "
                "there (%s): `status` cannot reach the daemon; restart it to make one",
                control.path,
                why,
            )
        self._control_lost = True

    def _shutdown(self) -> None:
        self._paths_done.set()  # not joined: it may be held by a mount that hangs
        with self._applying:  # a reload held by a mount applies nothing later
            self._stopping = True
        self._hup.set()
        if self._server is not None:
            self._notifier.stopping()
        if self._control is not None:
            self._control.stop()
            self._control = None
        if self._server is not None:
            self._server.stop()  # the loop is done: armed() is final
        if self._stored_as is not None:
            # Stopped, not killed: its socket is gone with it (read to its end, its path
            # unlinked; the next daemon binds anew, with the queue length of then). Only
            # now: a stop that never gets here (a wedged loop, then SIGKILL) leaves the
            # socket, and what is queued on it, to the next daemon.
            self._notifier.unstore(self._stored_as)
        if self._saver is not None:
            if self._saver.stop(final_save=True):
                log.info("saved %d armed timer(s) to %s", len(self._armed()), self._saver.path)
            elif os.path.exists(self._saver.path):
                log.error(
                    "the final save failed: the next start restores what %s held before, "
                    "with the journal after it",
                    self._saver.path,
                )
            else:  # the journal removed it (it failed), or it was never written
                log.error(
                    "the final save failed, and %s is gone: the next start restores no "
                    "timers (clients re-send theirs)",
                    self._saver.path,
                )
            self._saver = None
        if self._metrics is not None:
            self._metrics.close()
            self._metrics = None
        if self._server is not None:
            log.info("stopped")
        self._notifier.close()
        if self._state_lock_fd is not None:  # after the final save, as the FIFO's below
            os.close(self._state_lock_fd)
            self._state_lock_fd = None
        if self._lock_fd is not None:
            # Last, after the final save: the next daemon reads a complete state file.
            unlock_fifo(self.config.fifo, self._lock_fd)
            self._lock_fd = None

    def _reload(self) -> None:
        """SIGHUP: reopen the log file and reload the config file, if any. What fails
        (a log file that cannot be reopened, a config file that is not valid: the
        settings before it hold) is said in the log, ``status``, the metrics and to
        systemd until a reload succeeds."""
        self._notifier.reloading()
        failed = []
        try:
            self._logging.reopen()
        except OSError as e:
            log.error("cannot reopen the log file: %s", e)
            failed.append(f"log file not reopened: {e}")
        path = self.config.config_file
        read = None if path is None else self._read_config(path)
        with self._applying:
            if self._stopping:
                return
            if isinstance(read, str):
                failed.append(read)
            elif read is not None:
                self._apply_config(*read)
            elif not failed:
                log.info("log file reopened")
            self._reload_failed = printable("; ".join(failed)) if failed else None
            if self._metrics is not None:
                self._metrics.reloaded(self._reload_failed is None, len(self._restart_needed))
            self._notifier.ready(self._systemd_status())

    def _read_config(self, path: str) -> Union[Tuple[DaemonConfig, List[str]], str]:
        """The config file at ``path`` resolved as a start would (a restart must not be
        refused what a reload took), with the settings the command line hides in it; or
        why it was not reloaded."""
        try:
            settings = load_config_file(path)
            new = resolve_config(self._cli, settings, config_file=path, starting=True)
            return new, overridden(self._cli, settings, path, new)
        except Exception as e:  # a bug as well as a bad file: neither may end the daemon
            if not isinstance(e, ConfigError):
                log.exception("reading %s failed", path)
            log.error("config not reloaded: %s", e)
            return f"config not reloaded: {e}"

    def _apply_config(self, new: DaemonConfig, hidden: List[str]) -> None:
        """Apply what applies in place (``_RELOADABLE``) of ``new``; say what waits for a
        restart."""
        path = new.config_file
        self._logging.configure(new.log_format, new.log_level)  # first: the lines below
        if self._server is not None:
            self._server.set_event_types(self._event_types())
        if hidden:  # else a change to them would seem taken, and was not
            log.warning("%s", hidden_warning(path, hidden))
        self._restart_needed = [
            f"{name.replace('_', '-')} ({setting_text(name, getattr(self.config, name))} "
            f"-> {setting_text(name, getattr(new, name))})"
            for name in DaemonConfig.__dataclass_fields__
            if name not in _RELOADABLE and getattr(new, name) != getattr(self.config, name)
        ]
        if self._restart_needed:
            log.warning(
                "config changes that need a restart were not applied: %s",
                ", ".join(self._restart_needed),
            )
        log.info("config reloaded from %s", path)

    def _systemd_status(self) -> str:
        """The status line systemd shows (``systemctl status``)."""
        c = self.config
        line = f"watching {c.fifo}" + (" (dry run)" if c.dry_run else "")
        if self._reload_failed is not None:
            line += f"; {self._reload_failed}"
        elif self._restart_needed:
            line += "; a restart is needed to apply: " + ", ".join(self._restart_needed)
        return line

    # -- callbacks (the server's thread, the control thread, the saver's thread) --------

    def _event_types(self) -> FrozenSet[Type[Event]]:
        # Arms and disarms (one event per request) are debug lines: unless they are
        # logged, the server does not even build their events.
        if events_log.isEnabledFor(logging.DEBUG):
            return frozenset(EVENT_TYPES)
        return frozenset(EVENT_TYPES) - {Armed, Disarmed}

    def _on_event(self, event: Event) -> None:
        if type(event) is Reaped and self._metrics is not None:
            assert isinstance(event, Reaped)
            self._metrics.reaped(self._own_lateness(event))
        level, msg, args = describe(event, self.config.dry_run, self._restoring)
        if not events_log.isEnabledFor(level):
            return

        def fields() -> Dict[str, Any]:
            extra = event_fields(event)
            if isinstance(event, _OF_A_REAP):
                extra["_burst"] = WORKER_BURST
            return extra

        def make() -> logging.LogRecord:
            # Only for the line a flood's summary quotes: the rest are counted, not made.
            return events_log.makeRecord(
                events_log.name, level, __file__, 0, msg, args, None, extra=fields()
            )

        if not self._logging.filter.hold(events_log.name, level, msg, make):
            events_log.log(level, msg, *args, extra=fields())

    def _incident(self, incident: Incident) -> None:
        # The incidents' writer thread: the incident is written (or could not be: logged there).
        stuck = incident.captures[0] if incident.captures else None
        method = stuck.method if stuck is not None else "none"
        metrics = self._metrics  # read once: a stop may be taking it away
        if metrics is not None:
            metrics.incident(method, incident.seconds)
        # Its summary is all that is left of one not written: never logged as if stored.
        kept = not any(e.startswith(NOT_WRITTEN) for e in incident.errors)
        head = (
            "incident %s (%s):"
            if kept
            else "incident %s, not kept (it could not be written to %s):"
        )
        # The line breaks in the format: the text log escapes those in its arguments.
        log.warning(
            head + "\n  %s" * len(incident.summary),
            incident.id,
            self.config.incident_dir,
            *incident.summary,
            extra={"_burst": WORKER_BURST},
        )

    def _changed(self) -> None:
        # The server's loop: the armed timers changed in its last iteration.
        if self._saver is not None:
            self._saver.changed()

    def _keepalive(self) -> None:
        # Called by the server's loop itself: it is alive and iterating.
        self._notifier.watchdog()

    def _armed(self) -> List[Timer]:
        return [] if self._server is None else self._server.armed()

    def _stats(self) -> Stats:
        assert self._server is not None
        # A scrape never waits out a stalled loop (Prometheus would call the daemon
        # down, not stalled): the metrics serve the last snapshot instead.
        return self._server.stats(timeout=SCRAPE_WAIT)

    def _own_lateness(self, reaped: Reaped) -> float:
        """The part of a reap's lateness the daemon answers for: not the time before its
        restore grace ended, for a saved timer whose deadline fell while no daemon ran
        (or in the grace): the reap-latency histogram, and its alert, measure the daemon."""
        deadline = next((t.deadline for t in reaped.timers if t.scope_id == reaped.scope_id), None)
        if deadline is None or deadline >= self._held_until:
            return reaped.late
        return reaped.late - (self._held_until - deadline)

    def _incident_writes(self) -> tuple[int, int]:
        return (0, 0) if self._server is None else self._server.incident_writes

    def _last_progress(self) -> float:
        return time.time() if self._server is None else self._server.get_last_progress_time()

    def _stalled_for(self) -> float:
        return 0.0 if self._server is None else self._server.stalled_for()

    def _state_saves(self) -> tuple[int, int]:
        """(Saves, failures): a failed write of the journal counts, as it takes the
        state file away until a save succeeds with the journal whole again."""
        saver, journal = self._saver, self._journal
        if saver is None:
            return (0, 0)
        return saver.saves, saver.errors + (0 if journal is None else journal.errors)

    def _status(self, timers: bool) -> Dict[str, Any]:
        # The control socket's threads: ``timers`` for ``status``, not for ``health``.
        assert self._server is not None
        saver, journal = self._saver, self._journal
        failing = None if saver is None else saver.failing
        if failing is None and saver is not None and journal is not None and journal.failing:
            failing = f"its journal cannot be written ({journal.failing}): the file is removed"
        return status_document(
            self._server,
            self.config,
            self._lost,
            self._started,
            timers,
            state_failing=failing,
            reload_failed=self._reload_failed,
            restart_needed=self._restart_needed,
        )


def _lock_fifo(fifo: str) -> int:
    """Lock ``<fifo>.lock`` (``lock_fifo``: the lock every ftimer server takes) and
    return its descriptor: closing it, or the daemon's exit, releases the lock. The
    daemon never removes the file.

    Raises:
        StartupError: another server holds the lock; the FIFO's path holds something
            other than a FIFO; or the lock file cannot be made or is not this user's
            regular file (a symlink is never followed).
    """
    try:
        return lock_fifo(fifo)
    except FifoBusy as e:
        raise StartupError(
            f"another ftimer-server is running on FIFO {fifo} (it holds {e.lock_path})"
        ) from None
    except FifoError as e:
        raise StartupError(f"FIFO {e.path}: {e.reason}") from None


def _check_incident_dir(options: IncidentOptions) -> None:
    """Create the incident directory (0700) if missing, and check it is private.

    Raises:
        StartupError: it cannot be created or opened, or it is unsafe (the message
            names it and says why).
    """
    from ftimer_server.incidents._store import IncidentStore  # noqa: PLC0415 (RSS)

    assert options.directory is not None
    try:
        IncidentStore(options.directory, keep=options.keep, max_bytes=options.max_bytes)
    except OSError as e:  # its messages name the directory
        raise StartupError(e.strerror or f"incident directory {options.directory}: {e}") from None


def _os_error(e: OSError) -> str:
    """An ``OSError`` in a line: its message, and the file it is about, if any."""
    what = e.strerror or str(e)
    return f"{what}: {e.filename}" if e.filename is not None else what


def _incidents(c: DaemonConfig) -> Optional[IncidentOptions]:
    if c.capture == "none":
        return None
    return IncidentOptions(
        directory=c.incident_dir,
        keep=c.incidents_keep,
        max_bytes=c.incidents_max_bytes,
        method=c.capture,
        timeout=c.capture_timeout,
        native=c.py_spy_native,
        core=c.core,
        core_max_bytes=c.core_max_bytes,
        reap_tree=c.reap_tree,
        job_label=c.job_label,
    )


def _policy(c: DaemonConfig) -> Policy:
    kwargs: Dict[str, Any] = {
        "allowed_uids": c.allow_uids,
        "descendants_only": c.descendants_only,
        "allowed_signals": c.allow_signals,
    }
    if c.max_timers is not None:
        kwargs["max_timers"] = c.max_timers
    if c.max_timers_per_pid is not None:
        kwargs["max_timers_per_pid"] = c.max_timers_per_pid
    return Policy(**kwargs)


def _wake_only(signum: int, frame: object) -> None:
    """A handler that records nothing itself: the wake-up fd carries the signal number."""


def _read_signals(fd: int) -> List[int]:
    data = b""
    with contextlib.suppress(BlockingIOError):
        while chunk := os.read(fd, 512):
            data += chunk
    return list(data)


def run_daemon(
    config: DaemonConfig,
    cli: Optional[Mapping[str, Any]] = None,
    hidden: Sequence[str] = (),
) -> int:
    """Set up logging and run the daemon in the foreground; return the exit code."""
    # systemd's watchdog kills a wedged daemon with WatchdogSignal=SIGABRT: print every
    # thread's Python stack to stderr (the journal) first, so the hang can be diagnosed.
    if sys.stderr is not None:
        faulthandler.enable(file=sys.stderr, all_threads=True)
    try:
        setup = LoggingSetup(config.log_format, config.log_level, config.log_file)
    except OSError as e:
        print(f"ftimer-server: error: cannot open the log file: {e}", file=sys.stderr)
        return EXIT_STARTUP
    if hidden:  # as a reload says it: else the file's value would seem the one applied
        log.warning("%s", hidden_warning(config.config_file, list(hidden)))
    try:
        return Daemon(config, setup, cli).run()
    finally:
        setup.close()
