"""The daemon end to end, through the real CLI in subprocesses, with real workers and signals."""

from __future__ import annotations

import json
import os
import pathlib
import re
import signal
import socket
import stat
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from typing import Callable

import pytest
from tests.conftest import ARMER, children_of, wait_until

from ftimer_protocol import Arm, Disarm, encode, parse_start_time
from ftimer_server.daemon._cli import format_status
from ftimer_server.daemon._control import query_status
from ftimer_server.daemon._state import decode_state

from .conftest import PATIENCE, PYTHON, DaemonProcess, Worker

Spawn = Callable[..., DaemonProcess]
StartWorker = Callable[..., Worker]


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PYTHON, "-m", "ftimer_server", *args],
        capture_output=True,
        text=True,
        timeout=PATIENCE,
        env={**os.environ, **(env or {})},
    )


def test_reaps_a_stuck_worker_and_leaves_a_punctual_one(spawn: Spawn, worker: StartWorker) -> None:
    console_script = pathlib.Path(PYTHON).parent / "ftimer-server"
    command = [str(console_script)] if console_script.exists() else None
    d = spawn(command=command).ready()
    assert stat.S_IMODE(os.lstat(d.fifo).st_mode) == 0o600
    stuck = worker(d.fifo, "stuck", 0.3, 60)
    punctual = worker(d.fifo, "punctual", 10, 0.1)
    assert stuck.wait() == -signal.SIGKILL
    assert punctual.wait() == 0
    reaped = d.wait_for_record(event="reaped", pid=stuck.pid)
    assert reaped["level"] == "warning"
    assert reaped["signal"] == signal.SIGKILL
    assert reaped["scope_id"] == "stuck"
    assert 0 <= reaped["late"] < 1.0
    d.wait_for_record(event="disarmed", pid=punctual.pid)
    assert not [r for r in d.records() if r.get("event") == "reaped" and r["pid"] != stuck.pid]
    assert d.stop() == 0


def test_default_signal_then_sigkill_after_the_grace(spawn: Spawn, worker: StartWorker) -> None:
    d = spawn("--signal", "SIGTERM", "--grace", "0.5").ready()
    # Both workers' timers ask for SIGKILL (the client's default); the daemon sends SIGTERM.
    graceful = worker(d.fifo, "tidy", 0.2, 60, on_term="exit")
    stubborn = worker(d.fifo, "stuck", 0.2, 60, on_term="ignore")
    assert graceful.wait() == 42
    assert graceful.proc.stdout is not None
    assert graceful.proc.stdout.read() == "cleaned up\n"
    assert stubborn.wait() == -signal.SIGKILL
    for w in (graceful, stubborn):
        reaped = d.wait_for_record(event="reaped", pid=w.pid)
        assert reaped["signal"] == signal.SIGTERM
        assert "with SIGTERM" in reaped["msg"]
    escalated = d.wait_for_record(event="escalated", pid=stubborn.pid)
    assert (escalated["signal"], escalated["after"]) == (signal.SIGKILL, 0.5)
    escalations = [r["pid"] for r in d.records() if r.get("event") == "escalated"]
    assert escalations == [stubborn.pid]
    assert d.status()["signal"] == signal.SIGTERM
    assert "reaps with SIGTERM" in run_cli("status", "--fifo", str(d.fifo)).stdout
    assert d.stop() == 0


def test_default_signal_from_the_config_file(
    spawn: Spawn, worker: StartWorker, short_dir: pathlib.Path
) -> None:
    config = short_dir / "ftimer.toml"
    config.write_text('signal = "SIGTERM"\n')
    d = spawn("--config", str(config)).ready()
    assert (d.status()["signal"], d.status()["grace"]) == (signal.SIGTERM, 10.0)
    assert worker(d.fifo, "tidy", 0.2, 60, on_term="exit").wait() == 42
    assert d.stop() == 0


def test_status_as_a_table_and_as_json(spawn: Spawn, worker: StartWorker) -> None:
    d = spawn().ready()
    w = worker(d.fifo, "train_step", 60, 60, int(signal.SIGTERM))
    wait_until(lambda: d.armed_scopes() == ["train_step"], what="the timer in the status")
    table = run_cli("status", "--fifo", str(d.fifo))
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert "enforcing" in lines[0]
    assert lines[2] == "1 timer armed"
    assert lines[3].split() == ["PID", "SCOPE", "LEFT", "SIGNAL", "LABELS"]
    pid, scope, left, sig, labels = lines[4].split()
    assert (int(pid), scope, sig, labels) == (w.pid, "train_step", "SIGTERM", "test=daemon")
    assert 50 < float(left.rstrip("s")) <= 60
    doc = json.loads(run_cli("status", "--fifo", str(d.fifo), "--json").stdout)
    assert doc["pid"] == d.pid
    assert doc["healthy"] is True
    assert doc["fifo"] == str(d.fifo)
    (timer,) = doc["timers"]
    assert timer["pid"] == w.pid
    assert timer["signal"] == signal.SIGTERM
    assert timer["labels"] == {"test": "daemon"}
    assert doc["stats"]["requests"]["arm"]["ok"] == 1
    assert d.stop() == 0
    # No daemon: a clear message and exit code 1.
    gone = run_cli("status", "--fifo", str(d.fifo))
    assert gone.returncode == 1
    assert "no ftimer-server is running" in gone.stderr


def test_a_fifo_and_socket_removed_under_the_daemon_are_said_and_unhealthy(
    spawn: Spawn, short_dir: pathlib.Path
) -> None:
    # A cleaner of /tmp or a mistaken rm: the daemon read on, said nothing, and its
    # status stayed healthy while no worker started since could reach it.
    d = spawn().ready()
    sock = d.status()["socket"]
    assert os.path.exists(sock)
    os.unlink(d.fifo)
    os.unlink(sock)
    os.mkfifo(d.fifo)  # another FIFO in its place is no better
    for path, what in ((str(d.fifo), "FIFO"), (sock, "socket")):
        d.wait_for_record(
            level="error",
            where=lambda r, path=path, what=what: r["msg"].startswith(
                f"{path} no longer names the daemon's {what} (removed, or replaced"
            ),
        )
    health = run_cli("status", "--health", "--fifo", str(d.fifo))
    assert health.returncode == 1
    assert health.stderr.rstrip().endswith(
        f"answers, but {d.fifo} and {sock} no longer name its FIFO and socket"
    ), health.stderr
    table = run_cli("status", "--fifo", str(d.fifo))
    assert table.stdout.splitlines()[0].endswith(
        f", PATHS LOST: {d.fifo} and {sock} no longer name its FIFO and socket"
    )
    assert d.status()["lost_paths"] == [str(d.fifo), sock]
    assert d.stop() == 0


def test_a_fifo_directory_replaced_by_a_file_is_said_and_the_daemon_serves_on(
    spawn: Spawn, short_dir: pathlib.Path
) -> None:
    # The look at the path raised ENOTDIR (or ENOTCONN, on a dead network mount) in the
    # daemon's main loop: it exited with a traceback, dropping every timer.
    sub = short_dir / "sub"
    sub.mkdir()
    fifo = sub / "timer.fifo"
    control = short_dir / "ctl.sock"
    d = spawn("--fifo", str(fifo), "--control-socket", str(control), "--no-socket").ready()
    sub.rename(short_dir / "away")
    sub.write_text("")  # a file where the FIFO's directory was
    d.wait_for_record(level="error", where=lambda r: r["msg"].startswith(f"{fifo} no longer"))
    doc = query_status(str(control))
    assert doc["lost_paths"] == [str(fifo)]
    assert f", PATHS LOST: {fifo} no longer names its FIFO\n" in format_status(doc)
    assert d.proc.poll() is None
    assert d.stop() == 0


def test_a_log_file_that_takes_no_more_is_said_once_and_a_stop_is_clean(
    spawn: Spawn, short_dir: pathlib.Path
) -> None:
    # A full disk under --log-file (here a file size limit: EFBIG): logging's traceback
    # for every line on stderr, and one out of the last flush made SIGTERM exit 1.
    limited = ["prlimit", "--fsize=16384", PYTHON, "-m", "ftimer_server"]
    d = spawn(command=limited).ready()
    with subprocess.Popen(["sleep", "60"]) as sleeper:
        try:
            with open(f"/proc/{sleeper.pid}/stat", "rb") as f:
                start = parse_start_time(f.read())
            deadline = time.monotonic() + 3600
            with open(d.fifo, "wb", buffering=0) as fifo:
                for i in range(200):  # a debug line each, some 300 bytes
                    arm = Arm(sleeper.pid, f"s{i}", deadline, 9, start_time=start)
                    fifo.write(encode(arm))
            wait_until(lambda: d.status()["armed"] == 200, what="the 200 timers armed")
            assert d.log.stat().st_size <= 16384
            assert d.stop() == 0
        finally:
            sleeper.kill()
    assert d.proc.stderr is not None
    said = d.proc.stderr.read()
    assert "Traceback" not in said
    assert (
        said.count(f"ftimer-server: a line could not be written to the log file {d.log}: ") == 1
    ), said
    assert "line(s) lost so far" in said


def test_kill_9_and_restart_keeps_armed_timers(
    spawn: Spawn, worker: StartWorker, short_dir: pathlib.Path
) -> None:
    state_file = short_dir / "state.json"
    a = spawn("--state-file", str(state_file), name="a").ready()
    due_after_restart = worker(a.fifo, "due-after-restart", 4.0, 60)
    due_while_down = worker(a.fifo, "due-while-down", 1.5, 60)  # ~1.2 s of margin to kill
    both = ["due-after-restart", "due-while-down"]
    wait_until(lambda: sorted(_saved(state_file)) == both, what="both timers saved")
    a.stop(signal.SIGKILL)
    assert a.proc.returncode == -signal.SIGKILL
    # The first timer expires while no daemon runs: nobody reaps it yet.
    wait_until(lambda: time.monotonic() > _deadline(state_file, "due-while-down") + 0.2)
    assert due_while_down.proc.poll() is None
    b = spawn("--state-file", str(state_file), name="b").ready()
    assert due_while_down.wait() == -signal.SIGKILL  # at once on restart
    late = b.wait_for_record(event="reaped", pid=due_while_down.pid)
    assert late["late"] > 0.2
    assert due_after_restart.wait() == -signal.SIGKILL  # on time after restart
    on_time = b.wait_for_record(event="reaped", pid=due_after_restart.pid)
    assert on_time["late"] < 1.0
    restored = [r for r in b.records() if r["msg"].startswith("restored timer")]
    assert len(restored) == 2
    assert b.stop() == 0
    assert decode_state(state_file.read_bytes()).timers == []


# Arms "s" over the socket at argv[1], then, at "release" on stdin, releases it, and
# sends nothing more.
IDLE = """
import sys
from ftimer_client import FileTimerClient
client = FileTimerClient(sys.argv[1], transport="socket", labels={})
client.arm("s", 600)
print("armed", flush=True)
assert sys.stdin.readline() == "release\\n"
client.release("s")
print("released", flush=True)
sys.stdin.read()
"""


def test_a_disarm_that_died_unread_with_the_daemon_is_sent_again_by_an_idle_worker(
    spawn: Spawn, short_dir: pathlib.Path
) -> None:
    # The datagram was queued when the daemon was killed: the next one restored the
    # timer from its state file, and the worker, which sent nothing more, was reaped.
    # The client sends its last disarms again when it reconnects, but it looked for a
    # lost server only while something was armed.
    state_file = short_dir / "state.json"
    a = spawn("--state-file", str(state_file), name="a").ready()
    sock = a.status()["socket"]
    with subprocess.Popen(
        [PYTHON, "-c", IDLE, sock], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    ) as idle:
        try:
            assert idle.stdin is not None
            assert idle.stdout is not None
            assert idle.stdout.readline() == "armed\n"
            wait_until(lambda: _saved(state_file) == ["s"], what="the timer saved")
            a.proc.send_signal(signal.SIGSTOP)  # reads nothing more
            idle.stdin.write("release\n")
            idle.stdin.flush()
            assert idle.stdout.readline() == "released\n"
            a.stop(signal.SIGKILL)
            b = spawn("--state-file", str(state_file), name="b").ready()
            assert [r for r in b.records() if r["msg"].startswith("restored timer")]
            wait_until(lambda: b.status()["armed"] == 0, what="the restored timer disarmed")
            assert idle.poll() is None
            assert b.stop() == 0
        finally:
            idle.kill()


# One block whose disarm finds no room in the socket's queue, and is given up (warned).
GIVES_UP = """
import sys, warnings
from ftimer_client import FileTimerClient
client = FileTimerClient(sys.argv[1], on_unavailable="warn", write_timeout=0.2)
client.arm("warm", 60)
client.release("warm")
print("ready", flush=True)
assert sys.stdin.readline() == "go\\n"
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    client.arm("step", 0.3)
    client.release("step")
print("disarm given up" if caught else "disarm delivered", flush=True)
sys.stdin.read()
"""


def test_a_disarm_given_up_while_the_daemon_was_stopped_gets_no_healthy_worker_reaped(
    spawn: Spawn,
) -> None:
    # The daemon stopped (SIGSTOP: a freeze, swapping) while a healthy worker's arm took
    # the queue's last place: its disarm found no room, and was given up. Back 1.5 s
    # later, the daemon read the arm, overdue by more than a blocked write's time, and
    # reaped the worker at once; the disarm its client re-sent came after.
    d = spawn("--capture", "none").ready()
    sock = d.status()["socket"]
    places = int(pathlib.Path("/proc/sys/net/unix/max_dgram_qlen").read_text())
    with (
        subprocess.Popen(
            [PYTHON, "-c", GIVES_UP, sock], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        ) as healthy,
        socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as junk,
    ):
        try:
            assert healthy.stdin is not None
            assert healthy.stdout is not None
            assert healthy.stdout.readline() == "ready\n"
            # The warm-up's arm and disarm read first: left in the queue, they would take
            # two of the places the junk below counts on.
            wait_until(
                lambda: d.status()["stats"]["received"].get("socket", 0) == 2,
                what="the warm-up read",
            )
            d.proc.send_signal(signal.SIGSTOP)
            wait_until(lambda: _state(d.proc.pid) == "T", what="the daemon stopped")
            junk.connect(sock)
            for _ in range(places):  # the queue holds one more: the arm's
                junk.send(b"junk\n", socket.MSG_DONTWAIT)
            healthy.stdin.write("go\n")
            healthy.stdin.flush()
            assert healthy.stdout.readline() == "disarm given up\n"
            time.sleep(1.5)  # the stop's length: the arm is read 1.2 s overdue
            d.proc.send_signal(signal.SIGCONT)
            wait_until(lambda: d.status()["armed"] == 0, what="the disarm re-sent and read")
            assert d.status()["stats"]["reaps"] == {}
            assert healthy.poll() is None
        finally:
            healthy.kill()
    assert d.stop() == 0


def _state(pid: int) -> str:
    """A process's state letter (``/proc/PID/stat``'s third field)."""
    return pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def test_at_info_level_arms_are_not_logged_but_still_saved(
    spawn: Spawn, worker: StartWorker, short_dir: pathlib.Path
) -> None:
    state_file = short_dir / "state.json"
    d = spawn("--state-file", str(state_file), "--log-level", "info").ready()
    w = worker(d.fifo, "saved", 60, 60)
    wait_until(lambda: _saved(state_file) == ["saved"], what="the timer in the state file")
    w.cleanup()
    wait_until(lambda: d.armed_scopes() == [], what="the worker's exit")
    wait_until(lambda: _saved(state_file) == [], what="the exit saved")
    assert not [r for r in d.records() if r.get("event") in ("armed", "disarmed")]
    assert d.stop() == 0


def _saved(state_file: pathlib.Path) -> list[str]:
    """The scopes of the timers in the state file; none while there is none yet."""
    try:
        return [t.scope_id for t in decode_state(state_file.read_bytes()).timers]
    except (FileNotFoundError, ValueError):
        return []


def _deadline(state_file: pathlib.Path, scope: str) -> float:
    (timer,) = [t for t in decode_state(state_file.read_bytes()).timers if t.scope_id == scope]
    return timer.deadline


def test_a_dead_worker_in_the_state_file_is_dropped_not_signalled(
    spawn: Spawn, worker: StartWorker, short_dir: pathlib.Path
) -> None:
    state_file = short_dir / "state.json"
    a = spawn("--state-file", str(state_file), name="a").ready()
    w = worker(a.fifo, "s", 60, 60)
    wait_until(lambda: a.armed_scopes() == ["s"])
    assert a.stop() == 0  # SIGTERM saves the state
    assert [t.pid for t in decode_state(state_file.read_bytes()).timers] == [w.pid]
    w.cleanup()  # the worker dies while no daemon runs
    b = spawn("--state-file", str(state_file), name="b").ready()
    dropped = b.wait_for_record(event="worker_gone", pid=w.pid)
    assert dropped["level"] == "info"
    assert b.status()["timers"] == []
    assert b.stop() == 0


def test_corrupt_state_file_is_set_aside_and_the_daemon_runs(
    spawn: Spawn, worker: StartWorker, short_dir: pathlib.Path
) -> None:
    state_file = short_dir / "state.json"
    state_file.write_bytes(b'{"version": 1, "boot_id": "x", "timers": [{"pid": 1')  # truncated
    d = spawn("--state-file", str(state_file)).ready()
    error = d.wait_for_record(level="error", logger="ftimer_server.state")
    assert "unusable" in error["msg"]
    aside = [p for p in d.dir.iterdir() if p.name.startswith("state.json.corrupt-")]
    assert len(aside) == 1
    assert aside[0].read_bytes().startswith(b'{"version": 1, "boot_id": "x"')
    w = worker(d.fifo, "s", 0.2, 60)
    assert w.wait() == -signal.SIGKILL  # it works regardless
    wait_until(lambda: state_file.exists() and decode_state(state_file.read_bytes()))
    assert d.stop() == 0


@pytest.mark.parametrize("kind", ["symlink", "regular file", "directory", "foreign FIFO"])
def test_unsafe_fifo_paths_are_refused(short_dir: pathlib.Path, kind: str) -> None:
    path = short_dir / "timer.fifo"
    target = short_dir / "target"
    target.write_text("precious")
    if kind == "symlink":
        path.symlink_to(target)
    elif kind == "regular file":
        path.write_text("precious")
    elif kind == "directory":
        path.mkdir()
    else:
        if os.geteuid() != 0:
            pytest.skip("needs root to create a FIFO owned by another user")
        os.mkfifo(path, 0o600)
        os.chown(path, 65534, 65534)
    before = os.lstat(path)
    result = run_cli("run", "--fifo", str(path))
    assert result.returncode == 3, result.stderr
    assert "refusing" in result.stderr
    after = os.lstat(path)
    assert (after.st_ino, after.st_mode, after.st_uid) == (
        before.st_ino,
        before.st_mode,
        before.st_uid,
    )
    assert target.read_text() == "precious"
    assert not (short_dir / "timer.fifo.sock").exists()


@pytest.fixture
def armer(short_dir: pathlib.Path) -> Iterator[Callable[..., subprocess.Popen[str]]]:
    """Starts an ARMER on the FIFO of ``short_dir`` (call it once a daemon runs); with
    ``watch=False``, its client does not look for a lost server between its writes."""
    procs: list[subprocess.Popen[str]] = []

    def start(watch: bool = True) -> subprocess.Popen[str]:
        code = (
            ARMER
            if watch
            else "from ftimer_client import _channel\n_channel.WATCH_EVERY = 1e6\n" + ARMER
        )
        proc = subprocess.Popen(
            [PYTHON, "-c", code, str(short_dir / "timer.fifo")],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        procs.append(proc)
        assert proc.stdout is not None
        assert proc.stdout.readline() == "armed\n"
        return proc

    yield start
    for proc in procs:
        proc.kill()
        proc.wait()
        for stream in (proc.stdin, proc.stdout):
            if stream is not None:
                stream.close()


def arm_next(proc: subprocess.Popen[str], scope: str) -> None:
    assert proc.stdin is not None
    assert proc.stdout is not None
    proc.stdin.write(scope + "\n")
    proc.stdin.flush()
    assert proc.stdout.readline() == "armed\n"


def test_fifo_is_reused_when_timers_were_restored(
    spawn: Spawn, armer: Callable[[], subprocess.Popen[str]], short_dir: pathlib.Path
) -> None:
    state = str(short_dir / "state.json")
    a = spawn("--fifo-mode", "0620", "--state-file", state, name="a").ready()
    inode = os.lstat(a.fifo).st_ino
    assert stat.S_IMODE(os.lstat(a.fifo).st_mode) == 0o620
    w = armer()
    wait_until(lambda: a.armed_scopes() == ["first"], what="the first timer armed")
    assert a.stop() == 0  # saves the state
    b = spawn("--state-file", state, name="b").ready()
    assert os.lstat(b.fifo).st_ino == inode
    assert stat.S_IMODE(os.lstat(b.fifo).st_mode) == 0o600  # the mode asked for now
    assert b.armed_scopes() == ["first"]
    arm_next(w, "second")  # through the FIFO it held all along
    wait_until(lambda: b.armed_scopes() == ["first", "second"], what="the second timer")
    assert not any("replaced the FIFO" in r["msg"] for r in b.records())
    assert b.stop() == 0


def test_fifo_is_replaced_without_state_and_clients_resend_their_timers(
    spawn: Spawn, armer: Callable[..., subprocess.Popen[str]], worker: StartWorker
) -> None:
    a = spawn("--fifo-mode", "0620", name="a").ready()
    inode = os.lstat(a.fifo).st_ino
    # No watch: a second after its arm it would find the FIFO replaced and resend by
    # itself, and the new daemon would not be seen to start empty.
    w = armer(watch=False)
    wait_until(lambda: a.armed_scopes() == ["first"], what="the first timer armed")
    assert a.stop() == 0
    b = spawn("--fifo-mode", "0620", name="b").ready()
    assert os.lstat(b.fifo).st_ino != inode  # a new FIFO, atomically in place
    assert stat.S_IMODE(os.lstat(b.fifo).st_mode) == 0o620
    b.wait_for_record(where=lambda r: r["msg"].startswith("replaced the FIFO"))
    assert b.armed_scopes() == []
    # The worker wrote nothing while no daemon ran; its next write fails with EPIPE on
    # the old FIFO, and the client re-sends what it has armed before the new message.
    arm_next(w, "second")
    wait_until(lambda: b.armed_scopes() == ["first", "second"], what="both timers")
    assert worker(b.fifo, "s", 0.2, 60).wait() == -signal.SIGKILL
    assert b.stop() == 0


def test_a_second_daemon_on_the_same_fifo_is_refused(spawn: Spawn, worker: StartWorker) -> None:
    a = spawn(name="a").ready()
    fifo = os.lstat(a.fifo)
    b = spawn(name="b")
    assert b.proc.wait(PATIENCE) == 3
    assert [r["msg"] for r in b.records() if r["level"] == "error"] == [
        f"cannot start: another ftimer-server is running on FIFO {b.fifo} (it holds {b.fifo}.lock)"
    ]
    assert os.lstat(a.fifo).st_ino == fifo.st_ino  # not replaced by the one refused
    assert worker(a.fifo, "s", 0.2, 60).wait() == -signal.SIGKILL  # the first one still works
    assert a.stop() == 0


def test_sigterm_with_writers_active(spawn: Spawn, short_dir: pathlib.Path) -> None:
    state_file = short_dir / "state.json"
    d = spawn("--state-file", str(state_file)).ready()
    # Writers arm and disarm in a loop (long timers: nobody is reaped) as fast as they can.
    hammer = (
        "import sys\n"
        "from ftimer_client import FileTimerClient\n"
        "c = FileTimerClient(sys.argv[1], on_unavailable='ignore')\n"
        "print('go', flush=True)\n"
        "i = 0\n"
        "while True:\n"
        "    c.arm('s%d' % (i % 50), 600); c.release('s%d' % ((i + 25) % 50)); i += 1\n"
    )
    writers = [
        subprocess.Popen([PYTHON, "-c", hammer, str(d.fifo)], stdout=subprocess.PIPE, text=True)
        for _ in range(3)
    ]
    try:
        for w in writers:
            assert w.stdout is not None
            assert w.stdout.readline() == "go\n"
        wait_until(lambda: d.status()["stats"]["requests"]["arm"]["ok"] > 1000)
        start = time.monotonic()
        assert d.stop(signal.SIGTERM) == 0
        assert time.monotonic() - start < 5
        d.notify.wait_for("STOPPING=1")
        state = decode_state(state_file.read_bytes())
        assert {t.pid for t in state.timers} <= {w.pid for w in writers}
        assert any(r["msg"].startswith("saved ") for r in d.records())
        assert all(w.poll() is None for w in writers)  # writers were not hurt
    finally:
        for w in writers:
            w.kill()
            w.wait()
            assert w.stdout is not None
            w.stdout.close()


def test_ctrl_c_at_the_terminal_stops_the_daemon_and_its_helper_quietly(spawn: Spawn) -> None:
    # A Ctrl-C signals the terminal's foreground process group: here the daemon's own
    # group, which the test made. The capture helper, in it, died with a traceback.
    d = spawn("--capture", "facts", session=True).ready()
    helper = wait_until(lambda: children_of(d.pid), what="the capture helper")[0]
    # Started and reading its jobs (a signal before that would kill it quietly).
    wait_until(lambda: "pipe_read" in pathlib.Path(f"/proc/{helper}/wchan").read_text())
    os.killpg(d.pid, signal.SIGINT)
    assert d.proc.wait(PATIENCE) == 0
    assert d.proc.stderr is not None
    assert d.proc.stderr.read() == ""
    assert not os.path.exists(f"/proc/{helper}")  # ended and reaped by the daemon


def test_readiness_watchdog_and_stopping_on_a_real_socket(spawn: Spawn) -> None:
    d = spawn(env={"WATCHDOG_USEC": "200000"}).ready()  # a keep-alive every 0.1 s
    ready = next(n for n in d.notify.received if "READY=1" in n)
    assert f"MAINPID={d.pid}" in ready.split("\n")
    d.notify.wait_for("WATCHDOG=1")
    count = sum(n == "WATCHDOG=1" for n in d.notify.received)
    wait_until(
        lambda: (
            (d.notify.receive(0.1), sum(n == "WATCHDOG=1" for n in d.notify.received))[1]
            >= count + 3
        ),
        what="more keep-alives",
    )
    assert d.stop() == 0
    d.notify.wait_for("STOPPING=1")


def test_dry_run_logs_and_counts_but_signals_nothing(spawn: Spawn, worker: StartWorker) -> None:
    d = spawn("--dry-run").ready()
    w = worker(d.fifo, "s", 0.2, 60)
    record = d.wait_for_record(event="reaped", pid=w.pid)
    assert record["msg"].startswith("DRY RUN")
    assert w.proc.poll() is None  # still alive
    assert d.status()["stats"]["reaps"] == {"9": 1}
    assert d.stop() == 0


def test_metrics_scraped_over_loopback(spawn: Spawn, worker: StartWorker) -> None:
    pytest.importorskip("prometheus_client")
    d = spawn("--metrics-address", "127.0.0.1:0").ready()
    url = d.wait_for_record(where=lambda r: r["msg"].startswith("metrics on"))
    address = url["msg"].split()[-1]
    assert address.startswith("http://127.0.0.1:")
    w = worker(d.fifo, "s", 0.1, 60)
    assert w.wait() == -signal.SIGKILL
    d.wait_for_record(event="reaped", pid=w.pid)
    with urllib.request.urlopen(address, timeout=PATIENCE) as r:
        body = r.read().decode()
    assert 'ftimer_reaps_total{signal="SIGKILL"} 1.0' in body
    assert 'ftimer_requests_total{result="ok",type="arm"} 1.0' in body
    assert "ftimer_reap_latency_seconds_count 1.0" in body
    assert d.stop() == 0


def test_metrics_without_the_extra_is_a_usage_error(short_dir: pathlib.Path) -> None:
    blocker = short_dir / "blocked"
    (blocker / "prometheus_client").mkdir(parents=True)
    (blocker / "prometheus_client" / "__init__.py").write_text("raise ImportError('blocked')\n")
    result = run_cli(
        "run",
        "--fifo",
        str(short_dir / "timer.fifo"),
        "--metrics-address",
        "9464",
        env={"PYTHONPATH": str(blocker)},
    )
    assert result.returncode == 2
    # One line, as for every bad setting, found before the daemon starts (no log line);
    # a command that works whether ftimer came from an index or from the repository.
    assert result.stderr == (
        "ftimer-server: error: --metrics-address: metrics need prometheus_client (the "
        "ftimer-server[metrics] extra): pip install prometheus_client\n"
    )
    assert not (short_dir / "timer.fifo").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["run", "--fifo-mode", "999"], "not an octal mode"),
        (["run", "--grace", "-1"], "grace"),
        (["run", "--log-format", "xml"], "invalid choice"),
        (["run", "--allow-signal", "SIGNOPE"], "unknown signal"),
        (["run", "--signal", "SIGNOPE"], "unknown signal"),
        (["run", "--signal", "0"], "is not a signal number"),
        (["run", "--bogus"], "unrecognized arguments"),
        ([], "required"),
        # "\u00b2" ("²") passes str.isdigit() but not int(): a clear error, never a crash.
        (["run", "--signal", "\u00b2"], "--signal: unknown signal"),
        (["run", "--allow-signal", "\u00b2"], "--allow-signal: unknown signal"),
        (["run", "--fifo-group", "\u00b2"], "--fifo-group: unknown group"),
        (["run", "--fifo-mode", "\u00b2"], "--fifo-mode: FIFO mode"),
        (["run", "--metrics-address", "\u00b2"], "has no port number"),
        (["run", "--metrics-address", "70000"], "port 70000 is out of range"),
        (["run", "--allow-uid", "\u00b2"], "--allow-uid: not a whole number"),
        (["run", "--max-timers", "\u0662"], "--max-timers: not a whole number"),
        (["run", "--grace", "\u0662"], "--grace: not a number of seconds"),
    ],
)
def test_bad_options_exit_2(args: list[str], message: str) -> None:
    result = run_cli(*args)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('fifo = "/x"\nfifo-mod = "0600"\n', "there is no setting 'fifo-mod'"),
        ('signal = "SIGNOPE"\n', "unknown signal: 'SIGNOPE'"),
        ("signal = 99\n", "is not a signal number"),
        ('signal = "\u00b2"\n', "signal: unknown signal"),
        ('fifo-group = "\u00b2"\n', "fifo-group: unknown group"),
        ('metrics-address = "\u00b2"\n', "metrics-address: metrics address"),
        ('max-timers = "\u00b2"\n', "max-timers is a string; it takes a whole number"),
        ("allow-uids = []\n", "allow-uids: an empty list allows no user's timers"),
        ("allow-signals = []\n", "allow-signals: an empty list allows no signal"),
    ],
)
def test_bad_config_file_exit_2(short_dir: pathlib.Path, text: str, message: str) -> None:
    config = short_dir / "ftimer.toml"
    config.write_text(text)
    result = run_cli("run", "--config", str(config), "--fifo", str(short_dir / "timer.fifo"))
    assert result.returncode == 2
    assert message in result.stderr
    assert str(config) in result.stderr
    assert "Traceback" not in result.stderr
    assert not (short_dir / "timer.fifo").exists()  # refused before anything was made


def test_config_file_with_command_line_override(spawn: Spawn, short_dir: pathlib.Path) -> None:
    config = short_dir / "ftimer.toml"
    config.write_text('log-level = "warning"\ndry-run = true\n')
    d = spawn("--config", str(config), "--no-dry-run").ready()
    doc = d.status()
    assert doc["dry_run"] is False
    assert d.stop() == 0


def test_sighup_reopens_the_log_and_reloads_the_config(
    spawn: Spawn, short_dir: pathlib.Path, worker: StartWorker
) -> None:
    config = short_dir / "ftimer.toml"
    config.write_text('log-level = "info"\n')
    d = spawn("--config", str(config)).ready()
    rotated = d.log.with_name("d.log.1")
    d.log.rename(rotated)
    config.write_text('log-level = "debug"\nmax-timers = 5\n')
    d.proc.send_signal(signal.SIGHUP)
    d.notify.wait_for("RELOADING=1")
    reloaded = d.wait_for_record(where=lambda r: r["msg"].startswith("config reloaded"))
    assert reloaded["level"] == "info"
    needs_restart = d.wait_for_record(level="warning", logger="ftimer_server.daemon")
    assert "max-timers" in needs_restart["msg"]
    # The new file gets the new lines, at the new level (armed is a debug line).
    w = worker(d.fifo, "s", 60, 60)
    d.wait_for_record(event="armed", pid=w.pid)
    old_lines = [json.loads(line) for line in rotated.read_text().splitlines()]
    assert old_lines
    assert not any(r.get("event") == "armed" for r in old_lines)
    assert d.stop() == 0


def test_sighup_says_which_settings_of_the_file_the_command_line_overrides(
    spawn: Spawn, short_dir: pathlib.Path
) -> None:
    # log-level changed in the file, given on the command line too: "config reloaded",
    # and the level stayed the command line's, unsaid.
    config = short_dir / "ftimer.toml"
    config.write_text('log-level = "info"\n')
    d = spawn("--config", str(config), "--log-level", "info").ready()
    config.write_text('log-level = "debug"\nmax-timers = 5\n')
    d.proc.send_signal(signal.SIGHUP)
    d.notify.wait_for("RELOADING=1")
    d.wait_for_record(where=lambda r: r["msg"].startswith("config reloaded"))
    said = d.wait_for_record(where=lambda r: "the command line gives otherwise" in r["msg"])
    assert said["level"] == "warning"
    assert said["msg"].endswith("not applied (now or at a restart): --log-level")
    assert d.stop() == 0


def test_a_flood_of_bad_input_is_logged_a_few_times_with_a_count(spawn: Spawn) -> None:
    # Lines that differ each time (a new excerpt, another pid) are one kind of line: they
    # are held back after a burst like identical ones. Timers ask for SIGKILL while only
    # SIGTERM is allowed, so they are refused before any process is looked at, and the
    # disarms between the junk lines (which keep each junk line a run of its own) name a
    # pid with no timers; and the daemon runs dry: nothing here can signal anything,
    # whatever the checks do.
    d = spawn("--allow-signal", "SIGTERM", "--dry-run").ready()
    n = 200
    lines = []
    for i in range(n):
        lines.append(b"junk %d\n" % i)
        lines.append(encode(Disarm(pid=2, scope_id="none")))
        lines.append(encode(Arm(pid=100_000 + i, scope_id="s", deadline=1e6, signal=9)))
    fd = os.open(d.fifo, os.O_WRONLY | os.O_NONBLOCK)
    try:
        for i in range(0, len(lines), 30):
            os.write(fd, b"".join(lines[i : i + 30]))
    finally:
        os.close(fd)

    def counted() -> bool:
        stats = d.status()["stats"]
        return (
            stats["decode_errors"].get("MalformedMessage") == n
            and stats["rejections"].get("signal_not_allowed") == n
        )

    wait_until(counted, what="every line read")
    assert d.stop() == 0
    records = d.records()
    for event, last in (("decode_failed", "b'junk 199'"), ("rejected", "pid 100199 ")):
        lines_of_kind = [r for r in records if r.get("event") == event]
        assert len(lines_of_kind) == 11  # a burst of ten, then one summary (at shutdown)
        assert not any("more like this" in r["msg"] for r in lines_of_kind[:10])
        summary = lines_of_kind[10]
        assert re.search(rf" \[{n - 10} more like this in \d+\.\d s\]$", summary["msg"])
        assert last in summary["msg"]  # it quotes the last line held back
        assert summary["suppressed"] == n - 10
        assert summary["ts"] >= lines_of_kind[9]["ts"]


def test_sixteen_ranks_reaped_at_once_are_each_named_in_the_log(spawn: Spawn) -> None:
    # Reap lines were folded after ten like any flood: of sixteen ranks reaped together,
    # six were one "[N more like this]" line quoting the last, the others unnamed. The
    # daemon runs dry: nothing is signalled.
    d = spawn("--dry-run", "--capture", "none").ready()
    ranks = [subprocess.Popen(["sleep", "60"]) for _ in range(16)]
    try:
        now = time.monotonic()
        lines = [
            encode(
                Arm(pid=p.pid, scope_id="step", deadline=now, signal=15, labels={"rank": str(i)})
            )
            for i, p in enumerate(ranks)
        ]
        fd = os.open(d.fifo, os.O_WRONLY | os.O_NONBLOCK)
        try:
            os.write(fd, b"".join(lines))
        finally:
            os.close(fd)
        wait_until(lambda: len(d.status()["stats"]["reaps"]) > 0, what="the reaps")
        wait_until(lambda: sum(d.status()["stats"]["reaps"].values()) == 16, what="sixteen reaps")
        assert d.stop() == 0
    finally:
        for p in ranks:
            p.kill()
            p.wait()
    records = d.records()
    for event in ("expired", "reaped"):
        named = [r["pid"] for r in records if r.get("event") == event]
        assert sorted(named) == sorted(p.pid for p in ranks)
    assert not any("more like this" in r["msg"] for r in records)


def test_sigabrt_prints_every_threads_stack_to_stderr(spawn: Spawn) -> None:
    # What systemd's WatchdogSignal=SIGABRT does to a wedged daemon: the journal (stderr,
    # even with --log-file) gets the Python stack of each thread, the reader loop's too.
    d = spawn().ready()
    d.proc.send_signal(signal.SIGABRT)
    assert d.proc.wait(PATIENCE) == -signal.SIGABRT
    assert d.proc.stderr is not None
    err = d.proc.stderr.read()
    assert "Fatal Python error: Aborted" in err
    assert err.count("Thread 0x") >= 2  # the main thread and the server's loop
    assert "_loop.py" in err


def test_version() -> None:
    result = run_cli("--version")
    assert result.returncode == 0
    assert result.stdout.startswith("ftimer-server ")


#: The daemon, with a Python that cannot be run for its capture helper.
NO_HELPER = """
import sys
sys.executable = "/nonexistent/python"
from ftimer_server.daemon._cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_capture_helper_that_cannot_start_is_named_not_the_incident_directory(
    spawn: Spawn, short_dir: pathlib.Path
) -> None:
    # Before: "incident directory ...: [Errno 2] No such file or directory: ..." for a
    # directory that was fine.
    incidents = short_dir / "incidents"
    d = spawn("--incident-dir", str(incidents), command=[PYTHON, "-c", NO_HELPER])
    assert d.proc.wait(PATIENCE) == 3
    errors = [r["msg"] for r in d.records() if r["level"] == "error"]
    assert errors == [
        "cannot start: cannot start the incident capture helper: No such file or "
        "directory: /nonexistent/python"
    ]
    assert stat.S_IMODE(os.stat(incidents).st_mode) == 0o700  # made, and fine


def test_an_unsafe_incident_directory_is_named_once(spawn: Spawn, short_dir: pathlib.Path) -> None:
    incidents = short_dir / "incidents"
    incidents.mkdir(mode=0o777)
    incidents.chmod(0o777)
    d = spawn("--incident-dir", str(incidents))
    assert d.proc.wait(PATIENCE) == 3
    errors = [r["msg"] for r in d.records() if r["level"] == "error"]
    assert errors == [
        f"cannot start: incident directory {incidents}: it is writable by others (mode 0777); "
        "make it 0700 (chmod go-w)"
    ]
