"""One process's connection to one FIFO: the descriptor, what is armed, and recovery.

The server keys timers by pid, so every client of this process that writes to the same
FIFO with the same protocol shares one Channel: a resynchronisation ("disarm everything
of this pid, then re-arm what it has armed") must see every scope the process armed.

Version 2 keeps the descriptor open across messages. Version 1 (torch's server) opens,
writes and closes per message: torch's server reads with a blocking ``readline()`` that
only returns to its expiry check once every writer has closed the FIFO.

Recovery: a write that fails with EPIPE (the reader left), or finds the pipe full while
the path now names another FIFO (the server recreated it), reconnects and resynchronises
on the spot. A message that could not be delivered marks the channel for resync; the
next message, or a background thread retrying with backoff while something is armed or
a disarm was lost, brings the server up to date. So an arm lost in an outage is re-sent
and a lost disarm cannot later get a healthy process reaped.
"""

from __future__ import annotations

import errno
import math
import os
import select
import stat
import threading
import time
import weakref
from typing import Dict, List, Optional, Tuple, Union

from ftimer_protocol import SYSTEM_FIFO_PATH, DumpHook

from . import _dump
from ._errors import ServerStalled, ServerUnavailable
from ._proc import process_start_time
from ._wire import V1Lines, V2Lines

__all__ = ["Channel", "channel_for"]

Lines = Union[V1Lines, V2Lines]

# Backoff of the background resync while the server is away: first try, then the cap.
RETRY_FIRST = 0.05
RETRY_MAX = 1.0


class _Gone(Exception):
    """The reader left (EPIPE) or the path now names another FIFO: reconnect."""


def _unavailable(e: OSError, path: str) -> ServerUnavailable:
    if e.errno == errno.ENXIO:
        reason = "no ftimer server is reading the FIFO"
    elif e.errno == errno.ENOENT:
        reason = "no FIFO (is the ftimer server running?)" + _hidden_system_fifo(path)
    elif e.errno == errno.EACCES:
        reason = (
            "this user may not write the FIFO or enter its directory (permission denied): "
            "the server's --fifo-mode and --fifo-group say who may"
        )
    else:
        reason = f"cannot open the FIFO ({e.strerror})"
    return ServerUnavailable(e.errno, reason, path)


def _hidden_system_fifo(path: str) -> str:
    """A hint when the system daemon's FIFO may exist where this user cannot see it.

    A non-root client defaults to the system FIFO only when it can see it; a directory
    that does not let it in sends it to its per-user FIFO instead, which no server reads.
    """
    if path == SYSTEM_FIFO_PATH:
        return ""
    try:
        os.stat(SYSTEM_FIFO_PATH)
    except PermissionError:
        directory = os.path.dirname(SYSTEM_FIFO_PATH)
        return (
            f"; {directory} exists but does not let this user in, so a server's FIFO there "
            f"cannot be used: run the workers in the server's --fifo-group"
        )
    except OSError:
        pass
    return ""


class Channel:
    """Delivers lines to one FIFO for one process (or for one given ``pid``).

    Every public method takes ``lock``, reentrant so that a signal handler that arms or
    disarms while the interrupted code was doing so does not deadlock. Lines are built by
    the caller.

    Args:
        path: the FIFO.
        protocol: 1 (open per message, torch's format) or 2 (descriptor kept open).
        pid: the process the timers belong to; None for this process, following forks.
    """

    def __init__(self, path: str, protocol: int, pid: Optional[int] = None) -> None:
        self.path = path
        self.protocol = protocol
        self.keep_open = protocol != 1
        self.follows_process = pid is None
        self.lock = threading.RLock()
        #: scope -> (its arm line, the client that armed it)
        self.armed: Dict[str, Tuple[bytes, object]] = {}
        #: Outages so far: a client warns once per outage.
        self.outages = 0
        self.pid = os.getpid() if pid is None else pid
        self.start_time = process_start_time(self.pid)
        self._lines: weakref.WeakSet[Lines] = weakref.WeakSet()
        self._base = self.lines(0, None)
        self._fd = -1
        self._fifo = (0, 0)  # (st_dev, st_ino) of the FIFO self._fd is open on
        self._clients = 0
        self._reset_state()
        _channels.add(self)

    def _reset_state(self) -> None:
        self.needs_resync = False
        self._lost: Dict[str, bytes] = {}  # v1: release lines not delivered
        self._stale = False  # v2: a disarm may not have been delivered
        self._stalled = False  # the last write timed out on a full pipe
        self._retry: Optional[threading.Thread] = None

    def lines(
        self, signal: int, labels: Optional[Dict[str, str]], dump: Optional[DumpHook] = None
    ) -> Lines:
        """Return a line builder of this channel's process and protocol, rebound on fork
        (with the child's own stack-dump hook, when ``dump`` is given).

        Raises:
            ValueError: the pid, labels or hook break the schema (``MessageTooLarge``:
                the lines would not fit PIPE_BUF).
        """
        built: Lines
        if self.keep_open:
            built = V2Lines(self.pid, self.start_time, signal, labels, dump)
        else:
            built = V1Lines(self.pid, signal)
        self._lines.add(built)
        return built

    # -- operations -------------------------------------------------------------------

    def arm(self, scope_id: str, line: bytes, owner: object, timeout: float, keep: bool) -> None:
        """Arm ``scope_id`` with ``line``.

        Args:
            keep: when delivery fails, still count the scope as armed (so it is re-sent
                when the server is back); else leave it as it was.

        Raises:
            ServerUnavailable: not delivered (``ServerStalled``: the pipe stayed full).
        """
        with self.lock:
            previous = self.armed.get(scope_id)
            self.armed[scope_id] = (line, owner)
            if self._fd >= 0 and not self.needs_resync:  # v2, connected: every message
                try:
                    os.write(self._fd, line)  # at most PIPE_BUF: all of it, or nothing
                    return
                except OSError:
                    pass  # a full pipe or a gone server: _deliver() sorts it out
            try:
                self._deliver(line, timeout)
            except ServerUnavailable:
                if not keep:
                    if previous is None:
                        del self.armed[scope_id]
                    else:
                        self.armed[scope_id] = previous
                self._failed()
                raise

    def disarm(self, scope_id: str, line: bytes, timeout: float) -> None:
        """Disarm ``scope_id`` with ``line``; a failed disarm is made good by the resync.

        Raises:
            ServerUnavailable: not delivered.
        """
        with self.lock:
            self.armed.pop(scope_id, None)
            if self._fd >= 0 and not self.needs_resync:  # as in arm()
                try:
                    os.write(self._fd, line)
                    return
                except OSError:
                    pass
            try:
                self._deliver(line, timeout)
            except ServerUnavailable:
                self._lose(scope_id, line)
                self._failed()
                raise

    def disarm_all(self, timeout: float, owner: Optional[object] = None) -> None:
        """Disarm every scope of the process, or only those ``owner`` armed.

        Raises:
            ServerUnavailable: not delivered.
        """
        with self.lock:
            if owner is None and self.keep_open:
                self.armed.clear()
                lines = [self._base_v2().disarm_all]
                scopes: List[str] = []
            else:
                scopes = [s for s, (_, o) in self.armed.items() if owner is None or o is owner]
                lines = [self._disarm_line(s) for s in scopes]
                for scope_id in scopes:
                    del self.armed[scope_id]
            try:
                for line in lines:
                    self._deliver(line, timeout)
            except ServerUnavailable:
                self._stale = True
                for scope_id in scopes:
                    self._lose(scope_id, self._disarm_line(scope_id))
                self._failed()
                raise

    def send(self, line: bytes, timeout: float, forget: Optional[str] = None) -> None:
        """Deliver a line that leaves no state behind (expire now), forgetting ``forget``.

        Raises:
            ServerUnavailable: not delivered.
        """
        with self.lock:
            if forget is not None:
                self.armed.pop(forget, None)
            try:
                self._deliver(line, timeout)
            except ServerUnavailable:
                self._failed()
                raise

    def attach(self) -> None:
        """Count one more client using this channel."""
        with self.lock:
            self._clients += 1

    def detach(self) -> None:
        """Count one client less; the last one closes the descriptor."""
        with self.lock:
            self._clients -= 1
            if self._clients <= 0:
                self._close()
                self._retry = None

    # -- delivery (lock held) -----------------------------------------------------------

    def _deliver(self, line: Optional[bytes], timeout: float) -> None:
        """Write ``line`` (None: only resynchronise), reconnecting and resynchronising as
        needed.

        Raises:
            ServerUnavailable: the server is absent, or stalled past ``timeout``.
        """
        if not self.keep_open:
            self._open()
            try:
                self._write_all(self._resync_lines() if self.needs_resync else [], line, timeout)
            finally:
                self._close()
        else:
            if not self.needs_resync:
                try:
                    if self._fd < 0:
                        self._open()
                    if line is not None:
                        self._write(line, timeout)
                    return
                except _Gone:
                    self._close()
            # The server's view is unknown (an outage, or it restarted): make it ours.
            if self._fd < 0:
                self._open()
            self._write_all(self._resync_lines(), line, timeout)
        self.needs_resync = self._stale = self._stalled = False
        self._lost.clear()

    def _resync_lines(self) -> List[bytes]:
        arms = [line for line, _ in self.armed.values()]
        if self.keep_open:
            return [self._base_v2().disarm_all, *arms]
        return [*self._lost.values(), *arms]

    def _write_all(self, lines: List[bytes], last: Optional[bytes], timeout: float) -> None:
        try:
            for line in lines:
                self._write(line, timeout)
            if last is not None:
                self._write(last, timeout)
        except _Gone:
            self._close()
            raise ServerUnavailable(
                errno.EPIPE, "the ftimer server closed or replaced the FIFO", self.path
            ) from None

    def _open(self) -> None:
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as e:
            raise _unavailable(e, self.path) from e
        st = os.fstat(fd)
        if not stat.S_ISFIFO(st.st_mode):
            os.close(fd)
            raise ServerUnavailable(errno.EINVAL, "not a FIFO", self.path)
        self._fd, self._fifo = fd, (st.st_dev, st.st_ino)

    def _close(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)

    def _write(self, line: bytes, timeout: float) -> None:
        try:
            # One write of at most PIPE_BUF bytes with O_NONBLOCK: all of it, or EAGAIN.
            os.write(self._fd, line)
        except BlockingIOError:
            self._wait_write(line, timeout)
        except BrokenPipeError:
            raise _Gone from None
        except OSError as e:
            raise ServerUnavailable(e.errno, f"cannot write ({e.strerror})", self.path) from e

    def _wait_write(self, line: bytes, timeout: float) -> None:
        # The pipe is full. Checked only now, never per message: has the server
        # recreated the FIFO while something still holds the old one open?
        if self.keep_open and self._replaced():
            raise _Gone
        # Wait once per stall: after a timeout, fail fast until a write gets through.
        if not self._stalled:
            poller = select.poll()
            poller.register(self._fd, select.POLLOUT)
            end = time.monotonic() + timeout
            remaining = timeout
            while remaining > 0:
                poller.poll(math.ceil(remaining * 1000))
                try:
                    os.write(self._fd, line)
                    return
                except BlockingIOError:
                    remaining = end - time.monotonic()
                except BrokenPipeError:
                    raise _Gone from None
            self._stalled = True
        raise ServerStalled(
            errno.EAGAIN, f"the ftimer server has not drained the FIFO in {timeout} s", self.path
        )

    def _replaced(self) -> bool:
        try:
            st = os.stat(self.path)
        except OSError:
            return True
        return (st.st_dev, st.st_ino) != self._fifo

    # -- failure bookkeeping (lock held) --------------------------------------------------

    def _disarm_line(self, scope_id: str) -> bytes:
        return self._base.disarm(scope_id)

    def _base_v2(self) -> V2Lines:
        assert isinstance(self._base, V2Lines)
        return self._base

    def _lose(self, scope_id: str, line: bytes) -> None:
        if self.keep_open:
            self._stale = True
        else:
            self._lost[scope_id] = line

    def _failed(self) -> None:
        if not self.needs_resync:
            self.needs_resync = True
            self.outages += 1
        if self._retry is None and (self.armed or self._lost or self._stale):
            self._retry = threading.Thread(
                target=self._retry_loop, name="ftimer-client-resync", daemon=True
            )
            self._retry.start()

    def _retry_loop(self) -> None:
        me = threading.current_thread()
        delay = RETRY_FIRST
        while True:
            time.sleep(delay)
            delay = min(delay * 2, RETRY_MAX)
            with self.lock:
                if self._retry is not me:
                    return  # closed, or superseded after a fork
                if not self.needs_resync or not (self.armed or self._lost or self._stale):
                    self._retry = None
                    return
                try:
                    self._deliver(None, 0.0)
                except ServerUnavailable:
                    continue
                self._retry = None
                return

    # -- fork ---------------------------------------------------------------------------

    def _after_fork(self) -> None:
        # The child shares the parent's open file description: drop it without a write.
        # It never resends the parent's scopes, and speaks with its own pid.
        self.lock = threading.RLock()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self.armed.clear()
        self._reset_state()
        if self.follows_process:
            self.pid = os.getpid()
            self.start_time = process_start_time(self.pid)
            hook = _dump.current()  # the child's own, made by _after_fork_in_child()
            for built in list(self._lines):
                built.rebind(self.pid, self.start_time, hook)

    def __del__(self) -> None:
        if getattr(self, "_fd", -1) >= 0:
            os.close(self._fd)


_channels: weakref.WeakSet[Channel] = weakref.WeakSet()
_shared: weakref.WeakValueDictionary[Tuple[str, int], Channel] = weakref.WeakValueDictionary()
_shared_lock = threading.Lock()


def channel_for(path: str, protocol: int, pid: Optional[int] = None) -> Channel:
    """Return the channel of this process for (``path``, ``protocol``), shared by every
    client that does not name a ``pid``; a client naming one gets a channel of its own.

    Raises:
        ValueError: the pid breaks the schema.
    """
    if pid is not None:
        return Channel(path, protocol, pid)
    key = (os.path.abspath(path), protocol)
    with _shared_lock:
        channel = _shared.get(key)
        if channel is None:
            channel = _shared[key] = Channel(path, protocol)
        return channel


def _after_fork_in_child() -> None:
    global _shared_lock
    _shared_lock = threading.Lock()
    # First the child's own dump file, which the rebuilt lines announce.
    _dump.after_fork_in_child()
    for channel in list(_channels):
        channel._after_fork()


os.register_at_fork(after_in_child=_after_fork_in_child)
