"""Over the socket, a send waiting for room in a full queue returns within its write
timeout however often signals arrive.

Python restarts a system call a signal interrupted (PEP 475): a blocking send with
SO_SNDTIMEO started its whole timeout again at each signal, so a worker whose timer
signals came faster than the timeout waited for as long as the server stalled. The
worker is a child process of the test's own, with its own interval timer.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import threading
from typing import Iterator

import pytest

from .conftest import SocketPeer

pytestmark = pytest.mark.skipif(
    not hasattr(os, "pidfd_open"), reason="the socket transport is Linux's (pidfds)"
)

WORKER = r"""
import json, signal, sys, time
from ftimer_client import FileTimerClient, ServerStalled

client = FileTimerClient(sys.argv[1], transport="socket", labels={}, signal=0,
                         write_timeout=1.0)
client.arm("warm", 60)
client.release("warm")
print("ready", flush=True)
assert sys.stdin.readline() == "go\n"
seen = []
signal.signal(signal.SIGALRM, lambda signum, frame: seen.append(signum))
signal.setitimer(signal.ITIMER_REAL, 0.1, 0.1)  # 10 signals per write timeout
start = time.monotonic()
try:
    client.arm("main", 60)
    outcome = "delivered"
except ServerStalled:
    outcome = "stalled"
elapsed = time.monotonic() - start
signal.setitimer(signal.ITIMER_REAL, 0)
print(json.dumps({"outcome": outcome, "elapsed": elapsed, "signals": len(seen)}), flush=True)
"""


@pytest.fixture
def speer_(socket_path: pathlib.Path) -> Iterator[SocketPeer]:
    p = SocketPeer(socket_path)
    yield p
    p.close()


def test_a_send_waiting_for_room_is_bounded_by_its_timeout_despite_signals(
    speer_: SocketPeer,
) -> None:
    with subprocess.Popen(
        [sys.executable, "-c", WORKER, str(speer_.path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    ) as worker:
        assert worker.stdout is not None
        assert worker.stdin is not None
        try:
            assert worker.stdout.readline() == "ready\n"
            speer_.wait_count(2)
            speer_.pause()  # a stalled server
            speer_.fill()
            worker.stdin.write("go\n")
            worker.stdin.flush()
            # Without the bound the send never returns while the signals come: after 6 s
            # (6x the timeout) the server drains, which lets it return "delivered".
            rescue = threading.Timer(6.0, speer_.resume)
            rescue.start()
            try:
                report = json.loads(worker.stdout.readline())
            finally:
                rescue.cancel()
            assert worker.wait(30) == 0
        finally:
            if worker.poll() is None:
                worker.kill()
    assert report["outcome"] == "stalled", report
    assert 0.9 < report["elapsed"] < 3.0, report
    assert report["signals"] >= 1  # delivered to their handler, late rather than never
