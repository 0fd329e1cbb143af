"""What a stuck thread is doing, which thread stands for its worker, and the grouping of
workers by stack (STAT's call-prefix tree): all on hand-built records, no processes."""

from __future__ import annotations

import random
from typing import Dict, List, Optional, Sequence, Tuple

import hypothesis.strategies as st
import msgspec
import pytest
from hypothesis import given, settings

from ftimer_server.core._incident import Capture, Frame, Group, ThreadStack
from ftimer_server.core._stacks import (
    _comparable,
    call_tree,
    client_thread,
    doing,
    focus,
    group,
)

PY = "/usr/lib/python3.11"
TORCH = "/venv/lib/python3.11/site-packages/torch"


def py(function: str, file: str, line: int = 1) -> Frame:
    return Frame(function, file, line)


def c(function: str, library: str = "libc.so.6") -> Frame:
    return Frame(function, library, 0, native=True)


def stack(*outermost_first: Frame) -> List[Frame]:
    """Frames as a reader writes them (outermost first), stored innermost first."""
    return list(reversed(outermost_first))


USER = py("step", "/app/train.py", 42)  # a C call made there leaves no frame of its own


def thread(
    *frames: Frame,
    state: Optional[str] = None,
    wchan: Optional[str] = None,
    active: Optional[bool] = None,
    gil: Optional[bool] = None,
    tid: int = 7,
    name: str = "",
) -> ThreadStack:
    return ThreadStack(
        tid=tid,
        name=name,
        frames=stack(*frames),
        state=state,
        wchan=wchan,
        active=active,
        gil=gil,
    )


# -- doing -----------------------------------------------------------------------------

DOING_CASES = [
    # The thread's state comes first: D is stuck in the kernel whatever Python says.
    (
        "D state, with its wait channel",
        thread(USER, py("read", f"{PY}/socket.py"), state="D", wchan="rpc_wait_bit_killable"),
        "in uninterruptible I/O (D state, in rpc_wait_bit_killable: py-spy cannot stop it)",
    ),
    (
        # Not I/O: subprocess's vfork(), until the child execs (a child that hangs before
        # it, or is stopped, holds its parent so).
        "D state, a vfork's parent",
        thread(USER, state="D", wchan="kernel_clone"),
        "waiting for a child it vforked to exec or exit (D state, in kernel_clone: py-spy "
        "cannot stop it)",
    ),
    (
        "D state, wait channel unreadable",
        thread(state="D", gil=True, active=True),
        "in uninterruptible I/O (D state: py-spy cannot stop it)",
    ),
    ("stopped", thread(USER, state="T"), "stopped (T state: by a signal or a debugger)"),
    (
        "stopped by a tracer",
        thread(USER, state="t"),
        "stopped (T state: by a signal or a debugger)",
    ),
    ("zombie thread", thread(state="Z"), "exited (zombie)"),
    # The GIL.
    (
        "waiting to take the GIL back (time.sleep returning)",
        thread(
            USER,
            c("time_sleep", "python3.11"),
            c("PyEval_RestoreThread", "python3.11"),
            c("take_gil", "python3.11"),
            c("pthread_cond_timedwait@@GLIBC_2.3.2"),
            c("__futex_abstimed_wait_common64"),
            state="S",
            wchan="futex_wait_queue",
        ),
        "waiting for the GIL",
    ),
    (
        "ctypes.PyDLL sleep: holds the GIL, native frames say sleeping",
        thread(USER, c("sleep"), c("__GI___clock_nanosleep"), state="S", gil=True, active=True),
        "holding the GIL in a C call (sleeping)",
    ),
    (
        "holds the GIL, no native frames: the wait channel says what the C call waits for",
        thread(USER, state="S", wchan="hrtimer_nanosleep", gil=True, active=False),
        "holding the GIL in a C call (sleeping)",
    ),
    (
        "holds the GIL and is blocked (S) in something unknown",
        thread(USER, state="S", gil=True),
        "holding the GIL in a C call",
    ),
    (
        "holds the GIL, py-spy says idle",
        thread(USER, gil=True, active=False),
        "holding the GIL in a C call",
    ),
    (
        "holds the GIL, running inside an extension's native code",
        thread(USER, c("dgemm_kernel", "libopenblas.so"), state="R", gil=True, active=True),
        "holding the GIL in a C call",
    ),
    (
        "holds the GIL while waiting on a lock: the deadlock that stops every thread",
        thread(USER, c("pthread_mutex_lock"), c("__lll_lock_wait"), state="S", gil=True),
        "holding the GIL in a C call (waiting on a lock)",
    ),
    (
        "busy Python loop: holds the GIL, running",
        thread(USER, py("spin", "/app/busy.py", 3), state="R", gil=True, active=True),
        "running Python, or a C call that holds the GIL (--py-spy-native tells)",
    ),
    (
        "busy Python loop with native frames read (py-spy puts one outside the Python)",
        thread(c("0x7fa0"), USER, py("spin", "/app/busy.py", 3), state="R", gil=True, active=True),
        "running Python",
    ),
    (
        "a C call that keeps the GIL (a regular expression's match), no native frames",
        thread(USER, py("match", f"{PY}/re/__init__.py", 166), state="R", gil=True),
        "running Python, or a C call that holds the GIL (--py-spy-native tells)",
    ),
    (
        "busy loop seen inside the interpreter's own native code",
        thread(USER, c("_PyEval_EvalFrameDefault", "python3.11"), state="R", gil=True),
        "running Python",
    ),
    (
        "holds the GIL, a stale wait channel of a running thread does not count",
        thread(USER, state="R", wchan="futex_wait_queue", gil=True, active=True),
        "running Python, or a C call that holds the GIL (--py-spy-native tells)",
    ),
    # Waiting on a lock: Python frames, native frames, the wait channel.
    (
        "threading.Condition.wait (Event.wait, Queue.get end there)",
        thread(USER, py("get", f"{PY}/queue.py", 171), py("wait", f"{PY}/threading.py", 320)),
        "waiting on a lock",
    ),
    (
        "queue.Queue.get seen as the innermost frame",
        thread(USER, py("get", f"{PY}/queue.py", 171)),
        "waiting on a lock",
    ),
    (
        "a multiprocessing lock",
        thread(USER, py("__enter__", f"{PY}/multiprocessing/synchronize.py", 95)),
        "waiting on a lock",
    ),
    (
        "Lock.acquire in user code: no frame, the native frames say it",
        thread(USER, c("PyThread_acquire_lock_timed", "python3.11"), c("sem_clockwait")),
        "waiting on a lock",
    ),
    (
        "Lock.acquire in user code: no frame, no native frames, the futex says it",
        thread(USER, state="S", wchan="futex_wait_queue_me", active=False, gil=False),
        "waiting on a lock",
    ),
    (
        "Thread.join",
        thread(
            USER,
            py("join", f"{PY}/threading.py", 1119),
            py("_wait_for_tstate_lock", f"{PY}/threading.py", 1139),
        ),
        "waiting for another thread to finish",
    ),
    (
        "Thread.join as py-spy names it on Python 3.11+ (qualified names)",
        thread(
            USER,
            py("Thread.join", f"{PY}/threading.py", 1119),
            py("Thread._wait_for_tstate_lock", f"{PY}/threading.py", 1139),
        ),
        "waiting for another thread to finish",
    ),
    (
        "socket.accept as py-spy names it on Python 3.11+",
        thread(USER, py("socket.accept", f"{PY}/socket.py", 294)),
        "waiting for I/O",
    ),
    # Sleeping.
    (
        "time.sleep seen by its native frame",
        thread(USER, c("pysleep", "python3.11"), c("clock_nanosleep@GLIBC_2.17"), state="S"),
        "sleeping",
    ),
    (
        "time.sleep seen by its wait channel",
        thread(USER, state="S", wchan="do_nanosleep", active=False, gil=False),
        "sleeping",
    ),
    # I/O.
    (
        "selectors (asyncio's loop)",
        thread(USER, py("select", f"{PY}/selectors.py", 468)),
        "waiting for I/O",
    ),
    (
        "a multiprocessing pipe (DataLoader's worker queue)",
        thread(
            USER,
            py("__next__", "/app/data.py", 17),
            py("recv_bytes", f"{PY}/multiprocessing/connection.py", 216),
            py("_recv_bytes", f"{PY}/multiprocessing/connection.py", 414),
        ),
        "waiting for I/O",
    ),
    ("socket.recv: native", thread(USER, c("__libc_recv")), "waiting for I/O"),
    ("poll: native, glibc's inner name", thread(USER, c("__GI___poll")), "waiting for I/O"),
    ("epoll: wait channel", thread(USER, state="S", wchan="do_epoll_wait"), "waiting for I/O"),
    ("a pipe read: wait channel", thread(USER, state="S", wchan="pipe_read"), "waiting for I/O"),
    # Children, signals, collectives, the GPU.
    (
        "subprocess.wait",
        thread(
            USER, py("wait", f"{PY}/subprocess.py", 1264), py("_wait", f"{PY}/subprocess.py", 2046)
        ),
        "waiting for a child process",
    ),
    (
        "waitpid: wait channel",
        thread(USER, state="S", wchan="do_wait"),
        "waiting for a child process",
    ),
    ("signal.pause: native", thread(USER, c("pause")), "waiting for a signal"),
    (
        "a torch.distributed collective",
        thread(USER, py("all_reduce", f"{TORCH}/distributed/distributed_c10d.py", 2050)),
        "waiting in the collective all_reduce",
    ),
    (
        "torch.cuda.synchronize",
        thread(USER, py("synchronize", f"{TORCH}/cuda/__init__.py", 801)),
        "waiting for the GPU in synchronize",
    ),
    # What it waits for: native frames first, then the Python frame, then the wchan.
    (
        "native frames are the most exact",
        thread(
            USER,
            py("wait", f"{PY}/threading.py", 320),
            c("__GI___poll"),
            wchan="do_nanosleep",
        ),
        "waiting for I/O",
    ),
    (
        # A native lock under a join (with --py-spy-native) said less than the join.
        "but a native lock says less than the Python frame that took it",
        thread(
            USER,
            py("_wait_for_tstate_lock", f"{PY}/threading.py", 1139),
            c("pthread_cond_wait"),
        ),
        "waiting for another thread to finish",
    ),
    (
        "the Python frame beats the wait channel",
        thread(USER, py("wait", f"{PY}/threading.py", 320), state="S", wchan="do_epoll_wait"),
        "waiting on a lock",
    ),
    (
        "a same-named function elsewhere is no wait",
        thread(USER, py("wait", "/app/mythreading.py", 3), state="R"),
        "running",
    ),
    # Activity when nothing says what it waits for.
    ("py-spy: active, GIL unknown", thread(USER, active=True), "running Python"),
    (
        "py-spy: active without the GIL",
        thread(USER, active=True, gil=False),
        "running a C call (GIL released)",
    ),
    (
        "blocked in a kernel function nothing here knows",
        thread(USER, state="S", wchan="kthread_worker_fn", active=False),
        "blocked in the kernel (kthread_worker_fn)",
    ),
    ("py-spy: idle", thread(USER, active=False, gil=False), "idle"),
    ("state R alone", thread(USER, state="R", wchan="0"), "running"),
    ("state S alone", thread(USER, state="S", wchan="0"), "blocked (S state)"),
    ("nothing known", thread(USER), ""),
    ("nothing at all", thread(), ""),
]


@pytest.mark.parametrize(
    ("case", "value", "expected"), DOING_CASES, ids=[case for case, _, _ in DOING_CASES]
)
def test_doing(case: str, value: ThreadStack, expected: str) -> None:
    assert doing(value) == expected


def test_the_cases_cover_every_answer_doing_gives() -> None:
    # The table above covers each of the words doing() can return.
    said = {expected.split(" (")[0] for _, _, expected in DOING_CASES}
    assert {
        "in uninterruptible I/O",
        "stopped",
        "exited",
        "waiting for the GIL",
        "holding the GIL in a C call",
        "running Python",
        "waiting on a lock",
        "waiting for another thread to finish",
        "sleeping",
        "waiting for I/O",
        "waiting for a child process",
        "waiting for a signal",
        "waiting in the collective all_reduce",
        "waiting for the GPU in synchronize",
        "running a C call",
        "blocked in the kernel",
        "idle",
        "running",
        "blocked",
        "",
    } <= said


# -- focus -----------------------------------------------------------------------------


def capture_of(*threads: ThreadStack, pid: int = 100, **kw: object) -> Capture:
    return Capture(pid=pid, threads=list(threads), **kw)  # type: ignore[arg-type]


MAIN = thread(USER, tid=100, name="MainThread", state="S")
HOLDER = thread(USER, tid=101, name="holder", gil=True, active=True)
ACTIVE = thread(USER, tid=102, name="busy", active=True, gil=False)
IN_D = thread(USER, tid=103, name="reader", state="D")
OTHER = thread(USER, tid=104, name="other", state="S")


@pytest.mark.parametrize(
    ("threads", "chosen"),
    [
        ((OTHER, MAIN, ACTIVE, HOLDER, IN_D), IN_D),  # D beats everything
        ((OTHER, MAIN, ACTIVE, HOLDER), HOLDER),  # then the GIL holder
        ((OTHER, MAIN, ACTIVE), ACTIVE),  # then an active thread
        ((OTHER, MAIN), MAIN),  # then the main thread
        ((OTHER, thread(USER, tid=105)), OTHER),  # then the first
    ],
)
def test_focus_prefers_d_then_the_gil_then_active_then_main(
    threads: Tuple[ThreadStack, ...], chosen: ThreadStack
) -> None:
    assert focus(capture_of(*threads)) == chosen


def test_focus_finds_the_main_thread_by_its_id_when_it_has_no_name() -> None:
    unnamed_main = thread(USER, tid=100)
    assert focus(capture_of(OTHER, unnamed_main, pid=100)) == unnamed_main


def test_focus_prefers_a_thread_with_frames_among_equals() -> None:
    bare = thread(tid=110, state="D")  # from /proc only
    with_frames = thread(USER, tid=111, state="D")
    assert focus(capture_of(bare, with_frames)) == with_frames
    assert focus(capture_of(bare)) == bare


def test_focus_of_a_capture_without_threads_is_none() -> None:
    assert focus(Capture(pid=1)) is None


def test_focus_passes_over_the_client_librarys_threads_and_exited_ones() -> None:
    # py-spy saw the client's watch active (it looks every second): the summary named it
    # as the stuck stack, "_watch at _channel.py:725", the worker's main thread after it.
    # And a main thread that had exited, while the threads that hang ran on.
    client = py("_watch", f"{PY}/site-packages/ftimer_client/_channel.py", 725)
    watch = thread(client, tid=120, name="ftimer-client-watch", active=True)
    exited = thread(USER, tid=100, name="MainThread", state="Z")
    assert focus(capture_of(watch, MAIN)) == MAIN
    assert focus(capture_of(exited, OTHER)) == OTHER
    assert focus(capture_of(watch, exited)) == watch  # nothing else: the first rule's
    # The worker's own thread named so is not the library's: it runs the worker's code.
    named_so = thread(USER, tid=121, name="ftimer-client-watch", active=True)
    assert focus(capture_of(named_so, MAIN)) == named_so


def test_the_client_librarys_thread_read_by_the_hook_is_known_by_what_it_runs() -> None:
    # The hook (faulthandler) knows no thread names: the client's watch, named by its
    # ident, was shown in full as if it were the worker's.
    start = (py("_bootstrap", f"{PY}/threading.py", 1002), py("run", f"{PY}/threading.py", 982))
    client = py("_blocking", f"{PY}/site-packages/ftimer_client/_signals.py", 57)
    wait = py("wait", f"{PY}/threading.py", 331)
    watch = thread(*start, client, wait, tid=120, name="0x00007f01226616c0")
    assert client_thread(watch)
    assert focus(capture_of(watch, MAIN)) == MAIN
    # A thread of the worker's that calls the library runs the worker's code.
    user = py("step", "/app/train.py", 7)
    calls = thread(*start, user, client, tid=121, name="0x00007f01226616c1")
    assert not client_thread(calls)
    assert not client_thread(thread(*start, tid=122, name="0x00007f01226616c2"))
    # So does one whose target is an @expires function (the library's wrapper first).
    decorated = py("run", f"{PY}/site-packages/ftimer_client/_expires.py", 396)
    hung = thread(*start, decorated, user, name="Thread-1 (load)", state="D")
    assert not client_thread(hung)
    assert focus(capture_of(MAIN, hung)) == hung
    # And one whose outer frames were cut: what is kept does not say what it runs.
    cut = msgspec.structs.replace(thread(client, wait, tid=123), frames_cut=40)
    assert not client_thread(cut)


# -- groups ----------------------------------------------------------------------------

OUTER = (py("<module>", "/app/train.py", 120), py("main", "/app/train.py", 100))
IN_ALL_REDUCE = (
    *OUTER,
    py("train", "/app/train.py", 42),
    py("all_reduce", f"{TORCH}/distributed/distributed_c10d.py", 2050),
)
IN_LOADER = (
    *OUTER,
    py("train", "/app/train.py", 40),
    py("__next__", "/app/data.py", 17),
    py("recv_bytes", f"{PY}/multiprocessing/connection.py", 216),
)


def rank(
    r: int,
    frames: Sequence[Frame],
    role: str = "peer",
    host: str = "",
    labels: Optional[Dict[str, str]] = None,
    **flags: object,
) -> Capture:
    main = thread(*frames, tid=1000 + r, name="MainThread", **flags)  # type: ignore[arg-type]
    background = thread(py("wait", f"{PY}/threading.py", 324), tid=2000 + r, name="pin_memory")
    return Capture(
        pid=1000 + r,
        role=role,
        labels={"rank": str(r), "job": "71"} if labels is None else labels,
        method="py-spy",
        threads=[background, main],
        host=host,
    )


def test_seven_ranks_in_all_reduce_and_the_outlier_in_its_data_loader() -> None:
    captures = [
        rank(r, IN_LOADER if r == 3 else IN_ALL_REDUCE, "stuck" if r == 0 else "peer")
        for r in range(8)
    ]
    outlier, rest = group(captures)
    assert outlier.pids == [1003]
    assert outlier.ranks == ["3"]
    assert outlier.frames == stack(*IN_LOADER)
    assert outlier.doing == "waiting for I/O"
    assert outlier.summary == (
        "rank 3 in train at train.py:40 ... __next__ at data.py:17 ... "
        "recv_bytes at connection.py:216 (waiting for I/O)"
    )
    assert rest.pids == [1000, 1001, 1002, 1004, 1005, 1006, 1007]
    assert rest.ranks == ["0", "1", "2", "4", "5", "6", "7"]
    assert rest.doing == "waiting in the collective all_reduce"
    assert rest.summary == (
        "7 ranks (0-2,4-7) in train at train.py:42 ... all_reduce at distributed_c10d.py:2050 "
        "(waiting in the collective all_reduce)"
    )
    assert rest.hosts == outlier.hosts == []


def test_ranks_that_diverge_deep_in_the_stack_are_told_apart_where_they_diverge() -> None:
    shared = tuple(py(f"layer{i}", "/app/model.py", 10 + i) for i in range(12))
    a = (*shared, py("forward", "/app/model.py", 200), py("wait", f"{PY}/threading.py", 320))
    b = (*shared, py("forward", "/app/model.py", 230), py("wait", f"{PY}/threading.py", 320))
    groups = group([rank(0, a, "stuck"), rank(1, b), rank(2, a), rank(3, b)])
    # Two groups of two: the stuck worker's first; each named at the frame after the
    # twelve they share, then their innermost frame.
    assert [g.ranks for g in groups] == [["0", "2"], ["1", "3"]]
    assert [g.summary for g in groups] == [
        "2 ranks (0,2) in forward at model.py:200 ... wait at threading.py:320 (waiting on a lock)",
        "2 ranks (1,3) in forward at model.py:230 ... wait at threading.py:320 (waiting on a lock)",
    ]


def test_a_group_alone_is_named_by_its_innermost_python_frame_and_the_users_line() -> None:
    frames = (*IN_ALL_REDUCE, c("ncclKernel", "libnccl.so"))
    [only] = group([rank(r, frames) for r in range(4)])
    assert only.summary == (
        "4 ranks (0-3) in train at train.py:42 ... all_reduce at distributed_c10d.py:2050 "
        "(waiting in the collective all_reduce)"
    )


@pytest.mark.parametrize(
    ("library", "expected"),
    [
        (f"{PY}/threading.py", "step at train.py:42 ... wait at threading.py:"),
        ("/opt/conda/lib/python3.13t/queue.py", "step at train.py:42 ... wait at queue.py:"),
        ("/usr/lib/python3/dist-packages/zmq/a.py", "step at train.py:42 ... wait at a.py:"),
        ("<frozen importlib._bootstrap>", "step at train.py:42 ... wait at <frozen importlib."),
        # The user's own code innermost: named alone, as before.
        ("/app/helpers.py", "wait at helpers.py:320"),
    ],
)
def test_a_stack_ending_in_a_library_names_the_users_innermost_line_too(
    library: str, expected: str
) -> None:
    # py-spy's path of a worker's frame says whose code it is; a library's innermost
    # frame says what the worker waits for, the user's line says where in their code.
    frames = (
        *OUTER,
        py("step", "/app/train.py", 42),
        py("call", f"{TORCH}/nn/module.py", 1500),
        py("wait", library, 320),
        c("pthread_cond_wait", "libc.so.6"),
    )
    [only] = group([rank(r, frames) for r in range(2)])
    assert only.summary.startswith(f"2 ranks (0,1) in {expected}")


def test_a_stack_that_is_a_prefix_of_another_is_named_by_its_innermost_frame() -> None:
    deeper = (*IN_ALL_REDUCE, py("wait", f"{PY}/threading.py", 320))
    groups = group([rank(0, IN_ALL_REDUCE), rank(1, deeper), rank(2, deeper)])
    assert [g.summary for g in groups] == [
        "rank 0 in train at train.py:42 ... all_reduce at distributed_c10d.py:2050 "
        "(waiting in the collective all_reduce)",
        "2 ranks (1,2) in train at train.py:42 ... wait at threading.py:320 (waiting on a lock)",
    ]


def test_the_same_stack_doing_something_else_is_another_group() -> None:
    # Seven ranks blocked in a read, one in D state at the same line: the outlier.
    frames = (*OUTER, py("load", "/app/data.py", 9), py("readinto", f"{PY}/socket.py", 707))
    captures = [rank(r, frames, state="D" if r == 5 else "S") for r in range(8)]
    outlier, rest = group(captures)
    assert outlier.ranks == ["5"]
    assert outlier.summary.startswith(
        "rank 5 in load at data.py:9 ... readinto at socket.py:707 (in uninterruptible I/O"
    )
    assert rest.summary == (
        "7 ranks (0-4,6,7) in load at data.py:9 ... readinto at socket.py:707 (waiting for I/O)"
    )


def test_workers_without_a_stack_are_grouped_by_why() -> None:
    eperm = "py-spy: ptrace not permitted (EPERM): run the server as root or grant CAP_SYS_PTRACE"
    captures = [
        rank(0, IN_ALL_REDUCE, "stuck"),
        Capture(pid=4242, method="py-spy", error=eperm),
        Capture(pid=4243, method="py-spy", error=eperm),
        Capture(pid=4244, method="hook", exited=True),
        Capture(pid=4245, threads=[ThreadStack(tid=4245, state="D", wchan="nfs_wait")]),
        Capture(pid=4246, method="hook"),
        # As the capture says when every method failed: the summary says it once.
        Capture(pid=4247, method="none", error="no stacks: py-spy failed (exit 1): boom"),
    ]
    groups = group(captures)
    assert [g.summary for g in groups] == [
        "rank 0 in train at train.py:42 ... all_reduce at distributed_c10d.py:2050 "
        "(waiting in the collective all_reduce)",
        "pid 4244 (no stack: exited during the capture)",
        "pid 4245 (in uninterruptible I/O (D state, in nfs_wait: py-spy cannot stop it); "
        "no stack: no capture method: /proc facts only)",
        "pid 4246 (no stack: hook gave no frames)",
        "pid 4247 (no stack: py-spy failed (exit 1): boom)",
        f"2 workers (pids 4242, 4243) (no stack: {eperm})",
    ]
    assert all(g.frames == [] for g in groups[1:])


def test_the_same_stack_with_unnamed_native_frames_at_other_addresses_is_one_group() -> None:
    # py-spy --native names a libc frame it cannot resolve by its address, which ASLR
    # makes another in each process: every thread but a main one starts with two such
    # (clone, start_thread), and eight ranks in one place made eight groups.
    def ranked(r: int, base: int) -> Capture:
        frames = (
            c(f"0x{base + 0x71F5:x}", "libc.so.6"),
            c(f"0x{base + 0x78EC:x}", "libc.so.6"),
            c("thread_run", "libpython3.11.so.1.0"),
            py("_bootstrap", f"{PY}/threading.py", 1002),
            py("loader", "/app/data.py", 30),
            py("wait", f"{PY}/threading.py", 320),
        )
        return Capture(pid=1000 + r, labels={"rank": str(r)}, threads=[thread(*frames, tid=1)])

    captures = [ranked(r, 0x7F5488600000 + r * 0x1000000) for r in range(3)]
    [g] = group(captures)
    assert g.pids == [1000, 1001, 1002]
    assert call_tree(captures)[0] == "3  _bootstrap at threading.py:1002"
    assert g.frames[-1].function == "0x7f54886071f5"  # the record keeps rank 0's address


def test_a_stuck_rank_read_with_native_frames_groups_with_its_peers_read_without() -> None:
    # --py-spy-native: the stuck worker's stack has native frames, its peers' (read
    # without stopping them) none. They shared no frame: every rank its own group, the
    # stuck one "in ?? (libc.so.6)", and the call tree split at its root.
    python = (*OUTER, py("train", "/app/train.py", 42), py("wait", f"{PY}/threading.py", 320))
    native = (
        c("0x7f0a10c4524a", "libc.so.6"),
        *python[:2],
        c("_PyEval_EvalFrameDefault", "libpython3.11.so.1.0"),
        *python[2:],
        c("pthread_cond_wait", "libc.so.6"),
    )
    captures = [rank(0, native, "stuck")] + [rank(r, python) for r in (1, 2)]
    [g] = group(captures)
    assert g.ranks == ["0", "1", "2"]
    assert g.summary == (
        "3 ranks (0-2) in train at train.py:42 ... wait at threading.py:320 (waiting on a lock)"
    )
    assert call_tree(captures)[0] == "3  <module> at train.py:120"
    # What they do compared alike too: a collective whose native wait is NCCL's sleeping
    # loop; a busy loop, "running Python" where native frames tell, a caveat where not.
    nccl = (*IN_ALL_REDUCE, c("clock_nanosleep", "libc.so.6"))
    [g] = group([rank(0, nccl, "stuck")] + [rank(r, IN_ALL_REDUCE) for r in (1, 2)])
    assert g.summary.endswith("(waiting in the collective all_reduce)")
    evaluating = (*python, c("_PyEval_EvalFrameDefault", "libpython3.11.so.1.0"))
    busy = {"gil": True, "active": True, "state": "R"}
    [g] = group([rank(0, evaluating, "stuck", **busy), rank(1, python, **busy)])
    assert g.summary.endswith("(running Python)")
    [g] = group([rank(r, python, **busy) for r in (1, 2)])
    assert g.summary.endswith(
        "(running Python, or a C call that holds the GIL (--py-spy-native tells))"
    )


def test_a_thread_that_joins_another_is_said_with_the_threads_it_may_wait_for() -> None:
    # The summary named the main thread's join, the line that waits: the two threads of a
    # deadlock, or a prefetcher stuck in a read, were only in the worker's section.
    joins = thread(
        USER,
        py("deadlock", "/app/w.py", 32),
        py("join", f"{PY}/threading.py", 1112),
        py("_wait_for_tstate_lock", f"{PY}/threading.py", 1139),
        tid=100,
        name="MainThread",
    )
    loader = [
        thread(py("take", "/app/w.py", 24), py("acquire", f"{PY}/threading.py", 50), tid=t, name=n)
        for t, n in ((101, "loader-A"), (102, "loader-B"))
    ]
    idle = thread(py("idle", "/app/w.py", 60), tid=103, name="idle")
    client = py("_watch", f"{PY}/site-packages/ftimer_client/_channel.py", 725)
    watch = thread(client, tid=104, name="ftimer-client-watch")
    capture = Capture(pid=100, labels={"rank": "1"}, threads=[joins, *loader, idle, watch])
    [g] = group([capture])
    assert g.summary == (
        "rank 1 in deadlock at w.py:32 ... _wait_for_tstate_lock at threading.py:1139 "
        "(waiting for another thread to finish; other threads: 'loader-A' in take at w.py:24, "
        "waiting on a lock; 'loader-B' in take at w.py:24, waiting on a lock; 1 more)"
    )
    # Of a group, one worker's threads, said as its; the likeliest first (its own code
    # before a pool's idle workers, in the library alone); names cut and quoted.
    pool = [
        thread(py("get", f"{PY}/queue.py", 171), tid=200 + n, name=f"ThreadPoolExecutor-0_{n}")
        for n in range(5)
    ]
    forged = 'a", waiting; "b' + "x" * 50  # as if two threads, and long
    reader = thread(py("load", "/app/w.py", 9), tid=300, name=forged)
    ranks = [
        Capture(pid=100 + r, labels={"rank": str(r)}, threads=[joins, *pool, reader])
        for r in range(2)
    ]
    [g] = group(ranks)
    assert g.summary == (
        "2 ranks (0,1) in deadlock at w.py:32 ... _wait_for_tstate_lock at threading.py:1139 "
        "(waiting for another thread to finish; as for rank 0, other threads: "
        f"{forged[:40] + '...'!r} in load at w.py:9; "
        "'ThreadPoolExecutor-0_0' in get at queue.py:171, waiting on a lock; 4 more)"
    )


def test_workers_whose_captures_failed_alike_are_one_group_whatever_the_durations() -> None:
    # "py-spy did not finish within 30.04s" and "... 30.03s": two groups of one text.
    captures = [
        Capture(
            pid=4250 + i,
            labels={"rank": str(i)},
            method="facts",
            error=f"no stacks: py-spy did not finish within 30.0{i}s and was killed: thread "
            f"{4250 + i} is in uninterruptible sleep",
        )
        for i in range(3)
    ]
    [g] = group(captures)
    # Said as the first's, and said to be the first's: its thread is not the others'.
    assert g.summary == (
        "3 ranks (0-2) (no stack: as for rank 0: py-spy did not finish within 30.00s and was "
        "killed: thread 4250 is in uninterruptible sleep)"
    )


def test_workers_without_rank_labels_are_named_by_pid() -> None:
    captures = [rank(r, IN_ALL_REDUCE, labels={}) for r in range(2)] + [rank(2, IN_ALL_REDUCE)]
    [g] = group(captures)
    assert g.summary.startswith("3 workers (ranks 2; pids 1000, 1001) in train at train.py:42")
    assert g.ranks == ["2"]


def test_workers_of_several_hosts_keep_their_host_and_are_told_apart_by_it() -> None:
    # The same pid on two hosts is two workers.
    a = Capture(pid=50, labels={"rank": "0"}, host="node-a", threads=[thread(*IN_ALL_REDUCE)])
    b = Capture(pid=50, labels={"rank": "8"}, host="node-b", threads=[thread(*IN_ALL_REDUCE)])
    odd = Capture(pid=51, labels={"rank": "9"}, host="node-b", threads=[thread(*IN_LOADER)])
    outlier, rest = group([a, b, odd])
    assert (outlier.pids, outlier.hosts) == ([51], ["node-b"])
    assert outlier.summary.startswith("rank 9 on node-b in train at train.py:40")
    assert (rest.pids, rest.hosts) == ([50, 50], ["node-a", "node-b"])
    assert rest.summary.startswith("2 ranks (0,8) on 2 hosts in train at train.py:42")


def test_long_rank_lists_are_cut() -> None:
    [g] = group([rank(r, IN_ALL_REDUCE) for r in range(0, 40, 2)])
    assert g.summary.startswith("20 ranks (0,2,4,6,8,10,12,14,... 12 more) in train at train.py:42")


def test_no_captures_no_groups() -> None:
    assert group([]) == []


# -- the call-prefix tree --------------------------------------------------------------


def test_call_tree_shows_shared_frames_once_and_branches_smallest_first() -> None:
    captures = [rank(r, IN_LOADER if r == 3 else IN_ALL_REDUCE) for r in range(8)]
    captures.append(Capture(pid=9, error="no stack"))  # left out
    assert call_tree(captures) == [
        "8  <module> at train.py:120",
        "8  main at train.py:100",
        "1  + train at train.py:40",
        "1    __next__ at data.py:17",
        "1    recv_bytes at connection.py:216",
        "7  + train at train.py:42",
        "7    all_reduce at distributed_c10d.py:2050",
    ]


def test_call_tree_of_nothing_is_empty() -> None:
    assert call_tree([Capture(pid=1)]) == []


# -- properties ------------------------------------------------------------------------

ALPHABET = [
    *(py(f"f{i}", f"/app/m{i % 2}.py", i) for i in range(4)),
    py("join", f"{PY}/threading.py", 1112),  # a join: the summary names other threads
    c("poll"),
    c("take_gil", "libpython3.11.so.1.0"),
    c("0x7f5488600000"),  # a native frame py-spy names by its address, another in each
    c("0x7f1100000000"),
]


@st.composite
def captures(draw: st.DrawFn) -> List[Capture]:
    """Workers with unique (host, pid), stacks drawn from a few frames so they collide."""
    n = draw(st.integers(0, 14))
    identities = draw(
        st.lists(
            st.tuples(st.sampled_from(["", "a", "b"]), st.integers(1, 30)),
            min_size=n,
            max_size=n,
            unique=True,
        )
    )
    result = []
    for i, (host, pid) in enumerate(identities):
        threads = draw(
            st.lists(
                st.builds(
                    ThreadStack,
                    tid=st.integers(1, 40),
                    name=st.sampled_from(["", "MainThread", "ftimer-client-watch", "a\n\x1b"]),
                    frames=st.lists(st.sampled_from(ALPHABET), max_size=4),
                    state=st.sampled_from([None, "S", "R", "D", "Z"]),
                    gil=st.sampled_from([None, True, False]),
                    active=st.sampled_from([None, True, False]),
                ),
                max_size=3,
            )
        )
        labels = draw(st.sampled_from([None, {"rank": str(i)}]))
        role = "stuck" if i == 0 else "peer"
        error = draw(st.sampled_from([None, "EPERM"]))
        result.append(
            Capture(pid=pid, host=host, role=role, labels=labels, threads=threads, error=error)
        )
    return result


def identities(g: Group) -> List[Tuple[str, int]]:
    return list(zip(g.hosts or [""] * len(g.pids), g.pids))


@settings(max_examples=300, deadline=None)
@given(captures(), st.randoms(use_true_random=False))
def test_grouping_properties(workers: List[Capture], rnd: random.Random) -> None:
    groups = group(workers)
    by_identity = {(w.host, w.pid): w for w in workers}
    # Every worker is in exactly one group.
    assert sorted(i for g in groups for i in identities(g)) == sorted(by_identity)
    # Smallest groups first; among groups of one size, the stuck worker's first.
    sizes = [len(g.pids) for g in groups]
    assert sizes == sorted(sizes)
    for size in set(sizes):
        same = [g for g in groups if len(g.pids) == size]
        holding = [
            n
            for n, g in enumerate(same)
            if any(by_identity[i].role == "stuck" for i in identities(g))
        ]
        assert holding in ([], [0])
    # The members of a group share the frames of their focus thread as stacks are
    # compared (Python frames), and each group says something.
    for g in groups:
        for i in identities(g):
            chosen = focus(by_identity[i])
            assert _comparable(chosen.frames if chosen else []) == _comparable(g.frames)
        assert g.summary
    # The order of the captures does not matter.
    shuffled = list(workers)
    rnd.shuffle(shuffled)
    assert group(shuffled) == groups
    # The tree's first line counts every worker with frames when they all share a root
    # frame, and never more.
    with_frames = [w for w in workers if (f := focus(w)) is not None and f.frames]
    tree = call_tree(workers)
    assert bool(tree) == bool(with_frames)
    if tree:
        assert int(tree[0].split()[0]) <= len(with_frames)


@settings(max_examples=300, deadline=None)
@given(
    st.builds(
        ThreadStack,
        tid=st.integers(1, 9),
        frames=st.lists(
            st.one_of(
                st.sampled_from(ALPHABET),
                st.builds(
                    Frame,
                    st.text(max_size=12),
                    st.text(max_size=20),
                    st.integers(0, 9),
                    st.booleans(),
                ),
            ),
            max_size=5,
        ),
        state=st.one_of(st.none(), st.text(max_size=2)),
        wchan=st.one_of(st.none(), st.text(max_size=20)),
        active=st.sampled_from([None, True, False]),
        gil=st.sampled_from([None, True, False]),
    )
)
def test_doing_never_fails_and_says_something_whenever_anything_is_known(t: ThreadStack) -> None:
    said = doing(t)
    assert isinstance(said, str)
    if t.active is not None or t.gil or (t.state or "").strip()[:1] in ("D", "R", "S", "T", "Z"):
        assert said
