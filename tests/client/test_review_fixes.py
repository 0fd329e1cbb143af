"""A failed arm never left on the server; ``release_all()`` leaves other channels' timers
(``ftimer exec``'s) alone; a pickled client keeps its server; a resync longer than the
socket's queue goes through after a stall. Every server here is a recording peer: nothing
is ever signalled."""

from __future__ import annotations

import os
import pathlib
import pickle
import subprocess
import sys
import time
from typing import Any, List

import pytest
from tests.conftest import not_pid_1

from ftimer_client import FileTimerClient, ServerStalled, _channel
from ftimer_protocol import PIPE_BUF, Arm, DisarmAll, Message

from .conftest import FifoPeer, SocketPeer, restart, server_state
from .test_fork import in_child
from .test_interrupts import handler_in_a_loop_of

ME = os.getpid()

needs_pidfd = pytest.mark.skipif(
    not hasattr(os, "pidfd_open"), reason="the socket transport is Linux's (pidfds)"
)


def armed_on(messages: List[Message]) -> set:
    return {scope for pid, scope in server_state(messages) if pid == ME}


def arms_of(messages: List[Message], scope: str) -> List[Any]:
    return [m for m in messages if isinstance(m, Arm) and m.scope_id == scope]


def make_room(peer: SocketPeer, datagrams: int) -> None:
    """Stop ``peer`` reading, fill its queue, then read ``datagrams`` of the fill lines
    away: the queue takes exactly that many more."""
    peer.pause()
    peer.fill()
    for _ in range(datagrams):
        peer.sock.recv(PIPE_BUF)


def in_sync(client: FileTimerClient, peer: SocketPeer) -> List[Message]:
    """Wait until the client's retries have brought ``peer`` up to date (the retry thread
    exits then), and the peer has read it all (a last arm, sent in sync, comes after);
    return what it read."""
    retry = client._channel._retry
    if retry is not None:
        retry.join(20)
    assert not client._channel.needs_resync, "the retries never went through"
    client.arm("end", 600)
    return peer.wait_for(lambda m: bool(arms_of(m, "end")))


# -- 1: an arm that raised is not left on the server ---------------------------------------


@needs_pidfd
@pytest.mark.parametrize("room", [2, 3, 4, 5])
def test_an_arm_that_raised_sent_no_copy_of_itself_ahead_of_it(
    speer: SocketPeer, room: int
) -> None:
    # After a restart the arm resynchronises first. The resync carried the new arm too:
    # with room for it but not for the arm's own line, the caller was told "not armed"
    # (expires skipped its block) while the server held the timer, and reaped the
    # healthy worker at its deadline.
    client = FileTimerClient(speer.path, write_timeout=0.2, labels={})
    for scope in ("a", "b", "c"):
        client.arm(scope, 600)
    speer.wait_count(3)
    new = restart(speer)
    try:
        make_room(new, room)
        try:
            client.arm("new", 600)
            raised = False
        except ServerStalled:
            raised = True
        new.resume()
        messages = in_sync(client, new)
        # Whatever the room: the server got the arm exactly when the caller was told so.
        assert bool(arms_of(messages, "new")) != raised
        assert armed_on(messages) == {"a", "b", "c", "end"} | (set() if raised else {"new"})
        client.close()
    finally:
        new.close()


@needs_pidfd
def test_an_arm_whose_line_went_out_before_a_handlers_failed_is_disarmed(
    speer: SocketPeer,
) -> None:
    # A signal handler arms while the arm is being delivered: its line goes after the
    # arm's, and fails. The arm raised (so the caller counts it as not armed), yet its
    # line had reached the server: nothing ever disarmed it.
    client = FileTimerClient(speer.path, write_timeout=0.2, labels={})
    other = FileTimerClient(speer.path, labels={})  # a library's, used by its handler
    assert other._channel is client._channel
    make_room(speer, 1)  # the arm's line, not the handler's
    handler = handler_in_a_loop_of(_channel, lambda: other.arm("handler's", 600))
    with handler, pytest.raises(ServerStalled):
        client.arm("new", 600)  # the handler runs once its line is written
    assert client.armed == frozenset()
    speer.resume()
    messages = in_sync(client, speer)
    assert arms_of(messages, "new")  # it went out
    assert armed_on(messages) == {"handler's", "end"}  # and the retries disarmed it
    other.close()
    client.close()


# -- 2: release_all() disarms what this process armed, not every timer of its pid --------


@not_pid_1
def test_release_all_leaves_the_timers_other_channels_armed_for_the_pid(peer: FifoPeer) -> None:
    # ftimer exec arms its command's timer on a channel of its own (one naming a pid): a
    # command that called release_all() before exec(), as advised, wiped it with a
    # disarm_all of its pid, and was never reaped when stuck.
    # A child stands for ftimer exec, which arms for the command's process.
    in_child(lambda: FileTimerClient(peer.path, pid=ME, labels={}).arm("exec:cmd", 600))
    one = FileTimerClient(peer.path, labels={})
    two = FileTimerClient(peer.path, labels={})
    one.arm("a", 600)
    two.arm("b", 600)
    one.release_all()
    assert one.armed == two.armed == frozenset()
    one.arm("end", 600)
    messages = peer.wait_for(lambda m: bool(arms_of(m, "end")))
    assert not [m for m in messages if isinstance(m, DisarmAll)]
    # None of the process's own timers is left; the wrapper's is.
    assert armed_on(messages) == {"exec:cmd", "end"}


FTIMER = [sys.executable, "-m", "ftimer_client"]  # the `ftimer` command
CALLS_RELEASE_ALL = """
import sys
from ftimer_client import FileTimerClient
client = FileTimerClient(sys.argv[1], labels={})
client.arm("own", 600)
client.release_all()
"""


def test_release_all_in_a_command_run_by_ftimer_exec_keeps_its_timer(peer: FifoPeer) -> None:
    fifo = str(peer.path)
    command = [sys.executable, "-c", CALLS_RELEASE_ALL, fifo]
    done = subprocess.run(
        [*FTIMER, "exec", "--fifo", fifo, "--after", "600", "--scope", "exec:cmd", "--", *command],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    messages = peer.wait_count(4)  # exec's arm, the command's arm and disarm, exec's disarm
    [timer] = arms_of(messages, "exec:cmd")
    # Until ftimer exec disarmed it, once the command had exited, its timer stayed.
    assert server_state(messages[:-1]) == {(timer.pid, "exec:cmd"): timer.deadline}
    assert server_state(messages) == {}


# -- 3: a pickled client keeps the server it was made for ----------------------------------


def test_an_unpickled_client_keeps_its_relative_path_of_where_it_was_made(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "made" / "run").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "made")
    client = FileTimerClient("run/timer.fifo", on_unavailable="ignore", labels={})
    assert client.file_path == str(tmp_path / "made" / "run" / "timer.fifo")
    monkeypatch.chdir(tmp_path / "elsewhere")  # a spawned child's, say
    copy = pickle.loads(pickle.dumps(client))
    assert copy.file_path == client.file_path


# -- 4: after a stall, a resync longer than the socket's queue goes through ---------------


class SlowPeer(SocketPeer):
    """A server that reads about a datagram a millisecond: busy, not stalled."""

    def _read(self) -> None:
        super()._read()
        time.sleep(0.001)  # pacing, not synchronisation


@needs_pidfd
def test_a_resync_longer_than_the_queue_goes_through_after_a_stall(
    socket_path: pathlib.Path,
) -> None:
    # Once stalled, every delivery waited for nothing, the retries' too: a resync longer
    # than what the server drained while the sender yielded the CPU twice a line never
    # went through, and the client stayed out of sync (every call failing) for good.
    count = 100  # the queue holds max_dgram_qlen + 1 datagrams (11 by default)
    peer = SlowPeer(socket_path)
    try:
        client = FileTimerClient(peer.path, write_timeout=0.5, labels={})
        for i in range(count):
            client.arm(f"s{i}", 600)
        peer.wait_count(count)
        peer.pause()
        peer.fill()
        with pytest.raises(ServerStalled):
            client.arm("stalled", 600)
        peer.resume()
        # No further call: the retry thread brings the server up to date.
        messages = in_sync(client, peer)
        assert armed_on(messages) == {f"s{i}" for i in range(count)} | {"end"}
        client.close()
    finally:
        peer.close()
