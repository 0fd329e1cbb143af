"""The processes the chaos harness starts, and the moment each one dies.

Every child gets a pidfd as soon as it is started. One thread waits in epoll on all of
them and stamps a child's death with the monotonic clock the moment its pidfd becomes
readable: no polling, no ``Popen.wait(timeout=...)`` loops. Signals to a child go through
its pidfd too, so a pid reused after the child died is never signalled.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import IO, Dict, List, Optional

__all__ = ["Child", "DeathWatch", "thread_ids"]


class Child:
    """One process the harness started.

    Attributes:
        role: what it plays in the run (``daemon``, ``healthy``, ``hung``, ...).
        popen: its ``Popen``; stdin and stdout are unbuffered pipes when asked for.
        pidfd: a pidfd for exactly this process, open until `DeathWatch.close`.
        died: monotonic time at which its pidfd became readable, or None while alive.
        status: its exit status once dead (negative: killed by that signal).
        planned: the harness ended it on purpose.
    """

    def __init__(self, role: str, popen: subprocess.Popen[bytes]) -> None:
        self.role = role
        self.popen = popen
        self.pidfd = os.pidfd_open(popen.pid)
        self.died: Optional[float] = None
        self.status: Optional[int] = None
        self.planned = False
        self._out = bytearray()

    @property
    def pid(self) -> int:
        """The process id."""
        return self.popen.pid

    @property
    def alive(self) -> bool:
        """True until its death has been seen."""
        return self.died is None

    def send_signal(self, signum: int) -> bool:
        """Send ``signum`` through the pidfd; False if the process is already gone."""
        try:
            signal.pidfd_send_signal(self.pidfd, signum)
        except ProcessLookupError:
            return False
        return True

    def end(self, signum: int = signal.SIGKILL) -> None:
        """End it on purpose (the harness's own doing, not a fault of the daemon)."""
        self.planned = True
        self.send_signal(signum)

    def tell(self, line: str) -> None:
        """Write ``line`` and a newline to its stdin."""
        stdin = self.popen.stdin
        assert stdin is not None
        stdin.write(line.encode() + b"\n")

    def close_stdin(self) -> None:
        """Close its stdin: the signal for workers to finish."""
        stdin = self.popen.stdin
        if stdin is not None and not stdin.closed:
            with contextlib.suppress(BrokenPipeError):
                stdin.close()

    def read_line(self, timeout: float) -> Optional[str]:
        """The next line of its stdout, waiting at most ``timeout`` seconds.

        Returns None when the time is up or the process closed its stdout first.
        """
        stdout = self.popen.stdout
        assert stdout is not None
        deadline = time.monotonic() + timeout
        while b"\n" not in self._out:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([stdout], [], [], left)[0]:
                return None
            chunk = os.read(stdout.fileno(), 65536)
            if not chunk:
                return None
            self._out += chunk
        line, _, rest = bytes(self._out).partition(b"\n")
        self._out[:] = rest
        return line.decode(errors="replace")


class DeathWatch:
    """Starts children and records when each one dies, from one epoll thread."""

    def __init__(self) -> None:
        self.children: List[Child] = []
        self._epoll = select.epoll()
        self._wake_r, self._wake_w = os.pipe()
        self._epoll.register(self._wake_r, select.EPOLLIN)
        self._by_fd: Dict[int, Child] = {}
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="death-watch", daemon=True)
        self._thread.start()

    def spawn(
        self,
        role: str,
        argv: Sequence[str],
        *,
        stdin: bool = False,
        stdout: bool = False,
        stderr: Optional[IO[bytes]] = None,
        env: Optional[Mapping[str, str]] = None,
    ) -> Child:
        """Start ``argv`` and watch it. ``stdin``/``stdout``: give it unbuffered pipes."""
        popen = subprocess.Popen(
            list(argv),
            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
            stdout=subprocess.PIPE if stdout else subprocess.DEVNULL,
            stderr=stderr if stderr is not None else subprocess.DEVNULL,
            env=None if env is None else dict(env),
            bufsize=0,
        )
        child = Child(role, popen)
        with self._cond:
            self.children.append(child)
            self._by_fd[child.pidfd] = child
        self._epoll.register(child.pidfd, select.EPOLLIN)
        return child

    def wait_dead(self, children: Iterable[Child], timeout: float) -> bool:
        """Block until every one of ``children`` has died; False if ``timeout`` came first."""
        group = list(children)
        with self._cond:
            return self._cond.wait_for(lambda: all(not c.alive for c in group), timeout)

    def _run(self) -> None:
        while True:
            events = self._epoll.poll()
            now = time.monotonic()
            for fd, _ in events:
                if fd == self._wake_r:
                    return
                self._epoll.unregister(fd)
                with self._cond:
                    child = self._by_fd.pop(fd)
                child.popen.wait()  # its pidfd is readable: it is dead, this does not block
                with self._cond:
                    child.died = now
                    child.status = child.popen.returncode
                    self._cond.notify_all()

    def close(self) -> None:
        """Kill every child still alive, collect them, stop the thread, close descriptors."""
        for child in self.children:
            if child.alive:
                child.end()
        self.wait_dead(self.children, timeout=30.0)
        os.write(self._wake_w, b"x")
        self._thread.join()
        for child in self.children:
            child.close_stdin()
            if child.popen.stdout is not None:
                child.popen.stdout.close()
            os.close(child.pidfd)
        self._epoll.close()
        os.close(self._wake_r)
        os.close(self._wake_w)


def thread_ids(pid: int) -> List[int]:
    """The ids of the threads of process ``pid`` other than its leader (empty if gone)."""
    try:
        return sorted(int(t) for t in os.listdir(f"/proc/{pid}/task") if int(t) != pid)
    except FileNotFoundError:
        return []
