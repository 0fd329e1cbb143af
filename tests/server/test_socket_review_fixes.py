"""The socket transport as a hostile or unlucky sender meets it: a receipt the server was
out of descriptors to receive, a receipt whose sender closed its end, a sender gone that
named itself by its own pidfd. Real sockets, pipes and processes; nothing is signalled
but SIGPIPE, by the kernel, to a process of the test's own."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

from ftimer_protocol import Disarm, encode
from ftimer_server.core._events import Moot
from ftimer_server.server._socket import open_socket

# A sender's arm, then its receipt, read by a server with two descriptors left: the arm's
# pidfd takes them, and the kernel closes the receipt inside recvmsg() (MSG_CTRUNC),
# before the arm is applied. Then the same with descriptors to spare. Prints what the
# sender's wait_read() said each time. In a process of its own: filling the descriptor
# table of the tests' process fails other threads' opens.
LOST_RECEIPT = r"""
import os, resource, subprocess, sys, threading
from ftimer_client._socket import SocketWriter
from ftimer_protocol import Arm, encode
from ftimer_server.server._socket import open_socket

server = open_socket(sys.argv[1])
child = subprocess.Popen(["sleep", "60"])
writer = SocketWriter(sys.argv[1], os.pidfd_open(child.pid))
line = encode(Arm(pid=child.pid, scope_id="step", deadline=1e9, signal=9))

def receipt(descriptors_left):
    writer.write(line, 5.0)  # as ftimer exec's arm of its command
    sent, said = threading.Event(), []
    send = writer._send
    def sending(*args):
        send(*args)
        sent.set()
    writer._send = sending
    waiting = threading.Thread(target=lambda: said.append(writer.wait_read(10.0)))
    waiting.start()
    assert sent.wait(10)
    writer._send = send
    fillers = []
    if descriptors_left is not None:
        while True:
            try:
                fillers.append(os.open("/dev/null", os.O_RDONLY))
            except OSError:
                break
        for _ in range(descriptors_left):
            os.close(fillers.pop())
    received = server.receive()
    for fd in fillers:
        os.close(fd)
    assert len(received) == 2, received
    server.release()  # the batch applied
    waiting.join(15)
    return said

soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (min(soft, 512), hard))
print(receipt(2), receipt(None), flush=True)
writer.close()
child.kill()
child.wait()
"""


def test_a_receipt_the_kernel_closed_unreceived_is_no_receipt(tmp_path: pathlib.Path) -> None:
    # The end of file was the receipt: the sender (`ftimer disarm`, `ftimer exec`) took it,
    # exited or started its command, and what it had sent was judged after it: a shell's
    # disarm refused (its sender gone), the shell reaped later, the command said applied.
    done = subprocess.run(
        [sys.executable, "-c", LOST_RECEIPT, str(tmp_path / "s.socket")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (done.returncode, done.stdout) == (0, "[False] [True]\n"), done.stderr


# A server, in a program that set SIGPIPE's action back to the default (as many command
# line tools do), gives a receipt whose sender closed its end. Prints "alive" after.
CLOSED_RECEIPT = r"""
import os, signal, socket, sys
from ftimer_protocol import Sync, encode
from ftimer_server.server._socket import open_socket

signal.signal(signal.SIGPIPE, signal.SIG_DFL)
server = open_socket(sys.argv[1])
read_end, write_end = os.pipe()
with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sender:
    sender.connect(sys.argv[1])
    socket.send_fds(sender, [encode(Sync(token="ftimer-receipt"))], [write_end])
os.close(write_end)
os.close(read_end)  # gone before its receipt
[sync] = server.receive()
server.release()
print("alive", type(sync).__name__, flush=True)
"""


def test_a_receipt_whose_sender_closed_its_end_never_kills_the_server(
    tmp_path: pathlib.Path,
) -> None:
    done = subprocess.run(
        [sys.executable, "-c", CLOSED_RECEIPT, str(tmp_path / "s.socket")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (done.returncode, done.stdout) == (0, "alive Sync\n"), done.stderr


# A sender that disarms naming itself, by its own pidfd or by none, and exits.
SENDER = r"""
import os, socket, sys
sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
sock.connect(sys.argv[1])
line = sys.argv[2].encode()
if sys.argv[3] == "own":
    socket.send_fds(sock, [line], [os.pidfd_open(os.getpid())])
else:
    sock.send(line)
"""


@pytest.mark.parametrize("how", ["none", "own"])
def test_a_sender_gone_that_named_itself_is_moot_with_or_without_its_pidfd(
    tmp_path: pathlib.Path, how: str
) -> None:
    # A sender's own pidfd is "as if it carried none" (docs/server.md): a worker that
    # ends right after its last disarm was refused (sender_gone, a warning, a rejection
    # counted) when it had passed its pidfd, where without it the disarm was moot.
    server = open_socket(str(tmp_path / "s.socket"))
    try:
        line = encode(Disarm(pid=os.getpid(), scope_id="step")).decode()
        subprocess.run([sys.executable, "-c", SENDER, server.path, line, how], check=True)
        [result] = server.receive()  # read once it has exited, and been reaped
        server.release()
        assert isinstance(result, Moot), result
    finally:
        server.close()
