"""The incident directory: one record and one text per reap, written atomically, pruned.

Layout: ``<dir>/<id>.json``, the record (msgspec JSON of ``core/_incident.py``'s
versioned ``Incident``, for programs: ``jq``, ``ftimer-server incidents``), and
``<dir>/<id>.txt``, what a person reads (``render()``). Ids begin with the UTC time of
the expiry, so names sort by time.

Each file is written under a temporary name in the directory, fsynced and renamed into
place: a reader sees a whole file or none. The text is written before the record, so a
record that exists has its text beside it.

Writes take the directory's lock, one at a time: a file of its own (``.lock``, 0600,
there only while a write holds it), which only the server's user can open, so nobody
else can hold it (anyone who may read the directory could lock the directory itself).
A write waits for it at most until its deadline, then gives up and says so.

Retention: after each write incidents go until at most ``keep`` remain and their files
take at most ``max_bytes`` (the one just written is always kept, however large, and when
its user's bytes alone are over, the others' stay). Each goes from the user holding the
most (incidents while over ``keep``, then bytes), its oldest first: one user whose
workers are reaped over and over (any user can have its own reaped) pushes out its own
incidents, not another's within a fair share. A write that finds the file system full
(``ENOSPC``, ``EDQUOT``) removes incidents so, as many as the new one's files take, and
tries again, until none is left to remove: the newest incident tells of the stuck worker
of now, the oldest of one long gone. Only names ``incident_id`` makes count (a state
file beside them is no incident). An incident's user is its stuck worker's real uid,
read as its capture began (``Incident.uid``; a record written before it had that field:
as its capture recorded it); one whose uid could not be read counts as one more user.
Every file whose name is an incident's id followed by a dot (its record, its text, and
anything the server puts beside them, a core file say) belongs to that incident: it is
counted, and removed with it. A core is renamed ``<id>.core`` before its incident's
record is written: an incident whose record cannot be written (a full disk) takes its
core with it, and a file named as an incident's with no record (its helper killed
between the two) is counted, and removed once older than any capture can be
(``ORPHAN_AGE``). A core gcore is still writing (``core.<time>.<pid>``) is counted too.
The directory belongs to one daemon.

The directory is created 0700. One that exists must be a directory, not a symlink, owned
by the server's user and writable by nobody else: incidents hold command lines and
stacks, and a directory others may write lets them plant or swap files. Its read
permissions are left as the operator set them (a group of people may be let in).
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
from collections.abc import Sequence
from typing import Dict, Iterator, List, NamedTuple, Optional, Set, Tuple

import msgspec

from ftimer_server._files import (
    NotAPrivateDirectory,
    NotARegularFile,
    is_same_file,
    open_private_dir,
    open_regular,
    unsafe_above,
    write_atomically,
)
from ftimer_server.core._incident import INCIDENT_VERSION, Created, Incident
from ftimer_server.core._report import render

__all__ = [
    "IncidentError",
    "IncidentStore",
    "IncidentSummary",
    "incident_id",
    "load_incidents",
    "read_incident",
    "read_record",
]

log = logging.getLogger("ftimer_server.incidents")

#: What a scope keeps in an incident id (and so in a file name), and how much of it.
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")
_MAX_SCOPE = 40
#: An id that can be a file name in the directory and nothing else.
_SAFE_ID = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.:-]{0,199}$")
RECORD = ".json"
TEXT = ".txt"
#: The directory's lock: the server's user's alone (see ``_locked``).
LOCK = ".lock"
#: A write's errors that say the file system is full (``EDQUOT``: of the user's quota).
_FULL = (errno.ENOSPC, errno.EDQUOT)
#: Seconds a write waits for the directory's lock when it is given no deadline.
LOCK_WAIT = 10.0
#: Seconds between two tries of a lock held by another.
_LOCK_POLL = 0.05
#: An id as ``incident_id`` makes it.
_ID = r"[0-9]{8}T[0-9]{6}\.[0-9]{3}Z-[0-9]+-[A-Za-z0-9_.-]*"
#: A file named as an incident's (``<id>.core``): an orphan if its record is missing.
_INCIDENT_FILE = re.compile(rf"^{_ID}\.")
#: An incident's record, as retention counts it: a ``*.json`` of another name (the state
#: file, in a directory shared with it) is no incident.
_RECORD_NAME = re.compile(rf"^{_ID}\.json$")
#: A temporary file of this store's (``write_atomically``'s, of a record or a text); not
#: another's, as the state file's being written in a directory shared with it.
_OWN_TMP = re.compile(rf"^\.{_ID}\.(?:json|txt)\.[a-z0-9_]+\.tmp$")
#: What decoding a record that is no incident's raises: RecursionError for one nested
#: deeper than the decoder goes (written by hand: the server writes none).
_UNDECODABLE = (msgspec.DecodeError, msgspec.ValidationError, RecursionError)
#: A core gcore is writing (``_reap_extras.core_dump``), before its rename.
_CORE_BEING_WRITTEN = re.compile(r"^core\.[0-9]{8}T[0-9]{6}\.[0-9]{3}Z\.[0-9]+$")
#: Seconds after which a file of an incident with no record, or a core still named as
#: gcore writes it, is a leftover: a capture lasts at most an hour (``IncidentOptions``),
#: and its record is written as it ends.
ORPHAN_AGE = 3600.0 + 300.0


class IncidentError(Exception):
    """An incident cannot be found or read: a missing file, one that is not an incident
    record, or one of a schema version this server does not read. The message names the
    file or id and says which."""


class IncidentSummary(msgspec.Struct, frozen=True, kw_only=True):
    """The head of an incident record, for listings: decoding it skips the stacks.

    Attributes:
        path: the record's file.
        the others: as in ``Incident``.
    """

    version: int
    id: str
    host: str
    created: Created
    pid: int
    scope_id: str
    signal: int
    late: float = 0.0
    labels: Optional[Dict[str, str]] = None
    job: Optional[str] = None
    summary: List[str] = []
    timed_out: bool = False
    path: str = ""


class _Version(msgspec.Struct):
    version: Optional[int] = None


class _UserFacts(msgspec.Struct):
    uid: Optional[int] = None


class _UserCapture(msgspec.Struct):
    role: str = "stuck"
    facts: Optional[_UserFacts] = None


class _UserRecord(msgspec.Struct):
    # Of a record, what says whose the incident is (msgspec skips the rest).
    uid: Optional[int] = None
    captures: List[_UserCapture] = []


class _Held(NamedTuple):
    """An incident in the directory: its id, its files (path, size), and its record's
    inode and mtime (which tell a record replaced from the one read before)."""

    id: str
    files: List[Tuple[str, int]]
    record: Tuple[int, int]


_encoder = msgspec.json.Encoder()
_version_decoder = msgspec.json.Decoder(_Version)
_incident_decoder = msgspec.json.Decoder(Incident)
_summary_decoder = msgspec.json.Decoder(IncidentSummary)
_user_decoder = msgspec.json.Decoder(_UserRecord)
#: directory -> record path -> (inode, mtime, the incident's user): each record is read
#: once (by the helper, which lives as long as the server), not at every prune.
_read_users: Dict[str, Dict[str, Tuple[int, int, Optional[int]]]] = {}


def incident_id(created: float, pid: int, scope_id: str) -> str:
    """``"20261202T061503.123Z-4242-step"``: the UTC time of ``created`` to the
    millisecond, the pid and the scope, reduced to ``[A-Za-z0-9_.-]`` (anything else
    becomes ``_``) and its first 40 characters. Ids sort by time, and are safe as file
    names."""
    whole = int(created)
    millis = min(int((created - whole) * 1000), 999)
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(whole))
    scope = _UNSAFE.sub("_", scope_id)[:_MAX_SCOPE] or "_"
    return f"{stamp}.{millis:03d}Z-{pid}-{scope}"


class IncidentStore:
    """The incident directory of one server.

    Args:
        directory: where incidents go; created 0700 if missing (its missing parents
            too, 0700).
        keep: at most this many incidents are kept (at least 1).
        max_bytes: their files take at most this many bytes, the one just written
            excepted.
        create: create and check the directory (the server). False: only read what is
            there (the ``incidents`` commands, which may run as another user and must
            not make a directory): nothing is created or checked.

    Raises:
        OSError: (``create``) the directory cannot be created or opened, is a symlink
            or not a directory, is owned by another user, or is writable by group or
            others; the message says which.
        ValueError: ``keep`` or ``max_bytes`` below 1.
    """

    def __init__(
        self,
        directory: str,
        *,
        keep: int = 200,
        max_bytes: int = 256 * 1024 * 1024,
        create: bool = True,
    ) -> None:
        if keep < 1 or max_bytes < 1:
            raise ValueError(f"keep ({keep}) and max_bytes ({max_bytes}) must be at least 1")
        self.directory = os.path.abspath(directory)
        self.keep = keep
        self.max_bytes = max_bytes
        # Captures finish on several threads at once; one write (and prune) at a time,
        # so a prune never removes the temporary file of a write in progress.
        self._lock = threading.Lock()
        if create:
            _ensure_private_dir(self.directory)

    def write(self, incident: Incident, *, deadline: Optional[float] = None) -> str:
        """Write ``incident`` as ``<id>.json`` and ``<id>.txt``, then prune.

        Args:
            incident: the incident.
            deadline: ``time.monotonic()`` by which the directory's lock must be had
                (``None``: ``LOCK_WAIT`` seconds from now).

        Returns:
            the record's path.

        Raises:
            OSError: a file could not be written (a full disk with no older incident
                left to remove, a directory that became unwritable, ...), or the lock
                was still held by another process at the deadline (``TimeoutError``):
                nothing of this incident is left behind. A failure to prune older
                incidents is logged, not raised.
            ValueError: the incident's id is not a safe file name.
        """
        if not _SAFE_ID.match(incident.id):
            raise ValueError(f"incident id {incident.id!r} is not a safe file name")
        record = _encode(incident)
        text = _text(incident).encode("utf-8", "replace")
        base = os.path.join(self.directory, incident.id)
        if deadline is None:
            deadline = time.monotonic() + LOCK_WAIT
        written = False
        try:
            with self._lock, _locked(self.directory, deadline):
                while True:
                    try:
                        # The text first: a record that exists has its text beside it.
                        write_atomically(base + TEXT, text)
                        write_atomically(base + RECORD, record)
                        break
                    except OSError as e:
                        # The oldest incidents go to make room, as retention would.
                        room = len(text) + len(record)
                        if e.errno not in _FULL or not self._prune(incident.id, room):
                            raise
                written = True
                try:
                    self._prune(incident.id)
                except Exception:  # a record it cannot read, say: the write stands
                    log.exception("cannot prune incidents in %s", self.directory)
        except BaseException:
            if not written:
                # Its text, and its core (renamed ``<id>.core`` before this write), also
                # when the lock was not had by the deadline: with no record, nothing
                # would count or prune them, but as orphans an hour later.
                self._remove_files_of(incident.id)
            raise
        return base + RECORD

    def list(self) -> List[IncidentSummary]:
        """The incidents in the directory, newest last. A file that cannot be read or
        is not an incident record is skipped with a warning.

        Raises:
            OSError: the directory cannot be listed.
        """
        found = []
        for name in sorted(os.listdir(self.directory)):
            if not _is_record(name):
                continue
            path = os.path.join(self.directory, name)
            try:
                found.append(_read_summary(path))
            except IncidentError as e:
                if os.path.lexists(path):  # else pruned since it was listed: not a fault
                    log.warning("skipping %s", e)
        found.sort(key=lambda s: (s.created, s.id))
        return found

    def load(self, id_or_path: str) -> Incident:
        """The incident with this id (or the only one whose id starts with it), or the
        record at this path (``<id>.txt`` names its record too).

        Raises:
            IncidentError: no such incident, several whose ids start so, or a file that
                cannot be read or is not an incident record of a known version.
        """
        return read_incident(self.path_of(id_or_path))

    def path_of(self, id_or_path: str) -> str:
        """The record's path for an id, a unique start of one, or a path.

        Raises:
            IncidentError: no such incident, or several whose ids start so.
        """
        if "/" not in id_or_path:
            # An id first: one may end as a file name does (a scope is the worker's).
            exact = os.path.join(self.directory, id_or_path + RECORD)
            if os.path.exists(exact):
                return exact
        if "/" in id_or_path or id_or_path.endswith((RECORD, TEXT)):
            path = id_or_path[: -len(TEXT)] + RECORD if id_or_path.endswith(TEXT) else id_or_path
            if not os.path.isabs(path) and not os.path.exists(path):
                path = os.path.join(self.directory, path)
            return path
        try:
            names = os.listdir(self.directory)
        except OSError as e:
            raise IncidentError(f"cannot list {self.directory}: {e.strerror or e}") from None
        ids = sorted(n[: -len(RECORD)] for n in names if _is_record(n))
        matches = [i for i in ids if i.startswith(id_or_path)] if id_or_path else []
        if len(matches) == 1:
            return os.path.join(self.directory, matches[0] + RECORD)
        if not matches:
            raise IncidentError(f"no incident {id_or_path!r} in {self.directory}")
        shown = ", ".join(matches[:5]) + (", ..." if len(matches) > 5 else "")
        raise IncidentError(
            f"{id_or_path!r} is the start of {len(matches)} incident ids ({shown}): give more "
            "of the id"
        )

    def _remove_files_of(self, incident: str) -> None:
        """Remove every file of ``incident`` (never one of another incident whose id it
        begins); failures are logged."""
        try:
            names = os.listdir(self.directory)
        except OSError as e:
            log.warning("cannot list %s: %s", self.directory, e.strerror or e)
            return
        ids = {n[: -len(RECORD)] for n in names if _RECORD_NAME.match(n)} | {incident}
        for name in names:
            if _owner(name, ids) == incident:
                _remove(os.path.join(self.directory, name))

    def _prune(self, written: str, room: int = 0) -> int:
        """Remove incidents beyond ``keep`` and ``max_bytes``, and more until ``room``
        bytes are freed; never ``written`` (the newest by the clock that named it, which
        may have stepped back since others). Return how many were removed (a record that
        could not be removed is no removal: the write's retry must not pick it again)."""
        try:
            incidents, others = self._incidents()
        except OSError as e:
            log.warning("cannot prune incidents in %s: %s", self.directory, e)
            return 0
        total = sum(size for held in incidents for _, size in held.files)
        total += sum(size for _, size, _ in others)
        budget = min(self.max_bytes, total - room) if room else self.max_bytes
        now = time.time()
        for path, size, mtime in others:
            # A leftover (its incident's record never written, a gcore killed with its
            # helper) once older than any capture in progress can be.
            if now - mtime >= ORPHAN_AGE and _remove(path):
                log.warning("removed %s: a file of an incident with no record", path)
                total -= size
        left = len(incidents)
        if left <= self.keep and total <= budget:
            return 0
        users = self._users(incidents)
        removed = 0
        count: Dict[Optional[int], int] = {}
        taken: Dict[Optional[int], int] = {}  # bytes
        removable: Dict[Optional[int], List[int]] = {}  # oldest first, the written never
        for n, (held, user) in enumerate(zip(incidents, users)):
            count[user] = count.get(user, 0) + 1
            taken[user] = taken.get(user, 0) + sum(s for _, s in held.files)
            if held.id != written:
                removable.setdefault(user, []).append(n)
        while (left > self.keep or total > budget) and removable:
            most = count if left > self.keep else taken
            # The user holding the most; between equals, the older incident first.
            user = max(removable, key=lambda u: (most[u], -removable[u][0]))
            if most is taken and taken[user] < max(taken.values()):
                break  # over by the bytes of the written one's user alone: it stays
            n = removable[user].pop(0)
            if not removable[user]:
                del removable[user]
            left -= 1
            count[user] -= 1
            # The record first: from then on, nobody lists a half-removed incident.
            gone = True
            for path, size in sorted(incidents[n].files, key=lambda f: not f[0].endswith(RECORD)):
                taken[user] -= size
                if _remove(path):
                    total -= size
                elif path.endswith(RECORD):
                    gone = False  # still listed: the next prune would pick it again
            removed += gone
            if room and gone:
                log.warning(
                    "the file system of %s is full: removed incident %s, to write %s",
                    self.directory,
                    incidents[n].id,
                    written,
                )
        return removed

    def _users(self, incidents: List[_Held]) -> List[Optional[int]]:
        """The user of each incident: its stuck worker's real uid, or None where its
        record does not say (the worker gone before its capture) or cannot be read."""
        known = _read_users.get(self.directory, {})
        found: Dict[str, Tuple[int, int, Optional[int]]] = {}
        for held in incidents:
            path = os.path.join(self.directory, held.id + RECORD)
            cached = known.get(path)
            if cached is not None and cached[:2] == held.record:
                found[path] = cached
            else:
                found[path] = (*held.record, _read_user(path))
        _read_users[self.directory] = found  # only what is there: the cache stays bounded
        return [found[os.path.join(self.directory, held.id + RECORD)][2] for held in incidents]

    def _incidents(self) -> Tuple[List[_Held], List[Tuple[str, int, float]]]:
        """Every incident (oldest first) with its files and their sizes; and the files
        of no incident that take space all the same (path, size, mtime): files named as
        an incident's whose record is missing, cores gcore is writing. Leftover
        temporary files of this store (a write cut short by a crash) are removed."""
        files: Dict[str, List[Tuple[str, int]]] = {}
        records: Dict[str, Tuple[int, int]] = {}
        others: List[Tuple[str, int, float]] = []
        names = sorted(os.listdir(self.directory))
        ids = {n[: -len(RECORD)] for n in names if _RECORD_NAME.match(n)}
        for name in names:
            path = os.path.join(self.directory, name)
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                continue
            if not stat.S_ISREG(st.st_mode):
                continue
            if _OWN_TMP.match(name):
                with contextlib.suppress(OSError):
                    os.unlink(path)  # no write is in progress: we hold the lock
                continue
            owner = _owner(name, ids)
            if owner is not None:
                files.setdefault(owner, []).append((path, st.st_size))
                if name == owner + RECORD:
                    records[owner] = (st.st_ino, st.st_mtime_ns)
            elif _INCIDENT_FILE.match(name) or _CORE_BEING_WRITTEN.match(name):
                others.append((path, st.st_size, st.st_mtime))
        held = [_Held(i, f, records.get(i, (0, 0))) for i, f in sorted(files.items())]
        return held, others


def _encode(incident: Incident) -> bytes:
    # ``Incident`` omits members at their defaults, and ``version`` is one: written
    # that way, a record would not say which schema it follows, and a later reader
    # (whose default is a later version) would misread it. The file always says.
    doc = {"version": incident.version, **msgspec.to_builtins(incident)}
    return _encoder.encode(doc) + b"\n"


def _read_user(path: str) -> Optional[int]:
    """The real uid of the stuck worker of the incident recorded at ``path``, or None
    where the record does not say or cannot be read."""
    try:
        fd, _ = open_regular(path)
        with open(fd, "rb") as f:
            data = f.read(MAX_RECORD_BYTES + 1)
        record = _user_decoder.decode(data)
    except (OSError, NotARegularFile, *_UNDECODABLE):
        return None
    if record.uid is not None:
        return record.uid
    captures = record.captures  # a record of before `uid`
    if not captures or captures[0].role != "stuck" or captures[0].facts is None:
        return None
    return captures[0].facts.uid


def _owner(name: str, ids: Set[str]) -> Optional[str]:
    """The incident a file belongs to: the longest id that, with a dot, starts its name."""
    for end in range(len(name), 0, -1):
        if name[end - 1 : end] == "." and name[: end - 1] in ids:
            return name[: end - 1]
    return None


def _is_record(name: str) -> bool:
    return name.endswith(RECORD) and not name.startswith(".")


def _text(incident: Incident) -> str:
    try:
        return render(incident)
    except Exception:  # a bug in the text must not cost the record
        log.exception("cannot render incident %s as text", incident.id)
        return f"incident {incident.id}: the text could not be made; see {incident.id}.json\n"


@contextlib.contextmanager
def _locked(directory: str, deadline: float) -> Iterator[None]:
    """Hold the directory's lock: writers in other processes (the server's capture
    processes) do not prune one another's half-written files.

    The lock is ``<directory>/.lock``, never the directory: whoever may read the
    directory could lock that, and hold every later write. The file is made 0600 (and
    opened without following a symlink) in a directory only the server's user may
    write: only that user can hold it. Its holder removes it as it ends (a listing of
    the directory is its incidents), so a lock is held only on the file still there.

    Raises:
        TimeoutError: another process still held it at ``deadline``.
        OSError: it cannot be opened or is not a regular file of the server's user.
    """
    path = os.path.join(directory, LOCK)
    while True:
        try:
            fd, st = open_regular(path, os.O_RDWR | os.O_CREAT)
        except NotARegularFile as e:
            raise OSError(f"the incident directory's lock {path} is {e.kind}") from None
        try:
            if st.st_uid != os.geteuid():
                raise OSError(f"the incident directory's lock {path} is another user's")
            _flock(fd, path, deadline)
        except BaseException:
            os.close(fd)
            raise
        if is_same_file(path, st):
            break
        os.close(fd)  # removed by the holder before us: the lock is the file there now
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)  # still locked: whoever waits on it tries the next one
        os.close(fd)  # releases the lock


def _flock(fd: int, path: str, deadline: float) -> None:
    """Lock ``fd`` (the lock ``path``), waiting until ``deadline`` at most.

    Raises:
        TimeoutError: another process still held it at ``deadline``.
    """
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(
                    f"the incident directory's lock {path} is held by another process: "
                    "not written (given up at its deadline)"
                ) from None
            time.sleep(min(_LOCK_POLL, left))


def _ensure_private_dir(directory: str) -> None:
    # Checked on an open descriptor (never through a symlink), so the directory judged
    # is the one the incidents go to.
    try:
        # Its parent may not exist yet: the FIFO's directory, say, which the server
        # makes (and gives its mode) when it starts, after this.
        os.makedirs(os.path.dirname(directory), 0o700, exist_ok=True)
        os.mkdir(directory, 0o700)
    except FileExistsError:
        pass
    except OSError as e:
        raise OSError(
            e.errno, f"incident directory {directory}: cannot create it: {e.strerror}"
        ) from None
    except RecursionError:  # os.makedirs() recurses once for each parent it makes
        raise OSError(
            errno.ENAMETOOLONG,
            f"incident directory {directory}: cannot create it: too many parents to make",
        ) from None
    try:
        fd, _ = open_private_dir(directory)
    except NotAPrivateDirectory as e:
        raise OSError(e.errno, f"incident directory {directory}: it {e}") from None
    except OSError as e:
        raise OSError(
            e.errno, f"incident directory {directory}: cannot open it: {e.strerror}"
        ) from None
    os.close(fd)
    # Its files are written and pruned by path: a directory above that others may change
    # lets them swap it for a symlink, and the server write (or delete) where they choose.
    why = unsafe_above(directory)
    if why is not None:
        raise OSError(
            errno.EPERM,
            f"incident directory {directory}: unsafe: {why} what is in it, and so swap it "
            "for a link to where the server then writes; use a directory whose parents "
            "only root or the server's user may change (such as /var/lib/ftimer/incidents)",
        )


def read_incident(path: str) -> Incident:
    """The incident record at ``path``.

    Raises:
        IncidentError: missing, unreadable, not an incident record, or of a schema
            version this server does not read.
    """
    return read_record(path)[0]


def read_record(path: str) -> Tuple[Incident, bytes]:
    """The incident record at ``path``, and its bytes (read once, bounded).

    Raises:
        IncidentError: as ``read_incident``.
    """
    data = _versioned(path)
    try:
        return _incident_decoder.decode(data), data
    except _UNDECODABLE as e:
        raise IncidentError(f"{path} is not an incident record: {e}") from None


def _read_summary(path: str) -> IncidentSummary:
    # Only the head is decoded (msgspec skips the rest): listing stays cheap.
    data = _versioned(path)
    try:
        summary = _summary_decoder.decode(data)
    except _UNDECODABLE as e:
        raise IncidentError(f"{path} is not an incident record: {e}") from None
    return msgspec.structs.replace(summary, path=path)


#: The largest record read: a server writes none over 16 MiB (``_helper.MAX_INCIDENT_BYTES``).
MAX_RECORD_BYTES = 64 << 20


def _versioned(path: str) -> bytes:
    """The bytes of a record whose version this server reads.

    Raises:
        IncidentError: missing, unreadable, not JSON with a version, another version.
    """
    try:
        # Never waiting on a FIFO put among the records, nor reading /dev/zero to the end.
        fd, _ = open_regular(path, follow=True)
        with open(fd, "rb") as f:
            data = f.read(MAX_RECORD_BYTES + 1)
    except FileNotFoundError:
        raise IncidentError(f"no incident file {path}") from None
    except NotARegularFile as e:
        raise IncidentError(f"{path} is {e.kind}, not an incident record") from None
    except OSError as e:
        raise IncidentError(f"cannot read incident file {path}: {e.strerror or e}") from None
    if len(data) > MAX_RECORD_BYTES:
        raise IncidentError(f"{path} is larger than an incident record may be")
    try:
        version = _version_decoder.decode(data).version
    except _UNDECODABLE as e:
        raise IncidentError(f"{path} is not an incident record: {e}") from None
    if version is None:
        raise IncidentError(f"{path} is not an incident record: it has no version")
    if version != INCIDENT_VERSION:
        raise IncidentError(
            f"{path}: an incident record of version {version}; this ftimer-server reads "
            f"version {INCIDENT_VERSION}"
        )
    return data


def load_incidents(paths: Sequence[str]) -> List[Incident]:
    """The incidents at ``paths``: record files, or directories (each record in them,
    not below), oldest first. In a directory, a file that is not a readable incident
    record is skipped with a warning; a file named on its own must be one.

    Raises:
        IncidentError: a path that does not exist, or a file named on its own that is
            not a readable incident record.
    """
    found: List[Incident] = []
    for path in paths:
        if os.path.isdir(path):
            try:
                names = sorted(os.listdir(path))
            except OSError as e:
                raise IncidentError(f"cannot list {path}: {e.strerror or e}") from None
            for name in filter(_is_record, names):
                try:
                    found.append(read_incident(os.path.join(path, name)))
                except IncidentError as e:
                    log.warning("skipping %s", e)
        elif os.path.exists(path):
            found.append(read_incident(path))
        else:
            raise IncidentError(f"no such file or directory: {path}")
    found.sort(key=lambda i: (i.created, i.host, i.id))
    return found


def _remove(path: str) -> bool:
    """Remove ``path``; False if it could not be (said in the log). Gone already: True."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as e:
        log.warning("cannot remove %s: %s", path, e.strerror or e)
        return False
    return True
