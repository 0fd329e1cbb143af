"""Where a server listens by default, at its edges: the uid and environment it reads when
given none, a relative ``XDG_RUNTIME_DIR`` (from mutation testing of _paths.py)."""

from __future__ import annotations

import os

import pytest

from ftimer_protocol import SYSTEM_FIFO_PATH, default_fifo_path, default_socket_path


def test_a_relative_runtime_dir_is_not_used() -> None:
    """An ``XDG_RUNTIME_DIR`` that is not an absolute path is ignored, as if unset."""
    for runtime_dir in ("relative", "run/user/1000", "./x", "~/run"):
        env = {"XDG_RUNTIME_DIR": runtime_dir}
        assert default_fifo_path(1000, env) == "/tmp/ftimer-1000/timer.fifo"
        assert default_socket_path(1000, env) == "/tmp/ftimer-1000/timer.socket"


def test_an_empty_environment_given_is_read_not_this_processs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An environment passed in is the one read, even empty; None reads ``os.environ``."""
    monkeypatch.setenv("XDG_RUNTIME_DIR", "/run/user/1000")
    assert default_fifo_path(1000, {}) == "/tmp/ftimer-1000/timer.fifo"
    assert default_socket_path(1000, {}) == "/tmp/ftimer-1000/timer.socket"
    assert default_fifo_path(1000) == "/run/user/1000/ftimer/timer.fifo"


def test_the_uid_defaults_to_this_processs_effective_uid() -> None:
    """Given no uid, the path is that of this process's effective uid."""
    expected = default_fifo_path(os.geteuid(), {})
    assert default_fifo_path(None, {}) == expected
    assert default_fifo_path(environ={}) == expected
    if os.geteuid() == 0:
        assert expected == SYSTEM_FIFO_PATH
    else:
        assert expected == f"/tmp/ftimer-{os.geteuid()}/timer.fifo"


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to take another effective uid")
def test_the_effective_uid_not_the_real_one_decides() -> None:
    """A process whose effective uid differs from its real uid (root that dropped its
    effective uid) gets the effective uid's path."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: real uid 0, effective uid 65534
        try:
            os.close(read_end)
            os.seteuid(65534)
            os.write(write_end, default_fifo_path(environ={}).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    try:
        with os.fdopen(read_end, "rb") as f:
            path = f.read().decode()
    finally:
        os.waitpid(pid, 0)
    assert path == "/tmp/ftimer-65534/timer.fifo"
