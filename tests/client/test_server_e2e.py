"""ftimer-client against the real ftimer-server: reaping, and resync across a restart."""

from __future__ import annotations

import contextlib
import os
import pathlib
import signal
import subprocess
import sys
import textwrap
from typing import Any, Iterator, List, Set, Tuple

import pytest
from tests.conftest import children_of, wait_until

from ftimer_protocol import socket_path_for

server_module = pytest.importorskip("ftimer_server")

WORKER = textwrap.dedent(
    """
    import sys, time
    from ftimer_client import FileTimerClient, configure, expires
    policy = sys.argv[3] if len(sys.argv) > 3 else "raise"
    configure(FileTimerClient(sys.argv[1], on_unavailable=policy))
    if sys.argv[2] == "healthy":
        end = time.monotonic() + 1.5
        while time.monotonic() < end:
            with expires(after=0.5):
                time.sleep(0.005)
    elif sys.argv[2] == "stuck":
        with expires(after=0.3):
            time.sleep(60)
    else:  # scripted: one line of stdin per arm, echoed when sent
        from ftimer_client._expires import _configured as client
        for scope in sys.stdin:
            client.arm(scope.strip(), 600)
            print(scope.strip(), flush=True)
    """
)


@contextlib.contextmanager
def worker(fifo: pathlib.Path, mode: str, policy: str = "raise") -> Iterator[subprocess.Popen[str]]:
    """A worker process running ``mode``; killed (it is ours) if still running at the end."""
    with subprocess.Popen(
        [sys.executable, "-c", WORKER, str(fifo), mode, policy],
        text=True,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    ) as proc:
        try:
            yield proc
        finally:
            proc.kill()


def arm(proc: subprocess.Popen[str], scope: str) -> None:
    """Have the scripted worker arm ``scope``; return once it has sent it."""
    assert proc.stdin is not None
    assert proc.stdout is not None
    proc.stdin.write(scope + "\n")
    proc.stdin.flush()
    assert proc.stdout.readline() == scope + "\n"


def armed(server: object) -> Set[Tuple[int, str]]:
    server.sync()  # type: ignore[attr-defined]
    return {(t.pid, t.scope_id) for t in server.armed()}  # type: ignore[attr-defined]


def test_a_stuck_worker_is_reaped_and_a_healthy_one_is_not(fifo_path: pathlib.Path) -> None:
    with server_module.FileTimerServer(fifo_path), worker(fifo_path, "healthy") as healthy:
        with worker(fifo_path, "stuck") as stuck:
            assert stuck.wait(30) == -signal.SIGKILL
        assert healthy.wait(30) == 0


def test_a_server_restarted_on_a_new_fifo_gets_the_armed_timers(
    fifo_path: pathlib.Path,
) -> None:
    with worker(fifo_path, "scripted") as proc:
        with server_module.FileTimerServer(fifo_path) as first:
            arm(proc, "x")
            assert armed(first) == {(proc.pid, "x")}
        fifo_path.unlink()
        # A new server with none of the old one's state, on a new FIFO: the next
        # message finds the old pipe without a reader, reconnects and resyncs.
        with server_module.FileTimerServer(fifo_path) as second:
            arm(proc, "y")
            assert armed(second) == {(proc.pid, "x"), (proc.pid, "y")}


def test_what_was_armed_while_the_server_was_down_reaches_the_next_one(
    fifo_path: pathlib.Path,
) -> None:
    with worker(fifo_path, "scripted", "ignore") as proc:
        with server_module.FileTimerServer(fifo_path) as first:
            arm(proc, "x")
            assert armed(first) == {(proc.pid, "x")}
        arm(proc, "while-down")  # no server: kept, to be re-sent
        with server_module.FileTimerServer(fifo_path) as second:
            # No further message from the worker: its background resync does it.
            wait_until(lambda: armed(second) == {(proc.pid, "x"), (proc.pid, "while-down")})


# -- over the socket ----------------------------------------------------------------------

FTIMER = [sys.executable, "-m", "ftimer_client"]  # the `ftimer` command


@pytest.fixture
def socket_server(fifo_path: pathlib.Path) -> Iterator[Tuple[object, pathlib.Path]]:
    """The real server on a FIFO and on the socket beside it."""
    socket_path = pathlib.Path(socket_path_for(str(fifo_path)))
    with server_module.FileTimerServer(fifo_path, socket_path=socket_path) as server:
        yield server, socket_path


def test_over_the_socket_a_stuck_worker_is_reaped_and_a_healthy_one_is_not(
    socket_server: Tuple[object, pathlib.Path],
) -> None:
    _, path = socket_server
    with worker(path, "healthy") as healthy:
        with worker(path, "stuck") as stuck:
            assert stuck.wait(30) == -signal.SIGKILL
        assert healthy.wait(30) == 0


def test_a_server_restarted_on_its_socket_gets_the_armed_timers(fifo_path: pathlib.Path) -> None:
    path = pathlib.Path(socket_path_for(str(fifo_path)))
    with worker(path, "scripted") as proc:
        with server_module.FileTimerServer(fifo_path, socket_path=path) as first:
            arm(proc, "x")
            wait_until(lambda: armed(first) == {(proc.pid, "x")})
        # A new server with none of the old one's state binds the path again: the
        # worker's old connection is refused, it reconnects and resyncs.
        with server_module.FileTimerServer(fifo_path, socket_path=path) as second:
            arm(proc, "y")
            wait_until(lambda: armed(second) == {(proc.pid, "x"), (proc.pid, "y")})


def test_ftimer_exec_over_the_socket_gets_its_command_reaped(
    socket_server: Tuple[object, pathlib.Path],
) -> None:
    # The sender is the wrapper; the timer is CMD's, named by its pidfd: a descendant.
    _, path = socket_server
    done = subprocess.run(
        [*FTIMER, "exec", "--socket", str(path), "--after", "0.3", "--", "sleep", "60"],
        timeout=30,
    )
    assert done.returncode == 128 + signal.SIGKILL


def test_ftimer_arm_over_the_socket_is_for_the_calling_shell(
    socket_server: Tuple[object, pathlib.Path],
) -> None:
    # The sender is the command; the timer is its parent's, the shell, named by its pidfd.
    _, path = socket_server
    arm_it = " ".join([*FTIMER, "arm", "--socket", str(path), "--scope", "s", "--after", "0.3"])
    shell = subprocess.run(["sh", "-c", f"{arm_it} && exec sleep 60"], timeout=30)
    assert shell.returncode == -signal.SIGKILL


@pytest.mark.parametrize("transport", ["fifo", "socket"])
def test_a_server_restarted_without_its_state_gets_the_timer_of_ftimer_exec(
    fifo_path: pathlib.Path, transport: str
) -> None:
    # ftimer exec sends nothing while its command runs: a server that died and came back
    # without its state never had the command's timer again, and a hung command ran on.
    path = pathlib.Path(socket_path_for(str(fifo_path)))
    where = ["--fifo", str(fifo_path)] if transport == "fifo" else ["--socket", str(path)]
    signaller = server_module.RecordingSignaller()  # the command is the test's to end
    # A receipt a loaded machine delays past the default second fails the command.
    command = [
        *FTIMER,
        "exec",
        *where,
        "--after",
        "600",
        "--write-timeout",
        "30",
        "--",
        "sleep",
        "60",
    ]
    first = server_module.FileTimerServer(fifo_path, socket_path=path, signaller=signaller)
    with first, subprocess.Popen(command) as wrapper:
        [timer] = wait_until(first.armed)
        try:
            again = restarted_without_state(first, path, signaller)
            assert again == [(timer.pid, "exec:sleep", timer.deadline)]
        finally:
            for command_pid in children_of(wrapper.pid):  # ours: the wrapper's child
                with contextlib.suppress(ProcessLookupError):
                    os.kill(command_pid, signal.SIGKILL)
            wrapper.wait(30)
    assert signaller.sent == []


@pytest.mark.parametrize("transport", ["fifo", "socket"])
def test_a_server_restarted_without_its_state_gets_the_timer_of_a_worker_that_sends_nothing(
    fifo_path: pathlib.Path, transport: str
) -> None:
    # A worker stuck in its block sends nothing more: the library's watch of its
    # connection finds the server's end gone and resyncs, or the hang ran on unreaped.
    path = pathlib.Path(socket_path_for(str(fifo_path)))
    signaller = server_module.RecordingSignaller()
    first = server_module.FileTimerServer(fifo_path, socket_path=path, signaller=signaller)
    with first, worker(fifo_path if transport == "fifo" else path, "scripted") as proc:
        arm(proc, "x")  # then it waits on its stdin: no line more
        [timer] = wait_until(first.armed)
        again = restarted_without_state(first, path, signaller)
        assert again == [(proc.pid, "x", timer.deadline)]
    assert signaller.sent == []


def restarted_without_state(
    first: Any, socket_path: pathlib.Path, signaller: Any
) -> List[Tuple[int, str, float]]:
    """Stop ``first`` as if it died (its FIFO and socket then read by nobody), start a
    server without its state on the same paths, and return the timers it is sent again
    (pid, scope, deadline), once it has some."""
    first.stop()
    second = server_module.FileTimerServer(
        first.file_path, socket_path=socket_path, signaller=signaller
    )
    with second:
        again = wait_until(second.armed, what="the timers sent again")
    return [(t.pid, t.scope_id, t.deadline) for t in again]
