"""A worker of a user other than root, started before the system daemon made /run/ftimer.

Real FIFOs and a real user: each case runs in a mount namespace of its own with a private
/run (the host's /run/ftimer is never touched), as root making the "daemon's" FIFO, and a
forked child as uid 1000 with the clients. Nothing is signalled: the readers are bare.
"""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

# argv[1]: "late" (no server anywhere before the daemon) or "own" (a per-user server
# read the worker's first arm). Prints what each FIFO read, then the channel check.
SCRIPT = r"""
import os, select, sys, time
SCOPES = {"early", "late", "early-again"}
from ftimer_client import FileTimerClient  # before setuid: the stdlib may be root's only
case = sys.argv[1]
os.makedirs("/run/user/1000")
os.chown("/run/user/1000", 1000, 1000)
to_child, from_parent = os.pipe()
to_parent, from_child = os.pipe()
pid = os.fork()
if pid == 0:
    os.close(to_child); os.close(from_child)
    os.setgroups([]); os.setgid(1000); os.setuid(1000)
    for var in ("FTIMER_FIFO", "FTIMER_SOCKET", "TORCHELASTIC_TIMER_FILE"):
        os.environ.pop(var, None)
    os.environ["XDG_RUNTIME_DIR"] = "/run/user/1000"
    if case == "own":
        os.mkdir("/run/user/1000/ftimer", 0o700)
        os.mkfifo("/run/user/1000/ftimer/timer.fifo", 0o600)
        own = os.open("/run/user/1000/ftimer/timer.fifo", os.O_RDONLY | os.O_NONBLOCK)
    early = FileTimerClient(on_unavailable="ignore")
    early.acquire("early", time.time() + 600)
    os.write(from_parent, b"1")
    os.read(to_parent, 1)  # the system daemon's FIFO is there now
    late = FileTimerClient(on_unavailable="ignore")
    late.acquire("late", time.time() + 600)
    early.acquire("early-again", time.time() + 600)
    if case == "own":
        # Written before acquire() returned: in the pipe now.
        print("own:", sorted(set(os.read(own, 65536).decode().split('"')) & SCOPES))
    print("shared:", early._channel is late._channel, "path:", early.file_path)
    print("third shares:", FileTimerClient(on_unavailable="ignore")._channel is late._channel)
    sys.stdout.flush()
    os._exit(0)
os.close(from_parent); os.close(to_parent)
os.read(to_child, 1)
os.mkdir("/run/ftimer", 0o755)
os.mkfifo("/run/ftimer/timer.fifo")
os.chmod("/run/ftimer/timer.fifo", 0o622)
reader = os.open("/run/ftimer/timer.fifo", os.O_RDONLY | os.O_NONBLOCK)
os.write(from_child, b"1")
_, status = os.waitpid(pid, 0)
got = b""
while select.select([reader], [], [], 0.5)[0]:
    chunk = os.read(reader, 65536)
    if not chunk:
        break
    got += chunk
print("system:", sorted(set(got.decode().split('"')) & SCOPES))
sys.exit(os.waitstatus_to_exitcode(status))
"""


def _run(case: str) -> str:
    unshare = shutil.which("unshare")
    if unshare is None:
        pytest.skip("needs unshare(1) from util-linux")
    done = subprocess.run(
        [
            unshare,
            "--mount",
            "sh",
            "-c",
            'mount -t tmpfs tmpfs /run && exec "$0" -c "$1" "$2"',
            sys.executable,
            SCRIPT,
            case,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if done.returncode != 0 and "mount" in done.stderr and "Traceback" not in done.stderr:
        pytest.skip(f"cannot mount a private /run here: {done.stderr.strip()}")
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_a_worker_started_before_the_system_daemon_joins_it_with_one_channel() -> None:
    # The route was resolved once, when the client was made: the worker sent to its
    # per-user default, where no server was, for its whole life, unwatched, though the
    # daemon ran. It moves to the daemon at its next connection; a client made after
    # the daemon appeared shares its channel (two channels to one server would each
    # resync with a disarm of everything of this pid, wiping the other's timers).
    out = _run("late")
    assert "system: ['early', 'early-again', 'late']" in out
    assert "shared: True path: /run/ftimer/timer.fifo" in out
    assert "third shares: True" in out


def test_a_worker_on_a_per_user_server_stays_with_it_when_the_daemon_appears() -> None:
    # Its timers are on that server: moving would leave them there to expire, with
    # their disarms sent elsewhere.
    out = _run("own")
    assert "own: ['early', 'early-again']" in out
    assert "system: ['late']" in out
    assert "shared: False path: /run/user/1000/ftimer/timer.fifo" in out
    # The daemon's channel is the one a later client gets (not the per-user one, which
    # stays where it is, nor a third: two to one server wipe each other's timers).
    assert "third shares: True" in out
