"""One process's connection to one server: a lock, the resync state, a writer, fork.

The server keys timers by pid, so every client of this process that sends to the same
server with the same protocol and transport shares one Channel (``_shared.channel_for``
finds it): a resynchronisation ("disarm everything of this pid, then re-arm what it has
armed") must see every scope the process armed.
What to send is ``Resync``'s (sans-I/O); how, the writers' (``_fifo``, ``_socket``).

Version 2 keeps its connection open. Version 1 (torch's server, FIFO only) opens, writes
and closes per message: torch's server reads with a blocking ``readline()`` that only
returns to its expiry check once every writer has closed the FIFO.

The hot path is one ``os.write()`` on the connection's descriptor (a FIFO, or a connected
datagram socket), under the lock, while the server is in sync. Anything else goes through
``_deliver``: a lost connection (the server left or restarted) reconnects and
resynchronises on the spot; a failure marks the channel for resync, and a background
thread retries with backoff while something is armed or a disarm was lost
(``_retry_loop``: a few lines at a time, letting go of the lock in between). Another
watches a kept connection while something is armed or was disarmed of late
(``_watch``): a worker stuck in a block sends nothing more, and a server that restarted
without its state would never learn its timer.
"""

from __future__ import annotations

import errno
import os
import threading
import time
import weakref
from typing import Dict, List, Optional, Sequence, Set, Tuple, Union

from ftimer_protocol import DumpHook

from . import _dump
from ._errors import ServerStalled, ServerUnavailable
from ._paths import Route, system_route
from ._proc import process_start_time
from ._resync import (
    RETRY_CHUNK,
    RETRY_LINE_WAIT,
    RETRY_PAUSE,
    Armed,
    Arming,
    Line,
    Resync,
)
from ._signals import start_helper
from ._socket import open_pidfd
from ._transport import open_writer
from ._wire import V1Lines, V2Lines
from ._writer import ConnectionLost, Writer, owns

__all__ = ["Channel"]

Lines = Union[V1Lines, V2Lines]

#: Seconds between two checks of a kept connection while something is armed: how soon
#: a server that restarted without its state has this process's timers again.
WATCH_EVERY = 1.0


class Channel:
    """Delivers lines to one server for one process (or for one given ``pid``).

    Every public method takes ``lock``, reentrant so that a signal handler that arms or
    disarms while the interrupted code was doing so does not deadlock. Lines are built by
    the caller.

    Args:
        route: where the server is.
        protocol: 1 (open per message, torch's format, FIFO only) or 2 (kept open).
        pid: the process the timers belong to; None for this process, following forks.

    Raises:
        ValueError: the pid breaks the schema.
    """

    def __init__(self, route: Route, protocol: int, pid: Optional[int] = None) -> None:
        self.route = route
        #: A per-user default that has never connected: it moves to the system daemon's
        #: route once that is there (a worker started before the daemon, at boot).
        self.may_move = route.owner is not None
        self.protocol = protocol
        self.keep_open = protocol != 1
        self.follows_process = pid is None
        self.lock = threading.RLock()
        self.pid = os.getpid() if pid is None else pid
        self.start_time = process_start_time(self.pid)
        self._lines: weakref.WeakSet[Lines] = weakref.WeakSet()
        self.state = Resync(self.lines(0, None))
        #: The registry (``state.armed``, the same dict): scope -> (arm line, client).
        self.armed: Dict[str, Armed] = self.state.armed
        self._writer: Optional[Writer] = None  # version 2's connection
        #: Version 1's writers of one message open now (closed in a forked child).
        self._once: Set[Writer] = set()
        #: The FIFO version 1 wrote to last (its ``end``), and an O_PATH descriptor of it,
        #: held so that a FIFO made anew gets another inode number (ext4 gives it an
        #: unlinked one's while nothing holds that), or -1. Not a writer: a torch server
        #: expires nothing while one holds its FIFO open.
        self._once_end: Optional[Tuple[int, int]] = None
        self._once_pin = -1
        # The hot path's descriptor: >= 0 only while connected, in sync, and the writer
        # delivers a line with one os.write() on it.
        self._fd = -1
        self._pidfd = -1  # of ``pid``, for the socket; opened once, at the first need
        self._clients = 0
        #: A connection was ever opened (since a fork): a server may hold its lines.
        self._reached = False
        self._retry: Optional[threading.Thread] = None
        self._watching: Optional[threading.Event] = None  # set: the connection's watch ends
        self._sending = False  # a delivery is writing (see _deliver)
        #: Calls a delivery deferred (a signal handler's, made while it wrote).
        self._deferrals = 0
        _channels.add(self)

    @property
    def needs_resync(self) -> bool:
        """The server's view of this process is unknown: the next delivery resyncs."""
        return self.state.needs_resync

    @property
    def outages(self) -> int:
        """Outages so far: a client warns once per outage."""
        return self.state.outages

    @property
    def transport(self) -> Optional[str]:
        """``"fifo"`` or ``"socket"`` while connected (protocol 2), else None."""
        return None if self._writer is None else self._writer.kind

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
    #
    # Any other exception out of a delivery (a signal handler's, KeyboardInterrupt)
    # leaves the server's view unknown: it may hold the line or not, and a resync may
    # have stopped half-way. The registry then says what the caller was told (an arm
    # that raised did not happen), and the resync makes the server agree.

    def arm(self, scope_id: str, line: bytes, owner: object, timeout: float, keep: bool) -> None:
        """Arm ``scope_id`` with ``line``.

        Args:
            keep: when delivery fails, still count the scope as armed (so it is re-sent
                when the server is back); else leave it as it was.

        Raises:
            ServerUnavailable: not delivered (``ServerStalled``: no room in time).
            Whatever interrupted the delivery (the scope is then left as it was).
        """
        with self.lock:
            armed = self.armed
            previous = armed.get(scope_id)
            entry = (line, owner)
            try:
                # Resync.arm(), inlined (every expires block comes here), and inside the
                # try: an interrupt that lands once the scope is recorded undoes it below.
                armed[scope_id] = entry
                if self._fd >= 0:
                    try:
                        os.write(self._fd, line)  # at most PIPE_BUF: all of it, or nothing
                        return
                    except OSError:
                        pass  # a full queue or a gone server: _deliver() sorts it out
                # A resync sent first carries the scope's previous line, not this one:
                # this one goes last, so that an arm that raised did not reach the server.
                if previous is None:
                    self.state.unsent(scope_id)
                self._deliver([(scope_id, line)], timeout, arming=(scope_id, previous))
            except ServerUnavailable as e:
                if not keep:
                    # Unless a signal handler armed or released the scope meanwhile: its
                    # call, made later, stands.
                    if armed.get(scope_id) is entry:
                        self.state.unarm(scope_id, previous)
                    if previous is None and self.state.arm_left(scope_id):
                        # Its line may have gone out all the same (a signal handler's
                        # lines, sent after it, are what failed): the resync disarms it.
                        # (Had it a previous line, the resync re-arms that one.)
                        self.state.lost_disarms((scope_id,))
                self._failed(e)
                raise
            except BaseException:
                if armed.get(scope_id) is entry:  # as above
                    self.state.unarm(scope_id, previous)
                self.state.lost_disarms((scope_id,))  # it may have reached the server
                self._failed(None)
                raise

    def disarm(self, scope_id: str, line: bytes, timeout: float) -> None:
        """Disarm ``scope_id`` with ``line``; a failed disarm is made good by the resync.

        Raises:
            ServerUnavailable: not delivered.
            Whatever interrupted the delivery.
        """
        with self.lock:
            owed: Optional[bool] = None
            try:
                # Inside the try: an interrupt that lands once the scope is forgotten (or
                # before) still counts it released, and its disarm lost (if owed).
                owed = self.state.disarm(scope_id)
                if self._fd >= 0:  # as in arm()
                    try:
                        os.write(self._fd, line)
                        return
                    except OSError:
                        pass
                self._deliver([(scope_id, line)], timeout, (scope_id,))
            except BaseException as e:
                if owed is None:
                    owed = self.state.disarm(scope_id)
                if owed:
                    self.state.lost_disarms((scope_id,))
                self._failed(e if isinstance(e, ServerUnavailable) else None)
                raise

    def disarm_all(self, timeout: float, owner: Optional[object] = None) -> None:
        """Disarm every scope of the registry (one disarm each, never a ``disarm_all``
        of the pid: other channels arm for it too), or only those ``owner`` armed
        (sending nothing when it armed none; with no owner, the backlog is delivered
        all the same).

        Raises:
            ServerUnavailable: not delivered.
            Whatever interrupted the delivery.
        """
        with self.lock:
            state = self.state
            # Which scopes, before any is forgotten: an interrupt that lands while they
            # are forgotten or sent still counts every one of them disarmed, and lost.
            scopes = state.scopes_of(owner)
            owed: Optional[List[str]] = None
            try:
                lines, owed = state.disarm_all(scopes)
                if lines or owner is None:
                    # (An owner that armed nothing owes the server nothing: a resync due
                    # for another reason is the next delivery's, or the retries'.)
                    self._deliver(list(zip(scopes, lines)), timeout, scopes)
            except BaseException as e:
                if owed is None:
                    owed = state.disarm_all(scopes)[1]
                state.lost_disarms(owed)
                self._failed(e if isinstance(e, ServerUnavailable) else None)
                raise

    def send(self, line: bytes, timeout: float, forget: Optional[str] = None) -> None:
        """Deliver a line that leaves no state behind (expire now), forgetting ``forget``.

        Raises:
            ServerUnavailable: not delivered.
            Whatever interrupted the delivery.
        """
        with self.lock:
            previous = None if forget is None else self.state.armed.get(forget)
            if forget is not None:
                self.state.expired(forget, line)
            deferrals = self._deferrals
            try:
                self._deliver([(forget, line)], timeout)
            except BaseException as e:
                # The expire may not have reached the server: the timer it replaced stands
                # (the resync re-arms it), or the stuck worker is never reaped. Unless a
                # signal handler's call came meanwhile: a release of the scope, say, which
                # stands (and an expire that failed then is not made good).
                if forget is not None and previous is not None and deferrals == self._deferrals:
                    self.state.unarm(forget, previous)
                self._failed(e if isinstance(e, ServerUnavailable) else None)
                raise

    def wait_read(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds until the server has read what this channel
        delivered; return whether it has (True when nothing is connected)."""
        with self.lock:
            return self._writer is None or self._writer.wait_read(timeout)

    def attach(self) -> None:
        """Count one more client using this channel."""
        with self.lock:
            self._clients += 1

    def detach(self) -> None:
        """Count one client less; the last one closes the connection, once nothing is owed
        to the server (a disarm lost in an outage is still delivered by the retries)."""
        with self.lock:
            self._clients -= 1
            if not self._retrying():
                self._let_go()

    def _retrying(self) -> bool:
        """Whether the retry thread runs (lock held). A start a signal handler's exception
        interrupted may have left one that never ran: that is no retry."""
        return self._retry is not None and self._retry.is_alive()

    def _let_go(self) -> None:
        """Close the connection and the pidfd if no client uses them (lock held)."""
        if self._clients <= 0:
            self._disconnect()
            self._unpin_once()
            if self._pidfd >= 0:
                fd, self._pidfd = self._pidfd, -1
                os.close(fd)

    # -- delivery (lock held) -----------------------------------------------------------

    def _deliver(
        self,
        lines: List[Line],
        timeout: float,
        disarmed: Optional[Sequence[str]] = None,
        *,
        arming: Optional[Arming] = None,
    ) -> None:
        """Send the backlog, then ``lines`` (each with its scope), reconnecting and
        resynchronising as needed; all of it within ``timeout`` seconds (no wait at all
        after a stall). What the resync already delivered is not sent again.

        Called again while delivering (from a signal handler of this thread), it only
        defers ``lines`` (``disarmed``: the scopes they disarm, as ``Resync.defer``):
        the delivery in progress sends them after its own.

        Args:
            arming: (scope, what it had before): ``lines`` arm that scope, and a resync
                sent first carries what it had before (``Resync.resync``).

        Raises:
            ServerUnavailable: the server is absent, or stalled past ``timeout``.
        """
        state = self.state
        if self._sending:
            state.defer(lines, disarmed)
            self._deferrals += 1
            return
        self._fd = -1  # no hot path for a signal handler's call until this is done
        try:
            # Before the state is read (a handler's lines come after), and inside the
            # try: set and left stuck, it would put every later line aside for ever.
            self._sending = True
            if self.keep_open and self._writer is None and state.needs_resync:
                # Connect before the resync is worked out (a line per scope armed, or
                # disarmed, since the server was lost): a server still absent fails the
                # call at once, not after a walk of the registry, which a loop of
                # distinct scopes under "warn" or "ignore" grows with every block.
                self._connect()
            elif (
                self.keep_open
                and state.stalled
                and self._writer is not None
                and not self._writer.wait_room(0)
                and not self._writer.lost()
            ):
                # Still full, and still the server's: fails as the first line would.
                raise ServerStalled(
                    errno.EAGAIN,
                    "the ftimer server has not drained its FIFO or socket within the write timeout",
                    self.route.path,
                )
            end = time.monotonic() + state.timeout(timeout)
            backlog = state.backlog(arming)
            while backlog or lines:
                self._send(backlog, lines, end, arming)
                # A reconnection from now on resyncs with the arm's line: it went out.
                backlog, lines, arming = [], state.take_deferred(), None
        finally:
            self._sending = False
        # Deferred after the last take, before _sending was cleared: sent now, in order
        # (a handler's call from here on sends its lines itself).
        late = state.take_deferred()
        if late:
            self._deliver(late, timeout)
            return
        self._in_sync()

    def _in_sync(self) -> None:
        """Everything owed went through (lock held): the server agrees, the hot path is
        open again (or the connection let go of, when no client is left)."""
        self.state.delivered()
        if self._clients <= 0 and not self._retrying():
            # A call that raced the last client's close() (or a retry's last delivery):
            # no client is left to let go of the connection it opened.
            self._let_go()
        elif self._writer is not None:
            self._fd = self._writer.hot_fd

    def _send(
        self,
        backlog: List[Line],
        lines: List[Line],
        end: float,
        arming: Optional[Arming] = None,
    ) -> None:
        """Send ``backlog`` then ``lines`` before ``end`` (``time.monotonic()``); after
        reconnecting, the resync (``arming``: as ``_deliver``) then ``lines``.

        Raises:
            ServerUnavailable: as ``_deliver``.
        """
        if not self.keep_open:
            once = self._open_once()
            try:
                self._write_all(once, backlog + lines, end)
            finally:
                self._close_once(once)
            return
        writer: Optional[Writer] = self._writer
        for reconnecting in (False, True):
            if writer is None:
                writer = self._connect()
            try:
                if not writer.owned():  # closed under it: lost, its number not ours
                    raise ConnectionLost
                self._write_all(writer, backlog + lines, end)
                return
            except ConnectionLost:
                self._disconnect()
                writer = None
                if reconnecting:
                    raise self._lost() from None
                # The server left or restarted: its view is unknown, make it ours (the
                # last disarms delivered too: they may have died unread with the old).
                self.state.reconnected()
                backlog = self.state.resync(arming)

    def _write_all(self, writer: Writer, lines: List[Line], end: float) -> None:
        """Write ``lines``, each waiting for room until ``end`` at most, and record each
        one the connection accepted (``Resync.accepted``).

        Raises ConnectionLost (version 2), ServerUnavailable."""
        state = self.state
        scope_id: Optional[str] = None
        try:
            for scope_id, line in lines:
                # The call's time, not each line's: a resync waits no longer than a line.
                writer.write(line, max(0.0, end - time.monotonic()))
                state.accepted(scope_id, line)
        except BaseException as e:
            # A refusal, or an exception (a signal handler's) as the line went out: what
            # the server holds for its scope is unknown (forgetting more is harmless).
            state.unsure(scope_id, refused=isinstance(e, (ServerUnavailable, ConnectionLost)))
            if isinstance(e, ConnectionLost) and not self.keep_open:
                state.forget_progress()  # the reader left: the pipe may have gone too
                raise self._lost() from None
            raise

    def _open_once(self) -> Writer:
        """Protocol 1's writer of one message (open, write, close).

        Raises:
            ServerUnavailable: and then no reader may hold the pipe what the resync
                delivered went to: its progress is forgotten.
        """
        try:
            writer = self._open()
        except ServerUnavailable:
            self.state.forget_progress()
            raise
        if writer.end != self._once_end:
            if self._once_end is not None:
                # Another FIFO (torch's server makes its own anew at a restart): what the
                # old one held died unread, as with a lost connection of version 2.
                self.state.reconnected()
            self._pin_once(writer)
        self._once.add(writer)
        return writer

    def _pin_once(self, writer: Writer) -> None:
        """Hold the FIFO ``writer`` opened (see ``_once_pin``), letting go of the last."""
        self._unpin_once()
        self._once_end = writer.end
        try:
            fd = os.open(writer.path, os.O_PATH | os.O_CLOEXEC)
        except OSError:
            return  # its inode number may be another FIFO's later: no worse than before
        if owns(fd, writer.end):
            self._once_pin = fd
        else:
            os.close(fd)  # replaced in between: the next open finds it another

    def _unpin_once(self) -> None:
        fd, self._once_pin = self._once_pin, -1
        if self._once_end is not None and owns(fd, self._once_end):
            os.close(fd)

    def _close_once(self, writer: Writer) -> None:
        """Close a writer of ``_open_once``."""
        self._once.discard(writer)
        writer.close()

    def _lost(self) -> ServerUnavailable:
        what = "FIFO" if self.route.transport == "fifo" else "FIFO or socket"
        return ServerUnavailable(
            errno.EPIPE, f"the ftimer server closed or replaced its {what}", self.route.path
        )

    def _open(self) -> Writer:
        """Raises ServerUnavailable."""
        if self.may_move:
            # Never once connected: no server holds anything of this channel's yet.
            self.route = system_route(self.route) or self.route
        writer = open_writer(self.route, keep_open=self.keep_open, pidfd=self._subject)
        self.may_move = False  # connected: it stays with that server
        self._reached = True
        return writer

    def _connect(self) -> Writer:
        """Open version 2's connection, and start its watch (lock held).

        Raises:
            ServerUnavailable: as ``_open``.
        """
        writer = self._writer = self._open()
        ended = threading.Event()
        try:
            start_helper(
                _watch, (weakref.ref(self), weakref.ref(writer), ended), "ftimer-client-watch"
            )
        except RuntimeError:  # no thread to be had (a pids limit): it serves, unwatched
            return writer
        self._watching = ended
        return writer

    def _found_lost(self, writer: Writer) -> None:
        """``writer``'s server end was found gone while the server was taken to be in sync
        (lock held): drop it, and have the retry thread reconnect and resync, as a
        caller's next line would have."""
        if self._writer is writer and not self.state.needs_resync:
            self._disconnect()
            self.state.reconnected()
            self._failed(None)

    def _subject(self) -> int:
        """A pidfd of the process the timers are for, or -1 when that is the sender.

        Raises:
            ServerUnavailable: no pidfd of it can be had.
        """
        if self.follows_process or self.pid == os.getpid():
            return -1
        if self._pidfd < 0:
            self._pidfd = open_pidfd(self.pid)
        return self._pidfd

    def _disconnect(self) -> None:
        """Close the connection (lock held): what the resync delivered on it may be lost
        with it, so its progress is forgotten."""
        self._fd = -1
        self.state.forget_progress()
        if self._watching is not None:
            self._watching.set()
            self._watching = None
        if self._writer is not None:
            writer, self._writer = self._writer, None
            writer.close()

    def _failed(self, error: Optional[ServerUnavailable]) -> None:
        """A delivery failed with ``error``, or was interrupted (None)."""
        self._fd = -1  # out of sync: every line goes through _deliver() until resynced
        state = self.state
        state.failed(time.monotonic(), stalled=isinstance(error, ServerStalled))
        if not self._reached:
            state.owe_no_disarms()
        if not self._retrying() and state.retry_wanted:
            try:
                self._retry = start_helper(self._retry_loop, (), "ftimer-client-resync")
            except RuntimeError:
                # No thread to be had (a pids limit, or the interpreter shutting down):
                # the failure stays the caller's (its policy), and the next delivery
                # resyncs and tries to start the retries again, as _connect's watch.
                self._retry = None

    def _retry_loop(self) -> None:
        """The retry thread: deliver what the resync owes, with backoff, until the server
        agrees (or nothing is owed any more), never holding the lock while it waits.

        It sends ``RETRY_CHUNK`` lines at most per hold of the lock (``_retry_step``),
        each without waiting; when the server's queue or pipe is full, it waits for room
        (up to ``RETRY_LINE_WAIT``) with the lock let go of, and a wait in vain is a
        failed retry (backing off). Progress is kept: the next step goes on where this
        one stopped (``Resync.next_owed``). So a caller, or a signal handler, waits for
        the lock a step at most (microseconds), whatever the resync's length.

        Ordering, when callers interleave with a resync partly sent (the server keeps,
        per scope, the last line it read; the connection delivers lines in the order it
        accepted them):

        - Every line, the retry's or a caller's, is chosen under the lock from the
          registry as it is then (``Resync.owed``), never from a list made earlier, and
          recorded under the same hold once accepted (``Resync.accepted``). So no line
          is stale when it goes out: once a caller released ``s``, the retry owes ``s``
          its disarm (when the caller's was lost) or nothing, never the arm it owed a
          step before.
        - A caller's own line goes after everything the resync still owes
          (``Resync.backlog``), and a delivery that got it through has completed the
          resync (``Resync.delivered``) before the lock is let go of: no retry line
          can follow it from the resync it overtook. One that failed before its own
          line leaves its scope owed (an arm that raised is undone, a disarm counted
          lost), and what it got through is the resync's progress.
        - An exception as a line goes out leaves its scope's fate unknown: it is owed
          again (``Resync.unsure``). A lost or replaced connection forgets all progress
          (``Resync.forget_progress``): what it held may never be read.

        So whatever the interleaving, when nothing is owed the server holds, for every
        scope armed or whose disarm was lost, the registry's line; a released scope is
        never left armed behind a re-arm of the resync.
        """
        me = threading.current_thread()
        full: Optional[Writer] = None  # the writer that found no room: waited on unlocked
        early = False  # a stalled server made room before the retry was due
        while True:
            room = True
            if full is not None:
                room = full.wait_room(RETRY_LINE_WAIT)
                if not self.keep_open:
                    self._close_once(full)  # protocol 1's own, for the wait
            with self.lock:
                if self._retry is not me:
                    return  # closed, or superseded after a fork
                state = self.state
                # No room in time: a failed retry, unless the connection changed meanwhile
                # (a caller reconnected: the next step tries the new one).
                if not room and state.needs_resync and (not self.keep_open or full is self._writer):
                    state.retry_failed(time.monotonic())
                full = None
                wait = state.next_retry(time.monotonic())
                if wait is None:
                    self._retry = None
                    self._let_go()  # the last client may have closed meanwhile
                    return
                # A stalled server (there, but not reading: stopped, say) is sent what it
                # is owed as soon as it makes room, not at the backoff's end: back from
                # its absence, it judges the arms it held soon after (core._horizon).
                parked = self._writer if state.stalled and self.keep_open else None
                if wait <= 0 or early:
                    early = False
                    try:
                        step = self._retry_step()
                    except ServerUnavailable:
                        state.retry_failed(time.monotonic())
                        continue
                    if step is True:
                        self._retry = None
                        self._let_go()
                        return
                    if step is False:  # more to send: let a caller have the lock
                        wait, parked = RETRY_PAUSE, None
                    else:
                        full = step
                        continue
            if parked is None:
                time.sleep(wait)
            else:
                early = parked.wait_room(wait)

    def _retry_step(self) -> Union[bool, Writer]:
        """Send the next ``RETRY_CHUNK`` lines at most of what the resync owes, none of
        them waiting for room (lock held); reconnect once if the connection was lost.

        Returns:
            True: the server agrees (back in sync). False: more is owed. A writer: it
            found no room, to be waited on without the lock (protocol 1's: open, and the
            caller's to close).

        Raises:
            ServerUnavailable: the server is absent (or left twice).
        """
        if self.state.next_owed() is None:
            self._in_sync()  # callers delivered the rest: no need to connect for it
            return True
        for reconnecting in (False, True):
            if not self.keep_open:
                writer = self._open_once()
            elif self._writer is None:
                writer = self._connect()
            else:
                writer = self._writer
            keep = False
            try:
                outcome = self._retry_lines(writer)
                keep = not isinstance(outcome, bool)
                return outcome
            except ConnectionLost:
                if not self.keep_open:
                    self.state.forget_progress()
                    raise self._lost() from None
                self._disconnect()
                if reconnecting:
                    raise self._lost() from None
                self.state.reconnected()  # as in _send
            finally:
                if not self.keep_open and not keep:
                    self._close_once(writer)
        raise AssertionError("unreachable")  # pragma: no cover

    def _retry_lines(self, writer: Writer) -> Union[bool, Writer]:
        """``_retry_step`` on ``writer``.

        Raises:
            ConnectionLost, ServerUnavailable: as ``Writer.write``.
        """
        state = self.state
        sent = 0
        if not writer.owned():  # as in _send
            raise ConnectionLost
        try:
            while sent < RETRY_CHUNK:
                owed = state.next_owed()
                if owed is None:
                    self._in_sync()
                    return True
                scope_id, line = owed
                try:
                    writer.write(line, 0.0)
                except ServerStalled:
                    return writer
                state.accepted(scope_id, line)
                sent += 1
            return False
        finally:
            if sent:
                state.retry_progressed()

    # -- fork ---------------------------------------------------------------------------

    def _after_fork(self) -> None:
        # The child shares the parent's open file description: drop it without a write.
        # It never resends the parent's scopes, and speaks with its own pid.
        self.lock = threading.RLock()
        self._watching = None  # the parent's: no watch runs here
        self._disconnect()
        # Protocol 1's writers of one message that other threads held open (a write, the
        # retry's wait for room): the child's copies would keep the FIFO open for good,
        # and torch's server expires nothing while a writer holds it.
        for writer in list(self._once):
            writer.close()
        self._once.clear()
        self.state.reset()
        if self.follows_process:  # no server has taken a line with the child's pid
            self._reached = False
        self._retry = None
        self._sending = False
        if self.follows_process:
            self.pid = os.getpid()
            self.start_time = process_start_time(self.pid)
            hook = _dump.current()  # the child's own, made by _after_fork_in_child()
            for built in list(self._lines):
                built.rebind(self.pid, self.start_time, hook)

    def __del__(self) -> None:
        watching = getattr(self, "_watching", None)
        if watching is not None:  # its watch thread ends now, not at its next look
            watching.set()
        if getattr(self, "_pidfd", -1) >= 0:
            os.close(self._pidfd)
        if getattr(self, "_once_pin", -1) >= 0:
            self._unpin_once()


def _watch(
    channel: weakref.ref[Channel], writer: weakref.ref[Writer], ended: threading.Event
) -> None:
    """The watch of ``channel``'s connection ``writer``, until it is let go of (``ended``)
    or the channel is dropped: every ``WATCH_EVERY`` seconds, while the server is taken to
    be in sync and holds something of this channel's (an armed timer, or one disarmed of
    late, which a server that restarted from its state file would reap if the disarm
    died unread with the old one), whether the server's end is gone (``Writer.lost``,
    which sends nothing). A stuck worker sends nothing more: without this, a server that
    restarted without its state never learned its timer.

    Between looks the watch holds neither the channel nor its connection: a client
    dropped without ``close()`` closes its connection when it is collected.
    """
    while not ended.wait(WATCH_EVERY):
        if not _look(channel, writer):
            return


def _look(channel: weakref.ref[Channel], writer: weakref.ref[Writer]) -> bool:
    """One look of ``_watch``: whether to look again.

    It is made without the channel's lock (it stats and connects on the path, which a
    hung mount can hold), and without a reference to the channel in between.
    """
    held, connection = channel(), writer()
    if held is None or connection is None or held._writer is not connection:
        return False
    due = (held.armed or held.state.recent) and not held.state.needs_resync
    lock, held = held.lock, None
    if not due:
        return True
    try:
        if not connection.lost():
            return True
    except OSError:  # cannot tell now: the next look may
        return True
    held = channel()
    if held is None:
        return False
    with lock:
        held._found_lost(connection)
    # Acted on, the connection is let go of (``ended`` is set: the watch ends). Not, when
    # a delivery failed meanwhile: the retry may resync on this connection, which is then
    # watched on, as any other in sync.
    return True


_channels: weakref.WeakSet[Channel] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    # First the child's own dump file, which the rebuilt lines announce.
    _dump.after_fork_in_child()
    for channel in list(_channels):
        channel._after_fork()


os.register_at_fork(after_in_child=_after_fork_in_child)
