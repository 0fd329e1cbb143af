"""torch's server under the locale a host gives it: it decodes its FIFO with the
locale's encoding (``open(path)``), and torch's client writes ASCII only. Lines that
ftimer_protocol writes in torch's format are read there as torch's own are. Nothing is
signalled: the server only registers what it reads."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import time

import pytest

from ftimer_protocol import TimerRequestV1, encode

pytestmark = pytest.mark.interop

#: torch 2.13's server reading its FIFO once, as its watchdog loop does, then its timers.
SERVER = r"""
import json, sys
from torch.distributed.elastic.timer.file_based_local_timer import FileTimerServer
server = FileTimerServer(sys.argv[1], "run", max_interval=5)
print("ready", flush=True)
with open(sys.argv[1]) as fd:  # as FileTimerServer._watchdog_loop opens it
    try:
        requests = server._get_requests(fd, 5)
    except Exception as e:
        print(json.dumps({"error": repr(e)}), flush=True)
        sys.exit(0)
server.register_timers(requests)
print(json.dumps({"timers": sorted([pid, scope] for pid, scope in server._timers)}), flush=True)
"""


def test_torchs_server_under_an_ascii_locale_reads_a_scope_past_ascii(
    tmp_path: pathlib.Path,
) -> None:
    # Written as raw UTF-8, the line failed torch's whole read (UnicodeDecodeError), and
    # the other worker's request, read with it, was lost too.
    fifo = str(tmp_path / "timer.fifo")
    env = dict(os.environ, LC_ALL="C", LANG="C", PYTHONUTF8="0", PYTHONCOERCECLOCALE="0")
    server = subprocess.Popen(
        [sys.executable, "-c", SERVER, fifo],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        text=True,
    )
    try:
        assert server.stdout is not None
        assert server.stdout.readline() == "ready\n"
        far = time.time() + 3600
        lines = encode(TimerRequestV1(4242, "caf\u00e9#1", far, 9))
        lines += encode(TimerRequestV1(4243, "step", far, 9))
        fd = os.open(fifo, os.O_WRONLY)  # once torch's server opens it to read
        try:
            os.write(fd, lines)
        finally:
            os.close(fd)
        out, err = server.communicate(timeout=60)
    finally:
        if server.poll() is None:
            server.kill()
            server.communicate()
    assert json.loads(out.splitlines()[-1]) == {
        "timers": [[4242, "caf\u00e9#1"], [4243, "step"]]
    }, err[-2000:]
