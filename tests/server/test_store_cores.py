"""Cores in the incident directory: a core whose incident's record cannot be written (a
full disk) goes with it; files of incidents with no record are counted and pruned once
old; cores gcore is still writing are counted; a core never fills the disk its record
needs. Full disks are small tmpfs mounts of the test's own, unmounted at the end.
"""

from __future__ import annotations

import errno
import os
import pathlib
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import List, Optional, Tuple

import pytest
from tests.conftest import tmpfs

from ftimer_server.core._incident import Capture, Frame, Incident, ThreadStack
from ftimer_server.incidents import _reap_extras as reap_extras
from ftimer_server.incidents import _store
from ftimer_server.incidents._pinned import Process
from ftimer_server.incidents._reap_extras import core_dump
from ftimer_server.incidents._store import IncidentStore, incident_id

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs Linux")

T0 = time.time() - 1000


def make(n: int, raw: str = "") -> Incident:
    created = T0 + n
    stuck = Capture(
        pid=4242,
        method="py-spy",
        threads=[ThreadStack(tid=4242, name="MainThread", frames=[Frame("step", "/t.py", 9)])],
        raw=raw,
    )
    return Incident(
        id=incident_id(created, 4242, "step"),
        host="node-a",
        created=created,
        pid=4242,
        scope_id="step",
        signal=9,
        deadline=100.0 + n,
        captures=[stuck],
    )


def names(directory: pathlib.Path) -> List[str]:
    return sorted(os.listdir(directory))


@pytest.fixture
def small_disk(tmp_path: pathlib.Path) -> Iterator[pathlib.Path]:
    """A 1 MiB tmpfs."""
    with tmpfs(tmp_path / "small", "1m") as small:
        yield small


def test_core_of_an_unwritten_record_is_removed(small_disk: pathlib.Path) -> None:
    directory = small_disk / "incidents"
    store = IncidentStore(str(directory))
    incident = make(1, raw="x" * (600 << 10))  # its record alone: ~600 KiB
    core = directory / f"{incident.id}.core"  # renamed so by the capture, record to come
    core.write_bytes(b"c" * (500 << 10))
    with pytest.raises(OSError, match="No space left") as raised:
        store.write(incident)
    assert raised.value.errno == errno.ENOSPC
    assert names(directory) == []  # no core left that nothing would count or prune
    store.write(make(2))  # the space is there for the next
    assert len(names(directory)) == 2


def test_a_file_system_full_of_older_incidents_makes_room_for_the_newest(
    small_disk: pathlib.Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Under keep and max_bytes, the older incidents filled the disk: retention ran only
    # after a write, so every later write failed with ENOSPC and none was written again.
    directory = small_disk / "incidents"
    store = IncidentStore(str(directory))
    incidents = [make(n, raw="x" * (100 << 10)) for n in range(1, 21)]
    for incident in incidents:
        store.write(incident)
    kept = sorted({name.rsplit(".", 1)[0] for name in names(directory)})
    assert names(directory) == sorted(f"{i}{end}" for i in kept for end in (".json", ".txt"))
    ids = [incident.id for incident in incidents]
    gone = len(ids) - len(kept)
    assert gone > 0
    assert kept == ids[gone:]  # the oldest went, each whole
    full = re.compile(
        rf"the file system of {re.escape(str(directory))} is full: removed incident (\S+), "
        r"to write (\S+)"
    )
    said = [full.fullmatch(r.getMessage()) for r in caplog.records if r.levelname == "WARNING"]
    assert [m[1] for m in said if m] == ids[:gone]
    assert all(m and ids.index(m[2]) >= len(kept) for m in said)  # for a write past the fill


def test_a_full_file_system_with_a_record_that_will_not_go_gives_the_write_up(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A record that could not be removed (EPERM; btrfs may refuse an unlink when full)
    # was counted removed, and the write's retry picked it again, for ever, holding the
    # directory's lock: no incident written again, the log full of false removals.
    store = IncidentStore(str(tmp_path))
    old = make(1)
    store.write(old)
    stuck = str(tmp_path / f"{old.id}.json")
    unlink = os.unlink
    over = threading.Event()

    def full(path: str, data: bytes) -> None:
        raise OSError(errno.EIO if over.is_set() else errno.ENOSPC, "full")

    def refusing(path: str, *args: object, **kwargs: object) -> None:
        if path == stuck:
            raise PermissionError(errno.EPERM, "Operation not permitted", path)
        unlink(path, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(_store, "write_atomically", full)
    monkeypatch.setattr(_store.os, "unlink", refusing)
    raised: List[int] = []

    def write() -> None:
        try:
            store.write(make(2))
        except OSError as e:
            raised.append(e.errno)

    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    writer.join(5)
    looping = writer.is_alive()
    over.set()  # a looping write ends at its next try
    writer.join(5)
    assert not looping
    assert raised == [errno.ENOSPC]


def test_old_files_of_incidents_with_no_record_are_pruned(tmp_path: pathlib.Path) -> None:
    store = IncidentStore(str(tmp_path))
    store.write(make(1))
    old = tmp_path / f"{make(2).id}.core"  # its helper killed before the record
    old.write_bytes(b"c" * 1000)
    long_ago = time.time() - _store.ORPHAN_AGE - 60
    os.utime(old, (long_ago, long_ago))
    fresh = tmp_path / f"{make(3).id}.core"  # its record is being written
    fresh.write_bytes(b"c" * 1000)
    unrelated = tmp_path / "notes.core"  # not named as an incident's: not ours to judge
    unrelated.write_bytes(b"n")
    store.write(make(4))
    assert not old.exists()
    assert fresh.exists()
    assert unrelated.exists()


def test_files_with_no_record_and_cores_being_written_are_counted(
    tmp_path: pathlib.Path,
) -> None:
    store = IncidentStore(str(tmp_path), max_bytes=100 << 10)
    first = make(1)
    store.write(first)
    # gcore writing a core for an incident to come; and a fresh core of no record yet.
    writing = tmp_path / "core.20260101T000000.000Z.4242"
    writing.write_bytes(b"c" * (60 << 10))
    fresh = tmp_path / f"{make(3).id}.core"
    fresh.write_bytes(b"c" * (60 << 10))
    store.write(make(2))
    # Together over the budget: the oldest incident goes; the cores stay (in use).
    assert not (tmp_path / f"{first.id}.json").exists()
    assert (tmp_path / f"{make(2).id}.json").exists()
    assert writing.exists()
    assert fresh.exists()


def core_of_a_sleeper(directory: pathlib.Path) -> Tuple[Optional[str], Optional[str]]:
    """``core_dump`` of a sleeping process of the test's own into ``directory``, with a
    1 GiB limit: (its path, or None, and why not)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", "import time; print('ready', flush=True); time.sleep(600)"],
        stdout=subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == b"ready\n"  # up and asleep
        process = Process.open(proc.pid, None, None)
        try:
            return core_dump(
                process, str(directory), max_bytes=1 << 30, deadline=time.monotonic() + 30
            )
        finally:
            process.close()
    finally:
        proc.kill()
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def test_a_core_never_fills_the_disk(small_disk: pathlib.Path) -> None:
    # On a disk too small for it, gdb's core is cut short by ENOSPC and gcore says it
    # saved it: capped below the free space (less room for the record), it is refused.
    # The free space is read in the helper, by core_dump: on the server's loop, a hung
    # file system would have held every reap.
    if os.geteuid() != 0 or shutil.which("gcore") is None:
        pytest.skip("needs root and gcore")
    directory = small_disk / "incidents"
    IncidentStore(str(directory))
    before = os.statvfs(directory)
    path, error = core_of_a_sleeper(directory)
    assert path is None, "a core that would fill the disk was kept"
    assert error is not None
    assert "may be written on the file system" in error
    assert names(directory) == []
    after = os.statvfs(directory)
    assert after.f_bavail == before.f_bavail  # nothing left behind


def test_a_core_cut_short_by_a_disk_filled_meanwhile_is_removed(
    small_disk: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Cores written at once each saw the free space alone: the disk filled under them,
    # gdb said it saved each, and the cores were kept cut short as if whole (three
    # filled a 300 MiB disk). The free space seen is made too large here, as the other
    # cores' writes make it.
    if os.geteuid() != 0 or shutil.which("gcore") is None:
        pytest.skip("needs root and gcore")
    monkeypatch.setattr(reap_extras, "_room_for_core", lambda directory: 1 << 40)
    directory = small_disk / "incidents"
    IncidentStore(str(directory))
    path, error = core_of_a_sleeper(directory)
    assert path is None, "a core cut short by a full disk was kept"
    assert error is not None
    assert "the file system filled up" in error
    assert names(directory) == []
