"""The state file: format, atomic writes, what a restart keeps, and the batching saver."""

from __future__ import annotations

import errno
import json
import logging
import os
import pathlib
import stat
import threading
import time
import zlib
from typing import Callable

import hypothesis.strategies as st
import msgspec
import pytest
from hypothesis import given, settings
from tests.conftest import wait_until

from ftimer_protocol import PIPE_BUF, Arm, encode
from ftimer_server import Timer
from ftimer_server.daemon import _state as state_module
from ftimer_server.daemon._state import (
    SAVE_SPACING,
    STATE_BYTES_PER_TIMER,
    STATE_VERSION,
    StateFileError,
    StatePathError,
    StateSaver,
    decode_state,
    encode_state,
    fifo_identity,
    load_state,
    max_state_bytes,
    read_boot_id,
    write_state,
)

from .conftest import PATIENCE, DaemonProcess, unblocked

Spawn = Callable[..., DaemonProcess]
BOOT = "c0ffee00-0000-4000-8000-000000000000"

timers = st.builds(
    Timer,
    pid=st.integers(1, 2**22),
    scope_id=st.text(max_size=40),
    signal=st.integers(0, 64),
    deadline=st.floats(0, 1e9),
    start_time=st.none() | st.integers(0, 2**40),
    labels=st.none()
    | st.dictionaries(
        st.from_regex(r"[a-z_]{1,8}", fullmatch=True), st.text(max_size=128), max_size=16
    ),
)  # within the wire's bounds, as every armed timer is (a Timer is an Arm message)


@settings(max_examples=50)
@given(st.lists(timers, max_size=8), st.floats(0, 1e9))
def test_round_trip(ts: list[Timer], saved_at: float) -> None:
    state = decode_state(encode_state(ts, BOOT, saved_at))
    assert state.timers == ts
    assert (state.version, state.boot_id, state.saved_at) == (STATE_VERSION, BOOT, saved_at)


def test_format_is_readable_json_with_a_version() -> None:
    t = Timer(pid=42, scope_id="step", deadline=12.5, signal=9, start_time=7)
    data = encode_state(
        [t], BOOT, 10.0, boot_clock=9.5, clocks=(0, 2), fifo=(3, 4), fifo_path="/run/t.fifo"
    )
    doc = json.loads(data)
    body = data[: data.rindex(b',"crc32":')]
    assert doc.pop("crc32") == zlib.crc32(body)  # of every byte before it
    assert doc == {
        "version": 1,
        "boot_id": BOOT,
        "saved_at": 10.0,
        "timers": [
            {
                "op": "arm",
                "pid": 42,
                "scope_id": "step",
                "deadline": 12.5,
                "signal": 9,
                "start_time": 7,
            }
        ],
        "journal": 0,
        "boot_clock": 9.5,
        "clocks": [0, 2],
        "fifo": [3, 4],
        "fifo_path": "/run/t.fifo",
    }


@pytest.mark.parametrize(
    ("damage", "after"),
    [
        (b'"deadline":12.5', b'"deadline":10.5'),  # a digit: valid JSON still
        (b'"signal":9', b'"signal":1'),
        (b'"scope_id":"step"', b'"scope_id":"stop"'),
    ],
)
def test_a_file_changed_since_it_was_saved_is_corrupt(damage: bytes, after: bytes) -> None:
    # Only the shape was checked: a deadline changed by a digit was restored, and the
    # healthy worker holding it reaped (by a review's fuzzing of the file).
    t = Timer(pid=42, scope_id="step", deadline=12.5, signal=9, start_time=7)
    data = encode_state([t], BOOT, 10.0)
    assert decode_state(data).timers == [t]
    with pytest.raises(StateFileError, match="its checksum does not match"):
        decode_state(data.replace(damage, after))
    # A daemon's file from before the checksum is read as it was.
    older = data[: data.rindex(b',"crc32":')] + b"}\n"
    assert decode_state(older.replace(damage, after)).timers != [t]


def test_timers_saved_without_their_tag_still_load() -> None:
    # The format of earlier releases: no "op", members at their defaults written out.
    saved = {"pid": 42, "scope_id": "s", "deadline": 1.5, "signal": 9, "start_time": None}
    doc = {"version": 1, "boot_id": BOOT, "saved_at": 1.0, "timers": [{**saved, "labels": None}]}
    assert decode_state(json.dumps(doc).encode()).timers == [Timer(42, "s", 1.5, 9)]


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x00\x01garbage",
        b'{"version": 1, "boot_id": "x", "saved_at": 1.0, "timers": [{"pid": 1',  # truncated
        b'{"version": 2, "boot_id": "x", "saved_at": 1.0, "timers": []}',
        b"[]",
    ],
)
def test_bad_files_raise_state_file_error(data: bytes) -> None:
    with pytest.raises(StateFileError):
        decode_state(data)


def test_a_bad_timer_costs_only_itself() -> None:
    good = {"op": "arm", "pid": 42, "scope_id": "s", "deadline": 1.5, "signal": 9}
    bad = [
        {"pid": "one"},
        {**good, "deadline": -1.0e9},
        {**good, "signal": 99},
        7,
        # A Timer's decoding leaves label keys to the state file's reader (metrics
        # export them as Prometheus label names).
        {**good, "labels": {"rank": "0", "bad key": "x"}},
    ]
    doc = {"version": 1, "boot_id": BOOT, "saved_at": 1.0, "timers": [*bad, good]}
    assert decode_state(json.dumps(doc).encode()).timers == [Timer(42, "s", 1.5, 9)]


def test_boot_id_is_read_from_the_kernel() -> None:
    boot = read_boot_id()
    if os.path.exists("/proc/sys/kernel/random/boot_id"):
        assert len(boot) == 36
    assert read_boot_id("/nonexistent") == ""


def test_write_is_atomic_and_private(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "state.json"
    write_state(str(path), b"one\n")
    write_state(str(path), b"two\n")
    assert path.read_bytes() == b"two\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert os.listdir(tmp_path) == ["state.json"]  # no temporary file left behind


def test_write_replaces_a_symlink_instead_of_following_it(tmp_path: pathlib.Path) -> None:
    target = tmp_path / "elsewhere"
    target.write_bytes(b"precious")
    (tmp_path / "state.json").symlink_to(target)
    write_state(str(tmp_path / "state.json"), b"state")
    assert target.read_bytes() == b"precious"
    assert not (tmp_path / "state.json").is_symlink()


def test_load_returns_the_saved_timers(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "state.json"
    ts = [
        Timer(10, "a", 5.0, 9, 100, {"rank": "0"}),
        Timer(11, "b", 6.0, 15),
    ]
    path.write_bytes(encode_state(ts, BOOT, 1.0))
    load = load_state(str(path), BOOT)
    assert load.timers == ts
    assert load.ignored == ""


def test_load_ignores_another_boot(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "state.json"
    path.write_bytes(encode_state([Timer(10, "a", 5.0, 9, 100)], "another-boot", 1.0))
    load = load_state(str(path), BOOT)
    assert load.timers == []
    assert load.ignored == "saved during another boot"


def test_load_ignores_a_state_saved_reading_another_fifo(tmp_path: pathlib.Path) -> None:
    # Another server made the FIFO at the path since: its clients may have disarmed there
    # what the file holds. Restored, those timers reaped healthy workers.
    path, fifo = tmp_path / "state.json", tmp_path / "t.fifo"
    os.mkfifo(fifo)
    fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        read = fifo_identity(fd)
    finally:
        os.close(fd)
    t = Timer(10, "a", 5.0, 9, 100)
    path.write_bytes(encode_state([t], BOOT, 1.0, fifo=read))
    assert load_state(str(path), BOOT, fifo=str(fifo)).timers == [t]  # the FIFO it read
    # Another server's, made beside it and renamed over the path (as a server does).
    os.mkfifo(tmp_path / "new.fifo")
    os.rename(tmp_path / "new.fifo", fifo)
    load = load_state(str(path), BOOT, fifo=str(fifo))
    assert load.timers == []
    assert load.ignored == (
        f"saved by a server of another FIFO than the one at {fifo} (made since by another)"
    )
    path.write_bytes(encode_state([t], BOOT, 1.0))  # an older daemon's: no FIFO named
    assert load_state(str(path), BOOT, fifo=str(fifo)).timers == [t]
    path.write_bytes(encode_state([t], BOOT, 1.0, fifo=read))
    fifo.unlink()
    assert load_state(str(path), BOOT, fifo=str(fifo)).timers == [t]  # none: no one's clients


def test_without_boot_id_a_future_save_time_means_a_reboot(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "state.json"
    t = Timer(10, "a", 5.0, 9, 100)
    path.write_bytes(encode_state([t], "", 50.0))
    assert load_state(str(path), "", now=40.0).timers == []
    assert load_state(str(path), "", now=60.0).timers == [t]


def test_missing_file_is_an_empty_state(tmp_path: pathlib.Path) -> None:
    load = load_state(str(tmp_path / "none.json"), BOOT)
    assert (load.timers, load.ignored) == ([], "no state file")


def test_corrupt_file_is_set_aside_not_fatal(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "state.json"
    good = encode_state([Timer(1, "a", 1.0, 9)], BOOT, 1.0)
    path.write_bytes(good[: len(good) // 2])  # truncated mid-write by something else
    load = load_state(str(path), BOOT)
    assert load.timers == []
    assert load.set_aside.startswith(str(path) + ".corrupt-")
    assert not path.exists()
    assert pathlib.Path(load.set_aside).read_bytes() == good[: len(good) // 2]


def test_a_symlink_is_set_aside_not_followed(tmp_path: pathlib.Path) -> None:
    target = tmp_path / "elsewhere.json"
    target.write_bytes(encode_state([Timer(1, "a", 1.0, 9)], BOOT, 1.0))
    (tmp_path / "state.json").symlink_to(target)
    load = load_state(str(tmp_path / "state.json"), BOOT)
    assert load.timers == []
    assert load.set_aside
    assert pathlib.Path(load.set_aside).is_symlink()
    assert target.exists()


def _settled(saver: StateSaver, timeout: float = 5.0) -> int:
    """``saver.saves`` once it has not changed for three intervals."""
    end = time.monotonic() + timeout
    saves, since = saver.saves, time.monotonic()
    while time.monotonic() - since < 3 * saver.interval:
        assert time.monotonic() < end, "the saver kept saving with nothing changed"
        time.sleep(0.005)
        if saver.saves != saves:
            saves, since = saver.saves, time.monotonic()
    return saves


def test_saver_writes_soon_after_a_change_and_batches(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "state.json"
    current: list[Timer] = []
    snapshots = 0
    lock = threading.Lock()

    def snapshot() -> tuple[list[Timer], int]:
        nonlocal snapshots
        with lock:
            snapshots += 1
            return list(current), 0

    saver = StateSaver(str(path), snapshot, BOOT, interval=0.1)
    saver.start()
    try:
        deadline = time.monotonic() + 5
        while saver.saves < 1 and time.monotonic() < deadline:
            time.sleep(0.005)
        assert decode_state(path.read_bytes()).timers == []
        # A burst of 2,000 changes is written a handful of times, not 2,000 times.
        start = time.monotonic()
        for i in range(2000):
            with lock:
                current.append(Timer(i + 1, "s", 1.0, 9))
            saver.changed()
        burst = time.monotonic() - start
        # ...and the last change is on disk within the bound after it was made.
        changed_at = time.monotonic()
        while time.monotonic() < changed_at + 5:
            if len(decode_state(path.read_bytes()).timers) == 2000:
                break
            time.sleep(0.005)
        assert len(decode_state(path.read_bytes()).timers) == 2000
        # Ten intervals: a save of 2,000 timers on a loaded machine; a change left for
        # the next one (or for stop()) never comes, and fails the wait above.
        assert time.monotonic() - changed_at < 10 * 0.1
        assert saver.saves <= 3 + burst / 0.1
        # Nothing changes: nothing is written. A change made during the last save makes
        # one more within the interval, and a save is counted after its write: first the
        # count settles (none for three intervals), then it must stay.
        saves = _settled(saver)
        time.sleep(0.3)  # the window measured
        assert saver.saves == saves
    finally:
        saver.stop()
    assert saver.errors == 0


def test_a_slow_save_is_followed_by_a_pause_in_proportion(tmp_path: pathlib.Path) -> None:
    # With 150k timers armed, one worker's churn made a save of 20 MB every 0.2 s: half
    # a core and 93 MB/s of writes, each save copying the table under the server's lock.
    path = tmp_path / "state.json"
    took = 0.05

    def snapshot() -> tuple[list[Timer], int]:
        time.sleep(took)  # a large table's copy and encoding
        return [], 0

    saver = StateSaver(str(path), snapshot, BOOT, interval=0.001)
    saver.start()
    try:
        start = time.monotonic()
        while time.monotonic() < start + 1.0:  # a change every millisecond for a second
            saver.changed()
            time.sleep(0.001)
        saves = saver.saves
    finally:
        saver.stop(final_save=False)
    # One save and its pause of SAVE_SPACING times its duration (at least 0.5 s), one
    # more at most: back to back, it was 20.
    assert 1 <= saves <= 1 + 1.0 / (SAVE_SPACING * took)


def test_saver_survives_write_errors_and_recovers(tmp_path: pathlib.Path) -> None:
    directory = tmp_path / "d"
    directory.mkdir()
    path = directory / "state.json"
    saver = StateSaver(str(path), lambda: ([], 0), BOOT, interval=0.01)
    directory.rmdir()  # writes now fail
    saver.start()
    deadline = time.monotonic() + 5
    while saver.errors < 1 and time.monotonic() < deadline:
        time.sleep(0.005)
    assert saver.errors >= 1
    directory.mkdir()
    while not path.exists() and time.monotonic() < deadline + 5:
        time.sleep(0.01)
    saver.stop(final_save=False)
    assert decode_state(path.read_bytes()).timers == []


def test_stop_saves_the_final_state(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "state.json"
    current: list[Timer] = []
    saver = StateSaver(str(path), lambda: (list(current), 0), BOOT, interval=60)
    saver.start()
    current.append(Timer(5, "last", 3.0, 9))
    saver.changed()
    saver.stop()
    assert [t.scope_id for t in decode_state(path.read_bytes()).timers] == ["last"]


def test_saves_failing_for_one_cause_are_said_once_then_once_a_minute(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # A full disk: the same error line every second or so (the saver's retries), for as
    # long as it stayed full; and nothing when a save succeeded again.
    path = tmp_path / "state.json"
    now = 0.0
    backoff: list[float | None] = [None]  # what the journal asks for after a save
    saver = StateSaver(
        str(path), lambda: ([], 1), BOOT, clock=lambda: now, saved=lambda seq: backoff[0]
    )
    cause = OSError(errno.ENOSPC, "No space left on device")

    def write_fails(path: str, data: object) -> None:
        raise cause

    monkeypatch.setattr(state_module, "write_state", write_fails)
    with caplog.at_level(logging.INFO, logger="ftimer_server.state"):
        for attempt in range(200):  # a second apart, as the saver retries
            now = float(attempt)
            assert not saver.save()
        cause = OSError(errno.EACCES, "Permission denied")  # another cause: said at once
        now += 1.0
        assert not saver.save()
        assert (saver.errors, saver.failing) == (201, "Permission denied")
        monkeypatch.undo()
        now += 1.0
        backoff[0] = 1.0  # saved, but the journal failed: it will remove the file again
        assert saver.save()
        assert saver.failing is None  # as before: status says the journal's failure then
        backoff[0] = None
        now += 1.0
        assert saver.save()  # saved, and it stays
    said = [(r.levelname, r.getMessage()) for r in caplog.records]
    failing = f"cannot save state to {path}: [Errno 28] No space left on device"
    still = f"still cannot save state to {path}: {{}} failed attempt(s) over {{}} s, the last: "
    assert said == [
        ("ERROR", failing),
        ("ERROR", still.format(61, 60) + "[Errno 28] No space left on device"),
        ("ERROR", still.format(121, 120) + "[Errno 28] No space left on device"),
        ("ERROR", still.format(181, 180) + "[Errno 28] No space left on device"),
        ("ERROR", f"cannot save state to {path}: [Errno 13] Permission denied"),
        ("INFO", f"state saved again to {path} after 201 failed attempt(s) over 202.0 s"),
    ]
    assert saver.saves == 2
    assert decode_state(path.read_bytes()).journal == 1


def test_the_saver_waits_what_a_failing_journal_asks_and_still_saves_at_stop(
    tmp_path: pathlib.Path,
) -> None:
    # Each save started a segment that failed at once (a disk with room for the state
    # file only), and the saver saved again after its interval: ten times a second.
    path = tmp_path / "state.json"
    waits: list[float | None] = []

    class Hurry(threading.Event):  # the saver waits on it between saves
        def wait(self, timeout: float | None = None) -> bool:
            waits.append(timeout)
            return super().wait(timeout)

    current: list[Timer] = []
    saver = StateSaver(
        str(path), lambda: (list(current), 1), BOOT, interval=0.01, saved=lambda seq: 3600.0
    )
    saver._hurry = Hurry()
    saver.start()
    wait_until(lambda: waits, what="the pause after the first save")
    current.append(Timer(5, "last", 3.0, 9))
    saver.changed()
    assert saver.stop()  # the final save is made whatever the journal asked
    assert waits[0] is not None
    assert waits[0] > 3000, waits  # not the 0.01 s interval
    assert saver.saves == 2
    assert [t.scope_id for t in decode_state(path.read_bytes()).timers] == ["last"]


# Deeper than msgspec recurses on any Python (3.13 decodes some 10,000 levels).
DEEP = b"[" * 100_000 + b"]" * 100_000


@pytest.mark.parametrize(
    "data",
    [
        b'{"version": 1, "x": ' + DEEP + b"}",  # deeper than msgspec recurses
        b'{"version": 1, "boot_id": "b", "saved_at": 1.0, "timers": [' + DEEP + b"]}",
    ],
)
def test_nested_json_is_set_aside_like_any_corrupt_file(
    tmp_path: pathlib.Path, data: bytes
) -> None:
    with pytest.raises(StateFileError, match="nested too deeply"):
        decode_state(data)
    path = tmp_path / "state.json"
    path.write_bytes(data)
    load = load_state(str(path), BOOT)
    assert (load.timers, load.ignored) == ([], "not a state file: JSON nested too deeply")
    assert pathlib.Path(load.set_aside).read_bytes() == data


@pytest.mark.parametrize("kind", ["directory", "FIFO"])
def test_a_directory_or_fifo_at_the_path_is_refused_never_moved(
    tmp_path: pathlib.Path, kind: str
) -> None:
    path = tmp_path / "state.json"
    if kind == "directory":
        path.mkdir()
        (path / "precious").write_bytes(b"precious")
    else:
        os.mkfifo(path)
    outcome = unblocked(lambda: load_state(str(path), BOOT), path)
    assert isinstance(outcome, StatePathError), outcome
    assert str(outcome) == (
        f"the state file {path} is a {kind}, not a file; it is not the daemon's to move or "
        "remove: give the path of a file (or of none yet)"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]  # nothing set aside
    if kind == "directory":
        assert (path / "precious").read_bytes() == b"precious"
    else:
        assert stat.S_ISFIFO(path.lstat().st_mode)


@pytest.mark.parametrize("kind", ["directory", "FIFO"])
def test_a_state_file_path_holding_a_directory_or_fifo_refuses_the_start(
    spawn: Spawn, short_dir: pathlib.Path, kind: str
) -> None:
    state = short_dir / "data"
    if kind == "directory":
        state.mkdir()
        (state / "precious").write_bytes(b"precious")
    else:
        os.mkfifo(state)  # open() would wait for a writer
    d = spawn("--state-file", str(state), "--capture", "none")
    assert d.proc.wait(PATIENCE) == 3
    refusal = d.wait_for_record(level="error")
    assert refusal["msg"] == (
        f"cannot start: the state file {state} is a {kind}, not a file; it is not the "
        "daemon's to move or remove: give the path of a file (or of none yet)"
    )
    # Neither moved nor joined by a journal (the lock beside the FIFO is the daemon's).
    beside = sorted(p.name for p in short_dir.iterdir() if p.name != "d.notify")
    assert beside == ["d.log", "data", "timer.fifo.lock"]
    if kind == "directory":
        assert (state / "precious").read_bytes() == b"precious"


def test_a_state_file_nested_too_deeply_is_set_aside_and_the_daemon_starts(
    spawn: Spawn, short_dir: pathlib.Path
) -> None:
    state = short_dir / "state.json"
    nested = b'{"version":1,"x":' + DEEP + b"}"
    state.write_bytes(nested)
    d = spawn("--state-file", str(state), "--capture", "none").ready()
    moved = d.wait_for_record(level="error", logger="ftimer_server.state")
    assert "(not a state file: JSON nested too deeply); moved it to " in moved["msg"]
    (aside,) = short_dir.glob("state.json.corrupt-*")
    assert aside.read_bytes() == nested
    assert d.stop() == 0


def test_the_largest_state_the_limits_allow_loads_back(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Timers with the longest scopes the protocol allows made a state file larger than
    # the loader took (408 MB against 256 MiB): the restart set it aside, and every timer,
    # a torch worker's too, was lost.
    arm = Arm(pid=4242, scope_id="", deadline=1e9 + 0.123456789, signal=9)
    room = PIPE_BUF - len(encode(arm))
    arm = msgspec.structs.replace(arm, scope_id="\u2028" * (room // 3))  # 3 bytes each
    assert len(encode(arm)) > PIPE_BUF - 3
    n = 64
    timers = [Timer(4242 + i, arm.scope_id, arm.deadline, 9, 2**63 - 1) for i in range(n)]
    data = encode_state(timers, BOOT, 1.0, journal=2**31)
    assert len(data) <= n * STATE_BYTES_PER_TIMER
    monkeypatch.setattr(state_module, "MAX_STATE_BYTES", len(data) // 2)
    path = tmp_path / "state.json"
    path.write_bytes(data)
    assert load_state(str(path), BOOT, max_bytes=max_state_bytes(n)).timers == timers


def test_files_set_aside_in_the_same_second_are_all_kept(tmp_path: pathlib.Path) -> None:
    # Named by the second alone: the second replaced the first, evidence and all.
    path = tmp_path / "state.json"
    for garbage in (b"first", b"second", b"third"):
        path.write_bytes(garbage)
        load_state(str(path), BOOT)
    kept = sorted(p.read_bytes() for p in tmp_path.glob("state.json.corrupt-*"))
    assert kept == [b"first", b"second", b"third"]


def test_a_state_file_read_holds_equal_labels_once() -> None:
    # 150k timers with torchrun's three labels took 118 MB as read, each with its own
    # dict, on top of the table the restore fills (the daemon kept both: 258 MB).
    timers = [
        Timer(10 + i % 2, f"s{i}", 5.0, 9, 1, {"job": "j", "rank": str(i % 2)}) for i in range(6)
    ]
    read = decode_state(encode_state(timers, "boot", 1.0)).timers
    assert read == timers
    assert read[0].labels is read[2].labels is read[4].labels
    assert read[1].labels is read[3].labels is not read[0].labels
