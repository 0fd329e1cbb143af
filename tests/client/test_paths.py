"""Which FIFO or socket a client sends to when not told (pure: no file is looked at)."""

from __future__ import annotations

import errno
import os
import pathlib
import time

import pytest

from ftimer_client import FileTimerClient, ServerUnavailable, resolve_fifo_path
from ftimer_client._paths import TRANSPORTS, Route, resolve_route, torch_serves
from ftimer_client._transport import open_writer
from ftimer_protocol import SYSTEM_FIFO_PATH, SYSTEM_SOCKET_PATH

from .conftest import no


def test_argument_wins() -> None:
    env = {"FTIMER_FIFO": "/a", "TORCHELASTIC_TIMER_FILE": "/b"}
    assert resolve_fifo_path("/x", environ=env) == "/x"


def test_ftimer_fifo_then_torchelastic() -> None:
    env = {"FTIMER_FIFO": "/a", "TORCHELASTIC_TIMER_FILE": "/b"}
    assert resolve_fifo_path(environ=env, exists=no) == "/a"
    assert resolve_fifo_path(environ={"TORCHELASTIC_TIMER_FILE": "/b"}, exists=no) == "/b"
    assert resolve_fifo_path(environ={"FTIMER_FIFO": ""}, uid=1000, exists=no) == (
        "/tmp/ftimer-1000/timer.fifo"
    )


@pytest.mark.parametrize(
    ("uid", "env", "system_exists", "expected"),
    [
        (0, {}, False, SYSTEM_FIFO_PATH),
        (1000, {}, True, SYSTEM_FIFO_PATH),
        (1000, {}, False, "/tmp/ftimer-1000/timer.fifo"),
        (1000, {"XDG_RUNTIME_DIR": "/run/user/1000"}, False, "/run/user/1000/ftimer/timer.fifo"),
        (1000, {"XDG_RUNTIME_DIR": "/run/user/1000"}, True, SYSTEM_FIFO_PATH),
    ],
)
def test_server_default(uid: int, env: dict, system_exists: bool, expected: str) -> None:
    checked = []

    def exists(path: str) -> bool:
        checked.append(path)
        return system_exists

    assert resolve_fifo_path(environ=env, uid=uid, exists=exists) == expected
    assert checked in ([], [SYSTEM_FIFO_PATH])


def test_client_reads_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FTIMER_SOCKET", raising=False)
    monkeypatch.setenv("TORCHELASTIC_TIMER_FILE", "/from/torch")
    assert FileTimerClient().file_path == "/from/torch"
    monkeypatch.setenv("FTIMER_FIFO", "/from/ftimer")
    assert FileTimerClient().file_path == "/from/ftimer"
    assert FileTimerClient(os.fsencode("/p").decode()).file_path == "/p"


# -- the route: FIFO or socket --------------------------------------------------------------


def test_an_explicit_path_is_used_with_the_transport_asked_for() -> None:
    env = {"FTIMER_SOCKET": "/s", "FTIMER_FIFO": "/f"}
    assert resolve_route("/x", environ=env) == Route("/x", "auto")
    assert resolve_route("/x", transport="fifo", environ=env) == Route("/x", "fifo")
    assert resolve_route("/x", transport="socket", environ=env) == Route("/x", "socket")
    assert resolve_route("/x", protocol=1, environ=env) == Route("/x", "fifo")


def test_the_default_prefers_ftimer_socket_then_the_socket_beside_the_fifo() -> None:
    env = {"FTIMER_SOCKET": "/s", "FTIMER_FIFO": "/run/a.fifo"}
    assert resolve_route(environ=env, exists=no) == Route("/s", "socket")
    assert resolve_route(transport="socket", environ=env, exists=no) == Route("/s", "socket")
    del env["FTIMER_SOCKET"]
    assert resolve_route(environ=env, exists=no) == Route("/run/a.fifo", "auto", "/run/a.socket")
    assert resolve_route(transport="socket", environ=env, exists=no) == Route(
        "/run/a.socket", "socket"
    )
    torch = {"TORCHELASTIC_TIMER_FILE": "/tmp/t"}
    assert resolve_route(environ=torch, exists=no) == Route("/tmp/t", "auto", "/tmp/t.socket")


@pytest.mark.parametrize("kind", ["a regular file", "a directory", "a FIFO"])
def test_ftimer_socket_naming_something_else_says_it_is_not_a_socket(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    # The library took what was there for a FIFO: "not a FIFO" for a file, "cannot open
    # the FIFO" for a directory, and a FIFO there was written to as one (where `ftimer`
    # said "not a socket").
    path = tmp_path / "timer.socket"
    {"a regular file": path.touch, "a directory": path.mkdir, "a FIFO": lambda: os.mkfifo(path)}[
        kind
    ]()
    monkeypatch.setenv("FTIMER_SOCKET", str(path))
    with pytest.raises(ServerUnavailable, match=f"not a socket but {kind}"):
        FileTimerClient().acquire("step", time.time() + 60)


def test_fifo_and_protocol_1_never_look_for_a_socket() -> None:
    env = {"FTIMER_SOCKET": "/s", "FTIMER_FIFO": "/f.fifo"}
    assert resolve_route(transport="fifo", environ=env, exists=no) == Route("/f.fifo", "fifo")
    assert resolve_route(protocol=1, environ=env, exists=no) == Route("/f.fifo", "fifo")
    with pytest.raises(ValueError, match="FIFO only"):
        resolve_route(protocol=1, transport="socket")
    with pytest.raises(ValueError, match="transport must be one of"):
        resolve_route(transport="tcp")


@pytest.mark.parametrize("present", [SYSTEM_FIFO_PATH, SYSTEM_SOCKET_PATH])
def test_a_non_root_worker_next_to_a_root_daemon_finds_its_socket(present: str) -> None:
    route = resolve_route(uid=1000, environ={}, exists=lambda path: path == present)
    assert route == Route(SYSTEM_FIFO_PATH, "auto", SYSTEM_SOCKET_PATH)
    alone = resolve_route(uid=1000, environ={}, exists=no)
    assert alone == Route(
        "/tmp/ftimer-1000/timer.fifo", "auto", "/tmp/ftimer-1000/timer.socket", owner=1000
    )
    # The FIFO's own resolution is unchanged: only a system FIFO counts there.
    assert resolve_fifo_path(uid=1000, environ={}, exists=lambda p: p == SYSTEM_SOCKET_PATH) == (
        "/tmp/ftimer-1000/timer.fifo"
    )


def test_the_client_reports_its_route(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FTIMER_SOCKET", raising=False)
    monkeypatch.setenv("FTIMER_FIFO", "/from/ftimer.fifo")
    client = FileTimerClient()
    assert (client.file_path, client.transport) == ("/from/ftimer.fifo", "auto")
    assert "transport='auto'" in repr(client)
    assert FileTimerClient(transport="fifo").transport == "fifo"
    monkeypatch.setenv("FTIMER_SOCKET", "/from/ftimer.socket")
    assert FileTimerClient().file_path == "/from/ftimer.socket"
    with pytest.raises(ValueError, match="transport"):
        FileTimerClient(transport="udp")


TORCH_AGENT = {"TORCHELASTIC_ENABLE_FILE_TIMER": "1", "TORCHELASTIC_TIMER_FILE": "/t/w.fifo"}


def test_torch_serves_the_fifo_its_agent_gives_when_it_runs_its_own_timer() -> None:
    def route(path: str | None = None, **env: str) -> Route:
        return resolve_route(path, environ={**TORCH_AGENT, **env}, exists=no)

    assert torch_serves(route(), TORCH_AGENT)
    assert torch_serves(route("/t/w.fifo"), TORCH_AGENT)  # torch's docs pass it explicitly
    # Another path, FTIMER_FIFO or FTIMER_SOCKET first, or a socket: not torch's server.
    assert not torch_serves(route("/elsewhere.fifo"), TORCH_AGENT)
    assert not torch_serves(route(FTIMER_FIFO="/d/timer.fifo"), TORCH_AGENT)
    assert not torch_serves(route(FTIMER_SOCKET="/d/timer.socket"), TORCH_AGENT)
    assert not torch_serves(Route("/t/w.fifo", "socket"), TORCH_AGENT)
    # The agent runs no server of its own (ftimer's daemon or embedded server serves it).
    for enabled in ("", "0"):
        env = {**TORCH_AGENT, "TORCHELASTIC_ENABLE_FILE_TIMER": enabled}
        assert not torch_serves(route(), env)
    assert not torch_serves(Route("/t/w.fifo", "auto"), {"TORCHELASTIC_TIMER_FILE": "/t/w.fifo"})


def test_torch_serves_a_fifo_reached_by_another_name(tmp_path: os.PathLike[str]) -> None:
    fifo = os.path.join(tmp_path, "w.fifo")
    os.mkfifo(fifo)
    os.symlink(fifo, os.path.join(tmp_path, "link"))
    env = {**TORCH_AGENT, "TORCHELASTIC_TIMER_FILE": fifo}
    assert torch_serves(Route(os.path.join(tmp_path, "link"), "auto"), env)


def test_a_client_at_torchs_own_server_speaks_protocol_1(
    monkeypatch: pytest.MonkeyPatch, tmp_path: os.PathLike[str]
) -> None:
    fifo = os.path.join(tmp_path, "w.fifo")
    for name in ("FTIMER_FIFO", "FTIMER_SOCKET", "FTIMER_DUMP_SIGNAL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("TORCHELASTIC_ENABLE_FILE_TIMER", "1")
    monkeypatch.setenv("TORCHELASTIC_TIMER_FILE", fifo)
    assert FileTimerClient().protocol == 1
    assert FileTimerClient(protocol=2).protocol == 2  # asked for: ftimer's server there
    assert FileTimerClient(os.path.join(tmp_path, "other.fifo")).protocol == 2
    # A hook torch's format cannot announce: off, with a warning, not a failed start.
    with pytest.warns(RuntimeWarning, match="torch's own server"):
        client = FileTimerClient(dump_signal="SIGUSR2")
    assert (client.protocol, client.dump_hook) == (1, None)
    # Labels too (they were dropped without a word).
    with pytest.warns(RuntimeWarning, match="^labels and dump_signal are ignored: the FIFO"):
        client = FileTimerClient(labels={"job": "x"}, dump_signal="SIGUSR2")
    assert (client.protocol, client.dump_hook) == (1, None)


def test_another_users_directory_at_the_per_user_default_is_refused(
    tmp_path: pathlib.Path,
) -> None:
    # /tmp/ftimer-UID is a guessable name in a directory everyone may write: another
    # user who made it first, with a FIFO read by their own process, received every
    # timer of this user's workers (their scopes and pids), and the workers went
    # unwatched without a word.
    if os.geteuid() != 0:
        pytest.skip("giving a directory to another user needs root")
    runtime = tmp_path / "run"
    planted = runtime / "ftimer"
    planted.mkdir(parents=True)
    os.mkfifo(planted / "timer.fifo")
    them, me = 65534, 65533  # the directory's user, and the user resolving the default
    os.chown(planted, them, -1)
    reader = os.open(planted / "timer.fifo", os.O_RDONLY | os.O_NONBLOCK)
    try:
        env = {"XDG_RUNTIME_DIR": str(runtime)}
        for transport in TRANSPORTS:
            route = resolve_route(uid=me, environ=env, transport=transport, exists=no)
            with pytest.raises(ServerUnavailable) as refused:
                open_writer(route, keep_open=True, pidfd=lambda: -1)
            assert refused.value.errno == errno.EPERM
            assert f"its directory {planted} is uid {them}'s, not this user's ({me})" in str(
                refused.value
            )
        # Their own default is theirs: it opens.
        route = resolve_route(uid=them, environ=env, transport="fifo", exists=no)
        open_writer(route, keep_open=True, pidfd=lambda: -1).close()
        assert os.read(reader, 1) == b""  # nothing was written
    finally:
        os.close(reader)
