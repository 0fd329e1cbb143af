"""The channel's retry thread, watch and fork handling (``_channel.py``; each test seen
to fail with a mutant of the code that no other test caught): one retry thread per
outage, its backoff, a resync never written on a number another file took, the hot path
closed after a failure and in a forked child, a child's own watch and no retry of lines
no server holds, a stale finding of the watch ignored, a protocol 1 client's hold on its
FIFO let go. Every server here is a recording peer: nothing is ever signalled."""

from __future__ import annotations

import contextlib
import gc
import os
import pathlib
import threading
import warnings
from typing import Iterator, List

import pytest
from tests.conftest import wait_until

from ftimer_client import FileTimerClient, ServerUnavailable, ServerUnavailableWarning, _channel
from ftimer_client._resync import Resync
from ftimer_protocol import Arm

from .conftest import FifoPeer, Peer, descriptors_on, held_only, restart, server_state
from .test_fork import in_child

ME = os.getpid()


def retry_threads() -> int:
    return sum(t.name == "ftimer-client-resync" for t in threading.enumerate())


@contextlib.contextmanager
def stdin_a_pipe() -> Iterator[int]:
    """Make descriptor 0 the write end of a pipe (as a worker's stdin may be writable: a
    terminal, a socket); yield the read end, non-blocking. Restored on the way out."""
    r, w = os.pipe()
    os.set_blocking(r, False)
    saved = os.dup(0)
    os.dup2(w, 0)
    os.close(w)
    try:
        yield r
    finally:
        os.dup2(saved, 0)
        os.close(saved)
        os.close(r)


def nothing_written(r: int) -> bool:
    try:
        data = os.read(r, 65536)
    except BlockingIOError:
        return True
    raise AssertionError(f"a line went to descriptor 0: {data!r}")


def test_an_outage_keeps_one_retry_thread_however_many_calls_fail(peer: FifoPeer) -> None:
    # _channel.py _retrying(): a retry thread already running (backing off) is not
    # started again. Otherwise every failed call of an outage starts one more thread,
    # each sleeping out its backoff: a worker arming in a loop piles threads up.
    before = retry_threads()
    client = FileTimerClient(peer.path, on_unavailable="warn", labels={})
    client.arm("s", 60)
    peer.wait_count(1)
    peer.close()  # the server goes
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ServerUnavailableWarning)
        for i in range(10):
            client.arm(f"t{i}", 60)
    assert client._channel._retrying()
    assert retry_threads() - before == 1
    back = FifoPeer(peer.path, create=False)  # the server is back: the retries end
    try:
        wait_until(lambda: not client._channel._retrying(), what="the retry thread to end")
        client.close()
    finally:
        back.close()


def test_after_a_failed_call_the_next_line_goes_to_the_server_not_to_descriptor_0(
    peer: FifoPeer,
) -> None:
    # _channel.py _failed(): self._fd = -1 closes the hot path. Left at 0, the next arm
    # was one os.write() to descriptor 0 (a worker's stdin, a terminal or a socket):
    # the line went there, the server never got it, and no resync was sent.
    client = FileTimerClient(peer.path, write_timeout=0.05, labels={})
    client.arm("s", 60)
    peer.wait_count(1)
    with stdin_a_pipe() as r:
        peer.pause()
        peer.fill()
        with pytest.raises(ServerUnavailable):
            client.arm("stalled", 60)
        with client._channel.lock:  # the retry thread waits: this call comes first
            peer.resume()
            peer.wait_drained()  # room for the resync: a stalled channel does not wait
            client.arm("next", 60)
            assert nothing_written(r)
    peer.wait_for(lambda m: (ME, "next") in server_state(m))
    client.close()


def test_a_forked_childs_first_line_goes_to_the_server_not_to_descriptor_0(
    server: Peer,
) -> None:
    # _channel.py _disconnect(): self._fd = -1. The child drops its parent's connection
    # (_after_fork); left at 0, its first arm was written to descriptor 0 instead.
    client = FileTimerClient(server.path, labels={})
    client.arm("parent", 60)
    server.wait_count(1)
    with stdin_a_pipe() as r:

        def child() -> None:
            client.arm("child", 60)
            assert nothing_written(r)

        pid = in_child(child)
        assert nothing_written(r)
    messages = server.wait_for(lambda m: (pid, "child") in server_state(m))
    assert [m.scope_id for m in messages if isinstance(m, Arm) and m.pid == pid] == ["child"]
    client.close()


def test_fork_while_the_watch_holds_its_event_leaves_the_child_free(server: Peer) -> None:
    # _channel.py _after_fork(): self._watching = None before _disconnect(). The watch
    # thread's event is the parent's; set in the child, it waits for a lock a parent's
    # thread held at the fork (the watch, in its wait of WATCH_EVERY): the child hung.
    client = FileTimerClient(server.path, labels={})
    client.arm("parent", 60)
    server.wait_count(1)
    watching = client._channel._watching
    assert watching is not None
    held, release = threading.Event(), threading.Event()

    def hold() -> None:  # as the watch thread, inside ended.wait()
        with watching._cond:  # type: ignore[attr-defined]
            held.set()
            release.wait(10)

    holder = threading.Thread(target=hold)
    holder.start()
    assert held.wait(10)
    try:
        pid = in_child(lambda: client.arm("child", 60), timeout=10)
    finally:
        release.set()
        holder.join(10)
    server.wait_for(lambda m: (pid, "child") in server_state(m))
    client.close()


def test_the_retry_writes_nothing_on_a_connection_number_another_file_took(
    server: Peer, tmp_path: pathlib.Path
) -> None:
    # _channel.py _retry_lines: "if not writer.owned(): raise ConnectionLost". Code that
    # closed descriptors it did not own, then opened a file that got the connection's
    # number, during an outage: the retry thread wrote the resync into that file, took
    # the server for up to date, and the server never heard of the armed scopes.
    client = FileTimerClient(server.path, write_timeout=0.05, labels={})
    client.arm("first", 60)
    server.wait_count(1)
    channel = client._channel
    writer = channel._writer
    fd = writer._fd if isinstance(server, FifoPeer) else writer._sock.fileno()  # type: ignore[union-attr]
    server.pause()
    server.fill()
    with pytest.raises(ServerUnavailable):
        client.arm("stalled", 60)
    theirs = tmp_path / "theirs"
    with channel.lock:  # the retry thread waits for it
        with open(theirs, "w+b") as f:
            os.dup2(f.fileno(), fd)
        server.resume()
    try:
        wait_until(lambda: not channel._retrying(), what="the retry thread to end")
        assert theirs.read_bytes() == b""
        assert not channel.needs_resync
        messages = server.wait_for(lambda m: (ME, "first") in server_state(m))
        assert {s for p, s in server_state(messages) if p == ME} == {"first"}
        os.write(fd, b"theirs\n")  # still open: not the client's to close
    finally:
        client.close()
        os.close(fd)


def test_retries_on_a_server_that_stays_full_back_off_to_longer_waits(
    server: Peer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # _channel.py _retry_lines: sent = 0, so only a step that delivered a line resets
    # the backoff (retry_progressed). Counting from 1, every step reset it: the retries
    # on a server that stays full never waited more than 0.1 s, for the whole stall.
    client = FileTimerClient(server.path, write_timeout=0.05, labels={})
    client.arm("a", 60)
    server.wait_count(1)
    delays: List[float] = []
    fails = threading.Semaphore(0)
    retry_failed = Resync.retry_failed

    def failing(state: Resync, now: float) -> None:
        retry_failed(state, now)
        if state is client._channel.state:  # (other tests' channels may still retry)
            delays.append(state._retry_at - now)  # type: ignore[operator]
            fails.release()

    monkeypatch.setattr(Resync, "retry_failed", failing)
    server.pause()
    server.fill()
    with pytest.raises(ServerUnavailable):
        client.arm("b", 60)
    for _ in range(4):  # four retries in vain, about 0.1 + 0.2 + 0.4 s of backoff
        assert fails.acquire(timeout=10)
    server.resume()
    wait_until(lambda: not client._channel._retrying(), what="the retry thread to end")
    client.close()
    assert delays[:4] == pytest.approx([0.1, 0.2, 0.4, 0.8])


def test_a_forked_child_watches_its_own_connection(
    server: Peer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # _channel.py _after_fork: self._disconnect(). Kept, the child wrote on its parent's
    # connection and started no watch of its own: a child stuck in a block (sending
    # nothing) never had its timer sent to a server that restarted without its state.
    monkeypatch.setattr(_channel, "WATCH_EVERY", 0.05)
    client = FileTimerClient(server.path, labels={})
    client.arm("parent", 60)
    server.wait_count(1)
    go_r, go_w = os.pipe()
    restarted: List[Peer] = []

    def restart_once_the_child_armed() -> None:
        try:
            server.wait_for(lambda m: any(getattr(x, "scope_id", "") == "child" for x in m))
            new = restart(server)  # without its state
            restarted.append(new)
            with contextlib.suppress(AssertionError):
                new.wait_for(lambda m: any(getattr(x, "scope_id", "") == "child" for x in m))
        finally:
            os.write(go_w, b"x")

    def child() -> None:
        client.arm("child", 60)
        os.read(go_r, 1)  # stuck in its block: sends nothing more

    helper = threading.Thread(target=restart_once_the_child_armed)
    helper.start()
    try:
        pid = in_child(child)
    finally:
        helper.join(30)
        os.close(go_r)
        os.close(go_w)
    try:
        assert restarted
        assert (pid, "child") in server_state(restarted[0].messages)
        client.close()
    finally:
        for new in restarted:
            new.close()


def test_a_watch_that_found_its_connection_gone_after_a_caller_replaced_it_does_nothing(
    server: Peer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # _channel.py _found_lost: "self._writer is writer and not needs_resync". The watch
    # looks without the lock: a caller may replace the lost connection (reconnecting,
    # resyncing) before the watch has the lock. Its finding is then stale: acted on, it
    # dropped the new connection and resent every armed scope once more.
    monkeypatch.setattr(_channel, "WATCH_EVERY", 0.02)
    client = FileTimerClient(server.path, labels={})
    client.arm("s", 60)
    server.wait_count(1)
    channel = client._channel
    old = channel._writer
    looked, acted = threading.Event(), threading.Event()
    lost, found_lost = type(old).lost, _channel.Channel._found_lost

    def looking(self: object) -> bool:
        gone = lost(self)
        if self is old and gone:
            looked.set()
        return gone

    def finding(self: _channel.Channel, writer: object) -> None:
        found_lost(self, writer)
        if self is channel:
            acted.set()

    monkeypatch.setattr(type(old), "lost", looking)
    monkeypatch.setattr(_channel.Channel, "_found_lost", finding)
    with channel.lock:  # the watch waits for it, once it has looked
        new_server = restart(server)
        try:
            assert looked.wait(10)
            client.arm("t", 60)  # finds the connection lost: reconnects, resyncs
            new = channel._writer
            assert new is not old
            assert not channel.needs_resync
        except BaseException:
            new_server.close()
            raise
    try:
        assert acted.wait(10)
        assert channel._writer is new
        assert not channel.needs_resync
        assert not channel._retrying()
        messages = new_server.wait_for(lambda m: (ME, "t") in server_state(m))
        assert {s for p, s in server_state(messages) if p == ME} == {"s", "t"}
        client.close()
    finally:
        new_server.close()


@pytest.mark.parametrize("how", ["closed", "dropped"])
def test_a_protocol_1_client_closed_or_dropped_lets_go_of_the_fifo_it_held(
    peer: FifoPeer, how: str
) -> None:
    # _channel.py _let_go and Channel.__del__: self._unpin_once(). A protocol 1 channel
    # holds the FIFO it wrote to last (an O_PATH descriptor); its last client closed, or
    # its clients dropped without close(), it kept it open for good: a descriptor leaked
    # per client.
    fifo = os.stat(peer.path)

    def pins() -> List[int]:
        return [fd for fd in descriptors_on(fifo) if held_only(fd)]

    before = pins()
    client = FileTimerClient(peer.path, protocol=1)
    client.arm("s", 60)
    client.release("s")
    peer.wait_count(2)
    assert len(pins()) == len(before) + 1
    if how == "closed":
        client.close()
    else:
        del client
        gc.collect()
    wait_until(lambda: pins() == before, what="the FIFO let go of")


def test_a_server_replaced_while_the_old_one_still_reads_gets_the_resync(
    server: Peer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # _channel.py _found_lost: self._disconnect(). The watch found the path naming
    # another FIFO or socket (a new server; the old one, stopped or hung, still holds
    # its own): kept, the retry resent every armed scope on the old connection, which
    # took them, and the new server never learned the stuck worker's timer.
    monkeypatch.setattr(_channel, "WATCH_EVERY", 0.02)
    client = FileTimerClient(server.path, labels={})
    client.arm("s", 60)
    server.wait_count(1)
    server.path.unlink()
    new = type(server)(server.path)  # the old one still reads its own
    try:
        new.wait_for(lambda m: (ME, "s") in server_state(m))
        client.close()
    finally:
        new.close()


def test_a_forked_childs_disarm_lost_where_no_server_runs_leaves_no_retry_behind(
    peer: FifoPeer,
) -> None:
    # _channel.py _after_fork: self._reached = False. The parent reached a server, the
    # child never did (the server had gone): its failed arm and release owe nothing, as
    # no server holds a line of its pid. Counted as reached, the child retried the lost
    # disarm for good, a thread polling a server that never comes.
    client = FileTimerClient(peer.path, on_unavailable="warn", labels={})
    client.arm("parent", 60)
    peer.wait_count(1)
    peer.close()  # the server goes

    def child() -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ServerUnavailableWarning)
            client.arm("c", 60)
            client.release("c")
        wait_until(lambda: not client._channel._retrying(), timeout=5, what="no retry")

    in_child(child)
    back = FifoPeer(peer.path, create=False)  # the parent's retries end
    try:
        client.close()
        back.wait_for(lambda m: (ME, "parent") not in server_state([*peer.messages, *m]))
    finally:
        back.close()
