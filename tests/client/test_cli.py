"""The ``ftimer`` command end to end: real processes, a real FIFO."""

from __future__ import annotations

import os
import pathlib
import shlex
import shutil
import signal
import subprocess
import time
from typing import List

import pytest
from tests.conftest import not_pid_1, parent_not_init, wait_until

from ftimer_client._cli import EXIT_UNAVAILABLE, EXIT_USAGE, _program, main
from ftimer_client._proc import process_start_time
from ftimer_protocol import Arm, Disarm, Expire, TimerRequestV1

from .conftest import FTIMER, FifoPeer, exec_argv, ftimer, live_thread_id, server_state

ME = os.getpid()


@not_pid_1
def test_arm_beat_disarm_for_the_calling_process(peer: FifoPeer) -> None:
    fifo = str(peer.path)
    before = time.monotonic()
    assert ftimer("arm", "--fifo", fifo, "--scope", "job", "--after", "30").returncode == 0
    assert ftimer("beat", "--fifo", fifo, "--scope", "job", "--after", "90").returncode == 0
    assert ftimer("disarm", "--fifo", fifo, "--scope", "job").returncode == 0
    arm, beat, disarm = peer.wait_count(3)
    # The timer is for the caller (this test process), with its identity.
    assert isinstance(arm, Arm)
    assert isinstance(beat, Arm)
    assert (arm.pid, arm.scope_id, arm.signal, arm.start_time) == (
        ME,
        "job",
        9,
        process_start_time(),
    )
    assert before + 30 <= arm.deadline <= time.monotonic() + 30
    assert beat.deadline > arm.deadline + 59
    assert disarm == Disarm(ME, "job", process_start_time())


def test_explicit_pid_signal_labels_and_expire(peer: FifoPeer) -> None:
    with subprocess.Popen(["sleep", "30"]) as other:
        try:
            fifo = str(peer.path)
            args = ("--fifo", fifo, "--scope", "s", "--pid", str(other.pid))
            assert (
                ftimer(
                    "arm", *args, "--after", "5", "--signal", "TERM", "--label", "job=x"
                ).returncode
                == 0
            )
            assert ftimer("expire", *args, "--signal", "0").returncode == 0
            arm, expire = peer.wait_count(2)
            assert isinstance(arm, Arm)
            assert isinstance(expire, Expire)
            assert (arm.pid, arm.signal, arm.labels) == (other.pid, 15, {"job": "x"})
            assert arm.start_time == process_start_time(other.pid) != process_start_time()
            assert (expire.pid, expire.signal) == (other.pid, 0)
        finally:
            other.kill()


def test_exec_arms_for_the_command_and_exits_with_its_status(peer: FifoPeer) -> None:
    done = ftimer(
        "exec", "--fifo", str(peer.path), "--after", "60", "--", "sh", "-c", "echo $$; exit 7"
    )
    assert done.returncode == 7
    child = int(done.stdout)
    arm, disarm = peer.wait_count(2)
    assert isinstance(arm, Arm)
    assert (arm.pid, arm.scope_id) == (child, "exec:sh")
    assert disarm == Disarm(child, "exec:sh", arm.start_time)


def test_exec_reports_death_by_signal_as_128_plus_n(peer: FifoPeer) -> None:
    done = ftimer(
        "exec",
        "--fifo",
        str(peer.path),
        "--after",
        "60",
        "--scope",
        "k",
        "--",
        "sh",
        "-c",
        "kill -TERM $$",
    )
    assert done.returncode == 128 + signal.SIGTERM
    assert server_state(peer.wait_count(2)) == {}


def test_exec_command_runs_with_default_sigpipe(peer: FifoPeer) -> None:
    # Python ignores SIGPIPE, and an ignored signal would stay ignored across exec.
    done = ftimer(
        "exec", "--fifo", str(peer.path), "--after", "60", "--", "sh", "-c", "kill -PIPE $$"
    )
    assert done.returncode == 128 + signal.SIGPIPE


def test_exec_command_runs_with_default_sigxfsz(peer: FifoPeer) -> None:
    # Python ignores SIGXFSZ too: CMD inherited it ignored (a file over its size limit
    # then failed with EFBIG instead of killing CMD, as it would from a shell).
    done = ftimer(
        "exec", "--fifo", str(peer.path), "--after", "60", "--", "sh", "-c", "kill -XFSZ $$"
    )
    assert done.returncode == 128 + signal.SIGXFSZ


def test_exec_passes_sigterm_on_to_the_command(peer: FifoPeer) -> None:
    script = 'trap "exit 42" TERM; echo ready; while :; do sleep 0.05; done'
    with subprocess.Popen(
        exec_argv(peer, "sh", "-c", script),
        stdout=subprocess.PIPE,
        text=True,
    ) as wrapper:
        assert wrapper.stdout is not None
        assert wrapper.stdout.readline() == "ready\n"
        wrapper.send_signal(signal.SIGTERM)
        assert wrapper.wait(30) == 42
    assert server_state(peer.wait_count(2)) == {}


def test_exec_command_reaped_by_the_server(peer: FifoPeer) -> None:
    # The peer plays a server that reaps: it kills the pid of the arm it received,
    # after checking that pid is the child of the ftimer process this test started.
    with subprocess.Popen(
        [
            *FTIMER,
            "exec",
            "--fifo",
            str(peer.path),
            "--after",
            "0",
            "--",
            "sleep",
            "60",
        ],
    ) as wrapper:
        (arm,) = peer.wait_count(1)
        assert isinstance(arm, Arm)
        with open(f"/proc/{arm.pid}/stat", "rb") as f:
            assert int(f.read().rpartition(b")")[2].split()[1]) == wrapper.pid
        os.kill(arm.pid, arm.signal)
        assert wrapper.wait(30) == 128 + signal.SIGKILL


def test_exec_without_a_server_does_not_run_the_command(tmp_path: pathlib.Path) -> None:
    marker = tmp_path / "ran"
    done = ftimer(
        "exec", "--fifo", str(tmp_path / "none"), "--after", "5", "--", "touch", str(marker)
    )
    assert done.returncode == EXIT_UNAVAILABLE
    assert "no FIFO" in done.stderr
    assert not marker.exists()
    # Unless asked to run without a watchdog.
    done = ftimer(
        "exec",
        "--fifo",
        str(tmp_path / "none"),
        "--on-unavailable",
        "ignore",
        "--after",
        "5",
        "--",
        "touch",
        str(marker),
    )
    assert done.returncode == 0
    assert marker.exists()


def test_exec_in_process_puts_the_callers_signal_handlers_back(peer: FifoPeer) -> None:
    # main() left SIGINT and SIGQUIT ignored, and the forwarded signals at their defaults,
    # in the process that called it: its Ctrl-C did nothing any more, nor that of every
    # Python it started afterwards (an ignored SIGINT is inherited, and kept).
    signums = (signal.SIGINT, signal.SIGQUIT, signal.SIGTERM, signal.SIGUSR1)
    before = {s: signal.getsignal(s) for s in signums}
    assert before[signal.SIGINT] is signal.default_int_handler
    assert main(["exec", "--fifo", str(peer.path), "--after", "60", "--", "true"]) == 0
    assert {s: signal.getsignal(s) for s in signums} == before


def test_exec_command_not_found(peer: FifoPeer) -> None:
    done = ftimer("exec", "--fifo", str(peer.path), "--after", "5", "--", "/nonexistent/x")
    assert done.returncode == 127
    assert "/nonexistent/x" in done.stderr
    assert server_state(peer.wait_count(2)) == {}


def test_exec_of_an_empty_name_is_not_found_and_says_so(peer: FifoPeer) -> None:
    # It exited 126 without a word (execvp raised ValueError, not OSError).
    done = ftimer("exec", "--fifo", str(peer.path), "--after", "5", "--", "")
    assert done.returncode == 127
    assert "command not found" in done.stderr
    assert server_state(peer.wait_count(2)) == {}


@not_pid_1
def test_absent_server_exits_3_with_a_clear_message(tmp_path: pathlib.Path) -> None:
    done = ftimer("arm", "--fifo", str(tmp_path / "none"), "--scope", "s", "--after", "5")
    assert done.returncode == EXIT_UNAVAILABLE
    assert done.stderr.startswith("ftimer: ")
    assert "no FIFO" in done.stderr
    os.mkfifo(tmp_path / "fifo")
    assert main(["disarm", "--fifo", str(tmp_path / "fifo"), "--scope", "s"]) == 3


BAD = [
    ["arm", "--scope", "s"],
    ["arm", "--scope", "s", "--after", "soon"],
    ["arm", "--scope", "s", "--after", "nan"],
    ["arm", "--scope", "s", "--after", "-1"],
    ["arm", "--scope", "s", "--after", "1", "--signal", "NOPE"],
    ["arm", "--scope", "s", "--after", "1", "--signal", "99"],
    # kill(1)'s spelling was read as "report only": a timer that never kills.
    ["arm", "--scope", "s", "--after", "1", "--signal", "-9"],
    pytest.param(["arm", "--scope", "s", "--after", "1", "--pid", "1"], marks=parent_not_init),
    ["arm", "--scope", "s", "--after", "1", "--pid", "0"],
    ["arm", "--scope", "s", "--after", "1", "--pid", str(2**31 - 2)],  # no such process
    ["arm", "--scope", "s", "--after", "1", "--label", "novalue"],
    ["arm", "--scope", "s", "--after", "1", "--label", "1bad=x"],
    ["arm", "--scope", "x" * 5000, "--after", "1"],
    ["exec", "--after", "1"],
    ["exec", "--after", "1", "--"],
    # "\u00b2" ("²") passes str.isdigit() but not int(); int() and float() take "\u0662"
    # (Arabic-Indic two): neither is a number on the command line.
    ["arm", "--scope", "s", "--after", "1", "--pid", "\u00b2"],
    ["arm", "--scope", "s", "--after", "1", "--signal", "\u00b2"],
    ["arm", "--scope", "s", "--after", "1", "--signal", "-\u00b2"],
    ["arm", "--scope", "s", "--after", "\u0662"],
    ["arm", "--scope", "s", "--after", "1", "--protocol", "\u0662"],
    ["arm", "--scope", "s", "--after", "1", "--write-timeout", "\u00b2"],
]


@pytest.mark.parametrize("argv", BAD)
def test_bad_arguments_exit_2(
    argv: list, fifo_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    FifoPeer(fifo_path).close()  # a FIFO exists: the arguments are what is wrong
    assert main([argv[0], "--fifo", str(fifo_path), *argv[1:]]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "ftimer" in err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("argv", "lines"),
    [
        # Errors found after parsing show the usage of the command, not of `ftimer`.
        (
            ["arm", "--scope", "s", "--after", "5", "--pid", str(2**31 - 2)],
            ["usage: ftimer arm ", f"ftimer arm: error: no process {2**31 - 2} (--pid)"],
        ),
        (["exec", "--after", "5"], ["usage: ftimer exec ", "exec needs a command after --"]),
        # What the protocol's schema refuses, in the user's terms.
        (
            ["arm", "--scope", "s", "--after", "5", "--label", "bad-key=x"],
            ["ftimer: label key 'bad-key' is not allowed: a key is a letter or '_'"],
        ),
        (
            ["arm", "--scope", "s", "--after", "5", "--pid", "\u00b2"],
            ["usage: ftimer arm ", "not a process id: '\u00b2'"],
        ),
        (
            ["arm", "--scope", "s", "--after", "5", "--signal", "\u00b2"],
            ["unknown signal: '\u00b2' (a name like USR2 or SIGUSR2, SIGRTMIN+N, or a number)"],
        ),
        (
            ["disarm", "--scope", "s", "--protocol", "3"],
            ["protocol is 1 (torch's) or 2, not '3'"],
        ),
    ],
)
def test_errors_name_the_problem_in_the_users_terms(
    argv: list[str], lines: list[str], fifo_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    FifoPeer(fifo_path).close()
    assert main([argv[0], "--fifo", str(fifo_path), *argv[1:]]) == EXIT_USAGE
    err = capsys.readouterr().err
    for line in lines:
        assert line in err


@not_pid_1
def test_warn_policy_prints_one_plain_line(tmp_path: pathlib.Path) -> None:
    done = ftimer(
        "arm", "--fifo", str(tmp_path / "none"), "--scope", "s", "--after", "5",
        "--on-unavailable", "warn",
    )  # fmt: skip
    assert done.returncode == 0
    assert done.stderr.startswith("ftimer: warning: [Errno 2] no FIFO")
    assert done.stderr.endswith("carrying on without a watchdog until the server is back\n")
    assert done.stderr.count("\n") == 1  # no "file:line: Category" and no source line


def test_expire_in_protocol_1_expires_at_the_present(peer: FifoPeer) -> None:
    # Version 1 has no expire message: the arm it sends instead names the present, not
    # a time long past (which a server reports as decades late).
    with subprocess.Popen(["sleep", "30"]) as other:
        try:
            before = time.time()
            args = ("--fifo", str(peer.path), "--scope", "s", "--pid", str(other.pid))
            assert ftimer("expire", *args, "--protocol", "1", "--signal", "0").returncode == 0
            after = time.time()
            (request,) = peer.wait_count(1)
            assert isinstance(request, TimerRequestV1)
            assert (request.pid, request.scope_id, request.signal) == (other.pid, "s", 0)
            assert before <= request.expiration_time <= after
        finally:
            other.kill()


@pytest.mark.parametrize("argv", [[], ["frobnicate"]])
def test_no_or_unknown_command_exits_2(argv: list, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == EXIT_USAGE
    assert "usage: ftimer" in capsys.readouterr().err


def test_arm_help_warns_that_the_default_pid_is_the_calling_shell(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["arm", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert (
        "at an interactive terminal, that is your own shell, which an expired timer kills" in text
    )


@not_pid_1
def test_at_the_fifo_torchs_agent_serves_itself_torchs_protocol_is_spoken(
    peer: FifoPeer,
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FTIMER_")}
    env.update(TORCHELASTIC_ENABLE_FILE_TIMER="1", TORCHELASTIC_TIMER_FILE=str(peer.path))
    argv = [*FTIMER, "arm", "--scope", "s", "--after", "30", "--signal", "0"]
    assert subprocess.run(argv, env=env, timeout=30).returncode == 0
    (request,) = peer.wait_count(1)
    assert isinstance(request, TimerRequestV1)  # the only lines torch's server reads
    assert (request.pid, request.scope_id) == (ME, "s")


def test_with_stderr_closed_nothing_goes_into_stdout(tmp_path: pathlib.Path) -> None:
    # print(file=sys.stderr) with stderr closed writes to stdout: the warning went into
    # the output of the caller (or of CMD).
    done = subprocess.run(
        [*FTIMER, "exec", "--fifo", str(tmp_path / "none"), "--after", "5",
         "--on-unavailable", "warn", "--", "echo", "CMDOUT"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, timeout=30,
        preexec_fn=lambda: os.close(2),
    )  # fmt: skip
    assert (done.returncode, done.stdout) == (0, "CMDOUT\n")


def test_a_parent_that_adopted_the_command_is_never_armed(peer: FifoPeer) -> None:
    # `ftimer arm ... &` whose shell exited first: its parent was whoever adopted it (an
    # init or a subreaper), which the timer then reaped. Here the shell is started in a
    # session of its own, and exits at once; ftimer's parent becomes this test process,
    # in another session.
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.prctl(36, 1, 0, 0, 0) == 0  # PR_SET_CHILD_SUBREAPER: orphans come here
    try:
        # The background job starts ftimer once told, after the shell has exited (an
        # asynchronous list's stdin is /dev/null: it reads the shell's as fd 4).
        shell = subprocess.Popen(
            ["setsid", "sh", "-c",
             'exec 3>&1 4<&0; (read _ <&4; exec "$@" >&3 2>&3 4<&-) & echo $!; exit 0', "sh",
             *FTIMER, "arm", "--fifo", str(peer.path), "--scope", "s", "--after", "60"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        assert shell.stdin is not None
        assert shell.stdout is not None
        orphan = int(shell.stdout.readline())
        assert shell.wait(10) == 0
        shell.stdin.write("go\n")
        shell.stdin.close()
        _, status = os.waitpid(orphan, 0)  # adopted: this process reaps it
        said = shell.stdout.read()
        shell.stdout.close()
    finally:
        libc.prctl(36, 0, 0, 0, 0)
    assert os.waitstatus_to_exitcode(status) == EXIT_USAGE
    assert "the shell that ran this command has exited" in said
    assert peer.messages == []  # nothing sent


@not_pid_1
def test_a_command_in_a_session_of_its_own_arms_its_live_parent(peer: FifoPeer) -> None:
    # A worker's subprocess.run(["ftimer", "arm", ...], start_new_session=True): the
    # parent, alive, was in another session than the command, which was taken for an
    # adoption ("the shell that ran this command has exited"), status 2.
    done = subprocess.run(
        [*FTIMER, "arm", "--fifo", str(peer.path), "--scope", "s", "--after", "60"],
        start_new_session=True, capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert (done.returncode, done.stderr) == (0, "")
    [armed] = peer.wait_count(1)
    assert (armed.pid, armed.scope_id) == (os.getpid(), "s")


def test_disarming_a_process_that_has_exited_succeeds(peer: FifoPeer) -> None:
    # A script's `ftimer disarm --pid $W` after `wait $W` was a usage error (status 2):
    # under `set -e` the script died, its work done. Its timers went with it.
    gone = subprocess.Popen(["true"])
    gone.wait()
    done = ftimer("disarm", "--fifo", str(peer.path), "--pid", str(gone.pid), "--scope", "s")
    assert (done.returncode, done.stderr) == (0, "")
    # Arming one is still an error.
    done = ftimer(
        "arm", "--fifo", str(peer.path), "--pid", str(gone.pid), "--scope", "s", "--after", "5"
    )
    assert done.returncode == EXIT_USAGE
    assert f"no process {gone.pid} (--pid)" in done.stderr
    assert peer.messages == []


def test_a_threads_id_is_refused_as_no_process(peer: FifoPeer) -> None:
    # kill(tid, 0) succeeds for a thread's id: the command itself finds it a thread and
    # refuses it, sending nothing.
    with live_thread_id() as tid:
        where = ("--fifo", str(peer.path), "--pid", str(tid))
        done = ftimer("arm", *where, "--scope", "s", "--after", "5")
    assert done.returncode == EXIT_USAGE
    assert f"{tid} is a thread of process {os.getpid()}, not a process (--pid)" in done.stderr
    assert peer.messages == []


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    from ftimer_client import __version__

    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"ftimer {__version__}\n"


@pytest.mark.parametrize(
    "args", [["exec", "--after", "60", "--", "true"], ["arm", "--scope", "s", "--after", "60"]]
)
def test_a_message_nobody_can_read_keeps_the_exit_status(
    tmp_path: pathlib.Path, args: list
) -> None:
    # With stderr a pipe whose reader was gone, printing the message raised
    # BrokenPipeError, and the command exited 1 whatever it meant to say (here: no server).
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        fifo = ["--fifo", str(tmp_path / "no-server.fifo")]
        command = [*FTIMER, args[0], *fifo, *args[1:]]
        done = subprocess.run(command, stderr=write_end, timeout=30, check=False)
    finally:
        os.close(write_end)
    assert done.returncode == EXIT_UNAVAILABLE


@pytest.mark.parametrize(
    "command", [["arm", "--after", "60"], ["exec", "--after", "60", "--", "true"]]
)
def test_a_scope_too_long_is_named(peer: FifoPeer, command: list) -> None:
    # It said "framed message is 5135 bytes, over the 4096-byte PIPE_BUF limit": of what?
    scope = ["--scope", "x" * 5000]
    done = ftimer(command[0], "--fifo", str(peer.path), *scope, *command[1:])
    assert done.returncode == EXIT_USAGE
    assert done.stderr.startswith("ftimer: --scope and --label make the message too long: ")
    assert peer.messages == []


def test_a_signal_once_the_command_is_done_does_not_end_exec_before_its_disarm(
    peer: FifoPeer,
) -> None:
    # The forwarded signals went back to their defaults as soon as CMD exited: a SIGTERM
    # while the disarm waited for room ended ftimer with 143, CMD's 0 lost.
    with subprocess.Popen(
        [*FTIMER, "exec", "--fifo", str(peer.path), "--write-timeout", "30", "--after", "60",
         "--", "sh", "-c", 'echo $$; read line; exit 0'],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    ) as wrapper:  # fmt: skip
        assert wrapper.stdin is not None
        assert wrapper.stdout is not None
        cmd = int(wrapper.stdout.readline())
        peer.wait_count(1)  # armed
        peer.pause()
        peer.fill()  # the disarm will wait for room
        wrapper.stdin.close()  # CMD ends
        wait_until(lambda: _state(cmd) == "Z", what="CMD exited, not yet reaped")
        wait_until(lambda: _waits_in_poll(wrapper.pid), what="the disarm waiting for room")
        wrapper.send_signal(signal.SIGTERM)
        peer.resume()
        assert wrapper.wait(30) == 0
    assert server_state(peer.wait_count(2)) == {}


def _state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


def _waits_in_poll(pid: int) -> bool:
    with open(f"/proc/{pid}/wchan") as f:
        return "poll" in f.read()


@pytest.mark.parametrize(
    ("args", "error"),
    [
        # float() took it as 10, where the server's options refuse it.
        (("--after", "1_0"), "argument --after: not a number of seconds: '1_0'"),
        (("--write-timeout", "1_0"), "argument --write-timeout: not a number of seconds: '1_0'"),
        # It said "no FIFO or socket (is the ftimer server running?): ''", status 3.
        (("--fifo", ""), "argument --fifo: the path is empty"),
        (("--socket", ""), "argument --socket: the path is empty"),
        # A prefix of an option was taken for it (`--sig` for `--signal`): a script's
        # would stop working, or mean another option, once one with it is added.
        (("--sig", "9"), "unrecognized arguments: --sig 9"),
        (("--write", "1"), "unrecognized arguments: --write 1"),
    ],
)
def test_usage_the_server_refuses_is_refused_as_usage(args: tuple, error: str) -> None:
    result = ftimer("arm", "--scope", "s", "--after", "5", *args)
    assert result.returncode == 2
    assert result.stderr.endswith(f"error: {error}\n")


WRAPPED = {
    "timeout": (["timeout", "30", "{line}", "job"], None),
    "xargs": (["xargs", "{line}"], "job\n"),  # xargs appends the rest
    "xargs -I": (["xargs", "-I{}", "{line}", "{}"], "job\n"),
    "find -exec": (["find", "/", "-maxdepth", "0", "-exec", "{line}", "job", ";"], None),
}


@pytest.mark.parametrize("wrapper", list(WRAPPED))
def test_a_wrapper_that_runs_the_command_is_refused_as_its_default_parent(
    peer: FifoPeer, wrapper: str
) -> None:
    # `timeout 5 ftimer disarm ...` (or xargs, flock, sudo, time): the wrapper was the
    # parent, so the disarm named it, did nothing and said nothing, and the script's own
    # timer killed it later; an arm was the wrapper's, gone with it at once.
    program = wrapper.split(maxsplit=1)[0]
    if shutil.which(program) is None:
        pytest.skip(f"no {program} here")
    line = [*FTIMER, "disarm", "--fifo", str(peer.path), "--scope"]
    template, stdin = WRAPPED[wrapper]
    argv = [word for a in template for word in (line if a == "{line}" else [a])]
    done = subprocess.run(argv, input=stdin, capture_output=True, text=True)
    # timeout passes the status on; xargs says 123 (1-125), find nothing (a failed test).
    assert done.returncode == {"timeout": EXIT_USAGE, "xargs": 123, "find": 0}[program]
    assert ") runs this command and ends with it: the disarm would be for" in done.stderr
    assert peer.messages == []
    # A shell is its parent, whatever it runs after, and the timer its own: the shell
    # that armed it disarms it last in `sh -c 'ftimer arm ...; work; ftimer disarm ...'`.
    shell = subprocess.run(
        ["sh", "-c", f"echo $$; {shlex.join(line)} job"], capture_output=True, text=True
    )
    assert (shell.returncode, shell.stderr) == (0, "")
    [disarm] = peer.wait_count(1)
    assert (disarm.pid, disarm.scope_id) == (int(shell.stdout), "job")


def test_an_empty_scope_is_refused(peer: FifoPeer) -> None:
    done = ftimer("arm", "--fifo", str(peer.path), "--scope", "", "--after", "60")
    assert done.returncode == EXIT_USAGE
    assert "argument --scope: empty (an unset variable?)" in done.stderr
    assert peer.messages == []


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["timeout", "30"], "timeout"),
        (["/usr/bin/python3", "-X", "dev", "/venv/bin/ftimer", "exec"], "/venv/bin/ftimer"),
        (["python3", "-W", "error", "-m", "ftimer_client", "exec"], "ftimer_client"),
        (["pypy3", "-u", "tool.py"], "tool.py"),
    ],
)
def test_a_wrapper_is_named_by_its_program(argv: List[str], named: str) -> None:
    # An interpreter's option value was taken for its program: "`dev` runs this command".
    assert _program(argv) == named
