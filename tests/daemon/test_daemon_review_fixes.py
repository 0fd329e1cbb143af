"""Regression tests for the daemon's review fixes: the status a probe asks for, its
health judgement behind a flood, the control socket's bind, the metrics address, the
scrape slots, refusals the flood filter holds back, and durations with underscores."""

from __future__ import annotations

import io
import json
import os
import pathlib
import random
import re
import socket
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from typing import Any, Callable, Dict, List

import pytest
from tests.conftest import open_descriptors, opened_since, wait_until

from ftimer_protocol import Arm, encode
from ftimer_server import Event, FileTimerServer, RecordingSignaller, Rejected
from ftimer_server.daemon import _daemon, _status
from ftimer_server.daemon._cli import _parser, format_status, main
from ftimer_server.daemon._config import ConfigError, DaemonConfig, parse_address, resolve_config
from ftimer_server.daemon._control import ControlServer, query_status
from ftimer_server.daemon._daemon import Daemon
from ftimer_server.daemon._daemon_log import event_fields
from ftimer_server.daemon._logging import LoggingSetup

from .conftest import PATIENCE, PYTHON, DaemonProcess

#: A line the server refuses (pid 1 is never signalled), as a flood of junk would be.
REFUSED = encode(Arm(pid=1, scope_id="x", deadline=1.0, signal=9))


@pytest.fixture
def daemon(tmp_path: pathlib.Path) -> Iterator[Daemon]:
    """A daemon whose server a test makes and sets (``daemon._server``): its status is
    asked for in this process."""
    setup = LoggingSetup("text", "info")
    yield Daemon(DaemonConfig(fifo=str(tmp_path / "timer.fifo")), setup, environ={})
    setup.close()


@pytest.fixture
def sleeper() -> Iterator[int]:
    """The pid of a child process that only sleeps: the timers' worker."""
    child = subprocess.Popen(["sleep", "60"])
    yield child.pid
    child.kill()
    child.wait()


def write(fifo: str, data: bytes) -> None:
    fd = os.open(fifo, os.O_WRONLY)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


# -- 1. the status lists the soonest timers; --health none ------------------------------


def test_the_status_lists_the_soonest_timers_and_counts_them_all(
    daemon: Daemon, sleeper: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every armed timer was listed: 100k of them took 2 s and 60 MB of the daemon's
    # memory per status, which the Kubernetes example's probes asked for every 30 s.
    monkeypatch.setattr(_status, "STATUS_TIMERS", 3)
    fifo = daemon.config.fifo
    now = time.monotonic()
    order = random.sample(range(5), 5)
    arms = [Arm(pid=sleeper, scope_id=f"s{i}", deadline=now + 100 + i, signal=9) for i in order]
    with FileTimerServer(fifo, signaller=RecordingSignaller()) as server:
        daemon._server = server
        write(fifo, b"".join(map(encode, arms)))
        server.sync()
        status = daemon._status(True)
        health = daemon._status(False)
    assert status["armed"] == 5
    assert [t["scope_id"] for t in status["timers"]] == ["s0", "s1", "s2"]
    assert format_status(status).splitlines()[2] == "5 timers armed (the 3 soonest shown)"
    assert health["armed"] == 5
    assert "timers" not in health
    assert health["healthy"] is True
    assert health["caught_up"] is True
    assert format_status(health).splitlines()[2:] == ["5 timers armed"]


def test_status_health_answers_without_the_timers(
    spawn: Callable[..., DaemonProcess], capsys: pytest.CaptureFixture[str]
) -> None:
    d = spawn("--no-socket", "--capture", "none").ready()
    assert main(["status", "--health", "--fifo", str(d.fifo)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("ftimer-server ")
    assert lines[1:] == [lines[1], "0 timers armed"]  # the header alone, no table
    assert main(["status", "--health", "--json", "--fifo", str(d.fifo)]) == 0
    assert '"timers"' not in capsys.readouterr().out


# -- 2. a reader busy with a flood is healthy; a wedged one is not ---------------------


class GatedEvents:
    """An ``on_event`` that holds the server's loop in each refusal (outside its table)
    until the test lets it go on, one refusal at a time."""

    def __init__(self) -> None:
        self.entered = threading.Semaphore(0)
        self.permits = threading.Semaphore(0)
        self.done = False

    def __call__(self, event: Event) -> None:
        if isinstance(event, Rejected) and not self.done:
            self.entered.release()
            self.permits.acquire(timeout=PATIENCE)

    def wait_entered(self) -> None:
        assert self.entered.acquire(timeout=PATIENCE), "the loop did not reach a refusal"

    def finish(self) -> None:
        self.done = True
        for _ in range(100):
            self.permits.release()


def status_while(
    daemon: Daemon, server: FileTimerServer, meanwhile: Callable[[], None]
) -> Dict[str, Any]:
    """``daemon``'s health document, ``meanwhile()`` called once its ``Sync`` marker is in
    the FIFO (behind what the loop has not read)."""
    result: List[Dict[str, Any]] = []
    asking = threading.Thread(target=lambda: result.append(daemon._status(False)))
    asking.start()
    try:
        wait_until(lambda: server._syncs, what="the status's marker written")
        meanwhile()
    finally:
        asking.join(PATIENCE)
    return result[0]


@pytest.mark.parametrize("reads", [True, False])
def test_a_reader_behind_a_flood_is_healthy_and_a_wedged_one_is_not(
    daemon: Daemon, monkeypatch: pytest.MonkeyPatch, reads: bool
) -> None:
    # The marker waits behind the lines written before it: a reader working through a
    # flood of junk (anyone who may write the FIFO can send one) was reported as "NOT
    # READING ITS FIFO", and the Kubernetes probe restarted the daemon.
    monkeypatch.setattr(_status, "_HEALTH_TIMEOUT", 0.5)
    gate = GatedEvents()
    fifo = daemon.config.fifo

    def go_on() -> None:
        if reads:  # it reads the flood, then is held in its first refusal
            gate.permits.release()
            gate.wait_entered()

    with FileTimerServer(fifo, signaller=RecordingSignaller(), on_event=gate) as server:
        daemon._server = server
        try:
            write(fifo, REFUSED)
            gate.wait_entered()  # the loop is held in that refusal: it reads nothing
            write(fifo, REFUSED * 100)  # the flood, ahead of the marker
            health = status_while(daemon, server, go_on)
        finally:
            gate.finish()
    assert health["healthy"] is reads
    assert health["caught_up"] is False  # the marker is still behind the flood
    assert health["stats"]["received"]["fifo"] > (100 if reads else 0)


# -- 3. the control socket's path is checked as it is bound -----------------------------


def directory_of(size: int, under: pathlib.Path) -> pathlib.Path:
    """A new directory under ``under`` whose path is ``size`` bytes long."""
    path = under / ("d" * (size - len(str(under)) - 1))
    path.mkdir()
    return path


def test_a_control_socket_path_the_bind_cannot_take_is_refused_before_the_start(
    short_dir: pathlib.Path,
) -> None:
    # The socket is bound first at DIR/.cXXXXXXXX/s: a path of a short name within the
    # 107 bytes, in a directory of 95, passed the check and failed at the bind (exit 3,
    # "AF_UNIX path too long"), after the FIFO was claimed.
    control = directory_of(95, short_dir) / "c.sock"
    assert len(str(control)) <= 107
    fifo = short_dir / "timer.fifo"
    command = ["run", "--fifo", str(fifo), "--no-socket", "--control-socket", str(control)]
    run = subprocess.run(
        [PYTHON, "-m", "ftimer_server", *command],
        capture_output=True,
        text=True,
        timeout=PATIENCE,
    )
    assert run.returncode == 2
    assert run.stderr == (
        f"ftimer-server: error: --control-socket: {control} is bound first at "
        f"{control.parent}/.cXXXXXXXX/s, 108 bytes long; a socket's path may be at most "
        "107 bytes, so the directory at most 94\n"
    )
    assert not fifo.exists()
    # A directory of 94 bytes: accepted, and bound.
    control = directory_of(94, short_dir) / "c.sock"
    config = resolve_config({"control_socket": str(control)}, environ={})
    server = ControlServer(config.control_socket, lambda _: {"ok": True})
    server.start()
    try:
        assert query_status(str(control)) == {"ok": True}
    finally:
        server.stop()


# -- 4. the metrics address: bound before the FIFO is touched; IPv6 in brackets --------


def test_a_taken_metrics_port_fails_the_start_before_the_fifo_is_replaced(
    spawn: Callable[..., DaemonProcess], short_dir: pathlib.Path
) -> None:
    # The address was bound last: every restart (systemd's Restart=always) replaced the
    # FIFO, which cut off its writers' timers, and only then exited 3.
    pytest.importorskip("prometheus_client")
    os.mkfifo(short_dir / "timer.fifo", 0o600)
    fifo = os.lstat(short_dir / "timer.fifo")
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        d = spawn("--no-socket", "--metrics-address", f"127.0.0.1:{port}")
        assert d.proc.wait(PATIENCE) == 3
    record = d.wait_for_record(level="error")
    assert record["msg"].startswith(f"cannot start: cannot serve metrics on 127.0.0.1:{port}: ")
    now = os.lstat(short_dir / "timer.fifo")
    assert (now.st_ino, now.st_dev) == (fifo.st_ino, fifo.st_dev)  # the same FIFO
    assert not (short_dir / "timer.fifo.sock").exists()


@pytest.mark.parametrize("value", ["::1", "::1:9464", "[::1]", "[::1]9464", "[]:9464"])
def test_an_ipv6_metrics_address_needs_its_brackets(value: str) -> None:
    # "::1" was read as host ":" and port 1.
    with pytest.raises(ConfigError, match=r"like \[::1\]:9464"):
        parse_address(value)
    assert parse_address(" [::1]:9464 ") == ("::1", 9464)


def test_the_ready_log_names_an_ipv6_metrics_address_as_a_url(
    spawn: Callable[..., DaemonProcess],
) -> None:
    # It said "http://::1:9464/metrics", which no scraper can use.
    pytest.importorskip("prometheus_client")
    try:
        socket.create_server(("::1", 0), family=socket.AF_INET6).close()
    except OSError:
        pytest.skip("no IPv6 loopback here")
    d = spawn("--no-socket", "--metrics-address", "[::1]:0").ready()
    url = d.wait_for_record(where=lambda r: r["msg"].startswith("metrics on"))["msg"].split()[-1]
    assert url.startswith("http://[::1]:")
    with urllib.request.urlopen(url, timeout=PATIENCE) as r:
        assert "ftimer_armed_timers 0.0" in r.read().decode()
    assert d.stop() == 0


# -- 5. connections that say nothing never keep a scraper out -------------------------


class Scraped:
    """Metrics served on a loopback port whose idle connections are never timed out
    during a test (what closes one is another connection's doing); each scrape waits in
    the collector while ``gate`` is clear, once it said so on ``entered``."""

    def __init__(self) -> None:
        from ftimer_server.daemon import _metrics

        from .test_metrics import stats

        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Semaphore(0)

        def gated() -> Any:
            self.entered.release()
            self.gate.wait(PATIENCE)
            return stats()

        self.metrics = _metrics.Metrics(gated)
        _, self.port = self.metrics.bind(("127.0.0.1", 0))
        self.metrics.serve()

    def scrape(self) -> str:
        url = f"http://127.0.0.1:{self.port}/metrics"
        with urllib.request.urlopen(url, timeout=PATIENCE) as r:
            return str(r.read().decode())

    def connect(self) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=PATIENCE)


@pytest.fixture
def scraped(monkeypatch: pytest.MonkeyPatch) -> Iterator[Scraped]:
    pytest.importorskip("prometheus_client")
    from ftimer_server.daemon import _metrics

    monkeypatch.setattr(_metrics, "SCRAPE_TIMEOUT", PATIENCE * 2)
    served = Scraped()
    yield served
    served.gate.set()
    served.metrics.close()


def closed(conn: socket.socket) -> bool:
    """Whether the server closed ``conn`` (waits for that at most PATIENCE)."""
    conn.settimeout(PATIENCE)
    try:
        return conn.recv(1) == b""
    except OSError:
        return True


def test_a_scrape_takes_the_slot_of_the_oldest_connection_that_says_nothing(
    scraped: Scraped,
) -> None:
    # Eight connections that said nothing, opened again as they were closed, held
    # every slot: the ninth, Prometheus's, was closed at once, for as long as they kept
    # at it.
    idle = [scraped.connect() for _ in range(8)]
    try:
        began = time.monotonic()
        assert "ftimer_armed_timers 7.0" in scraped.scrape()
        assert time.monotonic() - began < PATIENCE  # not after the idle ones' timeout
        assert closed(idle[0])  # the oldest made room
        idle[1].settimeout(0.05)
        with pytest.raises(socket.timeout):  # the others are still open
            idle[1].recv(1)
    finally:
        for conn in idle:
            conn.close()


def test_connections_being_answered_keep_their_slots(scraped: Scraped) -> None:
    scraped.gate.clear()
    results: List[str] = []
    scrapers = [threading.Thread(target=lambda: results.append(scraped.scrape())) for _ in range(8)]
    for t in scrapers:
        t.start()
    for _ in scrapers:  # each request read, and being answered
        assert scraped.entered.acquire(timeout=PATIENCE)
    with scraped.connect() as ninth:
        assert closed(ninth)  # no slot to be had: the newcomer is turned away
    scraped.gate.set()
    for t in scrapers:
        t.join(PATIENCE)
    assert len(results) == 8


# -- 6. a flood's refusals are counted, not made ---------------------------------------


def test_refusals_held_back_are_counted_without_being_made(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Each refusal's fields and log record were made, then dropped by the flood filter:
    # more than half of what reading a flood of refused lines cost.
    made: List[Event] = []

    def counted(event: Event) -> Dict[str, Any]:
        made.append(event)
        return event_fields(event)

    monkeypatch.setattr(_daemon, "event_fields", counted)
    stream = io.StringIO()
    setup = LoggingSetup("json", "info", stream=stream)
    fifo = str(tmp_path / "timer.fifo")
    daemon = Daemon(DaemonConfig(fifo=fifo), setup, environ={})
    try:
        refused = [Arm(pid=1, scope_id=f"s{i}", deadline=1.0, signal=9) for i in range(200)]
        signaller = RecordingSignaller()  # pid 1: never signalled, whatever the checks do
        with FileTimerServer(fifo, on_event=daemon._on_event, signaller=signaller) as server:
            write(fifo, b"".join(map(encode, refused)))
            server.sync()
        assert signaller.sent == []
        assert len(made) == 11  # the burst of ten, and the first held back
        setup.flush_repeats(everything=True)
    finally:
        setup.close()
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    lines = [r for r in lines if r.get("event") == "rejected"]
    assert len(lines) == 11
    assert len(made) == 12  # the summary quotes the last one, made only now
    assert lines[10]["msg"].startswith("refused arm: pid 1 scope 's199': ")
    assert re.search(r"reserved_pid \[190 more like this in \d+\.\d s\]$", lines[10]["msg"])
    assert (lines[10]["suppressed"], lines[10]["scope_id"]) == (190, "s199")


# -- 7. a number with underscores is no number, of seconds or of anything --------------


@pytest.mark.parametrize(
    ("option", "error"),
    [
        ("--grace", "not a number of seconds: '1_0'"),
        ("--state-interval", "not a number of seconds: '1_0'"),
        ("--max-timers", "not a whole number: '1_0'"),
    ],
)
def test_underscores_are_refused_in_every_number(
    option: str, error: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # float() reads "1_0" as 10: --grace took it, while --max-timers refused it.
    with pytest.raises(SystemExit) as info:
        _parser().parse_args(["run", option, "1_0"])
    assert info.value.code == 2
    said = f"error: argument {option}: {error} (see ftimer-server run --help)\n"
    assert capsys.readouterr().err.endswith(said)
    assert getattr(_parser().parse_args(["run", option, "10"]), option[2:].replace("-", "_")) == 10


def test_a_start_failing_after_the_metrics_bind_exits(
    spawn: Callable[..., DaemonProcess], short_dir: pathlib.Path
) -> None:
    # Bound, not yet served: closing it must not wait for a serving thread never started.
    pytest.importorskip("prometheus_client")
    (short_dir / "open").mkdir(mode=0o777)
    os.chmod(short_dir / "open", 0o777)  # refused: others may change the state file
    state = str(short_dir / "open" / "state.json")
    d = spawn("--no-socket", "--metrics-address", "127.0.0.1:0", "--state-file", state)
    assert d.proc.wait(PATIENCE) == 3
    assert "writable by others" in d.wait_for_record(level="error")["msg"]


@pytest.mark.parametrize("fails_at", ["control socket", "metrics address"])
def test_a_failed_start_leaves_no_descriptor_behind(fails_at: str, short_dir: pathlib.Path) -> None:
    # The control server opened its wake-up pipe when it was made, and was stopped only
    # once started: a start failing between the two (a file at the control socket's
    # path, a metrics port taken, ...) kept the pipe, in a process that embeds the daemon.
    fifo, control = str(short_dir / "timer.fifo"), str(short_dir / "control.sock")
    before = open_descriptors()
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    if fails_at == "control socket":
        open(control, "w").close()  # not a socket: refused
        config = DaemonConfig(fifo=fifo, control_socket=control, socket=None)
    else:
        pytest.importorskip("prometheus_client")
        address = taken.getsockname()
        config = DaemonConfig(
            fifo=fifo, control_socket=control, socket=None, metrics_address=address
        )
    setup = LoggingSetup("text", "info", stream=io.StringIO())
    try:
        assert Daemon(config, setup, environ={}).run() == 3
    finally:
        setup.close()
        taken.close()
    assert opened_since(before) == set()
    assert os.path.isfile(control) == (fails_at == "control socket")  # never replaced


def test_a_start_refused_is_said_on_stderr_too_when_logging_to_a_file(
    short_dir: pathlib.Path,
) -> None:
    # The reason went to --log-file alone: systemctl status (and journald) showed the
    # exit code and nothing else.
    control, log_file = short_dir / "control.sock", short_dir / "daemon.log"
    control.write_text("")  # not a socket: refused
    argv = ["run", "--fifo", str(short_dir / "timer.fifo"), "--no-socket"]
    argv += ["--control-socket", str(control), "--log-file", str(log_file)]
    result = subprocess.run(
        [PYTHON, "-m", "ftimer_server", *argv], capture_output=True, text=True, timeout=PATIENCE
    )
    assert result.returncode == 3
    [said] = result.stderr.splitlines()
    why = f"{control} exists and is not a socket; refusing to replace it"
    assert said == f"ftimer-server: cannot start: {why}"
    assert said.removeprefix("ftimer-server: ") in log_file.read_text()


def test_the_status_says_how_many_requests_were_refused_and_why(
    daemon: Daemon, sleeper: int
) -> None:
    # Workers refused (out of descriptors, say) are workers unwatched: the status said
    # "enforcing, 7 timers armed" and nothing of the 14,950 refusals.
    fifo = daemon.config.fifo
    refused = [Arm(pid=1, scope_id=f"s{i}", deadline=1e9, signal=9) for i in range(4)]
    with FileTimerServer(fifo, signaller=RecordingSignaller()) as server:
        daemon._server = server
        assert format_status(daemon._status(True)).splitlines()[3:] == []
        ok = Arm(pid=sleeper, scope_id="s", deadline=1e9, signal=9)
        gone = subprocess.Popen(["true"])
        gone.wait()  # its pid names nothing now (pids are given in turn: not reused yet)
        bad = Arm(pid=gone.pid, scope_id="t", deadline=1e9, signal=9)
        write(fifo, b"".join(map(encode, [*refused, ok, bad])))
        server.sync()
        lines = format_status(daemon._status(True)).splitlines()
        health = format_status(daemon._status(False)).splitlines()
    assert lines[2:4] == [
        "1 timer armed",
        "5 requests refused since the start (reserved_pid 4, no_such_process 1): "
        "the log says why, of each",
    ]
    assert health[2:] == lines[2:4]


@pytest.mark.parametrize(
    ("argv", "said"),
    [
        (["run", "--grace", "abc"], "ftimer-server run: error: argument --grace: "),
        (["run", "--capture", "nope"], "ftimer-server run: error: argument --capture: "),
        (["incidents", "show", "--nope"], "ftimer-server: error: unrecognized arguments: --nope"),
        (["nope"], "ftimer-server: error: argument COMMAND: invalid choice: 'nope'"),
        # A prefix of an option was taken for it: a script's `--dry` would stop working,
        # or mean another option, once one with the same prefix is added.
        (["run", "--dry"], "ftimer-server: error: unrecognized arguments: --dry"),
        (["status", "--heal"], "ftimer-server: error: unrecognized arguments: --heal"),
    ],
)
def test_a_usage_error_is_one_line(argv: List[str], said: str) -> None:
    # It came under the command's usage: nineteen lines for `run`, the one that
    # mattered last, where deploy.md promises one line naming the option.
    result = subprocess.run(
        [PYTHON, "-m", "ftimer_server", *argv], capture_output=True, text=True, timeout=PATIENCE
    )
    assert result.returncode == 2
    [line] = result.stderr.splitlines()
    assert line.startswith(said)
    assert line.endswith(" --help)")  # for what the usage said (the choices, ...)
