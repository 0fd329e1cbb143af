"""A reused pid is never signalled: real processes in a private PID namespace, where the
test picks the next pid (``ns_last_pid``) to make a new process take a dead worker's pid
before its timer expires."""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("unshare") is None,
    reason="needs root and unshare(1) for a private PID namespace",
)

# Runs as pid 1 of a new PID namespace, so only its own processes are visible or at risk.
SCRIPT = """
import os, subprocess, sys, threading, time
from ftimer_protocol import TimerRequestV1, encode
from ftimer_server import FileTimerServer, Reaped, SystemInspector, WorkerGone

class NoPidfd(SystemInspector):
    def open(self, pid):
        return None

path, use_pidfd = sys.argv[1], sys.argv[2] == "1"
events = []
gate, held = threading.Event(), threading.Event()

def on_event(event):
    events.append(event)
    if not gate.is_set():
        held.set()
        gate.wait(30)  # hold the loop: it must not see the worker exit in time

server = FileTimerServer(path, on_event=on_event, inspector=None if use_pidfd else NoPidfd())
server.start()
worker = subprocess.Popen(["sleep", "60"])
pid = worker.pid
deadline = time.time() + 0.5
fd = os.open(path, os.O_WRONLY)
# torch's v1 format: no start time in the message; the server binds the pid on receipt.
os.write(fd, encode(TimerRequestV1(pid=pid, scope_id="s", expiration_time=deadline, signal=9)))
assert held.wait(30)  # the loop is held in the callback of the Armed event
worker.kill()
worker.wait()
time.sleep(0.03)  # a later clock tick: start times have a 10 ms resolution
with open("/proc/sys/kernel/ns_last_pid", "w") as f:
    f.write(str(pid - 1))
intruder = subprocess.Popen(["sleep", "60"])
assert intruder.pid == pid, (intruder.pid, pid)
time.sleep(max(0.0, deadline - time.time()) + 0.05)  # let the deadline pass
gate.set()
server.sync()
print("intruder alive:", intruder.poll() is None)
print("reaped:", [e.pid for e in events if isinstance(e, Reaped)])
print("gone:", [e.pid for e in events if isinstance(e, WorkerGone)] == [pid])
server.stop()
intruder.kill()
"""


@pytest.mark.parametrize("use_pidfd", [True, False], ids=["pidfd", "start-time"])
def test_a_pid_taken_by_another_process_is_never_signalled(
    fifo_path: pathlib.Path, use_pidfd: bool
) -> None:
    namespace = ["unshare", "--pid", "--fork", "--mount-proc"]
    result = subprocess.run(
        [*namespace, sys.executable, "-c", SCRIPT, str(fifo_path), "1" if use_pidfd else "0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if result.returncode != 0 and "unshare failed" in result.stderr:
        pytest.skip(f"no PID namespace here: {result.stderr.strip()}")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["intruder alive: True", "reaped: []", "gone: True"]
