"""Helpers for the server tests: fake processes, real children, FIFO writers."""

from __future__ import annotations

import contextlib
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import types
from collections.abc import Iterator
from typing import Any, Callable, Dict, List, Optional, Tuple

import pytest
from tests.conftest import children_of, wait_until

from ftimer_protocol import Message, encode, parse_proc_stat
from ftimer_server import Descendant, Event, OsSignaller, ProcessInspector, Worker
from ftimer_server.incidents._procfs import pidfd_pid
from ftimer_server.server._sockdiag import peer_of

#: The first pid of pretend workers served by a real server: above Linux's highest pid_max
#: (PID_MAX_LIMIT, 2**22), so never a real process. A real server refuses its own pid and
#: its helper's, so pretend pids that could be real (2000 on a freshly booted machine) met
#: the test process's now and then, and an arm was refused.
FAKE_PID = 2**22 + 1


def _kernel_names_peers() -> bool:
    """Whether the kernel names an AF_UNIX socket's peer (``sock_diag`` with
    ``unix_diag``, netlink allowed), which the checks of a kept socket ask."""
    ends = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    with ends[0], ends[1]:
        try:
            return peer_of(ends[0].fileno()) == os.fstat(ends[1].fileno()).st_ino
        except OSError:
            return False


#: For tests of the kernel's answer itself (the server falls back to a socket's name
#: where it has none, tested apart).
needs_unix_diag = pytest.mark.skipif(
    not _kernel_names_peers(),
    reason="the kernel does not name a socket's peer (no unix_diag, or netlink refused)",
)


class OwnChildrenSignaller(OsSignaller):
    """Signals real processes, but only descendants of the test's own process (the
    server's too, when it is embedded): any other request is kept in ``refused`` and
    fails as a signal not permitted. For a server that reaps the test's workers and is
    sent hostile pids as well: were its checks to let one through, nothing else is
    signalled."""

    def __init__(self) -> None:
        super().__init__()
        self.refused: List[Tuple[int, int]] = []

    def send(self, worker: Worker, signal: int) -> bool:
        self._own(worker, signal)
        return super().send(worker, signal)

    def send_tree(self, worker: Worker, signal: int) -> List[Descendant]:
        try:
            self._own(worker, signal)
        except PermissionError:
            return []
        return super().send_tree(worker, signal)

    def _own(self, worker: Worker, signal: int) -> None:
        pid = worker.pid
        while pid > 1 and pid != os.getpid():
            try:
                with open(f"/proc/{pid}/stat", "rb") as f:
                    pid = parse_proc_stat(f.read()).ppid
            except (OSError, ValueError):
                break
        if pid != os.getpid() or worker.pid == pid:
            self.refused.append((worker.pid, signal))
            raise PermissionError(f"a test signals only its descendants, not pid {worker.pid}")


class FakeProcess:
    def __init__(
        self,
        start_time: int,
        parent: int = 1,
        uid: int = 1000,
        clocks: Optional[Tuple[int, int]] = (0, 0),
    ) -> None:
        self.start_time = start_time
        self.parent = parent
        self.uid = uid
        self.clocks = clocks


class FakeInspector(ProcessInspector):
    """A host made of dicts. ``auto`` makes every pid in the range exist (start time =
    pid), for thousands of pretend workers."""

    def __init__(self, auto: Optional[range] = None) -> None:
        self.processes: Dict[int, FakeProcess] = {}
        self.auto = auto

    def spawn(
        self,
        pid: int,
        start_time: int = 100,
        parent: int = 1,
        uid: int = 1000,
        clocks: Optional[Tuple[int, int]] = (0, 0),
    ) -> None:
        self.processes[pid] = FakeProcess(start_time, parent, uid, clocks)

    def exit(self, pid: int) -> None:
        del self.processes[pid]

    def _get(self, pid: int) -> FakeProcess:
        if pid not in self.processes and self.auto is not None and pid in self.auto:
            self.processes[pid] = FakeProcess(pid)
        try:
            return self.processes[pid]
        except KeyError:
            raise ProcessLookupError(pid) from None

    def start_time(self, pid: int) -> Optional[int]:
        return self._get(pid).start_time

    def parent(self, pid: int) -> int:
        return self._get(pid).parent

    def uid(self, pid: int) -> int:
        return self._get(pid).uid

    def clock_offsets(self, pid: int) -> Optional[Tuple[int, int]]:
        return self._get(pid).clocks


class Recorder:
    """Collects events; thread-safe enough for list.append under the GIL."""

    def __init__(self) -> None:
        self.events: List[Event] = []

    def __call__(self, event: Event) -> None:
        self.events.append(event)

    def of(self, kind: type) -> List[Event]:
        return [e for e in self.events if isinstance(e, kind)]


def proc_start_time(pid: int) -> int:
    data = pathlib.Path(f"/proc/{pid}/stat").read_bytes()
    return int(data[data.rindex(b")") + 2 :].split()[19])


def send(path: os.PathLike[str], *messages: Message, raw: bytes = b"") -> None:
    """Open the FIFO, write each message in one write (torch's open/write/close)."""
    fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
    try:
        if raw:
            os.write(fd, raw)
        for m in messages:
            os.write(fd, encode(m))
    finally:
        os.close(fd)


def is_open(fd: int) -> bool:
    """Whether descriptor ``fd`` is open in this process."""
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def pidfds_of(pid: int) -> int:
    """How many of this process's descriptors are pidfds of ``pid``."""
    return sum(pidfd_pid(int(fd)) == pid for fd in os.listdir("/proc/self/fd"))


def wait_exit(child: subprocess.Popen[bytes], timeout: float = 10.0) -> tuple[int, float]:
    """Wait for a child through its pidfd; return (returncode, monotonic time of death)."""
    pidfd = os.pidfd_open(child.pid)
    try:
        import select

        poller = select.poll()
        poller.register(pidfd, select.POLLIN)
        if not poller.poll(timeout * 1000):
            raise AssertionError(f"child {child.pid} still alive after {timeout} s")
        died = time.monotonic()
    finally:
        os.close(pidfd)
    return child.wait(), died


@pytest.fixture
def children() -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    """Spawn real child processes (``sleep`` by default); all are killed at the end."""
    spawned: List[subprocess.Popen[bytes]] = []

    def spawn(*argv: str, **options: Any) -> subprocess.Popen[bytes]:
        child = subprocess.Popen(list(argv) or ["sleep", "60"], **options)
        spawned.append(child)
        return child

    yield spawn
    for child in spawned:
        if child.poll() is None:
            child.send_signal(signal.SIGKILL)
        child.wait()


#: A child that ignores SIGTERM, says so on stdout, then sleeps: for escalation tests.
STUBBORN = [
    sys.executable,
    "-c",
    "import signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
    "print('ready', flush=True); time.sleep(60)",
]

#: A child that cleans up on SIGTERM: prints a marker and exits with status 42.
GRACEFUL = [
    sys.executable,
    "-c",
    "import signal, sys, time\n"
    "def bye(*_):\n    print('cleaned up', flush=True)\n    sys.exit(42)\n"
    "signal.signal(signal.SIGTERM, bye); print('ready', flush=True); time.sleep(60)",
]


def fake_worker(pid: int, start_time: Optional[int] = 100) -> Worker:
    return Worker(pid, start_time)


@contextlib.contextmanager
def ready_child(argv: List[str]) -> Iterator[subprocess.Popen[bytes]]:
    """A child that prints "ready" once set up; killed and reaped on the way out."""
    child = subprocess.Popen(argv, stdout=subprocess.PIPE)
    try:
        assert child.stdout is not None
        assert child.stdout.readline() == b"ready\n"
        yield child
    finally:
        if child.poll() is None:
            child.kill()
        child.wait()
        assert child.stdout is not None
        child.stdout.close()


#: An unprivileged uid and gid (nobody), for what only root may do (give a file a group
#: the user is not in).
NOBODY = 65534


#: A command's prefix that runs it as uid and gid ``NOBODY``, no supplementary groups.
AS_NOBODY = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]


def need_nobody() -> None:
    """Skip unless this is root with ``setpriv`` and uid ``NOBODY`` can run this Python
    (pyenv's, under root's home, it may not)."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to run a process as an unprivileged user")
    probe = run_as_nobody("import ftimer_server")
    if probe.returncode != 0:
        pytest.skip(f"uid {NOBODY} cannot run {sys.executable}: {probe.stderr.strip()}")


@pytest.fixture
def nobody_dir() -> Iterator[pathlib.Path]:
    """A private directory of uid ``NOBODY`` (short: socket paths are limited); skips
    unless this is root with ``setpriv`` and that uid can run this Python."""
    need_nobody()
    d = pathlib.Path(tempfile.mkdtemp(prefix="ftu-"))
    os.chown(d, NOBODY, NOBODY)
    os.chmod(d, 0o700)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def run_as_nobody(script: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run ``script`` in this Python as uid and gid ``NOBODY``, no supplementary groups."""
    return subprocess.run(
        [*AS_NOBODY, sys.executable, "-c", script, *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def on_thread_start(
    monkeypatch: pytest.MonkeyPatch, module: Any, before: Callable[[threading.Thread], None]
) -> None:
    """Make the threads ``module`` starts call ``before(thread)`` first: to see them, or
    to raise as ``start()`` does with no thread to be had (systemd's TasksMax)."""

    class Thread(threading.Thread):
        def start(self) -> None:
            before(self)
            super().start()

    fake = types.SimpleNamespace(**{**vars(threading), "Thread": Thread})
    monkeypatch.setattr(module, "threading", fake)


#: A parent held in uninterruptible sleep (D state) while its vfork()ed child waits on
#: stdin: a thread no stop signal reaches, as one on a hung mount, that ends at will.
VFORK = r"""
#include <unistd.h>
int main(void) {
    if (vfork() == 0) { char c; read(0, &c, 1); _exit(0); }
    return 0;
}
"""


def compiled(factory: pytest.TempPathFactory, name: str, source: str, *flags: str) -> str:
    """The path of C ``source`` compiled as ``name``; skips where there is no compiler."""
    if shutil.which("cc") is None:
        pytest.skip("needs a C compiler (cc) for a process in uninterruptible sleep")
    directory = factory.mktemp(name)
    (directory / f"{name}.c").write_text(source)
    program = str(directory / name)
    subprocess.run(["cc", *flags, "-o", program, str(directory / f"{name}.c")], check=True)
    return program


@pytest.fixture(scope="session")
def vfork_program(tmp_path_factory: pytest.TempPathFactory) -> str:
    """``VFORK`` compiled; skips where there is no C compiler."""
    return compiled(tmp_path_factory, "vfork", VFORK)


@contextlib.contextmanager
def held_in_d(program: str) -> Iterator[subprocess.Popen[bytes]]:
    """Run ``vfork_program`` until its parent is in D; end it after (by closing the
    child's stdin: no signal)."""
    with subprocess.Popen([program], stdin=subprocess.PIPE) as held:
        assert held.stdin is not None
        try:
            wait_until(lambda: _state(held.pid) == "D", what="the vfork()ing parent in D")
            yield held
        finally:
            held.stdin.close()
        assert held.wait(10) == 0


def _state(pid: int) -> str:
    with open(f"/proc/{pid}/stat", "rb") as f:
        return parse_proc_stat(f.read()).state


#: For tests that need a private PID namespace of their own.
namespaces = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("unshare") is None,
    reason="needs root and unshare(1) for a private PID namespace",
)


@contextlib.contextmanager
def namespace_init(script: str) -> Iterator[Tuple[int, int]]:
    """pid 1 of a new PID namespace running Python ``script``, once it printed "ready":
    its pid (as this namespace sees it) and a pidfd of it. Killed (SIGKILL, which the
    kernel forces through from here) at the end."""
    outer = subprocess.Popen(
        ["unshare", "--pid", "--fork", sys.executable, "-c", script], stdout=subprocess.PIPE
    )
    pidfds: List[int] = []
    try:
        assert outer.stdout is not None
        assert outer.stdout.readline() == b"ready\n"
        [init] = wait_until(lambda: children_of(outer.pid), what="the namespace's init")
        pidfds.append(os.pidfd_open(init))
        yield init, pidfds[0]
    finally:
        for fd in pidfds:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(fd, signal.SIGKILL)
            os.close(fd)
        outer.wait(30)
        if outer.stdout is not None:
            outer.stdout.close()
