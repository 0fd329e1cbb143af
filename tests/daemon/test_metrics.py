"""Prometheus metrics: names and labels, served over loopback, a clear error without the extra."""

from __future__ import annotations

import sys
import urllib.request

import pytest

from ftimer_server._metrics import Metrics, MetricsUnavailable

prometheus_client = pytest.importorskip("prometheus_client")


def sample(m: Metrics, name: str, **labels: str) -> float | None:
    value = m.registry.get_sample_value(name, labels)
    return None if value is None else float(value)


def test_metrics_count_what_the_daemon_reports() -> None:
    armed = [3]
    m = Metrics(lambda: armed[0])
    m.request("arm", "accepted")
    m.request("arm", "accepted")
    m.request("v1_release", "rejected")
    m.expiry("signalled")
    m.reap("SIGKILL", 0.0015)
    m.refusal("pid_1")
    m.decode_error()
    m.state_save(ok=True)
    assert sample(m, "ftimer_armed_timers") == 3
    armed[0] = 7
    assert sample(m, "ftimer_armed_timers") == 7
    assert sample(m, "ftimer_requests_total", type="arm", result="accepted") == 2
    assert sample(m, "ftimer_requests_total", type="v1_release", result="rejected") == 1
    assert sample(m, "ftimer_expiries_total", action="signalled") == 1
    assert sample(m, "ftimer_reaps_total", signal="SIGKILL") == 1
    assert sample(m, "ftimer_refusals_total", reason="pid_1") == 1
    assert sample(m, "ftimer_decode_errors_total") == 1
    assert sample(m, "ftimer_state_saves_total", result="ok") == 1
    assert sample(m, "ftimer_reap_latency_seconds_count") == 1
    assert sample(m, "ftimer_reap_latency_seconds_bucket", le="0.001") == 0
    assert sample(m, "ftimer_reap_latency_seconds_bucket", le="0.0025") == 1


def test_two_instances_do_not_clash() -> None:
    a, b = Metrics(lambda: 0), Metrics(lambda: 0)
    a.decode_error()
    assert sample(b, "ftimer_decode_errors_total") == 0


def test_served_over_loopback() -> None:
    m = Metrics(lambda: 1)
    m.reap("SIGTERM", 0.0)
    host, port = m.serve(("127.0.0.1", 0))
    try:
        assert host == "127.0.0.1"
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            body = r.read().decode()
        assert 'ftimer_reaps_total{signal="SIGTERM"} 1.0' in body
        assert "ftimer_armed_timers 1.0" in body
    finally:
        m.close()


def test_without_prometheus_client_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "prometheus_client", None)
    with pytest.raises(MetricsUnavailable, match=r"ftimer-server\[metrics\]"):
        Metrics(lambda: 0)
