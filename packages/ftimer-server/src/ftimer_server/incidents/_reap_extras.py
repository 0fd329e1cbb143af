"""What a reap may do beyond its signal, each off by default: a core dump of the worker
(``gcore``: it survives the dump, then is reaped), and the signal for its descendants
(DataLoader and compile workers that would otherwise keep GPU memory).

The descendants are signalled race-free against forks: each is pinned by a pidfd (a pid
reused meanwhile is never signalled) and frozen with SIGSTOP, top-down, and the walk is
repeated until it finds no new child (a frozen process forks no more); only then does
the signal go, to every frozen process, followed by SIGCONT (a stopped process acts on
SIGTERM only once continued). The worker is stopped for the walk too, and continued
once its own signal is pending: continued first, it could see its children die and act
on it before its signal came. The worker itself is pinned too (its pidfd, else its
start time): the children of another process that took its pid are never walked, let alone
signalled. Nothing here signals a pid <= 1 or a thread, nor a descendant the worker
could not signal itself (another user's: a root command its user started with sudo),
nor anything below one.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import signal as _signal
import time
from typing import Callable, Dict, FrozenSet, List, Optional, Sequence, Set, Tuple

from ftimer_server.core._records import Descendant

from ._pinned import Process, ProcessRefused
from ._procfs import (
    PAGE_SIZE,
    cannot_stop,
    catches_or_ignores,
    children,
    held_unstoppable,
    non_dumpable,
    read_stat,
    read_status,
    read_threads,
    tracer_pid,
)
from ._tools import run_tool

__all__ = ["core_dump", "signal_again", "signal_tree"]

logger = logging.getLogger("ftimer_server")

#: Bounds of the walk of a process tree: passes, processes, and how long the freeze may
#: take to be seen (a stop is delivered asynchronously).
_MAX_PASSES = 64
_MAX_TREE = 10000
# The walk runs on the server's loop thread, in the middle of a reap: every other
# worker's reap waits for it. A process that can stop is seen stopped within a few
# milliseconds; one that cannot (uninterruptible sleep, D: a vfork parent, a hung NFS
# read) would hold the loop for the whole wait, at every reap. So the wait is short:
# past it the walk goes on without waiting (a descendant still stopping may then finish
# a fork it had begun, and its child escape the tree: escaping, never an innocent hit).
_FREEZE_WAIT = 0.05
#: Stop signals: a timer's may be one (to freeze a hung worker for a debugger), which a
#: SIGCONT after it would undo.
_STOPS = frozenset({_signal.SIGSTOP, _signal.SIGTSTP, _signal.SIGTTIN, _signal.SIGTTOU})
#: CAP_KILL's bit in /proc/PID/status's CapEff.
_CAP_KILL = 1 << 5
#: The space a core leaves free on its file system for its incident: its record (16 MiB at
#: most, ``_helper.MAX_INCIDENT_BYTES``) and its text, about as large.
RECORD_ROOM = 32 << 20


def core_dump(
    process: Process, directory: str, *, max_bytes: int, deadline: float
) -> Tuple[Optional[str], Optional[str]]:
    """Dump the core of the pinned ``process`` with ``gcore`` into ``directory`` (created
    0700 if missing) as ``core.<UTC time>.<pid>``; the process goes on running (it is sent
    SIGCONT after, in case the dump left it stopped). Never raises.

    gcore is given a pid number: the caller checks ``process`` is still alive once it is
    done, and drops the core if not (it may be the core of another process by then).

    Args:
        process: the process, pinned.
        directory: where the core goes.
        max_bytes: refuse a process whose resident memory exceeds this (the core is at
            least that large), and a core that grows to this size (gcore cannot write
            more; the part written is removed).
        deadline: ``time.monotonic()`` by which gcore is killed (and its partial file
            removed).

    Returns:
        (path of the core, None), or (None, why not, for people).
    """
    try:
        return _core_dump(process, directory, max_bytes, deadline)
    except OSError as e:
        return None, f"core dump: {e}"


def _core_dump(
    process: Process, directory: str, max_bytes: int, deadline: float
) -> Tuple[Optional[str], Optional[str]]:
    with contextlib.suppress(ValueError, IndexError):  # unreadable: as gcore finds it
        if non_dumpable(process.pid):
            # Its memory may hold what it chose to keep out of cores (keys, say).
            return None, (
                "core dump: not taken: the worker is not dumpable (it set "
                "PR_SET_DUMPABLE to 0, or changed its uid): what it keeps out of core "
                "dumps is kept out of this one"
            )
    gcore = shutil.which("gcore")
    if gcore is None:
        return None, "core dump: gcore not found (it comes with gdb)"
    st = read_stat(process.pid)
    rss = st.rss_pages * PAGE_SIZE
    if rss > max_bytes:
        return None, (
            f"core dump refused: the process's resident memory ({rss} bytes) exceeds the "
            f"limit ({max_bytes} bytes)"
        )
    os.makedirs(directory, mode=0o700, exist_ok=True)
    # Here, in the helper, not on the server's loop: a hung file system waits here only.
    room = _room_for_core(directory)
    if rss > room:
        return None, (
            f"core dump refused: {room} bytes may be written on the file system of "
            f"{directory} (its free space, less {RECORD_ROOM} for the incident's record)"
        )
    max_bytes = min(max_bytes, room)
    now = time.time()
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now)) + f".{int(now % 1 * 1000):03d}Z"
    prefix = os.path.join(directory, f"core.{stamp}")
    path = f"{prefix}.{process.pid}"  # gcore appends the pid
    if deadline <= time.monotonic():
        return None, "core dump: no time left before the deadline"
    try:
        threads = read_threads(process.pid, kernel_stacks=False)
    except OSError:
        threads = []
    stuck = held_unstoppable(process.pid, threads, deadline)
    if stuck:
        # gdb's attach waits for each thread to stop: for these, past the deadline, and
        # a stop interrupts a FUSE server's request.
        return None, f"core dump: not taken: {cannot_stop(stuck)}"
    # Not one another tracer holds (a debugger's to resume, see run_tool).
    running = st.state not in ("T", "t") and not tracer_pid(process.pid)
    if running:
        # Stopped through its pin first: gdb attaches by pid number, ~80 ms after it
        # starts, and a stopped process exits only by another's SIGKILL, so its pid is not
        # another process's by then (run_tool checks it is there, and continues it after).
        with contextlib.suppress(OSError):
            process.send(_signal.SIGSTOP)
            _wait_stopped({process.pid: process}, time.monotonic() + _FREEZE_WAIT)
    try:
        run = run_tool(
            [gcore, "-o", prefix, str(process.pid)],
            process,
            deadline,
            resume=running,  # left stopped if it was found so
            # The resident memory checked above is not the core's size: gdb writes every
            # writable mapping, untouched pages too (a worker's mmap of a terabyte with
            # MAP_NORESERVE is a terabyte of core). Capped here, whatever the worker maps.
            max_file_bytes=max_bytes,
        )
    except OSError as e:
        if running:
            process.resume()
        return None, f"core dump: gcore could not be started: {e}"
    if run.too_long:
        _remove(path)
        return None, "core dump: gcore wrote more than a tool's output may be: killed"
    if run.returncode is None:
        _remove(path)
        return None, f"core dump: gcore did not finish within {run.seconds:.1f}s: killed"
    with contextlib.suppress(OSError):
        # gdb carries on past EFBIG and says it saved the core: a core at the cap is cut
        # short, and of no use.
        if os.stat(path).st_size >= max_bytes:
            _remove(path)
            return None, (
                f"core dump refused: the core reached the limit ({max_bytes} bytes) before "
                "it was complete: removed"
            )
    said = (run.out + run.err).decode(errors="replace")
    if any(os.strerror(e) in said for e in (errno.ENOSPC, errno.EDQUOT)):
        # gdb carries on past a full disk too (cores written at once each saw the free
        # space alone): cut short, and of no use.
        _remove(path)
        return None, (
            "core dump: cut short: the file system filled up while gcore wrote it (other "
            "cores written meanwhile?): removed"
        )
    if run.returncode != 0 or not os.path.isfile(path):
        _remove(path)
        text = " ".join(said.split())[-400:]
        if "not permitted" in text.lower():
            text = f"ptrace not permitted (root or CAP_SYS_PTRACE needed): {text}"
        return None, f"core dump: gcore failed (exit {run.returncode}): {text}"
    return path, None


def _room_for_core(directory: str) -> int:
    """How large a core in ``directory`` may grow: the space free on its file system,
    less ``RECORD_ROOM``. A core that fills the disk is cut short (gdb says it saved it
    all the same) and leaves its record no room: capped below that, it stops at the cap
    instead, where it is known incomplete and removed."""
    try:
        st = os.statvfs(directory)
    except OSError:
        return 1 << 62  # no cap of ours: the core's own limit decides
    return max(0, st.f_bavail * st.f_frsize - RECORD_ROOM)


def _remove(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


def signal_tree(
    pid: int,
    signal: int,
    start_time: Optional[int] = None,
    pidfd: Optional[int] = None,
    then: Optional[Callable[[], object]] = None,
) -> List[Descendant]:
    """Signal every descendant of process ``pid`` (not ``pid`` itself), race-free
    against forks; never raises.

    ``pid`` is pinned first, as the process started at ``start_time`` and the one
    ``pidfd`` refers to (each if given; neither: whoever holds ``pid`` now): if it is
    gone, or its pid now belongs to another process, nobody is signalled. Each
    descendant is pinned (pidfd, else start time), checked to be a process (not a
    thread) and still the child of the parent it was found under while that parent is
    still alive (so not a child of a process that took a dead parent's pid), then frozen
    with SIGSTOP, top-down; the walk of ``/proc/*/task/*/children`` is repeated until it
    finds nobody new. ``pid`` is checked again after the walk: gone by then, nobody is
    signalled and the frozen are continued. Then ``signal`` goes to each, and unless it
    was SIGKILL or a stop signal, SIGCONT to those still alive. A descendant whose
    parent dies during the walk is re-parented away from the tree and escapes it.
    ``pid`` itself is stopped for the walk (unless it was already, or is in
    uninterruptible sleep: not waited for) and continued at its end, once ``then`` has
    signalled it (unless with a stop signal). Signal 0 (report only) touches
    nobody. A descendant ``pid`` could not signal itself (``kill(2)``'s
    rule: its real and saved uids are neither the real nor the effective uid of ``pid``,
    and ``pid`` lacks ``CAP_KILL`` in its user namespace: a root command a user's worker
    started with sudo) is neither stopped nor signalled, and the tree below it is not
    walked.

    ``then`` (the worker's own signal) is called exactly once: while ``pid`` is still held
    stopped, after its descendants' signals, when the walk stopped it; else at the end. A
    worker continued first could see its children die, and act on it (exit with an error
    of its own), before its signal came.

    Returns:
        The processes ``signal`` was delivered to, each with the users the worker could
        signal it as (``signal_again``).
    """
    called = False

    def then_once() -> None:
        nonlocal called
        if then is not None and not called:
            called = True
            then()

    try:
        return _signal_tree(
            pid, signal, start_time, pidfd, then=then_once, sends_its_own=then is not None
        )
    finally:
        then_once()  # unless called while the walk held the worker stopped


def _signal_tree(
    pid: int,
    signal: int,
    start_time: Optional[int],
    pidfd: Optional[int],
    *,
    then: Callable[[], None],
    sends_its_own: bool,
) -> List[Descendant]:
    if pid <= 1 or signal == 0:
        return []
    try:
        root = Process.open(pid, start_time, pidfd)
    except ProcessRefused as e:  # gone, reused, a thread: not the worker's tree
        logger.info("descendants of process %d not signalled: %s", pid, e)
        return []
    try:
        may = _May(pid)
    except (OSError, ValueError, IndexError):  # gone: nobody to walk
        root.close()
        return []
    frozen: Dict[int, Process] = {}
    signalled: List[Descendant] = []
    stopped = _stop(root)
    try:
        _freeze(root, frozen, may)
        if not root.alive():
            # Exited during the walk (its pid may be another's by now): its tree is not
            # reaped, as it is not; whoever was frozen goes on.
            logger.info("process %d exited during the walk of its descendants", pid)
            for process in frozen.values():
                process.resume()
            return []
        for child, process in frozen.items():
            try:
                if signal in _STOPS and _catches_or_ignores(child, signal):
                    # Continued first, as it runs without the walk (a SIGCONT after the
                    # signal would discard it): not left stopped for good by the walk's
                    # SIGSTOP, its handler never run.
                    process.resume()
                process.send(signal)
                signalled.append(Descendant(child, process.start_time, may.users(child)))
            except OSError:
                continue  # exited meanwhile
        if signal != _signal.SIGKILL and signal not in _STOPS:
            for process in frozen.values():
                if process.alive():
                    process.resume()
    except Exception:  # a bug here must never cost the reap of the worker itself
        logger.exception("signalling the descendants of process %d failed", pid)
        for process in frozen.values():  # none left frozen by a walk cut short
            process.resume()
    finally:
        for process in frozen.values():
            process.close()
        if stopped:
            stops = sends_its_own and signal in _STOPS
            if stops and _catches_or_ignores(pid, signal):  # as a descendant that does
                root.resume()
            try:
                then()  # its own signal, before it may run again
            finally:
                if not stops:
                    root.resume()
        root.close()
    return signalled


def signal_again(descendants: Sequence[Descendant], signal: int) -> List[Descendant]:
    """Deliver ``signal`` to those of ``descendants`` (as ``signal_tree`` returned them)
    still alive: each pinned (its pidfd, checked against its start time: never a process
    that took its pid), and only while its real or saved uid is still one of its
    ``users`` (a process that became another user's since, through a setuid program, is
    spared). Never raises.

    Returns:
        Those it was delivered to.
    """
    delivered = []
    for descendant in descendants:
        try:
            process = Process.open(descendant.pid, descendant.start_time, None)
        except ProcessRefused:  # gone: its pid may be another's
            continue
        try:
            users = descendant.users
            if users is not None and not users.intersection(_uids(process.pid)[::2]):
                logger.info(
                    "process %d not signalled again: another user's since it was signalled",
                    process.pid,
                )
                continue
            process.send(signal)
            delivered.append(descendant)
        except (OSError, ValueError, IndexError):  # gone meanwhile
            continue
        finally:
            process.close()
    return delivered


def _catches_or_ignores(pid: int, signal: int) -> bool:
    """Whether process ``pid`` catches or ignores ``signal`` (False where unreadable)."""
    try:
        return catches_or_ignores(read_status(pid), signal)
    except OSError:
        return False


def _stop(root: Process) -> bool:
    """Stop ``root`` for the walk, unless it is stopped already; return whether it was
    stopped here. A worker that keeps forking would give every pass of the walk someone
    new: 64 passes over thousands of descendants held the server's loop for seconds."""
    try:
        if read_stat(root.pid).state in "Tt":
            return False
        root.send(_signal.SIGSTOP)
    except (OSError, ValueError, IndexError):
        return False
    return True


class _May:
    """Whom the worker ``pid`` could signal itself (``kill(2)``'s rule), and the pids
    under it it could not, each logged once.

    Raises:
        OSError, ValueError, IndexError: it is gone, or its status unreadable.
    """

    def __init__(self, pid: int) -> None:
        self.pid = pid
        status = read_status(pid)
        real, effective = status.get("Uid", "").split()[:2]
        self._uids = frozenset((int(real), int(effective)))
        # With CAP_KILL, every process of its user namespace (the one it is seen in).
        self._userns: Optional[str] = None
        if int(status.get("CapEff", "0"), 16) & _CAP_KILL:
            self._userns = _userns(pid)
        #: The pids it may signal through CAP_KILL alone.
        self._by_capability: Set[int] = set()
        #: The pids it could not signal, as found: never walked again.
        self.spared: Set[int] = set()

    def signal(self, pid: int, parent: int) -> bool:
        """Whether the worker could signal ``pid`` (found under ``parent``).

        Raises:
            OSError, ValueError, IndexError: it is gone, or its status unreadable.
        """
        real, _, saved = _uids(pid)
        if real in self._uids or saved in self._uids:
            return True
        if self._userns is not None and _userns(pid) == self._userns:
            self._by_capability.add(pid)
            return True
        self.spared.add(pid)
        logger.info(
            "process %d (uid %d) under process %d not signalled: worker %d could not "
            "signal it itself (another user's, and the worker lacks CAP_KILL over it)",
            pid,
            real,
            parent,
            self.pid,
        )
        return False

    def users(self, pid: int) -> Optional[FrozenSet[int]]:
        """The uids the worker may signal ``pid`` as (one it was found it may signal):
        None for any, through CAP_KILL."""
        return None if pid in self._by_capability else self._uids


def _userns(pid: int) -> Optional[str]:
    """The user namespace of process ``pid`` (its ``/proc`` link), or None if unreadable."""
    try:
        return os.readlink(f"/proc/{pid}/ns/user")
    except OSError:
        return None


def _freeze(root: Process, frozen: Dict[int, Process], may: _May) -> None:
    # A stop is delivered asynchronously: a process may finish a fork after SIGSTOP was
    # sent. So each walk is followed by a wait until every frozen process, and the root,
    # is seen stopped (the root's own signal is then pending before it can run again),
    # and only a walk that finds nobody new after that wait ends the freeze. A
    # process that does not stop (in uninterruptible sleep, D) is waited for once, within
    # one overall bound (short: see _FREEZE_WAIT).
    waited_until = time.monotonic() + _FREEZE_WAIT
    for _ in range(_MAX_PASSES):
        found = _walk(root, frozen, may)
        # The root too, unless in uninterruptible sleep: it forks nothing there, and its
        # signal is pending before it runs again; its wait would hold every such reap.
        waiting = dict(frozen)
        if not _uninterruptible(root):
            waiting[root.pid] = root
        _wait_stopped(waiting, waited_until)
        if not found or len(frozen) >= _MAX_TREE:
            return


def _walk(root: Process, frozen: Dict[int, Process], may: _May) -> bool:
    """One walk of the tree, parents before children, freezing whoever is new and ``may``
    be signalled."""
    found = False
    queue = [root]
    while queue and len(frozen) < _MAX_TREE:
        parent = queue.pop(0)
        try:
            kids = children(parent.pid)
        except (OSError, ValueError):
            continue
        for kid in kids:
            if kid <= 1 or kid == root.pid or kid in may.spared:
                continue
            process = frozen.get(kid)
            if process is not None and not process.alive():
                # Exited since it was frozen: its pid may be a new child's now.
                del frozen[kid]
                process.close()
                process = None
            if process is None:
                process = _pin(kid, parent, may)
                if process is None:
                    continue
                try:
                    process.send(_signal.SIGSTOP)
                except OSError:
                    process.close()
                    continue
                frozen[kid] = process
                found = True
            queue.append(process)
    return found


def _pin(pid: int, parent: Process, may: _May) -> Optional[Process]:
    try:
        process = Process.open(pid, None, None)
    except ProcessRefused:
        return None
    try:
        # Pinned first, then checked: still the child it was found as (not a new process
        # that took the pid of one that exited), of the parent it was found under (alive
        # after the check: its pid was not another process's when it was read).
        if (
            read_stat(pid).ppid == parent.pid
            and process.alive()
            and parent.alive()
            and may.signal(pid, parent.pid)
        ):
            return process
    except (OSError, ValueError, IndexError):
        pass
    process.close()
    return None


def _uids(pid: int) -> Tuple[int, int, int]:
    """The real, effective and saved uids of process ``pid``.

    Raises:
        OSError, ValueError, IndexError: it is gone, or its status unreadable.
    """
    real, effective, saved = read_status(pid).get("Uid", "").split()[:3]
    return int(real), int(effective), int(saved)


def _uninterruptible(process: Process) -> bool:
    try:
        return read_stat(process.pid).state == "D"
    except (OSError, ValueError, IndexError):  # gone
        return False


def _wait_stopped(frozen: Dict[int, Process], deadline: float) -> None:
    # No kernel event tells of another process's stop: /proc is looked at until then.
    for pid, process in frozen.items():
        while time.monotonic() < deadline and process.alive():
            try:
                if read_stat(pid).state in "TtZX":
                    break
            except (OSError, ValueError, IndexError):
                break
            time.sleep(0.001)
