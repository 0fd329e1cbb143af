"""More edges of the FIFO writer (``_fifo.py``), each seen to fail with a mutant no other
client test caught: a writer opened per message (no look for a replaced FIFO, Python's
view of SIGPIPE), and ``lost()`` on a full pipe."""

from __future__ import annotations

import os
import signal
import threading
from typing import List

import pytest

from ftimer_client import ServerStalled
from ftimer_client._fifo import FifoWriter, sigpipe_ignored
from ftimer_protocol import Sync, encode

from .conftest import FifoPeer

LINE = encode(Sync(token="t"))


def test_a_writer_opened_per_message_does_not_look_for_a_replaced_fifo(
    peer: FifoPeer,
) -> None:
    """check_replaced=False: a full pipe is a stall even if the path names a new FIFO."""
    writer = FifoWriter(str(peer.path), check_replaced=False)
    try:
        peer.pause()
        peer.fill()
        os.unlink(peer.path)
        os.mkfifo(peer.path, 0o600)
        with pytest.raises(ServerStalled):
            writer.write(LINE, 0.2)
    finally:
        writer.close()


def test_lost_answers_at_once_on_a_full_pipe(peer: FifoPeer) -> None:
    """lost() on a stalled server's full pipe is False at once: it never waits for room."""
    writer = FifoWriter(str(peer.path))
    answers: List[bool] = []
    try:
        peer.pause()
        peer.fill()
        asking = threading.Thread(target=lambda: answers.append(writer.lost()), daemon=True)
        asking.start()
        asking.join(10)
        assert answers == [False]
    finally:
        writer.close()
        peer.close()  # wakes a lost() still polling (its pipe polls in error)


def test_a_writer_opened_per_message_keeps_the_hot_path_where_python_ignores_sigpipe(
    peer: FifoPeer,
) -> None:
    """Python's view alone (thorough=False) says ignored, and a per-message writer is hot."""
    assert signal.getsignal(signal.SIGPIPE) is signal.SIG_IGN
    assert sigpipe_ignored(thorough=False) is True
    writer = FifoWriter(str(peer.path), check_replaced=False)
    try:
        assert writer.hot_fd >= 0
    finally:
        writer.close()
