"""The journal: every byte the server reads from its FIFO, kept on file before it is
applied, so a server killed at any moment loses nothing it had read.

A saved state (the daemon's state file) is a snapshot of the armed timers; what the
server applied after the snapshot lives only in its memory, and a ``kill -9`` would lose
it: a disarm read but not yet saved comes back as an armed timer after the restart, and
the healthy worker that sent it is reaped. So bytes go from the pipe into the journal
first (``splice(2)`` moves them without a window in which they are in neither place;
``read`` and ``write`` where there is no ``splice``), then to the decoder. Each snapshot
starts a new journal segment and names it; a restart restores the snapshot and replays
the segments from the one it names. Segments older than the last saved snapshot are
deleted, so the journal holds about one save interval of traffic; and a segment that
grows past ``JOURNAL_TRIM`` bytes (a flood of junk, which changes no timer) asks for a
save at once, whatever the interval, so that a restart never replays much more.

A datagram of the socket is no line the FIFO's bytes could hold: its subject is whom the
kernel vouched for, not the pid it names. So the socket's messages are kept as they were
applied (with their subject's pid, and the start time of the process bound to it), as
lines of the segment, where they were applied among the FIFO's: after the last whole
line read from the FIFO (the unfinished one moves after them), so a replay applies
everything in the order the server did.

Segments are files ``<prefix>.<number>`` (mode 0600) beside the state file. No fsync: a
process that dies leaves its writes in the page cache; after a power loss the boot id
changes and the whole state is discarded anyway. Only regular files of the server's
user are replayed: a symlink is never followed, and another user's file is set aside. A
replay that cannot have every segment from the one named (one missing, a symlink, a
directory, another user's file, one that cannot be read) fails: the snapshot restored
without what it held (disarms) would have workers reaped that had disarmed.
A name already taken when a segment is created never stops the journal: a file of the
server's user is set aside and the name reused, anything else is left and the next free
number taken.

A journal that keeps failing (a full disk) says so once, then at most once a minute, and
asks for the saves, each of which starts a new segment, a second apart (`Journal.saved`):
on a disk with room for the state file only, each save, ten a second, started one that
failed at its first write, each failure said in two error lines.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import logging
import os
import stat
import time
from typing import Callable, Iterable, Iterator, List, Optional, Set, Tuple

import msgspec

from ftimer_protocol import V2_PREFIX, Message, TimerRequestV1

__all__ = ["JOURNAL_TRIM", "Failures", "Journal", "JournalIncomplete"]

from ftimer_server._files import (
    O_CLOEXEC,
    O_NOFOLLOW,
    NotARegularFile,
    aside_path,
    file_kind,
    open_regular,
)

logger = logging.getLogger("ftimer_server")

_SPLICE = getattr(os, "splice", None)
_SPLICE_F_NONBLOCK = getattr(os, "SPLICE_F_NONBLOCK", 2)
_FLAGS = os.O_RDWR | os.O_CREAT | os.O_EXCL | O_CLOEXEC | O_NOFOLLOW
_REPLAY_CHUNK = 256 * 1024
#: Names tried when creating a segment, if those before are taken meanwhile.
_CREATE_ATTEMPTS = 5
#: Bytes in the segment being written past which it is `Journal.full`: a save is due.
JOURNAL_TRIM = 16 * 1024 * 1024
#: Seconds between two lines saying that writes keep failing for one cause.
REMIND_EVERY = 60.0
#: The wait `Journal.saved` asks for between saves while new segments fail: as long as
#: a failed save waits. Not longer: until the next save there is no state file to restore.
_RETRY_AFTER = 1.0
_encoder = msgspec.json.Encoder()


class JournalIncomplete(Exception):
    """A replay cannot have every segment it must: what the message says is missing."""


class Failures:
    """A run of failures of a write that is retried, for saying it in few lines (sans
    I/O: the caller logs). Its first failure, and one of another cause (errno) than the
    last said, are to be said at once; the others at most every ``remind`` seconds, as a
    reminder with their count.

    Args:
        clock: monotonic seconds.
        remind: seconds between two reminders.
    """

    def __init__(
        self, clock: Callable[[], float] = time.monotonic, remind: float = REMIND_EVERY
    ) -> None:
        self._clock = clock
        self.remind = remind
        #: Failures in the run (0: none going on), and when it began.
        self.count = 0
        self.since = 0.0
        self._said: Optional[int] = None  # the errno last said
        self._said_at = 0.0

    def failed(self, error: OSError) -> Optional[str]:
        """Count ``error``; return "new" (say it), "still" (say the run goes on) or None
        (say nothing)."""
        now = self._clock()
        if not self.count:
            self.since = now
        self.count += 1
        if self.count == 1 or error.errno != self._said:
            self._said, self._said_at = error.errno, now
            return "new"
        if now - self._said_at >= self.remind:
            self._said_at = now
            return "still"
        return None

    def seconds(self) -> float:
        """Seconds since the run began (0: none is going on)."""
        return self._clock() - self.since if self.count else 0.0

    def ended(self) -> Optional[Tuple[int, float]]:
        """End the run: its failures and seconds, or None if none was going on."""
        if not self.count:
            return None
        run = self.count, self.seconds()
        self.count, self._said = 0, None
        return run


class Journal:
    """The segments ``<prefix>.<n>``; writes go to a new segment, numbered after those
    already there (which a restart replays first).

    Args:
        prefix: path prefix of the segment files (the state file's path, say).
        snapshot: the file whose timers these segments complete (the state file): a
            journal that fails (disk full, ...) removes it, since a restart would
            restore it without what was read since, disarms included, and reap workers
            that had disarmed. A restart then starts with no timers and a new FIFO, to
            which the clients re-send theirs. The next save after a checkpoint makes it
            again.
        trim: the bytes past which the segment being written is `full`
            (``JOURNAL_TRIM`` by default).
        clock: monotonic seconds, timing the reminders of failing writes.

    Raises:
        OSError: the first segment cannot be created.
    """

    def __init__(
        self,
        prefix: str,
        snapshot: Optional[str] = None,
        *,
        trim: Optional[int] = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._prefix = prefix
        self._snapshot = snapshot
        self.trim = JOURNAL_TRIM if trim is None else trim
        found = self.segments()
        self._fd, self._seq = self._create((found[-1] if found else 0) + 1)
        self._size = 0
        self._start = 0  # the size after the checkpoint: more is a write that succeeded
        self._failed = False
        self._failures = Failures(clock)
        #: Whether the last checkpoint left a failed segment, and none written whole since.
        self._retrying = False
        self._said_removed = False  # said in the run of failures going on
        #: Failed writes since start, and why the last one failed, until a snapshot is
        #: saved with its segments whole again (None then).
        self.errors = 0
        self.failing: Optional[str] = None
        self._splice = _SPLICE
        #: Segments that could not be deleted (a directory at the name, say): said once.
        self._undeletable: Set[int] = set()

    @property
    def failed(self) -> bool:
        """Whether a write failed since the last checkpoint: what the segment holds
        since is incomplete."""
        return self._failed

    @property
    def size(self) -> int:
        """Bytes in the segment being written."""
        return self._size

    @property
    def full(self) -> bool:
        """Whether the segment being written holds more than ``trim`` bytes: a save
        (``checkpoint()``, then ``saved()``) is due now, so that a restart's replay stays
        short."""
        return self._size > self.trim

    @property
    def seq(self) -> int:
        """The number of the segment being written."""
        return self._seq

    def segments(self) -> List[int]:
        """The numbers of the segments on disk, in order."""
        out = []
        for path in glob.glob(glob.escape(self._prefix) + ".*"):
            suffix = path[len(self._prefix) + 1 :]
            if suffix.isdecimal() and suffix.isascii():
                out.append(int(suffix))
        return sorted(out)

    def read(self, fd: int, size: int) -> bytes:
        """Move up to ``size`` bytes from the pipe ``fd`` into the journal; return them.

        Raises:
            BlockingIOError: the pipe is empty.
        """
        if not self._failed:
            try:
                return self._journal(fd, size)
            except BlockingIOError:
                raise
            except OSError as e:  # disk full, ...: keep serving, without the journal
                self._fail(e)
        return os.read(fd, size)

    def keep(self, messages: Iterable[Message], pending: int) -> None:
        """Keep ``messages`` of the socket, as they were applied, before the last
        ``pending`` bytes of the segment (the FIFO's unfinished line: it moves after
        them). Never raises: on an error (disk full, ...), logged, the journal stops until
        the next checkpoint, as it does for the FIFO's bytes."""
        lines = b"".join(map(_line, messages))
        if self._failed or not lines:
            return
        pending = min(pending, self._size)
        at = self._size - pending
        try:
            data = lines + os.pread(self._fd, pending, at) if pending else lines
            while data:
                written = os.pwrite(self._fd, data, at)
                data, at = data[written:], at + written
            self._size += len(lines)
            os.lseek(self._fd, self._size, os.SEEK_SET)  # where the FIFO's bytes go on
        except OSError as e:
            self._fail(e)

    def checkpoint(self, carry: bytes = b"") -> int:
        """Start a new segment with ``carry`` (the reader's unfinished line) and return
        its number: a snapshot of the timers taken now needs the segments from that one
        on. Call it with the snapshot, atomically.

        The carry is the reader's, not the current segment's last bytes: after a write
        failed, those are older bytes, which a replay would apply as the line.

        Raises:
            OSError: the new segment cannot be created or written (the journal keeps the
                old one).
        """
        fd, seq = self._create(self._seq + 1)
        try:
            data = carry
            while data:
                data = data[os.write(fd, data) :]
        except OSError:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(f"{self._prefix}.{seq}")
            raise
        if self._failed:
            self._retrying = True
        elif self._size > self._start:
            # Written to, and whole: an empty segment proves nothing (a full disk still
            # has room for one).
            self._retrying = False
            run = self._failures.ended()
            if run is not None:
                self._said_removed = False
                logger.info(
                    "journal %s.%d written whole again, after %d failed write(s) over %.1f s",
                    self._prefix,
                    self._seq,
                    *run,
                )
        os.close(self._fd)
        self._fd, self._size, self._seq = fd, len(carry), seq
        self._start = self._size
        self._failed = False
        return self._seq

    def saved(self, seq: int) -> Optional[float]:
        """A snapshot naming segment ``seq`` was saved: the segments before it can go;
        unless a write failed since the checkpoint that made ``seq``, which leaves that
        snapshot incomplete too (see ``snapshot``).

        Returns:
            None; or, while the segments the last checkpoints started failed, the seconds
            to wait before the next save (``_RETRY_AFTER``): its new segment would likely
            fail too, and the state file it saved be removed again.
        """
        if self._failed:
            self.invalidate()
        else:
            self.failing = None  # the snapshot and its segments are whole again
            self.discard_before(seq)
        return _RETRY_AFTER if self._retrying else None

    def discard_before(self, seq: int) -> None:
        """Delete the segments numbered below ``seq`` (a saved snapshot no longer needs
        them). One that cannot be deleted (a directory at its name, say) is logged, once,
        and left."""
        for n in self.segments():
            if n >= seq:
                break
            if n in self._undeletable:
                continue
            try:
                os.unlink(f"{self._prefix}.{n}")
            except FileNotFoundError:
                pass
            except OSError as e:
                self._undeletable.add(n)
                logger.error("journal: cannot delete %s.%d: %s", self._prefix, n, e.strerror)

    def replay(self, first: int) -> Iterator[bytes]:
        """The bytes of the segments from ``first`` up to (not including) the current
        one, in order, in chunks.

        Raises:
            JournalIncomplete: segment ``first`` or one after it is missing (a number
                skipped), or is not a regular file of the server's user (a symlink is not
                followed; another user's file is set aside), or cannot be read. Only the
                last ones' removal goes unseen: the journal's numbers go on from those left.
        """
        expected = first
        for n in self.segments():
            if not first <= n < self._seq:
                continue
            if n != expected:
                raise JournalIncomplete(f"journal: {self._prefix}.{expected} is missing")
            yield from self._replay_segment(f"{self._prefix}.{n}")
            expected = n + 1
        if expected == first:
            raise JournalIncomplete(f"journal: {self._prefix}.{first} is missing")

    def set_aside(self, first: int) -> List[str]:
        """Rename the segments from ``first`` up to the current one to
        ``<segment>.corrupt-<unix time>``, so that no restart replays them again; return
        the new names. Only regular files are moved; what cannot be moved is logged."""
        moved = []
        for n in self.segments():
            if not first <= n < self._seq:
                continue
            path = f"{self._prefix}.{n}"
            try:
                if stat.S_ISREG(os.lstat(path).st_mode):
                    moved.append(_move_aside(path))
            except OSError as e:
                logger.error("journal: cannot set %s aside: %s", path, e.strerror)
        return moved

    def close(self) -> None:
        """Close the current segment (it stays on disk)."""
        with contextlib.suppress(OSError):
            os.close(self._fd)

    def _fail(self, e: OSError) -> None:
        self._failed = True
        self.errors += 1
        self.failing = e.strerror or str(e)
        say = self._failures.failed(e)
        if say == "new":
            logger.error(
                "journal %s.%d: %s; from now on, what was read since the last save is lost "
                "if the server is killed",
                self._prefix,
                self._seq,
                e,
            )
        elif say == "still":
            logger.error(
                "journal %s.%d: %s; still failing, %d failed write(s) over %.0f s: what was "
                "read since the last save is lost if the server is killed",
                self._prefix,
                self._seq,
                e,
                self._failures.count,
                self._failures.seconds(),
            )
        self.invalidate()

    def invalidate(self) -> None:
        """Remove the snapshot these segments complete (see ``snapshot``), said in a
        line (the first time in a run of failing writes only); nothing when there is
        none."""
        if self._snapshot is None:
            return
        try:
            os.unlink(self._snapshot)
        except FileNotFoundError:
            return
        except OSError as e:
            if not self._said_removed:
                self._said_removed = True
                logger.error("journal: cannot remove %s: %s", self._snapshot, e.strerror)
            return
        if self._said_removed:
            return  # each save in the run makes it again, for the next failure to remove
        self._said_removed = True
        logger.error(
            "journal: removed %s, which a restart would restore without what was read "
            "since (disarms included); a restart now starts with no timers, and clients "
            "re-send theirs",
            self._snapshot,
        )

    def _replay_segment(self, path: str) -> Iterator[bytes]:
        """The bytes of segment ``path``, in chunks.

        Raises:
            JournalIncomplete: as ``replay()`` says.
        """
        try:
            fd, st = open_regular(path)
        except NotARegularFile as e:
            raise JournalIncomplete(f"journal: {path} is {e.kind}, not a regular file") from None
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise JournalIncomplete(f"journal: {path} is a symlink: not followed") from None
            raise JournalIncomplete(f"journal: cannot read {path}: {e.strerror}") from None
        if st.st_uid != os.geteuid():
            # Not written by this server: what it holds would have processes signalled.
            os.close(fd)
            why = f"journal: {path} is owned by uid {st.st_uid}, not by the server's user"
            try:
                aside = _move_aside(path)
            except OSError as e:
                raise JournalIncomplete(f"{why} (cannot set it aside: {e.strerror})") from None
            raise JournalIncomplete(f"{why}: moved it to {aside}")
        with open(fd, "rb") as f:
            try:
                while chunk := f.read(_REPLAY_CHUNK):
                    yield chunk
            except OSError as e:
                raise JournalIncomplete(f"journal: cannot read {path}: {e.strerror}") from None

    def _create(self, seq: int) -> Tuple[int, int]:
        """Create segment ``seq`` (never opening a file already there) and return its
        descriptor and number. A name already taken does not stop the journal: a regular
        file of this user's there is set aside (``.corrupt-<unix time>``) and the name
        reused; anything else (another user's file, a symlink, a directory) is left, and
        the number after every segment on disk is taken instead; each with an error line.

        Raises:
            OSError: the segment cannot be created (the names keep being taken, say).
        """
        for _ in range(_CREATE_ATTEMPTS - 1):
            path = f"{self._prefix}.{seq}"
            try:
                return os.open(path, _FLAGS, 0o600), seq
            except FileExistsError:
                seq = self._squatted(path, seq)
        return os.open(f"{self._prefix}.{seq}", _FLAGS, 0o600), seq

    def _squatted(self, path: str, seq: int) -> int:
        """Deal with the file found at ``path``, the name of new segment ``seq``, and
        return the number to try next (see `_create`)."""
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return seq  # gone meanwhile
        except OSError as e:
            what = f"cannot be examined: {e.strerror}"
        else:
            if stat.S_ISREG(st.st_mode) and st.st_uid == os.geteuid():
                try:
                    aside = _move_aside(path)
                except OSError as e:
                    what = f"cannot be set aside: {e.strerror}"
                else:
                    logger.error(
                        "journal: %s was already there (not made by this journal); moved it to %s",
                        path,
                        aside,
                    )
                    return seq
            elif st.st_uid != os.geteuid():
                what = f"owned by uid {st.st_uid}, not by the server's user"
            else:
                what = file_kind(st.st_mode)
        skip = max([seq, *self.segments()]) + 1
        logger.error(
            "journal: %s was already there (%s): left there; segment %d used instead",
            path,
            what,
            skip,
        )
        return skip

    def _journal(self, fd: int, size: int) -> bytes:
        start = self._size
        if self._splice is not None:
            try:
                moved: int = self._splice(fd, self._fd, size, flags=_SPLICE_F_NONBLOCK)
            except OSError as e:
                if e.errno not in (errno.EINVAL, errno.ENOSYS):
                    raise
                self._splice = None  # a file system that takes no splice: copy instead
                return self._journal(fd, size)
            data = os.pread(self._fd, moved, start)
        else:
            data = os.read(fd, size)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(self._fd, view) :]
            except OSError as e:  # out of the pipe already: the caller's all the same
                self._fail(e)
                return data
        self._size = start + len(data)
        return data


def _line(message: Message) -> bytes:
    """``message`` as a line of its protocol (one already decoded: no need to check it
    again, as ``ftimer_protocol.encode`` does)."""
    body = _encoder.encode(message)
    if type(message) is TimerRequestV1:
        return body + b"\n"
    return b"".join((V2_PREFIX, memoryview(body)[1:], b"\n"))


def _move_aside(path: str) -> str:
    """Rename ``path`` to ``<path>.corrupt-<unix time>`` (never replayed again, kept for
    inspection) and return the new name.

    Raises:
        OSError: it cannot be renamed.
    """
    aside = aside_path(path)
    os.replace(path, aside)
    return aside
