"""Prometheus metrics of batch refits, labelled by model.

A refit loop (`streamrec refit --every ...`) runs for days like any other service, so it exposes
these on `Settings.metrics_port` (STREAMREC_METRICS_PORT) and an alert can ask "when did the ALS
refit last succeed?" (`time() - streamrec_refit_last_success_timestamp_seconds`). A one-shot refit
finishes before a scrape would see it and exposes nothing; its JSON report says the same things.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

STAGES = ("load", "fit", "publish")
OUTCOMES = ("ok", "failed")

DURATION = Histogram(
    "streamrec_refit_duration_seconds", "Time of one refit stage (load the log, fit, publish)", ["model", "stage"],
    buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600),
)
RUNS = Counter("streamrec_refit_runs_total", "Refits finished, by outcome", ["model", "outcome"])
INPUT_ROWS = Gauge("streamrec_refit_input_rows", "Events the last successful refit was fitted on", ["model"])
PUBLISHED_ROWS = Gauge(
    "streamrec_refit_published_rows", "Rows the last successful refit assigned to parameter-server tables", ["model"]
)
LAST_SUCCESS = Gauge(
    "streamrec_refit_last_success_timestamp_seconds", "End time (epoch seconds) of the last successful refit", ["model"]
)


def declare(model: str) -> None:
    """Create every series of `model` at zero, so that the first refit is an increase Prometheus sees
    (a counter series that appears at 1 has no increase) and dashboards show the model at once."""
    for outcome in OUTCOMES:
        RUNS.labels(model, outcome)
    for stage in STAGES:
        DURATION.labels(model, stage)
