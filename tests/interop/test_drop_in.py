"""Code written for torch's timer runs unchanged with ftimer's names.

workers/torch_program.py embeds torch's ``FileTimerServer`` and runs two workers with
torch's client, one of which hangs. The test runs it as written, then with the import
line of ``torch.distributed.elastic.timer`` replaced by the same names from
``ftimer_client`` and ``ftimer_server``, and nothing else changed.
"""

from __future__ import annotations

import difflib
import json
import pathlib
import signal
from typing import Any

import pytest

from ._harness import WORKERS, Processes

pytestmark = pytest.mark.interop

PROGRAM = WORKERS / "torch_program.py"
TORCH_IMPORT = (
    "from torch.distributed.elastic.timer import FileTimerClient, FileTimerServer, "
    "configure, expires\n"
)
FTIMER_IMPORTS = (
    "from ftimer_client import FileTimerClient, configure, expires\n"
    "from ftimer_server import FileTimerServer\n"
)


def ftimer_version(directory: pathlib.Path) -> pathlib.Path:
    """The program with ftimer's imports, and a check that nothing else changed."""
    source = PROGRAM.read_text()
    assert source.count(TORCH_IMPORT) == 1
    swapped = source.replace(TORCH_IMPORT, FTIMER_IMPORTS)
    changed = [
        line
        for line in difflib.unified_diff(source.splitlines(), swapped.splitlines(), n=0)
        if line[:1] in "+-" and line[:3] not in ("+++", "---")
    ]
    assert changed == [
        "-" + TORCH_IMPORT.rstrip(),
        *("+" + line for line in FTIMER_IMPORTS.splitlines()),
    ]
    path = directory / "ftimer_program.py"
    path.write_text(swapped)
    return path


def test_a_torch_program_runs_unchanged_with_ftimers_names(
    processes: Processes, tmp_path: pathlib.Path, torch_timer: Any
) -> None:
    program = processes.python("ftimer-program", ftimer_version(tmp_path), str(tmp_path / "f"))
    assert program.wait(60) == 0, program.output()
    # The hung worker got the SIGTERM its client asked for; the other one finished.
    result = next(json.loads(x) for x in program.output().splitlines() if x.startswith('{"hung"'))
    assert result == {"hung": -signal.SIGTERM, "ok": 0}


def test_the_same_program_with_torch_is_killed_by_its_own_server(
    processes: Processes, tmp_path: pathlib.Path, torch_timer: Any
) -> None:
    program = processes.python("torch-program", PROGRAM, str(tmp_path / "f"))
    # torch 2.13 reaps the hung worker, then sends the same signal to its own process.
    assert program.wait(60) == -signal.SIGTERM, program.output()
    assert '"hung"' not in program.output()
