"""The process edge: the one place where the server examines and signals real processes.

``SystemHost`` is the ``Host`` the core talks to. It reads processes through a
``ProcessInspector`` and signals through a ``Signaller``, and it is where every error
they raise is handled, once: a pid that is gone, a thread's id, a ``/proc`` file the
server may not read (``hidepid``), no descriptor left for a pidfd. Each becomes an answer
(an ``Unresolved`` reason the core counts and reports as a rejection, or an undelivered
``Delivery``), never an exception in the middle of a batch of messages.

On Linux with pidfds, a pid is bound through a pidfd, which only a thread group leader
(a process) has: a failed ``pidfd_open`` means the pid is no process to bind, never a
reason to fall back to ``kill(pid)`` (which Linux would deliver to the whole process a
thread belongs to).
"""

from __future__ import annotations

import errno
import logging
import signal as _signal
import time
from typing import Callable, FrozenSet, List, Mapping, Optional, Sequence, Tuple, Union

from ftimer_server.core._events import RejectReason
from ftimer_server.core._host import (
    DELIVERED,
    KILL,
    CaptureRequest,
    Delivery,
    Facts,
    Host,
    Unresolved,
)
from ftimer_server.core._records import Descendant, Worker
from ftimer_server.core._table import Expiry

from ._process import ProcessInspector, out_of_descriptors
from ._signaller import Signaller

__all__ = ["ReapStep", "SystemHost", "ancestors_of"]

logger = logging.getLogger("ftimer_server")

#: A step run between an expiry and its signal: (worker, expiry, now) -> None.
ReapStep = Callable[[Worker, Expiry, float], None]

# The walk up to an ancestor is bounded: a process tree deeper than this is not ours.
_MAX_DEPTH = 256


def _ignore(_: Worker) -> None:
    pass


def platform_signals() -> FrozenSet[int]:
    """The signal numbers of this platform (1 .. SIGRTMAX on Linux)."""
    return frozenset(int(s) for s in _signal.valid_signals())


class SystemHost(Host):
    """The real host, seen through ``inspector`` and signalled through ``signaller``.

    Args:
        inspector: reads processes.
        signaller: delivers signals.
        steps: run in order before each reap's signal (diagnostics); one that raises is
            logged and the reap goes on.
        watch, unwatch: told when a worker with a pidfd is bound and released, so the I/O
            loop can wait for the pidfd (readable: the worker exited).
        capture: starts a capture off the loop and returns its incident's id (the
            server's diagnostics); ``None``: this host captures nothing.
        tree: a reap signals the worker's descendants too (``Signaller.send_tree``), then
            the worker; so does its escalation, and to the descendants the reap signalled
            that outlived the grace period too.
    """

    def __init__(
        self,
        inspector: ProcessInspector,
        signaller: Signaller,
        steps: Sequence[ReapStep] = (),
        *,
        watch: Callable[[Worker], None] = _ignore,
        unwatch: Callable[[Worker], None] = _ignore,
        capture: Optional[Callable[[CaptureRequest], Optional[str]]] = None,
        tree: bool = False,
    ) -> None:
        self.signals = platform_signals()
        self.kills = signaller.kills
        self._inspector = inspector
        self._signaller = signaller
        self._steps = tuple(steps)
        self._watch = watch
        self._unwatch = unwatch
        self._capture = capture
        #: pid -> a pidfd the kernel gave of the process that pid is to be bound to (the
        #: socket's senders and subjects, see ``DatagramSocket.vouched``).
        self.vouched: Mapping[int, int] = {}
        self._tree = tree

    def resolve(self, pid: int, *, ancestry: bool = False) -> Union[Facts, Unresolved]:
        inspector = self._inspector
        vouch = self.vouched.get(pid)
        try:
            pidfd = inspector.open(pid)
        except ProcessLookupError:
            # A pid the kernel vouched for (a socket's sender or subject) was a process's,
            # which has exited since (and been reaped).
            return Unresolved(RejectReason.NO_SUCH_PROCESS, exited=vouch is not None)
        except OSError as e:
            if e.errno in (errno.ENOENT, errno.EINVAL):  # what pidfd_open says of a thread
                return self._not_a_process(pid)
            why = f"pidfd_open: {_describe(e)}"
            return Unresolved(RejectReason.UNVERIFIABLE, why, scarce=e.errno in _SCARCE)
        except Exception as e:  # a custom inspector's bug: refuse, never crash the loop
            logger.exception("inspecting process %d failed", pid)
            return Unresolved(RejectReason.UNVERIFIABLE, _describe(e))
        facts: Optional[Facts] = None
        try:
            # The pidfd first: whatever is read next describes its process as long as that
            # process is still alive afterwards (checked last).
            facts = Facts(
                pid=pid,
                tgid=inspector.tgid(pid),
                start_time=inspector.start_time(pid),
                uid=_optional(inspector.uid, pid),
                ancestors=tuple(ancestors_of(pid, inspector)) if ancestry else None,
                pidfd=pidfd,
                clock_offsets=inspector.clock_offsets(pid),
            )
        except ProcessLookupError:
            pass  # exited since, or hidden from the server: its pidfd tells which
        except Exception as e:
            return self._unexamined(pid, pidfd, e)
        try:
            # Alive now, the process the kernel named still holds the pid: the pidfd
            # opened by number is of that process, not of one that reused its pid.
            start_time = None if facts is None else facts.start_time
            exited = self._exited(pid, pidfd, start_time) or self._exited(pid, vouch)
        except Exception as e:
            return self._unexamined(pid, pidfd, e)
        if facts is not None and not exited:
            return facts
        if pidfd is not None:
            self.release(Worker(pid, None, pidfd))
        if exited or pidfd is None:
            return Unresolved(RejectReason.NO_SUCH_PROCESS, exited=exited)
        # Alive, as its pidfd says, yet not in /proc: never counted as one that exited.
        why = f"/proc/{pid} hides it from the server (hidepid, or a process not dumpable?)"
        return Unresolved(RejectReason.UNVERIFIABLE, why)

    def _exited(self, pid: int, pidfd: Optional[int], start_time: Optional[int] = None) -> bool:
        """Whether ``pidfd`` (if any) is of a process that has exited: a zombie, or reaped."""
        return pidfd is not None and not self._inspector.alive(Worker(pid, start_time, pidfd))

    def _unexamined(self, pid: int, pidfd: Optional[int], e: Exception) -> Unresolved:
        if pidfd is not None:
            self.release(Worker(pid, None, pidfd))
        if not isinstance(e, OSError):
            logger.exception("inspecting process %d failed", pid)
        scarce = isinstance(e, OSError) and e.errno in _SCARCE
        return Unresolved(RejectReason.UNVERIFIABLE, f"/proc/{pid}: {_describe(e)}", scarce=scarce)

    def bound(self, worker: Worker) -> None:
        if worker.pidfd is not None:
            try:
                self._watch(worker)
            except Exception:  # its exit is then seen at its expiry, not at once
                logger.exception("cannot wait for the pidfd of process %d", worker.pid)

    def release(self, worker: Worker) -> None:
        if worker.pidfd is not None:
            self._unwatch(worker)
        try:
            self._inspector.close(worker)
        except Exception as e:  # a custom inspector's bug costs no other message
            if isinstance(e, OSError):
                logger.error("closing the pidfd of process %d failed: %s", worker.pid, e)
            else:
                logger.exception("closing the pidfd of process %d failed", worker.pid)

    def alive(self, worker: Worker) -> bool:
        try:
            return self._inspector.alive(worker)
        except Exception as e:
            # Unknown counts as alive: the worker keeps its timers, and a signal still
            # goes through the signaller's own identity checks.
            logger.warning("cannot tell whether process %d is alive: %s", worker.pid, e)
            return True

    def waiting(self, worker: Worker) -> Optional[str]:
        try:
            return self._inspector.waiting(worker.pid)
        except Exception:  # a custom inspector's bug costs only the description
            logger.exception("cannot read what process %d waits in", worker.pid)
            return None

    def signal(self, worker: Worker, signal: int) -> Delivery:
        try:
            if self._signaller.send(worker, signal):
                return DELIVERED
            return Delivery(False, "the process had exited", gone=True)
        except Exception as e:
            if not isinstance(e, OSError):
                logger.exception("signalling process %d failed", worker.pid)
            return Delivery(False, _describe(e))

    def reap(self, worker: Worker, signal: int, expiry: Expiry, now: float) -> Delivery:
        started = time.monotonic()
        for step in self._steps:
            try:
                step(worker, expiry, now)
            except Exception:
                logger.exception("reap step %r failed for process %d", step, worker.pid)
        if self._tree:
            # The tree first (once the worker is signalled, its children may be
            # re-parented away from it), and only while the worker is still the process
            # bound: send_tree pins it by its pidfd or start time, as signal() does, and
            # checks it again after the walk. Its walk waits at most a few tens of
            # milliseconds for a descendant to stop: it runs on the loop's thread. The
            # worker's own signal comes before the walk lets it run again: continued
            # first, it could see its children die and end on its own terms.
            signalled: List[Delivery] = []
            took = 0.0

            def then() -> None:
                nonlocal took
                took = time.monotonic() - started  # counted in the reap's lateness
                signalled.append(self.signal(worker, signal))

            descendants = self._send_tree(worker, signal, then)
            delivery = signalled[0]
            return Delivery(delivery.delivered, delivery.error, descendants, delivery.gone, took)
        return self.signal(worker, signal)

    def kill_descendants(
        self,
        worker: Optional[Worker],
        signalled: Tuple[Descendant, ...],
        then: Callable[[], None],
    ) -> Tuple[Descendant, ...]:
        if not self._tree or worker is None:
            then()
        if not self._tree:
            return ()
        # The tree first, as at the reap, the worker's SIGKILL before it runs again; then
        # those of the reap's that left it (their parent died), each the process it was
        # (never one that took its pid), of a user the worker could signal.
        killed = {d.pid: d for d in self._send_tree(worker, KILL, then)} if worker else {}
        rest = [d for d in signalled if d.pid not in killed]
        if rest:
            try:
                killed.update((d.pid, d) for d in self._signaller.send_again(rest, KILL))
            except Exception:  # a custom signaller's bug: the worker is escalated regardless
                logger.exception(
                    "killing descendants %s of %s failed",
                    ", ".join(str(d.pid) for d in rest),
                    f"process {worker.pid}" if worker else "a reaped process",
                )
        return tuple(killed.values())

    def _send_tree(
        self, worker: Worker, signal: int, then: Callable[[], None]
    ) -> Tuple[Descendant, ...]:
        """``signal`` to the worker's descendants, then ``then()`` (the worker's own
        signal, before the walk lets it run again): each once, whatever fails."""
        called = False

        def once() -> None:
            nonlocal called
            if not called:
                called = True
                then()

        try:
            return tuple(self._signaller._send_tree_then(worker, signal, once))
        except Exception:  # the worker itself is signalled regardless
            logger.exception("signalling the descendants of process %d failed", worker.pid)
            return ()
        finally:
            once()

    def capture(self, request: CaptureRequest) -> Optional[str]:
        if self._capture is None:
            return None
        try:
            return self._capture(request)
        except Exception:  # never a reason not to reap: signal at once instead
            logger.exception("starting the capture of process %d failed", request.worker.pid)
            return None

    def _not_a_process(self, pid: int) -> Unresolved:
        try:
            tgid = self._inspector.tgid(pid)
        except Exception:
            return Unresolved(RejectReason.NO_SUCH_PROCESS)
        if tgid != pid:
            return Unresolved(RejectReason.NOT_A_PROCESS, f"a thread of process {tgid}")
        return Unresolved(RejectReason.NO_SUCH_PROCESS)


def ancestors_of(pid: int, inspector: ProcessInspector) -> FrozenSet[int]:
    """The parent, grandparent, ... of ``pid``, up to pid 1 of the server's PID
    namespace (included: a server that is pid 1 there is every process's ancestor), as
    far as they can be read. Parent 0 (outside the namespace) ends the chain."""
    found = set()
    for _ in range(_MAX_DEPTH):
        try:
            pid = inspector.parent(pid)
        except (OSError, NotImplementedError):
            break
        if pid <= 0:
            break
        found.add(pid)
        if pid == 1:
            break
    return frozenset(found)


def _optional(read: Callable[[int], int], pid: int) -> Optional[int]:
    try:
        return read(pid)
    except NotImplementedError:
        return None


#: What a process out of file descriptors, or a host, is told.
_SCARCE = frozenset({errno.EMFILE, errno.ENFILE})


def _describe(e: BaseException) -> str:
    if isinstance(e, OSError) and e.errno is not None:
        name = errno.errorcode.get(e.errno, e.errno)
        return f"{name} ({e.strerror}){out_of_descriptors(e.errno)}"
    return f"{type(e).__name__}: {e}"
