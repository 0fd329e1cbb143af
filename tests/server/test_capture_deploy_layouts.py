"""The capture in the layouts docs/deploy.md recommends: a worker in a PID namespace of
its own (Kubernetes without hostPID) captured by py-spy from the host's, and a daemon
held to the example unit's capabilities (CAP_KILL, CAP_CHOWN) looking at another user's
dump hook. Real daemons, namespaces and users; the worker reaped is the test's own."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import textwrap

import pytest
from tests.conftest import wait_until

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (namespaces, setpriv)")

PYTHON = sys.executable
#: A Python another user can run (the tests' may be in root's home).
SYSTEM_PYTHON = "/usr/bin/python3"


def _env() -> dict:
    return dict(os.environ, PATH=os.path.dirname(PYTHON) + os.pathsep + os.environ["PATH"])


def test_py_spy_stacks_of_a_worker_in_a_pid_namespace_of_its_own_go_to_its_threads(
    tmp_path: pathlib.Path,
) -> None:
    # py-spy names a thread by the worker's own id (its main thread is 1), /proc here by
    # the host's: no stack paired with a thread, and the incident listed four threads for
    # two, its headline "running a C call" for a worker asleep.
    if shutil.which("py-spy", path=os.path.dirname(PYTHON)) is None:
        pytest.skip("py-spy is not installed beside the tests' Python (the pyspy extra)")
    if shutil.which("unshare") is None:
        pytest.skip("needs unshare(1)")
    fifo, incidents = tmp_path / "timer.fifo", tmp_path / "incidents"
    with open(tmp_path / "daemon.log", "w") as log:
        daemon = subprocess.Popen(
            [PYTHON, "-m", "ftimer_server", "run", "--fifo", str(fifo), "--capture", "py-spy",
             "--incident-dir", str(incidents)],
            stderr=log,
            env=_env(),
        )  # fmt: skip
    worker = None
    try:
        socket_path = tmp_path / "timer.socket"
        wait_until(lambda: socket_path.exists() and fifo.exists(), what="the daemon")
        code = textwrap.dedent(
            """
            import os, time
            from ftimer_client import FileTimerClient, configure, expires
            configure(FileTimerClient())
            print(os.getpid(), flush=True)
            with expires(after=1):
                time.sleep(60)
            """
        )
        worker = subprocess.Popen(
            ["unshare", "--pid", "--fork", "--mount-proc", PYTHON, "-c", code],
            stdout=subprocess.PIPE,
            text=True,
            env=dict(_env(), FTIMER_SOCKET=str(socket_path)),
        )
        assert worker.stdout is not None
        assert worker.stdout.readline().strip() == "1"  # pid 1 of its own namespace
        show = [PYTHON, "-m", "ftimer_server", "incidents", "show", "--json", "--dir",
                str(incidents)]  # fmt: skip

        def incident() -> object:
            done = subprocess.run(show, capture_output=True, text=True, env=_env())
            return json.loads(done.stdout) if done.returncode == 0 and done.stdout else None

        doc = wait_until(incident, timeout=60, what="the incident")
        assert worker.wait(30) != 0  # reaped
    finally:
        if worker is not None:
            if worker.poll() is None:
                worker.kill()
            worker.wait()
            if worker.stdout is not None:
                worker.stdout.close()
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(30)
    [stuck] = [c for c in doc["captures"] if c["pid"] == doc["pid"]]  # type: ignore[index]
    assert stuck["method"] == "py-spy", stuck.get("error")
    threads = {t["tid"]: t for t in stuck["threads"]}
    assert len(threads) == 2, sorted(threads)  # the main thread and the client's watch
    assert threads[stuck["pid"]]["frames"]  # the main thread's stack, on the main thread


def test_a_hook_the_server_may_not_look_at_is_not_said_closed_by_the_worker() -> None:
    # The example unit's capabilities cannot read another user's /proc/PID/fd: the
    # incident said "is not open: the worker closed it", sending the operator after a bug
    # in the worker, where docs/incidents.md says "Permission denied".
    if shutil.which("setpriv") is None or not os.path.exists(SYSTEM_PYTHON):
        pytest.skip("needs setpriv(1) and /usr/bin/python3")
    holder = subprocess.Popen(
        ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups", SYSTEM_PYTHON,
         "-c", "import sys, tempfile\nf = tempfile.TemporaryFile(dir='/tmp')\n"
         "print(f.fileno(), flush=True)\nsys.stdin.readline()\n"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    assert holder.stdin is not None
    assert holder.stdout is not None
    try:
        fd = int(holder.stdout.readline())
        check = (
            "import time\n"
            "from ftimer_server.incidents._dump_hook import _checked\n"
            f"said = _checked({holder.pid}, {fd}, {{65534}}, time.monotonic() + 5, read=False)\n"
            "print(said if isinstance(said, str) else 'opened')\n"
        )
        done = subprocess.run(
            ["setpriv", "--bounding-set", "-all,+kill,+chown", "--inh-caps", "-all", PYTHON,
             "-c", check],
            capture_output=True,
            text=True,
            timeout=60,
        )  # fmt: skip
    finally:
        holder.stdin.write("\n")
        holder.stdin.close()
        holder.wait(30)
        holder.stdout.close()
    assert done.returncode == 0, done.stderr
    assert "Permission denied" in done.stdout
    assert "closed" not in done.stdout
