"""The worker's own dump hook: ``faulthandler`` registered on a signal the worker
announced, writing every thread's stack to a file it holds open. The server sends that
signal and reads the new bytes through ``/proc/PID/fd/FD``: no ptrace needed, and the
handler runs even while a thread holds the GIL in C.

The signal is sent only if the worker catches it (an uncaught SIGUSR1 would kill it:
``/proc/PID/status`` SigCgt tells) and some thread does not block it; the file is read
only if it is a regular file of the worker's own (never a FIFO or a device, whose open or
read could block or act; never another user's file the worker holds open) on a local
file system (``SAFE_FILE_SYSTEMS``): a FUSE server the worker runs, or a hung NFS
``$TMPDIR``, could leave a read, a ``stat`` or the flush of a ``close`` waiting forever,
and with them the capture helper and every tool it starts after (a descriptor it holds is
flushed again in each child that closes it at its exec). Which file system holds the file
is read from ``/proc`` (``fdinfo``'s ``mnt_id`` and ``mountinfo``), never asked of the
file system itself; the file is then opened as a path (``O_PATH``: no open, no flush),
checked, and only then re-opened for reading, so the file checked is the file read. Every
system call on it is bounded by the capture's deadline all the same, and it is open
only while the dump is read (``run_hook``), never while the capture starts a tool.

A signal handler interrupts the system call its thread is in, and some (``nanosleep``)
are not restarted: C code that does not retry returns early, as it would for any signal.
"""

from __future__ import annotations

import contextlib
import math
import os
import select
import signal as _signal
import stat
import threading
import time
from typing import Callable, List, Optional, Sequence, Set, Tuple, TypeVar, Union

from ftimer_protocol import DumpHook
from ftimer_server.core._incident import ThreadStack

from ._pinned import Process
from ._procfs import (
    ThreadFacts,
    bounded,
    cannot_stop,
    held_unstoppable,
    read_status,
    signal_mask,
    thread_stack_mappings,
)
from ._stack_formats import (
    FaulthandlerThread,
    MethodResult,
    excerpt,
    faulthandler_cut_threads,
    match_thread_idents,
    parse_faulthandler,
    parsing,
)

__all__ = ["SAFE_FILE_SYSTEMS", "HookFile", "prepare_hook", "run_hook"]

_T = TypeVar("_T")

#: A dump is complete once it has stopped growing for this long.
_QUIET = 0.05
#: How often the file is looked at meanwhile (no event tells that a file grew).
_POLL = 0.005
#: What the wait for the dump leaves of the deadline for reading it.
_READ_TIME = 0.02
#: How long a close of the dump file is waited for (it never blocks on a local file
#: system; if it did, it would go on in a thread of its own, the descriptor gone).
_CLOSE_WAIT = 0.05
#: At most this much of a dump is read.
MAX_DUMP = 4 << 20
#: The file systems (``/proc/PID/mountinfo``'s type) a dump file is read on: local
#: ones, whose reads, ``stat`` and ``close`` never wait on another process or a network.
#: FUSE (``fuse``, ``fuse.*``), NFS, CIFS/SMB, 9p, virtiofs, ceph and the rest are
#: refused: the hook is not used.
SAFE_FILE_SYSTEMS = frozenset(
    {"tmpfs", "ramfs", "ext2", "ext3", "ext4", "xfs", "btrfs", "overlay", "f2fs", "bcachefs"}
)
#: At most this much of a ``mountinfo`` is read (a process may have many mounts).
_MAX_MOUNTINFO = 8 << 20


class HookFile:
    """The worker's dump file, checked by ``prepare_hook``; open (``fd``) only while
    ``run_hook`` reads the dump; ``close()`` it.

    Attributes:
        hook: the hook it belongs to.
        fd: our descriptor of the file, while open; else ``None``.
        start: where the worker's next write lands (its descriptor's offset).
        identity: (``st_dev``, ``st_ino``) of the file checked: the file opened later
            must be it. ``None``: not checked.
        uids: the worker's uids, one of which must own the file (empty: not checked).
    """

    def __init__(
        self,
        hook: DumpHook,
        fd: Optional[int],
        start: int,
        identity: Optional[Tuple[int, int]] = None,
        uids: Optional[Set[int]] = None,
    ) -> None:
        self.hook = hook
        self.fd = fd
        self.start = start
        self.identity = identity
        self.uids: Set[int] = uids or set()

    def open(self, pid: int, deadline: float) -> Optional[str]:
        """Open the file for reading (checked again), by ``deadline``; return why not.
        Already open: nothing is done."""
        if self.fd is not None:
            return None
        opened = _checked(pid, self.hook.fd, self.uids, deadline, read=True)
        if isinstance(opened, str):
            return opened
        fd, st = opened
        assert fd is not None  # opened to read
        if self.identity is not None and (st.st_dev, st.st_ino) != self.identity:
            _close(fd)
            return (
                f"dump hook: /proc/{pid}/fd/{self.hook.fd} is another file than the one "
                "checked: not read"
            )
        self.fd = fd
        return None

    def size(self, deadline: float) -> int:
        """The file's size.

        Raises:
            OSError: it cannot be examined (not open, or no answer by ``deadline``).
        """
        fd = self.fd
        if fd is None:
            raise OSError("the dump file is not open")
        done, st = bounded(lambda: os.fstat(fd), deadline)
        if not done or st is None:
            raise TimeoutError("the dump file's size could not be read by the deadline")
        return st.st_size

    def position(self, pid: int, deadline: float) -> int:
        """How far the worker has written: its descriptor's offset while it lives, the
        file's size after.

        Raises:
            OSError: our descriptor cannot be examined by ``deadline``.
        """
        offset = _fd_offset(pid, self.hook.fd)
        return offset if offset is not None else self.size(deadline)

    def close(self) -> None:
        """Close our descriptor, if open: at once (the descriptor is gone when this
        returns), a close that waited going on in a thread of its own."""
        fd, self.fd = self.fd, None
        if fd is not None:
            _close(fd)


def _close(fd: int) -> None:
    # A thread's close() takes the descriptor out of the table first, then flushes: once
    # the thread has begun, no fork inherits the descriptor, whatever the flush does.
    begun = threading.Event()

    def close() -> None:
        begun.set()
        os.close(fd)

    with contextlib.suppress(OSError):
        bounded(close, time.monotonic() + _CLOSE_WAIT)
    begun.wait()


def _fdinfo(path: str, key: bytes) -> Optional[int]:
    """A number from an ``fdinfo`` file (``pos:``, ``mnt_id:``); ``None`` if unreadable."""
    try:
        with open(path, "rb") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def _fd_offset(pid: int, fd: int) -> Optional[int]:
    return _fdinfo(f"/proc/{pid}/fdinfo/{fd}", b"pos:")


def _file_system(fdinfo: str, pid: int) -> Optional[str]:
    """The type of the file system of the descriptor whose ``fdinfo`` this is (from
    ``mountinfo``, ours or the worker's: mount ids are the same in every namespace);
    ``None`` if it cannot be told. Nothing asks the file system itself."""
    mount = _fdinfo(fdinfo, b"mnt_id:")
    if mount is None:
        return None
    prefix = f"{mount} ".encode()
    for where in ("/proc/self/mountinfo", f"/proc/{pid}/mountinfo"):
        try:
            with open(where, "rb") as f:
                data = f.read(_MAX_MOUNTINFO)
        except OSError:
            continue
        for line in data.splitlines():
            if line.startswith(prefix):
                # "ID PARENT MAJ:MIN ROOT POINT OPTIONS [OPTIONAL...] - TYPE SOURCE ..."
                # (spaces in names are escaped as \040).
                _, sep, rest = line.partition(b" - ")
                if sep:
                    return rest.split(b" ", 1)[0].decode(errors="replace")
    return None


def _unsafe(kind: Optional[str], path: str, pid: int) -> Optional[str]:
    """Why a file on a file system of type ``kind`` is not read; ``None``: it is read."""
    if kind in SAFE_FILE_SYSTEMS:
        return None
    if kind is None:
        return (
            f"dump hook: {path}: its file system is not in /proc/{pid}/mountinfo: not "
            "read, signal not sent"
        )
    return (
        f"dump hook: {path} is on a {kind} file system, whose reads and closes may never "
        "return (only local ones are read): not read, signal not sent"
    )


def _names_a_path(link: str) -> bool:
    # A pipe's or a socket's link reads "pipe:[N]", "socket:[N]": not a path. Reading a
    # /proc link asks no file system.
    try:
        return os.readlink(link).startswith("/")
    except OSError:
        return True


def prepare_hook(
    process: Process, hook: DumpHook, threads: List[ThreadFacts], deadline: float
) -> Union[HookFile, str]:
    """Check that the worker's hook may be used and its file read, by ``deadline``. The
    file is not kept open: ``run_hook`` opens it.

    Args:
        process: the worker.
        hook: the hook it announced.
        threads: its threads, with their blocked-signal masks.
        deadline: ``time.monotonic()`` by which the file must be checked.

    Returns:
        The file checked, or why the hook is not used (for people).
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
    able = {t.tid for t in threads if not (t.blocked and signal_mask(t.blocked, hook.signal))}
    held = held_unstoppable(pid, threads, deadline, among=able)
    if able and len(held) == len(able):
        # The budget would go in waiting, and a stop-like interrupt cuts a FUSE request.
        return (
            f"dump hook: {cannot_stop(held)}, and no other thread takes {name}: not sent "
            "(its handler would not run before that wait ends)"
        )
    uids = {int(u) for u in status.get("Uid", "").split() if u.isdigit()}
    opened = _checked(pid, hook.fd, uids, deadline, read=False)
    if isinstance(opened, str):
        return opened
    _, st = opened
    offset = _fd_offset(pid, hook.fd)
    return HookFile(
        hook,
        None,
        offset if offset is not None else st.st_size,
        identity=(st.st_dev, st.st_ino),
        uids=uids,
    )


_Opened = Union[Tuple[Optional[int], os.stat_result], str]


def _checked(pid: int, number: int, uids: Set[int], deadline: float, *, read: bool) -> _Opened:
    """``_open_dump_file`` by ``deadline``: (our descriptor or ``None``, its stat), or why
    not (for people)."""
    path = f"/proc/{pid}/fd/{number}"
    try:
        opened = _bounded_open(lambda: _open_dump_file(pid, number, uids, read=read), deadline)
    except OSError as e:
        return f"dump hook: {path}: {e.strerror or e}"
    if opened is None:
        return f"dump hook: {path} could not be opened by the deadline"
    return opened


def _bounded_open(open_: Callable[[], _Opened], deadline: float) -> Optional[_Opened]:
    """``open_()`` by ``deadline`` (``bounded``); ``None`` if it had not returned by
    then, when the descriptor it opens later is closed, never left open."""
    lock = threading.Lock()
    late: List[bool] = []
    result: List[_Opened] = []

    def call() -> _Opened:
        opened = open_()
        with lock:
            if not late:
                result.append(opened)
            elif not isinstance(opened, str) and opened[0] is not None:
                _close(opened[0])
        return opened

    done, _ = bounded(call, deadline)
    with lock:
        if done and result:
            return result[0]
        late.append(True)
        for opened in result:  # returned just after the deadline
            if not isinstance(opened, str) and opened[0] is not None:
                _close(opened[0])
    return None


def _open_dump_file(pid: int, number: int, uids: Set[int], *, read: bool) -> _Opened:
    """Check the worker's dump file (descriptor ``number``); with ``read``, open it
    read-only. Return (our descriptor or ``None``, its stat) or why not.

    Raises:
        OSError: the file could not be examined.
    """
    path = f"/proc/{pid}/fd/{number}"
    try:
        os.lstat(path)  # a /proc link: no file system is asked
    except FileNotFoundError:
        return f"dump hook: {path} is not open: the worker closed it; signal not sent"
    # Any other error (EACCES: the server may not look into another user's /proc/PID/fd
    # without CAP_SYS_PTRACE) is raised, and said as it is, not as a descriptor closed.
    # Its file system first, from /proc alone: a file on a FUSE or NFS mount is never
    # touched, not even by the walk to it.
    kind = _file_system(f"/proc/{pid}/fdinfo/{number}", pid)
    if kind is None and not _names_a_path(path):  # a pipe, a socket: in no mount
        return f"dump hook: {path} is not a regular file: not read, signal not sent"
    why = _unsafe(kind, path, pid)
    if why is not None:
        return why
    # As a path: no open of the file system's own, and no flush at its close. Checked
    # again on this descriptor: the worker may have put another file under its number.
    try:
        handle = os.open(path, os.O_PATH | os.O_CLOEXEC)
    except OSError as e:
        return f"dump hook: {path}: {e.strerror or e}"
    try:
        why = _unsafe(_file_system(f"/proc/self/fdinfo/{handle}", pid), path, pid)
        if why is not None:
            return why
        st = os.fstat(handle)
        if not stat.S_ISREG(st.st_mode):
            return f"dump hook: {path} is not a regular file: not read, signal not sent"
        if uids and st.st_uid not in uids:
            return f"dump hook: {path} belongs to uid {st.st_uid}, not to the worker: not read"
        if st.st_nlink:
            # The client's dump file has no name (unlinked once made): one with a name is
            # another file put under the number (the worker closed the hook's, and an
            # open() took it), which the dump would write into.
            return (
                f"dump hook: {path} is a file with a name, not the client's dump file (the "
                "worker closed it, and another file took its number): signal not sent"
            )
        if not read:
            return None, st
        # The very file checked: the one our path descriptor holds.
        fd = os.open(
            f"/proc/self/fd/{handle}", os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
        )
        return fd, st
    finally:
        os.close(handle)  # a path's close flushes nothing


def _main(
    parsed: Sequence[FaulthandlerThread], threads: Sequence[ThreadFacts], pid: int, signum: int
) -> Optional[str]:
    """The main thread's ident, where the dump tells: the kernel gives a signal sent to a
    process to its main thread unless that blocks it (or has another one pending), and
    the thread that ran the handler is faulthandler's "Current thread". So a running
    thread, whose stack cannot be paired, no longer leaves the main thread unpaired."""
    main = next((t for t in threads if t.tid == pid), None)
    current = [t.ident for t in parsed if t.current]
    if main is None or not main.blocked or len(current) != 1 or signal_mask(main.blocked, signum):
        return None  # (a mask not read: no telling)
    return current[0]


def run_hook(
    process: Process, hook_file: HookFile, threads: List[ThreadFacts], deadline: float
) -> MethodResult:
    """Open the dump file, send the hook's signal and read the dump until it stops
    growing, the worker exits or ``deadline`` comes; parse it; close the file. Threads
    are paired with their kernel ids where their stacks tell
    (``match_thread_idents``); the others get tid 0. Every system call on the
    file is bounded by ``deadline``."""
    try:
        return _run_hook(process, hook_file, threads, deadline)
    finally:
        hook_file.close()


def _run_hook(
    process: Process, hook_file: HookFile, threads: List[ThreadFacts], deadline: float
) -> MethodResult:
    pid = process.pid
    name = signal_name(hook_file.hook.signal)
    why = hook_file.open(pid, deadline)
    if why is not None:
        return MethodResult(error=f"{why}: {name} not sent")
    fd = hook_file.fd
    assert fd is not None
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
    stop = deadline - _READ_TIME  # what is left is for reading the dump
    while True:
        now = time.monotonic()
        try:
            end = hook_file.position(pid, deadline)
            if not process.alive():  # it wrote all it will
                last = max(last, hook_file.size(deadline))
                break
        except OSError:
            break
        if end > last:
            last, grew = end, now
        if (last > hook_file.start and now - grew >= _QUIET) or now >= stop:
            break
        _wait_exit(process, min(_POLL, max(0.0, stop - now)))
    # Read and parsed two at a time (py-spy's outputs with them): sixteen stuck workers
    # writing 4 MiB dumps each at once took the helper to 600 MiB.
    if not parsing.acquire(timeout=max(0.0, deadline - time.monotonic())):
        return MethodResult(error="dump hook: no time left to read the dump by the deadline")
    try:
        read = _read_dump(fd, hook_file.start, min(last - hook_file.start, MAX_DUMP), deadline)
        if isinstance(read, MethodResult):
            return read
        text = read.decode(errors="replace")
        del read
        parsed = parse_faulthandler(text)
        cut = faulthandler_cut_threads(text)
        wrote, raw = bool(text), excerpt(text)
        del text  # not held beyond the two at a time
    finally:
        parsing.release()
    if not parsed:
        why = "wrote nothing" if not wrote else "wrote no stack faulthandler's way"
        return MethodResult(
            raw=raw, error=f"dump hook: the worker {why} after {name} by the deadline"
        )
    idents = [t.ident for t in parsed]
    main = _main(parsed, threads, pid, hook_file.hook.signal)
    pairs = match_thread_idents(idents, threads, mapped or [], pid, not cut, main_ident=main)
    # Only a thread that lived through the dump keeps its pair: glibc gives a new thread
    # the stack, and so the ident, of one that ended.
    try:
        lived = {int(t) for t in os.listdir(f"/proc/{pid}/task")}
    except OSError:
        lived = set()
    return MethodResult(
        threads=[
            ThreadStack(
                tid=pairs[t.ident] if pairs.get(t.ident) in lived else 0,
                name=t.ident,
                frames=t.frames,
                frames_cut=t.cut,
            )
            for t in parsed
        ],
        raw=raw,
        notes=[_THREADS_CUT] if cut else None,
    )


def _read_dump(fd: int, start: int, length: int, deadline: float) -> Union[bytes, MethodResult]:
    """``length`` bytes of the dump file from ``start`` by ``deadline``, or why not."""
    if length <= 0:
        return b""
    try:
        done, read = bounded(lambda: os.pread(fd, length, start), deadline)
    except OSError as e:
        return MethodResult(error=f"dump hook: the dump could not be read: {e}")
    if not done or read is None:
        return MethodResult(error="dump hook: the dump could not be read by the deadline")
    return read


#: How many were left out is not said: /proc's threads include those Python knows not.
_THREADS_CUT = (
    "dump hook: faulthandler writes at most 100 threads, the newest first: the older ones, "
    "the main thread among them, have no stack (py-spy reads them all)"
)


def _wait_exit(process: Process, timeout: float) -> None:
    # On the pidfd: wakes at once if the worker exits (poll: any descriptor's number).
    if process.pidfd is not None:
        poller = select.poll()
        poller.register(process.pidfd, select.POLLIN)
        poller.poll(math.ceil(timeout * 1000))
    else:
        time.sleep(timeout)


def signal_name(number: int) -> str:
    """ "SIGUSR2 (12)"."""
    try:
        return f"{_signal.Signals(number).name} ({number})"
    except ValueError:
        return f"signal {number}"
