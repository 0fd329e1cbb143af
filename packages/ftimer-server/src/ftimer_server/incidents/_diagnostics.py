"""Incidents: why a stuck worker hangs, captured before it is reaped.

The core asks for a capture when it decides a reap (``Host.capture``); ``Diagnostics``
runs it off the loop: the stuck worker and its peers (the other workers of its job on
this host) are captured in parallel, each by the best method there is (py-spy, the
worker's own faulthandler hook, or the /proc facts alone), all bounded by the budget.
When every capture is done the loop is told and signals the worker; when the budget
runs out first, the core signals anyway. The incident is written once both the captures
and the signal's outcome are known: one JSON document (and its text rendering) per reap.

Two threads of its own, started with it, end the captures and write the incidents: the
loop hands them work without starting a thread (a thread's start waits for the new
thread to run: up to 33 ms each beside 20 busy processes, and with sixteen ranks
captured at once their expiries were noticed up to 164 ms late).

Captures and writes run in a helper process (``_helper``), not in the server's threads:
parsing stacks and reading /proc for eight workers would otherwise hold the server's GIL
for tens of milliseconds, and the loop must stay on time for everyone else meanwhile.

Workers that hang together (eight ranks of one collective) are each other's peers: a
capture of a pid started within ``SHARE_WINDOW`` is shared by every incident that needs
it, so eight incidents cost eight captures, not sixty-four.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import heapq
import logging
import math
import queue
import socket
import threading
import time
from typing import Callable, Container, Dict, List, Optional, Sequence, Tuple, Union

import msgspec

from ftimer_protocol import DumpHook
from ftimer_server.core._host import CaptureRequest
from ftimer_server.core._incident import Capture, Incident
from ftimer_server.core._records import Worker
from ftimer_server.core._report import annotate

from ._capture import PEER_HOOK, CaptureOptions, find_py_spy
from ._helper import CaptureJob, Helper, HelperGone, WriteJob
from ._options import CAPTURE_METHODS, NOT_WRITTEN, IncidentOptions
from ._procfs import read_stat, read_uid
from ._store import IncidentStore, incident_id

__all__ = ["CAPTURE_METHODS", "Diagnostics", "IncidentOptions"]

logger = logging.getLogger("ftimer_server")

#: Captures of one pid started this close together serve every incident that needs one.
SHARE_WINDOW = 1.0
#: Seconds past a capture's budget that ``close()`` waits for its incident to be written.
_CLOSE_WAIT = 1.0
#: Seconds past a write's ``WRITE_TIMEOUT`` its answer is waited for (the helper's word
#: that it gave up).
_ANSWER_WAIT = 1.0
#: Seconds an incident's write may take from its hand-over to the helper, the writes
#: before it included (one at a time): past that it is given up, and said so.
WRITE_TIMEOUT = 10.0
_CAPTURE = msgspec.msgpack.Decoder(Capture)
_INCIDENT = msgspec.msgpack.Decoder(Incident)


class Diagnostics:
    """Runs the captures the core asks for, and writes the incidents.

    Args:
        options: what to capture and where to write.
        on_incident: called with each incident once written (from the incidents' writer
            thread: the incidents after it wait for it); one that could not be written
            says so in its errors (``NOT_WRITTEN``).
        dry_run: the server signals nothing, not even a worker's dump hook: each
            incident says so.

    Raises:
        OSError: the incident directory cannot be made or is unsafe, or the helper or
            the threads cannot be started.
    """

    def __init__(
        self,
        options: IncidentOptions,
        on_incident: Optional[Callable[[Incident], None]] = None,
        *,
        dry_run: bool = False,
    ) -> None:
        self.options = options
        self._on_incident = on_incident
        self._dry_run = dry_run
        self._store = (
            None
            if options.directory is None
            else IncidentStore(options.directory, keep=options.keep, max_bytes=options.max_bytes)
        )
        py_spy = options.py_spy or find_py_spy()
        wants_py_spy = options.method in ("auto", "py-spy")
        self._capture_options = CaptureOptions(
            py_spy=py_spy if wants_py_spy else None,
            wants_py_spy=wants_py_spy,
            native=options.native,
            hook=options.method in ("auto", "hook"),
            dry_run=dry_run,
        )
        if options.method == "py-spy" and py_spy is None:
            logger.warning("capture method py-spy: no py-spy found (install ftimer-server[pyspy])")
        self._helper = Helper()
        self._lock = threading.Lock()
        #: Told when an incident is handed to the writer (see ``close()``).
        self._settled = threading.Condition(self._lock)
        #: (pid, start time, user) -> (when, the capture, whether it may wait for the
        #: worker's hook or core): see ``_capture``.
        self._shared: Dict[
            Tuple[int, Optional[int], Optional[int]],
            Tuple[float, concurrent.futures.Future[bytes], bool],
        ] = {}
        self._incidents: Dict[str, _Pending] = {}
        #: Incidents written, and failures to write one.
        self.written = 0
        self.write_errors = 0
        #: Why the last incident could not be written to the directory; None once one
        #: is (or none failed, or there is no directory).
        self.failing: Optional[str] = None
        #: To the collector: an incident started (its budget's end, its id), an incident
        #: one of whose captures ended (its id), or None (stop).
        self._collecting: queue.SimpleQueue[Union[Tuple[float, str], str, None]] = (
            queue.SimpleQueue()
        )
        #: To the writer: a complete incident, or None (stop).
        self._writes: queue.SimpleQueue[Optional[_Pending]] = queue.SimpleQueue()
        self._writer = threading.Thread(
            target=self._write_all, name="ftimer-incident-write", daemon=True
        )
        try:
            threading.Thread(target=self._collect, name="ftimer-incidents", daemon=True).start()
            self._writer.start()
        except RuntimeError as e:  # no thread to be had (TasksMax)
            self._stop_threads()
            self._helper.close(timeout=0)
            raise OSError(f"cannot start the incidents' threads: {e}") from e

    def start(self, request: CaptureRequest, on_captured: Callable[[int], None]) -> str:
        """Start capturing ``request`` (from the loop); return the incident's id.
        ``on_captured(pid)`` is called, from another thread, once every capture has
        ended or the budget has."""
        timer, worker = request.timer, request.worker
        created = time.time()
        incident = incident_id(created, worker.pid, timer.scope_id)
        deadline = request.now + request.budget
        # Peers are captured only if they are of the stuck worker's user: a job label is
        # any worker's to choose (see ``_helper._check_user``). Read now, while it lives:
        # the incident is pruned as its user's (one that exits during its capture too).
        user = _user_of(worker)
        futures = [
            self._capture(
                worker,
                timer.labels,
                request.dump,
                deadline,
                user=user,
                stuck=incident,
                since=timer.deadline,
            )
        ]
        futures += [
            self._capture(peer.worker, peer.labels, None, deadline, user=user)
            if user is not None
            else _failed("not captured: the stuck worker's user could not be read")
            for peer in request.peers
        ]
        pending = _Pending(request, incident, created, futures, user, on_captured)
        with self._lock:
            self._incidents[incident] = pending
        self._collecting.put((deadline, incident))
        for future in futures:  # one done already calls at once
            future.add_done_callback(lambda _: self._collecting.put(incident))
        return incident

    def signalled(
        self, incident: str, delivered: Optional[bool], descendants: Sequence[int] = ()
    ) -> None:
        """The reap of ``incident`` signalled its worker (``delivered``) and
        ``descendants``, or the worker exited during the capture (``None``): the incident
        can be written."""
        with self._lock:
            pending = self._incidents.get(incident)
            if pending is None:
                return
            pending.signalled = True
            pending.delivered = delivered
            pending.descendants = list(descendants)
        self._maybe_write(incident)

    @property
    def processes(self) -> Container[int]:
        """The processes capturing runs in (``pid in processes``): the helper."""
        return self._helper

    def close(self) -> None:
        """Stop capturing: the incidents in progress are finished and written first
        (their workers are signalled at a server's stop, so their captures end soon),
        waiting no longer than one capture's budget; then the helper is stopped, with
        the capture tools still running (their process groups are killed, the
        processes they had stopped resumed). The incidents not written by then fail
        (``NOT_WRITTEN``): ``on_incident`` gets each before this returns, unless a call
        of it blocks."""
        deadline = time.monotonic() + self.options.timeout + _CLOSE_WAIT
        with self._settled:
            while self._incidents:
                left = deadline - time.monotonic()
                if left <= 0:
                    logger.warning(
                        "stopping the capture helper with %d incident(s) unfinished",
                        len(self._incidents),
                    )
                    break
                self._settled.wait(left)
        self._stop_threads()
        self._writer.join(max(0.0, deadline - time.monotonic()))  # the writes, in that time
        self._helper.close(timeout=_CLOSE_WAIT)  # what still runs has outlived its budget
        # The writes left fail at once now: told to on_incident before this returns.
        self._writer.join(_CLOSE_WAIT)
        if self._writer.is_alive():
            logger.warning("stopped the capture helper while an on_incident callback still runs")

    def _stop_threads(self) -> None:
        self._collecting.put(None)
        self._writes.put(None)

    # -- internals ---------------------------------------------------------------------

    def _capture(
        self,
        worker: Worker,
        labels: Optional[Dict[str, str]],
        hook: Optional[DumpHook],
        deadline: float,
        *,
        user: Optional[int],
        stuck: Optional[str] = None,
        since: float = -math.inf,
    ) -> concurrent.futures.Future[bytes]:
        """A capture of ``worker`` (``stuck``: the id of its own incident, whose user is
        ``user``; else a peer, captured only if of real uid ``user``), shared with the
        incidents that need one of the same user within ``SHARE_WINDOW``: a capture
        started before ``since`` (a stuck worker's deadline) is not this one's, as it
        may show the worker before it hung."""
        now = time.monotonic()
        core = None
        store = self._store
        if stuck is not None and self.options.core and store is not None:
            core = (store.directory, self.options.core_max_bytes, f"{stuck}.core")
        # A capture of a peer serves a stuck worker too, unless it needs what a peer's
        # lacks: a core, or its hook where py-spy is not there to replace it. Where
        # py-spy is, but failed (refused by ptrace), the hook is tried after all.
        options = self._capture_options
        wants_hook = hook is not None and options.hook and not options.dry_run
        needs_own = core is not None or (wants_hook and options.py_spy is None)
        # A peer's capture refused as another user's must not stand for that user's
        # own: the uid a capture is checked against is in its key. A stuck worker is of
        # ``user``, so its capture serves the peer requests of that user. The start time
        # too: a pid reused within the window is another process, with stacks of its own.
        key = (worker.pid, worker.start_time, user)
        job = CaptureJob(
            pid=worker.pid,
            start_time=worker.start_time,
            role="peer" if stuck is None else "stuck",
            labels=labels,
            hook=hook,
            options=options,
            deadline=deadline,
            core=core,
            user=user if stuck is None else None,
        )
        with self._lock:
            shared = self._shared.get(key)
            # One still running is shared whatever its age (ranks that hung together,
            # expiring further apart than the window while captures are slow), but never
            # with a peer while it waits for its worker's hook or core: the incident of
            # the peer's, and so its worker's kill, would wait with it, up to its budget
            # (a rank on a hung file system delayed every other rank's kill by as much).
            if (
                shared is not None
                and since <= shared[0]
                and (now - shared[0] < SHARE_WINDOW or not shared[1].done())
                and not (stuck is None and shared[2] and not shared[1].done())
                and not needs_own
            ):
                return self._unless_stackless(shared[1], job) if wants_hook else shared[1]
            future = self._helper.submit(job)
            self._shared.pop(key, None)  # the newest last: the stale ones are the first
            self._shared[key] = (now, future, wants_hook or core is not None)
            while self._shared:  # the stale ones only: never a scan of every capture
                oldest = next(iter(self._shared))
                began, running, _ = self._shared[oldest]
                if now - began < SHARE_WINDOW or not running.done():
                    break
                del self._shared[oldest]
        return future

    def _unless_stackless(
        self, shared: concurrent.futures.Future[bytes], job: CaptureJob
    ) -> concurrent.futures.Future[bytes]:
        """The stuck worker's capture: ``shared`` (taken as a peer's, which never sends
        a hook's signal), or, if that got no stacks (py-spy failed), its own by ``job``,
        its hook then tried."""
        future: concurrent.futures.Future[bytes] = concurrent.futures.Future()

        def shared_done(done: concurrent.futures.Future[bytes]) -> None:
            # On the thread that ended ``shared``, or at once in ``_capture``, which
            # holds ``_lock``: nothing here takes it.
            try:
                if done.exception() is None:
                    capture = _CAPTURE.decode(done.result())
                    if capture.method == "facts" and not capture.exited:
                        own = self._helper.submit(job)
                        own.add_done_callback(lambda own: _relay(own, future))
                        return
                _relay(done, future)
            except Exception as e:  # never an incident waiting out its budget for it
                future.set_exception(e)

        shared.add_done_callback(shared_done)
        return future

    def _collect(self) -> None:
        """The collector's thread: ends an incident's captures when all of them are done,
        or when its budget ends (the core signals the worker then anyway)."""
        budgets: List[Tuple[float, str]] = []  # (end, incident), a heap
        while True:
            wait = max(0.0, budgets[0][0] - time.monotonic()) if budgets else None
            try:
                item = self._collecting.get(timeout=wait)
            except queue.Empty:
                item = ""  # a budget ended, and nothing else
            if item is None:
                return
            if isinstance(item, tuple):
                heapq.heappush(budgets, item)
                item = item[1]
            if item:
                self._captured(item, over=False)
            now = time.monotonic()
            while budgets and budgets[0][0] <= now:
                self._captured(heapq.heappop(budgets)[1], over=True)

    def _captured(self, incident: str, *, over: bool) -> None:
        """Tell the loop that ``incident``'s captures ended if all of them did, or ``over``
        (its budget ended), unless it was told already; then write it if signalled."""
        try:
            self._end_captures(incident, over=over)
        except Exception:  # the collector goes on with the next ones
            logger.exception("cannot end the captures of incident %s", incident)

    def _end_captures(self, incident: str, *, over: bool) -> None:
        with self._lock:
            pending = self._incidents.get(incident)
            if pending is None or pending.captured is not None:
                return
            if not over and not all(f.done() for f in pending.futures):
                return
            pending.captured = time.monotonic()
        try:
            pending.on_captured(pending.request.worker.pid)
        finally:  # written all the same, if signalled already
            self._maybe_write(incident)

    def _maybe_write(self, incident: str) -> None:
        """Hand ``incident`` to the writer if it is complete (the loop calls here, from
        ``signalled``, and must not wait for a write)."""
        with self._lock:
            pending = self._incidents.get(incident)
            if pending is None or not pending.signalled or pending.captured is None:
                return
            del self._incidents[incident]
            self._settled.notify_all()
            pending.handed = time.monotonic()
            self._writes.put(pending)

    def _write_all(self) -> None:
        """The writer's thread: writes the incidents one at a time (as the helper does)."""
        while (pending := self._writes.get()) is not None:
            try:
                self._write_one(pending)
            except Exception:  # the next ones are written all the same
                logger.exception("cannot write incident %s", pending.id)

    def _write_one(self, pending: _Pending) -> None:
        incident = pending.id
        store = self._store
        where = None if store is None else (store.directory, store.keep, store.max_bytes)
        record = pending.incident(self._dry_run)
        want = self._on_incident is not None
        error = None
        # Counted from its hand-over, not from its turn: behind a hung directory, the
        # incidents queued are given up together, not one after another.
        deadline = pending.handed + WRITE_TIMEOUT
        job = WriteJob(record, where, want, deadline)
        try:
            wait = max(0.0, deadline + _ANSWER_WAIT - time.monotonic())
            data = self._helper.submit(job).result(wait)
            record = _INCIDENT.decode(data) if want else record
        except (RuntimeError, HelperGone) as e:  # not written; annotated here for others
            record, error = annotate(record), str(e)
        except concurrent.futures.TimeoutError:
            record = annotate(record)
            why = (
                "the capture helper is busy or stopped"
                if store is None
                else "the incident directory's file system is slow or hung"
            )
            error = f"no answer within {WRITE_TIMEOUT + _ANSWER_WAIT:g} s: given up ({why})"
        if error is not None:
            self.write_errors += 1
            logger.error("cannot write incident %s: %s", incident, error)
            if store is not None:
                self.failing = error
                errors = [*record.errors, NOT_WRITTEN + error]
                record = msgspec.structs.replace(record, errors=errors)
        elif store is not None:
            self.written += 1
            self.failing = None
        if self._on_incident is not None:
            try:
                self._on_incident(record)
            except (Exception, SystemExit):
                logger.exception("on_incident callback failed on %s", incident)


def _user_of(worker: Worker) -> Optional[int]:
    """The real uid of ``worker``, or ``None`` if it cannot be read or its pid is now
    another process's."""
    try:
        uid = read_uid(worker.pid)
        if worker.start_time is not None and read_stat(worker.pid).start_time != worker.start_time:
            return None
    except (OSError, ValueError, IndexError):
        return None
    return uid


def _relay(source: concurrent.futures.Future[bytes], to: concurrent.futures.Future[bytes]) -> None:
    """Give ``to`` the result or the exception of ``source`` (done)."""
    error = source.exception()
    if error is not None:
        to.set_exception(error)
    else:
        to.set_result(source.result())


def _as_stuck(capture: Capture) -> Capture:
    """A capture of the worker taken as another incident's peer (after its deadline),
    as its own incident shows it: why it has no hook's stacks, and how it was read."""
    shared = "captured as another incident's peer, after this worker's deadline"
    error = (capture.error or "").replace(
        PEER_HOOK, f"dump hook: not used ({shared}: its signal is not sent to a peer)"
    )
    if capture.method == "py-spy":
        error = f"{shared}: read without stopping it, no native frames" + (
            f"; {error}" if error else ""
        )
    return msgspec.structs.replace(capture, error=error or None)


def _failed(message: str) -> concurrent.futures.Future[bytes]:
    future: concurrent.futures.Future[bytes] = concurrent.futures.Future()
    future.set_exception(RuntimeError(message))
    return future


@dataclasses.dataclass
class _Pending:
    """An incident being captured: complete once captured and signalled."""

    request: CaptureRequest
    id: str
    created: float
    futures: List[concurrent.futures.Future[bytes]]
    #: The stuck worker's real uid, if it could be read.
    uid: Optional[int]
    on_captured: Callable[[int], None]
    #: When its captures ended (``time.monotonic()``).
    captured: Optional[float] = None
    #: When it was handed to the writer.
    handed: float = 0.0
    signalled: bool = False
    delivered: Optional[bool] = None
    descendants: List[int] = dataclasses.field(default_factory=list)

    def incident(self, dry_run: bool) -> Incident:
        request, timer = self.request, self.request.timer
        captures: List[Capture] = []
        errors: List[str] = []
        # Read once: a capture that ends meanwhile must not be both late and in.
        ended = [future.done() for future in self.futures]
        for i, future in enumerate(self.futures):
            who = request.worker if i == 0 else request.peers[i - 1].worker
            if not ended[i] or future.cancelled():
                errors.append(f"pid {who.pid}: no capture within the budget")
            elif future.exception() is not None:  # refused, or the helper failed
                errors.append(f"pid {who.pid}: {future.exception()}")
            else:
                capture = _CAPTURE.decode(future.result())
                if i == 0 and capture.role == "peer":  # another incident's, shared
                    capture = _as_stuck(capture)
                running = i > 0 and request.peers[i - 1].timer_running
                role = "stuck" if i == 0 else "peer"
                captures.append(msgspec.structs.replace(capture, role=role, timer_running=running))
        timed_out = not all(ended)
        assert self.captured is not None
        seconds = self.captured - request.now
        return Incident(
            id=self.id,
            host=socket.gethostname(),
            created=self.created,
            pid=request.worker.pid,
            start_time=request.worker.start_time,
            uid=self.uid,
            scope_id=timer.scope_id,
            signal=request.signal,
            deadline=timer.deadline,
            labels=timer.labels,
            late=request.now - timer.deadline,
            job=request.job,
            captures=captures,
            seconds=seconds,
            timed_out=timed_out,
            delivered=None if dry_run else self.delivered,  # nothing was sent
            descendants=self.descendants,
            dry_run=dry_run,
            errors=errors,
        )
