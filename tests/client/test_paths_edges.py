"""Edges of where a client sends: FIFO-only routes, empty variables, torch's relative FIFO."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

from ftimer_client._paths import Route, hidden_system_dir, resolve_route, system_route, torch_serves
from ftimer_protocol import SYSTEM_FIFO_PATH, SYSTEM_SOCKET_PATH

from .conftest import no


def only_the_system_socket(path: str) -> bool:
    return path == SYSTEM_SOCKET_PATH


def test_a_fifo_route_ignores_the_system_daemons_socket() -> None:
    """transport="fifo" takes the system FIFO for a non-root user only when that FIFO exists."""
    route = resolve_route(transport="fifo", uid=1000, environ={}, exists=only_the_system_socket)
    assert route == Route("/tmp/ftimer-1000/timer.fifo", "fifo", owner=1000)
    route = resolve_route(protocol=1, uid=1000, environ={}, exists=only_the_system_socket)
    assert route == Route("/tmp/ftimer-1000/timer.fifo", "fifo", owner=1000)


def test_a_per_user_fifo_route_moves_to_the_daemon_only_once_its_fifo_exists() -> None:
    """system_route() of a FIFO route waits for the system FIFO; the socket alone is not it."""
    fifo = Route("/tmp/ftimer-1000/timer.fifo", "fifo", owner=1000)
    assert system_route(fifo, only_the_system_socket) is None
    assert system_route(fifo, lambda path: path == SYSTEM_FIFO_PATH) == Route(
        SYSTEM_FIFO_PATH, "fifo"
    )
    auto = Route("/tmp/ftimer-1000/timer.fifo", "auto", "/tmp/ftimer-1000/timer.socket", 1000)
    assert system_route(auto, only_the_system_socket) == Route(
        SYSTEM_FIFO_PATH, "auto", SYSTEM_SOCKET_PATH
    )
    socket = Route("/tmp/ftimer-1000/timer.socket", "socket", owner=1000)
    assert system_route(socket, only_the_system_socket) == Route(SYSTEM_SOCKET_PATH, "socket")


def test_a_route_not_the_per_user_default_never_moves_to_the_daemon() -> None:
    """system_route() is None for a path given (owner None), even with the daemon's files there."""
    for route in (
        Route("/srv/job.fifo", "fifo"),
        Route("/srv/job.fifo", "auto"),
        Route("/srv/job.socket", "socket"),
        Route(SYSTEM_FIFO_PATH, "auto", SYSTEM_SOCKET_PATH),
    ):
        assert system_route(route, lambda path: True) is None


def test_an_empty_ftimer_socket_is_unset() -> None:
    """FTIMER_SOCKET="" names no socket: the route falls through to the FIFO's resolution."""
    env = {"FTIMER_SOCKET": "", "FTIMER_FIFO": "/run/a.fifo"}
    assert resolve_route(environ=env, exists=no) == Route("/run/a.fifo", "auto", "/run/a.socket")
    assert resolve_route(transport="socket", environ=env, exists=no) == Route(
        "/run/a.socket", "socket"
    )


def test_torch_serves_its_relative_fifo_before_it_exists(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A relative $TORCHELASTIC_TIMER_FILE is torch's FIFO at its absolute path, made or not."""
    monkeypatch.chdir(tmp_path)
    env = {"TORCHELASTIC_ENABLE_FILE_TIMER": "1", "TORCHELASTIC_TIMER_FILE": "w.fifo"}
    route = resolve_route(environ=env, exists=no)
    assert route.path == str(tmp_path / "w.fifo")
    assert not os.path.exists(route.path)
    assert torch_serves(route, env)


def test_a_missing_system_fifo_gives_no_hint() -> None:
    """With no /run/ftimer at all, a missing FIFO's error gets no "does not let this user in"."""
    if os.path.lexists(os.path.dirname(SYSTEM_FIFO_PATH)):
        pytest.skip(f"{os.path.dirname(SYSTEM_FIFO_PATH)} exists on this host")
    assert hidden_system_dir("/tmp/ftimer-test/timer.fifo") == ""


def test_the_default_fifo_is_the_effective_users() -> None:
    """A process whose effective uid is not its real uid resolves the effective user's FIFO."""
    if os.geteuid() != 0:
        pytest.skip("changing the effective uid needs root")
    code = (
        "import os\n"
        "from ftimer_client._paths import resolve_route\n"
        "os.setresuid(0, 65534, 0)\n"
        "print(resolve_route(environ={}, exists=lambda p: False))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    expected = Route("/tmp/ftimer-65534/timer.fifo", "auto", "/tmp/ftimer-65534/timer.socket")
    assert done.stdout.strip() == repr(expected._replace(owner=65534))


def test_torch_serves_nothing_when_its_agent_names_no_fifo() -> None:
    """TORCHELASTIC_ENABLE_FILE_TIMER=1 without TORCHELASTIC_TIMER_FILE: not torch's server."""
    for env in (
        {"TORCHELASTIC_ENABLE_FILE_TIMER": "1"},
        {"TORCHELASTIC_ENABLE_FILE_TIMER": "1", "TORCHELASTIC_TIMER_FILE": ""},
    ):
        assert not torch_serves(Route("/srv/job.fifo", "auto"), env)
        assert not torch_serves(Route("", "fifo"), env)


def test_a_relative_path_with_the_working_directory_removed_is_kept_as_given(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A relative path resolved after the working directory was removed stays relative."""
    gone = tmp_path / "gone"
    gone.mkdir()
    monkeypatch.chdir(gone)
    gone.rmdir()
    assert resolve_route("job.fifo", environ={}) == Route("job.fifo", "auto")
    assert resolve_route(environ={"FTIMER_FIFO": "job.fifo"}, exists=no) == Route(
        "job.fifo", "auto", "job.socket"
    )


def test_only_root_defaults_to_the_system_daemon_without_its_files() -> None:
    """Root gets the system FIFO as the daemon's (owner None); uid 1 gets its per-user default."""
    assert resolve_route(uid=0, environ={}, exists=no) == Route(
        SYSTEM_FIFO_PATH, "auto", SYSTEM_SOCKET_PATH
    )
    assert resolve_route(uid=0, transport="fifo", environ={}, exists=no) == Route(
        SYSTEM_FIFO_PATH, "fifo"
    )
    assert resolve_route(uid=1, transport="fifo", environ={}, exists=no) == Route(
        "/tmp/ftimer-1/timer.fifo", "fifo", owner=1
    )


def test_no_hint_for_a_path_in_the_system_directory() -> None:
    """hidden_system_dir() of the system FIFO's own path is an empty string, never None."""
    assert hidden_system_dir(SYSTEM_FIFO_PATH) == ""
    assert hidden_system_dir(SYSTEM_SOCKET_PATH) == ""


def test_an_empty_path_given_stays_empty() -> None:
    """An explicit "" is not made absolute (the working directory is no FIFO of anyone's)."""
    assert resolve_route("", environ={}) == Route("", "auto")
    assert resolve_route("", transport="socket", environ={}) == Route("", "socket")
