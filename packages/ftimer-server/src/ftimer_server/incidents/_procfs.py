"""What ``/proc`` tells about a worker being captured: its facts and its threads.

Everything here reads a process that may exit, be hidden (``hidepid``) or be stuck while
it is read: every ``OSError`` becomes an empty field or a note for people, never an
exception out of a capture. Two reads can block: ``/proc/PID/cmdline`` takes the worker's
memory lock (the classic ``ps`` hang when a process is stuck in a page fault) and
``stat()`` of an open file reaches its file system (a dead NFS server); both run in a
helper thread the capture stops waiting for at its deadline.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Set, Tuple, TypeVar

from ftimer_protocol import ProcStat, parse_proc_stat, parse_proc_status
from ftimer_server.core._incident import ChildState, ProcessFacts
from ftimer_server.core._report import printable

__all__ = [
    "CLK_TCK",
    "PAGE_SIZE",
    "ThreadFacts",
    "bounded",
    "catches_or_ignores",
    "children",
    "live_thread",
    "read_facts",
    "strerror",
    "read_stat",
    "read_status",
    "read_uid",
    "read_threads",
    "signal_mask",
    "thread_stack_mappings",
    "tracer_name",
    "tracer_pid",
    "unstoppable",
    "cannot_stop",
    "held_unstoppable",
]

_T = TypeVar("_T")

CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
#: A worker with more threads or descriptors than this is read in part: a capture's cost
#: stays bounded whatever the worker holds.
MAX_THREADS = 4096
MAX_FDS = 65536
#: Children whose state a worker's facts give (the rest by pid alone).
MAX_CHILD_STATES = 16
#: Of a capture's budget, the seconds the reads that may block are waited for: a worker's
#: command line (its memory lock) and where its open files lead (their file systems: a
#: file on a hung mount held the whole budget, and no stack was read).
SLOW_FACTS_WAIT = 0.5


def read_stat(pid: int, tid: Optional[int] = None) -> ProcStat:
    """Read ``/proc/PID/stat``, or a thread's ``/proc/PID/task/TID/stat``.

    Raises:
        ProcessLookupError: no such process (or thread), or it is hidden from us.
        OSError: another error reading it.
    """
    path = f"/proc/{pid}/stat" if tid is None else f"/proc/{pid}/task/{tid}/stat"
    data = _read(path)
    return parse_proc_stat(data)


def pidfd_pid(pidfd: int) -> Optional[int]:
    """The pid a pidfd refers to, from its fdinfo (Linux 5.4+): -1 once its process has
    exited; ``None`` where unknown (not a pidfd, no fdinfo).

    Only a pidfd's fdinfo is read: another descriptor's can take milliseconds (an epoll
    descriptor's lists every file it watches), and a sender may pass any descriptor."""
    try:
        if os.readlink(f"/proc/self/fd/{pidfd}") != "anon_inode:[pidfd]":
            return None
        with open(f"/proc/self/fdinfo/{pidfd}", "rb") as f:
            for line in f:
                if line.startswith(b"Pid:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def read_status(pid: int, tid: Optional[int] = None) -> Dict[str, str]:
    """Read ``/proc/PID/status`` (or a thread's) into a dict: "Tgid" -> "4242", ...

    Raises:
        ProcessLookupError: no such process (or thread).
        OSError: another error reading it.
    """
    path = f"/proc/{pid}/status" if tid is None else f"/proc/{pid}/task/{tid}/status"
    return parse_proc_status(_read(path))


def read_uid(pid: int) -> int:
    """The real uid of process ``pid`` (``/proc/PID/status``).

    Raises:
        ProcessLookupError: no such process.
        OSError: another error reading it.
        ValueError, IndexError: no readable ``Uid`` line.
    """
    return int(read_status(pid).get("Uid", "").split()[0])


def non_dumpable(pid: int) -> bool:
    """Whether process ``pid`` is not dumpable (``prctl(PR_SET_DUMPABLE, 0)``, or a change
    of uid, which clears the flag): its ``/proc`` files (not the directory) then belong to
    root (its user namespace's), not to its effective uid. Not to be told of a process
    whose effective uid is that root's (False). Those of a thread that has no memory any
    more (an exited main thread's) belong to root too: a live thread's are looked at.

    Raises:
        ProcessLookupError: no such process.
        OSError: another error reading it.
        ValueError, IndexError: no readable ``Uid`` line.
    """
    effective = int(read_status(pid).get("Uid", "").split()[1])
    task = f"/proc/{pid}"
    if read_stat(pid).state in "ZXx":
        tid = live_thread(pid)
        if tid is None:  # exiting: no core to be had anyway
            return False
        task = f"/proc/{pid}/task/{tid}"
    return os.stat(f"{task}/stat").st_uid != effective


def tracer_pid(pid: int) -> int:
    """The pid of the process tracing process ``pid`` (a debugger, strace: ``TracerPid``
    of ``/proc/PID/status``); 0 if none, or if it cannot be read."""
    try:
        return int(read_status(pid).get("TracerPid", "0") or "0")
    except (OSError, ValueError):
        return 0


def tracer_name(tracer: int) -> str:
    """A tracer as an incident names it: ``pid 17 (strace)``, its pid alone where its
    command cannot be read."""
    command = (_text(f"/proc/{tracer}/comm") or "").strip()
    return f"pid {tracer} ({command})" if command else f"pid {tracer}"


def live_thread(pid: int) -> Optional[int]:
    """A live thread of process ``pid`` other than its main thread (the thread-group
    leader, whose id is ``pid``), or ``None``: what keeps a process whose main thread has
    exited (a zombie leader) alive."""
    try:
        tids = sorted(int(t) for t in os.listdir(f"/proc/{pid}/task") if t != str(pid))
    except (OSError, ValueError):
        return None
    for tid in tids[:MAX_THREADS]:
        try:
            if read_stat(pid, tid).state not in "ZXx":
                return tid
        except (OSError, ValueError, IndexError):
            continue
    return None


def namespace_tids(pid: int, deadline: float) -> Optional[Dict[int, int]]:
    """The ids of ``pid``'s threads in their own PID namespace, mapped to ours (the
    ``/proc`` this server reads), from each thread's ``NSpid``, as many as are read by
    ``deadline``; None when the process is in our namespace (or that cannot be read).
    py-spy names threads by the ids the worker gives them (``threading.get_native_id``),
    which in a container of its own PID namespace are not ours."""
    try:
        if len(read_status(pid).get("NSpid", "").split()) < 2:  # in ours
            return None
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return None
    mapping: Dict[int, int] = {}
    for name in tids:
        if time.monotonic() >= deadline:
            break
        try:
            ids = read_status(pid, int(name)).get("NSpid", "").split()
        except (OSError, ValueError):
            continue
        if len(ids) > 1 and ids[-1].isdecimal() and ids[0].isdecimal():
            mapping[int(ids[-1])] = int(ids[0])
    return mapping


def signal_mask(value: str, signal: int) -> bool:
    """True if ``signal`` is in a ``SigCgt``/``SigBlk`` hex mask of ``/proc/PID/status``."""
    try:
        return bool(int(value, 16) >> (signal - 1) & 1)
    except ValueError:
        return False


def catches_or_ignores(status: Dict[str, str], signal: int) -> bool:
    """Whether the process of ``status`` (``read_status``) catches or ignores ``signal``:
    the signal's default action is not what it does to it (False where unreadable)."""
    return signal_mask(status.get("SigCgt", ""), signal) or signal_mask(
        status.get("SigIgn", ""), signal
    )


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
        killed, or until a hung file system answers), and whatever it returns later is
        dropped.

    Raises:
        Exception: what ``fn`` raised, if it raised by the deadline.
    """
    results: List[_T] = []
    errors: List[Exception] = []

    def call() -> None:
        try:
            results.append(fn())
        except Exception as e:  # handed to the caller's thread
            errors.append(e)

    thread = threading.Thread(target=call, name="ftimer-proc", daemon=True)
    thread.start()
    thread.join(max(0.0, deadline - time.monotonic()))
    if errors:
        raise errors[0]
    return (True, results[0]) if results else (False, None)


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


#: Kernel waits a stop signal makes uninterruptible: a FUSE request's (shown as S until
#: a signal comes), whose server hangs; py-spy's stop then waited for it all its time.
_STOP_BLOCKS = frozenset({"request_wait_answer", "__fuse_request_send", "fuse_simple_request"})


def unstoppable(threads: Sequence[ThreadFacts]) -> List[int]:
    """The ids of those of ``threads`` a stop signal cannot stop until they leave the
    kernel: in uninterruptible sleep (D state), or waiting for a FUSE server."""
    return [t.tid for t in threads if t.state == "D" or t.wchan in _STOP_BLOCKS]


#: Seconds between two looks at a process's threads: one in D state at both is held
#: there (a hung mount), not in a moment's disk I/O (a data loader's read).
D_AGAIN = 0.05


def held_unstoppable(
    pid: int, threads: Sequence[ThreadFacts], deadline: float, among: Optional[Set[int]] = None
) -> List[int]:
    """Those of ``threads`` (of process ``pid``, read just before; of ids ``among``, if
    given) that a stop or a signal's handler cannot reach (``unstoppable``), and still
    cannot ``D_AGAIN`` later (by ``deadline``). Never raises."""
    first = [t for t in unstoppable(threads) if among is None or t in among]
    if not first:
        return []
    time.sleep(max(0.0, min(D_AGAIN, deadline - time.monotonic())))
    try:
        again = read_threads(pid, kernel_stacks=False)
    except OSError:
        return []
    return [t for t in unstoppable(again) if t in first]


def cannot_stop(tids: Sequence[int]) -> str:
    """Why threads ``tids`` (``unstoppable``) hold a stop off, in words."""
    return (
        f"thread {', '.join(map(str, tids))} cannot be stopped (in uninterruptible sleep, "
        "D state, or waiting for a FUSE server)"
    )


def read_threads(
    pid: int,
    *,
    kernel_stacks: bool,
    masks: bool = False,
    stack_pointers: bool = False,
    deadline: Optional[float] = None,
) -> List[ThreadFacts]:
    """Read every thread of ``pid`` (up to ``MAX_THREADS``): state, wchan and, as asked,
    kernel stack, blocked signals and stack pointer. A thread that exits meanwhile is
    left out; a file that cannot be read leaves its field empty. With ``deadline``
    (``time.monotonic()``), the threads not reached by then are left out too: a worker
    of thousands took most of a second.

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
        if deadline is not None and time.monotonic() >= deadline:
            break
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
    """What the helper thread of ``read_facts`` reads: results, notes, the open file it
    looks at (its descriptor's path and target; None before the first), and whether it
    is done (set last: what it reads is whole once it is)."""

    cmdline: Optional[List[str]] = None
    fifos: int = 0
    notes: List[str] = field(default_factory=list)
    at: Optional[Tuple[str, str]] = None
    done: bool = False


def _read_slow(pid: int, paths: List[Tuple[str, str]], slow: _Slow) -> None:
    try:
        args = _read(f"/proc/{pid}/cmdline").split(b"\0")
        if args[-1] == b"":  # NUL-terminated, unless the process rewrote its arguments
            args.pop()
        slow.cmdline = [a.decode(errors="replace") for a in args]
    except OSError as e:
        slow.notes.append(f"cmdline unreadable: {strerror(e)}")
    for at in paths:
        slow.at = at
        try:
            if stat.S_ISFIFO(os.stat(at[0]).st_mode):
                slow.fifos += 1
        except OSError:
            continue  # closed meanwhile
    slow.done = True


def child_states(pid: int, kids: List[int]) -> List[ChildState]:
    """The state of each of the first ``MAX_CHILD_STATES`` of ``kids``, children of
    ``pid`` (none for one that exited meanwhile, its pid perhaps another's by now).
    Never raises; none of these reads can block."""
    states = []
    for kid in kids[:MAX_CHILD_STATES]:
        try:
            st = read_stat(kid)
        except (OSError, ValueError, IndexError):
            continue
        if st.ppid != pid:
            continue
        wchan = (_text(f"/proc/{kid}/wchan") or "").strip()
        states.append(
            ChildState(
                pid=kid,
                name=(_text(f"/proc/{kid}/comm") or "").strip(),
                state=st.state,
                wchan=wchan if wchan and wchan != "0" else None,
            )
        )
    return states


def _slow_note(pid: int, slow: _Slow) -> str:
    """Why the reads of ``_read_slow`` did not end within their share of the budget."""
    if slow.at is None:
        return (
            f"/proc/{pid}/cmdline could not be read in time (the worker may be stuck "
            "holding its memory lock)"
        )
    path, target = slow.at
    return (
        f"open file (fd {path.rsplit('/', 1)[-1]}: {printable(target[:200])}) did not answer "
        "stat() in time: its file system may be hung"
    )


def read_facts(pid: int, deadline: float) -> Tuple[ProcessFacts, List[str]]:
    """Read the facts of process ``pid``: what can be read by ``deadline``. Never raises.

    Returns:
        The facts (empty fields where unreadable) and notes for people on what could not
        be read.
    """
    notes: List[str] = []
    st: Optional[ProcStat] = None
    try:
        st = read_stat(pid)
    except (OSError, ValueError, IndexError) as e:
        notes.append(f"/proc/{pid}/stat unreadable: {strerror(e)}")
    uid = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        uid = read_uid(pid)
    kids: List[int] = []
    try:
        kids = children(pid)
    except (OSError, ValueError) as e:
        notes.append(f"children unknown: {strerror(e)}")
    sockets = fifos = 0
    paths: List[Tuple[str, str]] = []
    try:
        names = os.listdir(f"/proc/{pid}/fd")[:MAX_FDS]
    except OSError as e:
        names = []
        notes.append(f"open files unreadable: {strerror(e)}")
    unreadable: Optional[OSError] = None
    for name in names:
        path = f"/proc/{pid}/fd/{name}"
        try:
            target = os.readlink(path)
        except FileNotFoundError:
            continue  # closed meanwhile
        except OSError as e:  # EACCES: no right to look (listing them needs less)
            unreadable = e
            continue
        # An anonymous pipe is a FIFO too; a path may be a named FIFO: stat() tells, in
        # the helper thread, since it reaches the file's own file system.
        if target.startswith("socket:"):
            sockets += 1
        elif target.startswith("pipe:"):
            fifos += 1
        elif target.startswith("/"):
            paths.append((path, target))
    if unreadable is not None:
        notes.append(f"open files unreadable: {strerror(unreadable)}")
    slow = _Slow()
    share = min(deadline, time.monotonic() + SLOW_FACTS_WAIT)
    bounded(lambda: _read_slow(pid, paths, slow), share)
    done = slow.done  # not otherwise: the thread goes on, its count of FIFOs partial
    if not done:
        notes.append(_slow_note(pid, slow))
    notes.extend(slow.notes)
    facts = ProcessFacts(
        cmdline=slow.cmdline or [],
        state=st.state if st else "",
        rss=st.rss_pages * PAGE_SIZE if st else 0,
        threads=st.num_threads if st else 0,
        children=kids,
        child_states=child_states(pid, kids),
        age=round(max(0.0, _boot_seconds() - st.start_time / CLK_TCK), 3) if st else 0.0,
        fifos=fifos + (slow.fifos if done else 0),
        sockets=sockets,
        uid=uid,
    )
    return facts, notes


def strerror(e: BaseException) -> str:
    """An error in a few words: "ESRCH (No such process)"."""
    if isinstance(e, OSError) and e.errno is not None:
        return f"{errno.errorcode.get(e.errno, e.errno)} ({os.strerror(e.errno)})"
    return str(e) or type(e).__name__
