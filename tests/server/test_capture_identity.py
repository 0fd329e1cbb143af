"""A capture looks at the stuck worker and nothing else: real processes, real py-spy and
gcore.

- A worker whose pid is reused before or while py-spy or gcore runs: the process that
  took the pid is never dumped as the worker (its stacks and core discarded, never kept).
  Shown in a private PID namespace (``unshare --pid --fork --mount-proc``), where the
  test picks the next pid (``ns_last_pid``), with the window held open by a patch at the
  moment the reuse would have to happen on a busy host.
- A worker already traced by a debugger is left to it: no py-spy, no gcore, no SIGCONT.
- A worker whose main thread has exited while another hangs is captured.

Every process traced or signalled here is one the test started.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import resource
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Dict

import msgspec
import pytest
from tests.conftest import in_private_pid_namespace

from ftimer_server.core._incident import Capture
from ftimer_server.incidents import _helper, _tools
from ftimer_server.incidents._capture import CaptureOptions, capture, find_py_spy
from ftimer_server.incidents._pinned import Process
from ftimer_server.incidents._procfs import read_stat
from ftimer_server.incidents._tools import run_tool

PY_SPY = find_py_spy()
GCORE = shutil.which("gcore")

pytestmark = [
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs /proc"),
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: py-spy and gcore attach"),
    pytest.mark.skipif(PY_SPY is None, reason="py-spy is not installed"),
]
needs_gcore = pytest.mark.skipif(GCORE is None, reason="gcore (gdb) is not installed")

# Run as pid 1 of a new PID namespace: only its own processes are visible or at risk.
# argv: mode, a directory for the core. Prints the capture as JSON, then whether any file
# in the core directory holds the victim's secret.
REUSE = r"""
import json, os, subprocess, sys
import msgspec
from ftimer_protocol import parse_proc_stat
from ftimer_server.core._incident import Capture
from ftimer_server.incidents import _capture, _helper, _tools

WORKER = "\n".join([
    "import time",
    "def stuck_worker_fn():",
    "    print('ready', flush=True)",
    "    time.sleep(1000)",
    "stuck_worker_fn()",
])
VICTIM = "\n".join([
    "import time",
    "def victim_fn_of_another_job():",
    "    SECRET = 'victim-secret-4242' * 4",
    "    print('ready', flush=True)",
    "    time.sleep(1000)",
    "victim_fn_of_another_job()",
])
mode, directory = sys.argv[1], sys.argv[2]

def start(code):
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    assert p.stdout.readline() == b"ready\n"  # in its function
    return p

worker = start(WORKER)
pid = worker.pid
with open(f"/proc/{pid}/stat", "rb") as f:
    start_time = parse_proc_stat(f.read()).start_time
victims = []

def reuse():
    # The worker exits and a process of another job takes its pid.
    worker.kill()
    worker.wait()
    with open("/proc/sys/kernel/ns_last_pid", "w") as f:
        f.write(str(pid - 1))
    victim = start(VICTIM)
    assert victim.pid == pid, (victim.pid, pid)
    victims.append(victim)

tool = "gcore" if mode.endswith("gcore") else "py-spy"
if mode.startswith("before"):
    # Reused after the worker is pinned and read, before the tool is started.
    if tool == "gcore":
        real_capture = _helper.capture
        def patched(*args, **kwargs):
            result = real_capture(*args, **kwargs)
            reuse()
            return result
        _helper.capture = patched
    else:
        real_threads = _capture.read_threads
        def patched(*args, **kwargs):
            result = real_threads(*args, **kwargs)
            reuse()
            return result
        _capture.read_threads = patched
else:
    # Reused at the last moment: the tool starts right after, by the pid number.
    real_popen = _tools.subprocess.Popen
    def patched(command, *args, **kwargs):
        if not victims and any(os.path.basename(str(c)) == tool for c in command):
            reuse()
        return real_popen(command, *args, **kwargs)
    _tools.subprocess.Popen = patched

options = _capture.CaptureOptions(py_spy=None if tool == "gcore" else _capture.find_py_spy())
job = _helper.CaptureJob(
    pid=pid, start_time=start_time, role="stuck", labels=None, hook=None, options=options,
    deadline=__import__("time").monotonic() + 30,
    core=(directory, 1 << 30, "incident.core") if tool == "gcore" else None,
)
result = msgspec.msgpack.decode(_helper.run_capture(job), type=Capture)
print(msgspec.json.encode(result).decode())
leaked = []
for name in os.listdir(directory):
    with open(os.path.join(directory, name), "rb") as f:
        if b"victim-secret-4242" in f.read():
            leaked.append(name)
print(json.dumps({"reused": bool(victims), "leaked": leaked}))
for victim in victims:
    victim.kill()
    victim.wait()
"""


def _reuse(mode: str, tmp_path: pathlib.Path) -> tuple[Capture, dict[str, object]]:
    cores = tmp_path / "cores"
    cores.mkdir()
    result = in_private_pid_namespace(sys.executable, "-c", REUSE, mode, str(cores))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    checks = json.loads(lines[-1])
    assert checks["reused"], "the pid was never reused: the test did not test anything"
    return msgspec.json.decode(lines[-2], type=Capture), checks


def _functions(result: Capture) -> list[str]:
    return [frame.function for thread in result.threads for frame in thread.frames]


@needs_gcore
@pytest.mark.parametrize("when", ["before", "while"])
def test_a_core_is_never_another_process_s(tmp_path: pathlib.Path, when: str) -> None:
    result, checks = _reuse(f"{when}-gcore", tmp_path)
    assert checks["leaked"] == []
    assert result.core is None
    assert "core dump: not kept: the worker exited" in (result.error or "")


@pytest.mark.parametrize("when", ["before", "while"])
def test_py_spy_stacks_are_never_another_process_s(tmp_path: pathlib.Path, when: str) -> None:
    result, _ = _reuse(f"{when}-py-spy", tmp_path)
    assert "victim_fn_of_another_job" not in _functions(result)
    assert result.method != "py-spy"
    assert not result.raw
    assert "what py-spy read is discarded" in (result.error or "")


SLEEPER = (
    "import time\ndef stuck_worker_fn():\n    print('ready', flush=True)\n"
    "    time.sleep(1000)\nstuck_worker_fn()\n"
)
# Our own debugger: seizes the worker, reports each stop it sees (its signal), resumes it
# without the signal (as a debugger holding it would not pass it on), ends at SIGWINCH.
TRACER = r"""
import ctypes, os, signal, sys
libc = ctypes.CDLL(None, use_errno=True)
pid = int(sys.argv[1])
if libc.ptrace(0x4206, pid, 0, 0) != 0:  # PTRACE_SEIZE
    print("refused", ctypes.get_errno(), flush=True)
    sys.exit(0)
print("seized", flush=True)
while True:
    _, status = os.waitpid(pid, 0x40000000)  # __WALL
    sig = os.WSTOPSIG(status) if os.WIFSTOPPED(status) else -1
    print(sig, flush=True)
    if sig in (signal.SIGWINCH, -1):
        break
    libc.ptrace(7, pid, 0, 0)  # PTRACE_CONT, the signal withheld
"""


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    with subprocess.Popen([sys.executable, "-c", SLEEPER], stdout=subprocess.PIPE) as proc:
        try:
            assert proc.stdout is not None
            assert proc.stdout.readline() == b"ready\n"
            yield proc
        finally:
            proc.kill()


@needs_gcore
def test_a_traced_worker_is_left_to_its_debugger(
    tmp_path: pathlib.Path, sleeper: subprocess.Popen[bytes]
) -> None:
    tracer = subprocess.Popen(
        [sys.executable, "-c", TRACER, str(sleeper.pid)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert tracer.stdout is not None
        if tracer.stdout.readline().strip() != "seized":
            pytest.skip("cannot ptrace here (kernel.yama.ptrace_scope?)")
        # Named by its command too: "traced by pid 17" left the reader to find which.
        named = f"pid {tracer.pid} ({pathlib.Path(f'/proc/{tracer.pid}/comm').read_text().strip()})"
        job = _helper.CaptureJob(
            pid=sleeper.pid,
            start_time=read_stat(sleeper.pid).start_time,
            role="stuck",
            labels=None,
            hook=None,
            options=CaptureOptions(py_spy=PY_SPY),
            deadline=time.monotonic() + 20,
            core=(str(tmp_path), 1 << 30, "incident.core"),
        )
        result = msgspec.msgpack.decode(_helper.run_capture(job), type=Capture)
        # A marker after the capture: a SIGCONT sent by it (a lower signal number, so
        # delivered first) would be reported before it.
        os.kill(sleeper.pid, signal.SIGWINCH)
        stops = [int(line) for line in tracer.stdout]
        tracer.wait(10)
    finally:
        tracer.kill()
        tracer.wait()
        if tracer.stdout is not None:
            tracer.stdout.close()
    assert stops == [signal.SIGWINCH], "the debugger saw stops the capture caused"
    error = result.error or ""
    assert f"py-spy: not used: process {sleeper.pid} is already traced by {named}, a " in error
    assert f"core dump: not taken: process {sleeper.pid} is already traced by {named}" in error
    assert "run the server as root" not in error
    assert result.core is None
    assert os.listdir(tmp_path) == []


def test_a_tool_never_resumes_a_traced_process(sleeper: subprocess.Popen[bytes]) -> None:
    # Traced after the capture looked (a debugger attaching meanwhile): the SIGCONT a
    # tool's run ends with is not sent either.
    tracer = subprocess.Popen(
        [sys.executable, "-c", TRACER, str(sleeper.pid)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert tracer.stdout is not None
        if tracer.stdout.readline().strip() != "seized":
            pytest.skip("cannot ptrace here (kernel.yama.ptrace_scope?)")
        process = Process.open(sleeper.pid, None, None)
        try:
            run = run_tool(["true"], process, time.monotonic() + 10, resume=True)
        finally:
            process.close()
        assert run.returncode == 0
        os.kill(sleeper.pid, signal.SIGWINCH)  # the marker, as above
        stops = [int(line) for line in tracer.stdout]
        tracer.wait(10)
    finally:
        tracer.kill()
        tracer.wait()
        if tracer.stdout is not None:
            tracer.stdout.close()
    assert stops == [signal.SIGWINCH]


# The main thread (the thread-group leader) exits; a thread it started hangs on.
ZOMBIE_LEADER = r"""
import ctypes, threading, time
def stuck_in_thread():
    print("ready", flush=True)
    time.sleep(1000)
threading.Thread(target=stuck_in_thread).start()
time.sleep(0.05)
ctypes.CDLL(None).pthread_exit(None)
"""


def test_a_worker_whose_main_thread_exited_is_captured(tmp_path: pathlib.Path) -> None:
    worker = subprocess.Popen([sys.executable, "-c", ZOMBIE_LEADER], stdout=subprocess.PIPE)
    try:
        assert worker.stdout is not None
        assert worker.stdout.readline() == b"ready\n"
        # Wait for the main thread to have exited (an explicit wait, bounded).
        until = time.monotonic() + 10
        while read_stat(worker.pid).state != "Z":
            assert time.monotonic() < until, "the main thread never exited"
            time.sleep(0.01)
        start_time = read_stat(worker.pid).start_time
        result = capture(
            worker.pid,
            start_time,
            None,
            role="stuck",
            labels=None,
            hook=None,
            options=CaptureOptions(py_spy=PY_SPY),
            deadline=time.monotonic() + 20,
        )
        assert not result.exited, result.error
        assert result.method == "py-spy", result.error
        assert "stuck_in_thread" in _functions(result)
        assert "its main thread has exited" in (result.error or "")
        if GCORE is not None:  # gcore cannot attach to it: said so, nothing written
            job = _helper.CaptureJob(
                pid=worker.pid,
                start_time=start_time,
                role="stuck",
                labels=None,
                hook=None,
                options=CaptureOptions(),
                deadline=time.monotonic() + 20,
                core=(str(tmp_path), 1 << 30, "incident.core"),
            )
            cored = msgspec.msgpack.decode(_helper.run_capture(job), type=Capture)
            assert cored.core is None
            assert "core dump: not taken: its main thread has exited" in (cored.error or "")
        assert worker.poll() is None  # still running: nothing here stopped or killed it
    finally:
        worker.kill()
        worker.wait()
        if worker.stdout is not None:
            worker.stdout.close()


@pytest.fixture
def high_descriptor() -> Iterator[int]:
    """A descriptor number from 1024 up (select() refuses those), free to ``dup2`` onto:
    a daemon holding a pidfd per worker reaches them."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 2048:
        pytest.skip(f"needs 2048 descriptors (RLIMIT_NOFILE hard limit {hard})")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 2048), hard))
    try:
        yield 1500
    finally:
        with contextlib.suppress(OSError):
            os.close(1500)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_a_process_pinned_by_a_pidfd_numbered_from_1024_up_is_alive(
    sleeper: subprocess.Popen[bytes], high_descriptor: int
) -> None:
    # select() raised ValueError for it, taken for "exited": --reap-tree left the stuck
    # worker's children running once the daemon held 1024 descriptors (a user's 1100
    # armed processes were enough), and said the worker had exited.
    pidfd = os.pidfd_open(sleeper.pid)
    os.dup2(pidfd, high_descriptor)
    os.close(pidfd)
    process = Process.open(sleeper.pid, None, high_descriptor)
    assert process.alive()
    sleeper.kill()
    sleeper.wait()
    assert not process.alive()


#: A worker with 600 MB of memory written: its core takes gcore longer than a short budget.
LARGE = (
    "import time\nheld = bytearray(600 << 20)\nfor i in range(0, len(held), 4096):\n"
    "    held[i] = 1\nprint('ready', flush=True)\ntime.sleep(1000)\n"
)


@needs_gcore
def test_a_core_that_outlasts_the_budget_costs_only_itself(tmp_path: pathlib.Path) -> None:
    # gcore was given the capture's whole budget: killed at its end, the answer came
    # after it, and the incident said "nothing captured" (its stacks lost with the core).
    with subprocess.Popen([sys.executable, "-c", LARGE], stdout=subprocess.PIPE) as worker:
        try:
            assert worker.stdout is not None
            assert worker.stdout.readline() == b"ready\n"
            deadline = time.monotonic() + 0.4
            job = _helper.CaptureJob(
                pid=worker.pid,
                start_time=read_stat(worker.pid).start_time,
                role="stuck",
                labels=None,
                hook=None,
                options=CaptureOptions(py_spy=PY_SPY),
                deadline=deadline,
                core=(str(tmp_path), 1 << 31, "incident.core"),
            )
            result = msgspec.msgpack.decode(_helper.run_capture(job), type=Capture)
            answered = time.monotonic()
        finally:
            worker.kill()
    assert answered < deadline, f"answered {answered - deadline:.3f} s after the deadline"
    assert result.method == "py-spy"
    assert result.core is None
    assert "core dump: gcore did not finish within" in (result.error or "")
    assert list(tmp_path.iterdir()) == []  # its part removed


# Says the signals it gets: SIGCONT, and SIGWINCH, the marker that ends it. Python runs
# the handlers of signals pending together by number: a SIGCONT sent before the marker
# is said before it.
SAYS_SIGNALS = r"""
import signal, sys, time
def said(signum, frame):
    print(signal.Signals(signum).name, flush=True)
    if signum == signal.SIGWINCH:
        sys.exit(0)
signal.signal(signal.SIGCONT, said)
signal.signal(signal.SIGWINCH, said)
def stuck_worker_fn():
    print("ready", flush=True)
    while True:
        time.sleep(1000)
stuck_worker_fn()
"""


@pytest.fixture
def says_signals() -> Iterator[subprocess.Popen[str]]:
    with subprocess.Popen(
        [sys.executable, "-c", SAYS_SIGNALS], stdout=subprocess.PIPE, text=True
    ) as proc:
        try:
            assert proc.stdout is not None
            assert proc.stdout.readline() == "ready\n"
            yield proc
        finally:
            proc.kill()


def _signals_said(worker: subprocess.Popen[str]) -> list[str]:
    os.kill(worker.pid, signal.SIGCONT)  # in case it is stopped: said, after the rest
    os.kill(worker.pid, signal.SIGWINCH)
    assert worker.stdout is not None
    return worker.stdout.read().split()


def _capture(pid: int) -> Capture:
    options = CaptureOptions(py_spy=PY_SPY)
    return capture(
        pid,
        None,
        None,
        role="stuck",
        labels=None,
        hook=None,
        options=options,
        deadline=time.monotonic() + 30,
    )


def test_a_capture_sends_no_sigcont_to_a_worker_it_did_not_leave_stopped(
    says_signals: subprocess.Popen[str],
) -> None:
    # py-spy stopped the worker, read it and let it go on; the capture then sent it a
    # SIGCONT, in case py-spy had been killed with the worker stopped: it ran the
    # worker's handler and broke its system call off, for nothing.
    result = _capture(says_signals.pid)
    assert result.method == "py-spy", result.error
    assert _signals_said(says_signals) == ["SIGCONT", "SIGWINCH"]  # ours alone


def test_a_tool_that_leaves_the_worker_stopped_has_it_continued(
    says_signals: subprocess.Popen[str],
) -> None:
    process = Process.open(says_signals.pid, None, None)
    try:
        stop = f"import os; os.kill({says_signals.pid}, {int(signal.SIGSTOP)})"
        run = run_tool([sys.executable, "-c", stop], process, time.monotonic() + 10, resume=True)
    finally:
        process.close()
    assert run.returncode == 0
    assert read_stat(says_signals.pid).state != "T"  # continued by run_tool


def test_a_stopped_worker_is_read_without_stopping_it_and_left_stopped(
    says_signals: subprocess.Popen[str],
) -> None:
    # py-spy's own stop failed on it ("Failed to suspend process"): no stack at all.
    os.kill(says_signals.pid, signal.SIGSTOP)
    assert os.WIFSTOPPED(os.waitpid(says_signals.pid, os.WUNTRACED)[1])
    result = _capture(says_signals.pid)
    assert result.method == "py-spy", result.error
    assert "stuck_worker_fn" in _functions(result)
    assert "read without stopping it: it is stopped (T state)" in (result.error or "")
    assert read_stat(says_signals.pid).state == "T"  # as it was found
    assert _signals_said(says_signals) == ["SIGCONT", "SIGWINCH"]  # ours alone


def test_a_tool_that_leaves_a_stop_pending_has_the_worker_continued(
    says_signals: subprocess.Popen[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The core dump's own SIGSTOP of a worker in uninterruptible sleep (D) waits until it
    # leaves it; with no SIGCONT after gcore, it stopped then, after its SIGTERM's
    # handler, and stayed stopped. Here the stop is pending as /proc says it: only the
    # pending mask is held (a real D state needs a hung file system).
    real_status = _tools.read_status

    def stop_pending(pid: int, tid: object = None) -> Dict[str, str]:
        status = real_status(pid)
        if pid == says_signals.pid:
            status["ShdPnd"] = f"{1 << (signal.SIGSTOP - 1):016x}"
        return status

    monkeypatch.setattr(_tools, "read_status", stop_pending)
    continued: list[int] = []
    real_resume = Process.resume

    def resume(self: Process) -> None:
        continued.append(self.pid)
        real_resume(self)

    monkeypatch.setattr(Process, "resume", resume)
    process = Process.open(says_signals.pid, None, None)
    try:
        run_tool(["true"], process, time.monotonic() + 10, resume=True)
    finally:
        process.close()
    assert continued == [says_signals.pid]
