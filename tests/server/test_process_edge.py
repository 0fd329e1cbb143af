"""The process edge (``SystemHost``) asked directly, method by method: a pid whose pidfd
is of a process that has exited (a zombie, or a vouched sender whose pid another process
took) is never bound, and its pidfd is closed and no longer waited for; a process /proc
hides, a pid pidfd_open refuses, an inspector or signaller that raises each become an
answer, never a crash; ancestors end at pid 1 (included) or at parent 0; a worker whose
liveness cannot be read counts as alive; a reap or an escalation signals the worker
exactly once whatever its tree's walk does, and a host that reaps no trees walks none.
Fake processes and recording signallers, and one real child of the test's own: nothing
is signalled."""

from __future__ import annotations

import errno
import subprocess
import sys
from typing import List, Optional, Sequence

import pytest
from tests.conftest import wait_until

from ftimer_server import RecordingSignaller, RejectReason, Worker
from ftimer_server.core._host import Facts, Unresolved
from ftimer_server.core._records import Descendant
from ftimer_server.core._table import Expiry
from ftimer_server.server._edge import SystemHost, ancestors_of
from ftimer_server.server._process import SystemInspector

from .conftest import FakeInspector
from .test_edge import TroubledInspector


class ExitingInspector(TroubledInspector):
    """Fake processes with pidfds, some of which are of processes that have exited
    (zombies: still in /proc, their pidfd readable)."""

    def __init__(self) -> None:
        super().__init__()
        self.zombies: set[int] = set()
        self.dead: set[int] = set()  # pidfds (not opened here) of processes that exited

    def tgid(self, pid: int) -> int:
        self._get(pid)  # a pid no longer in /proc
        return super().tgid(pid)

    def alive(self, worker: Worker) -> bool:
        if worker.pidfd in self.dead:
            return False
        return super().alive(worker) and worker.pid not in self.zombies


def test_a_pidfd_of_a_process_that_has_exited_binds_nothing() -> None:
    inspector = ExitingInspector()
    inspector.spawn(1000)
    inspector.zombies.add(1000)
    result = SystemHost(inspector, RecordingSignaller()).resolve(1000)
    assert result == Unresolved(RejectReason.NO_SUCH_PROCESS, exited=True)
    assert inspector.pidfds == {}  # its pidfd was closed


def test_a_real_zombie_is_a_process_that_has_exited() -> None:
    # Exited, not yet reaped by its parent (this test): its /proc entry is still there.
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    try:

        def zombie() -> bool:
            with open(f"/proc/{child.pid}/stat", "rb") as f:
                return f.read().rsplit(b")", 1)[1].split()[0] == b"Z"

        wait_until(zombie, what="the child to exit")
        result = SystemHost(SystemInspector(), RecordingSignaller()).resolve(child.pid)
        assert isinstance(result, Unresolved)
        assert (result.reason, result.exited) == (RejectReason.NO_SUCH_PROCESS, True)
    finally:
        child.wait()


def test_a_live_process_proc_hides_is_unverifiable_never_exited() -> None:
    # hidepid: the pidfd opens, /proc/PID cannot be read, the pidfd says it runs.
    inspector = ExitingInspector()
    inspector.spawn(1000)
    inspector.failures[1000] = ProcessLookupError(errno.ENOENT, "hidden")
    result = SystemHost(inspector, RecordingSignaller()).resolve(1000)
    assert isinstance(result, Unresolved)
    assert (result.reason, result.exited) == (RejectReason.UNVERIFIABLE, False)
    assert "hides it from the server" in result.detail
    assert inspector.pidfds == {}


@pytest.mark.parametrize("error", [OSError(errno.EBADF, "poll"), RuntimeError("a bug")])
def test_a_pidfd_that_cannot_tell_whether_it_exited_is_unverifiable(error: Exception) -> None:
    inspector = ExitingInspector()
    inspector.spawn(1000)

    def alive(worker: Worker) -> bool:
        raise error

    inspector.alive = alive  # type: ignore[method-assign]
    result = SystemHost(inspector, RecordingSignaller()).resolve(1000)
    assert isinstance(result, Unresolved)
    assert result.reason is RejectReason.UNVERIFIABLE
    assert inspector.pidfds == {}


def test_a_vouched_pid_whose_process_is_gone_had_exited() -> None:
    inspector = ExitingInspector()
    host = SystemHost(inspector, RecordingSignaller())
    assert host.resolve(1000) == Unresolved(RejectReason.NO_SUCH_PROCESS, exited=False)
    # The kernel vouched for the sender (a pidfd of its): it was a process, now gone.
    host.vouched = {1000: 7}
    inspector.dead.add(7)
    assert host.resolve(1000) == Unresolved(RejectReason.NO_SUCH_PROCESS, exited=True)


def test_a_vouched_pid_another_process_took_is_never_bound() -> None:
    # The sender exited after its message was read; a new process took its pid (alive,
    # so the pidfd opened by number is of the new one): the vouched pidfd tells.
    inspector = ExitingInspector()
    inspector.spawn(1000, start_time=999)  # the newcomer
    host = SystemHost(inspector, RecordingSignaller())
    host.vouched = {1000: 7}
    inspector.dead.add(7)
    assert host.resolve(1000) == Unresolved(RejectReason.NO_SUCH_PROCESS, exited=True)
    assert inspector.pidfds == {}  # the newcomer's pidfd was closed
    host.vouched = {1000: 8}  # a vouched process still alive: bound
    assert isinstance(host.resolve(1000), Facts)


def test_a_platform_that_does_not_tell_uids_still_binds() -> None:
    inspector = ExitingInspector()
    inspector.spawn(1000)

    def uid(pid: int) -> int:
        raise NotImplementedError

    inspector.uid = uid  # type: ignore[method-assign]
    facts = SystemHost(inspector, RecordingSignaller()).resolve(1000)
    assert isinstance(facts, Facts)
    assert facts.uid is None


def test_a_live_process_is_described_with_the_pidfd_that_pins_it() -> None:
    inspector = ExitingInspector()
    inspector.spawn(1000, start_time=7, uid=33)
    facts = SystemHost(inspector, RecordingSignaller()).resolve(1000)
    assert isinstance(facts, Facts)
    assert (facts.pid, facts.tgid, facts.start_time, facts.uid) == (1000, 1000, 7, 33)
    assert facts.pidfd is not None
    assert inspector.pidfds == {facts.pidfd: 1000}  # owned by the core now, left open


@pytest.mark.parametrize("error", [errno.ENOENT, errno.EINVAL])
def test_a_pid_pidfd_open_refuses_that_proc_calls_a_process_is_no_process(error: int) -> None:
    # pidfd_open fails as for a thread, yet /proc/PID names a process (one that has
    # exited since, say): no process to bind, never a crash.
    inspector = ExitingInspector()
    inspector.spawn(1000)
    inspector.open_failures[1000] = OSError(error, "pidfd_open")
    host = SystemHost(inspector, RecordingSignaller())
    assert host.resolve(1000) == Unresolved(RejectReason.NO_SUCH_PROCESS)


@pytest.mark.parametrize("error", [None, RuntimeError("a bug in a custom inspector")])
def test_a_pid_pidfd_open_refuses_whose_thread_group_is_unread_is_no_process(
    error: Optional[Exception],
) -> None:
    # A thread that exited between pidfd_open and the read of its thread group id (or
    # an inspector that fails to read it): refused, never a crash.
    inspector = ExitingInspector()
    inspector.open_failures[1001] = OSError(errno.ENOENT, "No such file or directory")
    if error is not None:
        inspector.spawn(1001)
        inspector.failures[1001] = error
    host = SystemHost(inspector, RecordingSignaller())
    assert host.resolve(1001) == Unresolved(RejectReason.NO_SUCH_PROCESS)


def test_an_inspector_whose_open_raises_a_bug_refuses_the_pid() -> None:
    inspector = ExitingInspector()
    inspector.spawn(1000)

    def open_(pid: int) -> Optional[int]:
        raise RuntimeError("a bug in a custom inspector")

    inspector.open = open_  # type: ignore[method-assign]
    result = SystemHost(inspector, RecordingSignaller()).resolve(1000)
    assert result == Unresolved(
        RejectReason.UNVERIFIABLE, "RuntimeError: a bug in a custom inspector"
    )


def test_ancestors_stop_at_parent_zero_outside_the_namespace() -> None:
    inspector = FakeInspector()
    inspector.spawn(1000, parent=50)
    inspector.spawn(50, parent=0)  # its parent is outside the server's PID namespace
    asked: List[int] = []
    parent = inspector.parent

    def recorded(pid: int) -> int:
        asked.append(pid)
        return parent(pid)

    inspector.parent = recorded  # type: ignore[method-assign]
    assert ancestors_of(1000, inspector) == frozenset({50})
    assert asked == [1000, 50]  # never pid 0's parent


def test_ancestors_end_at_pid_1_included() -> None:
    # A server that is pid 1 of its namespace is every process's ancestor.
    inspector = FakeInspector()
    inspector.spawn(1000, parent=50)
    inspector.spawn(50, parent=2)
    inspector.spawn(2, parent=1)
    inspector.spawn(1, parent=0)
    assert ancestors_of(1000, inspector) == frozenset({50, 2, 1})


@pytest.mark.parametrize("error", [PermissionError(errno.EACCES, "denied"), NotImplementedError()])
def test_ancestors_are_those_that_could_be_read(error: Exception) -> None:
    inspector = FakeInspector()
    inspector.spawn(1000, parent=50)
    inspector.spawn(50, parent=40)
    parent = inspector.parent

    def hidden(pid: int) -> int:
        if pid == 50:  # its parent cannot be read (hidepid, a platform without /proc)
            raise error
        return parent(pid)

    inspector.parent = hidden  # type: ignore[method-assign]
    assert ancestors_of(1000, inspector) == frozenset({50})
    assert ancestors_of(50, inspector) == frozenset()  # never the pid itself


def test_releasing_a_worker_stops_waiting_for_its_pidfd_only() -> None:
    inspector = ExitingInspector()
    inspector.spawn(1000)
    watched: List[int] = []
    unwatched: List[int] = []
    host = SystemHost(
        inspector,
        RecordingSignaller(),
        watch=lambda w: watched.append(w.pid),
        unwatch=lambda w: unwatched.append(w.pid),
    )
    facts = host.resolve(1000)
    assert isinstance(facts, Facts)
    worker = Worker(1000, facts.start_time, facts.pidfd)
    host.bound(worker)
    host.release(worker)
    assert (watched, unwatched) == ([1000], [1000])
    assert inspector.pidfds == {}
    # Without a pidfd, nothing was waited for: nothing to stop waiting for.
    host.bound(Worker(2000, 5, None))
    host.release(Worker(2000, 5, None))
    assert (watched, unwatched) == ([1000], [1000])


def test_a_refused_pid_is_never_waited_for() -> None:
    # A pidfd opened for a pid then refused (it had exited) is closed, and unwatched:
    # the loop must not keep waiting on a descriptor number the next open may reuse.
    inspector = ExitingInspector()
    inspector.spawn(1000)
    inspector.zombies.add(1000)
    unwatched: List[int] = []
    host = SystemHost(inspector, RecordingSignaller(), unwatch=lambda w: unwatched.append(w.pid))
    assert isinstance(host.resolve(1000), Unresolved)
    assert unwatched == [1000]


class Recorded:
    """The worker's own signal, as the core passes it to ``kill_descendants``."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self) -> None:
        self.calls += 1


def test_an_escalation_without_trees_is_the_worker_s_sigkill_only() -> None:
    signaller = RecordingSignaller()
    host = SystemHost(FakeInspector(), signaller)
    worker = Worker(1000, 100, None)
    signalled = (Descendant(1001, 200),)
    for who in (worker, None):
        then = Recorded()
        assert host.kill_descendants(who, signalled, then) == ()
        assert then.calls == 1
    assert (signaller.trees, signaller.again) == ([], [])


def test_an_escalation_of_a_tree_kills_the_worker_once() -> None:
    signaller = RecordingSignaller()
    host = SystemHost(FakeInspector(), signaller, tree=True)
    for who in (Worker(1000, 100, None), None):
        then = Recorded()
        host.kill_descendants(who, (Descendant(1001, 200),), then)
        assert then.calls == 1
    assert signaller.trees == [(1000, 9)]  # the tree of a worker that exited is not walked
    assert signaller.again == [(1001, 9), (1001, 9)]


class BrokenTree(RecordingSignaller):
    """A signaller whose walk of a tree fails before it signals the worker."""

    def send_tree(self, worker: Worker, signal: int) -> List[Descendant]:
        raise RuntimeError("a bug in a custom signaller")


def test_a_walk_of_the_tree_that_fails_still_signals_the_worker_once() -> None:
    signaller = BrokenTree()
    host = SystemHost(FakeInspector(), signaller, tree=True)
    delivery = host.reap(Worker(1000, 100, None), 15, Expiry(1000, (), None, ()), 1.0)
    assert (delivery.delivered, delivery.descendants) == (True, ())
    then = Recorded()
    assert host.kill_descendants(Worker(1000, 100, None), (), then) == ()
    assert signaller.sent == [(1000, 15)]
    assert then.calls == 1


class BrokenAgain(RecordingSignaller):
    """A signaller that fails to signal a reap's descendants again."""

    def send_again(self, descendants: Sequence[Descendant], signal: int) -> List[Descendant]:
        raise RuntimeError("a bug in a custom signaller")


def test_an_escalation_whose_descendants_cannot_be_signalled_still_kills_the_worker(
    caplog: pytest.LogCaptureFixture,
) -> None:
    signaller = BrokenAgain()
    host = SystemHost(FakeInspector(), signaller, tree=True)
    then = Recorded()
    assert host.kill_descendants(None, (Descendant(1001, 200),), then) == ()
    assert then.calls == 1
    # The log names the descendants and the worker (it named a descendant as the worker).
    caplog.clear()
    signalled = (Descendant(1001, 200), Descendant(1002, 300))
    assert host.kill_descendants(Worker(1000, 100, None), signalled, Recorded()) == ()
    [record] = caplog.records
    assert record.getMessage() == "killing descendants 1001, 1002 of process 1000 failed"


class Tree(RecordingSignaller):
    """A signaller whose walk of a worker's tree reaches ``found``."""

    def __init__(self, found: List[Descendant], delivered: bool = True) -> None:
        super().__init__(delivered)
        self.found = found

    def send_tree(self, worker: Worker, signal: int) -> List[Descendant]:
        super().send_tree(worker, signal)
        return self.found

    def send_again(self, descendants: Sequence[Descendant], signal: int) -> List[Descendant]:
        super().send_again(descendants, signal)
        return list(descendants)


def test_an_escalation_kills_each_descendant_once() -> None:
    # 1001 is still the worker's: its walk kills it; 1002 left the tree (its parent
    # died): killed again as the process the reap signalled.
    signaller = Tree([Descendant(1001, 200)])
    host = SystemHost(FakeInspector(), signaller, tree=True)
    then = Recorded()
    signalled = (Descendant(1001, 200), Descendant(1002, 300))
    killed = host.kill_descendants(Worker(1000, 100, None), signalled, then)
    assert sorted(d.pid for d in killed) == [1001, 1002]
    assert signaller.again == [(1002, 9)]
    assert then.calls == 1


def test_a_reap_of_a_tree_says_the_worker_was_gone() -> None:
    signaller = Tree([Descendant(1001, 200)], delivered=False)
    host = SystemHost(FakeInspector(), signaller, tree=True)
    delivery = host.reap(Worker(1000, 100, None), 15, Expiry(1000, (), None, ()), 1.0)
    assert (delivery.delivered, delivery.gone) == (False, True)
    assert delivery.descendants == (Descendant(1001, 200),)
    assert signaller.sent == [(1000, 15)]


def test_a_worker_whose_liveness_cannot_be_read_counts_as_alive() -> None:
    # Unknown keeps its timers: a signal still goes through the signaller's own checks.
    inspector = ExitingInspector()

    def alive(worker: Worker) -> bool:
        raise PermissionError(errno.EACCES, "Permission denied")

    inspector.alive = alive  # type: ignore[method-assign]
    assert SystemHost(inspector, RecordingSignaller()).alive(Worker(1000, 100, None)) is True


def test_a_pidfd_refused_for_want_of_descriptors_says_what_to_do() -> None:
    inspector = ExitingInspector()
    inspector.spawn(1000)
    inspector.open_failures[1000] = OSError(errno.EMFILE, "Too many open files")
    result = SystemHost(inspector, RecordingSignaller()).resolve(1000)
    assert isinstance(result, Unresolved)
    assert result.reason is RejectReason.UNVERIFIABLE
    assert result.detail.startswith("pidfd_open: EMFILE (Too many open files): ")
    assert "out of file descriptors" in result.detail
