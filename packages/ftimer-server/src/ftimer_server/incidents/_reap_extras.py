"""What a reap may do beyond its signal, each off by default: a core dump of the worker
(``gcore``: it survives the dump, then is reaped), and the signal for its descendants
(DataLoader and compile workers that would otherwise keep GPU memory).

The descendants are signalled race-free against forks: each is pinned by a pidfd (a pid
reused meanwhile is never signalled) and frozen with SIGSTOP, top-down, and the walk is
repeated until it finds no new child (a frozen process forks no more); only then does
the signal go, to every frozen process, followed by SIGCONT (a stopped process acts on
SIGTERM only once continued). Nothing here signals a pid <= 1 or a thread.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal as _signal
import time
from typing import Dict, List, Optional, Tuple

from ._pinned import Process, ProcessRefused
from ._procfs import PAGE_SIZE, children, read_stat
from ._tools import run_tool

__all__ = ["core_dump", "signal_tree"]

logger = logging.getLogger("ftimer_server")

#: Bounds of the walk of a process tree: passes, processes, and how long the freeze may
#: take to be seen (a stop is delivered asynchronously).
_MAX_PASSES = 64
_MAX_TREE = 10000
_FREEZE_WAIT = 2.0


def core_dump(
    pid: int, pidfd: Optional[int], directory: str, *, max_bytes: int, deadline: float
) -> Tuple[Optional[str], Optional[str]]:
    """Dump the core of process ``pid`` with ``gcore`` into ``directory`` (created 0700 if
    missing) as ``core.<UTC time>.<pid>``; the process goes on running (it is sent
    SIGCONT after, in case the dump left it stopped). Never raises.

    Args:
        pid, pidfd: the process, and a pidfd for it if the caller holds one.
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
        process = Process.open(pid, None, pidfd)
    except ProcessRefused as e:
        return None, f"core dump: {e}"
    try:
        return _core_dump(process, directory, max_bytes, deadline)
    except OSError as e:
        return None, f"core dump: {e}"
    finally:
        process.close()


def _core_dump(
    process: Process, directory: str, max_bytes: int, deadline: float
) -> Tuple[Optional[str], Optional[str]]:
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
    now = time.time()
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now)) + f".{int(now % 1 * 1000):03d}Z"
    prefix = os.path.join(directory, f"core.{stamp}")
    path = f"{prefix}.{process.pid}"  # gcore appends the pid
    if deadline <= time.monotonic():
        return None, "core dump: no time left before the deadline"
    try:
        run = run_tool(
            [gcore, "-o", prefix, str(process.pid)],
            process,
            deadline,
            resume=st.state not in ("T", "t"),  # left stopped if it was found so
            # The resident memory checked above is not the core's size: gdb writes every
            # writable mapping, untouched pages too (a worker's mmap of a terabyte with
            # MAP_NORESERVE is a terabyte of core). Capped here, whatever the worker maps.
            max_file_bytes=max_bytes,
        )
    except OSError as e:
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
    if run.returncode != 0 or not os.path.isfile(path):
        _remove(path)
        text = " ".join((run.out + run.err).decode(errors="replace").split())[-400:]
        if "not permitted" in text.lower():
            text = f"ptrace not permitted (root or CAP_SYS_PTRACE needed): {text}"
        return None, f"core dump: gcore failed (exit {run.returncode}): {text}"
    return path, None


def _remove(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


def signal_tree(pid: int, signal: int) -> List[int]:
    """Signal every descendant of process ``pid`` (not ``pid`` itself), race-free
    against forks; never raises.

    Each descendant is pinned (pidfd, else start time), checked to be a process (not a
    thread) and still the child of the parent it was found under, then frozen with
    SIGSTOP, top-down; the walk of ``/proc/*/task/*/children`` is repeated until it finds
    nobody new. Then ``signal`` goes to each, and unless it was SIGKILL, SIGCONT to those
    still alive. A descendant whose parent dies during the walk is re-parented away from
    the tree and escapes it; so does a child ``pid`` itself forks after the last walk
    (``pid`` is never stopped here). Signal 0 (report only) touches nobody.

    Returns:
        The pids ``signal`` was delivered to.
    """
    if pid <= 1 or signal == 0:
        return []
    frozen: Dict[int, Process] = {}
    signalled: List[int] = []
    try:
        _freeze(pid, frozen)
        for child, process in frozen.items():
            try:
                process.send(signal)
                signalled.append(child)
            except OSError:
                continue  # exited meanwhile
        if signal != _signal.SIGKILL:
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
    return signalled


def _freeze(root: int, frozen: Dict[int, Process]) -> None:
    # A stop is delivered asynchronously: a process may finish a fork after SIGSTOP was
    # sent. So each walk is followed by a wait until every frozen process is seen
    # stopped, and only a walk that finds nobody new after that wait ends the freeze. A
    # process that does not stop (in uninterruptible sleep, D) is waited for once, within
    # one overall bound.
    waited_until = time.monotonic() + _FREEZE_WAIT
    for _ in range(_MAX_PASSES):
        found = _walk(root, frozen)
        _wait_stopped(frozen, waited_until)
        if not found or len(frozen) >= _MAX_TREE:
            return


def _walk(root: int, frozen: Dict[int, Process]) -> bool:
    """One walk of the tree, parents before children, freezing whoever is new."""
    found = False
    queue = [root]
    while queue and len(frozen) < _MAX_TREE:
        parent = queue.pop(0)
        try:
            kids = children(parent)
        except (OSError, ValueError):
            continue
        for kid in kids:
            if kid <= 1 or kid == root:
                continue
            if kid not in frozen:
                process = _pin(kid, parent)
                if process is None:
                    continue
                try:
                    process.send(_signal.SIGSTOP)
                except OSError:
                    process.close()
                    continue
                frozen[kid] = process
                found = True
            queue.append(kid)
    return found


def _pin(pid: int, parent: int) -> Optional[Process]:
    try:
        process = Process.open(pid, None, None)
    except ProcessRefused:
        return None
    try:
        # Pinned first, then checked: still the child it was found as (not a new process
        # that took the pid of one that exited).
        if read_stat(pid).ppid == parent and process.alive():
            return process
    except (OSError, ValueError, IndexError):
        pass
    process.close()
    return None


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
