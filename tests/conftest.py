"""Shared fixtures. Tests that need the real torch carry the `interop` marker."""

from __future__ import annotations

import contextlib
import gc
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from types import ModuleType
from typing import Callable, List, Optional, Set, TypeVar

import pytest
from hypothesis import HealthCheck, settings

# Shared, loaded machines (CI, other test runs in parallel): no per-example deadlines.
settings.register_profile(
    "ftimer", deadline=None, suppress_health_check=[HealthCheck.too_slow], print_blob=True
)
settings.load_profile(os.environ.get("FTIMER_HYPOTHESIS_PROFILE", "ftimer"))

# A background job of a shell without job control (`pytest &`, a nohup'd run) starts
# with SIGINT and SIGQUIT ignored, and every process the tests start would inherit that:
# the tests of Ctrl-C failed. What a terminal gives, back.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)
if signal.getsignal(signal.SIGQUIT) is signal.SIG_IGN:
    signal.signal(signal.SIGQUIT, signal.SIG_DFL)


@pytest.fixture(scope="session")
def torch_timer() -> ModuleType:
    """torch.distributed.elastic.timer; a hard failure in the interop session if missing."""
    try:
        from torch.distributed.elastic import timer
    except ImportError as e:
        if os.environ.get("FTIMER_REQUIRE_TORCH"):
            pytest.fail(f"torch is required in this session but cannot be imported: {e}")
        pytest.skip("torch is not installed (run `nox -s interop`)")
    return timer


@pytest.fixture
def fifo_path() -> Iterator[pathlib.Path]:
    """A path for a FIFO in a fresh private directory (short, to stay under AF_UNIX limits)."""
    with tempfile.TemporaryDirectory(prefix="ftimer-") as d:
        yield pathlib.Path(d) / "timer.fifo"


T = TypeVar("T")


def open_descriptors() -> Set[str]:
    """This process's open descriptors, once earlier tests' garbage is collected (a
    client dropped while armed is held in a reference cycle until a collection closes
    its descriptor): the list ``opened_since`` compares with."""
    gc.collect()
    return set(os.listdir("/proc/self/fd"))


def opened_since(before: Set[str]) -> Set[str]:
    """The descriptors open now that were not in ``before``: what the code a test ran
    left open. Not the whole lists compared: another test's leftover thread (a server's
    closer, a peer's connection timing out) may close one of its own meanwhile."""
    return set(os.listdir("/proc/self/fd")) - before


def open_under(directory: pathlib.Path) -> List[str]:
    """Where this process's descriptors on files under ``directory`` lead, sorted: a
    test's own files, which no other test's leftover thread opens or closes."""
    found = []
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # closed since the listing
            target = os.readlink(f"/proc/self/fd/{name}")
            if target.startswith(f"{directory}{os.sep}"):
                found.append(target)
    return sorted(found)


def children_of(pid: int) -> List[int]:
    """The pids of ``pid``'s children (every thread's), as this process sees them."""
    found: List[int] = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            found += [int(p) for p in f.read().split()]
    return found


def wait_until(condition: Callable[[], Optional[T]], timeout: float = 15.0, what: str = "") -> T:
    """Poll ``condition`` until it returns something truthy, and return that: for effects
    with nothing to wait on explicitly.

    Raises:
        AssertionError: ``timeout`` seconds went by first (the message names ``what``).
    """
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what or condition}")
        time.sleep(0.01)


#: A worker script (``python -c ARMER FIFO``): arms "first", prints "armed", then arms the
#: scope named on each line of stdin, printing "armed" each time; keeps the FIFO open.
ARMER = """
import sys
from ftimer_client import FileTimerClient
client = FileTimerClient(sys.argv[1])
client.arm("first", 3600)
print("armed", flush=True)
for line in sys.stdin:
    client.arm(line.strip(), 3600)
    print("armed", flush=True)
"""


#: For tests of ``--pid 1`` refused: run with pid 1 as this process's parent (pytest
#: straight under a container's init), ``--pid 1`` names the calling process, as allowed.
parent_not_init = pytest.mark.skipif(
    os.getppid() == 1, reason="pid 1 is this process's parent: `--pid 1` names the caller here"
)


#: For tests that arm for this process, or run a command that arms for its parent: with
#: pytest as pid 1 (``docker run IMAGE pytest``, a PID namespace's first process), the
#: client refuses pid 1 as init, and this process's parent is outside its namespace.
not_pid_1 = pytest.mark.skipif(
    os.getpid() == 1,
    reason="pytest is pid 1 here, which the client refuses as init: run it under an init "
    "(docker run --init)",
)


@contextlib.contextmanager
def tmpfs(path: pathlib.Path, size: str) -> Iterator[pathlib.Path]:
    """A tmpfs of ``size`` (``64k``, ``1m``) mounted 0700 at ``path``, made here, for a
    disk that fills up; unmounted after. Skips where it cannot be mounted."""
    path.mkdir()
    mount = ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)]
    if subprocess.run(mount, capture_output=True, check=False).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True, check=False)


def in_private_pid_namespace(*argv: str) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` as pid 1 of a new PID namespace, or skip where that is not allowed."""
    unshare = shutil.which("unshare")
    if unshare is None:
        pytest.skip("needs unshare(1) from util-linux")
    probe = subprocess.run([unshare, "--pid", "--fork", "--mount-proc", "true"], check=False)
    if probe.returncode != 0:
        pytest.skip("cannot create a PID namespace here (needs root or user namespaces)")
    return subprocess.run(
        [unshare, "--pid", "--fork", "--mount-proc", *argv],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def on_other_clocks(
    script: str, *args: str, check: bool = False
) -> subprocess.CompletedProcess[str]:
    """``script`` run by this Python in a new time namespace whose CLOCK_MONOTONIC is
    11 s and CLOCK_BOOTTIME 3 s ahead of the host's (needs root and unshare(1))."""
    command = ["unshare", "--time", "--monotonic", "11", "--boottime", "3", "--fork"]
    return subprocess.run(
        [*command, sys.executable, "-c", script, *args], capture_output=True, text=True, check=check
    )
