"""Capturing one worker before its reap: its stacks by the best method available, and
what ``/proc`` tells of it.

Methods, best first: ``py-spy dump`` (needs ptrace rights; in its own process group,
killed at the deadline, the worker continued after it); the worker's own dump hook
(``faulthandler`` registered on a signal it announced, writing to a file it holds open,
read here through ``/proc/PID/fd``: no ptrace, and it works while a thread holds the GIL
in C); else the ``/proc`` facts alone. The facts are read first, before anything stops
the worker, so thread states are the worker's own, never py-spy's tracing stop.

Only the worker itself is ever signalled (its hook signal, SIGCONT), only while it is the
process the caller named (pidfd, or pid and start time re-checked right before), never a
thread. ``capture()`` never raises and returns by its deadline: each step that could
block (py-spy, the hook's wait, a ``/proc`` read under the worker's memory lock) is
bounded by it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import select
import shutil
import signal as _signal
import stat
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Set, Tuple, Union

import msgspec

from ftimer_protocol import DumpHook
from ftimer_server.core._incident import Capture, ThreadStack

from ._procfs import (
    Process,
    ProcessRefused,
    ThreadFacts,
    bounded,
    read_facts,
    read_status,
    read_threads,
    signal_mask,
    thread_stack_mappings,
)
from ._reap_extras import core_dump, signal_tree
from ._stack_formats import (
    match_faulthandler_threads,
    merge_threads,
    parse_faulthandler,
    parse_py_spy,
)

__all__ = ["CaptureOptions", "capture", "core_dump", "find_py_spy", "signal_tree"]

logger = logging.getLogger("ftimer_server")

#: What a capture keeps back from the deadline for its last steps (SIGCONT, the exit
#: check): py-spy is killed this long before it.
_RESERVE = 0.05
#: The hook's share of what is left when py-spy is tried first: a py-spy that hangs
#: still leaves the hook time to answer.
_HOOK_SHARE = 0.4
_HOOK_SHARE_MAX = 0.5
#: A dump is complete once it has stopped growing for this long.
_QUIET = 0.05
_POLL = 0.005
#: At most this much of a dump hook's file is read per capture.
_MAX_DUMP = 4 << 20
_PTRACE_REFUSED = re.compile(
    r"permission denied|operation not permitted|os error (1|13)\)|SYS_PTRACE", re.IGNORECASE
)
PTRACE_ADVICE = (
    "py-spy cannot attach (ptrace not permitted): run the server as root or with "
    "CAP_SYS_PTRACE; in a container, add the SYS_PTRACE capability (docker run "
    "--cap-add SYS_PTRACE; Kubernetes: securityContext.capabilities.add: [SYS_PTRACE]) "
    "and share the workers' PID namespace (hostPID); kernel.yama.ptrace_scope 3 "
    "refuses even root"
)


@dataclass(frozen=True)
class CaptureOptions:
    """How workers are captured.

    Attributes:
        py_spy: the path of py-spy; ``None``: do not use it (pass ``find_py_spy()``).
        native: ``py-spy --native``: C/C++ frames too (slower: ~4x).
        hook: use the worker's dump hook where py-spy is not used or fails.
        kernel_stacks: read ``/proc/PID/task/TID/stack`` where readable (root).
    """

    py_spy: Optional[str] = None
    native: bool = False
    hook: bool = True
    kernel_stacks: bool = True


def find_py_spy() -> Optional[str]:
    """py-spy on PATH, else beside the server's own interpreter (the ``pyspy`` extra
    installs it into the same environment, whose ``bin`` a systemd unit's PATH does not
    include); ``None`` if neither has it."""
    found = shutil.which("py-spy")
    if found:
        return found
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if os.access(beside, os.X_OK) and beside.is_file() else None


def capture(
    pid: int,
    start_time: Optional[int],
    pidfd: Optional[int],
    *,
    role: str,
    labels: Optional[Dict[str, str]],
    hook: Optional[DumpHook],
    options: CaptureOptions,
    deadline: float,
) -> Capture:
    """Capture one worker by the best method available. Never raises; returns by
    ``deadline`` (``time.monotonic()``), give or take a few milliseconds.

    Args:
        pid, start_time, pidfd: the worker: a pidfd for it if the caller holds one (never
            closed here), its start time (clock ticks since boot) if known; with neither,
            the process holding ``pid`` now is pinned for the capture.
        role: "stuck" or "peer", recorded.
        labels: its timer's labels, recorded.
        hook: the dump hook the worker announced, if any.
        options: which methods to use.
        deadline: when the capture must be over.

    Returns:
        The capture: ``method`` says which method gave the stacks ("none": the facts
        alone) and ``error`` why a better one failed or was not used.
    """
    started = time.monotonic()
    base = Capture(pid=pid, start_time=start_time, role=role, labels=labels)
    try:
        result = _capture(base, pidfd, hook, options, deadline)
    except Exception as e:  # a bug here must never cost the reap that follows
        logger.exception("capturing process %d failed", pid)
        result = msgspec.structs.replace(base, error=f"capture failed: {type(e).__name__}: {e}")
    return msgspec.structs.replace(result, seconds=round(time.monotonic() - started, 4))


@dataclass
class _Stacks:
    """What one method gave: stacks (``None``: it failed), its raw output, why not."""

    threads: Optional[List[ThreadStack]] = None
    raw: str = ""
    error: Optional[str] = None


def _capture(
    base: Capture,
    pidfd: Optional[int],
    hook: Optional[DumpHook],
    options: CaptureOptions,
    deadline: float,
) -> Capture:
    pid = base.pid
    try:
        process = Process.open(pid, base.start_time, pidfd)
    except ProcessRefused as e:
        return msgspec.structs.replace(base, exited=e.gone, error=str(e))
    hook_file: Optional[_HookFile] = None
    try:
        use_hook = options.hook and hook is not None
        facts, notes = read_facts(pid, deadline - _RESERVE)
        try:
            threads = read_threads(
                pid, kernel_stacks=options.kernel_stacks, masks=use_hook, stack_pointers=use_hook
            )
        except OSError as e:
            threads = []
            notes.append(f"threads unreadable: {e}")
        was_stopped = facts.state == "T"
        if hook is None or not options.hook:
            hook_why: Optional[str] = (
                "dump hook: not enabled"
                if not options.hook
                else "dump hook: the worker announced none (ftimer-client's dump hook option)"
            )
        else:
            plan = _prepare_hook(process, hook, threads, was_stopped, deadline - _RESERVE)
            hook_why, hook_file = (plan, None) if isinstance(plan, str) else (None, plan)
        method = "none"
        stacks = _Stacks()
        if options.py_spy:
            left = deadline - time.monotonic()
            share = min(_HOOK_SHARE_MAX, _HOOK_SHARE * left) if hook_file else 0.0
            stacks = _py_spy(process, options, was_stopped, deadline - share - _RESERVE)
            py_spy_why = stacks.error
            if stacks.threads is not None:
                method = "py-spy"
        else:
            py_spy_why = "py-spy: not installed or not enabled (ftimer-server[pyspy])"
        if stacks.threads is None and hook_file is not None and process.alive():
            by_hook = _run_hook(process, hook_file, threads, deadline - _RESERVE)
            if by_hook.threads is not None:
                method, stacks = "hook", by_hook
            else:
                hook_why = by_hook.error
                stacks.raw = stacks.raw or by_hook.raw
        exited = not process.alive()
        if method == "py-spy":
            errors = []
        elif method == "hook":
            # Why the better method failed; nothing to say if it was not asked for.
            errors = [py_spy_why] if options.py_spy and py_spy_why else []
        else:
            errors = ["no stacks: " + "; ".join(w for w in (py_spy_why, hook_why) if w)]
        if exited:
            errors.insert(0, "the worker exited during the capture")
        return msgspec.structs.replace(
            base,
            start_time=base.start_time if base.start_time is not None else process.start_time,
            method=method,
            exited=exited,
            error="; ".join(errors + notes) or None,
            facts=facts,
            threads=merge_threads(stacks.threads or [], threads),
            raw=stacks.raw,
        )
    finally:
        if hook_file is not None:
            hook_file.close()
        process.close()


def _continue(process: Process, was_stopped: bool) -> None:
    """SIGCONT the worker in case a tracer left it stopped (a SIGSTOP of ptrace's attach
    still pending when the tracer died), unless it was stopped before we came."""
    if was_stopped:
        return
    with contextlib.suppress(OSError):  # gone: nothing to continue
        process.send(_signal.SIGCONT)


def _py_spy(
    process: Process, options: CaptureOptions, was_stopped: bool, deadline: float
) -> _Stacks:
    assert options.py_spy is not None
    command = [options.py_spy, "dump", "--pid", str(process.pid), "--json"]
    if options.native:
        command.append("--native")
    timeout = deadline - time.monotonic()
    if timeout <= 0:
        return _Stacks(error="py-spy: no time left before the deadline")
    # Its own errors without a Rust backtrace, whatever the server's environment says.
    env = dict(os.environ, RUST_BACKTRACE="0", RUST_LIB_BACKTRACE="0")
    try:
        child = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,  # its own process group: killed whole at the deadline
            env=env,
        )
    except OSError as e:
        return _Stacks(error=f"py-spy could not be started ({options.py_spy}): {e}")
    hung = False
    try:
        out, err = child.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        hung = True
        out, err = _kill(child)
    finally:
        _continue(process, was_stopped)
    text = out.decode(errors="replace")
    if hung:
        return _Stacks(
            raw=text,
            error=(
                f"py-spy did not finish within {timeout:.2f}s and was killed (a thread in "
                "uninterruptible sleep, D state, keeps ptrace from stopping the worker)"
            ),
        )
    if child.returncode != 0:
        message = _py_spy_message(err.decode(errors="replace"))
        if not process.alive():
            return _Stacks(error=f"py-spy failed: the worker exited ({message})")
        if _PTRACE_REFUSED.search(message):
            return _Stacks(error=f"{PTRACE_ADVICE} (py-spy said: {message})")
        return _Stacks(error=f"py-spy failed (exit {child.returncode}): {message}")
    try:
        return _Stacks(threads=parse_py_spy(text), raw=text)
    except ValueError as e:
        return _Stacks(raw=text, error=str(e))


def _py_spy_message(stderr: str) -> str:
    """py-spy's error in one line: its messages, without a backtrace."""
    lines = []
    for line in stderr.splitlines():
        if line.strip().lower().startswith("stack backtrace"):
            break
        if line.strip():
            lines.append(line.strip())
    return " ".join(lines)[:500] or "no message"


def _kill(child: subprocess.Popen[bytes]) -> Tuple[bytes, bytes]:
    """Kill ``child``'s process group (it is not reaped yet: its pid, the group's id,
    is still ours) and collect what it wrote. A child that does not die at once (itself
    stuck in the kernel) is left to a thread that reaps it whenever it does."""
    with contextlib.suppress(OSError):
        os.killpg(child.pid, _signal.SIGKILL)
    try:
        return child.communicate(timeout=_RESERVE / 2)
    except subprocess.TimeoutExpired:
        threading.Thread(target=child.communicate, name="ftimer-reap", daemon=True).start()
        return b"", b""


class _HookFile:
    """The worker's dump file, opened here through ``/proc/PID/fd/FD``.

    Attributes:
        fd: our descriptor of it.
        start: where the worker's next write lands (its descriptor's offset).
    """

    def __init__(self, hook: DumpHook, fd: int, start: int, path: str) -> None:
        self.hook = hook
        self.fd = fd
        self.start = start
        self.path = path

    def position(self, pid: int) -> int:
        """How far the worker has written: its descriptor's offset while it lives, the
        file's size after."""
        offset = _fd_offset(pid, self.hook.fd)
        return offset if offset is not None else os.fstat(self.fd).st_size

    def close(self) -> None:
        os.close(self.fd)


def _fd_offset(pid: int, fd: int) -> Optional[int]:
    try:
        with open(f"/proc/{pid}/fdinfo/{fd}", "rb") as f:
            for line in f:
                if line.startswith(b"pos:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def _prepare_hook(
    process: Process,
    hook: DumpHook,
    threads: List[ThreadFacts],
    was_stopped: bool,
    deadline: float,
) -> Union[_HookFile, str]:
    """Check that the worker's hook can be used and open its file; or say why not."""
    pid = process.pid
    name = _signal_name(hook.signal)
    try:
        status = read_status(pid)
    except OSError as e:
        return f"dump hook: /proc/{pid}/status unreadable ({e}): {name} not sent"
    if not signal_mask(status.get("SigCgt", ""), hook.signal):
        return (
            f"dump hook: the worker does not catch {name}, the signal it announced "
            f"(/proc/{pid}/status SigCgt): not sent, since it would kill the worker"
        )
    masks = [t.blocked for t in threads if t.blocked]
    if masks and len(masks) == len(threads) and all(signal_mask(m, hook.signal) for m in masks):
        return f"dump hook: every thread of the worker blocks {name}: not sent"
    if was_stopped:
        return f"dump hook: the worker is stopped (state T) and runs no handler: {name} not sent"
    uids = {int(u) for u in status.get("Uid", "").split() if u.isdigit()}
    path = f"/proc/{pid}/fd/{hook.fd}"
    done, opened = bounded(lambda: _open_dump_file(path, uids), deadline)
    if not done or opened is None:
        return f"dump hook: {path} could not be opened by the deadline"
    if isinstance(opened, str):
        return opened
    fd, size = opened
    offset = _fd_offset(pid, hook.fd)
    return _HookFile(hook, fd, offset if offset is not None else size, path)


def _open_dump_file(path: str, uids: Set[int]) -> Union[Tuple[int, int], str]:
    # Only a regular file of the worker's own is read: never a FIFO or a device (whose
    # open or read could block or act), never another user's file the worker holds.
    try:
        before = os.stat(path)
    except OSError as e:
        return f"dump hook: {path}: {e.strerror or e}"
    if not stat.S_ISREG(before.st_mode):
        return f"dump hook: {path} is not a regular file: not read, signal not sent"
    if uids and before.st_uid not in uids:
        return f"dump hook: {path} belongs to uid {before.st_uid}, not to the worker: not read"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as e:
        return f"dump hook: {path}: {e.strerror or e}"
    after = os.fstat(fd)
    if (after.st_dev, after.st_ino) != (before.st_dev, before.st_ino) or not stat.S_ISREG(
        after.st_mode
    ):
        os.close(fd)
        return f"dump hook: {path} changed while it was opened: not read"
    return fd, after.st_size


def _run_hook(
    process: Process, hook_file: _HookFile, threads: List[ThreadFacts], deadline: float
) -> _Stacks:
    pid = process.pid
    name = _signal_name(hook_file.hook.signal)
    # The worker's thread stacks are mapped before the signal: its handler moves one.
    mapped: Optional[List[Tuple[int, int]]] = None
    if any(t.sp is not None for t in threads):
        _done, mapped = bounded(lambda: _mappings(pid), deadline)
    try:
        process.send(hook_file.hook.signal)
    except OSError as e:
        return _Stacks(error=f"dump hook: {name} could not be sent: {e}")
    end = last = hook_file.start
    grew = time.monotonic()
    while True:
        now = time.monotonic()
        try:
            end = hook_file.position(pid)
        except OSError:
            break
        if end > last:
            last, grew = end, now
        if last > hook_file.start and now - grew >= _QUIET:
            break
        if not process.alive():
            end = max(last, os.fstat(hook_file.fd).st_size)
            break
        if now >= deadline:
            break
        # Wakes at once if the worker exits; otherwise the next look at the file.
        _wait_exit(process, min(_POLL, max(0.0, deadline - now)))
    length = min(max(end, last) - hook_file.start, _MAX_DUMP)
    data = os.pread(hook_file.fd, length, hook_file.start) if length > 0 else b""
    text = data.decode(errors="replace")
    parsed = parse_faulthandler(text)
    if not parsed:
        why = "wrote nothing" if not text else "wrote no stack faulthandler's way"
        return _Stacks(raw=text, error=f"dump hook: the worker {why} after {name} by the deadline")
    pairs = match_faulthandler_threads([t.ident for t in parsed], threads, mapped or [], pid)
    stacks = [ThreadStack(tid=pairs.get(t.ident, 0), name=t.ident, frames=t.frames) for t in parsed]
    return _Stacks(threads=stacks, raw=text)


def _mappings(pid: int) -> Optional[List[Tuple[int, int]]]:
    try:
        return thread_stack_mappings(pid)
    except OSError:
        return None


def _wait_exit(process: Process, timeout: float) -> None:
    if process.pidfd is not None:
        select.select([process.pidfd], [], [], timeout)
    else:
        time.sleep(timeout)


def _signal_name(number: int) -> str:
    try:
        return f"{_signal.Signals(number).name} ({number})"
    except ValueError:
        return f"signal {number}"
