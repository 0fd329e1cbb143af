"""The chaos run: fault injection against the real ftimer daemon (``nox -s chaos``).

    python tests/chaos/run.py            # the full run (3 rounds, under 5 minutes)
    python tests/chaos/run.py --quick    # one round, fewer floods (about a minute)
    python tests/chaos/run.py --probe    # print why it cannot run here, or nothing

The run needs a private PID namespace, its safety net: the harness sends the daemon
requests to signal pid 1, process groups, its own threads and others, and should the
daemon obey, only processes of the run can be hit. So this script re-runs itself as the
namespace's pid 1 (``unshare --pid --fork --mount-proc``, plus ``--map-root-user`` for
a user other than root) and refuses to run the scenario anywhere else. Where unshare is
missing or fails, the run is skipped with the reason. When pid 1 exits, the kernel kills
whatever is left in the namespace, so nothing outlives the run.

It prints progress lines, then one table (see docs/reliability.md), and exits 1 if any
promise was broken. The working directory (FIFO, state file, daemon log) is kept after a
failure, and named.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from types import FrameType
from typing import List, Optional

#: The namespace, and the harness as its pid 1, killed if unshare itself is killed.
#: Another user than root gets a user namespace too, where it is root (if the kernel
#: lets unprivileged users make them).
UNSHARE = ["unshare", "--pid", "--fork", "--mount-proc", "--kill-child"]
if os.geteuid() != 0:
    UNSHARE.insert(1, "--map-root-user")
#: Hard limit on the whole run, on top of the scenario's own time budget.
HARD_LIMIT = 300


def probe() -> Optional[str]:
    """Why a private PID namespace cannot be made here, or None if it can."""
    if not sys.platform.startswith("linux"):
        return f"needs Linux PID namespaces (this is {sys.platform})"
    if shutil.which("unshare") is None:
        return "unshare(1) (util-linux) is not installed"
    try:
        result = subprocess.run(
            [*UNSHARE, "true"], capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"unshare failed: {e}"
    if result.returncode != 0:
        return f"{' '.join(UNSHARE)} failed: {result.stderr.strip()}"
    return None


def outside(argv: List[str]) -> int:
    """Re-run this script as pid 1 of a private PID namespace; 0 if skipped."""
    reason = probe()
    if reason is not None:
        print(f"chaos run SKIPPED: {reason}", flush=True)
        return 0
    command = [*UNSHARE, sys.executable, os.path.abspath(__file__), "--inside", *argv]
    try:
        return subprocess.run(command, timeout=HARD_LIMIT, check=False).returncode
    except subprocess.TimeoutExpired:
        print(f"chaos run KILLED after {HARD_LIMIT} s", flush=True)
        return 1


def inside(quick: bool, keep: bool) -> int:
    """Run the scenario; only as pid 1 of a PID namespace."""
    if os.getpid() != 1:
        print("refusing to run: the harness must be pid 1 of a private PID namespace")
        return 2
    from _scenario import FULL, QUICK, Chaos

    plan = QUICK if quick else FULL
    signal.signal(signal.SIGALRM, _out_of_time)
    signal.alarm(int(plan.time_limit) + 20)
    workdir = tempfile.mkdtemp(prefix="ftimer-chaos-")
    ok = Chaos(workdir, plan).run()
    signal.alarm(0)
    if ok and not keep:
        shutil.rmtree(workdir)
    else:
        print(f"working directory kept: {workdir} (daemon.log, workers.log, state/)")
    return 0 if ok else 1


def _out_of_time(signum: int, frame: Optional[FrameType]) -> None:
    raise TimeoutError("the chaos run went over its time limit")


def main(argv: Optional[List[str]] = None) -> int:
    """Parse the command line and run (outside: in a namespace; inside: the scenario)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one round, fewer floods")
    parser.add_argument("--keep", action="store_true", help="keep the working directory")
    parser.add_argument("--probe", action="store_true", help="print why it cannot run here")
    parser.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.probe:
        print(probe() or "")
        return 0
    if args.inside:
        return inside(args.quick, args.keep)
    return outside([*(["--quick"] if args.quick else []), *(["--keep"] if args.keep else [])])


if __name__ == "__main__":
    sys.exit(main())
