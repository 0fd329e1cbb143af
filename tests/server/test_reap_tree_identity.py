"""A reap of the worker's tree (``--reap-tree``) signals the descendants of the worker
only: never those of a process that took its pid, or of one that took an intermediate
descendant's pid; and its walk does not hold the server's loop for long.

Pid reuse is real: each case runs as pid 1 of a private PID namespace, where the harness
picks the next pid (``ns_last_pid``) so that a new process of its own takes a dead one's
pid. Every process signalled is one the harness started.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from typing import Any, Dict, Iterator, List

import pytest
from tests.conftest import in_private_pid_namespace, wait_until

from ftimer_server.core._records import Timer, Worker
from ftimer_server.core._table import Expiry
from ftimer_server.incidents import _reap_extras
from ftimer_server.incidents._procfs import read_stat
from ftimer_server.server._edge import SystemHost
from ftimer_server.server._process import SystemInspector
from ftimer_server.server._signaller import OsSignaller

needs_root = pytest.mark.skipif(
    os.geteuid() != 0, reason="needs root to set ns_last_pid in a private PID namespace"
)

# Run as pid 1 of a private PID namespace (its own /proc): only its own processes exist.
HARNESS = r"""
import json, os, select, signal, subprocess, sys, time
from ftimer_protocol import parse_proc_stat
from ftimer_server.core._records import Worker
from ftimer_server.incidents import _reap_extras
from ftimer_server.server._process import SystemInspector
from ftimer_server.server._signaller import OsSignaller

mode = sys.argv[1]
PARENT = '''
import subprocess, sys
child = subprocess.Popen(["sleep", "1000"])
print(child.pid, flush=True)
child.wait()  # reaped as soon as it dies: its pid is free for another process
print("reaped", flush=True)
sys.stdin.readline()
'''

AUTOREAP = '''
import signal, subprocess, sys
signal.signal(signal.SIGCHLD, signal.SIG_IGN)
child = subprocess.Popen(["sleep", "1000"])
print(child.pid, flush=True)
sys.stdin.readline()
'''

def start_time(pid):
    with open(f"/proc/{pid}/stat", "rb") as f:
        return parse_proc_stat(f.read()).start_time

def state(pid):
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return parse_proc_stat(f.read()).state
    except FileNotFoundError:
        return "gone"

def parent_of_a_child():
    # A process of ours with a child of its own (printed), alive until told.
    proc = subprocess.Popen([sys.executable, "-c", PARENT], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    return proc, int(proc.stdout.readline())

def take_pid(pid):
    # The next process started takes ``pid`` once it is free: its owner exited and was
    # reaped, and the kernel frees it a moment later (no event says when: tried again).
    for _ in range(1000):
        with open("/proc/sys/kernel/ns_last_pid", "w") as f:
            f.write(str(pid - 1))
        proc, child = parent_of_a_child()
        if proc.pid == pid:
            return proc, child
        proc.kill()
        proc.wait()
    raise AssertionError(f"pid {pid} never came free")

def later_tick(than):
    # Start times count clock ticks since boot: a process started from now on has a
    # start time other than ``than``.
    tick = os.sysconf("SC_CLK_TCK")
    while time.clock_gettime(time.CLOCK_BOOTTIME) * tick < than + 2:
        time.sleep(0.005)

result = {}
if mode in ("reused-root-pidfd", "reused-root-start-time"):
    # The worker exits, and an unrelated process with a child takes its pid.
    worker, _ = parent_of_a_child()
    pid, start = worker.pid, start_time(worker.pid)
    pidfd = os.pidfd_open(pid) if mode == "reused-root-pidfd" else None
    worker.kill()
    worker.wait()
    later_tick(start)
    intruder, child = take_pid(pid)
    bound = Worker(pid=pid, start_time=start, pidfd=pidfd)
    signaller = OsSignaller()
    result["tree"] = [w.pid for w in signaller.send_tree(bound, signal.SIGKILL)]
    result["worker"] = signaller.send(bound, signal.SIGKILL)
    result["child"] = state(child)
elif mode == "reused-parent":
    # The worker's child dies while the walk is under it, and an unrelated process with
    # a child takes its pid before its children are read. The worker is stopped for the
    # walk: its children are reaped by the kernel (SIGCHLD ignored), which frees the pid.
    root = subprocess.Popen([sys.executable, "-c", AUTOREAP], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    mid = int(root.stdout.readline())
    real_children = _reap_extras.children
    taken = {}
    def children(pid):
        if pid == mid and not taken:
            fd = os.pidfd_open(mid)
            signal.pidfd_send_signal(fd, signal.SIGKILL)
            select.select([fd], [], [])  # it exited
            os.close(fd)
            taken["intruder"], taken["child"] = take_pid(mid)
        return real_children(pid)
    _reap_extras.children = children
    bound = Worker(pid=root.pid, start_time=start_time(root.pid), pidfd=os.pidfd_open(root.pid))
    result["tree"] = [w.pid for w in OsSignaller().send_tree(bound, signal.SIGKILL)]
    result["reused"] = bool(taken)
    result["child"] = state(taken["child"])
elif mode == "root-exits":
    # The worker exits during the walk (after its child was frozen).
    root, child = parent_of_a_child()
    bound = Worker(pid=root.pid, start_time=start_time(root.pid), pidfd=os.pidfd_open(root.pid))
    real_children = _reap_extras.children
    def children(pid):
        if pid == child and root.poll() is None:
            root.kill()
            root.wait()
        return real_children(pid)
    _reap_extras.children = children
    result["tree"] = [w.pid for w in OsSignaller().send_tree(bound, signal.SIGKILL)]
    result["child"] = state(child)
elif mode == "reused-after-the-check":
    # The worker exits, and a process takes its pid, between the check of its start time
    # and the signal: a process signalled by pid and start time (no pidfd held for it),
    # as the escalation signals the descendants a reap signalled.
    worker, _ = parent_of_a_child()
    pid, start = worker.pid, start_time(worker.pid)
    taken = {}
    class Racing(SystemInspector):
        def alive(self, process):
            answer = super().alive(process)
            if not taken:
                worker.kill()
                worker.wait()
                later_tick(start)
                taken["intruder"], _ = take_pid(pid)
            return answer
    signaller = OsSignaller(Racing())
    result["worker"] = signaller.send(Worker(pid=pid, start_time=start), signal.SIGKILL)
    result["intruder"] = state(pid)
print(json.dumps(result), flush=True)
"""


#: The states of a process that is neither dead nor stopped.
_RUNNING = ("R", "S", "D")


def _run(mode: str) -> Dict[str, Any]:
    done = in_private_pid_namespace(sys.executable, "-c", HARNESS, mode)
    assert done.returncode == 0, done.stderr
    result: Dict[str, Any] = json.loads(done.stdout.splitlines()[-1])
    return result


@needs_root
@pytest.mark.parametrize("mode", ["reused-root-pidfd", "reused-root-start-time"])
def test_the_tree_of_a_process_that_took_the_workers_pid_is_untouched(mode: str) -> None:
    result = _run(mode)
    assert (result["tree"], result["worker"]) == ([], False)
    assert result["child"] in _RUNNING  # neither killed nor left stopped


@needs_root
def test_a_process_that_takes_the_pid_after_the_check_is_not_signalled() -> None:
    # Without a pidfd, the start time was checked, then kill(pid): a process that took
    # the pid in between was killed. A pidfd opened before the check pins the process.
    result = _run("reused-after-the-check")
    assert result == {"worker": False, "intruder": result["intruder"]}
    assert result["intruder"] in _RUNNING


@needs_root
def test_the_children_of_a_process_that_took_a_descendants_pid_are_untouched() -> None:
    result = _run("reused-parent")
    assert result["reused"]
    assert result["tree"] == []  # the worker's own child died before the signal
    assert result["child"] in _RUNNING  # the intruder's child: neither killed nor stopped


def test_a_worker_that_exits_during_the_walk_has_its_tree_spared() -> None:
    # No pid is reused here, but the namespace keeps the orphaned child away from the
    # host's init (and kills it when the harness ends).
    result = _run("root-exits")
    assert result["tree"] == []
    assert result["child"] in _RUNNING  # continued, not left frozen


# The walk's wait on the loop ------------------------------------------------------------


@pytest.fixture
def worker_with_child() -> Iterator[subprocess.Popen[str]]:
    """A process of ours in its own session with a child of its own (its pid on the
    first line of its output); the whole session is killed at the end."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import subprocess, sys; c = subprocess.Popen(['sleep', '1000']); "
            "print(c.pid, flush=True); sys.stdin.readline()",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # its session, its group: ours alone
        proc.wait(10)
        for stream in (proc.stdin, proc.stdout):
            assert stream is not None
            stream.close()


def test_a_descendant_that_never_stops_holds_the_walk_briefly(
    worker_with_child: subprocess.Popen[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A descendant in uninterruptible sleep (D) does not stop on SIGSTOP: the walk waited
    # 2 s for it, on the server's loop, at every reap. Here the child is real and really
    # signalled; only its state as the walk reads it is held at D (a real D state needs
    # a vfork or a hung file system).
    assert worker_with_child.stdout is not None
    child = int(worker_with_child.stdout.readline())
    real_read_stat = _reap_extras.read_stat

    def in_d_state(pid: int, tid: Any = None) -> Any:
        stat = real_read_stat(pid, tid)
        return stat._replace(state="D") if pid == child else stat

    monkeypatch.setattr(_reap_extras, "read_stat", in_d_state)
    start = time.monotonic()
    signalled = [w.pid for w in _reap_extras.signal_tree(worker_with_child.pid, signal.SIGKILL)]
    elapsed = time.monotonic() - start
    assert signalled == [child]
    assert elapsed < 1.0, f"the walk held its caller {elapsed:.2f} s"  # the bug: 2 s
    wait_until(lambda: _gone_or_zombie(child), what="the child's death")
    assert worker_with_child.poll() is None  # the worker itself is not the tree's


def _gone_or_zombie(pid: int) -> bool:
    try:
        return read_stat(pid).state in "ZX"
    except ProcessLookupError:
        return True


def test_a_root_in_uninterruptible_sleep_is_not_waited_for(
    worker_with_child: subprocess.Popen[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The walk waited for the worker itself to stop: in D state it cannot, and every
    # reap of a worker hung in I/O held the loop 50 ms more. Its signal is pending before
    # it runs again anyway, and it forks nothing there.
    assert worker_with_child.stdout is not None
    child = int(worker_with_child.stdout.readline())
    real_read_stat, real_wait = _reap_extras.read_stat, _reap_extras._wait_stopped
    waited: List[int] = []

    def in_d_state(pid: int, tid: Any = None) -> Any:
        stat = real_read_stat(pid, tid)
        return stat._replace(state="D") if pid == worker_with_child.pid else stat

    def wait_stopped(frozen: Dict[int, Any], deadline: float) -> None:
        waited.extend(frozen)
        real_wait(frozen, deadline)

    monkeypatch.setattr(_reap_extras, "read_stat", in_d_state)
    monkeypatch.setattr(_reap_extras, "_wait_stopped", wait_stopped)
    signalled = [w.pid for w in _reap_extras.signal_tree(worker_with_child.pid, signal.SIGKILL)]
    assert signalled == [child]
    assert worker_with_child.pid not in waited
    assert child in waited


@pytest.mark.parametrize("stop", [signal.SIGSTOP, signal.SIGTSTP])
def test_a_stop_signal_leaves_the_tree_stopped(
    worker_with_child: subprocess.Popen[str], stop: int
) -> None:
    # A timer's signal may be a stop (to freeze a hung worker for a debugger): the walk's
    # SIGCONT after it undid it, for the worker and its descendants.
    assert worker_with_child.stdout is not None
    child = int(worker_with_child.stdout.readline())
    said: List[str] = []
    host = SystemHost(SystemInspector(), OsSignaller(), tree=True)
    worker = Worker(worker_with_child.pid, read_stat(worker_with_child.pid).start_time)
    timer = Timer(worker.pid, "s", 0.0, stop)
    expiry = Expiry(worker.pid, (timer,), timer, (timer,))
    delivery = host.reap(worker, stop, expiry, time.monotonic())
    said.append(read_stat(worker.pid).state)
    said.append(read_stat(child).state)
    assert delivery.delivered
    assert said == ["T", "T"]
