"""A log file path that holds a FIFO (or another non-regular file) is refused, at start
and on SIGHUP, without ever blocking the daemon in ``open()``."""

from __future__ import annotations

import json
import logging
import os
import pathlib
import signal
from typing import Callable

import pytest

from ftimer_server.daemon._logging import LogFileError, LoggingSetup, ReopenableFileHandler

from .conftest import PATIENCE, DaemonProcess, unblocked


def test_a_fifo_log_file_is_refused(tmp_path: pathlib.Path) -> None:
    fifo = tmp_path / "log.fifo"
    os.mkfifo(fifo)
    error = unblocked(lambda: ReopenableFileHandler(str(fifo)), fifo, writing=True)
    assert isinstance(error, LogFileError)
    assert str(error) == f"{fifo} is a FIFO, not a regular file"


def test_a_read_fifo_log_file_is_refused_too(tmp_path: pathlib.Path) -> None:
    # With a reader, a write-open succeeds: the file is judged on its descriptor.
    fifo = tmp_path / "log.fifo"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        error = unblocked(lambda: ReopenableFileHandler(str(fifo)), fifo, writing=True)
    finally:
        os.close(reader)
    assert isinstance(error, LogFileError)
    assert str(error) == f"{fifo} is a FIFO, not a regular file"


def test_a_symlinked_log_file_is_refused(tmp_path: pathlib.Path) -> None:
    (tmp_path / "real.log").write_text("")
    link = tmp_path / "ftimer.log"
    link.symlink_to(tmp_path / "real.log")
    with pytest.raises(LogFileError, match="is a symlink"):
        ReopenableFileHandler(str(link))


def test_reopen_onto_a_fifo_keeps_the_old_file(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "ftimer.log"
    setup = LoggingSetup("json", "info", log_file=str(path))
    log = logging.getLogger("ftimer_server.test")
    try:
        log.info("before rotation")
        path.rename(tmp_path / "ftimer.log.1")
        os.mkfifo(path)
        error = unblocked(setup.reopen, path, writing=True)
        assert isinstance(error, LogFileError)
        log.info("after the failed reopen")
    finally:
        setup.close()
    old = (tmp_path / "ftimer.log.1").read_text().splitlines()
    assert [json.loads(line)["msg"] for line in old] == [
        "before rotation",
        "after the failed reopen",
    ]


def test_the_daemon_refuses_a_fifo_log_file_at_start(
    spawn: Callable[..., DaemonProcess], short_dir: pathlib.Path
) -> None:
    fifo = short_dir / "log.fifo"
    os.mkfifo(fifo)
    d = spawn("--log-file", str(fifo))  # the last --log-file counts
    assert d.proc.wait(PATIENCE) == 3  # like a log file that is not writable
    assert d.proc.stderr is not None
    assert d.proc.stderr.read() == (
        f"ftimer-server: error: cannot open the log file: {fifo} is a FIFO, not a regular file\n"
    )


def test_a_fifo_put_in_place_of_the_log_file_leaves_the_daemon_working(
    spawn: Callable[..., DaemonProcess],
) -> None:
    d = spawn().ready()
    rotated = d.log.with_name(d.log.name + ".1")
    d.log.rename(rotated)
    os.mkfifo(d.log)
    d.notify.received.clear()
    d.proc.send_signal(signal.SIGHUP)
    d.notify.wait_for("READY=1", alive=lambda: d.proc.poll() is None)  # the reload is done
    assert d.stop() == 0  # SIGTERM is heard
    records = [json.loads(line) for line in rotated.read_text().splitlines()]
    (error,) = [r for r in records if r["msg"].startswith("cannot reopen the log file")]
    assert error["level"] == "error"
    assert error["msg"].endswith(f"{d.log} is a FIFO, not a regular file")
    assert records[-1]["msg"] == "stopped"  # still logging to the old file
    assert "log file reopened" not in [r["msg"] for r in records]  # it said so, after that
