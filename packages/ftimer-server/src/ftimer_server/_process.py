"""How the server sees processes: start time, parent, uid, pidfd, liveness.

The server only ever looks at processes through a ``ProcessInspector``, so tests can
replace the operating system with a fake one (a pid that gets reused, ten thousand
workers that do not exist) and never touch a real process.
"""

from __future__ import annotations

import abc
import contextlib
import errno
import logging
import os
import resource
import select
import sys
from typing import Optional, Tuple

from ._records import Worker

__all__ = ["ProcessInspector", "SystemInspector", "raise_fd_limit"]

logger = logging.getLogger("ftimer_server")

_LINUX = sys.platform.startswith("linux")
# How far RLIMIT_NOFILE is raised when its hard limit is "unlimited".
_FD_LIMIT_CAP = 1 << 20


class ProcessInspector(abc.ABC):
    """The server's view of the processes of the host.

    Implementations answer for any pid; ``ProcessLookupError`` means no process has it.
    """

    @abc.abstractmethod
    def start_time(self, pid: int) -> Optional[int]:
        """Return the start time of process ``pid`` in clock ticks since boot.

        Returns ``None`` when the platform does not tell (the process exists).

        Raises:
            ProcessLookupError: no process has that pid, or it is a zombie.
        """

    @abc.abstractmethod
    def parent(self, pid: int) -> int:
        """Return the parent pid of process ``pid``.

        Raises:
            ProcessLookupError: no process has that pid.
            NotImplementedError: the platform does not tell.
        """

    @abc.abstractmethod
    def uid(self, pid: int) -> int:
        """Return the real user id of process ``pid``.

        Raises:
            ProcessLookupError: no process has that pid.
            NotImplementedError: the platform does not tell.
        """

    def open(self, pid: int) -> Optional[int]:
        """Return a pidfd for process ``pid``, or ``None`` where pidfds are unavailable.

        The caller owns the descriptor and gives it back through ``close()``.

        Raises:
            ProcessLookupError: no process has that pid.
        """
        return None

    def close(self, worker: Worker) -> None:
        """Release what ``open()`` gave for ``worker`` (closes its pidfd, if any)."""
        if worker.pidfd is not None:
            os.close(worker.pidfd)

    def alive(self, worker: Worker) -> bool:
        """True while the process ``worker`` was bound to is running (not a zombie).

        A pid now held by another process (another start time) counts as not alive.
        """
        if worker.pidfd is not None:
            poller = select.poll()
            poller.register(worker.pidfd, select.POLLIN)
            return not poller.poll(0)
        try:
            start_time = self.start_time(worker.pid)
        except ProcessLookupError:
            return False
        return worker.start_time is None or start_time == worker.start_time


class SystemInspector(ProcessInspector):
    """The real host: ``/proc`` and pidfds on Linux, ``kill(pid, 0)`` elsewhere."""

    def __init__(self) -> None:
        self._pidfds = _LINUX and hasattr(os, "pidfd_open")
        self._warned = False

    def start_time(self, pid: int) -> Optional[int]:
        if not _LINUX:
            _probe(pid)
            return None
        state, _, start_time = _stat(pid)
        if state in "ZX":
            raise ProcessLookupError(errno.ESRCH, f"process {pid} is a zombie")
        return start_time

    def parent(self, pid: int) -> int:
        if not _LINUX:
            if pid == os.getpid():
                return os.getppid()
            raise NotImplementedError("parent of another process: no /proc here")
        return _stat(pid)[1]

    def uid(self, pid: int) -> int:
        if not _LINUX:
            raise NotImplementedError("uid of another process: no /proc here")
        try:
            with open(f"/proc/{pid}/status", "rb") as f:
                for line in f:
                    if line.startswith(b"Uid:"):
                        return int(line.split()[1])
        except (FileNotFoundError, ProcessLookupError):
            pass
        raise ProcessLookupError(errno.ESRCH, f"no process {pid}")

    def open(self, pid: int) -> Optional[int]:
        if not self._pidfds or pid <= 0:
            return None
        try:
            return os.pidfd_open(pid)
        except ProcessLookupError:
            raise
        except OSError as e:
            # Out of descriptors (EMFILE, ENFILE), or a kernel without pidfds (ENOSYS):
            # degrade to start-time checks at deadline time.
            if not self._warned:
                self._warned = True
                logger.warning(
                    "pidfd_open(%d) failed (%s): falling back to start-time checks", pid, e
                )
            if e.errno == errno.ENOSYS:
                self._pidfds = False
            return None


def _stat(pid: int) -> Tuple[str, int, int]:
    """Return (state, ppid, start time) from ``/proc/PID/stat``.

    Raises:
        ProcessLookupError: no process has that pid.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except (FileNotFoundError, ProcessLookupError):
        raise ProcessLookupError(errno.ESRCH, f"no process {pid}") from None
    # The command name (field 2) may hold spaces and parentheses: split after its last ')'.
    fields = data[data.rindex(b")") + 2 :].split()
    return fields[0].decode(), int(fields[1]), int(fields[19])


def _probe(pid: int) -> None:
    # PermissionError: it exists; it is not ours to signal, which policy decides elsewhere.
    with contextlib.suppress(PermissionError):
        os.kill(pid, 0)


def raise_fd_limit() -> int:
    """Raise this process's soft RLIMIT_NOFILE to its hard limit; return the soft limit.

    Every worker bound with a pidfd costs one descriptor.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = _FD_LIMIT_CAP if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft
