"""The console's pipeline-health figures from Prometheus exposition text.

Every process already exposes its state on `/metrics`; the console reads those same numbers
instead of a second reporting path, so the page and Prometheus never disagree. A scrape is reduced
to `Totals` (counters, gauges, histogram buckets summed over the processes that expose them);
rates and the serving p99 need two scrapes, so a figure is computed from the current totals and
the previous ones.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

CONSUMED = "streamrec_trainer_events_consumed_total"
LAG = "streamrec_trainer_consumer_lag_events"
PREQUENTIAL = "streamrec_trainer_prequential"
STALENESS = "streamrec_serving_staleness_seconds"
TABLE_ROWS = "streamrec_param_server_table_rows"
LATENCY_BUCKET = "streamrec_serving_request_seconds_bucket"
LATENCY_ENDPOINT = "/recommend"
HIT_RATE = "hr@10"


@dataclass
class Totals:
    """What one round of scrapes found; None where no process exposes the metric."""

    consumed: float | None = None
    lag: float | None = None
    hit_rate: float | None = None
    staleness: float | None = None
    table_rows: dict[str, float] = field(default_factory=dict)
    latency_buckets: dict[float, float] = field(default_factory=dict)  # upper bound -> cumulative count

    def add(self, text: str) -> None:
        """Fold one process's exposition text in (raises ValueError on text that does not parse)."""
        hit_rates: dict[float, float] = {}  # window -> value; the smallest window is the most live
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                name, labels, value = sample.name, sample.labels, sample.value
                if name == CONSUMED:
                    self.consumed = (self.consumed or 0.0) + value
                elif name == LAG:
                    self.lag = (self.lag or 0.0) + value
                elif name == PREQUENTIAL and labels.get("metric") == HIT_RATE and not math.isnan(value):
                    hit_rates[float(labels.get("window", "inf"))] = value
                elif name == STALENESS:
                    self.staleness = value if self.staleness is None else max(self.staleness, value)
                elif name == TABLE_ROWS:
                    table = labels.get("table", "")
                    self.table_rows[table] = self.table_rows.get(table, 0.0) + value
                elif name == LATENCY_BUCKET and labels.get("endpoint") == LATENCY_ENDPOINT:
                    bound = float(labels["le"])
                    self.latency_buckets[bound] = self.latency_buckets.get(bound, 0.0) + value
        if hit_rates:
            self.hit_rate = hit_rates[min(hit_rates)]


def quantile(buckets: dict[float, float], q: float) -> float | None:
    """The q-quantile of a cumulative histogram, interpolated linearly inside its bucket (as
    PromQL's histogram_quantile does); None without observations."""
    bounds = sorted(buckets)
    if not bounds or buckets[bounds[-1]] <= 0:
        return None
    rank = q * buckets[bounds[-1]]
    lower, below = 0.0, 0.0
    for bound in bounds:
        count = buckets[bound]
        if count >= rank:
            if math.isinf(bound):
                return lower  # beyond the largest finite bucket: its bound is all we know
            return lower + (bound - lower) * ((rank - below) / (count - below) if count > below else 1.0)
        lower, below = bound, count
    return lower


def figures(now: Totals, before: Totals | None, seconds: float) -> dict[str, float | dict[str, float] | None]:
    """The chart figures: events/s and the serving p99 over the interval since `before` (the p99
    of all requests so far when there is no earlier scrape), the rest as scraped."""
    rate = None
    if before is not None and now.consumed is not None and before.consumed is not None and seconds > 0:
        delta = now.consumed - before.consumed
        rate = delta / seconds if delta >= 0 else None  # a restarted trainer resets its counter
    buckets = now.latency_buckets
    if before is not None and before.latency_buckets:
        interval = {b: c - before.latency_buckets.get(b, 0.0) for b, c in buckets.items()}
        if all(c >= 0 for c in interval.values()):  # else a worker restarted: use the totals
            buckets = interval
    p99 = quantile(buckets, 0.99)
    return {
        "events_per_s": rate, "consumer_lag": now.lag, "hr10": now.hit_rate,
        "serving_p99_ms": None if p99 is None else p99 * 1000.0, "staleness_s": now.staleness,
        "ps_rows": sum(now.table_rows.values()) if now.table_rows else None, "ps_tables": dict(now.table_rows),
    }
