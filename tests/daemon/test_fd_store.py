"""systemd's file descriptor store holds the FIFO and the socket open from one daemon to
the next: a line or a datagram a worker wrote while the daemon was stalled, then killed,
is read by the next daemon. torch's clients, and ftimer's with protocol 1, hold the FIFO
open only while they write a line, and a pipe's unread lines die with its last
descriptor; a socket's queued datagrams die with it."""

from __future__ import annotations

import array
import functools
import os
import pathlib
import signal
import socket
import subprocess
from collections.abc import Iterator
from typing import Any, Callable, Dict, List, Tuple

import pytest
from tests.conftest import wait_until
from tests.server.conftest import needs_unix_diag

from ftimer_server.daemon._systemd import stored_fds
from ftimer_server.server import _socket as socket_module

from .conftest import PATIENCE, PYTHON, DaemonProcess, kill_and_close, release
from .test_durability import saved_scopes

# Arms one timer in torch's protocol (a descriptor per line), releases it when told.
TORCH_STYLE = """
import sys, time
from ftimer_client import FileTimerClient
client = FileTimerClient(sys.argv[1], protocol=1)
client.acquire("step", time.time() + float(sys.argv[2]))
print("armed", flush=True)
sys.stdin.readline()
client.release("step")
print("released", flush=True)
sys.stdin.readline()
"""


# As systemd starts a service with the descriptors of its store: argv[1] is "name=fd,..."
# (each moved to 3 on, $LISTEN_* saying so), the rest the daemon's arguments.
WITH_STORED = """
import fcntl, os, sys
names, fds = zip(*(item.split("=") for item in sys.argv[1].split(",")))
moved = [fcntl.fcntl(int(fd), fcntl.F_DUPFD_CLOEXEC, 100) for fd in fds]  # out of the way
for fd in fds:
    os.close(int(fd))
for n, fd in enumerate(moved):
    os.dup2(fd, 3 + n)  # inheritable: kept across the exec
os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS=str(len(fds)),
                  LISTEN_FDNAMES=":".join(names))
os.execv(sys.executable, [sys.executable, "-m", "ftimer_server", *sys.argv[2:]])
"""


#: The name the daemon gives systemd its socket under: with the queue length it was made
#: with (net.unix.max_dgram_qlen then, 10 unless raised).
SOCKET = f"socket-q{socket_module._queue_length()}"


class FdStore:
    """A NOTIFY_SOCKET that keeps the descriptors given to it by name, as systemd's
    file descriptor store does (``FDSTORE=1``, ``FDSTOREREMOVE=1``, ``FDNAME=``)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        self.sock.settimeout(0.1)
        self.held: Dict[str, List[int]] = {}
        self.received: List[Dict[str, str]] = []
        #: FileDescriptorStoreMax: past it, a descriptor given is closed, not held.
        self.limit = 2  # the example unit's (docs/examples/ftimer-server.service)

    def receive(self) -> bool:
        """Take one notification (waiting 0.1 s at most); return whether one came."""
        try:
            data, ancillary, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(4 * 16))
        except socket.timeout:
            return False
        fds = array.array("i")
        for level, kind, cdata in ancillary:
            if (level, kind) == (socket.SOL_SOCKET, socket.SCM_RIGHTS):
                fds.frombytes(cdata[: len(cdata) - len(cdata) % fds.itemsize])
        fields = dict(line.partition("=")[::2] for line in data.decode().split("\n"))
        self.received.append(fields)
        name = fields.get("FDNAME", "")
        if fields.get("FDSTOREREMOVE") == "1":
            for fd in self.held.pop(name, []):
                os.close(fd)
        if fields.get("FDSTORE") == "1":
            assert fields.get("FDPOLL") == "0"  # systemd would drop it while none reads
            held = self.held.setdefault(name, [])
            for fd in fds:  # one already held is kept once, as systemd keeps it
                full = sum(map(len, self.held.values())) >= self.limit
                if full or any(os.path.sameopenfile(fd, old) for old in held):
                    os.close(fd)
                else:
                    held.append(fd)
            if not held:
                del self.held[name]
        else:
            for fd in fds:
                os.close(fd)
        return True

    def drain(self) -> None:
        """Take what was notified and is not taken yet (a daemon that has exited)."""
        while self.receive():
            pass

    def wait_for(self, key: str, proc: subprocess.Popen[str]) -> None:
        def seen() -> bool:
            self.receive()
            assert proc.poll() is None, "the daemon exited"
            return any(key in fields for fields in self.received)

        wait_until(seen, PATIENCE, what=f"{key} notified")

    def passed(self) -> Dict[str, Any]:
        """What ``spawn`` needs to start a daemon with what the store holds, as systemd
        starts the service's next process (nothing when it holds nothing)."""
        held = [(name, fd) for name, fds in self.held.items() for fd in fds]
        if not held:
            return {}
        spec = ",".join(f"{name}={fd}" for name, fd in held)
        command = [PYTHON, "-c", WITH_STORED, spec]
        return {"command": command, "pass_fds": tuple(fd for _, fd in held)}

    def start(
        self, spawn: Callable[..., DaemonProcess], *args: str, **kwargs: Any
    ) -> DaemonProcess:
        """Start a daemon that notifies this store, with what it holds, and wait until
        it is ready."""
        self.received.clear()
        d = spawn(*args, env={"NOTIFY_SOCKET": self.path}, **self.passed(), **kwargs)
        self.wait_for("READY", d.proc)
        return d

    def close(self) -> None:
        for fds in self.held.values():
            for fd in fds:
                os.close(fd)
        self.sock.close()


@pytest.fixture
def store(short_dir: pathlib.Path) -> Iterator[FdStore]:
    s = FdStore(str(short_dir / "systemd.notify"))
    yield s
    s.close()


def test_a_line_left_unread_by_a_killed_daemon_is_read_by_the_next(
    spawn: Callable[..., DaemonProcess], short_dir: pathlib.Path, store: FdStore
) -> None:
    # The daemon stalled (stopped here) while a torch-style worker released its timer,
    # and was then killed, as systemd's watchdog kills a wedged daemon: the pipe went
    # with its last descriptor, the release with it, and the next daemon restored the
    # timer and reaped the worker that had released it.
    state = short_dir / "state.json"
    args = ["--state-file", str(state)]
    first = store.start(spawn, *args, name="first")
    [held] = store.held["fifo"]
    assert os.fstat(held).st_ino == first.fifo.stat().st_ino
    worker = subprocess.Popen(
        [PYTHON, "-c", TORCH_STYLE, str(first.fifo), "600"],  # the release is what counts
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert worker.stdout is not None
        assert worker.stdin is not None
        assert worker.stdout.readline() == "armed\n"
        wait_until(lambda: saved_scopes(state) == ["step"], what="the arm saved")
        os.kill(first.pid, signal.SIGSTOP)
        _, status = os.waitpid(first.pid, os.WUNTRACED)  # until it has stopped
        assert os.WIFSTOPPED(status)
        worker.stdin.write("\n")
        worker.stdin.flush()
        assert worker.stdout.readline() == "released\n"  # written, never read
        first.stop(signal.SIGKILL)
        second = store.start(spawn, *args, name="second")
        released = second.wait_for_record(where=lambda r: r.get("event") == "disarmed")
        assert (released["pid"], released["scope_id"]) == (worker.pid, "step")
        assert second.status()["timers"] == []
        assert worker.poll() is None
        # The store holds the FIFO the second daemon reads, once.
        [held] = store.held["fifo"]
        assert os.fstat(held).st_ino == second.fifo.stat().st_ino
    finally:
        kill_and_close(worker)
        assert worker.stdin is not None
        worker.stdin.close()


def quiet_on_the_socket(
    daemon: DaemonProcess, quiet: Callable[[pathlib.Path, float], subprocess.Popen[str]]
) -> subprocess.Popen[str]:
    """A quiet worker armed over ``daemon``'s socket (for long: its release is what
    counts), once the daemon saved its arm."""
    worker = quiet(daemon.fifo.with_suffix(".socket"), 600.0)
    state = daemon.dir / "state.json"
    wait_until(lambda: saved_scopes(state) == ["step"], what="the arm saved")
    return worker


def assert_released(daemon: DaemonProcess, worker: subprocess.Popen[str]) -> None:
    """``daemon`` read ``worker``'s release: no timer is left."""
    released = daemon.wait_for_record(where=lambda r: r.get("event") == "disarmed")
    assert (released["pid"], released["scope_id"]) == (worker.pid, "step")
    assert daemon.status()["timers"] == []


def test_a_datagram_left_unread_by_a_killed_daemon_is_read_by_the_next(
    spawn: Callable[..., DaemonProcess],
    short_dir: pathlib.Path,
    store: FdStore,
    quiet: Callable[[pathlib.Path, float], subprocess.Popen[str]],
) -> None:
    # As for the FIFO: a socket worker's release queued while the daemon stalled died
    # with the socket when the daemon was killed; the next daemon restored the timer,
    # and a worker quiet since was reaped.
    args = ["--state-file", str(short_dir / "state.json")]
    first = store.start(spawn, *args, name="first")
    [held] = store.held[SOCKET]
    worker = quiet_on_the_socket(first, quiet)
    os.kill(first.pid, signal.SIGSTOP)
    _, status = os.waitpid(first.pid, os.WUNTRACED)  # until it has stopped
    assert os.WIFSTOPPED(status)
    release(worker)  # queued, never read
    first.stop(signal.SIGKILL)
    second = store.start(spawn, *args, name="second")
    assert_released(second, worker)
    assert worker.poll() is None
    [again] = store.held[SOCKET]  # the same socket, given to the store again
    assert os.fstat(again).st_ino == os.fstat(held).st_ino


def test_a_daemon_that_restored_nothing_binds_a_new_socket_and_its_clients_resend(
    spawn: Callable[..., DaemonProcess],
    store: FdStore,
    quiet: Callable[[pathlib.Path, float], subprocess.Popen[str]],
) -> None:
    # Taken over though no timer was restored (no state file): its clients, connected
    # to it still, never learned that the new daemon knew none of their timers, and a
    # stuck worker ran on unreaped. As the FIFO, it is replaced then.
    first = store.start(spawn, name="first")
    [held] = store.held[SOCKET]
    worker = quiet(first.fifo.with_suffix(".socket"), 600.0)
    wait_until(lambda: first.armed_scopes() == ["step"], what="the arm read")
    old = os.fstat(held).st_ino
    first.stop(signal.SIGKILL)
    second = store.start(spawn, name="second")
    wait_until(lambda: second.armed_scopes() == ["step"], what="the timer sent again")
    assert [t["pid"] for t in second.status()["timers"]] == [worker.pid]
    [now] = store.held[SOCKET]
    assert os.fstat(now).st_ino != old  # a socket of its own
    assert second.stop() == 0


def test_a_daemon_stopped_takes_its_socket_with_it(
    spawn: Callable[..., DaemonProcess], store: FdStore
) -> None:
    # The store kept it after a clean stop, which unlinked its path: the next daemon
    # took it over and failed to start (the path gone), and so did every restart.
    first = store.start(spawn, name="first")
    assert first.stop() == 0
    store.drain()
    assert SOCKET not in store.held
    second = store.start(spawn, name="second")
    assert second.status()["socket"] == str(first.fifo.with_suffix(".socket"))


# The daemon, with its loop wedged (as by a callback that blocks) while argv[1] exists.
WEDGED = """
import os, sys, time
from ftimer_server.server import _loop
iterate = _loop.Loop._iterate
def wedged(self, *args):
    while os.path.exists(sys.argv[1]):
        time.sleep(0.01)
    return iterate(self, *args)
_loop.Loop._iterate = wedged
from ftimer_server.daemon._cli import main
sys.exit(main(sys.argv[2:]))
"""


def test_a_stop_that_never_ends_leaves_the_socket_to_the_next_daemon(
    spawn: Callable[..., DaemonProcess],
    short_dir: pathlib.Path,
    store: FdStore,
    quiet: Callable[[pathlib.Path, float], subprocess.Popen[str]],
) -> None:
    # A wedged daemon told to stop (systemctl stop or restart) had systemd let its
    # socket go before its stop, which never ended: killed at TimeoutStopSec, its socket
    # died with what was queued, a worker's release, and the next daemon reaped it.
    wedge = short_dir / "wedge"
    args = ["--state-file", str(short_dir / "state.json")]
    first = store.start(spawn, *args, name="first", command=[PYTHON, "-c", WEDGED, str(wedge)])
    worker = quiet_on_the_socket(first, quiet)
    wedge.touch()  # at the loop's next wake-up
    release(worker)  # queued, never read
    first.proc.send_signal(signal.SIGTERM)
    store.wait_for("STOPPING", first.proc)
    for _ in range(5):  # what the daemon says next, if anything (each waits 0.1 s)
        store.receive()
    first.stop(signal.SIGKILL)
    store.drain()
    assert SOCKET in store.held
    wedge.unlink()
    assert_released(store.start(spawn, *args, name="second"), worker)


# The daemon, held in its stop after its last read (before the socket is closed) while
# argv[1] exists; argv[1] + ".held" says it is there.
HELD_AT_STOP = """
import os, sys, time
from ftimer_server.core import _watchdog
finish = _watchdog.Watchdog.finish
def held(self, now):
    open(sys.argv[1] + ".held", "w").close()
    while os.path.exists(sys.argv[1]):
        time.sleep(0.01)
    return finish(self, now)
_watchdog.Watchdog.finish = held
from ftimer_server.daemon._cli import main
sys.exit(main(sys.argv[2:]))
"""


def held_past_its_last_read(
    start: Callable[..., DaemonProcess],
    short_dir: pathlib.Path,
    quiet: Callable[[pathlib.Path, float], subprocess.Popen[str]],
) -> Tuple[DaemonProcess, subprocess.Popen[str], pathlib.Path]:
    """A daemon (``start(name=, command=)``, ready) with a quiet worker armed over its
    socket, told to stop and held in its stop past its last read until the file it
    returns is removed; and the worker."""
    hold = short_dir / "hold"
    hold.touch()
    daemon = start(name="first", command=[PYTHON, "-c", HELD_AT_STOP, str(hold)])
    worker = quiet_on_the_socket(daemon, quiet)
    daemon.proc.send_signal(signal.SIGTERM)
    wait_until((short_dir / "hold.held").exists, what="the stop past its last read")
    return daemon, worker, hold


def test_a_release_sent_as_the_daemon_stops_reaches_the_next_daemon(
    spawn: Callable[..., DaemonProcess],
    short_dir: pathlib.Path,
    quiet: Callable[[pathlib.Path, float], subprocess.Popen[str]],
) -> None:
    # Sent over the socket after a stopping daemon's last read, a release was taken by
    # the kernel, then dropped with the socket: the state file kept the timer, and the
    # next daemon reaped the worker (11 of 40 quiet workers in each of a review's runs of
    # a SIGTERM restart). The send fails now, and the client sends it to the next daemon.
    args = ["--state-file", str(short_dir / "state.json")]

    def start(**kwargs: Any) -> DaemonProcess:
        return spawn(*args, **kwargs).ready()

    first, worker, hold = held_past_its_last_read(start, short_dir, quiet)
    release(worker)
    hold.unlink()
    assert first.proc.wait(PATIENCE) == 0
    assert saved_scopes(short_dir / "state.json") == ["step"]  # not read, so still armed
    assert_released(spawn(*args, name="second").ready(), worker)
    assert worker.poll() is None


def test_a_socket_shut_by_a_daemon_killed_as_it_stopped_is_not_taken_over(
    spawn: Callable[..., DaemonProcess],
    short_dir: pathlib.Path,
    store: FdStore,
    quiet: Callable[[pathlib.Path, float], subprocess.Popen[str]],
) -> None:
    # Past its last read, the stopping daemon's socket takes no datagram (sends fail);
    # killed there, it left that socket to the store: the next daemon would serve a
    # socket every send to which fails, for good.
    args = ["--state-file", str(short_dir / "state.json")]
    start = functools.partial(store.start, spawn, *args)
    first, worker, _ = held_past_its_last_read(start, short_dir, quiet)
    first.stop(signal.SIGKILL)
    store.drain()
    assert SOCKET in store.held
    release(worker)  # refused: the client sends it again once a server reads the socket
    second = store.start(spawn, *args, name="second")
    assert_released(second, worker)
    [now] = store.held[SOCKET]
    assert not socket_module.shut_for_reading(now)


@needs_unix_diag
def test_a_kept_socket_whose_file_another_socket_replaced_is_not_taken_over(
    spawn: Callable[..., DaemonProcess],
    short_dir: pathlib.Path,
    store: FdStore,
    quiet: Callable[[pathlib.Path, float], subprocess.Popen[str]],
) -> None:
    # The kept socket's file was removed and another socket bound at its path (by a
    # process of the daemon's user): the next daemon took the kept one over by its name,
    # and served a socket no client could reach, the one at the path unread.
    args = ["--state-file", str(short_dir / "state.json")]
    first = store.start(spawn, *args, name="first")
    quiet_on_the_socket(first, quiet)  # a timer restored: the socket would be taken over
    first.stop(signal.SIGKILL)
    store.drain()
    path = str(first.fifo.with_suffix(".socket"))
    os.unlink(path)
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as other:
        other.bind(path)
        second = spawn(*args, env={"NOTIFY_SOCKET": store.path}, **store.passed(), name="second")
        _, err = second.proc.communicate(timeout=PATIENCE)
        assert second.proc.returncode == 3  # as any start with a live socket at the path
        assert "a process is bound to the socket there; not removing it" in err
        assert os.path.exists(path)  # the other's, left


def test_a_socket_not_taken_over_is_let_go(
    spawn: Callable[..., DaemonProcess], store: FdStore
) -> None:
    # Restarted with --no-socket, the daemon left the store holding the last one's
    # socket, bound: clients sent into it, unread, instead of falling back to the FIFO.
    first = store.start(spawn, name="first")
    first.stop(signal.SIGKILL)
    store.start(spawn, "--no-socket", name="second")
    assert not [name for name in store.held if name.startswith("socket")]
    with (
        socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s,
        pytest.raises(ConnectionRefusedError),
    ):
        s.connect(str(first.fifo.with_suffix(".socket")))


def test_a_socket_taken_over_keeps_the_queue_length_it_was_made_with(
    spawn: Callable[..., DaemonProcess],
    short_dir: pathlib.Path,
    store: FdStore,
    quiet: Callable[[pathlib.Path, float], subprocess.Popen[str]],
) -> None:
    # The kernel keeps a socket's queue length from when it was made; the daemon took
    # net.unix.max_dgram_qlen of now, and a full queue could pass for one with room.
    args = ["--state-file", str(short_dir / "state.json")]
    first = store.start(spawn, *args, name="first")
    quiet_on_the_socket(first, quiet)  # a timer restored: the socket is taken over
    first.stop(signal.SIGKILL)
    store.held["socket-q7"] = store.held.pop(SOCKET)  # made when the sysctl said 7
    store.start(spawn, *args, name="second")
    assert list(store.held) == ["fifo", "socket-q7"]  # stored again as it is
    # Never taken out of the store meanwhile: a kill then would have lost it.
    assert not [f for f in store.received if f.get("FDSTOREREMOVE") == "1"]


def test_a_full_store_holds_the_new_socket_in_place_of_the_last_ones(
    spawn: Callable[..., DaemonProcess], store: FdStore
) -> None:
    # A daemon that took the last one's socket not over (it restored nothing) and made
    # its own under another queue length (the sysctl changed between the two) stored
    # its own before it let go of the last one's: the store, full (the FIFO and that
    # socket), refused it, and then held no socket until the next restart.
    first = store.start(spawn, name="first")
    first.stop(signal.SIGKILL)
    store.held["socket-q7"] = store.held.pop(SOCKET)  # made when the sysctl said 7
    store.start(spawn, name="second")
    assert sorted(store.held) == sorted(["fifo", SOCKET])


def test_only_descriptors_passed_to_this_process_are_taken() -> None:
    env = {"LISTEN_PID": "42", "LISTEN_FDS": "2", "LISTEN_FDNAMES": "fifo:other"}
    assert stored_fds(env, pid=42) == [(3, "fifo"), (4, "other")]
    assert stored_fds(env, pid=43) == []  # inherited from a parent that was passed them
    assert stored_fds({**env, "LISTEN_FDS": "x"}, pid=42) == []
    assert stored_fds({"LISTEN_PID": "42", "LISTEN_FDS": "1"}, pid=42) == [(3, "")]
