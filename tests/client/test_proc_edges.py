"""Edges of what a client reads about processes: thread ids, gone processes, rank labels."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from ftimer_client import FileTimerClient
from ftimer_client._proc import default_labels, process_of_thread, process_start_time
from ftimer_protocol import Arm

from .conftest import FifoPeer, live_thread_id


def test_a_process_that_has_exited_is_no_thread_and_has_no_start_time() -> None:
    """A reaped child's pid names no thread of anything and no start time (None, no error)."""
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    assert process_of_thread(gone.pid) is None
    assert process_start_time(gone.pid) is None


def test_a_process_is_no_thread_and_a_thread_names_its_process(
    sleeper: subprocess.Popen[bytes],
) -> None:
    """A process's own id (this one's, a child's) gives None; a thread's gives its process."""
    assert process_of_thread(os.getpid()) is None
    assert process_of_thread(sleeper.pid) is None
    with live_thread_id() as tid:
        assert process_of_thread(tid) == os.getpid()


def test_a_rank_is_a_label_up_to_sixteen_digits() -> None:
    """RANK and LOCAL_RANK become labels with at most 16 digits; longer ones are dropped."""
    assert default_labels({"RANK": "1" * 16, "LOCAL_RANK": "2" * 17}) == {"rank": "1" * 16}
    assert default_labels({"RANK": "9" * 300, "LOCAL_RANK": "0"}) == {"local_rank": "0"}


def test_a_rank_too_long_for_a_label_never_fails_a_client(
    peer: FifoPeer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A RANK of more digits than a label value holds is dropped; the client still arms."""
    monkeypatch.setenv("RANK", "7" * 200)
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    # Closed here: a client dropped with a timer armed has its descriptor closed by its
    # watch thread up to a second after it is collected, in whatever test runs then.
    with FileTimerClient(peer.path) as client:
        assert client.labels == {"local_rank": "3"}
        client.arm("s", 60)
        (arm,) = peer.wait_count(1)
    assert isinstance(arm, Arm)
    assert arm.labels == {"local_rank": "3"}


def test_default_labels_read_only_the_environment_given(monkeypatch: pytest.MonkeyPatch) -> None:
    """An empty mapping given is an empty environment: os.environ is read only when none is."""
    monkeypatch.setenv("RANK", "4")
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "run")
    assert default_labels({}) == {}
    assert default_labels() == {"rank": "4", "job": "run"}
