"""The FIFO writer at its edges (``_fifo.py``, ``_writer.py``; each test seen to fail with
a mutant of the code that no other test caught): SIGPIPE not ignored although Python's
own view says so (a host embedding Python) or where only Python's view is asked (a FIFO
opened per message), and an unreadable /proc; a write error other than EPIPE or EAGAIN;
a server gone or its FIFO made again seen without a write; the descriptors let go of (a
dropped writer, one numbered 0, a path that is not a FIFO, one closed under the writer)
and a closed writer's hot path and wait; poll()'s milliseconds; a wait for room that
lost the room to another writer; what is at a path."""

from __future__ import annotations

import errno
import gc
import os
import pathlib
import signal
import socket
import subprocess
import sys
from typing import Any, List

import pytest

from ftimer_client import ServerUnavailable, _fifo
from ftimer_client._fifo import FifoWriter, _wait_for_room, sigpipe_ignored
from ftimer_client._writer import is_fifo, is_socket, poll_ms
from ftimer_protocol import Sync, encode

from .conftest import FifoPeer, descriptors_on
from .test_transport_sigpipe import run_worker

LINE = encode(Sync(token="t"))

# The worker: opens a FifoWriter while the server reads, reports what it made of
# SIGPIPE, waits for "go" (the server has left), writes once, and reports how that went.
# Mode "host": C code of a host embedding Python put SIGPIPE's default back behind
# Python's back (Python still says ignored). Mode "per-message": the worker put the
# default back itself, and the writer is one opened per message (protocol 1).
WORKER = r"""
import ctypes, json, signal, sys
from ftimer_client._fifo import FifoWriter, sigpipe_ignored
from ftimer_client._writer import ConnectionLost

path, mode = sys.argv[1:3]
if mode == "host":
    libc = ctypes.CDLL(None, use_errno=True)
    libc.signal.restype = ctypes.c_void_p
    libc.signal.argtypes = [ctypes.c_int, ctypes.c_void_p]
    libc.signal(signal.SIGPIPE, 0)  # SIG_DFL, as the host's C code would
    assert signal.getsignal(signal.SIGPIPE) is signal.SIG_IGN  # Python never knew
    writer = FifoWriter(path)
else:
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    writer = FifoWriter(path, check_replaced=False)
thorough = mode == "host"
print(json.dumps({"ignored": sigpipe_ignored(thorough=thorough), "hot_fd": writer.hot_fd}),
      flush=True)
assert sys.stdin.readline() == "go\n"
try:
    writer.write(b'{"op":"sync","token":"t"}\n', 1.0)
    outcome = "delivered"
except ConnectionLost:
    outcome = "lost"
print(json.dumps({"outcome": outcome, "pending": signal.SIGPIPE in signal.sigpending()}),
      flush=True)
"""


def test_sigpipe_restored_by_a_host_behind_pythons_back_is_not_taken_for_ignored(
    peer: FifoPeer,
) -> None:
    # Python's view alone (signal.getsignal) says ignored; the kernel's does not. The
    # writer must not take the hot path, or the write after the server left kills the
    # worker.
    result = run_worker(peer, "host", script=WORKER, sent=0)
    assert result == {"ignored": False, "hot_fd": -1, "outcome": "lost", "pending": False}


def test_a_writer_opened_per_message_with_sigpipe_default_survives_a_reader_leaving(
    peer: FifoPeer,
) -> None:
    # Protocol 1 opens the FIFO per message and asks only Python's view: that view saying
    # "default" must still keep the write off the hot path.
    result = run_worker(peer, "per-message", script=WORKER, sent=0)
    assert result == {"ignored": False, "hot_fd": -1, "outcome": "lost", "pending": False}


def test_an_unreadable_proc_leaves_pythons_view_and_the_hot_path(
    peer: FifoPeer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A sandbox or chroot without /proc: Python's view (ignored, by default) stands, and
    # a writer still opens, with its hot path.
    def no_proc(*args: Any, **kwargs: Any) -> Any:
        raise FileNotFoundError(2, "No such file or directory", "/proc/self/status")

    assert signal.getsignal(signal.SIGPIPE) is signal.SIG_IGN
    monkeypatch.setattr(_fifo, "open", no_proc, raising=False)
    assert sigpipe_ignored()
    writer = FifoWriter(str(peer.path))
    try:
        assert writer.hot_fd >= 0
    finally:
        writer.close()


def test_another_write_error_is_the_server_unavailable_not_a_raw_oserror(
    peer: FifoPeer,
) -> None:
    # Code that does not own the writer's descriptor put a read-only file on its number:
    # the write fails with EBADF, which the client's on_unavailable policy must see.
    writer = FifoWriter(str(peer.path))
    fd = writer._fd
    saved = os.dup(fd)
    try:
        with open(os.devnull, "rb") as readonly:
            os.dup2(readonly.fileno(), fd)
        with pytest.raises(ServerUnavailable) as caught:
            writer.write(LINE, 1.0)
        assert caught.value.errno == errno.EBADF
        assert "cannot write" in str(caught.value)
    finally:
        writer.close()  # not the FIFO any more: left open
        os.dup2(saved, fd)
        os.close(saved)
        os.close(fd)


def test_a_reader_gone_is_seen_as_lost_without_writing(peer: FifoPeer) -> None:
    # The watch's question while the worker sends nothing: the server died and the
    # FIFO stayed (nobody reads it). The pipe polls in error; nothing is written.
    writer = FifoWriter(str(peer.path))
    try:
        assert not writer.lost()
        peer.close()
        assert writer.lost()
    finally:
        writer.close()


def test_a_fifo_made_again_at_the_path_is_seen_as_lost_while_the_old_is_still_read(
    peer: FifoPeer,
) -> None:
    # A server that recreated its FIFO while something still reads the old one: the old
    # pipe does not poll in error, only the path tells.
    writer = FifoWriter(str(peer.path))
    try:
        os.unlink(peer.path)
        assert not writer.lost()  # nothing at the path: the server may read on
        os.mkfifo(peer.path, 0o600)
        assert writer.lost()
    finally:
        writer.close()


def writers_of(path: pathlib.Path) -> int:
    """How many descriptors of this process are open on the FIFO at ``path``."""
    return len(descriptors_on(os.stat(path)))


def test_a_closed_writer_has_no_hot_path(peer: FifoPeer) -> None:
    # Its number may be another file's once closed: nothing may be written to it.
    writer = FifoWriter(str(peer.path))
    assert writer.hot_fd >= 0
    writer.close()
    assert writer.hot_fd == -1


def test_a_writer_dropped_without_close_lets_go_of_the_fifo(peer: FifoPeer) -> None:
    before = writers_of(peer.path)  # the peer's own
    writer = FifoWriter(str(peer.path))
    assert writers_of(peer.path) == before + 1
    del writer
    gc.collect()
    assert writers_of(peer.path) == before


def test_a_writer_interrupted_after_its_open_lets_go_of_the_fifo(
    peer: FifoPeer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A KeyboardInterrupt between the open and keeping the descriptor left it open until
    # the process exited: the writer's __del__ closes only a descriptor it kept.
    fstat = os.fstat

    def interrupted(fd: int) -> os.stat_result:
        if os.readlink(f"/proc/self/fd/{fd}") != str(peer.path):  # another's: not ours
            return fstat(fd)
        raise KeyboardInterrupt

    before = writers_of(peer.path)  # the peer's own
    monkeypatch.setattr(os, "fstat", interrupted)
    with pytest.raises(KeyboardInterrupt):
        FifoWriter(str(peer.path))
    assert writers_of(peer.path) == before


# A writer that got descriptor 0 (a worker started with stdin closed), dropped without
# close(): says whether descriptor 0 is still open.
DROPPED_AT_0 = """
import gc, os, sys
from ftimer_client._fifo import FifoWriter
os.close(0)
writer = FifoWriter(sys.argv[1])
assert writer._fd == 0, writer._fd
del writer
gc.collect()
try:
    os.fstat(0)
    print("open")
except OSError:
    print("closed")
"""


def test_a_writer_numbered_0_dropped_without_close_lets_go_of_the_fifo(peer: FifoPeer) -> None:
    done = subprocess.run(
        [sys.executable, "-c", DROPPED_AT_0, str(peer.path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == "closed\n"


def test_a_closed_writer_has_room_at_once_whatever_descriptor_0_is(peer: FifoPeer) -> None:
    # The retry thread's wait on a writer closed meanwhile ends at once; it must not
    # wait on another descriptor instead (here descriptor 0, never writable).
    writer = FifoWriter(str(peer.path))
    writer.close()
    saved = os.dup(0)
    r, w = os.pipe()
    try:
        os.dup2(r, 0)  # a pipe's read end: never polls writable
        assert writer.wait_room(2.0)
        assert not writer.owned()
    finally:
        os.dup2(saved, 0)
        for fd in (saved, r, w):
            os.close(fd)


@pytest.mark.parametrize(
    ("timeout", "ms"),
    [
        (0.0001, 1),  # rounded up: a positive wait never becomes poll(0), a busy loop
        (0.0015, 2),
        (1.5, 1500),
        (0.0, 0),
        (-3.0, 0),  # never negative: poll() would wait for ever
        (3e6, 2**31 - 1),  # poll() takes a C int: more raised OverflowError
        (float("inf"), 2**31 - 1),
    ],
)
def test_poll_ms_is_the_timeout_rounded_up_within_what_poll_takes(timeout: float, ms: int) -> None:
    assert poll_ms(timeout) == ms


def test_a_wait_for_room_lost_to_another_writer_goes_on_until_the_timeout() -> None:
    # The pipe polled writable but another writer took the room first (the attempt
    # found it full): the wait goes on, within its timeout, rather than fail at once.
    r, w = os.pipe()
    attempts: List[int] = []

    def attempt() -> bool:
        attempts.append(1)
        return len(attempts) == 3  # lost twice, then the room is ours

    try:
        assert _wait_for_room(w, 30.0, attempt)
        assert len(attempts) == 3
    finally:
        os.close(r)
        os.close(w)


def test_a_path_that_is_not_a_fifo_is_refused_and_its_descriptor_let_go(
    tmp_path: pathlib.Path,
) -> None:
    # A regular file at the FIFO's path opens (for writing): refused as not a FIFO, the
    # descriptor opened to find out closed again.
    path = tmp_path / "timer.fifo"
    path.write_bytes(b"")
    with pytest.raises(ServerUnavailable) as caught:
        FifoWriter(str(path))
    assert caught.value.errno == errno.EINVAL
    assert writers_of(path) == 0
    assert path.read_bytes() == b""


def test_is_fifo_and_is_socket_say_what_is_at_a_path_following_symlinks(
    tmp_path: pathlib.Path,
) -> None:
    # What the transport is chosen by: never raising for a path with nothing at it.
    fifo, sock, plain = tmp_path / "f", tmp_path / "s", tmp_path / "p"
    os.mkfifo(fifo)
    plain.write_bytes(b"")
    link = tmp_path / "link"
    link.symlink_to(fifo)
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as bound:
        bound.bind(str(sock))
        assert [is_fifo(str(p)) for p in (fifo, link, sock, plain, tmp_path / "none")] == [
            True,
            True,
            False,
            False,
            False,
        ]
        assert [is_socket(str(p)) for p in (sock, fifo, plain, tmp_path / "none")] == [
            True,
            False,
            False,
            False,
        ]


def test_a_descriptor_closed_under_the_writer_is_not_its_own_any_more(peer: FifoPeer) -> None:
    # os.closerange() by code that did not own it, the number left free: the writer
    # sees it lost (to connect again) and closes nothing.
    writer = FifoWriter(str(peer.path))
    os.close(writer._fd)
    assert not writer.owned()
    assert writer.lost()
    writer.close()  # no EBADF
    assert writer.hot_fd == -1
