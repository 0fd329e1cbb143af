"""The control socket: how ``ftimer-server status`` asks a running daemon what it has armed.

The FIFO only carries messages from workers to the daemon, so the daemon also listens on a
small AF_UNIX stream socket beside it (``<fifo>.sock`` by default). The socket file is
0600 and every connection's peer is checked with SO_PEERCRED: only the daemon's own user
and root may ask. The exchange is one request line and one JSON document in reply, then
the daemon closes the connection: ``status`` is answered with the status document, the
soonest armed timers included; ``health`` with the same document without them (what a
liveness probe needs, as quick however many timers are armed). Each connection is
served on a thread of its own (a few at once), so a peer that says nothing holds up no
other.

At start-up, a socket that answers means another daemon is running (refused); one that
refuses connections is a leftover of a daemon that died, and is replaced if it is this
user's (another user's is refused, as the FIFO's and the datagram socket's are). (Two
daemons starting at once on one FIFO are kept apart by the FIFO's lock file, see
``_daemon``.)
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import selectors
import socket
import stat
import struct
import tempfile
import threading
import time
from typing import Any, Callable, Dict, FrozenSet, Optional

from ftimer_server._files import is_same_file, unlink_if_same

from ._unasked import Unasked

__all__ = [
    "ControlServer",
    "ControlSocketBusy",
    "DaemonNotRunning",
    "bound_first",
    "query_status",
]

log = logging.getLogger("ftimer_server.control")

_MAX_REQUEST = 256
_PEER_TIMEOUT = 2.0
#: Connections served at once; more wait to be accepted until one is done (each is done
#: within its timeouts and one status computation).
_MAX_PEERS = 8
#: Connections the kernel queues while every slot is busy (a burst of probes); past it a
#: connect() waits for room (`query_status`'s, up to its timeout).
_BACKLOG = 64
#: Seconds the accepting thread waits before it tries again, out of descriptors.
_ACCEPT_RETRY = 0.1
#: accept() errors that last until something else lets go of a resource.
_SCARCE = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
_UCRED = struct.Struct("3i")  # struct ucred {pid_t pid; uid_t uid; gid_t gid;}
_TIMEVAL = struct.Struct("@ll")  # struct timeval {time_t tv_sec; suseconds_t tv_usec;}


#: The private directory's prefix, before mkdtemp's 8 random characters.
_PRIVATE = ".c"


def bound_first(path: str) -> str:
    """What the path ``ControlServer.start`` binds the socket at before renaming it to
    ``path`` looks like: ``DIR/.cXXXXXXXX/s``, as long as the real one."""
    return os.path.join(os.path.dirname(path), _PRIVATE + "X" * 8, "s")


class ControlSocketBusy(Exception):
    """Another daemon answers on the control socket, or the path is not a socket."""


class DaemonNotRunning(Exception):
    """No daemon answers on the control socket."""


def _peer_uid(conn: socket.socket) -> Optional[int]:
    """The connecting process's uid (Linux SO_PEERCRED), or None where unsupported."""
    opt = getattr(socket, "SO_PEERCRED", None)
    if opt is None:  # pragma: no cover - macOS; the 0600 socket file still protects it
        return None
    _pid, uid, _gid = _UCRED.unpack(conn.getsockopt(socket.SOL_SOCKET, opt, _UCRED.size))
    return int(uid)


class ControlServer:
    """Answers ``status`` and ``health`` requests on an owner-only AF_UNIX socket, on
    threads of its own (one accepts; each connection is served on one of its own, up to
    ``_MAX_PEERS``).

    Args:
        path: the socket path.
        status: returns the status document (JSON-serialisable), listing the armed
            timers if called with True (``status``), not if with False (``health``);
            called on the connection's thread for each request, so possibly on several
            at once.
        allowed_uids: peers allowed to ask (default: this process's uid and root).
    """

    def __init__(
        self,
        path: str,
        status: Callable[[bool], Dict[str, Any]],
        allowed_uids: Optional[FrozenSet[int]] = None,
    ) -> None:
        self.path = path
        self._status = status
        self._allowed = allowed_uids or frozenset({os.geteuid(), 0})
        self._sock: Optional[socket.socket] = None
        self._bound: Optional[os.stat_result] = None  # the socket start() made
        self._wake_r = self._wake_w = -1  # made by start(): nothing is held before it
        self._thread: Optional[threading.Thread] = None
        self._peers = threading.Condition()
        self._serving = 0  # connections being served; guarded by _peers
        self._unasked = Unasked()
        self._stopping = False
        self._pending: Optional[socket.socket] = None  # a socket rebind() made to serve

    def start(self) -> None:
        """Bind the socket (0600, atomically via a temporary name) and start serving.

        Raises:
            ControlSocketBusy: a daemon already answers at ``path``, or ``path`` is
                something other than a socket, or another user's socket.
            OSError: the directory is not writable, the path is too long, ...
        """
        self.check_free()
        # Bind, chmod, then rename: the socket is never reachable with a wider mode. In a
        # directory of its own (0700, an unguessable name), as chmod follows a symlink:
        # in the FIFO's directory, another user who may write there could swap the
        # socket for a link to any file between the bind and the chmod. A longer path
        # than ``path`` if its name is short: the config checks it (``bound_first``).
        sock = self._bind(replace=True)
        self._bound = os.lstat(self.path)
        self._sock = sock
        # Made here, not on the thread: out of descriptors, the start fails (the thread
        # would die, and the socket queue connections nobody accepts).
        sel: Optional[selectors.BaseSelector] = None
        try:
            self._wake_r, self._wake_w = os.pipe()
            sel = selectors.DefaultSelector()
            sel.register(sock, selectors.EVENT_READ)
            sel.register(self._wake_r, selectors.EVENT_READ)
        except BaseException:
            if sel is not None:
                sel.close()
            self.stop()
            raise
        self._thread = threading.Thread(
            target=self._serve, args=(sel,), name="ftimer-control", daemon=True
        )
        self._thread.start()

    def _bind(self, replace: bool) -> socket.socket:
        """A listening socket bound at ``path``, 0600 (``replace``: in place of what is
        there; else only where nothing is).

        Raises:
            FileExistsError: not ``replace``, and something is at ``path``.
            OSError: the directory is not writable, the path is too long, ...
        """
        private = tempfile.mkdtemp(prefix=_PRIVATE, dir=os.path.dirname(self.path))
        tmp = os.path.join(private, "s")
        try:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.bind(tmp)
                os.chmod(tmp, 0o600)
                if replace:
                    os.rename(tmp, self.path)
                else:  # a link fails where another file was put meanwhile
                    os.link(tmp, self.path)
                    os.unlink(tmp)
                sock.listen(_BACKLOG)
            except BaseException:
                sock.close()
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
        finally:
            with contextlib.suppress(OSError):
                os.rmdir(private)
        return sock

    def lost(self) -> bool:
        """Whether ``path`` no longer names the socket being served (removed, or
        replaced by another file): ``status`` cannot reach this daemon there."""
        bound = self._bound
        if bound is None:
            return False
        try:
            return not is_same_file(self.path, bound)
        except OSError:  # cannot be looked up now: not said lost
            return False

    def rebind(self) -> bool:
        """Serve a new socket at ``path``, where the one served was removed: True if it
        is served, False if the server stops (or never started).

        Raises:
            FileExistsError: something else is at ``path`` now (left alone).
            OSError: the socket cannot be made there.
        """
        if self._thread is None:
            return False
        sock = self._bind(replace=False)
        try:
            bound = os.lstat(self.path)
        except OSError:
            sock.close()
            raise
        with self._peers:
            if self._stopping:  # stop() ran meanwhile: nothing would serve it
                sock.close()
                unlink_if_same(self.path, bound)
                return False
            self._bound = bound
            old, self._pending = self._pending, sock
            os.write(self._wake_w, b"r")  # the serving thread takes it
        if old is not None:  # made by a rebind the serving thread never took
            old.close()
        return True

    def check_free(self) -> None:
        """Make sure no daemon answers at ``path``; remove a dead daemon's socket, if it
        is this user's (as the FIFO and the datagram socket are, another user's is never
        removed).

        Raises:
            ControlSocketBusy: a daemon answers there, or the path is not a socket, or
                another user's.
        """
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise ControlSocketBusy(
                f"{self.path} exists and is not a socket; refusing to replace it"
            )
        if st.st_uid != os.geteuid():
            raise ControlSocketBusy(
                f"{self.path} is a socket of uid {st.st_uid}, not this user's; refusing to "
                "replace it"
            )
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.settimeout(1.0)
        try:
            probe.connect(self.path)
        except (ConnectionRefusedError, FileNotFoundError):
            log.info("removing stale control socket %s", self.path)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
            return
        except OSError as e:
            raise ControlSocketBusy(f"cannot probe control socket {self.path}: {e}") from None
        finally:
            probe.close()
        raise ControlSocketBusy(f"another ftimer-server is already running on {self.path}")

    def stop(self) -> None:
        """Stop accepting and remove the socket file (if it is still ours).

        Connections already accepted are still answered, on their own threads.
        """
        with self._peers:
            self._stopping = True
            self._peers.notify_all()
        if self._thread is not None:
            os.write(self._wake_w, b"x")
            self._thread.join()
            self._thread = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self._pending is not None:
            self._pending.close()
            self._pending = None
        if self._bound is not None:
            unlink_if_same(self.path, self._bound)
            self._bound = None
        for fd in (self._wake_r, self._wake_w):
            if fd >= 0:
                os.close(fd)
        self._wake_r = self._wake_w = -1

    def _serve(self, sel: selectors.BaseSelector) -> None:
        assert self._sock is not None
        scarce = False
        with sel:
            while True:
                ready = sel.select()
                if any(key.fileobj == self._wake_r for key, _ in ready):
                    with contextlib.suppress(BlockingIOError):
                        os.read(self._wake_r, 64)
                    with self._peers:
                        if self._stopping:
                            return
                        pending, self._pending = self._pending, None
                    if pending is not None:  # rebind(): serve the new socket instead
                        sel.unregister(self._sock)
                        self._sock.close()
                        self._sock = pending
                        sel.register(pending, selectors.EVENT_READ)
                    continue
                try:
                    conn, _ = self._sock.accept()
                except OSError as e:
                    if e.errno not in _SCARCE:
                        continue
                    # The connection stays queued, the socket readable: retried at
                    # once, this would spin a core until a descriptor is freed.
                    if not scarce:
                        log.warning("control socket: cannot accept a connection: %s", e)
                    scarce = True
                    if self._stop_wait(_ACCEPT_RETRY):
                        return
                    continue
                scarce = False
                with self._peers:
                    if self._serving >= _MAX_PEERS:
                        # Else those queued behind silent connections, a liveness probe
                        # among them, wait their turn of _PEER_TIMEOUT each, past their
                        # own timeout (see _unasked).
                        self._unasked.shut_oldest()
                    self._peers.wait_for(lambda: self._serving < _MAX_PEERS or self._stopping)
                    if self._stopping:
                        conn.close()
                        return
                    self._serving += 1
                self._unasked.add(conn)
                peer = threading.Thread(
                    target=self._serve_peer, args=(conn,), name="ftimer-control-peer", daemon=True
                )
                try:
                    peer.start()
                except RuntimeError as e:  # no thread to be had (TasksMax): drop this one
                    log.warning("control socket: %s", e)
                    self._unasked.asked(conn)
                    conn.close()
                    self._done()

    def _stop_wait(self, timeout: float) -> bool:
        """Wait ``timeout`` seconds, or less if stop() is called: return whether it was."""
        with self._peers:
            return self._peers.wait_for(lambda: self._stopping, timeout)

    def _serve_peer(self, conn: socket.socket) -> None:
        try:
            with conn:
                self._handle(conn)
        finally:
            self._unasked.asked(conn)
            self._done()

    def _done(self) -> None:
        with self._peers:
            self._serving -= 1
            self._peers.notify()

    def _handle(self, conn: socket.socket) -> None:
        try:
            # Read the request line before any reply: closing with unread data resets
            # the connection, and the peer would see ECONNRESET instead of the answer.
            # However it is written, in one piece or several, within _PEER_TIMEOUT.
            deadline = time.monotonic() + _PEER_TIMEOUT
            request = b""
            while (
                b"\n" not in request
                and len(request) < _MAX_REQUEST
                and request.strip() not in _REQUESTS  # complete without its newline
            ):
                conn.settimeout(max(0.001, deadline - time.monotonic()))
                chunk = conn.recv(_MAX_REQUEST - len(request))
                if not chunk:
                    break
                request += chunk
            self._unasked.asked(conn)
            conn.settimeout(_PEER_TIMEOUT)
            request = request.strip()
            uid = _peer_uid(conn)
            reply: Dict[str, Any]
            if uid is not None and uid not in self._allowed:
                log.warning("control socket: refused a request from uid %d", uid)
                reply = {"error": "permission denied"}
            elif request in _REQUESTS:
                reply = self._status(request == b"status")
            else:
                reply = {"error": f"unknown request {request[:64]!r}"}
            conn.sendall(json.dumps(reply, separators=(",", ":")).encode() + b"\n")
        except OSError as e:
            log.debug("control socket: %s", e)
        except Exception:
            # A bug in the status callback must not take the control thread down.
            log.exception("control socket: status failed")


#: The requests answered: the status with its timers, and without them.
_REQUESTS = (b"status", b"health")

_REFUSED = "permission denied: only the daemon's user and root may ask {path} for the status"


def query_status(path: str, timeout: float = 5.0, *, health: bool = False) -> Dict[str, Any]:
    """Ask the daemon listening on ``path`` for its status document (``health``: without
    the armed timers).

    Raises:
        DaemonNotRunning: nothing listens at ``path``.
        PermissionError: the socket or the daemon refused this user, or what answers
            runs as another user than this one or root (this user's path was taken).
        OSError: the connection failed otherwise, or timed out.
        ValueError: the reply is not a JSON object.
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        # A blocking connect(), which the kernel lets wait up to the send timeout while
        # the daemon's queue of connections is full; with Python's timeout (the socket
        # non-blocking) it would fail at once then (EAGAIN).
        seconds = max(timeout, 0.001)
        sock.setsockopt(
            socket.SOL_SOCKET,
            socket.SO_SNDTIMEO,
            _TIMEVAL.pack(int(seconds), int(seconds % 1 * 1_000_000)),
        )
        try:
            sock.connect(path)
        except (FileNotFoundError, ConnectionRefusedError):
            raise DaemonNotRunning(f"no ftimer-server is running on {path}") from None
        except PermissionError:
            raise PermissionError(_REFUSED.format(path=path)) from None
        except BlockingIOError:
            raise TimeoutError(f"the daemon on {path} accepted no connection") from None
        sock.settimeout(timeout)
        # A path in a directory others may make first (/tmp/ftimer-UID): whoever holds it
        # could answer anything. A user's own daemon runs as that user, the system's as
        # root (root itself may ask a daemon of any user).
        euid, peer = os.geteuid(), _peer_uid(sock)
        if euid != 0 and peer not in (None, euid, 0):
            raise PermissionError(
                f"the process answering on {path} runs as uid {peer}, not as this user "
                f"({euid}) nor root: not an ftimer-server of yours, its status is not shown"
            )
        sock.sendall(b"health\n" if health else b"status\n")
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    reply = json.loads(b"".join(chunks))
    if not isinstance(reply, dict):
        raise ValueError("the daemon's reply is not a JSON object")
    if reply.get("error") == "permission denied":
        raise PermissionError(_REFUSED.format(path=path))
    if health and str(reply.get("error", "")).startswith("unknown request"):
        # A daemon older than this command (before 2026-12-04) knows no "health": its
        # whole status serves (a probe read it as a daemon that does not answer).
        return query_status(path, timeout)
    return reply
