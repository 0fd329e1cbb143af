"""torch 2.13's timer client against ftimer's server, and ftimer's client against torch's.

Each test runs real processes: a server, a worker that hangs inside ``expires(...)`` and
one that finishes its blocks in time and then outlives their deadlines. The stuck one
must be reaped with the signal it asked for, the other left alone, with torch's default
(call-site) scope and with an explicit one.
"""

from __future__ import annotations

import json
import pathlib
import signal
from types import ModuleType
from typing import Any, Dict, List, Optional, Tuple

import pytest

from ._harness import WORKERS, FtimerDaemon, Process, Processes

pytestmark = pytest.mark.interop

WORKER = WORKERS / "timer_worker.py"
TORCH_SERVER = WORKERS / "torch_server.py"

# (scope, signal): None is the default, torch's call-site scope and SIGKILL.
CASES = [
    pytest.param(None, None, id="default-scope-SIGKILL"),
    pytest.param("step", signal.SIGTERM, id="explicit-scope-SIGTERM"),
]


def worker_options(scope: Optional[str], sig: Optional[int]) -> List[str]:
    options = [] if scope is None else ["--scope", scope]
    return options if sig is None else [*options, "--signal", str(sig)]


def pid_of(worker: Process) -> int:
    """The pid a worker printed once its first timer was armed."""
    out = worker.wait_output("armed ", timeout=60)
    return int(out.split("armed ", 1)[1].split()[0])


def run_pair(
    processes: Processes, argv: List[str], stuck_after: float, on_time_after: float
) -> Tuple[Process, int, int]:
    """Start an on-time worker, then (once it is armed) a stuck one; wait for both.

    The stuck timer is the longer one, so the on-time worker is done before any reap:
    torch's server takes its own process down with its first reap.

    Returns:
        The stuck worker and the pids of the stuck and on-time workers.
    """
    on_time = processes.python(
        "on-time", WORKER, *argv[:2], "on-time", str(on_time_after), *argv[2:]
    )
    on_time_pid = pid_of(on_time)
    stuck = processes.python("stuck", WORKER, *argv[:2], "stuck", str(stuck_after), *argv[2:])
    stuck_pid = pid_of(stuck)
    assert on_time.wait(60) == 0, on_time.output()
    assert "done" in on_time.output()
    return stuck, stuck_pid, on_time_pid


def torch_default_scope(torch_timer: ModuleType) -> str:
    """The scope torch 2.13's ``expires`` picks when given none.

    It reads ``inspect.stack()[1]`` from inside a ``@contextmanager`` generator, which is
    contextlib's ``__enter__``, not the caller: every default-scope timer of a process
    gets the same scope, whatever the call site.
    """
    scopes: List[str] = []

    class Recorder:
        def acquire(self, scope_id: str, expiration_time: float) -> None:
            scopes.append(scope_id)

        def release(self, scope_id: str) -> None:
            pass

    with torch_timer.expires(after=1, client=Recorder()):
        pass
    return scopes[0]


def marked_line(marker: str) -> int:
    """The line of the worker that holds ``marker``."""
    lines = WORKER.read_text().splitlines()
    return next(n for n, line in enumerate(lines, 1) if marker in line)


@pytest.mark.parametrize(("scope", "sig"), CASES)
def test_torch_client_against_ftimer_server(
    processes: Processes,
    tmp_path: pathlib.Path,
    torch_timer: ModuleType,
    scope: Optional[str],
    sig: Optional[int],
) -> None:
    daemon = FtimerDaemon(processes, tmp_path / "timer.fifo")
    argv = ["torch", str(daemon.fifo), *worker_options(scope, sig)]
    stuck, stuck_pid, on_time_pid = run_pair(processes, argv, stuck_after=1.5, on_time_after=1.0)

    expected_signal = sig or signal.SIGKILL
    assert stuck.wait(30) == -expected_signal
    reaped = daemon.wait_event("reaped", stuck_pid, timeout=10)
    assert reaped["signal"] == expected_signal
    assert reaped["delivered"] is True
    assert reaped["scope_id"] == (scope or torch_default_scope(torch_timer))
    # The server saw the on-time worker's timers, and it outlived them all untouched.
    assert on_time_pid in {e["pid"] for e in daemon.events("armed")}
    assert on_time_pid not in {e["pid"] for e in daemon.events("expired")}
    assert [e["pid"] for e in daemon.events("reaped")] == [stuck_pid]


@pytest.mark.parametrize(("scope", "sig"), CASES)
def test_ftimer_client_v1_against_torch_server(
    processes: Processes,
    tmp_path: pathlib.Path,
    torch_timer: ModuleType,
    scope: Optional[str],
    sig: Optional[int],
) -> None:
    fifo = tmp_path / "torch.fifo"
    server = processes.python("torch-server", TORCH_SERVER, str(fifo))
    server.wait_output("ready", timeout=60)
    argv = ["ftimer", str(fifo), *worker_options(scope, sig), "--protocol", "1"]
    stuck, stuck_pid, on_time_pid = run_pair(processes, argv, stuck_after=3.0, on_time_after=1.0)

    expected_signal = sig or signal.SIGKILL
    assert stuck.wait(30) == -expected_signal
    # torch 2.13 then signals its own process with the same signal.
    assert server.wait(30) == -expected_signal
    events = torch_events(server)
    killed = [e["request"] for e in events if e["name"] == "kill worker process"]
    expected_scope = scope or f"{WORKER}#{marked_line('# the stuck scope')}"
    assert killed == [
        {
            "version": 1,
            "pid": stuck_pid,
            "scope_id": expected_scope,
            "expiration_time": killed[0]["expiration_time"],
            "signal": expected_signal,
        }
    ]
    expired = [e["request"]["pid"] for e in events if e["name"] == "timer expired"]
    assert on_time_pid not in expired
    assert expired == [stuck_pid]


def torch_events(server: Process) -> List[Dict[str, Any]]:
    """The ``log_event`` calls torch's server made, as printed by torch_server.py."""
    lines = server.output().splitlines()
    return [json.loads(line) for line in lines if line.startswith('{"name"')]
