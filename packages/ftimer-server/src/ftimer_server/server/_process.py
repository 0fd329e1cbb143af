"""How the server reads processes: start time, thread group, parent, uid, clocks, pidfd,
liveness.

The server only ever looks at processes through a ``ProcessInspector``, so tests can
replace the operating system with a fake one (a pid that gets reused, ten thousand
workers that do not exist) and never touch a real process. An inspector may raise
``OSError``; the edge (``SystemHost``) turns every error into an answer for the core.
"""

from __future__ import annotations

import abc
import contextlib
import errno
import logging
import math
import os
import resource
import select
import sys
import time
from typing import List, Optional, Tuple

from ftimer_protocol import ProcStat, parse_proc_stat, proc_status_field
from ftimer_server.core._records import Worker

__all__ = [
    "ProcessInspector",
    "SystemInspector",
    "own_clock_offsets",
    "proc_problem",
    "out_of_descriptors",
    "raise_fd_limit",
    "ticks_since_boot",
]

logger = logging.getLogger("ftimer_server")

_LINUX = sys.platform.startswith("linux")
# How far RLIMIT_NOFILE is raised when its hard limit is "unlimited".
_FD_LIMIT_CAP = 1 << 20
# Below it, a start warns: every worker watched holds a descriptor (its pidfd).
_FD_LIMIT_LOW = 1024
_RAISE_FD_LIMIT = "raise its RLIMIT_NOFILE (systemd: LimitNOFILE=; docker: --ulimit nofile=)"


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

    def tgid(self, pid: int) -> int:
        """Return the thread group id of ``pid``: ``pid`` itself for a process, the id of
        its process for a thread. This default is for platforms (and fakes) whose
        thread ids are not process ids.

        Raises:
            ProcessLookupError: no process or thread has that id.
        """
        return pid

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

    def clock_offsets(self, pid: int) -> Optional[Tuple[int, int]]:
        """Return how far the CLOCK_MONOTONIC and CLOCK_BOOTTIME that process ``pid``
        reads are ahead of the server's, in nanoseconds: ``(0, 0)`` when they are the same,
        ``None`` when they cannot be told.

        They differ in a time namespace with other offsets (``unshare --time``, a
        container restored by CRIU), whose deadlines and start times are on other clocks.
        This default (the same clocks) is for platforms (and fakes) without time
        namespaces: an inspector for Linux overrides it, or the check is skipped.

        Raises:
            ProcessLookupError: no process has that pid.
        """
        return (0, 0)

    def waiting(self, pid: int) -> Optional[str]:
        """What process ``pid`` waits in, for a worker that outlived its SIGKILL: its
        threads in uninterruptible sleep with their kernel wait channels, else its state;
        ``None`` where the platform does not tell (this default). Never raises."""
        return None

    def open(self, pid: int) -> Optional[int]:
        """Return a pidfd for process ``pid``, or ``None`` where pidfds are unavailable.

        The caller owns the descriptor and gives it back through ``close()``.

        Raises:
            ProcessLookupError: no process has that pid.
            OSError: no pidfd could be opened although pidfds work here (``pid`` is a
                thread's id, out of descriptors, ...).
        """
        return None

    def close(self, worker: Worker) -> None:
        """Release what ``open()`` gave for ``worker`` (closes its pidfd, if any)."""
        if worker.pidfd is not None:
            os.close(worker.pidfd)

    def alive(self, worker: Worker) -> bool:
        """True while the process ``worker`` was bound to is running (not a zombie).

        A pid now held by another process (another start time), or by a thread, counts
        as not alive.

        Raises:
            OSError: the process could not be examined.
        """
        if worker.pidfd is not None:
            poller = select.poll()
            poller.register(worker.pidfd, select.POLLIN)
            return not poller.poll(0)
        try:
            start_time = self.start_time(worker.pid)
            if self.tgid(worker.pid) != worker.pid:
                return False
        except ProcessLookupError:
            return False
        return worker.start_time is None or start_time == worker.start_time


class SystemInspector(ProcessInspector):
    """The real host: ``/proc`` and pidfds on Linux, ``kill(pid, 0)`` elsewhere."""

    def __init__(self) -> None:
        self._pidfds = _LINUX and hasattr(os, "pidfd_open")
        self._warned = False
        self._clocks = own_clock_offsets()
        self._time_namespace = _time_namespaces("self")[0] if _LINUX else None

    def start_time(self, pid: int) -> Optional[int]:
        if not _LINUX:
            _probe(pid)
            return None
        stat = _stat(pid)
        # Z with threads left is a process whose main thread exited (pthread_exit) while
        # others live on: alive, as its pidfd says (one thread left: the zombie itself).
        if stat.state in "Xx" or (stat.state == "Z" and stat.num_threads <= 1):
            raise ProcessLookupError(errno.ESRCH, f"process {pid} is a zombie")
        return stat.start_time

    def parent(self, pid: int) -> int:
        if not _LINUX:
            if pid == os.getpid():
                return os.getppid()
            raise NotImplementedError("parent of another process: no /proc here")
        return _stat(pid).ppid

    def uid(self, pid: int) -> int:
        if not _LINUX:
            raise NotImplementedError("uid of another process: no /proc here")
        return int(_status(pid, "Uid"))

    def tgid(self, pid: int) -> int:
        if not _LINUX:
            return pid  # thread ids are not process ids there
        return int(_status(pid, "Tgid"))

    def clock_offsets(self, pid: int) -> Optional[Tuple[int, int]]:
        if self._clocks is None:  # no time namespaces on this kernel (before 5.6), or not Linux
            return (0, 0)
        own, for_children = _time_namespaces(str(pid))
        if own is not None and own == self._time_namespace:
            return (0, 0)
        shows = pid
        if own != for_children:
            # It called unshare(CLONE_NEWTIME) and stayed behind: /proc shows the offsets
            # of its own namespace only for a process whose children get it, its parent
            # if any (unshare(1) --fork).
            shows = self.parent(pid)
            if _time_namespaces(str(shows))[1] != own:
                return None
        try:
            monotonic, boottime = _timens_offsets(str(shows))
        except FileNotFoundError:
            raise ProcessLookupError(errno.ESRCH, f"no process {shows}") from None
        return monotonic - self._clocks[0], boottime - self._clocks[1]

    def waiting(self, pid: int) -> Optional[str]:
        if not _LINUX:
            return None
        # Imported only for a worker that outlived its SIGKILL: keeps the daemon's memory
        # down (as the signaller's walk of a tree does).
        from ftimer_server.incidents._procfs import read_threads  # noqa: PLC0415

        try:
            # On the loop's thread: a worker of thousands of threads in D took a third
            # of a second to read whole, every reap waiting behind it.
            threads = read_threads(
                pid, kernel_stacks=False, deadline=time.monotonic() + WAITING_BUDGET
            )
        except OSError:
            return None
        waits = [
            f"thread {t.tid}: D" + (f" in {t.wchan}" if t.wchan else "")
            for t in threads
            if t.state == "D"
        ]
        if not waits:  # none in D (they left it meanwhile): the process's own state
            main = [t.state for t in threads if t.tid == pid]
            return f"state {main[0]}" if main and main[0] else None
        more = len(waits) - _WAITS_SHOWN
        return "; ".join(waits[:_WAITS_SHOWN]) + (f"; {more} more" if more > 0 else "")

    def open(self, pid: int) -> Optional[int]:
        if not self._pidfds or pid <= 0:
            return None
        try:
            return os.pidfd_open(pid)
        except OSError as e:
            if e.errno != errno.ENOSYS:
                # ESRCH: no such process; ENOENT: a thread's id (or gone); EMFILE, ...:
                # never a reason to fall back to kill(pid).
                raise
            # A kernel without pidfds (before 5.3): start-time and thread checks instead.
            self._pidfds = False
            if not self._warned:
                self._warned = True
                logger.warning("no pidfds on this kernel: processes are checked by start time")
            return None


#: Threads in uninterruptible sleep ``waiting()`` names at most.
_WAITS_SHOWN = 4
#: Seconds ``waiting()`` reads a process's threads at most.
WAITING_BUDGET = 0.01


def _stat(pid: int) -> ProcStat:
    """Return the fields of ``/proc/PID/stat``.

    Raises:
        ProcessLookupError: no process has that pid.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except (FileNotFoundError, ProcessLookupError):
        raise ProcessLookupError(errno.ESRCH, f"no process {pid}") from None
    return parse_proc_stat(data)


def _status(pid: int, field: str) -> str:
    """The first value of ``field`` (``"Uid"``, ...) in ``/proc/PID/status``.

    Raises:
        ProcessLookupError: no process or thread has that id.
        OSError: the file cannot be read (``hidepid``, ...).
    """
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            value = proc_status_field(f.read(), field)
    except (FileNotFoundError, ProcessLookupError):
        value = None
    if value is None:
        raise ProcessLookupError(errno.ESRCH, f"no process {pid}")
    return value


def _time_namespaces(pid: str) -> Tuple[Optional[str], Optional[str]]:
    """The time namespaces of ``pid`` and of its children (``"time:[N]"``), each ``None``
    where it cannot be read: a process the server may not ptrace (another user's, or
    root's to a server without CAP_SYS_PTRACE), or a kernel without time namespaces
    (before 5.6); both are then taken to be the same. Reading a pid that is gone gives
    ``None`` too: the reads of its other facts tell."""
    links: List[Optional[str]] = []
    for name in ("time", "time_for_children"):
        try:
            links.append(os.readlink(f"/proc/{pid}/ns/{name}"))
        except OSError:
            links.append(None)
    return links[0], links[1]


def _timens_offsets(pid: str) -> Tuple[int, int]:
    """The offsets (ns) of CLOCK_MONOTONIC and CLOCK_BOOTTIME from the host's, in the time
    namespace ``pid``'s children get: its own, but in a process that called
    ``unshare(CLONE_NEWTIME)`` (which stays in its old one; the file cannot tell).

    Raises:
        FileNotFoundError: no such process, or no time namespaces on this kernel.
    """
    offsets = {b"monotonic": 0, b"boottime": 0}
    with open(f"/proc/{pid}/timens_offsets", "rb") as f:
        for line in f:
            name, seconds, nanoseconds = line.split()
            offsets[name] = int(seconds) * 1_000_000_000 + int(nanoseconds)
    return offsets[b"monotonic"], offsets[b"boottime"]


def own_clock_offsets() -> Optional[Tuple[int, int]]:
    """The offsets (ns) of this process's CLOCK_MONOTONIC and CLOCK_BOOTTIME from the
    host's (its time namespace's), or None where there are no time namespaces, or they
    cannot be read (a security module's denial, an unknown format: as on a kernel
    without them, rather than no server at all)."""
    if not _LINUX:
        return None
    try:
        return _timens_offsets("self")
    except (OSError, ValueError):  # FileNotFoundError: a kernel before 5.6
        return None


def _probe(pid: int) -> None:
    # PermissionError: it exists; it is not ours to signal, which policy decides elsewhere.
    with contextlib.suppress(PermissionError):
        os.kill(pid, 0)


def ticks_since_boot(wall: float) -> Optional[int]:
    """The last clock tick since boot (the unit of a process's start time) before the
    wall-clock time ``wall``: a process whose start time is above it started after
    ``wall``, or in the tick of ``wall`` (its pid may have been taken since, if ``wall``
    is when a worker's was written down: when in doubt, a process is the younger).
    Read against ``CLOCK_BOOTTIME`` and the wall clock now, to the microsecond (not
    ``/proc/stat``'s boot time, known to the second only: a process that took a pid a
    second after ``wall`` read as older). None where there is no such clock.
    """
    clock = getattr(time, "CLOCK_BOOTTIME", None)
    if clock is None:
        return None
    boot = time.clock_gettime(clock) - (time.time() - wall)
    return math.floor(boot * os.sysconf("SC_CLK_TCK")) - 1


def proc_problem() -> Optional[str]:
    """Why ``/proc`` does not describe this process's PID namespace, or None when it does
    (or there is no ``/proc`` to describe it: not Linux).

    The server takes pids in its own namespace (its clients', the kernel's) and reads
    their start time, parent and uid in ``/proc``: one mounted for another namespace
    (``unshare --pid --fork`` without ``--mount-proc``, a container given the host's
    ``/proc``) shows other processes under the same numbers, and a reap bound through it
    signalled one of them.
    """
    if not _LINUX:
        return None
    try:
        seen = os.readlink("/proc/self")
    except OSError as e:  # ENOENT: this process is not in that /proc's namespace
        if not os.path.isdir("/proc/sys"):
            return "no /proc is mounted: the server reads its processes there; mount one"
        seen = f"nothing ({e.strerror})"
    if seen == str(os.getpid()):
        return None
    return (
        f"/proc is not of this process's PID namespace: it shows this process as {seen}, "
        f"not {os.getpid()}; mount the namespace's own /proc (unshare --mount-proc, or the "
        "container's own)"
    )


def raise_fd_limit() -> int:
    """Raise this process's soft RLIMIT_NOFILE to its hard limit; return the soft limit,
    with a warning if it is still low.

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
    if soft != resource.RLIM_INFINITY and soft < _FD_LIMIT_LOW:
        logger.warning(
            "this process may open %d file descriptors at most (RLIMIT_NOFILE): each "
            "worker watched holds one, and arms beyond them are refused (unverifiable, "
            "EMFILE): %s",
            soft,
            _RAISE_FD_LIMIT,
        )
    return soft


def out_of_descriptors(err: Optional[int]) -> str:
    """What to do about ``err`` if it says the server, or the host, has no descriptor
    left (``EMFILE``, ``ENFILE``), to follow a refusal's reason; else ``""``."""
    if err == errno.EMFILE:
        return f": the server is out of file descriptors, {_RAISE_FD_LIMIT}"
    if err == errno.ENFILE:
        return ": the host is out of file descriptors (sysctl fs.file-max)"
    return ""
