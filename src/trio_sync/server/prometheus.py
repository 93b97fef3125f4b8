"""`GET /metrics` in Prometheus's text format, behind the same bearer auth as everything else.

Requests and bytes are read at scrape time from the `Traffic` counters the server keeps anyway,
connected clients and the newest revision from the hub; commits, conflicts and the time from a
commit to its event leaving the server are counted where they happen. Each server has its own
registry, so servers in one process (tests) do not share figures.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .hub import ChangeHub
from .metrics import Traffic

CONTENT_TYPE = CONTENT_TYPE_LATEST
#: Live delivery takes milliseconds; a slow client or a loaded server takes seconds.
EVENT_DELAY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class ServerMetrics:
    def __init__(self, traffic: Traffic | None, hub: ChangeHub) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.commits = Counter("trio_sync_commits", "Versions committed.", registry=self.registry)
        self.conflicts = Counter(
            "trio_sync_conflicts",
            "Commits refused because the server's version was not their base (409), by reason.",
            ["reason"],
            registry=self.registry,
        )
        self.event_delay = Histogram(
            "trio_sync_commit_to_event_seconds",
            "From a commit to its event being handed to a live client's stream.",
            buckets=EVENT_DELAY_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(_Counted(traffic, hub))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _Counted(Collector):
    """What the server counts anyway, read when Prometheus asks."""

    def __init__(self, traffic: Traffic | None, hub: ChangeHub) -> None:
        self._traffic = traffic
        self._hub = hub

    def collect(self) -> Iterator[Metric]:
        traffic = self._traffic
        if traffic is not None:
            requests = CounterMetricFamily(
                "trio_sync_requests", "HTTP requests, by method and route.", labels=["route"]
            )
            for route, count in sorted(traffic.requests.items()):
                requests.add_metric([route], count)
            yield requests
            yield CounterMetricFamily(
                "trio_sync_received_bytes", "HTTP body bytes received.", value=traffic.bytes_in
            )
            yield CounterMetricFamily(
                "trio_sync_sent_bytes", "HTTP body bytes sent.", value=traffic.bytes_out
            )
        yield GaugeMetricFamily(
            "trio_sync_clients_connected",
            "Open event streams (live clients).",
            value=len(self._hub.subscribers),
        )
        yield GaugeMetricFamily(
            "trio_sync_revision", "The newest revision committed.", value=self._hub.latest_rev
        )
