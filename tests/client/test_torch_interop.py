"""ftimer-client and torch 2.13's timer, both ways (run by `nox -s interop`)."""

from __future__ import annotations

import contextlib
import inspect
import os
import pathlib
import signal
import subprocess
import sys
import textwrap
from types import ModuleType
from typing import Iterator

import pytest

from ftimer_client import FileTimerClient, expires
from ftimer_protocol import Arm, Disarm, TimerRequestV1

from .conftest import FifoPeer

pytestmark = pytest.mark.interop
ME = os.getpid()

TORCH_SERVER = textwrap.dedent(
    """
    import os, sys, time
    from torch.distributed.elastic.timer import FileTimerServer
    server = FileTimerServer(sys.argv[1], "run", max_interval=0.1, daemon=True)
    server.start()
    # start() returns before the server's thread has opened the FIFO; a blocking open
    # waits for it (the client's non-blocking open would fail with ENXIO until then).
    os.close(os.open(sys.argv[1], os.O_WRONLY))
    print("ready", flush=True)
    time.sleep(120)
    """
)
WORKER = textwrap.dedent(
    """
    import sys, time
    from ftimer_client import FileTimerClient, expires
    client = FileTimerClient(sys.argv[1], protocol=1)
    if sys.argv[2] == "healthy":
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:
            with expires(after=0.5, client=client):
                time.sleep(0.01)
    else:
        with expires(after=0.3, client=client):
            time.sleep(60)
    """
)


@contextlib.contextmanager
def torchs_server(fifo: str) -> Iterator[None]:
    """torch's server, serving ``fifo``, in a process of our own: after a reap, 2.13
    signals itself too."""
    with subprocess.Popen(
        [sys.executable, "-c", TORCH_SERVER, fifo], stdout=subprocess.PIPE, text=True
    ) as server:
        try:
            assert server.stdout is not None
            assert server.stdout.readline().strip() == "ready"
            yield
        finally:
            server.kill()


def test_protocol_1_client_against_torchs_server(
    tmp_path: pathlib.Path, torch_timer: ModuleType
) -> None:
    fifo = str(tmp_path / "torch.fifo")
    with torchs_server(fifo):
        healthy = subprocess.run([sys.executable, "-c", WORKER, fifo, "healthy"], timeout=60)
        assert healthy.returncode == 0  # released in time, many times: never reaped
        stuck = subprocess.run([sys.executable, "-c", WORKER, fifo, "stuck"], timeout=60)
        assert stuck.returncode == -signal.SIGKILL  # reaped by torch's server


def test_a_worker_of_torchs_agent_speaks_torchs_protocol_unasked(
    tmp_path: pathlib.Path, torch_timer: ModuleType
) -> None:
    # The environment torch's agent gives its workers when it runs its own server
    # (TORCHELASTIC_ENABLE_FILE_TIMER=1): ftimer's default protocol 2 would never be
    # kept by that server, so a stuck worker would never be reaped.
    fifo = str(tmp_path / "torch.fifo")
    env = {k: v for k, v in os.environ.items() if not k.startswith("FTIMER_")}
    env.update(TORCHELASTIC_ENABLE_FILE_TIMER="1", TORCHELASTIC_TIMER_FILE=fifo)
    worker = textwrap.dedent(
        """
        import time
        from ftimer_client import FileTimerClient, expires
        client = FileTimerClient()
        print(client.protocol, flush=True)
        with expires(after=0.3, client=client):
            time.sleep(60)
        """
    )
    with torchs_server(fifo):
        stuck = subprocess.run(
            [sys.executable, "-c", worker], env=env, stdout=subprocess.PIPE, text=True, timeout=60
        )
    assert stuck.stdout == "1\n"
    assert stuck.returncode == -signal.SIGKILL  # reaped by torch's server


def test_torchs_client_against_an_ftimer_reader(peer: FifoPeer, torch_timer: ModuleType) -> None:
    client = torch_timer.FileTimerClient(str(peer.path), signal=signal.SIGTERM)
    client.acquire("s", 1.7e9)
    client.release("s")
    assert peer.wait_count(2) == [
        TimerRequestV1(ME, "s", 1.7e9, 15),
        TimerRequestV1(ME, "s", -1, 0),
    ]


def test_protocol_1_lines_are_torchs_client_s_byte_for_byte(
    tmp_path: pathlib.Path, torch_timer: ModuleType
) -> None:
    # Non-ASCII scopes went out as UTF-8, which torch's server, reading in the locale's
    # encoding, cannot decode under an ASCII locale: its whole batch failed.
    fifo = tmp_path / "raw.fifo"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        for client in (
            torch_timer.FileTimerClient(str(fifo), signal=signal.SIGTERM),
            FileTimerClient(fifo, signal=signal.SIGTERM, protocol=1),
        ):
            client.acquire("schritt-\u00fc \U0001f600", 1.7e9 + 0.25)
            client.release("schritt-\u00fc \U0001f600")
        theirs_arm, theirs_release, arm, release = os.read(reader, 65536).splitlines()
    finally:
        os.close(reader)
    assert (arm, release) == (theirs_arm, theirs_release)
    assert arm.isascii()


def test_torchs_expires_drives_ftimers_client(peer: FifoPeer, torch_timer: ModuleType) -> None:
    torch_timer.configure(FileTimerClient(str(peer.path), labels={}))
    try:
        with torch_timer.expires(after=60, scope="s"):
            pass
    finally:
        torch_timer.configure(None)
    arm, disarm = peer.wait_count(2)
    assert isinstance(arm, Arm)
    assert arm.scope_id == "s"
    assert isinstance(disarm, Disarm)


def test_ftimers_expires_drives_torchs_client(peer: FifoPeer, torch_timer: ModuleType) -> None:
    with expires(after=60, scope="s", client=torch_timer.FileTimerClient(str(peer.path))):
        pass
    arm, release = peer.wait_count(2)
    assert isinstance(arm, TimerRequestV1)
    assert not arm.is_release
    assert isinstance(release, TimerRequestV1)
    assert release.is_release


def test_constructor_and_methods_accept_torchs_arguments(torch_timer: ModuleType) -> None:
    theirs = inspect.signature(torch_timer.FileTimerClient)
    ours = inspect.signature(FileTimerClient)
    assert list(theirs.parameters) == list(ours.parameters)[: len(theirs.parameters)]
    for method in ("acquire", "release"):
        assert list(
            inspect.signature(getattr(torch_timer.FileTimerClient, method)).parameters
        ) == list(inspect.signature(getattr(FileTimerClient, method)).parameters)


def test_a_scope_too_long_raises_what_torchs_client_raises(
    peer: FifoPeer, torch_timer: ModuleType
) -> None:
    # A program written for torch's API catches RuntimeError; ftimer's error is one too.
    for client in (torch_timer.FileTimerClient(str(peer.path)), FileTimerClient(str(peer.path))):
        with pytest.raises(RuntimeError, match="4096"):
            client.acquire("x" * 5000, 1.7e9)
