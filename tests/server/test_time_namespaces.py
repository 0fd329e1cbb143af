"""Workers in time namespaces, real ones (``unshare --time``): a process whose clocks are
offset from the server's names other times with the same numbers, and is refused rather
than reaped at a deadline it never meant. Only the test's own children are signalled."""

from __future__ import annotations

import contextlib
import os
import pathlib
import select
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import List, Optional, Tuple

import pytest
from tests.conftest import wait_until

from ftimer_server import FileTimerServer, Reaped, Rejected, RejectReason, SystemInspector

from .conftest import OwnChildrenSignaller, Recorder

# Arms over the FIFO or the socket, says so (with its pid: unshare forks it), and holds
# its block until told to go on.
WORKER = """
import os, sys
from ftimer_client import FileTimerClient, configure, expires
configure(FileTimerClient(sys.argv[1]))
with expires(after=float(sys.argv[2])):
    print("armed", os.getpid(), flush=True)
    sys.stdin.readline()
"""


# torch's client in a time namespace: a deadline on the wall clock, no start time.
TORCH_WORKER = """
import os, sys, time
from ftimer_protocol import TimerRequestV1, encode
fd = os.open(sys.argv[1], os.O_WRONLY)
deadline = time.time() + float(sys.argv[2])
os.write(fd, encode(TimerRequestV1(os.getpid(), "hung", deadline, signal=9)))
print("armed", os.getpid(), flush=True)
sys.stdin.readline()
"""

# torch's client holds a timer (600 s), then ftimer's arms one on its clocks.
TORCH_THEN_FTIMER = """
import os, sys, time
from ftimer_client import FileTimerClient, configure, expires
from ftimer_protocol import TimerRequestV1, encode
fd = os.open(sys.argv[1], os.O_WRONLY)
os.write(fd, encode(TimerRequestV1(os.getpid(), "torch", time.time() + 600, signal=9)))
configure(FileTimerClient(sys.argv[1]))
with expires(after=float(sys.argv[2])):
    print("armed", os.getpid(), flush=True)
    sys.stdin.readline()
"""

# Forks a child that unshares a time namespace for its children (it stays in this one);
# then unshares another for its own children: the children of no process get the
# child's namespace any more, and /proc shows its offsets nowhere.
ORPHANED = """
import ctypes, os, sys
unshare = ctypes.CDLL(None, use_errno=True).unshare
ready, done = os.pipe(), os.pipe()
child = os.fork()
if child == 0:
    assert unshare(0x80) == 0  # CLONE_NEWTIME
    os.write(ready[1], b"x")
    os.read(done[0], 1)
    os._exit(0)
os.read(ready[0], 1)
assert unshare(0x80) == 0
print("ready", child, flush=True)
sys.stdin.readline()
os.write(done[1], b"x")
os.waitpid(child, 0)
"""

# Unshares a time namespace for its children alone (it stays in its own), with the
# offsets argv[1] gives them.
LEFT_BEHIND = """
import ctypes, os, sys
assert ctypes.CDLL(None, use_errno=True).unshare(0x80) == 0  # CLONE_NEWTIME
with open("/proc/self/timens_offsets", "w") as f:
    f.write(sys.argv[1])
print("ready", os.getpid(), flush=True)
sys.stdin.readline()
"""


#: How far a namespace's CLOCK_MONOTONIC is set behind the server's: 5,000 s, less on a
#: machine booted since (the kernel refuses an offset that makes a clock negative).
BEHIND = min(5000, int(time.monotonic()) - 30)


def _why_no_time_namespaces() -> str:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return "needs root and unshare(1)"
    if BEHIND < 200:
        return f"booted {time.monotonic():.0f} s ago: no clock can be set 200 s behind it yet"
    probe = subprocess.run(
        ["unshare", "--time", "--monotonic", "1", "--fork", "true"], capture_output=True
    )
    return "" if probe.returncode == 0 else f"no time namespaces here: {probe.stderr!r}"


_WHY_NOT = _why_no_time_namespaces()
pytestmark = pytest.mark.skipif(bool(_WHY_NOT), reason=_WHY_NOT)


def _worker(
    path: str, offsets: List[str], after: float, script: str = WORKER
) -> Tuple[subprocess.Popen[str], int]:
    """Start a worker in a new time namespace; return unshare's process and the worker's
    pid, once it has armed."""
    argv = [sys.executable, "-c", script, path, str(after)]
    child = subprocess.Popen(
        ["unshare", "--time", *offsets, "--fork", "--kill-child", *argv],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None
    said, pid = child.stdout.readline().split()
    assert said == "armed"
    return child, int(pid)


@pytest.mark.parametrize("transport", ["fifo", "socket"])
@pytest.mark.parametrize(
    ("offsets", "apart"),
    [
        (["--monotonic", f"-{BEHIND}"], f"CLOCK_MONOTONIC -{BEHIND} s"),
        (
            ["--monotonic", "5000", "--boottime", "7"],
            "CLOCK_MONOTONIC +5000 s, CLOCK_BOOTTIME +7 s",
        ),
    ],
)
def test_a_worker_on_other_clocks_is_refused_and_lives(
    fifo_path: pathlib.Path, transport: str, offsets: List[str], apart: str
) -> None:
    events = Recorder()
    socket_path = str(fifo_path.with_suffix(".socket"))
    with FileTimerServer(
        fifo_path, on_event=events, signaller=OwnChildrenSignaller(), socket_path=socket_path
    ) as server:
        path = socket_path if transport == "socket" else str(fifo_path)
        worker, _ = _worker(path, offsets, 60)
        # Its arm (BEHIND s past on the server's clock, with the first offsets) was judged.
        wait_until(lambda: events.of(Rejected) or events.of(Reaped), what="the arm judged")
        server.sync()
        assert events.of(Reaped) == []
        assert worker.poll() is None
        assert server.armed() == []
        [rejected] = events.of(Rejected)
        assert isinstance(rejected, Rejected)
        assert rejected.reason is RejectReason.OTHER_CLOCK
        assert rejected.detail.startswith(f"{apart} from the server's")
        assert worker.communicate("go on\n", timeout=10) == ("", None)
        assert worker.returncode == 0


def test_a_time_namespace_with_the_servers_offsets_is_one_clock(
    fifo_path: pathlib.Path,
) -> None:
    events = Recorder()
    with FileTimerServer(fifo_path, on_event=events, signaller=OwnChildrenSignaller()):
        unshare, pid = _worker(str(fifo_path), [], 0.2)  # a new namespace, no offsets
        with unshare:
            [reaped] = wait_until(lambda: events.of(Reaped), what="the reap")
    assert isinstance(reaped, Reaped)
    assert (reaped.pid, reaped.delivered) == (pid, True)  # at its deadline, as any worker
    assert events.of(Rejected) == []


def test_torch_s_wall_clock_deadline_is_kept_in_a_time_namespace(
    fifo_path: pathlib.Path,
) -> None:
    events = Recorder()
    with FileTimerServer(fifo_path, on_event=events, signaller=OwnChildrenSignaller()):
        offsets = ["--monotonic", f"-{BEHIND}", "--boottime", "7"]
        unshare, pid = _worker(str(fifo_path), offsets, 0.2, TORCH_WORKER)
        with unshare:
            [reaped] = wait_until(lambda: events.of(Reaped), what="the reap")
    assert isinstance(reaped, Reaped)
    assert (reaped.pid, reaped.delivered) == (pid, True)
    assert events.of(Rejected) == []


def test_a_worker_bound_for_torch_s_timers_cannot_arm_on_its_clocks(
    fifo_path: pathlib.Path,
) -> None:
    events = Recorder()
    with FileTimerServer(fifo_path, on_event=events, signaller=OwnChildrenSignaller()) as server:
        worker, _ = _worker(str(fifo_path), ["--monotonic", f"-{BEHIND}"], 60, TORCH_THEN_FTIMER)
        server.sync()
        assert events.of(Reaped) == []
        assert [t.scope_id for t in server.armed()] == ["torch"]
        [rejected] = events.of(Rejected)
        assert isinstance(rejected, Rejected)
        assert rejected.reason is RejectReason.OTHER_CLOCK
        assert worker.communicate("\n", timeout=10) == ("", None)
    assert worker.returncode == 0


@pytest.mark.skipif(shutil.which("nsenter") is None, reason="needs nsenter(1)")
def test_a_sender_on_other_clocks_cannot_arm_for_its_parent(fifo_path: pathlib.Path) -> None:
    # A shell's `ftimer arm` names the shell (its parent) by a pidfd: the deadline is
    # the sender's reading, BEHIND s behind the server's clock, while the shell is not.
    events = Recorder()
    socket_path = str(fifo_path.with_suffix(".socket"))
    arm = [sys.executable, "-m", "ftimer_client", "arm", "--socket", socket_path]
    with (
        FileTimerServer(
            fifo_path, on_event=events, signaller=OwnChildrenSignaller(), socket_path=socket_path
        ),
        _in_time_namespace(["--monotonic", f"-{BEHIND}"]) as holder,
    ):
        nsenter = ["nsenter", "-t", str(holder), "--time", *arm, "--scope", "s", "--after", "60"]
        script = f'{shlex.join(nsenter)}; echo "armed $?"; read'
        with subprocess.Popen(
            ["bash", "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        ) as shell:
            assert shell.stdout is not None
            assert shell.stdout.readline() == "armed 0\n"  # judged: the receipt came
            assert events.of(Reaped) == []
            assert shell.poll() is None
            assert shell.communicate("\n", timeout=10)[0] == ""
        assert shell.returncode == 0
    [rejected] = events.of(Rejected)
    assert isinstance(rejected, Rejected)
    assert rejected.reason is RejectReason.OTHER_CLOCK
    assert rejected.detail.startswith(f"the sender's clocks: CLOCK_MONOTONIC -{BEHIND} s from the")


class _SenderExitsAsItsClocksAreRead(SystemInspector):
    """Kills a child of ``shell`` as its clocks are read (the shell's ``ftimer arm``,
    over the socket), and reads it as if its files were gone: on the server's clocks."""

    def __init__(self) -> None:
        super().__init__()
        self.shell = -1

    def clock_offsets(self, pid: int) -> Optional[Tuple[int, int]]:
        if self.parent(pid) != self.shell:
            return super().clock_offsets(pid)
        pidfd = os.pidfd_open(pid)
        try:
            os.kill(pid, signal.SIGKILL)  # a process this test started
            select.select([pidfd], [], [])
        finally:
            os.close(pidfd)
        return (0, 0)


def test_a_sender_that_exits_as_its_clocks_are_read_is_gone(fifo_path: pathlib.Path) -> None:
    events = Recorder()
    inspector = _SenderExitsAsItsClocksAreRead()
    socket_path = str(fifo_path.with_suffix(".socket"))
    arm = [sys.executable, "-m", "ftimer_client", "arm", "--socket", socket_path]
    script = f'read; {shlex.join([*arm, "--scope", "s", "--after", "60"])}; echo "armed $?"; read'
    with (
        FileTimerServer(
            fifo_path,
            on_event=events,
            inspector=inspector,
            signaller=OwnChildrenSignaller(),
            socket_path=socket_path,
        ) as server,
        subprocess.Popen(
            ["bash", "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        ) as shell,
    ):
        if not server.socket.passes_pidfds:  # type: ignore[union-attr]
            pytest.skip("the kernel gives no pidfd of a sender (SO_PASSPIDFD, Linux 6.5)")
        inspector.shell = shell.pid
        assert shell.stdin is not None
        assert shell.stdout is not None
        shell.stdin.write("\n")  # now: arm
        shell.stdin.flush()
        assert shell.stdout.readline() == "armed 137\n"  # killed as its clocks were read
        wait_until(lambda: events.of(Rejected), what="the refusal")
        assert server.armed() == []
        shell.communicate("\n", timeout=10)
    [rejected] = events.of(Rejected)
    assert isinstance(rejected, Rejected)
    assert rejected.reason is RejectReason.SENDER_GONE


@pytest.mark.parametrize(
    ("namespace", "children", "expected"),
    [
        ([], "monotonic -100 0", (0, 0)),  # its own clocks are the server's
        # Its own offsets, as /proc shows them for its parent's children (unshare's).
        (
            ["unshare", "--time", "--monotonic", f"-{BEHIND}", "--fork"],
            "monotonic 0 0",
            (-BEHIND * 10**9, 0),
        ),
    ],
)
def test_a_process_that_unshared_for_its_children_is_judged_by_its_own_clocks(
    namespace: List[str], children: str, expected: Optional[Tuple[int, int]]
) -> None:
    # /proc/PID/timens_offsets shows the namespace its children get, not its own.
    with subprocess.Popen(
        [*namespace, sys.executable, "-c", LEFT_BEHIND, children],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    ) as process:
        assert process.stdout is not None
        pid = int(process.stdout.readline().split()[1])
        assert SystemInspector().clock_offsets(pid) == expected
        process.communicate("\n", timeout=10)


def test_a_process_whose_own_clocks_no_file_shows_is_on_unknown_clocks() -> None:
    argv = ["unshare", "--time", "--monotonic", f"-{BEHIND}", "--fork", sys.executable]
    with subprocess.Popen(
        [*argv, "-c", ORPHANED], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    ) as process:
        assert process.stdout is not None
        pid = int(process.stdout.readline().split()[1])
        assert SystemInspector().clock_offsets(pid) is None
        process.communicate("\n", timeout=10)
    assert process.returncode == 0


def test_the_clocks_of_a_process_gone_are_no_process_s() -> None:
    # Its files gone, they read as the server's clocks: a sender that exited as its
    # clocks were read was taken as on them.
    gone = subprocess.Popen(["true"])
    gone.wait()
    with pytest.raises(ProcessLookupError):
        SystemInspector().clock_offsets(gone.pid)


def test_the_inspector_reads_a_process_s_clock_offsets() -> None:
    with _in_time_namespace(["--monotonic", f"-{BEHIND}", "--boottime", "7"]) as sleeper:
        assert SystemInspector().clock_offsets(sleeper) == (-BEHIND * 10**9, 7 * 10**9)
    assert SystemInspector().clock_offsets(os.getpid()) == (0, 0)


@contextlib.contextmanager
def _in_time_namespace(offsets: List[str]) -> Iterator[int]:
    """A process sleeping in a new time namespace with ``offsets``: its pid."""
    child = subprocess.Popen(
        ["unshare", "--time", *offsets, "--fork", "--kill-child", "sleep", "60"]
    )
    try:
        # unshare forks its command into the namespace: wait until it has.
        yield wait_until(lambda: _children(child.pid), what="the command forked")[0]
    finally:
        child.kill()
        child.wait()


def _children(pid: int) -> List[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(p) for p in f.read().split()]
