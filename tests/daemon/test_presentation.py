"""What operators read: the status table and the log line of each server event."""

from __future__ import annotations

import contextlib
import logging
import os
import pathlib
import signal
import socket
from collections.abc import Iterator

import pytest

from ftimer_protocol import FIFO_ENV_VARS
from ftimer_server import (
    Armed,
    DecodeFailed,
    Disarmed,
    Escalated,
    Event,
    Expired,
    Reaped,
    Rejected,
    RejectReason,
    ResendsOver,
    Timer,
    Unkillable,
    WorkerGone,
)
from ftimer_server.daemon import _cli
from ftimer_server.daemon._cli import format_status, main
from ftimer_server.daemon._daemon_log import describe, event_fields

T = Timer(42, "step", 110.0, 9, 1234, {"rank": "3"})


def status_doc(**overrides: object) -> dict[str, object]:
    step = {"pid": 42, "scope_id": "step", "signal": 9, "remaining": 9.96, "labels": {"rank": "3"}}
    doc: dict[str, object] = {
        "version": "1.2.3",
        "pid": 7,
        "healthy": True,
        "fifo": "/run/ftimer/timer.fifo",
        "dry_run": False,
        "uptime": 3725.0,
        "timers": [
            step,
            {"pid": 43, "scope_id": "eval-loop", "signal": 15, "remaining": -0.5, "labels": None},
            {"pid": 44, "scope_id": "report", "signal": 0, "remaining": 600.0, "labels": {}},
        ],
    }
    doc.update(overrides)
    return doc


@pytest.mark.parametrize("lost", [["fifo"], ["fifo", "socket"]])
def test_status_paths_that_are_not_utf8_are_printed_escaped(lost: list[str]) -> None:
    # A daemon in a directory whose name is not UTF-8 sends its paths with surrogate
    # escapes (JSON's "\udcff"): printed raw, `status` died with a UnicodeEncodeError
    # traceback under a UTF-8 locale while the daemon was healthy.
    bad = os.fsdecode(b"/run/\xff")
    paths = {"fifo": f"{bad}/timer.fifo", "socket": f"{bad}/timer.socket"}
    text = format_status(
        status_doc(
            **paths,
            lost_paths=[paths[name] for name in lost],
            state_file=f"{bad}/state.json",
            state_failing="No space left on device",
        )
    )
    text.encode("utf-8")  # a lone surrogate would raise
    assert text.count("/run/\\udcff/") == 3 + len(lost)


def test_status_table() -> None:
    assert format_status(status_doc()).splitlines() == [
        "ftimer-server 1.2.3 (pid 7), enforcing",
        "FIFO /run/ftimer/timer.fifo, up 1h02m",
        "3 timers armed",
        "PID  SCOPE      LEFT    SIGNAL       LABELS",
        "43   eval-loop  -0.5s   SIGTERM",  # overdue first: it is being reaped
        "42   step       10.0s   SIGKILL      rank=3",
        "44   report     10m00s  report-only",
    ]


def test_status_says_how_many_workers_outlived_their_sigkill() -> None:
    stats = {"rejections": {}, "unkillable": 2, "unkillable_alive": 1}
    assert format_status(status_doc(timers=[], stats=stats)).splitlines()[2:] == [
        "0 timers armed",
        "2 workers outlived their SIGKILL by 30 s since the start (stuck in the kernel), "
        "1 still alive: the log says what each waited in",
    ]
    stats = {"unkillable": 1, "unkillable_alive": 0}
    assert format_status(status_doc(timers=[], stats=stats)).splitlines()[3] == (
        "1 worker outlived its SIGKILL by 30 s since the start (stuck in the kernel), "
        "none still alive: the log says what each waited in"
    )
    assert len(format_status(status_doc(timers=[], stats={"unkillable": 0})).splitlines()) == 3


def test_status_shows_what_workers_sent_escaped() -> None:
    hostile = {"pid": 42, "scope_id": "s\x1b[2J\nFAKE", "signal": 9, "remaining": 1.0}
    text = format_status(status_doc(timers=[{**hostile, "labels": {"job": "j\n1"}}]))
    assert text.splitlines()[-1] == "42   s\\x1b[2J\\nFAKE  1.0s  SIGKILL  job=j\\n1"


def test_status_header_flags_dry_run_and_an_unhealthy_reader() -> None:
    text = format_status(status_doc(dry_run=True, healthy=False, timers=[]))
    assert text.splitlines() == [
        "ftimer-server 1.2.3 (pid 7), DRY RUN (expiries are logged, not signalled), "
        "NOT READING ITS FIFO",
        "FIFO /run/ftimer/timer.fifo, up 1h02m",
        "0 timers armed",
    ]


def reaped(**overrides: object) -> Reaped:
    fields: dict[str, object] = {
        "pid": 42,
        "start_time": 1234,
        "signal": 9,
        "scope_id": "step",
        "late": 0.0012,
        "delivered": True,
        "timers": (T,),
        "labels": {"rank": "3"},
    }
    fields.update(overrides)
    return Reaped(**fields)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("event", "level", "text"),
    [
        (Armed(T), logging.DEBUG, "armed: pid 42 scope 'step', SIGKILL in 10.000 s"),
        (Armed(T, rearmed=True), logging.DEBUG, "re-armed: pid 42 scope 'step', SIGKILL in"),
        (Disarmed(T), logging.DEBUG, "disarmed: pid 42 scope 'step'"),
        (Expired(T, 0.002), logging.WARNING, "expired: pid 42 scope 'step' (SIGKILL), 2.0 ms"),
        (reaped(), logging.WARNING, "reaped: pid 42 with SIGKILL (timer 'step', 1.2 ms late)"),
        (
            reaped(delivered=False, error="EPERM"),
            logging.ERROR,
            "could not reap pid 42 with SIGKILL (timer 'step', 1.2 ms late): EPERM",
        ),
        (  # it exited while it was captured: no error, nothing was left to reap
            reaped(delivered=False, gone=True, error="the process had exited", incident="i-1"),
            logging.WARNING,
            "not reaped: pid 42 exited before its SIGKILL (timer 'step', 1.2 ms late), "
            "incident i-1",
        ),
        (
            Escalated(42, 1234, 9, 10.0, True),
            logging.WARNING,
            "escalated: pid 42 still alive 10.0 s after its signal, sent SIGKILL",
        ),
        (
            reaped(descendants=(43, 44)),
            logging.WARNING,
            "reaped: pid 42 with SIGKILL (timer 'step', 1.2 ms late); the signal went to 2 "
            "descendants (pids 43, 44) too",
        ),
        (
            Escalated(42, 1234, 9, 10.0, True, descendants=(43,)),
            logging.WARNING,
            "escalated: pid 42 still alive 10.0 s after its signal, sent SIGKILL; the signal "
            "went to 1 descendant (pid 43) too",
        ),
        (
            Escalated(42, 1234, 9, 10.0, False, descendants=(43,), exited=True),
            logging.WARNING,
            "escalated: pid 42 exited within its grace period, but 1 descendant (pid 43) "
            "outlived it: sent SIGKILL 10.0 s after its signal",
        ),
        (
            Escalated(42, 1234, 9, 10.0, False, error="EPERM", descendants=(43,)),
            logging.WARNING,
            "escalated: pid 42 still alive 10.0 s after its signal, sent SIGKILL (not "
            "delivered: EPERM); the signal went to 1 descendant (pid 43) too",
        ),
        (
            Unkillable(42, 1234, 30.0, {"rank": "3"}, "thread 44: D in request_wait_answer"),
            logging.ERROR,
            "unkillable: pid 42 still alive 30 s after its SIGKILL, in thread 44: D in "
            "request_wait_answer: it dies only when that wait in the kernel ends (a hung file "
            "system, device or driver), holding its memory and devices until then, rank=3",
        ),
        (WorkerGone(42, 1234, (T,)), logging.INFO, "worker exited: pid 42, 1 timer(s) dropped"),
        (WorkerGone(42, 1234), logging.DEBUG, "worker exited: pid 42, 0 timer(s) dropped"),
        (
            ResendsOver(3, 2, 10.25),
            logging.WARNING,
            "re-sends over 10.2 s after the restore grace: 3 restored timer(s) of 2 worker(s) "
            "no client re-sent, held back meanwhile (the queues were full), are judged now: "
            "their clients could not re-send (a worker stopped, or torch's client)",
        ),
        (
            WorkerGone(42, 1234, unkillable=True),
            logging.WARNING,
            "worker exited at last: pid 42, which had outlived its SIGKILL (unkillable)",
        ),
        (
            WorkerGone(42, 1234, unkillable=True, decider=T),
            logging.WARNING,
            "worker exited at last: pid 42, which had outlived its SIGKILL (unkillable), rank=3",
        ),
        (
            Rejected(RejectReason.RESERVED_PID, "arm", 1, "s"),
            logging.WARNING,
            "refused arm: pid 1 scope 's': reserved_pid",
        ),
        (
            Rejected(RejectReason.UID_NOT_ALLOWED, "restore", 42, "s"),
            logging.WARNING,
            "saved timer not restored: pid 42 scope 's': uid_not_allowed",
        ),
        (
            DecodeFailed("MalformedMessage", "JSON is malformed", b"junk"),
            logging.WARNING,
            "dropped an invalid line: MalformedMessage: JSON is malformed: b'junk'",
        ),
    ],
)
def test_event_lines(event: Event, level: int, text: str) -> None:
    got_level, fmt, args = describe(event, now=100.0)
    assert got_level == level
    assert (fmt % args).startswith(text)


def test_dry_run_wording() -> None:
    _, fmt, args = describe(reaped(signal=int(signal.SIGTERM)), dry_run=True)
    assert (fmt % args).startswith("DRY RUN, not signalled: would have reaped pid 42 with SIGTERM")
    _, fmt, args = describe(Escalated(42, 1, 9, 5.0, True), dry_run=True)
    # Nothing was sent: the line must not say a signal was.
    assert fmt % args == (
        "DRY RUN, not signalled: would have escalated to SIGKILL: pid 42, 5.0 s after its reap"
    )
    assert "sent" not in fmt % args


def test_text_lines_name_the_labels_of_the_timer() -> None:
    # docs/torchelastic.md: the daemon's log names the reaped rank, in text lines too.
    _, fmt, args = describe(reaped(labels={"rank": "3", "local_rank": "1"}))
    assert fmt % args == (
        "reaped: pid 42 with SIGKILL (timer 'step', 1.2 ms late), local_rank=1 rank=3"
    )
    _, fmt, args = describe(Expired(T, 0.002))
    assert (fmt % args).endswith("2.0 ms after its deadline, rank=3")
    _, fmt, args = describe(reaped(labels=None))
    assert (fmt % args).endswith("1.2 ms late)")


def test_a_long_scope_and_labels_are_cut_in_text_lines_kept_whole_in_fields() -> None:
    # Flood control counts lines: a worker's 4 KiB scopes made a 4 KiB line each, about
    # 1.3 GB of log a day from one writer cycling through kinds of refusal.
    scope, label = "s" * 4000, "v" * 4000
    events: list[Event] = [
        Expired(Timer(42, scope, 110.0, 9, 1234, {"rank": label}), 0.002),
        Rejected(RejectReason.NO_SUCH_PROCESS, "arm", 42, scope, labels={"rank": label}),
        reaped(scope_id=scope),
    ]
    for event in events:
        _, fmt, args = describe(event)
        line = fmt % args
        assert len(line) < 600, line
        assert "... (4000 chars)" in line
        assert event_fields(event)["scope_id"] == scope


def test_an_unkillable_workers_exit_has_its_labels_as_json_fields() -> None:
    # "decider": null on every worker_gone line, and an exit at last's labels only inside
    # it, under the Arm message's "op".
    assert "decider" not in event_fields(WorkerGone(42, 1234, (T,)))
    fields = event_fields(WorkerGone(42, 1234, unkillable=True, decider=T))
    assert fields["labels"] == {"rank": "3"}
    assert fields["decider"]["scope_id"] == "step"
    assert "op" not in fields["decider"]


def test_the_format_string_is_the_kind_of_line_for_flood_control() -> None:
    # Refusals for one reason naming other pids are one kind; another reason is another.
    kinds = {
        describe(Rejected(reason, "arm", pid, "s"))[1]
        for reason in (RejectReason.NO_SUCH_PROCESS, RejectReason.UID_NOT_ALLOWED)
        for pid in (100, 101, 102)
    }
    assert len(kinds) == 2
    junk = {describe(DecodeFailed("MalformedMessage", "bad", bytes([i])))[1] for i in range(9)}
    junk.add(describe(DecodeFailed("LineTooLong", "long", b"x"))[1])
    assert len(junk) == 2


def test_restored_timers_are_info() -> None:
    level, fmt, args = describe(Armed(T), restoring=True, now=100.0)
    assert level == logging.INFO
    assert fmt % args == "restored timer: pid 42 scope 'step', SIGKILL in 10.000 s, rank=3"
    level, fmt, args = describe(WorkerGone(42, 1234, (T, T)), restoring=True)
    assert level == logging.INFO
    assert fmt % args == (
        "saved timers not restored: pid 42 exited while no server ran, 2 timer(s) dropped, rank=3"
    )


def test_json_fields_are_flat() -> None:
    assert event_fields(Expired(T, 0.5)) == {
        "event": "expired",
        "late": 0.5,
        "pid": 42,
        "scope_id": "step",
        "deadline": 110.0,
        "signal": 9,
        "start_time": 1234,
        "labels": {"rank": "3"},
    }
    assert event_fields(DecodeFailed("LineTooLong", "too long", b"\xff{"))["excerpt"] == "\\xff{"


def test_run_help_says_the_fifo_mode_applies_at_every_start(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # docs/deploy.md: the mode is set on a reused FIFO too, not only on a new one.
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "octal permissions of the FIFO, set at every start (a reused FIFO too)" in text
    assert "of a new FIFO" not in text


@pytest.fixture
def system_fifo(monkeypatch: pytest.MonkeyPatch, short_dir: pathlib.Path) -> pathlib.Path:
    """Where the system daemon's FIFO stands (for /run/ftimer/timer.fifo), for a user
    whose default is their own, under ``short_dir / "user"``."""
    system = short_dir / "run" / "timer.fifo"
    system.parent.mkdir()
    monkeypatch.setattr(_cli, "SYSTEM_FIFO", str(system))
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(short_dir / "user"))
    for name in FIFO_ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    return system


@contextlib.contextmanager
def system_daemon_up(system: pathlib.Path) -> Iterator[str]:
    """A control socket at the system daemon's (listening, answering nothing); yields the
    advice that points a user there."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listening:
        listening.bind(f"{system}.sock")
        listening.listen()
        yield (
            f" (this user's default); the system daemon's control socket {system}.sock "
            f"exists: ask it with --fifo {system} (only root and the daemon's user may)"
        )


def test_status_at_a_users_own_default_points_to_the_system_daemon(
    system_fifo: pathlib.Path, short_dir: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    system = system_fifo
    own = short_dir / "user" / "ftimer" / "timer.fifo.sock"
    not_running = f"ftimer-server: error: no ftimer-server is running on {own}"

    assert main(["status"]) == 1  # no system daemon either: nothing to point to
    assert capsys.readouterr().err == not_running + "\n"

    with system_daemon_up(system) as advice:
        assert main(["status"]) == 1
        assert capsys.readouterr().err == f"{not_running}{advice}\n"
        # A path given is the one meant: no advice.
        other = short_dir / "other.fifo"
        assert main(["status", "--fifo", str(other)]) == 1
        assert capsys.readouterr().err == (
            f"ftimer-server: error: no ftimer-server is running on {other}.sock\n"
        )


def test_incidents_at_a_users_own_default_point_to_the_system_daemon(
    system_fifo: pathlib.Path, short_dir: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A worker's user of the system daemon was told only that their own default held no
    # incident directory (or shown an old incident of their own daemon, as if current).
    system = system_fifo
    own = short_dir / "user" / "ftimer" / "incidents"
    missing = f"ftimer-server: error: no incident directory {own}:"

    assert main(["incidents", "list"]) == 1  # no system daemon: nothing to point to
    assert capsys.readouterr().err.startswith(missing)

    with system_daemon_up(system) as advice:
        assert main(["incidents", "list"]) == 1
        note, error = capsys.readouterr().err.splitlines()
        assert note == f"note: the incidents in {own}{advice}"
        assert error.startswith(missing)
