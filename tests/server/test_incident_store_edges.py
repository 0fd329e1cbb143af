"""The incident store's retention and writes at their edges: a record it cannot read, a
clock stepped back, files that are no incidents, one user's incident larger than the
limit, a write given up at its lock's deadline. Real files in a real directory."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import time
from typing import List

import pytest

from ftimer_server.incidents._store import IncidentStore

from .test_incident_store import make

ALICE, BOB = 1001, 1002


def ids(directory: pathlib.Path) -> List[str]:
    return sorted(n[: -len(".json")] for n in os.listdir(directory) if n.endswith(".json"))


#: Valid JSON, a version-1 record's head, 2 KB: msgspec raises RecursionError on it.
DEEP = b'{"version":1,"zz":' + b"[" * 1000 + b"]" * 1000 + b"}\n"


LOCKER = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600)
fcntl.flock(fd, fcntl.LOCK_EX)
print("locked", flush=True)
sys.stdin.read()
"""


def test_a_deeply_nested_record_does_not_stop_retention(tmp_path: pathlib.Path) -> None:
    # The record is planted (or damaged) once; every later write then raised
    # RecursionError out of its prune, after its files were written: reported as "not
    # written", and the directory grew past ``keep`` for good.
    (tmp_path / "20200101T000000.000Z-1-deep.json").write_bytes(DEEP)
    store = IncidentStore(str(tmp_path), keep=3)
    for n in range(6):
        store.write(make(n, uid=ALICE))
    assert len(ids(tmp_path)) <= 3


def test_an_incident_written_after_the_clock_stepped_back_is_kept(tmp_path: pathlib.Path) -> None:
    # A full directory (keep reached) of incidents stamped before a backwards clock step
    # (NTP correcting a clock that ran ahead): each new incident's id sorts first, and
    # its own write's prune removed it at once; write() returned the path of a record
    # already gone, and every reap until the clock caught up was lost.
    store = IncidentStore(str(tmp_path), keep=3)
    for n in (3600, 3601, 3602):
        store.write(make(n, uid=ALICE))
    path = store.write(make(0, uid=ALICE))  # the clock stepped back an hour
    assert os.path.exists(path)


def test_a_json_file_that_is_no_incident_never_takes_the_newest_incidents_place(
    tmp_path: pathlib.Path,
) -> None:
    # Any ``*.json`` was an incident (``_is_record``): the state file, say, with
    # --incident-dir the state file's directory (accepted: only equal paths are
    # refused). Its name sorts after every id: it held the "newest is always kept"
    # place, and counted its bytes; larger than --incidents-max-bytes, each incident was
    # removed by its own write.
    (tmp_path / "state.json").write_bytes(b'{"timers": []}' + b" " * 200_000)
    store = IncidentStore(str(tmp_path), max_bytes=100_000)
    path = store.write(make(0, uid=ALICE))
    assert os.path.exists(path)
    assert (tmp_path / "state.json").exists()


def test_a_prune_removes_only_its_own_temporary_files(tmp_path: pathlib.Path) -> None:
    # The prune removed every ".*.tmp": in a directory shared with the state file, the
    # daemon's own write in progress (its temporary file, before its rename), which
    # the incident lock does not cover.
    in_progress = tmp_path / ".state.json.k2j4x9_a.tmp"
    in_progress.write_bytes(b"{}")
    leftover = tmp_path / f".{make(5).id}.json.abc123.tmp"  # the store's own: removed
    leftover.write_bytes(b"{")
    IncidentStore(str(tmp_path)).write(make(0))
    assert in_progress.exists()
    assert not leftover.exists()


def test_one_users_large_newest_incident_does_not_push_out_anothers_within_its_share(
    tmp_path: pathlib.Path,
) -> None:
    # docs/incidents.md: another user's incidents go "only once that user holds as many
    # (or as many bytes)", and each of n users keeps "about 1 / n of the bytes, whatever
    # the others do". ALICE's newest, with its core (renamed <id>.core before its record,
    # as --core does; cores are bounded by --core-max-bytes, 4G, not by the directory's
    # limit), is larger than the limit: every one of BOB's few small incidents went.
    store = IncidentStore(str(tmp_path), keep=100, max_bytes=1_000_000)
    for n in range(3):
        store.write(make(n, uid=BOB))
    bob = ids(tmp_path)
    alice = make(10, uid=ALICE, pid=77)
    with open(tmp_path / f"{alice.id}.core", "wb") as core:
        core.truncate(2_000_000)  # sparse: st_size is what retention counts
    store.write(alice)
    assert set(bob) <= set(ids(tmp_path))  # BOB holds a few KB: within any share


def test_a_write_given_up_at_its_deadline_leaves_no_core_behind(tmp_path: pathlib.Path) -> None:
    # write()'s docstring: given up at the deadline, "nothing of this incident is left
    # behind". Its core (--core: renamed <id>.core before the write) was left, counted
    # against --incidents-max-bytes (and pushing out everyone's incidents) for an hour,
    # until retention took it for an orphan.
    store = IncidentStore(str(tmp_path))
    incident = make(0)
    core = tmp_path / f"{incident.id}.core"
    core.write_bytes(b"\x7fELF" + b"\0" * 4096)
    with subprocess.Popen(
        [sys.executable, "-c", LOCKER, str(tmp_path / ".lock")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    ) as holder:  # on leaving: its stdin closed (it exits), waited for
        assert holder.stdout.readline() == "locked\n"
        with pytest.raises(TimeoutError):
            store.write(incident, deadline=time.monotonic() + 0.2)
    assert not core.exists()
