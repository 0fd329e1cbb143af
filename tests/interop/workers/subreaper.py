"""Run a command and leave nothing of it behind: ``python subreaper.py CMD [ARGS...]``.

torchrun starts every worker in a session of its own, and torch's built-in file timer
SIGKILLs the agent after a reap, orphaning its workers. To be sure a test ends every
process it caused, it starts each command under this launcher: a Linux child subreaper
(``prctl(PR_SET_CHILD_SUBREAPER)``), so orphaned descendants are re-parented here instead
of to init. When the command exits, or when this launcher gets SIGTERM/SIGINT, every
remaining descendant is SIGKILLed and reaped. The launcher then ends the way its command
did: the same exit code, or the same signal. It prints the command's pid on stderr first:
``[subreaper] pid N: CMD...``.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import select
import signal
import subprocess
import sys
from typing import List, Optional

PR_SET_CHILD_SUBREAPER = 36


def children(pid: int) -> List[int]:
    """The direct children of ``pid`` (every thread's list), or [] once it is gone."""
    found: List[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return found
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                found.extend(int(c) for c in f.read().split())
        except FileNotFoundError:
            continue
    return found


def parent(pid: int) -> int:
    """The parent of the process holding ``pid`` now, or 0 once it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return 0
    return int(stat[stat.rindex(b")") + 2 :].split()[1])


def exited(pidfd: int) -> bool:
    return bool(select.select([pidfd], [], [], 0)[0])


def kill_below(pid: int, pidfd: Optional[int]) -> None:
    """SIGKILL every live descendant of ``pid`` (this process, or a descendant of it
    pinned by ``pidfd``), children before parents.

    Never by a pid alone: each child is pinned by a pidfd first, then its parent checked
    again, ``pid`` still alive (so still the process it was). A pid read from /proc is
    another process's once its own has been reaped (by its parent, not here): that one
    is then either gone (the pidfd signals nothing) or not ``pid``'s child (skipped).
    """
    for child in children(pid):
        try:
            child_fd = os.pidfd_open(child)
        except OSError:  # gone already
            continue
        try:
            if parent(child) != pid or (pidfd is not None and exited(pidfd)):
                continue  # not (or no longer known to be) ours: orphans come here later
            kill_below(child, child_fd)
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(child_fd, signal.SIGKILL)
        finally:
            os.close(child_fd)


def kill_all_descendants() -> None:
    """SIGKILL and reap every descendant; orphans keep arriving here until none is left."""
    while True:
        kill_below(os.getpid(), None)
        try:
            os.waitpid(-1, 0)
        except ChildProcessError:
            return


def main(argv: List[str]) -> int:
    if not argv:
        print("usage: subreaper.py CMD [ARGS...]", file=sys.stderr)
        return 2
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        print(f"prctl failed: {os.strerror(ctypes.get_errno())}", file=sys.stderr)
        return 2

    stop: List[int] = []

    def on_signal(signum: int, frame: object) -> None:
        stop.append(signum)
        kill_all_descendants()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        child = subprocess.Popen(argv)
        print(f"[subreaper] pid {child.pid}: {' '.join(argv)}", file=sys.stderr, flush=True)
        status = child.wait()
    finally:
        kill_all_descendants()
    if stop:
        return 128 + stop[0]
    if status < 0:  # die of the same signal (SIGKILL and SIGSTOP cannot be caught anyway)
        if -status not in (signal.SIGKILL, signal.SIGSTOP):
            signal.signal(-status, signal.SIG_DFL)
        os.kill(os.getpid(), -status)
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
