"""Numbers as a torch user's program computes them: numpy scalars (and a float subclass)
in the requests torch's agent registers, and a float32 timeout given to ``expires``. torch
keeps and uses them; ftimer dropped the requests, and sent a float32 sum a minute off.
Nothing is signalled: the servers record, or are report-only."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import time
from collections.abc import Iterator
from typing import Any, Callable, Dict, List, Tuple

import pytest

import ftimer_server
from ftimer_client import FileTimerClient, expires
from ftimer_server import DecodeFailed, FileTimerRequest

pytestmark = pytest.mark.interop


class Seconds(float):
    """A float subclass, as numpy's float64 is."""


Fields = Tuple[Any, str, Any, Any]
CASES: Dict[str, Callable[[Any, int, float], Fields]] = {
    "np.float64 time": lambda np, pid, t: (pid, "s", np.float64(t), 9),
    "float subclass time": lambda np, pid, t: (pid, "s", Seconds(t), 9),
    "np.int64 pid": lambda np, pid, t: (np.int64(pid), "s", t, 9),
    "np.int64 signal": lambda np, pid, t: (pid, "s", t, np.int64(9)),
}


@pytest.fixture
def np() -> Any:
    """numpy, which torch brings (imported here, not at collection: the session of the
    other tests has no numpy, and must not skip this file for it)."""
    return pytest.importorskip("numpy")


@pytest.fixture
def sleeper() -> Iterator[int]:
    child = subprocess.Popen(["sleep", "60"])
    try:
        yield child.pid
    finally:
        child.kill()
        child.wait()


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_request_of_numpy_numbers_is_kept_as_torch_keeps_it(
    case: str, tmp_path: pathlib.Path, sleeper: int, np: Any
) -> None:
    # A deadline computed with numpy (now + a timeout from step-time statistics) was
    # dropped as malformed: its worker was never reaped, nor listed as expired.
    from torch.distributed.elastic import timer as torch_timer

    class Torch(torch_timer.FileTimerServer):
        def _reap_worker(self, worker_pid: int, signal: int) -> bool:
            return True  # never signals anything

    now = time.time()
    torch = Torch(str(tmp_path / "torch.fifo"), "run")
    torch.register_timers([torch_timer.FileTimerRequest(*CASES[case](np, sleeper, now - 1))])
    assert [int(p) for p in torch.get_expired_timers(now)] == [sleeper]
    events: List[object] = []
    ours = ftimer_server.FileTimerServer(
        str(tmp_path / "ftimer.fifo"), "run", dry_run=True, on_event=events.append
    )
    ours.register_timers([FileTimerRequest(*CASES[case](np, sleeper, now - 1))])
    assert not [e for e in events if isinstance(e, DecodeFailed)]
    assert list(ours.get_expired_timers(now)) == [sleeper]


#: A wall-clock time at which float32(NOW + 60) is 63 s before NOW + 60.
NOW = 1796677507.0


@pytest.mark.parametrize("how", ["expires", "arm", "beat"])
def test_a_float32_timeout_is_sent_as_the_time_it_stands_for(
    how: str, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch, np: Any
) -> None:
    # time.time() + np.float32(60) stays float32 (numpy 2), whose steps at today's epoch
    # are 128 s: protocol 1 sent a time 63 s early, and torch's server would have reaped
    # the healthy worker of a 60 s timer at once.
    path = str(tmp_path / "timer.fifo")
    os.mkfifo(path)
    reader = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:

        def sent() -> List[dict]:
            return [json.loads(line) for line in os.read(reader, 65536).splitlines()]

        monkeypatch.setattr(time, "time", lambda: NOW)
        client = FileTimerClient(path, protocol=1)
        after = np.float32(60)
        if how == "expires":
            with expires(after=after, scope="step", client=client):
                [arm] = sent()
        elif how == "arm":
            client.arm("step", after)
            [arm] = sent()
        else:
            with expires(after=3600, scope="step", client=client) as block:
                sent()
                block.beat(after)
                [arm] = sent()
        client.close()
    finally:
        os.close(reader)
    assert arm["expiration_time"] == pytest.approx(NOW + 60, abs=1.0)
