"""The server as anyone who may write its FIFO can drive it: processes named once and
left without a timer holding the server's descriptors until a real worker's arm finds
none. Real processes (sleepers of the test's own) and FIFO; a RecordingSignaller:
nothing is signalled."""

from __future__ import annotations

import json
import subprocess
import sys

IDLE_PIDFDS = """
import json, os, resource, subprocess, tempfile
from ftimer_protocol import Arm, Disarm, encode
from ftimer_server import FileTimerServer, RecordingSignaller, Rejected
resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
others = [subprocess.Popen(["sleep", "60"]) for _ in range(80)]  # more than 64
worker = subprocess.Popen(["sleep", "60"])
refused = []
fifo = os.path.join(tempfile.mkdtemp(), "timer.fifo")
server = FileTimerServer(
    fifo, signaller=RecordingSignaller(), on_event=refused.append, event_types=[Rejected]
)
try:
    with server:
        fd = os.open(fifo, os.O_WRONLY)
        for p in others:  # arm and disarm: none left with a timer
            os.write(fd, encode(Arm(pid=p.pid, scope_id="x", deadline=1e9, signal=0)))
            os.write(fd, encode(Disarm(pid=p.pid, scope_id="x")))
        server.sync()
        assert not server.armed()
        os.write(fd, encode(Arm(pid=worker.pid, scope_id="step", deadline=1e9, signal=9)))
        server.sync()
        os.close(fd)
        print(json.dumps({
            "armed": [t.pid for t in server.armed()],
            "worker": worker.pid,
            "refused": [r.detail for r in refused if r.pid == worker.pid],
        }))
finally:
    for p in others + [worker]:
        p.kill()
        p.wait()
"""


def test_processes_left_without_a_timer_never_cost_a_worker_its_watch() -> None:
    # Each process bound keeps its pidfd until it exits (binding again at every arm
    # would cost a few system calls each): a writer that armed and disarmed one timer
    # for as many processes as the server has descriptors left a real worker's arm
    # refused ("unverifiable", EMFILE), the worker unwatched.
    result = subprocess.run(
        [sys.executable, "-c", IDLE_PIDFDS], capture_output=True, text=True, timeout=100
    )
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["refused"] == []
    assert out["armed"] == [out["worker"]]
