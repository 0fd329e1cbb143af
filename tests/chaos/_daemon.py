"""The daemon under test: ``python -m ftimer_server run`` with a state file, started,
killed, stopped and restarted by the harness.

Readiness is what systemd would see: the harness owns the ``NOTIFY_SOCKET`` and waits for
the daemon's ``READY=1``. Counters come from the control socket (what ``ftimer-server
status --json`` prints); one whose ``caught_up`` is true proves the daemon's reader loop
has read everything written before, because a sync marker went through its FIFO.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import socket
import sys
import time
from typing import IO, AbstractSet, Any, Dict, Optional

from _procs import Child, DeathWatch

__all__ = ["Daemon", "DaemonDied"]


class DaemonDied(RuntimeError):
    """The daemon exited when it should have been running."""


class Daemon:
    """One daemon at a time on a fixed FIFO, control socket and state file.

    Args:
        workdir: a private directory for the FIFO, sockets, state file and log.
        watch: starts the daemon processes and records their deaths.
    """

    def __init__(self, workdir: str, watch: DeathWatch) -> None:
        self.fifo = os.path.join(workdir, "timer.fifo")
        self.control = os.path.join(workdir, "control.sock")
        self.state_file = os.path.join(workdir, "state", "timers.json")
        self.log_path = os.path.join(workdir, "daemon.log")
        self._watch = watch
        self._notify_path = os.path.join(workdir, "notify.sock")
        self._notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._notify.bind(self._notify_path)
        self._log: IO[bytes] = open(self.log_path, "ab")  # noqa: SIM115 - closed in close()
        self.child: Optional[Child] = None

    @property
    def pid(self) -> int:
        """The current daemon's pid."""
        assert self.child is not None
        return self.child.pid

    def start(self, timeout: float = 30.0) -> float:
        """Start a daemon and wait for its ``READY=1``; return the monotonic time of it.

        Raises:
            DaemonDied: it exited (or said nothing) before it was ready.
        """
        argv = [sys.executable, "-m", "ftimer_server", "run", "--fifo", self.fifo]
        argv += ["--control-socket", self.control, "--state-file", self.state_file]
        argv += ["--log-format", "json", "--log-file", self.log_path]
        argv += ["--allow-uid", str(os.getuid())]
        env = dict(os.environ, NOTIFY_SOCKET=self._notify_path)
        self._log.write(
            f"--- chaos harness: starting a daemon at {time.monotonic():.3f}\n".encode()
        )
        self._log.flush()
        child = self._watch.spawn("daemon", argv, stderr=self._log, env=env)
        self.child = child
        return self._wait_ready(child, timeout)

    def _wait_ready(self, child: Child, timeout: float) -> float:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            ready, _, _ = select.select([self._notify.fileno(), child.pidfd], [], [], max(left, 0))
            if self._notify.fileno() in ready:
                fields = dict(
                    line.split("=", 1)
                    for line in self._notify.recv(4096).decode().splitlines()
                    if "=" in line
                )
                if fields.get("READY") == "1" and fields.get("MAINPID") == str(child.pid):
                    return time.monotonic()
            elif ready:
                raise DaemonDied(f"the daemon exited during start-up; see {self.log_path}")
            elif left <= 0:
                raise DaemonDied(f"no READY=1 from the daemon in {timeout} s")

    def status(self, timeout: float = 10.0) -> Dict[str, Any]:
        """The daemon's status document (``ftimer-server status --json``).

        Raises:
            DaemonDied: nothing answers on the control socket.
            OSError: the request failed or timed out.
        """
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            try:
                sock.connect(self.control)
            except (FileNotFoundError, ConnectionRefusedError):
                raise DaemonDied("no daemon answers on the control socket") from None
            sock.sendall(b"status\n")
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        doc: Dict[str, Any] = json.loads(b"".join(chunks))
        return doc

    def wait_healthy(self, timeout: float) -> float:
        """Ask for the status until the daemon's reader has caught up with everything
        written before; return the monotonic time it had.

        Raises:
            DaemonDied: the daemon is gone, or not healthy within ``timeout``.
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.status()["caught_up"]:
                return time.monotonic()
        raise DaemonDied(f"the daemon's reader did not catch up in {timeout} s")

    def await_saved(self, pids: AbstractSet[int], timeout: float = 10.0) -> AbstractSet[int]:
        """Wait until the state file holds a timer of each of ``pids`` (the daemon saves
        within 100 ms of a change); return those still missing after ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                with open(self.state_file, "rb") as f:
                    saved = {t["pid"] for t in json.loads(f.read())["timers"]}
            except (OSError, ValueError):
                saved = set()
            missing = pids - saved
            if not missing or time.monotonic() > deadline:
                return missing
            time.sleep(0.01)

    def kill(self) -> float:
        """``kill -9`` the daemon; return when it died."""
        child = self._current()
        child.end(signal.SIGKILL)
        return self._await_death(child)

    def terminate(self) -> float:
        """SIGTERM: the daemon saves its state and exits; return when it was sent.

        Raises:
            DaemonDied: it did not exit 0 within 30 s.
        """
        child = self._current()
        sent = time.monotonic()
        child.end(signal.SIGTERM)
        self._await_death(child)
        if child.status != 0:
            raise DaemonDied(f"SIGTERM: the daemon exited with status {child.status}")
        return sent

    def pause(self) -> float:
        """SIGSTOP the daemon; return when."""
        self._current().send_signal(signal.SIGSTOP)
        return time.monotonic()

    def resume(self) -> float:
        """SIGCONT the daemon; return when."""
        self._current().send_signal(signal.SIGCONT)
        return time.monotonic()

    def unplanned_exit(self) -> Optional[int]:
        """The exit status of a daemon that died without the harness asking, once."""
        child = self.child
        if child is None or child.alive or child.planned:
            return None
        child.planned = True  # reported once
        return child.status

    def close(self) -> None:
        """Stop the daemon still running (SIGTERM) and release the harness's sockets."""
        if self.child is not None and self.child.alive:
            with contextlib.suppress(DaemonDied):
                self.terminate()
        self._notify.close()
        os.unlink(self._notify_path)
        self._log.close()

    def log_tail(self, lines: int = 20) -> str:
        """The last lines of the daemon's log, for a failure message."""
        with open(self.log_path, "rb") as f:
            return b"".join(f.readlines()[-lines:]).decode(errors="replace")

    def _current(self) -> Child:
        child = self.child
        if child is None or not child.alive:
            raise DaemonDied("the daemon is not running")
        return child

    def _await_death(self, child: Child) -> float:
        if not self._watch.wait_dead([child], timeout=30.0):
            raise DaemonDied(f"the daemon (pid {child.pid}) did not die within 30 s")
        assert child.died is not None
        return child.died
