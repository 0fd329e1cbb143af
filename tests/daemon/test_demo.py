"""The README's main job (``nox -s demo``) keeps working."""

from __future__ import annotations

import pathlib
import subprocess
import sys

DEMO = pathlib.Path(__file__).resolve().parents[2] / "docs" / "examples" / "demo.py"


def test_demo_reaps_the_stuck_worker_and_spares_the_punctual_one() -> None:
    result = subprocess.run([sys.executable, str(DEMO)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "reaped: pid" in out
    assert "rank 2: hung past its 1 s timer -> reaped, killed by SIGKILL, exit status -9" in out
    assert "incident: rank 2, the outlier, named first" in out
    assert "worker 2: finished in time -> left alone, exit status 0" in out
    assert "1 timer armed" in out  # the status table, shown while worker 2 runs
    assert out.rstrip().endswith("demo OK")
