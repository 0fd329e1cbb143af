"""Only the daemon's own state file and journal segments are trusted.

Their timers name processes to signal. The daemon refuses a state directory others
could change (tests/daemon/test_state_dir.py); should another user's file be there all
the same (made by root, or before the directory was private), it is set aside, with an
error line, and never restored; a segment name taken by someone else no longer makes
every save fail.

Files of another user are made with os.chown (root only). The planted timers are
report-only (signal 0) and name a process of the test's own: nothing is ever signalled.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import subprocess
import time
from collections.abc import Iterator
from typing import Callable, List

import pytest
from tests.conftest import wait_until

from ftimer_protocol import Arm, encode
from ftimer_server import Timer
from ftimer_server.daemon._state import encode_state, load_state, read_boot_id
from ftimer_server.server._journal import Journal, JournalIncomplete

from .conftest import PYTHON, DaemonProcess, Worker, kill_and_close

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to chown to another uid")

Spawn = Callable[..., DaemonProcess]
StartWorker = Callable[..., Worker]
NOBODY = 65534
BOOT = read_boot_id()


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[str]]:
    """A process of the test's own for planted timers to name (never signalled)."""
    proc = subprocess.Popen(
        [PYTHON, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE, text=True
    )
    yield proc
    assert proc.stdin is not None
    proc.stdin.close()
    kill_and_close(proc)


@pytest.fixture
def private(short_dir: pathlib.Path) -> pathlib.Path:
    """The state file's directory: the daemon's user's, 0700 (root plants in it)."""
    d = short_dir / "state"
    d.mkdir(mode=0o700)
    return d


def planted(path: pathlib.Path, data: bytes) -> pathlib.Path:
    path.write_bytes(data)
    os.chown(path, NOBODY, NOBODY)
    return path


def state_naming(pid: int, journal: int = 0) -> bytes:
    """A state file of this boot with a report-only timer for ``pid``."""
    timer = Timer(pid=pid, scope_id="planted", deadline=time.monotonic() + 3600, signal=0)
    return encode_state([timer], BOOT, time.monotonic(), journal)


def arm_line(pid: int) -> bytes:
    return encode(Arm(pid=pid, scope_id="planted", deadline=time.monotonic() + 3600, signal=0))


def messages(caplog: pytest.LogCaptureFixture) -> List[str]:
    return [r.getMessage() for r in caplog.records]


# -- the state file ------------------------------------------------------------------


def test_another_users_state_file_is_set_aside_not_restored(
    tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture
) -> None:
    data = state_naming(os.getpid())
    path = planted(tmp_path / "state.json", data)
    with caplog.at_level(logging.ERROR, logger="ftimer_server.state"):
        load = load_state(str(path), BOOT)
    why = f"owned by uid {NOBODY}, not by the daemon's user (uid 0)"
    assert (load.timers, load.journal, load.ignored) == ([], 0, why)
    assert messages(caplog) == [
        f"state file {path} is unusable ({why}); moved it to {load.set_aside}"
    ]
    assert not path.exists()
    assert pathlib.Path(load.set_aside).read_bytes() == data


def test_a_root_daemon_restores_no_timer_from_a_state_file_planted_by_another_user(
    spawn: Spawn, private: pathlib.Path, sleeper: subprocess.Popen[str]
) -> None:
    state = planted(private / "state.json", state_naming(sleeper.pid))
    d = spawn("--state-file", str(state), "--capture", "none").ready()
    assert d.armed_scopes() == []
    refused = d.wait_for_record(level="error", logger="ftimer_server.state")
    assert (
        f"(owned by uid {NOBODY}, not by the daemon's user (uid 0)); moved it to"
        in (refused["msg"])
    )
    assert d.stop() == 0
    assert json.loads(state.read_text())["timers"] == []  # the daemon's own, saved at stop
    assert state.stat().st_uid == 0


# -- journal segments ------------------------------------------------------------------


def test_another_users_journal_segment_is_set_aside_not_replayed(
    tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "j.1").write_bytes(b"ours\n")
    theirs = planted(tmp_path / "j.2", b"theirs\n")
    journal = Journal(str(tmp_path / "j"))
    chunks = journal.replay(1)
    assert next(chunks) == b"ours\n"
    with pytest.raises(JournalIncomplete) as failed:
        next(chunks)
    (aside,) = tmp_path.glob("j.2.corrupt-*")
    assert str(failed.value) == (
        f"journal: {theirs} is owned by uid {NOBODY}, not by the server's user: moved it to {aside}"
    )
    assert aside.read_bytes() == b"theirs\n"
    journal.close()


def test_a_root_daemon_replays_no_journal_segment_planted_by_another_user(
    spawn: Spawn, private: pathlib.Path, sleeper: subprocess.Popen[str]
) -> None:
    state = private / "state.json"
    state.write_bytes(encode_state([], BOOT, time.monotonic(), journal=1))
    segment = planted(private / "state.json.journal.1", arm_line(sleeper.pid))
    d = spawn("--state-file", str(state), "--capture", "none").ready()
    assert d.armed_scopes() == []
    d.wait_for_record(level="error", where=lambda r: f"journal: {segment} is owned" in r["msg"])
    assert d.stop() == 0


def test_a_segment_name_taken_by_another_user_is_skipped(
    tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture
) -> None:
    journal = Journal(str(tmp_path / "j"))
    theirs = [planted(tmp_path / f"j.{n}", b"theirs\n") for n in (2, 3)]
    with caplog.at_level(logging.ERROR, logger="ftimer_server"):
        assert journal.checkpoint() == 4
        assert journal.checkpoint() == 5  # and on from there
    assert messages(caplog) == [
        f"journal: {theirs[0]} was already there (owned by uid {NOBODY}, not by the server's "
        "user): left there; segment 4 used instead"
    ]
    assert all(p.read_bytes() == b"theirs\n" for p in theirs)
    journal.close()


def test_a_segment_name_taken_by_a_file_of_ours_is_set_aside_and_reused(
    tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture
) -> None:
    journal = Journal(str(tmp_path / "j"))
    ours = tmp_path / "j.2"
    ours.write_bytes(b"not the journal's\n")
    with caplog.at_level(logging.ERROR, logger="ftimer_server"):
        assert journal.checkpoint() == 2
    (aside,) = tmp_path.glob("j.2.corrupt-*")
    assert messages(caplog) == [
        f"journal: {ours} was already there (not made by this journal); moved it to {aside}"
    ]
    assert aside.read_bytes() == b"not the journal's\n"
    assert ours.read_bytes() == b""  # the journal's own segment now
    journal.close()


def test_a_symlink_at_a_segment_name_is_left_and_skipped(tmp_path: pathlib.Path) -> None:
    target = tmp_path / "target"
    target.write_bytes(b"precious")
    (tmp_path / "j.2").symlink_to(target)
    journal = Journal(str(tmp_path / "j"))  # numbered after what is there: 3
    (tmp_path / "j.4").symlink_to(target)
    assert journal.checkpoint() == 5
    assert target.read_bytes() == b"precious"
    assert (tmp_path / "j.4").is_symlink()
    journal.close()


def current_journal(state: pathlib.Path) -> int:
    try:
        return int(json.loads(state.read_text())["journal"])
    except (FileNotFoundError, ValueError):
        return 0


def test_segments_planted_ahead_of_a_running_daemon_do_not_stop_its_saves(
    spawn: Spawn, worker: StartWorker, private: pathlib.Path, sleeper: subprocess.Popen[str]
) -> None:
    state = private / "state.json"
    d = spawn("--state-file", str(state), "--capture", "none").ready()
    first = wait_until(lambda: current_journal(state), what="the first save")
    # The names of the daemon's next two segments, taken by another user.
    for n in (first + 1, first + 2):
        planted(private / f"state.json.journal.{n}", arm_line(sleeper.pid))
    w = worker(d.fifo, "step", 60, 60)
    wait_until(lambda: "step" in d.armed_scopes(), what="the arm")
    # Saved, into a segment after the planted ones; they are left, never replayed.
    wait_until(lambda: current_journal(state) > first + 2, what="a save after the planted")
    assert [t["scope_id"] for t in json.loads(state.read_text())["timers"]] == ["step"]
    assert d.stop() == 0
    errors = [r["msg"] for r in d.records() if r["level"] == "error"]
    assert errors == [  # and no failed save
        f"journal: {private}/state.json.journal.{first + 1} was already there (owned by uid "
        f"{NOBODY}, not by the server's user): left there; segment {first + 3} used instead"
    ]
    d = spawn("--state-file", str(state), "--capture", "none", name="again").ready()
    assert d.armed_scopes() == ["step"]
    assert d.stop() == 0
    assert w.proc.poll() is None
