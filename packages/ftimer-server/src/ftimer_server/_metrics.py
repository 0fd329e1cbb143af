"""Prometheus metrics (the optional ``ftimer-server[metrics]`` extra).

prometheus_client is imported only when metrics are asked for, so the daemon runs without
it. Metrics live in a registry of their own (not the process-global default), so embedding
the daemon, or running it twice in one test process, does not clash.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, Callable, Optional, Tuple

__all__ = ["Metrics", "MetricsUnavailable", "REAP_LATENCY_BUCKETS"]

if TYPE_CHECKING:
    import prometheus_client

#: Seconds from a deadline to its signal: the interesting range is 0.1 ms .. 1 s.
REAP_LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
)  # fmt: skip


class MetricsUnavailable(Exception):
    """prometheus_client is not installed (install ``ftimer-server[metrics]``)."""


def _prometheus() -> Any:
    try:
        return importlib.import_module("prometheus_client")
    except ImportError:
        raise MetricsUnavailable(
            "metrics need prometheus_client: pip install 'ftimer-server[metrics]'"
        ) from None


class Metrics:
    """The daemon's metrics, updated by the daemon's event handler.

    Args:
        armed: returns how many timers are armed (read at scrape time).

    Raises:
        MetricsUnavailable: prometheus_client is not installed.
    """

    def __init__(self, armed: Callable[[], int]) -> None:
        prom = _prometheus()
        self.registry: prometheus_client.CollectorRegistry = prom.CollectorRegistry()
        r = self.registry
        armed_gauge = prom.Gauge("ftimer_armed_timers", "Timers armed now.", registry=r)
        armed_gauge.set_function(lambda: float(armed()))
        self._requests = prom.Counter(
            "ftimer_requests",
            "Messages read from the FIFO, by type and result.",
            ["type", "result"],
            registry=r,
        )
        self._expiries = prom.Counter(
            "ftimer_expiries",
            "Timers that expired, by what was done (signalled, dry_run, report_only, skipped).",
            ["action"],
            registry=r,
        )
        self._reaps = prom.Counter(
            "ftimer_reaps",
            "Signals delivered to expired workers, by signal.",
            ["signal"],
            registry=r,
        )
        self._refusals = prom.Counter(
            "ftimer_refusals", "Requests or signals refused by policy, by reason.", ["reason"],
            registry=r,
        )  # fmt: skip
        self._decode_errors = prom.Counter(
            "ftimer_decode_errors", "Lines read from the FIFO that were not valid messages.",
            registry=r,
        )  # fmt: skip
        self._latency = prom.Histogram(
            "ftimer_reap_latency_seconds",
            "Seconds from a timer's deadline to its signal.",
            buckets=REAP_LATENCY_BUCKETS,
            registry=r,
        )
        self._state_saves = prom.Counter(
            "ftimer_state_saves", "State file writes, by result.", ["result"], registry=r
        )
        self._server: Any = None
        self._thread: Any = None

    def request(self, kind: str, result: str) -> None:
        """Count one FIFO message of type ``kind`` ("arm", "v1_release", ...)."""
        self._requests.labels(kind, result).inc()

    def expiry(self, action: str) -> None:
        """Count one expired timer and what was done about it."""
        self._expiries.labels(action).inc()

    def reap(self, signal_name: str, lateness: Optional[float]) -> None:
        """Count one delivered signal; ``lateness`` is seconds past the deadline."""
        self._reaps.labels(signal_name).inc()
        if lateness is not None:
            self._latency.observe(max(lateness, 0.0))

    def refusal(self, reason: str) -> None:
        """Count one request or signal refused by policy."""
        self._refusals.labels(reason).inc()

    def decode_error(self) -> None:
        """Count one undecodable line."""
        self._decode_errors.inc()

    def state_save(self, ok: bool) -> None:
        """Count one state file write."""
        self._state_saves.labels("ok" if ok else "error").inc()

    def serve(self, address: Tuple[str, int]) -> Tuple[str, int]:
        """Serve ``/metrics`` over HTTP on ``address``; returns the bound (host, port).

        Raises:
            OSError: the address is in use or cannot be bound.
        """
        prom = _prometheus()
        host, port = address
        self._server, self._thread = prom.start_http_server(port, addr=host, registry=self.registry)
        bound = self._server.server_address
        return str(bound[0]), int(bound[1])

    def close(self) -> None:
        """Stop the HTTP server, if serving."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join()
            self._server = self._thread = None
