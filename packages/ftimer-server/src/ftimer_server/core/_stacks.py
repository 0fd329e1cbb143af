"""What stuck workers are doing, and which of them is the odd one out.

In a collective hang every rank of a job looks stuck: seven ranks wait in ``all_reduce``
for the eighth, which waits for its data loader. Looking at one stack says little;
grouping the stacks of all of them says which one to look at. This is what LLNL's STAT
does for MPI jobs: the workers' stacks form a call-prefix tree, workers with the same
stack form a group, and the small groups (the outliers) come first.

Pure functions over the incident schema (``_incident.py``): no I/O, no clock. The
capture fills the facts (frames, thread states, wait channels, py-spy's active and GIL
flags); this module turns them into words:

- `doing`: what one thread is doing, in words;
- `focus`: the thread of a worker that matters for grouping;
- `group`: the workers grouped by the stack of their focus thread, outliers first;
- `call_tree`: the call-prefix tree of those stacks, as text.

The texts made of them (the summary, the whole report) are in ``_report.py``.

Frames are stored innermost first (py-spy's order); trees and texts show them outermost
first, like a Python traceback, so the innermost frame is always the last line.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Dict, FrozenSet, List, Optional, Tuple

import msgspec

from ._incident import Capture, Frame, Group, ThreadStack

__all__ = [
    "abridged",
    "call_tree",
    "client_thread",
    "doing",
    "doing_of",
    "focus",
    "group",
    "wait_channel",
]

# -- what a thread is doing ------------------------------------------------------------

UNINTERRUPTIBLE = "in uninterruptible I/O"
VFORK = "waiting for a child it vforked to exec or exit"
#: The wait channels of a vfork()'s parent (subprocess uses vfork() where it can).
_VFORK_WAITS = frozenset({"kernel_clone", "wait_for_vfork_done", "_do_fork", "do_fork"})
GIL_HELD = "holding the GIL in a C call"
GIL_WAIT = "waiting for the GIL"
LOCK = "waiting on a lock"
JOIN = "waiting for another thread to finish"
SLEEPING = "sleeping"
IO = "waiting for I/O"
CHILD = "waiting for a child process"
SIGNAL = "waiting for a signal"
COLLECTIVE = "waiting in the collective"
GPU = "waiting for the GPU in"
RUNNING_PYTHON = "running Python"
#: Holding the GIL, running, no native frames read: a busy Python loop and a C call that
#: keeps the GIL (a regular expression's match) look the same without them.
RUNNING_PYTHON_OR_C = "running Python, or a C call that holds the GIL (--py-spy-native tells)"
RUNNING_C = "running a C call (GIL released)"
RUNNING = "running"
IDLE = "idle"

_COLLECTIVES = frozenset(
    {
        "all_reduce",
        "all_gather",
        "all_gather_into_tensor",
        "all_gather_object",
        "all_to_all",
        "all_to_all_single",
        "barrier",
        "monitored_barrier",
        "broadcast",
        "broadcast_object_list",
        "gather",
        "gather_object",
        "reduce",
        "reduce_scatter",
        "reduce_scatter_tensor",
        "scatter",
        "scatter_object_list",
        "send",
        "recv",
        "batch_isend_irecv",
    }
)

#: Python functions that block, by the end of their file's path. Only what a Python
#: frame can show: C functions (``time.sleep``, ``Lock.acquire``, ``socket.recv``) have
#: no frame of their own; the wait channel or a native frame tells those.
_PYTHON_WAITS: Tuple[Tuple[str, FrozenSet[str], str], ...] = (
    ("threading.py", frozenset({"join", "_wait_for_tstate_lock"}), JOIN),
    ("threading.py", frozenset({"wait", "wait_for", "acquire", "_wait"}), LOCK),
    ("/queue.py", frozenset({"get", "put", "join"}), LOCK),
    ("multiprocessing/queues.py", frozenset({"get", "put", "join"}), LOCK),
    ("multiprocessing/synchronize.py", frozenset({"acquire", "wait", "__enter__"}), LOCK),
    ("selectors.py", frozenset({"select"}), IO),
    ("socket.py", frozenset({"accept", "readinto", "create_connection"}), IO),
    ("ssl.py", frozenset({"read", "recv", "recv_into", "do_handshake"}), IO),
    (
        "multiprocessing/connection.py",
        frozenset({"recv", "recv_bytes", "_recv", "_recv_bytes", "poll", "_poll", "wait"}),
        IO,
    ),
    ("subprocess.py", frozenset({"communicate", "_communicate"}), IO),
    ("subprocess.py", frozenset({"wait", "_wait", "_try_wait"}), CHILD),
    ("multiprocessing/popen_fork.py", frozenset({"wait", "poll"}), CHILD),
    ("torch/distributed/distributed_c10d.py", _COLLECTIVES, COLLECTIVE),
    ("torch/cuda/__init__.py", frozenset({"synchronize"}), GPU),
    ("torch/cuda/streams.py", frozenset({"synchronize"}), GPU),
)


#: Native functions (``py-spy --native``, libc wrappers included), by what they wait for.
#: Names are compared after `_plain_native` strips glibc's decorations.
_NATIVE_GIL_WAIT = frozenset(
    {"take_gil", "PyEval_RestoreThread", "PyEval_AcquireThread", "PyEval_AcquireLock"}
)
_NATIVE_WAITS: Dict[str, str] = {
    **dict.fromkeys(
        ("clock_nanosleep", "nanosleep", "usleep", "sleep", "pysleep", "time_sleep"), SLEEPING
    ),
    **dict.fromkeys(
        (
            "futex_wait",
            "futex_abstimed_wait",
            "futex_abstimed_wait_common",
            "lll_lock_wait",
            "lll_lock_wait_private",
            "pthread_mutex_lock",
            "pthread_cond_wait",
            "pthread_cond_timedwait",
            "pthread_cond_clockwait",
            "sem_wait",
            "sem_timedwait",
            "sem_clockwait",
            "new_sem_wait_slow",
            "do_futex_wait",
            "PyThread_acquire_lock_timed",
            "PyMutex_LockTimed",
            "lock_PyThread_acquire_lock",
            "acquire_timed",
        ),
        LOCK,
    ),
    **dict.fromkeys(
        (
            "select",
            "pselect",
            "pselect6",
            "poll",
            "ppoll",
            "epoll_wait",
            "epoll_pwait",
            "epoll_pwait2",
            "recv",
            "recvfrom",
            "recvmsg",
            "read",
            "readv",
            "pread",
            "accept",
            "accept4",
            "connect",
            "send",
            "sendto",
            "sendmsg",
            "write",
            "writev",
            "pwrite",
            "io_getevents",
            "Py_read",
            "Py_write",
        ),
        IO,
    ),
    **dict.fromkeys(("waitpid", "wait4", "waitid", "wait"), CHILD),
    **dict.fromkeys(("sigsuspend", "sigtimedwait", "sigwaitinfo", "sigwait", "pause"), SIGNAL),
}

#: Kernel wait channels (``/proc/PID/task/TID/wchan``): a part of the name -> what it
#: waits for. In order: the first that matches wins. A lock and a condition (and a
#: thread waiting for the GIL) all wait in a futex.
_WCHAN_WAITS: Tuple[Tuple[str, str], ...] = (
    ("futex", LOCK),
    ("nanosleep", SLEEPING),
    ("select", IO),
    ("poll", IO),  # poll_schedule_timeout, do_sys_poll, ep_poll, do_epoll_wait
    ("pipe_", IO),
    ("wait_woken", IO),
    ("sk_wait", IO),
    ("unix_stream", IO),
    ("inet_csk_accept", IO),
    ("tcp_", IO),
    ("tty_read", IO),
    ("do_wait", CHILD),
    ("wait4", CHILD),
    ("sigsuspend", SIGNAL),
    ("sigtimedwait", SIGNAL),
)


def doing(thread: ThreadStack) -> str:
    """What ``thread`` is doing, in words, from its state, frames, flags and wait channel.

    The rules, first match wins:

    1. its state: ``D`` is uninterruptible I/O (nothing, not even py-spy, can stop it),
       or, in a vfork's wait channel, a wait for the child it vforked to exec or exit;
       ``T``/``t`` stopped, ``Z`` exited;
    2. native frames waiting to take the GIL back: "waiting for the GIL";
    3. holding the GIL (py-spy's flag) while blocked, that is in state ``S``, idle, inside
       a native frame that is not the interpreter's, or in a wait its native frames or
       wait channel name: "holding the GIL in a C call" (and what the call waits for);
       holding it otherwise: "running Python" (where native frames show the interpreter;
       without native frames, a C call that keeps the GIL is not told from it);
    4. what it waits for, by its innermost native frames (``py-spy --native``), else its
       innermost Python frame (``threading``'s waits, ``queue``, ``selectors``,
       ``subprocess``, a ``torch.distributed`` collective, ...), else its kernel wait
       channel: "waiting on a lock", "sleeping", "waiting for I/O", ...;
    5. its activity: running (active), blocked in the kernel (a wait channel nothing
       above knows), idle, running (state ``R``).

    A thread blocked in a C call that holds the GIL (``ctypes.PyDLL``) and one in a busy
    Python loop both hold it; only their state (or native frames) tells them apart.

    Returns:
        "" when nothing can be said (no state, frames nor flags).
    """
    state = _state(thread)
    wchan = wait_channel(thread)
    if state == "D":
        where = f", in {wchan}" if wchan else ""
        # vfork(): the parent sleeps uninterruptibly until its child execs or exits.
        what = VFORK if wchan in _VFORK_WAITS else UNINTERRUPTIBLE
        return f"{what} (D state{where}: py-spy cannot stop it)"
    if state in ("T", "t"):
        return "stopped (T state: by a signal or a debugger)"
    if state == "Z":
        return "exited (zombie)"
    native = _native_segment(thread.frames)
    if any(_plain_native(f.function) in _NATIVE_GIL_WAIT for f in native):
        return GIL_WAIT
    native_wait = next((k for k in map(_native_wait, native) if k), None)
    # A running thread's wait channel is stale or "0": it only counts while blocked.
    wchan_wait = _wchan_wait(wchan) if state != "R" else None
    if thread.gil:
        in_c = bool(native) and not _interpreter(native[0].function)
        blocked = native_wait or wchan_wait
        if blocked or in_c or state == "S" or thread.active is False:
            return f"{GIL_HELD} ({blocked})" if blocked else GIL_HELD
        # Native frames read (outside the Python ones too, as py-spy gives a busy loop's):
        # a C call holding the GIL would have shown in them.
        return RUNNING_PYTHON if any(f.native for f in thread.frames) else RUNNING_PYTHON_OR_C
    python_wait = _python_wait(thread.frames)
    # A native lock's wait says less than the Python frame that took it (a queue, a
    # join), and any native wait less than a join or a collective: the stuck worker is
    # read with native frames, its peers without, and "waiting in the collective
    # all_reduce" of the peers was "sleeping" of the stuck rank (NCCL's wait loop).
    if python_wait and (native_wait == LOCK or python_wait == JOIN or _collective(python_wait)):
        native_wait = None
    kind = native_wait or python_wait or wchan_wait
    if kind:
        return kind
    if thread.active:
        return RUNNING_C if thread.gil is False else RUNNING_PYTHON
    if wchan and state != "R":
        return f"blocked in the kernel ({wchan})"
    if thread.active is False:
        return IDLE
    if state == "R":
        return RUNNING
    if state == "S":
        return "blocked (S state)"
    return ""


def _state(thread: ThreadStack) -> str:
    return (thread.state or "").strip()[:1]


def wait_channel(thread: ThreadStack) -> str:
    """The kernel wait channel ``thread`` sleeps in, or "" where none is known."""
    wchan = (thread.wchan or "").strip()
    return "" if wchan == "0" else wchan


def _native_segment(frames: Sequence[Frame]) -> List[Frame]:
    """The native frames inside the innermost Python frame (all of them if none is)."""
    segment = []
    for frame in frames:
        if not frame.native:
            break
        segment.append(frame)
    return segment


def _plain_native(name: str) -> str:
    """``__GI___poll`` -> ``poll``, ``__libc_recv`` -> ``recv``, ``futex_wait@GLIBC``
    -> ``futex_wait``, ``__futex_abstimed_wait_common64`` -> ``futex_abstimed_wait_common``."""
    name = name.split("@", 1)[0].lstrip("_")
    for prefix in ("GI_", "libc_"):
        if name.startswith(prefix):
            name = name[len(prefix) :].lstrip("_")
    if name.endswith("64") and not name.endswith("_64"):
        name = name[:-2]
    return name


def _native_wait(frame: Frame) -> Optional[str]:
    return _NATIVE_WAITS.get(_plain_native(frame.function))


def _interpreter(function: str) -> bool:
    """A native frame of CPython itself (``_PyEval_EvalFrameDefault``, ``PyObject_Call``):
    the thread runs Python there, it is not inside an extension's C call."""
    return function.lstrip("_").startswith("Py")


def _python_wait(frames: Sequence[Frame]) -> Optional[str]:
    frame = next((f for f in frames if not f.native), None)
    if frame is None:
        return None
    path = "/" + frame.file.replace("\\", "/")
    # py-spy names a method by its qualified name on Python 3.11+ ("Thread.join"), the
    # dump hook by its own ("join").
    function = frame.function.rpartition(".")[2]
    for suffix, functions, kind in _PYTHON_WAITS:
        if function in functions and path.endswith("/" + suffix.lstrip("/")):
            if kind in (COLLECTIVE, GPU):
                return f"{kind} {function}"
            return kind
    return None


def _collective(kind: str) -> bool:
    return kind.startswith((COLLECTIVE, GPU))


def _wchan_wait(wchan: str) -> Optional[str]:
    return next((kind for part, kind in _WCHAN_WAITS if part in wchan), None) if wchan else None


# -- the thread that matters -----------------------------------------------------------


def focus(capture: Capture) -> Optional[ThreadStack]:
    """The thread of ``capture`` that stands for the worker when workers are grouped.

    The first rule that some thread meets decides: a thread in uninterruptible sleep
    (``D``: it is stuck in the kernel, whatever Python does), else the one holding the
    GIL (no other thread can run Python), else an active one (py-spy saw it running),
    else the main thread (by name, or the thread whose id is the pid), else the first.
    Among the threads a rule picks, the first with frames wins, else the first. The
    client library's own threads (``ftimer-client-*``: its watch, active every second)
    and threads that have exited (a main thread gone while others run on) are looked at
    only when there is no other.

    Returns:
        None when the capture has no threads.
    """
    threads = [t for t in capture.threads if not _aside(t)] or capture.threads
    rules = (
        lambda t: _state(t) == "D",
        lambda t: t.gil is True,
        lambda t: t.active is True,
        lambda t: t.name == "MainThread" or t.tid == capture.pid,
        lambda t: True,
    )
    for rule in rules:
        chosen = [t for t in threads if rule(t)]
        if chosen:
            return next((t for t in chosen if t.frames), chosen[0])
    return None


#: The names of the client library's threads (``ftimer-client-watch``, ``-resync``).
_CLIENT_THREADS = "ftimer-client-"
#: What each of them runs first (``ftimer_client._signals.start_helper``): not merely a
#: frame of the library, as a worker's thread whose target is an ``@expires`` function
#: starts in the library too, and runs the worker's code.
_CLIENT_START = ("_blocking", "/ftimer_client/_signals.py")


def client_thread(thread: ThreadStack) -> bool:
    """Whether ``thread`` is the client library's own: by its name, and by its frames
    where it has any (the worker's code may name a thread so, and would hide it); or,
    without the name (the hook knows none), by what it runs: the library's start of its
    threads (``_CLIENT_START``) first below threading's, its stack whole."""
    if thread.name.startswith(_CLIENT_THREADS):
        return not thread.frames or any(_of_client(f) for f in thread.frames)
    if thread.frames_cut:  # its outermost frames are not those kept
        return False
    runs = (f for f in reversed(thread.frames) if not _path(f).endswith("/threading.py"))
    target = next(runs, None)
    function, file = _CLIENT_START
    return target is not None and target.function == function and _path(target).endswith(file)


def _of_client(frame: Frame) -> bool:
    return "/ftimer_client/" in _path(frame)


def _path(frame: Frame) -> str:
    return frame.file.replace("\\", "/")


def _aside(thread: ThreadStack) -> bool:
    """A thread that does not stand for its worker while another can: the client
    library's, or one that has exited."""
    return client_thread(thread) or _state(thread) in ("Z", "X")


def doing_of(thread: ThreadStack) -> str:
    """What ``thread`` is doing: as captured with it, else as `doing` says."""
    return thread.doing or doing(thread)


# -- groups ----------------------------------------------------------------------------

_Key = Tuple[Tuple[Frame, ...], str, str]
#: A native frame py-spy could not name, named by its address ("0x7f54886a71f5").
_ADDRESS = re.compile(r"0x[0-9a-fA-F]+")


def _comparable(frames: Sequence[Frame]) -> Tuple[Frame, ...]:
    """``frames`` as workers' stacks are compared: their Python frames. Native frames
    (``--py-spy-native``) are read for the stuck worker and not for its peers (read
    without stopping them, which gives none), and py-spy names some by an address ASLR
    moves in each process: the stuck rank shared no frame with its peers, and eight
    ranks stuck in one place made eight groups. What the native frames say of a thread
    is in what it is doing (``doing``), part of the comparison too. A stack of native
    frames alone is compared as such, those known by their address alone as "??"."""
    python = tuple(f for f in frames if not f.native)
    if python:
        return python
    return tuple(
        msgspec.structs.replace(f, function="??") if _ADDRESS.fullmatch(f.function) else f
        for f in frames
    )


#: A number in a capture's error: a duration, a pid, a thread's id.
_NUMBER = re.compile(r"\d+(?:\.\d+)?")


class _Worker:
    """One captured worker, as grouping sees it."""

    __slots__ = ("capture", "focus", "frames", "rank", "reason", "what")

    def __init__(self, capture: Capture) -> None:
        self.capture = capture
        self.rank = (capture.labels or {}).get("rank")
        self.focus = thread = focus(capture)
        self.frames: Tuple[Frame, ...] = _comparable(thread.frames) if thread is not None else ()
        self.what = doing_of(thread) if thread is not None else ""
        self.reason = "" if self.frames else _no_stack(capture)

    @property
    def key(self) -> _Key:
        # Why there is no stack, its numbers aside: "py-spy did not finish within 30.04s
        # ... thread 4242 is in uninterruptible sleep" and "... 30.03s ... thread 4250"
        # are one reason, and their workers one group.
        # And "running Python" is one with the same said without native frames to tell.
        what = RUNNING_PYTHON if self.what == RUNNING_PYTHON_OR_C else self.what
        return (self.frames, what, _NUMBER.sub("N", self.reason))

    def order(self) -> Tuple[int, int, str, str, int]:
        rank = _rank_number(self.rank)
        return (rank is None, rank or 0, self.rank or "", self.capture.host, self.capture.pid)


def _no_stack(capture: Capture) -> str:
    if capture.exited:
        return "exited during the capture"
    if capture.error:  # said after "no stack: " (see group())
        return capture.error.removeprefix("no stacks: ")
    if capture.method in ("facts", "none"):  # "none" in older records
        return "no capture method: /proc facts only"
    return f"{capture.method} gave no frames"


def _rank_number(rank: Optional[str]) -> Optional[int]:
    if rank is not None and rank.isascii() and rank.isdecimal():
        return int(rank)
    return None


def group(captures: Sequence[Capture]) -> List[Group]:
    """Group the workers of ``captures`` by the stack of their `focus` thread.

    Workers whose focus threads have identical frames (function, file, line) and do the
    same thing share a group; workers without frames are grouped by why they have none.
    A worker is one capture (its ``host`` and pid); each is in exactly one group.

    Each group's summary names the frame where its stack leaves the others' (the branch
    point in the call-prefix tree, as STAT shows it), the innermost frame of the user's
    own code when the innermost Python frame is a library's, and that innermost Python
    frame (each once), then what the thread is doing: "7 ranks (0-2,4-7) in train at
    train.py:42 ... wait at threading.py:324 (waiting on a lock)". A group alone (or whose
    stack is all shared) has no branch point.

    Order: the smallest groups (the outliers) first; between groups of one size, the one
    holding the stuck worker (``role == "stuck"``) first; then by rank, host and pid.
    """
    buckets: Dict[_Key, List[_Worker]] = {}
    for capture in captures:
        worker = _Worker(capture)
        buckets.setdefault(worker.key, []).append(worker)
    paths = [key[0][::-1] for key in buckets if key[0]]
    groups = []
    for (frames, kind, _), workers in buckets.items():
        workers.sort(key=_Worker.order)
        # "running Python" unless none of them was read with native frames to tell so.
        caveat = all(w.what == RUNNING_PYTHON_OR_C for w in workers)
        what = RUNNING_PYTHON_OR_C if kind == RUNNING_PYTHON and caveat else kind
        stuck = any(w.capture.role == "stuck" for w in workers)
        reason = workers[0].reason
        if any(w.reason != reason for w in workers):  # alike but for numbers: whose it is
            reason = f"as for {_who(workers[:1])}: {reason}"
        if frames:
            where = _where(frames, paths)
            waited = _waited_for(workers[0]) if what == JOIN else ""
            if waited and len(workers) > 1:  # the threads of one of them: say whose
                waited = f"as for {_who(workers[:1])}, {waited}"
            said = f"{what}; {waited}" if waited else what
            text = f"{_who(workers)} in {where}" + (f" ({said})" if said else "")
        else:
            text = f"{_who(workers)} (" + (f"{what}; " if what else "") + f"no stack: {reason})"
        hosts = [w.capture.host for w in workers]
        value = Group(
            pids=[w.capture.pid for w in workers],
            ranks=[w.rank for w in workers if w.rank is not None],
            frames=list(workers[0].focus.frames) if workers[0].focus else [],  # as captured
            doing=what,
            summary=text,
            hosts=hosts if any(hosts) else [],
        )
        groups.append(((len(workers), not stuck, workers[0].order()), value))
    groups.sort(key=lambda item: item[0])
    return [value for _, value in groups]


#: The threads a joining thread's summary names at most, and of each name the
#: characters shown.
_WAITED_FOR = 2
_NAME_SHOWN = 40


def _waited_for(worker: _Worker) -> str:
    """The other threads of a worker whose thread joins another: the joining thread's own
    line is where it waits, not why (a deadlock's two threads, a hung prefetcher are the
    others). Those with frames, not the client library's nor exited ones, the likeliest
    first (stuck in the kernel, holding the GIL, running, in the user's own code),
    ``_WAITED_FOR`` of them, each by its last line of the user's own code: ``other
    threads: 'loader' in load at data.py:9, waiting for I/O; 3 more``."""
    others = [
        t for t in worker.capture.threads if t is not worker.focus and t.frames and not _aside(t)
    ]

    def user_line(t: ThreadStack) -> Optional[Frame]:
        return next((f for f in t.frames if not f.native and not _library(f.file)), None)

    others.sort(
        key=lambda t: (
            _state(t) != "D",
            t.gil is not True,
            t.active is not True,
            user_line(t) is None,  # a pool's idle workers, in the library alone
        )
    )
    said = []
    for t in others[:_WAITED_FOR]:
        doing_now = doing_of(t)
        line = user_line(t) or _comparable(t.frames)[0]
        # Quoted as Python quotes it, and cut: a thread's name is the worker's to choose.
        name = repr(t.name[:_NAME_SHOWN] + ("..." if len(t.name) > _NAME_SHOWN else ""))
        said.append(
            (name if t.name else f"thread {t.tid}")
            + f" in {_frame_text(line)}"
            + (f", {doing_now}" if doing_now else "")
        )
    more = len(others) - len(said)
    if not said:
        return ""
    return "other threads: " + "; ".join(said + ([f"{more} more"] if more > 0 else []))


def _common(a: Sequence[Frame], b: Sequence[Frame]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _where(frames: Tuple[Frame, ...], paths: Sequence[Tuple[Frame, ...]]) -> str:
    """Where a stack (innermost first) stands among ``paths`` (outermost first), outermost
    first: the frame where it leaves the others (if it does); the innermost frame of the
    user's own code, when the innermost Python frame is a library's; and that innermost
    Python frame."""
    others = [other for other in paths if other != frames[::-1]]
    shared = max((_common(frames[::-1], other) for other in others), default=0)
    python = [i for i, frame in enumerate(frames) if not frame.native]  # innermost first
    named = {python[0] if python else 0}
    if others and shared < len(frames):
        named.add(len(frames) - 1 - shared)  # the branch point
    if python and _library(frames[python[0]].file):
        user = next((i for i in python if not _library(frames[i].file)), None)
        if user is not None:
            named.add(user)
    return " ... ".join(_frame_text(frames[i]) for i in sorted(named, reverse=True))


def _library(file: str) -> bool:
    """Whether ``file`` (a frame's, as the capture gave it) is the standard library's or
    an installed package's, not the user's own code: the frame that names what a worker
    waits for is often one, the user's line that called it is the one to look at."""
    path = file.replace("\\", "/")
    return (
        file.startswith("<")  # <frozen importlib._bootstrap>, <string>
        or "/site-packages/" in path
        or "/dist-packages/" in path
        or _STDLIB.search(path) is not None
    )


#: A path inside a Python installation's standard library: ``/usr/lib/python3.11/``,
#: ``/opt/conda/lib/python3.13t/``, ``C:/Python311/Lib/``.
_STDLIB = re.compile(r"/lib/python\d+(\.\d+)?t?/|/Lib/")


def _frame_text(frame: Frame) -> str:
    if frame.native:
        where = f" ({_short(frame.file)})" if frame.file else ""
        return f"{frame.function}{where}"
    line = f":{frame.line}" if frame.line else ""
    return f"{frame.function} at {_short(frame.file) or '?'}{line}"


def _short(path: str) -> str:
    """The file name of ``path``; a package's ``__init__.py`` keeps its package."""
    parts = path.replace("\\", "/").rstrip("/").split("/")
    if parts[-1] == "__init__.py" and len(parts) > 1:
        return "/".join(parts[-2:])
    return parts[-1]


def _who(workers: Sequence[_Worker]) -> str:
    hosts = sorted({w.capture.host for w in workers if w.capture.host})
    if len(workers) == 1:
        w = workers[0]
        name = f"rank {w.rank}" if w.rank is not None else f"pid {w.capture.pid}"
        name += f" on {w.capture.host}" if w.capture.host else ""
        return name + (" (its timer running)" if w.capture.timer_running else "")
    ranks, pids = _ranks_and_pids(workers)
    running = [w for w in workers if w.capture.timer_running]
    on = f" on {len(hosts)} hosts" if len(hosts) > 1 else f" on {hosts[0]}" if hosts else ""
    said = f"; timers running: {_who_briefly(running)}" if running else ""
    if not pids:
        return f"{len(workers)} ranks ({_ranges(ranks)}{said}){on}"
    listed = ([f"ranks {_ranges(ranks)}"] if ranks else []) + [f"pids {abridged(pids)}"]
    return f"{len(workers)} workers ({'; '.join(listed)}{said}){on}"


def _who_briefly(workers: Sequence[_Worker]) -> str:
    """Their ranks ("3,5"), and the pids of those without one."""
    ranks, pids = _ranks_and_pids(workers)
    return ", ".join(
        ([_ranges(ranks)] if ranks else []) + ([f"pids {abridged(pids)}"] if pids else [])
    )


def _ranks_and_pids(workers: Sequence[_Worker]) -> Tuple[List[str], List[int]]:
    """The ranks of ``workers``, and the pids of those without one."""
    ranks = [w.rank for w in workers if w.rank is not None]
    return ranks, [w.capture.pid for w in workers if w.rank is None]


def _ranges(ranks: Sequence[str], most: int = 8) -> str:
    """``["0", "1", "2", "4", "5"]`` -> ``"0-2,4,5"``; names that are no numbers are listed."""
    numbers = sorted({n for n in map(_rank_number, ranks) if n is not None})
    runs: List[List[int]] = []
    for n in numbers:
        if runs and runs[-1][-1] == n - 1:
            runs[-1].append(n)
        else:
            runs.append([n])
    spans: List[str] = []
    for run in runs:
        spans += [f"{run[0]}-{run[-1]}"] if len(run) > 2 else [str(n) for n in run]
    spans += sorted({r for r in ranks if _rank_number(r) is None})
    return abridged(spans, most, sep=",")


def abridged(items: Iterable[object], most: int = 8, sep: str = ", ") -> str:
    """``items`` joined with ``sep``, the first ``most`` of them, and how many more."""
    shown = [str(i) for i in items]
    more = len(shown) - most
    return sep.join(shown[:most]) + (f"{sep}... {more} more" if more > 0 else "")


# -- the call-prefix tree --------------------------------------------------------------


class _Node:
    __slots__ = ("children", "count")

    def __init__(self) -> None:
        self.children: Dict[Frame, _Node] = {}
        self.count = 0


def call_tree(captures: Sequence[Capture]) -> List[str]:
    """The call-prefix tree of the workers' focus threads, outermost frame first.

    Each line is a frame and the number of workers whose stack passes through it; the
    frames below a branch point are indented one step further, the smaller branches
    (the outliers) first. Workers without frames are left out.
    """
    root = _Node()
    for capture in captures:
        thread = focus(capture)
        if thread is None or not thread.frames:
            continue
        node = root
        node.count += 1
        for frame in reversed(_comparable(thread.frames)):
            node = node.children.setdefault(frame, _Node())
            node.count += 1
    width = len(str(root.count))
    lines: List[str] = []

    def walk(node: _Node, depth: int) -> None:
        while len(node.children) == 1:
            frame, node = next(iter(node.children.items()))
            lines.append(f"{node.count:>{width}}  {'  ' * depth}{_frame_text(frame)}")
        for frame, child in sorted(node.children.items(), key=lambda fc: fc[1].count):
            lines.append(f"{child.count:>{width}}  {'  ' * depth}+ {_frame_text(frame)}")
            walk(child, depth + 1)

    walk(root, 0)
    return lines
