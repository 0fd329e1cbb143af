"""An embedded server, as a review of it found it: a stuck worker that escaped when Ctrl-C
or a signal handler's sys.exit() ended run(), torch hook points overridden by a mixin or
on the instance without a word, and a FIFO path that cannot be used raising what torch
code catching OSError misses.

Every process signalled here is one these tests started (the script running a server,
its child that ignores SIGTERM, the capture tool of a server started here).
"""

from __future__ import annotations

import copy
import errno
import os
import pathlib
import pickle
import signal
import subprocess
import sys
import threading
import time
import warnings
from typing import List

import pytest

from ftimer_server import (
    Escalated,
    Expired,
    FifoBusy,
    FifoError,
    FileTimerRequest,
    FileTimerServer,
    IncidentOptions,
    Lifecycle,
    Reaped,
    open_fifo,
)
from ftimer_server.server import _fifo

from .conftest import NOBODY, STUBBORN, ready_child, run_as_nobody, wait_exit

# -- Ctrl-C or sys.exit() ending run() ---------------------------------------------------

#: Runs a server in the main thread with a worker (argv[4:], it ignores SIGTERM) whose
#: reap is pending: in its grace before SIGKILL, or waiting for a capture that never
#: answers. Says "pending" then, and waits for Ctrl-C (SIGINT) or SIGTERM, whose handler
#: calls sys.exit(); prints what ended run(), then how the worker ended.
RUN_INTERRUPTED = """
import os, signal, subprocess, sys, time
from ftimer_server import Expired, FileTimerRequest, FileTimerServer, IncidentOptions, Reaped
fifo, pending, py_spy = sys.argv[1:4]
signal.signal(signal.SIGINT, signal.default_int_handler)  # not SIG_IGN, if inherited so
signal.signal(signal.SIGTERM, lambda *_: sys.exit(3))
worker = subprocess.Popen(sys.argv[4:], stdout=subprocess.PIPE)
assert worker.stdout.readline() == b"ready\\n"
if pending == "grace":  # SIGTERM, ignored: the SIGKILL is due in an hour
    options = dict(signal_override=signal.SIGTERM, escalate_after=3600.0)
    cue = Reaped
else:  # the SIGKILL waits for the capture
    incidents = os.path.join(os.path.dirname(fifo), "incidents")
    options = dict(incidents=IncidentOptions(directory=incidents, method="py-spy", py_spy=py_spy))
    cue = Expired
def on_event(event):
    if isinstance(event, cue):
        print("pending", flush=True)
server = FileTimerServer(fifo, on_event=on_event, **options)
server.register_timers([FileTimerRequest(worker.pid, "step", time.time(), signal.SIGKILL)])
try:
    server.run()
except (KeyboardInterrupt, SystemExit) as e:
    print(type(e).__name__, server.state.value, flush=True)
try:
    print(worker.wait(timeout=5), flush=True)
finally:
    worker.kill()
    worker.wait()
"""


@pytest.mark.parametrize("pending", ["grace", "capture"])
@pytest.mark.parametrize(
    ("sent", "ended"),
    [
        pytest.param(signal.SIGINT, "KeyboardInterrupt", id="ctrl-c"),
        pytest.param(signal.SIGTERM, "SystemExit", id="sys.exit"),
    ],
)
def test_run_ended_by_ctrl_c_or_sys_exit_signals_the_pending_reaps(
    fifo_path: pathlib.Path, tmp_path: pathlib.Path, sent: int, ended: str, pending: str
) -> None:
    # Only stop() signalled them: the stuck worker outlived the server, never killed.
    py_spy = tmp_path / "py-spy"  # never answers
    py_spy.write_text("#!/bin/sh\nexec sleep 3600\n")
    py_spy.chmod(0o755)
    script = [sys.executable, "-c", RUN_INTERRUPTED, str(fifo_path), pending, str(py_spy)]
    with subprocess.Popen(
        [*script, *STUBBORN], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    ) as run:
        try:
            assert run.stdout is not None
            assert run.stdout.readline() == "pending\n"
            run.send_signal(sent)  # from outside, as a terminal's Ctrl-C or systemd's stop
            out, err = run.communicate(timeout=30)
        finally:
            run.kill()
    assert out.splitlines() == [f"{ended} stopped", "-9"], err
    assert "reaps finished now" in err


def test_a_dry_run_stop_does_not_claim_to_signal(
    fifo_path: pathlib.Path, tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Its stop finishes the reap waiting for a capture: as a dry run, which signals nobody.
    py_spy = tmp_path / "py-spy"  # never answers
    py_spy.write_text("#!/bin/sh\nexec sleep 3600\n")
    py_spy.chmod(0o755)
    expired = threading.Event()
    server = FileTimerServer(
        str(fifo_path),
        dry_run=True,
        incidents=IncidentOptions(
            directory=str(tmp_path / "incidents"), method="py-spy", py_spy=str(py_spy)
        ),
        on_event=lambda event: isinstance(event, Expired) and expired.set(),
    )
    with ready_child(STUBBORN) as worker:
        server.register_timers([FileTimerRequest(worker.pid, "step", time.time(), signal.SIGKILL)])
        server.start()
        try:
            assert expired.wait(10)
        finally:
            with caplog.at_level("WARNING", logger="ftimer_server"):
                server.stop()
        assert worker.poll() is None
    (stopping,) = [r.getMessage() for r in caplog.records if "stopping" in r.getMessage()]
    assert "1 reaps finished now" in stopping
    assert "signalled" not in stopping


def test_a_second_interruption_while_stopping_does_not_hide_the_first(
    fifo_path: pathlib.Path, caplog: pytest.LogCaptureFixture
) -> None:
    # The first is what ended run(): the stop's own reaps run after it, and what
    # interrupts them is logged, not raised in its place.
    first = KeyboardInterrupt("first")

    def on_event(event: object) -> None:
        if isinstance(event, Reaped):  # the worker in its grace: Ctrl-C
            raise first
        if isinstance(event, Escalated):  # the stop's SIGKILL: Ctrl-C again
            raise KeyboardInterrupt("second")

    ended: List[BaseException] = []

    def serve() -> None:
        try:
            server.run()
        except BaseException as e:
            ended.append(e)

    with ready_child(STUBBORN) as child:
        server = FileTimerServer(fifo_path, on_event=on_event, escalate_after=3600)
        request = FileTimerRequest(child.pid, "step", time.time(), signal.SIGTERM)
        server.register_timers([request])
        runner = threading.Thread(target=serve)
        runner.start()
        runner.join(30)
        assert not runner.is_alive()
        assert wait_exit(child)[0] == -signal.SIGKILL
    assert len(ended) == 1
    assert ended[0] is first
    assert server.state is Lifecycle.STOPPED
    assert "stopping after an interruption failed" in caplog.text


# -- torch's hook points overridden ------------------------------------------------------


def test_a_mixin_overriding_torchs_hook_points_is_warned() -> None:
    # Only the class's own dict was looked at: the mixin's _reap_worker, meant to log
    # instead of kill, was silently never called, and the worker was killed.
    class LogOnly:
        def _reap_worker(self, worker_pid: int, signal: int) -> bool:
            return True

    with pytest.warns(RuntimeWarning, match=r"\.DryRun overrides _reap_worker: ") as caught:

        class DryRun(LogOnly, FileTimerServer):
            pass

    assert caught[0].filename == __file__  # the class statement's line, not ftimer's

    class Helpers:
        def ready(self) -> bool:
            return True

    with warnings.catch_warnings():
        warnings.simplefilter("error")

        class Plain(Helpers, FileTimerServer):  # nothing of torch's: no warning
            pass


def test_a_hook_point_set_on_the_instance_is_warned_at_start(fifo_path: pathlib.Path) -> None:
    server = FileTimerServer(fifo_path, dry_run=True)
    server._reap_worker = lambda worker_pid, signal: True  # type: ignore[attr-defined]
    server.get_expired_timers = lambda deadline: {}  # type: ignore[method-assign]
    match = r"^FileTimerServer instance overrides _reap_worker, get_expired_timers: "
    try:
        with pytest.warns(RuntimeWarning, match=match) as caught:
            server.start()
        assert caught[0].filename == __file__  # the start() call's line
    finally:
        server.stop()


# -- an unusable FIFO path ----------------------------------------------------------------


@pytest.mark.parametrize("lock_fifo", [True, False])
def test_a_missing_directory_is_an_oserror_that_names_it(
    tmp_path: pathlib.Path, lock_fifo: bool
) -> None:
    # torch's server raises FileNotFoundError; ftimer's raised a FifoError that no
    # `except OSError` caught, speaking of the lock file, not of the missing directory.
    directory = tmp_path / "missing"
    fifo = directory / "timer.fifo"
    server = FileTimerServer(fifo, lock_fifo=lock_fifo)
    with pytest.raises(OSError) as refusal:  # noqa: PT011 - what torch code catches
        server.start()
    error = refusal.value
    assert isinstance(error, FifoError)
    assert (error.errno, error.filename, error.path) == (errno.ENOENT, str(fifo), str(fifo))
    assert f"the directory {directory} does not exist" in str(error)
    assert str(error) == f"{fifo}: {error.reason}"
    assert "lock" not in str(error)
    assert server.state is Lifecycle.NEW
    assert not directory.exists()
    server.stop()


def test_a_busy_fifo_is_an_oserror_too(fifo_path: pathlib.Path) -> None:
    with FileTimerServer(fifo_path, dry_run=True):
        second = FileTimerServer(fifo_path, dry_run=True)
        try:
            with pytest.raises(OSError) as refusal:  # noqa: PT011 - what torch code catches
                second.start()
            assert isinstance(refusal.value, FifoBusy)
            assert refusal.value.filename == str(fifo_path)
        finally:
            second.stop()


#: Replaces the FIFO (argv[1]) with one of group 0, which uid nobody may not give: prints
#: the error's type, errno and text.
REPLACE_WITH_GROUP_0 = """
import sys
from ftimer_server import FifoError, open_fifo
try:
    open_fifo(sys.argv[1], group=0, replace=True).close()
    print("opened")
except OSError as e:
    print(type(e).__name__, e.errno, e)
"""


def test_a_fifo_error_in_a_replacement_is_not_wrapped_again(nobody_dir: pathlib.Path) -> None:
    # A FifoError is an OSError now: the replacement's `except OSError` would have taken
    # its own refusal for a system call's failure ("cannot replace the FIFO: cannot give
    # it group 0").
    fifo = nobody_dir / "timer.fifo"
    os.mkfifo(fifo, 0o600)
    os.chown(fifo, NOBODY, NOBODY)
    done = run_as_nobody(REPLACE_WITH_GROUP_0, str(fifo))
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        f"FifoError {errno.EPERM} {fifo}: cannot give it group 0: Operation not permitted"
    ]


def test_a_fifo_error_opening_the_write_end_is_not_wrapped_again(
    fifo_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Raised where /proc is missing and the path changed between the two opens.
    def replaced(path: str, read_fd: int) -> int:
        raise FifoError(path, "the FIFO was replaced while it was being opened")

    monkeypatch.setattr(_fifo, "_open_write_end", replaced)
    with pytest.raises(FifoError) as refusal:
        open_fifo(fifo_path)
    assert str(refusal.value) == f"{fifo_path}: the FIFO was replaced while it was being opened"
    assert refusal.value.errno is None
    assert not fifo_path.exists()  # made by this call: removed


def test_a_fifo_error_survives_a_copy_and_a_pickle() -> None:
    # Made again from OSError's (errno, strerror), its fields came back swapped, and a
    # FifoBusy could not be made again at all.
    error = FifoError("/run/x.fifo", "the directory /run does not exist", errno.ENOENT)
    busy = FifoBusy("/run/x.fifo", "/run/x.fifo.lock")
    for original in (error, busy):
        for again in (copy.copy(original), pickle.loads(pickle.dumps(original))):
            assert type(again) is type(original)
            assert (again.path, again.reason, again.errno, str(again)) == (
                original.path,
                original.reason,
                original.errno,
                str(original),
            )
    assert pickle.loads(pickle.dumps(busy)).lock_path == "/run/x.fifo.lock"
