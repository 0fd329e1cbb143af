"""Behaviour of server/_journal.py that no test pinned, found by mutation testing (each
test fails with the mutant that found it): real segment files; a full disk is a write
that raises ENOSPC."""

from __future__ import annotations

import logging
import os
import pathlib

import pytest
from tests.conftest import open_under

from ftimer_protocol import Disarm
from ftimer_server.server._journal import Journal, JournalIncomplete

from .test_journal import no_space, pipe  # noqa: F401  (pipe: a fixture)


def test_a_socket_message_that_cannot_be_kept_fails_the_journal(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # mutant: keep() left out _fail() on a write error: a disarm from the socket, applied
    # but not on file, and the state file left in place; a restart after kill -9
    # restored the armed timer and reaped the healthy worker that had disarmed.
    state = tmp_path / "state.json"
    journal = Journal(str(tmp_path / "j"), snapshot=str(state))
    state.write_bytes(b"{}\n")
    monkeypatch.setattr(os, "pwrite", no_space)
    journal.keep([Disarm(pid=1000, scope_id="s")], 0)  # never raises
    monkeypatch.undo()
    assert journal.failed
    assert journal.failing == "No space left on device"
    assert not state.exists()
    journal.close()


def test_checkpoints_leave_no_descriptor_open(tmp_path: pathlib.Path) -> None:
    # mutant: checkpoint() kept the old segment's descriptor: one leaked per save, every
    # state interval, until the daemon ran out of descriptors.
    journal = Journal(str(tmp_path / "j"))
    for _ in range(5):
        journal.saved(journal.checkpoint())
    assert open_under(tmp_path) == [str(tmp_path / "j.6")]  # the current segment's alone
    journal.close()


def test_a_save_after_a_failed_write_is_removed_too(
    tmp_path: pathlib.Path,
    pipe,  # noqa: F811
) -> None:
    # mutant: saved() left out invalidate(): a write failed after the checkpoint, and
    # the state file then saved with it (without what that write lost) stayed.
    r, w = pipe
    state = tmp_path / "state.json"
    journal = Journal(str(tmp_path / "j"), snapshot=str(state))
    seq = journal.checkpoint()
    journal._splice = no_space
    os.write(w, b"disarm\n")
    assert journal.read(r, 100) == b"disarm\n"  # read, not journalled
    state.write_bytes(b"{}\n")  # the save that follows the checkpoint
    assert journal.saved(seq) is None
    assert not state.exists()
    journal.close()


def test_an_idle_segment_after_failures_proves_nothing_and_a_recovery_is_said_once(
    tmp_path: pathlib.Path,
    pipe,  # noqa: F811
    caplog: pytest.LogCaptureFixture,
) -> None:
    # mutants: "_size > _start" -> ">=": a save with nothing read since said "written
    # whole again" on a disk still full, and stopped spacing the saves; Failures.ended()
    # leaving count at 1: every save after a recovery said "written whole again".
    r, w = pipe
    state = tmp_path / "state.json"
    journal = Journal(str(tmp_path / "j"), snapshot=str(state))
    splice, journal._splice = journal._splice, no_space
    journal.saved(journal.checkpoint())
    os.write(w, b"a line\n")
    journal.read(r, 100)  # fails
    assert journal.saved(journal.checkpoint()) == 1.0
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="ftimer_server"):
        for _ in range(2):  # idle: nothing read, nothing proven
            assert journal.saved(journal.checkpoint()) == 1.0
        assert caplog.records == []
        journal._splice = splice  # room again
        for _ in range(3):
            os.write(w, b"journalled\n")
            journal.read(r, 100)
            assert journal.saved(journal.checkpoint()) is None
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 1, said
    assert "written whole again, after 1 failed write(s)" in said[0]
    journal.close()


def test_a_closed_journal_keeps_no_descriptor(tmp_path: pathlib.Path) -> None:
    # mutant: close() left the segment's descriptor open: one per embedded server stopped
    # (an agent that starts a server per job, for as long as the agent lives).
    journal = Journal(str(tmp_path / "j"))
    assert open_under(tmp_path) != []  # its segment is open
    journal.close()
    assert open_under(tmp_path) == []


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a file to another user needs root")
def test_a_segment_of_another_user_is_set_aside_and_no_descriptor_kept(
    tmp_path: pathlib.Path,
) -> None:
    # mutant: the segment another user owns was set aside with its descriptor left open.
    (tmp_path / "j.1").write_bytes(b"a line\n")
    os.chown(tmp_path / "j.1", 4242, 4242)
    journal = Journal(str(tmp_path / "j"))
    held = open_under(tmp_path)
    with pytest.raises(JournalIncomplete, match="owned by uid 4242"):
        b"".join(journal.replay(1))
    assert open_under(tmp_path) == held
    assert not (tmp_path / "j.1").exists()  # set aside, never read again
    journal.close()
