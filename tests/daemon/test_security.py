"""Who may write the FIFO and whom a root daemon may signal: start-up warnings, and
workers of another user reaching the FIFO (a real second uid, through ``setpriv``)."""

from __future__ import annotations

import os
import pathlib
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from typing import Callable

import pytest

from ftimer_protocol import SYSTEM_FIFO_PATH
from ftimer_server.daemon._config import DaemonConfig
from ftimer_server.daemon._warnings import _members, startup_warnings

from .conftest import PATIENCE, PYTHON, DaemonProcess, kill_and_close

Spawn = Callable[..., DaemonProcess]
ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not ROOT, reason="needs root (a root daemon)")

ROOT_RISK = "running as root with no --allow-uid"
WORLD_WRITABLE = "lets every local user write the FIFO"


def warnings_of(d: DaemonProcess) -> list[str]:
    return [
        r["msg"] for r in d.records() if r["level"] == "warning" and r["logger"].endswith("daemon")
    ]


def let_in(directory: pathlib.Path, mode: int, gid: int = -1) -> None:
    """Give ``directory`` (ours) ``mode`` and group ``gid``: the daemon refuses a FIFO
    its writers could not reach."""
    os.chown(directory, -1, gid)
    os.chmod(directory, mode)


@needs_root
def test_a_root_daemon_whose_fifo_others_may_write_warns_once_without_allow_uid(
    spawn: Spawn, short_dir: pathlib.Path
) -> None:
    let_in(short_dir, 0o710, 4242)
    d = spawn("--fifo-mode", "0620", "--fifo-group", "4242").ready()
    # The warnings are logged before READY=1: the log is complete here.
    (warning,) = warnings_of(d)
    assert warning.startswith(ROOT_RISK)
    assert "any member of group 4242" in warning
    assert "any process of any user signalled" in warning
    assert "--allow-uid" in warning
    assert "--fifo-mode 0600" in warning
    assert d.stop() == 0


@needs_root
@pytest.mark.parametrize(
    "args",
    [
        [],  # 0600: only root writes, and root may signal anything anyway
        ["--fifo-mode", "0620", "--fifo-group", "4242", "--allow-uid", "4243"],
    ],
)
def test_no_warning_when_only_root_writes_or_targets_are_restricted(
    spawn: Spawn, short_dir: pathlib.Path, args: list[str]
) -> None:
    let_in(short_dir, 0o710, 4242)
    d = spawn(*args).ready()
    assert warnings_of(d) == []
    assert d.stop() == 0


@needs_root
def test_a_world_writable_fifo_is_accepted_with_a_warning(
    spawn: Spawn, short_dir: pathlib.Path
) -> None:
    let_in(short_dir, 0o711)
    d = spawn("--fifo-mode", "0622", "--allow-uid", "4243").ready()
    (warning,) = warnings_of(d)
    assert warning.startswith("--fifo-mode 0622 " + WORLD_WRITABLE)
    assert d.stop() == 0


def test_a_fifo_in_a_directory_others_may_write_gets_a_warning(tmp_path: pathlib.Path) -> None:
    # There another user can rename the FIFO away and put their own in its place.
    shared = tmp_path / "shared"
    shared.mkdir()
    config = DaemonConfig(fifo=str(shared / "timer.fifo"))
    for mode in (0o777, 0o775):
        shared.chmod(mode)
        (warning,) = startup_warnings(config, euid=1000)
        assert warning.startswith(f"the FIFO's directory {shared} (mode {mode:04o}) lets users")
    shared.chmod(0o1777)  # sticky, as /tmp: only the owner renames or removes a file
    assert startup_warnings(config, euid=1000) == []
    shared.chmod(0o755)
    assert startup_warnings(config, euid=1000) == []


def test_a_fifo_under_a_directory_others_may_write_gets_a_warning(tmp_path: pathlib.Path) -> None:
    # A pod's emptyDir (0777) at /run, the daemon's /run/ftimer made 0710 in it: a worker
    # renamed /run/ftimer away, made its own with a FIFO, and took the timers unwarned.
    shared = tmp_path / "run"
    below = shared / "ftimer"
    below.mkdir(parents=True)
    below.chmod(0o710)
    shared.chmod(0o777)
    config = DaemonConfig(fifo=str(below / "timer.fifo"))
    (warning,) = startup_warnings(config, euid=1000)
    assert warning.startswith(
        f"the FIFO's directory {below}, through {shared} (mode 0777) above it, lets users "
        "other than its owner rename or replace the FIFO"
    )
    shared.chmod(0o1777)
    assert startup_warnings(config, euid=1000) == []


def test_a_socket_elsewhere_is_judged_by_its_own_directory(tmp_path: pathlib.Path) -> None:
    # --socket in a directory others may write: its clients' timers could be taken by a
    # socket put in its place, and nothing was said (only the FIFO's was looked at).
    safe, shared = tmp_path / "safe", tmp_path / "shared"
    safe.mkdir(mode=0o755)
    shared.mkdir()
    shared.chmod(0o777)
    config = DaemonConfig(fifo=str(safe / "timer.fifo"), socket=str(shared / "timer.socket"))
    (warning,) = startup_warnings(config, euid=1000)
    assert warning.startswith(
        f"the socket's directory {shared} (mode 0777) lets users other than its owner rename "
        "or replace the socket in it"
    )
    beside = DaemonConfig(fifo=str(shared / "timer.fifo"), socket=str(shared / "timer.socket"))
    (warning,) = startup_warnings(beside, euid=1000)
    assert "rename or replace the FIFO and the socket in it" in warning
    # The same directory through a symlink: said once, as the FIFO's (it was said twice).
    (tmp_path / "link").symlink_to(shared)
    linked = DaemonConfig(fifo=str(shared / "timer.fifo"), socket=str(tmp_path / "link" / "s"))
    (warning,) = startup_warnings(linked, euid=1000)
    assert "rename or replace the FIFO and the socket in it" in warning


@needs_root
def test_a_fifo_in_a_directory_of_another_user_gets_a_warning(tmp_path: pathlib.Path) -> None:
    # Its owner can rename the FIFO away and put their own in its place, as in a
    # directory others may write: a root daemon said nothing, and a worker's arm went to
    # that user's reader while the daemon counted none.
    theirs = tmp_path / "theirs"
    below = theirs / "ftimer"
    below.mkdir(parents=True)
    os.chown(theirs, 4263, -1)
    (warning,) = startup_warnings(DaemonConfig(fifo=str(theirs / "timer.fifo")), euid=0)
    assert warning.startswith(
        f"the FIFO's directory {theirs} belongs to uid 4263, who may rename or replace the "
        "FIFO in it"
    )
    (warning,) = startup_warnings(DaemonConfig(fifo=str(below / "timer.fifo")), euid=0)
    assert warning.startswith(
        f"the FIFO's directory {below}, through {theirs} above it, belongs to uid 4263"
    )
    assert startup_warnings(DaemonConfig(fifo=str(below / "timer.fifo")), euid=4263) == []


def test_users_allowed_timers_who_may_not_write_the_fifo_get_a_warning() -> None:
    # --allow-uid with the default mode 0600: their workers could reach neither the FIFO
    # nor the socket, and the daemon said nothing.
    fifo = "/run/ftimer/timer.fifo"
    config = DaemonConfig(fifo=fifo, allow_uids=frozenset({0, 4243, 4244}))
    (warning,) = startup_warnings(config, euid=0)
    assert warning == (
        "--allow-uid 4243, 4244: with --fifo-mode 0600 only uid 0 may write the FIFO "
        f"{fifo} and the socket, so their workers cannot reach the daemon (and run "
        "unwatched); use 0620 with --fifo-group for their group"
    )
    assert startup_warnings(DaemonConfig(fifo=fifo, allow_uids=frozenset({0})), euid=0) == []
    reached = DaemonConfig(fifo=fifo, fifo_mode=0o620, allow_uids=frozenset({4243}))
    assert startup_warnings(reached, euid=0) == []


def test_startup_warnings_for_each_user_and_mode() -> None:
    fifo = "/run/ftimer/timer.fifo"
    plain = DaemonConfig(fifo=fifo)
    assert startup_warnings(plain, euid=0) == []
    group = DaemonConfig(fifo=fifo, fifo_mode=0o620)
    (root,) = startup_warnings(group, euid=0)
    assert f"({os.getegid()}), the FIFO's (they can write" in root
    assert startup_warnings(group, euid=1000) == []  # it can signal only its own user's
    world = DaemonConfig(fifo=fifo, fifo_mode=0o622, descendants_only=True)
    mode, root = startup_warnings(world, euid=0)
    assert mode.startswith("--fifo-mode 0622 " + WORLD_WRITABLE)
    assert "any local user" in root
    assert "any descendant of the daemon" in root
    (mode,) = startup_warnings(world, euid=1000)
    assert mode.startswith("--fifo-mode 0622")
    allowed = DaemonConfig(fifo=fifo, fifo_mode=0o620, allow_uids=frozenset({1000}))
    assert startup_warnings(allowed, euid=0) == []
    shut = DaemonConfig(fifo=fifo, fifo_mode=0o600 | 0o040, fifo_group=4242)
    readable, group_left_out = startup_warnings(shut, euid=1000)
    assert readable.startswith("--fifo-mode 0640 lets its group read the FIFO")
    assert group_left_out == (
        "--fifo-group 4242 is given, but --fifo-mode 0640 does not let the group write the "
        "FIFO /run/ftimer/timer.fifo: its members cannot send timers; use 0620"
    )


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give the FIFO another group")
def test_the_warning_names_the_group_a_replaced_fifo_keeps(tmp_path: pathlib.Path) -> None:
    # Started with --fifo-group 4242, then without: the FIFO replaced kept group 4242
    # (as documented), whose members could still write it, and the warning named "the
    # daemon's group" instead.
    fifo = tmp_path / "timer.fifo"
    os.mkfifo(fifo, 0o620)
    os.chown(fifo, -1, 4242)
    config = DaemonConfig(fifo=str(fifo), fifo_mode=0o620, allow_uids=None)
    (root,) = startup_warnings(config, euid=0)
    assert "any member of group 4242, the FIFO's (they can write" in root


def test_a_fifo_others_may_read_is_warned_about() -> None:
    # A user outside the group, who could not write the FIFO, read it (mode 0664, as
    # the daemon took without a word): the disarm they took got a healthy worker reaped.
    config = DaemonConfig(fifo="/srv/ftimer/timer.fifo", fifo_mode=0o664, fifo_group=4242)
    (readable,) = startup_warnings(config, euid=1000)
    assert readable == (
        "--fifo-mode 0664 lets any local user read the FIFO /srv/ftimer/timer.fifo: a "
        "process that reads it takes lines the daemon never sees (a worker's disarm "
        "taken: the worker is reaped; its arm taken: it runs unwatched). Only the daemon "
        "reads its FIFO: use 0600, or 0620 with --fifo-group"
    )


def test_members_of_the_fifo_group_left_out_of_allow_uid_are_named() -> None:
    # A user added to the group, and not to --allow-uid: their workers' timers were
    # refused, they were not told, and the daemon said nothing at start. Group 0 is
    # root's own group on any Linux: root is a member of it.
    config = DaemonConfig(
        fifo="/run/ftimer/timer.fifo",
        fifo_mode=0o620,
        fifo_group=0,
        allow_uids=frozenset({4243}),
    )
    (left_out,) = startup_warnings(config, euid=0)
    assert left_out.startswith("members of group root (0) not in --allow-uid: root (0)")
    assert left_out.endswith("their workers are not told, and run unwatched")
    allowed = DaemonConfig(
        fifo="/run/ftimer/timer.fifo",
        fifo_mode=0o620,
        fifo_group=0,
        allow_uids=frozenset(_members(0)),
    )
    assert startup_warnings(allowed, euid=0) == []


# -- workers of another user: a real second uid and gid ---------------------------------

#: A uid and gid for the workers, distinct from the daemon's (root's).
WORKER_UID, WORKER_GID = 4243, 4242

#: Arms a timer on the FIFO the client resolves by itself (argv[1] if given), prints
#: "armed" (or the error) and hangs until reaped.
OTHER_USER_WORKER = """
import os, sys, time
from ftimer_client import FileTimerClient, ServerUnavailable
try:
    FileTimerClient(sys.argv[1] if len(sys.argv) > 1 else None).arm("step", 0.3)
except ServerUnavailable as e:
    print("unavailable:", e, flush=True)
    sys.exit(3)
print("armed", os.getuid(), os.getgid(), flush=True)
time.sleep(60)
"""


def as_worker(*command: str) -> list[str]:
    return [
        "setpriv",
        f"--reuid={WORKER_UID}",
        f"--regid={WORKER_GID}",
        "--clear-groups",
        *command,
    ]


def worker_env() -> dict[str, str]:
    # The client's default path depends on these: leave it to resolve the FIFO itself.
    drop = ("FTIMER_FIFO", "TORCHELASTIC_TIMER_FILE", "XDG_RUNTIME_DIR")
    return {k: v for k, v in os.environ.items() if k not in drop}


@pytest.fixture(scope="module")
def second_uid() -> None:
    """Skip unless this is root with setpriv, and the second uid can run this Python."""
    if not ROOT or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to run workers as a second uid")
    probe = subprocess.run(
        as_worker(PYTHON, "-c", "import ftimer_client"), capture_output=True, text=True
    )
    if probe.returncode != 0:
        pytest.skip(f"uid {WORKER_UID} cannot run {PYTHON}: {probe.stderr.strip()}")


def run_worker(prefix: list[str], *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [*prefix, *as_worker(PYTHON, "-c", OTHER_USER_WORKER, *args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=worker_env(),
    )


def refused_worker(prefix: list[str], *args: str) -> str:
    """Run a worker that must fail to arm (exit 3); return what it printed."""
    proc = run_worker(prefix, *args)
    try:
        out, _ = proc.communicate(timeout=PATIENCE)
    finally:
        kill_and_close(proc)
    assert proc.returncode == 3, out
    assert out.startswith("unavailable: ")
    return out


def reaped_after_arming(proc: subprocess.Popen[str], d: DaemonProcess) -> None:
    """``proc`` armed its timer as the second uid and was reaped for it by ``d``."""
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line == f"armed {WORKER_UID} {WORKER_GID}\n", line
        assert proc.wait(PATIENCE) == -signal.SIGKILL
        d.wait_for_record(event="reaped", pid=proc.pid)
    finally:
        kill_and_close(proc)


@pytest.fixture
def run_namespace(second_uid: None) -> Iterator[list[str]]:
    """A private mount namespace with an empty tmpfs on /run, held by a process of ours;
    yields the command prefix that runs a command in it (``nsenter``)."""
    holder = subprocess.Popen(
        [
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            "mount -t tmpfs -o mode=0755 ftimer-test /run && echo ready && exec sleep 600",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None
        if holder.stdout.readline() != "ready\n":
            holder.wait(PATIENCE)
            pytest.skip(f"cannot make a private mount namespace: {holder.stderr.read()}")
        yield ["nsenter", f"--mount=/proc/{holder.pid}/ns/mnt"]
    finally:
        kill_and_close(holder)


@needs_root
def test_a_group_given_later_opens_the_directory_an_earlier_run_made_private(
    spawn: Spawn, short_dir: pathlib.Path, run_namespace: list[str]
) -> None:
    # The default path of a root daemon, /run/ftimer/timer.fifo, in a /run of our own.
    daemon = [*run_namespace, PYTHON, "-m", "ftimer_server"]
    where = ["--fifo", SYSTEM_FIFO_PATH, "--control-socket", str(short_dir / "c.sock")]
    first = spawn(*where, command=daemon, name="first").ready()
    assert first.stop() == 0  # it made /run/ftimer 0700: nobody else's business yet
    second = spawn(
        *where, "--fifo-group", str(WORKER_GID), "--fifo-mode", "0620", command=daemon
    ).ready()
    inside = subprocess.run(
        [*run_namespace, "stat", "-c", "%a %g", os.path.dirname(SYSTEM_FIFO_PATH)],
        capture_output=True,
        text=True,
        check=True,
    )
    assert inside.stdout.split() == ["710", str(WORKER_GID)]
    # A worker of the group finds the FIFO at its default path, and by name.
    reaped_after_arming(run_worker(run_namespace), second)
    reaped_after_arming(run_worker(run_namespace, SYSTEM_FIFO_PATH), second)
    assert second.stop() == 0
    # Without the group again, the directory is closed again, and a worker of the old
    # group is told why it finds no FIFO rather than only that none runs.
    third = spawn(*where, command=daemon, name="third").ready()
    out = refused_worker(run_namespace)
    assert "/run/ftimer exists but does not let this user in" in out
    assert third.stop() == 0


@needs_root
def test_a_fifo_its_group_cannot_reach_is_refused_at_start(
    short_dir: pathlib.Path, spawn: Spawn, second_uid: None
) -> None:
    # short_dir is 0700: a directory the daemon does not manage, so it cannot fix it.
    group = ["--fifo-group", str(WORKER_GID), "--fifo-mode", "0620"]
    d = spawn(*group)
    assert d.proc.wait(PATIENCE) == 3
    (error,) = [r for r in d.records() if r["level"] == "error"]
    assert error["msg"].startswith(f"cannot start: FIFO {d.fifo}: members of group {WORKER_GID}")
    assert f"directory {short_dir} (mode 0700" in error["msg"]
    assert not d.fifo.exists()  # refused before anything was made
    # Once the directory lets the group in, the daemon starts, and the group's workers
    # write to it: a real second uid, reaped for its own timer.
    let_in(short_dir, 0o710, WORKER_GID)
    d = spawn(*group, name="again").ready()
    reaped_after_arming(run_worker([], str(d.fifo)), d)
    assert d.stop() == 0


@needs_root
def test_a_worker_the_fifo_mode_leaves_out_gets_a_clear_error(
    short_dir: pathlib.Path, spawn: Spawn, second_uid: None
) -> None:
    let_in(short_dir, 0o711)  # anyone may enter; the FIFO (0600) lets only root write
    d = spawn().ready()
    out = refused_worker([], str(d.fifo))
    assert "this user may not write the FIFO, or enter its directory (permission denied)" in out
    # A directory it may not enter hides what is at the path: either transport would do.
    let_in(short_dir, 0o700)
    out = refused_worker([], str(d.fifo.with_suffix(".socket")))
    assert "this user may not write the FIFO or socket, or enter its directory" in out
    assert d.stop() == 0


@pytest.fixture
def worker_dir(second_uid: None) -> Iterator[pathlib.Path]:
    """A private directory of the second uid."""
    d = pathlib.Path(tempfile.mkdtemp(prefix="ftw-"))
    os.chown(d, WORKER_UID, WORKER_GID)
    os.chmod(d, 0o700)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_an_unprivileged_daemon_given_a_group_it_may_not_give_says_so_in_one_line(
    worker_dir: pathlib.Path,
) -> None:
    # Before: a PermissionError traceback from fchown, exit 1, and the FIFO left behind.
    fifo = worker_dir / "timer.fifo"
    result = subprocess.run(
        as_worker(
            PYTHON,
            "-m",
            "ftimer_server",
            "run",
            "--fifo",
            str(fifo),
            "--capture",
            "none",
            "--fifo-group",
            "0",
            "--fifo-mode",
            "0600",  # group 0 may not write: nothing to reach, nothing refused before
        ),
        capture_output=True,
        text=True,
        timeout=PATIENCE,
    )
    assert result.returncode == 3, result.stderr
    assert "Traceback" not in result.stderr
    (line,) = result.stderr.splitlines()
    assert line.endswith(
        f"cannot start: FIFO {fifo}: cannot give the FIFO group 0: Operation not permitted"
    )
    assert os.listdir(worker_dir) == ["timer.fifo.lock"]  # the lock file stays, as always
