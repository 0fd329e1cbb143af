"""A client passed to a ``multiprocessing`` child, as torch's can be: the child gets a
client of its own, with the same arguments, arming its own timers."""

from __future__ import annotations

import multiprocessing
import operator
import os
import pickle
import signal

from ftimer_client import FileTimerClient
from ftimer_protocol import Arm

from .conftest import FifoPeer


def test_a_spawned_child_gets_a_client_of_its_own(peer: FifoPeer) -> None:
    # It raised "cannot pickle '_thread.RLock' object": torch's goes through.
    client = FileTimerClient(str(peer.path), labels={"job": "j"}, on_unavailable="warn")
    client.signal = signal.SIGTERM  # assigned after construction, as torch code does
    child = multiprocessing.get_context("spawn").Process(
        target=operator.methodcaller("arm", "from-child", 60), args=(client,)
    )
    child.start()
    child.join(60)
    assert child.exitcode == 0
    [arm] = [m for m in peer.wait_count(1) if isinstance(m, Arm)]
    assert (arm.pid, arm.scope_id, arm.signal) == (child.pid, "from-child", signal.SIGTERM)
    assert arm.labels == {"job": "j"}
    assert client.armed == frozenset()  # the parent's own client armed nothing
    client.close()


def test_an_unpickled_client_is_a_new_one_of_this_process(peer: FifoPeer) -> None:
    client = FileTimerClient(str(peer.path), signal.SIGTERM, write_timeout=2.5)
    client.arm("mine", 60)
    copy = pickle.loads(pickle.dumps(client))
    assert copy is not client
    assert repr(copy) == repr(client)
    assert copy.armed == frozenset()
    copy.arm("the copy's", 60)
    assert {m.scope_id for m in peer.wait_count(2) if isinstance(m, Arm)} == {"mine", "the copy's"}
    assert {m.pid for m in peer.messages} == {os.getpid()}
    copy.close()
    client.close()
