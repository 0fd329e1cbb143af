"""The ``ftimer`` command as scripts and supervisors run it: a script without ``#!``, a
``--pid`` that is the command's own process, Ctrl-C in a calling script, a disarm the
server did not take, an ignored SIGCHLD, SIGINT with no terminal. Real processes and a
recording FIFO peer: nothing is signalled but the processes each test starts."""

from __future__ import annotations

import os
import pathlib
import shlex
import signal
import subprocess

from ftimer_client._cli import EXIT_USAGE
from ftimer_protocol import Arm, Disarm

from .conftest import FTIMER, FifoPeer, exec_argv, ftimer


def test_exec_runs_an_executable_script_without_a_shebang_with_sh(
    peer: FifoPeer, tmp_path: pathlib.Path
) -> None:
    # POSIX execvp (glibc's, so env, timeout, nice, xargs and every shell) runs a file
    # the kernel refuses with ENOEXEC with /bin/sh; Python's os.execvp does not, and
    # `ftimer exec -- ./job` failed with 126 "Exec format error" where `timeout 60 ./job`
    # runs it.
    script = tmp_path / "job"
    script.write_text("echo ran\nexit 4\n")
    script.chmod(0o755)
    done = ftimer("exec", "--fifo", str(peer.path), "--after", "60", "--", str(script), "x")
    assert (done.returncode, done.stdout, done.stderr) == (4, "ran\n", "")
    arm, disarm = peer.wait_count(2)
    assert isinstance(arm, Arm)
    assert disarm == Disarm(arm.pid, "exec:job", arm.start_time)


def test_a_pid_naming_this_command_itself_is_refused(peer: FifoPeer) -> None:
    # `exec ftimer arm ... --pid $$` (a script's last line), or `$(ftimer arm --pid
    # $BASHPID)`: $$ names the process that became ftimer. Its timer ends with ftimer a
    # moment later, yet the command said 0: the script believes it is watched.
    line = shlex.join(
        [*FTIMER, "arm", "--fifo", str(peer.path), "--scope", "s", "--after", "60", "--signal", "0"]
    )
    done = subprocess.run(
        ["sh", "-c", f"exec {line} --pid $$"], capture_output=True, text=True, timeout=30
    )
    assert done.returncode == EXIT_USAGE, (done.returncode, peer.take())
    assert "this command" in done.stderr
    assert peer.take() == []


def test_ctrl_c_of_exec_stops_the_calling_bash_script(peer: FifoPeer) -> None:
    # Ctrl-C sends SIGINT to the terminal's foreground group: bash, ftimer and CMD. bash
    # goes on with its script when its child exits normally ("the child handled it":
    # wait-and-cooperative-exit) and stops only when the child died of SIGINT. ftimer
    # ignores SIGINT, and reported CMD's death by it as exit(130): the script ran on
    # (`for f in *; do ftimer exec ... -- job "$f"; done` could not be stopped).
    # sleep itself, or GNU timeout (which re-raises its child's signal), stop it.
    rd, wr = os.pipe()
    line = shlex.join(exec_argv(peer, "bash", "-c", f"echo >&{wr}; exec sleep 30"))
    script = f"{line}; echo ran-on"
    with subprocess.Popen(
        ["bash", "-c", script],
        pass_fds=(wr,),
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,  # a group of its own, as a terminal's foreground job
    ) as bash:
        os.close(wr)
        try:
            with os.fdopen(rd, "rb") as started:
                assert started.readline() == b"\n"  # CMD runs: its arm was delivered
            os.killpg(bash.pid, 2)  # Ctrl-C
            out, _ = bash.communicate(timeout=30)
        finally:
            if bash.poll() is None:
                os.killpg(bash.pid, 9)
    assert (bash.returncode, out) == (-2, "")


def test_a_disarm_not_delivered_under_warn_says_the_timer_stays_armed(
    peer: FifoPeer, sleeper: subprocess.Popen[bytes]
) -> None:
    # The server stalls (its FIFO full) between a script's arm and its disarm. With
    # --on-unavailable warn the disarm exits 0 saying "carrying on without a watchdog
    # until the server is back" (the Python client's words, whose retries deliver the
    # disarm later): but this command exits, its owed disarm with it, and the server
    # that reads again holds the armed timer and kills the script at its deadline.
    common = ["--fifo", str(peer.path), "--scope", "s", "--pid", str(sleeper.pid)]
    armed = ftimer("arm", *common, "--after", "60", "--signal", "0")
    assert armed.returncode == 0
    assert isinstance(peer.wait_count(1)[0], Arm)
    peer.pause()
    peer.fill()
    done = ftimer("disarm", *common, "--on-unavailable", "warn", "--write-timeout", "0.2")
    assert done.returncode == 0
    assert "without a watchdog" not in done.stderr
    assert "stays armed" in done.stderr


def _ignore_sigchld() -> None:
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)


def test_exec_started_with_sigchld_ignored_passes_on_the_status_and_disarms(
    peer: FifoPeer,
) -> None:
    # An ignored SIGCHLD survives exec (a parent that set SIG_IGN against zombies, then
    # ran a script): the kernel reaps CMD itself, waitid() found no child, and ftimer
    # died of a ChildProcessError traceback with status 1, CMD's 7 lost and its timer
    # never disarmed.
    done = subprocess.run(
        exec_argv(peer, "sh", "-c", "exit 7"),
        capture_output=True,
        text=True,
        timeout=30,
        preexec_fn=_ignore_sigchld,
    )
    assert (done.returncode, done.stderr) == (7, "")
    arm, disarm = peer.wait_count(2)
    assert isinstance(arm, Arm)
    assert disarm == Disarm(arm.pid, "exec:sh", arm.start_time)


def test_sigint_sent_to_exec_without_a_terminal_reaches_the_command(peer: FifoPeer) -> None:
    # SIGINT and SIGQUIT are ignored "as system()": from a terminal they reach CMD
    # directly. Without one nothing does: `docker stop` of an image whose STOPSIGNAL is
    # SIGINT (postgres) or SIGQUIT (nginx) signals ftimer, its pid 1, alone; so do a CI
    # runner's cancel and a supervisor's kill -INT. CMD never heard of it, and was
    # SIGKILLed at the grace period's end.
    rd, wr = os.pipe()
    with subprocess.Popen(
        exec_argv(peer, "bash", "-c", f"echo >&{wr}; exec sleep 30"),
        pass_fds=(wr,),
        start_new_session=True,  # no controlling terminal
    ) as proc:
        os.close(wr)
        try:
            with os.fdopen(rd, "rb") as started:
                assert started.readline() == b"\n"
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=10)  # a bound for the failure: CMD sleeps 30 s
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    assert proc.returncode == -signal.SIGINT  # passed on; CMD's death by it, ftimer's
