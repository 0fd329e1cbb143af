"""The capture helper: a process of its own that captures workers and writes incidents.

Parsing stacks and reading /proc for eight workers would hold the server's GIL for tens
of milliseconds, and the loop must stay on time for every other worker meanwhile. So the
work runs in a helper process, started once with the server (``python -m
ftimer_server.incidents``: nothing of the embedding program, which may be a
user's script, is imported again, as multiprocessing's start methods would), at a lower
priority, with the threads it needs. It finds each worker again by pid and start time (a
pidfd does not cross processes) and pins it for the whole job, capture and core dump, so
a reused pid is still never touched.

The two talk in frames, a 4-byte length then a msgpack message (``Job`` in, ``Done``
out) matched by a number: jobs on the helper's stdin, answers on a pipe of their own,
since its stdout is anybody's that runs in its interpreter (a ``sitecustomize`` or a
``.pth`` file that prints a line at start-up would otherwise be read as a frame). What
the helper logs goes back on that pipe too (``Said``), into the server's log: its
format, its file and its flood control, never raw onto a stderr it shares.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import os
import queue
import signal
import struct
import subprocess
import sys
import threading
import time
from typing import IO, Dict, Optional, Tuple, Union

import msgspec

from ftimer_protocol import DumpHook
from ftimer_server.core._incident import Capture, Incident
from ftimer_server.core._report import annotate

from ._capture import CaptureOptions, capture
from ._pinned import Process, ProcessRefused
from ._procfs import live_thread, read_stat, read_uid, tracer_name, tracer_pid
from ._reap_extras import core_dump
from ._store import IncidentStore
from ._tools import stop_tools

__all__ = ["CaptureJob", "Helper", "HelperGone", "WriteJob"]

logger = logging.getLogger("ftimer_server")

#: How much lower the helper's priority is than the server's (py-spy and gcore inherit
#: it): on a busy host the loop keeps the CPU it needs while a capture runs.
NICENESS = 10
#: Captures at once in the helper (each mostly waits on py-spy or a worker's dump).
#: Writes have a thread of their own.
THREADS = 16
#: Jobs handed to a helper that has not read them yet, beyond which more fail at once.
MAX_UNSENT = 256
#: The most an incident's record may take, whatever the store's ``max_bytes`` (its text
#: takes about as much again): eight captures of ``_stack_formats``' bounds fit in it
#: with room; more peers than that have their stacks cut.
MAX_INCIDENT_BYTES = 16 << 20
#: Seconds a core dump ends before the capture's deadline: killing gcore, removing what
#: it wrote and answering take that long, and an answer after the deadline loses the
#: whole capture (a worker's stacks with its core).
_CORE_RESERVE = 0.1
#: Seconds the helper is waited for after SIGKILL.
_KILL_WAIT = 5.0
_LENGTH = struct.Struct("!I")
#: The longest frame either side reads: an incident (with its text) and its envelope. A
#: longer length is not a frame (the stream is not ours, or is damaged).
_MAX_FRAME = 4 * MAX_INCIDENT_BYTES


class CaptureJob(msgspec.Struct, frozen=True, tag=True):
    """Capture ``pid`` (of start time ``start_time``); with ``core`` = (directory, max
    bytes, file name), take its core there too; with ``user``, only if the process's
    real uid is that one (a peer: the stuck worker's)."""

    pid: int
    start_time: Optional[int]
    role: str
    labels: Optional[Dict[str, str]]
    hook: Optional[DumpHook]
    options: CaptureOptions
    deadline: float
    core: Optional[Tuple[str, int, str]] = None
    user: Optional[int] = None


class WriteJob(msgspec.Struct, frozen=True, tag=True):
    """Annotate ``incident`` and write it to ``where`` = (directory, keep, max bytes),
    given up if not begun by ``deadline`` (``time.monotonic()``, the directory's lock
    had by then); send it back annotated if ``want``."""

    incident: Incident
    where: Optional[Tuple[str, int, int]]
    want: bool
    deadline: Optional[float] = None


class _Frame(msgspec.Struct, frozen=True):
    number: int
    job: Union[CaptureJob, WriteJob]


class Done(msgspec.Struct, frozen=True, tag=True):
    """The answer to job ``number``: its result (an encoded ``Capture`` or
    ``Incident``), or what went wrong."""

    number: int
    result: Optional[bytes] = None
    error: Optional[str] = None


class Said(msgspec.Struct, frozen=True, tag=True):
    """A line the helper logged: its level, and its text (with its traceback, if any)."""

    level: int
    text: str
    #: The line's format string (``record.msg``): its kind, for the flood control.
    kind: str = ""


class HelperGone(Exception):
    """The helper process exited; its pending jobs are lost."""


_encoder = msgspec.msgpack.Encoder()
_json = msgspec.json.Encoder()
_frames = msgspec.msgpack.Decoder(_Frame)
_answers = msgspec.msgpack.Decoder(Union[Done, Said])


def _send(stream: IO[bytes], message: object, lock: threading.Lock) -> None:
    data = _encoder.encode(message)
    with lock:
        stream.write(_LENGTH.pack(len(data)) + data)
        stream.flush()


def _receive(stream: IO[bytes]) -> Optional[bytes]:
    """One frame's payload, or None at the end of the stream.

    Raises:
        ValueError: the length read is not a frame's.
    """
    head = stream.read(_LENGTH.size)
    if len(head) < _LENGTH.size:
        return None
    (size,) = _LENGTH.unpack(head)
    if size > _MAX_FRAME:
        raise ValueError(f"a frame of {size} bytes, over the {_MAX_FRAME} a frame may take")
    data = stream.read(size)
    return data if len(data) == size else None


class Helper:
    """The server's side: starts the helper and hands it jobs. ``pid in helper``: whether
    ``pid`` is the helper's process (which the server must never signal).

    Raises:
        OSError: the helper could not be started.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: Dict[int, concurrent.futures.Future[bytes]] = {}
        self._numbers = 0
        self._closed = False
        self._start()

    def __contains__(self, pid: object) -> bool:
        return pid == self._process.pid

    def _start(self) -> None:
        answers, theirs = os.pipe()
        try:
            self._process = subprocess.Popen(
                [sys.executable, "-m", "ftimer_server.incidents", str(theirs)],
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                pass_fds=(theirs,),
                # Not in the daemon's process group: a Ctrl-C at its terminal is the
                # daemon's to act on (it ends the helper by closing stdin, after the
                # captures it waits for), not a KeyboardInterrupt in the helper.
                start_new_session=True,
            )
        except BaseException:
            os.close(answers)
            raise
        finally:
            os.close(theirs)  # the helper's end: the stream ends when the helper does
        stream = os.fdopen(answers, "rb")
        self._reader = threading.Thread(
            target=self._read, args=(self._process, stream), name="ftimer-helper", daemon=True
        )
        # Jobs are written by a thread of their own: a helper that stops reading (stopped,
        # wedged) fills its pipe, and the loop, which submits captures, must never wait.
        self._jobs: queue.SimpleQueue[Optional[Tuple[int, bytes]]] = queue.SimpleQueue()
        self._unsent = 0
        writer = threading.Thread(
            target=self._write, args=(self._process, self._jobs), name="ftimer-jobs", daemon=True
        )
        try:
            self._reader.start()
            writer.start()
        except RuntimeError as e:  # no thread to be had (TasksMax): no helper either
            if not self._reader.is_alive():
                stream.close()
            self._jobs.put(None)
            with self._process:  # its pipes closed, and waited for
                self._process.kill()
            raise OSError(f"cannot start the capture helper's threads: {e}") from e

    def submit(self, job: Union[CaptureJob, WriteJob]) -> concurrent.futures.Future[bytes]:
        """Hand ``job`` to the helper without waiting; the future gets its encoded result,
        or fails with ``RuntimeError`` (the job failed) or ``HelperGone``."""
        future: concurrent.futures.Future[bytes] = concurrent.futures.Future()
        lost: Dict[int, concurrent.futures.Future[bytes]] = {}
        with self._lock:
            if self._closed:
                future.set_exception(HelperGone("the capture helper was stopped"))
            elif self._process.poll() is not None:  # it died (killed, out of memory): anew
                logger.error(
                    "the capture helper exited (status %s); starting another",
                    self._process.returncode,
                )
                lost, self._pending = self._pending, {}
                self._jobs.put(None)  # its writer ends
                try:
                    self._start()
                except OSError as e:
                    future.set_exception(HelperGone(f"cannot start the capture helper: {e}"))
            elif self._unsent >= MAX_UNSENT:
                future.set_exception(HelperGone("the capture helper is not taking jobs"))
            if not future.done():
                self._numbers += 1
                self._pending[self._numbers] = future
                self._unsent += 1
                self._jobs.put((self._numbers, _encoder.encode(_Frame(self._numbers, job))))
        for gone in lost.values():
            gone.set_exception(HelperGone("the capture helper exited"))
        return future

    def close(self, timeout: float = 5.0) -> None:
        """Stop the helper: it ends once its running jobs are done, or ``timeout``
        seconds later, when it kills the capture tools still running; jobs submitted
        later fail with ``HelperGone``."""
        with self._lock:
            self._closed = True
        self._jobs.put(None)  # its writer closes stdin once the jobs before are written
        try:
            self._process.wait(timeout)
        except subprocess.TimeoutExpired:
            _stop(self._process)
        self._reader.join(_KILL_WAIT)

    def _write(
        self,
        process: subprocess.Popen[bytes],
        jobs: queue.SimpleQueue[Optional[Tuple[int, bytes]]],
    ) -> None:
        stdin = process.stdin
        assert stdin is not None
        with contextlib.suppress(OSError), stdin:  # closed at the end: the helper ends
            while (item := jobs.get()) is not None:
                number, data = item
                try:
                    stdin.write(_LENGTH.pack(len(data)) + data)
                    stdin.flush()
                except OSError as e:
                    with self._lock:
                        future = self._pending.pop(number, None)
                    if future is not None:
                        future.set_exception(HelperGone(f"the capture helper is gone: {e}"))
                finally:
                    with self._lock:
                        if jobs is self._jobs:
                            self._unsent -= 1

    def _read(self, process: subprocess.Popen[bytes], answers: IO[bytes]) -> None:
        try:
            with answers:  # closed once the helper is gone
                self._answer(answers)
        except Exception:  # a helper it cannot understand is one it cannot use
            logger.exception("cannot read the capture helper's answers: stopping it")
            _stop(process)  # started anew at the next job (see submit)
        with self._lock:  # the helper exited: whatever it had is lost
            if process is not self._process:
                return  # a new one took over already
            pending, self._pending = self._pending, {}
        for future in pending.values():
            future.set_exception(HelperGone("the capture helper exited"))

    def _answer(self, stream: IO[bytes]) -> None:
        while (data := _receive(stream)) is not None:
            done = _answers.decode(data)
            if isinstance(done, Said):
                kind = {"_kind": "capture helper: " + done.kind} if done.kind else None
                logger.log(done.level, "capture helper: %s", done.text, extra=kind)
                continue
            with self._lock:
                future = self._pending.pop(done.number, None)
            if future is None:
                continue
            if done.error is not None:
                future.set_exception(RuntimeError(done.error))
            else:
                future.set_result(done.result or b"")


def _stop(process: subprocess.Popen[bytes]) -> None:
    """End the helper ``process``: SIGTERM first (it kills the tools it runs and resumes
    what they stopped), SIGKILL a second later; waited for, boundedly."""
    process.terminate()
    try:
        process.wait(1)
    except subprocess.TimeoutExpired:
        process.kill()
        try:
            # Bounded too: a process in a wait the kernel does not interrupt (a file
            # system that never answers) dies only when that wait ends.
            process.wait(_KILL_WAIT)
        except subprocess.TimeoutExpired:
            logger.error(
                "the capture helper (pid %d) has not died %g s after SIGKILL: left",
                process.pid,
                _KILL_WAIT,
            )


# -- the helper process ------------------------------------------------------------------


def run_capture(job: CaptureJob) -> bytes:
    """Capture ``job.pid`` (and its core); return the ``Capture`` encoded. The process is
    pinned once, by its start time, for the capture and the core dump both.

    Raises:
        ProcessRefused: ``job.user`` is set and the process is another user's.
    """
    try:
        process: Optional[Process] = Process.open(job.pid, job.start_time, None)
    except ProcessRefused:
        process = None  # gone or unreadable: the capture says so
    try:
        if job.user is not None and process is not None:
            _check_user(process, job.user)
        result = capture(
            job.pid,
            process.start_time if process is not None else job.start_time,
            process.pidfd if process is not None else None,
            role=job.role,
            labels=job.labels,
            hook=job.hook,
            options=job.options,
            deadline=job.deadline,
        )
        if job.core is not None and process is not None and not result.exited:
            path, error = _core(process, job.core, job.deadline - _CORE_RESERVE)
            errors = "; ".join(e for e in (result.error, error) if e) or None
            result = msgspec.structs.replace(result, core=path, error=errors)
        return _encoder.encode(result)
    finally:
        if process is not None:
            process.close()


def _core(
    process: Process, core: Tuple[str, int, str], deadline: float
) -> Tuple[Optional[str], Optional[str]]:
    """The core of the pinned ``process`` as ``core`` = (directory, max bytes, file name)
    asks: (its path, None), or (None, why not)."""
    directory, max_bytes, name = core
    pid = process.pid
    tracer = tracer_pid(pid)
    if tracer:
        return None, (
            f"core dump: not taken: process {pid} is already traced by {tracer_name(tracer)}"
        )
    try:
        leader_exited = read_stat(pid).state in "ZXx" and live_thread(pid) is not None
    except (OSError, ValueError, IndexError):
        leader_exited = False
    if leader_exited:
        return None, "core dump: not taken: its main thread has exited (gcore cannot attach)"
    path, error = core_dump(process, directory, max_bytes=max_bytes, deadline=deadline)
    if not process.alive():
        # gcore was given a pid number: once the worker is gone it may have dumped the
        # process that took its pid. Never kept as this worker's.
        if path is not None:
            with contextlib.suppress(OSError):
                os.unlink(path)
        return None, (
            "core dump: not kept: the worker exited before or while gcore ran (its pid "
            "may then have been another process's)"
        )
    if path is not None:  # named after its incident: pruned with it
        named = os.path.join(directory, name)
        try:
            # The worker's memory (its keys, its data): never for the directory's
            # readers (a group, say), whatever mode gcore gave it.
            os.chmod(path, 0o600)
            os.replace(path, named)
        except OSError as e:
            with contextlib.suppress(OSError):
                os.unlink(path)
            return None, f"core dump: not kept: {e.strerror or e}"
        path = named
    return path, error


def _check_user(process: Process, user: int) -> None:
    """Check the pinned ``process`` is of real uid ``user``. A process gone or unreadable
    is left to the capture to say so.

    Raises:
        ProcessRefused: it is another user's.
    """
    # A job label is any worker's to choose: one of another user's could name that
    # user's job and have its workers paused by py-spy, and their stacks and command
    # lines put in its own incident, as often as its timers expire.
    try:
        uid = read_uid(process.pid)
    except (OSError, ValueError, IndexError):
        return
    if process.alive() and uid != user:
        raise ProcessRefused(
            f"not captured: another user's process (uid {uid}; the stuck worker's is uid {user})"
        )


def run_write(job: WriteJob) -> bytes:
    """Annotate and write ``job.incident``; return it encoded (if wanted).

    Raises:
        OSError: it could not be written; ``TimeoutError``: not by its deadline (the
            writes before it, or the directory's lock, took that long).
    """
    if job.where is not None and job.deadline is not None and time.monotonic() >= job.deadline:
        raise TimeoutError(
            "the writes before it ran past its deadline (a slow or hung incident directory)"
        )
    budget = MAX_INCIDENT_BYTES
    if job.where is not None:  # the record and its text both within the store's budget
        budget = max(1, min(budget, job.where[2] // 2))
    incident = fit(job.incident, budget)
    if job.where is not None:
        directory, keep, max_bytes = job.where
        store = IncidentStore(directory, keep=keep, max_bytes=max_bytes)
        store.write(incident, deadline=job.deadline)
    return _encoder.encode(incident) if job.want else b""


def fit(incident: Incident, budget: int) -> Incident:
    """``incident`` annotated, its captures' stacks cut (the outermost frames of every
    thread in proportion, then all of them, then the raw outputs) until its record takes
    at most ``budget`` bytes, or nothing is left to cut; what was cut is said in its
    errors."""
    annotated = annotate(incident)
    size = len(_json.encode(annotated))
    if size <= budget:
        return annotated
    whole = size
    captures = incident.captures
    for share in (0.8 * budget / size, 0.0, -1.0):
        captures = [_cut_capture(c, share) for c in captures]
        cut = msgspec.structs.replace(incident, captures=captures)
        annotated = annotate(cut)
        size = len(_json.encode(annotated))
        if size <= budget:
            break
    said = (
        f"the record ({whole} bytes) was more than the {budget} an incident may take: "
        + (
            "its stacks were cut to their innermost frames"
            if share > 0
            else "its stacks were left out"
            if share == 0
            else "its stacks and raw outputs were left out"
        )
        + ("" if size <= budget else f"; still {size} bytes")
    )
    return msgspec.structs.replace(annotated, errors=[*annotated.errors, said])


def _cut_capture(capture: Capture, share: float) -> Capture:
    """``capture`` with the innermost ``share`` of each thread's frames (none at 0; and
    no raw output nor kernel stacks below 0)."""
    threads = []
    for t in capture.threads:
        n = max(1, int(len(t.frames) * share)) if share > 0 and t.frames else 0
        threads.append(
            msgspec.structs.replace(
                t,
                frames=t.frames[:n],
                frames_cut=t.frames_cut + len(t.frames) - n,
                kernel_stack=t.kernel_stack if share >= 0 else None,
            )
        )
    return msgspec.structs.replace(capture, threads=threads, raw=capture.raw if share >= 0 else "")


def main() -> None:
    """Serve the jobs that arrive on stdin until it closes, or until SIGTERM (then the
    tools running are killed first); answer on the descriptor named by the argument."""
    out = os.fdopen(int(sys.argv[1]), "wb")
    os.set_inheritable(out.fileno(), False)  # not the capture tools'
    os.nice(NICENESS)
    # What the helper and its tools create is the server's user's alone: a core, while
    # gcore writes it, is the worker's memory, in a directory a group may read.
    os.umask(0o077)
    signal.signal(signal.SIGTERM, _end)
    out_lock = threading.Lock()
    said = logging.getLogger("ftimer_server")
    said.addHandler(_Forward(out, out_lock))
    said.setLevel(logging.INFO)
    said.propagate = False  # else Python's last resort prints it on stderr as well
    captures = concurrent.futures.ThreadPoolExecutor(THREADS, "ftimer-capture")
    # Writes one at a time on a thread of their own: a slow or hung write (a full disk,
    # a file system that stalls) never takes a capture's thread, and the writes behind
    # it give up at their deadlines.
    writes = concurrent.futures.ThreadPoolExecutor(1, "ftimer-write")

    def work(frame: _Frame) -> None:
        try:
            job = frame.job
            result = run_capture(job) if isinstance(job, CaptureJob) else run_write(job)
            answer = Done(frame.number, result)
        except ProcessRefused as e:  # said as it is: "not captured: ..."
            answer = Done(frame.number, error=str(e))
        except Exception as e:  # answered as a failure; the helper goes on
            answer = Done(frame.number, error=f"{type(e).__name__}: {e}")
        _send(out, answer, out_lock)

    while (data := _receive(sys.stdin.buffer)) is not None:
        frame = _frames.decode(data)
        (captures if isinstance(frame.job, CaptureJob) else writes).submit(work, frame)
    captures.shutdown(wait=True)
    writes.shutdown(wait=True)


class _Forward(logging.Handler):
    """Send each record to the server (``Said``), on the answers' pipe."""

    def __init__(self, out: IO[bytes], lock: threading.Lock) -> None:
        super().__init__()
        self._out = out
        self._lock = lock

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = record.getMessage()
            if record.exc_info:
                text += "\n" + logging.Formatter().formatException(record.exc_info)
            _send(self._out, Said(record.levelno, text, str(record.msg)), self._lock)
        except Exception:
            self.handleError(record)


def _end(signum: int, frame: object) -> None:
    stop_tools()
    os._exit(128 + signum)
