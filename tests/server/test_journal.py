"""The journal: bytes move from a real FIFO into segment files before they are applied."""

from __future__ import annotations

import errno
import logging
import os
import pathlib
import re
import time

import pytest
from tests.conftest import open_under, wait_until

from ftimer_protocol import Arm, Disarm, TimerRequestV1, encode
from ftimer_server import FileTimerServer, RecordingSignaller, Rejected
from ftimer_server.core._reader import LineReader
from ftimer_server.server._journal import Journal, JournalIncomplete


@pytest.fixture
def pipe(fifo_path: pathlib.Path):  # type: ignore[no-untyped-def]
    os.mkfifo(fifo_path)
    r = os.open(fifo_path, os.O_RDONLY | os.O_NONBLOCK)
    w = os.open(fifo_path, os.O_WRONLY)
    yield r, w
    os.close(r)
    os.close(w)


def test_what_is_read_is_on_file_first(tmp_path: pathlib.Path, pipe) -> None:  # type: ignore[no-untyped-def]
    r, w = pipe
    journal = Journal(str(tmp_path / "state.journal"))
    assert journal.seq == 1
    os.write(w, b"one\ntw")
    assert journal.read(r, 1 << 16) == b"one\ntw"
    os.write(w, b"o\n")
    assert journal.read(r, 1 << 16) == b"o\n"
    with pytest.raises(BlockingIOError):
        journal.read(r, 1 << 16)
    assert (tmp_path / "state.journal.1").read_bytes() == b"one\ntwo\n"
    assert journal.size == 8


def test_a_checkpoint_starts_a_segment_with_the_unfinished_line(
    tmp_path: pathlib.Path,
    pipe,  # type: ignore[no-untyped-def]
) -> None:
    r, w = pipe
    journal = Journal(str(tmp_path / "j"))
    os.write(w, b"done\nhalf a li")
    journal.read(r, 100)
    assert journal.checkpoint(b"half a li") == 2
    os.write(w, b"ne\n")
    journal.read(r, 100)
    assert (tmp_path / "j.2").read_bytes() == b"half a line\n"
    journal.checkpoint()
    assert b"".join(journal.replay(2)) == b"half a line\n"
    journal.discard_before(3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["j.3"]


#: How the journal moves bytes: splice(2), or read and write where there is none (Python
#: 3.9, macOS), which lost what it had read when the write failed.
MOVES = pytest.mark.parametrize("move", ["splice", "copy"])


def journal_moving(path: pathlib.Path, move: str) -> Journal:
    journal = Journal(str(path))
    if move == "copy":
        journal._splice = None
    elif journal._splice is None:
        pytest.skip("no os.splice here (Python 3.9 or not Linux)")
    return journal


@MOVES
def test_after_a_failed_write_a_checkpoint_starts_with_the_readers_line(
    tmp_path: pathlib.Path,
    pipe,  # type: ignore[no-untyped-def]
    move: str,
) -> None:
    # It carried the segment's last bytes: after a write failed (a full disk, for a
    # moment), those were older ones, an arm the worker had disarmed since, which a
    # restart after kill -9 replayed, and the worker was reaped.
    r, w = pipe
    journal = journal_moving(tmp_path / "j", move)
    os.write(w, b"arm X\n")
    journal.read(r, 100)
    segment = journal._fd
    journal._fd = os.open(os.devnull, os.O_RDONLY)  # as a full disk: every write fails
    os.write(w, b"disarm X\nhalf a li")
    assert journal.read(r, 100) == b"disarm X\nhalf a li"  # read, not journalled
    os.close(journal._fd)
    journal._fd = segment
    assert journal.checkpoint(b"half a li") == 2
    os.write(w, b"ne\n")
    journal.read(r, 100)
    journal.checkpoint()
    assert b"".join(journal.replay(2)) == b"half a line\n"
    journal.close()


def test_a_checkpoint_that_cannot_write_its_carry_leaves_nothing_behind(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Each failed save left a descriptor open and the new segment on disk, which the
    # next checkpoint found in its way.
    journal = Journal(str(tmp_path / "j"))
    held = open_under(tmp_path)  # its segment

    def full(fd: int, data: bytes) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", full)
    with pytest.raises(OSError, match="No space left"):
        journal.checkpoint(b"half a line")
    monkeypatch.undo()
    assert open_under(tmp_path) == held
    assert sorted(p.name for p in tmp_path.iterdir()) == ["j.1"]
    assert journal.checkpoint(b"half") == 2  # the next one, as if nothing happened
    journal.close()


def test_numbering_goes_on_after_what_is_there(tmp_path: pathlib.Path) -> None:
    for name in ("j.4", "j.12", "j.x", "j.12.tmp"):
        (tmp_path / name).write_bytes(name.encode() + b"\n")
    journal = Journal(str(tmp_path / "j"))
    assert journal.seq == 13
    assert journal.segments() == [4, 12, 13]
    assert b"".join(journal.replay(12)) == b"j.12\n"  # from 12 up to the current one
    with pytest.raises(JournalIncomplete, match=r"j\.5 is missing"):  # from 5: 5 to 11 are
        b"".join(journal.replay(5))


@MOVES
def test_a_journal_that_cannot_be_written_costs_no_byte(
    tmp_path: pathlib.Path,
    pipe,  # type: ignore[no-untyped-def]
    caplog: pytest.LogCaptureFixture,
    move: str,
) -> None:
    r, w = pipe
    journal = journal_moving(tmp_path / "j", move)
    os.close(journal._fd)  # as a full disk would, every write to it fails
    journal._fd = os.open(os.devnull, os.O_RDONLY)
    os.write(w, b"still read\n")
    with caplog.at_level(logging.ERROR, logger="ftimer_server"):
        assert journal.read(r, 100) == b"still read\n"
    assert "lost if the server is killed" in caplog.text
    journal.close()


@pytest.mark.parametrize("kind", ["directory", "symlink", "FIFO"])
def test_replay_reads_regular_files_only_and_never_follows_a_symlink(
    tmp_path: pathlib.Path, kind: str
) -> None:
    # Such a segment was skipped, and the replay went on: the snapshot was restored
    # without what it held (a disarm), and a worker that had disarmed was reaped.
    (tmp_path / "j.1").write_bytes(b"kept\n")
    segment = tmp_path / "j.2"
    (tmp_path / "elsewhere").write_bytes(b"not the journal's\n")
    if kind == "directory":
        segment.mkdir()
        said = f"journal: {segment} is a directory, not a regular file"
    elif kind == "symlink":
        segment.symlink_to(tmp_path / "elsewhere")
        said = f"journal: {segment} is a symlink: not followed"
    else:
        os.mkfifo(segment)  # opened without O_NONBLOCK, it would wait for a writer
        said = f"journal: {segment} is a FIFO, not a regular file"
    (tmp_path / "j.3").write_bytes(b"never reached\n")
    journal = Journal(str(tmp_path / "j"))
    chunks = journal.replay(1)
    assert next(chunks) == b"kept\n"
    with pytest.raises(JournalIncomplete) as failed:
        next(chunks)
    assert str(failed.value) == said
    journal.close()


@pytest.mark.parametrize(
    ("on_disk", "first", "missing"),
    [((2, 3), 1, 1), ((1, 3), 1, 2), ((), 5, 5)],
    ids=["the first", "one between", "all"],
)
def test_a_replay_missing_a_segment_fails(
    tmp_path: pathlib.Path, on_disk: tuple[int, ...], first: int, missing: int
) -> None:
    # A segment deleted (the one the state file names, or one after it) was not missed:
    # the snapshot was restored without the disarms it held.
    for n in on_disk:
        (tmp_path / f"j.{n}").write_bytes(b"a line\n")
    journal = Journal(str(tmp_path / "j"))
    said = f"journal: {tmp_path}/j.{missing} is missing"
    with pytest.raises(JournalIncomplete, match=f"^{re.escape(said)}$"):
        b"".join(journal.replay(first))
    journal.close()


def test_what_cannot_be_deleted_is_said_once_and_left(
    tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "j.1").mkdir()
    (tmp_path / "j.1" / "precious").write_bytes(b"precious")
    (tmp_path / "j.2").write_bytes(b"old\n")
    journal = Journal(str(tmp_path / "j"))
    with caplog.at_level(logging.ERROR, logger="ftimer_server"):
        journal.discard_before(3)  # the start of a daemon whose state file was not used
        journal.discard_before(3)  # every save after it
    assert [r.getMessage() for r in caplog.records] == [
        f"journal: cannot delete {tmp_path}/j.1: Is a directory"
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["j.1", "j.3"]
    assert (tmp_path / "j.1" / "precious").read_bytes() == b"precious"
    journal.close()


def test_set_aside_moves_regular_segments_only(tmp_path: pathlib.Path) -> None:
    (tmp_path / "j.1").write_bytes(b"before the snapshot\n")
    (tmp_path / "j.2").mkdir()
    (tmp_path / "j.3").write_bytes(b"unreplayable\n")
    journal = Journal(str(tmp_path / "j"))
    moved = journal.set_aside(2)
    assert [pathlib.Path(p).name.split(".corrupt-")[0] for p in moved] == ["j.3"]
    assert pathlib.Path(moved[0]).read_bytes() == b"unreplayable\n"
    assert journal.segments() == [1, 2, 4]  # set aside: never replayed again
    with pytest.raises(JournalIncomplete, match=r"j\.2 is a directory"):
        b"".join(journal.replay(1))
    journal.close()


def test_the_sockets_messages_are_kept_where_they_were_applied_among_the_fifos(
    tmp_path: pathlib.Path,
    pipe,  # type: ignore[no-untyped-def]
) -> None:
    # They went to a file of their own, replayed after all the FIFO's bytes: a socket arm
    # then a FIFO disarm of the same timer came back as disarm then arm, and the worker
    # was reaped after the restart.
    r, w = pipe
    journal = Journal(str(tmp_path / "j"))
    arm = Arm(pid=42, scope_id="step", deadline=5.0, signal=9, start_time=7)
    disarm = encode(Disarm(pid=42, scope_id="step", start_time=7))
    os.write(w, b"first\n" + disarm[:10])  # a FIFO line read in part, then the socket's
    journal.read(r, 100)
    v1 = TimerRequestV1(pid=43, scope_id="a.py#1", expiration_time=-1, signal=0)
    journal.keep([arm, v1], pending=10)
    journal.keep([], pending=10)  # nothing: nothing written
    os.write(w, disarm[10:])
    journal.read(r, 100)
    journal.checkpoint()
    assert b"".join(journal.replay(1)) == b"first\n" + encode(arm) + encode(v1) + disarm
    replayed = LineReader().feed(b"".join(journal.replay(1)))
    assert [m for m in replayed if not isinstance(m, Exception)] == [
        arm,
        v1,
        Disarm(pid=42, scope_id="step", start_time=7),
    ]


def test_a_replayed_torch_line_is_never_bound_to_a_process_born_after_it(
    fifo_path: pathlib.Path, children
) -> None:
    # A torch line carries no start time: replayed after a crash, it bound whichever
    # process held the pid by then, and a stranger that reused it was reaped.
    stranger = children()
    line = encode(TimerRequestV1(pid=stranger.pid, scope_id="s", expiration_time=0.0, signal=9))
    events: list = []
    server = FileTimerServer(fifo_path, signaller=RecordingSignaller(), on_event=events.append)
    server.replay([line], written_by=time.time() - 5)  # saved before it started
    assert server.armed() == []
    # Born since the state the journal follows was saved, it may have written the line
    # itself, or taken the pid of its writer who exited: refused, and said (it was counted
    # exited, unsaid, and a live torch worker that armed after the save ran unwatched).
    assert server.stats().requests == {"arm": {"rejected": 1}}
    [rejected] = [e for e in events if isinstance(e, Rejected)]
    assert rejected.detail.startswith("the process was born after the last saved state")
    # Born before the save: it held the pid all along, the line is its own (a tick after
    # its birth at least: a process born in the tick of the save could be a stranger).
    server.replay([line], written_by=time.time() + 0.1)
    assert [t.pid for t in server.armed()] == [stranger.pid]
    server.stop()


def test_a_replayed_torch_line_is_refused_for_a_process_born_a_moment_after_it(
    fifo_path: pathlib.Path, children
) -> None:
    # Within a second or two of the journal's time, a stranger that took the pid read as
    # older (the time was rounded up to /proc/stat's boot time, known to the second).
    written_at = time.time()
    stranger = children()  # born after it
    line = encode(TimerRequestV1(pid=stranger.pid, scope_id="s", expiration_time=0.0, signal=9))
    events: list = []
    server = FileTimerServer(fifo_path, signaller=RecordingSignaller(), on_event=events.append)
    server.replay([line], written_by=written_at)
    assert server.armed() == []
    assert server.stats().requests == {"arm": {"rejected": 1}}
    server.stop()


def test_a_servers_checkpoint_carries_the_line_its_reader_holds(
    fifo_path: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    journal = Journal(str(tmp_path / "j"))
    with FileTimerServer(fifo_path, signaller=RecordingSignaller(), journal=journal) as server:
        writer = os.open(fifo_path, os.O_WRONLY)
        try:
            os.write(writer, b"junk\nhalf a li")
            loop = server._loop
            assert loop is not None
            wait_until(lambda: loop.reader.buffered == len(b"half a li"))
            _, seq = server.checkpoint()
            os.write(writer, b"ne\n")
            wait_until(lambda: loop.reader.buffered == 0)
            server.checkpoint()
        finally:
            os.close(writer)
    assert b"".join(journal.replay(seq)) == b"half a line\n"
    journal.close()


def no_space(*args: object, **kwargs: object) -> int:
    """A write to a full disk (as the journal's splice, or its write where there is none)."""
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_journal_that_keeps_failing_says_it_once_and_spaces_its_segments_out(
    tmp_path: pathlib.Path,
    pipe,  # type: ignore[no-untyped-def]
    caplog: pytest.LogCaptureFixture,
) -> None:
    # On a disk with room for the state file only, each save (checkpoint, write, saved)
    # started a segment that failed at its first write and removed the state file: two
    # error lines, and a new segment, ten times a second for as long as the disk stayed
    # full; and nothing was said when there was room again.
    r, w = pipe
    state = tmp_path / "state.json"
    journal = Journal(str(tmp_path / "j"), snapshot=str(state))
    splice, journal._splice = journal._splice, no_space
    waits = []
    with caplog.at_level(logging.INFO, logger="ftimer_server"):
        for _ in range(6):
            seq = journal.checkpoint()
            state.write_bytes(b"{}\n")  # the save: room made by the last removal
            waits.append(journal.saved(seq))
            os.write(w, b"a line\n")
            assert journal.read(r, 100) == b"a line\n"  # read all the same, not journalled
            assert not state.exists()
        assert (journal.errors, journal.failing) == (6, "No space left on device")
        # The first save came at once; each after a failed segment asks for a second's
        # wait before the next, as a failed save has.
        assert waits == [None, 1.0, 1.0, 1.0, 1.0, 1.0]
        said = [(r.levelname, r.getMessage()) for r in caplog.records]
        assert said == [
            (
                "ERROR",
                f"journal {tmp_path}/j.2: [Errno 28] No space left on device; from now on, what "
                "was read since the last save is lost if the server is killed",
            ),
            (
                "ERROR",
                f"journal: removed {state}, which a restart would restore without what was read "
                "since (disarms included); a restart now starts with no timers, and clients "
                "re-send theirs",
            ),
        ]
        caplog.clear()
        journal._splice = splice  # room again
        seq = journal.checkpoint()
        state.write_bytes(b"{}\n")
        assert journal.saved(seq) == 1.0  # not proven yet: an empty segment fits anywhere
        os.write(w, b"journalled\n")
        journal.read(r, 100)
        seq = journal.checkpoint()
        state.write_bytes(b"{}\n")
        assert journal.saved(seq) is None
    assert state.exists()
    [(level, message)] = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert level == "INFO"
    assert re.fullmatch(
        f"journal {re.escape(str(tmp_path))}/j.8 written whole again, after 6 failed "
        r"write\(s\) over \d+\.\d s",
        message,
    ), message
    assert journal.segments() == [9]
    journal.close()


def test_a_journal_failing_for_long_is_recalled_once_a_minute_with_a_count(
    tmp_path: pathlib.Path,
    pipe,  # type: ignore[no-untyped-def]
    caplog: pytest.LogCaptureFixture,
) -> None:
    r, w = pipe
    now = 1000.0
    journal = Journal(str(tmp_path / "j"), snapshot=str(tmp_path / "state.json"), clock=lambda: now)
    journal._splice = no_space
    with caplog.at_level(logging.ERROR, logger="ftimer_server"):
        for _ in range(25):  # a failed segment every 10 s
            journal.saved(journal.checkpoint())
            os.write(w, b"a line\n")
            journal.read(r, 100)
            now += 10.0
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 5, said  # at 0 s, then 60, 120, 180, 240 s
    assert said[0].endswith("lost if the server is killed")
    for reminder, (seq, failed, seconds) in zip(said[1:], [(8, 7, 60), (14, 13, 120)]):
        assert reminder == (
            f"journal {tmp_path}/j.{seq}: [Errno 28] No space left on device; still failing, "
            f"{failed} failed write(s) over {seconds} s: what was read since the last save is "
            "lost if the server is killed"
        )
    # Another cause is said at once.
    caplog.clear()

    def no_quota(*args: object, **kwargs: object) -> int:
        raise OSError(errno.EDQUOT, "Disk quota exceeded")

    journal._splice = no_quota
    journal.saved(journal.checkpoint())
    os.write(w, b"a line\n")
    with caplog.at_level(logging.ERROR, logger="ftimer_server"):
        journal.read(r, 100)
    [said_now] = [r.getMessage() for r in caplog.records]
    assert "[Errno 122] Disk quota exceeded; from now on" in said_now
    journal.close()
