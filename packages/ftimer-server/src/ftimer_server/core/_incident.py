"""The incident record: why a worker hung, captured before it was reaped.

One incident per reap (of a worker whose server captures diagnostics): the expired timer,
what was captured of the stuck worker and of its peers (the other workers of the same job
on the host), the stacks grouped so that the outlier stands out, and a summary a person
reads first. A versioned msgspec schema: the daemon writes it as JSON, ``ftimer-server
incidents`` reads it back, and third parties may too. Evolution follows the protocol's
rules: new members get defaults, nothing is ever renamed or retyped; a breaking change is
a new ``version``.
"""

from __future__ import annotations

from typing import Annotated, Dict, List, Optional

import msgspec

__all__ = [
    "INCIDENT_VERSION",
    "Capture",
    "ChildState",
    "Frame",
    "Group",
    "Incident",
    "ProcessFacts",
    "ThreadStack",
]

INCIDENT_VERSION = 1
#: A record's wall-clock time, bounded so that every record read can be shown as a date
#: (a year past 9999 cannot be).
Created = Annotated[float, msgspec.Meta(ge=0, le=1e11)]


class Frame(msgspec.Struct, frozen=True, gc=False, omit_defaults=True):
    """One frame of a stack.

    Attributes:
        function: the function (``Thread.run``, ``all_reduce``, ``clock_nanosleep``).
        file: its file, as the capture gave it (``train.py``, ``/usr/lib/...``); "" for a
            native frame without one.
        line: the line, 0 where unknown.
        native: a C/C++ frame (``py-spy --native``), not a Python one.
    """

    function: str
    file: str = ""
    line: int = 0
    native: bool = False


class ThreadStack(msgspec.Struct, frozen=True, omit_defaults=True):
    """One thread of a captured worker.

    Attributes:
        tid: its thread id (``os_thread_id``).
        name: its Python name, where known ("MainThread").
        frames: innermost first.
        state: its state from ``/proc/PID/task/TID/stat``: R running, S sleeping, D
            uninterruptible (usually I/O), T stopped, Z zombie.
        wchan: the kernel function it waits in, where readable.
        active: the capture saw it running Python (not idle), where it can tell.
        gil: the capture saw it holding the GIL, where it can tell.
        kernel_stack: ``/proc/PID/task/TID/stack``, where readable (root).
        doing: what it is doing, in words ("waiting on a lock", "holding the GIL in a C
            call", "in uninterruptible I/O", ...).
        frames_cut: how many of its frames (the outermost) were left out, a capture's
            size being bounded.
    """

    tid: int
    name: str = ""
    frames: List[Frame] = []
    state: Optional[str] = None
    wchan: Optional[str] = None
    active: Optional[bool] = None
    gil: Optional[bool] = None
    kernel_stack: Optional[List[str]] = None
    doing: str = ""
    frames_cut: int = 0


class ChildState(msgspec.Struct, frozen=True, omit_defaults=True):
    """A child of a captured worker (a data loader's worker, say), as ``/proc`` shows
    its main thread: where a worker waiting on its children is held up.

    Attributes:
        pid: the child.
        name: its command name (``/proc/PID/comm``: "pt_data_worker", "python").
        state: its state letter (D: uninterruptible, usually I/O).
        wchan: the kernel function it waits in, where readable.
    """

    pid: int
    name: str = ""
    state: str = ""
    wchan: Optional[str] = None


class ProcessFacts(msgspec.Struct, frozen=True, omit_defaults=True):
    """What ``/proc`` tells about a worker, whatever else could be captured.

    Attributes:
        cmdline: its command line.
        state: the process's state letter.
        rss: resident memory in bytes.
        threads: number of threads.
        children: pids of its children.
        child_states: the state of each of its first children (``MAX_CHILD_STATES``).
        age: seconds since it started.
        fifos: how many FIFOs it has open.
        sockets: how many sockets it has open.
        uid: its real user id.
    """

    cmdline: List[str] = []
    state: str = ""
    rss: int = 0
    threads: int = 0
    children: List[int] = []
    child_states: List[ChildState] = []
    age: float = 0.0
    fifos: int = 0
    sockets: int = 0
    uid: Optional[int] = None


class Capture(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """What was captured of one worker.

    Attributes:
        pid: the worker.
        start_time: the worker's start time (clock ticks since boot), if known.
        role: "stuck" (its timer expired) or "peer" (another worker of the same job,
            captured for comparison and left alone).
        labels: the labels of its timer (job, rank, ...).
        method: "py-spy", "hook" (the faulthandler hook its client installed),
            "facts" (the facts alone; "none" in records written before that name) or
            "none" (nothing was captured: refused, failed, or never started).
        seconds: how long the capture took.
        exited: the worker exited during the capture.
        error: why the method failed or was not used, for people ("py-spy: ptrace not
            permitted (EPERM): run the server as root or grant CAP_SYS_PTRACE").
        facts: what ``/proc`` told.
        threads: every thread's stack, as many as a capture keeps (``error`` says what
            was cut: threads, frames, long names).
        raw: the start of the method's own output, as it came.
        core: the path of a core file taken with ``gcore``, if asked for.
        host: the host it ran on, where that is not the incident's own: set when the
            incidents of several hosts are merged into one report.
        threads_cut: how many of its threads were left out, a capture's size being
            bounded.
        timer_running: a peer whose timer had not reached its deadline (it may have been
            on its way, where the others wait for it).
    """

    pid: int
    start_time: Optional[int] = None
    role: str = "stuck"
    labels: Optional[Dict[str, str]] = None
    method: str = "none"
    seconds: float = 0.0
    exited: bool = False
    error: Optional[str] = None
    facts: Optional[ProcessFacts] = None
    threads: List[ThreadStack] = []
    raw: str = ""
    core: Optional[str] = None
    host: str = ""
    threads_cut: int = 0
    timer_running: bool = False


class Group(msgspec.Struct, frozen=True, omit_defaults=True):
    """Workers whose stuck threads have the same stack.

    Attributes:
        pids: the workers.
        ranks: their ``rank`` labels, where they have one.
        frames: the shared stack of the thread that matters (innermost first).
        doing: what that thread is doing, in words.
        summary: one line: "7 ranks in all_reduce at train.py:42 (waiting ...)".
        hosts: the host of each of ``pids``, in the same order, when the workers come
            from several hosts (a merged report); empty otherwise.
    """

    pids: List[int]
    ranks: List[str] = []
    frames: List[Frame] = []
    doing: str = ""
    summary: str = ""
    hosts: List[str] = []


class Incident(msgspec.Struct, frozen=True, kw_only=True):
    """One reap, and why the worker hung.

    Attributes:
        version: ``INCIDENT_VERSION``.
        id: unique on the host, and sorts by time ("20261202T061503.123Z-4242-step").
        host: the host name.
        created: wall-clock time of the expiry (``time.time()``).
        pid: the worker whose timer expired.
        start_time: the worker's start time (clock ticks since boot), if known.
        uid: the worker's real uid, read as its capture began (whose incident it is
            when the directory is pruned), if it could be read.
        scope_id: the expired timer's scope.
        signal: the signal its reap sends.
        deadline: the expired timer's deadline, in CLOCK_MONOTONIC seconds.
        labels: the expired timer's labels.
        late: seconds from the deadline to the start of the capture.
        job: the value of the job label the peers were found by, if any.
        captures: the stuck worker's first, then its peers'.
        groups: the captured workers grouped by stack, outliers first.
        summary: the lines a person reads first.
        seconds: from the start of the capture to its end (or to the budget).
        timed_out: the budget ran out before every capture was complete; the signal was
            sent then.
        delivered: whether the reap's signal was delivered (``None``: none was sent: the
            worker exited during its capture, or the server runs dry).
        descendants: the pids of the worker's descendants the signal went to as well
            (``--reap-tree``).
        dry_run: the server signals nothing (``--dry-run``): ``signal`` is what the reap
            would have sent.
        errors: what went wrong while capturing or writing, for people.
    """

    version: int = INCIDENT_VERSION
    id: str
    host: str
    created: Created
    pid: int
    start_time: Optional[int] = None
    uid: Optional[int] = None
    scope_id: str
    signal: int
    deadline: float
    labels: Optional[Dict[str, str]] = None
    late: float = 0.0
    job: Optional[str] = None
    captures: List[Capture] = []
    groups: List[Group] = []
    summary: List[str] = []
    seconds: float = 0.0
    timed_out: bool = False
    delivered: Optional[bool] = None
    descendants: List[int] = []
    dry_run: bool = False
    errors: List[str] = []
