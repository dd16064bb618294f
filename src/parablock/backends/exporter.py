"""The networked server's Prometheus endpoint (``server.metrics_address``): what the run has done
so far, read from the server and its gRPC service each time the endpoint is scraped.

Counts and seconds only: no token or token hash, no training data, no model value, no peer
address; clients appear by their id (the clients file's public numbering). Every metric is
documented in docs/observability.md; ``METRICS`` lists their names as served.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator

from parablock.core.server import Server
from parablock.errors import ConfigError
from parablock.transport.grpc_service import AuthStats

log = logging.getLogger(__name__)

# Names as served (counters carry Prometheus's ``_total``; the histogram its ``_bucket``,
# ``_sum`` and ``_count`` series).
METRICS = (
    "parablock_rounds_done",
    "parablock_rounds_planned",
    "parablock_clients_expected",
    "parablock_clients_active",
    "parablock_client_joins_total",
    "parablock_client_drops_total",
    "parablock_updates_accepted_total",
    "parablock_updates_rejected_total",
    "parablock_calls_refused_total",
    "parablock_bytes_received_total",
    "parablock_bytes_sent_total",
    "parablock_round_seconds",
    "parablock_last_round_seconds",
    "parablock_client_wait_seconds_total",
    "parablock_client_last_wait_seconds",
    "parablock_privacy_epsilon",
)
ROUND_BUCKETS = (0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
LOOPBACK = "127.0.0.1"


def parse_address(text: str) -> tuple[str, int]:
    """``server.metrics_address`` as (host, port): ``HOST:PORT``, or ``PORT`` / ``:PORT`` for
    loopback (``[::1]:PORT`` for IPv6). Port 0 picks a free one."""
    host, sep, port = text.strip().rpartition(":")
    host = host.strip("[]") if sep else ""
    try:
        number = int(port)
    except ValueError:
        number = -1
    if not 0 <= number <= 65535:
        raise ConfigError(
            f"server.metrics_address={text!r}: expected HOST:PORT or PORT (e.g. 127.0.0.1:9470)"
        )
    return host or LOOPBACK, number


def check_available() -> None:
    """The metrics endpoint needs prometheus-client: a one-line error before anything loads."""
    try:
        import prometheus_client  # noqa: F401
    except ImportError:
        raise ConfigError(
            "server.metrics_address needs the prometheus-client package: "
            "pip install 'parablock[observe]' (scripts/install.sh installs it)"
        ) from None


class FederationCollector:
    """A Prometheus collector that reads the server's ``snapshot()`` and the service's counts
    at every scrape (nothing is counted twice, nothing is kept here but the start time)."""

    def __init__(self, server: Server, calls: AuthStats) -> None:
        self.server = server
        self.calls = calls
        self.started_at: float | None = None  # when round 0 (or a resume's first round) began

    def describe(self) -> list:
        return []  # no description at registration: collect() reads live state

    def collect(self) -> Iterator:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        s = self.server.snapshot()

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, doc, value=value)

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            return CounterMetricFamily(name, doc, value=value)

        yield gauge("parablock_rounds_done", "rounds aggregated so far", s["rounds_done"])
        yield gauge("parablock_rounds_planned", "rounds the run plans", s["rounds"])
        yield gauge("parablock_clients_expected", "federation.clients", s["clients"])
        yield gauge(
            "parablock_clients_active", "clients joined and not dropped", float(s["active"])
        )
        yield counter("parablock_client_joins", "joins and rejoins", s["joins"])
        yield counter("parablock_client_drops", "clients dropped (deadline, no join)", s["drops"])
        yield counter("parablock_updates_accepted", "block updates accepted", s["accepted"])
        rejected = CounterMetricFamily(
            "parablock_updates_rejected", "block updates rejected, by reason", labels=["reason"]
        )
        for kind, n in sorted(s["rejected"].items()):
            rejected.add_metric([kind], n)
        yield rejected
        refused = CounterMetricFamily(
            "parablock_calls_refused",
            "gRPC calls refused or ended (no valid token, too large, idle, busy, ...), by reason",
            labels=["reason"],
        )
        kinds: dict[str, int] = {}
        for counts in (self.calls.refused.counts(), self.calls.ended.counts()):
            for kind, n in counts.items():
                key = kind.replace(" ", "_")
                kinds[key] = kinds.get(key, 0) + n
        for kind, n in sorted(kinds.items()):
            refused.add_metric([kind], n)
        yield refused
        yield counter(
            "parablock_bytes_received",
            "bytes of authenticated requests and upload chunks (gRPC payloads)",
            self.calls.bytes_in,
        )
        yield counter(
            "parablock_bytes_sent", "bytes of replies and download chunks", self.calls.bytes_out
        )
        seconds = self._round_seconds(s["aggregated_at"])
        buckets, seen = [], 0
        for le in ROUND_BUCKETS:
            seen = sum(1 for x in seconds if x <= le)
            buckets.append((str(float(le)), seen))
        buckets.append(("+Inf", len(seconds)))
        yield HistogramMetricFamily(
            "parablock_round_seconds",
            "time from one round's aggregate to the next (the first: from the start)",
            buckets=buckets,
            sum_value=sum(seconds),
        )
        yield gauge(
            "parablock_last_round_seconds",
            "the last round's time (0 before the first aggregate)",
            seconds[-1] if seconds else 0.0,
        )
        total = CounterMetricFamily(
            "parablock_client_wait_seconds",
            "seconds each client waited for aggregates, as its reports say",
            labels=["client"],
        )
        last = GaugeMetricFamily(
            "parablock_client_last_wait_seconds",
            "each client's wait in its last reported round",
            labels=["client"],
        )
        for c, waits in sorted(s["wait_s"].items()):
            total.add_metric([str(c)], sum(waits))
            last.add_metric([str(c)], waits[-1] if waits else 0.0)
        yield total
        yield last
        epsilon = GaugeMetricFamily(
            "parablock_privacy_epsilon", "epsilon spent so far (absent without privacy)"
        )
        if s["epsilon"] is not None:
            epsilon.add_metric([], s["epsilon"])
        yield epsilon

    def _round_seconds(self, at: dict[int, float]) -> list[float]:
        out = []
        for t in sorted(at):
            before = at.get(t - 1, self.started_at)
            if before is not None:
                out.append(max(0.0, at[t] - before))
        return out


class MetricsEndpoint:
    """The HTTP endpoint of one ``FederationCollector``, in a registry of its own (so that
    several servers in one process, as in tests, never share one)."""

    def __init__(self, collector: FederationCollector, address: str) -> None:
        from prometheus_client import CollectorRegistry
        from prometheus_client.exposition import start_http_server

        host, port = parse_address(address)
        self.collector = collector
        registry = CollectorRegistry(auto_describe=False)
        registry.register(collector)
        try:
            self._httpd, self._thread = start_http_server(port, addr=host, registry=registry)
        except OSError as e:
            raise ConfigError(f"server.metrics_address={address!r}: {e}") from None
        self.host, self.port = host, self._httpd.server_port
        where = "loopback only" if host in (LOOPBACK, "localhost", "::1") else "NOT loopback"
        log.info("metrics on http://%s:%d/metrics (%s; no token)", host, self.port, where)

    def started(self) -> None:
        self.collector.started_at = time.time()

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=5.0)
