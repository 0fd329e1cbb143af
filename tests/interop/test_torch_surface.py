"""Drop-in means torch's whole public surface: the same scenarios run with torch 2.13's
classes and with ftimer's, and every public name of torch's timer module has an ftimer
counterpart or a documented reason (docs/torchelastic.md).

Workers are `sleep` children of the test; torch's server is patched not to signal its own
process after a reap (torch 2.13 does; here that would be the test)."""

from __future__ import annotations

import json
import os
import pathlib
import re
import subprocess
import time
import types
from collections.abc import Iterator
from typing import Any, Callable, Dict, List, Tuple

import hypothesis.strategies as st
import pytest
from hypothesis import given

import ftimer_client
import ftimer_protocol
import ftimer_server

pytestmark = pytest.mark.interop

DOC = pathlib.Path(__file__).parents[2] / "docs" / "torchelastic.md"


@pytest.fixture
def sleepers() -> Iterator[Callable[[], subprocess.Popen[bytes]]]:
    started: List[subprocess.Popen[bytes]] = []

    def start() -> subprocess.Popen[bytes]:
        child = subprocess.Popen(["sleep", "60"])
        started.append(child)
        return child

    yield start
    for child in started:
        child.kill()
        child.wait()


@pytest.fixture(params=["torch", "ftimer"])
def kinds(request: pytest.FixtureRequest, torch_timer: types.ModuleType) -> Tuple[Any, Any]:
    """(server class, request class) of one library."""
    if request.param == "ftimer":
        return ftimer_server.FileTimerServer, ftimer_protocol.FileTimerRequest
    server = torch_timer.FileTimerServer
    reap = server._reap_worker

    class Server(server):  # type: ignore[misc, valid-type]
        def _reap_worker(self, worker_pid: int, signal: int) -> bool:
            return True if worker_pid == os.getpid() else bool(reap(self, worker_pid, signal))

    return Server, torch_timer.FileTimerRequest


def scopes(expired: Dict[int, List[Any]]) -> Dict[int, List[Tuple[str, int]]]:
    return {pid: sorted((r.scope_id, r.signal) for r in rs) for pid, rs in expired.items()}


def test_register_get_expired_and_clear(kinds: Tuple[Any, Any], tmp_path, sleepers) -> None:  # type: ignore[no-untyped-def]
    Server, Request = kinds
    server = Server(str(tmp_path / "timer.fifo"), "run-1", max_interval=0.05)
    a, b = sleepers(), sleepers()
    now = time.time()
    server.register_timers(
        [
            Request(a.pid, "s1", now - 1, 9),
            Request(a.pid, "s2", now + 100, 9),
            Request(b.pid, "s1", now - 2, 15),
        ]
    )
    assert scopes(server.get_expired_timers(now)) == {a.pid: [("s1", 9)], b.pid: [("s1", 15)]}
    [request] = server.get_expired_timers(now)[a.pid]
    assert request.expiration_time == pytest.approx(now - 1, abs=0.01)
    server.register_timers([Request(a.pid, "s1", -1, 0)])  # a release
    assert scopes(server.get_expired_timers(now)) == {b.pid: [("s1", 15)]}
    server.clear_timers({b.pid})
    assert scopes(server.get_expired_timers(now + 1000)) == {a.pid: [("s2", 9)]}
    assert a.poll() is None  # nothing reaped by any of these
    assert b.poll() is None


def test_clear_timers_drops_those_of_processes_gone_too(
    kinds: Tuple[Any, Any], tmp_path, sleepers
) -> None:  # type: ignore[no-untyped-def]
    # torch's drops them at every clear_timers(); ftimer's only once its loop saw the
    # exit, so a server not started (as torch's own tests use one) kept them.
    Server, Request = kinds
    server = Server(str(tmp_path / "timer.fifo"), "run-1", max_interval=0.05)
    a, b = sleepers(), sleepers()
    now = time.time()
    server.register_timers([Request(a.pid, "s", now + 100, 9), Request(b.pid, "s", now + 100, 9)])
    b.kill()
    b.wait()
    server.clear_timers(set())
    assert scopes(server.get_expired_timers(now + 1000)) == {a.pid: [("s", 9)]}
    assert a.poll() is None


def test_ftimers_server_takes_torchs_own_requests(  # type: ignore[no-untyped-def]
    torch_timer: types.ModuleType, tmp_path, sleepers
) -> None:
    server = ftimer_server.FileTimerServer(str(tmp_path / "timer.fifo"), "run-1")
    a = sleepers()
    now = time.time()
    server.register_timers([torch_timer.FileTimerRequest(a.pid, "s1", now - 1, 9)])
    assert scopes(server.get_expired_timers(now)) == {a.pid: [("s1", 9)]}
    server.register_timers([torch_timer.FileTimerRequest(a.pid, "s1", -1, 0)])
    assert server.get_expired_timers(now) == {}
    assert a.poll() is None


def test_is_process_running(kinds: Tuple[Any, Any], sleepers) -> None:  # type: ignore[no-untyped-def]
    Server, _ = kinds
    child = sleepers()
    assert Server.is_process_running(child.pid)
    child.kill()
    child.wait()
    assert not Server.is_process_running(child.pid)


def test_run_once_applies_what_was_written_and_reaps(
    kinds: Tuple[Any, Any],
    tmp_path: pathlib.Path,
    sleepers,  # type: ignore[no-untyped-def]
    monkeypatch: pytest.MonkeyPatch,
    torch_timer: types.ModuleType,
) -> None:
    Server, Request = kinds
    debug: List[Tuple[str, Dict[int, List[str]]]] = []

    def log_debug_info(run_id: str, expired: Dict[int, List[str]]) -> None:
        debug.append((run_id, expired))

    fifo = str(tmp_path / "timer.fifo")
    if Server is ftimer_server.FileTimerServer:
        server = Server(fifo, "run-7", max_interval=0.05, log_debug_info=log_debug_info)
    else:
        module = torch_timer.file_based_local_timer
        monkeypatch.setattr(module, "log_debug_info_for_expired_timers", log_debug_info)
        server = Server(fifo, "run-7", max_interval=0.05)
    server.start()
    stuck, fine = sleepers(), sleepers()
    fd = os.open(fifo, os.O_WRONLY)
    for request in (
        Request(stuck.pid, "step", time.time() - 1, 9),
        Request(fine.pid, "s", 1e12, 9),
    ):
        os.write(fd, (request.to_json() + "\n").encode())
    os.close(fd)
    server.run_once()
    assert stuck.wait(10) == -9
    assert fine.poll() is None
    [(run_id, expired)] = [d for d in debug if d[1]]
    assert run_id == "run-7"
    assert {pid: [json.loads(x)["scope_id"] for x in xs] for pid, xs in expired.items()} == {
        stuck.pid: ["step"]
    }


@given(
    pid=st.integers(1, 2**31 - 1),
    scope=st.text(max_size=30),
    expiration=st.floats(-1e12, 1e12, allow_nan=False),
    signal=st.integers(0, 64),
)
def test_file_timer_request_is_torchs(
    pid: int, scope: str, expiration: float, signal: int, torch_timer: types.ModuleType
) -> None:
    ours = ftimer_protocol.FileTimerRequest(pid, scope, expiration, signal)
    theirs = torch_timer.FileTimerRequest(pid, scope, expiration, signal)
    assert ours.to_json() == theirs.to_json()  # byte for byte
    assert (ours.worker_pid, ours.worker_id, ours.version) == (pid, pid, 1)
    assert ours == ftimer_protocol.FileTimerRequest(
        worker_pid=pid, scope_id=scope, expiration_time=expiration, signal=signal
    )
    assert ours != ftimer_protocol.FileTimerRequest(pid, scope + "x", expiration, signal)
    assert ftimer_server.FileTimerRequest is ftimer_protocol.FileTimerRequest


def public_names(module: types.ModuleType) -> List[str]:
    return sorted(
        n
        for n, v in vars(module).items()
        if not n.startswith("_") and not isinstance(v, types.ModuleType)
    )


def documented() -> Dict[str, str]:
    """The rows of the table of torch's names in docs/torchelastic.md: name -> ftimer."""
    section = DOC.read_text().split("## Every public name of torch's timer module", 1)[1]
    rows = re.findall(r"^\| `([A-Za-z_.()]+)` \| (.+?) \|", section, re.M)
    return dict(rows)


def test_every_public_name_has_a_counterpart_or_a_reason(torch_timer: types.ModuleType) -> None:
    ours = {*ftimer_client.__all__, *ftimer_server.__all__, *ftimer_protocol.__all__}
    rows = documented()
    for name in public_names(torch_timer):
        assert name in rows, f"{name} is not in the table of docs/torchelastic.md"
        if rows[name].startswith("`"):  # a counterpart, named: it must exist
            assert name in ours, f"{name} is documented as provided but is not exported"
    for cls, methods in (
        ("FileTimerServer", ftimer_server.FileTimerServer),
        ("FileTimerClient", ftimer_client.FileTimerClient),
        ("FileTimerRequest", ftimer_protocol.FileTimerRequest),
    ):
        theirs = getattr(torch_timer, cls)
        for member in dir(theirs):
            if member.startswith("_"):
                continue
            qualified = f"{cls}.{member}"
            assert hasattr(methods, member) or qualified in rows, (
                f"{qualified} has no counterpart and no documented reason"
            )


@pytest.fixture(params=["torch", "ftimer"])
def client_api(request: pytest.FixtureRequest, torch_timer: types.ModuleType) -> types.ModuleType:
    """The module whose FileTimerClient, configure and expires a scenario uses."""
    return torch_timer if request.param == "torch" else ftimer_client


def read_lines(fd: int) -> List[Dict[str, Any]]:
    data = b""
    while True:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            break
        if not chunk:
            break
        data += chunk
    return [json.loads(line) for line in data.splitlines()]


@pytest.fixture
def fifo_reader(tmp_path: pathlib.Path) -> Iterator[Tuple[str, int]]:
    path = str(tmp_path / "timer.fifo")
    os.mkfifo(path)
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    yield path, fd
    os.close(fd)


def test_a_subclass_that_overrides_acquire_and_release_is_called(
    client_api: types.ModuleType, fifo_reader: Tuple[str, int]
) -> None:
    path, fd = fifo_reader
    calls: List[Tuple[str, str]] = []

    class Traced(client_api.FileTimerClient):  # type: ignore[misc, name-defined]
        def acquire(self, scope_id: str, expiration_time: float) -> None:
            calls.append(("acquire", scope_id))
            super().acquire(scope_id, expiration_time)

        def release(self, scope_id: str) -> None:
            calls.append(("release", scope_id))
            super().release(scope_id)

    client_api.configure(timer_client=Traced(path))  # torch's keyword
    with client_api.expires(after=60, scope="step"):
        pass
    assert calls == [("acquire", "step"), ("release", "step")]
    assert len(read_lines(fd)) == 2  # and the requests went out


def test_the_signal_may_be_assigned(
    client_api: types.ModuleType, fifo_reader: Tuple[str, int]
) -> None:
    path, fd = fifo_reader
    client = client_api.FileTimerClient(path)
    client.signal = 15
    client.acquire("step", time.time() + 60)
    [line] = read_lines(fd)
    assert line["signal"] == 15
