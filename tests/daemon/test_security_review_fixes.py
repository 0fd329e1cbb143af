"""What a security review found one user could do to another through the daemon's
shared machinery: a state saver that encoded 400 MB in one call, holding the GIL (and so
every user's reaps) for two seconds; and incident retention that let one user, by having
its own workers reaped over and over, push every other user's incidents out."""

from __future__ import annotations

import os
import pathlib
import zlib
from collections.abc import Iterator
from typing import Any, List, Optional

import msgspec
import pytest

from ftimer_protocol import PIPE_BUF
from ftimer_server import Timer
from ftimer_server.core._incident import Capture, Incident, ProcessFacts
from ftimer_server.daemon import _state as state_module
from ftimer_server.daemon._state import (
    STATE_BYTES_PER_TIMER,
    STATE_CHUNK_TIMERS,
    StateFile,
    StateSaver,
    load_state,
    read_boot_id,
    state_pieces,
    write_state,
)
from ftimer_server.incidents import _store as store_module
from ftimer_server.incidents._store import IncidentStore, incident_id

BOOT = read_boot_id()

# -- the state saver -------------------------------------------------------------------


def long_timers(n: int) -> List[Timer]:
    """``n`` timers with scopes as long as a line allows (the review's 3,900 characters)."""
    return [Timer(1000 + i, f"{i:06d}" + "x" * 3900, 1e6 + i, 9, 4242) for i in range(n)]


class CountingEncoder:
    """Stands in for the state module's encoder: how many timers each call encodes."""

    def __init__(self) -> None:
        self.inner = msgspec.json.Encoder()
        self.timers: List[int] = []

    def encode(self, obj: Any) -> bytes:
        self.timers.append(len(obj.timers) if isinstance(obj, StateFile) else len(obj))
        return self.inner.encode(obj)


def test_a_save_encodes_at_most_a_chunk_of_timers_per_call(
    monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path
) -> None:
    # Each msgspec call holds the GIL the server's loop needs to reap: bounded timers per
    # call bound how late any user's reap can be (the whole snapshot in one call: 2 s).
    n = 3 * STATE_CHUNK_TIMERS + 5
    timers = long_timers(n)
    encoder = CountingEncoder()
    monkeypatch.setattr(state_module, "_encoder", encoder)
    path = tmp_path / "state.json"
    saver = StateSaver(str(path), lambda: (timers, 3), BOOT)
    assert saver.save()
    assert max(encoder.timers) <= STATE_CHUNK_TIMERS
    assert sum(encoder.timers) == n
    # A chunk is a millisecond's work however long the scopes: at most ~1.2 MB.
    assert STATE_CHUNK_TIMERS * STATE_BYTES_PER_TIMER <= 2 << 20
    loaded = load_state(str(path), BOOT, max_bytes=n * STATE_BYTES_PER_TIMER)
    assert (loaded.timers, loaded.journal, loaded.ignored) == (timers, 3, "")


@pytest.mark.parametrize(
    "n", [0, 1, STATE_CHUNK_TIMERS - 1, STATE_CHUNK_TIMERS, STATE_CHUNK_TIMERS + 1, 600]
)
@pytest.mark.parametrize("boot_clock", [None, 12.25])
def test_the_pieces_are_the_bytes_of_the_file_encoded_whole(
    n: int, boot_clock: Optional[float]
) -> None:
    # The format does not change: an older daemon reads what this one writes.
    timers = [
        Timer(1 + i, f'é"{i}' * (i % 7), 5.5 + i, 9, None if i % 2 else i, {"rank": str(i)})
        for i in range(n)
    ]
    boot_id = 'boot "timers":[] id'  # a member's name in a string does not confuse it
    whole = StateFile(
        version=1, boot_id=boot_id, saved_at=1.5, timers=timers, journal=7, boot_clock=boot_clock
    )
    joined = b"".join(state_pieces(timers, boot_id, 1.5, 7, boot_clock))
    body, _, crc = joined.rpartition(b',"crc32":')
    assert body + b"}\n" == msgspec.json.encode(whole) + b"\n"
    assert crc == b"%d}\n" % zlib.crc32(body)


def test_a_save_cut_short_leaves_the_old_file_and_no_temporary_file(
    tmp_path: pathlib.Path,
) -> None:
    path = tmp_path / "state.json"
    write_state(str(path), b"old\n")

    def pieces() -> Iterator[bytes]:
        yield b"x" * PIPE_BUF  # a piece on disk already
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        write_state(str(path), pieces())
    assert path.read_bytes() == b"old\n"
    assert sorted(os.listdir(tmp_path)) == ["state.json"]
    assert (path.stat().st_mode & 0o777) == 0o600


# -- incident retention ----------------------------------------------------------------

T0 = 1_796_000_000.0
ALICE, BOB = 1001, 1002


def incident(n: int, uid: Optional[int], *, raw: str = "") -> Incident:
    """The n-th incident (one second after the one before) of a worker of ``uid``
    (None: its user could not be read), as its capture recorded it."""
    pid = 100 + n
    facts = ProcessFacts(cmdline=["python", "train.py"], uid=uid)
    stuck = Capture(pid=pid, method="facts", facts=facts, raw=raw)
    return Incident(
        id=incident_id(T0 + n, pid, "step"),
        host="node-a",
        created=T0 + n,
        pid=pid,
        scope_id="step",
        signal=9,
        deadline=100.0 + n,
        captures=[stuck],
    )


def users_kept(store: IncidentStore) -> List[Optional[int]]:
    """The users of the incidents in the store, oldest first."""
    return [store.load(s.id).captures[0].facts.uid for s in store.list()]  # type: ignore[union-attr]


def test_a_user_reaped_over_and_over_pushes_out_its_own_incidents_not_anothers(
    tmp_path: pathlib.Path,
) -> None:
    # The review's flood: a few hundred self-expiries of one user's short processes.
    store = IncidentStore(str(tmp_path), keep=5)
    store.write(incident(0, BOB))
    store.write(incident(1, BOB))
    for n in range(2, 40):
        store.write(incident(n, ALICE))
    assert users_kept(store) == [BOB, BOB, ALICE, ALICE, ALICE]
    assert [s.created for s in store.list()][2:] == [T0 + 37, T0 + 38, T0 + 39]


def test_a_user_over_its_fair_share_loses_its_own_oldest_first(tmp_path: pathlib.Path) -> None:
    store = IncidentStore(str(tmp_path), keep=6)
    for n in range(5):
        store.write(incident(n, BOB))
    for n in range(5, 15):
        store.write(incident(n, ALICE))
    # Each holds half: BOB's newest three (its oldest went first), ALICE's newest three.
    kept = [(s.created - T0, uid) for s, uid in zip(store.list(), users_kept(store))]
    assert kept == [(2, BOB), (3, BOB), (4, BOB), (12, ALICE), (13, ALICE), (14, ALICE)]


def test_over_the_byte_limit_the_user_holding_the_most_bytes_loses_first(
    tmp_path: pathlib.Path,
) -> None:
    small = incident(0, BOB)
    store = IncidentStore(str(tmp_path), max_bytes=10**9)
    store.write(small)
    bob_bytes = sum(p.stat().st_size for p in tmp_path.iterdir())
    store.max_bytes = bob_bytes + 3 * 40_000  # room for BOB's and about two of ALICE's
    for n in range(1, 8):
        store.write(incident(n, ALICE, raw="y" * 20_000))  # record and text: ~40 KB
    assert users_kept(store) == [BOB, ALICE, ALICE]
    assert sum(p.stat().st_size for p in tmp_path.iterdir()) <= store.max_bytes


def test_incidents_whose_user_is_unknown_count_as_one_more_user(tmp_path: pathlib.Path) -> None:
    # A worker gone before its capture: its record has no uid. Such incidents compete
    # with each other, as one more user, and never take another user's place.
    store = IncidentStore(str(tmp_path), keep=4)
    store.write(incident(0, BOB))
    for n in range(1, 10):
        store.write(incident(n, None))
    assert users_kept(store) == [BOB, None, None, None]


def test_an_incident_is_its_users_though_its_worker_exited_before_its_capture(
    tmp_path: pathlib.Path,
) -> None:
    # Its capture read no uid (the worker exited during it): it counted as one more
    # user's, whose half of the directory kept such incidents for hours while the
    # newest reaps of the one real user went. The uid read as the capture began decides.
    store = IncidentStore(str(tmp_path), keep=4)
    for n in range(10):
        exited = msgspec.structs.replace(incident(n, None), uid=ALICE)
        store.write(exited if n < 3 else incident(n, ALICE))
    assert [s.created - T0 for s in store.list()] == [6, 7, 8, 9]


def test_a_single_user_loses_its_oldest_first_as_before(tmp_path: pathlib.Path) -> None:
    store = IncidentStore(str(tmp_path), keep=3)
    for n in range(6):
        store.write(incident(n, ALICE))
    assert [s.created - T0 for s in store.list()] == [3, 4, 5]


def test_each_record_is_read_once_for_its_user_not_at_every_prune(
    monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path
) -> None:
    # The helper prunes after every incident: reading every record each time would make
    # a flood of small incidents read the other users' large ones over and over.
    read: List[str] = []
    real = store_module._read_user

    def counting(path: str) -> Optional[int]:
        read.append(os.path.basename(path))
        return real(path)

    monkeypatch.setattr(store_module, "_read_user", counting)
    store = IncidentStore(str(tmp_path), keep=3)
    written = [incident(n, ALICE if n % 2 else BOB) for n in range(12)]
    for i in written:
        store.write(i)
    assert len(read) == len(set(read))
    assert set(read) <= {f"{i.id}.json" for i in written}
