"""Prometheus metrics of a serving worker.

With several workers (`streamrec serve --workers N`, N > 1) prometheus_client runs in
multiprocess mode: `streamrec serve` points PROMETHEUS_MULTIPROC_DIR at a fresh directory before
the workers start, every worker writes its values there, and `/metrics` on any worker merges all of
them (counters and histograms summed; gauges per worker with a `pid` label). A single worker uses
the ordinary in-process registry.
"""

from __future__ import annotations

import os
from functools import lru_cache

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
SYNC_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ENDPOINTS = ("/recommend", "/rescore", "/similar", "/events", "/ui", "/healthz", "/readyz", "/metrics")


class ServingMetrics:
    def __init__(self) -> None:
        self.request_seconds = Histogram("streamrec_serving_request_seconds", "request latency",
                                         ["endpoint"], buckets=LATENCY_BUCKETS)
        self.requests = Counter("streamrec_serving_requests_total", "requests answered", ["endpoint", "status"])
        self.errors = Counter("streamrec_serving_errors_total", "requests answered with 4xx/5xx",
                              ["endpoint", "status"])
        self.candidates = Counter("streamrec_serving_candidates_total", "candidates by source", ["source"])
        self.recommended = Counter("streamrec_serving_recommended_items_total",
                                   "items returned by /recommend by source", ["source"])
        self.degraded = Counter("streamrec_serving_degraded_total",
                                "requests served without a dependency or with a fallback", ["reason"])
        self.user_pulls = Counter("streamrec_serving_user_pulls_total",
                                  "user rows pulled on a cache miss, by outcome (found/absent/failed)", ["outcome"])
        self.model_version = Gauge("streamrec_serving_model_version", "parameter-server version served",
                                   multiprocess_mode="liveall")
        self.staleness = Gauge("streamrec_serving_staleness_seconds",
                               "seconds since the parameter server last confirmed the state",
                               multiprocess_mode="liveall")
        self.index_items = Gauge("streamrec_serving_index_items", "items in the FAISS index",
                                 multiprocess_mode="liveall")
        self.sync_seconds = Histogram("streamrec_serving_sync_seconds", "one poll (fetch + apply + swap)",
                                      buckets=SYNC_BUCKETS)
        self.sync_failures = Counter("streamrec_serving_sync_failures_total", "polls that failed")
        self.artifact_refusals = Counter("streamrec_serving_artifact_refusals_total",
                                         "published blobs that did not decode (the version before stays)", ["blob"])
        self.index_rebuilds = Counter("streamrec_serving_index_rebuilds_total", "full index rebuilds")
        self.search_memo = Counter("streamrec_serving_search_memo_total",
                                   "index searches answered from the memo (hit) or by FAISS (miss)", ["result"])
        self.arm_requests = Counter("streamrec_serving_experiment_requests_total",
                                    "/recommend answers by experiment and arm", ["experiment", "arm"])
        self.experiments_loaded = Gauge("streamrec_serving_experiments", "experiments in force",
                                        multiprocess_mode="liveall")
        self.experiments_reload_failures = Counter("streamrec_serving_experiments_reload_failures_total",
                                                   "experiments files that failed the schema (the last good stays)")


@lru_cache(maxsize=1)
def serving_metrics() -> ServingMetrics:
    """One set per process (metrics register globally)."""
    return ServingMetrics()


def render() -> tuple[bytes, str]:
    """The exposition text: merged over all workers in multiprocess mode."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST


def mark_worker_dead(pid: int) -> None:
    """Drop a stopped worker's live gauges from the merged view."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        multiprocess.mark_process_dead(pid)
