"""Prometheus metrics (the optional ``ftimer-server[metrics]`` extra).

prometheus_client is imported only when metrics are asked for, so the daemon runs without
it. The counters are the server's own (``FileTimerServer.stats()``), read at scrape time,
so nothing is counted twice and the hot path does no metrics work; only the reap latency
histogram is fed per reap. prometheus_client's process metrics (``process_start_time_seconds``,
...) come with them. Metrics live in a registry of their own (not the process-global default),
so two daemons in one process (tests, embedding) do not clash.
"""

from __future__ import annotations

import contextlib
import importlib
import socket
import socketserver
import threading
from collections.abc import Iterator
from typing import Any, Callable, Optional, Tuple
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from ftimer_server.core._events import RejectReason
from ftimer_server.core._reaper import KILL_CHECK
from ftimer_server.core._stats import Stats

from ._daemon_log import signal_label
from ._unasked import Unasked, shut

__all__ = ["REAP_LATENCY_BUCKETS", "Metrics", "MetricsUnavailable", "prometheus"]
#: Capture times: py-spy takes tens of milliseconds, a budget a few seconds.
CAPTURE_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

#: Seconds from a deadline to its signal: the interesting range is 0.1 ms .. 1 s.
REAP_LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
)  # fmt: skip


_NO_REFUSALS = dict.fromkeys((reason.value for reason in RejectReason), 0)

#: Scrapes served at once. Each holds a descriptor and a thread: idle connections must
#: not use up the descriptors the loop needs to bind workers (pidfd_open). Beyond them, a
#: new connection takes the place of the oldest that has not sent its request yet.
MAX_SCRAPERS = 8
#: Seconds a new connection waits for the slot of the connection it closed.
_SLOT_WAIT = 1.0
#: Seconds a scraper has for its request and the reply, in all: a connection that says
#: nothing, or trickles its request a byte at a time, is closed after that.
SCRAPE_TIMEOUT = 5.0


class MetricsUnavailable(Exception):
    """prometheus_client is not installed (install ``ftimer-server[metrics]``)."""


def prometheus() -> Any:
    """The prometheus_client module (imported on the first call).

    Raises:
        MetricsUnavailable: it cannot be imported; the message says how to install it.
    """
    try:
        return importlib.import_module("prometheus_client")
    except ImportError:
        raise MetricsUnavailable(
            "metrics need prometheus_client (the ftimer-server[metrics] extra): "
            "pip install prometheus_client"
        ) from None


class _StatsCollector:
    """A prometheus_client collector over a ``Stats`` snapshot and daemon counters."""

    def __init__(
        self,
        prom: Any,
        stats: Callable[[], Stats],
        *,
        state_saves: Optional[Callable[[], Tuple[int, int]]],
        incident_writes: Optional[Callable[[], Tuple[int, int]]],
        last_progress: Optional[Callable[[], float]],
        stalled_for: Optional[Callable[[], float]],
        dry_run: bool,
    ) -> None:
        self._prom = prom
        self._stats = stats
        self._state_saves = state_saves
        self._incident_writes = incident_writes
        self._last_progress = last_progress
        self._stalled_for = stalled_for
        self._dry_run = dry_run
        self._last: Optional[Stats] = None  # what the last scrape read

    def collect(self) -> Iterator[Any]:
        core = self._prom.metrics_core
        if self._last_progress is not None:
            # Read first: a stalled loop's gauge must not wait for the stall to end. Now
            # while the loop is healthy, else the start of the iteration it is stuck in:
            # time() minus this is how long the reader has not been reading.
            yield core.GaugeMetricFamily(
                "ftimer_last_progress_timestamp_seconds",
                "Unix time the server's loop last made progress (now while it is healthy).",
                value=self._last_progress(),
            )
        if self._stalled_for is not None:
            # The host's own measure: the alert compares no clock of the host's with the
            # Prometheus server's, which may be off by more than a stall's threshold.
            yield core.GaugeMetricFamily(
                "ftimer_loop_stalled_seconds",
                "Seconds the server's loop has been stuck in one iteration (0 while healthy).",
                value=self._stalled_for(),
            )
        yield core.GaugeMetricFamily(
            "ftimer_dry_run", "1 if expiries are logged instead of signalled.", value=self._dry_run
        )
        for name, doc, outcomes in (
            ("ftimer_incident_writes", "Incidents written, by result.", self._incident_writes),
            (
                "ftimer_state_saves",
                "State file writes, by result (a failed journal write is an error).",
                self._state_saves,
            ),
        ):
            if outcomes is not None:
                family = core.CounterMetricFamily(name, doc, labels=["result"])
                ok, errors = outcomes()
                family.add_metric(["ok"], ok)
                family.add_metric(["error"], errors)
                yield family
        with contextlib.suppress(TimeoutError):  # a stalled loop: its last counts hold
            self._last = self._stats()
        s = self._last
        if s is None:
            return
        yield core.GaugeMetricFamily("ftimer_armed_timers", "Timers armed now.", value=s.armed)
        yield core.GaugeMetricFamily(
            "ftimer_workers",
            "Worker processes bound now (armed once, still running).",
            value=s.workers,
        )
        yield core.GaugeMetricFamily(
            "ftimer_unkillable_workers",
            f"Workers alive {KILL_CHECK:g} s or more after their SIGKILL, not yet seen to exit.",
            value=s.unkillable_alive,
        )
        requests = core.CounterMetricFamily(
            "ftimer_requests",
            "Messages applied, by type and result (ok, rejected, unknown).",
            labels=["type", "result"],
        )
        for kind, results in sorted(s.requests.items()):
            for result, n in sorted(results.items()):
                requests.add_metric([kind, result], n)
        yield requests
        for name, doc, label, counts in (
            # Every reason from the start, at 0: increase() sees the burst that would
            # otherwise create a reason's series (a crash replay's identity_mismatch).
            (
                "ftimer_refusals",
                "Requests refused, by reason.",
                "reason",
                {**_NO_REFUSALS, **s.rejections},
            ),
            (
                "ftimer_received",
                "Messages, refused datagrams and bad lines received, by transport (fifo, socket).",
                "transport",
                s.received,
            ),
            (
                "ftimer_decode_errors",
                "Lines or datagrams that were not valid messages.",
                "error",
                s.decode_errors,
            ),
            (
                "ftimer_reaps",
                "Workers reaped, by signal.",
                "signal",
                {signal_label(num): n for num, n in s.reaps.items()},
            ),
        ):
            family = core.CounterMetricFamily(name, doc, labels=[label])
            for key, n in sorted(counts.items()):
                family.add_metric([key], n)
            yield family
        for name, doc, value in (
            (
                "ftimer_reap_failures",
                "Reaps whose signal could not be delivered to a worker still there.",
                s.reap_failures,
            ),
            ("ftimer_expired_timers", "Timers that expired.", s.expired),
            ("ftimer_escalations", "Workers that outlived the grace period.", s.escalations),
            (
                "ftimer_unkillable",
                f"Workers still alive {KILL_CHECK:g} s after their SIGKILL (stuck in the kernel).",
                s.unkillable,
            ),
            (
                "ftimer_workers_gone",
                "Bound workers seen to exit (and, at a start, saved ones that exited meanwhile).",
                s.workers_gone,
            ),
            (
                "ftimer_socket_pid_overridden",
                "Messages over the socket applied to the sender (or its pidfd's process), "
                "not to the other pid they named.",
                s.pid_overridden,
            ),
        ):
            yield core.CounterMetricFamily(name, doc, value=value)


class Metrics:
    """The daemon's metrics.

    Args:
        stats: the server's counters (``FileTimerServer.stats``), read at scrape time;
            when it raises ``TimeoutError`` (a stalled loop), the last ones are served.
        state_saves: (successful, failed) state file writes, read at scrape time.
        incident_writes: (successful, failed) incident writes, read at scrape time.
        last_progress: when the server's loop last made progress
            (``FileTimerServer.get_last_progress_time``), read at scrape time.
        stalled_for: how long the server's loop has been stuck
            (``FileTimerServer.stalled_for``), read at scrape time.
        dry_run: whether the daemon runs with ``--dry-run`` (a gauge).

    Raises:
        MetricsUnavailable: prometheus_client is not installed.
    """

    def __init__(
        self,
        stats: Callable[[], Stats],
        *,
        state_saves: Optional[Callable[[], Tuple[int, int]]] = None,
        dry_run: bool = False,
        incident_writes: Optional[Callable[[], Tuple[int, int]]] = None,
        last_progress: Optional[Callable[[], float]] = None,
        stalled_for: Optional[Callable[[], float]] = None,
    ) -> None:
        prom = prometheus()
        self.registry = prom.CollectorRegistry()
        collector = _StatsCollector(
            prom,
            stats,
            state_saves=state_saves,
            incident_writes=incident_writes,
            last_progress=last_progress,
            stalled_for=stalled_for,
            dry_run=dry_run,
        )
        self.registry.register(collector)
        # process_start_time_seconds: increase() misses the reaps a restarted daemon made
        # before its first scrape, so the alert rules count a young daemon's from its start.
        prom.ProcessCollector(registry=self.registry)
        self._latency = prom.Histogram(
            "ftimer_reap_latency_seconds",
            "Seconds from a timer's deadline to its worker's signal.",
            buckets=REAP_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self._incidents = prom.Counter(
            "ftimer_incidents",
            "Incidents captured before a reap, by how the stuck worker's stacks were had.",
            ["method"],
            registry=self.registry,
        )
        self._capture = prom.Histogram(
            "ftimer_capture_seconds",
            "Seconds from a reap's decision to the end of its capture, by method.",
            ["method"],
            buckets=CAPTURE_BUCKETS,
            registry=self.registry,
        )
        self._reload_ok = prom.Gauge(
            "ftimer_config_last_reload_successful",
            "1 if the last reload (SIGHUP: the log file reopened, the config file read) "
            "succeeded or none was asked for, 0 if it failed (what was before it holds).",
            registry=self.registry,
        )
        self._reload_ok.set(1)
        self._restart_needed = prom.Gauge(
            "ftimer_config_restart_needed",
            "Settings the config file changes that apply only at a restart.",
            registry=self.registry,
        )
        self._prom = prom
        self._server: Any = None
        self._thread: Any = None

    def reaped(self, late: float) -> None:
        """Record one reap, ``late`` seconds after its deadline."""
        self._latency.observe(max(late, 0.0))

    def reloaded(self, ok: bool, restart_needed: int) -> None:
        """Record a reload of the config file: whether it succeeded, and how many
        changed settings wait for a restart."""
        self._reload_ok.set(ok)
        self._restart_needed.set(restart_needed)

    def incident(self, method: str, seconds: float) -> None:
        """Record one incident whose stuck worker was captured by ``method``."""
        self._incidents.labels(method).inc()
        self._capture.labels(method).observe(max(seconds, 0.0))

    def bind(self, address: Tuple[str, int]) -> Tuple[str, int]:
        """Bind ``address`` and listen: scrapers' connections wait there until `serve`;
        returns the bound (host, port).

        Raises:
            OSError: the address is in use or cannot be bound.
        """
        host, port = address
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        server_class = type("_Server", (_BoundedServer,), {"address_family": family[0][0]})
        app = self._prom.make_wsgi_app(self.registry)
        self._server = make_server(host, port, app, server_class, handler_class=_QuietHandler)
        bound = self._server.server_address
        return str(bound[0]), int(bound[1])

    def serve(self) -> None:
        """Serve ``/metrics`` over HTTP on the address `bind` bound, on a thread of its own."""
        assert self._server is not None, "bind() first"
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="ftimer-metrics", daemon=True
        )
        self._thread.start()

    def close(self) -> None:
        """Stop the HTTP server, if serving, and release its address, if bound."""
        if self._thread is not None:
            self._server.shutdown()  # waits for serve_forever(): only once it runs
            self._thread.join()
            self._thread = None
        if self._server is not None:
            self._server.server_close()
            self._server = None


class _BoundedServer(socketserver.ThreadingMixIn, WSGIServer):
    """prometheus_client's server (a thread per scrape) with bounds: ``MAX_SCRAPERS`` at
    once, ``SCRAPE_TIMEOUT`` for each in all, and a backlog that does not make scrapers
    wait.

    With every slot taken, a new connection closes the oldest that has not sent its
    request yet and takes its slot: connections that say nothing (anyone who can connect
    can open them, and open them again) never keep a scraper out, which sends its
    request at once. Only when every slot is answering a request is it closed at once.
    """

    daemon_threads = True
    block_on_close = False
    request_queue_size = 64

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._slots = threading.BoundedSemaphore(MAX_SCRAPERS)
        self._unasked = Unasked()
        super().__init__(*args, **kwargs)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False) and not self._took_a_silent_slot():
            self.shutdown_request(request)  # closes it: the scraper may try again
            return
        request.settimeout(SCRAPE_TIMEOUT)
        self._unasked.add(request)
        try:
            super().process_request(request, client_address)
        except BaseException:  # no thread to be had: the slot is free again
            self._unasked.asked(request)
            self._slots.release()
            raise

    def requested(self, request: socket.socket) -> None:
        """``request`` has sent its request (or is done): it keeps its slot."""
        self._unasked.asked(request)

    def _took_a_silent_slot(self) -> bool:
        """Shut the oldest connection that has not sent its request down, and take its
        slot once its thread is done; False if there is none, or it is not done in
        ``_SLOT_WAIT``."""
        return self._unasked.shut_oldest() and self._slots.acquire(timeout=_SLOT_WAIT)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        # The socket's timeout bounds each call; this, the whole: a shutdown ends the
        # handler's read or write, whatever it waits for.
        deadline = threading.Timer(SCRAPE_TIMEOUT, shut, args=(request,))
        deadline.daemon = True
        deadline.start()
        try:
            super().process_request_thread(request, client_address)
        finally:
            deadline.cancel()
            self.requested(request)
            self._slots.release()


class _QuietHandler(WSGIRequestHandler):
    """No line on stderr per scrape; tells the server once the request is read."""

    server: _BoundedServer

    def parse_request(self) -> bool:
        # Called with the request line read, and reads the headers: a complete request.
        parsed = super().parse_request()
        self.server.requested(self.request)
        return parsed

    def log_message(self, format: str, *args: Any) -> None:
        pass
