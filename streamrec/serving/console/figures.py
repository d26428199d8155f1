"""The console's pipeline-health figures from Prometheus exposition text.

Every process already exposes its state on `/metrics`; the console reads those same numbers
instead of a second reporting path, so the page and Prometheus never disagree. Each process's
answer is parsed whole into its own `Totals` (counters, gauges, histogram buckets) before anything
is summed: an answer that breaks half-way contributes nothing, not the samples above the bad line
(those used to land in the page's totals while the process was shown as down). Rates and the
serving p99 need two scrapes; they are computed per process, from its own previous `Reading`, and
then summed, so a process that misses a scrape and comes back adds its own increase, not its whole
counter (one trainer of two missing one scrape drew a spike of 2,000,030 events/s instead of 20).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
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
    """What one process exposes, or several merged; None where none of them exposes the metric."""

    consumed: float | None = None
    lag: float | None = None
    hit_rate: float | None = None
    staleness: float | None = None
    table_rows: dict[str, float] = field(default_factory=dict)
    latency_buckets: dict[float, float] = field(default_factory=dict)  # upper bound -> cumulative count

    @classmethod
    def parse(cls, text: str) -> Totals:
        """One process's exposition text. ValueError on text that does not parse, or on a sample the
        figures cannot place (a latency bucket without a numeric `le`): the whole answer is refused,
        so the caller never holds part of it."""
        totals, hit_rates = cls(), {}  # window -> hr@10; the smallest window is the most live
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                totals._fold(sample.name, sample.labels, sample.value, hit_rates)
        if hit_rates:
            totals.hit_rate = hit_rates[min(hit_rates)]
        return totals

    def _fold(self, name: str, labels: dict[str, str], value: float, hit_rates: dict[float, float]) -> None:
        """One sample into these totals (hr@10 into `hit_rates`, resolved once the text is read)."""
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
            bound = _bucket_bound(labels)
            self.latency_buckets[bound] = self.latency_buckets.get(bound, 0.0) + value

    def merge(self, other: Totals) -> None:
        """Fold another process's (whole) totals in: counts summed, the largest staleness, and the
        other's hr@10 where it reports one (the processes are merged in the configured order)."""
        self.consumed = _plus(self.consumed, other.consumed)
        self.lag = _plus(self.lag, other.lag)
        if other.hit_rate is not None:
            self.hit_rate = other.hit_rate
        if other.staleness is not None:
            self.staleness = other.staleness if self.staleness is None else max(self.staleness, other.staleness)
        for table, rows in other.table_rows.items():
            self.table_rows[table] = self.table_rows.get(table, 0.0) + rows
        for bound, count in other.latency_buckets.items():
            self.latency_buckets[bound] = self.latency_buckets.get(bound, 0.0) + count

    def add(self, text: str) -> None:
        """Fold one process's exposition text in, all of it or (ValueError) nothing of it."""
        self.merge(Totals.parse(text))

    @classmethod
    def merged(cls, parts: Iterable[Totals]) -> Totals:
        """Several processes' totals as one."""
        total = cls()
        for part in parts:
            total.merge(part)
        return total


@dataclass(frozen=True)
class Reading:
    """One process's totals and the wall time (epoch seconds) of the scrape that read them."""

    totals: Totals
    at: float


def _bucket_bound(labels: dict[str, str]) -> float:
    """A histogram bucket's upper bound; ValueError (not KeyError) for a bucket without `le`, so
    the process that sent it is refused like any other malformed answer."""
    bound = labels.get("le")
    if bound is None:
        raise ValueError(f"a {LATENCY_BUCKET} sample without an le label")
    return float(bound)


def _plus(a: float | None, b: float | None) -> float | None:
    return b if a is None else a if b is None else a + b


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


def consumed_rate(now: Reading, before: Reading | None) -> float | None:
    """Events/s of one process between two of its own readings; None without an earlier reading
    with the counter. A counter lower than before (the trainer restarted) counts from 0, as PromQL's
    rate() does."""
    if before is None or now.totals.consumed is None or before.totals.consumed is None or now.at <= before.at:
        return None
    delta = now.totals.consumed - before.totals.consumed
    return (delta if delta >= 0 else now.totals.consumed) / (now.at - before.at)


def interval_buckets(now: Reading, before: Reading | None) -> dict[float, float]:
    """One process's latency buckets since its previous reading; all its requests so far when it
    has none, or when a count went down (the worker restarted)."""
    buckets = now.totals.latency_buckets
    if before is None or not before.totals.latency_buckets:
        return buckets
    interval = {b: c - before.totals.latency_buckets.get(b, 0.0) for b, c in buckets.items()}
    return interval if all(c >= 0 for c in interval.values()) else buckets


def figures(now: dict[str, Reading], before: dict[str, Reading]) -> dict[str, float | dict[str, float] | None]:
    """The chart figures from this round's readings by process name (the processes that answered)
    and each process's previous reading: events/s and the serving p99 summed over the processes'
    own intervals, the rest as scraped."""
    totals = Totals.merged(reading.totals for reading in now.values())
    rates = [r for name, reading in now.items() if (r := consumed_rate(reading, before.get(name))) is not None]
    buckets: dict[float, float] = {}
    for name, reading in now.items():
        for bound, count in interval_buckets(reading, before.get(name)).items():
            buckets[bound] = buckets.get(bound, 0.0) + count
    p99 = quantile(buckets, 0.99)
    return {
        "events_per_s": sum(rates) if rates else None, "consumer_lag": totals.lag, "hr10": totals.hit_rate,
        "serving_p99_ms": None if p99 is None else p99 * 1000.0, "staleness_s": totals.staleness,
        "ps_rows": sum(totals.table_rows.values()) if totals.table_rows else None,
        "ps_tables": dict(totals.table_rows),
    }
