"""The state file as a careless operator or a hand edit leaves it: a small file read by a
daemon that may not reserve the largest file's size, a boot clock out of range, a state
file of a FIFO moved to another path. Real daemons; what they arm is report-only
(signal 0) or of the test's own workers."""

from __future__ import annotations

import subprocess
import time

import pytest
from tests.conftest import wait_until

from ftimer_server import Timer
from ftimer_server.daemon._control import query_status
from ftimer_server.daemon._state import boot_clock, encode_state, read_boot_id
from ftimer_server.server._process import SystemInspector

from .conftest import PATIENCE, PYTHON, kill_and_close
from .test_durability import saved_scopes

# -- the read: never a buffer for the largest file the limits allow ------------------

#: Address space the daemon may map: ample for it, less than the buffer it asked for.
ADDRESS_SPACE = 3 * 1024**3
LIMITED = [
    PYTHON,
    "-c",
    "import resource, runpy, sys; "
    f"resource.setrlimit(resource.RLIMIT_AS, ({ADDRESS_SPACE}, {ADDRESS_SPACE})); "
    "sys.argv[0] = 'ftimer-server'; runpy.run_module('ftimer_server', run_name='__main__')",
]


def test_a_small_state_file_is_restored_without_a_buffer_for_the_largest(spawn, short_dir) -> None:
    sleeper = subprocess.Popen(["sleep", "60"], text=True)
    try:
        state = short_dir / "state.json"
        # Report-only: nothing is ever signalled.
        born = SystemInspector().start_time(sleeper.pid)
        deadline = time.monotonic() + 3600
        timer = Timer(pid=sleeper.pid, scope_id="s", deadline=deadline, signal=0, start_time=born)
        state.write_bytes(encode_state([timer], read_boot_id(), time.monotonic(), 0, boot_clock()))
        d = spawn("--state-file", str(state), "--capture", "none", command=LIMITED).ready()
        assert d.armed_scopes() == ["s"]  # a 300-byte file
        assert d.stop() == 0
    finally:
        kill_and_close(sleeper)


# -- a boot clock that is no time of this boot -----------------------------------------


@pytest.mark.parametrize("saved_boot_clock", [1e308, -1e308])
def test_a_state_file_whose_boot_clock_is_out_of_range_is_set_aside(
    spawn, short_dir, saved_boot_clock: float
) -> None:
    sleeper = subprocess.Popen(["sleep", "60"], text=True)
    try:
        state = short_dir / "state.json"
        # Report-only: nothing is ever signalled.
        timer = Timer(pid=sleeper.pid, scope_id="s", deadline=time.monotonic() + 3600, signal=0)
        state.write_bytes(
            encode_state([timer], read_boot_id(), time.monotonic(), 0, saved_boot_clock)
        )
        d = spawn("--state-file", str(state), "--capture", "none")
        d.ready()  # it crashed here, every start
        assert d.status()["timers"] == []
        assert len(list(short_dir.glob("state.json.corrupt-*"))) == 1  # kept to look at
        line = d.wait_for_record(where=lambda r: "is unusable" in r["msg"])
        assert "boot clock" in line["msg"]
        assert d.stop() == 0
    finally:
        kill_and_close(sleeper)


def test_a_state_file_saved_in_the_boot_clocks_future_is_set_aside(spawn, short_dir) -> None:
    # Finite, but ahead of the clock: every process would read as born before the
    # snapshot, and a timer saved without a start time would bind whichever process
    # took its pid since.
    now = boot_clock()
    assert now is not None
    state = short_dir / "state.json"
    state.write_bytes(encode_state([], read_boot_id(), time.monotonic(), 0, now + 3600))
    d = spawn("--state-file", str(state), "--capture", "none").ready()
    line = d.wait_for_record(where=lambda r: "is unusable" in r["msg"])
    assert "boot clock" in line["msg"]
    assert d.stop() == 0


# -- a FIFO moved to another path ----------------------------------------------------

# Arms "step" for argv[2] seconds on the FIFO argv[1], then disarms it when told (a line
# on stdin): a healthy worker that carries on when its server cannot be reached.
WORKER = """
import sys
from ftimer_client import FileTimerClient
client = FileTimerClient(sys.argv[1], on_unavailable="warn")
client.arm("step", float(sys.argv[2]))
print("armed", flush=True)
sys.stdin.readline()
client.release("step")
print("released", flush=True)
sys.stdin.readline()
"""


def test_a_state_file_is_not_restored_by_a_daemon_on_another_fifo_path(spawn, short_dir) -> None:
    state = short_dir / "state.json"
    d = spawn("--state-file", str(state), "--capture", "none", name="first").ready()
    worker = subprocess.Popen(
        [PYTHON, "-c", WORKER, str(d.fifo), "4"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert worker.stdout is not None
        assert worker.stdin is not None
        assert worker.stdout.readline() == "armed\n"
        wait_until(lambda: saved_scopes(state) == ["step"], what="the arm saved")
        assert d.stop() == 0
        moved = short_dir / "moved.fifo"
        d = spawn(
            "--state-file",
            str(state),
            "--capture",
            "none",
            "--fifo",
            str(moved),
            "--control-socket",
            str(moved) + ".sock",
            name="second",
        ).ready()
        # The worker finishes its step and disarms, on the FIFO it was given.
        worker.stdin.write("\n")
        worker.stdin.flush()
        assert worker.stdout.readline() == "released\n"
        # The new daemon must not hold a timer its worker can no longer disarm.
        # (It was: and reaped the worker, SIGKILL, 4 s after it armed.)
        assert query_status(str(moved) + ".sock")["timers"] == []
        assert worker.poll() is None
    finally:
        if worker.poll() is None:
            worker.kill()
        worker.wait(PATIENCE)
        for stream in (worker.stdin, worker.stdout, worker.stderr):
            if stream is not None:
                stream.close()
