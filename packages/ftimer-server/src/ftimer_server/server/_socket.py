"""The kernel-verified transport: an AF_UNIX datagram socket beside the FIFO.

Over the FIFO the server must believe the pid a writer puts in its message. Over this
socket the kernel says who sent each datagram (``SCM_CREDENTIALS``: pid and uid,
translated into the server's PID namespace; and, where the kernel offers it,
``SCM_PIDFD``: a pidfd of the sender itself), so the subject of a message is the sender,
never the pid it names. A datagram may carry one pidfd of another process
(``SCM_RIGHTS``): then that process is the subject, if it has the sender's uid and is
the sender's descendant or parent (``ftimer exec``, or a shell's ``ftimer arm``):
nothing the sender could not already do with ``kill(2)``, but for a PID namespace's
first process named by its child (a container's entry shell that runs ``ftimer arm``).

Every refusal here is a value for the core (``Refused``, counted and reported as a
rejection), or a protocol error (a datagram truncated, or without credentials), and
every descriptor received is closed: those a sender chose once read (a pidfd at once,
anything else by a thread of its own); the kernel's pidfds that vouch for a subject once
the batch is applied. A sender may pass descriptors whose close blocks (a file of a FUSE
mount it serves): while such closes hold every closing thread and descriptors pile up,
the socket refuses descriptors at the senders (Linux 6.16's ``SO_PASSRIGHTS``), so the
server never runs out of them.
"""

from __future__ import annotations

import array
import contextlib
import errno
import logging
import os
import select
import signal
import socket
import stat
import struct
from typing import (
    Dict,
    FrozenSet,
    List,
    Optional,
    Set,
    Tuple,
    Union,
)

import msgspec

from ftimer_protocol import (
    PIPE_BUF,
    Disarm,
    DisarmAll,
    LineTooLong,
    MalformedMessage,
    Message,
    RemoteProtocolError,
    Sync,
    TimerRequestV1,
)
from ftimer_server._files import read_sysctl, still_at, unlink_if_same
from ftimer_server.core._events import Incoming, Moot, Refused, RejectReason
from ftimer_server.core._policy import clocks_apart
from ftimer_server.core._reader import decode_one, extends_run
from ftimer_server.core._records import ABOUT_A_PROCESS, request_of
from ftimer_server.incidents._procfs import pidfd_pid

from . import _closer, _kinship
from ._fifo import FifoError, resolve_group
from ._process import ProcessInspector, SystemInspector, out_of_descriptors
from ._sockdiag import reached_at

__all__ = ["DatagramSocket", "open_socket"]

logger = logging.getLogger("ftimer_server")

# Linux's numbers, which Python 3.11's socket module does not all name.
_SO_PASSCRED = getattr(socket, "SO_PASSCRED", 16)
_SCM_CREDENTIALS = getattr(socket, "SCM_CREDENTIALS", 2)
_SO_PASSPIDFD = getattr(socket, "SO_PASSPIDFD", 76)  # Linux 6.5
_SCM_PIDFD = getattr(socket, "SCM_PIDFD", 4)
_UCRED = struct.Struct("iII")  # pid, uid, gid
_FD = struct.Struct("i")
# Plain ints: the enum members' & and == cost a call each, per datagram.
_SOL_SOCKET = int(socket.SOL_SOCKET)
_SCM_RIGHTS = int(socket.SCM_RIGHTS)
_MSG_TRUNC = int(socket.MSG_TRUNC)
_MSG_CTRUNC = int(socket.MSG_CTRUNC)
#: Descriptors a sender passes arrive close-on-exec: a process the server's host forks
#: and execs (an embedding agent's) never inherits one while it waits to be closed.
_CLOEXEC = int(getattr(socket, "MSG_CMSG_CLOEXEC", 0x40000000))
#: Room for every descriptor a datagram can carry (the kernel's SCM_MAX_FD), though one
#: pidfd is all a sender may pass: those beyond room the kernel closes inside recvmsg(),
#: in the loop's thread, where a close that blocks (a lingering socket) stalls the loop.
_MAX_FDS = 253
_ANCILLARY = socket.CMSG_SPACE(_UCRED.size) + socket.CMSG_SPACE(4 * _MAX_FDS) + socket.CMSG_SPACE(4)
#: What the kernel puts in ``SCM_PIDFD`` (before Linux 6.17) for a sender already reaped.
_GONE = frozenset((errno.EINVAL, errno.ESRCH))
_QLEN = "/proc/sys/net/unix/max_dgram_qlen"
#: A sender's send buffer (``net.core.wmem_default``): queued datagrams are charged to
#: it until read, and a sender whose charge reaches it waits for room, however short
#: the queue.
_WMEM = "/proc/sys/net/core/wmem_default"
#: Messages that can get nobody signalled: a sender may be taken on its pid for them.
_NEVER_SIGNALS = (Disarm, DisarmAll)
#: Messages not refused for their sender's clocks: torch's, on the wall clock; a disarm,
#: which can only spare a worker (a start time read otherwise is refused later).
_CLOCKS_UNCHECKED = (Disarm, DisarmAll, TimerRequestV1)
#: The fewest datagrams ``receive()`` reads when they keep coming: with the usual queue
#: of 10, senders refill it while it is read, and each iteration of the loop around the
#: read costs as much as a few datagrams. 64 datagrams take well under a millisecond to
#: judge, less than a pipe-full of the FIFO's lines.
READ_BATCH = 64
#: What the server writes into a receipt before closing it: an end of file without it
#: is a receipt the kernel closed inside recvmsg() (the server out of descriptors,
#: MSG_CTRUNC), before what was read with it was applied.
_APPLIED = b"\n"


class DatagramSocket:
    """The bound socket: ``receive()`` what was sent to it, with who sent it.

    Attributes:
        path: where it is bound.
        fd: its descriptor (non-blocking), for the loop's selector.
        passes_pidfds: whether the kernel gives a pidfd of each sender
            (``SO_PASSPIDFD``).
        batch: the most datagrams one ``receive()`` reads: all its queue holds
            (``net.unix.max_dgram_qlen`` + 1: a sender whose datagram would exceed it
            waits for room), or ``READ_BATCH`` if that is more.
        queue_length: the datagrams its queue holds (``net.unix.max_dgram_qlen`` when
            it was made: the kernel keeps that).
        full: the last ``receive()`` read a queue-full or more, or what may have
            filled a sender's send buffer: senders may have waited for room.
        overridden: messages received whose ``pid`` member was not their subject's
            pid here, and which went to their subject all the same: a worker in a PID
            namespace of its own, or a sender naming another process.
        vouched: the pidfd the kernel gave for each subject of the last ``receive()``
            (the sender's own, or the one its datagram carried), by pid, open until
            ``release()``: the host binds a pid of it only while that process lives, so
            a pid reused between the read and the bind is never taken for it.
    """

    def __init__(
        self,
        path: str,
        sock: socket.socket,
        passes_pidfds: bool,
        queue_length: int,
        processes: Optional[ProcessInspector] = None,
    ) -> None:
        self.path = path
        #: Reads a process's parent and uid, for the kinship of a pidfd's process to its
        #: sender (the server's inspector).
        self._processes = processes or SystemInspector()
        self._sock = sock
        self.fd = sock.fileno()
        self.passes_pidfds = passes_pidfds
        self.batch = max(queue_length + 1, READ_BATCH)
        self.queue_length = queue_length
        #: Bound by a server before (``open_socket``'s ``adopt``), not by this one.
        self.taken_over = False
        self._send_buffer = read_sysctl(_WMEM, 212992)
        self.full = False
        self.overridden = 0
        self.vouched: Dict[int, int] = {}
        self._open_pidfds: List[int] = []  # the batch's pidfds and receipts, closed by release()
        #: Of those, the receipts: each is written ``_APPLIED`` before it is closed, so a
        #: sender tells a receipt given from one the kernel closed unreceived.
        self._receipts: List[int] = []
        #: The parents read while judging the current batch (see ``_kinship.may_name``).
        self._parents: Dict[int, int] = {}
        self._bound = os.lstat(path)
        self._poll = select.poll()
        self._poll.register(self.fd, select.POLLIN)
        _closer.CLOSER.watch(sock)

    def at_path(self) -> bool:
        """Whether ``path`` still names this socket (as ``Fifo.at_path``)."""
        return still_at(self.path, self._bound)

    def queued(self) -> bool:
        """Whether a datagram is queued (FIONREAD would say 0 for an empty one at the
        head, and hide what is queued behind it)."""
        return bool(self._poll.poll(0))

    def stop_receiving(self) -> None:
        """Have every send from now on fail (``EPIPE``: the sender resyncs with the next
        server), where a send to a socket about to be closed succeeds and its datagram
        is dropped with it, a disarm among them; what is queued can still be read."""
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RD)

    def receive(self) -> List[Incoming]:
        """Read what is queued now (everything sent before the call: the queue holds at
        ``batch`` datagrams at the most), and what arrives meanwhile, up to ``batch``
        datagrams; return each datagram's message, with its subject's pid in place of
        the one it names, or its refusal (a run of datagrams with one error: one error,
        counting them). Never raises.

        The datagrams are read first, then their senders' pidfds polled for exit at
        once (one system call, not one per datagram), then each judged. The kernel's
        pidfds (the senders') stay open until ``release()``: some vouch for a subject
        until the batch is applied. The descriptors senders chose are closed on the way
        out, whatever happened, but a pidfd that vouches and a receipt (closed by
        ``release()``): a pidfd at once, anything else off the caller's thread (closing
        it can block).
        """
        self.release()
        received: List[_Datagram] = []
        chosen: List[int] = []  # what senders passed (SCM_RIGHTS)
        kept: Set[int] = set()  # of those, the pidfds that vouch, and the receipts
        pidfds: Set[int] = set()  # of those, the ones known to be pidfds
        vouched, open_pidfds = self.vouched, self._open_pidfds
        recvmsg = self._sock.recvmsg
        charged = 0  # to the senders' send buffers (all of it: a single sender's, at worst)
        try:
            for _ in range(self.batch):
                try:
                    data, ancillary, flags, _ = recvmsg(PIPE_BUF + 1, _ANCILLARY, _CLOEXEC)
                except (BlockingIOError, InterruptedError):
                    break
                except OSError as e:  # never expected on a bound datagram socket
                    logger.error("receiving from %s: %s", self.path, e)
                    break
                if not data and not ancillary:  # the end: stop_receiving(), all read
                    break
                charged += _charge(len(data))
                datagram = _parse(data, ancillary, flags, open_pidfds, chosen)
                received.append(datagram)
                _, _, _, _, rights, named = datagram
                if named is not None:  # one pidfd: closing it never blocks
                    pidfds.add(rights[0])
                elif len(rights) > 1:  # refused for them: let go at once, not at the end
                    _closer.CLOSER.close(rights)
                    del chosen[len(chosen) - len(rights) :]
            # With a long queue (net.unix.max_dgram_qlen raised), a sender of large
            # datagrams waits for its send buffer long before the queue is full.
            self.full = len(received) >= self.queue_length or charged >= self._send_buffer
            if not received:
                return []
            exited = _exited([fd for _, _, _, fd, _, _ in received if fd >= 0])
            self._parents = {}
            out: List[Incoming] = []
            run: Optional[RemoteProtocolError] = None  # the last result, if an error
            for datagram in received:
                _, _, _, sender_fd, rights, _ = datagram
                result = self._judge(datagram, sender_fd in exited)
                if rights and type(result) is Sync:  # a receipt: closed once applied
                    kept.add(rights[0])
                    open_pidfds.append(rights[0])
                    if rights[0] not in pidfds:
                        self._receipts.append(rights[0])
                if extends_run(run, result):  # as a run of such lines on the FIFO
                    run.lines += 1  # type: ignore[union-attr]
                    continue
                if type(result) in ABOUT_A_PROCESS:  # only these vouch for a pid
                    # The first one vouches: were a pid's process to exit and its pid be
                    # reused within the batch, the first one's death refuses the bind.
                    fd = rights[0] if rights else sender_fd  # < 0: none (the kernel's error)
                    if fd >= 0 and vouched.setdefault(result.pid, fd) == fd and rights:  # type: ignore[union-attr]
                        kept.add(fd)
                        open_pidfds.append(fd)
                out.append(result)
                run = result if isinstance(result, RemoteProtocolError) else None
            return out
        finally:
            others = []
            for fd in chosen:
                if fd in kept:
                    continue
                if fd in pidfds:  # the usual case, closed at once: no thread is woken
                    with contextlib.suppress(OSError):
                        os.close(fd)
                else:
                    others.append(fd)
            if others:
                _closer.CLOSER.close(others)

    def release(self) -> None:
        """Close the batch's pidfds (the senders', and those ``vouched``) and its
        receipts, once the batch is applied: a receipt is written ``_APPLIED`` first."""
        if self._receipts:
            _give(self._receipts)
            self._receipts.clear()
        for fd in self._open_pidfds:
            try:  # noqa: SIM105 - contextlib.suppress costs a call per descriptor
                os.close(fd)
            except OSError:
                pass
        self._open_pidfds.clear()
        self.vouched.clear()

    def _judge(self, datagram: _Datagram, sender_exited: bool) -> Incoming:
        """One datagram: its message for its subject, or why not. ``sender_exited``: the
        kernel gave a pidfd of the sender, and it polled as exited."""
        data, flags, creds, sender_fd, rights, named = datagram
        line = data[:-1] if data.endswith(b"\n") else data
        if flags & _MSG_TRUNC or len(line) > PIPE_BUF:  # as an over-long line on the FIFO
            return LineTooLong(f"datagram longer than {PIPE_BUF} bytes", data[:64])
        if creds is None:
            return MalformedMessage("datagram without credentials", data[:64])
        message = decode_one(line)
        if isinstance(message, Exception):
            return message
        pid, uid, _ = creds
        if isinstance(message, Sync):  # it names nobody
            # What it may carry is a receipt: a pipe, closed by release() once the batch
            # is applied, not judged (ftimer exec opens its gate on it: a command run
            # before its arm bound it would exit first, and the arm be refused), and on
            # this thread (a pipe's close never blocks; what the closer threads close
            # may, and a receipt waiting behind them would fail its sender). Or a pidfd.
            if len(rights) > 1 or (rights and named is None and not _receipt(rights)):
                why = "a descriptor that is neither a receipt's pipe nor a pidfd"
                return _refused(RejectReason.FOREIGN_SUBJECT, message, pid, why)
            return message
        if pid == 0:
            why = (
                "the sender is in a PID namespace the server cannot see: run the server in "
                "the workers' PID namespace or an ancestor of it"
            )
            return _refused(RejectReason.SENDER_NOT_VISIBLE, message, 0, why)
        # Descriptors first: the kernel puts the sender's pidfd after those it carried, so
        # too many leave no room for it, and none left in the server give neither.
        if len(rights) > 1:
            why = "more than one descriptor"
            return _refused(RejectReason.FOREIGN_SUBJECT, message, pid, why)
        if flags & _MSG_CTRUNC:  # what it carried was lost: never take the sender for it
            why = "the descriptors it carried could not be received (none left?)"
            return _refused(RejectReason.UNVERIFIABLE, message, pid, why)
        # Alive now, the sender still owns the pid the kernel gave (a pid is not reused while
        # its process lives); reading the pidfd's pid costs ten times this poll. With no
        # pidfd where the kernel gives one (before 6.17 it gives an error for a sender
        # already reaped), nothing shows that the pid is still the sender's.
        gone = sender_exited or (self.passes_pidfds and -sender_fd in _GONE)
        if gone and (not rights or (named is not None and _exited(rights))):
            # About the sender itself, which has exited (a worker that ended right after
            # its last step), or about a process that has exited too (the sender's own
            # pidfd, "as if it carried none", among them): its timers went with it, and
            # an arm has nothing to watch.
            return Moot(request_of(message))
        if gone or (self.passes_pidfds and sender_fd == -1):
            why = "it exited before its message was read"
            return _refused(RejectReason.SENDER_GONE, message, pid, why)
        if (
            self.passes_pidfds
            and sender_fd < 0
            and not isinstance(message, _NEVER_SIGNALS)
            and getattr(message, "start_time", None) is None
        ):
            # Another error (EMFILE: the server out of descriptors) says nothing of the
            # sender, alive or not. Taken on its pid: what signals nobody (a disarm
            # refused would leave a healthy worker to be reaped), and what names the
            # sender's start time, checked at binding as on a kernel without pidfds (a
            # heartbeat refused left its worker's last deadline to reap it).
            why = f"no pidfd of the sender: {os.strerror(-sender_fd)}"
            why += out_of_descriptors(-sender_fd)
            return _refused(RejectReason.UNVERIFIABLE, message, pid, why)
        subject = pid
        if rights:
            reason, subject, why = _kinship.subject(
                pid, uid, named=named, parents=self._parents, processes=self._processes
            )
            if reason is RejectReason.NO_SUCH_PROCESS:
                if _exited(rights):
                    # It names a process that exited before it was read (ftimer exec's
                    # quick command, or its disarm once the command was reaped).
                    return Moot(request_of(message))
                # Alive, as its pidfd says, yet not in /proc: never counted as exited.
                reason, why = RejectReason.UNVERIFIABLE, f"/proc hides process {named}"
            if reason is not None:
                return _refused(reason, message, pid, why)
            if subject != pid and not isinstance(message, _CLOCKS_UNCHECKED):
                # The deadline and start time are the sender's readings, of its clocks.
                reason, why = self._sender_s_clocks(pid, sender_fd)
                if reason is not None:
                    return _refused(reason, message, pid, why)
        if message.pid == subject:
            return message
        self.overridden += 1
        return msgspec.structs.replace(message, pid=subject)

    def _sender_s_clocks(self, sender: int, pidfd: int) -> Tuple[Optional[RejectReason], str]:
        """Why a message ``sender`` (``pidfd``: the kernel's of it, if >= 0) wrote for
        another process is refused for its clocks (another time namespace's), or
        ``(None, "")``."""
        try:
            offsets = self._processes.clock_offsets(sender)
        except ProcessLookupError:
            return RejectReason.SENDER_GONE, "it exited before its message was read"
        except Exception as e:  # an inspector's: refuse, never raise
            return RejectReason.UNVERIFIABLE, f"cannot read the sender's clocks: {e!r}"
        if pidfd >= 0 and _exited([pidfd]):  # what was read may be a dead one's: (0, 0)
            return RejectReason.SENDER_GONE, "it exited before its message was read"
        if offsets == (0, 0):
            return None, ""
        return RejectReason.OTHER_CLOCK, f"the sender's clocks: {clocks_apart(offsets)}"

    def close(self) -> None:
        """Close the socket and remove its path, if it is still this socket's."""
        self.release()
        _closer.CLOSER.unwatch(self._sock)
        self._sock.close()
        unlink_if_same(self.path, self._bound)


#: A datagram as read: its bytes, recvmsg's flags, the sender's (pid, uid, gid) if the
#: kernel gave them, the sender's pidfd (-1: none), the descriptors it carried and the pid
#: the one it carried names (see ``_parse``).
_Datagram = Tuple[bytes, int, Optional[Tuple[int, int, int]], int, List[int], Optional[int]]


def _parse(
    data: bytes,
    ancillary: List[Tuple[int, int, bytes]],
    flags: int,
    sender_fds: List[int],
    chosen: List[int],
) -> _Datagram:
    """Sort a datagram's ancillary data; every descriptor in it goes into ``sender_fds``
    (the kernel's pidfd of the sender) or ``chosen`` (what the sender passed), for the
    caller to close, before anything else can fail. With one passed, also the pid it
    names (``pidfd_pid``)."""
    creds: Optional[Tuple[int, int, int]] = None
    sender_fd = -1
    rights: List[int] = []
    for level, kind, cdata in ancillary:
        if level != _SOL_SOCKET:
            continue
        if kind == _SCM_CREDENTIALS and len(cdata) >= _UCRED.size:
            creds = _UCRED.unpack_from(cdata)
        elif kind == _SCM_PIDFD and len(cdata) >= 4:
            sender_fd = _FD.unpack_from(cdata)[0]  # -errno if none could be made
            if sender_fd >= 0:
                sender_fds.append(sender_fd)
        elif kind == _SCM_RIGHTS:
            fds = array.array("i")
            fds.frombytes(cdata[: len(cdata) - len(cdata) % fds.itemsize])
            chosen += fds
            rights += fds
    # Which process a carried pidfd names, read at once: ftimer exec reaps its command
    # as soon as its datagram is read, and a reaped process's pidfd names none.
    named = pidfd_pid(rights[0]) if len(rights) == 1 else None
    return data, flags, creds, sender_fd, rights, named


def _receipt(rights: List[int]) -> bool:
    """Whether the descriptors a sync datagram carried are a receipt: one anonymous pipe
    (told by its name in /proc, which asks nothing of the file: a file of a FUSE mount
    that never answers would block ``fstat``)."""
    try:
        return len(rights) == 1 and os.readlink(f"/proc/self/fd/{rights[0]}").startswith("pipe:")
    except OSError:
        return False


def _refused(reason: RejectReason, message: Message, pid: int, why: str) -> Refused:
    scope = getattr(message, "scope_id", None)
    return Refused(reason, request_of(message), pid, why, scope)


def _give(receipts: List[int]) -> None:
    """Write ``_APPLIED`` into each receipt, never waiting (a pipe its sender filled gets
    none). SIGPIPE is blocked meanwhile: a receipt whose sender closed its end fails the
    write (EPIPE), and a program embedding the server that set SIGPIPE's action back to
    the default would die of it; the one raised is taken back before the mask is."""
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGPIPE})
    broken = False
    try:
        for fd in receipts:
            try:
                os.set_blocking(fd, False)
                os.write(fd, _APPLIED)
            except BrokenPipeError:
                broken = True
            except OSError:  # full: its sender filled it
                pass
    finally:
        if broken and signal.SIGPIPE not in mask:
            signal.sigtimedwait({signal.SIGPIPE}, 0)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)


def _exited(pidfds: List[int]) -> FrozenSet[int]:
    """Those of ``pidfds`` (distinct open pidfds) whose process has exited: a pidfd
    polls readable from then."""
    if not pidfds:
        return frozenset()
    poller = select.poll()
    for fd in pidfds:
        poller.register(fd, select.POLLIN)
    return frozenset(fd for fd, _ in poller.poll(0))


def open_socket(
    path: str,
    *,
    mode: int = 0o600,
    group: Optional[Union[int, str]] = None,
    processes: Optional[ProcessInspector] = None,
    adopt: Optional[Tuple[int, int]] = None,
) -> DatagramSocket:
    """Bind the datagram socket at ``path`` (its directory is the FIFO's, already made
    safe), with the FIFO's ``mode`` and ``group``; ``processes`` (default: the system's)
    tells the parent and uid of a process a datagram names.

    A socket left at the path by this user (a server that died) is replaced; anything
    else there is refused, never removed. ``adopt``: a descriptor of a datagram socket
    bound at ``path`` already (the last server's, kept open by systemd) and the queue
    length it was made with, used instead, with what is queued on it.

    Raises:
        FifoError: the path holds something else, or another user's socket, or the
            socket cannot be bound, or ``adopt`` is not a datagram socket bound there.
    """
    if adopt is not None:
        return _adopt(path, adopt, mode, group, processes)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    except OSError as e:
        raise FifoError(path, f"cannot examine it: {e.strerror}", e.errno) from None
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise FifoError(path, "something other than a socket is there; not removing it")
        if st.st_uid != os.geteuid():
            raise FifoError(path, f"a socket of uid {st.st_uid} is there; not removing it")
        if _answers(path):
            raise FifoError(path, "a process is bound to the socket there; not removing it")
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass  # removed meanwhile (its server's stop): the bind says what is there now
        except OSError as e:
            why = f"cannot remove the socket left there: {e.strerror}"
            raise FifoError(path, why, e.errno) from None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
    try:
        passes_pidfds = _pass_credentials(sock)
        old = os.umask(0o177)  # no moment at which others may connect
        try:
            sock.bind(path)
        finally:
            os.umask(old)
    except OSError as e:
        sock.close()
        raise FifoError(path, f"cannot bind the socket: {e.strerror or e}", e.errno) from None
    bound = os.lstat(path)
    what = f"make the socket mode {mode:04o}"
    try:
        gid = resolve_group(group)
        os.chmod(path, mode)
        if gid is not None:
            what = f"give the socket group {gid}"
            os.chown(path, -1, gid)
        sock.setblocking(False)
        return DatagramSocket(path, sock, passes_pidfds, _queue_length(), processes)
    except BaseException as e:
        sock.close()
        unlink_if_same(path, bound)  # what this call bound, not left behind
        if isinstance(e, OSError) and not isinstance(e, FifoError):  # resolve_group's says why
            raise FifoError(path, f"cannot {what}: {e.strerror or e}", e.errno) from None
        raise


def _pass_credentials(sock: socket.socket) -> bool:
    """Have the kernel give each datagram's sender (``SO_PASSCRED``), and a pidfd of it
    where it can (``SO_PASSPIDFD``, Linux 6.5); return whether it can.

    Raises:
        OSError: credentials cannot be asked for.
    """
    sock.setsockopt(socket.SOL_SOCKET, _SO_PASSCRED, 1)
    try:
        sock.setsockopt(socket.SOL_SOCKET, _SO_PASSPIDFD, 1)
    except OSError:  # before Linux 6.5: pid and start time, as over the FIFO
        return False
    return True


def _adopt(
    path: str,
    adopt: Tuple[int, int],
    mode: int,
    group: Optional[Union[int, str]],
    processes: Optional[ProcessInspector],
) -> DatagramSocket:
    """``open_socket()`` of a socket bound already (see there)."""
    fd, queue_length = adopt
    try:
        sock = socket.socket(fileno=fd)
    except OSError as e:
        raise FifoError(path, f"cannot take over the socket given: {e.strerror}", e.errno) from None
    try:
        if (sock.family, sock.type) != (socket.AF_UNIX, socket.SOCK_DGRAM):
            raise FifoError(path, "the socket given is not an AF_UNIX datagram socket")
        if not reached_at(sock, path):
            raise FifoError(path, "the socket given is not bound there")
        passes_pidfds = _pass_credentials(sock)
        gid = resolve_group(group)
        os.chmod(path, mode)
        if gid is not None:
            os.chown(path, -1, gid)
        sock.setblocking(False)
        taken = DatagramSocket(path, sock, passes_pidfds, queue_length, processes)
        taken.taken_over = True
        return taken
    except BaseException as e:
        sock.detach()  # the caller's descriptor, left for it to close
        if isinstance(e, OSError) and not isinstance(e, FifoError):
            why = f"cannot take over the socket given: {e.strerror or e}"
            raise FifoError(path, why, e.errno) from None
        raise


def forgo_socket(path: str, fd: int) -> None:
    """Close ``fd``, a socket given to be taken over (``open_socket``'s ``adopt``), and
    remove ``path`` if it leads to that socket and the file is this user's (as
    ``open_socket`` replaces one left by a server that died): a new one may be bound in
    its place. Never raises (what cannot be done is left: the bind that follows says
    why)."""
    try:
        sock = socket.socket(fileno=fd)
    except OSError:  # not a socket
        with contextlib.suppress(OSError):
            os.close(fd)
        return
    with sock, contextlib.suppress(OSError):
        if reached_at(sock, path) and os.lstat(path).st_uid == os.geteuid():
            os.unlink(path)


def shut_for_reading(fd: int) -> bool:
    """Whether the socket ``fd`` was shut for reading (``stop_receiving()``: a server
    killed as it stopped): sends to it fail, so it is no socket to serve."""
    poller = select.poll()
    poller.register(fd, select.POLLRDHUP)
    return any(events & select.POLLRDHUP for _, events in poller.poll(0))


def _answers(path: str) -> bool:
    """Whether a process may be bound to the socket at ``path`` (another server's, or its
    control socket): only a socket that refuses connections is left over from a server
    that died; one that cannot be asked (a timeout, no permission) counts as held."""
    for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
        with socket.socket(socket.AF_UNIX, kind | socket.SOCK_CLOEXEC) as probe:
            probe.settimeout(1.0)  # a listener whose backlog is full never accepts
            try:
                probe.connect(path)
            except (ConnectionRefusedError, FileNotFoundError):
                return False  # nobody bound to it (or gone meanwhile)
            except OSError as e:
                if e.errno == errno.EPROTOTYPE:
                    continue  # a socket of the other type: ask it as that
                return True
            return True
    return True


def _queue_length() -> int:
    return max(1, read_sysctl(_QLEN, 10))  # Linux's default


def _charge(size: int) -> int:
    """What a datagram of ``size`` bytes is charged to its sender's send buffer while
    queued, or a little more: its data and the kernel's share, rounded up to a power of
    two (the slab it is allocated from), and the ``sk_buff`` (measured on Linux 6.18:
    766 bytes for a 150-byte datagram, 4,346 for a 3,000-byte one)."""
    return (1 << (size + 320 - 1).bit_length()) + 256
