"""A real torchrun job recovers from a hung rank with ftimer, and dies with torch's timer.

Two torchrun agents on this host, joined by c10d rendezvous on 127.0.0.1 as two nodes
would be, run two gloo workers each (workers/elastic_job.py) with ``--max-restarts 1``.
In the first attempt rank 1 hangs inside a collective under ``expires(after=2)``.

- With an ``ftimer-server`` daemon on the host and ``TORCHELASTIC_TIMER_FILE`` pointing
  at its FIFO, ftimer reaps rank 1, the agents restart the worker group and the second
  attempt completes: the job exits 0.
- With torch's built-in timer (``TORCHELASTIC_ENABLE_FILE_TIMER=1``) the agent's own
  ``FileTimerServer`` reaps rank 1 and then SIGKILLs the agent itself: the job dies
  without a restart.
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import sys
import time
import uuid
from typing import Any, Dict, List, Sequence, Tuple

import pytest

from ._harness import WORKERS, FtimerDaemon, Process, Processes, free_port

pytestmark = pytest.mark.interop

JOB = WORKERS / "elastic_job.py"
TORCHRUN = (sys.executable, "-m", "torch.distributed.run")
#: torchrun with ftimer's server embedded in each agent.
FTIMER_AGENT = (sys.executable, str(WORKERS / "ftimer_agent.py"))
HUNG_RANK = 1
WORLD = 4
HANG_AFTER = 2.0
#: Bounds every wait on the job; a run takes 10-20 s on a 2-core machine.
JOB_TIMEOUT = 90


def job_env(tmp_path: pathlib.Path, **extra: str) -> Dict[str, str]:
    """This environment without any TorchElastic setting of its own, with temporary files
    under ``tmp_path``, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TORCHELASTIC_")}
    # Loopback only, one thread per worker on a small machine.
    env.update(GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    # torch's log directories, and the FIFOs torch's killed agents leave behind, go here.
    (tmp_path / "tmp").mkdir()
    env["TMPDIR"] = str(tmp_path / "tmp")
    env.update(extra)
    return env


def start_job(  # noqa: PLR0917 - the tests name what they change
    processes: Processes,
    records: pathlib.Path,
    client: str,
    env: Dict[str, str],
    torchrun: Sequence[str] = TORCHRUN,
    hang_attempts: int = 1,
) -> List[Process]:
    """Start the two agents of the job.

    The first hosts the rendezvous store and is node 0 (so ranks 0 and 1 are its
    workers): torch ranks nodes by their address, then pid, and "127.0.0.1" sorts before
    "localhost". Both name this host; only node 0's address is ever connected to.
    """
    records.mkdir()
    port = free_port()
    run_id = f"ftimer-interop-{uuid.uuid4().hex[:8]}"
    agents = []
    for node, (is_host, address) in enumerate(((1, "127.0.0.1"), (0, "localhost"))):
        argv = [
            *torchrun,
            "--nnodes=2",
            "--nproc-per-node=2",
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint=127.0.0.1:{port}",
            f"--rdzv-id={run_id}",
            f"--rdzv-conf=is_host={is_host},join_timeout=30",
            f"--local-addr={address}",
            "--max-restarts=1",
            "--monitor-interval=0.1",
            str(JOB),
            f"--client={client}",
            f"--out={records}",
            f"--hang-after={HANG_AFTER}",
            f"--hang-attempts={hang_attempts}",
        ]
        agents.append(processes.start(f"agent-{node}", argv, env=env))
    return agents


def read_records(records: pathlib.Path) -> Dict[str, Dict[str, Any]]:
    """What the workers recorded, by name (``a{attempt}-r{rank}-{start,done}``)."""
    return {p.stem: json.loads(p.read_text()) for p in records.glob("*.json")}


def wait_all(agents: List[Process]) -> Tuple[int, ...]:
    deadline = time.monotonic() + JOB_TIMEOUT
    return tuple(a.wait(max(1.0, deadline - time.monotonic())) for a in agents)


def check_recovery(
    records: pathlib.Path, reaped: List[Dict[str, Any]], started: float, finished: float
) -> None:
    """Check that ftimer reaped only the hung rank and the restarted attempt completed."""
    done = read_records(records)
    hung = done[f"a0-r{HUNG_RANK}-start"]
    # Exactly the hung rank, with SIGKILL (the client's default), once its 2 s had passed.
    assert [(e["pid"], e["signal"], e["delivered"]) for e in reaped] == [
        (hung["pid"], signal.SIGKILL, True)
    ]
    # ftimer's client labels timers with torchrun's ranks and run id (the job).
    labels = reaped[0]["labels"]
    assert labels.pop("job").startswith("ftimer-interop-")
    assert labels == {"rank": str(HUNG_RANK), "local_rank": str(HUNG_RANK % 2)}
    assert reaped[0]["scope_id"].startswith(f"{JOB}#")
    # The first attempt finished on no rank; the restart, on every rank, with new pids.
    assert [name for name in done if name.startswith("a0-") and name.endswith("-done")] == []
    for rank in range(WORLD):
        assert done[f"a1-r{rank}-done"]["sum"] == float(WORLD)
        assert done[f"a1-r{rank}-start"]["pid"] != done[f"a0-r{rank}-start"]["pid"]
    # Shown with `pytest -s`: the figures quoted in docs/torchelastic.md.
    reap = hung["time"] + HANG_AFTER + reaped[0]["late"]
    restarted = max(done[f"a1-r{r}-done"]["time"] for r in range(WORLD))
    print(
        f"\njob {finished - started:.1f} s: rank {HUNG_RANK} hung at "
        f"+{hung['time'] - started:.1f} s, reaped at +{reap - started:.1f} s "
        f"({reaped[0]['late'] * 1000:.1f} ms late), restarted group done at "
        f"+{restarted - started:.1f} s"
    )


def test_torchrun_job_recovers_from_a_hung_rank_with_the_ftimer_daemon(
    processes: Processes, tmp_path: pathlib.Path, torch_timer: Any
) -> None:
    daemon = FtimerDaemon(processes, tmp_path / "timer.fifo")
    records = tmp_path / "records"
    started = time.time()
    env = job_env(tmp_path, TORCHELASTIC_TIMER_FILE=str(daemon.fifo))
    agents = start_job(processes, records, "ftimer", env)
    statuses = wait_all(agents)
    assert statuses == (0, 0), "\n".join(a.output()[-3000:] for a in agents)
    check_recovery(records, daemon.events("reaped"), started, time.time())


def test_torchrun_job_recovers_with_ftimer_embedded_in_the_agents(
    processes: Processes, tmp_path: pathlib.Path, torch_timer: Any
) -> None:
    records = tmp_path / "records"
    started = time.time()
    agents = start_job(processes, records, "ftimer", job_env(tmp_path), torchrun=FTIMER_AGENT)
    statuses = wait_all(agents)
    assert statuses == (0, 0), "\n".join(a.output()[-3000:] for a in agents)
    check_recovery(records, reaps_printed_by(agents), started, time.time())


def reaps_printed_by(agents: List[Process]) -> List[Dict[str, Any]]:
    """The ``Reaped`` events the embedded servers printed (workers/ftimer_agent.py)."""
    prefix = "ftimer reaped: "
    return [
        json.loads(line[len(prefix) :])
        for agent in agents
        for line in agent.output().splitlines()
        if line.startswith(prefix)
    ]


def test_a_job_that_never_recovers_fails_as_torchrun_says_with_ftimer_in_the_agents(
    processes: Processes, tmp_path: pathlib.Path, torch_timer: Any
) -> None:
    # The example agent of docs/torchelastic.md (workers/ftimer_agent.py, verbatim): rank
    # 1 hangs in both attempts, so the agents stop the workers twice and give up. Each
    # attempt had a server of its own; the agent's last _shutdown finds its directory
    # gone and must not fail on it (FileNotFoundError from os.rmdir, once).
    records = tmp_path / "records"
    env = job_env(tmp_path)
    agents = start_job(processes, records, "ftimer", env, torchrun=FTIMER_AGENT, hang_attempts=2)
    statuses = wait_all(agents)
    output = "\n".join(a.output() for a in agents)
    assert 0 not in statuses, output[-3000:]
    assert "ChildFailedError" in output, output[-3000:]
    assert "FileNotFoundError" not in output, output[-3000:]
    done = read_records(records)
    hung = [done[f"a{attempt}-r{HUNG_RANK}-start"]["pid"] for attempt in (0, 1)]
    assert sorted(e["pid"] for e in reaps_printed_by(agents)) == sorted(hung)
    # Every server's FIFO and directory is gone with it.
    assert list((tmp_path / "tmp").glob("ftimer-agent-*")) == []


def test_torchs_builtin_timer_kills_the_agent_and_the_job(
    processes: Processes, tmp_path: pathlib.Path, torch_timer: Any
) -> None:
    records = tmp_path / "records"
    # Each agent runs torch's FileTimerServer on a FIFO of its own; INFO shows its reaps.
    started = time.time()
    env = job_env(tmp_path, TORCHELASTIC_ENABLE_FILE_TIMER="1", LOGLEVEL="INFO")
    agents = start_job(processes, records, "torch", env)
    agent_pids = [a.command_pid() for a in agents]
    first = agents[0].wait(JOB_TIMEOUT)
    killed = time.time()
    statuses = (first, *wait_all(agents[1:]))
    finished = time.time()

    done = read_records(records)
    hung = done[f"a0-r{HUNG_RANK}-start"]
    assert hung["agent_pid"] == agent_pids[0]
    # After reaping rank 1, torch 2.13's server SIGKILLs its own process: the agent.
    # The other agent cannot go on without it: the job fails, never restarted.
    log = agents[0].output()
    assert f"Successfully reaped worker=[{hung['pid']}] with signal=9" in log
    assert f"Terminating the server process=[{agent_pids[0]}]" in log
    assert statuses[0] == -signal.SIGKILL
    assert statuses[1] not in (0, -signal.SIGKILL)
    assert sorted(done) == sorted(f"a0-r{rank}-start" for rank in range(WORLD))
    print(
        f"\njob failed after {finished - started:.1f} s: rank {HUNG_RANK} hung at "
        f"+{hung['time'] - started:.1f} s, its agent killed at +{killed - started:.1f} s"
    )
