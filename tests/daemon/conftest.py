"""Running the real ``ftimer-server`` CLI in subprocesses, and workers that arm timers.

Every wait is on something explicit: readiness arrives as READY=1 on a datagram socket the
test owns (systemd's protocol), log lines are polled with a deadline, workers are waited
for by pid. Only processes a test starts are ever signalled: the daemon under test only
hears from the test's own workers.
"""

from __future__ import annotations

import json
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
from collections.abc import Iterator
from typing import Any, Callable, Dict, List, Optional, Tuple, TypeVar, Union

import pytest
from tests.conftest import wait_until

from ftimer_server.daemon._control import query_status

PYTHON = sys.executable
#: How long a test waits for something that normally takes milliseconds.
PATIENCE = 15.0

WORKER = """
import signal as sig, sys, time
from ftimer_client import FileTimerClient
fifo, scope, after, hang = sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4])
signal, on_term = int(sys.argv[5]), sys.argv[6]
if on_term == "ignore":
    sig.signal(sig.SIGTERM, sig.SIG_IGN)
elif on_term == "exit":
    def bye(*_):
        print("cleaned up", flush=True)
        sys.exit(42)
    sig.signal(sig.SIGTERM, bye)
client = FileTimerClient(fifo, labels={"test": "daemon"}, signal=signal)
client.arm(scope, after)
print("armed", flush=True)
time.sleep(hang)
client.release(scope)
"""


def kill_and_close(proc: subprocess.Popen[str]) -> None:
    """Kill ``proc`` if it still runs, reap it, and close its pipes."""
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    for stream in (proc.stdout, proc.stderr):
        if stream is not None:
            stream.close()


class Notifications:
    """An AF_UNIX datagram socket standing in for systemd's NOTIFY_SOCKET."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        self.received: List[str] = []

    def has(self, line: str) -> bool:
        return any(line in n.split("\n") for n in self.received)

    def receive(self, timeout: float) -> bool:
        """Wait up to ``timeout`` for one notification (0: none); return whether one
        came. Descriptors given with it (for systemd's store, ``FDSTORE=1``) are closed,
        as they are for a service without a store."""
        self.sock.settimeout(timeout if timeout > 0 else None)
        if timeout <= 0:
            self.sock.setblocking(False)
        try:
            data, ancillary, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(4 * 16))
        except (socket.timeout, BlockingIOError):
            return False
        for level, kind, fds in ancillary:
            if (level, kind) == (socket.SOL_SOCKET, socket.SCM_RIGHTS):
                for i in range(0, len(fds) - len(fds) % 4, 4):
                    os.close(int.from_bytes(fds[i : i + 4], sys.byteorder))
        self.received.append(data.decode())
        return True

    def drain(self) -> None:
        """Receive what was sent and not received yet (as systemd does at once): the
        descriptors in flight in it would keep a daemon's socket bound after its exit."""
        while self.receive(0):
            pass

    def wait_for(
        self, line: str, timeout: float = PATIENCE, alive: Callable[[], bool] = lambda: True
    ) -> List[str]:
        """Receive notifications until one has ``line``; return all received so far.

        Fails after ``timeout``, or as soon as ``alive()`` turns false.
        """
        deadline = time.monotonic() + timeout
        while not self.has(line):
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not alive():
                pytest.fail(f"no {line} within {timeout} s; got {self.received}")
            self.receive(min(remaining, 0.1))
        return self.received

    def close(self) -> None:
        self.sock.close()


T = TypeVar("T")


def unblocked(
    call: Callable[[], T], path: pathlib.Path, *, writing: bool = False
) -> Union[T, BaseException]:
    """``call()``'s result, or what it raised, run in a thread: if it blocks in opening
    ``path`` (a FIFO) to read (to write, with ``writing``), a peer opening the other end
    lets it go and the test fails instead of hanging."""
    outcome: List[Union[T, BaseException]] = []

    def run() -> None:
        try:
            outcome.append(call())
        except BaseException as e:
            outcome.append(e)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(PATIENCE)
    if thread.is_alive():  # blocked in open(): the other end lets it go, then fail
        peer = os.open(path, (os.O_RDONLY if writing else os.O_WRONLY) | os.O_NONBLOCK)
        thread.join(PATIENCE)
        os.close(peer)
        pytest.fail(f"opening {path} blocked")
    return outcome[0]


class DaemonProcess:
    """One ``ftimer-server run`` in a subprocess, logging JSON lines to a file."""

    def __init__(
        self,
        directory: pathlib.Path,
        args: List[str],
        env: Optional[Dict[str, str]] = None,
        command: Optional[List[str]] = None,
        name: str = "d",
        *,
        session: bool = False,
        pass_fds: Tuple[int, ...] = (),
    ) -> None:
        self.dir = directory
        self.fifo = directory / "timer.fifo"
        self.log = directory / f"{name}.log"
        self.notify = Notifications(str(directory / f"{name}.notify"))
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("WATCHDOG_")}
        full_env.update({"NOTIFY_SOCKET": self.notify.path, **(env or {})})
        command = command or [PYTHON, "-m", "ftimer_server"]
        self.args = [
            *command,
            "run",
            "--fifo",
            str(self.fifo),
            "--log-format",
            "json",
            "--log-level",
            "debug",
            "--log-file",
            str(self.log),
            *args,
        ]
        self.proc = subprocess.Popen(
            self.args,
            env=full_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=session,  # a process group of its own, as at a terminal
            pass_fds=pass_fds,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def ready(self) -> DaemonProcess:
        """Wait for READY=1 (fails early, with its stderr, if the daemon exits instead)."""
        try:
            self.notify.wait_for("READY=1", alive=lambda: self.proc.poll() is None)
        except pytest.fail.Exception:
            self.cleanup()
            assert self.proc.stderr is not None
            print(f"daemon exit code {self.proc.returncode}; log: {self.records()}")
            raise
        return self

    def records(self) -> List[Dict[str, Any]]:
        """The JSON log lines written so far, whole: a long line (an incident's) may be
        read half-written, its file's buffer flushed in the middle of it."""
        try:
            text = self.log.read_text()
        except FileNotFoundError:
            return []
        whole = text.split("\n")[:-1]  # what follows the last newline is not a line yet
        return [json.loads(line) for line in whole if line.strip()]

    def wait_for_record(
        self,
        timeout: float = PATIENCE,
        where: Callable[[Dict[str, Any]], bool] = lambda r: True,
        **match: Any,
    ) -> Dict[str, Any]:
        """Wait for a log record whose fields include ``match`` and that passes ``where``."""

        def find() -> Optional[Dict[str, Any]]:
            for r in self.records():
                if all(r.get(k) == v for k, v in match.items()) and where(r):
                    return r
            return None

        found: Dict[str, Any] = wait_until(find, timeout, what=f"a log record {match}")
        return found

    def status(self) -> Dict[str, Any]:
        return query_status(str(self.fifo) + ".sock")

    def armed_scopes(self) -> List[str]:
        return sorted(t["scope_id"] for t in self.status()["timers"])

    def stop(self, sig: int = signal.SIGTERM, timeout: float = PATIENCE) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout)

    def cleanup(self) -> None:
        kill_and_close(self.proc)
        self.notify.close()


class Worker:
    """A worker process that arms one timer through ftimer_client, then hangs.

    ``on_term``: what it does on SIGTERM: "default" (dies), "ignore", or "exit" (prints
    "cleaned up" and exits with status 42).
    """

    def __init__(
        self,
        fifo: pathlib.Path,
        scope: str,
        after: float,
        hang: float,
        signal: int = 9,
        *,
        on_term: str = "default",
    ) -> None:
        argv = [str(fifo), scope, str(after), str(hang), str(signal), on_term]
        self.proc = subprocess.Popen(
            [PYTHON, "-c", WORKER, *argv],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if line != "armed\n":
            self.proc.wait(5)
            pytest.fail(f"worker failed to arm: {line!r} {self.proc.stderr.read()}")  # type: ignore[union-attr]

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait(self, timeout: float = PATIENCE) -> int:
        return self.proc.wait(timeout)

    def cleanup(self) -> None:
        kill_and_close(self.proc)


@pytest.fixture
def text_log() -> Iterator[Any]:
    """The daemon's text log handler, installed for one test and removed after it (left
    installed, it wrote every later test's lines to stderr)."""
    from ftimer_server.daemon._logging import LoggingSetup

    setup = LoggingSetup("text", "info")
    try:
        yield setup
    finally:
        setup.close()


@pytest.fixture
def short_dir() -> Iterator[pathlib.Path]:
    """A private temporary directory with a short path (AF_UNIX paths are limited)."""
    d = tempfile.mkdtemp(prefix="ftd-")
    os.chmod(d, 0o700)
    yield pathlib.Path(d)
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def spawn(short_dir: pathlib.Path) -> Iterator[Callable[..., DaemonProcess]]:
    """Start daemons in ``short_dir``; every one still running at the end is killed."""
    started: List[DaemonProcess] = []

    def start(*args: str, **kwargs: Any) -> DaemonProcess:
        for earlier in started:
            earlier.notify.drain()
        d = DaemonProcess(short_dir, list(args), **kwargs)
        started.append(d)
        return d

    yield start
    for d in started:
        d.cleanup()


@pytest.fixture
def worker() -> Iterator[Callable[..., Worker]]:
    """Start workers; every one still running at the end is killed."""
    started: List[Worker] = []

    def start(*args: Any, **kwargs: Any) -> Worker:
        w = Worker(*args, **kwargs)
        started.append(w)
        return w

    yield start
    for w in started:
        w.cleanup()


def plant_lock(lock: pathlib.Path, kind: str) -> str:
    """Put at ``lock`` what a lock file must not be (``kind``: "symlink", to the file
    ``target`` it makes beside it, "FIFO", "directory", "another user's file"); return
    how the refusal names it. ``target`` holds "precious", whatever the kind."""
    target = lock.with_name("target")
    target.write_text("precious")
    if kind == "symlink":
        lock.symlink_to(target)
        return "a symlink"
    if kind == "FIFO":
        os.mkfifo(lock, 0o600)
        return "a FIFO"
    if kind == "directory":
        lock.mkdir()
        return "a directory"
    if os.geteuid() != 0:
        pytest.skip("needs root to make a file owned by another user")
    lock.write_bytes(b"")
    os.chown(lock, 65534, 65534)
    return "owned by uid 65534, not us"


# Arms one timer, then releases it when told; writes nothing else (a quiet worker).
QUIET = """
import sys
from ftimer_client import FileTimerClient
client = FileTimerClient(sys.argv[1], on_unavailable="warn")
client.arm("step", float(sys.argv[2]))
print("armed", flush=True)
for line in sys.stdin:
    client.release("step")
    print("released", flush=True)
"""


@pytest.fixture
def quiet() -> Iterator[Callable[[pathlib.Path, float], subprocess.Popen[str]]]:
    """Start quiet workers on a FIFO or socket path, armed for the seconds given; every
    one still running at the end is killed."""
    started: list[subprocess.Popen[str]] = []

    def start(fifo: pathlib.Path, after: float) -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            [PYTHON, "-c", QUIET, str(fifo), str(after)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        started.append(proc)
        assert proc.stdout is not None
        assert proc.stdout.readline() == "armed\n"
        return proc

    yield start
    for proc in started:
        assert proc.stdin is not None
        proc.stdin.close()
        kill_and_close(proc)


def release(proc: subprocess.Popen[str]) -> None:
    """Have a quiet worker release its timer, and wait until it did."""
    assert proc.stdin is not None
    assert proc.stdout is not None
    proc.stdin.write("release\n")
    proc.stdin.flush()
    assert proc.stdout.readline() == "released\n"
