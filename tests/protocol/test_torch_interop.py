"""Version 1 against the real torch 2.13: its lines decode, our lines feed its server."""

from __future__ import annotations

import json
import math
import os
import pathlib
import subprocess
import sys
import time
from types import ModuleType

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ftimer_protocol import MAX_TIME, TimerRequestV1, decode, encode

from .strategies import pids, signals

pytestmark = pytest.mark.interop


@settings(max_examples=200)
@given(
    pid=pids,
    scope=st.text(max_size=200),
    expiration=st.floats(-1e9, 1e12, allow_nan=False) | st.just(-1),
    signal=signals,
)
def test_torch_request_lines_decode(
    torch_timer: ModuleType, pid: int, scope: str, expiration: float, signal: int
) -> None:
    request = torch_timer.FileTimerRequest(pid, scope, expiration, signal)
    line = request.to_json().encode()
    message = decode(line + b"\n")
    assert message == TimerRequestV1(
        pid=pid, scope_id=scope, expiration_time=expiration, signal=signal
    )


@pytest.mark.parametrize(
    ("expiration", "read_as"),
    [(math.inf, MAX_TIME), (math.nan, MAX_TIME), (float(sys.maxsize), MAX_TIME), (-math.inf, -1.0)],
)
def test_torch_times_it_never_expires_decode_as_never_firing(
    torch_timer: ModuleType, expiration: float, read_as: float
) -> None:
    # torch's server never expires these (nor reads -inf as anything but a release).
    line = torch_timer.FileTimerRequest(7, "s", expiration, 9).to_json().encode()
    assert decode(line) == TimerRequestV1(pid=7, scope_id="s", expiration_time=read_as, signal=9)


# torch's server in a process of its own (after a reap, torch 2.13 signals its own
# process too): serves argv[1] until it has read argv[2] requests (10 s at most), then
# prints how many it read and the timers it holds, as JSON.
TORCH_SERVER = """
import json, sys, time
from torch.distributed.elastic.timer import FileTimerServer
server = FileTimerServer(sys.argv[1], run_id="interop", max_interval=0.05)
server.start()
print("ready", flush=True)
deadline = time.monotonic() + 10
while server._request_count < int(sys.argv[2]) and time.monotonic() < deadline:
    time.sleep(0.01)  # nothing to wait on: torch's server counts and says nothing
timers = [[*key, r.expiration_time, r.signal] for key, r in server._timers.items()]
server.stop()
print(json.dumps({"count": server._request_count, "timers": timers}), flush=True)
"""


def test_torch_server_reads_our_v1_lines(torch_timer: ModuleType, fifo_path: pathlib.Path) -> None:
    # The timers name a child of the test, alive throughout (torch's server drops the
    # timers of a pid that names nothing), never the test: were one reaped, only the
    # child and torch's server would go.
    worker = subprocess.Popen(["sleep", "60"])
    server = subprocess.Popen(
        [sys.executable, "-c", TORCH_SERVER, str(fifo_path), "6"], stdout=subprocess.PIPE, text=True
    )
    try:
        assert server.stdout is not None
        assert server.stdout.readline() == "ready\n"
        future = time.time() + 3600  # far away: torch's server must not reap
        arms = [
            TimerRequestV1(
                pid=worker.pid, scope_id=f"scope-{i}-é", expiration_time=future, signal=9
            )
            for i in range(5)
        ]
        release = TimerRequestV1(pid=worker.pid, scope_id="scope-0-é", expiration_time=-1, signal=0)
        for message in [*arms, release]:
            # Open, write, close per message, as torch's client does. The open blocks until
            # torch's server thread has opened its end: start() returns before it has, and a
            # non-blocking open in that window fails with ENXIO.
            fd = os.open(fifo_path, os.O_WRONLY)
            try:
                assert os.write(fd, encode(message)) == len(encode(message))
            finally:
                os.close(fd)
        result = json.loads(server.stdout.readline())
        assert server.wait(30) == 0
        assert worker.poll() is None
    finally:
        for child in (server, worker):
            if child.poll() is None:
                child.kill()
            child.wait()
        if server.stdout is not None:
            server.stdout.close()
    assert result["count"] == 6
    timers = {(pid, scope): (expiration, sig) for pid, scope, expiration, sig in result["timers"]}
    assert timers == {(worker.pid, f"scope-{i}-é"): (future, 9) for i in range(1, 5)}
