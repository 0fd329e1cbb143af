"""torchrun with ftimer's server embedded in each agent: ``ftimer_agent.py [torchrun args]``.

The agent is torch's ``LocalElasticAgent`` with its worker watchdog swapped for ftimer's
``FileTimerServer``, always on (no ``TORCHELASTIC_ENABLE_FILE_TIMER`` needed). Unlike
torch's, ftimer's server does not kill the agent after a reap, so the agent can restart
the workers. Every ``Reaped`` event is also printed as a line ``ftimer reaped: {json}``,
which test_torchrun_job.py reads.

docs/torchelastic.md shows the region between the ``--8<--`` markers as its example
agent, verbatim (tests/test_docs.py checks that it does): keep comments there for its
readers.
"""

# --8<-- [start:agent]
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
    if isinstance(event, Reaped):  # pid, signal, scope, lateness, the rank's labels
        print(f"ftimer reaped: {msgspec.json.encode(event).decode()}", flush=True)


class FtimerAgent(LocalElasticAgent):
    """torch's agent, with ftimer's server as its worker watchdog.

    torch 2.13 stops the watchdog whenever it stops the workers (``_stop_workers`` calls
    ``_shutdown``, which stops the server and forgets it) and sets up a new one when it
    starts them: each attempt of the job gets a server of its own, on a new FIFO in a
    new private directory. ``_shutdown`` runs once more when the agent exits, after the
    last attempt's has already run.
    """

    _fifo_dir: Optional[str] = None

    def _setup_local_watchdog(self, envs: Dict[int, Dict[str, str]]) -> None:
        if self._worker_watchdog is None:  # torch 2.13: always, at every (re)start
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
        super()._shutdown(death_sig, timeout)  # stops the server (it removes its FIFO)
        if self._fifo_dir is not None:
            os.rmdir(self._fifo_dir)
            self._fifo_dir = None  # the agent's final _shutdown finds nothing to remove


api.LocalElasticAgent = FtimerAgent  # what torchrun's launcher instantiates

if __name__ == "__main__":
    sys.exit(main())
# --8<-- [end:agent]
