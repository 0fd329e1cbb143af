"""A worker whose connection still reaches the server though the path no longer does
(it dropped its privileges, or the path was removed while the server reads on): its
disarms still arrive. A real server (signalling nothing) and real worker processes."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
from typing import List

import pytest
from tests.conftest import wait_until

from ftimer_server import Disarmed, Event, FileTimerServer, RecordingSignaller

# Connects, then loses sight of the path, then holds a timer until the client's watch
# (made to look every 50 ms) has made two looks since, and disarms it. Prints what the
# looks since said (whether the server's end was taken for gone), then stays until its
# stdin closes: a datagram whose sender exited before the server read it is moot.
WORKER = """
import json, os, sys, threading
from ftimer_client import FileTimerClient, _channel, _fifo, _socket, expires
path, transport, how = sys.argv[1:4]
_channel.WATCH_EVERY = 0.05
looks = []
looked = threading.Condition()

def counted(lost):
    def look(self):
        said = lost(self)
        with looked:
            looks.append(said)
            looked.notify_all()
        return said
    return look

for writer in (_fifo.FifoWriter, _socket.SocketWriter):
    writer.lost = counted(writer.lost)  # the watch's look, and nothing else's
client = FileTimerClient(path, transport=transport)
with expires(after=60, scope="first", client=client):
    pass
if how == "setuid":
    os.setuid(65534)  # the server's directory is root's, 0700: out of its reach now
else:
    os.unlink(path)
with expires(after=60, scope="step", client=client):
    with looked:
        since = len(looks)  # the next look may have begun before: the one after it not
        # Two looks, or one that took the server for gone (the watch's last).
        if not looked.wait_for(lambda: len(looks) >= since + 2 or any(looks[since:]), 30):
            sys.exit(f"the watch made {len(looks) - since} looks in 30 s")
        print(json.dumps(looks[since:]), flush=True)
sys.stdin.read()
"""


@pytest.mark.parametrize("transport", ["fifo", "socket"])
@pytest.mark.parametrize("how", ["setuid", "removed"])
def test_a_path_out_of_reach_is_no_server_gone(
    tmp_path: pathlib.Path, transport: str, how: str
) -> None:
    # The watch took a path it could not look at for a server replaced: it dropped the
    # connection, and the block's disarm, sent anew through the path, failed: the
    # block raised ServerUnavailable (or warned), and the server reaped a healthy worker.
    if how == "setuid" and os.geteuid() != 0:
        pytest.skip("dropping privileges needs root")
    private = tmp_path / "run"
    private.mkdir(mode=0o700)
    fifo = private / "timer.fifo"
    events: List[Event] = []
    server = FileTimerServer(
        fifo,
        socket_path=str(private / "timer.socket"),
        fifo_mode=0o666,
        signaller=RecordingSignaller(),
        on_event=events.append,
        event_types=[Disarmed],
    )

    def disarmed() -> List[str]:
        return [e.timer.scope_id for e in events if isinstance(e, Disarmed)]

    argv = [sys.executable, "-c", WORKER, str(private / f"timer.{transport}"), transport, how]
    with server:
        with subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        ) as worker:
            assert worker.stdout is not None
            said = worker.stdout.readline()
            if said:  # else it failed: its stderr says why
                # The worker lives on until the server has applied its disarm.
                wait_until(lambda: "step" in disarmed(), what='the disarm of "step"')
            rest, err = worker.communicate(timeout=60)  # closes its stdin
        server.sync()
    assert worker.returncode == 0, err
    assert err == ""
    assert rest == ""
    assert not any(json.loads(said))  # no look took the server for gone
    assert disarmed() == ["first", "step"]
