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

import datetime
import json
import os
import pathlib
import signal
import sys
import time
import uuid
from typing import Any, Dict, List, Tuple

import pytest

from ._harness import WORKERS, FtimerDaemon, Process, Processes, free_port

pytestmark = pytest.mark.interop

JOB = WORKERS / "elastic_job.py"
HUNG_RANK = 1
WORLD = 4
HANG_AFTER = 2.0
#: Bounds every wait on the job; a run takes about 10-20 s on a 2-core machine.
JOB_TIMEOUT = 90


def job_env(**extra: str) -> Dict[str, str]:
    """This environment without any TorchElastic setting of its own, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TORCHELASTIC_")}
    # Loopback only, one thread per worker on a small machine.
    env.update(GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


def start_job(
    processes: Processes, records: pathlib.Path, client: str, env: Dict[str, str]
) -> List[Process]:
    """Start the two agents of the job (the first hosts the rendezvous store)."""
    records.mkdir()
    port = free_port()
    run_id = f"ftimer-interop-{uuid.uuid4().hex[:8]}"
    agents = []
    for node, is_host in enumerate((1, 0)):
        argv = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nnodes=2",
            "--nproc-per-node=2",
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint=127.0.0.1:{port}",
            f"--rdzv-id={run_id}",
            f"--rdzv-conf=is_host={is_host},join_timeout=30",
            "--local-addr=127.0.0.1",
            "--max-restarts=1",
            "--monitor-interval=0.1",
            str(JOB),
            f"--client={client}",
            f"--out={records}",
            f"--hang-after={HANG_AFTER}",
        ]
        agents.append(processes.start(f"agent-{node}", argv, env=env))
    return agents


def read_records(records: pathlib.Path) -> Dict[str, Dict[str, Any]]:
    """What the workers recorded, by name (``a{attempt}-r{rank}-{start,done}``)."""
    return {p.stem: json.loads(p.read_text()) for p in records.glob("*.json")}


def wait_all(agents: List[Process]) -> Tuple[int, ...]:
    deadline = time.monotonic() + JOB_TIMEOUT
    return tuple(a.wait(max(1.0, deadline - time.monotonic())) for a in agents)


def test_torchrun_job_recovers_from_a_hung_rank_with_ftimer(
    processes: Processes, tmp_path: pathlib.Path, torch_timer: Any
) -> None:
    daemon = FtimerDaemon(processes, tmp_path / "timer.fifo")
    records = tmp_path / "records"
    started = time.time()
    agents = start_job(
        processes, records, "ftimer", job_env(TORCHELASTIC_TIMER_FILE=str(daemon.fifo))
    )
    statuses = wait_all(agents)
    finished = time.time()
    logs = "\n".join(a.output()[-3000:] for a in agents)
    assert statuses == (0, 0), logs

    done = read_records(records)
    hung = done[f"a0-r{HUNG_RANK}-start"]
    # ftimer reaped exactly the hung rank, with SIGKILL, once its 2 s had passed.
    reaped = daemon.events("reaped")
    assert [(e["pid"], e["signal"], e["delivered"]) for e in reaped] == [
        (hung["pid"], signal.SIGKILL, True)
    ]
    assert reaped[0]["labels"] == {"rank": str(HUNG_RANK), "local_rank": str(HUNG_RANK % 2)}
    assert reaped[0]["scope_id"].startswith(f"{JOB}#")
    # The first attempt finished on no rank; the restart, on every rank, with new pids.
    assert [name for name in done if name.startswith("a0-") and name.endswith("-done")] == []
    for rank in range(WORLD):
        assert done[f"a1-r{rank}-done"]["sum"] == float(WORLD)
        assert done[f"a1-r{rank}-start"]["pid"] != done[f"a0-r{rank}-start"]["pid"]

    reap_time = datetime.datetime.fromisoformat(reaped[0]["ts"]).timestamp()
    print(
        f"job {finished - started:.1f} s: hang at +{hung['time'] - started:.1f} s, reap at "
        f"+{reap_time - started:.1f} s, restart done at "
        f"+{max(done[f'a1-r{r}-done']['time'] for r in range(WORLD)) - started:.1f} s"
    )


def test_torchs_builtin_timer_kills_the_agent_and_the_job(
    processes: Processes, tmp_path: pathlib.Path, torch_timer: Any
) -> None:
    records = tmp_path / "records"
    # Each agent runs torch's FileTimerServer on a FIFO of its own.
    agents = start_job(processes, records, "torch", job_env(TORCHELASTIC_ENABLE_FILE_TIMER="1"))
    agent_pids = [a.command_pid() for a in agents]
    statuses = wait_all(agents)

    done = read_records(records)
    hung_agent = agent_pids.index(done[f"a0-r{HUNG_RANK}-start"]["agent_pid"])
    # After reaping rank 1, torch 2.13's server SIGKILLs its own process: the agent.
    assert statuses[hung_agent] == -signal.SIGKILL
    # The other agent cannot go on without it: the job fails, never restarted.
    assert statuses[1 - hung_agent] not in (0, -signal.SIGKILL)
    assert sorted(done) == sorted(f"a0-r{rank}-start" for rank in range(WORLD))
