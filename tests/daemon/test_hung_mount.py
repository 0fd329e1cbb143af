"""A FIFO whose path goes through a mount that hangs (a network or FUSE file system
that stopped answering): the daemon's look at its paths must never hold its main loop.

Run inside private PID and mount namespaces (``unshare``), as root, with a FUSE file
system that answers its INIT and nothing else (``HUNG_FUSE``): every lookup under it
waits, in uninterruptible sleep, until its server goes.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys

import pytest

from .conftest import PATIENCE, PYTHON

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists("/dev/fuse") or shutil.which("unshare") is None,
    reason="needs root, /dev/fuse and unshare(1): a FUSE mount in a mount namespace",
)

# Mounts at argv[1] a FUSE file system that answers INIT and nothing else, until stdin
# closes.
HUNG_FUSE = r"""
import ctypes, os, select, struct, sys
fd = os.open("/dev/fuse", os.O_RDWR)
libc = ctypes.CDLL(None, use_errno=True)
options = f"fd={fd},rootmode=40000,user_id=0,group_id=0".encode()
if libc.mount(b"hung", sys.argv[1].encode(), b"fuse", 0, options) != 0:
    sys.exit(f"mount: {os.strerror(ctypes.get_errno())}")
while True:
    ready, _, _ = select.select([fd, sys.stdin], [], [])
    if sys.stdin in ready:
        break  # closing the device aborts the mount: its waiters get ENOTCONN
    request = os.read(fd, 1 << 20)
    _, opcode, unique = struct.unpack_from("<IIQ", request)
    if opcode == 26:  # INIT
        body = struct.pack("<IIIIHHIIHHI7I", 7, 31, 0, 0, 16, 12, 4096, 1, 1, 0, 0, *[0] * 7)
        os.write(fd, struct.pack("<IiQ", 16 + len(body), 0, unique) + body)
"""

# In the namespaces: a daemon whose FIFO (argv[4] "fifo") or incident directory (argv[4]
# "reload", in its config file) is in argv[1]/dir, then the hung mount over that
# directory; a SIGHUP for "reload"; once the daemon waits in the mount (its look at its
# FIFO, or the reload resolving the incident directory), SIGTERM. Prints whether the
# daemon stopped, and then, the mount gone, how it exited.
SCENE = r"""
import os, signal, subprocess, sys, time
top, python, fuse, mode = sys.argv[1:5]
os.mkdir(f"{top}/dir")
with open(f"{top}/ftimer.toml", "w") as f:
    f.write(f'incident-dir = "{top}/dir/incidents"\n' if mode == "reload" else "")
fifo = f"{top}/dir/t.fifo" if mode == "fifo" else f"{top}/t.fifo"
daemon = subprocess.Popen([python, "-m", "ftimer_server", "run", "-c", f"{top}/ftimer.toml",
                           "--fifo", fifo, "--control-socket", f"{top}/ctl.sock",
                           "--no-socket", "--log-file", f"{top}/d.log"])

def until(what, condition):
    end = time.monotonic() + 15
    while not condition():
        if time.monotonic() > end:
            sys.exit(f"timed out waiting for {what}")
        time.sleep(0.01)

def waiting_in_fuse():
    for tid in os.listdir(f"/proc/{daemon.pid}/task"):
        with open(f"/proc/{daemon.pid}/task/{tid}/wchan") as f:
            if f.read() == "request_wait_answer":
                return True
    return False

def said(text):
    try:
        with open(f"{top}/d.log") as f:
            return text in f.read()
    except FileNotFoundError:
        return False

# Ready, not merely listening: a mount made during the start holds the start (the main
# thread looks at the FIFO's directory then), and its signals with it.
until("the daemon", lambda: said(" ready: FIFO "))
hung = subprocess.Popen([python, "-c", fuse, f"{top}/dir"], stdin=subprocess.PIPE)
until("the mount", lambda: f" {top}/dir " in open("/proc/self/mountinfo").read())
if mode == "reload":  # logrotate's postrotate, say, while the share hangs
    daemon.send_signal(signal.SIGHUP)
until("the daemon held by the mount", waiting_in_fuse)
daemon.terminate()
try:  # its stop is done once it says so; its exit waits for the mount (the kernel's)
    until("the stop", lambda: "ftimer_server.daemon: stopped" in open(f"{top}/d.log").read())
    print("stopped", flush=True)
except SystemExit:
    print("SIGTERM not taken in 15 s", flush=True)
hung.stdin.close()  # the mount aborted: the look held in it fails, and the daemon ends
hung.wait()
print("exit", daemon.wait(15), flush=True)
"""


#: Private PID and mount namespaces, which end with unshare.
_NAMESPACES = [
    "unshare", "--pid", "--fork", "--mount-proc", "--mount", "--propagation", "private",
    "--kill-child",
]  # fmt: skip


def scene(tmp_path: pathlib.Path, mode: str) -> str:
    """What `SCENE` printed in ``mode``."""
    done = subprocess.run(
        [*_NAMESPACES, sys.executable, "-c", SCENE, str(tmp_path), PYTHON, HUNG_FUSE, mode],
        capture_output=True,
        text=True,
        timeout=PATIENCE * 4,
    )
    if "mount: " in done.stderr:
        pytest.skip(f"no FUSE mount here: {done.stderr.strip()}")
    return f"{done.stdout}{done.stderr}"


def test_a_fifo_behind_a_mount_that_hangs_holds_no_stop(tmp_path: pathlib.Path) -> None:
    # The look ran in the main loop, which then sat in uninterruptible sleep: SIGTERM
    # and SIGHUP waited for as long as the mount hung.
    assert scene(tmp_path, "fifo") == "stopped\nexit 0\n"


def test_a_reload_held_by_a_mount_that_hangs_holds_no_stop(tmp_path: pathlib.Path) -> None:
    # A reload resolves the directories of the daemon's paths, here an incident directory
    # on a share (docs/incidents.md merges incidents on one): on the main loop, it held
    # the SIGTERM after it for as long as the mount hung.
    assert scene(tmp_path, "reload") == "stopped\nexit 0\n"
