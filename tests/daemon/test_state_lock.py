"""One daemon per state file: the lock file ``<state file>.lock``, taken before the state
file is read and held until exit.

Two daemons on different FIFOs but one ``--state-file`` used to share it: the second
restored the first one's timers (and reaped its workers once they were disarmed through
the first), and their journal segments collided (each deleted the other's, an O_EXCL
create failed, and saves failed from then on).
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
from collections.abc import Iterator
from typing import Callable, List

import pytest
from tests.conftest import wait_until

from ftimer_server.daemon._state import StateBusy, StatePathError, lock_state

from .conftest import PATIENCE, DaemonProcess, Worker, plant_lock

StartWorker = Callable[..., Worker]


@pytest.fixture
def daemons(short_dir: pathlib.Path) -> Iterator[Callable[..., DaemonProcess]]:
    """Start daemons each on a FIFO of its own (``short_dir/<name>/timer.fifo``); every
    one still running at the end is killed."""
    started: List[DaemonProcess] = []

    def start(name: str, *args: str) -> DaemonProcess:
        directory = short_dir / name
        directory.mkdir(mode=0o700, exist_ok=True)
        d = DaemonProcess(directory, ["--capture", "none", *args], name=name)
        started.append(d)
        return d

    yield start
    for d in started:
        d.cleanup()


def saved(state: pathlib.Path) -> List[str]:
    try:
        return [t["scope_id"] for t in json.loads(state.read_text())["timers"]]
    except (FileNotFoundError, ValueError):
        return []


def problems(d: DaemonProcess) -> List[str]:
    return [r["msg"] for r in d.records() if r["level"] in ("warning", "error")]


def test_a_second_daemon_on_the_same_state_file_is_refused_and_touches_nothing(
    daemons: Callable[..., DaemonProcess], worker: StartWorker, short_dir: pathlib.Path
) -> None:
    state = short_dir / "state.json"
    a = daemons("a", "--state-file", str(state)).ready()
    w = worker(a.fifo, "step", 60, 60)
    wait_until(lambda: saved(state) == ["step"], what="the arm saved")
    # Settled: a save deletes the segments before its own just after writing the state
    # file (one was deleted while it was being compared).
    journal = f"{state.name}.journal.*"
    wait_until(lambda: len(list(short_dir.glob(journal))) == 1, what="the journal trimmed")
    before = {p.name: p.read_bytes() for p in short_dir.glob("state.json*")}
    b = daemons("b", "--state-file", str(state))
    assert b.proc.wait(PATIENCE) == 3
    assert problems(b) == [
        f"cannot start: another ftimer-server is using the state file {state} "
        f"(it holds {state}.lock)"
    ]
    # Nothing restored, saved, journalled or deleted by the loser.
    assert {p.name: p.read_bytes() for p in short_dir.glob("state.json*")} == before
    # The first one goes on: its worker is watched, its saves and final save succeed.
    assert a.armed_scopes() == ["step"]
    assert w.proc.poll() is None
    assert a.stop() == 0
    assert problems(a) == []
    assert saved(state) == ["step"]
    # The lock file stays, free again: the next daemon on the state file (and on the
    # FIFO its worker writes to) restores.
    c = DaemonProcess(short_dir / "a", ["--capture", "none", "--state-file", str(state)], name="c")
    c.ready()
    assert c.armed_scopes() == ["step"]
    assert c.stop() == 0
    c.cleanup()
    assert w.proc.poll() is None


def test_the_lock_is_exclusive_and_released_with_its_descriptor(tmp_path: pathlib.Path) -> None:
    state = str(tmp_path / "state.json")
    fd = lock_state(state)
    try:
        with pytest.raises(StateBusy) as busy:
            lock_state(state)  # another open file description: flock refuses it
        assert busy.value.lock_path == state + ".lock"
    finally:
        os.close(fd)
    os.close(lock_state(state))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json.lock"]
    assert (tmp_path / "state.json.lock").stat().st_mode & 0o777 == 0o600


@pytest.mark.parametrize("kind", ["symlink", "directory", "another user's file"])
def test_a_lock_file_that_is_not_the_daemons_regular_file_is_refused(
    tmp_path: pathlib.Path, kind: str
) -> None:
    state = tmp_path / "state.json"
    lock = tmp_path / "state.json.lock"
    what = plant_lock(lock, kind)
    with pytest.raises(StatePathError) as refusal:
        lock_state(str(state))
    assert str(refusal.value) == f"refusing the state file's lock file {lock}: it is {what}"
    assert (tmp_path / "target").read_text() == "precious"


def test_a_killed_daemon_leaves_the_lock_free(
    daemons: Callable[..., DaemonProcess], short_dir: pathlib.Path
) -> None:
    state = short_dir / "state.json"
    a = daemons("a", "--state-file", str(state)).ready()
    assert a.stop(signal.SIGKILL) == -signal.SIGKILL
    b = daemons("b", "--state-file", str(state)).ready()
    assert b.stop() == 0
