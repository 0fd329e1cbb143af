"""Workers in private PID namespaces (a container without hostPID) against the real
daemon: over the socket the kernel names them by their host pid and they are reaped by
it; over the FIFO the pid they write is their namespace's and is refused.

The set-up is the Kubernetes example's (docs/deploy.md): a root daemon whose FIFO and
socket a group may write (``--fifo-mode 0620 --fifo-group``), workers of their own uid in
that group, and ``--allow-uid`` that uid. It is also the fence that keeps these tests
from ever signalling a process they did not create: the daemon accepts timers of the
workers' uid only, which nothing but these tests runs as. Whatever a worker writes over
the FIFO names a pid of its namespace (1 or 2), which on the host is pid 1 (always
refused) or someone else: every daemon that reads such a line also runs with
``--dry-run``.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import select
import shutil
import signal
import subprocess
from collections.abc import Iterator
from typing import Any, Callable, Dict, List, Optional

import pytest
from tests.conftest import children_of, wait_until

from ftimer_protocol import socket_path_for

from .conftest import PATIENCE, PYTHON, DaemonProcess, kill_and_close

Spawn = Callable[..., DaemonProcess]

# Prints the pid it has in its namespace, waits for "go" on stdin, arms one timer with
# ftimer_client (argv[1]: the path, "" for the client's own choice, i.e. $FTIMER_SOCKET;
# argv[2]: the transport; argv[3]: seconds), prints "armed" and hangs.
WORKER = """
import os, sys, time
from ftimer_client import FileTimerClient
path, transport, after = sys.argv[1] or None, sys.argv[2], float(sys.argv[3])
print(os.getpid(), flush=True)
if sys.stdin.readline() != "go\\n":
    sys.exit(1)
FileTimerClient(path, transport=transport).arm("stuck", after)
print("armed", flush=True)
time.sleep(60)
"""

#: Runs its arguments as the child of the namespace's init, a shell that then prints
#: how they ended ("exit 137": killed by SIGKILL) and ends normally itself.
SHELL_INIT = ["sh", "-c", '"$@"; echo "exit $?"', "sh"]

#: The ``ftimer`` command: the console script beside this Python, else the module.
_SCRIPT = pathlib.Path(PYTHON).parent / "ftimer"
FTIMER = [str(_SCRIPT)] if _SCRIPT.exists() else [PYTHON, "-m", "ftimer_client"]

#: The workers' uid and group (no other test uses them), and how a command runs as them.
#: The new uid clears the signal a namespace's init gets when unshare dies (--kill-child),
#: so setpriv sets it again: an init of the workers' uid lived on after its test.
WORKER_UID, WORKER_GID = 4263, 4262
AS_WORKER = [
    "setpriv",
    f"--reuid={WORKER_UID}",
    f"--regid={WORKER_GID}",
    "--clear-groups",
    "--pdeathsig=KILL",
]

#: The daemon's settings: the group writes the FIFO and the socket; only the workers'
#: uid may hold timers (the Kubernetes example's, and the fence of these tests).
FENCED = [
    "--fifo-mode",
    "0620",
    "--fifo-group",
    str(WORKER_GID),
    "--allow-uid",
    str(WORKER_UID),
]


@pytest.fixture(scope="module")
def unshare() -> List[str]:
    """The command prefix that runs a command as pid 1 of a new PID namespace (with a
    /proc of its own where the kernel lets us mount one), which dies with ``unshare``.

    Skips unless this is root (a PID namespace, and workers of another uid) with
    unshare(1) and setpriv(1), and the workers' uid can run this Python.
    """
    if os.geteuid() != 0:
        pytest.skip("needs root: a PID namespace, and workers of another uid")
    missing = [tool for tool in ("unshare", "setpriv") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"needs {' and '.join(missing)} (util-linux)")
    probe = subprocess.run(
        [*AS_WORKER, PYTHON, "-c", "import ftimer_client"], capture_output=True, text=True
    )
    if probe.returncode != 0:
        pytest.skip(f"uid {WORKER_UID} cannot run {PYTHON}: {probe.stderr.strip()}")
    errors = []
    for proc in (["--mount-proc"], []):
        prefix = ["unshare", "--pid", "--fork", "--kill-child", *proc]
        probe = subprocess.run([*prefix, "true"], capture_output=True, text=True)
        if probe.returncode == 0:
            return prefix
        errors.append(probe.stderr.strip())
    pytest.skip(f"cannot create a PID namespace here (unshare --pid --fork): {errors[-1]}")


@pytest.fixture
def fenced(spawn: Spawn, short_dir: pathlib.Path) -> Callable[..., DaemonProcess]:
    """Start a ready daemon with ``FENCED`` settings (and more ``args``) in ``short_dir``,
    opened to the workers' group."""
    os.chown(short_dir, -1, WORKER_GID)
    os.chmod(short_dir, 0o710)

    def start(*args: str) -> DaemonProcess:
        return spawn(*FENCED, *args).ready()

    return start


def comm(pid: int) -> str:
    with open(f"/proc/{pid}/comm") as f:
        return f.read().strip()


def client_env(**extra: str) -> Dict[str, str]:
    """This environment without the variables that name a FIFO or socket, plus ``extra``."""
    drop = ("FTIMER_FIFO", "FTIMER_SOCKET", "TORCHELASTIC_TIMER_FILE")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(extra)
    return env


class Contained:
    """A command run in a private PID namespace: ``unshare`` (a child of the test) and,
    below it, the namespace's processes (pid 1 first)."""

    def __init__(self, prefix: List[str], command: List[str], env: Dict[str, str]) -> None:
        self.proc = subprocess.Popen(
            [*prefix, *command],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )

    def line(self) -> str:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait(PATIENCE)
            assert self.proc.stderr is not None
            pytest.fail(f"{self.proc.args} ended: {self.proc.stderr.read()}")
        return line.rstrip("\n")

    def say(self, text: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(text + "\n")
        self.proc.stdin.flush()

    def host_pids(self) -> List[int]:
        """The host pids of the namespace's processes, from its init down the first
        child of each (the chains these tests build are lines)."""
        chain: List[int] = []
        below = children_of(self.proc.pid)
        while below:
            chain.append(below[0])
            below = children_of(below[0])
        return chain

    @staticmethod
    def alive(host_pid: int) -> bool:
        """Whether ``host_pid`` still runs (a zombie does not)."""
        try:
            with open(f"/proc/{host_pid}/stat", "rb") as f:
                return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
        except FileNotFoundError:
            return False

    def cleanup(self) -> None:
        # unshare --kill-child: its death takes the namespace's init, and with it every
        # process of the namespace. Each is watched through a pidfd until it is gone.
        watched = []
        if self.proc.poll() is None:  # once unshare has ended, so has its namespace
            for pid in self.host_pids():
                with contextlib.suppress(ProcessLookupError):
                    watched.append(os.pidfd_open(pid))
        kill_and_close(self.proc)
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:  # a pidfd polls readable once its process has ended
            ended = lambda: len(select.select(watched, [], [], 0)[0]) == len(watched)  # noqa: E731
            wait_until(ended, what="the namespace's processes gone")
        finally:
            for pidfd in watched:
                os.close(pidfd)


@pytest.fixture
def contained(unshare: List[str]) -> Iterator[Callable[..., Contained]]:
    """Start commands in private PID namespaces; each is killed at the end."""
    started: List[Contained] = []

    def start(*command: str, env: Optional[Dict[str, str]] = None) -> Contained:
        c = Contained(unshare, list(command), env if env is not None else client_env())
        started.append(c)
        return c

    yield start
    for c in started:
        c.cleanup()


def records_of(d: DaemonProcess, event: str) -> List[Dict[str, Any]]:
    return [r for r in d.records() if r.get("event") == event]


def socket_of(d: DaemonProcess) -> str:
    path = socket_path_for(str(d.fifo))
    assert os.path.exists(path)
    return path


def test_over_the_socket_a_contained_worker_is_reaped_by_its_host_pid(
    fenced: Callable[..., DaemonProcess], contained: Callable[..., Contained]
) -> None:
    d = fenced()
    # The worker is pid 2 of its namespace, below a shell (pid 1) that reports how it
    # ended; it finds the socket through $FTIMER_SOCKET, as a pod's worker would.
    c = contained(
        *SHELL_INIT,
        *AS_WORKER,
        PYTHON,
        "-c",
        WORKER,
        "",
        "auto",
        "0.3",
        env=client_env(FTIMER_SOCKET=socket_of(d)),
    )
    assert c.line() == "2"
    shell, worker = c.host_pids()
    assert worker != 2
    c.say("go")
    assert c.line() == "armed"
    armed = d.wait_for_record(event="armed", scope_id="stuck")
    assert armed["pid"] == worker  # the kernel's pid, not the 2 the message names
    reaped = d.wait_for_record(event="reaped")
    assert (reaped["pid"], reaped["signal"]) == (worker, signal.SIGKILL)
    # The worker died of SIGKILL; the shell, its parent and the namespace's init, was
    # not signalled: it says so and ends normally.
    assert c.line() == f"exit {128 + signal.SIGKILL}"
    assert c.proc.wait(PATIENCE) == 0
    assert [r["pid"] for r in records_of(d, "reaped")] == [worker]
    assert not records_of(d, "escalated")
    stats = d.status()["stats"]
    assert stats["reaps"] == {"9": 1}
    assert stats["rejections"] == {}
    assert stats["received"]["socket"] >= 1
    assert not Contained.alive(shell)
    assert d.stop() == 0


@pytest.mark.parametrize("ns_pid", [1, 2])
def test_over_the_fifo_a_contained_worker_names_a_pid_that_is_refused(
    fenced: Callable[..., DaemonProcess], contained: Callable[..., Contained], ns_pid: int
) -> None:
    # --dry-run: the pid the FIFO worker writes is its namespace's; on the host it is
    # pid 1 or a process the test did not start, which nothing here may ever signal.
    d = fenced("--dry-run")
    init = [] if ns_pid == 1 else SHELL_INIT
    worker = [*init, *AS_WORKER, PYTHON, "-c", WORKER]
    fifo = contained(*worker, str(d.fifo), "fifo", "0.3")
    assert fifo.line() == str(ns_pid)  # known before it writes anything
    fifo.say("go")
    assert fifo.line() == "armed"  # the FIFO takes any line: the client cannot know
    refused = d.wait_for_record(event="rejected", pid=ns_pid)
    if ns_pid == 1:
        assert refused["reason"] == "reserved_pid"
    else:
        # Host pid 2 is not the worker: a process of another user (root's kthreadd on
        # most hosts), another process (not the worker's start time), or none.
        reasons = ("uid_not_allowed", "identity_mismatch", "no_such_process", "server_ancestor")
        assert refused["reason"] in reasons
    assert d.armed_scopes() == []
    # The same worker over the socket, armed later for as long: once its (dry-run) reap
    # is logged, the FIFO worker's deadline has passed too.
    over_socket = contained(*worker, socket_of(d), "socket", "0.3")
    assert over_socket.line() == str(ns_pid)
    over_socket.say("go")
    assert over_socket.line() == "armed"
    host_pid = over_socket.host_pids()[-1]
    reaped = d.wait_for_record(event="reaped")
    assert reaped["pid"] == host_pid
    assert reaped["msg"].startswith("DRY RUN")
    assert [r["pid"] for r in records_of(d, "reaped")] == [host_pid]
    stats = d.status()["stats"]
    assert stats["rejections"] == {refused["reason"]: 1}
    assert stats["reaps"] == {"9": 1}
    assert Contained.alive(fifo.host_pids()[-1])  # still there; the test ends it itself
    assert fifo.proc.poll() is None
    assert d.stop() == 0


def test_ftimer_exec_in_a_private_pid_namespace_gets_its_command_reaped(
    fenced: Callable[..., DaemonProcess], contained: Callable[..., Contained]
) -> None:
    d = fenced("--capture", "facts")
    # sh (pid 1) -> ftimer exec (pid 2, the sender) -> sleep (pid 3, the subject, named
    # by the pidfd its datagram carries).
    exec_ = [*FTIMER, "exec", "--socket", socket_of(d), "--after", "0.3"]
    c = contained(*SHELL_INIT, *AS_WORKER, *exec_, "--", "sleep", "60")
    armed = d.wait_for_record(event="armed")
    subject = armed["pid"]
    # CMD's process waits at a gate until its timer is armed, then execs sleep.
    wait_until(lambda: comm(subject) == "sleep", what="CMD exec'd once armed")
    assert c.host_pids()[1:] == [armed_sender(d, subject), subject]
    reaped = d.wait_for_record(event="reaped")
    assert (reaped["pid"], reaped["signal"]) == (subject, signal.SIGKILL)
    # ftimer exec reports its command's death; the shell above it was not signalled.
    assert c.line() == f"exit {128 + signal.SIGKILL}"
    assert c.proc.wait(PATIENCE) == 0
    assert [r["pid"] for r in records_of(d, "reaped")] == [subject]
    # ftimer exec's disarm, sent once sleep had died, was read before it was reaped:
    # an unknown disarm (the timer had fired), not a refusal.
    assert_nothing_refused(d)
    assert d.stop() == 0


def test_ftimer_exec_in_a_private_pid_namespace_of_a_command_that_finishes_in_time(
    fenced: Callable[..., DaemonProcess], contained: Callable[..., Contained]
) -> None:
    d = fenced()
    # A write timeout for a loaded machine: exec waits that long for its disarm's read.
    exec_ = [*FTIMER, "exec", "--socket", socket_of(d), "--after", "30", "--write-timeout", "10"]
    c = contained(*SHELL_INIT, *AS_WORKER, *exec_, "--", "true")
    assert c.line() == "exit 0"
    assert c.proc.wait(PATIENCE) == 0
    d.wait_for_record(event="armed", scope_id="exec:true")
    # Its disarm was read before `true` was reaped (ftimer exec waits for that), so
    # its pidfd still named it.
    d.wait_for_record(event="disarmed", scope_id="exec:true")
    assert d.armed_scopes() == []
    assert_nothing_refused(d)
    assert d.status()["stats"]["requests"]["arm"]["ok"] == 1
    assert not records_of(d, "reaped")
    assert d.stop() == 0


def test_a_shells_ftimer_arm_in_a_private_pid_namespace_read_late_gets_the_shell_reaped(
    spawn: Spawn, contained: Callable[..., Contained]
) -> None:
    """`ftimer arm` exits once it has sent; the daemon accepts a datagram about another
    process (here the shell, its parent) only while its sender lives, so the command
    waits until its datagram was read: here after the daemon was stopped for a while."""
    if shutil.which("ss") is None:
        pytest.skip("needs ss(8) (iproute2) to see the datagram queued")
    # Root's: this Python cannot be run from a shell of the workers' uid everywhere. The
    # shell is pid 1 of its namespace, which is what its timer names in its message:
    # nobody that could ever be signalled, should the daemon believe the message.
    d = spawn("--capture", "facts").ready()
    path = socket_of(d)
    arm = " ".join([*FTIMER, "arm", "--socket", path, "--scope", "s", "--after", "0.3"])
    d.proc.send_signal(signal.SIGSTOP)
    try:
        # sh (pid 1: the subject) -> ftimer arm (pid 2: the sender).
        c = contained("sh", "-c", f"{arm} --write-timeout 30 && echo armed && exec sleep 60")
        wait_until(lambda: queued(path), what="the datagram in the daemon's queue")
    finally:
        d.proc.send_signal(signal.SIGCONT)
    assert c.line() == "armed"
    (shell,) = c.host_pids()[:1]
    armed = d.wait_for_record(event="armed", scope_id="s")
    assert armed["pid"] == shell
    reaped = d.wait_for_record(event="reaped")
    assert (reaped["pid"], reaped["signal"]) == (shell, signal.SIGKILL)
    assert c.proc.wait(PATIENCE) != 0  # its namespace's init was killed
    assert [r["pid"] for r in records_of(d, "reaped")] == [shell]
    assert d.status()["stats"]["rejections"] == {}
    assert d.stop() == 0


def queued(path: str) -> int:
    """Bytes queued on the datagram socket bound at ``path`` (ss's Recv-Q)."""
    out = subprocess.run(["ss", "-xan", "src", path], capture_output=True, text=True).stdout
    for line in out.splitlines()[1:]:
        fields = line.split()
        if len(fields) > 4 and fields[4] == path:
            return int(fields[2])
    return 0


def armed_sender(d: DaemonProcess, subject: int) -> int:
    """The ftimer exec that armed ``subject``'s timer: its parent."""
    with open(f"/proc/{subject}/stat", "rb") as f:
        return int(f.read().rsplit(b")", 1)[1].split()[1])


def assert_nothing_refused(d: DaemonProcess) -> None:
    assert records_of(d, "rejected") == []
    assert d.status()["stats"]["rejections"] == {}


# -- a /proc of another namespace -----------------------------------------------------------

# Starts an embedded server (recording, never signalling) and prints what came of it.
EMBEDDED = """
import sys
from ftimer_server import FileTimerServer, RecordingSignaller
server = FileTimerServer(sys.argv[1], signaller=RecordingSignaller())
try:
    server.start()
except RuntimeError as e:
    print(e)
else:
    print("started")
    server.stop()
"""


def test_a_server_in_a_pid_namespace_with_the_hosts_proc_refuses_to_start(
    unshare: List[str], short_dir: pathlib.Path
) -> None:
    # /proc then shows the host's processes under the numbers of the server's namespace:
    # a timer bound through it (the pid of a pidfd a worker sent, read in fdinfo) was a
    # bystander's, and the reap SIGKILLed the bystander.
    without_proc = [arg for arg in unshare if arg != "--mount-proc"]
    embedded = subprocess.run(
        [*without_proc, PYTHON, "-c", EMBEDDED, str(short_dir / "e.fifo")],
        capture_output=True,
        text=True,
        timeout=PATIENCE,
    )
    assert embedded.stdout.startswith(
        "cannot serve: /proc is not of this process's PID namespace: it shows this process as "
    ), embedded
    assert "not 1; mount the namespace's own /proc" in embedded.stdout
    run = ["run", "--dry-run", "--fifo", str(short_dir / "d.fifo")]  # signals nobody
    daemon = subprocess.run(
        [*without_proc, PYTHON, "-m", "ftimer_server", *run],
        capture_output=True,
        text=True,
        timeout=PATIENCE,
    )
    assert daemon.returncode == 3, daemon
    assert "cannot start: /proc is not of this process's PID namespace" in daemon.stderr
    assert not (short_dir / "d.fifo").exists()  # refused before anything was made
