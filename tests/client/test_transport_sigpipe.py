"""A write after the server left never kills the worker with SIGPIPE.

Python ignores SIGPIPE at startup, but a worker may have put the default back (a common
idiom in CLI tools) or be a host embedding Python: a write to a FIFO nobody reads then
raises SIGPIPE in the writing thread, which kills the process. Each case runs the worker
as a child process of the test's own, against a FIFO the test reads and then stops
reading, and checks that the worker survives, sees the server as unavailable, and that
the SIGPIPE it may already have had pending is left alone.
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
from typing import Any, Dict

import pytest

from ftimer_client import FileTimerClient, ServerStalled
from ftimer_client._fifo import FifoWriter, sigpipe_ignored

from .conftest import FifoPeer, SocketPeer

# The worker: arms once while the server reads, says it is connected (an empty first
# report), waits for "go" (the server has left), arms again, and reports what happened
# as one JSON line.
WORKER = r"""
import json, os, signal, sys, threading
from ftimer_client import FileTimerClient, ServerUnavailable

path, transport, mode = sys.argv[1:4]
handled = []
if mode == "handler":
    signal.signal(signal.SIGPIPE, lambda signum, frame: handled.append(signum))
else:
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
client = FileTimerClient(path, transport=transport, labels={}, signal=0)
client.arm("a", 60)
print("{}", flush=True)
assert sys.stdin.readline() == "go\n"
if mode.startswith("blocked"):
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGPIPE})
if mode == "blocked-pending":
    signal.pthread_kill(threading.get_ident(), signal.SIGPIPE)  # the host's own
result = {}
def second():
    try:
        client.arm("b", 60)
        result["error"] = None
    except ServerUnavailable as e:
        result["error"] = e.errno
if mode == "thread":
    worker = threading.Thread(target=second)
    worker.start()
    worker.join()
else:
    second()
result["pending"] = signal.SIGPIPE in signal.sigpending()
result["blocked"] = signal.SIGPIPE in signal.pthread_sigmask(signal.SIG_BLOCK, set())
if result["pending"]:
    signal.sigtimedwait({signal.SIGPIPE}, 0)
result["handled"] = handled
print(json.dumps(result), flush=True)
"""


def run_worker(peer: Any, *args: str, script: str = WORKER, sent: int = 1) -> Dict[str, Any]:
    """Run ``script`` (given the peer's path and ``args``) against ``peer``, which leaves
    once the worker's first report says it is connected and ``sent`` of its messages
    were read; return its two reports, merged (the test fails if the worker did not
    exit 0)."""
    with subprocess.Popen(
        [sys.executable, "-c", script, str(peer.path), *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    ) as worker:
        try:
            assert worker.stdout is not None
            assert worker.stdin is not None
            connected = json.loads(worker.stdout.readline())
            peer.wait_count(sent)
            peer.close()  # the server died: the FIFO (or socket file) stays, nobody reads it
            worker.stdin.write("go\n")
            worker.stdin.flush()
            report = worker.stdout.readline()
            status = worker.wait(30)
        finally:
            if worker.poll() is None:
                worker.kill()
    assert status == 0, f"the worker died: status {status}"  # -13: killed by SIGPIPE
    return {**connected, **json.loads(report)}


@pytest.mark.parametrize("mode", ["default", "thread", "handler"])
def test_a_worker_with_sigpipe_not_ignored_survives_a_write_after_the_server_left(
    peer: FifoPeer, mode: str
) -> None:
    result = run_worker(peer, "fifo", mode)
    # The write found no reader (EPIPE), the reconnection no reader either: unavailable.
    assert result == {"error": 6, "pending": False, "blocked": False, "handled": []}


def test_a_sigpipe_blocked_by_the_worker_is_still_blocked_and_none_left_pending(
    peer: FifoPeer,
) -> None:
    result = run_worker(peer, "fifo", "blocked")
    assert result == {"error": 6, "pending": False, "blocked": True, "handled": []}


def test_a_sigpipe_the_worker_already_had_pending_is_left_pending(
    peer: FifoPeer,
) -> None:
    result = run_worker(peer, "fifo", "blocked-pending")
    assert result == {"error": 6, "pending": True, "blocked": True, "handled": []}


@pytest.mark.skipif(not hasattr(os, "pidfd_open"), reason="the socket transport is Linux's")
def test_the_socket_never_raised_sigpipe_either(socket_path: pathlib.Path) -> None:
    peer = SocketPeer(socket_path)
    try:
        result = run_worker(peer, "socket", "default")
    finally:
        peer.close()
    assert result["error"] is not None
    assert result["pending"] is False


def test_the_hot_path_is_kept_where_sigpipe_is_ignored(peer: FifoPeer) -> None:
    # Python's default: one os.write() per message on the descriptor, no signal mask.
    assert signal.getsignal(signal.SIGPIPE) is signal.SIG_IGN
    assert sigpipe_ignored()
    writer = FifoWriter(str(peer.path))
    try:
        assert writer.hot_fd >= 0
    finally:
        writer.close()
    previous = signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    try:
        assert not sigpipe_ignored()
        writer = FifoWriter(str(peer.path))
        try:
            assert writer.hot_fd == -1  # every write goes through write()
            writer.write(b'{"op":"sync","token":"t"}\n', 1.0)
        finally:
            writer.close()
    finally:
        signal.signal(signal.SIGPIPE, previous)


def test_a_client_of_a_worker_with_sigpipe_default_still_delivers(peer: FifoPeer) -> None:
    previous = signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    try:
        client = FileTimerClient(peer.path, labels={}, signal=0)
        client.arm("s", 60)
        client.release("s")
        peer.wait_count(2)
        client.close()
    finally:
        signal.signal(signal.SIGPIPE, previous)


def test_a_full_pipe_is_still_a_stall_with_sigpipe_not_ignored(peer: FifoPeer) -> None:
    # ServerStalled is a BrokenPipeError too: it must not pass for the reader leaving.
    previous = signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    try:
        client = FileTimerClient(peer.path, labels={}, signal=0, write_timeout=0.2)
        client.arm("a", 60)
        peer.wait_count(1)
        peer.pause()
        peer.fill()
        with pytest.raises(ServerStalled, match="has not drained"):
            client.arm("b", 60)
        peer.resume()
        peer.wait_drained()
        client.close()
    finally:
        signal.signal(signal.SIGPIPE, previous)
