"""Hostile and heavy input through a real FIFO: bad lines among good ones from many
writers, hostile pids and signals, thousands of pretend workers. Pretend processes and a
recording signaller: nothing real is ever signalled here."""

from __future__ import annotations

import json
import logging
import os
import pathlib
import subprocess
import sys
import time

import pytest
from tests.conftest import not_pid_1

from ftimer_protocol import PIPE_BUF, Arm, Disarm, DisarmAll, Expire, TimerRequestV1, encode
from ftimer_server import (
    FileTimerServer,
    Policy,
    RecordingSignaller,
    RejectReason,
    WorkerGone,
)

from .conftest import FAKE_PID, FakeInspector, Recorder, send

WORKERS_PER_WRITER = 500
WRITERS = 8
BASE_PID = FAKE_PID


# Run as a separate program (python -c) by each writer: it poses as WORKERS_PER_WRITER
# workers, arming two scopes each (v2 and v1) and disarming one, with junk between the
# messages. Every write is atomic (at most PIPE_BUF bytes), as real writers' are.
WRITER = """
import os, random, sys, time
from ftimer_protocol import Arm, Disarm, TimerRequestV1, encode
path, index, per, base = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
rng = random.Random(index)

def junk():
    kind = rng.randrange(6)
    if kind == 0:  # binary, newline-terminated
        return bytes(rng.randrange(256) for _ in range(rng.randrange(1, 300))).replace(
            b"\\n", b"") + b"\\n"
    if kind == 1:  # a partial line: the next writer's message lands after it
        return b'{"version":2,"op":"arm","pid":12'
    if kind == 2:
        return b'{"version": 1, "pid": "not a number"}\\n'
    if kind == 3:
        return b'{"version":7,"op":"arm"}\\n'
    if kind == 4:
        return b"\\x00\\xff\\xfe garbage without a newline"
    return b'{"version":2,"op":"arm","pid":0,"scope_id":"x","deadline":1,"signal":9}\\n'

fd = os.open(path, os.O_WRONLY)
for i in range(per):
    pid = base + index * per + i
    for line in (
        encode(Arm(pid=pid, scope_id="a", deadline=time.monotonic() + 3600, signal=9,
                   labels={"w": str(index)})),
        encode(TimerRequestV1(pid=pid, scope_id="b", expiration_time=time.time() + 3600,
                              signal=15)),
        encode(Disarm(pid=pid, scope_id="a")),
    ):
        if rng.random() < 0.3:
            os.write(fd, junk())
        os.write(fd, line)
os.close(fd)
"""


def test_many_writers_bad_lines_and_thousands_of_workers(fifo_path: pathlib.Path) -> None:
    total = WRITERS * WORKERS_PER_WRITER
    host = FakeInspector(auto=range(BASE_PID, BASE_PID + total))
    signaller = RecordingSignaller()
    with FileTimerServer(fifo_path, inspector=host, signaller=signaller) as server:
        writers = [
            subprocess.Popen(
                [sys.executable, "-c", WRITER, str(fifo_path)]
                + [str(x) for x in (i, WORKERS_PER_WRITER, BASE_PID)]
            )
            for i in range(WRITERS)
        ]
        for w in writers:
            assert w.wait(60) == 0
        send(fifo_path, raw=b"trailing partial line, no newline")
        server.sync()  # its marker follows the partial line: resynchronised
        stats = server.stats()
        armed = server.armed()
    assert stats.requests == {
        "arm": {"ok": 2 * total},
        "disarm": {"ok": total},
        "sync": {"ok": 1},
    }
    assert sum(stats.decode_errors.values()) > 0
    assert sorted((t.pid, t.scope_id) for t in armed) == [(BASE_PID + i, "b") for i in range(total)]
    assert all(t.signal == 15 for t in armed)
    assert signaller.sent == []
    assert stats.workers == total  # each still holds its timer "b"


def test_over_long_lines_cost_only_themselves(fifo_path: pathlib.Path) -> None:
    host = FakeInspector(auto=range(FAKE_PID, FAKE_PID + 100))
    with FileTimerServer(fifo_path, inspector=host, signaller=RecordingSignaller()) as server:
        fd = os.open(fifo_path, os.O_WRONLY)
        try:
            for i in range(50):
                pids = (FAKE_PID + i, FAKE_PID + 50 + i)
                os.write(fd, b"x" * (3 * PIPE_BUF) + b"\n")  # over-long, then valid
                os.write(fd, encode(Arm(pid=pids[0], scope_id="s", deadline=1e9, signal=9)))
                os.write(fd, b"y" * (2 * PIPE_BUF))  # over-long with no newline yet...
                os.write(fd, encode(Arm(pid=pids[1], scope_id="s", deadline=1e9, signal=9)))
        finally:
            os.close(fd)
        server.sync()
        stats = server.stats()
    assert stats.requests["arm"] == {"ok": 100}
    assert stats.decode_errors == {"LineTooLong": 100}


#: JSON nested deeper than msgspec recurses, after each kind of line opening: the
#: fast paths' (versions 2 and 1) and the slow path's envelope.
NESTED = [
    b'{"version":2,"op":"disarm","pid":2000,"x":' + b"[" * 1000,
    b'{"version": 1, "pid": 2000, "x": ' + b"[" * 1000,
    b'{"version":' + b"[" * 1000,
]


def test_deeply_nested_json_is_a_malformed_line_and_costs_no_other(fifo_path: pathlib.Path) -> None:
    # It raised RecursionError out of the decoder: the read it came in was lost, disarms
    # and all, and a healthy worker whose disarm shared it was reaped.
    host = FakeInspector(auto=range(FAKE_PID, FAKE_PID + len(NESTED)))
    signaller = RecordingSignaller()
    with FileTimerServer(fifo_path, inspector=host, signaller=signaller) as server:
        for i, nested in enumerate(NESTED):
            send(
                fifo_path,
                Arm(pid=FAKE_PID + i, scope_id="s", deadline=time.monotonic() + 2, signal=9),
            )
            server.sync()
            send(fifo_path, Disarm(pid=FAKE_PID + i, scope_id="s"), raw=nested + b"\n")
            server.sync()
            assert server.armed() == []  # the disarm in the same read was applied
        stats = server.stats()
    assert stats.decode_errors == {"MalformedMessage": len(NESTED)}
    assert signaller.sent == []


@not_pid_1
def test_hostile_pids_and_signals_are_refused(fifo_path: pathlib.Path) -> None:
    events = Recorder()
    signaller = RecordingSignaller()
    me, parent = os.getpid(), os.getppid()
    with FileTimerServer(fifo_path, on_event=events, signaller=signaller) as server:
        lines = [
            encode(Expire(pid=1, scope_id="init", signal=9)),
            encode(Arm(pid=me, scope_id="server", deadline=0.0, signal=9)),
            encode(Arm(pid=parent, scope_id="parent", deadline=0.0, signal=9)),
            encode(TimerRequestV1(pid=me, scope_id="torch", expiration_time=0.0, signal=9)),
            encode(DisarmAll(pid=1)),
        ]
        raw = [  # out of the schema's bounds: never decoded into a request
            {"version": 1, "pid": -1, "scope_id": "all", "expiration_time": 0, "signal": 9},
            {"version": 1, "pid": 0, "scope_id": "group", "expiration_time": 0, "signal": 9},
            {"version": 2, "op": "expire", "pid": 12345, "scope_id": "s", "signal": -9},
            {"version": 2, "op": "expire", "pid": 12345, "scope_id": "s", "signal": 65},
            {"version": 2, "op": "arm", "pid": 2**40, "scope_id": "s", "deadline": 0, "signal": 9},
        ]
        send(fifo_path, raw=b"".join(lines) + b"".join(json.dumps(r).encode() + b"\n" for r in raw))
        server.sync()
        stats = server.stats()
    assert signaller.sent == []
    assert server.armed() == []
    # Under a container's init as its parent, the parent is pid 1 too: reserved first.
    ancestor = {} if parent == 1 else {RejectReason.SERVER_ANCESTOR.value: 1}
    assert stats.rejections == {
        RejectReason.RESERVED_PID.value: 1 + (parent == 1),
        RejectReason.SERVER_PROCESS.value: 2,
        **ancestor,
    }
    assert stats.decode_errors == {"MalformedMessage": len(raw)}
    assert stats.requests["disarm_all"] == {"unknown": 1}


def test_reused_pid_through_the_fifo_is_never_signalled(fifo_path: pathlib.Path) -> None:
    host = FakeInspector()
    pid = FAKE_PID
    host.spawn(pid, start_time=100)
    signaller = RecordingSignaller()
    events = Recorder()
    with FileTimerServer(fifo_path, inspector=host, signaller=signaller, on_event=events) as server:
        # Far off: "late", already due, has the worker judged (a near deadline could pass
        # before the pid changes hands, and the original process be signalled).
        send(fifo_path, Arm(pid=pid, scope_id="s", deadline=time.monotonic() + 3600, signal=9))
        server.sync()
        host.exit(pid)
        host.spawn(pid, start_time=999)  # another process took the pid
        # Even a message naming the old process only adds to the old process's timers.
        send(fifo_path, Arm(pid=pid, scope_id="late", deadline=0.0, signal=9, start_time=100))
        server.sync()
    assert signaller.sent == []
    [gone] = events.of(WorkerGone)
    assert isinstance(gone, WorkerGone)
    assert (gone.start_time, {t.scope_id for t in gone.timers}) == (100, {"s", "late"})


@pytest.mark.parametrize("cap", [Policy(max_timers=100)])
def test_caps_hold_under_a_flood(fifo_path: pathlib.Path, cap: Policy) -> None:
    pids = range(FAKE_PID, FAKE_PID + 1000)
    host = FakeInspector(auto=pids)
    with FileTimerServer(
        fifo_path, inspector=host, signaller=RecordingSignaller(), policy=cap
    ) as server:
        fd = os.open(fifo_path, os.O_WRONLY)
        for pid in pids:
            os.write(fd, encode(Arm(pid=pid, scope_id="s", deadline=1e9, signal=9)))
        os.close(fd)
        server.sync()
        assert len(server.armed()) == 100
        assert server.stats().rejections == {"timer_limit": 900}


def test_an_embedded_server_says_it_drops_a_line_it_cannot_read(
    fifo_path: pathlib.Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Given no on_event (as torch's agent makes it), it said nothing of a request it
    # dropped (torch's client sends a step number as the scope as readily as a string):
    # the worker ran unwatched, and only stats() knew.
    caplog.set_level(logging.WARNING, logger="ftimer_server")
    line = b'{"version": 1, "pid": 4242, "scope_id": 7, "expiration_time": 0.0, "signal": 9}\n'
    with FileTimerServer(fifo_path, signaller=RecordingSignaller()) as server:
        for _ in range(2):
            fd = os.open(fifo_path, os.O_WRONLY)
            os.write(fd, line)
            os.close(fd)
            server.sync()
        assert server.stats().decode_errors == {"MalformedMessage": 2}
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("dropped")]
    assert (
        said
        == [  # once a minute: the second is counted, not said again
            "dropped 1 invalid line(s): MalformedMessage: Expected `str`, got `int` - at "
            f"`$.scope_id`: {line[:64]!r}; a worker whose requests are dropped is not watched "
            "(said once a minute at most; stats().decode_errors counts all)"
        ]
    )


@not_pid_1
def test_an_embedded_server_says_why_it_refuses_its_own_process(
    fifo_path: pathlib.Path, caplog: pytest.LogCaptureFixture
) -> None:
    # torch's server enforces a timer of the process that runs it (its own tests arm
    # one), or of that process's parent: code written for torch's lost its watchdog
    # here with nothing said, as the refusals went only to an on_event it had not given.
    signaller = RecordingSignaller()
    me, parent = os.getpid(), os.getppid()
    caplog.set_level(logging.WARNING, logger="ftimer_server")
    with FileTimerServer(fifo_path, signaller=signaller) as server:
        send(fifo_path, Arm(pid=me, scope_id="step", deadline=0.0, signal=9))
        server.sync()
        send(fifo_path, Arm(pid=parent, scope_id="step", deadline=0.0, signal=9))
        server.sync()
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("refused")]
    assert said == [  # once a minute: the parent's refusal is counted, not said again
        f"refused arm of scope 'step' for pid {me}, this server's own process: a server "
        "never signals the process it runs in, or those above it; run it beside or above "
        "the processes it watches (in the agent, or the host's daemon)"
    ]
    assert signaller.sent == []
