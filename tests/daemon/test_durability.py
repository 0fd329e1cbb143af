"""A restart loses nothing: not a disarm the daemon had read but not yet saved when it was
killed (the journal), nor one a worker could not write while no daemon ran (the restart
grace, in which the worker's client re-sends it). Real daemon, real workers, real kill -9."""

from __future__ import annotations

import json
import pathlib
import signal
import subprocess
import time
from collections.abc import Iterator
from typing import Callable

import pytest
from tests.conftest import wait_until

from .conftest import PYTHON, DaemonProcess, kill_and_close

# Arms one timer, then releases it when told; writes nothing else (a quiet worker).
QUIET = """
import sys
from ftimer_client import FileTimerClient
client = FileTimerClient(sys.argv[1], on_unavailable="warn")
client.arm("step", float(sys.argv[2]))
print("armed", flush=True)
for line in sys.stdin:
    client.release("step")
    print("released", flush=True)
"""


@pytest.fixture
def quiet() -> Iterator[Callable[[pathlib.Path, float], subprocess.Popen[str]]]:
    started: list[subprocess.Popen[str]] = []

    def start(fifo: pathlib.Path, after: float) -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            [PYTHON, "-c", QUIET, str(fifo), str(after)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        started.append(proc)
        assert proc.stdout is not None
        assert proc.stdout.readline() == "armed\n"
        return proc

    yield start
    for proc in started:
        assert proc.stdin is not None
        proc.stdin.close()
        kill_and_close(proc)


def saved_scopes(state: pathlib.Path) -> list[str]:
    try:
        return [t["scope_id"] for t in json.loads(state.read_text())["timers"]]
    except (FileNotFoundError, ValueError):
        return []


def release(proc: subprocess.Popen[str]) -> None:
    assert proc.stdin is not None
    assert proc.stdout is not None
    proc.stdin.write("release\n")
    proc.stdin.flush()
    assert proc.stdout.readline() == "released\n"


def test_a_disarm_read_but_not_saved_survives_kill_9(
    spawn: Callable[..., DaemonProcess], short_dir: pathlib.Path, quiet
) -> None:
    state = short_dir / "state.json"
    # Saves at most every 3 s: the disarm below, a few milliseconds after the save of the
    # arm, is read and applied, and not yet saved, when the daemon is killed.
    args = ["--state-file", str(state), "--state-interval", "3"]
    d = spawn(*args, name="first").ready()
    worker = quiet(d.fifo, 10.0)
    wait_until(lambda: saved_scopes(state) == ["step"], what="the arm saved")
    release(worker)
    assert d.status()["timers"] == []  # read and applied (status syncs through the FIFO)
    assert saved_scopes(state) == ["step"]  # ... and not saved
    d.stop(signal.SIGKILL)
    d = spawn(*args, name="second").ready()
    assert d.status()["timers"] == []  # restored, then the journal replayed the disarm
    replayed = d.wait_for_record(where=lambda r: "of the journal from segment" in r["msg"])
    assert replayed["msg"].endswith(": 0 timer(s) armed now")
    assert worker.poll() is None
    # Once the new daemon saved, the segments before its own are deleted.
    wait_until(lambda: len(list(short_dir.glob("state.json.journal.*"))) == 1)


def test_a_disarm_written_while_no_daemon_ran_arrives_within_the_grace(
    spawn: Callable[..., DaemonProcess], short_dir: pathlib.Path, quiet
) -> None:
    state = short_dir / "state.json"
    d = spawn("--state-file", str(state), name="first").ready()
    worker = quiet(d.fifo, 0.5)
    wait_until(lambda: saved_scopes(state) == ["step"], what="the arm saved")
    d.stop(signal.SIGKILL)
    release(worker)  # no reader: the client warns and will re-send
    time.sleep(0.8)  # the outage outlasts the timer: its deadline passes meanwhile
    d = spawn("--state-file", str(state), name="second").ready()
    # Restored overdue, held for the grace; the client resynchronises within it.
    wait_until(lambda: d.status()["timers"] == [], what="the client's resync")
    assert worker.poll() is None
    assert not [r for r in d.records() if r.get("event") == "reaped"]
