"""Workers in time namespaces, real ones (``unshare --time``): a process whose clocks are
offset from the server's names other times with the same numbers, and is refused rather
than reaped at a deadline it never meant. Only the test's own children are signalled."""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys
from typing import List, Tuple

import pytest
from tests.conftest import wait_until

from ftimer_server import FileTimerServer, Reaped, Rejected, RejectReason, SystemInspector

from .conftest import OwnChildrenSignaller, Recorder

# Arms over the FIFO or the socket, says so (with its pid: unshare forks it), and holds
# its block until told to go on.
WORKER = """
import os, sys
from ftimer_client import FileTimerClient, configure, expires
configure(FileTimerClient(sys.argv[1]))
with expires(after=float(sys.argv[2])):
    print("armed", os.getpid(), flush=True)
    sys.stdin.readline()
"""


def _time_namespaces() -> str:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return "needs root and unshare(1)"
    probe = subprocess.run(
        ["unshare", "--time", "--monotonic", "1", "--fork", "true"], capture_output=True
    )
    return "" if probe.returncode == 0 else f"no time namespaces here: {probe.stderr!r}"


pytestmark = pytest.mark.skipif(bool(_time_namespaces()), reason=_time_namespaces())


def _worker(path: str, offsets: List[str], after: float) -> Tuple[subprocess.Popen[str], int]:
    """Start a worker in a new time namespace; return unshare's process and the worker's
    pid, once it has armed."""
    argv = [sys.executable, "-c", WORKER, path, str(after)]
    child = subprocess.Popen(
        ["unshare", "--time", *offsets, "--fork", "--kill-child", *argv],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None
    said, pid = child.stdout.readline().split()
    assert said == "armed"
    return child, int(pid)


@pytest.mark.parametrize("transport", ["fifo", "socket"])
@pytest.mark.parametrize(
    ("offsets", "apart"),
    [
        (["--monotonic", "-5000"], "CLOCK_MONOTONIC -5000 s"),
        (
            ["--monotonic", "5000", "--boottime", "7"],
            "CLOCK_MONOTONIC +5000 s, CLOCK_BOOTTIME +7 s",
        ),
    ],
)
def test_a_worker_on_other_clocks_is_refused_and_lives(
    fifo_path: pathlib.Path, transport: str, offsets: List[str], apart: str
) -> None:
    events = Recorder()
    socket_path = str(fifo_path.with_suffix(".socket"))
    with FileTimerServer(
        fifo_path, on_event=events, signaller=OwnChildrenSignaller(), socket_path=socket_path
    ) as server:
        path = socket_path if transport == "socket" else str(fifo_path)
        worker, _ = _worker(path, offsets, 60)
        # Its arm (5,000 s past on the server's clock, with the first offsets) was judged.
        wait_until(lambda: events.of(Rejected) or events.of(Reaped), what="the arm judged")
        server.sync()
        assert events.of(Reaped) == []
        assert worker.poll() is None
        assert server.armed() == []
        [rejected] = events.of(Rejected)
        assert isinstance(rejected, Rejected)
        assert rejected.reason is RejectReason.OTHER_CLOCK
        assert rejected.detail.startswith(f"{apart} from the server's")
        assert worker.communicate("go on\n", timeout=10) == ("", None)
        assert worker.returncode == 0


def test_a_time_namespace_with_the_servers_offsets_is_one_clock(
    fifo_path: pathlib.Path,
) -> None:
    events = Recorder()
    with FileTimerServer(fifo_path, on_event=events, signaller=OwnChildrenSignaller()):
        unshare, pid = _worker(str(fifo_path), [], 0.2)  # a new namespace, no offsets
        with unshare:
            [reaped] = wait_until(lambda: events.of(Reaped), what="the reap")
    assert isinstance(reaped, Reaped)
    assert (reaped.pid, reaped.delivered) == (pid, True)  # at its deadline, as any worker
    assert events.of(Rejected) == []


def test_the_inspector_reads_a_process_s_clock_offsets() -> None:
    offsets = ["--monotonic", "-5000", "--boottime", "7"]
    child = subprocess.Popen(
        ["unshare", "--time", *offsets, "--fork", "--kill-child", "sleep", "60"]
    )
    try:
        # unshare forks its command into the namespace: wait until it has.
        sleeper = wait_until(lambda: _children(child.pid), what="the command forked")[0]
        assert SystemInspector().clock_offsets(sleeper) == (-5_000 * 10**9, 7 * 10**9)
        assert SystemInspector().clock_offsets(os.getpid()) == (0, 0)
    finally:
        child.kill()
        child.wait()


def _children(pid: int) -> List[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(p) for p in f.read().split()]
