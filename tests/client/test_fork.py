"""Fork safety: a child speaks with its own pid and never resends its parent's scopes
(over either transport where the transport matters)."""

from __future__ import annotations

import os
import pickle
import stat
import threading
import time
import traceback
import warnings
from typing import Callable

import pytest

from ftimer_client import FileTimerClient, expires
from ftimer_client._proc import process_start_time
from ftimer_protocol import Arm, Disarm

from .conftest import FifoPeer, Peer, SocketPeer, held_only, server_state

ME = os.getpid()


def in_child(body: Callable[[], None], timeout: float = 20.0) -> int:
    """Run ``body`` in a forked child; return its pid once it exited cleanly."""
    r, w = os.pipe()
    with warnings.catch_warnings():
        # Python >= 3.12 warns about fork() with threads running (the peer's reader).
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:  # pragma: no cover (child)
        code = 0
        try:
            os.close(r)
            body()
        except BaseException:
            os.write(w, traceback.format_exc().encode())
            code = 1
        os._exit(code)
    os.close(w)
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, 9)  # our own child, hung
            os.waitpid(pid, 0)
            pytest.fail("child hung")
        time.sleep(0.01)
    with os.fdopen(r, "rb") as f:
        report = f.read().decode()
    assert os.waitstatus_to_exitcode(status) == 0, report
    return pid


def from_pid(messages: list, pid: int) -> list:
    return [m for m in messages if getattr(m, "pid", None) == pid]


def test_child_speaks_with_its_own_pid_and_not_its_parents_scopes(server: Peer) -> None:
    client = FileTimerClient(server.path, labels={})
    client.arm("parent", 60)
    server.wait_count(1)

    def child() -> None:
        assert client.armed == frozenset()
        client.arm("child", 60)
        with expires(after=60, scope="block", client=client):
            pass
        client.release("child")

    pid = in_child(child)
    messages = server.wait_count(5)
    mine = from_pid(messages, pid)
    assert [(type(m), m.scope_id) for m in mine] == [
        (Arm, "child"),
        (Arm, "block"),
        (Disarm, "block"),
        (Disarm, "child"),
    ]
    starts = {m.start_time for m in mine}
    assert len(starts) == 1
    assert starts != {process_start_time()}
    if isinstance(server, SocketPeer):
        assert {d.pid for d in server.datagrams} == {ME, pid}  # the kernel agrees
    # The parent is unaffected: its connection survived the child's exit (which closed
    # its copy only), with nothing to resend.
    client.arm("parent-2", 60)
    state = server_state(server.wait_count(6))
    assert set(state) == {(ME, "parent"), (ME, "parent-2")}
    assert not client._channel.needs_resync


def test_child_of_a_parent_mid_outage_does_not_resync_the_parents_state(
    fifo_path: object,
) -> None:
    client = FileTimerClient(fifo_path, on_unavailable="ignore", labels={})  # type: ignore[arg-type]
    client.arm("parent", 60)  # no server yet: kept, to be re-sent
    assert client._channel.needs_resync
    peer = FifoPeer(fifo_path)  # type: ignore[arg-type]
    try:

        def child() -> None:
            client.arm("child", 60)

        pid = in_child(child)
        messages = peer.wait_for(
            lambda m: bool(from_pid(m, pid)) and (ME, "parent") in server_state(m)
        )
        assert [(type(m), m.scope_id) for m in from_pid(messages, pid)] == [(Arm, "child")]
    finally:
        peer.close()


def test_fork_while_another_thread_holds_the_client_lock(peer: FifoPeer) -> None:
    client = FileTimerClient(peer.path, labels={})
    client.arm("warm", 60)
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with client._channel.lock:
            held.set()
            release.wait(10)

    holder = threading.Thread(target=hold)
    holder.start()
    held.wait(10)
    try:
        pid = in_child(lambda: client.arm("child", 60))
    finally:
        release.set()
        holder.join(10)
    assert [m.scope_id for m in from_pid(peer.wait_count(2), pid)] == ["child"]


SIGNAL_IN_CHILD = """
    import os, signal, sys
    from ftimer_client import FileTimerClient

    client = FileTimerClient(sys.argv[1], dump_signal="USR2", labels={})
    client.arm("parent", 60)
    pid = os.fork()
    if pid == 0:
        client.signal = signal.SIGTERM  # torch code assigns it
        client.arm("child", 60)
        sys.stdin.read()
        os._exit(0)
    sys.stdin.read()
    os.waitpid(pid, 0)
"""


def test_a_signal_assigned_in_a_child_announces_the_childs_own_dump_file(peer: FifoPeer) -> None:
    from .test_dump import worker  # its workers run in a process of their own

    with worker(SIGNAL_IN_CHILD, str(peer.path)) as w:
        messages = peer.wait_count(2)
        (parent,) = from_pid(messages, w.pid)
        (child,) = [m for m in messages if m.pid != w.pid]
        assert isinstance(parent, Arm)
        assert isinstance(child, Arm)
        assert child.signal == 15
        assert parent.dump is not None
        assert child.dump is not None
        parent_file = os.stat(f"/proc/{w.pid}/fd/{parent.dump.fd}")
        child_file = os.stat(f"/proc/{child.pid}/fd/{child.dump.fd}")
        # The child's own dump file: not its parent's, nor whatever took that number in
        # the child (its own FIFO, say).
        assert stat.S_ISREG(child_file.st_mode)
        assert parent_file.st_ino != child_file.st_ino
        assert w.proc.stdin is not None
        w.proc.stdin.close()  # both read it: both exit
        assert w.proc.wait(30) == 0, w.stderr()


def test_a_child_keeps_no_fifo_open_that_another_thread_held_for_one_message(
    peer: FifoPeer,
) -> None:
    # Protocol 1 opens the FIFO for each message (torch's way); one open in another
    # thread at the fork (writing, or the retry waiting for room) stayed open in the
    # child for good, and torch's server expires nothing while a writer holds its FIFO.
    client = FileTimerClient(peer.path, protocol=1)
    channel = client._channel
    with channel.lock:
        held = channel._open_once()  # as another thread's, between its open and close
    fifo = os.stat(peer.path).st_ino
    ours = {peer.rfd, peer.wfd}

    def no_write_end() -> None:
        for fd in os.listdir("/proc/self/fd"):
            try:
                st = os.stat(f"/proc/self/fd/{fd}")
                opened = st.st_ino == fifo and not held_only(int(fd))  # O_PATH: no end
            except OSError:
                continue
            assert not (opened and int(fd) not in ours), "the FIFO is held open"

    try:
        in_child(no_write_end)
    finally:
        channel._close_once(held)
        client.close()


def test_a_client_given_its_own_pid_follows_its_process(server: Peer) -> None:
    # Given pid=os.getpid(), a client kept that pid in a forked child (a DataLoader
    # worker's) and in an unpickled copy: the child armed and disarmed as its parent,
    # and a stuck child got its healthy parent reaped.
    client = FileTimerClient(server.path, pid=ME, labels={})
    client.arm("parent", 60)
    server.wait_count(1)
    copy = pickle.dumps(client)

    def child() -> None:
        assert client.armed == frozenset()
        client.arm("child", 60)
        client.release("parent")  # the child's own (unknown) scope
        pickle.loads(copy).arm("copy", 60)

    pid = in_child(child)
    messages = server.wait_count(4)
    assert [(type(m), m.pid, m.scope_id) for m in messages[1:]] == [
        (Arm, pid, "child"),
        (Disarm, pid, "parent"),
        (Arm, pid, "copy"),
    ]
    if isinstance(server, SocketPeer):  # the child names no other process
        assert [d.pidfds for d in server.datagrams] == [()] * 4
    client.close()
