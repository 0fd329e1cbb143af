"""The reaping path as odd workers meet it: a container's first process (pid 1 of its
PID namespace) reaped with a signal it has no handler for, or one that takes it itself,
a worker that catches the stop signal it is reaped with under ``reap_tree``, and a dead
worker's last torch arm read after another process took its pid. Real processes, all started
here; the server signals only the test's descendants (``OwnChildrenSignaller``, the
worker's pidfd) or nothing (``RecordingSignaller`` in a private PID namespace)."""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import select
import shutil
import signal
import subprocess
import sys
import time

import pytest
from tests.conftest import children_of, wait_until
from tests.server.conftest import (
    OwnChildrenSignaller,
    Recorder,
    namespace_init,
    namespaces,
    proc_start_time,
    send,
)

from ftimer_protocol import Arm
from ftimer_server import FileTimerServer, Reaped
from ftimer_server.incidents._diagnostics import IncidentOptions
from ftimer_server.server._signaller import _as_received


def state(pid: int) -> str:
    """The process's state letter ("X" once it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return "X"


@namespaces
def test_a_namespaces_init_reaped_with_a_signal_it_does_not_handle_dies_of_it(
    tmp_path: pathlib.Path,
) -> None:
    # `ftimer arm --signal TERM` from a container's entry shell (over the socket): the
    # kernel drops a signal the namespace's init has no handler for, even from the
    # host's namespace (only SIGKILL and SIGSTOP are forced through). The reap was
    # reported delivered, and the stuck container ran on.
    fifo = tmp_path / "timer.fifo"
    events = Recorder()
    outer = subprocess.Popen(["unshare", "--pid", "--fork", "sh", "-c", "sleep 600; true"])
    pidfds = []
    try:
        [init] = wait_until(lambda: children_of(outer.pid), what="the namespace's init")
        pidfds.append(os.pidfd_open(init))
        wait_until(lambda: children_of(init), what="its command")
        with FileTimerServer(fifo, on_event=events, signaller=OwnChildrenSignaller()):
            deadline = time.monotonic() + 0.2
            send(fifo, Arm(init, "step", deadline, int(signal.SIGTERM), proc_start_time(init)))
            [reaped] = wait_until(lambda: events.of(Reaped), what="the reap")
            assert reaped.delivered
            assert reaped.signal == signal.SIGTERM  # what was asked for
            assert select.select(pidfds, [], [], 10)[0], "the worker runs on"
    finally:
        for fd in pidfds:  # forced through from its parent namespace
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(fd, signal.SIGKILL)
            os.close(fd)
        outer.wait(30)


CATCHES_TSTP = """
import os, signal, sys, time
from ftimer_client import FileTimerClient

signal.signal(signal.SIGTSTP, lambda *_: os.write(1, b"handled\\n"))
client = FileTimerClient(sys.argv[1])
client.arm("step", 0.3, signal=signal.SIGTSTP)
os.write(1, b"armed\\n")
while True:
    time.sleep(60)
"""


@pytest.mark.parametrize("tree", [False, True], ids=["alone", "reap_tree"])
def test_a_stop_signal_the_worker_catches_is_handled_with_or_without_reap_tree(
    tmp_path: pathlib.Path, tree: bool
) -> None:
    # reap_tree stops the worker for the walk of its tree, and did not continue it when
    # the reap's signal was a stop signal: one that catches it was left stopped for
    # good, its handler never run; the same reap alone runs the handler.
    fifo = tmp_path / "timer.fifo"
    events = Recorder()
    options = IncidentOptions(directory=str(tmp_path / "i"), method="facts", reap_tree=tree)
    with FileTimerServer(fifo, on_event=events, incidents=options):
        worker = subprocess.Popen(
            [sys.executable, "-c", CATCHES_TSTP, str(fifo)], stdout=subprocess.PIPE
        )
        try:
            assert worker.stdout is not None
            assert worker.stdout.readline() == b"armed\n"
            wait_until(lambda: events.of(Reaped), what="the reap")
            ready = select.select([worker.stdout], [], [], 10)[0]
            assert ready, f"the handler never ran; the worker's state: {state(worker.pid)}"
            assert worker.stdout.readline() == b"handled\n"
        finally:
            worker.kill()
            worker.wait()
            worker.stdout.close()  # type: ignore[union-attr]


LATE_ARM = """
import json, os, subprocess, sys, threading, time
from ftimer_protocol import TimerRequestV1, encode
from ftimer_server import Expired, FileTimerServer, Reaped, RecordingSignaller

CLK_TCK = os.sysconf("SC_CLK_TCK")
path = sys.argv[1]
events, gate, held = [], threading.Event(), threading.Event()

def on_event(event):
    events.append(event)
    if not gate.is_set():  # the loop held in the first Armed event's callback
        held.set()
        gate.wait(30)

def start_time(pid):
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[19])

signaller = RecordingSignaller()
server = FileTimerServer(path, on_event=on_event, signaller=signaller)
server.start()
fd = os.open(path, os.O_WRONLY)
old = subprocess.Popen(["sleep", "60"])
pid, born = old.pid, start_time(old.pid)
os.write(fd, encode(TimerRequestV1(pid, "old", time.time() + 3600, 15)))  # torch's format
assert held.wait(30)
# The old worker's last words, written before it dies: another arm, due in 0.3 s.
os.write(fd, encode(TimerRequestV1(pid, "late", time.time() + 0.3, 15)))
old.kill()
old.wait()  # its pid free: the loop sees its exit and holds it (EXIT_HOLD)
while int(time.clock_gettime(time.CLOCK_BOOTTIME) * CLK_TCK) <= born:
    time.sleep(0.001)  # a later tick: another process by its start time
with open("/proc/sys/kernel/ns_last_pid", "w") as f:
    f.write(str(pid - 1))
new = subprocess.Popen(["sleep", "60"])  # asks for nothing
assert new.pid == pid, (new.pid, pid)
gate.set()
witness = subprocess.Popen(["sleep", "60"])  # a report-only timer due after "late"
os.write(fd, encode(TimerRequestV1(witness.pid, "after", time.time() + 0.6, 0)))
end = time.monotonic() + 10  # until it expires
while time.monotonic() < end and not any(
    isinstance(e, Expired) and e.timer.scope_id == "after" for e in events
):
    time.sleep(0.01)
print(json.dumps([[e.scope_id for e in events if isinstance(e, Reaped)], signaller.sent]))
server.stop()
new.kill()
witness.kill()
"""


@namespaces
def test_a_dead_workers_last_arm_never_binds_the_process_that_took_its_pid(
    tmp_path: pathlib.Path,
) -> None:
    # The loop applies a worker's exit 50 ms after it sees it, its last words first.
    # torch's arm carries no start time: bound to whoever held the pid when read, the
    # dead worker's own last arm went to a process that took the pid meanwhile, and
    # reaped it, though it never asked. (The other side, left so: a new process's
    # first arm read in those 50 ms is dropped with the dead worker; its next one binds.)
    result = subprocess.run(
        ["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-c", LATE_ARM,
         str(tmp_path / "timer.fifo")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    reaped, sent = json.loads(result.stdout)
    assert reaped == []
    assert sent == []


SIGWAIT_INIT = (
    "import signal; signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM});"
    "print('ready', flush=True); signal.sigwait({signal.SIGTERM}); print('got', flush=True)"
)


@namespaces
@pytest.mark.parametrize("waits", ["sigwait", "blocked"])
def test_a_namespaces_init_that_takes_the_signal_itself_gets_it_as_sent(waits: str) -> None:
    # tini and dumb-init block the signals and take them with sigwait() (systemd and
    # catatonit with a signalfd, blocked): the kernel drops none of them, and such an
    # init passes SIGTERM on for a graceful stop. Made SIGKILL, the whole namespace died.
    script = SIGWAIT_INIT if waits == "sigwait" else SIGWAIT_INIT.replace(
        "signal.sigwait({signal.SIGTERM})", "__import__('time').sleep(600)"
    )  # fmt: skip
    with namespace_init(script) as (init, _):
        if waits == "sigwait":  # in sigtimedwait(), where SigBlk no longer shows it
            wait_until(lambda: "sigtimedwait" in pathlib.Path(f"/proc/{init}/wchan").read_text())
        assert _as_received(init, signal.SIGTERM) == signal.SIGTERM


ANOTHER_THREAD = (
    "import signal, threading, time\n"
    "threading.Thread(target=time.sleep, args=(600,), daemon=True).start()\n"
    "signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})\n"
    "print('ready', flush=True); time.sleep(600)\n"
)
WAITS_FOR_ANOTHER = (
    "import signal\n"
    "signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})\n"
    "print('ready', flush=True); signal.sigtimedwait({signal.SIGCHLD}, 600)\n"
)
PLAIN = "import time; print('ready', flush=True); time.sleep(600)\n"


@namespaces
@pytest.mark.parametrize(
    "script", [ANOTHER_THREAD, WAITS_FOR_ANOTHER, PLAIN], ids=["thread", "sigchld", "traced"]
)
def test_what_a_stuck_init_that_would_drop_the_signal_is_sent_ends_it(script: str) -> None:
    # An init's main thread that blocks it, or a wait in sigtimedwait(), says nothing
    # of a thread that does not block it (it takes the signal, and drops it), of the set
    # waited for (SIGCHLD), or of a tracer that passes it on: the container ran on.
    tracer = None
    with namespace_init(script) as (init, pidfd):
        status = pathlib.Path(f"/proc/{init}/status")
        if script is WAITS_FOR_ANOTHER:
            wait_until(lambda: "sigtimedwait" in pathlib.Path(f"/proc/{init}/wchan").read_text())
        if script is PLAIN:
            if shutil.which("strace") is None:
                pytest.skip("no strace here to trace the init")
            tracer = subprocess.Popen(["strace", "-qq", "-o", "/dev/null", "-p", str(init)])
            wait_until(lambda: "TracerPid:\t0\n" not in status.read_text(), what="strace")
        try:
            signal.pidfd_send_signal(pidfd, _as_received(init, signal.SIGTERM))
            assert select.select([pidfd], [], [], 10)[0], "the stuck init runs on"
        finally:
            if tracer is not None:
                tracer.kill()
                tracer.wait(30)
