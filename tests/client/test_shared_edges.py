"""Edges of sharing channels (``_shared.py``), each seen to fail with a mutant no other
client test caught: the lock of the shared channels after a fork."""

from __future__ import annotations

import subprocess
import sys

# The program: a thread holds the lock of the shared channels while the main thread
# forks; the child says whether it can take that lock (within 5 s) as channel_for() will.
FORK_WHILE_HELD = r"""
import os, threading
from ftimer_client import _shared

held, release = threading.Event(), threading.Event()

def hold():
    with _shared._shared_lock:
        held.set()
        release.wait()

holder = threading.Thread(target=hold)
holder.start()
held.wait()
pid = os.fork()
if pid == 0:
    os._exit(0 if _shared._shared_lock.acquire(timeout=5) else 1)
release.set()
holder.join()
print(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), flush=True)
"""


def test_a_child_forked_while_another_thread_held_the_lock_can_take_it() -> None:
    """After a fork, the child's lock of the shared channels is free, whoever held it."""
    done = subprocess.run(
        [sys.executable, "-W", "ignore::DeprecationWarning", "-c", FORK_WHILE_HELD],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == "0\n"
