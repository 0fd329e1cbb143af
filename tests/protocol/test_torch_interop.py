"""Version 1 against the real torch 2.13: its lines decode, our lines feed its server."""

from __future__ import annotations

import math
import os
import pathlib
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


def _wait_for(condition, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def test_torch_server_reads_our_v1_lines(torch_timer: ModuleType, fifo_path: pathlib.Path) -> None:
    server = torch_timer.FileTimerServer(str(fifo_path), run_id="interop", max_interval=0.05)
    server.start()
    try:
        future = time.time() + 3600  # far away: torch's server must not reap (it kills itself)
        arms = [
            TimerRequestV1(
                pid=os.getpid(), scope_id=f"scope-{i}-é", expiration_time=future, signal=9
            )
            for i in range(5)
        ]
        release = TimerRequestV1(
            pid=os.getpid(), scope_id="scope-0-é", expiration_time=-1, signal=0
        )
        for message in [*arms, release]:
            # Open, write, close per message, as torch's client does. The open blocks until
            # torch's server thread has opened its end: start() returns before it has, and a
            # non-blocking open in that window fails with ENXIO.
            fd = os.open(fifo_path, os.O_WRONLY)
            try:
                assert os.write(fd, encode(message)) == len(encode(message))
            finally:
                os.close(fd)
        _wait_for(lambda: server._request_count == 6)
        timers = {key: (r.expiration_time, r.signal) for key, r in server._timers.items()}
        assert timers == {(os.getpid(), f"scope-{i}-é"): (future, 9) for i in range(1, 5)}
    finally:
        server.stop()
