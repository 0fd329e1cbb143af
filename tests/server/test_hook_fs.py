"""A worker's dump-hook file on a file system that never answers: a FUSE server of the
test's own (raw ``/dev/fuse``) that answers lookups and opens but never a READ, nor (in
``noflush`` mode) a FLUSH, as a hostile worker's FUSE server or a hung NFS ``$TMPDIR``
would. The capture must return by its deadline, never read or flush that file, and the
processes started meanwhile must not inherit it.

Every process signalled here is one these tests started; every mount is unmounted in a
``finally``.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from typing import List, Optional, Tuple

import pytest

from ftimer_protocol import DumpHook
from ftimer_server.core._incident import Capture
from ftimer_server.incidents import _dump_hook
from ftimer_server.incidents._capture import CaptureOptions, capture
from ftimer_server.incidents._procfs import read_stat

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs /proc")

#: A FUSE file system with one regular file, "dump": READ requests are never answered,
#: nor FLUSH ones with "noflush"; each such request is logged (op and pid) to LOG.
FUSE_SERVER = r"""
import ctypes, os, struct, sys
mnt, log, noflush = sys.argv[1], sys.argv[2], sys.argv[3] == "noflush"
libc = ctypes.CDLL(None, use_errno=True)
fd = os.open("/dev/fuse", os.O_RDWR)
opts = f"fd={fd},rootmode=40000,user_id=0,group_id=0,allow_other".encode()
if libc.mount(b"ftimertest", mnt.encode(), b"fuse", 0x2 | 0x4, opts) != 0:
    sys.exit("mount: " + os.strerror(ctypes.get_errno()))
print("mounted", flush=True)
IN = struct.Struct("<IIQQIIIHH")
OUT = struct.Struct("<IiQ")
ATTR = struct.Struct("<QQQQQQIIIIIIIIII")
def attr(ino):
    if ino == 1:
        return ATTR.pack(1, 0, 0, 0, 0, 0, 0, 0, 0, 0o40755, 2, 0, 0, 0, 4096, 0)
    # No link: as the client's dump file, unlinked once made (the server uses no other).
    return ATTR.pack(2, 1 << 20, 2048, 0, 0, 0, 0, 0, 0, 0o100600, 0, 0, 0, 0, 4096, 0)
def reply(unique, payload=b"", error=0):
    os.write(fd, OUT.pack(OUT.size + len(payload), error, unique) + payload)
def note(what, tid):
    try:  # the process of the thread that asked
        with open(f"/proc/{tid}/status") as f:
            pid = next(line.split()[1] for line in f if line.startswith("Tgid:"))
    except OSError:
        pid = tid
    with open(log, "a") as f:
        f.write(f"{what} {pid}\n")
while True:
    try:
        req = os.read(fd, 1 << 21)
    except OSError as e:
        if e.errno == 19:
            break
        continue
    ln, op, unique, node, _, _, pid, _, _ = IN.unpack_from(req)
    body = req[IN.size:]
    if op == 26:  # INIT
        major, minor, ra, flags = struct.unpack_from("<IIII", body)
        out = struct.pack("<IIIIHHIIHHII", 7, 31, ra, 0, 16, 12, 1 << 16, 1, 32, 0, 0, 0)
        reply(unique, out + b"\0" * (64 - len(out)))
    elif op == 1:  # LOOKUP
        if body.split(b"\0")[0] == b"dump":
            reply(unique, struct.pack("<QQQQII", 2, 0, 3600, 3600, 0, 0) + attr(2))
        else:
            reply(unique, error=-2)
    elif op in (3, 4):  # GETATTR, SETATTR
        reply(unique, struct.pack("<QII", 3600, 0, 0) + attr(node))
    elif op in (14, 27):  # OPEN, OPENDIR (direct I/O: every read asks the server)
        note("OPEN", pid)
        reply(unique, struct.pack("<QII", 0, 1 if op == 14 else 0, 0))
    elif op == 15:  # READ: never answered
        note("READ", pid)
    elif op == 16:  # WRITE
        reply(unique, struct.pack("<II", struct.unpack_from("<QQI", body)[2], 0))
    elif op == 25 and noflush:  # FLUSH: never answered
        note("FLUSH", pid)
    elif op in (18, 25, 29):  # RELEASE, FLUSH, RELEASEDIR
        reply(unique)
    elif op in (2, 36, 42):  # FORGET, INTERRUPT, BATCH_FORGET: no answer
        pass
    else:
        reply(unique, error=-38)
"""

#: A worker whose hook file is the FUSE file: its handler only moves the descriptor's
#: offset, so the dump seems to grow (and a reader would read it).
WORKER = r"""
import os, signal, sys, time
fd = os.open(sys.argv[1], os.O_WRONLY)
signal.signal(signal.SIGUSR2, lambda *a: os.lseek(fd, 200, os.SEEK_CUR))
print(fd, flush=True)
while True:
    time.sleep(100)
"""


class Fuse:
    def __init__(self, mount: pathlib.Path, log: pathlib.Path) -> None:
        self.mount = mount
        self.log = log

    def requests(self) -> List[Tuple[str, int]]:
        """The unanswered requests (and OPENs): (op, pid)."""
        if not self.log.exists():
            return []
        lines = self.log.read_text().split("\n")
        return [(op, int(pid)) for op, pid in (line.split() for line in lines if line)]


@contextlib.contextmanager
def hostile(tmp_path: pathlib.Path, mode: str) -> Iterator[Tuple[Fuse, int, int]]:
    """A FUSE mount (``mode``: "noread", or "noflush" too) and a worker whose hook file
    is its "dump": (the mount, the worker's pid, its hook's descriptor)."""
    if os.geteuid() != 0 or not os.path.exists("/dev/fuse"):
        pytest.skip("needs root and /dev/fuse to mount a FUSE file system")
    mount = tmp_path / "mnt"
    mount.mkdir()
    (tmp_path / "fuse_server.py").write_text(FUSE_SERVER)
    (tmp_path / "worker.py").write_text(WORKER)
    log = tmp_path / "fuse.log"
    server = subprocess.Popen(
        [sys.executable, str(tmp_path / "fuse_server.py"), str(mount), str(log), mode],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    worker: Optional[subprocess.Popen[str]] = None
    try:
        assert server.stdout is not None
        if server.stdout.readline().strip() != "mounted":
            server.wait(10)
            assert server.stderr is not None
            pytest.skip(f"cannot mount a FUSE file system here: {server.stderr.read().strip()}")
        worker = subprocess.Popen(
            [sys.executable, str(tmp_path / "worker.py"), str(mount / "dump")],
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        assert worker.stdout is not None
        fd = int(worker.stdout.readline())  # its handler installed (it printed after)
        yield Fuse(mount, log), worker.pid, fd
    finally:
        if worker is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(worker.pid, signal.SIGKILL)  # its session: ours alone
        # The server's end aborts whatever still waits on it (the worker's own flush at
        # its exit, say: the kernel answers ENOTCONN).
        server.kill()
        server.wait(10)
        if worker is not None:
            worker.wait(10)
        for stream in (server.stdout, server.stderr, worker and worker.stdout):
            if stream is not None:
                stream.close()
        subprocess.run(["umount", "-l", str(mount)], capture_output=True, check=False)


def capture_within(pid: int, fd: int, budget: float, wait: float) -> Optional[Capture]:
    """Capture ``pid`` with its hook (no py-spy) in a thread; the capture, or ``None`` if
    it had not returned ``wait`` seconds after its deadline."""
    got: List[Capture] = []

    def run() -> None:
        got.append(
            capture(
                pid,
                read_stat(pid).start_time,
                None,
                role="stuck",
                labels=None,
                hook=DumpHook(signal=signal.SIGUSR2, fd=fd),
                options=CaptureOptions(py_spy=None, hook=True),
                deadline=time.monotonic() + budget,
            )
        )

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(budget + wait)
    return got[0] if got else None


def held_in(mount: pathlib.Path) -> List[str]:
    """The files under ``mount`` this process has a descriptor of."""
    held = []
    for n in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # the listing's own descriptor, closed
            target = os.readlink(f"/proc/self/fd/{n}")
            if target.startswith(str(mount)):
                held.append(target)
    return held


def spawn_quickly(seconds: float) -> None:
    """Start ``true`` again and again for ``seconds``; each must be done within 3 s (a
    child that inherited a FUSE descriptor hangs in its exec, flushing it)."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        subprocess.run(["true"], check=True, timeout=3)


@pytest.mark.parametrize("mode", ["noread", "noflush"])
def test_hook_file_on_fuse_is_refused(tmp_path: pathlib.Path, mode: str) -> None:
    with hostile(tmp_path, mode) as (fuse, pid, fd):
        started = time.monotonic()
        spawner = threading.Thread(target=spawn_quickly, args=(1.0,))
        c = capture_within(pid, fd, budget=1.0, wait=2.0)
        assert c is not None, "the capture did not return by its deadline"
        assert time.monotonic() - started < 1.5
        assert c.method == "facts"
        assert "is on a fuse file system" in (c.error or "")
        # Nothing of ours ever touched the file: no open, no read, no flush.
        assert [r for r in fuse.requests() if r[1] != pid] == []
        spawner.start()
        spawner.join(10)
        assert not spawner.is_alive()
        assert held_in(fuse.mount) == []


def test_spawns_during_a_capture_do_not_inherit_the_hook(tmp_path: pathlib.Path) -> None:
    # Processes the capture process starts meanwhile (py-spy, gcore for another worker)
    # must never inherit the hook file: their exec would flush it, and wait forever.
    with hostile(tmp_path, "noflush") as (fuse, pid, fd):
        failures: List[BaseException] = []

        def spawn() -> None:
            try:
                spawn_quickly(1.5)
            except BaseException as e:  # reported in the test's thread
                failures.append(e)

        spawner = threading.Thread(target=spawn, daemon=True)
        spawner.start()
        c = capture_within(pid, fd, budget=1.0, wait=2.0)
        spawner.join(10)
        assert c is not None, "the capture did not return by its deadline"
        assert not spawner.is_alive(), "a process started during the capture hung"
        assert failures == []
        assert [r for r in fuse.requests() if r[1] != pid] == []


def test_reads_on_a_blocking_file_are_bounded(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Were such a file let through (the list of safe file systems wrong), the capture
    # still returns by its deadline: every call on the file is bounded, and its close,
    # whose flush never returns, goes on in a thread of its own.
    monkeypatch.setattr(_dump_hook, "SAFE_FILE_SYSTEMS", frozenset({"fuse"}))
    with hostile(tmp_path, "noflush") as (fuse, pid, fd):
        started = time.monotonic()
        c = capture_within(pid, fd, budget=1.0, wait=2.0)
        assert c is not None, "the capture did not return by its deadline"
        assert time.monotonic() - started < 1.5
        assert c.method == "facts"
        assert "could not be read by the deadline" in (c.error or "")
        assert ("READ", os.getpid()) in fuse.requests()
        assert held_in(fuse.mount) == []


def test_file_system_is_told_by_proc() -> None:
    # A file on a tmpfs (/dev/shm) is of a safe file system; a pipe is in no mount.
    if not os.path.isdir("/dev/shm"):
        pytest.skip("no /dev/shm")
    with tempfile.TemporaryFile(dir="/dev/shm") as f:
        kind = _dump_hook._file_system(f"/proc/self/fdinfo/{f.fileno()}", os.getpid())
    assert kind == "tmpfs"
    assert _dump_hook._unsafe(kind, "x", 1) is None
    r, w = os.pipe()
    try:
        assert _dump_hook._file_system(f"/proc/self/fdinfo/{r}", os.getpid()) is None
    finally:
        os.close(r)
        os.close(w)
    for remote in ("nfs4", "fuse", "fuse.sshfs", "cifs", "9p", "virtiofs", "ceph", None):
        assert _dump_hook._unsafe(remote, "x", 1) is not None
