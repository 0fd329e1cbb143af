"""The two stack formats a capture reads, turned into ``ThreadStack`` records; no I/O.

``py-spy dump --json`` names each thread by its kernel id, so its threads merge with what
``/proc`` tells of them by tid, except a worker's on Python before 3.11 read without
stopping it (a peer's). Python's ``faulthandler``, and py-spy then, name a thread only by
its ``pthread_t`` (the address of glibc's thread descriptor, which sits at the top of the
thread's own stack mapping); ``match_thread_idents`` pairs those addresses with kernel ids
through the stack pointer of each blocked thread, so such a dump can carry thread states
too wherever that pairing is certain.
"""

from __future__ import annotations

import bisect
import re
import threading
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import msgspec

from ftimer_server.core._incident import Frame, ThreadStack

from ._procfs import ThreadFacts

__all__ = [
    "MAX_CAPTURE_TEXT",
    "MAX_FRAMES",
    "MAX_RAW",
    "MAX_TEXT",
    "MAX_THREADS",
    "FaulthandlerThread",
    "MethodResult",
    "bound_threads",
    "excerpt",
    "match_thread_idents",
    "merge_threads",
    "parse_faulthandler",
    "parse_py_spy",
    "salvage_py_spy",
]

# What one capture may hold, whatever the worker makes of its stacks (threads by the
# thousand, recursion by the ten thousand, names of megabytes): eight of them, a host's
# ranks, go through the helper and the server at once and into one incident, and the
# DaemonSet of docs/deploy.md gives the two processes 256 MiB together.

#: Threads kept per capture (the main thread and those running first): a PyTorch rank has
#: a few dozen, OpenMP and NCCL add some more; beyond this they are counted, not shown.
MAX_THREADS = 256
#: Frames kept per thread, the innermost (where it waits): a stack deeper than this is a
#: recursion whose repeated frames say nothing more. faulthandler itself stops at 100.
MAX_FRAMES = 200
#: Characters kept of a function or file name, a thread's name, a wait channel, a
#: kernel stack line or an argument of the command line: real ones are well under this.
MAX_TEXT = 256
#: Characters of names (functions and files) a capture's stacks may hold in all: about
#: 4,000 frames of real names, ~2 MiB of incident per capture at most, JSON and text.
MAX_CAPTURE_TEXT = 512 << 10
#: Characters kept of a method's own output (``raw``): its start, for when parsing it
#: failed; the stacks themselves are in ``threads``.
MAX_RAW = 64 << 10
#: Arguments of the command line kept.
MAX_ARGS = 256
#: A frame's cost besides its names, in ``MAX_CAPTURE_TEXT``'s characters (line,
#: native, the JSON and text around it).
_FRAME_COST = 32
#: Parsing py-spy's output or a dump hook's takes a few times its size for a moment: at
#: most this many captures parse at once, whatever the number capturing.
parsing = threading.BoundedSemaphore(2)


@dataclass
class MethodResult:
    """What one capture method gave.

    Attributes:
        threads: the stacks; ``None`` if the method failed.
        raw: the start of its output, as it came (``MAX_RAW``).
        error: why it failed, for people.
        retryable: it failed for a reason of its own (not ptrace refused, not the
            deadline, not the worker gone): another way of running it may succeed.
        notes: what was left out of its output, for people.
        idents: for each of ``threads`` whose kernel id the method could not tell (tid
            0), its ``pthread_t`` in hex, as faulthandler writes it ("" for the others):
            the capture pairs them with kernel ids (``match_thread_idents``).
    """

    threads: Optional[List[ThreadStack]] = None
    raw: str = ""
    error: Optional[str] = None
    retryable: bool = False
    notes: Optional[List[str]] = None
    idents: Optional[List[str]] = None


def excerpt(data: Union[str, bytes], limit: int = MAX_RAW) -> str:
    """The start of a tool's output as text, at most ``limit`` characters, saying so if
    there was more."""
    more = len(data) - limit
    text = data[:limit] if more > 0 else data
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    return text + f"\n[... {more} more bytes not kept]" if more > 0 else text


def _cut(text: str, limit: int = MAX_TEXT) -> str:
    """``text``, at most ``limit`` characters of it (and "..." if cut)."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


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
#: Where a thread of py-spy's pretty-printed JSON begins, and where it ends (a line of
#: its own at that indent: JSON strings hold no newline).
_THREAD_START = b"\n  {\n"
_THREAD_END = b"\n  }"


def parse_py_spy(text: Union[str, bytes]) -> Tuple[List[ThreadStack], Optional[List[str]]]:
    """Parse the output of ``py-spy dump --json`` (with or without ``--native``).

    Frames stay innermost first, as py-spy gives them; a native frame is one py-spy names
    a module (shared object) for. Each thread keeps its innermost ``MAX_FRAMES`` frames
    (``frames_cut`` counts the rest) and names their first ``MAX_TEXT`` characters.

    Returns:
        The threads, and ``MethodResult.idents`` for them: None when py-spy told every
        thread's kernel id (it cannot without stopping a worker before Python 3.11).

    Raises:
        ValueError: it is not py-spy's JSON.
    """
    return _parse_py_spy([text.encode() if isinstance(text, str) else text])


def salvage_py_spy(head: bytes, tail: bytes) -> Tuple[List[ThreadStack], Optional[List[str]]]:
    """The threads whole in the start (``head``) and the end (``tail``) of py-spy's
    pretty-printed JSON whose middle was not kept (py-spy lists the newest threads first,
    so the end holds the main thread), as ``parse_py_spy`` returns them.

    Raises:
        ValueError: what was kept holds no thread whole, or is not py-spy's JSON.
    """
    parts: List[bytes] = []
    end = head.rfind(_THREAD_END)
    if end >= 0 and head.lstrip().startswith(b"["):
        parts.append(head[: end + len(_THREAD_END)] + b"\n]")
    start = tail.find(_THREAD_START)
    if start >= 0 and tail.rstrip().endswith(b"]"):
        parts.append(b"[" + tail[start:])
    if not parts:
        raise ValueError("py-spy's output was cut and no thread of it was kept whole")
    return _parse_py_spy(parts)


def _parse_py_spy(parts: List[bytes]) -> Tuple[List[ThreadStack], Optional[List[str]]]:
    with parsing:
        try:
            threads = [t for part in parts for t in _PY_SPY.decode(part)]
        except msgspec.MsgspecError as e:
            raise ValueError(f"py-spy's output is not the JSON expected: {e}") from None
        return [_thread(t) for t in threads], _idents(threads)


def _idents(threads: List[_PySpyThread]) -> Optional[List[str]]:
    if all(t.os_thread_id for t in threads):
        return None
    return ["" if t.os_thread_id or not t.thread_id else f"{t.thread_id:#x}" for t in threads]


def _thread(t: _PySpyThread) -> ThreadStack:
    frames = t.frames[:MAX_FRAMES]
    return ThreadStack(
        tid=t.os_thread_id or 0,
        name=_cut(t.thread_name or (f"{t.thread_id:#x}" if t.thread_id else "")),
        frames=[
            Frame(
                function=_cut(f.name),
                file=_cut(f.filename or f.short_filename),
                line=max(0, f.line),
                native=f.module is not None,
            )
            for f in frames
        ],
        active=t.active,
        gil=t.owns_gil,
        frames_cut=len(t.frames) - len(frames),
    )


def bound_threads(
    threads: Sequence[ThreadStack], main: int, total: int = 0
) -> Tuple[List[ThreadStack], int, List[str]]:
    """``threads`` as a capture keeps them: at most ``MAX_THREADS`` threads (the main
    thread ``main`` first, then those with stacks, those running, holding the GIL or in
    uninterruptible sleep first), ``MAX_FRAMES`` frames each, names of ``MAX_TEXT``
    characters, and names of ``MAX_CAPTURE_TEXT`` characters in all (the threads kept
    first get their stacks first); in their order. ``total``: the worker's threads, where
    more than ``threads`` (read in part: ``_procfs.MAX_THREADS``).

    Returns:
        The threads kept, how many were left out, and what was cut, for people.
    """

    def rank(n: int) -> Tuple[bool, bool, bool, int]:
        t = threads[n]
        busy = t.active or t.gil or (t.state or "")[:1] in ("R", "D")
        return (t.tid != main, not t.frames, not busy, n)

    order = sorted(range(len(threads)), key=rank)
    kept = sorted(order[:MAX_THREADS])
    dropped = max(len(threads), total) - len(kept)
    budget = MAX_CAPTURE_TEXT
    bounded: Dict[int, ThreadStack] = {}
    deep = starved = 0
    for n in sorted(kept, key=rank):
        t = threads[n]
        frames: List[Frame] = []
        for f in t.frames[:MAX_FRAMES]:
            frame = Frame(_cut(f.function), _cut(f.file), f.line, f.native)
            cost = len(frame.function) + len(frame.file) + _FRAME_COST
            if cost > budget:
                break
            budget -= cost
            frames.append(frame)
        cut = t.frames_cut + len(t.frames) - len(frames)
        if len(frames) < min(len(t.frames), MAX_FRAMES):
            starved += 1
        elif cut:
            deep += 1
        kernel = t.kernel_stack
        bounded[n] = msgspec.structs.replace(
            t,
            name=_cut(t.name),
            frames=frames,
            wchan=None if t.wchan is None else _cut(t.wchan),
            kernel_stack=None if kernel is None else [_cut(k) for k in kernel[:MAX_FRAMES]],
            frames_cut=cut,
        )
    notes = []
    if dropped:
        notes.append(f"{dropped} threads not shown (a capture keeps {MAX_THREADS})")
    if deep:
        notes.append(f"frames cut to the innermost {MAX_FRAMES} in {deep} threads")
    if starved:
        notes.append(
            f"stacks of {starved} threads cut short or not shown (a capture keeps "
            f"{MAX_CAPTURE_TEXT} characters of names)"
        )
    return [bounded[n] for n in kept], dropped, notes


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
    #: Frames parsed but not kept (beyond the innermost ``MAX_FRAMES``).
    cut: int = 0


_HEADER = re.compile(
    r"^(?P<current>Current thread|Thread) (?P<ident>0x[0-9a-fA-F]+)\b.*"
    r"\(most recent call first\):\s*$"
)
_STACK = re.compile(r"^Stack \(most recent call first\):\s*$")
# Linear, whatever the worker writes: a lazy name before ``\s*$`` backtracked
# quadratically on a name of spaces then a character (a 4 MiB line: hours, in ``re``,
# holding the GIL of the capture helper). The name's trailing spaces are cut after.
_FRAME = re.compile(r'^\s+File "(?P<file>.*)", line (?P<line>\d+|\?+) in (?P<function>.*)$')


def _lines(text: str) -> Iterator[str]:
    """The lines of ``text``, one at a time (``splitlines()`` made a list of them all:
    150,000 strings for a dump of 4 MiB of frames)."""
    start = 0
    while start < len(text):
        end = text.find("\n", start)
        if end < 0:
            end = len(text)
        yield text[start:end].rstrip("\r")
        start = end + 1


def parse_faulthandler(text: str) -> List[FaulthandlerThread]:
    """Parse faulthandler's text: thread headers ("Thread 0x... (most recent call
    first):", "Current thread 0x...", or "Stack ..." for a single thread), each followed
    by ``  File "x.py", line N in func`` lines. Lines it does not know are skipped, so a
    dump cut short still yields what was written.

    Bounded whatever the worker writes into its dump file (``MAX_DUMP`` bytes of it):
    the first ``MAX_THREADS`` threads (faulthandler writes 100 at most), the innermost
    ``MAX_FRAMES`` frames of each (``cut`` counts the rest), lines read one at a time.
    The caller reads and parses a dump under ``parsing`` (two at a time, as py-spy's
    output).
    """
    threads: List[FaulthandlerThread] = []
    ident: Optional[str] = None
    current = truncated = False
    frames: List[Frame] = []
    cut = 0

    def close() -> None:
        if ident is not None:
            threads.append(FaulthandlerThread(ident, current, frames, truncated, cut))

    for line in _lines(text):
        header = _HEADER.match(line)
        if header or _STACK.match(line):
            close()
            if len(threads) >= MAX_THREADS:
                return threads
            ident = header.group("ident") if header else "0x0"
            current = bool(header and header.group("current") == "Current thread")
            truncated = False
            frames = []
            cut = 0
            continue
        if ident is None:
            continue
        frame = _FRAME.match(line)
        if frame and len(frames) >= MAX_FRAMES:
            cut += 1  # the innermost come first: these are the outer ones
        elif frame:
            number = frame.group("line")
            frames.append(
                Frame(
                    function=_cut(frame.group("function").rstrip()),
                    file=_cut(frame.group("file")),
                    # A worker writes what it likes: a number of thousands of digits
                    # raises on Python 3.11+ (its digit limit) and takes quadratic
                    # time before; no real line number has more than a few.
                    line=int(number) if number.isdigit() and len(number) <= 18 else 0,
                )
            )
        elif line == "  ...":  # frames left out (unindented, it is threads: see below)
            truncated = True
    close()
    return threads


def faulthandler_cut_threads(text: str) -> bool:
    """Whether faulthandler left threads out of ``text``: it writes at most 100, the
    newest first, then an unindented "..." line; the oldest, the main thread among them,
    are the ones left out."""
    # Frames left out are "  ...", indented. Not ``text + "\n"``: a copy of 4 MiB.
    return "\n...\n" in text or text.endswith("\n...")


def match_thread_idents(
    idents: Sequence[str],
    threads: Sequence[ThreadFacts],
    mappings: Sequence[Tuple[int, int]],
    main: int,
    complete: bool = True,
    *,
    main_ident: Optional[str] = None,
) -> Dict[str, int]:
    """Pair thread idents (``pthread_t``) with kernel thread ids, where it is certain.

    A thread created by glibc has its descriptor (its ``pthread_t``) in the same mapping
    as its stack, so a thread blocked in a system call (whose stack pointer
    ``/proc/PID/task/TID/syscall`` tells) pairs with the ident in its stack's mapping.
    The main thread's descriptor lives elsewhere: it takes ``main_ident`` where that is
    given, else the one ident left over when every other ident has been paired.

    Args:
        idents: the idents, as faulthandler writes them ("0x00007f...").
        threads: the threads of the process, with their stack pointers where read.
        mappings: the process's writable anonymous mappings (start, end).
        main: the main thread's id (the pid).
        complete: ``idents`` are all the threads Python knows (no dump cut short): only
            then is the one left over the main thread.
        main_ident: the main thread's ident, where known otherwise (by its name, from a
            read that may have missed threads): paired with ``main`` unless it lies in a
            thread's stack.

    Returns:
        ident -> tid for each pairing that is certain (one ident and one thread in the
        same mapping).
    """

    # By bisection: a worker has up to vm.max_map_count (65,530) mappings and thousands
    # of threads, and a scan of every mapping for every thread took seconds past the
    # capture's deadline. Mappings (``/proc/PID/maps``) do not overlap.
    ordered = sorted(mappings)
    starts = [start for start, _ in ordered]

    def span(address: int) -> Optional[Tuple[int, int]]:
        i = bisect.bisect_right(starts, address) - 1
        if i >= 0 and address < ordered[i][1]:
            return ordered[i]
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
    main_alive = any(t.tid == main for t in threads)
    if main_ident is not None and main_ident not in pairs and main_alive:
        s = span(int(main_ident, 16))
        if s is None or s not in by_span_tids:
            pairs[main_ident] = main
        return pairs
    left = [i for i in idents if i not in pairs]
    if complete and len(left) == 1 and main_alive:
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
