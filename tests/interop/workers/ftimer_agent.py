"""torchrun with ftimer's server embedded in each agent: ``ftimer_agent.py [torchrun args]``.

The agent is torch's ``LocalElasticAgent`` with its worker watchdog swapped for ftimer's
``FileTimerServer``, on a FIFO of its own, always on (no ``TORCHELASTIC_ENABLE_FILE_TIMER``
needed), for the agent's whole life: torch 2.13's agent starts a new server at every
restart without stopping the previous one. Unlike torch's, ftimer's server does not kill
the agent after a reap, so the agent can restart the workers.

``_setup_local_watchdog`` is a private method of torch 2.13's agent: this is a sketch of
a custom agent, tied to that version. Every ``Reaped`` event is also printed as a line
``ftimer reaped: {json}``, which test_torchrun_job.py reads.
"""

from __future__ import annotations

import os
import signal
import sys
import tempfile
from typing import Dict, Optional

import msgspec
from torch.distributed.elastic.agent.server.local_elastic_agent import LocalElasticAgent
from torch.distributed.launcher import api
from torch.distributed.run import main

from ftimer_server import Event, FileTimerServer, Reaped


def print_reaps(event: Event) -> None:
    if isinstance(event, Reaped):
        print(f"ftimer reaped: {msgspec.json.encode(event).decode()}", flush=True)


class FtimerAgent(LocalElasticAgent):
    """A ``LocalElasticAgent`` whose worker watchdog is ftimer's server."""

    _fifo_dir: Optional[str] = None

    def _setup_local_watchdog(self, envs: Dict[int, Dict[str, str]]) -> None:
        if self._worker_watchdog is None:
            self._fifo_dir = tempfile.mkdtemp(prefix="ftimer-agent-")
            run_id = next(iter(envs.values()))["TORCHELASTIC_RUN_ID"] if envs else ""
            self._worker_watchdog = FileTimerServer(
                os.path.join(self._fifo_dir, "timer.fifo"),
                run_id,
                log_event=self._log_watchdog_event,
                on_event=print_reaps,
                remove_fifo=True,
            )
            self._worker_watchdog.start()
        for env in envs.values():
            env["TORCHELASTIC_TIMER_FILE"] = self._worker_watchdog.file_path

    def _shutdown(self, death_sig: signal.Signals = signal.SIGTERM, timeout: int = 30) -> None:
        super()._shutdown(death_sig, timeout)
        if self._fifo_dir is not None:
            os.rmdir(self._fifo_dir)
            self._fifo_dir = None


api.LocalElasticAgent = FtimerAgent  # what torchrun's launcher instantiates

if __name__ == "__main__":
    sys.exit(main())
