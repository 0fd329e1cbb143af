"""Who a datagram's sender may name by pidfd (server/_kinship.py), as mutation testing
asked: each test fails with a one-line change that every other test let through. A fake
inspector: no process is examined."""

from __future__ import annotations

from typing import Dict, Optional

from ftimer_server.core._events import RejectReason
from ftimer_server.server._kinship import may_name, subject
from ftimer_server.server._process import ProcessInspector


class Tree(ProcessInspector):
    """Processes as parent links, all of one uid; nothing else exists."""

    def __init__(self, parents: Dict[int, int], uid: int = 1000) -> None:
        self.parents, self._uid = parents, uid

    def _check(self, pid: int) -> None:
        if pid not in self.parents:
            raise ProcessLookupError(pid)

    def start_time(self, pid: int) -> Optional[int]:
        self._check(pid)
        return 100

    def parent(self, pid: int) -> int:
        self._check(pid)
        return self.parents[pid]

    def uid(self, pid: int) -> int:
        self._check(pid)
        return self._uid


def test_pid_1_of_a_container_may_name_its_grandchild() -> None:
    # `ftimer exec` as a container's pid 1, its command a shell (pid 2) that runs the
    # worker (pid 3): the walk up from 3 passes 2 and reaches the sender. Stopping the
    # walk at pid 2 (as if it were the host's kthreadd) refused the container's workers.
    tree = Tree({1: 0, 2: 1, 3: 2})
    assert may_name(1, 1000, 3, {}, tree) is None
    assert subject(1, 1000, named=3, parents={}, processes=tree) == (None, 3, "")


def test_a_pidfd_read_as_pid_0_is_a_foreign_subject_not_an_exited_one() -> None:
    # A pidfd of a process outside the server's PID namespace reads as pid 0: the sender
    # is told it named what it may not, not that its worker exited (a retry would not help).
    tree = Tree({5: 1})
    reason, pid, _ = subject(5, 1000, named=0, parents={}, processes=tree)
    assert (reason, pid) == (RejectReason.FOREIGN_SUBJECT, 5)


class Vanishing(Tree):
    """Process 7 exits right after its uid was read."""

    def __init__(self, parents: Dict[int, int]) -> None:
        super().__init__(parents)
        self.gone = False

    def uid(self, pid: int) -> int:
        uid = super().uid(pid)
        if pid == 7:
            self.gone = True
        return uid

    def _check(self, pid: int) -> None:
        if pid == 7 and self.gone:
            raise ProcessLookupError(pid)
        super()._check(pid)


def test_a_subject_that_exits_while_examined_is_reported_gone() -> None:
    # The walk up from a target that exits meanwhile fails: the sender is told its
    # worker exited (NO_SUCH_PROCESS), not that it named another's process.
    reason, _, _ = subject(5, 1000, named=7, parents={}, processes=Vanishing({5: 1, 7: 5}))
    assert reason is RejectReason.NO_SUCH_PROCESS
