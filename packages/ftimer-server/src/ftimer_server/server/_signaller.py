"""Delivering signals: the one place where the server acts on another process.

The server never calls ``kill()`` itself; it asks a ``Signaller``. Tests of hostile
requests inject a ``RecordingSignaller`` so nothing real is ever signalled, and a daemon
run with ``--dry-run`` does the same.
"""

from __future__ import annotations

import abc
import contextlib
import errno
import os
import signal as _signal
import sys
import threading
import time
from typing import Callable, List, Optional, Sequence, Tuple

from ftimer_server.core._records import Descendant, Worker

from ._process import ProcessInspector, SystemInspector

__all__ = ["OsSignaller", "RecordingSignaller", "Signaller"]

#: Signals a stopped process is not continued after: they kill it, stop it, continue it
#: already, or are a probe (0).
_NOT_CONTINUED = frozenset(
    {0, _signal.SIGKILL, _signal.SIGCONT}
    | {_signal.SIGSTOP, _signal.SIGTSTP, _signal.SIGTTIN, _signal.SIGTTOU}
)


class Signaller(abc.ABC):
    """Delivers a signal to a bound worker process.

    Attributes:
        kills: its SIGKILL ends a process (the kernel's word): a worker alive long
            after one is ``Unkillable``. False for a signaller that signals nobody.
    """

    kills = True

    @abc.abstractmethod
    def send(self, worker: Worker, signal: int) -> bool:
        """Deliver ``signal`` to exactly the process ``worker`` was bound to.

        Returns:
            True if it was delivered; False if that process is gone (exited, or its pid
            now belongs to another process, which must not be signalled).

        Raises:
            OSError: the signal could not be delivered for another reason (for example
                ``PermissionError``); the server reports it in the ``Reaped`` event.
        """

    def send_tree(self, worker: Worker, signal: int) -> List[Descendant]:
        """Deliver ``signal`` to the descendants of ``worker`` (not to ``worker``
        itself), for a server that reaps trees. Never raises.

        Only while ``worker`` is the process it was bound to, as ``send()`` checks: the
        descendants of a process that took its pid are never signalled.

        The base class signals nobody: only a signaller that acts on real processes
        overrides it, so a test's or a dry run's signaller never reaches a real process
        through a worker's children.

        Returns:
            The processes ``signal`` was delivered to (``send_again()`` reaches exactly
            those later, never a process that took a pid of theirs).
        """
        return []

    def _send_tree_then(
        self, worker: Worker, signal: int, then: Callable[[], object]
    ) -> List[Descendant]:
        """``send_tree()``, then ``then()`` (the worker's own signal), each once; a
        signaller that holds the worker stopped for its walk calls ``then`` before it lets
        the worker run again (``OsSignaller``).

        Raises:
            Exception: as ``send_tree()`` (``then`` is not called then) or ``then``.
        """
        descendants = self.send_tree(worker, signal)
        then()
        return descendants

    def send_again(self, descendants: Sequence[Descendant], signal: int) -> List[Descendant]:
        """Deliver ``signal`` to those of ``descendants`` (as ``send_tree()`` returned
        them) that are still the processes they were, of a user the worker could signal
        (one that became another user's since, through a setuid program, is spared): an
        escalation. Never raises. The base class signals nobody, as ``send_tree()``.

        Returns:
            Those it was delivered to.
        """
        return []


class OsSignaller(Signaller):
    """Signals real processes: through the worker's pidfd when it has one.

    Without one, a pidfd is opened for the signal, then the start time of the process
    holding the pid checked: the pidfd is of the worker's process if that still holds the
    pid. Where none can be opened (macOS, out of descriptors), ``kill()`` follows the
    check: a narrow window remains in which the pid could be reused between the two. A
    thread's id is refused there whatever the inspector says (``kill()`` of a thread's id
    signals its process).

    Args:
        inspector: reads start times for the check without a pidfd.
    """

    def __init__(self, inspector: Optional[ProcessInspector] = None) -> None:
        self._inspector = inspector = inspector or SystemInspector()
        # alive() asks the inspector's tgid(): the system's own check stands in for a
        # custom one (ProcessInspector's default takes every id for a process's).
        knows_threads = type(inspector).tgid is SystemInspector.tgid
        self._system = None if knows_threads else SystemInspector()

    def send(self, worker: Worker, signal: int) -> bool:
        """As ``Signaller.send()``; a signal the process could catch is followed by
        ``SIGCONT``, as systemd and a shell's ``kill`` do: a stopped process (Ctrl-Z,
        ``SIGSTOP``) acts on no signal but ``SIGKILL`` until it runs again, and its
        reap would wait for whoever continues it."""
        try:
            own = worker.pidfd
            signal = _as_received(worker.pid, signal)
            if own is not None:
                _deliver(lambda s: _signal.pidfd_send_signal(own, s), signal)
                return True
            if worker.pid <= 1:  # never a process group or every process
                raise PermissionError(f"refusing to signal pid {worker.pid}")
            if self._system is not None:
                self._refuse_a_thread(worker.pid, self._system)
            pidfd = self._pin(worker.pid)
            try:
                if not self._inspector.alive(worker):
                    return False
                if pidfd is None:
                    _deliver(lambda s: os.kill(worker.pid, s), signal)
                else:
                    _deliver(lambda s: _signal.pidfd_send_signal(pidfd, s), signal)
            finally:
                if pidfd is not None:
                    os.close(pidfd)
        except ProcessLookupError:
            return False
        return True

    def _pin(self, pid: int) -> Optional[int]:
        """A pidfd of whoever holds ``pid`` now, or None where none can be had.

        Raises:
            ProcessLookupError: nobody holds it.
            OSError: not a process (a thread's id), or not to be examined.
        """
        try:
            return self._inspector.open(pid)
        except OSError as e:
            if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOMEM):
                return None  # the start time's check alone, as without pidfds
            raise

    @staticmethod
    def _refuse_a_thread(pid: int, system: SystemInspector) -> None:
        try:
            tgid = system.tgid(pid)
        except OSError as e:  # gone; or hidden (hidepid), or another namespace's /proc
            if isinstance(e, ProcessLookupError):
                os.kill(pid, 0)  # ProcessLookupError again if it is gone indeed
            raise PermissionError(
                f"refusing to signal pid {pid}: /proc cannot tell whether it is a thread's "
                f"id ({e.strerror or e})"
            ) from None
        if tgid != pid:
            raise PermissionError(f"refusing to signal pid {pid}: a thread of process {tgid}")

    def send_tree(self, worker: Worker, signal: int) -> List[Descendant]:
        # Imported only by a server that signals descendants: keeps the daemon's RSS
        # down (and the import's time off the first reap).
        from ftimer_server.incidents._reap_extras import signal_tree  # noqa: PLC0415

        # The worker's own pidfd and start time pin the root: a pid now held by another
        # process (the worker exited) has none of the worker's descendants to signal.
        return signal_tree(worker.pid, signal, worker.start_time, worker.pidfd)

    def _send_tree_then(
        self, worker: Worker, signal: int, then: Callable[[], object]
    ) -> List[Descendant]:
        if type(self).send_tree is not OsSignaller.send_tree:  # a subclass's walk
            return super()._send_tree_then(worker, signal, then)
        from ftimer_server.incidents._reap_extras import signal_tree  # noqa: PLC0415

        # The worker's signal while the walk still holds it stopped.
        return signal_tree(worker.pid, signal, worker.start_time, worker.pidfd, then)

    def send_again(self, descendants: Sequence[Descendant], signal: int) -> List[Descendant]:
        from ftimer_server.incidents._reap_extras import signal_again  # noqa: PLC0415

        return signal_again(descendants, signal)


#: Signals sent as they are to a namespace's init: forced through (SIGKILL, SIGSTOP),
#: none, or whose default action is to do nothing.
_AS_SENT = frozenset(
    {0, _signal.SIGKILL, _signal.SIGSTOP}
    | {_signal.SIGCHLD, _signal.SIGCONT, _signal.SIGURG, _signal.SIGWINCH}
)
_STOPPING = frozenset({_signal.SIGTSTP, _signal.SIGTTIN, _signal.SIGTTOU})


def _as_received(pid: int, signal: int) -> int:
    """``signal``, or what its default action comes to (SIGKILL, or SIGSTOP for a stop
    signal) for a process that is pid 1 of a PID namespace below the server's (a
    container's first process), neither catches nor ignores it, and does not take it
    itself (``_takes_itself``): the kernel drops such a signal, even from an ancestor
    namespace (it forces only SIGKILL and SIGSTOP through), where any other process
    would die (or stop) of it. What cannot be read leaves ``signal``."""
    if signal in _AS_SENT:
        return signal
    from ftimer_server.incidents._procfs import (  # noqa: PLC0415
        catches_or_ignores,
        read_status,
    )

    try:
        status = read_status(pid)
    except OSError:
        return signal
    nspid = status.get("NSpid", "").split()
    if len(nspid) < 2 or nspid[-1] != "1" or catches_or_ignores(status, signal):
        return signal
    if _takes_itself(pid, signal):
        return signal
    return _signal.SIGSTOP if signal in _STOPPING else _signal.SIGKILL


def _takes_itself(pid: int, signal: int) -> bool:
    """Whether every thread of process ``pid`` blocks ``signal`` (it stays queued for a
    signalfd, as systemd and catatonit take theirs) or waits for it in sigtimedwait()
    (tini, dumb-init; SigBlk no longer shows the set waited for). One thread that does
    neither takes the signal to its default action, which the kernel drops for an init
    (a traced one's too, once its tracer passes it on). Threads read within 10 ms;
    what cannot be read: False."""
    from ftimer_server.incidents._procfs import read_threads, signal_mask  # noqa: PLC0415

    try:
        threads = read_threads(
            pid, kernel_stacks=False, masks=True, deadline=time.monotonic() + 0.01
        )
    except OSError:
        return False
    return bool(threads) and all(
        signal_mask(t.blocked, signal)
        or ("sigtimedwait" in (t.wchan or "") and _waits_for(pid, t.tid, signal))
        for t in threads
    )


#: rt_sigtimedwait's number where ``/proc/PID/task/TID/syscall`` names it so.
_SIGTIMEDWAIT = {"x86_64": 128, "aarch64": 137}.get(os.uname().machine)


def _waits_for(pid: int, tid: int, signal: int) -> bool:
    """Whether thread ``tid`` of ``pid``, in sigtimedwait(), waits for ``signal``: the
    set its call points to, read from its memory; where that cannot be read, taken to
    (an init waits for every signal)."""
    try:
        with open(f"/proc/{pid}/task/{tid}/syscall") as f:
            fields = f.read().split()
        if _SIGTIMEDWAIT is None or int(fields[0]) != _SIGTIMEDWAIT:
            return True
        fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY | os.O_CLOEXEC)
        try:
            waited = os.pread(fd, 8, int(fields[1], 16))
        finally:
            os.close(fd)
    except (OSError, ValueError, IndexError):
        return True
    return bool(int.from_bytes(waited, sys.byteorder) >> (signal - 1) & 1)


def _deliver(send: Callable[[int], object], signal: int) -> None:
    send(signal)
    if signal not in _NOT_CONTINUED:
        with contextlib.suppress(ProcessLookupError):  # the signal ended it already
            send(_signal.SIGCONT)


class RecordingSignaller(Signaller):
    """Signals nothing: records each request in ``sent`` as (pid, signal), each request
    for a worker's descendants in ``trees`` as (pid of the worker, signal), and each
    descendant ``send_again()`` is asked to signal in ``again`` as (pid, signal).

    For tests and dry runs.

    Args:
        delivered: what ``send()`` answers.
    """

    kills = False

    def __init__(self, delivered: bool = True) -> None:
        self.delivered = delivered
        self.sent: List[Tuple[int, int]] = []
        self.trees: List[Tuple[int, int]] = []
        self.again: List[Tuple[int, int]] = []
        self._lock = threading.Lock()

    def send(self, worker: Worker, signal: int) -> bool:
        with self._lock:
            self.sent.append((worker.pid, signal))
        return self.delivered

    def send_tree(self, worker: Worker, signal: int) -> List[Descendant]:
        with self._lock:
            self.trees.append((worker.pid, signal))
        return []

    def send_again(self, descendants: Sequence[Descendant], signal: int) -> List[Descendant]:
        with self._lock:
            self.again += [(d.pid, signal) for d in descendants]
        return []
