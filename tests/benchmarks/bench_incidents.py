"""Incidents: how soon after their deadline the incidents of 1 and of 8 stuck ranks are
complete (py-spy, and the workers' own faulthandler hook), how late the kill comes after
its capture, and whether the loop stays on time while captures run.

torch has no counterpart (its timer logs a line and kills), so the rows are ftimer's
alone. The server runs in a process of its own (``python bench_incidents.py serve FIFO
DIR METHOD``), reporting on stdout; the workers are children of this process, and every
death is timed through a pidfd.
"""

from __future__ import annotations

import json
import os
import select
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Dict, List, Tuple

HERE = os.path.abspath(__file__)
Row = Dict[str, Any]
RANKS = (1, 8)
#: How long after the workers have armed their deadline falls.
AHEAD = 1.0
BUDGET = 5.0

# A rank of job "bench": arms a timer due at the monotonic time argv[3], then hangs.
WORKER = """
import sys, time
from ftimer_client import FileTimerClient
fifo, job, deadline, rank = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4]
client = FileTimerClient(fifo, labels={"job": job, "rank": rank}, dump_signal="SIGUSR2")
client.arm("step", deadline - time.monotonic())
print("armed", flush=True)

def all_reduce():
    time.sleep(3600)

all_reduce()
"""


def serve(fifo: str, directory: str, method: str) -> None:
    """The server under test: prints one JSON line per expiry, reap and incident."""
    from ftimer_server import Expired, FileTimerServer, Incident, IncidentOptions, Reaped

    lock = threading.Lock()

    def say(**fields: Any) -> None:
        # Events and incidents come from different threads: print() writes the line and
        # its newline apart, so two unlocked reports can share a line.
        with lock:
            print(json.dumps({"t": time.monotonic(), **fields}), flush=True)

    def on_event(event: object) -> None:
        if isinstance(event, Expired):
            say(kind="expired", pid=event.timer.pid, deadline=event.timer.deadline)
        elif isinstance(event, Reaped):
            say(kind="reaped", pid=event.pid, late=event.late)

    def on_incident(incident: Incident) -> None:
        say(
            kind="incident",
            pid=incident.pid,
            late=incident.late,
            seconds=incident.seconds,
            method=incident.captures[0].method if incident.captures else "none",
            captures=len(incident.captures),
        )

    options = IncidentOptions(directory=directory, method=method, timeout=BUDGET)
    with FileTimerServer(fifo, on_event=on_event, incidents=options, on_incident=on_incident):
        print(json.dumps({"kind": "ready"}), flush=True)
        sys.stdin.read()  # until the driver closes it


class Run:
    """One server and its stuck ranks."""

    def __init__(self, directory: str, method: str) -> None:
        self.fifo = os.path.join(directory, "timer.fifo")
        self.server = subprocess.Popen(
            [sys.executable, HERE, "serve", self.fifo, os.path.join(directory, "i"), method],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.server.stdout is not None
        assert json.loads(self.server.stdout.readline())["kind"] == "ready"
        self.workers: List[Tuple[subprocess.Popen[str], int]] = []  # (process, pidfd)
        self.lines: List[Dict[str, Any]] = []  # every report read

    def start(self, job: str, deadline: float, rank: int) -> int:
        worker = subprocess.Popen(
            [sys.executable, "-c", WORKER, self.fifo, job, repr(deadline), str(rank)],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert worker.stdout is not None
        assert worker.stdout.readline() == "armed\n"
        self.workers.append((worker, os.pidfd_open(worker.pid)))
        return worker.pid

    def reports(self, kind: str, count: int) -> List[Dict[str, Any]]:
        """Read the server's lines until ``count`` of ``kind``; return them."""
        assert self.server.stdout is not None
        out: List[Dict[str, Any]] = []
        give_up = time.monotonic() + 30
        while len(out) < count:
            if time.monotonic() > give_up or not select.select([self.server.stdout], [], [], 30)[0]:
                raise RuntimeError(f"only {len(out)} of {count} {kind} reports")
            line = json.loads(self.server.stdout.readline())
            self.lines.append(line)
            if line["kind"] == kind:
                out.append(line)
        return out

    def watch_deaths(self) -> threading.Thread:
        """Start stamping deaths (into ``died``) as they happen, while the server's
        reports are read: a death seen only after them would be stamped late."""
        self.died: Dict[int, float] = {}
        thread = threading.Thread(target=lambda: self.died.update(self.deaths()), daemon=True)
        thread.start()
        return thread

    def deaths(self) -> Dict[int, float]:
        """pid -> monotonic time of death, for every worker that dies within 30 s."""
        out: Dict[int, float] = {}
        poller = select.poll()
        by_fd = {fd: w.pid for w, fd in self.workers}
        for fd in by_fd:
            poller.register(fd, select.POLLIN)
        give_up = time.monotonic() + 30
        while len(out) < len(by_fd) and time.monotonic() < give_up:
            for fd, _ in poller.poll(1000):
                out.setdefault(by_fd[fd], time.monotonic())
                poller.unregister(fd)
        return out

    def close(self) -> None:
        for worker, fd in self.workers:
            if worker.poll() is None:
                worker.kill()
            worker.wait()
            os.close(fd)
            assert worker.stdout is not None
            worker.stdout.close()
        assert self.server.stdin is not None
        self.server.stdin.close()
        self.server.wait(30)
        assert self.server.stdout is not None
        self.server.stdout.close()


def _stuck(method: str, ranks: int) -> Tuple[float, float, int]:
    """``ranks`` stuck ranks of one job: (seconds from the deadline to the last complete
    incident, the worst kill lateness beyond its capture, captures per incident)."""
    with tempfile.TemporaryDirectory(prefix="ftimer-bench-") as directory:
        run = Run(directory, method)
        try:
            deadline = time.monotonic() + AHEAD + 0.15 * ranks  # after every rank has armed
            for rank in range(ranks):
                run.start("bench", deadline, rank)
            watcher = run.watch_deaths()
            incidents = run.reports("incident", ranks)
            watcher.join(30)
            deaths = run.died
        finally:
            run.close()
    complete = max(i["t"] for i in incidents) - deadline
    beyond = max(deaths[i["pid"]] - (deadline + i["late"] + i["seconds"]) for i in incidents)
    if {i["method"] for i in incidents} != {method}:
        raise RuntimeError(f"{method}: captured by {sorted({i['method'] for i in incidents})}")
    return complete, beyond, max(i["captures"] for i in incidents)


def _loop_latency(busy: bool) -> float:
    """Seconds from a worker's deadline to its expiry, with 8 captures (py-spy) running
    (``busy``) or none."""
    with tempfile.TemporaryDirectory(prefix="ftimer-bench-") as directory:
        run = Run(directory, "py-spy")
        try:
            base = time.monotonic() + AHEAD + 1.2
            if busy:
                for rank in range(8):
                    run.start("bench", base, rank)
            probe = run.start("other", base + 0.01, 0)  # due while the 8 are captured
            expired = [e for e in run.reports("expired", 9 if busy else 1) if e["pid"] == probe]
        finally:
            run.close()
    [probe_expired] = expired
    return float(probe_expired["t"] - probe_expired["deadline"])


def run(quick: bool) -> List[Row]:
    """Incident completion for 1 and 8 ranks (py-spy, hook), kill after capture, loop
    latency with and without captures running."""
    reps = 1 if quick else 5
    rows: List[Row] = []
    for method in ("py-spy", "hook"):
        for ranks in RANKS:
            results = [_stuck(method, ranks) for _ in range(reps)]
            complete = statistics.median(r[0] for r in results)
            beyond = max(r[1] for r in results)
            rows.append(
                {
                    "group": "incidents",
                    "metric": f"{ranks} stuck rank{'s' if ranks > 1 else ''}, {method}: "
                    "deadline to every incident complete",
                    "unit": "s",
                    "ftimer": complete,
                    "torch": None,
                    "better": "lower",
                    "ranks": ranks,
                    "method": method,
                    "note": f"median of {reps}; each incident holds its rank and its "
                    f"{results[0][2] - 1} peers; worst of {reps}: "
                    f"{max(r[0] for r in results):.3f} s",
                }
            )
            rows.append(
                {
                    "group": "incidents",
                    "metric": f"{ranks} stuck rank{'s' if ranks > 1 else ''}, {method}: "
                    "kill after its capture",
                    "unit": "ms",
                    "ftimer": 1000 * beyond,
                    "torch": None,
                    "better": "lower",
                    "note": "worst over the runs: the worker's death (its pidfd) minus the "
                    "end of its capture (deadline + lateness + capture time)",
                }
            )
    quiet = statistics.median(_loop_latency(False) for _ in range(reps))
    busy = statistics.median(_loop_latency(True) for _ in range(reps))
    rows.append(
        {
            "group": "incidents",
            "metric": "expiry of another worker while 8 captures run (loop latency)",
            "unit": "ms",
            "ftimer": 1000 * busy,
            "torch": None,
            "quiet": 1000 * quiet,
            "better": "lower",
            "note": f"median of {reps}; deadline to the loop's expiry of a worker of another "
            f"job, due 10 ms into 8 py-spy captures; with nothing captured: "
            f"{1000 * quiet:.2f} ms",
        }
    )
    return rows


if __name__ == "__main__":
    if sys.argv[1:2] == ["serve"]:
        serve(sys.argv[2], sys.argv[3], sys.argv[4])
    else:
        for row in run("--quick" in sys.argv):
            print(row)
