"""The incident directory, on real files: atomic writes, retention by count and bytes,
refusals of unsafe directories, a full or unwritable directory, and reading back."""

from __future__ import annotations

import errno
import json
import logging
import os
import pathlib
import shutil
import stat
import subprocess
import sys
import textwrap
import threading
from typing import List, Optional

import msgspec
import pytest

from ftimer_server.core._incident import Capture, Frame, Incident, ThreadStack
from ftimer_server.core._report import render
from ftimer_server.incidents import _store
from ftimer_server.incidents._store import (
    IncidentError,
    IncidentStore,
    incident_id,
    load_incidents,
    read_incident,
)

ROOT = os.geteuid() == 0
T0 = 1_796_000_000.0


def make(
    n: int = 0,
    *,
    raw: str = "",
    pid: int = 4242,
    host: str = "node-a",
    scope: str = "step",
    uid: Optional[int] = None,
) -> Incident:
    """The n-th incident: one second after the one before (of ``uid``'s worker)."""
    created = T0 + n
    stuck = Capture(
        pid=pid,
        labels={"rank": "3", "job": "71"},
        method="py-spy",
        threads=[ThreadStack(tid=pid, name="MainThread", frames=[Frame("step", "/app/t.py", 9)])],
        raw=raw,
    )
    return Incident(
        id=incident_id(created, pid, scope),
        host=host,
        created=created,
        pid=pid,
        uid=uid,
        scope_id=scope,
        signal=9,
        deadline=100.0 + n,
        labels={"rank": "3", "job": "71"},
        job="71",
        captures=[stuck],
    )


def names(directory: pathlib.Path) -> List[str]:
    return sorted(os.listdir(directory))


# -- ids -------------------------------------------------------------------------------


def test_incident_ids_name_the_utc_time_pid_and_scope_and_sort_by_time() -> None:
    assert incident_id(1_796_000_000.1239, 4242, "step") == "20261130T005320.123Z-4242-step"
    assert incident_id(1_796_000_000.9999, 1, "s") == "20261130T005320.999Z-1-s"
    ids = [incident_id(T0 + dt, pid, "x") for dt, pid in [(0.001, 9), (0.01, 10), (61, 1)]]
    assert ids == sorted(ids)


def test_incident_ids_keep_a_bounded_safe_scope() -> None:
    ident = incident_id(T0, 7, "../../etc/passwd rank 3/é" + "x" * 100)
    assert ident == "20261130T005320.000Z-7-.._.._etc_passwd_rank_3__" + "x" * 15
    assert "/" not in ident
    assert len(ident) <= 24 + 1 + 10 + 1 + 40
    assert incident_id(T0, 7, "").endswith("-7-_")


# -- writing and reading ---------------------------------------------------------------


def test_write_makes_a_private_record_and_its_text(tmp_path: pathlib.Path) -> None:
    directory = tmp_path / "incidents"
    store = IncidentStore(str(directory))
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    incident = make()
    path = store.write(incident)
    assert path == str(directory / f"{incident.id}.json")
    assert names(directory) == [f"{incident.id}.json", f"{incident.id}.txt"]
    for name in names(directory):
        assert stat.S_IMODE((directory / name).stat().st_mode) == 0o600
    doc = json.loads((directory / f"{incident.id}.json").read_text())
    assert doc["version"] == 1
    assert doc["id"] == incident.id
    assert read_incident(path) == incident
    assert (directory / f"{incident.id}.txt").read_text() == render(incident)


def test_list_is_newest_last_and_load_takes_an_id_its_start_or_a_path(
    tmp_path: pathlib.Path,
) -> None:
    store = IncidentStore(str(tmp_path))
    written = [make(n, pid=100 + n) for n in (2, 0, 1)]
    for incident in written:
        store.write(incident)
    listed = store.list()
    assert [s.created for s in listed] == [T0, T0 + 1, T0 + 2]
    assert listed[0].labels == {"rank": "3", "job": "71"}
    assert listed[0].path == str(tmp_path / f"{listed[0].id}.json")
    newest = written[0]
    assert store.load(newest.id) == newest
    assert store.load(newest.id[:20]) == newest  # the only one of that second
    assert store.load(str(tmp_path / f"{newest.id}.txt")) == newest
    assert store.load(f"{newest.id}.json") == newest
    with pytest.raises(IncidentError, match=r"is the start of 3 incident ids .*give more"):
        store.load("2026")
    with pytest.raises(IncidentError, match=r"no incident 'nope' in "):
        store.load("nope")
    with pytest.raises(IncidentError, match=r"no incident file /nonexistent/x.json"):
        store.load("/nonexistent/x.json")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", r"is not an incident record: Input data was truncated"),
        (b'{"version": 1, "id": "x"', r"is not an incident record: Input data was truncated"),
        (b"[1, 2]", r"is not an incident record: Expected `object`, got `array`"),
        (b'{"version": 1, "id": "x"}', r"is not an incident record: Object missing required"),
        (b'{"version": 2, "id": "x"}', r"of version 2; this ftimer-server reads version 1"),
        (b"\xff\xfe garbage", r"is not an incident record"),
    ],
)
def test_an_invalid_record_is_skipped_by_list_and_refused_by_load(
    tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture, content: bytes, message: str
) -> None:
    store = IncidentStore(str(tmp_path))
    good = make(1)
    store.write(good)
    (tmp_path / "20261130T005319.000Z-1-bad.json").write_bytes(content)
    with caplog.at_level(logging.WARNING, logger="ftimer_server.incidents"):
        assert [s.id for s in store.list()] == [good.id]
    assert "skipping" in caplog.text
    assert "-1-bad.json" in caplog.text
    with pytest.raises(IncidentError, match=message):
        store.load("20261130T005319.000Z-1-bad")


def test_a_record_pruned_while_the_list_reads_is_no_fault(
    tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # `incidents` lists while the daemon prunes: a record named by the directory's listing
    # and removed before it was read was warned of as a file it could not read.
    store = IncidentStore(str(tmp_path), keep=2)
    for n in (1, 2):
        store.write(make(n))
    listed = os.listdir(tmp_path)  # then the daemon writes one more, and prunes the first
    store.write(make(3))
    monkeypatch.setattr(_store.os, "listdir", lambda path: list(listed))
    with caplog.at_level(logging.WARNING, logger="ftimer_server.incidents"):
        assert [s.id for s in store.list()] == [make(2).id]
    assert caplog.text == ""


def test_an_unreadable_record_is_skipped_with_a_warning(
    tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = IncidentStore(str(tmp_path))
    (tmp_path / "a.json").mkdir()  # a name that cannot be read as a file
    with caplog.at_level(logging.WARNING, logger="ftimer_server.incidents"):
        assert store.list() == []
    assert "a.json is a directory, not an incident record" in caplog.text


def test_a_fifo_among_the_records_is_skipped_not_waited_on(
    tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture
) -> None:
    # open() of a FIFO nobody writes waits for a writer: the listing hung for good.
    store = IncidentStore(str(tmp_path))
    store.write(make(1))
    os.mkfifo(tmp_path / "x.json")
    with caplog.at_level(logging.WARNING, logger="ftimer_server.incidents"):
        outcome: list = []
        thread = threading.Thread(target=lambda: outcome.append(store.list()), daemon=True)
        thread.start()
        thread.join(30)
        if thread.is_alive():  # let it go, then fail
            os.close(os.open(tmp_path / "x.json", os.O_WRONLY | os.O_NONBLOCK))
            pytest.fail("listing the incidents waited on a FIFO")
    [summary] = outcome[0]
    assert summary.id == make(1).id
    assert "x.json is a FIFO, not an incident record" in caplog.text


@pytest.mark.parametrize("created", [3e11, -1.0, 1e300])
def test_a_record_from_beyond_the_calendar_is_skipped(
    tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture, created: float
) -> None:
    # Its date could not be shown: the listing (and show, and merge) ended in a traceback
    # and showed nothing, not even the good records.
    store = IncidentStore(str(tmp_path))
    store.write(make(1))
    bad = msgspec.structs.replace(make(2), created=0.0)
    doc = msgspec.json.decode(msgspec.json.encode(bad))
    doc["created"] = created
    (tmp_path / f"{bad.id}.json").write_bytes(msgspec.json.encode(doc))
    with caplog.at_level(logging.WARNING, logger="ftimer_server.incidents"):
        assert [s.id for s in store.list()] == [make(1).id]
    assert "is not an incident record" in caplog.text


# -- retention -------------------------------------------------------------------------


def test_retention_by_count_removes_the_oldest_with_everything_of_theirs(
    tmp_path: pathlib.Path,
) -> None:
    store = IncidentStore(str(tmp_path), keep=3)
    incidents = [make(n) for n in range(5)]
    for incident in incidents[:2]:
        store.write(incident)
    (tmp_path / f"{incidents[0].id}.core").write_bytes(b"core")  # put beside it by gcore
    (tmp_path / "notes.md").write_text("an operator's file")  # no incident's: left alone
    for incident in incidents[2:]:
        store.write(incident)
    kept = [i.id for i in incidents[2:]]
    assert names(tmp_path) == sorted(
        ["notes.md", *(f"{i}.json" for i in kept), *(f"{i}.txt" for i in kept)]
    )
    assert [s.id for s in store.list()] == kept


def test_retention_by_bytes_keeps_the_newest_even_when_it_alone_is_larger(
    tmp_path: pathlib.Path,
) -> None:
    one = len(msgspec.json.encode(make(0, raw="x" * 1000))) + 1 + len(render(make(0)))
    store = IncidentStore(str(tmp_path), max_bytes=2 * one + 100)
    for n in range(4):
        store.write(make(n, raw="x" * 1000))
    assert [s.created for s in store.list()] == [T0 + 2, T0 + 3]
    total = sum(p.stat().st_size for p in tmp_path.iterdir())
    assert total <= store.max_bytes
    huge = make(9, raw="y" * (4 * one))
    store.write(huge)
    assert [s.id for s in store.list()] == [huge.id]


def test_a_temporary_file_left_by_a_crash_is_removed_at_the_next_write(
    tmp_path: pathlib.Path,
) -> None:
    store = IncidentStore(str(tmp_path))
    (tmp_path / ".20261130T005320.000Z-1-s.json.abc123.tmp").write_bytes(b'{"vers')
    store.write(make())
    assert not [n for n in names(tmp_path) if n.startswith(".")]


def test_concurrent_writes_all_land_and_prune_to_the_bound(tmp_path: pathlib.Path) -> None:
    store = IncidentStore(str(tmp_path), keep=5)
    errors: List[BaseException] = []
    barrier = threading.Barrier(4)

    def writer(k: int) -> None:
        barrier.wait()
        try:
            for n in range(k, 40, 4):
                store.write(make(n, raw="z" * 5000))
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert [s.created for s in store.list()] == [T0 + n for n in range(35, 40)]
    assert len(names(tmp_path)) == 10


# -- atomicity -------------------------------------------------------------------------


def test_a_failed_write_leaves_nothing_behind(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = IncidentStore(str(tmp_path))
    calls = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        calls.append(fd)
        if len(calls) == 2:  # the record, after its text was written
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(OSError, match="No space left on device") as caught:
        store.write(make())
    assert caught.value.errno == errno.ENOSPC
    assert names(tmp_path) == []


READER = """
import sys
import msgspec
from ftimer_server.core._incident import Incident
path = sys.argv[1]
decoder = msgspec.json.Decoder(Incident)
reads = bad = 0
def read():
    global reads, bad
    with open(path, "rb") as f:
        data = f.read()
    try:
        decoder.decode(data)
    except msgspec.DecodeError:
        bad += 1
    reads += 1
read()
print("ready", flush=True)
import select
while not select.select([sys.stdin], [], [], 0)[0]:
    read()
print(reads, bad, flush=True)
"""


def test_a_reader_never_sees_half_a_record(tmp_path: pathlib.Path) -> None:
    store = IncidentStore(str(tmp_path), keep=1000)
    big = [make(0, raw=c * 300_000) for c in "ab"]  # each about 300 KB: many write() calls
    path = store.write(big[0])
    with subprocess.Popen(
        [sys.executable, "-c", READER, path],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    ) as reader:
        assert reader.stdout is not None
        assert reader.stdin is not None
        try:
            assert reader.stdout.readline() == "ready\n"
            for n in range(60):
                store.write(big[n % 2])
            reader.stdin.write("stop\n")
            reader.stdin.flush()
            reads, bad = map(int, reader.stdout.readline().split())
        finally:
            reader.kill()
    assert reads > 0
    assert bad == 0


# -- a full or unwritable directory, unsafe directories --------------------------------

FULL = """
import errno, json, os, sys
from ftimer_server.incidents._store import IncidentStore
sys.path.insert(0, sys.argv[2])
from test_incident_store import make
directory = os.path.join(sys.argv[1], "incidents")
store = IncidentStore(directory)
try:
    store.write(make(0, raw="x" * 200_000))
    outcome = "written"
except OSError as e:
    outcome = errno.errorcode.get(e.errno, str(e.errno))
print(json.dumps({"outcome": outcome, "left": sorted(os.listdir(directory))}))
"""


def test_a_full_directory_raises_oserror_and_leaves_nothing(tmp_path: pathlib.Path) -> None:
    # A real full file system: a 64 KiB tmpfs in a private mount namespace.
    if not ROOT or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare(1) to mount a small tmpfs")
    mount = tmp_path / "small"
    mount.mkdir()
    script = (
        f"mount -t tmpfs -o size=64k,mode=0700 tmpfs {mount} && "
        f'exec "{sys.executable}" -c "$0" {mount} {pathlib.Path(__file__).parent}'
    )
    result = subprocess.run(
        ["unshare", "--mount", "sh", "-c", script, FULL], capture_output=True, text=True
    )
    if result.returncode != 0 and "mount" in result.stderr and not result.stdout:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"outcome": "ENOSPC", "left": []}


UNWRITABLE = """
import json, os, sys
from ftimer_server.incidents._store import IncidentStore
sys.path.insert(0, sys.argv[2])
from test_incident_store import make
store = IncidentStore(sys.argv[1])
os.chmod(sys.argv[1], 0o500)
try:
    store.write(make())
    outcome = "written"
except PermissionError as e:
    outcome = "EACCES"
os.chmod(sys.argv[1], 0o700)
print(json.dumps({"outcome": outcome, "left": os.listdir(sys.argv[1])}))
"""


def test_an_unwritable_directory_raises_oserror(tmp_path: pathlib.Path) -> None:
    # Root writes anywhere: it runs without the capabilities that bypass permissions.
    prefix: List[str] = []
    if ROOT:
        if shutil.which("setpriv") is None:
            pytest.skip("needs setpriv(1) to drop root's permission override")
        prefix = ["setpriv", "--bounding-set=-dac_override,-dac_read_search,-fowner"]
    result = subprocess.run(
        [
            *prefix,
            sys.executable,
            "-c",
            UNWRITABLE,
            str(tmp_path / "d"),
            str(pathlib.Path(__file__).parent),
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"outcome": "EACCES", "left": []}


def test_unsafe_directories_are_refused(tmp_path: pathlib.Path) -> None:
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    (tmp_path / "link").symlink_to(real)
    with pytest.raises(OSError, match=r"incident directory .*/link: it is a symlink"):
        IncidentStore(str(tmp_path / "link"))
    (tmp_path / "file").write_text("")
    with pytest.raises(OSError, match=r"incident directory .*/file: it is not a directory"):
        IncidentStore(str(tmp_path / "file"))
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.raises(OSError, match=r"writable by others \(mode 0777\); make it 0700"):
        IncidentStore(str(shared))
    # A missing parent is made too, private (the FIFO's directory before the server
    # makes it its own at start).
    IncidentStore(str(tmp_path / "missing" / "incidents"))
    assert stat.S_IMODE((tmp_path / "missing").stat().st_mode) == 0o700
    (tmp_path / "blocked").write_text("")
    with pytest.raises(OSError, match=r"/blocked/incidents: it is not a directory"):
        IncidentStore(str(tmp_path / "blocked" / "incidents"))
    readable = tmp_path / "readable"
    readable.mkdir()
    readable.chmod(0o750)  # let a group of people read: allowed, left as it is
    IncidentStore(str(readable))
    assert stat.S_IMODE(readable.stat().st_mode) == 0o750


def test_a_directory_under_one_others_may_change_is_refused(tmp_path: pathlib.Path) -> None:
    # Only the directory itself was checked: a worker allowed to write its parent (a
    # shared collection point for `incidents merge`) swapped it for a symlink, and the
    # root daemon wrote incidents, and their temporary files, where the link led.
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o775)  # a group may rename what is in it
    (shared / "incidents").mkdir(mode=0o700)
    with pytest.raises(OSError, match=r"shared \(mode 0775\) lets users other than its owner"):
        IncidentStore(str(shared / "incidents"))
    shared.chmod(0o1777)  # sticky, as /tmp: only an entry's owner renames it
    IncidentStore(str(shared / "incidents"))
    shared.chmod(0o755)
    IncidentStore(str(shared / "incidents"))


@pytest.mark.skipif(not ROOT, reason="needs root to give a directory to another user")
def test_a_directory_of_another_user_is_refused(tmp_path: pathlib.Path) -> None:
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o700)
    os.chown(theirs, 4243, 4242)
    with pytest.raises(OSError, match=r"owned by uid 4243, not by this server's user \(0\)"):
        IncidentStore(str(theirs))


# -- several hosts ---------------------------------------------------------------------


def test_load_incidents_from_directories_and_files(
    tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture
) -> None:
    a, b = tmp_path / "node-a", tmp_path / "node-b"
    IncidentStore(str(a)).write(make(1, host="node-a"))
    path_b = IncidentStore(str(b)).write(make(0, host="node-b", pid=77))
    (a / "junk.json").write_text("{")
    with caplog.at_level(logging.WARNING, logger="ftimer_server.incidents"):
        loaded = load_incidents([str(a), path_b])
    assert [(i.host, i.created) for i in loaded] == [("node-b", T0), ("node-a", T0 + 1)]
    assert "junk.json is not an incident record" in caplog.text
    with pytest.raises(IncidentError, match=r"junk.json is not an incident record"):
        load_incidents([str(a / "junk.json")])
    with pytest.raises(IncidentError, match=r"no such file or directory: .*/node-c"):
        load_incidents([str(tmp_path / "node-c")])


def test_the_reader_script_is_honest() -> None:
    # READER above counts a half record as bad: check it does, on a truncated record.
    data = msgspec.json.encode(make())
    with pytest.raises(msgspec.DecodeError):
        msgspec.json.decode(data[: len(data) // 2], type=Incident)
    assert textwrap.dedent(READER).count("bad += 1") == 1


def test_a_directory_too_deep_to_make_is_an_os_error(tmp_path: pathlib.Path) -> None:
    # os.makedirs() recursed once for each parent to make: a RecursionError, and the
    # daemon's start a traceback.
    deep = tmp_path.joinpath(*["d"] * 1100)
    with pytest.raises(OSError, match="too many parents to make") as raised:
        IncidentStore(str(deep))
    assert raised.value.errno == errno.ENAMETOOLONG
