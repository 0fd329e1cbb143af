"""The two stack formats a capture reads, turned into ``ThreadStack`` records; no I/O.

``py-spy dump --json`` names each thread by its kernel id, so its threads merge with what
``/proc`` tells of them by tid. Python's ``faulthandler`` names a thread only by its
``pthread_t`` (the address of glibc's thread descriptor, which sits at the top of the
thread's own stack mapping); ``match_faulthandler_threads`` pairs those addresses with
kernel ids through the stack pointer of each blocked thread, so a hook's dump can carry
thread states too wherever that pairing is certain.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import msgspec

from ftimer_server.core._incident import Frame, ThreadStack

from ._procfs import ThreadFacts

__all__ = [
    "FaulthandlerThread",
    "MethodResult",
    "match_faulthandler_threads",
    "merge_threads",
    "parse_faulthandler",
    "parse_py_spy",
]


@dataclass
class MethodResult:
    """What one capture method gave.

    Attributes:
        threads: the stacks; ``None`` if the method failed.
        raw: its output, as it came.
        error: why it failed, for people.
        retryable: it failed for a reason of its own (not ptrace refused, not the
            deadline, not the worker gone): another way of running it may succeed.
    """

    threads: Optional[List[ThreadStack]] = None
    raw: str = ""
    error: Optional[str] = None
    retryable: bool = False


class _PySpyFrame(msgspec.Struct):
    name: str = ""
    filename: str = ""
    short_filename: str = ""
    line: int = 0
    # Set for native frames (the shared object they come from), null for Python ones.
    module: Optional[str] = None


class _PySpyThread(msgspec.Struct):
    os_thread_id: Optional[int] = None
    thread_id: Optional[int] = None
    thread_name: Optional[str] = None
    active: Optional[bool] = None
    owns_gil: Optional[bool] = None
    frames: List[_PySpyFrame] = []


_PY_SPY = msgspec.json.Decoder(List[_PySpyThread])


def parse_py_spy(text: str) -> List[ThreadStack]:
    """Parse the output of ``py-spy dump --json`` (with or without ``--native``).

    Frames stay innermost first, as py-spy gives them; a native frame is one py-spy names
    a module (shared object) for.

    Raises:
        ValueError: it is not py-spy's JSON.
    """
    try:
        threads = _PY_SPY.decode(text.encode())
    except msgspec.MsgspecError as e:
        raise ValueError(f"py-spy's output is not the JSON expected: {e}") from None
    return [
        ThreadStack(
            tid=t.os_thread_id or 0,
            name=t.thread_name or (f"{t.thread_id:#x}" if t.thread_id else ""),
            frames=[
                Frame(
                    function=f.name,
                    file=f.filename or f.short_filename,
                    line=max(0, f.line),
                    native=f.module is not None,
                )
                for f in t.frames
            ],
            active=t.active,
            gil=t.owns_gil,
        )
        for t in threads
    ]


class FaulthandlerThread(msgspec.Struct, frozen=True):
    """One thread of a faulthandler dump.

    Attributes:
        ident: its ``pthread_t`` as faulthandler prints it ("0x00007f...").
        current: the thread that ran the signal handler ("Current thread").
        frames: innermost first.
        truncated: faulthandler left frames out ("...").
    """

    ident: str
    current: bool = False
    frames: List[Frame] = []
    truncated: bool = False


_HEADER = re.compile(
    r"^(?P<current>Current thread|Thread) (?P<ident>0x[0-9a-fA-F]+)\b.*"
    r"\(most recent call first\):\s*$"
)
_STACK = re.compile(r"^Stack \(most recent call first\):\s*$")
_FRAME = re.compile(r'^\s+File "(?P<file>.*)", line (?P<line>\d+|\?+) in (?P<function>.*?)\s*$')


def parse_faulthandler(text: str) -> List[FaulthandlerThread]:
    """Parse faulthandler's text: thread headers ("Thread 0x... (most recent call
    first):", "Current thread 0x...", or "Stack ..." for a single thread), each followed
    by ``  File "x.py", line N in func`` lines. Lines it does not know are skipped, so a
    dump cut short still yields what was written.
    """
    threads: List[FaulthandlerThread] = []
    ident: Optional[str] = None
    current = truncated = False
    frames: List[Frame] = []

    def close() -> None:
        if ident is not None:
            threads.append(FaulthandlerThread(ident, current, frames, truncated))

    for line in text.splitlines():
        header = _HEADER.match(line)
        if header or _STACK.match(line):
            close()
            ident = header.group("ident") if header else "0x0"
            current = bool(header and header.group("current") == "Current thread")
            truncated = False
            frames = []
            continue
        if ident is None:
            continue
        frame = _FRAME.match(line)
        if frame:
            number = frame.group("line")
            frames.append(
                Frame(
                    function=frame.group("function"),
                    file=frame.group("file"),
                    line=int(number) if number.isdigit() else 0,
                )
            )
        elif line.strip() == "...":
            truncated = True
    close()
    return threads


def match_faulthandler_threads(
    idents: Sequence[str],
    threads: Sequence[ThreadFacts],
    mappings: Sequence[Tuple[int, int]],
    main: int,
) -> Dict[str, int]:
    """Pair faulthandler's thread idents with kernel thread ids, where it is certain.

    A thread created by glibc has its descriptor (its ``pthread_t``) in the same mapping
    as its stack, so a thread blocked in a system call (whose stack pointer
    ``/proc/PID/task/TID/syscall`` tells) pairs with the ident in its stack's mapping.
    The main thread's descriptor lives elsewhere: it takes the one ident left over when
    every other ident has been paired.

    Args:
        idents: faulthandler's idents ("0x00007f...").
        threads: the threads of the process, with their stack pointers where read.
        mappings: the process's writable anonymous mappings (start, end).
        main: the main thread's id (the pid).

    Returns:
        ident -> tid for each pairing that is certain (one ident and one thread in the
        same mapping).
    """

    def span(address: int) -> Optional[Tuple[int, int]]:
        for start, end in mappings:
            if start <= address < end:
                return (start, end)
        return None

    by_span_idents: Dict[Tuple[int, int], List[str]] = {}
    for ident in idents:
        s = span(int(ident, 16))
        if s is not None:
            by_span_idents.setdefault(s, []).append(ident)
    by_span_tids: Dict[Tuple[int, int], List[int]] = {}
    for t in threads:
        if t.sp is not None and t.tid != main:
            s = span(t.sp)
            if s is not None:
                by_span_tids.setdefault(s, []).append(t.tid)
    pairs: Dict[str, int] = {}
    for s, tids in by_span_tids.items():
        found = by_span_idents.get(s, [])
        if len(found) == 1 and len(tids) == 1:
            pairs[found[0]] = tids[0]
    left = [i for i in idents if i not in pairs]
    if len(left) == 1 and len(idents) > 0 and any(t.tid == main for t in threads):
        # Every other thread was paired by its stack: the one left is the main thread,
        # unless it sits in a thread stack that we could not pair (a running thread).
        s = span(int(left[0], 16))
        if s is None or s not in by_span_tids:
            unpaired_running = [t for t in threads if t.tid != main and t.sp is None]
            if not unpaired_running or len(idents) == 1:
                pairs[left[0]] = main
    return pairs


def merge_threads(stacks: Sequence[ThreadStack], facts: Sequence[ThreadFacts]) -> List[ThreadStack]:
    """Merge stacks with ``/proc``'s view of the threads by tid: each stack gets its
    thread's state, wchan and kernel stack; threads without a stack (not running Python,
    or not paired) follow, by tid, with their kernel name and no frames.
    """
    by_tid = {t.tid: t for t in facts}
    merged: List[ThreadStack] = []
    used = set()
    for stack in stacks:
        t = by_tid.get(stack.tid) if stack.tid else None
        if t is None:
            merged.append(stack)
            continue
        used.add(t.tid)
        merged.append(
            msgspec.structs.replace(
                stack,
                name=stack.name or t.comm,
                state=t.state or None,
                wchan=t.wchan,
                kernel_stack=t.kernel_stack,
            )
        )
    merged.extend(
        ThreadStack(
            tid=t.tid,
            name=t.comm,
            state=t.state or None,
            wchan=t.wchan,
            kernel_stack=t.kernel_stack,
        )
        for t in facts
        if t.tid not in used
    )
    return merged
