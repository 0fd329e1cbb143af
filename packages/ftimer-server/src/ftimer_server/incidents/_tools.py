"""The outside tools a capture runs against a worker: ``py-spy dump`` and ``gcore``.

Each runs in a process group of its own, so that at the deadline the whole of it (gcore
is a script around gdb) is killed at once; a tool killed while attached can leave the
worker stopped (the SIGSTOP of ptrace's attach still pending), so the worker is resumed
after, unless it was stopped before the tool came, or is traced by another (a debugger).

A tool is given a pid number, which the pinned process does not keep from being reused:
the process is checked alive right before the tool starts and after it ends, and what a
tool wrote is discarded if it was not (it may have been another process's).
"""

from __future__ import annotations

import contextlib
import os
import re
import selectors
import signal as _signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from ._pinned import Process
from ._procfs import read_status, tracer_pid
from ._stack_formats import MethodResult, excerpt, parse_py_spy, salvage_py_spy

__all__ = ["ToolRun", "py_spy_dump", "run_tool", "stop_tools"]

#: How long a killed tool is waited for before a thread is left to reap it.
_KILL_WAIT = 0.025
#: The longest one wait in the kernel for a tool's output: the kernel lets a wait of a
#: niced process (the helper) end up to 0.5% of its length late, 100 ms at most. Past
#: 10 s that was more than a capture keeps back from its deadline, and the capture,
#: answered after it, was lost whole ("nothing captured", not even the /proc facts).
_WAIT_SLICE = 1.0
#: The most of a tool's output that is read (stdout and stderr together); a tool that
#: writes more is killed. py-spy's dump is as large as the worker makes its stacks (deep
#: recursion, many threads, long names): this bounds the time spent reading it, and
#: ``PY_SPY_KEPT`` what is held of it.
MAX_OUTPUT = 64 << 20
#: The most of py-spy's output held (its start and its end, half each; the middle is
#: read and dropped): its JSON takes ~350 bytes a frame, so 4 MiB is ~12,000 frames, 60
#: threads 200 deep, several times a real worker's; parsed, each thread keeps its
#: innermost frames only (``_stack_formats``). Eight captures at once hold 32 MiB.
PY_SPY_KEPT = 4 << 20
#: The most of a tool's stderr held: its error message, in a line.
_ERR_KEPT = 64 << 10
#: Runs a command with a cap on the size of the files it writes (``RLIMIT_FSIZE``, set
#: before the exec: inherited by whatever the command starts, gcore's gdb say). Python,
#: not ``preexec_fn``, which may deadlock in a process with threads.
_LIMITED = (
    "import os, resource, sys; n = int(sys.argv[1]); "
    "resource.setrlimit(resource.RLIMIT_FSIZE, (n, n)); os.execvp(sys.argv[2], sys.argv[2:])"
)
_PTRACE_REFUSED = re.compile(
    r"permission denied|operation not permitted|os error (1|13)\)|SYS_PTRACE", re.IGNORECASE
)
#: py-spy's words for a process with no interpreter it knows (a program that is not
#: Python): no use trying again without --native, and worth saying plainly.
_NO_PYTHON = "failed to find python version"
#: CAP_SYS_PTRACE's bit in the capability sets of ``/proc/PID/status``.
_CAP_SYS_PTRACE = 19
_CONTAINER = (
    "Kubernetes: securityContext.capabilities.add: [SYS_PTRACE]; docker run --cap-add SYS_PTRACE"
)


def ptrace_advice(root: bool, capable: bool, yama: Optional[int]) -> str:
    """What to do about py-spy refused ptrace, for a server that runs as ``root`` or not,
    has CAP_SYS_PTRACE (``capable``) or not, on a kernel whose Yama
    ``kernel.yama.ptrace_scope`` is ``yama`` (None: no Yama)."""
    refused = "py-spy cannot attach (ptrace not permitted)"
    if yama == 3:
        return (
            f"{refused}: kernel.yama.ptrace_scope is 3, which refuses it to everyone, "
            "root included, until a reboot"
        )
    if capable:
        return (
            f"{refused} though this server has CAP_SYS_PTRACE: the worker may be in a "
            "container whose PID namespace the server does not share (Kubernetes: "
            "hostPID), or a security module (AppArmor, SELinux) refuses it"
        )
    if root:
        return (
            f"{refused}: this server runs as root but without CAP_SYS_PTRACE: give it "
            f"that capability (a systemd unit's CapabilityBoundingSet=; {_CONTAINER})"
        )
    yama_rule = (
        f"; kernel.yama.ptrace_scope {yama} lets only CAP_SYS_PTRACE trace another's process"
        if yama in (1, 2)
        else ""
    )
    return f"{refused}: run the server as root or with CAP_SYS_PTRACE ({_CONTAINER}){yama_rule}"


def _ptrace_advice() -> str:
    """``ptrace_advice`` for this process, from ``/proc``."""
    capable = False
    with contextlib.suppress(OSError, ValueError), open("/proc/self/status") as f:
        for line in f:
            if line.startswith("CapEff:"):
                capable = bool(int(line.split()[1], 16) >> _CAP_SYS_PTRACE & 1)
    yama = None
    with contextlib.suppress(OSError, ValueError), open("/proc/sys/kernel/yama/ptrace_scope") as f:
        yama = int(f.read())
    return ptrace_advice(os.geteuid() == 0, capable, yama)


@dataclass
class ToolRun:
    """How a tool's run ended.

    Attributes:
        returncode: its exit status; ``None`` if it was killed (at the deadline, or for
            writing more than ``MAX_OUTPUT`` bytes), or ``gone``.
        out, err: what it wrote (what it had written, if killed; nothing if ``gone``);
            with ``keep``, the start of its stdout.
        seconds: how long it ran.
        too_long: it was killed for writing more than ``MAX_OUTPUT`` bytes.
        gone: the process was gone before the tool started (then it was not started) or
            by the time it ended: its pid may have been another process's meanwhile, so
            what it wrote is discarded.
    """

    returncode: Optional[int]
    out: bytes
    err: bytes
    seconds: float
    too_long: bool = False
    gone: bool = False
    tail: bytes = b""
    dropped: int = 0


def run_tool(
    command: Sequence[str],
    process: Process,
    deadline: float,
    *,
    resume: bool,
    env: Optional[Dict[str, str]] = None,
    max_file_bytes: Optional[int] = None,
    thread: Optional[int] = None,
    keep: Optional[int] = None,
) -> ToolRun:
    """Run ``command`` against ``process`` until it exits, or until ``deadline`` comes or
    it has written more than ``MAX_OUTPUT`` bytes (then its process group is killed);
    SIGCONT ``process`` after if ``resume`` and the tool left it stopped. With
    ``max_file_bytes``, no file it writes grows past that many bytes (a write beyond
    fails with ``EFBIG``, or ``SIGXFSZ`` kills it). With ``thread``, the command names
    that thread of ``process`` (its main thread has exited), which must live too. With
    ``keep``, only the first and the last ``keep // 2`` bytes of its stdout are held
    (``out`` and ``tail``; ``dropped`` counts the bytes between).

    Raises:
        OSError: the tool could not be started.
    """
    started = time.monotonic()
    if not _present(process, thread):
        return ToolRun(None, b"", b"", 0.0, gone=True)
    # A process another tracer holds is that debugger's to resume, not ours: a SIGCONT
    # would reach it as a signal-delivery stop.
    resume = resume and not tracer_pid(process.pid)
    if max_file_bytes is not None:
        command = [sys.executable, "-I", "-S", "-c", _LIMITED, str(max_file_bytes), *command]
    child = subprocess.Popen(
        list(command),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
        env=env,
    )
    with _running_lock:
        _running[child.pid] = (child, process if resume else None)
    returncode: Optional[int] = None
    gone = False
    try:
        out, tail, dropped, err, ended, total = _read(child, deadline, keep)
        if ended:
            with contextlib.suppress(subprocess.TimeoutExpired):
                returncode = child.wait(timeout=max(0.0, deadline - time.monotonic()))
    finally:
        if returncode is None:  # the deadline, the limit, or an error (a MemoryError, say):
            _kill(child)  # never left attached to the worker
        # Still there now, so its pid was never another process's while the tool ran.
        gone = not _present(process, thread)
        if resume and not gone and _stopped(process):
            process.resume()
        with _running_lock:
            del _running[child.pid]
    too_long = total > MAX_OUTPUT
    if gone:
        return ToolRun(None, b"", b"", time.monotonic() - started, gone=True)
    return ToolRun(
        returncode, out, err, time.monotonic() - started, too_long, tail=tail, dropped=dropped
    )


def _stopped(process: Process) -> bool:
    """Whether ``process`` is stopped, or a SIGSTOP waits for it: as a tool killed while
    attached leaves it, or the core dump's own stop of a worker in uninterruptible sleep
    (pending until it leaves). Only then is it continued: a SIGCONT it did not need
    still runs its handler and breaks its system calls off (``EINTR``)."""
    try:
        status = read_status(process.pid)
        pending = int(status["SigPnd"], 16) | int(status["ShdPnd"], 16)
        return status["State"][:1] in ("T", "t") or bool(pending & _STOP_BIT)
    except (OSError, ValueError, KeyError):  # gone
        return False


#: SIGSTOP's bit in ``/proc/PID/status``'s masks of pending signals.
_STOP_BIT = 1 << (_signal.SIGSTOP - 1)


def _present(process: Process, thread: Optional[int]) -> bool:
    """Whether ``process`` (and its thread ``thread``, if given) is still there."""
    return process.alive() and (
        thread is None or os.path.isdir(f"/proc/{process.pid}/task/{thread}")
    )


#: The tools running now, by process (and group) id, with the process each must leave
#: running (None: it was stopped before, or is not to be resumed).
_running: Dict[int, Tuple[subprocess.Popen[bytes], Optional[Process]]] = {}
_running_lock = threading.Lock()


def stop_tools() -> None:
    """Kill the process group of every tool running and resume the processes they
    were looking at: what the capture helper does before it is made to end, so that no
    tool outlives it attached to a worker, nor leaves one stopped."""
    with _running_lock:
        running = list(_running.values())
    for child, process in running:
        if child.returncode is None:  # not reaped: its group id is still its own
            with contextlib.suppress(OSError):
                os.killpg(child.pid, _signal.SIGKILL)
        if process is not None:
            process.resume()


class _Kept:
    """What is held of one output stream: all of it, or (with ``keep``) its first and
    last ``keep // 2`` bytes."""

    def __init__(self, keep: Optional[int]) -> None:
        self.half = None if keep is None else keep // 2
        self.head = bytearray()
        self.tail = bytearray()
        self.dropped = 0

    def add(self, data: bytes) -> None:
        if self.half is None:
            self.head += data
            return
        room = self.half - len(self.head)
        if room > 0:
            self.head += data[:room]
            data = data[room:]
        self.tail += data
        over = len(self.tail) - self.half
        if over > 0:
            del self.tail[:over]
            self.dropped += over


def _read(
    child: subprocess.Popen[bytes], deadline: float, keep: Optional[int] = None
) -> Tuple[bytes, bytes, int, bytes, bool, int]:
    """What ``child`` writes to its stdout and stderr (closed after), until it closes
    both (True), or until ``deadline`` comes or it has written more than ``MAX_OUTPUT``
    bytes (False): (the start of its stdout, its end, the bytes dropped between, its
    stderr, whether it closed both, the bytes written). Without ``keep``, all its stdout
    is the start; with it, ``keep`` bytes at most. Its stderr is kept to ``_ERR_KEPT``
    bytes if ``keep`` is given."""
    streams = [child.stdout, child.stderr]
    out = _Kept(keep)
    err = _Kept(None)
    kept = {child.stdout.fileno(): out} if child.stdout else {}
    if child.stderr:
        kept[child.stderr.fileno()] = err
    total = 0
    try:
        with selectors.DefaultSelector() as selector:
            for fd in kept:
                selector.register(fd, selectors.EVENT_READ)
            while selector.get_map() and total <= MAX_OUTPUT:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                for key, _ in selector.select(min(remaining, _WAIT_SLICE)):
                    data = os.read(key.fd, 1 << 16)
                    if data:
                        sink = kept[key.fd]
                        if keep is None or sink is out or len(err.head) < _ERR_KEPT:
                            sink.add(data)
                        total += len(data)
                    else:
                        selector.unregister(key.fd)
            ended = not selector.get_map()
    finally:
        for stream in streams:
            if stream is not None:
                stream.close()
    return bytes(out.head), bytes(out.tail), out.dropped, bytes(err.head), ended, total


def _kill(child: subprocess.Popen[bytes]) -> None:
    """Kill ``child``'s process group (not reaped yet: the group's id is still ours),
    and reap it. One that does not die at once (stuck in the kernel itself) is left to a
    thread that reaps it whenever it does."""
    with contextlib.suppress(OSError):
        os.killpg(child.pid, _signal.SIGKILL)
    try:
        child.wait(timeout=_KILL_WAIT)
    except subprocess.TimeoutExpired:
        threading.Thread(target=child.wait, name="ftimer-reap", daemon=True).start()


def py_spy_dump(
    py_spy: str,
    process: Process,
    deadline: float,
    *,
    native: bool,
    resume: bool,
    thread: Optional[int] = None,
    nonblocking: bool = False,
) -> MethodResult:
    """``py-spy dump --json`` of ``process`` (``--native`` too, if asked), parsed.

    Args:
        py_spy: its path.
        process: the worker.
        deadline: when py-spy is killed.
        native: C/C++ frames too.
        resume: SIGCONT the worker after, if py-spy stopped it (not with ``thread`` or
            ``nonblocking``).
        thread: a live thread to read the worker through, its main thread having
            exited (py-spy cannot open it by its pid then, nor stop it): read without
            stopping it (``--nonblocking``).
        nonblocking: read without stopping it (``--nonblocking``: its stacks may be
            torn, it runs on).

    Returns:
        The threads, or why there are none: ptrace refused (in the user's terms), the
        deadline, the worker gone, or py-spy's own error.
    """
    unstopped = thread is not None or nonblocking
    command = _py_spy_command(py_spy, thread or process.pid, native=native, nonblocking=unstopped)
    if unstopped:
        resume = False  # never stopped
    if deadline <= time.monotonic():
        return MethodResult(error="py-spy: no time left before the deadline")
    try:
        run = _run_py_spy(command, process, deadline, resume=resume, thread=thread)
    except OSError as e:
        return MethodResult(error=f"py-spy could not be started ({py_spy}): {e}")
    if run.too_long:
        return _py_spy_too_long(run.out)
    if run.gone:
        return MethodResult(
            error="py-spy: the worker exited before it could be read, or while it was "
            "(its pid may then have been another process's): what py-spy read is discarded"
        )
    if run.returncode is None:
        return _py_spy_killed(run, unstopped)
    if run.returncode != 0:
        return _py_spy_failed(run, process)
    return _py_spy_threads(run)


def _py_spy_command(py_spy: str, pid: int, *, native: bool, nonblocking: bool) -> List[str]:
    """The ``py-spy dump`` command line for ``pid``."""
    command = [py_spy, "dump", "--pid", str(pid), "--json"]
    if native:
        command.append("--native")
    if nonblocking:
        command.append("--nonblocking")
    return command


def _run_py_spy(
    command: Sequence[str],
    process: Process,
    deadline: float,
    *,
    resume: bool,
    thread: Optional[int],
) -> ToolRun:
    """``run_tool`` for py-spy: its output kept to ``PY_SPY_KEPT`` bytes.

    Raises:
        OSError: py-spy could not be started.
    """
    # Its errors without a Rust backtrace, whatever the server's environment says.
    env = dict(os.environ, RUST_BACKTRACE="0", RUST_LIB_BACKTRACE="0")
    return run_tool(
        command, process, deadline, resume=resume, env=env, thread=thread, keep=PY_SPY_KEPT
    )


def _py_spy_too_long(out: bytes) -> MethodResult:
    """What is left of a py-spy killed for writing more than ``MAX_OUTPUT`` bytes: the
    threads whole in the start of its output (``out``), if any."""
    too_long = (
        f"py-spy wrote more than {MAX_OUTPUT} bytes (the worker's stacks are as "
        "large as it makes them) and was killed"
    )
    try:  # the threads whole in its start are still worth it
        threads, idents = salvage_py_spy(out, b"")
    except ValueError:
        threads, idents = [], None
    if not threads:
        return MethodResult(raw=excerpt(out), error=too_long)
    return MethodResult(
        threads=threads,
        idents=idents,
        raw=excerpt(out),
        notes=[f"{too_long}: the {len(threads)} threads whole in its start are shown"],
    )


def _py_spy_killed(run: ToolRun, unstopped: bool) -> MethodResult:
    """A py-spy killed at the deadline: why it may not have finished (``unstopped``: it
    read the worker without stopping it)."""
    why = (
        "a file it reads (the worker's program, a library) may not answer: a hung file system?"
        if unstopped
        else "a thread of the worker may not stop (a wait on a hung file system?), or a "
        "file it reads does not answer"
    )
    return MethodResult(
        raw=excerpt(run.out),
        error=f"py-spy did not finish within {run.seconds:.2f}s and was killed: {why}",
    )


def _py_spy_failed(run: ToolRun, process: Process) -> MethodResult:
    """A py-spy that exited with an error: why, in the user's terms where they are
    known (the worker gone, ptrace refused, no Python); retryable otherwise."""
    message = _message(run.err.decode(errors="replace"))
    if not process.alive():
        return MethodResult(error=f"py-spy failed: the worker exited ({message})")
    tracer = tracer_pid(process.pid)
    if tracer and _PTRACE_REFUSED.search(message):
        return MethodResult(
            error=f"py-spy cannot attach: process {process.pid} is already traced by "
            f"pid {tracer} (py-spy said: {message})"
        )
    if _PTRACE_REFUSED.search(message):
        return MethodResult(error=f"{_ptrace_advice()} (py-spy said: {message})")
    if _NO_PYTHON in message.lower():
        return MethodResult(
            error=f"py-spy: process {process.pid} runs no Python interpreter it can read "
            f"(not a Python program?) (py-spy said: {message})"
        )
    return MethodResult(error=f"py-spy failed (exit {run.returncode}): {message}", retryable=True)


def _py_spy_threads(run: ToolRun) -> MethodResult:
    """The threads of a py-spy that succeeded, parsed from its output: those of its
    start and end only if its middle was dropped (more than ``PY_SPY_KEPT`` bytes)."""
    raw = excerpt(run.out)
    try:
        if not run.dropped:
            threads, idents = parse_py_spy(run.out + run.tail)
            return MethodResult(threads=threads, idents=idents, raw=raw)
        threads, idents = salvage_py_spy(run.out, run.tail)
    except ValueError as e:
        return MethodResult(raw=raw, error=str(e))
    return MethodResult(
        threads=threads,
        idents=idents,
        raw=raw,
        notes=[
            f"py-spy's output ({len(run.out) + run.dropped + len(run.tail)} bytes) was "
            f"more than the {PY_SPY_KEPT} kept: {run.dropped} bytes of its middle, and "
            "the threads in them, not shown"
        ],
    )


def _message(stderr: str) -> str:
    """py-spy's error in one line: its messages, without a backtrace."""
    lines: List[str] = []
    for line in stderr.splitlines():
        if line.strip().lower().startswith("stack backtrace"):
            break
        if line.strip():
            lines.append(line.strip())
    return " ".join(lines)[:500] or "no message"
