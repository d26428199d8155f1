"""Prometheus metrics of one server process.

Per-request figures (latency, size, errors) are observed as requests finish. Table figures (rows,
admitted/evicted/rejected counts, version) are read from the store when Prometheus scrapes, so the
hot path pays nothing for them. Each server gets its own registry (several servers can share a
test process); `start_http_server` exposes it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from streamrec.param_server.store import ParamStore
from streamrec.param_server.table_alias import logical_name

PREFIX = "streamrec_param_server"
ROW_BUCKETS = (1, 16, 256, 1024, 4096, 16384, 65536, 262144, 1048576)
LATENCY_BUCKETS = (0.0002, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10)


class _StoreCollector(Collector):
    """Per-table figures under each table's logical name (`table_alias.logical_name`): the versions
    a refit keeps of one table are summed, and the counters of versions dropped since are kept in
    the sums, so a counter never goes down when a refit drops its old tables (Prometheus would read
    that as a reset and `rate()` would spike at every refit)."""

    def __init__(self, store: ParamStore, metrics: ServerMetrics):
        self.store, self.metrics = store, metrics
        self._seen: dict[str, dict[str, int]] = {}  # table -> its counters at the last scrape
        self._retired: dict[str, dict[str, int]] = {}  # logical name -> counters of its dropped tables
        self._lock = threading.Lock()  # scrapes may run concurrently

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        info = self.store.info()
        rows = GaugeMetricFamily(f"{PREFIX}_table_rows", "live rows per table", labels=["table"])
        counters = {
            what: CounterMetricFamily(f"{PREFIX}_{what}_total", help_text, labels=["table"])
            for what, help_text in (
                ("admitted", "ids given a row"),
                ("evicted", "rows evicted by TTL"),
                ("evictions", "least recently updated rows evicted to make room under max_rows"),
                ("rejected", "pushed ids not applied because not yet admitted"),
            )
        }
        fields = {"evictions": "evicted_for_room"}
        now = {table["name"]: {what: table[fields.get(what, what)] for what in counters} for table in info["tables"]}
        with self._lock:
            for gone in self._seen.keys() - now.keys():
                retired = self._retired.setdefault(logical_name(gone), dict.fromkeys(counters, 0))
                for what, value in self._seen[gone].items():
                    retired[what] += value
            self._seen = now
            retired_now = {name: dict(values) for name, values in self._retired.items()}
        sums: dict[str, dict[str, int]] = {}
        for table in info["tables"]:
            entry = sums.setdefault(logical_name(table["name"]), dict.fromkeys(["rows", *counters], 0))
            entry["rows"] += table["rows"]
            for what in counters:
                entry[what] += now[table["name"]][what]
        for name, values in retired_now.items():  # a logical table with no version left keeps its series
            entry = sums.setdefault(name, dict.fromkeys(["rows", *counters], 0))
            for what, value in values.items():
                entry[what] += value
        for name, entry in sums.items():
            rows.add_metric([name], entry["rows"])
            for what, family in counters.items():
                family.add_metric([name], entry[what])
        yield rows
        yield from counters.values()
        yield GaugeMetricFamily(f"{PREFIX}_version", "global version counter", value=info["version"])
        yield CounterMetricFamily(f"{PREFIX}_applied_events_total", "events credited by pushes", value=info["applied_events"])
        yield CounterMetricFamily(
            f"{PREFIX}_pushes_skipped_total", "ranged pushes skipped: every range was applied before", value=info["skipped_pushes"]
        )
        yield GaugeMetricFamily(
            f"{PREFIX}_started_empty", "1: this process started without a valid checkpoint", value=int(info["empty"])
        )
        last = self.metrics.last_checkpoint_time
        age = GaugeMetricFamily(f"{PREFIX}_checkpoint_age_seconds", "seconds since the last checkpoint (-1: none)")
        age.add_metric([], time.time() - last if last else -1.0)
        yield age


class ServerMetrics:
    def __init__(self, store: ParamStore, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        self.last_checkpoint_time: float | None = None
        self.request_seconds = Histogram(
            f"{PREFIX}_request_seconds", "request latency", ["op"], buckets=LATENCY_BUCKETS, registry=self.registry
        )
        self.request_rows = Histogram(
            f"{PREFIX}_request_rows", "ids or rows per request", ["op"], buckets=ROW_BUCKETS, registry=self.registry
        )
        self.errors = Counter(f"{PREFIX}_errors_total", "requests answered with an error", ["op", "type"], registry=self.registry)
        self.checkpoint_seconds = Histogram(
            f"{PREFIX}_checkpoint_seconds", "time to write a checkpoint", buckets=LATENCY_BUCKETS, registry=self.registry
        )
        self.checkpoint_failures = Counter(
            f"{PREFIX}_checkpoint_failures_total", "checkpoints that could not be written", registry=self.registry
        )
        self.checkpoints_rejected = Counter(
            f"{PREFIX}_checkpoints_rejected_total", "corrupt checkpoints skipped at start", registry=self.registry
        )
        self.registry.register(_StoreCollector(store, self))

    def serve(self, port: int, host: str = "127.0.0.1") -> None:
        start_http_server(port, addr=host, registry=self.registry)
