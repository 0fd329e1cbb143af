"""Capturing stuck workers with real processes: py-spy, the worker's faulthandler hook,
and the /proc facts alone; stand-ins for a py-spy refused by ptrace and one that hangs;
core dumps with gcore; the reap of a worker's descendants.

Every process signalled here is one these tests started (``stuck_worker.py``, in a
session of its own, killed whole at the end of each test) or a child of one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import json
import logging
import os
import pathlib
import select
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any, Callable, Dict, List, Optional, Set, Tuple

import pytest
from tests.conftest import wait_until

from ftimer_protocol import DumpHook
from ftimer_server import Descendant
from ftimer_server.core._incident import Capture, ThreadStack
from ftimer_server.incidents import _dump_hook, _pinned, _procfs, _reap_extras, _tools
from ftimer_server.incidents._capture import CaptureOptions, _paired, capture, find_py_spy
from ftimer_server.incidents._diagnostics import Diagnostics, IncidentOptions
from ftimer_server.incidents._pinned import Process
from ftimer_server.incidents._procfs import ThreadFacts, non_dumpable, read_stat, read_threads
from ftimer_server.incidents._reap_extras import core_dump, signal_again, signal_tree
from ftimer_server.incidents._stack_formats import (
    MethodResult,
    match_thread_idents,
    parse_faulthandler,
    parse_py_spy,
)

from .conftest import AS_NOBODY, held_in_d, need_nobody

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs /proc")

WORKER = pathlib.Path(__file__).with_name("stuck_worker.py")
ROOT = os.geteuid() == 0
HOOK = signal.SIGUSR2
#: How late a capture may return after its deadline (a loaded CI machine included).
MARGIN = 0.25


class Worker:
    """A stuck worker these tests started: its ready line, and where its hook writes."""

    def __init__(self, proc: subprocess.Popen[bytes], info: Dict[str, Any]) -> None:
        self.proc = proc
        self.pid: int = info["pid"]
        self.info = info
        self.tids: Dict[str, int] = info["tids"]

    @property
    def hook(self) -> DumpHook:
        return DumpHook(signal=HOOK, fd=self.info["fd"])

    def state(self) -> str:
        return read_stat(self.pid).state

    def settle(self, kind: str) -> None:
        """Wait until it is where it gets stuck: its ready line comes just before."""
        if kind == "busy":
            # Spinning, as its CPU time shows: 20 ms of it since the ready line.
            start = _cpu_ticks(self.pid)
            wait_for(lambda: _cpu_ticks(self.pid) >= start + 2)
            return
        if kind == "sleep-beside-busy":  # the spinner never sleeps
            wait_for(lambda: _sleeps(_wchan(self.pid, self.pid)))
            return
        # Every thread asleep, the main one in time.sleep or libc's sleep.
        wait_for(lambda: _all_asleep(self.pid) and _sleeps(_wchan(self.pid, self.pid)))

    def dump_text(self) -> str:
        """What its hook has written so far."""
        return pathlib.Path(f"/proc/{self.pid}/fd/{self.info['fd']}").read_text()


def _cpu_ticks(pid: int) -> int:
    data = pathlib.Path(f"/proc/{pid}/stat").read_bytes()
    fields = data[data.rindex(b")") + 2 :].split()
    return int(fields[11]) + int(fields[12])


def _sleeps(kernel_function: str) -> bool:
    """Whether a wait channel or kernel frame is time.sleep's: nanosleep, or on Python
    3.9 the select() it sleeps in."""
    return "nanosleep" in kernel_function or "poll_schedule_timeout" in kernel_function


def _wchan(pid: int, tid: int) -> str:
    return pathlib.Path(f"/proc/{pid}/task/{tid}/wchan").read_text()


def _all_asleep(pid: int) -> bool:
    return all(read_stat(pid, int(t)).state == "S" for t in os.listdir(f"/proc/{pid}/task"))


def _read_line(stream: Any, timeout: float) -> bytes:
    ready, _, _ = select.select([stream], [], [], timeout)
    if not ready:
        raise TimeoutError("the worker did not get ready in time")
    return bytes(stream.readline())


@contextlib.contextmanager
def stuck(kind: str, hook: bool = False, python: str = sys.executable) -> Iterator[Worker]:
    """Start a stuck worker in its own session; kill the whole session at the end."""
    args = [python, str(WORKER), kind, *(["--hook"] if hook else [])]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, start_new_session=True)
    try:
        worker = Worker(proc, json.loads(_read_line(proc.stdout, 20)))
        if kind not in ("tree", "forker"):  # their processes come and go
            worker.settle(kind)
        yield worker
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # its session, its group: ours alone
        proc.wait(10)
        assert proc.stdout is not None
        proc.stdout.close()


def wait_for(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    """Look until ``predicate()`` holds: thread states and process exits raise no event
    another process can wait on."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        time.sleep(0.002)


def run(
    worker: Worker,
    options: CaptureOptions,
    *,
    hook: Optional[DumpHook] = None,
    budget: float = 5.0,
    start_time: Optional[int] = None,
    pidfd: Optional[int] = None,
) -> Capture:
    return capture(
        worker.pid,
        start_time,
        pidfd,
        role="stuck",
        labels={"rank": "0"},
        hook=hook,
        options=options,
        deadline=time.monotonic() + budget,
    )


def capture_peer(pid: int, py_spy: str) -> Capture:
    """Capture ``pid`` as a peer of job "j" is (read by py-spy without being stopped)."""
    return capture(
        pid,
        None,
        None,
        role="peer",
        labels={"job": "j"},
        hook=None,
        options=CaptureOptions(py_spy=py_spy),
        deadline=time.monotonic() + 5,
    )


def thread_in(c: Capture, function: str) -> ThreadStack:
    """The one thread whose stack passes through ``function`` of the worker script."""
    found = [
        t
        for t in c.threads
        if any(f.function == function and f.file.endswith("stuck_worker.py") for f in t.frames)
    ]
    assert len(found) == 1, f"{function}: {[(t.tid, t.frames[:2]) for t in c.threads]}"
    return found[0]


@pytest.fixture(scope="module")
def py_spy() -> str:
    path = find_py_spy()
    if path is None:
        pytest.skip("py-spy is not installed (the tests session installs ftimer-server[pyspy])")
    return path


@pytest.fixture(scope="module")
def python_before_3_11() -> str:
    """A Python 3.9 or 3.10 on this machine: this one, one on PATH, or pyenv's."""
    found = [sys.executable, shutil.which("python3.10"), shutil.which("python3.9")]
    found += sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.*/bin/python3")))
    for python in filter(None, found):
        run = subprocess.run(
            [python, "-c", "import sys; print(sys.version_info[:2] in ((3, 9), (3, 10)))"],
            capture_output=True,
            text=True,
        )
        if run.stdout.strip() == "True":
            return python
    pytest.skip("no Python 3.9 or 3.10 here (python3.10, python3.9, pyenv's)")


@pytest.fixture(params=["py-spy", "hook", "facts"])
def method(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def options_for(method: str, request: pytest.FixtureRequest) -> CaptureOptions:
    if method == "py-spy":
        return CaptureOptions(py_spy=request.getfixturevalue("py_spy"), hook=False)
    return CaptureOptions(py_spy=None, hook=method == "hook")


def capture_stuck(
    worker: Worker, method: str, request: pytest.FixtureRequest, **kw: Any
) -> Capture:
    c = run(worker, options_for(method, request), hook=worker.hook, **kw)
    assert c.method == method, c.error
    assert not c.exited
    assert c.facts is not None
    assert c.facts.threads == len(os.listdir(f"/proc/{worker.pid}/task"))
    assert {t.tid for t in c.threads} >= set(map(int, os.listdir(f"/proc/{worker.pid}/task")))
    if method == "facts":
        assert c.error is not None
        assert c.error.startswith("no stacks")
        assert all(not t.frames for t in c.threads)
    else:
        assert c.raw
    assert worker.state() not in "Tt"  # never left stopped
    return c


# Stuck workers of each kind, by each method ----------------------------------------


def test_sleep(method: str, request: pytest.FixtureRequest) -> None:
    with stuck("sleep", hook=True) as worker:
        c = capture_stuck(worker, method, request)
        main = next(t for t in c.threads if t.tid == worker.pid)
        assert main.state == "S"
        if ROOT:
            assert main.kernel_stack
            assert any(_sleeps(f) for f in main.kernel_stack)
        if method != "facts":
            assert thread_in(c, "stuck_in_sleep").tid == worker.pid
            assert c.threads[0].frames[0].function == "stuck_in_sleep"  # innermost first
        if method == "py-spy":
            assert main.name == "MainThread"
            assert main.gil is False


def test_c_call_holding_the_gil(method: str, request: pytest.FixtureRequest) -> None:
    with stuck("cgil", hook=True) as worker:
        c = capture_stuck(worker, method, request)
        main = next(t for t in c.threads if t.tid == worker.pid)
        assert main.state == "S"
        if method != "facts":
            frame = thread_in(c, "stuck_in_c").frames[0]
            assert frame.file.endswith("stuck_worker.py")
            assert frame.line > 0
        if method == "py-spy":
            assert main.gil is True


def test_c_call_native_frames(py_spy: str) -> None:
    with stuck("cgil") as worker:
        c = run(worker, CaptureOptions(py_spy=py_spy, native=True))
        assert c.method == "py-spy", c.error
        main = thread_in(c, "stuck_in_c")
        native = [f.function for f in main.frames if f.native]
        assert "sleep" in native or any("nanosleep" in f for f in native), main.frames
        python = [f for f in main.frames if not f.native]
        assert python[0].function == "stuck_in_c"


def test_native_failure_falls_back_to_python_frames(py_spy: str, tmp_path: pathlib.Path) -> None:
    fake = fake_py_spy(
        tmp_path,
        'for a in "$@"; do\n'
        '  [ "$a" = --native ] && { echo "Error: unwind failed" >&2; exit 1; }\n'
        "done\n"
        f'exec {py_spy} "$@"\n',
    )
    with stuck("cgil") as worker:
        c = run(worker, CaptureOptions(py_spy=fake, native=True))
        assert c.method == "py-spy"
        assert not any(f.native for t in c.threads for f in t.frames)
        assert thread_in(c, "stuck_in_c")
        assert c.error is not None
        assert c.error.startswith("py-spy failed (exit 1): Error: unwind failed; without --native")


def test_deadlock(method: str, request: pytest.FixtureRequest) -> None:
    with stuck("deadlock", hook=True) as worker:
        left, right = worker.tids["left"], worker.tids["right"]

        wait_for(lambda: all("futex" in _wchan(worker.pid, t) for t in (left, right)))
        c = capture_stuck(worker, method, request)
        by_tid = {t.tid: t for t in c.threads}
        for tid in (left, right):
            assert by_tid[tid].state == "S"
            assert by_tid[tid].wchan is not None
            assert "futex" in by_tid[tid].wchan
        if method == "py-spy":
            assert thread_in(c, "take_a_then_b").tid == left
            assert thread_in(c, "take_b_then_a").tid == right
            assert not by_tid[left].gil
            assert not by_tid[right].gil
            assert by_tid[left].name == "left"
        elif method == "hook":
            # Blocked threads are paired with their kernel ids through their stacks.
            assert thread_in(c, "take_a_then_b").tid == left
            assert thread_in(c, "take_b_then_a").tid == right
            assert thread_in(c, "stuck_in_sleep").tid == worker.pid


def test_busy_loop(method: str, request: pytest.FixtureRequest) -> None:
    with stuck("busy", hook=True) as worker:
        c = capture_stuck(worker, method, request)
        main = next(t for t in c.threads if t.tid == worker.pid)
        assert main.state == "R"
        if method != "facts":
            assert thread_in(c, "spin").frames[0].function == "spin"
        if method == "py-spy":
            assert main.active is True
            assert main.gil is True


def test_a_thread_running_beside_the_stuck_main_one_leaves_it_its_stack() -> None:
    # The dump hook paired its stacks with thread ids only where every thread but the
    # main one was asleep: one running thread (a loader's, a logger's) left the main
    # thread without frames, and the summary said the hook gave none.
    with stuck("sleep-beside-busy", hook=True) as worker:
        c = run(worker, CaptureOptions(), hook=worker.hook)
        assert c.method == "hook"
        main = next(t for t in c.threads if t.tid == worker.pid)
        assert main.frames[0].function == "stuck_in_sleep"


def test_fifty_threads(method: str, request: pytest.FixtureRequest) -> None:
    with stuck("threads50", hook=True) as worker:
        c = capture_stuck(worker, method, request)
        assert len(c.threads) == 51
        if method != "facts":
            parked = [t for t in c.threads if any(f.function == "park" for f in t.frames)]
            assert len(parked) == 50
            assert thread_in(c, "stuck_in_sleep")
        if method == "py-spy":
            assert {t.name for t in parked} == {f"parked-{i}" for i in range(50)}
        if method == "hook":
            assert all(t.tid for t in c.threads)  # every blocked thread paired


@pytest.mark.parametrize(
    ("method", "wanted"), [("auto", True), ("py-spy", True), ("hook", False), ("facts", False)]
)
def test_only_the_methods_that_use_py_spy_call_it_missing(method: str, wanted: bool) -> None:
    diagnostics = Diagnostics(IncidentOptions(method=method))
    try:
        assert diagnostics._capture_options.wants_py_spy is wanted
    finally:
        diagnostics.close()


def test_facts() -> None:
    with stuck("facts") as worker:
        kid = worker.info["child"]
        wait_until(
            lambda: read_stat(kid).state == "S" and _comm(kid) == "data-worker",
            what="the child asleep",
        )
        c = run(worker, CaptureOptions(hook=False, wants_py_spy=False))  # method "facts"
        facts = c.facts
        assert facts is not None
        assert facts.cmdline[1:] == [str(WORKER), "facts"]
        assert facts.state == "S"
        assert facts.threads == 1
        assert facts.uid == os.getuid()
        assert facts.children == [kid]
        [state] = facts.child_states
        assert (state.pid, state.name, state.state) == (kid, "data-worker", "S")
        assert state.wchan  # where it sleeps: the kernel's name, which varies
        assert facts.rss > 1 << 20
        assert 0 < facts.age < 60
        assert facts.sockets == 2
        assert facts.fifos == 4  # stdout's pipe, the pipe's two ends, the named FIFO
        assert c.start_time == read_stat(worker.pid).start_time
        assert c.role == "stuck"
        assert c.labels == {"rank": "0"}
        # Not "not installed": py-spy may well be (it was said so, whatever the method).
        assert "py-spy: not enabled; dump hook: not enabled" in (c.error or "")


def _comm(pid: int) -> str:
    with open(f"/proc/{pid}/comm") as f:
        return f.read().strip()


def test_an_open_file_on_a_hung_file_system_leaves_the_stacks_their_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Where a worker's open files lead is looked at with stat(), which reaches their file
    # system: one on a hung mount (a frozen FUSE server, an NFS server gone) held the
    # whole budget, and neither py-spy nor the hook was tried ("no time left"), under a
    # note blaming the worker's memory lock. Here the named FIFO's stat() hangs.
    real_stat = os.stat
    released = threading.Event()

    def hung_stat(path: Any, *args: Any, **kwargs: Any) -> os.stat_result:
        if (
            str(path).startswith("/proc/")
            and os.path.islink(path)
            and os.readlink(path).endswith("/fifo")
        ):
            released.wait(30)  # as the kernel would, until the mount answers
        return real_stat(path, *args, **kwargs)

    with stuck("facts", hook=True) as worker:
        monkeypatch.setattr(_procfs.os, "stat", hung_stat)
        try:
            c = run(worker, CaptureOptions(py_spy=None, hook=True), hook=worker.hook, budget=8)
        finally:
            released.set()
    assert c.method == "hook", c.error
    assert thread_in(c, "stuck_in_sleep")
    assert c.facts is not None
    assert c.facts.cmdline[1:] == [str(WORKER), "facts", "--hook"]
    [note] = [n for n in (c.error or "").split("; ") if "did not answer stat()" in n]
    assert note.startswith("open file (fd ")
    assert note.endswith("/fifo) did not answer stat() in time: its file system may be hung")


def test_peer_without_a_hook() -> None:
    with stuck("sleep") as worker:
        c = capture(
            worker.pid,
            None,
            None,
            role="peer",
            labels={"job": "j"},
            hook=None,
            options=CaptureOptions(),
            deadline=time.monotonic() + 2,
        )
        assert c.role == "peer"
        assert c.method == "facts"
        assert c.error is not None
        # Said as a choice: every rank of the review's job had announced one.
        assert c.error.endswith(
            "dump hook: not used on a peer (it is not reaped: the hook's "
            "signal would interrupt its system calls)"
        )


def test_caller_pidfd_is_used_and_left_open(py_spy: str) -> None:
    with stuck("sleep") as worker:
        pidfd = os.pidfd_open(worker.pid)
        try:
            c = run(worker, CaptureOptions(py_spy=py_spy), pidfd=pidfd)
            assert c.method == "py-spy"
            os.fstat(pidfd)  # still ours, still open
        finally:
            os.close(pidfd)


def test_pidfd_of_another_process_is_refused() -> None:
    with stuck("sleep", hook=True) as worker, stuck("sleep") as other:
        pidfd = os.pidfd_open(other.pid)
        try:
            c = run(worker, CaptureOptions(), hook=worker.hook, pidfd=pidfd)
        finally:
            os.close(pidfd)
        assert c.method == "none"  # nothing captured
        assert c.facts is None
        assert c.error == f"the pidfd given for process {worker.pid} refers to process {other.pid}"
        assert worker.dump_text() == ""


def test_find_py_spy_beside_the_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    beside = pathlib.Path(sys.executable).parent / "py-spy"
    monkeypatch.setenv("PATH", "/nonexistent")
    assert find_py_spy() == (str(beside) if beside.exists() else None)


# Fallbacks and refusals -------------------------------------------------------------

PTRACE_REFUSALS = [
    # What py-spy prints when process_vm_readv or ptrace fails with EPERM / EACCES.
    "Error: Operation not permitted (os error 1)",
    "Permission Denied: Try running again with elevated permissions by going "
    "'sudo env \"PATH=$PATH\" !!'",
]


def fake_py_spy(tmp_path: pathlib.Path, body: str) -> str:
    path = tmp_path / "py-spy"
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return str(path)


@pytest.mark.parametrize("message", PTRACE_REFUSALS)
def test_ptrace_refused_falls_back_to_the_hook(tmp_path: pathlib.Path, message: str) -> None:
    fake = fake_py_spy(tmp_path, f"echo '{message}' >&2\nexit 1\n")
    with stuck("sleep", hook=True) as worker:
        c = run(worker, CaptureOptions(py_spy=fake), hook=worker.hook)
        assert c.method == "hook"
        assert thread_in(c, "stuck_in_sleep").tid == worker.pid
        assert c.error is not None
        assert "ptrace not permitted" in c.error
        assert "CAP_SYS_PTRACE" in c.error
        assert message.split(maxsplit=1)[0] in c.error  # py-spy's own words follow


def test_ptrace_refused_without_a_hook(tmp_path: pathlib.Path) -> None:
    fake = fake_py_spy(tmp_path, f"echo '{PTRACE_REFUSALS[0]}' >&2\nexit 1\n")
    with stuck("sleep") as worker:
        c = run(worker, CaptureOptions(py_spy=fake))
        assert c.method == "facts"
        assert c.facts is not None
        assert c.facts.state == "S"
        assert c.error is not None
        assert c.error.startswith("no stacks: py-spy cannot attach")
        assert "the worker announced none" in c.error


# A py-spy that stops its target (as ptrace's attach does), then hangs.
HANGING = """
while [ "$#" -gt 0 ]; do
  if [ "$1" = --pid ]; then kill -STOP "$2"; fi
  shift
done
exec sleep 600
"""


@pytest.mark.parametrize("hook", [True, False], ids=["then-hook", "no-hook"])
def test_hanging_py_spy_is_killed_by_the_deadline(tmp_path: pathlib.Path, hook: bool) -> None:
    fake = fake_py_spy(tmp_path, HANGING)
    with stuck("sleep", hook=hook) as worker:
        started = time.monotonic()
        c = run(worker, CaptureOptions(py_spy=fake), hook=worker.hook if hook else None, budget=1)
        elapsed = time.monotonic() - started
        assert elapsed <= 1 + MARGIN
        assert worker.state() not in "Tt"  # continued after the stand-in stopped it
        assert c.error is not None
        assert "py-spy did not finish" in c.error
        # The hook keeps a share of the budget, so a hung py-spy still leaves it time.
        assert c.method == ("hook" if hook else "facts")
        if hook:
            assert thread_in(c, "stuck_in_sleep")
    # The stand-in's whole process group was killed with it.
    assert not list(_pids_running(fake))


def test_a_py_spy_that_writes_without_end_is_killed_at_its_limit(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Its output was read whole until it exited or the deadline came: a worker's stacks
    # are as large as it makes them, and 300 MB of them took the helper to 900 MB.
    monkeypatch.setattr(_tools, "MAX_OUTPUT", 1 << 20, raising=False)
    # Not exec: the shell, named by its script's path, stays to be seen until killed.
    fake = fake_py_spy(tmp_path, "head -c 8388608 /dev/zero\nsleep 600\n")
    with stuck("sleep") as worker:
        c = run(worker, CaptureOptions(py_spy=fake), budget=5)
    assert c.error is not None
    assert "py-spy wrote more than 1048576 bytes" in c.error
    assert c.raw is None or len(c.raw) <= 1 << 20
    assert not list(_pids_running(fake))


def _pids_running(executable: str) -> List[int]:
    found = []
    for name in os.listdir("/proc"):
        with contextlib.suppress(OSError):
            if (
                name.isdigit()
                and executable.encode() in pathlib.Path(f"/proc/{name}/cmdline").read_bytes()
            ):
                found.append(int(name))
    return found


def test_worker_exits_during_the_capture() -> None:
    with stuck("exit-on-hook", hook=True) as worker:
        started = time.monotonic()
        c = run(worker, CaptureOptions(), hook=worker.hook, budget=5)
        assert time.monotonic() - started < 2  # it saw the exit; it did not wait it out
        assert c.exited
        assert c.error is not None
        assert "exited during the capture" in c.error
        assert worker.proc.wait(5) == 3


def test_worker_killed_while_py_spy_runs(tmp_path: pathlib.Path) -> None:
    fake = fake_py_spy(
        tmp_path,
        'while [ "$#" -gt 0 ]; do [ "$1" = --pid ] && kill -KILL "$2"; shift; done\n'
        "echo 'Error: Failed to get process executable name. "
        "Check that the process is running.' >&2\nexit 1\n",
    )
    with stuck("sleep", hook=True) as worker:
        c = run(worker, CaptureOptions(py_spy=fake), hook=worker.hook)
        assert c.exited
        assert c.method == "facts"
        assert c.error is not None
        assert "exited" in c.error
        assert c.facts is not None
        assert c.facts.cmdline


def test_hook_signal_not_caught_is_not_sent() -> None:
    with stuck("sleep", hook=True) as worker:
        c = run(worker, CaptureOptions(), hook=DumpHook(signal.SIGUSR1, worker.info["fd"]))
        assert c.method == "facts"
        assert c.error is not None
        assert "does not catch SIGUSR1" in c.error
        assert worker.proc.poll() is None  # SIGUSR1 would have killed it
        assert worker.dump_text() == ""


def test_hook_fd_must_be_a_regular_file() -> None:
    with stuck("sleep", hook=True) as worker:
        c = run(worker, CaptureOptions(), hook=DumpHook(HOOK, 1))  # its stdout: our pipe
        assert c.method == "facts"
        assert c.error is not None
        assert "not a regular file" in c.error
        assert worker.dump_text() == ""  # the signal was not sent either


def test_a_hook_number_another_file_took_is_not_written_into(tmp_path: pathlib.Path) -> None:
    # The worker closed the hook's descriptor and opened a file of its own, which took the
    # number: the dump was appended to that file (the worker's data), and an incident
    # told nothing; a number left closed was said to be on a file system not in mountinfo.
    theirs = tmp_path / "theirs.log"
    script = (
        "import faulthandler, signal, sys, time\n"
        "f = open(sys.argv[1], 'a')\n"
        "faulthandler.register(signal.SIGUSR2, file=f)\n"
        "print(f.fileno(), flush=True)\n"
        "time.sleep(60)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script, str(theirs)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        number = int(proc.stdout.readline())
        for fd, said in ((number, "a file with a name"), (999, "is not open")):
            c = capture(
                proc.pid,
                None,
                None,
                role="stuck",
                labels=None,
                hook=DumpHook(signal.SIGUSR2, fd),
                options=CaptureOptions(),
                deadline=time.monotonic() + 5,
            )
            assert c.error is not None
            assert said in c.error
        assert theirs.read_text() == ""  # nothing sent, nothing written
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()


def test_thread_id_is_refused() -> None:
    with stuck("deadlock", hook=True) as worker:
        tid = worker.tids["left"]
        c = capture(
            tid,
            None,
            None,
            role="stuck",
            labels=None,
            hook=worker.hook,
            options=CaptureOptions(),
            deadline=time.monotonic() + 2,
        )
        assert c.method == "none"  # nothing captured
        assert not c.exited
        assert c.facts is None
        assert c.error is not None
        assert "thread" in c.error
        assert worker.dump_text() == ""


def test_other_start_time_is_not_touched() -> None:
    with stuck("sleep", hook=True) as worker:
        other = read_stat(worker.pid).start_time + 1
        c = run(worker, CaptureOptions(), hook=worker.hook, start_time=other)
        assert c.exited
        assert c.method == "none"  # nothing captured
        assert c.facts is None
        assert c.error is not None
        assert "gone" in c.error
        assert worker.dump_text() == ""


def test_deadline_already_passed(tmp_path: pathlib.Path) -> None:
    ran = tmp_path / "ran"
    fake = fake_py_spy(tmp_path, f"touch {ran}\nexit 1\n")
    with stuck("sleep", hook=True) as worker:
        c = run(worker, CaptureOptions(py_spy=fake), hook=worker.hook, budget=0)
        assert not ran.exists()  # no tool started with no time left for it
        assert worker.dump_text() == ""  # nor the hook asked
        assert c.method == "facts"
        assert c.error is not None
        assert "no time left" in c.error


def test_capture_never_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    from ftimer_server.incidents import _capture

    def broken(*_: object, **__: object) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(_capture, "read_facts", broken)
    with stuck("sleep") as worker:
        c = run(worker, CaptureOptions())
        assert c.error == "capture failed: RuntimeError: boom"


def test_a_program_that_is_not_python_is_said_so_and_read_once(
    py_spy: str, tmp_path: pathlib.Path
) -> None:
    calls = tmp_path / "calls"
    counting = fake_py_spy(tmp_path, f'echo "$@" >> {calls}\nexec {py_spy} "$@"\n')
    sleeper = subprocess.Popen(["sleep", "600"])
    try:
        c = capture(
            sleeper.pid,
            None,
            None,
            role="stuck",
            labels={},
            hook=None,
            options=CaptureOptions(py_spy=counting, native=True),
            deadline=time.monotonic() + 5,
        )
    finally:
        sleeper.kill()
        sleeper.wait()
    assert c.method == "facts"
    assert c.error is not None
    assert c.error.startswith(
        f"no stacks: py-spy: process {sleeper.pid} runs no Python interpreter it can read "
        "(not a Python program?) (py-spy said: Error: Failed to find python version"
    ), c.error
    # Not tried again without --native: no frames of either kind to find.
    assert len(calls.read_text().splitlines()) == 1


# Core dumps ------------------------------------------------------------------------


@pytest.fixture
def small_process() -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(["sleep", "600"])
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait()


@contextlib.contextmanager
def pinned(pid: int) -> Iterator[Process]:
    process = Process.open(pid, None, None)
    try:
        yield process
    finally:
        process.close()


@pytest.mark.skipif(not os.path.exists("/usr/bin/gcore"), reason="gcore (gdb) is not installed")
def test_core_dump(tmp_path: pathlib.Path, small_process: subprocess.Popen[bytes]) -> None:
    directory = tmp_path / "cores"
    with pinned(small_process.pid) as process:
        path, error = core_dump(
            process, str(directory), max_bytes=1 << 30, deadline=time.monotonic() + 60
        )
    assert error is None
    assert path is not None
    assert path.startswith(str(directory) + "/core.")
    assert path.endswith(f".{small_process.pid}")
    assert os.path.getsize(path) > 0
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    assert small_process.poll() is None
    assert read_stat(small_process.pid).state not in "Tt"  # left running


@pytest.mark.skipif(not os.path.exists("/usr/bin/gcore"), reason="gcore (gdb) is not installed")
def test_no_core_of_a_worker_a_stop_cannot_reach(
    tmp_path: pathlib.Path, vfork_program: str
) -> None:
    # gcore's gdb waited for a thread in uninterruptible sleep (a hung mount) to stop:
    # the whole budget, then killed; on a FUSE wait the stop interrupted the request.
    with held_in_d(vfork_program) as held, pinned(held.pid) as process:
        path, error = core_dump(
            process, str(tmp_path), max_bytes=1 << 30, deadline=time.monotonic() + 5
        )
    assert path is None
    assert error == (
        f"core dump: not taken: thread {held.pid} cannot be stopped (in uninterruptible "
        "sleep, D state, or waiting for a FUSE server)"
    )


def test_a_thread_in_d_for_a_moment_does_not_cost_the_core(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # One look at /proc caught a data loader's thread in a moment's disk read: the
    # worker got no core, which gdb would have taken a few milliseconds later.
    from ftimer_server.incidents import _procfs
    from ftimer_server.incidents._procfs import ThreadFacts, held_unstoppable

    in_d = [ThreadFacts(7, state="D")]
    monkeypatch.setattr(_procfs, "read_threads", lambda pid, **kw: [ThreadFacts(7, state="S")])
    assert held_unstoppable(7, in_d, time.monotonic() + 5) == []
    monkeypatch.setattr(_procfs, "read_threads", lambda pid, **kw: in_d)
    assert held_unstoppable(7, in_d, time.monotonic() + 5) == [7]


def test_no_hook_signal_to_a_worker_whose_threads_cannot_take_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # With every thread that could take the hook's signal in D state (a hung mount),
    # its handler runs only when that wait ends: the capture waited out its budget for
    # it, the reap as late (2.9 s), and on a FUSE wait the signal cut the request.
    from ftimer_server.incidents import _procfs
    from ftimer_server.incidents._dump_hook import HookFile, prepare_hook
    from ftimer_server.incidents._procfs import ThreadFacts

    with stuck("sleep", hook=True) as worker, pinned(worker.pid) as process:
        in_d = [ThreadFacts(worker.pid, state="D")]
        monkeypatch.setattr(_procfs, "read_threads", lambda pid, **kw: in_d)
        said = prepare_hook(process, worker.hook, in_d, time.monotonic() + 5)
        assert said == (
            f"dump hook: thread {worker.pid} cannot be stopped (in uninterruptible sleep, "
            "D state, or waiting for a FUSE server), and no other thread takes SIGUSR2 (12): "
            "not sent (its handler would not run before that wait ends)"
        )
        monkeypatch.setattr(_procfs, "read_threads", lambda pid, **kw: [ThreadFacts(worker.pid)])
        assert isinstance(prepare_hook(process, worker.hook, in_d, time.monotonic() + 5), HookFile)


NON_DUMPABLE = """
import ctypes, sys
assert ctypes.CDLL(None).prctl(4, 0, 0, 0, 0) == 0  # PR_SET_DUMPABLE: off
print("ready", flush=True)
sys.stdin.read()
"""
# Dumpable, but its main thread has exited: it has no memory of its own any more, and
# its /proc files belong to root as a non-dumpable process's do.
MAIN_THREAD_GONE = """
import ctypes, sys, threading
threading.Thread(target=sys.stdin.read).start()
print("ready", flush=True)
ctypes.CDLL(None).pthread_exit(None)
"""


@contextlib.contextmanager
def as_nobody(script: str) -> Iterator[subprocess.Popen[str]]:
    """Run ``script`` as uid and gid ``NOBODY`` until it says it is ready; kill it after."""
    need_nobody()
    worker = subprocess.Popen(
        [*AS_NOBODY, sys.executable, "-c", script],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert worker.stdout is not None
        assert worker.stdout.readline() == "ready\n"
        yield worker
    finally:
        worker.kill()
        worker.wait()
        for stream in (worker.stdin, worker.stdout):
            assert stream is not None
            stream.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root, to run a worker as another user")
def test_no_core_of_a_worker_that_made_itself_non_dumpable(tmp_path: pathlib.Path) -> None:
    # gcore, as root, dumped it all the same: a hardened program that keeps its keys out
    # of cores had its memory written to the incident directory.
    with as_nobody(NON_DUMPABLE) as worker, pinned(worker.pid) as process:
        path, error = core_dump(
            process, str(tmp_path), max_bytes=1 << 30, deadline=time.monotonic() + 60
        )
    assert path is None
    assert error is not None
    assert error.startswith("core dump: not taken: the worker is not dumpable")
    assert os.listdir(tmp_path) == []
    with as_nobody(MAIN_THREAD_GONE) as worker:
        wait_for(lambda: read_stat(worker.pid).state == "Z")
        assert not non_dumpable(worker.pid)  # its live thread's files tell


# gcore -o PREFIX PID, as far as a test needs: its "core" says the state PID was in when
# it started.
FAKE_GCORE = """#!/bin/sh
awk '{print $3}' /proc/$3/stat > "$2.$3"
"""


def test_core_dump_stops_the_worker_before_gcore_starts(
    tmp_path: pathlib.Path, small_process: subprocess.Popen[bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    # gdb attaches by pid number, ~80 ms after gcore starts: a worker that exited
    # meanwhile left its pid to a new process, which gdb stopped and dumped (forced
    # through ns_last_pid). Stopped first, the worker keeps its pid until it is done.
    tools = tmp_path / "bin"
    tools.mkdir()
    (tools / "gcore").write_text(FAKE_GCORE)
    (tools / "gcore").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tools}{os.pathsep}{os.environ['PATH']}")
    with pinned(small_process.pid) as process:
        path, error = core_dump(
            process, str(tmp_path / "cores"), max_bytes=1 << 30, deadline=time.monotonic() + 60
        )
    assert (error, path is not None) == (None, True)
    assert pathlib.Path(str(path)).read_text().strip() == "T"  # stopped as gcore started
    assert read_stat(small_process.pid).state not in "Tt"  # and continued after


def test_core_dump_size_guard(tmp_path: pathlib.Path) -> None:
    # A Python worker (over 1 MiB resident once settled), not a process just exec'd
    # whose resident set is still a few pages.
    with stuck("sleep") as worker:
        with pinned(worker.pid) as process:
            path, error = core_dump(
                process, str(tmp_path), max_bytes=1 << 20, deadline=time.monotonic() + 60
            )
        assert path is None
        assert error is not None
        assert "resident memory" in error
        assert f"({1 << 20} bytes)" in error
        assert list(tmp_path.iterdir()) == []
        assert worker.proc.poll() is None


# A worker small in resident memory whose writable mappings are large: 512 MiB reserved,
# never touched. gdb writes them whole (zeros), so its core is far larger than its RSS.
BIG_MAPPING = """
import mmap, sys
m = mmap.mmap(-1, 512 << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
print("ready", flush=True)
sys.stdin.read()
"""


@pytest.mark.skipif(not os.path.exists("/usr/bin/gcore"), reason="gcore (gdb) is not installed")
def test_core_dump_never_exceeds_its_limit(tmp_path: pathlib.Path) -> None:
    limit = 64 << 20
    proc = subprocess.Popen(
        [sys.executable, "-c", BIG_MAPPING], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == b"ready\n"
        assert read_stat(proc.pid).rss_pages * os.sysconf("SC_PAGE_SIZE") < limit
        with pinned(proc.pid) as process:
            path, error = core_dump(
                process, str(tmp_path), max_bytes=limit, deadline=time.monotonic() + 60
            )
        assert path is None, os.path.getsize(path)
        assert error is not None
        assert f"reached the limit ({limit} bytes)" in error
        assert list(tmp_path.iterdir()) == []  # the part written is removed
        assert proc.poll() is None
        assert read_stat(proc.pid).state not in "Tt"  # left running
    finally:
        proc.kill()
        proc.wait()
        for stream in (proc.stdin, proc.stdout):
            assert stream is not None
            stream.close()


# Descendants -----------------------------------------------------------------------


def _session_members(sid: int) -> List[int]:
    """Live (not zombie) processes of session ``sid``: the worker and its descendants
    (none of which calls setsid)."""
    members = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        with contextlib.suppress(OSError):
            data = pathlib.Path(f"/proc/{name}/stat").read_bytes()
            fields = data[data.rindex(b")") + 2 :].split()
            if int(fields[3]) == sid and fields[0] not in (b"Z", b"X"):
                members.append(int(name))
    return members


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["KILL", "TERM"])
def test_signal_tree(sig: int) -> None:
    with stuck("tree") as worker:
        # Wait until the tree is at its depth: grandchildren's children being forked.
        wait_for(lambda: len(_session_members(worker.pid)) > 10)
        signalled = [w.pid for w in signal_tree(worker.pid, sig)]
        assert worker.pid not in signalled
        assert set(worker.info["children"]) <= set(signalled)
        assert len(signalled) > len(worker.info["children"])  # grandchildren too
        # None left: every descendant dies (a stopped one acts on SIGTERM once continued).
        wait_for(lambda: _session_members(worker.pid) == [worker.pid])
        assert worker.proc.poll() is None
        assert worker.state() not in "Tt"


def test_the_walk_of_a_worker_that_keeps_forking_ends(monkeypatch: pytest.MonkeyPatch) -> None:
    # The worker itself was never stopped: each pass of the walk found its new children
    # (64 passes), and with thousands of descendants it held the server's loop, and every
    # other reap, for seconds.
    passes: List[int] = []
    walk = _reap_extras._walk
    monkeypatch.setattr(_reap_extras, "_walk", lambda *a: passes.append(1) or walk(*a))
    with stuck("forker") as worker:
        wait_for(lambda: len(_session_members(worker.pid)) > 20)
        signalled = signal_tree(worker.pid, signal.SIGKILL)
        assert len(signalled) >= 10
        assert len(passes) <= 3, passes
        assert worker.proc.poll() is None
        assert worker.state() not in "Tt"  # continued: its own signal follows


# A worker with a child of its own user, and one of another user with a child of its
# own; it prints the two children's pids, then waits. As "user": the worker drops root
# (and its capabilities) after forking the other, a root command started with sudo is to
# a user's worker. As "root": the worker stays root, the other child is uid nobody's.
OTHER_USERS_CHILD = """
import os, sys, time
def child(uid=None):
    pid = os.fork()
    if pid == 0:
        if uid is not None:
            os.setresuid(uid, uid, uid)
        if os.fork() == 0:  # below it
            time.sleep(60)
            os._exit(0)
        time.sleep(60)
        os._exit(0)
    return pid
if sys.argv[1] == "user":
    other = child()
    os.setresuid(65534, 65534, 65534)
else:
    other = child(65534)
own = child()
print(own, other, flush=True)
time.sleep(60)
"""


@contextlib.contextmanager
def other_users_child(worker_is: str) -> Iterator[Tuple[int, int, int, int, int]]:
    """The worker of ``OTHER_USERS_CHILD``: (worker, own child, the one below it, the
    other user's child, the one below that)."""
    with subprocess.Popen(
        [sys.executable, "-c", OTHER_USERS_CHILD, worker_is],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its session: the worker and its descendants
    ) as worker:
        try:
            assert worker.stdout is not None
            own, other = map(int, worker.stdout.readline().split())
            wait_for(lambda: len(_session_members(worker.pid)) == 5)
            below = {c: int(_read_children(c)[0]) for c in (own, other)}
            yield worker.pid, own, below[own], other, below[other]
        finally:
            # Its session's one group (none of them calls setpgid): ours alone, and its
            # id held by the worker until reaped below. Never pids read from /proc,
            # another process's once theirs has been reaped.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(worker.pid, signal.SIGKILL)
            worker.wait()


def _read_children(pid: int) -> List[str]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return f.read().split()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give a child another uid")
def test_signal_tree_spares_another_users_descendants_and_what_is_below(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # --reap-tree SIGKILLed a root process under a user's worker (and SIGSTOPped it for
    # the walk): what neither the worker's kill(2) nor --allow-uid would allow.
    with other_users_child("user") as (worker, own, own_child, other, below):
        caplog.set_level(logging.INFO, "ftimer_server")
        signalled = signal_tree(worker, signal.SIGKILL)
        assert sorted(w.pid for w in signalled) == sorted((own, own_child))
        for pid in (other, below):
            assert read_stat(pid).state not in "TtZX"  # never stopped, alive
        # Said once, though the walk passes it more than once.
        spared = [r for r in caplog.records if f"process {other} " in r.getMessage()]
        assert len(spared) == 1, [r.getMessage() for r in spared]


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give a child another uid")
def test_signal_tree_of_a_root_worker_reaches_other_users_descendants() -> None:
    # A root worker could signal its uid-nobody child itself (CAP_KILL), which the walk
    # left running all the same, saying the worker could not.
    with other_users_child("root") as (worker, own, own_child, other, below):
        signalled = signal_tree(worker, signal.SIGKILL)
        assert sorted(w.pid for w in signalled) == sorted((own, own_child, other, below))


def test_signal_again_spares_a_descendant_that_became_another_users() -> None:
    # The escalation SIGKILLed a descendant by its pid and start time alone, though it had
    # become another user's since the reap (a setuid program): what the walk refuses.
    uid = os.getuid()
    with subprocess.Popen(["sleep", "60"]) as own, subprocess.Popen(["sleep", "60"]) as other:
        try:
            ours = Descendant(own.pid, read_stat(own.pid).start_time, frozenset({uid}))
            # Signalled as another user's process, this one is the test's user's now.
            theirs = Descendant(other.pid, read_stat(other.pid).start_time, frozenset({uid + 1}))
            reused = Descendant(other.pid, theirs.start_time - 1)  # its pid, another process
            assert signal_again([reused, theirs, ours], signal.SIGKILL) == [ours]
            assert own.wait(10) == -signal.SIGKILL
            assert other.poll() is None
        finally:
            other.kill()


def test_signal_tree_report_only_touches_nobody() -> None:
    with stuck("tree") as worker:
        wait_for(lambda: len(_session_members(worker.pid)) > 3)
        assert signal_tree(worker.pid, 0) == []
        for pid in _session_members(worker.pid):
            with contextlib.suppress(ProcessLookupError):  # a leaf that came and went
                assert read_stat(pid).state not in "Tt"


def test_signal_tree_without_descendants() -> None:
    with stuck("sleep") as worker:
        assert signal_tree(worker.pid, signal.SIGKILL) == []
        assert worker.proc.poll() is None


def test_signal_tree_refuses_init_and_groups(monkeypatch: pytest.MonkeyPatch) -> None:
    # Nothing is really sent even if the guard failed: sends are only recorded.
    sent: List[int] = []
    monkeypatch.setattr(_pinned.Process, "send", lambda self, s: sent.append(self.pid))
    for pid in (1, 0, -1):
        assert signal_tree(pid, signal.SIGKILL) == []
    assert sent == []


# The stack formats, without processes ------------------------------------------------

FAULTHANDLER = """\
Thread 0x00007f0000001000 (most recent call first):
  File "/app/data.py", line 17 in __next__
  File "/app/train.py", line 42 in step

Current thread 0x00007f0000002000 (most recent call first):
  File "/app/train.py", line ??? in <lambda>
  ...

Thread 0x00007f0000003000 (most recent call first):
  <no Python frame>
"""


def test_parse_faulthandler() -> None:
    threads = parse_faulthandler(FAULTHANDLER)
    assert [t.ident for t in threads] == [
        "0x00007f0000001000",
        "0x00007f0000002000",
        "0x00007f0000003000",
    ]
    first, current, native = threads
    assert [(f.function, f.file, f.line) for f in first.frames] == [
        ("__next__", "/app/data.py", 17),
        ("step", "/app/train.py", 42),
    ]
    assert current.current
    assert current.truncated
    assert current.frames[0].line == 0
    assert native.frames == []
    # A dump cut short keeps what was written; one thread alone is "Stack".
    assert len(parse_faulthandler(FAULTHANDLER[:120])[0].frames) == 1
    single = parse_faulthandler('Stack (most recent call first):\n  File "a.py", line 1 in f\n')
    assert single[0].frames[0].function == "f"
    assert parse_faulthandler("garbage\n") == []


def test_parse_py_spy_refuses_other_output() -> None:
    with pytest.raises(ValueError, match="not the JSON expected"):
        parse_py_spy("Error: something")
    (thread,), idents = parse_py_spy(
        '[{"os_thread_id": 7, "thread_name": "w", "active": true, "owns_gil": false,'
        ' "frames": [{"name": "f", "filename": "/a.py", "short_filename": "a.py", "line": 3,'
        ' "module": null}, {"name": "clock_nanosleep", "filename": "/libc.so.6",'
        ' "module": "/libc.so.6", "line": 0}], "unknown": 1}]'
    )
    assert (thread.tid, idents) == (7, None)  # every kernel id told: nothing to pair
    assert thread.active is True
    assert thread.gil is False
    assert [(f.function, f.native) for f in thread.frames] == [
        ("f", False),
        ("clock_nanosleep", True),
    ]


def test_parse_py_spy_keeps_the_idents_of_threads_without_a_kernel_id() -> None:
    threads, idents = parse_py_spy(
        '[{"os_thread_id": null, "thread_id": 139, "thread_name": "w", "frames": []},'
        ' {"thread_id": 255, "frames": []}]'
    )
    assert [(t.tid, t.name) for t in threads] == [(0, "w"), (0, "0xff")]
    assert idents == ["0x8b", "0xff"]


def test_match_thread_idents() -> None:
    maps = [(0x1000, 0x2000), (0x3000, 0x4000), (0x9000, 0xA000)]
    threads = [
        ThreadFacts(tid=100, sp=0x8000),  # the main thread: its stack is elsewhere
        ThreadFacts(tid=101, sp=0x1F00),
        ThreadFacts(tid=102, sp=0x3F00),
        ThreadFacts(tid=103, sp=0x5000),  # a native thread: no ident in its mapping
    ]
    idents = ["0x1ff0", "0x3ff0", "0x9100"]
    assert match_thread_idents(idents, threads, maps, 100) == {
        "0x1ff0": 101,
        "0x3ff0": 102,
        "0x9100": 100,  # the one left over
    }
    # A running thread (no stack pointer) leaves two idents unpaired: no guess.
    running = [threads[0], ThreadFacts(tid=101), threads[2]]
    assert match_thread_idents(idents, running, maps, 100) == {"0x3ff0": 102}
    # Some threads left out of the dump (cut short, the newest kept): the one left over
    # may be any thread, not the main one.
    assert match_thread_idents(idents, threads, maps, 100, complete=False) == {
        "0x1ff0": 101,
        "0x3ff0": 102,
    }


FACTS_WITHOUT_PTRACE = """
import json, sys, time
from ftimer_server.incidents._procfs import read_facts
facts, notes = read_facts(int(sys.argv[1]), time.monotonic() + 10)
print(json.dumps([facts.fifos, facts.sockets, notes]))
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root, to drop capabilities with setpriv")
def test_open_files_that_cannot_be_looked_at_are_said_so_not_counted_as_none() -> None:
    # A root server without CAP_SYS_PTRACE (the systemd unit's bounding set) lists a root
    # worker's descriptors but may not read where they lead: the incident said
    # "0 FIFOs, 0 sockets" as if it had looked.
    if shutil.which("setpriv") is None:
        pytest.skip("needs setpriv(1) from util-linux")
    worker = subprocess.Popen(
        [sys.executable, "-c", "import socket, time; s = socket.socket(); time.sleep(60)"]
    )
    try:
        done = subprocess.run(
            [
                "setpriv",
                "--bounding-set",
                "-all,+kill,+chown",
                sys.executable,
                "-c",
                FACTS_WITHOUT_PTRACE,
                str(worker.pid),
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
    finally:
        worker.kill()
        worker.wait()
    fifos, sockets, notes = json.loads(done.stdout)
    assert (fifos, sockets) == (0, 0)
    assert "open files unreadable: EACCES (Permission denied)" in notes


@pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("setpriv"), reason="needs root and setpriv"
)
def test_ptrace_advice_fits_a_root_server_without_the_capability() -> None:
    # A root daemon confined as the example unit confines it (CAP_KILL CAP_CHOWN) was told
    # to "run the server as root", and of Yama where there was none.
    code = "from ftimer_server.incidents._tools import _ptrace_advice; print(_ptrace_advice())"
    confined = subprocess.run(
        ["setpriv", "--bounding-set=-sys_ptrace", sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "runs as root but without CAP_SYS_PTRACE" in confined
    assert "CapabilityBoundingSet=" in confined
    whole = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert "though this server has CAP_SYS_PTRACE" in whole


@pytest.mark.parametrize(
    ("root", "capable", "yama", "says"),
    [
        (False, False, None, "run the server as root or with CAP_SYS_PTRACE"),
        (False, False, 1, "ptrace_scope 1 lets only CAP_SYS_PTRACE"),
        (True, True, 3, "ptrace_scope is 3, which refuses it to everyone, root included"),
        (True, True, 1, "hostPID"),
    ],
)
def test_ptrace_advice_says_what_applies(
    root: bool, capable: bool, yama: Optional[int], says: str
) -> None:
    advice = _tools.ptrace_advice(root, capable, yama)
    assert advice.startswith("py-spy cannot attach (ptrace not permitted)")
    assert says in advice
    assert ("ptrace_scope" in advice) == (yama in (1, 3) and not (capable and yama == 1))


def test_a_peer_is_read_without_being_stopped(py_spy: str, tmp_path: pathlib.Path) -> None:
    # py-spy stopped each peer while it read it: seconds for a large worker, while the
    # peer's own timers ran on, and a healthy peer was reaped (3 of 3 runs of a review's
    # job: 300 threads 250 frames deep, 0.8 s timers). The stuck worker is still stopped,
    # for a consistent dump.
    calls = tmp_path / "calls"
    fake = fake_py_spy(tmp_path, f'echo "$@" >> {calls}\nexec {py_spy} "$@"\n')
    with stuck("sleep") as worker:
        for role in ("peer", "stuck"):
            c = capture(
                worker.pid,
                None,
                None,
                role=role,
                labels={"job": "j"},
                hook=None,
                options=CaptureOptions(py_spy=fake, native=True),
                deadline=time.monotonic() + 5,
            )
            assert c.method == "py-spy", c.error
            assert c.error is None  # a peer's --native is not tried (py-spy refuses it)
            assert thread_in(c, "stuck_in_sleep")
    peer, stuck_ = (call.split() for call in calls.read_text().splitlines())
    assert "--nonblocking" in peer
    assert "--native" not in peer
    assert "--nonblocking" not in stuck_
    assert "--native" in stuck_


@pytest.mark.parametrize(
    "waiting", [{"state": "D"}, {"state": "S", "wchan": "request_wait_answer"}], ids=["D", "fuse"]
)
def test_a_worker_in_uninterruptible_sleep_is_read_without_being_stopped(
    py_spy: str, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch, waiting: Dict[str, str]
) -> None:
    # py-spy stopped it, which waits until the thread leaves the kernel: a worker stuck
    # in a FUSE read spent the whole capture budget (3 s) for no stack, where reading it
    # without stopping it gave the frame that named the file, in 14 ms. A FUSE request
    # shows as S until a signal comes, which makes its wait uninterruptible: py-spy's
    # stop did (the thread read as S, the worker was stopped, and py-spy hung).
    from ftimer_server.incidents import _capture

    def in_d_state(pid: int, **kwargs: Any) -> List[ThreadFacts]:
        threads = read_threads(pid, **kwargs)
        return [dataclasses.replace(threads[0], **waiting), *threads[1:]]

    monkeypatch.setattr(_capture, "read_threads", in_d_state)
    calls = tmp_path / "calls"
    fake = fake_py_spy(tmp_path, f'echo "$@" >> {calls}\nexec {py_spy} "$@"\n')
    with stuck("sleep") as worker:
        c = capture(
            worker.pid,
            None,
            None,
            role="stuck",
            labels={"job": "j"},
            hook=None,
            options=CaptureOptions(py_spy=fake, native=True),
            deadline=time.monotonic() + 5,
        )
    assert c.method == "py-spy", c.error
    assert thread_in(c, "stuck_in_sleep")
    [call] = (line.split() for line in calls.read_text().splitlines())
    assert "--nonblocking" in call
    assert "--native" not in call
    assert "read without stopping it: thread" in (c.error or "")  # said, with what it costs


def test_a_peer_on_a_python_before_3_11_has_its_threads_paired(
    py_spy: str, python_before_3_11: str
) -> None:
    # py-spy tells no kernel thread id of a worker on Python 3.9 or 3.10 that it does not
    # stop: a peer's stacks all had tid 0, apart from their threads' states, and ranks
    # waiting in the same place were not grouped (each "running a C call"). They are
    # paired as a hook's dump is, through the blocked threads' stack mappings.
    with stuck("deadlock", python=python_before_3_11) as worker:
        left, right = worker.tids["left"], worker.tids["right"]
        wait_for(lambda: all("futex" in _wchan(worker.pid, t) for t in (left, right)))
        c = capture_peer(worker.pid, py_spy)
    assert c.method == "py-spy", c.error
    assert thread_in(c, "take_a_then_b").tid == left
    assert thread_in(c, "take_b_then_a").tid == right
    main = thread_in(c, "stuck_in_sleep")
    assert (main.tid, main.state) == (worker.pid, "S")
    assert len(c.threads) == 3  # no thread twice, once with its stack and once without


# Prints its main thread's pthread_t; then, on a line of input, starts a thread named
# "late" and prints that one's.
LATE_THREAD = r"""
import sys, threading
print(hex(threading.main_thread().ident), flush=True)
sys.stdin.readline()
late = threading.Thread(target=threading.Event().wait, name="late", daemon=True)
late.start()
print(hex(late.ident), flush=True)
sys.stdin.readline()
"""


def test_a_peer_s_main_thread_is_known_by_its_name_never_by_elimination() -> None:
    # py-spy reads a peer without stopping it, and can miss a thread (the main one among
    # them) without knowing it: the one pthread_t left over was taken for the main
    # thread's, and a short-lived thread's stack shown as the main thread's (a full run
    # of the suite).
    with subprocess.Popen(
        [sys.executable, "-c", LATE_THREAD],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    ) as peer:
        assert peer.stdin is not None
        assert peer.stdout is not None
        main = peer.stdout.readline().strip()
        before = read_threads(peer.pid, kernel_stacks=False)
        peer.stdin.write("\n")
        peer.stdin.flush()
        late = peer.stdout.readline().strip()  # a thread born during the read

        def paired(*named: Tuple[str, str]) -> List[int]:
            stacks = [ThreadStack(0, name) for name, _ in named]
            result = MethodResult(stacks, idents=[ident for _, ident in named])
            return [s.tid for s in _paired(peer.pid, stacks, result, before, time.monotonic() + 5)]

        assert paired(("late", late)) == [0]  # the main thread missed: no pairing
        assert paired(("late", late), ("MainThread", main)) == [0, peer.pid]
        peer.stdin.write("\n")


# Threads that live a few milliseconds, one after another, in two lines: glibc gives
# each the stack (and so the pthread_t) of the last that ended. Each writes its name and
# kernel id to argv[1].
CHURN = r"""
import json, sys, threading, time
log = open(sys.argv[1], "a", buffering=1)
def note():
    log.write(json.dumps([threading.current_thread().name, threading.get_native_id()]) + "\n")
def short_life():
    note()
    time.sleep(0.005)
def churn(k):
    note()
    for g in range(10**9):
        t = threading.Thread(target=short_life, name=f"gen-{k}-{g}")
        t.start()
        t.join()
for k in range(2):
    threading.Thread(target=churn, args=(k,), name=f"churner-{k}", daemon=True).start()
print("ready", flush=True)
time.sleep(600)
"""


def _threads_it_may_be(stack: ThreadStack, tids: Dict[str, int]) -> Set[int]:
    """The kernel ids a stack of the CHURN worker may have: its thread's, by the name
    py-spy read; without one (py-spy reads no name of a thread that Python's threading
    has not listed yet, or no more), any of the threads that run its function."""
    if stack.name in tids:
        return {tids[stack.name]}
    functions = {f.function for f in stack.frames}
    kind = "gen-" if "short_life" in functions else "churner-" if "churn" in functions else ""
    if not kind:
        return {tids["MainThread"]}
    return {tid for name, tid in tids.items() if name.startswith(kind)}


def test_a_stack_of_a_thread_that_ended_during_the_read_goes_to_no_other(
    py_spy: str, python_before_3_11: str, tmp_path: pathlib.Path
) -> None:
    # A thread that ended while py-spy read the peer left its pthread_t to the next one:
    # its stack was paired with the new thread's kernel id (136 of 949 stacks paired in
    # 300 reads of a review's run). Only a thread alive before and after the read is.
    log = tmp_path / "threads"
    worker = subprocess.Popen(
        [python_before_3_11, "-c", CHURN, str(log)],
        stdout=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        assert _read_line(worker.stdout, 20) == b"ready\n"
        wrong, paired = [], 0
        for _ in range(40):
            c = capture_peer(worker.pid, py_spy)
            lines = [line for line in log.read_text().splitlines() if line.endswith("]")]
            tids = {"MainThread": worker.pid, **dict(map(json.loads, lines))}
            for t in c.threads:
                if t.frames and t.tid:
                    paired += 1
                    if t.tid not in _threads_it_may_be(t, tids):
                        wrong.append((t.name, t.tid, [f.function for f in t.frames]))
        assert wrong == []
        assert paired >= 40  # the main thread at least, each time
    finally:
        os.killpg(worker.pid, signal.SIGKILL)  # its session: ours alone
        worker.wait()
        assert worker.stdout is not None
        worker.stdout.close()


# A thread blocked reading stdin; at the first line it ends, and another starts (on its
# stack: glibc's cache) and says its kernel id. faulthandler on SIGUSR2 as a dump hook.
SWAP = r"""
import faulthandler, json, os, signal, sys, tempfile, threading, time
dump = tempfile.TemporaryFile()
faulthandler.register(signal.SIGUSR2, file=dump, all_threads=True)
tids = {}
def first():
    tids["first"] = threading.get_native_id()
    sys.stdin.readline()
def second():
    print(json.dumps({"second": threading.get_native_id()}), flush=True)
    threading.Event().wait()
a = threading.Thread(target=first)
a.start()
while "first" not in tids:
    time.sleep(0.001)
print(json.dumps({"pid": os.getpid(), "fd": dump.fileno(), "tids": tids}), flush=True)
a.join()
threading.Thread(target=second, daemon=True).start()
time.sleep(600)
"""


def test_a_hook_dump_pairs_no_stack_with_a_thread_that_ended_before_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The threads' stack pointers are read before the dump: a thread that ended in
    # between left its stack, and so its ident, to a new one, whose stack the dump then
    # gave to the thread that had ended (its state and kernel stack with it).
    command = [sys.executable, "-c", SWAP]
    with subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE) as proc:
        try:
            worker = Worker(proc, json.loads(_read_line(proc.stdout, 20)))
            first = worker.tids["first"]
            wait_for(lambda: read_stat(worker.pid, first).state == "S")
            second: List[int] = []
            mappings = _dump_hook.thread_stack_mappings

            def then_swap(pid: int) -> List[Tuple[int, int]]:
                read = mappings(pid)
                assert proc.stdin is not None
                proc.stdin.write(b"\n")  # the first thread ends, the second starts
                proc.stdin.flush()
                second.append(json.loads(_read_line(proc.stdout, 20))["second"])
                return read

            monkeypatch.setattr(_dump_hook, "thread_stack_mappings", then_swap)
            c = run(worker, CaptureOptions(py_spy=None), hook=worker.hook)
        finally:
            proc.kill()  # then closed and waited for, as it leaves the with
    assert c.method == "hook", c.error
    assert len(second) == 1
    assert second[0] != first
    in_second = [t for t in c.threads if any(f.function == "second" for f in t.frames)]
    assert [t.tid for t in in_second] in ([0], second)  # never the ended thread's
    assert not any(t.tid == first and t.frames for t in c.threads)


def test_a_hook_dump_of_over_100_threads_says_the_oldest_have_no_stack() -> None:
    # faulthandler writes the 100 newest: the stuck main thread was left out, and the
    # incident said only "no stack: hook gave no frames"; the last thread written was
    # taken for one whose frames were cut.
    with stuck("threads120", hook=True) as worker:
        c = run(worker, CaptureOptions(py_spy=None), hook=worker.hook)
    assert c.method == "hook"
    assert c.error is not None
    assert (
        "dump hook: faulthandler writes at most 100 threads, the newest first: the "
        "older ones, the main thread among them, have no stack (py-spy reads them all)"
    ) in c.error
    assert all(f.function != "stuck_in_sleep" for t in c.threads for f in t.frames)


def test_a_child_state_is_of_the_workers_child_only() -> None:
    # A pid read among the children, then another's: its name and wait were shown.
    with subprocess.Popen(["sleep", "60"]) as child:
        try:
            me, parent = os.getpid(), os.getppid()
            wait_until(lambda: _comm(child.pid) == "sleep", what="the child's exec")
            assert [c.pid for c in _procfs.child_states(me, [child.pid, parent])] == [child.pid]
        finally:
            child.kill()
