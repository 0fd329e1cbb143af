"""The ``ftimer`` command's messages are plain lines for a person: no Python repr of a
message, no float repr of a deadline, what a wrong path really is, the path of the
socket that stalled."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest
from tests.conftest import not_pid_1

from ftimer_client._cli import EXIT_UNAVAILABLE, EXIT_USAGE, main
from ftimer_protocol import Arm

from .conftest import FifoPeer, SocketPeer

FTIMER = [sys.executable, "-m", "ftimer_client"]


@pytest.mark.parametrize(
    "argv",
    [
        ["arm", "--scope", "\udcff\udcfe", "--after", "5"],
        ["arm", "--scope", "s", "--after", "5", "--label", "job=\udcff"],
        ["exec", "--scope", "\udcff", "--after", "5", "--", "true"],
    ],
)
def test_text_that_is_not_utf8_is_a_usage_error_shown_plainly(
    peer: FifoPeer, argv: list, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([argv[0], "--fifo", str(peer.path), *argv[1:]]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "not UTF-8 text: '" in err
    assert "\\xff" in err
    assert "Arm(" not in err
    assert "surrogates" not in err
    assert peer.messages == []


def test_a_command_named_by_bytes_not_utf8_gets_a_scope_the_wire_carries(
    peer: FifoPeer,
) -> None:
    done = subprocess.run(
        [*FTIMER, "exec", "--fifo", str(peer.path), "--after", "60", "--", "\udcff"],
        capture_output=True,
        text=True,
        errors="surrogateescape",
        timeout=30,
    )
    assert done.returncode == 127  # no such command: but it was armed, then disarmed
    assert done.stderr == "ftimer: \\xff: [Errno 2] No such file or directory\n"
    arm = peer.wait_count(1)[0]
    assert isinstance(arm, Arm)
    assert arm.scope_id == "exec:\\xff"


@pytest.mark.parametrize("after", ["1e300", "1e20"])
def test_a_duration_too_large_is_a_usage_error_in_seconds(
    peer: FifoPeer, after: str, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["arm", "--fifo", str(peer.path), "--scope", "s", "--after", after]
    assert main(argv) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "argument --after: at most " in err
    assert f"seconds, not '{after}'" in err
    assert "deadline" not in err
    assert "e+" not in err


@pytest.mark.parametrize(("kind", "words"), [("dir", "a directory"), ("file", "a regular file")])
@not_pid_1
def test_socket_naming_something_else_says_what_it_is(
    tmp_path: pathlib.Path, kind: str, words: str, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "thing"
    if kind == "dir":
        path.mkdir()
    else:
        path.write_text("")
    argv = ["arm", "--socket", str(path), "--scope", "s", "--after", "5"]
    assert main(argv) == EXIT_UNAVAILABLE
    err = capsys.readouterr().err
    assert f"not a socket but {words}" in err
    assert "a FIFO?" not in err


@pytest.mark.skipif(not hasattr(os, "pidfd_open"), reason="the socket transport is Linux's")
def test_a_stalled_socket_found_by_default_is_named_by_its_path(
    fifo_path: pathlib.Path, socket_path: pathlib.Path
) -> None:
    peer = SocketPeer(socket_path)  # the socket beside $FTIMER_FIFO, found by default
    try:
        peer.pause()  # the datagram is queued, never read
        done = subprocess.run(
            [*FTIMER, "arm", "--scope", "s", "--after", "60", "--write-timeout", "0.2"],
            capture_output=True,
            text=True,
            timeout=30,
            env={**os.environ, "FTIMER_FIFO": str(fifo_path)},
        )
    finally:
        peer.close()
    assert done.returncode == EXIT_UNAVAILABLE
    assert done.stderr.splitlines() == [
        "ftimer: [Errno 11] the ftimer server has not confirmed the message in 0.2 s (is "
        "it stopped?): it refuses it if it reads it once this command has exited, and "
        f"takes it only if it read it just before: '{socket_path}'"
    ]
