"""The workers of a chaos run (workers.py): healthy ones that must live, hung ones that
must be reaped, quiet ones that disarm just before a fault, and canaries that no request
may touch."""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import IO, AbstractSet, Any, Dict, List, Optional, Set, Tuple

from _daemon import Daemon
from _procs import Child, DeathWatch

__all__ = ["Fleet", "Hung"]

WORKERS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "workers.py")
#: Healthy workers, and the variants among them (the rest use the defaults).
HEALTHY = 12
VARIANTS: List[List[str]] = [
    ["--protocol", "1"],  # torch's wire format, one open() per message
    ["--protocol", "1"],
    ["--threads", "2"],  # two threads, each with its own default scope
    ["--threads", "2"],
    ["--labels", json.dumps({"version": "3"})],  # a label key the resync rule must survive
]
#: The worker whose threads hostile requests name.
THREADED = 2


@dataclass
class Hung:
    """A worker that arms a timer and hangs: the daemon must reap it.

    Attributes:
        deadline: the earliest its deadline can be (so lateness is never understated).
        warned: its arm could not be delivered at once; its client re-sent it later.
    """

    child: Child
    fault: str
    phase: str = ""
    deadline: float = float("nan")
    warned: bool = False

    @property
    def reaped(self) -> bool:
        """Killed with SIGKILL, and not by the harness."""
        return self.child.status == -9 and not self.child.planned


class Fleet:
    """Starts and stops the workers, and keeps what they reported.

    Args:
        watch: starts the processes and records their deaths.
        daemon: the daemon they talk to (its FIFO, its state file).
        log: where the workers' stderr goes.
    """

    def __init__(self, watch: DeathWatch, daemon: Daemon, log: IO[bytes]) -> None:
        self._watch = watch
        self._daemon = daemon
        self._log = log
        self.healthy: List[Child] = []
        self.canaries: List[Child] = []
        self.hung: List[Hung] = []
        self.quiet: List[Tuple[str, Child]] = []  # (the fault right after its disarm, it)
        self._spare: Optional[Child] = None  # the next quiet worker, started ahead
        self.quiet_latest = 0.0  # the latest deadline any quiet worker's timer had
        self.summaries: List[Dict[str, Any]] = []

    def start(self) -> None:
        """Start the canaries and the healthy workers, and wait until they run."""
        fifo = self._daemon.fifo
        self.canaries = [self._spawn("canary", "4"), self._spawn("canary", "0")]
        variants = VARIANTS + [[]] * (HEALTHY - len(VARIANTS))
        self.healthy = [self._spawn("healthy", fifo, *v) for v in variants]
        for child in self.canaries + self.healthy:
            expect_line(child, "ready", timeout=60.0)
        self._spare = self._spawn("quiet", fifo)

    @property
    def threaded(self) -> Child:
        """A healthy worker with several threads."""
        return self.healthy[THREADED]

    def spawn_hung(self, fault: str, n: int) -> List[Hung]:
        """Start ``n`` hung workers and wait until each is ready to arm."""
        hung = [Hung(self._spawn("hung", self._daemon.fifo), fault) for _ in range(n)]
        for h in hung:
            expect_line(h.child, "ready", timeout=60.0)
        self.hung += hung
        return hung

    @staticmethod
    def arm(hung: Sequence[Hung], afters: Sequence[float], phase: str) -> None:
        """Tell each of ``hung`` to arm for its ``after`` (without waiting for it)."""
        for h, after in zip(hung, afters):
            h.phase = phase
            h.child.tell(repr(after))

    @staticmethod
    def collect(hung: Sequence[Hung]) -> None:
        """Read each worker's ``armed`` line: its deadline, and whether the arm waited."""
        for h in hung:
            _, earliest, warned = expect_line(h.child, "armed", timeout=30.0).split()
            h.deadline = float(earliest)
            h.warned = warned != "0"

    def await_reaps(self, hung: Sequence[Hung], grace: float = 5.0) -> None:
        """Wait on the pidfds until every one of ``hung`` is dead, or ``grace`` seconds
        past the last deadline (the end of the run reports the ones never reaped)."""
        last = max(h.deadline for h in hung)
        self._watch.wait_dead([h.child for h in hung], max(0.0, last - time.monotonic()) + grace)

    def quiet_step(self, fault: str, after: float) -> AbstractSet[int]:
        """A new quiet worker arms for ``after`` seconds, its timer reaches the state
        file, it disarms, and from then on writes nothing: ``fault`` comes next.

        Returns the pids (the quiet worker's, armed hung workers') whose timers did not
        reach the state file in time."""
        quiet = self._spare
        assert quiet is not None
        expect_line(quiet, "ready", timeout=60.0)
        self._spare = self._spawn("quiet", self._daemon.fifo)  # ready by its turn
        self.quiet.append((fault, quiet))
        quiet.tell(f"arm {after!r}")
        latest = float(expect_line(quiet, "armed", timeout=30.0).split()[1])
        self.quiet_latest = max(self.quiet_latest, latest)
        missing = self._daemon.await_saved({quiet.pid} | self.armed_hung())
        quiet.tell("disarm")
        expect_line(quiet, "disarmed", timeout=30.0)
        return missing

    def armed_hung(self) -> Set[int]:
        """Pids of the hung workers armed and not reaped yet."""
        return {h.child.pid for h in self.hung if h.child.alive and h.phase}

    def stop_healthy(self) -> None:
        """Close the healthy workers' stdin (they finish their block and exit 0)."""
        for child in self.healthy:
            child.close_stdin()
        self._watch.wait_dead(self.healthy, 30.0)

    def stop_quiet(self) -> None:
        """Close the quiet workers' stdin (they exit 0)."""
        for child in self.quiet_workers():
            child.close_stdin()
        self._watch.wait_dead(self.quiet_workers(), 30.0)

    def read_summaries(self) -> None:
        """Keep the last JSON summary each worker printed (a killed one's too)."""
        for child in self.healthy + self.quiet_workers():
            last = None
            while (line := child.read_line(5.0)) is not None:
                if line.startswith("{"):
                    last = json.loads(line)
            if last is not None:
                self.summaries.append(last)

    def quiet_workers(self) -> List[Child]:
        """Every quiet worker, the spare one included."""
        spare = [] if self._spare is None else [self._spare]
        return [c for _, c in self.quiet] + spare

    def end_canaries(self) -> None:
        """End the canaries (the harness's doing)."""
        for child in self.canaries:
            if child.alive:
                child.end()

    def _spawn(self, role: str, *args: str) -> Child:
        argv = [sys.executable, WORKERS, role, *args]
        return self._watch.spawn(role, argv, stdin=True, stdout=True, stderr=self._log)


def expect_line(child: Child, word: str, timeout: float) -> str:
    """The next line from ``child``, which must start with ``word``.

    Raises:
        RuntimeError: it printed something else, nothing in time, or exited.
    """
    line = child.read_line(timeout)
    if line is None or not line.startswith(word):
        raise RuntimeError(f"{child.role} pid {child.pid}: expected {word!r}, got {line!r}")
    return line
