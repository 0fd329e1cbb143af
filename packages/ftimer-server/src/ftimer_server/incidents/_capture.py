"""Capturing one worker before its reap: its stacks by the best method available, and
what ``/proc`` tells of it.

Methods, best first: ``py-spy dump`` (needs ptrace rights; killed at the deadline, the
worker resumed after: ``_tools``); the worker's own dump hook (``faulthandler`` on a
signal it announced: ``_dump_hook``); else the ``/proc`` facts alone. The facts are read
first, before anything stops the worker, so thread states are the worker's own, never
py-spy's tracing stop.

Only the worker itself is ever signalled (its hook signal, never in a dry run; SIGCONT),
only while it is the process the caller named (``_pinned``), never a thread.
``capture()`` never raises and returns by its deadline: each step that could block
(py-spy, the hook's wait, a ``/proc`` read under the worker's memory lock) is bounded by
it.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import msgspec

from ftimer_protocol import DumpHook
from ftimer_server.core._incident import Capture, ProcessFacts, ThreadStack

from ._dump_hook import HookFile, prepare_hook, run_hook
from ._pinned import Process, ProcessRefused
from ._procfs import (
    MAX_THREADS,
    SLOW_FACTS_WAIT,
    ThreadFacts,
    bounded,
    cannot_stop,
    live_thread,
    namespace_tids,
    read_facts,
    read_threads,
    thread_stack_mappings,
    tracer_name,
    tracer_pid,
    unstoppable,
)
from ._stack_formats import (
    MAX_ARGS,
    MAX_TEXT,
    MethodResult,
    bound_threads,
    excerpt,
    match_thread_idents,
    merge_threads,
)
from ._tools import py_spy_dump

__all__ = ["CaptureOptions", "capture", "find_py_spy"]

logger = logging.getLogger("ftimer_server")

#: What a capture keeps back from its deadline for its last steps (SIGCONT, the exit
#: check): each method ends this long before it.
_RESERVE = 0.05
#: The hook's share of what is left when py-spy is tried first: a py-spy that hangs
#: still leaves the hook time to answer.
_HOOK_SHARE = 0.4
_HOOK_SHARE_MAX = 0.5


@dataclass(frozen=True)
class CaptureOptions:
    """How workers are captured.

    Attributes:
        py_spy: the path of py-spy; ``None``: do not use it (pass ``find_py_spy()``).
        wants_py_spy: the capture method asks for py-spy, so a ``py_spy`` of ``None``
            means it is not installed (said so in the capture's error).
        native: ``py-spy --native``: C/C++ frames too (about 4x slower).
        hook: use the worker's dump hook where py-spy is not used or fails.
        dry_run: the server signals nothing: the hook is not used (its signal would
            interrupt the worker's system calls), and the capture says so.
    """

    py_spy: Optional[str] = None
    wants_py_spy: bool = False
    native: bool = False
    hook: bool = True
    dry_run: bool = False


def find_py_spy() -> Optional[str]:
    """py-spy on PATH, else beside the server's own interpreter (the ``pyspy`` extra
    installs it into the same environment, whose ``bin`` a systemd unit's PATH does not
    include); ``None`` if neither has it."""
    found = shutil.which("py-spy")
    if found:
        return found
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.is_file() and os.access(beside, os.X_OK) else None


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
        pid, start_time, pidfd: the worker: its start time (clock ticks since boot) if
            known, a pidfd for it if the caller holds one (never closed here); with
            neither, whatever process holds ``pid`` now is pinned for the capture.
        role: "stuck" or "peer", recorded.
        labels: its timer's labels, recorded.
        hook: the dump hook the worker announced, if any.
        options: which methods to use.
        deadline: when the capture must be over.

    Returns:
        The capture: ``method`` names the method that gave the stacks ("facts": the facts
        alone), ``error`` why a better one failed or was not used, ``exited`` whether the
        worker was gone by the end (or before the start: then nothing else is filled).
    """
    started = time.monotonic()
    base = Capture(pid=pid, start_time=start_time, role=role, labels=labels)
    try:
        result = _capture(base, pidfd, hook, options, deadline)
    except Exception as e:  # a bug here must never cost the reap that follows
        logger.exception("capturing process %d failed", pid)
        result = msgspec.structs.replace(base, error=f"capture failed: {type(e).__name__}: {e}")
    return msgspec.structs.replace(result, seconds=round(time.monotonic() - started, 4))


def _capture(
    base: Capture,
    pidfd: Optional[int],
    hook: Optional[DumpHook],
    options: CaptureOptions,
    deadline: float,
) -> Capture:
    """``capture()``'s work: pin the worker, read its facts, then its stacks by py-spy,
    else by its dump hook.

    Returns:
        ``base`` filled in. What went wrong that is foreseen (the worker refused or gone,
        a method failed or not used) is in its ``error``, never raised; a bug raises,
        for ``capture()`` to report.
    """
    pid = base.pid
    try:
        process = Process.open(pid, base.start_time, pidfd)
    except ProcessRefused as e:
        return msgspec.structs.replace(base, exited=e.gone, error=str(e))
    hook_file: Optional[HookFile] = None
    try:
        use_hook = options.hook and not options.dry_run and hook is not None
        facts, notes = read_facts(pid, deadline - _RESERVE)
        # Its share of the budget, as the facts' slow reads: the stacks keep the rest.
        until = min(deadline - _RESERVE, time.monotonic() + SLOW_FACTS_WAIT)
        try:
            threads = read_threads(
                pid,
                kernel_stacks=True,
                masks=use_hook,
                stack_pointers=use_hook,
                deadline=until,
            )
        except OSError as e:
            threads = []
            notes.append(f"threads unreadable: {e}")
        if time.monotonic() >= until and len(threads) < min(facts.threads, MAX_THREADS):
            notes.append(
                f"the /proc facts of {len(threads)} of its {facts.threads} threads read by "
                "the deadline"
            )
        # Stopped before we came (job control, a debugger): left as it was found.
        was_stopped = facts.state in ("T", "t")
        # Traced by a debugger: not ours to stop or resume (py-spy could not attach anyway).
        tracer = tracer_pid(pid)
        # Its main thread has exited and other threads live: py-spy reads it through one.
        through = live_thread(pid) if facts.state in ("Z", "X") else None
        if through is not None:
            notes.append(f"its main thread has exited; thread {through} and others live")
        hook_file, hook_why = _plan_hook(
            process, hook, threads, deadline, role=base.role, options=options
        )
        result, py_spy_why = _try_py_spy(
            process,
            threads,
            notes,
            deadline,
            role=base.role,
            options=options,
            hook_after=hook_file is not None,
            was_stopped=was_stopped,
            tracer=tracer,
            through=through,
        )
        method = "py-spy" if result.threads is not None else "facts"
        if result.threads is None and hook_file is not None:
            by_hook = _try_hook(process, hook_file, threads, deadline)
            if by_hook is not None and by_hook.threads is not None:
                method, result = "hook", by_hook
            elif by_hook is not None:
                hook_why = by_hook.error
                result.raw = result.raw or by_hook.raw
        return _assemble(
            base,
            process,
            result,
            method=method,
            facts=facts,
            threads=threads,
            notes=notes,
            options=options,
            deadline=deadline,
            py_spy_why=py_spy_why,
            hook_why=hook_why,
        )
    finally:
        if hook_file is not None:
            hook_file.close()
        process.close()


#: Why a peer's capture has no hook's stacks (a stuck worker's may be a peer's, shared).
PEER_HOOK = (
    "dump hook: not used on a peer (it is not reaped: the hook's signal would interrupt "
    "its system calls)"
)


def _plan_hook(
    process: Process,
    hook: Optional[DumpHook],
    threads: List[ThreadFacts],
    deadline: float,
    *,
    role: str,
    options: CaptureOptions,
) -> Tuple[Optional[HookFile], Optional[str]]:
    """Whether the worker's dump hook is to be tried (``prepare_hook``), for a worker of
    ``role`` whose ``threads`` were read.

    Returns:
        The hook's file, checked (the caller closes it), and ``None``; or ``None`` and
        why the hook is not used (for people).
    """
    if not options.hook:
        return None, "dump hook: not enabled"
    if hook is None and role == "peer":
        # Every rank may announce one: a peer's is not used, not missing.
        return None, PEER_HOOK
    if hook is None:
        return None, "dump hook: the worker announced none (ftimer-client's dump hook option)"
    if options.dry_run:
        # A worker a dry run leaves running would carry on with a C call cut short.
        return None, (
            "dump hook: not used in a dry run (its signal would interrupt the worker's "
            "system calls)"
        )
    if time.monotonic() >= deadline - _RESERVE:
        return None, "dump hook: no time left before the deadline"
    plan = prepare_hook(process, hook, threads, deadline - _RESERVE)
    if isinstance(plan, str):
        return None, plan
    return plan, None


def _try_py_spy(
    process: Process,
    threads: List[ThreadFacts],
    notes: List[str],
    deadline: float,
    *,
    role: str,
    options: CaptureOptions,
    hook_after: bool,
    was_stopped: bool,
    tracer: int,
    through: Optional[int],
) -> Tuple[MethodResult, Optional[str]]:
    """``py-spy dump`` of the worker if it is installed and enabled and no debugger traces
    the worker (pid ``tracer``), retried without ``--native`` if that failed for py-spy's
    own reasons; a retry that gives the stacks is noted at the head of ``notes``.

    Args:
        hook_after: the dump hook is to be tried if py-spy fails: py-spy ends early enough
            to leave it its share of the time (``_HOOK_SHARE``).
        was_stopped: the worker was stopped before the capture: py-spy leaves it so.
        through: a live thread to read the worker through, its main thread having
            exited.

    Returns:
        What py-spy gave (empty if it was not run), and why it gave no stacks or was not
        run (``None`` if it gave them).
    """
    if options.py_spy and tracer:
        return MethodResult(), (
            f"py-spy: not used: process {process.pid} is already traced by "
            f"{tracer_name(tracer)}, a debugger, which is left undisturbed"
        )
    if not options.py_spy:
        return MethodResult(), (
            "py-spy: not installed (ftimer-server[pyspy])"
            if options.wants_py_spy
            else "py-spy: not enabled"
        )
    left = deadline - time.monotonic()
    share = min(_HOOK_SHARE_MAX, _HOOK_SHARE * left) if hook_after else 0.0
    # A peer is read without being stopped: it is healthy, its own timers run on
    # meanwhile, and a pause as long as a large worker's dump (seconds) got a
    # peer reaped for the server's own doing. So is a worker with a thread in
    # uninterruptible sleep, which cannot be stopped until it leaves the kernel:
    # stopping it spent the whole budget for no stack (read so, 14 ms). Native
    # frames cannot be read so (py-spy refuses --native with --nonblocking).
    # And a worker stopped already (T state: SIGSTOP, Ctrl-Z), which py-spy's own stop
    # fails on ("Failed to suspend process"), and which needs none.
    uninterruptible = unstoppable(threads)
    nonblocking = role == "peer" or bool(uninterruptible) or was_stopped
    native = options.native and not nonblocking
    if role != "peer" and (uninterruptible or was_stopped):
        why = (
            "it is stopped (T state), and py-spy cannot stop it again; no native frames"
            if was_stopped
            else f"{cannot_stop(uninterruptible)}; no native frames, and a thread that ran "
            "meanwhile may show a torn stack"
        )
        notes.append(f"read without stopping it: {why}")
    spy = functools.partial(
        py_spy_dump,
        options.py_spy,
        process,
        deadline - share - _RESERVE,
        resume=not was_stopped,
        thread=through,
        nonblocking=nonblocking,
    )
    result = spy(native=native)
    if result.threads is None and native and result.retryable:
        # --native unwinds C stacks, which fails where py-spy cannot read them
        # (some builds, some architectures): the Python frames are still worth it.
        failed = result.error
        result = spy(native=False)
        if result.threads is not None:
            notes.insert(0, f"{failed}; without --native: Python frames only")
    return _in_our_namespace(process.pid, result, deadline), result.error


def _in_our_namespace(pid: int, result: MethodResult, deadline: float) -> MethodResult:
    """``result`` with py-spy's thread ids, the worker's own, made ours: a worker in a
    PID namespace of its own (a container without ``hostPID``) calls its main thread 1,
    which /proc here calls by its pid, and its stacks would pair with no thread. An id
    not mapped by the deadline is 0, unknown, never another thread's."""
    if not result.threads:
        return result
    mapping = namespace_tids(pid, deadline - _RESERVE)
    if mapping is not None:
        result.threads = [
            msgspec.structs.replace(t, tid=mapping.get(t.tid, 0)) for t in result.threads
        ]
    return result


def _try_hook(
    process: Process, hook_file: HookFile, threads: List[ThreadFacts], deadline: float
) -> Optional[MethodResult]:
    """The worker's stacks by its dump hook (``run_hook``, which closes ``hook_file``).

    Returns:
        What the hook gave; ``None`` if it was not tried: no time left before
        ``deadline`` or the worker gone.
    """
    if time.monotonic() >= deadline - _RESERVE or not process.alive():
        return None
    return run_hook(process, hook_file, threads, deadline - _RESERVE)


def _assemble(
    base: Capture,
    process: Process,
    result: MethodResult,
    *,
    method: str,
    facts: ProcessFacts,
    threads: List[ThreadFacts],
    notes: List[str],
    options: CaptureOptions,
    deadline: float,
    py_spy_why: Optional[str],
    hook_why: Optional[str],
) -> Capture:
    """``base`` filled in from what the capture found: the stacks ``method`` gave
    (``result``) merged with the ``/proc`` ``threads`` and bounded, ``facts``, and
    whether the worker has exited by now.

    Returns:
        The capture; its ``error`` says why the methods better than ``method`` failed
        (``py_spy_why``, ``hook_why``), that the worker exited, and ``notes``.
    """
    pid = base.pid
    stacks = result.threads or []
    if result.idents:
        stacks = _paired(pid, stacks, result, threads, deadline - _RESERVE)
    exited = not process.alive()
    notes += result.notes or []
    # Bounded whatever the worker makes of its stacks: the capture goes to the
    # server and into an incident with its peers' (``bound_threads``).
    kept, threads_cut, cut = bound_threads(merge_threads(stacks, threads), pid, facts.threads)
    notes += cut
    errors: List[str] = []
    if method == "hook" and options.py_spy and py_spy_why:
        errors.append(py_spy_why)  # why the better method failed
    elif method == "facts":
        errors.append("no stacks: " + "; ".join(w for w in (py_spy_why, hook_why) if w))
    if exited:
        errors.insert(0, "the worker exited during the capture")
    return msgspec.structs.replace(
        base,
        start_time=process.start_time,
        method=method,
        exited=exited,
        error="; ".join(errors + notes) or None,
        facts=_bound_facts(facts),
        threads=kept,
        threads_cut=threads_cut,
        raw=excerpt(result.raw),
    )


def _paired(
    pid: int,
    stacks: List[ThreadStack],
    result: MethodResult,
    before: List[ThreadFacts],
    deadline: float,
) -> List[ThreadStack]:
    """``stacks`` with the kernel ids of those named by ``pthread_t`` alone (py-spy's of a
    peer on Python before 3.11, read without stopping it), where the pairing is certain
    (``match_thread_idents``); the others keep tid 0. Only a thread that lived from
    before the read (``before``) to after it is paired: glibc gives a new thread the
    stack, and so the ``pthread_t``, of one that ended. The main thread, whose
    ``pthread_t`` is in no thread's stack, is known by its name: a read that does not
    stop the peer can miss a thread and not know it, so the one ``pthread_t`` left over
    is not the main thread's for that."""
    assert result.idents is not None
    lived = {t.tid for t in before}
    if time.monotonic() >= deadline:
        return stacks
    try:
        # Bounded: a worker in uninterruptible sleep holding its memory lock blocks both.
        _, now = bounded(
            lambda: read_threads(pid, kernel_stacks=False, stack_pointers=True), deadline
        )
        _, mapped = bounded(lambda: thread_stack_mappings(pid), deadline)
    except OSError:
        return stacks
    threads = [t for t in now or [] if t.tid in lived]
    idents = [i for i in result.idents if i]
    named = [i for s, i in zip(stacks, result.idents) if s.name == "MainThread" and i]
    main = named[0] if len(named) == 1 else None
    pairs = match_thread_idents(idents, threads, mapped or [], pid, complete=False, main_ident=main)
    return [
        msgspec.structs.replace(s, tid=pairs.get(i, 0)) if i else s
        for s, i in zip(stacks, result.idents)
    ]


def _bound_facts(facts: ProcessFacts) -> ProcessFacts:
    """``facts`` with a command line of at most ``MAX_ARGS`` arguments of ``MAX_TEXT``
    characters (a worker's is as long as it likes: megabytes)."""
    args = facts.cmdline[:MAX_ARGS]
    cmdline = [a if len(a) <= MAX_TEXT else a[: MAX_TEXT - 3] + "..." for a in args]
    if len(facts.cmdline) > MAX_ARGS:
        cmdline.append(f"[... {len(facts.cmdline) - MAX_ARGS} more arguments]")
    if cmdline == facts.cmdline:
        return facts
    return msgspec.structs.replace(facts, cmdline=cmdline)
