"""A restart loses nothing: not a disarm the daemon had read but not yet saved when it was
killed (the journal), nor one a worker could not write while no daemon ran (the restart
grace, in which the worker's client re-sends it). Real daemon, real workers, real kill -9."""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from typing import Any, Callable, Dict, Optional

import pytest
from tests.conftest import children_of, tmpfs, wait_until

from ftimer_protocol import Arm, Disarm, encode
from ftimer_server import Timer
from ftimer_server.daemon._cli import format_status
from ftimer_server.daemon._state import boot_clock, encode_state, read_boot_id
from ftimer_server.server._process import SystemInspector, own_clock_offsets, ticks_since_boot

from .conftest import PATIENCE, PYTHON, DaemonProcess, kill_and_close, release

Spawn = Callable[..., DaemonProcess]
#: JSON nested deeper than msgspec recurses (the line the decoders were fixed for).
NESTED_LINE = b'{"version":' + b"[" * 1000 + b"\n"


def saved_scopes(state: pathlib.Path) -> list[str]:
    try:
        return [t["scope_id"] for t in json.loads(state.read_text())["timers"]]
    except (FileNotFoundError, ValueError):
        return []


def saved_after(state: pathlib.Path, when: float) -> Optional[Dict[str, Any]]:
    """The state file, if it was saved after ``when`` (monotonic seconds)."""
    try:
        saved: Dict[str, Any] = json.loads(state.read_text())
    except (FileNotFoundError, ValueError):
        return None
    return saved if saved["saved_at"] > when else None


@pytest.mark.parametrize("transport", ["fifo", "socket"])
def test_a_disarm_read_but_not_saved_survives_kill_9(
    spawn: Callable[..., DaemonProcess], short_dir: pathlib.Path, quiet, transport: str
) -> None:
    # Over the socket, what was read went to no journal: the disarm was lost, and the
    # healthy worker reaped by the next daemon.
    state = short_dir / "state.json"
    # Saves at most every 3 s: the disarm below, a few milliseconds after the save of the
    # arm, is read and applied, and not yet saved, when the daemon is killed.
    args = ["--state-file", str(state), "--state-interval", "3"]
    d = spawn(*args, name="first").ready()
    worker = quiet(d.fifo if transport == "fifo" else d.fifo.with_suffix(".socket"), 10.0)
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


def test_timers_of_workers_that_ended_while_no_daemon_ran_are_not_refusals(
    spawn: Spawn, short_dir: pathlib.Path, quiet
) -> None:
    # Each saved timer (and each journal's line) of a worker that ended while no daemon
    # ran was refused at the restart (no_such_process): a kill -9 restart of a busy host
    # counted refusals enough to fire FtimerRefusalsClimbing, and warned for each line.
    state = short_dir / "state.json"
    args = ["--state-file", str(state), "--state-interval", "3"]
    d = spawn(*args, name="first").ready()
    saved = quiet(d.fifo, 3600.0)
    wait_until(lambda: saved_scopes(state) == ["step"], what="the arm saved")
    journaled = quiet(d.fifo.with_suffix(".socket"), 3600.0)  # read, not saved
    assert sorted(t["pid"] for t in d.status()["timers"]) == sorted((saved.pid, journaled.pid))
    d.stop(signal.SIGKILL)
    for worker in (saved, journaled):
        kill_and_close(worker)
    d = spawn(*args, name="second").ready()
    gone = d.wait_for_record(where=lambda r: "while no server ran" in r["msg"])
    assert gone["msg"] == (
        f"saved timers not restored: pid {saved.pid} exited while no server ran, 1 timer(s) dropped"
    )
    assert gone["level"] == "info"
    stats = d.status()["stats"]
    assert stats["rejections"] == {}
    assert stats["requests"]["restore"] == {"exited": 1}
    assert stats["requests"]["arm"] == {"exited": 1}  # the journal's line
    assert not [r["msg"] for r in d.records() if r["level"] in ("warning", "error")]
    assert d.stop() == 0


def test_a_state_file_saved_beside_another_fifo_is_not_restored(
    spawn: Spawn, short_dir: pathlib.Path, quiet
) -> None:
    # A daemon stopped with its state file, another run without one (a new FIFO, to which
    # the worker re-sent its timer, then disarmed it), then the first one's settings
    # again: the old file brought the disarmed timer back, and the healthy worker was
    # reaped at its old deadline.
    state = short_dir / "state.json"
    d = spawn("--state-file", str(state), name="first").ready()
    worker = quiet(d.fifo, 30.0)
    wait_until(lambda: saved_scopes(state) == ["step"], what="the arm saved")
    assert d.stop() == 0
    d = spawn(name="without").ready()
    wait_until(lambda: d.armed_scopes() == ["step"], what="the timer re-sent")
    release(worker)
    assert d.armed_scopes() == []
    assert d.stop() == 0
    d = spawn("--state-file", str(state), name="again").ready()
    assert d.wait_for_record(
        where=lambda r: (
            r["msg"]
            == f"state file {state} not used: saved by a server of another FIFO than the one "
            f"at {d.fifo} (made since by another)"
        )
    )
    assert d.armed_scopes() == []
    assert worker.poll() is None
    # What it saves names the FIFO it reads: a plain restart restores it.
    later = quiet(d.fifo, 30.0)
    wait_until(lambda: saved_scopes(state) == ["step"], what="the arm saved")
    assert d.stop() == 0
    d = spawn("--state-file", str(state), name="restarted").ready()
    assert d.wait_for_record(where=lambda r: r["msg"] == "restored 1 of 1 saved timers")
    assert d.armed_scopes() == ["step"]
    release(later)
    assert d.stop() == 0


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


# Ignores SIGTERM (a worker stuck in a C call whose Python handler never runs), arms a
# timer that SIGTERMs it, and hangs.
STUBBORN = """
import signal, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
from ftimer_client import FileTimerClient
client = FileTimerClient(sys.argv[1], signal=signal.SIGTERM)
client.arm("step", 0.3)
print("armed", flush=True)
time.sleep(60)
"""


def test_a_sigkill_still_due_when_the_daemon_is_killed_is_sent_by_the_next(
    spawn: Callable[..., DaemonProcess], short_dir: pathlib.Path
) -> None:
    # The expiry cleared the worker's timers; the SIGKILL due after the grace period
    # lived in the first daemon's memory only: the next one never sent it, and the
    # stuck worker lived on.
    state = short_dir / "state.json"
    args = ["--state-file", str(state), "--grace", "2"]
    d = spawn(*args, name="first").ready()
    worker = subprocess.Popen(
        [PYTHON, "-c", STUBBORN, str(d.fifo)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert worker.stdout is not None
        assert worker.stdout.readline() == "armed\n"
        reaped = d.wait_for_record(where=lambda r: r.get("event") == "reaped")
        assert reaped["signal"] == signal.SIGTERM
        # Saved after the expiry: the timer that decided it, as the worker armed it. (By
        # its time, not by a change of the file after the arm's save: on a loaded machine
        # the file first seen holding the arm was already the save after the expiry.)
        expired = d.wait_for_record(where=lambda r: r.get("event") == "expired")
        saved = wait_until(
            lambda: saved_after(state, expired["deadline"]), what="a save after the expiry"
        )
        assert [t["signal"] for t in saved["timers"]] == [signal.SIGTERM]
        d.stop(signal.SIGKILL)
        assert worker.poll() is None  # SIGTERM ignored, SIGKILL not sent yet
        d = spawn(*args, name="second").ready()
        assert worker.wait(PATIENCE) == -signal.SIGKILL  # reaped again, then escalated
        escalated = d.wait_for_record(where=lambda r: r.get("event") == "escalated")
        assert (escalated["pid"], escalated["signal"]) == (worker.pid, signal.SIGKILL)
    finally:
        kill_and_close(worker)


@pytest.fixture
def small_disk(short_dir: pathlib.Path) -> Iterator[pathlib.Path]:
    """A 64 KiB tmpfs: a state directory whose disk fills up."""
    with tmpfs(short_dir / "small", "64k") as small:
        yield small


def fill(disk: pathlib.Path) -> pathlib.Path:
    """Fill ``disk`` up; return the file that holds the space."""
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        with pytest.raises(OSError, match="No space left on device"):  # noqa: PT012
            while True:
                os.write(fd, b"x" * 4096)
    finally:
        os.close(fd)
    return filler


def test_a_journal_that_fails_never_lets_a_restart_reap_a_worker_that_disarmed(
    spawn: Callable[..., DaemonProcess], small_disk: pathlib.Path, quiet
) -> None:
    # The disarm could not be journalled (disk full); the state file still held the arm,
    # and the next daemon restored it and reaped the worker that had disarmed.
    state = small_disk / "state.json"
    d = spawn("--state-file", str(state), name="first").ready()
    worker = quiet(d.fifo, 30.0)
    wait_until(lambda: saved_scopes(state) == ["step"], what="the arm saved")
    filler = fill(small_disk)
    release(worker)
    assert d.status()["timers"] == []  # read and applied, not journalled
    d.wait_for_record(where=lambda r: r["msg"].startswith(f"journal: removed {state}"))
    assert not state.exists()
    d.stop(signal.SIGKILL)
    filler.unlink()  # the operator makes room, and restarts it
    d = spawn("--state-file", str(state), name="second").ready()
    assert d.status()["timers"] == []  # nothing stale restored: the worker lives on
    assert worker.poll() is None


def test_status_says_when_the_state_cannot_be_saved(
    spawn: Callable[..., DaemonProcess], small_disk: pathlib.Path, quiet
) -> None:
    # It said "healthy" and nothing else while every save failed (disk full): only a
    # metric told that a restart would lose the timers armed since.
    state = small_disk / "state.json"
    filler = fill(small_disk)
    d = spawn("--state-file", str(state)).ready()
    worker = quiet(d.fifo, 30.0)
    d.wait_for_record(where=lambda r: r["msg"].startswith(f"cannot save state to {state}"))
    doc = d.status()
    assert doc["healthy"]  # a restart would not mend it
    assert doc["state_failing"] == "No space left on device"
    assert f", STATE NOT SAVED to {state}: No space left on device\n" in format_status(doc)
    filler.unlink()
    wait_until(lambda: saved_scopes(state) == ["step"], what="a save once there is room")
    assert d.status()["state_failing"] is None
    release(worker)
    assert d.stop() == 0


def test_status_and_metrics_say_when_the_journal_takes_the_state_file_away(
    spawn: Callable[..., DaemonProcess], small_disk: pathlib.Path, quiet
) -> None:
    # A journal write failed (disk full) and the daemon removed its state file; the save
    # that followed succeeded (the removal made room) and the next failure removed it
    # again: status said nothing, the saves' error count stayed 0, and the alert could
    # not fire, while a kill -9 would have lost every timer.
    pytest.importorskip("prometheus_client")
    state = small_disk / "state.json"
    # Saves 3 s apart at most often: none comes between the failure and the looks.
    args = ["--state-file", str(state), "--state-interval", "3"]
    d = spawn(*args, "--metrics-address", "127.0.0.1:0").ready()
    url = d.wait_for_record(where=lambda r: r["msg"].startswith("metrics on"))["msg"].split()[-1]
    worker = quiet(d.fifo, 30.0)
    wait_until(lambda: saved_scopes(state) == ["step"], what="the arm saved")
    filler = fill(small_disk)
    release(worker)
    d.wait_for_record(where=lambda r: r["msg"].startswith(f"journal: removed {state}"))
    doc = d.status()
    why = "its journal cannot be written (No space left on device): the file is removed"
    assert doc["state_failing"] == why
    assert f", STATE NOT SAVED to {state}: {why}\n" in format_status(doc)
    with urllib.request.urlopen(url, timeout=PATIENCE) as r:
        assert 'ftimer_state_saves_total{result="error"} 1.0' in r.read().decode()
    filler.unlink()
    assert d.stop() == 0  # its final save, with room
    assert saved_scopes(state) == []


def test_a_final_save_that_fails_with_no_state_file_left_says_nothing_is_restored(
    spawn: Callable[..., DaemonProcess], small_disk: pathlib.Path
) -> None:
    # It said the next start would restore what the file held before, when the journal
    # had removed it (or no save ever succeeded).
    state = small_disk / "state.json"
    fill(small_disk)
    d = spawn("--state-file", str(state)).ready()
    assert d.stop() == 0
    [failed] = [r["msg"] for r in d.records() if r["msg"].startswith("the final save failed")]
    assert failed == (
        f"the final save failed, and {state} is gone: the next start restores no timers "
        "(clients re-send theirs)"
    )


def test_a_disk_that_stays_full_is_said_once_and_room_again_restores_the_timers(
    spawn: Callable[..., DaemonProcess],
    small_disk: pathlib.Path,
    quiet,
    sleeper: subprocess.Popen[str],
) -> None:
    # With room for the state file only, each save started a journal segment that failed
    # at its first write and removed the state file: two error lines (three where the
    # save failed too) and a new segment ten times a second, for as long as the disk
    # stayed full; and not a word once there was room again.
    pytest.importorskip("prometheus_client")
    state = small_disk / "state.json"
    # At level info: the pokes below are no lines.
    args = ["--state-file", str(state), "--metrics-address", "127.0.0.1:0", "--log-level", "info"]
    d = spawn(*args).ready()
    url = d.wait_for_record(where=lambda r: r["msg"].startswith("metrics on"))["msg"].split()[-1]
    worker = quiet(d.fifo, 3600.0)
    wait_until(lambda: saved_scopes(state) == ["step"], what="the arm saved")
    filler = fill(small_disk)
    fifo = os.open(d.fifo, os.O_WRONLY)
    pokes = 0

    def poke() -> None:
        """A change: a line for the journal to keep, and a save due."""
        nonlocal pokes
        pokes += 1
        disarm = encode(Disarm(pid=sleeper.pid, scope_id="poke"))
        os.write(fifo, report_only_arm(sleeper.pid, "poke") if pokes % 2 else disarm)

    def failed_writes() -> int:
        poke()
        with urllib.request.urlopen(url, timeout=PATIENCE) as r:
            text = r.read().decode()
        found = re.search(r'ftimer_state_saves_total\{result="error"\} (\S+)', text)
        return int(float(found.group(1))) if found else 0

    try:
        # The old journal failed three times in 0.2 s (a save after each), each said;
        # now the second failure comes with the next save, the third a second later.
        wait_until(lambda: failed_writes() >= 3, what="three failed writes")
        d.wait_for_record(where=lambda r: r["msg"].startswith(f"journal: removed {state}"))
        errors = [r["msg"] for r in d.records() if r["level"] == "error"]
        assert len([m for m in errors if m.startswith(f"journal {state}.journal.")]) == 1, errors
        assert len([m for m in errors if m.startswith(f"journal: removed {state}")]) == 1
        assert len([m for m in errors if m.startswith(f"cannot save state to {state}")]) <= 1
        assert d.status()["state_failing"] is not None
        filler.unlink()  # room again: said, and the state file stays

        def back_again() -> Optional[Dict[str, Any]]:
            poke()
            return next((r for r in d.records() if "written whole again" in r["msg"]), None)

        back = wait_until(back_again, what="the journal written whole again")
        assert back["level"] == "info"
        assert re.fullmatch(
            rf"journal {re.escape(str(state))}\.journal\.\d+ written whole again, after "
            r"\d+ failed write\(s\) over \d+\.\d s",
            back["msg"],
        ), back["msg"]
        wait_until(lambda: d.status()["state_failing"] is None, what="status healthy again")
        wait_until(lambda: "step" in saved_scopes(state), what="the state saved")
    finally:
        os.close(fifo)
    d.stop(signal.SIGKILL)
    d = spawn("--state-file", str(state), name="second").ready()
    assert "step" in d.armed_scopes()  # restored: the worker stays watched
    release(worker)
    assert "step" not in d.armed_scopes()
    assert d.stop() == 0


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[str]]:
    """A process of the test's own for the journal's timers to name (report-only ones:
    nothing here is ever signalled)."""
    proc = subprocess.Popen(
        [PYTHON, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE, text=True
    )
    # Older than a state file written from now on: a process born in the tick of a save
    # could have taken a dead worker's pid after it, and is refused its timers.
    born = SystemInspector().start_time(proc.pid)
    wait_until(lambda: (ticks_since_boot(time.time()) or 0) >= born, what="a tick to pass")
    yield proc
    kill_and_close(proc)
    assert proc.stdin is not None
    proc.stdin.close()


def report_only_arm(pid: int, scope: str) -> bytes:
    return encode(Arm(pid=pid, scope_id=scope, deadline=time.monotonic() + 3600, signal=0))


def write_state(path: pathlib.Path, journal: int, timers: tuple[Timer, ...] = ()) -> None:
    """A state file of this boot that names journal segment ``journal``."""
    path.write_bytes(encode_state(timers, read_boot_id(), time.monotonic(), journal))


def test_a_restored_timer_overdue_since_before_the_start_is_not_a_late_reap(
    spawn: Spawn, short_dir: pathlib.Path
) -> None:
    # Its lateness counted from its deadline, which fell while no daemon ran: an ordinary
    # restart with an overdue timer put a reap past the histogram's 1 s bucket, and
    # FtimerReapsLate blamed captures, the host or a stalled daemon.
    pytest.importorskip("prometheus_client")
    stuck = subprocess.Popen([PYTHON, "-c", "import time; time.sleep(60)"])
    try:
        born = SystemInspector().start_time(stuck.pid)
        wait_until(lambda: (ticks_since_boot(time.time()) or 0) > (born or 0), what="a tick")
        state = short_dir / "state.json"
        overdue = Timer(stuck.pid, "step", time.monotonic() - 5, int(signal.SIGKILL), born)
        write_state(state, journal=0, timers=(overdue,))
        d = spawn("--state-file", str(state), "--metrics-address", "127.0.0.1:0").ready()
        url = d.wait_for_record(where=lambda r: r["msg"].startswith("metrics on"))
        assert stuck.wait(PATIENCE) == -signal.SIGKILL  # at the grace's end
        reaped = d.wait_for_record(event="reaped", pid=stuck.pid)
        assert reaped["late"] > 6.0  # said from its deadline
        with urllib.request.urlopen(url["msg"].split()[-1], timeout=PATIENCE) as r:
            body = r.read().decode()
        assert 'ftimer_reap_latency_seconds_bucket{le="1.0"} 1.0' in body
        assert d.stop() == 0
    finally:
        kill_and_close(stuck)


@pytest.mark.parametrize("kind", ["symlink", "directory", "FIFO", "missing"])
def test_a_journal_that_misses_a_segment_sets_the_state_aside(
    spawn: Spawn, short_dir: pathlib.Path, sleeper: subprocess.Popen[str], kind: str
) -> None:
    # Such a segment was skipped (a missing one without a word), and the state file
    # restored without it: a timer whose disarm the segment held was armed again, and
    # the worker that had disarmed was reaped at its deadline.
    state = short_dir / "state.json"
    write_state(state, journal=1, timers=(saved_timer(sleeper.pid, "disarmed-since"),))
    segment = short_dir / "state.json.journal.1"
    elsewhere = short_dir / "elsewhere"
    arm = report_only_arm(sleeper.pid, "from-elsewhere")
    elsewhere.write_bytes(arm)
    if kind == "symlink":
        segment.symlink_to(elsewhere)
        said = f"journal: {segment} is a symlink: not followed"
    elif kind == "missing":
        said = f"journal: {segment} is missing"
    else:
        if kind == "directory":
            segment.mkdir()
        else:
            os.mkfifo(segment)  # open() would wait for a writer
        said = f"journal: {segment} is a {kind}, not a regular file"
    d = spawn("--state-file", str(state), "--capture", "none").ready()
    d.wait_for_record(
        level="error",
        where=lambda r: r["msg"].startswith(f"cannot replay the journal from segment 1: {said}"),
    )
    assert d.status()["timers"] == []  # neither the saved timer nor elsewhere's arm
    assert list(short_dir.glob("state.json.corrupt-*"))  # set aside: never restored
    assert d.stop() == 0
    assert elsewhere.read_bytes() == arm
    if kind == "directory":
        assert segment.is_dir()  # left where it was: not the daemon's to remove


def saved_timer(pid: int, scope: str) -> Timer:
    """A report-only timer of ``pid``'s as a state file holds it."""
    return Timer(pid=pid, scope_id=scope, deadline=time.monotonic() + 3600, signal=0)


def test_a_nested_json_line_in_the_journal_replays_as_one_malformed_line(
    spawn: Spawn, short_dir: pathlib.Path, sleeper: subprocess.Popen[str]
) -> None:
    state = short_dir / "state.json"
    write_state(state, journal=1)
    segment = short_dir / "state.json.journal.1"
    segment.write_bytes(
        report_only_arm(sleeper.pid, "before") + NESTED_LINE + report_only_arm(sleeper.pid, "after")
    )
    d = spawn("--state-file", str(state), "--capture", "none").ready()
    assert d.armed_scopes() == ["after", "before"]
    assert d.status()["stats"]["decode_errors"] == {"MalformedMessage": 1}
    assert d.stop() == 0


# Replaces FileTimerServer.replay() with one that fails, as a bug in it would: no journal
# content makes the real one fail any more, and this is the defence for when one does.
FAILING_REPLAY = """
import sys
from ftimer_server.server._server import FileTimerServer
real_replay = FileTimerServer.replay
def replay(self, chunks, written_by=None):
    real_replay(self, [next(iter(chunks))], written_by)  # part of the journal is applied ...
    raise RuntimeError("injected: replay failed")  # ... then something unforeseen
FileTimerServer.replay = replay
from ftimer_server.daemon._cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_journal_that_cannot_be_replayed_is_set_aside_and_the_daemon_starts_empty(
    spawn: Spawn, short_dir: pathlib.Path, sleeper: subprocess.Popen[str]
) -> None:
    state = short_dir / "state.json"
    saved = Timer(sleeper.pid, "saved", time.monotonic() + 3600, 0)
    write_state(state, journal=1, timers=(saved,))
    segment = short_dir / "state.json.journal.1"
    journalled = report_only_arm(sleeper.pid, "journalled")
    segment.write_bytes(journalled)
    d = spawn(
        "--state-file", str(state), "--capture", "none", command=[PYTHON, "-c", FAILING_REPLAY]
    ).ready()
    failed = d.wait_for_record(level="error", logger="ftimer_server.daemon")
    assert failed["msg"].startswith(
        f"cannot replay the journal from segment 1; set aside as {segment}.corrupt-"
    )
    assert failed["msg"].endswith("; starting without the saved timers")
    assert "RuntimeError: injected: replay failed" in str(failed)
    assert not segment.exists()
    (aside,) = short_dir.glob("state.json.journal.1.corrupt-*")
    assert aside.read_bytes() == journalled
    assert d.status()["timers"] == []  # half a replay is not kept
    assert d.stop() == 0


# As FAILING_REPLAY, and the daemon then dies before its first save (kill -9, a power
# cut of its container...).
FAILING_REPLAY_THEN_DYING = FAILING_REPLAY.replace(
    "from ftimer_server.daemon._cli import main",
    """import os
from ftimer_server.daemon._state import StateSaver
def start(self):
    os._exit(9)  # killed before its first save
StateSaver.start = start
from ftimer_server.daemon._cli import main""",
)


def test_a_state_file_whose_journal_could_not_be_replayed_is_never_restored_without_it(
    spawn: Spawn, short_dir: pathlib.Path, sleeper: subprocess.Popen[str]
) -> None:
    # The segments were set aside but the state file that names them was kept: a daemon
    # that died before its first save left it for the next start, which restored it
    # without the disarms the segments held.
    state = short_dir / "state.json"
    saved = Timer(sleeper.pid, "saved", time.monotonic() + 3600, 0)
    write_state(state, journal=1, timers=(saved,))
    snapshot = state.read_bytes()
    (short_dir / "state.json.journal.1").write_bytes(report_only_arm(sleeper.pid, "journalled"))
    d = spawn(
        "--state-file",
        str(state),
        "--capture",
        "none",
        command=[PYTHON, "-c", FAILING_REPLAY_THEN_DYING],
    )
    assert d.proc.wait(PATIENCE) == 9
    assert not state.exists()
    (aside,) = short_dir.glob("state.json.corrupt-*")
    assert aside.read_bytes() == snapshot
    set_aside = d.wait_for_record(level="error", logger="ftimer_server.state")
    assert set_aside["msg"] == (
        f"state file {state} is unusable (its journal cannot be replayed); moved it to {aside}"
    )
    again = spawn("--state-file", str(state), "--capture", "none", name="again").ready()
    assert again.status()["timers"] == []  # nothing of the old snapshot
    assert again.stop() == 0


def test_a_timer_saved_without_a_start_time_is_not_restored_for_a_process_born_later(
    spawn: Spawn, short_dir: pathlib.Path, sleeper: subprocess.Popen[str]
) -> None:
    # A saved timer without a start time (saved where none could be read, or written by
    # hand) was bound to whichever process held its pid at the restart.
    state = short_dir / "state.json"
    saved = Timer(sleeper.pid, "saved", time.monotonic() + 3600, 0)  # no start time
    write_state(state, journal=0, timers=(saved,))
    an_hour_ago = time.time() - 3600  # saved before the sleeper was born
    os.utime(state, (an_hour_ago, an_hour_ago))
    d = spawn("--state-file", str(state), "--capture", "none").ready()
    assert d.status()["timers"] == []
    gone = d.wait_for_record(where=lambda r: "not restored" in r["msg"])
    assert gone["msg"].startswith(f"saved timers not restored: pid {sleeper.pid} exited")
    assert d.status()["stats"]["requests"]["restore"] == {"exited": 1}
    assert d.stop() == 0
    # Saved while the sleeper lived: its own timer, restored.
    write_state(state, journal=0, timers=(saved,))
    d = spawn("--state-file", str(state), "--capture", "none", name="again").ready()
    assert d.armed_scopes() == ["saved"]
    assert d.stop() == 0


@pytest.mark.parametrize("born", ["after the snapshot", "before it, the wall clock stepped"])
def test_a_kept_line_without_a_start_time_binds_only_a_process_born_before_the_snapshot(
    spawn: Spawn, short_dir: pathlib.Path, sleeper: subprocess.Popen[str], born: str
) -> None:
    # The replay judged such a line (torch's) by the segments' last write, on the wall
    # clock: a process that took the pid of a worker which armed after the snapshot and
    # died got that worker's timer, and was reaped; and a step of the wall clock while
    # no daemon ran refused the lines of the workers that wrote them.
    state = short_dir / "state.json"
    now = boot_clock()
    assert now is not None
    snapshot = now - 3600 if born == "after the snapshot" else now
    state.write_bytes(encode_state((), read_boot_id(), time.monotonic(), 1, boot_clock=snapshot))
    segment = short_dir / "state.json.journal.1"
    line = {"version": 1, "pid": sleeper.pid, "scope_id": "kept", "signal": 9}
    segment.write_bytes(
        json.dumps({**line, "expiration_time": time.time() + 3600}).encode() + b"\n"
    )
    if born != "after the snapshot":
        an_hour_ago = time.time() - 3600  # the files' wall-clock times, before the step
        for path in (state, segment):
            os.utime(path, (an_hour_ago, an_hour_ago))
    d = spawn("--state-file", str(state), "--capture", "none").ready()
    if born == "after the snapshot":  # its own line, or its pid taken from a dead writer
        assert d.status()["timers"] == []
        assert d.status()["stats"]["requests"]["arm"] == {"rejected": 1}
        # Said: it was counted exited with no word, and a live worker ran unwatched.
        refused = d.wait_for_record(where=lambda r: "born after the last saved" in r["msg"])
        assert refused["level"] == "warning"
    else:
        assert d.armed_scopes() == ["kept"]
    assert d.stop() == 0


def _no_time_namespaces() -> str:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return "needs root and unshare(1)"
    probe = subprocess.run(["unshare", "--time", "--fork", "true"], capture_output=True)
    return "" if probe.returncode == 0 else f"no time namespaces here: {probe.stderr!r}"


@pytest.mark.skipif(bool(_no_time_namespaces()), reason=_no_time_namespaces() or "-")
def test_a_state_saved_on_other_clocks_is_not_used(
    spawn: Spawn, short_dir: pathlib.Path, sleeper: subprocess.Popen[str]
) -> None:
    # A daemon restarted in a time namespace 1,000 s ahead on CLOCK_MONOTONIC (restored by
    # CRIU, say) read the saved deadlines on its own clock: a timer with an hour left
    # fired at once, and a healthy worker was reaped.
    state = short_dir / "state.json"
    now, boot = time.monotonic(), boot_clock()
    saved = (saved_timer(sleeper.pid, "an-hour-left"),)
    clocks = own_clock_offsets()
    state.write_bytes(encode_state(saved, read_boot_id(), now, 0, boot, clocks=clocks))
    ahead = ["unshare", "--time", "--monotonic", "1000", "--fork", "--kill-child"]
    d = spawn("--state-file", str(state), command=[*ahead, PYTHON, "-m", "ftimer_server"])
    d.ready()
    assert d.wait_for_record(
        where=lambda r: (
            r["msg"]
            == f"state file {state} not used: saved on other clocks, CLOCK_MONOTONIC -1000 s from "
            "the server's: another time namespace"
        )
    )
    assert d.status()["timers"] == []
    [daemon] = children_of(d.pid)
    os.kill(daemon, signal.SIGTERM)  # unshare passes no signal on; it exits with the daemon
    assert d.proc.wait(PATIENCE) == 0
    # In the namespace it was saved in, the same file is restored.
    state.write_bytes(encode_state(saved, read_boot_id(), now, 0, boot, clocks=clocks))
    d = spawn("--state-file", str(state), "--capture", "none", name="again").ready()
    assert d.armed_scopes() == ["an-hour-left"]
    assert d.stop() == 0
    assert json.loads(state.read_bytes())["clocks"] == list(clocks or ())  # what it saved on


def test_a_disarm_re_sent_after_the_restore_grace_still_spares_its_worker(
    spawn: Spawn, short_dir: pathlib.Path
) -> None:
    # With 150k timers armed, the clients' re-sends after a restart kept the queues full
    # for seconds (7-12 s over the socket): a healthy worker's disarm, lost in the
    # outage, came after the restore grace, and the worker was reaped with SIGKILL. A
    # restored timer now waits for its worker to be heard from while the queues are
    # full (the re-sends begin with the disarms a restart may have lost); a stuck
    # worker's re-sent arm gets it reaped.
    healthy = subprocess.Popen([PYTHON, "-c", "import time; time.sleep(60)"])
    stuck = subprocess.Popen([PYTHON, "-c", "import time; time.sleep(60)"])
    flooders: list[subprocess.Popen[str]] = []
    try:
        inspector = SystemInspector()
        born = {p.pid: inspector.start_time(p.pid) for p in (healthy, stuck)}
        wait_until(lambda: (ticks_since_boot(time.time()) or 0) > max(born.values()), what="a tick")
        deadline = time.monotonic() + 1.0  # falls in the "outage", before the re-sends
        state = short_dir / "state.json"
        timers = tuple(Timer(p.pid, "step", deadline, 9, born[p.pid]) for p in (healthy, stuck))
        write_state(state, journal=0, timers=timers)
        d = spawn("--state-file", str(state), "--restore-grace", "1.0")
        # Other clients' re-sends, from the moment the FIFO is open: disarms of nothing,
        # as fast as they can write.
        flooders = [
            subprocess.Popen([PYTHON, "-c", FLOOD, str(d.fifo), str(os.getpid())]) for _ in range(3)
        ]
        d.ready()
        wait_until(lambda: d.status()["stats"]["requests"].get("disarm"), what="the flood")
        grace_over = time.monotonic() + 1.5  # at the latest
        time.sleep(max(0.0, max(deadline, grace_over) - time.monotonic()))  # let both pass
        assert sorted(t["pid"] for t in d.status()["timers"]) == sorted(born)  # none reaped
        fd = os.open(d.fifo, os.O_WRONLY)
        try:  # the re-sends, late: each worker's first line since the restart
            os.write(fd, encode(Disarm(pid=healthy.pid, scope_id="step")))
            os.write(fd, encode(Arm(pid=stuck.pid, scope_id="step", deadline=deadline, signal=9)))
        finally:
            os.close(fd)
        assert stuck.wait(PATIENCE) == -signal.SIGKILL
        d.wait_for_record(event="reaped", pid=stuck.pid)
        assert healthy.poll() is None
        for f in flooders:
            f.kill()
        assert d.stop() == 0
    finally:
        for proc in (healthy, stuck, *flooders):
            kill_and_close(proc)


#: Writes disarms of a scope that pid argv[2] never armed to the FIFO argv[1], as fast
#: as it can, from when the FIFO is there until killed.
FLOOD = """
import os, sys, time
from ftimer_protocol import Disarm, encode
chunk = encode(Disarm(pid=int(sys.argv[2]), scope_id="none")) * 1000
while True:
    try:
        fd = os.open(sys.argv[1], os.O_WRONLY)  # blocks until the daemon reads it
        break
    except FileNotFoundError:
        time.sleep(0.01)
while True:
    os.write(fd, chunk)
"""


def test_a_second_restart_in_the_grace_still_spares_a_worker_not_heard_from(
    spawn: Spawn, short_dir: pathlib.Path
) -> None:
    # A first version took a timer overdue when the state was saved for a reap under
    # way: restored by a first restart, saved (overdue) in its grace, it was reaped at
    # the second restart's grace's end while the re-sends filled the queue.
    healthy = subprocess.Popen([PYTHON, "-c", "import time; time.sleep(60)"])
    flooders: list[subprocess.Popen[str]] = []
    try:
        born = SystemInspector().start_time(healthy.pid)
        wait_until(lambda: (ticks_since_boot(time.time()) or 0) > (born or 0), what="a tick")
        deadline = time.monotonic() + 0.5  # falls in the first outage
        state = short_dir / "state.json"
        write_state(state, journal=0, timers=(Timer(healthy.pid, "step", deadline, 9, born),))
        d = spawn("--state-file", str(state), "--restore-grace", "5", name="first").ready()
        time.sleep(max(0.0, deadline + 0.3 - time.monotonic()))  # its deadline passes
        assert d.stop() == 0  # a second restart, within the grace: a final save
        d = spawn("--state-file", str(state), "--restore-grace", "1.0", name="second")
        flooders = [
            subprocess.Popen([PYTHON, "-c", FLOOD, str(d.fifo), str(os.getpid())]) for _ in range(3)
        ]
        d.ready()
        wait_until(lambda: d.status()["stats"]["requests"].get("disarm"), what="the flood")
        time.sleep(2.0)  # the grace passes, the queue full, the worker not heard from
        assert healthy.poll() is None
        assert [t["pid"] for t in d.status()["timers"]] == [healthy.pid]
        assert d.stop() == 0
    finally:
        for proc in (healthy, *flooders):
            kill_and_close(proc)


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "kill -9"])
def test_a_line_read_in_part_before_a_restart_is_read_whole_after_it(
    spawn: Spawn, short_dir: pathlib.Path, stop: int
) -> None:
    # A read ends anywhere: the daemon held the first part of a disarm, kept in its
    # journal; the next one replayed it and dropped it, then read the rest from the FIFO
    # as a line of its own, malformed: the disarm lost, the healthy worker reaped.
    healthy = subprocess.Popen([PYTHON, "-c", "import time; time.sleep(60)"])
    try:
        state = short_dir / "state.json"
        d = spawn("--state-file", str(state), name="first").ready()
        fd = os.open(d.fifo, os.O_WRONLY)  # a client's, held across the restart
        try:
            deadline = time.monotonic() + 6.0
            os.write(fd, encode(Arm(pid=healthy.pid, scope_id="step", deadline=deadline, signal=9)))
            wait_until(lambda: saved_scopes(state) == ["step"], what="the arm saved")
            line = encode(Disarm(pid=healthy.pid, scope_id="step"))
            os.write(fd, line[:20])

            def journaled() -> bool:
                return any(
                    line[:20] in p.read_bytes() for p in short_dir.glob("state.json.journal.*")
                )

            wait_until(journaled, what="the first part read")
            d.stop(stop)
            d = spawn("--state-file", str(state), name="second").ready()
            os.write(fd, line[20:])
            wait_until(
                lambda: d.status()["stats"]["requests"].get("disarm", {}).get("ok") == 1,
                what="the disarm applied",
            )
            assert d.status()["timers"] == []
        finally:
            os.close(fd)
        assert healthy.poll() is None
        assert not [r for r in d.records() if r.get("event") == "decode_failed"]
        assert d.stop() == 0
    finally:
        kill_and_close(healthy)
