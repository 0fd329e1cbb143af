"""The real process inspector and signaller, on real child processes."""

from __future__ import annotations

import contextlib
import errno
import os
import pathlib
import signal
import subprocess
import sys
from typing import Iterator, List, Optional, Tuple

import pytest
from tests.conftest import open_descriptors, opened_since, wait_until

from ftimer_protocol import socket_path_for
from ftimer_server import FileTimerServer, OsSignaller, RecordingSignaller, SystemInspector, Worker
from ftimer_server.server import _process, _signaller
from ftimer_server.server._process import proc_problem, raise_fd_limit

from .conftest import held_in_d, proc_start_time

inspector = SystemInspector()


def test_start_time_parent_and_uid_of_this_process() -> None:
    me = os.getpid()
    assert inspector.start_time(me) == proc_start_time(me)
    assert inspector.parent(me) == os.getppid()
    assert inspector.uid(me) == os.getuid()


def test_a_command_name_with_parentheses_and_spaces(tmp_path: pathlib.Path) -> None:
    exe = tmp_path / "odd ) name ("
    os.symlink("/bin/sleep", exe)
    child = subprocess.Popen([str(exe), "60"])
    try:
        assert inspector.start_time(child.pid) == proc_start_time(child.pid)
        assert inspector.parent(child.pid) == os.getpid()
    finally:
        child.kill()
        child.wait()


def test_missing_and_zombie_processes(children) -> None:
    child = children("true")
    # Not waited for: a zombie until wait(), which is not a live process.
    stat = pathlib.Path(f"/proc/{child.pid}/stat")
    wait_until(lambda: stat.read_text().rsplit(")", 1)[1].split()[0] == "Z")
    with pytest.raises(ProcessLookupError):
        inspector.start_time(child.pid)
    child.wait()
    for probe in (inspector.start_time, inspector.parent, inspector.uid, inspector.open):
        with pytest.raises(ProcessLookupError):
            probe(child.pid)


# Its main thread exits (pthread_exit) while another lives on, arming a timer over
# argv[1] ("fifo" or "socket", at argv[2]); it says so and waits.
MAIN_THREAD_GONE = """
import ctypes, sys, threading, time
from ftimer_client import FileTimerClient

def arm():
    # No join: the main thread's exit is not Python's. /proc shows the leader's state.
    while open("/proc/self/stat").read().rsplit(")", 1)[1].split()[0] != "Z":
        time.sleep(0.001)
    FileTimerClient(sys.argv[2], transport=sys.argv[1]).arm("s", 600)
    print("armed", flush=True)
    sys.stdin.read()

threading.Thread(target=arm).start()
ctypes.CDLL(None).pthread_exit(None)
"""


@pytest.mark.parametrize("transport", ["fifo", "socket"])
def test_a_process_whose_main_thread_exited_is_alive(
    tmp_path: pathlib.Path, transport: str
) -> None:
    # Its /proc/PID/stat says Z (the leader's state), and its arms were refused as
    # no_such_process while its other threads ran on, unwatched.
    fifo = tmp_path / "t.fifo"
    sock = socket_path_for(str(fifo))
    server = FileTimerServer(fifo, socket_path=sock, signaller=RecordingSignaller())
    path = str(fifo) if transport == "fifo" else sock
    with (
        server,
        subprocess.Popen(
            [sys.executable, "-c", MAIN_THREAD_GONE, transport, path],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        ) as worker,
    ):
        try:
            assert worker.stdout is not None
            assert worker.stdout.readline() == b"armed\n"
            assert inspector.start_time(worker.pid) == proc_start_time(worker.pid)
            server.sync()
            assert [(t.pid, t.scope_id) for t in server.armed()] == [(worker.pid, "s")]
        finally:
            worker.kill()


def test_pidfd_liveness_and_signals(children) -> None:
    child = children()
    pidfd = inspector.open(child.pid)
    assert pidfd is not None
    worker = Worker(child.pid, inspector.start_time(child.pid), pidfd)
    try:
        assert inspector.alive(worker)
        assert OsSignaller().send(worker, 0)  # signal 0: a probe
        assert OsSignaller().send(worker, signal.SIGTERM)
        assert child.wait(10) == -signal.SIGTERM
        assert not inspector.alive(worker)
        assert not OsSignaller().send(worker, signal.SIGKILL)  # gone: False, not an error
    finally:
        inspector.close(worker)


def test_without_a_pidfd_the_start_time_guards_the_kill(children) -> None:
    child = children()
    start = inspector.start_time(child.pid)
    assert start is not None
    stale = Worker(child.pid, start - 1)  # a process that held this pid before
    assert not inspector.alive(stale)
    assert not OsSignaller().send(stale, signal.SIGKILL)
    assert child.poll() is None
    assert OsSignaller().send(Worker(child.pid, start), signal.SIGKILL)
    assert child.wait(10) == -signal.SIGKILL


@pytest.mark.parametrize("pinned", [True, False], ids=["by its pidfd", "by its start time"])
def test_a_stopped_worker_is_continued_to_act_on_its_signal(children, pinned: bool) -> None:
    # Stopped (Ctrl-Z, SIGSTOP) when its timer expired, a worker reaped with SIGTERM kept
    # it pending for whoever would continue it: without a grace, its reap never took
    # effect. It is continued after the signal, as systemd and a shell's kill do.
    child = children()
    os.kill(child.pid, signal.SIGSTOP)  # our own child
    assert os.WIFSTOPPED(os.waitpid(child.pid, os.WUNTRACED)[1])
    pidfd = inspector.open(child.pid) if pinned else None
    worker = Worker(child.pid, inspector.start_time(child.pid), pidfd)
    try:
        assert OsSignaller().send(worker, signal.SIGTERM)
        assert child.wait(10) == -signal.SIGTERM
    finally:
        inspector.close(worker)


def test_a_worker_ended_by_its_signal_before_the_sigcont_was_delivered_to() -> None:
    # Its SIGCONT found it gone (its parent reaped it at once): the reap said "the
    # process had exited" of a worker that got its signal.
    sent: List[int] = []

    def send(signum: int) -> None:
        sent.append(signum)
        if signum == signal.SIGCONT:
            raise ProcessLookupError(errno.ESRCH, "gone")

    _signaller._deliver(send, signal.SIGTERM)
    assert sent == [signal.SIGTERM, signal.SIGCONT]


def test_a_probe_leaves_a_stopped_worker_stopped(children) -> None:
    # Signal 0 asks whether a process lives: followed by a SIGCONT, it would continue a
    # worker stopped for a debugger.
    child = children()
    os.kill(child.pid, signal.SIGSTOP)  # our own child
    assert os.WIFSTOPPED(os.waitpid(child.pid, os.WUNTRACED)[1])
    worker = Worker(child.pid, inspector.start_time(child.pid), inspector.open(child.pid))
    try:
        assert OsSignaller().send(worker, 0)
        assert os.waitpid(child.pid, os.WCONTINUED | os.WNOHANG) == (0, 0)  # not continued
    finally:
        inspector.close(worker)


def test_a_signal_without_a_pidfd_leaves_no_descriptor_open(children) -> None:
    # Each signal to a worker bound without a pidfd opens one for its check: left open,
    # a long-lived server ran out of descriptors.
    child = children()
    worker = Worker(child.pid, inspector.start_time(child.pid))
    before = open_descriptors()
    for _ in range(50):
        assert OsSignaller().send(worker, 0)
    assert opened_since(before) == set()


@pytest.mark.parametrize("errno_", [errno.EMFILE, errno.ENFILE, errno.ENOMEM])
def test_out_of_descriptors_a_signal_falls_back_to_the_start_time_check(
    children, errno_: int
) -> None:
    # No pidfd to be had (out of descriptors): the start time's check alone, as without
    # pidfds, rather than a reap that fails.
    class Exhausted(SystemInspector):
        def open(self, pid: int) -> Optional[int]:
            raise OSError(errno_, os.strerror(errno_))

    child = children()
    worker = Worker(child.pid, inspector.start_time(child.pid))
    assert OsSignaller(Exhausted()).send(worker, signal.SIGTERM)
    assert child.wait(10) == -signal.SIGTERM


def test_a_pidfd_refused_for_another_reason_refuses_the_signal(children) -> None:
    # ENOENT: a thread's id (or a process gone): never a reason to fall back to kill().
    class Refusing(SystemInspector):
        def open(self, pid: int) -> Optional[int]:
            raise OSError(errno.ENOENT, "No such file or directory")

    child = children()
    worker = Worker(child.pid, inspector.start_time(child.pid))
    with pytest.raises(OSError, match="No such file or directory"):
        OsSignaller(Refusing()).send(worker, signal.SIGTERM)
    assert child.poll() is None


def test_a_stop_signal_as_the_reap_leaves_the_worker_stopped(children) -> None:
    # A reap that asks to stop the worker (to be looked at) is not undone by a SIGCONT.
    # The worker in a group of its own in pytest's session: a process group whose
    # members' parents are all outside the session (pytest's own, under nohup or setsid)
    # is orphaned, and the kernel discards SIGTSTP sent to it: the test hung.
    child = children(preexec_fn=os.setpgrp)
    worker = Worker(child.pid, inspector.start_time(child.pid), inspector.open(child.pid))
    try:
        assert OsSignaller().send(worker, signal.SIGTSTP)
        assert os.WIFSTOPPED(os.waitpid(child.pid, os.WUNTRACED)[1])
        assert os.waitpid(child.pid, os.WCONTINUED | os.WNOHANG) == (0, 0)  # not continued
    finally:
        inspector.close(worker)


def test_waiting_names_the_threads_in_uninterruptible_sleep(vfork_program: str) -> None:
    # What a worker that outlived its SIGKILL waits in (the Unkillable event's `waiting`).
    with held_in_d(vfork_program) as held:
        assert str(inspector.waiting(held.pid)).startswith(f"thread {held.pid}: D")
    with subprocess.Popen(["sleep", "60"]) as sleeping:
        try:
            assert wait_until(lambda: inspector.waiting(sleeping.pid) == "state S")
        finally:
            sleeping.kill()  # our own child
    assert inspector.waiting(sleeping.pid) is None  # gone


def test_os_signaller_refuses_process_groups(monkeypatch: pytest.MonkeyPatch) -> None:
    # kill(0), kill(-1) and kill(1) must never reach the host from the test process:
    # both ways to signal are replaced by recorders, which signal nothing. A probe
    # (signal 0) is answered "exists"; any other signal fails the test.
    called: List[Tuple[str, int, int]] = []

    def kill(pid: int, sig: int) -> None:
        called.append(("kill", pid, sig))
        if sig != 0:
            raise AssertionError(f"kill({pid}, {sig}) reached the system")

    def pidfd_send_signal(pidfd: int, sig: int, *args: object) -> None:
        called.append(("pidfd_send_signal", pidfd, sig))
        if sig != 0:
            raise AssertionError(f"pidfd_send_signal({pidfd}, {sig}) reached the system")

    monkeypatch.setattr(os, "kill", kill)  # the signaller's modules, os and signal
    monkeypatch.setattr(signal, "pidfd_send_signal", pidfd_send_signal)
    for pid in (0, -1, 1):
        with pytest.raises(PermissionError, match=f"refusing to signal pid {pid}$"):
            OsSignaller().send(Worker(pid, None), signal.SIGKILL)
    assert called == []


def test_fd_limit_is_raised_to_the_hard_limit() -> None:
    import resource

    soft = raise_fd_limit()
    assert soft == resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    assert hard in (soft, resource.RLIM_INFINITY)


class Unaware(SystemInspector):
    """A custom inspector that knows no threads (``ProcessInspector``'s default)."""

    def tgid(self, pid: int) -> int:
        return pid


def test_a_custom_inspector_s_kill_is_refused_where_proc_hides_the_process(
    children, monkeypatch: pytest.MonkeyPatch
) -> None:
    # /proc that does not show a live process (hidepid, another namespace's): whether
    # the id is a thread's cannot be told, and the kill is refused, said so; a process
    # that is gone is still just gone.
    child = children()
    worker = Worker(child.pid, inspector.start_time(child.pid))
    signaller = OsSignaller(Unaware())

    def hidden(self: SystemInspector, pid: int) -> int:
        raise ProcessLookupError(2, "No such file or directory")

    monkeypatch.setattr(SystemInspector, "tgid", hidden)
    with probes_only(monkeypatch) as probes, pytest.raises(PermissionError) as refused:
        signaller.send(worker, signal.SIGKILL)
    assert str(refused.value) == (
        f"refusing to signal pid {child.pid}: /proc cannot tell whether it is a thread's "
        "id (No such file or directory)"
    )
    assert probes == [(child.pid, 0)]  # whether it lives: asked with signal 0 alone
    assert child.poll() is None
    child.kill()
    child.wait()
    with probes_only(monkeypatch) as probes:
        assert not signaller.send(worker, signal.SIGKILL)  # gone
    assert probes == [(child.pid, 0)]


@contextlib.contextmanager
def probes_only(monkeypatch: pytest.MonkeyPatch) -> Iterator[List[Tuple[int, int]]]:
    """Record each kill(); let only probes (signal 0) reach the system."""
    calls: List[Tuple[int, int]] = []
    real = os.kill

    def kill(pid: int, sig: int) -> None:
        calls.append((pid, sig))
        if sig != 0:
            raise AssertionError(f"kill({pid}, {sig}) reached the system")
        real(pid, sig)

    with monkeypatch.context() as m:
        m.setattr(os, "kill", kill)
        yield calls


@pytest.mark.parametrize("fault", [PermissionError(13, "denied"), ValueError("a format")])
def test_clock_offsets_that_cannot_be_read_start_no_crash(
    monkeypatch: pytest.MonkeyPatch, fault: Exception
) -> None:
    # Only a missing file was caught: a security module's denial, or a format not
    # known, raised out of the inspector's constructor and the state file's load,
    # and no server started.
    def unreadable(pid: str) -> Tuple[int, int]:
        raise fault

    monkeypatch.setattr(_process, "_timens_offsets", unreadable)
    assert _process.own_clock_offsets() is None
    SystemInspector()  # makes no exception


def test_no_proc_at_all_is_said_so(monkeypatch: pytest.MonkeyPatch) -> None:
    # It read "shows this process as nothing": another namespace's /proc, which it is not.
    assert proc_problem() is None  # this process's own /proc

    def no_proc(path: str) -> str:
        raise FileNotFoundError(2, "No such file or directory", path)

    monkeypatch.setattr(_process.os, "readlink", no_proc)
    monkeypatch.setattr(_process.os.path, "isdir", lambda path: False)
    assert proc_problem() == (
        "no /proc is mounted: the server reads its processes there; mount one"
    )
