"""The worker's own dump hook: ``faulthandler`` registered on a signal the worker
announced, writing every thread's stack to a file it holds open. The server sends that
signal and reads the new bytes through ``/proc/PID/fd/FD``: no ptrace needed, and the
handler runs even while a thread holds the GIL in C.

The signal is sent only if the worker catches it (an uncaught SIGUSR1 would kill it:
``/proc/PID/status`` SigCgt tells) and some thread does not block it; the file is read
only if it is a regular file of the worker's own (never a FIFO or a device, whose open or
read could block or act; never another user's file the worker holds open). A signal
handler interrupts the system call its thread is in, and some (``nanosleep``) are not
restarted: C code that does not retry returns early, as it would for any signal.
"""

from __future__ import annotations

import os
import select
import signal as _signal
import stat
import time
from typing import List, Optional, Set, Tuple, Union

from ftimer_protocol import DumpHook
from ftimer_server.core._incident import ThreadStack

from ._pinned import Process
from ._procfs import ThreadFacts, bounded, read_status, signal_mask, thread_stack_mappings
from ._stack_formats import MethodResult, match_faulthandler_threads, parse_faulthandler

__all__ = ["HookFile", "prepare_hook", "run_hook"]

#: A dump is complete once it has stopped growing for this long.
_QUIET = 0.05
#: How often the file is looked at meanwhile (no event tells that a file grew).
_POLL = 0.005
#: At most this much of a dump is read.
MAX_DUMP = 4 << 20


class HookFile:
    """The worker's dump file, opened here through ``/proc/PID/fd/FD``; ``close()`` it.

    Attributes:
        hook: the hook it belongs to.
        fd: our descriptor of the file.
        start: where the worker's next write lands (its descriptor's offset).
    """

    def __init__(self, hook: DumpHook, fd: int, start: int) -> None:
        self.hook = hook
        self.fd = fd
        self.start = start

    def position(self, pid: int) -> int:
        """How far the worker has written: its descriptor's offset while it lives, the
        file's size after.

        Raises:
            OSError: our descriptor cannot be examined.
        """
        offset = _fd_offset(pid, self.hook.fd)
        return offset if offset is not None else os.fstat(self.fd).st_size

    def close(self) -> None:
        """Close our descriptor."""
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


def prepare_hook(
    process: Process, hook: DumpHook, threads: List[ThreadFacts], deadline: float
) -> Union[HookFile, str]:
    """Check that the worker's hook may be used and open its file, by ``deadline``.

    Args:
        process: the worker.
        hook: the hook it announced.
        threads: its threads, with their blocked-signal masks.
        deadline: ``time.monotonic()`` by which the file must be open.

    Returns:
        The open file, or why the hook is not used (for people).
    """
    pid = process.pid
    name = signal_name(hook.signal)
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
    if status.get("State", " ")[0] in "Tt":
        return f"dump hook: the worker is stopped (state T) and runs no handler: {name} not sent"
    uids = {int(u) for u in status.get("Uid", "").split() if u.isdigit()}
    path = f"/proc/{pid}/fd/{hook.fd}"
    try:
        done, opened = bounded(lambda: _open_dump_file(path, uids), deadline)
    except OSError as e:
        return f"dump hook: {path}: {e.strerror or e}"
    if not done or opened is None:
        return f"dump hook: {path} could not be opened by the deadline"
    if isinstance(opened, str):
        return opened
    fd, size = opened
    offset = _fd_offset(pid, hook.fd)
    return HookFile(hook, fd, offset if offset is not None else size)


def _open_dump_file(path: str, uids: Set[int]) -> Union[Tuple[int, int], str]:
    """Open the worker's dump file read-only; return (fd, size) or why not.

    Raises:
        OSError: the file vanished between its open and its check.
    """
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


def run_hook(
    process: Process, hook_file: HookFile, threads: List[ThreadFacts], deadline: float
) -> MethodResult:
    """Send the hook's signal and read the dump until it stops growing, the worker exits
    or ``deadline`` comes; parse it. Threads are paired with their kernel ids where their
    stacks tell (``match_faulthandler_threads``); the others get tid 0."""
    pid = process.pid
    name = signal_name(hook_file.hook.signal)
    # The stacks' mappings are read before the signal: the handler moves one thread.
    mapped: Optional[List[Tuple[int, int]]] = None
    if any(t.sp is not None for t in threads):
        try:
            _, mapped = bounded(lambda: thread_stack_mappings(pid), deadline)
        except OSError:
            mapped = None
    try:
        process.send(hook_file.hook.signal)
    except OSError as e:
        return MethodResult(error=f"dump hook: {name} could not be sent: {e}")
    last = hook_file.start
    grew = time.monotonic()
    while True:
        now = time.monotonic()
        try:
            end = hook_file.position(pid)
            if not process.alive():  # it wrote all it will
                last = max(last, os.fstat(hook_file.fd).st_size)
                break
        except OSError:
            break
        if end > last:
            last, grew = end, now
        if (last > hook_file.start and now - grew >= _QUIET) or now >= deadline:
            break
        _wait_exit(process, min(_POLL, max(0.0, deadline - now)))
    length = min(last - hook_file.start, MAX_DUMP)
    data = os.pread(hook_file.fd, length, hook_file.start) if length > 0 else b""
    text = data.decode(errors="replace")
    parsed = parse_faulthandler(text)
    if not parsed:
        why = "wrote nothing" if not text else "wrote no stack faulthandler's way"
        return MethodResult(
            raw=text, error=f"dump hook: the worker {why} after {name} by the deadline"
        )
    pairs = match_faulthandler_threads([t.ident for t in parsed], threads, mapped or [], pid)
    return MethodResult(
        threads=[
            ThreadStack(tid=pairs.get(t.ident, 0), name=t.ident, frames=t.frames) for t in parsed
        ],
        raw=text,
    )


def _wait_exit(process: Process, timeout: float) -> None:
    # On the pidfd: wakes at once if the worker exits.
    if process.pidfd is not None:
        select.select([process.pidfd], [], [], timeout)
    else:
        time.sleep(timeout)


def signal_name(number: int) -> str:
    """ "SIGUSR2 (12)"."""
    try:
        return f"{_signal.Signals(number).name} ({number})"
    except ValueError:
        return f"signal {number}"
