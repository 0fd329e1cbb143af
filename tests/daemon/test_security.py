"""Who may write the FIFO and whom a root daemon may signal: start-up warnings, and
workers of another user reaching the FIFO (a real second uid, through ``setpriv``)."""

from __future__ import annotations

import os
from typing import Callable

import pytest

from ftimer_server.daemon._config import DaemonConfig
from ftimer_server.daemon._daemon import startup_warnings

from .conftest import DaemonProcess

Spawn = Callable[..., DaemonProcess]
ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not ROOT, reason="needs root (a root daemon)")

ROOT_RISK = "running as root with no --allow-uid"
WORLD_WRITABLE = "lets every local user write the FIFO"


def warnings_of(d: DaemonProcess) -> list[str]:
    return [
        r["msg"] for r in d.records() if r["level"] == "warning" and r["logger"].endswith("daemon")
    ]


@needs_root
def test_a_root_daemon_whose_fifo_others_may_write_warns_once_without_allow_uid(
    spawn: Spawn,
) -> None:
    d = spawn("--fifo-mode", "0620", "--fifo-group", "4242").ready()
    # The warnings are logged before READY=1: the log is complete here.
    (warning,) = warnings_of(d)
    assert warning.startswith(ROOT_RISK)
    assert "any member of group 4242" in warning
    assert "any process of any user signalled" in warning
    assert "--allow-uid" in warning and "--fifo-mode 0600" in warning
    assert d.stop() == 0


@needs_root
@pytest.mark.parametrize(
    "args",
    [
        [],  # 0600: only root writes, and root may signal anything anyway
        ["--fifo-mode", "0620", "--fifo-group", "4242", "--allow-uid", "4243"],
    ],
)
def test_no_warning_when_only_root_writes_or_targets_are_restricted(
    spawn: Spawn, args: list[str]
) -> None:
    d = spawn(*args).ready()
    assert warnings_of(d) == []
    assert d.stop() == 0


@needs_root
def test_a_world_writable_fifo_is_accepted_with_a_warning(spawn: Spawn) -> None:
    d = spawn("--fifo-mode", "0666", "--allow-uid", "4243").ready()
    (warning,) = warnings_of(d)
    assert warning.startswith("--fifo-mode 0666 " + WORLD_WRITABLE)
    assert d.stop() == 0


def test_startup_warnings_for_each_user_and_mode() -> None:
    fifo = "/run/ftimer/timer.fifo"
    plain = DaemonConfig(fifo=fifo)
    assert startup_warnings(plain, euid=0) == []
    group = DaemonConfig(fifo=fifo, fifo_mode=0o620)
    (root,) = startup_warnings(group, euid=0)
    assert "any member of the daemon's group" in root
    assert startup_warnings(group, euid=1000) == []  # it can signal only its own user's
    world = DaemonConfig(fifo=fifo, fifo_mode=0o622, descendants_only=True)
    mode, root = startup_warnings(world, euid=0)
    assert mode.startswith("--fifo-mode 0622 " + WORLD_WRITABLE)
    assert "any local user" in root and "any descendant of the daemon" in root
    (mode,) = startup_warnings(world, euid=1000)
    assert mode.startswith("--fifo-mode 0622")
    allowed = DaemonConfig(fifo=fifo, fifo_mode=0o620, allow_uids=frozenset({1000}))
    assert startup_warnings(allowed, euid=0) == []
