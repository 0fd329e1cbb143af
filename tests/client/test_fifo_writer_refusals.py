"""The FIFO writer's refusals in their own words, its wait for room and its reading of
the kernel's signal mask (``_fifo.py``, ``_writer.py``; each test seen to fail with a
mutant of the code that no test of the client's FIFO writer caught): a FIFO this user may
not write, in a directory it may or may not enter (the words name the FIFO only where
the path shows one); another error opening it (a ServerUnavailable, not a raw error); a
writer numbered 0 waiting for room like any other; SIGPIPE's default put back behind
Python's back, seen in a mask whose hex digits matter."""

from __future__ import annotations

import errno
import os
import pathlib
import subprocess
import sys

import pytest

from ftimer_client import ServerUnavailable
from ftimer_client._fifo import FifoWriter

from .conftest import FifoPeer
from .test_transport_sigpipe import run_worker

# -- refusals, in words -------------------------------------------------------------------

# Opens the FIFO argv[1] (argv[2] "auto": a socket would have done too) as user nobody
# where run as root; prints the refusal.
OPEN_AS_NOBODY = """
import os, sys
from ftimer_client import ServerUnavailable
from ftimer_client._fifo import FifoWriter
if os.geteuid() == 0:
    os.setgid(65534)
    os.setuid(65534)
try:
    FifoWriter(sys.argv[1], or_socket=sys.argv[2] == "auto").close()
except ServerUnavailable as e:
    print(e.errno, e.strerror, flush=True)
"""


def open_as_nobody(path: pathlib.Path, transport: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", OPEN_AS_NOBODY, str(path), transport],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.stderr == ""
    return done.stdout


@pytest.mark.parametrize("transport", ["fifo", "auto"])
def test_a_fifo_this_user_may_not_write_is_said_so(peer: FifoPeer, transport: str) -> None:
    # Its directory lets anyone in: what is at the path shows, a FIFO, whatever the
    # transport would have taken.
    peer.path.parent.chmod(0o711)
    peer.path.chmod(0)
    assert open_as_nobody(peer.path, transport) == (
        f"{errno.EACCES} this user may not write the FIFO, or enter its directory "
        "(permission denied): the server's --fifo-mode and --fifo-group say who may\n"
    )


def test_a_fifo_in_a_directory_this_user_may_not_enter_is_said_so(peer: FifoPeer) -> None:
    # The directory hides what is at the path: with transport "auto", either would do.
    peer.path.parent.chmod(0)
    try:
        assert open_as_nobody(peer.path, "auto") == (
            f"{errno.EACCES} this user may not write the FIFO or socket, or enter its "
            "directory (permission denied): the server's --fifo-mode and --fifo-group say "
            "who may\n"
        )
    finally:
        peer.path.parent.chmod(0o700)


def test_another_open_error_is_the_server_unavailable_in_its_own_words(
    tmp_path: pathlib.Path,
) -> None:
    # A directory at the FIFO's path (EISDIR): the client's on_unavailable policy must
    # see it, not a raw error.
    with pytest.raises(ServerUnavailable) as caught:
        FifoWriter(str(tmp_path))
    assert caught.value.errno == errno.EISDIR
    assert caught.value.strerror == f"cannot open the FIFO ({os.strerror(errno.EISDIR)})"
    assert caught.value.filename == str(tmp_path)


# -- waiting for room ---------------------------------------------------------------------

# A worker started with stdin closed: its writer gets descriptor 0. Waits up to 0.3 s
# for room in the FIFO argv[1] (full: the server reads no more) and says whether it came.
WAIT_AT_0 = """
import os, sys
from ftimer_client._fifo import FifoWriter
os.close(0)
writer = FifoWriter(sys.argv[1])
assert writer._fd == 0, writer._fd
print(writer.wait_room(0.3), flush=True)
writer.close()
"""


def test_a_writer_numbered_0_waits_for_room_in_a_full_fifo(peer: FifoPeer) -> None:
    # Descriptor 0 is a descriptor like any other: only a closed writer (-1) has room at
    # once. Taking 0 for closed, the retry thread finds room that is not there and tries
    # again at once, over and over, instead of waiting for the server to make room.
    peer.pause()
    peer.fill()
    done = subprocess.run(
        [sys.executable, "-c", WAIT_AT_0, str(peer.path)],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == "False\n"


# -- SIGPIPE: the kernel's mask -----------------------------------------------------------

# The worker: a host embedding Python that ignores SIGUSR1 and, behind Python's back,
# put SIGPIPE's default back (Python still says ignored). Every other signal's
# disposition is made known first, so the kernel's SigIgn is exactly SIGUSR1 and
# SIGXFSZ (Python ignores that one at startup): 0x1000200, a mask whose SIGPIPE bit is
# clear but set when its hex digits are misread (base 15). It opens a FifoWriter while
# the server reads, reports, waits for "go" (the server has left) and writes once.
MASK_WORKER = r"""
import ctypes, json, signal, sys
from ftimer_client._fifo import FifoWriter, sigpipe_ignored
from ftimer_client._writer import ConnectionLost

keep = {signal.SIGPIPE, signal.SIGXFSZ}
for sig in signal.valid_signals() - {signal.SIGKILL, signal.SIGSTOP} - keep:
    if signal.getsignal(sig) is signal.SIG_IGN:
        signal.signal(sig, signal.SIG_DFL)
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
signal.signal(signal.SIGUSR1, signal.SIG_IGN)
libc = ctypes.CDLL(None, use_errno=True)
libc.signal.restype = ctypes.c_void_p
libc.signal.argtypes = [ctypes.c_int, ctypes.c_void_p]
libc.signal(signal.SIGPIPE, 0)  # SIG_DFL, as the host's C code would
assert signal.getsignal(signal.SIGPIPE) is signal.SIG_IGN  # Python never knew
with open("/proc/self/status") as f:
    mask = next(row.split()[1] for row in f if row.startswith("SigIgn:"))
writer = FifoWriter(sys.argv[1])
print(json.dumps({"mask": mask, "ignored": sigpipe_ignored(), "hot_fd": writer.hot_fd}),
      flush=True)
assert sys.stdin.readline() == "go\n"
try:
    writer.write(b'{"op":"sync","token":"t"}\n', 1.0)
    outcome = "delivered"
except ConnectionLost:
    outcome = "lost"
print(json.dumps({"outcome": outcome}), flush=True)
"""


def test_sigpipe_default_is_read_from_a_mask_whose_hex_digits_matter(peer: FifoPeer) -> None:
    # The kernel's mask is hexadecimal: read in another base, 0x1000200 has SIGPIPE's
    # bit set, the writer takes the hot path, and the write after the server left kills
    # the worker with SIGPIPE.
    assert run_worker(peer, script=MASK_WORKER, sent=0) == {
        "mask": "0000000001000200",
        "ignored": False,
        "hot_fd": -1,
        "outcome": "lost",
    }
