"""What mutation testing of the pidfds let go of when descriptors run out found no
test pinned: those of refused processes too. Real processes of this test's own
(sleepers, some as uid 65534) and a recording signaller: nothing is signalled but them,
killed at the end."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

REFUSED_PIDFDS = """
import json, os, resource, subprocess, tempfile
from ftimer_protocol import Arm, encode
from ftimer_server import FileTimerServer, Policy, RecordingSignaller, Rejected
resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
def nobody():
    os.setgid(65534); os.setuid(65534)
others = [subprocess.Popen(["sleep", "60"], preexec_fn=nobody) for _ in range(80)]
worker = subprocess.Popen(["sleep", "60"])
refused = []
fifo = os.path.join(tempfile.mkdtemp(), "timer.fifo")
server = FileTimerServer(
    fifo, signaller=RecordingSignaller(), on_event=refused.append, event_types=[Rejected],
    policy=Policy(allowed_uids=frozenset({0})),
)
try:
    with server:
        fd = os.open(fifo, os.O_WRONLY)
        for p in others:  # refused for their uid: each held, its pidfd open
            os.write(fd, encode(Arm(pid=p.pid, scope_id="x", deadline=1e9, signal=0)))
        os.write(fd, encode(Arm(pid=worker.pid, scope_id="step", deadline=1e9, signal=9)))
        server.sync()
        os.close(fd)
        print(json.dumps({
            "armed": [t.pid for t in server.armed()],
            "worker": worker.pid,
            "others_refused": sum(1 for r in refused if r.pid != worker.pid),
            "refused": [r.detail for r in refused if r.pid == worker.pid],
        }))
finally:
    for p in others + [worker]:
        p.kill()
        p.wait()
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to start processes of uid 65534")
def test_refusals_held_never_cost_an_allowed_worker_its_watch() -> None:
    # Kills _watchdog.py _let_go_of_idle: `refused = [...]` made `[]`, and
    # `return bool(refused or idle)` made `bool(idle)`: the pidfds of processes refused
    # for their uid, held for nothing, left an allowed worker's arm refused (EMFILE).
    result = subprocess.run(
        [sys.executable, "-c", REFUSED_PIDFDS], capture_output=True, text=True, timeout=100
    )
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["others_refused"] > 0
    assert out["refused"] == []
    assert out["armed"] == [out["worker"]]
