"""Minimal real peers for client tests: a FIFO or a datagram socket read in a thread.

Each stands in for a server. ``FifoPeer`` opens the FIFO for reading (and keeps a write
descriptor of its own so it never sees end-of-file); ``SocketPeer`` binds an AF_UNIX
datagram socket with SO_PASSCRED, as the server does, and keeps for every datagram the
kernel's credentials of its sender and the pid named by each pidfd it carried. Both can
stop reading (a stalled server), fill their queue, and go away (a server restart: close,
unlink, create again).
"""

from __future__ import annotations

import array
import contextlib
import fcntl
import os
import pathlib
import select
import socket
import struct
import subprocess
import sys
import termios
import threading
import time
from collections.abc import Iterator
from typing import Any, Callable, Dict, Iterable, List, NamedTuple, Optional, Tuple

import pytest

import ftimer_client._expires as expires_module
from ftimer_client import _channel
from ftimer_protocol import (
    PIPE_BUF,
    Arm,
    Disarm,
    DisarmAll,
    Expire,
    Message,
    StreamDecoder,
    Sync,
    TimerRequestV1,
    decode_value,
    encode,
)

FILL_LINE = encode(Sync(token="fill"))


class Peer:
    """A reader thread that can stop reading (``pause``), read again and go away; what
    it reads is the subclass's (``_fd``, ``_read``, ``_release``)."""

    def __init__(self, path: pathlib.Path) -> None:
        self.path = path
        self.messages: List[Message] = []
        self.errors: List[Any] = []
        self._cond = threading.Condition()
        self._state = "reading"  # or "paused", "stopped"; changed under _cond
        self._parked = False  # the thread has seen "paused" and reads no more
        self._wake_r, self._wake_w = os.pipe()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _fd(self) -> int:
        """The descriptor to read when it polls readable."""
        raise NotImplementedError

    def _read(self) -> None:
        """Read what is there (never blocks) and keep it, under ``_cond``."""
        raise NotImplementedError

    def _release(self) -> None:
        """Close what the subclass opened (the reader thread has stopped)."""
        raise NotImplementedError

    def unread(self) -> int:
        """Bytes queued not read yet (FIONREAD; on a datagram socket, of the next
        datagram only): 0 when nothing is."""
        buf = array.array("i", [0])
        fcntl.ioctl(self._fd(), termios.FIONREAD, buf)
        return buf[0]

    def _set_state(self, state: str) -> None:
        with self._cond:
            self._state = state
            self._cond.notify_all()
        os.write(self._wake_w, b"x")  # out of poll(), to look at the state

    def _run(self) -> None:
        poller = select.poll()
        poller.register(self._fd(), select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        while True:
            with self._cond:
                while self._state == "paused":
                    self._parked = True
                    self._cond.notify_all()
                    self._cond.wait()
                self._parked = False
                if self._state == "stopped":
                    return
            ready = {fd for fd, _ in poller.poll()}
            if self._wake_r in ready:
                os.read(self._wake_r, 4096)
                continue
            self._read()

    def _keep(self, result: object) -> None:
        """Keep a decoded message or error (fill lines are dropped); ``_cond`` held."""
        if isinstance(result, Exception):
            self.errors.append(result)
        elif not isinstance(result, Sync):
            self.messages.append(result)  # type: ignore[arg-type]

    def wait_for(
        self, predicate: Callable[[List[Message]], bool], timeout: float = 10.0
    ) -> List[Message]:
        """Wait until ``predicate(messages)`` holds; return a copy of the messages."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate(self.messages):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(f"timed out; peer has {self.messages!r}")
                self._cond.wait(remaining)
            return list(self.messages)

    def wait_count(self, n: int, timeout: float = 10.0) -> List[Message]:
        """Wait for at least ``n`` messages."""
        return self.wait_for(lambda m: len(m) >= n, timeout)

    def take(self) -> List[Message]:
        """Return and forget the messages so far."""
        with self._cond:
            out, self.messages = self.messages, []
            return out

    def pause(self) -> None:
        """Stop reading: a stalled server. Returns once the reader reads no more."""
        self._set_state("paused")
        with self._cond:
            if not self._cond.wait_for(lambda: self._parked, 10):
                raise AssertionError("the reader did not pause")

    def resume(self) -> None:
        self._set_state("reading")

    def wait_drained(self, timeout: float = 10.0) -> None:
        """Wait until the reader has emptied its queue."""
        deadline = time.monotonic() + timeout
        while self.unread():
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.unread()} bytes still unread")
            time.sleep(0.005)

    def close(self) -> None:
        """Go away (stop reading, close); the path stays."""
        if self._state == "stopped":
            return
        self._set_state("stopped")
        self._thread.join(10)
        self._release()
        os.close(self._wake_r)
        os.close(self._wake_w)


class FifoPeer(Peer):
    """Reads ``path`` (created when ``create``) and keeps every decoded message.

    Attributes:
        read_size: the most bytes one read takes.
        delay: seconds it waits after each read (pacing a busy server; 0: none).
    """

    read_size = 65536
    delay = 0.0

    def __init__(self, path: pathlib.Path, *, create: bool = True) -> None:
        if create:
            os.mkfifo(path, 0o600)
        self.rfd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        self.wfd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
        self._decoder = StreamDecoder()
        super().__init__(path)

    def _fd(self) -> int:
        return self.rfd

    def _read(self) -> None:
        try:
            data = os.read(self.rfd, self.read_size)
        except BlockingIOError:
            return
        results = self._decoder.feed(data)
        with self._cond:
            for r in results:
                self._keep(r)
            self._cond.notify_all()
        if self.delay:
            time.sleep(self.delay)  # pacing, not synchronisation

    def fill(self) -> int:
        """Fill the pipe with no-op lines until a write would block; return the bytes."""
        total = 0
        while True:
            try:
                total += os.write(self.wfd, FILL_LINE)
            except BlockingIOError:
                return total

    def _release(self) -> None:
        os.close(self.rfd)
        os.close(self.wfd)


class Datagram(NamedTuple):
    """One datagram a ``SocketPeer`` received."""

    data: bytes
    #: The sender's pid and uid, from the kernel (SCM_CREDENTIALS).
    pid: int
    uid: int
    #: The pid each pidfd it carried names (SCM_RIGHTS), in order.
    pidfds: Tuple[int, ...]
    #: Other descriptors it carried (not pidfds): their count.
    others: int


# Room for one struct ucred and a few descriptors: more than a client ever sends.
_ANCILLARY = socket.CMSG_SPACE(struct.calcsize("iII")) + socket.CMSG_SPACE(8 * 4)


def pidfd_pid(fd: int) -> Optional[int]:
    """The pid a pidfd names (its fdinfo's ``Pid:``), or None for another descriptor."""
    with open(f"/proc/self/fdinfo/{fd}") as f:
        for line in f:
            if line.startswith("Pid:"):
                return int(line.split()[1])
    return None


class SocketPeer(Peer):
    """Binds ``path`` (an AF_UNIX datagram socket with SO_PASSCRED) and reads it; keeps
    each datagram (``datagrams``) beside its message."""

    def __init__(self, path: pathlib.Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind(str(path))
        self.sock.setblocking(False)
        self.datagrams: List[Datagram] = []
        self.receipts = 0  # sync datagrams (the ``ftimer`` command's wait), not kept
        super().__init__(path)

    def _fd(self) -> int:
        return self.sock.fileno()

    def _read(self) -> None:
        try:
            data, ancdata, flags, _ = self.sock.recvmsg(PIPE_BUF + 1, _ANCILLARY)
        except BlockingIOError:
            return
        assert not flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC), flags
        pid = uid = -1
        pidfds: List[int] = []
        others = 0
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                pid, uid, _ = struct.unpack("iII", payload[: struct.calcsize("iII")])
            elif level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds = array.array("i")
                fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
                for fd in fds:
                    named = pidfd_pid(fd)
                    if named is None and b"sync" in data:  # a receipt: given, as a server does
                        with contextlib.suppress(OSError):
                            os.set_blocking(fd, False)
                            os.write(fd, b"\n")
                    os.close(fd)  # never leak what a client sent
                    if named is None:
                        others += 1
                    else:
                        pidfds.append(named)
        result = decode_value(data)
        with self._cond:
            if isinstance(result, Sync):  # a sender's receipt, given: its pipe is closed
                self.receipts += 1
                return
            self.datagrams.append(Datagram(data, pid, uid, tuple(pidfds), others))
            self._keep(result)
            self._cond.notify_all()

    def take(self) -> List[Message]:
        """Return and forget the messages (and datagrams) so far."""
        with self._cond:
            self.datagrams = []
            return super().take()

    def fill(self) -> int:
        """Fill the queue with no-op datagrams (from a socket of the test's own) until a
        send would block; return how many were queued."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as filler:
            filler.setblocking(False)
            filler.connect(str(self.path))
            count = 0
            while True:
                try:
                    filler.send(FILL_LINE)
                except BlockingIOError:
                    return count
                count += 1

    def _release(self) -> None:
        self.sock.close()  # the path stays, bound to nobody


def server_state(messages: Iterable[Message]) -> Dict[Tuple[int, str], float]:
    """What a server holds after ``messages``: (pid, scope) -> deadline or expiration."""
    state: Dict[Tuple[int, str], float] = {}
    for m in messages:
        if isinstance(m, Arm):
            state[(m.pid, m.scope_id)] = m.deadline
        elif isinstance(m, (Disarm, Expire)):
            state.pop((m.pid, m.scope_id), None)
        elif isinstance(m, DisarmAll):
            state = {k: v for k, v in state.items() if k[0] != m.pid}
        elif isinstance(m, TimerRequestV1):
            if m.is_release:
                state.pop((m.pid, m.scope_id), None)
            else:
                state[(m.pid, m.scope_id)] = m.expiration_time
    return state


@pytest.fixture
def peer(fifo_path: pathlib.Path) -> Iterator[FifoPeer]:
    p = FifoPeer(fifo_path)
    yield p
    p.close()


@pytest.fixture(autouse=True)
def _unconfigured() -> Iterator[None]:
    """Every test starts and ends with no configured client, and no retry of its own
    left: a test's servers go with its temporary directory, and a channel that still
    owed one a disarm would retry for good, opening descriptors (its socket, its own
    pidfd) while later tests count theirs."""
    expires_module.configure(None)
    yield
    expires_module.configure(None)
    for channel in list(_channel._channels):
        with channel.lock:
            channel.state.reset()  # nothing owed: its retry thread ends at its next turn


@pytest.fixture
def socket_path(fifo_path: pathlib.Path) -> pathlib.Path:
    """The path of the socket beside ``fifo_path`` (``timer.socket``)."""
    return fifo_path.with_name("timer.socket")


@pytest.fixture
def speer(socket_path: pathlib.Path) -> Iterator[SocketPeer]:
    p = SocketPeer(socket_path)
    yield p
    p.close()


@pytest.fixture(params=["fifo", "socket"])
def server(
    request: pytest.FixtureRequest, fifo_path: pathlib.Path, socket_path: pathlib.Path
) -> Iterator[Peer]:
    """A peer on each transport in turn: the test runs once over the FIFO, once over the
    socket."""
    if request.param == "socket" and not hasattr(os, "pidfd_open"):
        pytest.skip("the socket transport is Linux's (pidfds)")
    p = FifoPeer(fifo_path) if request.param == "fifo" else SocketPeer(socket_path)
    yield p
    p.close()


def restart(old: Peer) -> Peer:
    """A server restart: the old peer goes, its path is made again (a new FIFO, a new
    socket bound), and a new peer of the same kind reads it."""
    old.close()
    old.path.unlink(missing_ok=True)
    return type(old)(old.path)


FTIMER = [sys.executable, "-m", "ftimer_client"]  # the `ftimer` command


def ftimer(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """Run the `ftimer` command with ``args``; its output captured as text."""
    return subprocess.run([*FTIMER, *args], capture_output=True, text=True, timeout=timeout)


def exec_argv(peer: Peer, *cmd: str) -> List[str]:
    """The command line of ``ftimer exec`` of ``cmd`` under a 60 s timer, through
    ``peer``'s path."""
    return [*FTIMER, "exec", "--fifo", str(peer.path), "--after", "60", "--", *cmd]


def descriptors_on(file: os.stat_result) -> List[int]:
    """This process's descriptors open on the file ``file`` is the status of."""
    found = []
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # closed since the listing
            st = os.stat(f"/proc/self/fd/{name}")
            if (st.st_dev, st.st_ino) == (file.st_dev, file.st_ino):
                found.append(int(name))
    return found


def held_only(fd: int) -> bool:
    """Whether this process's descriptor ``fd`` is an O_PATH one: it holds a file (a
    protocol 1 client holds the FIFO it writes to) without reading or writing it, and a
    FIFO's reader sees no writer in it."""
    with open(f"/proc/self/fdinfo/{fd}") as f:
        flags = next(line for line in f if line.startswith("flags:"))
    return bool(int(flags.split()[1], 8) & os.O_PATH)


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    """A child process of the test's own, to arm timers for."""
    with subprocess.Popen(["sleep", "60"]) as child:
        yield child
        child.kill()


@contextlib.contextmanager
def live_thread_id() -> Iterator[int]:
    """The id (``gettid``) of a thread of this process that runs until the block ends."""
    started, done_with = threading.Event(), threading.Event()
    tids: List[int] = []
    thread = threading.Thread(
        target=lambda: (tids.append(threading.get_native_id()), started.set(), done_with.wait())
    )
    thread.start()
    try:
        assert started.wait(10)
        yield tids[0]
    finally:
        done_with.set()
        thread.join()


def no(path: str) -> bool:
    """``exists=`` for a host where no path exists."""
    return False
