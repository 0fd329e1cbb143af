"""The README's main job: a watchdog finds out why a worker hangs, reaps it, and leaves
a punctual one alone.

    nox -s demo            (or: python docs/examples/demo.py, with the packages installed)

1. starts ``ftimer-server run`` on a FIFO in a temporary directory (and waits for it the
   way systemd does: READY=1 on a notification socket);
2. starts a job of three ranks: ranks 0 and 1 wait in ``all_reduce`` under long timers,
   rank 2 hangs in ``load_batch`` under a 1 s timer. The daemon captures the stacks of
   rank 2 and of its peers, then reaps rank 2; ``ftimer-server incidents show`` prints
   the incident: rank 2, the outlier, first;
3. starts worker 2, which arms a 5 s timer around a 2 s step, and asks the daemon what it
   has armed (``ftimer-server status``) while it runs: worker 2 is left alone;
4. stops the daemon with SIGTERM and sums up. Everything is removed afterwards.

Exit status 0 when every worker ended as it should and the incident names the outlier.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from typing import List, Optional, TextIO

HERE = pathlib.Path(__file__).resolve().parent
PYTHON = sys.executable
PATIENCE = 20.0  # seconds: generous, for a slow first start on a busy machine


def relay(stream: TextIO, prefix: str) -> threading.Thread:
    """Copy ``stream`` to our stdout, line by line, with ``prefix``."""

    def run() -> None:
        for line in stream:
            print(f"{prefix}{line}", end="", flush=True)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def start_daemon(
    directory: pathlib.Path, fifo: pathlib.Path, notify: socket.socket
) -> subprocess.Popen[str]:
    """Start the daemon and return once it has said READY=1 on ``notify``."""
    notify_path = str(directory / "notify.sock")
    notify.bind(notify_path)
    cmd = [PYTHON, "-m", "ftimer_server", "run", "--fifo", str(fifo), "--log-level", "debug"]
    print(f"$ ftimer-server run --fifo {fifo} --log-level debug")
    daemon = subprocess.Popen(
        cmd,
        env={**os.environ, "NOTIFY_SOCKET": notify_path},
        stderr=subprocess.PIPE,
        text=True,
    )
    assert daemon.stderr is not None
    relay(daemon.stderr, "  daemon   | ")
    notify.settimeout(0.2)
    deadline = time.monotonic() + PATIENCE
    while True:
        if daemon.poll() is not None:
            raise SystemExit(f"the daemon exited with status {daemon.returncode}")
        if time.monotonic() > deadline:
            daemon.kill()
            raise SystemExit("the daemon did not become ready")
        try:
            if b"READY=1" in notify.recv(4096).split(b"\n"):
                return daemon
        except socket.timeout:
            pass


def start_worker(
    fifo: pathlib.Path, name: str, timeout: float, work: float, *extra: str
) -> subprocess.Popen[str]:
    """Start docs/examples/worker.py; return once it has armed its timer."""
    cmd = [PYTHON, str(HERE / "worker.py"), "--fifo", str(fifo), "--name", name]
    cmd += ["--timeout", str(timeout), "--work", str(work), *extra]
    worker = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    assert worker.stdout is not None
    print(f"  {name:<8} | " + worker.stdout.readline(), end="", flush=True)  # armed
    return worker


def run_worker(
    fifo: pathlib.Path,
    name: str,
    timeout: float,
    work: float,
    *extra: str,
    while_running: bool = False,
) -> int:
    """Run docs/examples/worker.py to completion (or to its reaping); return its status.

    With ``while_running``, show ``ftimer-server status`` once the worker has armed.
    """
    worker = start_worker(fifo, name, timeout, work, *extra)
    assert worker.stdout is not None
    prefix = f"  {name:<8} | "
    if while_running:
        print(f"$ ftimer-server status --fifo {fifo}")
        status = subprocess.run(
            [PYTHON, "-m", "ftimer_server", "status", "--fifo", str(fifo)],
            check=False,
            capture_output=True,
            text=True,
            timeout=PATIENCE,
        )
        for line in (status.stdout + status.stderr).splitlines():
            print(f"  status   | {line}")
    relay(worker.stdout, prefix).join(PATIENCE)
    try:
        return worker.wait(PATIENCE)
    except subprocess.TimeoutExpired:
        worker.kill()
        return worker.wait()


def wait_for_incident(directory: pathlib.Path) -> None:
    """Wait until the daemon has written its incident (just after the reap)."""
    deadline = time.monotonic() + PATIENCE
    while not list(directory.glob("*.json")):
        if time.monotonic() > deadline:
            raise SystemExit(f"no incident in {directory}")
        time.sleep(0.05)


def describe(status: int) -> str:
    if status < 0:
        return f"killed by {signal.Signals(-status).name}, exit status {status}"
    return f"exit status {status}"


def main() -> int:
    directory = pathlib.Path(tempfile.mkdtemp(prefix="ftimer-demo-"))
    os.chmod(directory, 0o700)
    fifo = directory / "timer.fifo"
    daemon: Optional[subprocess.Popen[str]] = None
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)  # stands in for systemd
    summary: List[str] = []
    ok = True
    try:
        print("\n== 1. the watchdog daemon")
        daemon = start_daemon(directory, fifo, notify)

        print("\n== 2. a job of three ranks: rank 2 hangs in load_batch, under a 1 s timer")
        peers = [start_worker(fifo, f"rank {r}", 60, 60, "--rank", str(r)) for r in (0, 1)]
        status = run_worker(fifo, "rank 2", 1, 60, "--rank", "2", "--hang-in", "load_batch")
        ok &= status == -signal.SIGKILL
        summary.append(f"rank 2: hung past its 1 s timer -> reaped, {describe(status)}")
        wait_for_incident(directory / "incidents")
        print(f"$ ftimer-server incidents show --fifo {fifo}")
        shown = subprocess.run(
            [PYTHON, "-m", "ftimer_server", "incidents", "show", "--fifo", str(fifo)],
            check=False,
            capture_output=True,
            text=True,
            timeout=PATIENCE,
        )
        for line in (shown.stdout + shown.stderr).splitlines():
            print(f"  incident | {line}")
        outlier = "rank 2 in load_batch" in shown.stdout
        ok &= outlier
        summary.append(
            "incident: "
            + ("rank 2, the outlier, named first" if outlier else "NOT as expected, see above")
        )
        for peer in peers:  # the demo's own workers: ended by the demo
            peer.terminate()
            peer.wait(PATIENCE)
            assert peer.stdout is not None
            peer.stdout.close()

        # 2 s: long enough for `ftimer-server status` to start and ask, on a loaded machine.
        print("\n== 3. worker 2: a 2 s step, under a 5 s timer")
        status = run_worker(fifo, "worker 2", 5, 2, while_running=True)
        ok &= status == 0
        summary.append(f"worker 2: finished in time -> left alone, {describe(status)}")

        print("\n== 4. stopping the daemon (SIGTERM)")
        daemon.send_signal(signal.SIGTERM)
        code = daemon.wait(PATIENCE)
        ok &= code == 0
        summary.append(f"daemon: clean shutdown on SIGTERM, exit status {code}")
    finally:
        if daemon is not None and daemon.poll() is None:
            daemon.kill()
            daemon.wait()
        notify.close()
        shutil.rmtree(directory, ignore_errors=True)

    print("\n== summary")
    for line in summary:
        print(f"  {line}")
    print("  demo " + ("OK" if ok else "FAILED: see above"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
