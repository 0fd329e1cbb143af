"""The state file: armed timers saved so a restarted daemon keeps watching them.

Format (JSON, so an operator can read it; timers are ``FileTimerServer.armed()``, each
written as the ``Arm`` message it is, without the members it leaves at their defaults)::

    {"version": 1, "boot_id": "...", "saved_at": 1234.5,
     "timers": [{"op": "arm", "pid": 42, "scope_id": "step", "deadline": 1240.0,
                 "signal": 9, "start_time": 123456, "labels": {"rank": "0"}}]}

Deadlines are CLOCK_MONOTONIC seconds, which every process of one boot shares, so they stay
valid across a daemon restart; the boot id says which boot they belong to, and a state
file from another boot is discarded. Writes are atomic (temporary file, fsync, rename), so
a reader sees the old or the new state, never half of one. A save encodes and writes the
timers ``STATE_CHUNK_TIMERS`` at a time (`state_pieces`): each encoding holds the GIL,
which the server's loop needs to reap on time.

`StateSaver` batches: the first change after a quiet period is written at once, later
ones at most every ``interval`` seconds, and nothing is written while nothing changes;
but a journal that holds a trim's worth (a flood) is saved, and so trimmed, at once.
Saves that keep failing for one cause are said once, then at most once a minute with
their count, and the save that succeeds again in a line of its own.

The file is trusted only if the daemon's user owns it (another user's is set aside) and
lies in a directory nobody else may change (`check_state_dir`: the daemon refuses any
other), and only one daemon uses it at a time: each holds the lock file ``<path>.lock``
(`lock_state`) from before it reads the file until it exits. A file saved while the
server read another FIFO than the one at its path now is not used: another server made
that FIFO since, and its clients may have disarmed there timers the file still holds.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import re
import stat
import threading
import time
import zlib
from collections.abc import Iterable, Iterator, Sequence
from typing import Callable, Dict, List, Optional, Tuple, Union

import msgspec

from ftimer_protocol import PIPE_BUF, Arm
from ftimer_server._files import (
    NotAPrivateDirectory,
    NotARegularFile,
    aside_path,
    file_kind,
    is_same_file,
    open_private_dir,
    open_regular,
    unsafe_above,
    write_atomically,
)
from ftimer_server.core._policy import clocks_apart
from ftimer_server.core._records import Timer, shared_labels, valid_label_keys
from ftimer_server.server._journal import Failures
from ftimer_server.server._process import own_clock_offsets

__all__ = [
    "SAVE_SPACING",
    "STATE_BYTES_PER_TIMER",
    "STATE_CHUNK_TIMERS",
    "STATE_VERSION",
    "BOOT_ID_PATH",
    "StateBusy",
    "StateFile",
    "StateFileError",
    "StateLoad",
    "StatePathError",
    "StateSaver",
    "check_state_dir",
    "decode_state",
    "encode_state",
    "fifo_identity",
    "load_state",
    "max_state_bytes",
    "lock_state",
    "read_boot_id",
    "set_aside_state",
    "state_pieces",
    "write_state",
]

log = logging.getLogger("ftimer_server.state")

STATE_VERSION = 1
BOOT_ID_PATH = "/proc/sys/kernel/random/boot_id"
#: A state file larger than this is not a state file (100k timers take about 15 MB),
#: unless the limit on timers lets the daemon write a larger one (`max_state_bytes`).
MAX_STATE_BYTES = 256 * 1024 * 1024
#: The most one saved timer takes: the line that armed it (at most ``PIPE_BUF`` bytes),
#: with the start time and the separators a saved timer may add.
STATE_BYTES_PER_TIMER = PIPE_BUF + 512
#: Timers encoded by one msgspec call when saving: at most about 1.2 MB, a millisecond
#: of the GIL. The whole snapshot in one call (400 MB for 100k timers of long scopes)
#: held it, and so every reap of every user, for two seconds.
STATE_CHUNK_TIMERS = 256


def max_state_bytes(max_timers: int) -> int:
    """The largest state file a daemon holding at most ``max_timers`` timers can write:
    what it reads back (a worker arming timers with the longest scopes the protocol
    allows made a state file the restart refused, and every timer was lost)."""
    return max(MAX_STATE_BYTES, max_timers * STATE_BYTES_PER_TIMER)


class StateFile(msgspec.Struct, frozen=True, kw_only=True):
    """The whole file. ``saved_at`` is the monotonic time of the write; ``journal`` the
    first journal segment to replay after restoring ``timers`` (0: none); ``boot_clock``
    the boot clock (``CLOCK_BOOTTIME``, the clock of processes' start times) just before
    the snapshot, or None where there is none (and in files of older daemons);
    ``clocks`` the saver's offsets (ns) of CLOCK_MONOTONIC and CLOCK_BOOTTIME (its time
    namespace's: the deadlines and start times are on those clocks), or None where there
    are no time namespaces (and in files of older daemons); ``fifo`` the device and inode
    of the FIFO the saving server read, or None (in files of older daemons); ``fifo_path``
    the absolute path its clients open, or None (in files of older daemons)."""

    version: int
    boot_id: str
    saved_at: float
    timers: List[Timer]
    journal: int = 0
    boot_clock: Optional[float] = None
    clocks: Optional[Tuple[int, int]] = None
    fifo: Optional[Tuple[int, int]] = None
    fifo_path: Optional[str] = None


class _LenientStateFile(msgspec.Struct, frozen=True, kw_only=True):
    # As StateFile, each timer decoded on its own: one bad timer costs only itself.
    version: int
    boot_id: str
    saved_at: float
    timers: List[msgspec.Raw]
    journal: int = 0
    boot_clock: Optional[float] = None
    clocks: Optional[Tuple[int, int]] = None
    fifo: Optional[Tuple[int, int]] = None
    fifo_path: Optional[str] = None


class _Header(msgspec.Struct):
    version: int


class StateFileError(Exception):
    """The state file is corrupt, truncated, of an unknown version or unreadable."""


class StatePathError(Exception):
    """Something other than a file is at the state file's path (a directory, a FIFO, a
    device): not the daemon's to move, so it refuses to start."""


class StateBusy(Exception):
    """Another process (another daemon) holds the state file's lock.

    Attributes:
        lock_path: the lock file (``<state file>.lock``).
    """

    def __init__(self, lock_path: str) -> None:
        super().__init__(f"another process holds the lock file {lock_path}")
        self.lock_path = lock_path


_encoder = msgspec.json.Encoder()
#: The checksum member that ends a state file (`state_pieces`); files of daemons before
#: it have none, and are read without.
_CRC32 = re.compile(rb',"crc32":(\d{1,10})}\s*\Z')
_header_decoder = msgspec.json.Decoder(_Header)
_decoder = msgspec.json.Decoder(_LenientStateFile)
_timer_decoder = msgspec.json.Decoder(Timer)
_arm_decoder = msgspec.json.Decoder(Arm)  # a Timer's, with its label keys checked


def read_boot_id(path: str = BOOT_ID_PATH) -> str:
    """The kernel's boot id, or "" where there is none (macOS: deadlines then only
    survive if the file's ``saved_at`` is not in the future, see `load_state`)."""
    try:
        with open(path, encoding="ascii") as f:
            return f.read().strip()
    except OSError:
        return ""


def encode_state(
    timers: Iterable[Timer],
    boot_id: str,
    saved_at: float,
    journal: int = 0,
    boot_clock: Optional[float] = None,
    *,
    clocks: Optional[Tuple[int, int]] = None,
    fifo: Optional[Tuple[int, int]] = None,
    fifo_path: Optional[str] = None,
) -> bytes:
    """Serialise a state file."""
    pieces = state_pieces(
        list(timers),
        boot_id,
        saved_at,
        journal,
        boot_clock,
        clocks=clocks,
        fifo=fifo,
        fifo_path=fifo_path,
    )
    return b"".join(pieces)


def state_pieces(
    timers: Sequence[Timer],
    boot_id: str,
    saved_at: float,
    journal: int = 0,
    boot_clock: Optional[float] = None,
    *,
    clocks: Optional[Tuple[int, int]] = None,
    fifo: Optional[Tuple[int, int]] = None,
    fifo_path: Optional[str] = None,
) -> Iterator[Union[bytes, memoryview]]:
    """A state file in pieces, each encoded when asked for and holding at most
    ``STATE_CHUNK_TIMERS`` timers: joined, the bytes of ``StateFile`` encoded whole, with
    a last member ``crc32``, the CRC-32 of every byte before it (`decode_state` checks
    it; an older daemon ignores it)."""
    empty = StateFile(
        version=STATE_VERSION,
        boot_id=boot_id,
        saved_at=saved_at,
        timers=[],
        journal=journal,
        boot_clock=boot_clock,
        clocks=clocks,
        fifo=fifo,
        fifo_path=fifo_path,
    )
    # The last match is the member's: only numbers and null follow it.
    head, tail = _encoder.encode(empty).rsplit(b'"timers":[]', 1)
    first = head + b'"timers":['
    crc = zlib.crc32(first)
    yield first
    for start in range(0, len(timers), STATE_CHUNK_TIMERS):
        if start:
            crc = zlib.crc32(b",", crc)
            yield b","
        # Without the list's brackets: the pieces make one list.
        piece = memoryview(_encoder.encode(timers[start : start + STATE_CHUNK_TIMERS]))[1:-1]
        crc = zlib.crc32(piece, crc)
        yield piece
    last = b"]" + tail[:-1]  # the object's closing brace after the checksum
    yield last + b',"crc32":%d}\n' % zlib.crc32(last, crc)


def decode_state(data: bytes) -> StateFile:
    """Parse a state file. A timer that is not valid (out of the schema's bounds, say)
    is logged and dropped; the others are kept.

    Raises:
        StateFileError: not JSON, truncated, wrong shape, or a version this daemon
            does not know.
    """
    end = _CRC32.search(data, max(0, len(data) - 64))
    if end is not None and zlib.crc32(memoryview(data)[: end.start()]) != int(end.group(1)):
        # Valid JSON still, maybe: a deadline or a pid changed by a bit could reap a
        # healthy worker, which no check of the shape would see.
        raise StateFileError("its checksum does not match: changed or damaged since it was saved")
    try:
        header = _header_decoder.decode(data)
    except msgspec.DecodeError as e:
        raise StateFileError(f"not a state file: {e}") from None
    except RecursionError:  # msgspec's, for JSON nested deeper than it recurses
        raise StateFileError("not a state file: JSON nested too deeply") from None
    if header.version != STATE_VERSION:
        raise StateFileError(
            f"state file version {header.version} is not supported (expected {STATE_VERSION})"
        )
    try:
        raw = _decoder.decode(data)
    except msgspec.DecodeError as e:
        raise StateFileError(f"invalid state file: {e}") from None
    except RecursionError:
        raise StateFileError("invalid state file: JSON nested too deeply") from None
    timers: List[Timer] = []
    labels: Dict[int, Dict[str, str]] = {}  # a third of the memory until restored
    for item in raw.timers:
        try:
            timer = _timer_decoder.decode(item)
            if timer.labels and not valid_label_keys(timer.labels):
                _arm_decoder.decode(item)  # raises, saying which key, as a line would
        except (msgspec.DecodeError, RecursionError) as e:
            log.error("state file: dropped an invalid timer (%s): %s", e, bytes(item)[:200])
            continue
        if timer.labels:
            shared = shared_labels(labels, timer.pid, timer.labels)
            timer = msgspec.structs.replace(timer, labels=shared)
        timers.append(timer)
    return StateFile(
        version=raw.version,
        boot_id=raw.boot_id,
        saved_at=raw.saved_at,
        timers=timers,
        journal=raw.journal,
        boot_clock=raw.boot_clock,
        clocks=raw.clocks,
        fifo=raw.fifo,
        fifo_path=raw.fifo_path,
    )


def write_state(path: str, data: Union[bytes, Iterable[Union[bytes, memoryview]]]) -> None:
    """Replace ``path`` with ``data`` (bytes, or pieces written as they come, as
    `state_pieces` makes them) atomically: temporary file, fsync, rename.

    The file is created 0600 in ``path``'s directory. The directory itself is not fsynced:
    the only crash that would need it is a power loss, after which the boot id changes and
    the state is discarded anyway.

    Raises:
        OSError: the directory is not writable, the disk is full, ...; the temporary file
            is removed.
    """
    write_atomically(os.path.abspath(path), data)


class StateLoad(msgspec.Struct, frozen=True):
    """What `load_state` found: the timers to restore, or why there are none."""

    timers: List[Timer]
    #: The first journal segment to replay after restoring ``timers`` (0: none).
    journal: int = 0
    #: Why the file was not used ("" if it was): no file, another boot, unusable.
    ignored: str = ""
    #: Where an unusable file was moved to, or "".
    set_aside: str = ""
    #: When the snapshot was taken, as a ``time.time()`` of now, or None (none used):
    #: a process that started later cannot be one whose timer it saved, nor one that
    #: wrote what the journal kept after it. From the file's boot clock, so a step of
    #: the wall clock since moves it along (else the file's mtime).
    written_at: Optional[float] = None


def lock_state(path: str) -> int:
    """Lock ``<path>.lock`` (flock, exclusive, not waiting) and return its descriptor:
    closing it, or the process's exit, releases the lock. A daemon takes it before it
    reads the state file and holds it until it exits, so two daemons never restore, save
    and journal into one state file. The file is made 0600 if missing and never removed
    (the state file itself cannot be locked: every save replaces it). Nothing is made
    beside a state file path that holds no file (see `load_state`).

    Raises:
        StateBusy: another process holds the lock.
        StatePathError: a directory, a FIFO, a device or a socket is at ``path``; or the
            lock file is not this user's regular file (a symlink is never followed), or
            it keeps being replaced while it is locked.
        OSError: it cannot be made or opened.
    """
    with contextlib.suppress(FileNotFoundError):
        mode = os.lstat(path).st_mode
        if not (stat.S_ISREG(mode) or stat.S_ISLNK(mode)):
            raise StatePathError(_not_a_file(path, file_kind(mode)))
    lock_path = path + ".lock"
    refused = f"refusing the state file's lock file {lock_path}: it is {{}}"
    for _ in range(3):  # replaced between open and lock: lock the new one
        try:
            # No controlling terminal: a tty put there is refused, not adopted.
            fd, st = open_regular(lock_path, os.O_RDWR | os.O_CREAT | os.O_NOCTTY)
        except NotARegularFile as e:
            raise StatePathError(refused.format(e.kind)) from None
        except OSError as e:
            if e.errno in (errno.ELOOP, errno.EISDIR, errno.ENXIO):  # a symlink, dir, socket
                with contextlib.suppress(OSError):
                    kind = file_kind(os.lstat(lock_path).st_mode)
                    raise StatePathError(refused.format(kind)) from None
            raise
        try:
            if st.st_uid != os.geteuid():
                raise StatePathError(refused.format(f"owned by uid {st.st_uid}, not us"))
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise StateBusy(lock_path) from None
            if is_same_file(lock_path, st):
                return fd
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
    raise StatePathError(f"the state file's lock file {lock_path} keeps being replaced")


def check_state_dir(path: str) -> None:
    """Make the directory of the state file ``path`` (0700) if missing, and check that
    nobody but the daemon's user can change what is in it.

    Its files are what a restart restores: a user who may rename in it (another owner;
    group or others with write permission, sticky or not, since they could take the
    names of the daemon's files) could keep an old snapshot and put it back before the
    next start, and have a worker that had disarmed reaped. So it must be a directory
    the daemon's user owns and nobody else may write, as the FIFO's and the incidents'
    are (a symlink is judged where it leads: systemd's ``StateDirectory=`` with
    ``DynamicUser=`` is one); and each directory above it, and above where it leads,
    must let nobody else rename it away and back: owned by root or the daemon's user,
    and writable by nobody else, or sticky (as /tmp: only an entry's owner renames it).

    Raises:
        StatePathError: it is unsafe; the message says why and what to do.
        OSError: it cannot be made or opened.
    """
    directory = os.path.dirname(os.path.abspath(path))
    _make_dirs(directory)
    fix = "use a directory only the daemon's user may write (such as /run/ftimer)"
    try:
        fd, _ = open_private_dir(os.path.realpath(directory))
    except NotAPrivateDirectory as e:
        raise StatePathError(f"the state file's directory {directory} {e}; {fix}") from None
    os.close(fd)
    why = unsafe_above(directory)
    if why is not None:
        raise StatePathError(
            f"the state file's directory {directory} is unsafe: {why} what is in it, and "
            f"so put an old state file back before a restart; {fix}"
        )


def _make_dirs(directory: str) -> None:
    """Make ``directory`` and those missing above it, each 0700 (``os.makedirs`` gives
    those above the umask's mode: with 002, a 0775 directory the daemon then refused)."""
    missing = []
    while not os.path.lexists(directory):
        missing.append(directory)
        directory = os.path.dirname(directory)
    for d in reversed(missing):
        with contextlib.suppress(FileExistsError):
            os.mkdir(d, 0o700)


def load_state(
    path: str,
    boot_id: str,
    now: Optional[float] = None,
    *,
    max_bytes: int = MAX_STATE_BYTES,
    fifo: Optional[str] = None,
) -> StateLoad:
    """Read the state file at ``path``. A bad file is reported, not fatal.

    A file from another boot is ignored (its deadlines and pids mean nothing now). An
    unusable file (corrupt, truncated, unknown version, unreadable, a symlink, or owned
    by a user other than the daemon's: its timers name processes to signal) is renamed
    to ``<path>.corrupt-<unix time>``, kept for inspection and never read again. Whether
    each saved process still exists, and is the same one, is for
    ``FileTimerServer.restore()`` to check.

    Args:
        path: the state file; a missing file is an empty state.
        boot_id: this boot's id (`read_boot_id`).
        now: the monotonic clock, used when there is no boot id (a ``saved_at`` in the
            future then means a reboot happened).
        max_bytes: a larger file is set aside as not a state file (`max_state_bytes`).
        fifo: the FIFO the daemon serves: a file saved reading another FIFO than the one
            there now is ignored (another server made that one since, and its clients
            may have disarmed there timers the file holds).

    Raises:
        StatePathError: a directory, a FIFO, a device or a socket is at ``path``: it is
            never read (a FIFO would block), moved or removed.
    """
    try:
        fd, st = open_regular(path)
        with os.fdopen(fd, "rb") as f:
            if st.st_uid != os.geteuid():
                raise StateFileError(
                    f"owned by uid {st.st_uid}, not by the daemon's user (uid {os.geteuid()})"
                )
            if st.st_size > max_bytes:
                raise StateFileError(f"larger than {max_bytes} bytes")
            # Not f.read(max_bytes + 1), which allocates that much first, whatever the
            # file's size (4.6 GB with the default --max-timers): where it could not be
            # had, every start with a state file ended in a MemoryError.
            data = f.read(st.st_size + 1)
        if len(data) > max_bytes:
            raise StateFileError(f"larger than {max_bytes} bytes")
        state = decode_state(data)
    except NotARegularFile as e:
        raise StatePathError(_not_a_file(path, e.kind)) from None
    except FileNotFoundError:
        return StateLoad([], ignored="no state file")
    except (OSError, StateFileError) as e:
        problem = str(e) if isinstance(e, StateFileError) else f"cannot read it: {e.strerror}"
        return set_aside_state(path, problem)
    now = time.monotonic() if now is None else now
    if state.boot_id != boot_id or (not boot_id and state.saved_at > now):
        return StateLoad([], ignored="saved during another boot")
    own = own_clock_offsets()
    if state.clocks is not None and own is not None and tuple(state.clocks) != own:
        # Its deadlines would be read on this daemon's clocks: early, or never.
        apart = clocks_apart((state.clocks[0] - own[0], state.clocks[1] - own[1]))
        return StateLoad([], ignored=f"saved on other clocks, {apart}")
    if fifo is not None and state.fifo is not None and _another_fifo(fifo, state.fifo):
        why = f"saved by a server of another FIFO than the one at {fifo} (made since by another)"
        return StateLoad([], ignored=why)
    if (
        fifo is not None
        and state.fifo_path is not None
        and state.fifo_path != os.path.abspath(fifo)
        and not _same_fifo(fifo, state.fifo)
    ):
        # The FIFO was moved (another --fifo): its workers still write to the old path,
        # which nobody reads now; their disarms would never arrive, and a healthy worker
        # that carried on without its server was reaped at its old deadline.
        why = (
            f"saved by a server of the FIFO at {state.fifo_path}, not {fifo}: its workers "
            "cannot reach this one"
        )
        return StateLoad([], ignored=why)
    written_at = st.st_mtime
    if state.boot_clock is not None and (boot_now := boot_clock()) is not None:
        if not 0 <= state.boot_clock <= boot_now:
            # Not a time of this boot up to now (the file was written by hand): 1e308
            # ended every start in an OverflowError (the daemon crashed at each restart,
            # the file never set aside), and a time ahead of the clock had every process
            # read as born before the snapshot (a timer saved without a start time bound
            # whichever process took its pid since).
            return set_aside_state(
                path,
                f"its boot clock {state.boot_clock:g} s is no time of this boot up to now "
                f"({boot_now:.3f} s)",
            )
        written_at = time.time() - (boot_now - state.boot_clock)
    return StateLoad(state.timers, state.journal, written_at=written_at)


def fifo_identity(fd: int) -> Tuple[int, int]:
    """The device and inode of the FIFO open at ``fd``, as a state file names it."""
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


def _same_fifo(path: str, saved: Optional[Tuple[int, int]]) -> bool:
    """Whether the FIFO ``saved`` names is at ``path`` (another spelling of its path)."""
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return saved is not None and (st.st_dev, st.st_ino) == tuple(saved)


def _another_fifo(path: str, saved: Tuple[int, int]) -> bool:
    """Whether something other than the FIFO ``saved`` names is at ``path`` (nothing
    there: no other server's clients write to it)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    return (st.st_dev, st.st_ino) != tuple(saved)


def boot_clock() -> Optional[float]:
    """The boot clock (``CLOCK_BOOTTIME``) in seconds, or None where there is none."""
    clock = getattr(time, "CLOCK_BOOTTIME", None)
    return None if clock is None else time.clock_gettime(clock)


def set_aside_state(path: str, problem: str) -> StateLoad:
    """Rename the unusable file at ``path`` (a regular file or a symlink, never followed)
    to ``<path>.corrupt-<unix time>``, with an error line saying ``problem``.

    Raises:
        StatePathError: something else is there (a directory the daemon may not read).
    """
    aside = aside_path(path)
    try:
        mode = os.lstat(path).st_mode
        if not (stat.S_ISREG(mode) or stat.S_ISLNK(mode)):
            raise StatePathError(_not_a_file(path, file_kind(mode)))
        os.replace(path, aside)
    except OSError as e:
        log.error("state file %s is unusable (%s) and cannot be moved: %s", path, problem, e)
        return StateLoad([], ignored=problem)
    log.error("state file %s is unusable (%s); moved it to %s", path, problem, aside)
    return StateLoad([], ignored=problem, set_aside=aside)


def _not_a_file(path: str, kind: str) -> str:
    return (
        f"the state file {path} is {kind}, not a file; it is not the daemon's "
        "to move or remove: give the path of a file (or of none yet)"
    )


#: A save is followed by a pause of this many times its duration at least: with 150k
#: timers armed, one worker's churn made a save of 20 MB every 0.2 s (half a core, 93
#: MB/s), each copying the table under the server's lock. The journal keeps what
#: changes meanwhile (a save is hurried when it fills up).
SAVE_SPACING = 10.0


class StateSaver:
    """Writes the armed timers to the state file shortly after each change.

    Call `changed()` whenever the armed set changes (cheap: sets an Event). A thread wakes
    only then, writes ``snapshot()``, and then waits ``interval`` seconds (or
    `SAVE_SPACING` times the save's duration, if longer) before it looks again, so a
    change is on disk at most that long (plus one write) after it happened.

    Args:
        path: the state file.
        snapshot: returns the timers to save and the journal segment a restart replays
            after them (0: none); called on the saver thread.
        boot_id: written into the file.
        interval: minimum seconds between two writes; also the bound on how stale the
            file may be after a change.
        clock: monotonic seconds, written as ``saved_at``; times the lines of failing
            saves too.
        saved: called after each successful write with the journal segment it names
            (older segments can go); returns None, or the seconds to wait before the
            next save (a journal whose new segments keep failing, `Journal.saved`).
        overdue: whether a save is due now, whatever ``interval`` says (the journal
            is `Journal.full`): consulted at each `changed()`, and once woken, again
            (a save that took the snapshot meanwhile has made it false), so a flood
            makes one save per trim's worth of journal, not a storm.
        fifo: the FIFO the server reads (`fifo_identity`), written into the file.
        fifo_path: the path of that FIFO (absolute), written into the file.
    """

    def __init__(
        self,
        path: str,
        snapshot: Callable[[], Tuple[Sequence[Timer], int]],
        boot_id: str,
        interval: float = 0.1,
        clock: Callable[[], float] = time.monotonic,
        *,
        saved: Callable[[int], Optional[float]] = lambda journal: None,
        overdue: Callable[[], bool] = lambda: False,
        fifo: Optional[Tuple[int, int]] = None,
        fifo_path: Optional[str] = None,
    ) -> None:
        self.path = path
        self._fifo = fifo
        self._fifo_path = fifo_path
        self._saved = saved
        self._overdue = overdue
        self.interval = interval
        self._snapshot = snapshot
        self._boot_id = boot_id
        self._clock = clock
        self._clocks = own_clock_offsets()
        self._dirty = threading.Event()
        self._stopping = threading.Event()
        #: Cuts the wait between two saves short: a save is overdue, or the saver stops.
        self._hurry = threading.Event()
        self._write_lock = threading.Lock()
        self._thread: Optional[threading.Thread] = None
        #: Successful and failed writes since start.
        self.saves = 0
        self.errors = 0
        #: Why the last write failed, or None (it succeeded, or none was made yet).
        self.failing: Optional[str] = None
        self._failures = Failures(clock)
        self._backoff: Optional[float] = None  # what the last `saved` asked for

    def start(self) -> None:
        """Start the saver thread; the current state is written at once."""
        self._dirty.set()
        self._thread = threading.Thread(target=self._run, name="ftimer-state-saver", daemon=True)
        self._thread.start()

    def changed(self) -> None:
        """Note that the armed set changed; it will be saved within ``interval``, or
        at once if ``overdue()``."""
        # Called per event on the server's thread: skip the Event's lock when already set.
        # Safe: the saver clears the flag before it takes its snapshot.
        if not self._dirty.is_set():
            self._dirty.set()
        if not self._hurry.is_set() and self._overdue():
            self._hurry.set()

    def save(self) -> bool:
        """Write the current snapshot now (on the caller's thread); True on success."""
        with self._write_lock:
            try:
                # Before the snapshot: no process that started later wrote what it holds.
                boot = boot_clock()
                timers, journal = self._snapshot()
                clock, clocks = self._clock(), self._clocks
                pieces = state_pieces(
                    timers,
                    self._boot_id,
                    clock,
                    journal,
                    boot,
                    clocks=clocks,
                    fifo=self._fifo,
                    fifo_path=self._fifo_path,
                )
                write_state(self.path, pieces)
            except OSError as e:
                self.errors += 1
                self.failing = e.strerror or str(e)
                say = self._failures.failed(e)
                if say == "new":
                    log.error("cannot save state to %s: %s", self.path, e)
                elif say == "still":
                    log.error(
                        "still cannot save state to %s: %d failed attempt(s) over %.0f s, the "
                        "last: %s",
                        self.path,
                        self._failures.count,
                        self._failures.seconds(),
                        e,
                    )
                return False
            self.saves += 1
            self.failing = None
            self._backoff = self._saved(journal)
            # While the journal backs off, its next failure likely removes this file again:
            # not said to be saved again yet.
            run = self._failures.ended() if self._backoff is None else None
            if run is not None:
                log.info(
                    "state saved again to %s after %d failed attempt(s) over %.1f s",
                    self.path,
                    *run,
                )
            return True

    def stop(self, final_save: bool = True) -> bool:
        """Stop the thread; with ``final_save``, write the state one last time. Return
        False if that write failed."""
        self._stopping.set()
        self._dirty.set()
        self._hurry.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        return self.save() if final_save else True

    def _run(self) -> None:
        while True:
            self._dirty.wait()
            if self._stopping.is_set():
                return
            self._dirty.clear()
            self._hurry.clear()  # before the snapshot: what is overdue after it hurries
            began = time.monotonic()
            if not self.save():
                self._dirty.set()  # retry, but not in a tight loop
                self._stopping.wait(max(self.interval, 1.0))
            else:
                took = time.monotonic() - began
                self._pause(max(self.interval, self._backoff or 0.0, SAVE_SPACING * took))

    def _pause(self, seconds: float) -> None:
        """Wait ``seconds`` after a save; less if a save becomes overdue, or at stop."""
        end = time.monotonic() + seconds
        while not self._stopping.is_set():
            left = end - time.monotonic()
            if left <= 0:
                return
            if self._hurry.wait(left):
                # Cleared before asking: a changed() from now on sets it again, where one
                # after the question and before a clear would be lost.
                self._hurry.clear()
                if self._overdue():
                    return
