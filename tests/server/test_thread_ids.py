"""A pid is a process, never a thread: hostile requests naming thread ids, with the real
signaller, inside a private PID namespace.

Linux gives threads ids from the same space as processes, and ``kill(tid)`` delivers to
the whole process the thread belongs to. A server that took a thread id for a worker
would signal that process: itself, pid 1, or any other. Here the server runs with its
real ``OsSignaller`` and is asked to reap the threads of itself, of the namespace's pid 1
(the harness) and of a multi-threaded canary; everything it could reach lives inside the
namespace, so nothing outside the test can be hit even if the server fails. A sacrificial
worker reaped after the hostile lines proves they were all read.
"""

from __future__ import annotations

import json
import sys
from typing import Any, Dict

import pytest
from tests.conftest import in_private_pid_namespace

# Run as pid 1 of a private PID namespace (with its own /proc).
HARNESS = r"""
import json, os, select, subprocess, sys, tempfile, threading, time
from ftimer_protocol import Arm, Expire, TimerRequestV1, encode

mode = sys.argv[1]
hold = threading.Event()
threading.Thread(target=hold.wait, daemon=True).start()  # pid 1 gets a thread too

def threads(pid):
    return sorted(int(t) for t in os.listdir(f"/proc/{pid}/task") if int(t) != pid)

def ready(argv):
    child = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline() == "ready\n"
    return child

SERVER = '''
import sys, threading, msgspec
from ftimer_server import FileTimerServer, SystemInspector
class NoPidfds(SystemInspector):
    def open(self, pid):
        return None  # a kernel without pidfds: identity by /proc alone
class Unaware(NoPidfds):
    def tgid(self, pid):
        return pid  # a custom inspector that knows no threads (ProcessInspector's default)
inspector = {"pidfd": SystemInspector, "no-pidfd": NoPidfds, "unaware": Unaware}[sys.argv[2]]()
server = FileTimerServer(sys.argv[1], inspector=inspector)
server.start()
threading.Thread(target=threading.Event().wait, daemon=True).start()  # one more
print("ready", flush=True)
sys.stdin.readline()
server.stop()
print(msgspec.json.encode(server.stats()).decode(), flush=True)
'''
CANARY = '''
import threading
hold = threading.Event()
for _ in range(3):
    threading.Thread(target=hold.wait, daemon=True).start()
print("ready", flush=True)
hold.wait()
'''
fifo = os.path.join(tempfile.mkdtemp(), "timer.fifo")
server = ready([sys.executable, "-c", SERVER, fifo, mode])
canary = ready([sys.executable, "-c", CANARY])
victim = subprocess.Popen(["sleep", "60"])
targets = {"pid 1": threads(1), "server": threads(server.pid), "canary": threads(canary.pid)}
assert all(targets.values()), targets

lines = []
for tids in targets.values():
    for tid in tids:
        lines += [
            encode(Expire(pid=tid, scope_id="x", signal=9)),
            encode(Arm(pid=tid, scope_id="y", deadline=0.0, signal=9)),
            encode(TimerRequestV1(pid=tid, scope_id="z", expiration_time=0.0, signal=9)),
        ]
lines += [encode(Expire(pid=p, scope_id="x", signal=9)) for p in (1, server.pid)]
fd = os.open(fifo, os.O_WRONLY)
for line in lines + [encode(Expire(pid=victim.pid, scope_id="last", signal=9))]:
    os.write(fd, line)
os.close(fd)
pidfd = os.pidfd_open(victim.pid)
reaped = bool(select.select([pidfd], [], [], 15)[0])  # in order: every line was read
server.stdin.write("stop\n")
server.stdin.flush()
stats = json.loads(server.stdout.readline())
print(json.dumps({
    "targets": targets,
    "reaped": reaped,
    "victim": victim.wait(),
    "server": server.wait(),
    "canary_alive": canary.poll() is None and threads(canary.pid) == targets["canary"],
    "stats": stats,
}), flush=True)
canary.kill()
"""


@pytest.mark.parametrize("mode", ["pidfd", "no-pidfd", "unaware"])
def test_no_thread_id_is_ever_signalled(mode: str) -> None:
    done = in_private_pid_namespace(sys.executable, "-c", HARNESS, mode)
    assert done.returncode == 0, done.stderr
    result: Dict[str, Any] = json.loads(done.stdout.splitlines()[-1])
    tids = sum(len(t) for t in result["targets"].values())
    assert result["reaped"]
    assert result["victim"] == -9  # the last line was applied, as a real reap
    assert result["server"] == 0  # the server never signalled itself
    assert result["canary_alive"]  # nor the canary, any of its threads
    refused = {"reserved_pid": 1, "server_process": 1}
    if mode == "unaware":
        # The inspector let the threads through; the signaller refused each one's kill().
        # A thread's three lines make one reap, or more when its failed reap ended before
        # the next of its lines was read (reads and reaps interleave as they will).
        assert result["stats"]["rejections"] == refused
        failed = result["stats"]["reap_failures"]
        assert tids <= failed <= 3 * tids
        assert result["stats"]["reaps"] == {"9": failed + 1}  # the victim's alone worked
    else:
        # Expire, arm and v1 arm of each thread.
        assert result["stats"]["rejections"] == {**refused, "not_a_process": 3 * tids}
        assert result["stats"]["reaps"] == {"9": 1}
