"""The Python client as a careless user drives it through an outage: a loop of distinct
scopes under "ignore" while the server is gone or stalled, a stuck worker's expire()
lost with a restarting server, and a worker with no thread to spare. Real FIFOs and
processes; the timers are report-only (signal 0)."""

from __future__ import annotations

import contextlib
import os
import pathlib
import subprocess
import sys
import textwrap
import warnings
from typing import Any, List

import pytest
from tests.conftest import wait_until

from ftimer_client import (
    FileTimerClient,
    ServerStalled,
    ServerUnavailable,
    ServerUnavailableWarning,
    _resync,
    configure,
    expires,
)
from ftimer_protocol import Arm, Disarm, Expire

from .conftest import FifoPeer, Peer, SocketPeer, restart, server_state

#: Blocks of distinct scopes released while the server cannot be reached.
BLOCKS = 1500


@pytest.fixture
def owed_calls(monkeypatch: pytest.MonkeyPatch) -> List[int]:
    """How many times the resync worked out what it owes (one count per call)."""
    calls = [0]
    owed = _resync.Resync.owed

    def counting(self: _resync.Resync, *args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        return owed(self, *args, **kwargs)

    monkeypatch.setattr(_resync.Resync, "owed", counting)
    return calls


def test_blocks_while_the_server_is_gone_never_walk_every_lost_disarm(
    fifo_path: pathlib.Path, owed_calls: List[int]
) -> None:
    # Each block released while the server was gone added a lost disarm, and each later
    # block walked them all before it found the server still absent: quadratic (8,000
    # blocks of distinct scopes took 90 s), where "ignore" asks to carry on.
    peer = FifoPeer(fifo_path)
    client = FileTimerClient(str(fifo_path), signal=0, on_unavailable="ignore")
    configure(client)
    try:
        with expires(after=60, scope="reached"):
            pass
        peer.close()
        fifo_path.unlink()  # the server is gone (a restart under way, a crash)
        for i in range(BLOCKS):
            with expires(after=60, scope=f"batch-{i}"):
                pass
        assert owed_calls[0] < 50 * BLOCKS  # a few a block; the walks made 2.25 million
        peer = FifoPeer(fifo_path)  # back: every scope disarmed
        with expires(after=60, scope="back"):
            pass
        wait_until(lambda: not client._channel.needs_resync, what="the resync")
        # Until the block's disarm is read too (its arm alone: a timer held, a flake).
        peer.wait_for(lambda m: any(isinstance(x, Disarm) and x.scope_id == "back" for x in m))
        assert not {k for k in server_state(peer.messages) if k[0] == os.getpid()}
    finally:
        client.close()
        peer.close()


def test_blocks_while_the_server_is_stalled_never_walk_every_lost_disarm(
    fifo_path: pathlib.Path, owed_calls: List[int]
) -> None:
    # The same walk, on every block while the server's pipe stayed full.
    peer = FifoPeer(fifo_path)
    client = FileTimerClient(str(fifo_path), signal=0, on_unavailable="ignore", write_timeout=0.05)
    configure(client)
    try:
        with expires(after=60, scope="reached"):
            pass
        peer.pause()
        peer.fill()
        for i in range(BLOCKS):
            with expires(after=60, scope=f"batch-{i}"):
                pass
        assert owed_calls[0] < 50 * BLOCKS
        peer.resume()
        wait_until(lambda: not client._channel.needs_resync, what="the resync")
        with expires(after=60, scope="back"):
            pass
        peer.wait_for(lambda m: any(isinstance(x, Disarm) and x.scope_id == "back" for x in m))
        # None of those arms reached the server: it is owed none of their disarms.
        assert not [m for m in peer.messages if m.scope_id.startswith("batch-")]
    finally:
        peer.resume()
        client.close()
        peer.close()


@pytest.mark.parametrize("policy", ["ignore", "raise"])
def test_blocks_whose_arms_never_left_owe_the_server_no_disarm(
    fifo_path: pathlib.Path, policy: str
) -> None:
    # Each block released (or refused, under "raise") while the server was gone kept a
    # disarm to send it: a loop of distinct scopes through an outage grew without bound,
    # and the server back got a disarm a block (1,500 here) before anything new. Those
    # arms never left: no server holds them. A scope armed before the outage and
    # released during it is still disarmed once the server is back.
    peer = FifoPeer(fifo_path)
    client = FileTimerClient(str(fifo_path), signal=0, on_unavailable=policy)
    configure(client)
    try:
        client.arm("held", 60)
        peer.wait_for(lambda m: any(isinstance(x, Arm) and x.scope_id == "held" for x in m))
        peer.close()
        fifo_path.unlink()  # the server is gone
        with contextlib.suppress(ServerUnavailable):  # under "raise"
            client.release("held")
        for i in range(BLOCKS):
            with contextlib.suppress(ServerUnavailable), expires(after=60, scope=f"batch-{i}"):
                pass
        peer = FifoPeer(fifo_path)
        with expires(after=60, scope="back"):
            pass
        wait_until(lambda: not client._channel.needs_resync, what="the resync")
        peer.wait_for(lambda m: any(isinstance(x, Disarm) and x.scope_id == "back" for x in m))
        assert not [m for m in peer.messages if m.scope_id.startswith("batch-")]
        assert any(isinstance(m, Disarm) and m.scope_id == "held" for m in peer.messages)
    finally:
        client.close()
        peer.close()


def test_an_expire_lost_with_a_restarting_server_is_sent_again_not_made_a_disarm(
    fifo_path: pathlib.Path,
) -> None:
    # expire() counted among the last disarms delivered: its line died unread with the
    # old server, and the resync told the new one a disarm of the scope. The worker that
    # said it is stuck was never reaped (without expire(), its timer would be re-armed).
    peer = FifoPeer(fifo_path)
    client = FileTimerClient(str(fifo_path), signal=0)
    try:
        client.arm("step", 600)
        peer.wait_for(lambda m: any(isinstance(x, Arm) and x.scope_id == "step" for x in m))
        peer.pause()  # the server stops reading: it is being restarted
        client.expire("step")  # taken by the pipe, never read
        peer.close()
        fifo_path.unlink()
        new = FifoPeer(fifo_path)
        try:

            def mine(messages: List[Any]) -> List[Any]:
                return [x for x in messages if getattr(x, "scope_id", None) == "step"]

            new.wait_for(lambda m: bool(mine(m)), timeout=15)  # the watch's resync
            wait_until(lambda: not client._channel.needs_resync, what="the resync")
            assert isinstance(mine(new.messages)[-1], Expire), new.messages
        finally:
            new.close()
    finally:
        client.close()


def test_an_expire_read_before_a_stall_is_not_sent_again(fifo_path: pathlib.Path) -> None:
    # Kept to be re-sent after a restart, a report-only expire (the worker carries on)
    # was re-sent after a mere stall too, its line read already: the healthy worker
    # reported, or signalled, a second time.
    peer = FifoPeer(fifo_path)
    client = FileTimerClient(str(fifo_path), signal=0, on_unavailable="ignore", write_timeout=0.05)

    def expires_of_a(messages: List[Any]) -> int:
        return sum(1 for x in messages if isinstance(x, Expire) and x.scope_id == "a")

    try:
        client.arm("a", 600)
        client.expire("a")
        peer.wait_for(lambda m: expires_of_a(m) == 1)
        peer.pause()
        peer.fill()  # a flood: the pipe full for a moment
        client.arm("b", 600)  # stalled: ignored
        peer.resume()
        wait_until(lambda: not client._channel.needs_resync, what="the resync")
        client.arm("c", 600)  # read once all before it is (a FIFO keeps their order)
        peer.wait_for(lambda m: any(getattr(x, "scope_id", "") == "c" for x in m))
        assert expires_of_a(peer.messages) == 1
    finally:
        peer.resume()
        client.close()
        peer.close()


# Uses up the threads its limit allows (a container's pids limit), arms and disarms once
# with the server there, then once with the server gone; prints how that ended.
NO_THREADS = textwrap.dedent(
    """
    import os, resource, sys, threading
    from ftimer_client import FileTimerClient, configure, expires
    resource.setrlimit(resource.RLIMIT_NPROC, (64, 64))
    os.setgid(65534)
    os.setuid(65534)  # RLIMIT_NPROC binds an unprivileged user only
    configure(FileTimerClient(sys.argv[1], signal=0, on_unavailable="ignore"))
    stop = threading.Event()
    while True:
        try:
            threading.Thread(target=stop.wait, daemon=True).start()
        except RuntimeError:
            break
    with expires(after=60, scope="before"):
        pass  # connected (unwatched: its watch thread could not start)
    print("ready", flush=True)
    sys.stdin.readline()  # the server is gone now
    try:
        with expires(after=60, scope="during"):
            pass
        print("ok", flush=True)
    except BaseException as e:
        print(f"raised {type(e).__name__}: {e}", flush=True)
    stop.set()
    """
)


def test_a_worker_with_no_thread_to_spare_carries_on_when_the_server_goes(
    fifo_path: pathlib.Path,
) -> None:
    # The failure path started the retry thread unguarded: "can't start new thread"
    # escaped into the step under "ignore", and replaced ServerUnavailable under "raise".
    if os.geteuid() != 0:
        pytest.skip("needs root, to run the worker as an unprivileged user")
    os.chmod(fifo_path.parent, 0o755)
    peer = FifoPeer(fifo_path)
    os.chmod(fifo_path, 0o666)
    with subprocess.Popen(
        [sys.executable, "-B", "-c", NO_THREADS, str(fifo_path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    ) as worker:
        assert worker.stdin is not None
        assert worker.stdout is not None
        try:
            assert worker.stdout.readline() == "ready\n"
            peer.close()
            fifo_path.unlink()
            worker.stdin.write("go\n")
            worker.stdin.flush()
            said = worker.stdout.readline()
            assert worker.wait(30) == 0
        finally:
            worker.kill()
    assert said == "ok\n"


@pytest.mark.parametrize("transport", ["fifo", "socket"])
def test_a_refused_rearm_keeps_the_disarm_delivered_before_it_owed(
    fifo_path: pathlib.Path, transport: str
) -> None:
    # The refused re-arm of "s" took the delivered disarm of "s" off the recent: a server
    # that died before reading it, and restored "s" from its state file, was never sent
    # it again and kept a timer for a healthy process.
    server: Peer = FifoPeer(fifo_path) if transport == "fifo" else SocketPeer(fifo_path)
    client = FileTimerClient(str(fifo_path), write_timeout=0.2, transport=transport, labels={})
    try:
        for scope in ("t", "s"):
            client.arm(scope, 60)
        client.release("t")
        client.release("s")  # delivered: among the recent
        server.wait_count(4)
        server.pause()
        server.fill()
        with pytest.raises(ServerStalled):
            client.arm("s", 60)  # refused by the full queue: it never went out
        server = restart(server)  # the old one may not have read the disarms
        client.arm("c", 60)
        messages = server.wait_for(lambda m: any(x.scope_id == "c" for x in m))
        assert {m.scope_id for m in messages if isinstance(m, Disarm)} >= {"t", "s"}
    finally:
        client.close()
        server.close()


@pytest.mark.parametrize("transport", ["fifo", "socket"])
@pytest.mark.parametrize("policy", ["raise", "warn"])
def test_a_rearm_through_a_restart_keeps_the_delivered_disarm_owed(
    fifo_path: pathlib.Path, transport: str, policy: str
) -> None:
    # The re-arm of "s", sent as its connection was found lost, dropped the disarm of
    # "s" from the recent ("s" being armed again), then failed: refused (undone) or
    # released unsent, owing nothing. The restarted server kept the timer its state file
    # restored, for a healthy process.
    server: Peer = FifoPeer(fifo_path) if transport == "fifo" else SocketPeer(fifo_path)
    client = FileTimerClient(
        str(fifo_path), write_timeout=0.2, transport=transport, labels={}, on_unavailable=policy
    )
    try:
        client.arm("s", 60)
        server.wait_count(1)  # held, and saved in its state file
        server.pause()
        client.release("s")  # delivered, never read: the server dies
        server.close()
        fifo_path.unlink()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ServerUnavailableWarning)
            with contextlib.suppress(ServerUnavailable):  # under "raise": refused
                client.arm("s", 60)
                client.release("s")  # under "warn": still away
        server = FifoPeer(fifo_path) if transport == "fifo" else SocketPeer(fifo_path)
        client.arm("c", 60)  # back, "s" restored from its state file
        messages = server.wait_for(lambda m: any(x.scope_id == "c" for x in m))
        assert [type(m) for m in messages if m.scope_id == "s"][-1:] == [Disarm]
    finally:
        client.close()
        server.close()
