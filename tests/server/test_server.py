"""FileTimerServer end to end: a real FIFO, real child processes, real signals (to those
children only)."""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import pathlib
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from typing import Any, List, Optional, Set, Tuple

import msgspec
import pytest
from tests.conftest import in_private_pid_namespace, wait_until

from ftimer_protocol import LABEL_KEY_PATTERN, MAX_TIME, Arm, Disarm, Expire, TimerRequestV1, encode
from ftimer_server import (
    Armed,
    DecodeFailed,
    Disarmed,
    Escalated,
    Event,
    Expired,
    FifoBusy,
    FileTimerRequest,
    FileTimerServer,
    IncidentOptions,
    Lifecycle,
    Policy,
    Reaped,
    RecordingSignaller,
    Rejected,
    RejectReason,
    SystemInspector,
    Timer,
    Unkillable,
    Worker,
    WorkerGone,
)
from ftimer_server.server import _server

from .conftest import (
    GRACEFUL,
    STUBBORN,
    Recorder,
    proc_start_time,
    ready_child,
    send,
    wait_exit,
)


@pytest.fixture
def events() -> Recorder:
    return Recorder()


@pytest.fixture
def server(fifo_path: pathlib.Path, events: Recorder):  # type: ignore[no-untyped-def]
    with FileTimerServer(fifo_path, on_event=events) as srv:
        yield srv


def test_expired_worker_is_killed_within_milliseconds(
    server: FileTimerServer, fifo_path: pathlib.Path, events: Recorder, children
) -> None:
    child = children()
    deadline = time.monotonic() + 0.1
    send(
        fifo_path,
        Arm(
            pid=child.pid,
            scope_id="step",
            deadline=deadline,
            signal=signal.SIGKILL,
            start_time=proc_start_time(child.pid),
            labels={"rank": "0"},
        ),
    )
    code, died = wait_exit(child)
    assert code == -signal.SIGKILL
    assert died - deadline < 0.5  # generous: the machine is shared; typically ~1 ms
    server.sync()
    [reaped] = events.of(Reaped)
    assert isinstance(reaped, Reaped)
    assert (reaped.pid, reaped.signal, reaped.scope_id) == (child.pid, 9, "step")
    assert reaped.labels == {"rank": "0"}
    assert 0 <= reaped.late < 0.5
    wait_until(lambda: events.of(WorkerGone))  # its pidfd turned readable


def test_torch_v1_lines_open_write_close(
    server: FileTimerServer, fifo_path: pathlib.Path, events: Recorder, children
) -> None:
    # Exactly what torch's FileTimerClient writes: json.dumps, one open/write/close each.
    doomed, spared = children(), children()

    def torch_line(pid: int, scope: str, expiration: float, sig: int) -> bytes:
        body = {"version": 1, "pid": pid, "scope_id": scope, "expiration_time": expiration}
        return (json.dumps({**body, "signal": sig}) + "\n").encode()

    now = time.time()
    send(fifo_path, raw=torch_line(doomed.pid, "train.py#12", now + 0.1, 15))
    # Far off: a near deadline could pass before its release is read, and kill it.
    send(fifo_path, raw=torch_line(spared.pid, "train.py#12", now + 3600, 9))
    send(fifo_path, raw=torch_line(spared.pid, "train.py#12", -1, 0))
    server.sync()
    # The events, not armed(): the doomed timer may have expired by now.
    armed = [(e.timer.pid, e.timer.scope_id, e.timer.signal) for e in events.of(Armed)]
    assert armed == [(doomed.pid, "train.py#12", 15), (spared.pid, "train.py#12", 9)]
    assert [e.timer.pid for e in events.of(Disarmed)] == [spared.pid]
    assert wait_exit(doomed)[0] == -signal.SIGTERM
    server.sync()
    assert [e.pid for e in events.of(Reaped)] == [doomed.pid]
    assert spared.poll() is None


def test_torch_no_limit_times_arm_a_timer_that_never_fires(
    server: FileTimerServer, fifo_path: pathlib.Path, children
) -> None:
    # torch's `with expires(after=1): with expires(after=sys.maxsize):` re-arms the
    # scope beyond any bound (or at Infinity, or NaN), and torch's server never expires
    # it: the outer deadline must not stay armed and kill the healthy worker.
    times = {"inf": math.inf, "nan": math.nan, "maxsize": time.time() + sys.maxsize}
    worker = children()
    for scope, far in times.items():
        outer = time.time() + 60  # the outer block's deadline, then the inner one's
        line = {"version": 1, "pid": worker.pid, "scope_id": scope, "expiration_time": outer}
        send(fifo_path, raw=(json.dumps({**line, "signal": 9}) + "\n").encode())
        line["expiration_time"] = far
        send(fifo_path, raw=(json.dumps({**line, "signal": 9}) + "\n").encode())
    server.sync()
    # Armed at the protocol's furthest wall-clock time, MAX_TIME: millions of years away.
    armed = {t.scope_id: t.deadline for t in server.armed()}
    assert sorted(armed) == sorted(times)
    assert min(armed.values()) > time.monotonic() + MAX_TIME - time.time() - 60
    assert worker.poll() is None


def test_disarmed_and_report_only_timers_do_not_kill(
    server: FileTimerServer, fifo_path: pathlib.Path, events: Recorder, children
) -> None:
    child = children()
    deadline = time.monotonic() + 0.05
    send(
        fifo_path,
        Arm(pid=child.pid, scope_id="done", deadline=deadline, signal=9),
        Disarm(pid=child.pid, scope_id="done"),
        Arm(pid=child.pid, scope_id="report", deadline=deadline, signal=0),
    )
    time.sleep(max(0.0, deadline - time.monotonic()))  # let the deadline pass
    wait_until(lambda: events.of(Expired))
    server.sync()
    assert child.poll() is None
    assert [e.timer.scope_id for e in events.of(Expired)] == ["report"]  # type: ignore[attr-defined]
    assert events.of(Reaped) == []


def test_a_worker_alive_after_its_sigkill_is_reported_unkillable(
    fifo_path: pathlib.Path, events: Recorder, children, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As a worker in a hung FUSE or NFS wait lives on: the signaller's SIGKILL reaches
    # nobody, so that this sleeping child stands for it; the server looks again later.
    from ftimer_server.core import _reaper

    class Unheeded(RecordingSignaller):
        kills = True

    monkeypatch.setattr(_reaper, "KILL_CHECK", 0.3)
    child = children()
    with FileTimerServer(fifo_path, on_event=events, signaller=Unheeded()) as server:
        send(fifo_path, Arm(pid=child.pid, scope_id="s", deadline=time.monotonic(), signal=9))
        [event] = wait_until(lambda: events.of(Unkillable), what="the worker found alive")
        assert isinstance(event, Unkillable)
        assert (event.pid, event.waiting) == (child.pid, "state S")
        assert event.after >= 0.3
        assert (server.stats().unkillable, server.stats().unkillable_alive) == (1, 1)
        # Its wait ends: the pidfd says so, and the server tells.
        child.kill()
        child.wait()
        [gone] = wait_until(lambda: events.of(WorkerGone), what="the worker's end")
        assert isinstance(gone, WorkerGone)
        assert (gone.pid, gone.timers, gone.unkillable) == (child.pid, (), True)
        assert gone.decider is not None
        assert gone.decider.scope_id == "s"
        assert (server.stats().unkillable, server.stats().unkillable_alive) == (1, 0)


def test_a_worker_that_dies_mid_scope_is_cleaned_up_at_once(
    server: FileTimerServer, fifo_path: pathlib.Path, events: Recorder, children
) -> None:
    child = children()
    send(fifo_path, Arm(pid=child.pid, scope_id="s", deadline=time.monotonic() + 3600, signal=9))
    server.sync()
    assert len(server.armed()) == 1
    child.kill()
    child.wait()
    wait_until(lambda: events.of(WorkerGone))  # promptly, long before the deadline
    [gone] = events.of(WorkerGone)
    assert isinstance(gone, WorkerGone)
    assert [t.scope_id for t in gone.timers] == ["s"]
    assert server.armed() == []
    assert server.workers() == []


def test_without_pidfds_a_dead_worker_is_noticed_at_its_deadline(
    fifo_path: pathlib.Path, events: Recorder, children
) -> None:
    class NoPidfd(SystemInspector):
        def open(self, pid: int) -> Optional[int]:
            return None

    with FileTimerServer(fifo_path, on_event=events, inspector=NoPidfd()) as server:
        child = children()
        far = time.monotonic() + 3600
        send(fifo_path, Arm(pid=child.pid, scope_id="s", deadline=far, signal=9))
        server.sync()
        child.kill()
        child.wait()
        server.sync()
        assert events.of(WorkerGone) == []  # no pidfd: nothing tells of its exit
        # Due now, judged against a worker certainly dead (a near deadline in the first
        # arm could pass while it still lived, and have it reaped).
        send(fifo_path, Arm(pid=child.pid, scope_id="s", deadline=time.monotonic(), signal=9))
        wait_until(lambda: events.of(WorkerGone))
        assert events.of(Reaped) == []


def test_escalation_kills_a_worker_that_ignores_sigterm(fifo_path: pathlib.Path, children) -> None:
    events = Recorder()
    server = FileTimerServer(fifo_path, on_event=events, escalate_after=0.2)
    with server, ready_child(STUBBORN) as child:
        send(fifo_path, Expire(pid=child.pid, scope_id="stuck", signal=signal.SIGTERM))
        code, _ = wait_exit(child)
        assert code == -signal.SIGKILL
        server.sync()
        [esc] = events.of(Escalated)
        assert isinstance(esc, Escalated)
        assert (esc.pid, esc.signal, esc.delivered) == (child.pid, signal.SIGKILL, True)


def test_a_stop_during_the_grace_period_escalates_at_once(fifo_path: pathlib.Path) -> None:
    # The SIGKILL due after the grace lived in the stopped server's memory only: a worker
    # ignoring SIGTERM ran on, stuck, for good.
    events = Recorder()
    server = FileTimerServer(fifo_path, on_event=events, escalate_after=3600)
    with ready_child(STUBBORN) as child:
        with server:
            send(fifo_path, Expire(pid=child.pid, scope_id="stuck", signal=signal.SIGTERM))
            wait_until(lambda: events.of(Reaped))
            assert child.poll() is None  # it ignores SIGTERM
        code, _ = wait_exit(child)
        assert code == -signal.SIGKILL
    [esc] = events.of(Escalated)
    assert isinstance(esc, Escalated)
    assert (esc.pid, esc.delivered) == (child.pid, True)
    assert esc.after < 3600


def test_signal_override_lets_a_worker_clean_up(fifo_path: pathlib.Path) -> None:
    events = Recorder()
    server = FileTimerServer(
        fifo_path, on_event=events, signal_override=signal.SIGTERM, escalate_after=30
    )
    with server, ready_child(GRACEFUL) as child:
        # The timer asks for SIGKILL (the client's default); the server sends SIGTERM.
        send(fifo_path, Expire(pid=child.pid, scope_id="step", signal=signal.SIGKILL))
        code, _ = wait_exit(child)
        assert code == 42
        assert child.stdout.read() == b"cleaned up\n"
        wait_until(lambda: events.of(WorkerGone))
        server.sync()
        [reaped] = events.of(Reaped)
        assert isinstance(reaped, Reaped)
        assert (reaped.pid, reaped.signal, reaped.delivered) == (child.pid, 15, True)
        assert events.of(Escalated) == []  # it exited: the SIGKILL was cancelled
        assert server.stats().reaps == {signal.SIGTERM: 1}


def test_signal_override_escalates_when_sigterm_is_ignored(fifo_path: pathlib.Path) -> None:
    events = Recorder()
    server = FileTimerServer(
        fifo_path, on_event=events, signal_override=signal.SIGTERM, escalate_after=0.2
    )
    with server, ready_child(STUBBORN) as child:
        send(fifo_path, Expire(pid=child.pid, scope_id="stuck", signal=signal.SIGKILL))
        code, _ = wait_exit(child)
        assert code == -signal.SIGKILL
        server.sync()
        [reaped] = events.of(Reaped)
        [esc] = events.of(Escalated)
        assert isinstance(reaped, Reaped)
        assert isinstance(esc, Escalated)
        assert reaped.signal == signal.SIGTERM
        assert (esc.pid, esc.signal, esc.after) == (child.pid, signal.SIGKILL, 0.2)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        # NaN spun the loop at 100% CPU (and on_tick, a systemd keep-alive, never ran).
        ({"tick_interval": float("nan"), "on_tick": lambda: None}, "^tick_interval must be"),
        ({"tick_interval": float("inf"), "on_tick": lambda: None}, "^tick_interval must be"),
        # NaN turned escalation off, the SIGKILL at stop() too.
        ({"escalate_after": float("nan")}, "^escalate_after must be a finite"),
        ({"fifo_mode": -1}, "^the FIFO's mode must be permission bits"),  # was 0o7777
        ({"fifo_mode": 0o1620}, "^the FIFO's mode must be permission bits"),
    ],
)
def test_arguments_out_of_range_are_refused(
    fifo_path: pathlib.Path, kwargs: dict, match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        FileTimerServer(fifo_path, **kwargs)
    assert not os.path.exists(fifo_path)


def test_policy_limits_are_whole_numbers() -> None:
    for bad in (float("nan"), 0, True, 2.5):
        with pytest.raises(ValueError, match=r"^max_timers must be a whole number >= 1"):
            Policy(max_timers=bad)  # type: ignore[arg-type]


def my_children() -> Set[int]:
    def parent(pid: str) -> int:
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                return int(f.read().rsplit(b")", 1)[1].split()[1])
        except OSError:
            return 0

    return {int(p) for p in os.listdir("/proc") if p.isdigit() and parent(p) == os.getpid()}


def test_a_bad_argument_leaves_no_capture_helper_behind(fifo_path: pathlib.Path) -> None:
    before = my_children()
    with pytest.raises(ValueError, match="escalate_after"):
        FileTimerServer(fifo_path, incidents=IncidentOptions(), escalate_after=-1)
    # Its helper (python -m ftimer_server.incidents) was started, then left running.
    assert my_children() <= before
    with FileTimerServer(fifo_path):  # ... nor does a `with` whose start() fails
        with pytest.raises(FifoBusy), FileTimerServer(fifo_path, incidents=IncidentOptions()):
            pass
        assert my_children() <= before


def test_timers_given_to_a_stopped_server_are_refused_not_kept_unenforced(
    fifo_path: pathlib.Path, children
) -> None:
    # register_timers() after stop() was accepted: armed() listed a timer nothing would
    # enforce, a pidfd leaked and an error was logged; clear_timers() did nothing.
    child = children()
    server = FileTimerServer(fifo_path, signaller=RecordingSignaller())
    server.start()
    server.stop()
    request = FileTimerRequest(child.pid, "late", time.time() + 60, signal.SIGKILL)
    with pytest.raises(RuntimeError, match="the server is stopped"):
        server.register_timers([request])
    with pytest.raises(RuntimeError, match="the server is stopped"):
        server.clear_timers([child.pid])
    assert server.armed() == []


def test_in_a_forked_child_the_parents_server_is_left_alone(
    fifo_path: pathlib.Path, children
) -> None:
    # The child's stop() (or a with block it left) waited 10 s for a loop that runs in
    # the parent, then warned it was busy; its sync() wrote into the parent's FIFO and
    # timed out; its register_timers() armed what nothing enforced.
    child = children()
    request = FileTimerRequest(child.pid, "s", time.time() + 60, signal.SIGKILL)
    with FileTimerServer(fifo_path, signaller=RecordingSignaller()) as server:
        pid = os.fork()
        if pid == 0:  # the child: every outcome is its exit status, and it never returns
            status = 0
            try:
                for call in (lambda: server.register_timers([request]), lambda: server.sync(5)):
                    try:
                        call()
                        status |= 1
                    except RuntimeError as e:
                        status |= 0 if "made in process" in str(e) else 2
                start = time.monotonic()
                server.stop()
                status |= 4 if time.monotonic() - start > 1 else 0
            except BaseException:
                status |= 8
            finally:
                os._exit(status)
        assert os.waitpid(pid, 0)[1] == 0
        assert server.state is Lifecycle.RUNNING
        server.register_timers([request])
        server.sync()
        assert [t.scope_id for t in server.armed()] == ["s"]


def test_restore_before_start(fifo_path: pathlib.Path, events: Recorder, children) -> None:
    child, other = children(), children()
    saved = [
        Timer(child.pid, "a", time.monotonic() + 0.1, 9, proc_start_time(child.pid)),
        Timer(other.pid, "b", time.monotonic() + 0.1, 9, proc_start_time(other.pid) + 1),
    ]
    server = FileTimerServer(fifo_path, on_event=events)
    server.restore(saved)
    assert [t.pid for t in server.armed()] == [child.pid]
    with server:
        assert wait_exit(child)[0] == -9
    assert other.poll() is None


def test_the_restore_grace_begins_when_the_fifo_is_open(
    fifo_path: pathlib.Path,
    events: Recorder,
    children,  # type: ignore[no-untyped-def]
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The grace began at restore(): a start slower than it (a capture helper's, a
    # socket's, on a loaded host) spent it before any client could write, and an overdue
    # timer whose worker was about to re-send its disarm was reaped at once.
    child = children()
    signaller = RecordingSignaller()
    server = FileTimerServer(fifo_path, on_event=events, signaller=signaller, restore_grace=2.0)
    server.restore([Timer(child.pid, "step", 0.0, 9, proc_start_time(child.pid))])
    opened = _server.open_fifo

    def slow_open(*args: Any, **kwargs: Any) -> Any:
        time.sleep(2.2)
        return opened(*args, **kwargs)

    monkeypatch.setattr(_server, "open_fifo", slow_open)
    with server:
        server.sync()
        send(fifo_path, Disarm(pid=child.pid, scope_id="step"))  # the client's re-send
        server.sync()
    assert events.of(Expired) == []
    assert signaller.sent == []
    assert server.armed() == []


def test_restore_drops_malformed_timers(
    fifo_path: pathlib.Path, events: Recorder, children
) -> None:
    # A NaN deadline was armed as it was: it never expired, nor did any timer behind it
    # in the table, and the loop spun at 100% CPU on a NaN wait.
    child, other = children(), children()
    saved = [
        Timer(other.pid, "nan", float("nan"), 9, proc_start_time(other.pid)),
        Timer(other.pid, "pid", 0.0, 9, proc_start_time(other.pid)),
        Timer(other.pid, "key", 0.0, 9, proc_start_time(other.pid), {"job\n": "j"}),
        Timer(child.pid, "a", time.monotonic() + 0.1, 9, proc_start_time(child.pid)),
    ]
    saved[1] = msgspec.structs.replace(saved[1], pid="7")  # type: ignore[arg-type]
    server = FileTimerServer(fifo_path, on_event=events, restore_grace=0)
    server.restore(saved)
    assert [(t.pid, t.scope_id) for t in server.armed()] == [(child.pid, "a")]
    failed = events.of(DecodeFailed)
    assert [e.reason.split(" - ")[0] for e in failed] == [  # type: ignore[attr-defined]
        "restore: Expected `float` >= 0.0",
        "restore: Expected `int`, got `str`",
        f"restore: Expected `str` matching regex {LABEL_KEY_PATTERN!r}",
    ]
    assert server.stats().decode_errors == {"MalformedMessage": 3}  # as register_timers()
    with server:
        assert wait_exit(child)[0] == -9
    assert other.poll() is None


def test_armed_snapshot(server: FileTimerServer, fifo_path: pathlib.Path, children) -> None:
    child = children()
    start = proc_start_time(child.pid)
    a, b = time.monotonic() + 5000.5, time.monotonic() + 6000.0  # monotonic: since boot
    send(
        fifo_path,
        Arm(pid=child.pid, scope_id="a", deadline=a, signal=15, labels={"job": "x"}),
        Arm(pid=child.pid, scope_id="b", deadline=b, signal=0),
    )
    server.sync()
    assert sorted(server.armed(), key=lambda t: t.scope_id) == [
        Timer(child.pid, "a", a, 15, start, {"job": "x"}),
        Timer(child.pid, "b", b, 0, start, None),
    ]
    [worker] = server.workers()
    assert (worker.pid, worker.start_time) == (child.pid, start)
    assert worker.pidfd is not None
    assert server.stats().armed == 2


def test_an_arm_for_a_process_that_exited_before_it_was_read_is_not_refused(
    fifo_path: pathlib.Path, events: Recorder, children
) -> None:
    # `ftimer exec -- true` over the FIFO: the command ran and exited (its parent keeps
    # it a zombie until the disarm is sent) before the server read its arm, which was
    # refused no_such_process: a warning, and a counted refusal, for a healthy command.
    child = children("true")
    os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)  # a zombie: the pid still its
    timer = Timer(child.pid, "saved", time.monotonic() + 30, 9, proc_start_time(child.pid))
    server = FileTimerServer(fifo_path, on_event=events)
    server.restore([timer])  # its saved timer is dropped: the worker ended
    with server:
        arm = Arm(pid=child.pid, scope_id="exec:true", deadline=time.monotonic() + 30, signal=9)
        send(fifo_path, arm, Expire(pid=child.pid, scope_id="x", signal=9))
        server.sync()
        stats = server.stats()
    assert stats.requests["arm"] == {"exited": 1}
    assert stats.requests["expire"] == {"exited": 1}
    assert stats.requests["restore"] == {"exited": 1}
    assert stats.rejections == {}
    assert events.of(Rejected) == []
    [gone] = events.of(WorkerGone)
    assert gone.timers == (timer,)  # type: ignore[attr-defined]
    assert server.armed() == []


class HidingInspector(SystemInspector):
    """A ``SystemInspector`` to which /proc shows nothing of process ``hidden`` (a /proc
    mounted ``hidepid=invisible`` for a server of another uid, or a process not
    dumpable): reading it raises ``ProcessLookupError``, as for no process."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.hidden = hidden

    def _hide(self, pid: int) -> None:
        if pid == self.hidden:
            raise ProcessLookupError(errno.ESRCH, f"no process {pid}")

    def tgid(self, pid: int) -> int:
        self._hide(pid)
        return super().tgid(pid)

    def start_time(self, pid: int) -> Optional[int]:
        self._hide(pid)
        return super().start_time(pid)

    def parent(self, pid: int) -> int:
        self._hide(pid)
        return super().parent(pid)

    def uid(self, pid: int) -> int:
        self._hide(pid)
        return super().uid(pid)


def test_a_live_process_hidden_in_proc_is_refused_never_counted_exited(
    fifo_path: pathlib.Path, events: Recorder, children
) -> None:
    # Its pidfd open and polling alive, /proc showing nothing of it: its arm was counted
    # "exited", with no warning, and the worker left unwatched.
    child = children()
    path = str(fifo_path.with_suffix(".socket"))
    inspector = HidingInspector(child.pid)
    with (
        FileTimerServer(
            fifo_path, on_event=events, inspector=inspector, socket_path=path
        ) as server,
        socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock,
    ):
        deadline = time.monotonic() + 30
        send(fifo_path, Arm(pid=child.pid, scope_id="fifo", deadline=deadline, signal=9))
        sock.connect(path)
        pidfd = os.pidfd_open(child.pid)  # as ftimer exec names its command
        try:
            message = encode(Arm(pid=child.pid, scope_id="socket", deadline=deadline, signal=9))
            socket.send_fds(sock, [message], [pidfd])
        finally:
            os.close(pidfd)
        wait_until(lambda: len(events.of(Rejected)) == 2, what="both refusals")
        stats = server.stats()
    refusals = sorted((e.scope_id, e.reason) for e in events.of(Rejected))  # type: ignore[attr-defined]
    assert refusals == [("fifo", RejectReason.UNVERIFIABLE), ("socket", RejectReason.UNVERIFIABLE)]
    assert stats.requests == {"arm": {"rejected": 2}}
    assert child.poll() is None


def test_idle_server_never_wakes_up(
    server: FileTimerServer, fifo_path: pathlib.Path, children
) -> None:
    child = children()
    far = time.monotonic() + 3600
    fd = os.open(fifo_path, os.O_WRONLY)  # a connected client, like ftimer's v2 client
    try:
        for i in range(2000):
            os.write(fd, encode(Arm(pid=child.pid, scope_id=f"s{i}", deadline=far, signal=9)))
        server.sync()
        assert server._thread is not None
        status = pathlib.Path(f"/proc/self/task/{server._thread.native_id}/status")

        def switches() -> int:
            lines = status.read_text().splitlines()
            return sum(int(x.split()[1]) for x in lines if "ctxt_switches" in x)

        def sleeping() -> bool:  # blocked in epoll_wait, its iteration finished
            stat = status.with_name("stat").read_text()
            return stat[stat.rindex(")") + 2] == "S"

        wait_until(sleeping)
        before = switches()
        time.sleep(1.0)  # measuring idleness takes time passing
        assert switches() == before
    finally:
        os.close(fd)


def test_keepalive_ticks_only_when_asked(fifo_path: pathlib.Path) -> None:
    ticks: List[float] = []
    with FileTimerServer(fifo_path, tick_interval=0.02, on_tick=lambda: ticks.append(1.0)):
        wait_until(lambda: len(ticks) >= 5)
    with pytest.raises(ValueError, match="together"):
        FileTimerServer(fifo_path, tick_interval=1.0)


def test_stop_is_prompt_with_no_client_ever(fifo_path: pathlib.Path) -> None:
    server = FileTimerServer(fifo_path)
    server.start()
    t = time.monotonic()
    server.stop()
    assert time.monotonic() - t < 2.0
    assert fifo_path.exists()  # kept for a restarted server's writers
    server.stop()  # idempotent
    with pytest.raises(RuntimeError, match="stopped"):
        server.start()


def test_stop_while_writers_hammer_the_fifo(fifo_path: pathlib.Path) -> None:
    server = FileTimerServer(fifo_path, remove_fifo=True)
    server.start()
    line = encode(Disarm(pid=12345, scope_id="s"))
    code = (
        "import os, sys\n"
        f"fd = os.open({str(fifo_path)!r}, os.O_WRONLY)\n"
        "print('open', flush=True)\n"
        f"line = {line!r} * 50\n"
        "try:\n"
        "    while True: os.write(fd, line)\n"
        "except BrokenPipeError: pass\n"
    )
    writers = [
        subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE) for _ in range(4)
    ]
    for w in writers:  # every writer holds the FIFO open before the stop
        assert w.stdout is not None
        assert w.stdout.readline() == b"open\n"
        w.stdout.close()
    wait_until(lambda: server.stats().requests.get("disarm", {}).get("unknown", 0) > 10_000)
    t = time.monotonic()
    server.stop()
    assert time.monotonic() - t < 5.0
    assert not fifo_path.exists()  # remove_fifo, and it created it
    for w in writers:  # no reader left: they get EPIPE and finish
        try:
            assert w.wait(timeout=30) in (0, -signal.SIGPIPE)
        finally:
            if w.poll() is None:
                w.kill()
                w.wait()


def test_sync_needs_a_running_server_and_times_out(fifo_path: pathlib.Path) -> None:
    gate = threading.Event()

    def slow(event: object) -> None:
        if isinstance(event, Armed):
            gate.wait(10)

    server = FileTimerServer(fifo_path, on_event=slow)
    with pytest.raises(RuntimeError, match="not running"):
        server.sync()
    server.restore([Timer(os.getppid(), "x", 1e9, 0)])  # refused: no blocking here
    with server:
        child = subprocess.Popen(["sleep", "60"])
        try:
            send(fifo_path, Arm(pid=child.pid, scope_id="s", deadline=1e9, signal=9))
            with pytest.raises(TimeoutError):
                server.sync(timeout=0.2)
            gate.set()
            server.sync()
        finally:
            child.kill()
            child.wait()


@pytest.mark.parametrize("timeout", [math.inf, 1e10])
def test_queries_take_a_timeout_of_infinity_or_longer_than_a_lock_waits(
    server: FileTimerServer, timeout: float
) -> None:
    # Each raised OverflowError (timestamp out of range) from the lock's or poll's wait.
    assert server.armed(timeout=timeout) == []
    assert server.stats(timeout=timeout).requests == {}
    server.sync(timeout=timeout)


def test_queries_refuse_a_nan_timeout_and_a_negative_one_does_not_wait(
    server: FileTimerServer,
) -> None:
    for query in (server.armed, server.stats, server.sync):
        with pytest.raises(ValueError, match="NaN"):
            query(timeout=math.nan)
    held, done = threading.Event(), threading.Event()

    def hold_the_table() -> None:
        with server._lock:  # as the loop holds it through a batch or a reap
            held.set()
            done.wait(30)

    holder = threading.Thread(target=hold_the_table, daemon=True)
    holder.start()
    try:
        assert held.wait(10)
        # -1 was the lock's "no limit": armed(timeout=-1) waited as long as it took.
        for query in (server.armed, server.stats):
            with pytest.raises(TimeoutError):
                query(timeout=-1)
    finally:
        done.set()
        holder.join()


def test_a_nan_stop_timeout_is_refused_when_set_and_stop_still_stops(
    fifo_path: pathlib.Path,
) -> None:
    # stop() raised ValueError for it, and the server ran on (a with block's exit too).
    with FileTimerServer(fifo_path) as server:
        with pytest.raises(ValueError, match="NaN"):
            server.stop_timeout = math.nan
        assert server.stop_timeout == 10.0
        server.stop_timeout = math.inf
    assert server.state is Lifecycle.STOPPED


def test_run_once_stops_the_server_when_its_sync_times_out(fifo_path: pathlib.Path) -> None:
    server = FileTimerServer(fifo_path)

    def timed_out(timeout: float = 10.0) -> None:
        raise TimeoutError("sync() did not complete within 10.0 s")

    server.sync = timed_out  # type: ignore[method-assign]
    with pytest.raises(TimeoutError):
        server.run_once()
    assert server.state is Lifecycle.STOPPED  # was left RUNNING, its FIFO open
    assert_lock_released(fifo_path)


def test_torch_constructor_and_log_event(fifo_path: pathlib.Path, children) -> None:
    logged: List[tuple[str, Optional[FileTimerRequest]]] = []
    server = FileTimerServer(str(fifo_path), "run-1", 0.1, True, lambda n, r: logged.append((n, r)))
    assert (server.run_id, server.max_interval) == ("run-1", 0.1)
    with server:
        child = children()
        send(
            fifo_path,
            TimerRequestV1(pid=child.pid, scope_id="s", expiration_time=time.time(), signal=9),
        )
        wait_exit(child)
        server.sync()
        assert abs(server.get_last_progress_time() - time.time()) <= 2
    names = [n for n, _ in logged]
    assert names == ["watchdog started", "timer expired", "kill worker process", "watchdog stopped"]
    request = logged[2][1]
    assert request is not None
    assert (request.worker_pid, request.scope_id, request.signal) == (child.pid, "s", 9)
    assert abs(request.expiration_time - time.time()) < 5
    assert json.loads(request.to_json())["version"] == 1


@pytest.mark.parametrize("error", [ValueError("callback bug"), SystemExit(3)])
def test_callback_errors_do_not_stop_the_loop(
    fifo_path: pathlib.Path, children, caplog: pytest.LogCaptureFixture, error: BaseException
) -> None:
    # sys.exit() in a callback ended the loop's thread: the watchdog stopped, unsaid.
    def broken(event: object) -> None:
        raise error

    def torch_style(name: str, request: Optional[FileTimerRequest]) -> None:
        request.worker_pid  # type: ignore[union-attr] # noqa: B018 - None when started
        # (which left the server running with no loop, its FIFO locked for good)

    with FileTimerServer(fifo_path, on_event=broken, log_event=torch_style) as server:
        child = children()
        send(fifo_path, Arm(pid=child.pid, scope_id="s", deadline=0.0, signal=9))
        assert wait_exit(child)[0] == -9
        server.sync()
    assert server.state is Lifecycle.STOPPED
    assert "on_event callback failed" in caplog.text
    assert "log_event callback failed" in caplog.text


RUN_UNTIL_SIGTERM = """
import os, signal, sys, threading, time
from ftimer_server import FileTimerServer
signal.signal(signal.SIGTERM, lambda *_: sys.exit(3))
server = FileTimerServer(sys.argv[1], on_event=print, on_tick=lambda: None, tick_interval=0.01)
threading.Thread(
    target=lambda: (
        [time.sleep(0.01) for _ in range(1000) if server.fifo is None],
        os.kill(os.getpid(), signal.SIGTERM),
    ),
    daemon=True,
).start()
server.run()
"""


def test_a_signal_handler_s_sys_exit_ends_run_in_the_main_thread(fifo_path: pathlib.Path) -> None:
    # Callbacks' SystemExit is swallowed off the main thread; in run()'s own thread it is
    # how a handler ends the program (it was logged and the server ran on).
    done = subprocess.run(
        [sys.executable, "-c", RUN_UNTIL_SIGTERM, str(fifo_path)], capture_output=True, timeout=60
    )
    assert done.returncode == 3, done.stderr
    assert b"iteration failed" not in done.stderr


def test_server_kills_itself_only_when_asked(fifo_path: pathlib.Path) -> None:
    # In a subprocess: the embedding process is the one that dies.
    script = f"""
import subprocess, sys, threading
from ftimer_protocol import Arm, encode
from ftimer_server import FileTimerServer, Reaped
import os
mode = sys.argv[1]
reaped = threading.Event()
server = FileTimerServer(
    {str(fifo_path)!r},
    kill_self_on_reap=mode != "keep",
    dry_run=mode == "dry",
    on_event=lambda e: reaped.set() if isinstance(e, Reaped) else None,
)
server.start()
child = subprocess.Popen(["sleep", "60"])
fd = os.open({str(fifo_path)!r}, os.O_WRONLY)
os.write(fd, encode(Arm(pid=child.pid, scope_id="s", deadline=0.0, signal=15)))
reaped.wait(30)
server.sync()  # the server's own signal follows the reap's events in the same iteration
print("survived", flush=True)
child.kill()
server.stop()
"""
    for mode in ("keep", "dry"):  # a dry run signalled the server itself
        kept = subprocess.run([sys.executable, "-c", script, mode], capture_output=True, timeout=60)
        assert (kept.returncode, kept.stdout) == (0, b"survived\n"), kept.stderr
    killed = subprocess.run([sys.executable, "-c", script, "kill"], capture_output=True, timeout=60)
    assert killed.returncode == -signal.SIGTERM
    assert b"survived" not in killed.stdout


def test_a_server_made_before_a_fork_is_not_started_in_the_child(fifo_path: pathlib.Path) -> None:
    # The child would have protected its parent's pid, not its own: a line naming the
    # child had the server signal itself.
    script = f"""
import os
from ftimer_server import FileTimerServer, RecordingSignaller
server = FileTimerServer({str(fifo_path)!r}, signaller=RecordingSignaller())
parent = os.getpid()
pid = os.fork()
if pid == 0:
    try:
        server.start()
        print("started", flush=True)
        server.stop()
    except RuntimeError as e:
        print(str(e).replace(str(parent), "PARENT"), flush=True)
    os._exit(0)
os.waitpid(pid, 0)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=60)
    assert done.stdout.decode().startswith(
        "this server was made in process PARENT, not in this one: a forked process makes its own"
    ), done.stderr


AGENT_AS_PID_1 = """
import os, subprocess, sys, tempfile
from ftimer_protocol import Arm, encode
from ftimer_server import FileTimerServer, Policy
assert os.getpid() == 1
fifo = os.path.join(tempfile.mkdtemp(), "timer.fifo")
with FileTimerServer(fifo, policy=Policy(descendants_only=True)) as server:
    worker = subprocess.Popen(["sleep", "60"])
    fd = os.open(fifo, os.O_WRONLY)
    os.write(fd, encode(Arm(pid=worker.pid, scope_id="s", deadline=0.0, signal=9)))
    print(worker.wait(timeout=30), server.stats().rejections, flush=True)
"""


def test_an_agent_that_is_pid_1_reaps_its_own_workers_with_descendants_only() -> None:
    # A container's entrypoint is pid 1 of its namespace: its children's chain of
    # parents ends at it, and descendants_only refused every one (not_descendant).
    done = in_private_pid_namespace(sys.executable, "-c", AGENT_AS_PID_1)
    assert (done.returncode, done.stdout) == (0, "-9 {}\n"), done.stderr


def test_dry_run_signals_nothing(fifo_path: pathlib.Path, events: Recorder, children) -> None:
    with FileTimerServer(fifo_path, on_event=events, dry_run=True) as server:
        child = children()
        send(fifo_path, Arm(pid=child.pid, scope_id="s", deadline=0.0, signal=9))
        wait_until(lambda: events.of(Reaped))
        server.sync()
    assert child.poll() is None
    assert events.of(Reaped)[0].delivered  # type: ignore[attr-defined]


def test_run_in_the_calling_thread(fifo_path: pathlib.Path, children) -> None:
    server = FileTimerServer(fifo_path)
    runner = threading.Thread(target=server.run)
    runner.start()
    wait_until(lambda: server.fifo is not None)
    child = children()
    send(fifo_path, Arm(pid=child.pid, scope_id="s", deadline=0.0, signal=9))
    assert wait_exit(child)[0] == -9
    server.stop()
    runner.join(10)
    assert not runner.is_alive()


def test_worker_record_is_what_a_signaller_gets() -> None:
    assert Worker(5, 6).pidfd is None


def test_stop_from_a_callback(fifo_path: pathlib.Path, children) -> None:
    stopped = threading.Event()
    logged: List[str] = []

    def on_event(event: object) -> None:
        if isinstance(event, Reaped):
            server.stop()  # from the loop's own thread: no join, no deadlock
            stopped.set()

    server = FileTimerServer(fifo_path, on_event=on_event, log_event=lambda n, r: logged.append(n))
    server.start()
    child = children()
    send(fifo_path, Arm(pid=child.pid, scope_id="s", deadline=0.0, signal=9))
    assert stopped.wait(10)
    assert server._thread is not None
    server._thread.join(10)
    assert not server._thread.is_alive()
    assert server.fifo is not None
    assert server.fifo.read_fd == -1  # closed by the loop thread itself
    server.stop()  # and again from outside: a no-op
    assert logged.count("watchdog stopped") == 1


def test_a_sync_pending_at_stop_completes(fifo_path: pathlib.Path, children) -> None:
    """The stop applies everything written before it, the sync marker included."""
    gate = threading.Event()
    in_callback = threading.Event()

    def slow(event: object) -> None:
        if isinstance(event, Armed):
            in_callback.set()
            gate.wait(10)

    server = FileTimerServer(fifo_path, on_event=slow)
    server.start()
    child = children()
    send(fifo_path, Arm(pid=child.pid, scope_id="s", deadline=1e9, signal=9))
    assert in_callback.wait(10)  # the loop is busy; the marker below stays unread
    errors: List[BaseException] = []

    def syncer() -> None:
        try:
            server.sync(timeout=30)
        except BaseException as e:
            errors.append(e)

    waiting = threading.Thread(target=syncer)
    waiting.start()
    stopper = threading.Thread(target=server.stop)
    wait_until(lambda: server._syncs)
    stopper.start()
    wait_until(lambda: server.state is Lifecycle.STOPPING)
    gate.set()
    stopper.join(10)
    waiting.join(10)
    assert errors == []
    assert not waiting.is_alive()
    with pytest.raises(RuntimeError, match="not running"):
        server.sync()


def test_a_sync_racing_stop_never_writes_into_another_file(
    fifo_path: pathlib.Path, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ftimer_server.server import _server

    entered, proceed = threading.Event(), threading.Event()
    write_all = _server.write_all

    def held(fd: int, line: bytes, deadline: float) -> None:
        entered.set()
        assert proceed.wait(10)
        write_all(fd, line, deadline)

    monkeypatch.setattr(_server, "write_all", held)
    server = FileTimerServer(fifo_path)
    server.start()
    errors: List[BaseException] = []

    def syncer() -> None:
        try:
            server.sync(timeout=10)
        except BaseException as e:
            errors.append(e)

    waiting = threading.Thread(target=syncer)
    waiting.start()
    assert entered.wait(10)  # sync() holds its descriptor and is about to write
    server.stop()  # closes the FIFO: its descriptor numbers are free again
    files = [os.open(tmp_path / f"f{i}", os.O_WRONLY | os.O_CREAT) for i in range(16)]
    try:
        proceed.set()
        waiting.join(10)
    finally:
        for fd in files:
            os.close(fd)
    assert [p.stat().st_size for p in tmp_path.iterdir()] == [0] * 16
    assert [type(e) for e in errors] == [RuntimeError]


def test_misuse_is_refused(fifo_path: pathlib.Path) -> None:
    from ftimer_server import RecordingSignaller

    with pytest.raises(ValueError, match="dry_run"):
        FileTimerServer(fifo_path, dry_run=True, signaller=RecordingSignaller())
    server = FileTimerServer(fifo_path)
    server.stop()
    with pytest.raises(RuntimeError, match="stopped"):
        server.restore([])


def test_what_is_in_the_pipe_at_stop_is_applied(fifo_path: pathlib.Path, children) -> None:
    gate = threading.Event()

    def slow(event: object) -> None:
        gate.wait(10)  # hold the loop while requests pile up in the pipe

    server = FileTimerServer(fifo_path, on_event=slow)
    server.start()
    child = children()
    send(fifo_path, Arm(pid=child.pid, scope_id="first", deadline=1e9, signal=9))
    wait_until(lambda: server.stats().requests.get("arm"))
    send(
        fifo_path,
        *(Arm(pid=child.pid, scope_id=f"s{i}", deadline=1e9, signal=9) for i in range(100)),
    )
    stopper = threading.Thread(target=server.stop)
    stopper.start()
    wait_until(lambda: server.state is Lifecycle.STOPPING)
    gate.set()
    stopper.join(10)
    assert len(server.armed()) == 101


def test_on_event_gets_only_the_event_types_asked_for(fifo_path: pathlib.Path, children) -> None:
    events = Recorder()
    child, far = children(), time.monotonic() + 3600
    with FileTimerServer(fifo_path, on_event=events, event_types=[Expired, Reaped]) as server:
        send(fifo_path, Arm(pid=child.pid, scope_id="a", deadline=far, signal=9))
        send(fifo_path, Disarm(pid=child.pid, scope_id="a"))
        send(fifo_path, Expire(pid=child.pid, scope_id="b", signal=signal.SIGKILL))
        assert wait_exit(child)[0] == -signal.SIGKILL
        server.sync()
        assert [type(e) for e in events.events] == [Expired, Reaped]
        assert server.stats().requests["arm"] == {"ok": 1}  # counted all the same
        server.set_event_types([Armed, Disarmed])
        other = children()
        send(fifo_path, Arm(pid=other.pid, scope_id="c", deadline=far, signal=9))
        send(fifo_path, Disarm(pid=other.pid, scope_id="c"))
        server.sync()
        assert [type(e) for e in events.events[2:]] == [Armed, Disarmed]
        server.set_event_types(None)
        send(fifo_path, Expire(pid=other.pid, scope_id="d", signal=signal.SIGKILL))
        assert wait_exit(other)[0] == -signal.SIGKILL
        server.sync()
        assert [type(e) for e in events.events[4:6]] == [Armed, Expired]  # everything again


def test_event_types_are_checked(fifo_path: pathlib.Path) -> None:
    with pytest.raises(ValueError, match="needs on_event"):
        FileTimerServer(fifo_path, event_types=[Reaped])
    with pytest.raises(TypeError, match="not an Event class"):
        FileTimerServer(fifo_path, on_event=print, event_types=[Timer])
    with pytest.raises(ValueError, match="needs on_event"):
        FileTimerServer(fifo_path).set_event_types([Reaped])


def test_an_event_class_stands_for_its_subclasses(
    fifo_path: pathlib.Path, events: Recorder, children
) -> None:
    with FileTimerServer(fifo_path, on_event=events, event_types=[Event]) as server:
        child = children()
        send(fifo_path, Arm(pid=child.pid, scope_id="s", deadline=0.0, signal=9))
        assert wait_exit(child)[0] == -9
        server.sync()
    assert [type(e) for e in events.events][:3] == [Armed, Expired, Reaped]


def test_on_change_once_per_iteration_that_changed_the_timers(
    fifo_path: pathlib.Path, children
) -> None:
    changes: List[int] = []
    child, far = children(), time.monotonic() + 3600
    with FileTimerServer(fifo_path, on_change=lambda: changes.append(1)) as server:
        server.sync()
        assert changes == []
        send(
            fifo_path,
            *(Arm(pid=child.pid, scope_id=f"s{i}", deadline=far, signal=9) for i in range(50)),
        )
        server.sync()
        assert 1 <= len(changes) <= 50  # per iteration, not per message
        before = len(changes)
        send(fifo_path, Disarm(pid=child.pid, scope_id="never-armed"))
        server.sync()
        assert len(changes) == before  # nothing changed
        child.kill()
        child.wait()
        wait_until(lambda: len(changes) > before)  # its timers were dropped
        assert server.armed() == []


def assert_lock_released(fifo_path: pathlib.Path) -> None:
    """A new server starts on ``fifo_path`` and serves: the last one let go of its lock."""
    with FileTimerServer(fifo_path) as next_one:
        next_one.sync()


def stop_once_running(server: FileTimerServer) -> threading.Thread:
    """A started thread that stops ``server`` once it is running."""
    stopper = threading.Thread(
        target=lambda: (wait_until(lambda: server.state is Lifecycle.RUNNING), server.stop())
    )
    stopper.start()
    return stopper


def stop_while_blocked(
    server: FileTimerServer,
    fifo_path: pathlib.Path,
    children,  # type: ignore[no-untyped-def]
    caplog: pytest.LogCaptureFixture,
    *,
    entered: threading.Event,
    release: threading.Event,
    calling: str,
) -> None:
    """Start ``server``, have a child's timer expire, and once the loop is blocked in its
    callback (``entered``: ``calling``, as the warning names it), stop it from another
    thread: stop() returns in time, the server is STOPPING and the warning names the
    callback. Then ``release`` it: the server stops and lets go of the FIFO's lock."""
    server.start()
    stopper = threading.Thread(target=server.stop)
    try:
        child = children()
        send(fifo_path, Arm(pid=child.pid, scope_id="s", deadline=0.0, signal=9))
        assert entered.wait(10)
        with caplog.at_level("WARNING", logger="ftimer_server"):
            stopper.start()
            stopper.join(10)
            assert not stopper.is_alive(), "stop() waited for the blocked callback"
        assert server.state is Lifecycle.STOPPING  # asked, if not yet taken
        (warning,) = [r.getMessage() for r in caplog.records if "stop()" in r.getMessage()]
        assert f"it is in its {calling}" in warning
        assert str(fifo_path) in warning
    finally:
        release.set()
        stopper.join(10)
    # Released: the loop delivers what was pending, closes the FIFO and ends.
    wait_until(lambda: server.state is Lifecycle.STOPPED)
    assert child.poll() is None  # dry run
    assert_lock_released(fifo_path)


def test_stop_returns_while_log_event_blocks_and_the_events_still_arrive(
    fifo_path: pathlib.Path, children, caplog: pytest.LogCaptureFixture
) -> None:
    # torch's stop() returns within its max_interval; this one used to wait for as long
    # as a callback blocked.
    entered, release = threading.Event(), threading.Event()
    logged: List[str] = []

    def log_event(name: str, request: Optional[FileTimerRequest]) -> None:
        logged.append(name)
        if name == "timer expired":
            entered.set()
            release.wait()  # until the test has seen stop() return

    server = FileTimerServer(fifo_path, log_event=log_event, dry_run=True)
    server.stop_timeout = 0.2
    calling = f"log_event callback, {log_event!r}"
    stop_while_blocked(
        server, fifo_path, children, caplog, entered=entered, release=release, calling=calling
    )
    assert logged == [
        "watchdog started",
        "timer expired",
        "kill worker process",
        "watchdog stopped",
    ]


@pytest.mark.parametrize("stop_timeout", [0.2, 0.0, -0.5])
def test_stop_returns_while_a_reap_step_blocks(
    fifo_path: pathlib.Path, children, caplog: pytest.LogCaptureFixture, stop_timeout: float
) -> None:
    # The loop holds the table's lock through a reap: stop() used to wait for the lock,
    # without a timeout, for as long as a reap step ran.
    entered, release = threading.Event(), threading.Event()

    def step(worker: object, expiry: object, now: float) -> None:
        entered.set()
        release.wait()  # until the test has seen stop() return

    server = FileTimerServer(fifo_path, reap_steps=[step], dry_run=True)
    server.stop_timeout = stop_timeout  # a negative one is none: it raised ValueError
    calling = f"reap step callback, {step!r}"
    stop_while_blocked(
        server, fifo_path, children, caplog, entered=entered, release=release, calling=calling
    )


@pytest.mark.parametrize("stop_timeout", [math.inf, 1e12])
def test_an_endless_stop_timeout_waits_until_the_loop_ends(
    fifo_path: pathlib.Path, stop_timeout: float
) -> None:
    # The lock's wait raised OverflowError before the loop was asked to stop: the
    # with block's exit raised, and the server ran on.
    with FileTimerServer(fifo_path) as server:
        server.stop_timeout = stop_timeout
    assert server.state is Lifecycle.STOPPED


def test_a_signal_handlers_stop_during_run_s_start_ends_the_run(
    fifo_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # run() in the main thread, a SIGTERM handler calling stop() while run() opened the
    # FIFO: the stop took the server for never started (released its core, STOPPED),
    # then the start went on and served for good on the released core.
    from ftimer_server.server import _server

    server = FileTimerServer(fifo_path)
    raise_fd_limit = _server.raise_fd_limit

    def stopped_meanwhile() -> None:  # in run()'s thread, as the handler would be
        server.stop()
        raise_fd_limit()

    monkeypatch.setattr(_server, "raise_fd_limit", stopped_meanwhile)
    runner = threading.Thread(target=server.run)
    runner.start()
    runner.join(10)
    if runner.is_alive():  # not ended: end it, then fail
        monkeypatch.undo()
        server.stop()
        runner.join(10)
        pytest.fail("run() went on serving after the stop")
    assert server.state is Lifecycle.STOPPED
    assert_lock_released(fifo_path)


def blocked_in_log_event(
    fifo_path: pathlib.Path,
    children,  # type: ignore[no-untyped-def]
    stop_timeout: Optional[float],
) -> Tuple[FileTimerServer, threading.Event]:
    """A started server (dry run) whose loop is blocked in ``log_event`` for a child's
    expired timer, and the event that releases it."""
    entered, release = threading.Event(), threading.Event()

    def log_event(name: str, request: Optional[FileTimerRequest]) -> None:
        if name == "timer expired":
            entered.set()
            release.wait()

    server = FileTimerServer(fifo_path, log_event=log_event, dry_run=True)
    server.stop_timeout = stop_timeout
    server.start()
    child = children()
    send(fifo_path, Arm(pid=child.pid, scope_id="s", deadline=0.0, signal=9))
    assert entered.wait(10)
    return server, release


def test_a_stop_without_a_limit_waits_for_the_end_another_stop_asked_for(
    fifo_path: pathlib.Path, children
) -> None:
    # A second stop() (stop_timeout None: until it ends) found the server STOPPING and
    # returned at once, the loop still in its callback and the FIFO's lock held.
    server, release = blocked_in_log_event(fifo_path, children, stop_timeout=0.1)
    server.stop()  # gives up
    server.stop_timeout = None
    second = threading.Thread(target=server.stop)
    second.start()
    second.join(0.5)
    assert second.is_alive(), "stop() returned before the server stopped"
    release.set()
    second.join(10)
    assert server.state is Lifecycle.STOPPED
    assert_lock_released(fifo_path)


def test_a_stop_without_a_limit_racing_start_returns_once_stopped(
    fifo_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # It found the server STOPPING (start() had seen the stop asked) before start() had
    # made its thread, and returned with the FIFO's lock held.
    from ftimer_server.server import _server

    opening, proceed = threading.Event(), threading.Event()
    open_fifo = _server.open_fifo

    def slow_open(*args: Any, **kwargs: Any) -> Any:
        opening.set()
        assert proceed.wait(10)
        return open_fifo(*args, **kwargs)

    monkeypatch.setattr(_server, "open_fifo", slow_open)
    server = FileTimerServer(fifo_path)
    server.stop_timeout = None
    starter = threading.Thread(target=server.start)
    starter.start()
    assert opening.wait(10)  # start() holds the lock
    stopper = threading.Thread(target=server.stop)
    stopper.start()
    wait_until(lambda: server._stop_asked)
    proceed.set()
    stopper.join(10)
    assert server.state is Lifecycle.STOPPED
    starter.join(10)
    monkeypatch.undo()
    assert_lock_released(fifo_path)


def test_a_start_interrupted_after_the_lock_leaves_nothing_behind(
    fifo_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A signal handler's sys.exit() landing while run() made its loop: the FIFO's lock
    # stayed held and the FIFO made by the start stayed, whatever stop() said after.
    from ftimer_server.server import _server

    def interrupted(*args: object, **kwargs: object) -> None:
        raise SystemExit(143)  # as the handler would, at this point of the start

    monkeypatch.setattr(_server, "Loop", interrupted)
    server = FileTimerServer(fifo_path, remove_fifo=True)
    with pytest.raises(SystemExit):
        server.run()
    assert server.state is Lifecycle.NEW
    assert not fifo_path.exists()  # made by this start: not left behind
    server.stop()
    assert server.state is Lifecycle.STOPPED
    monkeypatch.undo()
    assert_lock_released(fifo_path)


def test_a_start_interrupted_in_its_started_callback_ends_as_a_stop(
    fifo_path: pathlib.Path,
) -> None:
    # Ctrl-C (or a handler's sys.exit()) in "watchdog started", once the lock was let go
    # of and before the loop ran: the server stayed RUNNING with no loop, its FIFO and
    # lock held, and a stop() without a limit never returned.
    def log_event(name: str, request: Optional[FileTimerRequest]) -> None:
        if name == "watchdog started":
            raise KeyboardInterrupt

    server = FileTimerServer(fifo_path, log_event=log_event, remove_fifo=True)
    with pytest.raises(KeyboardInterrupt):
        server.start()
    assert server.state is Lifecycle.STOPPED
    server.stop_timeout = None
    server.stop()  # returns
    assert not fifo_path.exists()
    assert_lock_released(fifo_path)


def test_a_second_ctrl_c_while_run_closes_still_closes_it(
    fifo_path: pathlib.Path, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A Ctrl-C landing while run()'s end waited for the captures in progress left the
    # FIFO open and its lock held, and a stop() without a limit never returned.
    from ftimer_server import IncidentOptions

    options = IncidentOptions(directory=str(tmp_path / "i"), method="facts")
    server = FileTimerServer(fifo_path, incidents=options)
    diagnostics = server._diagnostics
    assert diagnostics is not None
    close = diagnostics.close

    def interrupted() -> None:
        monkeypatch.setattr(diagnostics, "close", close)  # the next one closes it
        raise KeyboardInterrupt  # as the second Ctrl-C would, here

    monkeypatch.setattr(diagnostics, "close", interrupted)
    stopper = stop_once_running(server)
    with pytest.raises(KeyboardInterrupt):
        server.run()
    stopper.join(10)
    assert server.state is Lifecycle.STOPPED
    server.stop_timeout = None
    server.stop()  # returns
    diagnostics.close()
    assert_lock_released(fifo_path)


def test_a_ctrl_c_in_the_ends_close_still_releases_the_lock(
    fifo_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Interrupted as it closed the FIFO, the end kept the FIFO's lock, yet said it ended.
    from ftimer_server.server._fifo import Fifo

    close = Fifo.close

    def interrupted(self: Fifo, remove: bool = False) -> None:
        monkeypatch.setattr(Fifo, "close", close)
        close(self, remove)
        raise KeyboardInterrupt  # as a second Ctrl-C would, here

    server = FileTimerServer(fifo_path)
    stopper = stop_once_running(server)
    monkeypatch.setattr(Fifo, "close", interrupted)
    with pytest.raises(KeyboardInterrupt):
        server.run()
    stopper.join(10)
    assert server.state is Lifecycle.STOPPED
    assert_lock_released(fifo_path)


def test_a_start_interrupted_once_its_thread_runs_lets_the_loop_end_it(
    fifo_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Ctrl-C in Thread.start()'s wait, the loop's thread already running: start() closed
    # the server under the running loop, which ran on, on a closed selector.
    logged: List[Tuple[str, str]] = []

    def log_event(name: str, request: Optional[FileTimerRequest]) -> None:
        logged.append((name, threading.current_thread().name))

    start = threading.Thread.start

    def interrupted(self: threading.Thread) -> None:
        start(self)
        raise KeyboardInterrupt  # once the thread runs, as in start()'s wait

    server = FileTimerServer(fifo_path, log_event=log_event)
    monkeypatch.setattr(threading.Thread, "start", interrupted)
    with pytest.raises(KeyboardInterrupt):
        server.start()
    monkeypatch.undo()
    wait_until(lambda: server.state is Lifecycle.STOPPED)
    thread = server._thread
    assert thread is not None
    thread.join(10)
    assert not thread.is_alive()
    assert logged == [("watchdog started", "MainThread"), ("watchdog stopped", "ftimer-server")]


def test_a_stop_from_a_thread_holding_the_servers_lock_does_not_wait_for_itself(
    fifo_path: pathlib.Path,
) -> None:
    # A signal handler's stop() interrupting a call that holds the lock (armed(), say)
    # waited for the loop, which waited for that lock: for ever without a limit.
    server = FileTimerServer(fifo_path)
    server.stop_timeout = None
    server.start()

    def handler_in_a_locked_call() -> None:
        with server._lock:  # as armed() holds it
            server.stop()

    stopper = threading.Thread(target=handler_in_a_locked_call, daemon=True)  # if it hangs
    stopper.start()
    stopper.join(10)
    assert not stopper.is_alive(), "stop() waited for the lock its own thread held"
    wait_until(lambda: server.state is Lifecycle.STOPPED)


def test_a_refused_run_does_not_excuse_its_threads_stop_from_waiting(
    fifo_path: pathlib.Path, children
) -> None:
    # run() called on a running server (refused) marked its thread as the loop's: that
    # thread's stop() without a limit then returned at once, the loop still running.
    server, release = blocked_in_log_event(fifo_path, children, stop_timeout=None)

    def mistaken() -> None:
        with pytest.raises(RuntimeError, match="running"):
            server.run()
        server.stop()

    other = threading.Thread(target=mistaken)
    other.start()
    other.join(0.5)
    assert other.is_alive(), "stop() returned before the server stopped"
    release.set()
    other.join(10)
    assert server.state is Lifecycle.STOPPED


def test_register_timers_drops_what_the_fifo_would_and_applies_the_rest(
    fifo_path: pathlib.Path, children
) -> None:  # type: ignore[no-untyped-def]
    signaller = RecordingSignaller()
    events = Recorder()
    child = children()
    with FileTimerServer(fifo_path, signaller=signaller, on_event=events) as server:
        good = FileTimerRequest(child.pid, "ok", time.time() + 60, 9)
        bad = FileTimerRequest(child.pid, "bad", time.time() + 60, 9)
        bad.scope_id = 7  # type: ignore[assignment]
        server.register_timers([bad, good])
        server.sync()
        assert [t.scope_id for t in server.armed()] == ["ok"]
        assert server.stats().decode_errors == {"MalformedMessage": 1}
    [dropped] = events.of(DecodeFailed)
    assert "scope_id" in dropped.reason  # type: ignore[attr-defined]
    assert signaller.sent == []


@pytest.mark.parametrize("never", [math.nan, math.inf, float(sys.maxsize)])
def test_register_timers_arms_torchs_times_that_never_come_as_torch_does(
    fifo_path: pathlib.Path, children, never: float
) -> None:  # type: ignore[no-untyped-def]
    # torch's server never expires them; dropped here, they left an earlier deadline of
    # the scope armed (and a NaN was once armed due at once): a healthy worker killed.
    signaller = RecordingSignaller()
    child = children()
    with FileTimerServer(fifo_path, signaller=signaller) as server:
        soon = FileTimerRequest(child.pid, "step", time.time() + 60, 9)
        server.register_timers([soon, FileTimerRequest(child.pid, "step", never, 9)])
        server.sync()
        [timer] = server.armed()
        assert timer.deadline > time.monotonic() + MAX_TIME - time.time() - 60
    assert signaller.sent == []


def test_its_log_says_when_it_starts_and_stops(
    fifo_path: pathlib.Path, caplog: pytest.LogCaptureFixture
) -> None:
    # docs/torchelastic.md says so; only the start was logged.
    with caplog.at_level(logging.INFO, logger="ftimer_server"), FileTimerServer(fifo_path):
        pass
    said = [r.getMessage() for r in caplog.records]
    assert said[0].startswith(f"ftimer server listening on {fifo_path}")
    assert said[-1] == f"ftimer server on {fifo_path} stopped"


def test_a_subclass_overriding_torchs_hook_points_is_warned() -> None:
    # torch's loop calls _reap_worker; ftimer's never does: a subclass meant to log
    # instead of kill would kill for real, silently.
    with pytest.warns(RuntimeWarning, match=r"DryRun overrides _reap_worker, clear_timers: "):

        class DryRun(FileTimerServer):
            def _reap_worker(self, worker_pid: int, signal: int) -> bool:
                return True

            def clear_timers(self, worker_pids) -> None:  # type: ignore[no-untyped-def]
                pass

    with warnings.catch_warnings():
        warnings.simplefilter("error")

        class Plain(FileTimerServer):  # overriding nothing of torch's: no warning
            def stats(self):  # type: ignore[no-untyped-def]
                return super().stats()


def test_a_sync_token_cannot_be_guessed(
    fifo_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # It was "ftimer-server-<pid>-<counter>": a writer of the FIFO or the socket could
    # send the next one ahead of a backlog and release sync() before the backlog was read.
    from ftimer_server.server import _sync

    tokens: List[str] = []
    encode_sync = _sync.encode

    def record(message):  # type: ignore[no-untyped-def]
        tokens.append(message.token)
        return encode_sync(message)

    monkeypatch.setattr(_sync, "encode", record)
    with FileTimerServer(fifo_path) as server:
        server.sync()
        server.sync()
    first, second = (t.rsplit("-", 1)[1] for t in tokens)
    assert len(first) == len(second) == 32  # 128 random bits each
    assert int(first, 16) != int(second, 16)
