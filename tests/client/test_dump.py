"""The stack-dump hook: real workers, real signals, dumps read the way a server reads them.

A process keeps its hook for life, so every hook here is registered in a worker process
the test starts, never in the test process (which only meets values that are refused
before anything is registered). Every process signalled is one this test started, or its
fork, checked by parent pid.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import select
import signal
import stat
import subprocess
import sys
import textwrap
import warnings
from collections.abc import Iterator
from typing import Dict, List, Optional

import pytest
from hypothesis import given
from hypothesis import strategies as st
from tests.conftest import not_pid_1, wait_until

from ftimer_client import FileTimerClient
from ftimer_client._cli import main as ftimer_main
from ftimer_client._wire import V2Lines
from ftimer_protocol import (
    MAX_LABEL_VALUE,
    MAX_LABELS,
    MAX_PID,
    MAX_TIME,
    PIPE_BUF,
    Arm,
    DumpHook,
    Expire,
    MessageTooLarge,
    decode,
    parse_signal,
)

from .conftest import FifoPeer

SIGUSR2 = int(signal.SIGUSR2)
RTMIN = int(signal.SIGRTMIN)
MAX_FD = 2**31 - 1  # DumpHook.fd's bound in the schema
# Settings of the test's own environment that would change what a worker does.
CLEAN_ENV = ("FTIMER_DUMP_SIGNAL", "TORCHELASTIC_RUN_ID", "RANK", "LOCAL_RANK", "FTIMER_FIFO")


class Worker:
    """A Python worker process running ``code`` (``-W error``: any warning fails it)."""

    def __init__(self, code: str, *args: str, env: Optional[Dict[str, str]] = None) -> None:
        environ = {k: v for k, v in os.environ.items() if k not in CLEAN_ENV}
        environ.update(env or {})
        self.code = textwrap.dedent(code)
        self.proc = subprocess.Popen(
            [sys.executable, "-W", "error", "-c", self.code, *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=environ,
        )
        self.pid = self.proc.pid

    def line(self, timeout: float = 15.0) -> str:
        """The next line the worker prints."""
        assert self.proc.stdout is not None
        ready = select.select([self.proc.stdout], [], [], timeout)[0]
        assert ready, "the worker printed nothing"
        text = self.proc.stdout.readline().decode()
        assert text, f"the worker exited: {self.stderr()}"
        return text

    def line_of(self, fragment: str) -> int:
        """The line number of the worker's code that contains ``fragment``."""
        (number,) = [i for i, t in enumerate(self.code.splitlines(), 1) if fragment in t]
        return number

    def stderr(self) -> str:
        self.close()
        assert self.proc.stderr is not None
        return self.proc.stderr.read().decode()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()  # our own child
        self.proc.wait(30)
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            self.proc.stdin.close()


@contextlib.contextmanager
def worker(code: str, *args: str, env: Optional[Dict[str, str]] = None) -> Iterator[Worker]:
    w = Worker(code, *args, env=env)
    try:
        yield w
    finally:
        w.close()
        for pipe in (w.proc.stdout, w.proc.stderr):
            if pipe is not None:
                pipe.close()


def catches(pid: int, sig: int) -> bool:
    """What a server checks before it sends the signal: the SigCgt mask of the process."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("SigCgt:"):
                return bool(int(line.split()[1], 16) >> (sig - 1) & 1)
    raise AssertionError("no SigCgt line")


def dump_of(pid: int, fd: int) -> str:
    """The dump file's contents, read as a server does: through /proc/PID/fd/FD."""
    with open(f"/proc/{pid}/fd/{fd}", encoding="utf-8", errors="replace") as f:
        return f.read()


def thread_headers(dump: str) -> List[str]:
    return [t for t in dump.splitlines() if t.startswith(("Thread 0x", "Current thread 0x"))]


# Syscall numbers of nanosleep and clock_nanosleep (x86_64, then aarch64).
SLEEP_SYSCALLS = {"35", "230", "101", "115"}


def in_sleep(pid: int, tid: int) -> bool:
    """Whether thread ``tid`` of ``pid`` is in a sleep system call."""
    with open(f"/proc/{pid}/task/{tid}/syscall") as f:
        number = f.read().split(" ", 1)[0]
    with open(f"/proc/{pid}/task/{tid}/wchan") as f:
        wchan = f.read()
    return number in SLEEP_SYSCALLS or "nanosleep" in wchan


def from_pid(messages: list, pid: int) -> list:
    return [m for m in messages if getattr(m, "pid", None) == pid]


# -- a stuck worker dumps every thread ----------------------------------------------------

STUCK = """
    import ctypes, sys, threading
    from ftimer_client import FileTimerClient

    client = FileTimerClient(sys.argv[1], dump_signal=sys.argv[2], labels={})
    client.arm("step", 60)
    inside, release = threading.Event(), threading.Event()

    def waiting_in_python():
        inside.set()
        release.wait()

    def stuck_in_c():
        # The tid is printed in the call's own line: the dump names this line.
        ctypes.PyDLL(None).sleep(print(threading.get_native_id(), flush=True) or 60)

    threading.Thread(target=waiting_in_python, daemon=True).start()
    inside.wait()
    threading.Thread(target=stuck_in_c, daemon=True).start()
    sys.stdin.read()
"""


@pytest.mark.parametrize("name", ["SIGUSR2", "SIGRTMIN+3"])
def test_a_worker_stuck_in_c_with_the_gil_dumps_every_thread(peer: FifoPeer, name: str) -> None:
    sig = parse_signal(name)
    with worker(STUCK, str(peer.path), name) as w:
        (arm,) = from_pid(peer.wait_for(lambda m: bool(from_pid(m, w.pid))), w.pid)
        # The arm line announces the hook: its signal, and its file's descriptor.
        assert isinstance(arm, Arm)
        assert arm.dump is not None
        assert arm.dump.signal == sig
        fd = arm.dump.fd
        target = os.readlink(f"/proc/{w.pid}/fd/{fd}")
        assert target.endswith("(deleted)"), target  # anonymous: nothing left behind
        assert stat.S_ISREG(os.stat(f"/proc/{w.pid}/fd/{fd}").st_mode)
        with open(f"/proc/{w.pid}/fdinfo/{fd}") as f:
            flags = int(next(t for t in f if t.startswith("flags:")).split()[1], 8)
        assert flags & os.O_APPEND  # every dump lands at the end of the file
        assert dump_of(w.pid, fd) == ""
        assert catches(w.pid, sig)

        tid = int(w.line())
        wait_until(lambda: in_sleep(w.pid, tid), what="the thread to sleep in C")
        os.kill(w.pid, sig)

        def four_threads() -> str:  # the worker's three, and the client's watch
            text = dump_of(w.pid, fd)
            return text if len(thread_headers(text)) == 4 else ""

        dump = wait_until(four_threads, what="a dump of four threads")
        # Still asleep: the dump was written while that thread held the GIL.
        assert in_sleep(w.pid, tid)
        assert f"line {w.line_of('PyDLL(None).sleep')} in stuck_in_c" in dump
        assert "in waiting_in_python" in dump
        assert "in <module>" in dump
        assert "in _watch" in dump
        assert w.proc.poll() is None  # a dump does not end the worker


# -- the environment variable -------------------------------------------------------------

FROM_ENV = """
    import sys
    from ftimer_client import FileTimerClient

    a = FileTimerClient(sys.argv[1], labels={})
    b = FileTimerClient(sys.argv[1], labels={"job": "b"})
    off = FileTimerClient(sys.argv[1], labels={}, dump_signal=0)
    a.arm("a", 60)
    a.arm("a15", 60, signal=15)
    b.arm("b", 60)
    a.expire("e", signal=0)
    off.arm("off", 60)
    print(off.dump_hook, flush=True)
    sys.stdin.read()
"""


def test_the_environment_turns_it_on_for_every_arm_and_expire(peer: FifoPeer) -> None:
    sig = RTMIN + 2
    with worker(FROM_ENV, str(peer.path), env={"FTIMER_DUMP_SIGNAL": " rtmin+2 "}) as w:
        assert w.line() == "None\n"  # dump_signal=0: off, whatever the environment says
        mine = from_pid(peer.wait_for(lambda m: len(from_pid(m, w.pid)) == 5), w.pid)
        assert [(type(m), m.scope_id) for m in mine] == [
            (Arm, "a"),
            (Arm, "a15"),
            (Arm, "b"),
            (Expire, "e"),
            (Arm, "off"),
        ]
        hooks = {m.dump for m in mine[:4]}
        assert len(hooks) == 1  # one registration, shared by the clients of the process
        (hook,) = hooks
        assert hook is not None
        assert hook.signal == sig
        assert mine[4].dump is None
        assert catches(w.pid, sig)
        assert os.readlink(f"/proc/{w.pid}/fd/{hook.fd}").endswith("(deleted)")


@pytest.mark.parametrize("value", ["", "0", "  "])
def test_an_empty_or_zero_environment_leaves_it_off(
    fifo_path: object, monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.setenv("FTIMER_DUMP_SIGNAL", value)
    assert FileTimerClient(fifo_path, labels={}).dump_hook is None  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("value", "match"),
    [
        ("NOPE", "unknown signal"),
        ("SIGRTMIN+99", "unknown signal"),
        ("KILL", "SIGKILL cannot be caught"),
        ("19", "SIGSTOP cannot be caught"),
        ("TERM", "SIGTERM .15. has a meaning of its own"),
        ("SIGCHLD", "SIGCHLD .17. has a meaning of its own"),
        ("SEGV", "SIGSEGV .11. has a meaning of its own"),
        ("65", r"65 is not a signal number \(1\.\.64\)"),
    ],
)
def test_an_invalid_environment_warns_and_leaves_it_off(
    fifo_path: object, monkeypatch: pytest.MonkeyPatch, value: str, match: str
) -> None:
    monkeypatch.setenv("FTIMER_DUMP_SIGNAL", value)
    prefix = re.escape(f"FTIMER_DUMP_SIGNAL={value!r}: ")
    with pytest.warns(RuntimeWarning, match=f"^{prefix}{match}") as w:
        client = FileTimerClient(fifo_path, labels={})  # type: ignore[arg-type]
    assert "stack dumps stay off" in str(w[0].message)
    assert w[0].filename == __file__  # points at the construction, not the client
    assert client.dump_hook is None


def test_the_environment_is_not_read_for_another_process_or_torchs_protocol(
    fifo_path: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FTIMER_DUMP_SIGNAL", "USR2")
    # A client given a pid (of a child of the test's) arms timers of a process it does not
    # follow; the hook would be its own, so it is silently not read.
    with subprocess.Popen(["sleep", "600"]) as child:
        child.kill()  # the pid is only looked at, and stays the child's until waited for
        other = FileTimerClient(fifo_path, labels={}, pid=child.pid)  # type: ignore[arg-type]
    assert other.dump_hook is None
    with pytest.warns(RuntimeWarning, match="ignored with protocol 1"):
        v1 = FileTimerClient(fifo_path, protocol=1)  # type: ignore[arg-type]
    assert v1.dump_hook is None
    # Set to off: nothing to ignore, nothing to warn about (a torch agent's workers
    # speak protocol 1 unasked).
    monkeypatch.setenv("FTIMER_DUMP_SIGNAL", "0")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert FileTimerClient(fifo_path, protocol=1).dump_hook is None  # type: ignore[arg-type]


# -- refusals -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "match"),
    [
        ("KILL", "^SIGKILL cannot be caught, so it cannot dump: choose SIGUSR2"),
        (signal.SIGSTOP, "^SIGSTOP cannot be caught"),
        ("TERM", r"^SIGTERM \(15\) has a meaning of its own"),
        (signal.SIGINT, r"^SIGINT \(2\) has a meaning of its own"),
        ("SIGABRT", "faulthandler's own"),
        ("CONT", "arrives in normal operation"),
        (65, r"^65 is not a signal number \(1\.\.64\)"),
        (-10, "^-10 is not a signal number"),
        ("USR9", "^unknown signal: 'USR9'"),
        ("SIGRTMAX+1", "^unknown signal"),
        (True, "^dump_signal must be a signal number or name"),
        (12.0, "^dump_signal must be"),
    ],
)
def test_a_signal_the_hook_cannot_take_is_refused(
    fifo_path: object, value: object, match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        FileTimerClient(fifo_path, labels={}, dump_signal=value)  # type: ignore[arg-type]


def test_the_hook_is_refused_where_it_cannot_be_announced(fifo_path: object) -> None:
    with subprocess.Popen(["sleep", "600"]) as child:  # another process
        child.kill()  # the pid is only looked at, and stays the child's until waited for
        with pytest.raises(ValueError, match="cannot be used with pid: the hook has to be"):
            FileTimerClient(fifo_path, pid=child.pid, dump_signal="USR2")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="needs protocol 2"):
        FileTimerClient(fifo_path, protocol=1, dump_signal="USR2")  # type: ignore[arg-type]


REFUSALS = """
    import faulthandler, json, os, signal, sys, warnings
    from ftimer_client import FileTimerClient

    path = sys.argv[1]
    calls = []

    def on_usr1(signum, frame):
        calls.append(signum)

    signal.signal(signal.SIGUSR1, on_usr1)
    faulthandler.register(signal.SIGRTMIN + 5, file=sys.stderr)  # outside signal.signal
    report = {}
    for value in ("SIGUSR1", "SIGRTMIN+5"):
        try:
            FileTimerClient(path, labels={}, dump_signal=value)
            report[value] = "accepted"
        except ValueError as e:
            report[value] = str(e)
    os.environ["FTIMER_DUMP_SIGNAL"] = "USR1"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        env_client = FileTimerClient(path, labels={})
    del os.environ["FTIMER_DUMP_SIGNAL"]
    report["env"] = [str(w.message) for w in caught]
    report["env_hook"] = repr(env_client.dump_hook)
    report["usr1_is_the_apps"] = signal.getsignal(signal.SIGUSR1) is on_usr1
    signal.raise_signal(signal.SIGUSR1)
    report["apps_handler_ran"] = calls == [signal.SIGUSR1]

    first = FileTimerClient(path, labels={}, dump_signal="USR2")
    try:
        FileTimerClient(path, labels={}, dump_signal="SIGRTMIN+1")
        report["second"] = "accepted"
    except ValueError as e:
        report["second"] = str(e)
    report["same"] = FileTimerClient(path, dump_signal=12).dump_hook == first.dump_hook
    # Labels that fit PIPE_BUF only without the hook's member are refused with it.
    big = json.loads(sys.argv[2])
    FileTimerClient(path, labels=big)
    try:
        FileTimerClient(path, labels=big, dump_signal="USR2")
        report["too_large"] = "accepted"
    except ValueError as e:
        report["too_large"] = type(e).__name__ + ": " + str(e)
    print(json.dumps(report), flush=True)
"""


def test_the_applications_own_handlers_are_never_taken(fifo_path: object) -> None:
    # 20 bytes to spare here leave fewer than the hook's member needs in the worker too
    # (a line's size is reckoned with the widest pid and start time).
    big = labels_filling(20)
    with worker(REFUSALS, str(fifo_path), json.dumps(big)) as w:
        report = json.loads(w.line())
    assert report["SIGUSR1"].startswith(
        "this process handles SIGUSR1 with a Python handler of its own (on_usr1); the "
        "stack-dump hook would replace it"
    )
    assert report["SIGRTMIN+5"].startswith(
        "this process already catches SIGRTMIN+5 outside Python's signal module"
    )
    (warning,) = report["env"]
    assert warning.startswith("FTIMER_DUMP_SIGNAL='USR1': this process handles SIGUSR1")
    assert warning.endswith("stack dumps stay off")
    assert report["env_hook"] == "None"
    assert report["usr1_is_the_apps"]
    assert report["apps_handler_ran"]
    assert report["second"] == (
        "this process's stack-dump hook is on SIGUSR2; a process has one hook, so its "
        "clients must all use SIGUSR2"
    )
    assert report["same"]
    assert report["too_large"].startswith("MessageTooLarge: ")


# -- fork ---------------------------------------------------------------------------------

FORK = """
    import os, sys
    from ftimer_client import FileTimerClient

    client = FileTimerClient(sys.argv[1], dump_signal="USR2", labels={})

    def in_parent():
        client.arm("parent", 60)
        pid = os.fork()
        if pid == 0:
            in_child()
        sys.stdin.read()
        os.waitpid(pid, 0)

    def in_child():
        client.arm("child", 60)
        sys.stdin.read()
        os._exit(0)

    in_parent()
"""


def test_a_forked_child_dumps_into_a_file_of_its_own(peer: FifoPeer) -> None:
    with worker(FORK, str(peer.path)) as w:
        messages = peer.wait_count(2)
        (parent,) = from_pid(messages, w.pid)
        (child,) = [m for m in messages if m.pid != w.pid]
        assert isinstance(parent, Arm)
        assert isinstance(child, Arm)
        assert (parent.scope_id, child.scope_id) == ("parent", "child")
        with open(f"/proc/{child.pid}/stat") as f:
            assert int(f.read().rsplit(")", 1)[1].split()[1]) == w.pid  # our worker's child
        assert parent.dump is not None
        assert child.dump is not None
        assert child.dump.signal == parent.dump.signal == SIGUSR2
        parent_file = os.stat(f"/proc/{w.pid}/fd/{parent.dump.fd}")
        child_file = os.stat(f"/proc/{child.pid}/fd/{child.dump.fd}")
        assert parent_file.st_ino != child_file.st_ino  # two files, not one shared
        assert catches(child.pid, SIGUSR2)

        # A dump is written a few writes at a time: waited for until its frame is in.
        os.kill(child.pid, SIGUSR2)
        wait_until(
            lambda: "in in_child" in dump_of(child.pid, child.dump.fd), what="the child's dump"
        )
        assert dump_of(w.pid, parent.dump.fd) == ""  # nothing in the parent's file

        os.kill(w.pid, SIGUSR2)
        wait_until(
            lambda: "in in_parent" in dump_of(w.pid, parent.dump.fd), what="the parent's dump"
        )
        assert "in_child" not in dump_of(w.pid, parent.dump.fd)
        assert dump_of(child.pid, child.dump.fd).count("in in_child") == 1
        assert w.proc.stdin is not None
        w.proc.stdin.close()  # both read it: both exit
        assert w.proc.wait(30) == 0, w.stderr()


# -- lines --------------------------------------------------------------------------------

# The widest pid and start time (with room for +1): nothing reserved for a child's.
PID, START = MAX_PID - 1, 2**63 - 2
WIDEST = DumpHook(64, MAX_FD)
DUMP_MEMBER = b',"dump":{"signal":64,"fd":2147483647}'
LONGEST_LABELS = {f"k{i:02d}" + "x" * 29: "v" * MAX_LABEL_VALUE for i in range(MAX_LABELS)}


def line_size(labels: Optional[Dict[str, str]], dump: Optional[DumpHook] = None) -> int:
    """Bytes of the widest arm line with an empty scope."""
    return len(V2Lines(PID, START, 9, labels, dump).entry("")[0] % MAX_TIME)


def longest_scope(lines: V2Lines) -> int:
    """The length of the longest ASCII scope ``lines`` accepts."""
    return PIPE_BUF - len(lines.entry("")[0] % MAX_TIME)


def labels_filling(spare: int) -> Dict[str, str]:
    """Labels that leave exactly ``spare`` bytes of PIPE_BUF in the widest arm line with
    an empty scope (of PID and START, without a hook)."""
    labels = {f"l{i:02d}": "" for i in range(MAX_LABELS)}
    gap = PIPE_BUF - spare - line_size(labels)
    for key in labels:
        # "\x01" is written \u0001 (6 bytes), "v" as itself: together any byte count.
        wide = min(gap // 6, MAX_LABEL_VALUE)
        narrow = min(gap - 6 * wide, MAX_LABEL_VALUE - wide)
        labels[key] = "\x01" * wide + "v" * narrow
        gap -= 6 * wide + narrow
    assert gap == 0
    assert line_size(labels) == PIPE_BUF - spare
    return labels


@pytest.mark.skipif(PIPE_BUF < 4096, reason="the longest labels alone exceed a small PIPE_BUF")
def test_the_longest_labels_still_fit_with_the_widest_hook() -> None:
    assert all(len(k) == 32 for k in LONGEST_LABELS)
    without = V2Lines(PID, START, 9, LONGEST_LABELS)
    with_hook = V2Lines(PID, START, 9, LONGEST_LABELS, WIDEST)
    room = longest_scope(with_hook)
    assert room == longest_scope(without) - len(DUMP_MEMBER) > 0
    arm_format, _ = with_hook.entry("s" * room)
    assert len(arm_format % MAX_TIME) == PIPE_BUF
    assert decode(arm_format % MAX_TIME) == Arm(
        PID, "s" * room, MAX_TIME, 9, START, LONGEST_LABELS, WIDEST
    )
    with pytest.raises(MessageTooLarge):
        with_hook.entry("s" * (room + 1))


def test_labels_that_leave_no_room_for_the_hook_are_refused_when_built() -> None:
    exact = labels_filling(len(DUMP_MEMBER))
    assert line_size(exact, WIDEST) == PIPE_BUF  # room for the hook, and no scope
    short = labels_filling(len(DUMP_MEMBER) - 1)
    V2Lines(PID, START, 9, short)  # fits without the hook
    # Refused with it, whatever its descriptor: the widest one is what is counted.
    with pytest.raises(MessageTooLarge):
        V2Lines(PID, START, 9, short, DumpHook(SIGUSR2, 3))


def test_a_scope_that_fits_in_the_parent_fits_in_a_child_with_a_wider_descriptor() -> None:
    lines = V2Lines(PID, START, 9, None, DumpHook(SIGUSR2, 3))
    room = PIPE_BUF - len(lines.entry("")[0] % MAX_TIME) - (len(str(MAX_FD)) - 1)
    scope = "s" * room
    lines.entry(scope)
    with pytest.raises(MessageTooLarge):
        lines.entry(scope + "s")  # refused already in the parent, whose fd is short
    lines.rebind(PID + 1, START + 1, DumpHook(SIGUSR2, MAX_FD))
    arm_format, _ = lines.entry(scope)
    assert len(arm_format % MAX_TIME) <= PIPE_BUF
    assert decode(arm_format % 1.0).dump == DumpHook(SIGUSR2, MAX_FD)


def test_lines_built_without_a_hook_never_announce_one() -> None:
    lines = V2Lines(PID, START, 9, None)
    lines.rebind(PID + 1, START, DumpHook(SIGUSR2, 5))
    assert lines.dump is None
    assert decode(lines.entry("s")[0] % 1.0).dump is None
    with_hook = V2Lines(PID, START, 9, None, DumpHook(SIGUSR2, 5))
    with_hook.rebind(PID + 1, START, None)  # a child that could not get a file of its own
    assert with_hook.dump is None
    assert decode(with_hook.expire("s", 9)) == Expire(PID + 1, "s", 9, START)


@given(
    scope=st.text(max_size=200),
    sig=st.integers(1, 64),
    fd=st.integers(0, MAX_FD),
    deadline=st.floats(0.0, MAX_TIME),
)
def test_every_line_with_a_hook_is_the_message(
    scope: str, sig: int, fd: int, deadline: float
) -> None:
    hook = DumpHook(sig, fd)
    lines = V2Lines(PID, START, 9, {"job": "j"}, hook)
    arm_format, _ = lines.entry(scope)
    line = arm_format % deadline
    assert len(line) <= PIPE_BUF
    assert decode(line) == Arm(PID, scope, float(b"%.6f" % deadline), 9, START, {"job": "j"}, hook)
    assert decode(lines.arm(scope, deadline, 15)).dump == hook
    assert decode(lines.expire(scope, 0)) == Expire(PID, scope, 0, START, {"job": "j"}, hook)


# -- the ftimer command --------------------------------------------------


@not_pid_1
def test_the_command_offers_no_dump_signal_and_ignores_the_environment(
    peer: FifoPeer, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert ftimer_main(["arm", "--scope", "s", "--after", "5", "--dump-signal", "USR2"]) == 2
    assert "unrecognized arguments: --dump-signal" in capsys.readouterr().err
    for command in ("arm", "expire", "exec"):
        assert ftimer_main([command, "--help"]) == 0
        assert "has no --dump-signal" in " ".join(capsys.readouterr().out.split())
    # The timer is for another process (by default the calling shell): the hook cannot
    # be this command's, so the environment's setting is not for it.
    monkeypatch.setenv("FTIMER_DUMP_SIGNAL", "USR2")
    args = ["--fifo", str(peer.path), "--pid", str(os.getpid()), "--after", "5"]
    assert ftimer_main(["arm", *args, "--scope", "s"]) == 0
    assert ftimer_main(["arm", *args, "--scope", "t", "--signal", "RTMIN+2"]) == 0
    first, second = peer.wait_count(2)
    assert isinstance(first, Arm)
    assert isinstance(second, Arm)
    assert first.dump is None
    assert second.signal == RTMIN + 2
    assert capsys.readouterr().err == ""
