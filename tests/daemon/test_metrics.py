"""Prometheus metrics: the server's counters by name and label, served over loopback, and a
clear error without the extra."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import urllib.request

import pytest
from tests.conftest import wait_until

from ftimer_server import RejectReason, Stats
from ftimer_server.daemon._metrics import Metrics, MetricsUnavailable

prometheus_client = pytest.importorskip("prometheus_client")


def stats(**overrides: object) -> Stats:
    fields: dict[str, object] = {
        "requests": {"arm": {"ok": 5, "rejected": 1}, "disarm": {"unknown": 2}},
        "rejections": {"reserved_pid": 1},
        "decode_errors": {"MalformedMessage": 3},
        "reaps": {9: 2, 15: 1},
        "reap_failures": 0,
        "expired": 4,
        "escalations": 1,
        "workers_gone": 6,
        "armed": 7,
        "workers": 2,
        "pid_overridden": 8,
        "unkillable": 9,
        "unkillable_alive": 3,
    }
    fields.update(overrides)
    return Stats(**fields)  # type: ignore[arg-type]


def sample(m: Metrics, name: str, **labels: str) -> float | None:
    value = m.registry.get_sample_value(name, labels)
    return None if value is None else float(value)


def test_metrics_are_the_server_counters_read_at_scrape_time() -> None:
    current = [stats()]
    m = Metrics(lambda: current[0], state_saves=lambda: (12, 1), dry_run=True)
    assert sample(m, "ftimer_armed_timers") == 7
    assert sample(m, "ftimer_workers") == 2
    assert sample(m, "ftimer_requests_total", type="arm", result="ok") == 5
    assert sample(m, "ftimer_requests_total", type="arm", result="rejected") == 1
    assert sample(m, "ftimer_requests_total", type="disarm", result="unknown") == 2
    assert sample(m, "ftimer_refusals_total", reason="reserved_pid") == 1
    assert sample(m, "ftimer_decode_errors_total", error="MalformedMessage") == 3
    assert sample(m, "ftimer_reaps_total", signal="SIGKILL") == 2
    assert sample(m, "ftimer_reaps_total", signal="SIGTERM") == 1
    assert sample(m, "ftimer_expired_timers_total") == 4
    assert sample(m, "ftimer_escalations_total") == 1
    assert sample(m, "ftimer_unkillable_total") == 9
    assert sample(m, "ftimer_unkillable_workers") == 3
    assert sample(m, "ftimer_workers_gone_total") == 6
    assert sample(m, "ftimer_socket_pid_overridden_total") == 8
    assert sample(m, "ftimer_dry_run") == 1
    assert sample(m, "ftimer_state_saves_total", result="ok") == 12
    assert sample(m, "ftimer_state_saves_total", result="error") == 1
    current[0] = stats(armed=0)
    assert sample(m, "ftimer_armed_timers") == 0


def test_every_refusal_reason_is_exported_from_the_start() -> None:
    # A reason's series born with its first burst hides that burst from increase().
    m = Metrics(lambda: stats(rejections={}))
    for reason in RejectReason:
        assert sample(m, "ftimer_refusals_total", reason=reason.value) == 0
    m = Metrics(lambda: stats(rejections={"identity_mismatch": 12}))
    assert sample(m, "ftimer_refusals_total", reason="identity_mismatch") == 12
    assert sample(m, "ftimer_refusals_total", reason="reserved_pid") == 0


def test_reap_latency_histogram() -> None:
    m = Metrics(stats)
    m.reaped(0.0015)
    m.reaped(-0.001)  # a restored timer that was due before the restart counts as 0
    assert sample(m, "ftimer_reap_latency_seconds_count") == 2
    assert sample(m, "ftimer_reap_latency_seconds_bucket", le="0.001") == 1
    assert sample(m, "ftimer_reap_latency_seconds_bucket", le="0.0025") == 2


def test_two_instances_do_not_clash() -> None:
    a, b = Metrics(stats), Metrics(stats)
    a.reaped(1.0)
    assert sample(b, "ftimer_reap_latency_seconds_count") == 0


def test_served_over_loopback() -> None:
    m = Metrics(stats)
    host, port = m.bind(("127.0.0.1", 0))
    m.serve()
    try:
        assert host == "127.0.0.1"
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            body = r.read().decode()
        assert 'ftimer_reaps_total{signal="SIGKILL"} 2.0' in body
        assert "ftimer_armed_timers 7.0" in body
    finally:
        m.close()


def test_idle_connections_are_bounded_and_time_out(monkeypatch: pytest.MonkeyPatch) -> None:
    # prometheus_client's own server kept every connection that said nothing, each with
    # a descriptor and a thread: any local user could use up the daemon's descriptors,
    # and workers then went unwatched (pidfd_open: EMFILE).
    import socket

    from ftimer_server.daemon import _metrics

    monkeypatch.setattr(_metrics, "SCRAPE_TIMEOUT", 0.5, raising=False)
    m = Metrics(stats)
    _, port = m.bind(("127.0.0.1", 0))
    m.serve()
    idle = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(30)]
    try:

        def closed(conn: socket.socket) -> bool:
            conn.settimeout(0.05)
            try:
                return conn.recv(1) == b""
            except socket.timeout:  # TimeoutError since 3.10
                return False

        # Beyond MAX_SCRAPERS, the oldest are closed at once; the others after
        # SCRAPE_TIMEOUT.
        at_once = getattr(_metrics, "MAX_SCRAPERS", 8)
        wait_until(lambda: sum(map(closed, idle)) >= 30 - at_once)
        wait_until(lambda: all(map(closed, idle)))
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            assert "ftimer_armed_timers 7.0" in r.read().decode()
    finally:
        for conn in idle:
            conn.close()
        m.close()


def test_a_scraper_that_trickles_its_request_is_closed_in_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The socket's timeout bounds each call: a byte every so often held a slot for good,
    # and eight such scrapers kept Prometheus out.
    import socket

    from ftimer_server.daemon import _metrics

    monkeypatch.setattr(_metrics, "SCRAPE_TIMEOUT", 0.6)
    m = Metrics(stats)
    _, port = m.bind(("127.0.0.1", 0))
    m.serve()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
            began = time.monotonic()
            closed = False
            for byte in b"GET /metrics HTTP/1.1\r\n" * 10:  # a byte every 0.2 s
                try:
                    conn.sendall(bytes([byte]))
                except OSError:  # reset: closed
                    closed = True
                    break
                conn.settimeout(0.2)
                try:
                    if conn.recv(1) == b"":
                        closed = True
                        break
                except socket.timeout:
                    pass
            assert closed
            assert time.monotonic() - began < 3
    finally:
        m.close()


def test_without_prometheus_client_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "prometheus_client", None)
    with pytest.raises(MetricsUnavailable, match=r"ftimer-server\[metrics\]"):
        Metrics(stats)


def test_last_progress_stops_while_the_loop_is_stuck(tmp_path) -> None:
    """The gauge is now while the server's loop is healthy and stays at the start of the
    iteration it is stuck in (here: a callback that blocks); the stall's own gauge is 0,
    then grows by the host's clock, so an alert can tell them apart without comparing
    the host's clock with its own."""
    from ftimer_protocol import Arm, encode
    from ftimer_server import Armed, FileTimerServer

    gate, entered = threading.Event(), threading.Event()

    def stuck(event: object) -> None:
        if isinstance(event, Armed):
            entered.set()
            gate.wait(30)

    fifo = tmp_path / "timer.fifo"
    with FileTimerServer(fifo, on_event=stuck) as server:
        m = Metrics(
            server.stats,
            last_progress=server.get_last_progress_time,
            stalled_for=server.stalled_for,
        )
        healthy = sample(m, "ftimer_last_progress_timestamp_seconds")
        assert healthy is not None
        assert abs(healthy - time.time()) <= 1
        assert sample(m, "ftimer_loop_stalled_seconds") < 1  # 0, or an iteration's time
        child = subprocess.Popen(["sleep", "60"])
        try:
            fd = os.open(fifo, os.O_WRONLY)
            os.write(fd, encode(Arm(pid=child.pid, scope_id="s", deadline=1e9, signal=9)))
            os.close(fd)
            assert entered.wait(10)
        finally:
            child.kill()
            child.wait()
        since = sample(m, "ftimer_last_progress_timestamp_seconds")
        stalled = sample(m, "ftimer_loop_stalled_seconds")
        time.sleep(1.1)  # the gauge must not follow the clock while the loop is stuck
        assert sample(m, "ftimer_last_progress_timestamp_seconds") == since
        assert since is not None
        assert since < time.time() - 1
        assert stalled is not None
        assert sample(m, "ftimer_loop_stalled_seconds") >= stalled + 1.1
        gate.set()
        server.sync()
        after = sample(m, "ftimer_last_progress_timestamp_seconds")
        assert after is not None
        assert after > since
        assert sample(m, "ftimer_loop_stalled_seconds") < 1  # 0, or an iteration's time


def test_a_scrape_never_waits_out_a_loop_stalled_holding_the_table(tmp_path) -> None:
    """A reap step runs under the loop's lock: a scrape then waited for the stall to end
    (a Prometheus timeout: the daemon looked down, not stalled) and reported progress
    "now". It serves the last counters and the stall's start instead."""
    from ftimer_protocol import Expire, encode
    from ftimer_server import FileTimerServer, RecordingSignaller

    gate, entered = threading.Event(), threading.Event()

    def stuck(worker: object, expiry: object, now: float) -> None:
        entered.set()
        gate.wait(30)

    fifo = tmp_path / "timer.fifo"
    server = FileTimerServer(fifo, signaller=RecordingSignaller(), reap_steps=[stuck])
    with server:
        m = Metrics(lambda: server.stats(timeout=0.1), last_progress=server.get_last_progress_time)
        assert sample(m, "ftimer_armed_timers") == 0
        child = subprocess.Popen(["sleep", "60"])
        try:
            fd = os.open(fifo, os.O_WRONLY)
            os.write(fd, encode(Expire(pid=child.pid, scope_id="s", signal=9)))
            os.close(fd)
            assert entered.wait(10)
            began = time.monotonic()
            stalled = sample(m, "ftimer_last_progress_timestamp_seconds")
            assert time.monotonic() - began < 5  # not the stall's 30 s
            assert stalled is not None
            assert sample(m, "ftimer_armed_timers") == 0  # the last snapshot's
            time.sleep(0.5)  # the gauge must not follow the clock while the loop is stuck
            assert sample(m, "ftimer_last_progress_timestamp_seconds") == stalled
        finally:
            gate.set()
            child.kill()
            child.wait()
