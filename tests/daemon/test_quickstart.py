"""docs/quickstart.md, as a newcomer follows it: its worker against a real daemon."""

from __future__ import annotations

import os
import pathlib
import signal
import subprocess
from typing import Callable

from .conftest import PATIENCE, PYTHON, DaemonProcess

WORKER = pathlib.Path(__file__).resolve().parents[2] / "docs" / "examples" / "quickstart.py"
#: The default scope of an ``expires`` block is its file and line.
BLOCK_LINE = 1 + WORKER.read_text().splitlines().index(
    "    with expires(after=2):  # reap me if this step takes more than 2 s"
)


def test_the_quick_starts_worker_is_reaped_in_its_fourth_step_with_an_incident(
    spawn: Callable[..., DaemonProcess],
) -> None:
    d = spawn().ready()
    # The page's worker uses the default FIFO; here the default is the test daemon's.
    env = {**os.environ, "FTIMER_FIFO": str(d.fifo)}
    worker = subprocess.run(
        [PYTHON, str(WORKER)], capture_output=True, text=True, env=env, timeout=PATIENCE
    )
    assert worker.returncode == -signal.SIGKILL, worker.stderr
    assert worker.stdout == "step 0 done\nstep 1 done\nstep 2 done\n"
    reaped = d.wait_for_record(event="reaped")
    assert reaped["scope_id"] == f"{WORKER}#{BLOCK_LINE}"
    assert reaped["incident"]
    shown = subprocess.run(
        [PYTHON, "-m", "ftimer_server", "incidents", "show", "--fifo", str(d.fifo)],
        capture_output=True,
        text=True,
        timeout=PATIENCE,
    )
    assert shown.returncode == 0, shown.stderr
    assert f"timer '{WORKER}#{BLOCK_LINE}' of pid {reaped['pid']} expired" in shown.stdout
    assert "reaped with SIGKILL" in shown.stdout
    assert d.stop() == 0
