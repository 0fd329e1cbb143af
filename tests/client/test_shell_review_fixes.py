"""The ``ftimer`` command at a terminal and ``expires()`` as a careless user writes it:
Ctrl-C for a command in a process group of its own, after ``fg``, and as the command
starts; a heartbeat thread's ``beat()`` racing the block's exit; a client argument that
is no client. A real pty whose session leader runs ``ftimer`` as a shell runs a job;
real FIFOs. Nothing is signalled but the processes each test starts (its descendants,
through pidfds opened while they are)."""

from __future__ import annotations

import contextlib
import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import threading
from typing import Any, Iterator, List

import pytest
from tests.conftest import wait_until

from ftimer_client import FileTimerClient, configure, expires
from ftimer_client import _expires as expires_module
from ftimer_protocol import Disarm

from .conftest import FTIMER, FifoPeer

#: A session leader with the pty as its controlling terminal: it starts the job in a
#: process group of its own, in the foreground at once ("fg") or once the file READY
#: names something ("bg": `job &`, then `fg`), prints its pid, then how it ended.
TERMINAL = textwrap.dedent(
    """
    import os, subprocess, sys, time
    tty = os.open(sys.argv[1], os.O_RDWR)
    mode, ready = sys.argv[2], sys.argv[3]
    job = subprocess.Popen(sys.argv[4:], process_group=0) if sys.version_info >= (3, 11) \\
        else subprocess.Popen(sys.argv[4:], preexec_fn=lambda: os.setpgid(0, 0))
    if mode == "bg":
        while not (os.path.exists(ready) and open(ready).read()):
            time.sleep(0.01)
    os.tcsetpgrp(tty, job.pid)
    print(job.pid, flush=True)
    print(job.wait(), flush=True)
    """
)


class Terminal:
    """A job run at a pty's terminal (``TERMINAL``)."""

    def __init__(self, mode: str, ready: pathlib.Path, argv: List[str]) -> None:
        self.master, slave = os.openpty()
        self.leader = subprocess.Popen(
            [sys.executable, "-c", TERMINAL, os.ttyname(slave), mode, str(ready), *argv],
            start_new_session=True,
            stdout=subprocess.PIPE,
            text=True,
        )
        os.close(slave)
        assert self.leader.stdout is not None
        self.job = int(self.leader.stdout.readline())
        self._pidfds: List[int] = []

    def keep(self, pid: int) -> None:
        """Kill ``pid`` (a descendant now) at the end if it is still there."""
        with contextlib.suppress(ProcessLookupError):
            self._pidfds.append(os.pidfd_open(pid))

    def ctrl_c(self) -> None:
        os.write(self.master, b"\x03")  # SIGINT to the terminal's foreground group

    def ended(self) -> int:
        """How the job ended (a negative signal number: killed by it)."""
        assert self.leader.stdout is not None
        return int(self.leader.stdout.readline())

    def close(self) -> None:
        for fd in self._pidfds:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(fd, signal.SIGKILL)
            os.close(fd)
        self.leader.wait(30)
        assert self.leader.stdout is not None
        self.leader.stdout.close()
        os.close(self.master)


@pytest.fixture
def terminals() -> Iterator[List[Terminal]]:
    made: List[Terminal] = []
    yield made
    for t in made:
        t.close()


def children(pid: int) -> List[int]:
    with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(x) for x in f.read().split()]
    return []


def status(pid: int, field: str) -> str:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return line.split(":", 1)[1].strip()
    raise AssertionError(f"no {field} for {pid}")


def catches(pid: int, signum: int) -> bool:
    return bool(int(status(pid, "SigCgt"), 16) & (1 << (signum - 1)))


def exec_line(peer: FifoPeer, *cmd: str, write_timeout: str = "1") -> List[str]:
    """``ftimer exec`` of ``cmd`` through ``peer``, report-only."""
    return [*FTIMER, "exec", "--fifo", str(peer.path), "--after", "600", "--signal", "0",
            "--write-timeout", write_timeout, "--", *cmd]  # fmt: skip


def test_ctrl_c_reaches_a_command_in_a_process_group_of_its_own(
    peer: FifoPeer, tmp_path: pathlib.Path, terminals: List[Terminal]
) -> None:
    # `timeout`, `setsid` and launchers put themselves in a group of their own: the
    # terminal's SIGINT reached ftimer's group alone, ftimer ignored it (taking CMD to
    # have it too), and Ctrl-C did nothing (the job ran its 300 s).
    t = Terminal("fg", tmp_path / "unused", exec_line(peer, "timeout", "300", "sleep", "300"))
    terminals.append(t)
    wait_until(lambda: any(children(c) for c in children(t.job)), what="timeout's sleep")
    (cmd,) = children(t.job)
    t.keep(cmd)
    for pid in children(cmd):
        t.keep(pid)
    assert os.getpgid(cmd) != os.getpgid(t.job)
    t.ctrl_c()
    assert t.ended() == -signal.SIGINT  # as timeout itself dies of it


CMD_COUNTING = textwrap.dedent(
    """
    import os, signal, sys
    got = sys.argv[1]
    def said(word):
        with open(got, "a") as f:
            f.write(word + "\\n")
    signal.signal(signal.SIGINT, lambda s, f: said("int"))
    def term(s, f):
        said("term")
        os._exit(0)
    signal.signal(signal.SIGTERM, term)
    with open(sys.argv[2], "w") as f:
        f.write(str(os.getpid()))
    while True:
        signal.pause()
    """
)


def test_one_ctrl_c_after_fg_reaches_the_command_once(
    peer: FifoPeer, tmp_path: pathlib.Path, terminals: List[Terminal]
) -> None:
    # `ftimer exec ... &` then `fg`: ftimer decided at its start (in the background)
    # to pass SIGINT on, and after `fg` CMD got the terminal's and ftimer's: a second
    # Ctrl-C is "force quit" to many programs.
    got, ready = tmp_path / "got", tmp_path / "ready"
    t = Terminal(
        "bg", ready, exec_line(peer, sys.executable, "-c", CMD_COUNTING, str(got), str(ready))
    )
    terminals.append(t)
    cmd = int(ready.read_text())
    t.keep(cmd)
    # ftimer held while CMD takes the terminal's SIGINT: what ftimer would pass on comes
    # after it, never merged with it into one pending signal.
    os.kill(t.job, signal.SIGSTOP)
    wait_until(lambda: status(t.job, "State")[0] == "T", what="ftimer stopped")
    t.ctrl_c()
    wait_until(lambda: got.exists() and got.read_text() == "int\n", what="CMD's SIGINT")
    # Pending with ftimer's SIGINT, and handled after it (signals go in their order):
    # ftimer passes SIGTERM on, and CMD says what it got before it, then exits.
    os.kill(t.job, signal.SIGTERM)
    os.kill(t.job, signal.SIGCONT)
    assert t.ended() == 0
    assert got.read_text() == "int\nterm\n"


def test_ctrl_c_as_the_command_starts_stops_the_calling_script(
    peer: FifoPeer, tmp_path: pathlib.Path, terminals: List[Terminal]
) -> None:
    # Between its gate and exec(), CMD's process is still Python: a Ctrl-C there
    # became KeyboardInterrupt (ftimer exited 126, "cannot run", without a word) or
    # was lost at exec (CMD ran on); the calling script went on either way.
    peer.pause()
    peer.fill()  # the arm waits for room: CMD's process waits at its gate
    line = exec_line(peer, "sleep", "30", write_timeout="60")
    t = Terminal("fg", tmp_path / "unused", line)
    terminals.append(t)
    wait_until(lambda: children(t.job), what="CMD's process")
    (gate,) = children(t.job)
    t.keep(gate)
    os.kill(gate, signal.SIGSTOP)  # held before exec()
    wait_until(lambda: status(gate, "State")[0] == "T", what="the gate stopped")
    peer.resume()  # room: the arm goes through, and ftimer opens the gate
    # Its signal handlers set (SIGQUIT, the last, which Python leaves alone otherwise).
    wait_until(lambda: catches(t.job, signal.SIGQUIT), what="ftimer's handlers")
    t.ctrl_c()
    wait_until(lambda: int(status(gate, "ShdPnd"), 16) & (1 << (signal.SIGINT - 1)),
               what="the gate's SIGINT")  # fmt: skip
    os.kill(gate, signal.SIGCONT)
    assert t.ended() == -signal.SIGINT


def test_a_beat_racing_the_blocks_exit_leaves_no_timer_armed(
    peer: FifoPeer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A heartbeat thread's block.beat() read the block open, and armed after the
    # block's disarm had gone out: the timer stayed armed for a process out of the
    # block, and reaped it `after` seconds later.
    client = FileTimerClient(str(peer.path), signal=0, transport="fifo")
    in_beat, exited = threading.Event(), threading.Event()
    own_acquire = expires_module._own_acquire

    def held(c: Any) -> bool:  # beat() has read the block open: the block ends now
        if threading.current_thread().name == "beater":
            in_beat.set()
            assert exited.wait(30)
        return own_acquire(c)

    monkeypatch.setattr(expires_module, "_own_acquire", held)
    errors: List[Exception] = []

    def beater(block: expires) -> None:
        try:
            block.beat()
        except RuntimeError as e:
            errors.append(e)

    try:
        with expires(after=30, scope="step", client=client) as block:
            beating = threading.Thread(target=beater, args=(block,), name="beater")
            beating.start()
            assert in_beat.wait(30)
        exited.set()
        beating.join(30)
        assert [str(e) for e in errors] == ["beat() outside the expires block (it ended meanwhile)"]
        scoped = peer.wait_for(
            lambda m: (
                [x for x in m if x.scope_id == "step"][-1:]
                == [Disarm(os.getpid(), "step", m[0].start_time)]
            )
        )
        assert scoped
        assert "step" not in client.armed
    finally:
        client.close()


@pytest.mark.parametrize("given", [FileTimerClient, "/run/ftimer/timer.fifo", 3])
def test_expires_refuses_what_configure_refuses_when_made(given: Any) -> None:
    # expires(client=X) took a class or a path, and the block's entry failed far from
    # the mistake ("acquire() missing 1 required positional argument", AttributeError).
    with pytest.raises(TypeError, match=r"configure\(\) takes a timer client"):
        configure(given)
    with pytest.raises(TypeError, match=r"expires\(client=\.\.\.\) takes a timer client"):
        expires(after=60, scope="s", client=given)
