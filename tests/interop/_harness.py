"""Processes for the interop tests: started under a subreaper, waited on, always ended.

Every process a test starts goes through ``Processes.start``: it runs under
``workers/subreaper.py`` in a session of its own, with its output in a log file. On
teardown each one still running gets SIGTERM (the subreaper then SIGKILLs everything it
caused, orphans included) and, if it is still there after a bounded wait, SIGKILL to its
whole session. Nothing else is ever signalled.
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
from typing import Any, Dict, List, Optional, Sequence

from tests.conftest import wait_until

HERE = pathlib.Path(__file__).parent
WORKERS = HERE / "workers"
SUBREAPER = WORKERS / "subreaper.py"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Process:
    """One started command: its ``Popen`` (the subreaper's) and its log file."""

    def __init__(self, name: str, popen: subprocess.Popen[bytes], log: pathlib.Path) -> None:
        self.name = name
        self.popen = popen
        self.log = log

    def output(self) -> str:
        """Everything the command printed so far (stdout and stderr)."""
        return self.log.read_text(errors="replace")

    def command_pid(self) -> int:
        """The pid of the command itself (the subreaper's child)."""
        out = self.wait_output("[subreaper] pid ", timeout=30)
        return int(out.split("[subreaper] pid ", 1)[1].split(":", 1)[0])

    def wait(self, timeout: float) -> int:
        """Wait for the command to end and return its status (-N: killed by signal N).

        Raises:
            AssertionError: it is still running after ``timeout`` seconds.
        """
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"{self.name} still running after {timeout} s; output:\n{self.output()[-4000:]}"
            ) from None

    def wait_output(self, text: str, timeout: float) -> str:
        """Wait until the output contains ``text``; return the output.

        Raises:
            AssertionError: not within ``timeout`` seconds, or the command ended first.
        """

        def seen() -> Optional[str]:
            out = self.output()
            if text in out:
                return out
            if self.popen.poll() is not None:
                raise AssertionError(
                    f"{self.name} exited ({self.popen.returncode}) before printing {text!r}:"
                    f"\n{out[-4000:]}"
                )
            return None

        return wait_until(seen, timeout, f"{text!r} from {self.name}")


class Processes:
    """Starts commands under the subreaper and ends them all on ``close()``."""

    def __init__(self, log_dir: pathlib.Path) -> None:
        self._log_dir = log_dir
        self._started: List[Process] = []

    def start(
        self, name: str, argv: Sequence[str], env: Optional[Dict[str, str]] = None
    ) -> Process:
        """Start ``argv`` (its output in ``<log_dir>/<name>.log``) and return it."""
        log = self._log_dir / f"{name}.log"
        with open(log, "wb") as out:
            popen = subprocess.Popen(
                [sys.executable, str(SUBREAPER), *argv],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        process = Process(name, popen, log)
        self._started.append(process)
        return process

    def python(
        self, name: str, script: pathlib.Path, *args: str, env: Optional[Dict[str, str]] = None
    ) -> Process:
        """Start ``script`` with this interpreter, unbuffered."""
        return self.start(name, [sys.executable, "-u", str(script), *args], env=env)

    def close(self) -> None:
        """End every command still running, and everything it started."""
        for process in self._started:
            if process.popen.poll() is None:
                process.popen.send_signal(signal.SIGTERM)
        for process in self._started:
            try:
                process.popen.wait(10)
            except subprocess.TimeoutExpired:
                # The subreaper is stuck: its session holds it and whatever it started.
                os.killpg(process.popen.pid, signal.SIGKILL)
                process.popen.wait(10)


class FtimerDaemon:
    """``ftimer-server run`` on a FIFO, logging every event as a JSON line; reads them back."""

    def __init__(self, processes: Processes, fifo: pathlib.Path, *args: str) -> None:
        self.fifo = fifo
        self.process = processes.start(
            "ftimer-server",
            [
                sys.executable,
                "-m",
                "ftimer_server",
                "run",
                "--fifo",
                str(fifo),
                "--log-format",
                "json",
                "--log-level",
                "debug",
                *args,
            ],
        )
        self.process.wait_output(" ready: ", timeout=30)

    def events(self, kind: Optional[str] = None) -> List[Dict[str, Any]]:
        """The events logged so far, in order; only those named ``kind`` if given."""
        found = []
        for line in self.process.output().splitlines():
            if not line.startswith("{"):
                continue
            record = json.loads(line)
            if "event" in record and kind in (None, record["event"]):
                found.append(record)
        return found

    def wait_event(self, kind: str, pid: int, timeout: float) -> Dict[str, Any]:
        """Wait for event ``kind`` about ``pid`` and return it.

        Raises:
            AssertionError: none within ``timeout`` seconds.
        """

        def find() -> Optional[Dict[str, Any]]:
            return next((e for e in self.events(kind) if e["pid"] == pid), None)

        return wait_until(find, timeout, f"a {kind!r} event for pid {pid}")
