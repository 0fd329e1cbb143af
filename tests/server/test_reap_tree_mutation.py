"""What mutation testing of reap_tree's stop signals found no test pinned. A real
server reaps a worker this test starts (and its child): nothing else is signalled."""

from __future__ import annotations

import contextlib
import pathlib
import select
import subprocess
import sys

from tests.conftest import wait_until
from tests.server.conftest import Recorder

from ftimer_server import FileTimerServer, Reaped
from ftimer_server.incidents._diagnostics import IncidentOptions

WORKER = """
import os, signal, subprocess, sys, time
from ftimer_client import FileTimerClient

child = subprocess.Popen([sys.executable, "-c", sys.argv[2]])
line = sys.stdin.readline()  # the test says when the child is ready
client = FileTimerClient(sys.argv[1])
client.arm("step", 0.3, signal=signal.SIGTSTP)
os.write(1, b"armed\\n")
while True:
    time.sleep(60)
"""

CHILD = (
    "import os, signal, time\n"
    "signal.signal(signal.SIGTSTP, lambda *_: os.write(1, b'child handled\\n'))\n"
    "os.write(1, b'child ready\\n')\n"
    "while True: time.sleep(60)\n"
)

PLAIN_WORKER = """
import os, signal, sys, time
from ftimer_client import FileTimerClient

client = FileTimerClient(sys.argv[1])
client.arm("step", 0.3, signal=signal.SIGTSTP)
os.write(1, b"armed\\n")
while True:
    time.sleep(60)
"""


def _state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


def _children(pid: int) -> list:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(x) for x in f.read().split()]


def test_reap_tree_continues_a_descendant_that_catches_the_stop_signal(
    tmp_path: pathlib.Path,
) -> None:
    # Kills _reap_extras.py _signal_tree: `if signal in _STOPS and
    # _catches_or_ignores(child, signal): process.resume()` dropped (the walk's SIGSTOP
    # left such a descendant stopped for good, its handler never run).
    fifo = tmp_path / "timer.fifo"
    events = Recorder()
    options = IncidentOptions(directory=str(tmp_path / "i"), method="facts", reap_tree=True)
    with FileTimerServer(fifo, on_event=events, incidents=options):
        worker = subprocess.Popen(
            [sys.executable, "-c", WORKER, str(fifo), CHILD],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        )  # fmt: skip
        child = None
        try:
            assert worker.stdout is not None
            assert worker.stdin is not None
            assert worker.stdout.readline() == b"child ready\n"
            [child] = _children(worker.pid)
            worker.stdin.write(b"go\n")
            worker.stdin.flush()
            assert worker.stdout.readline() == b"armed\n"
            wait_until(lambda: events.of(Reaped), what="the reap")
            ready = select.select([worker.stdout], [], [], 10)[0]
            assert ready, f"the child's handler never ran; its state: {_state(child)}"
            assert worker.stdout.readline() == b"child handled\n"
        finally:
            if child is not None:
                import os
                import signal

                try:
                    fd = os.pidfd_open(child)
                except ProcessLookupError:
                    fd = -1
                if fd >= 0:
                    with contextlib.suppress(ProcessLookupError):
                        signal.pidfd_send_signal(fd, signal.SIGKILL)
                    os.close(fd)
            worker.kill()
            worker.wait()
            worker.stdin.close()  # type: ignore[union-attr]
            worker.stdout.close()  # type: ignore[union-attr]


def test_reap_tree_leaves_a_worker_stopped_by_its_stop_signal(tmp_path: pathlib.Path) -> None:
    # Kills _reap_extras.py _signal_tree: `if not stops: root.resume()` made `if True:`
    # (the walk's SIGCONT after the worker's own SIGTSTP discarded it: a worker reaped
    # with a stop signal ran on).
    fifo = tmp_path / "timer.fifo"
    events = Recorder()
    options = IncidentOptions(directory=str(tmp_path / "i"), method="facts", reap_tree=True)
    with FileTimerServer(fifo, on_event=events, incidents=options):
        worker = subprocess.Popen([sys.executable, "-c", PLAIN_WORKER, str(fifo)],
                                  stdout=subprocess.PIPE)  # fmt: skip
        try:
            assert worker.stdout is not None
            assert worker.stdout.readline() == b"armed\n"
            [reaped] = wait_until(lambda: events.of(Reaped), what="the reap")
            assert reaped.delivered
            assert _state(worker.pid) == "T"
        finally:
            worker.kill()
            worker.wait()
            worker.stdout.close()  # type: ignore[union-attr]
