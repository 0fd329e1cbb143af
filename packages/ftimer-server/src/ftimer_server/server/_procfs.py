"""What ``/proc`` tells about a worker being captured, and the worker's identity.

Everything here reads a process that may exit, be hidden (``hidepid``) or be stuck while
it is read: every ``OSError`` becomes an empty field or a note for people, never an
exception out of a capture. Two reads can block: ``/proc/PID/cmdline`` takes the worker's
memory lock (the classic ``ps`` hang when a process is stuck in a page fault) and
``stat()`` of an open file reaches its file system (a dead NFS server); both run in a
helper thread the capture stops waiting for at its deadline.

A ``Process`` pins the worker for the length of a capture: by a pidfd where the kernel
has them, else by its start time, re-checked right before any signal. It never signals a
pid <= 1 or a thread.
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
import signal as _signal
import stat
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Set, Tuple, TypeVar

from ftimer_server.core._incident import ProcessFacts

__all__ = [
    "CLK_TCK",
    "PAGE_SIZE",
    "Process",
    "ProcessRefused",
    "ThreadFacts",
    "bounded",
    "children",
    "read_facts",
    "read_stat",
    "read_status",
    "read_threads",
    "signal_mask",
    "thread_stack_mappings",
]

_T = TypeVar("_T")

CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
#: A worker with more threads or descriptors than this is read in part: a capture's cost
#: stays bounded whatever the worker holds.
MAX_THREADS = 4096
MAX_FDS = 65536


class ProcessRefused(Exception):
    """The pid given is not a process this capture may look at or signal.

    Attributes:
        gone: it is no longer there (exited, or its pid now belongs to another process).
    """

    def __init__(self, message: str, *, gone: bool = False) -> None:
        super().__init__(message)
        self.gone = gone


@dataclass(frozen=True)
class Stat:
    """The fields of ``/proc/PID/stat`` (or ``/proc/PID/task/TID/stat``) a capture uses."""

    state: str
    ppid: int
    num_threads: int
    start_time: int
    rss_pages: int


def read_stat(pid: int, tid: Optional[int] = None) -> Stat:
    """Read ``/proc/PID/stat``, or a thread's ``/proc/PID/task/TID/stat``.

    Raises:
        ProcessLookupError: no such process (or thread), or it is hidden from us.
        OSError: another error reading it.
    """
    path = f"/proc/{pid}/stat" if tid is None else f"/proc/{pid}/task/{tid}/stat"
    data = _read(path)
    # The command name (field 2) may hold spaces and parentheses: split after its last ')'.
    fields = data[data.rindex(b")") + 2 :].split()
    return Stat(
        state=fields[0].decode(),
        ppid=int(fields[1]),
        num_threads=int(fields[17]),
        start_time=int(fields[19]),
        rss_pages=int(fields[21]),
    )


def read_status(pid: int, tid: Optional[int] = None) -> Dict[str, str]:
    """Read ``/proc/PID/status`` (or a thread's) into a dict: "Tgid" -> "4242", ...

    Raises:
        ProcessLookupError: no such process (or thread).
        OSError: another error reading it.
    """
    path = f"/proc/{pid}/status" if tid is None else f"/proc/{pid}/task/{tid}/status"
    status: Dict[str, str] = {}
    for line in _read(path).decode(errors="replace").splitlines():
        key, _, value = line.partition(":")
        status[key] = value.strip()
    return status


def signal_mask(value: str, signal: int) -> bool:
    """True if ``signal`` is in a ``SigCgt``/``SigBlk`` hex mask of ``/proc/PID/status``."""
    try:
        return bool(int(value, 16) >> (signal - 1) & 1)
    except ValueError:
        return False


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise ProcessLookupError(errno.ESRCH, f"no {path}") from None


def bounded(fn: Callable[[], _T], deadline: float) -> Tuple[bool, Optional[_T]]:
    """Run ``fn`` in a helper thread; wait for it until ``deadline`` (``time.monotonic()``).

    Returns:
        (True, its result), or (False, None) if it had not returned by then: the thread
        is left behind (a daemon thread, blocked in the kernel until the worker is
        killed), and whatever it returns later is dropped. ``fn`` must not raise.
    """
    box: List[_T] = []
    thread = threading.Thread(target=lambda: box.append(fn()), name="ftimer-proc", daemon=True)
    thread.start()
    thread.join(max(0.0, deadline - time.monotonic()))
    return (True, box[0]) if box else (False, None)


def _boot_seconds() -> float:
    # Start times count clock ticks since boot, suspend included: CLOCK_BOOTTIME.
    return time.clock_gettime(time.CLOCK_BOOTTIME)


def children(pid: int) -> List[int]:
    """The pids of the children of process ``pid``, from ``/proc/PID/task/*/children``.

    A kernel without that file (``CONFIG_PROC_CHILDREN`` off) is answered by a scan of
    every ``/proc/N/stat``.

    Raises:
        ProcessLookupError: no such process.
        OSError: its tasks cannot be listed.
    """
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        raise ProcessLookupError(errno.ESRCH, f"no process {pid}") from None
    found: List[int] = []
    seen: Set[int] = set()
    for tid in tids:
        try:
            data = _read(f"/proc/{pid}/task/{tid}/children")
        except ProcessLookupError:
            if os.path.isdir(f"/proc/{pid}/task/{tid}"):
                return _children_by_scan(pid)  # a kernel without the file
            continue  # that thread exited meanwhile
        for word in data.split():
            child = int(word)
            if child not in seen:
                seen.add(child)
                found.append(child)
    return found


def _children_by_scan(pid: int) -> List[int]:
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                if read_stat(int(name)).ppid == pid:
                    found.append(int(name))
            except (OSError, ValueError, IndexError):
                continue
    return found


@dataclass(frozen=True)
class ThreadFacts:
    """One thread as ``/proc/PID/task/TID`` shows it.

    Attributes:
        tid: its id.
        comm: its kernel name.
        state: R, S, D, T, ...; "" where unreadable.
        wchan: the kernel function it waits in; ``None`` when running or unreadable.
        kernel_stack: its kernel stack ("futex_wait_queue+0x60/0x90", ...), where readable.
        blocked: its blocked-signal mask (``SigBlk``), hex; "" where not read.
        sp: its user stack pointer while in a system call (``/proc/.../syscall``); read
            only to tell which faulthandler thread it is.
    """

    tid: int
    comm: str = ""
    state: str = ""
    wchan: Optional[str] = None
    kernel_stack: Optional[List[str]] = None
    blocked: str = ""
    sp: Optional[int] = None


def read_threads(
    pid: int, *, kernel_stacks: bool, masks: bool = False, stack_pointers: bool = False
) -> List[ThreadFacts]:
    """Read every thread of ``pid`` (up to ``MAX_THREADS``): state, wchan and, as asked,
    kernel stack, blocked signals and stack pointer. A thread that exits meanwhile is
    left out; a file that cannot be read leaves its field empty.

    Raises:
        ProcessLookupError: the process is gone.
        OSError: its tasks cannot be listed (``hidepid``, ...).
    """
    try:
        tids = sorted(int(t) for t in os.listdir(f"/proc/{pid}/task"))[:MAX_THREADS]
    except FileNotFoundError:
        raise ProcessLookupError(errno.ESRCH, f"no process {pid}") from None
    threads = []
    for tid in tids:
        base = f"/proc/{pid}/task/{tid}"
        try:
            state = read_stat(pid, tid).state
        except ProcessLookupError:
            continue
        except (OSError, ValueError, IndexError):
            state = ""
        comm = (_text(f"{base}/comm") or "").strip()
        wchan = (_text(f"{base}/wchan") or "").strip()
        kstack = None
        if kernel_stacks:
            raw = _text(f"{base}/stack")
            if raw is not None:
                # "[<0>] futex_wait_queue+0x60/0x90": the address is hidden (0) anyway.
                kstack = [line.split("] ", 1)[-1] for line in raw.splitlines() if line]
        blocked = ""
        if masks:
            with contextlib.suppress(OSError):
                blocked = read_status(pid, tid).get("SigBlk", "")
        sp = _stack_pointer(_text(f"{base}/syscall")) if stack_pointers else None
        threads.append(
            ThreadFacts(
                tid=tid,
                comm=comm,
                state=state,
                wchan=wchan if wchan and wchan != "0" else None,
                kernel_stack=kstack,
                blocked=blocked,
                sp=sp,
            )
        )
    return threads


def _text(path: str) -> Optional[str]:
    """The file's text, or ``None`` where it cannot be read (gone, not permitted)."""
    try:
        with open(path, "rb") as f:
            return f.read().decode(errors="replace")
    except OSError:
        return None


def _stack_pointer(syscall: Optional[str]) -> Optional[int]:
    # "NR arg1 .. arg6 SP PC" in a system call, "-1 SP PC" blocked outside one,
    # "running" when it runs (no stable stack pointer to read).
    words = (syscall or "").split()
    if len(words) < 3:
        return None
    try:
        return int(words[-2], 16)
    except ValueError:
        return None


def thread_stack_mappings(pid: int) -> List[Tuple[int, int]]:
    """The anonymous writable mappings of ``pid`` (start, end): where thread stacks and
    glibc's thread descriptors live. Read under the worker's memory lock: call it through
    ``bounded()``.

    Raises:
        ProcessLookupError: the process is gone.
        OSError: its maps are unreadable.
    """
    spans = []
    for line in _read(f"/proc/{pid}/maps").decode(errors="replace").splitlines():
        parts = line.split()
        if len(parts) == 5 and parts[1].startswith("rw"):
            start, _, end = parts[0].partition("-")
            spans.append((int(start, 16), int(end, 16)))
    return spans


@dataclass
class _Slow:
    """What the helper thread of ``read_facts`` reads: results and notes."""

    cmdline: Optional[List[str]] = None
    fifos: int = 0
    notes: List[str] = field(default_factory=list)


def _read_slow(pid: int, paths: List[str]) -> _Slow:
    slow = _Slow()
    try:
        raw = _read(f"/proc/{pid}/cmdline")
        slow.cmdline = [a.decode(errors="replace") for a in raw.split(b"\0")[:-1] or [raw]]
    except OSError as e:
        slow.notes.append(f"cmdline unreadable: {_strerror(e)}")
    for path in paths:
        try:
            if stat.S_ISFIFO(os.stat(path).st_mode):
                slow.fifos += 1
        except OSError:
            continue  # closed meanwhile
    return slow


def read_facts(pid: int, deadline: float) -> Tuple[ProcessFacts, List[str]]:
    """Read the facts of process ``pid``: what can be read by ``deadline``.

    Returns:
        The facts (empty fields where unreadable) and notes for people on what could not
        be read.
    """
    notes: List[str] = []
    st: Optional[Stat] = None
    try:
        st = read_stat(pid)
    except (OSError, ValueError, IndexError) as e:
        notes.append(f"/proc/{pid}/stat unreadable: {_strerror(e)}")
    uid = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        uid = int(read_status(pid).get("Uid", "").split()[0])
    kids: List[int] = []
    try:
        kids = children(pid)
    except (OSError, ValueError) as e:
        notes.append(f"children unknown: {_strerror(e)}")
    sockets = fifos = 0
    paths: List[str] = []
    try:
        names = os.listdir(f"/proc/{pid}/fd")[:MAX_FDS]
    except OSError as e:
        names = []
        notes.append(f"open files unreadable: {_strerror(e)}")
    for name in names:
        path = f"/proc/{pid}/fd/{name}"
        try:
            target = os.readlink(path)
        except OSError:
            continue  # closed meanwhile
        # An anonymous pipe is a FIFO too; a path may be a named FIFO: stat() tells, in
        # the helper thread, since it reaches the file's own file system.
        if target.startswith("socket:"):
            sockets += 1
        elif target.startswith("pipe:"):
            fifos += 1
        elif target.startswith("/"):
            paths.append(path)
    done, slow = bounded(lambda: _read_slow(pid, paths), deadline)
    if not done or slow is None:
        notes.append(
            f"/proc/{pid}/cmdline or its open files could not be read by the deadline "
            "(the worker may be stuck holding its memory lock)"
        )
        slow = _Slow()
    notes.extend(slow.notes)
    facts = ProcessFacts(
        cmdline=slow.cmdline or [],
        state=st.state if st else "",
        rss=st.rss_pages * PAGE_SIZE if st else 0,
        threads=st.num_threads if st else 0,
        children=kids,
        age=round(max(0.0, _boot_seconds() - st.start_time / CLK_TCK), 3) if st else 0.0,
        fifos=fifos + slow.fifos,
        sockets=sockets,
        uid=uid,
    )
    return facts, notes


def _strerror(e: BaseException) -> str:
    if isinstance(e, OSError) and e.errno is not None:
        return f"{errno.errorcode.get(e.errno, e.errno)} ({os.strerror(e.errno)})"
    return str(e) or type(e).__name__


class Process:
    """A worker pinned for the length of a capture: by a pidfd (the caller's, or one
    opened here and checked against the start time), else by pid and start time.

    Use ``Process.open()``; ``close()`` releases a pidfd opened here (never the caller's).

    Attributes:
        pid: the process.
        start_time: its start time in clock ticks since boot, as read when opened.
        pidfd: the pidfd it is signalled through, if any.
    """

    def __init__(self, pid: int, start_time: int, pidfd: Optional[int], owned: bool) -> None:
        self.pid = pid
        self.start_time = start_time
        self.pidfd = pidfd
        self._owned = owned

    @classmethod
    def open(cls, pid: int, start_time: Optional[int], pidfd: Optional[int]) -> Process:
        """Pin process ``pid``, which must be the one started at ``start_time`` (if given)
        and the one ``pidfd`` refers to (if given).

        Raises:
            ProcessRefused: ``pid`` is <= 1 or a thread's id, or the process is gone (its
                ``gone`` attribute is then set), or it cannot be read.
        """
        if pid <= 1:
            raise ProcessRefused(f"pid {pid} is not a worker process")
        owned = False
        if pidfd is None and hasattr(os, "pidfd_open"):
            try:
                pidfd = os.pidfd_open(pid)
                owned = True
            except ProcessLookupError:
                raise ProcessRefused(f"process {pid} is gone", gone=True) from None
            except OSError as e:
                if e.errno not in (errno.ENOSYS, errno.EMFILE, errno.ENFILE, errno.ENOMEM):
                    # EINVAL/ENOENT: a thread's id; anything else: not ours to guess at.
                    raise ProcessRefused(_refusal(pid, e)) from None
        try:
            try:
                st = read_stat(pid)
                tgid = int(read_status(pid).get("Tgid", "0"))
            except ProcessLookupError:
                raise ProcessRefused(f"process {pid} is gone", gone=True) from None
            except (OSError, ValueError, IndexError) as e:
                raise ProcessRefused(f"process {pid} cannot be read: {_strerror(e)}") from None
            if tgid != pid:
                raise ProcessRefused(f"{pid} is a thread of process {tgid}, not a process")
            if start_time is not None and st.start_time != start_time:
                raise ProcessRefused(
                    f"process {pid} is gone (its pid now belongs to another process)", gone=True
                )
            if st.state in "ZXx":
                raise ProcessRefused(f"process {pid} has exited", gone=True)
            process = cls(pid, st.start_time, pidfd, owned)
            if not process.alive():
                raise ProcessRefused(f"process {pid} has exited", gone=True)
            return process
        except BaseException:
            if owned and pidfd is not None:
                os.close(pidfd)
            raise

    def alive(self) -> bool:
        """True while the pinned process runs (not exited, not a zombie)."""
        if self.pidfd is not None:
            try:
                return not select.select([self.pidfd], [], [], 0)[0]
            except (OSError, ValueError):
                return False
        try:
            st = read_stat(self.pid)
        except (OSError, ValueError, IndexError):
            return False
        return st.start_time == self.start_time and st.state not in "ZXx"

    def send(self, signal: int) -> None:
        """Deliver ``signal`` to exactly the pinned process.

        Raises:
            ProcessLookupError: it is gone (its pid may now be another process's).
            OSError: the signal could not be delivered (``PermissionError``, ...).
        """
        if self.pid <= 1:  # never a process group or every process
            raise PermissionError(errno.EPERM, f"refusing to signal pid {self.pid}")
        if self.pidfd is not None:
            _signal.pidfd_send_signal(self.pidfd, signal)
            return
        # No pidfd: the start time and thread group, read right before the kill.
        if not self.alive() or int(read_status(self.pid).get("Tgid", "0")) != self.pid:
            raise ProcessLookupError(errno.ESRCH, f"process {self.pid} is gone")
        os.kill(self.pid, signal)

    def close(self) -> None:
        """Close the pidfd opened here, if any. Idempotent."""
        if self._owned and self.pidfd is not None:
            os.close(self.pidfd)
        self.pidfd = None
        self._owned = False


def _refusal(pid: int, e: OSError) -> str:
    if e.errno in (errno.EINVAL, errno.ENOENT):
        return f"{pid} is not a process (a thread's id?): pidfd_open: {_strerror(e)}"
    return f"process {pid} cannot be opened: pidfd_open: {_strerror(e)}"
