"""The daemon's words about incidents, as a hostile review found them wrong: a directory
that cannot be reached, or is a file, was "no incident directory"; an incident that
could not be written was announced as stored."""

from __future__ import annotations

import os
import pathlib
import re
import shutil
import subprocess
from typing import Callable, List

import pytest

from ftimer_server.daemon._cli import format_status, main

from .conftest import PATIENCE, PYTHON, DaemonProcess, Worker

NOBODY = 65534


def test_an_incident_directory_that_is_a_file_is_said_so(
    capsys: pytest.CaptureFixture[str], tmp_path: pathlib.Path
) -> None:
    directory = tmp_path / "incidents"
    directory.write_text("")
    for argv in (
        ["incidents", "--dir", str(directory)],
        ["incidents", "show", "--dir", str(directory)],
    ):
        assert main(argv) == 1
        _, err = capsys.readouterr()
        assert (
            err == f"ftimer-server: error: the incident directory {directory} is a regular file\n"
        )


def test_an_incident_directory_that_cannot_be_reached_is_said_so(short_dir: pathlib.Path) -> None:
    # There, kept from this user by its parent: not "the daemon makes it at its first
    # incident".
    parent = short_dir / "private"
    directory = parent / "incidents"
    directory.mkdir(parents=True)
    short_dir.chmod(0o755)
    command = [PYTHON, "-m", "ftimer_server", "incidents", "--dir", str(directory)]
    if os.geteuid() == 0:  # root reaches everything: asked by another user
        if shutil.which("setpriv") is None:
            pytest.skip("needs setpriv (util-linux) to run as another user")
        as_nobody = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
        probe = subprocess.run(
            [*as_nobody, PYTHON, "-c", "import ftimer_server"], capture_output=True, text=True
        )
        if probe.returncode != 0:  # a Python in root's home (pyenv's), say
            pytest.skip(f"uid {NOBODY} cannot run {PYTHON}: {probe.stderr.strip()}")
        parent.chmod(0o700)
        command = [*as_nobody, *command]
    else:
        parent.chmod(0o000)
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=PATIENCE)
    finally:
        parent.chmod(0o700)
    assert done.returncode == 1
    assert done.stderr == (
        f"ftimer-server: error: cannot reach the incident directory {directory}: "
        "Permission denied\n"
    )


def test_an_incident_not_written_is_not_announced_as_stored(
    spawn: Callable[..., DaemonProcess],
    worker: Callable[..., Worker],
    short_dir: pathlib.Path,
) -> None:
    # After "cannot write incident X: ... No space left on device", the daemon logged
    # "incident X (DIR):", as if it were there to read.
    incidents = short_dir / "incidents"
    d = spawn("--capture", "facts", "--incident-dir", str(incidents)).ready()
    incidents.rmdir()  # a file in its place: nothing can be written there
    incidents.write_text("")
    w = worker(d.fifo, "step", 0.2, 60)
    assert w.wait() == -9
    said = d.wait_for_record(where=lambda r: ", not kept " in r["msg"])
    ident = re.match(
        r"incident (\S+), not kept \(it could not be written to (.*)\):\n", said["msg"]
    )
    assert ident is not None, said["msg"]
    assert ident.group(2) == str(incidents)
    assert "\n  timer 'step' of pid" in said["msg"]  # its summary: all that is left of it
    messages: List[str] = [r["msg"] for r in d.records()]
    assert [m for m in messages if m.startswith(f"cannot write incident {ident.group(1)}: ")]
    assert [m for m in messages if m.startswith(f"incident {ident.group(1)} (")] == []
    # And status says so, as it says a state file not saved: it said "enforcing" alone.
    why = f"NotADirectoryError: [Errno 20] incident directory {incidents}: it is not a directory"
    assert d.status()["incidents_failing"] == why
    assert f", INCIDENTS NOT WRITTEN: {why}\n" in format_status(d.status())
    incidents.unlink()  # the operator mends it: the next incident is written, and said
    incidents.mkdir(0o700)
    assert worker(d.fifo, "step", 0.2, 60).wait() == -9
    d.wait_for_record(where=lambda r: re.match(r"incident \S+ \(", r["msg"]) is not None)
    assert d.status()["incidents_failing"] is None
    assert "INCIDENTS" not in format_status(d.status())
    assert d.stop() == 0
