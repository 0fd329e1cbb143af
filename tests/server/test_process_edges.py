"""Behaviour of server/_process.py that no test pinned, found by mutation testing (each test
fails with the mutant that found it)."""

from __future__ import annotations

import errno
import os
import pathlib
import resource
import subprocess
import sys
from typing import List

import pytest
from tests.conftest import on_other_clocks, wait_until

from ftimer_protocol import parse_proc_stat
from ftimer_server import SystemInspector, Worker
from ftimer_server.server import _process

from .conftest import compiled, proc_start_time

inspector = SystemInspector()


# -- the descriptor limit ---------------------------------------------------------------

RAISE = """
import logging, resource
from ftimer_server.server._process import raise_fd_limit
logging.basicConfig(format="%(message)s")
print(raise_fd_limit(), *resource.getrlimit(resource.RLIMIT_NOFILE))
"""


def _raise_with(soft: int, hard: int) -> subprocess.CompletedProcess[str]:
    """``raise_fd_limit()`` in a child started with RLIMIT_NOFILE (soft, hard)."""
    return subprocess.run(
        [sys.executable, "-c", RAISE],
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard)),
        capture_output=True,
        text=True,
        check=True,
    )


def test_a_soft_descriptor_limit_below_the_hard_one_is_raised_to_it() -> None:
    # systemd's default (soft 1024, hard 512k): the daemon would hold only ~1000 workers'
    # pidfds, and refuse every arm beyond them (EMFILE), unless it raises the soft limit.
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard == resource.RLIM_INFINITY or hard < 2048:
        pytest.skip(f"needs a finite hard RLIMIT_NOFILE of 2048 or more, not {hard}")
    done = _raise_with(1024, hard)
    assert done.stdout.split() == [str(hard), str(hard), str(hard)]
    assert done.stderr == ""  # not low: no warning


def test_a_hard_descriptor_limit_below_1024_is_raised_to_and_warned_about() -> None:
    done = _raise_with(200, 600)
    assert done.stdout.split() == ["600", "600", "600"]
    assert "may open 600 file descriptors at most" in done.stderr
    assert "RLIMIT_NOFILE" in done.stderr


def test_a_hard_descriptor_limit_of_1024_is_not_warned_about() -> None:
    # "Below it, a start warns": 1024 itself is enough to start quietly.
    done = _raise_with(1024, 1024)
    assert done.stdout.split() == ["1024", "1024", "1024"]
    assert done.stderr == ""


# -- a process whose main thread exited --------------------------------------------------

# Its main thread exits (pthread_exit), one other thread lives on: /proc says Z (the
# leader's state) and Threads: 2 (the zombie leader and the live one).
ONE_THREAD_LEFT = """
import ctypes, sys, threading
threading.Thread(target=sys.stdin.read).start()
ctypes.CDLL(None).pthread_exit(None)
"""


def _stat(pid: int):
    return parse_proc_stat(pathlib.Path(f"/proc/{pid}/stat").read_bytes())


def test_a_process_whose_main_thread_exited_with_one_thread_left_is_alive() -> None:
    with subprocess.Popen([sys.executable, "-c", ONE_THREAD_LEFT], stdin=subprocess.PIPE) as child:
        assert child.stdin is not None
        try:
            stat = wait_until(
                lambda: (s := _stat(child.pid)).state == "Z" and s, what="the leader gone"
            )
            assert stat.num_threads == 2
            start = inspector.start_time(child.pid)  # not "no such process"
            assert start == proc_start_time(child.pid)
            assert inspector.alive(Worker(child.pid, start))  # without a pidfd: by /proc
        finally:
            child.stdin.close()  # its thread's read ends, and so the process
        assert child.wait(10) == 0


# -- what a worker that outlived its SIGKILL waits in ------------------------------------

# argv[1] threads each vfork() a child that waits for a byte on stdin: each such thread
# is in uninterruptible sleep (D) until its child exits; the main thread joins them (S).
VFORK_THREADS = r"""
#include <pthread.h>
#include <stdlib.h>
#include <unistd.h>
static void *held(void *arg) {
    (void)arg;
    if (vfork() == 0) { char c; read(0, &c, 1); _exit(0); }
    return NULL;
}
int main(int argc, char **argv) {
    int n = atoi(argv[1]);
    pthread_t t[64];
    for (int i = 0; i < n; i++) pthread_create(&t[i], NULL, held, NULL);
    for (int i = 0; i < n; i++) pthread_join(t[i], NULL);
    return 0;
}
"""


@pytest.fixture(scope="module")
def vfork_threads(tmp_path_factory: pytest.TempPathFactory) -> str:
    return compiled(tmp_path_factory, "vfork_threads", VFORK_THREADS, "-pthread")


def _in_d(pid: int) -> List[str]:
    """``thread TID: D[ in WCHAN]`` for each thread of ``pid`` in D, by tid, from /proc."""
    waits = []
    for tid in sorted(int(t) for t in os.listdir(f"/proc/{pid}/task")):
        base = pathlib.Path(f"/proc/{pid}/task/{tid}")
        if parse_proc_stat((base / "stat").read_bytes()).state == "D":
            wchan = (base / "wchan").read_text().strip()
            waits.append(f"thread {tid}: D" + (f" in {wchan}" if wchan not in ("", "0") else ""))
    return waits


@pytest.mark.parametrize(("held", "more"), [(1, ""), (4, ""), (5, "; 1 more"), (6, "; 2 more")])
def test_waiting_names_four_threads_in_d_and_counts_the_others(
    vfork_threads: str, held: int, more: str
) -> None:
    with subprocess.Popen([vfork_threads, str(held)], stdin=subprocess.PIPE) as process:
        assert process.stdin is not None
        try:
            waits = wait_until(
                lambda: len(w := _in_d(process.pid)) == held and w, what="the threads in D"
            )
            assert inspector.waiting(process.pid) == "; ".join(waits[:4]) + more
        finally:
            process.stdin.close()  # every vfork child reads EOF and exits: no signal
        assert process.wait(10) == 0


def test_waiting_reads_threads_only_within_its_budget(
    vfork_threads: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # It runs on the loop's thread, for a worker that outlived its SIGKILL: reading every
    # thread of thousands in D held every reap behind it. With no time left, it reads none.
    with subprocess.Popen([vfork_threads, "2"], stdin=subprocess.PIPE) as process:
        assert process.stdin is not None
        try:
            wait_until(lambda: len(_in_d(process.pid)) == 2, what="the threads in D")
            assert str(inspector.waiting(process.pid)).startswith("thread ")
            monkeypatch.setattr(_process, "WAITING_BUDGET", 0.0)
            assert inspector.waiting(process.pid) is None
        finally:
            process.stdin.close()
        assert process.wait(10) == 0


# -- clock offsets -----------------------------------------------------------------------


def test_without_time_namespaces_every_process_is_on_the_servers_clocks(
    children, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A kernel before 5.6 (RHEL 8's 4.18): no /proc/PID/ns/time, no timens_offsets.
    from ftimer_server.server import _process

    def no_file(pid: str) -> None:
        raise FileNotFoundError(2, "No such file or directory")

    monkeypatch.setattr(_process, "_timens_offsets", no_file)
    monkeypatch.setattr(_process, "_time_namespaces", lambda pid: (None, None))
    old_kernel = SystemInspector()
    assert old_kernel.clock_offsets(os.getpid()) == (0, 0)
    assert old_kernel.clock_offsets(children().pid) == (0, 0)


from .test_time_namespaces import _WHY_NOT, BEHIND, _in_time_namespace  # noqa: E402

# The inspector of a server that itself runs in a time namespace (unshare --time):
# prints the offsets of argv[1] from its own clocks.
OFFSETS = """
import sys
from ftimer_server import SystemInspector
print(*SystemInspector().clock_offsets(int(sys.argv[1])))
"""


@pytest.mark.skipif(bool(_WHY_NOT), reason=_WHY_NOT)
def test_offsets_are_from_the_servers_clocks_when_it_runs_in_a_time_namespace() -> None:
    with _in_time_namespace(["--monotonic", f"-{BEHIND}", "--boottime", "7"]) as worker:
        done = on_other_clocks(OFFSETS, str(worker), check=True)
    assert done.stdout.split() == [str((-BEHIND - 11) * 10**9), str((7 - 3) * 10**9)]


# A process that makes a time namespace with offsets of whole seconds and nanoseconds
# (as CRIU restores them) and forks a child into it; prints the child's pid.
SUBSECOND = """
import ctypes, os, sys
assert ctypes.CDLL(None, use_errno=True).unshare(0x80) == 0  # CLONE_NEWTIME
with open("/proc/self/timens_offsets", "w") as f:
    f.write("monotonic -10 250000000\\nboottime 3 500000000\\n")
child = os.fork()
if child == 0:
    sys.stdin.read()
    os._exit(0)
print(child, flush=True)
os.waitpid(child, 0)
"""


@pytest.mark.skipif(bool(_WHY_NOT), reason=_WHY_NOT)
def test_offsets_with_nanoseconds_are_read_to_the_nanosecond() -> None:
    with subprocess.Popen(
        [sys.executable, "-c", SUBSECOND], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    ) as process:
        assert process.stdout is not None
        assert process.stdin is not None
        child = int(process.stdout.readline())
        try:
            # -10 s + 0.25 s; +3.5 s
            assert inspector.clock_offsets(child) == (-9_750_000_000, 3_500_000_000)
        finally:
            process.stdin.close()
        assert process.wait(10) == 0


def test_only_emfile_and_enfile_are_said_to_be_out_of_descriptors() -> None:
    # Another reason a pidfd could not be opened (a thread's id, EPERM...) is not the
    # host's file table: an operator told to raise fs.file-max looks in the wrong place.
    from ftimer_server.server._process import out_of_descriptors

    assert out_of_descriptors(errno.EMFILE).startswith(": the server is out of file descriptors")
    assert out_of_descriptors(errno.ENFILE) == (
        ": the host is out of file descriptors (sysctl fs.file-max)"
    )
    for other in (None, errno.ENOENT, errno.EPERM, errno.EINVAL):
        assert out_of_descriptors(other) == ""


def test_a_kernel_without_pidfds_is_said_once_and_start_times_serve(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, children
) -> None:
    # A kernel before 5.3 (pidfd_open: ENOSYS): processes are checked by their start
    # time instead, which an operator must be told once (the warning went untested).
    calls: List[int] = []

    def no_pidfds(pid: int, flags: int = 0) -> int:
        calls.append(pid)
        raise OSError(errno.ENOSYS, os.strerror(errno.ENOSYS))

    monkeypatch.setattr(os, "pidfd_open", no_pidfds)
    child = children()
    inspector = SystemInspector()
    with caplog.at_level("WARNING", logger="ftimer_server"):
        assert inspector.open(child.pid) is None
        assert inspector.open(child.pid) is None
    assert calls == [child.pid]  # not asked again
    warned = [r.getMessage() for r in caplog.records if "no pidfds" in r.getMessage()]
    assert warned == ["no pidfds on this kernel: processes are checked by start time"]
    start = proc_start_time(child.pid)
    assert inspector.alive(Worker(child.pid, start, None))
