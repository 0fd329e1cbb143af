"""Behaviours of the incident store (``incidents/_store.py``) that mutation testing found
no test pinned: retention's choice between users, pruning several incidents at once,
the bytes of a leftover removed, the order an incident's files go, and a full disk whose
directory cannot be listed. Real files in a real directory (a small tmpfs for a full
disk)."""

from __future__ import annotations

import errno
import math
import os
import pathlib
import subprocess
import sys
import threading
import time
import types
from typing import Callable, Iterator, List, Optional

import msgspec
import pytest
from tests.conftest import tmpfs
from tests.server.test_incident_store import make, names

from ftimer_server.core._incident import Incident
from ftimer_server.incidents import _store
from ftimer_server.incidents._store import IncidentStore

ALICE, BOB = 1001, 1002


def _fill(fd: int) -> None:
    """Write to ``fd`` until its file system is full (raises that ``OSError``)."""
    while True:
        os.write(fd, b"f" * 4096)


def kept(directory: pathlib.Path) -> List[str]:
    """The ids of the incidents whose records are in ``directory``, oldest first."""
    return sorted(n[: -len(".json")] for n in names(directory) if n.endswith(".json"))


def size_of(incident: Incident, scratch: pathlib.Path) -> int:
    """The bytes ``incident``'s files take, written alone into ``scratch``."""
    scratch.mkdir()
    IncidentStore(str(scratch)).write(incident)
    return sum(p.stat().st_size for p in scratch.iterdir())


def a(n: int, uid: Optional[int], raw: str = "") -> Incident:
    return make(n, uid=uid, pid=uid or 7, raw=raw)


# -- the choice between users ----------------------------------------------------------


def test_between_users_holding_as_many_the_one_with_the_older_incident_loses_first(
    tmp_path: pathlib.Path,
) -> None:
    store = IncidentStore(str(tmp_path), keep=3)
    for incident in (a(0, BOB), a(1, BOB), a(2, ALICE)):
        store.write(incident)
    store.write(a(3, ALICE))  # four: BOB and ALICE hold two each; BOB's 0 is the oldest
    assert kept(tmp_path) == [a(1, BOB).id, a(2, ALICE).id, a(3, ALICE).id]


def test_over_keep_the_user_with_the_most_incidents_loses_though_another_has_more_bytes(
    tmp_path: pathlib.Path,
) -> None:
    # Over ``keep`` it is incidents that count: BOB's one large incident is no reason to
    # stop, leaving more than ``keep`` in the directory.
    store = IncidentStore(str(tmp_path), keep=2)
    for incident in (a(0, BOB, raw="b" * 50_000), a(1, ALICE), a(2, ALICE)):
        store.write(incident)
    assert kept(tmp_path) == [a(0, BOB).id, a(2, ALICE).id]


def test_at_keep_but_over_the_bytes_the_user_with_the_most_bytes_loses(
    tmp_path: pathlib.Path,
) -> None:
    # ``keep`` reached, not passed: the bytes decide, and BOB's large incident alone
    # goes (not ALICE's older small one, because ALICE holds more incidents).
    big = a(0, BOB, raw="b" * 50_000)
    small = [a(1, ALICE), a(2, ALICE)]
    budget = sum(size_of(i, tmp_path / f"s{n}") for n, i in enumerate(small)) + 1000
    directory = tmp_path / "incidents"
    store = IncidentStore(str(directory), keep=3, max_bytes=10**9)
    store.write(big)
    store.write(small[0])
    store.max_bytes = budget
    store.write(small[1])
    assert kept(directory) == [i.id for i in small]


@pytest.mark.parametrize(
    ("before", "written", "after"),
    [
        # ALICE 4, BOB 3: ALICE's 0; 3/3: ALICE's 1 (older); 2/3: BOB's 4; 2/2: ALICE's 2.
        (
            [(0, ALICE), (1, ALICE), (2, ALICE), (3, ALICE), (4, BOB), (5, BOB)],
            (6, BOB),
            [(3, ALICE), (5, BOB), (6, BOB)],
        ),
        # ALICE 3, BOB 2: ALICE's 1; 2/2: BOB's 0 (older than any of ALICE's).
        (
            [(0, BOB), (1, ALICE), (2, ALICE), (3, ALICE)],
            (4, BOB),
            [(2, ALICE), (3, ALICE), (4, BOB)],
        ),
    ],
)
def test_several_pruned_at_once_go_by_turns_between_users(
    tmp_path: pathlib.Path, before: list, written: tuple, after: list
) -> None:
    # A server restarted with a lower --incidents-keep prunes several incidents in one
    # go: each from the user holding the most at that moment (its count going down as
    # its incidents go), the older first between equals.
    store = IncidentStore(str(tmp_path), keep=100)
    for n, uid in before:
        store.write(a(n, uid))
    IncidentStore(str(tmp_path), keep=3).write(a(*written))
    assert kept(tmp_path) == [a(n, uid).id for n, uid in after]


# -- bytes -----------------------------------------------------------------------------


def test_files_taking_exactly_max_bytes_are_all_kept(tmp_path: pathlib.Path) -> None:
    # Over ``keep`` by one: the oldest goes, and the two left take exactly max_bytes.
    incidents = [a(n, ALICE) for n in range(3)]
    budget = sum(size_of(i, tmp_path / f"s{n}") for n, i in enumerate(incidents[1:]))
    directory = tmp_path / "incidents"
    store = IncidentStore(str(directory), keep=2, max_bytes=10**9)
    store.write(incidents[0])
    store.write(incidents[1])
    store.max_bytes = budget
    store.write(incidents[2])
    assert sum(p.stat().st_size for p in directory.iterdir()) == budget
    assert kept(directory) == [i.id for i in incidents[1:]]


def test_the_bytes_of_a_leftover_removed_are_no_longer_counted(tmp_path: pathlib.Path) -> None:
    # An old file of an incident with no record is removed by the prune: its bytes are
    # free, and no incident goes for them.
    incidents = [a(n, ALICE) for n in range(3)]
    budget = sum(size_of(i, tmp_path / f"s{n}") for n, i in enumerate(incidents)) + 1000
    directory = tmp_path / "incidents"
    store = IncidentStore(str(directory), max_bytes=budget)
    for incident in incidents[:2]:
        store.write(incident)
    leftover = directory / f"{a(9, BOB).id}.core"
    leftover.write_bytes(b"c" * (4 * budget))
    long_ago = os.path.getmtime(leftover) - _store.ORPHAN_AGE - 60
    os.utime(leftover, (long_ago, long_ago))
    store.write(incidents[2])
    assert not leftover.exists()
    assert kept(directory) == [i.id for i in incidents]


# -- removal ---------------------------------------------------------------------------


def test_an_incident_goes_record_first(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # "The record first: from then on, nobody lists a half-removed incident."
    store = IncidentStore(str(tmp_path), keep=1)
    old = a(0, ALICE)
    store.write(old)
    (tmp_path / f"{old.id}.core").write_bytes(b"core")
    removed: List[str] = []
    real_unlink: Callable[..., None] = os.unlink

    def unlink(path: str, *args: object, **kwargs: object) -> None:
        removed.append(os.path.basename(path))
        real_unlink(path, *args, **kwargs)

    monkeypatch.setattr(os, "unlink", unlink)
    store.write(a(1, ALICE))
    mine = [n for n in removed if n.startswith(old.id)]
    assert sorted(mine) == sorted([f"{old.id}.json", f"{old.id}.txt", f"{old.id}.core"])
    assert mine[0] == f"{old.id}.json"


# -- a full disk -----------------------------------------------------------------------


def test_a_full_disk_whose_directory_cannot_be_listed_fails_the_write_once(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Nothing could be pruned (the listing failed): the write must say ENOSPC, not try
    # again for ever.
    with tmpfs(tmp_path / "small", "64k") as small:
        directory = small / "incidents"
        store = IncidentStore(str(directory))
        filler = os.open(small / "filler", os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            with pytest.raises(OSError, match="No space left") as full:
                _fill(filler)
            assert full.value.errno == errno.ENOSPC
        finally:
            os.close(filler)
        calls: List[int] = []

        def unlistable(self: IncidentStore) -> object:
            calls.append(1)
            if len(calls) > 3:
                raise RuntimeError("the write tried again after a prune that removed nothing")
            raise OSError(errno.EIO, "Input/output error")

        monkeypatch.setattr(IncidentStore, "_incidents", unlistable)
        with pytest.raises(OSError, match=r"No space left|quota") as raised:
            store.write(a(0, ALICE, raw="x" * 8192))
        assert raised.value.errno in (errno.ENOSPC, errno.EDQUOT)
        assert len(calls) == 1
        assert names(directory) == []


def test_over_the_bytes_several_go_each_from_who_holds_the_most_at_that_moment(
    tmp_path: pathlib.Path,
) -> None:
    # ALICE's first goes (she holds the most bytes); then BOB holds the most: his
    # oldest goes next, not ALICE's second.
    older = [a(0, ALICE, raw="a" * 20_000), a(1, ALICE, raw="a" * 20_000)]
    older += [a(2, BOB, raw="b" * 15_000), a(3, BOB, raw="b" * 15_000)]
    newest = a(4, ALICE)
    sizes = [size_of(i, tmp_path / f"s{n}") for n, i in enumerate([*older, newest])]
    directory = tmp_path / "incidents"
    store = IncidentStore(str(directory), max_bytes=10**9)
    for incident in older:
        store.write(incident)
    store.max_bytes = sizes[1] + sizes[3] + sizes[4] + 1000  # room for one of each, and the newest
    store.write(newest)
    assert kept(directory) == [older[1].id, older[3].id, newest.id]


# -- writes ----------------------------------------------------------------------------


def test_an_id_that_is_no_safe_file_name_is_refused_and_nothing_is_written(
    tmp_path: pathlib.Path,
) -> None:
    directory = tmp_path / "incidents"
    store = IncidentStore(str(directory))
    unsafe = msgspec.structs.replace(make(0), id="../escaped")
    with pytest.raises(ValueError, match="not a safe file name"):
        store.write(unsafe)
    assert names(directory) == []
    assert sorted(os.listdir(tmp_path)) == ["incidents"]


LOCKER = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600)
fcntl.flock(fd, fcntl.LOCK_EX)
print("locked", flush=True)
sys.stdin.read()
"""


class HeldLock:
    """The store's lock held by another process (a real flock), and the store's clock
    made a fake one that its own polls advance: the holder lets go once ``held_for``
    seconds of that clock have gone by (never: inf). Whether anything was written while
    it held the lock is kept (``written_while_held``)."""

    def __init__(self, directory: pathlib.Path, monkeypatch: pytest.MonkeyPatch, held_for: float):
        self.directory = directory
        self.holder = subprocess.Popen(
            [sys.executable, "-c", LOCKER, str(directory / ".lock")],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.holder.stdout is not None
        assert self.holder.stdout.readline() == "locked\n"
        self.start = self.now = 1000.0
        self.held_for = held_for
        self.released = False
        self.written_while_held: List[str] = []
        fake = types.SimpleNamespace(**{k: getattr(time, k) for k in dir(time) if k[0] != "_"})
        fake.monotonic, fake.sleep = (lambda: self.now), self._sleep
        monkeypatch.setattr(_store, "time", fake)

    def _sleep(self, seconds: float) -> None:
        self.now += seconds
        if not self.released and self.now - self.start >= self.held_for:
            self.written_while_held = [n for n in os.listdir(self.directory) if n != ".lock"]
            self.release()

    def release(self) -> None:
        if self.holder.returncode is not None:
            return
        self.released = True
        assert self.holder.stdin is not None
        assert self.holder.stdout is not None
        self.holder.stdin.close()
        self.holder.wait(30)  # its lock is released as it exits
        self.holder.stdout.close()


@pytest.fixture
def held_lock(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Callable[[float], HeldLock]]:
    """``held_lock(held_for)``: ``tmp_path``'s lock held (``HeldLock``), let go of at the
    end if it still is."""
    made: List[HeldLock] = []

    def hold(held_for: float) -> HeldLock:
        made.append(HeldLock(tmp_path, monkeypatch, held_for))
        return made[-1]

    yield hold
    for lock in made:
        lock.release()


def test_a_write_with_no_deadline_waits_lock_wait_for_a_held_lock(
    tmp_path: pathlib.Path, held_lock: Callable[[float], HeldLock]
) -> None:
    # No deadline: the write waits up to LOCK_WAIT (10 s) for the directory's lock, and
    # writes nothing meanwhile. (A write that ignored the lock, or gave up after 0.5 s,
    # passed a test that held it 0.3 s.)
    store = IncidentStore(str(tmp_path))
    lock = held_lock(9.9)
    assert store.write(make(0)) == str(tmp_path / f"{make(0).id}.json")
    assert lock.released
    assert lock.written_while_held == []


def test_a_write_with_no_deadline_gives_up_at_lock_wait(
    tmp_path: pathlib.Path, held_lock: Callable[[float], HeldLock]
) -> None:
    store = IncidentStore(str(tmp_path))
    lock = held_lock(math.inf)
    with pytest.raises(TimeoutError, match=r"lock .*\.lock is held by another process"):
        store.write(make(0))
    assert _store.LOCK_WAIT <= lock.now - lock.start < _store.LOCK_WAIT + 0.5
    assert not (tmp_path / f"{make(0).id}.json").exists()


def test_a_held_lock_gives_a_write_up_at_its_deadline_no_later(
    tmp_path: pathlib.Path, held_lock: Callable[[float], HeldLock]
) -> None:
    store = IncidentStore(str(tmp_path))
    lock = held_lock(math.inf)
    deadline = lock.start + 0.3
    with pytest.raises(TimeoutError, match=r"lock .*\.lock is held by another process"):
        store.write(make(1), deadline=deadline)
    assert deadline <= lock.now <= deadline + _store._LOCK_POLL  # within one poll
    assert not (tmp_path / f"{make(1).id}.json").exists()


def test_a_write_waits_for_the_lock_until_its_deadline_not_less(
    tmp_path: pathlib.Path, held_lock: Callable[[float], HeldLock]
) -> None:
    # Let go of 0.05 s before the deadline: the write waited, and wrote nothing before.
    store = IncidentStore(str(tmp_path))
    lock = held_lock(0.9)
    assert store.write(make(0), deadline=lock.start + 0.95) == str(tmp_path / f"{make(0).id}.json")
    assert lock.released
    assert lock.written_while_held == []


def test_a_write_failing_for_another_reason_than_a_full_disk_removes_no_older_incident(
    tmp_path: pathlib.Path,
) -> None:
    # A directory where the record goes (EISDIR on the rename): no room is made, the
    # older incidents all stay.
    store = IncidentStore(str(tmp_path))
    for n in range(3):
        store.write(make(n))
    blocker = tmp_path / f"{make(3).id}.json"
    blocker.mkdir()
    (blocker / "inside").write_bytes(b"x")
    with pytest.raises(OSError, match=r".") as raised:  # whatever it is, not a full disk
        store.write(make(3))
    assert raised.value.errno not in (errno.ENOSPC, errno.EDQUOT)
    assert set(kept(tmp_path)) >= {make(n).id for n in range(3)}


def test_an_incident_written_stays_though_its_prune_is_interrupted(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Once both files are written the write stands: an interruption of the prune after
    # it (a KeyboardInterrupt, say) never removes the incident just written.
    store = IncidentStore(str(tmp_path))

    def interrupted(self: IncidentStore, written: str, room: int = 0) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr(IncidentStore, "_prune", interrupted)
    with pytest.raises(KeyboardInterrupt):
        store.write(make(0))
    assert names(tmp_path) == [f"{make(0).id}.json", f"{make(0).id}.txt"]


def test_a_file_gone_between_the_listing_and_its_stat_does_not_stop_retention(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Another process (an operator's rm) removes a file while a prune lists the
    # directory: it is skipped, and retention goes on.
    store = IncidentStore(str(tmp_path), keep=1)
    store.write(make(0))
    real_listdir = os.listdir

    def listdir(path: object = ".") -> List[str]:
        found = real_listdir(path)  # type: ignore[arg-type]
        if os.path.abspath(str(path)) == str(tmp_path):
            found.append("+gone")  # listed, then removed; sorts before any other
        return found

    monkeypatch.setattr(os, "listdir", listdir)
    store.write(make(1))
    monkeypatch.undo()
    assert kept(tmp_path) == [make(1).id]


def test_what_is_no_regular_file_is_neither_counted_nor_removed_with_an_incident(
    tmp_path: pathlib.Path,
) -> None:
    store = IncidentStore(str(tmp_path), keep=1)
    old = make(0)
    store.write(old)
    link = tmp_path / f"{old.id}.link"
    os.symlink("/etc/hostname", link)
    store.write(make(1))
    assert kept(tmp_path) == [make(1).id]
    assert os.path.islink(link)


# -- whose an incident is --------------------------------------------------------------


def test_a_record_replaced_is_read_again_for_its_user(tmp_path: pathlib.Path) -> None:
    # A record's user is read once, and again when its record is replaced (another
    # inode, another mtime): not the user read before.
    store = IncidentStore(str(tmp_path), keep=2)
    for incident in (a(0, BOB), a(1, ALICE), a(2, ALICE)):
        store.write(incident)  # the third prunes: each record's user is read
    assert kept(tmp_path) == [a(0, BOB).id, a(2, ALICE).id]
    now_alices = msgspec.structs.replace(a(0, BOB), uid=ALICE)
    swap = tmp_path / "swap"
    swap.write_bytes(_store._encode(now_alices))
    os.replace(swap, tmp_path / f"{now_alices.id}.json")  # its text left as it was
    store.write(a(3, ALICE))
    # ALICE holds all three: her oldest (once BOB's) goes.
    assert kept(tmp_path) == [a(2, ALICE).id, a(3, ALICE).id]


def test_a_record_that_cannot_be_read_counts_as_an_unknown_users(tmp_path: pathlib.Path) -> None:
    # "one whose uid could not be read counts as one more user": the same one as the
    # incidents whose record says no uid.
    store = IncidentStore(str(tmp_path), keep=3)
    store.write(a(0, None))
    unreadable = tmp_path / f"{a(1, None).id}.json"
    unreadable.write_bytes(b"not json\n")
    store.write(a(2, ALICE))
    store.write(a(3, ALICE))
    # Unknown 2 (0 and 1), ALICE 2: the older goes, the unknown user's 0.
    assert kept(tmp_path) == [a(1, None).id, a(2, ALICE).id, a(3, ALICE).id]


def test_a_file_whose_name_only_begins_with_an_id_is_not_that_incidents(
    tmp_path: pathlib.Path,
) -> None:
    # An incident's files are its id followed by a dot; an operator's ``<id>~`` is not.
    store = IncidentStore(str(tmp_path), keep=1)
    old = make(0)
    store.write(old)
    backup = tmp_path / f"{old.id}~"
    backup.write_bytes(b"an operator's copy")
    store.write(make(1))
    assert kept(tmp_path) == [make(1).id]
    assert backup.exists()


# -- removing ----------------------------------------------------------------------------


def test_a_write_given_up_never_removes_an_incident_whose_id_begins_with_its_own(
    tmp_path: pathlib.Path,
) -> None:
    # The same worker at the same millisecond, scopes "s" and "s.a": the record of "s"
    # cannot be written (a directory where it goes), and only its own files go.
    store = IncidentStore(str(tmp_path))
    other = make(0, scope="s.a")
    store.write(other)
    failing = make(0, scope="s")
    assert other.id.startswith(failing.id + ".")
    (tmp_path / f"{failing.id}.json").mkdir()
    with pytest.raises(OSError, match=r"."):  # a directory where its record goes
        store.write(failing)
    assert f"{other.id}.json" in names(tmp_path)
    assert f"{other.id}.txt" in names(tmp_path)
    assert f"{failing.id}.txt" not in names(tmp_path)


def test_a_file_that_cannot_be_removed_is_still_counted(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # The old incident's core cannot be removed (EPERM): its bytes are still taken, so
    # retention goes on to the next incident until the files fit max_bytes.
    incidents = [make(n) for n in range(3)]
    sizes = [size_of(i, tmp_path / f"s{n}") for n, i in enumerate(incidents)]
    directory = tmp_path / "incidents"
    store = IncidentStore(str(directory), max_bytes=10**9)
    store.write(incidents[0])
    core = directory / f"{incidents[0].id}.core"
    core.write_bytes(b"c" * 30_000)
    store.write(incidents[1])
    store.max_bytes = 30_000 + sizes[2] + sizes[1] // 2
    real_unlink = os.unlink

    def unlink(path: str, *args: object, **kwargs: object) -> None:
        if os.path.abspath(path) == str(core):
            raise PermissionError(errno.EPERM, "Operation not permitted", path)
        real_unlink(path, *args, **kwargs)

    monkeypatch.setattr(os, "unlink", unlink)
    store.write(incidents[2])
    monkeypatch.undo()
    assert kept(directory) == [incidents[2].id]
    assert core.exists()
    assert sum(p.stat().st_size for p in directory.iterdir()) <= store.max_bytes
    assert f"cannot remove {core}" in caplog.text


# -- the lock ------------------------------------------------------------------------------


def test_a_lock_that_is_a_fifo_is_refused_as_an_os_error(tmp_path: pathlib.Path) -> None:
    store = IncidentStore(str(tmp_path))
    os.mkfifo(tmp_path / ".lock", 0o600)
    with pytest.raises(OSError, match=r"lock .*\.lock is a FIFO"):
        store.write(make(0))
    assert names(tmp_path) == [".lock"]


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give the lock to another user")
def test_a_lock_of_another_user_is_refused(tmp_path: pathlib.Path) -> None:
    store = IncidentStore(str(tmp_path))
    lock = tmp_path / ".lock"
    lock.write_bytes(b"")
    os.chown(lock, 65534, 65534)
    with pytest.raises(OSError, match="another user's"):
        store.write(make(0))
    assert names(tmp_path) == [".lock"]


def test_a_write_given_up_at_its_deadline_leaves_no_descriptor_open(
    tmp_path: pathlib.Path,
) -> None:
    store = IncidentStore(str(tmp_path))
    with subprocess.Popen(
        [sys.executable, "-c", LOCKER, str(tmp_path / ".lock")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    ) as holder:
        assert holder.stdout is not None
        assert holder.stdout.readline() == "locked\n"
        before = sorted(os.listdir("/proc/self/fd"))
        for n in range(3):
            with pytest.raises(TimeoutError):
                store.write(make(n), deadline=time.monotonic() + 0.05)
        after = sorted(os.listdir("/proc/self/fd"))
    assert after == before


RELEASER = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600)
fcntl.flock(fd, fcntl.LOCK_EX)
print("locked", flush=True)
sys.stdin.read()
os.unlink(sys.argv[1])  # as a writer of the store's releases it: the file removed first
"""


def write_behind_a_holder(
    tmp_path: pathlib.Path, holder_script: str, deadline: Optional[float], hold: float
) -> List[object]:
    """``write(make(0))`` on a thread while another process holds the directory's lock
    for ``hold`` seconds; what the write returned or raised."""
    store = IncidentStore(str(tmp_path))
    outcome: List[object] = []
    with subprocess.Popen(
        [sys.executable, "-c", holder_script, str(tmp_path / ".lock")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    ) as holder:
        assert holder.stdout is not None
        assert holder.stdin is not None
        assert holder.stdout.readline() == "locked\n"

        def write() -> None:
            try:
                outcome.append(store.write(make(0), deadline=deadline))
            except BaseException as e:  # reported by the caller
                outcome.append(e)

        writer = threading.Thread(target=write)
        writer.start()
        time.sleep(hold)
        holder.stdin.close()
        writer.join(30)
    return outcome


def test_writes_leave_no_descriptor_open(tmp_path: pathlib.Path) -> None:
    # Neither a write that took the lock at once, nor one that waited on a lock file its
    # holder removed as it released it (and so took the next one).
    store = IncidentStore(str(tmp_path / "a"))
    before = sorted(os.listdir("/proc/self/fd"))
    store.write(make(1))
    outcome = write_behind_a_holder(tmp_path / "a", RELEASER, None, hold=0.3)
    after = sorted(os.listdir("/proc/self/fd"))
    assert outcome == [str(tmp_path / "a" / f"{make(0).id}.json")]
    assert after == before
