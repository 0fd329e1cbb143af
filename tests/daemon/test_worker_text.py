"""What a worker sends reaches the operator escaped: a real worker with escape sequences
and newlines in its labels, scope, command line and a thread's name is reaped by a real
daemon logging text; neither its log nor ``ftimer-server incidents`` carries a control
character or a line the worker made."""

from __future__ import annotations

import pathlib
import re
import subprocess
from typing import Callable, List

from tests.conftest import wait_until
from tests.daemon.conftest import PATIENCE, PYTHON, DaemonProcess, kill_and_close

#: Sets its terminal's title, clears the screen, and starts lines that look like the log's.
HOSTILE_WORKER = r"""
import ctypes, sys, threading, time
from ftimer_client import FileTimerClient
ESC = "\x1b]0;PWNED\x07\x1b[2J"
named = threading.Event()
def rename():
    ctypes.CDLL(None).prctl(15, b"\x1b[2J\nFAKE thr", 0, 0, 0)  # PR_SET_NAME, 15 bytes
    named.set()
    time.sleep(60)
threading.Thread(target=rename, daemon=True).start()
named.wait()
labels = {"job": "j" + ESC, "rank": "0\nFAKE LOG LINE: reaped pid 1"}
client = FileTimerClient(sys.argv[1], transport="fifo", labels=labels)
client.arm("step" + ESC + "\nFAKE scope", 0.3)
print("armed", flush=True)
time.sleep(60)
"""
HOSTILE_ARGV = "argv\x1b]0;PWNED\x07\nFAKE argv"


def lines_of(text: bytes) -> List[str]:
    """``text``'s lines, cut at newlines only: any other control character stays in one."""
    return text.decode("utf-8").split("\n")


def assert_printable(text: bytes) -> None:
    lines = lines_of(text)
    assert [line for line in lines if not line.isprintable()] == []
    assert [line for line in lines if line.lstrip().startswith("FAKE")] == []


def test_a_hostile_worker_reaches_the_text_log_and_incidents_escaped(
    spawn: Callable[..., DaemonProcess], short_dir: pathlib.Path
) -> None:
    incidents = short_dir / "incidents"
    d = spawn(
        "--log-format", "text", "--capture", "facts", "--incident-dir", str(incidents)
    ).ready()
    w = subprocess.Popen(
        [PYTHON, "-c", HOSTILE_WORKER, str(d.fifo), HOSTILE_ARGV],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert w.stdout is not None
        assert w.stdout.readline() == "armed\n"
        assert w.wait(PATIENCE) == -9  # reaped, with SIGKILL
    finally:
        kill_and_close(w)

    def logged() -> bytes:
        text = d.log.read_bytes()
        return text if b"ftimer_server.daemon: incident " in text else b""

    log = wait_until(logged, PATIENCE, what="the incident's log line")
    command = [PYTHON, "-m", "ftimer_server", "incidents", "--dir", str(incidents)]
    listed = subprocess.run(command, capture_output=True, check=True).stdout
    shown = subprocess.run([*command, "show"], capture_output=True, check=True).stdout

    for text in (log, listed, shown):
        assert_printable(text)
    for text in (log, shown):
        assert rb"rank=0\nFAKE LOG LINE: reaped pid 1" in text
    # The list cuts an incident's labels; its summary names the rank as the worker did.
    assert rb"rank 0\nFAKE LOG LINE: reaped pid 1" in listed
    assert rb"job=j\x1b]0;PWNED\x07\x1b[2J" in log
    # The daemon's own line breaks stay: the incident's summary, a line each.
    assert re.search(rb"daemon: incident [^\n]*\):\n  timer 'step[^\n]*\n  captured ", log)
    assert rb"""timer 'step\x1b]0;PWNED\x07\x1b[2J\nFAKE scope'""" in shown
    assert rb"  command: " in shown
    assert rb"argv\x1b]0;PWNED\x07\nFAKE argv" in shown
    assert rb'"\x1b[2J\nFAKE thr"' in shown
    assert d.stop() == 0
