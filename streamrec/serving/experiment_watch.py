"""`streamrec experiments watch`: live experiments' per-arm outcomes as Prometheus series.

`experiments report` answers "which arm wins, and how sure are we" from the whole topics, once.
This job answers "what is happening now" continuously: it reads serving's impressions topic and
the interaction topic as they grow and keeps, per experiment and arm,
- `streamrec_serving_arm_impressions_total`: answers shown (a request id logged twice while the
  first copy is held counts once);
- `streamrec_serving_arm_hits_total`: answers followed, within `--window` of event time, by a
  positive event of the user on a shown item (hit@k = hits / impressions);
- `streamrec_serving_arm_clicks_total`: answers whose `request_id` came back in a positive event's
  `context` for a shown item (CTR = clicks / impressions);
- `streamrec_serving_arm_shown_items`: distinct items shown (coverage).
The join is `experiment_report.outcomes`, the report's own, applied incrementally: new impressions
against every event held, held impressions against new events. So, once the window has passed,
the counters equal the report's `requests`, `hits` and `clicks` over the same records.

State is bounded by event time: an impression is held until `window` after it, an event until no
held or late impression can reach it, and `lateness` is how far behind the newest timestamp seen
(never later than the wall clock) a record may arrive and still be joined (impressions and events
come from different topics and are polled independently). Anything later is counted as an
impression but cannot score; those are counted in `streamrec_serving_watch_late_records_total`.
The job holds no offsets: it starts at the topics' ends (or their beginnings with
`--from-beginning`), and a restart starts counting afresh, as Prometheus counters of a restarted
process do.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import pandas as pd
from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

from streamrec.core.config import Settings
from streamrec.serving.experiment_report import events_frame, impressions_frame, outcomes
from streamrec.stream.kafka import Consumer, Record, TopicPartition, make_consumer
from streamrec.stream.topics import create_topics, end_offsets, partitions_of

log = logging.getLogger(__name__)
ARM = ["experiment", "arm"]


@dataclass
class WatchMetrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        self.impressions = Counter("streamrec_serving_arm_impressions_total", "answers shown, per experiment arm", ARM, registry=r)
        self.hits = Counter("streamrec_serving_arm_hits_total",
                            "answers followed within the window by a positive event on a shown item", ARM, registry=r)
        self.clicks = Counter("streamrec_serving_arm_clicks_total",
                              "answers whose request_id came back with a positive event on a shown item", ARM, registry=r)
        self.shown_items = Gauge("streamrec_serving_arm_shown_items", "distinct items shown per experiment arm", ARM, registry=r)
        self.late = Counter("streamrec_serving_watch_late_records_total",
                            "impressions or events older than the join can still reach (not scored)", ["kind"], registry=r)
        self.held = Gauge("streamrec_serving_watch_held", "impressions and events held for the join", ["kind"], registry=r)


class LiveOutcomes:
    """The report's join (`outcomes`), fed in pieces; counts each impression, hit and click once."""

    def __init__(self, window_s: float, lateness_s: float, metrics: WatchMetrics) -> None:
        self.window_s, self.lateness_s, self.metrics = window_s, lateness_s, metrics
        self.impressions = impressions_frame([])[0]
        self.events = events_frame([])[0]
        self.hit: set[str] = set()  # request ids already counted as a hit
        self.clicked: set[str] = set()
        self.shown: dict[tuple[str, str], set[str]] = {}
        self.clock = float("-inf")  # the newest timestamp seen in either topic, at most the wall clock

    def add(self, impressions: pd.DataFrame, events: pd.DataFrame) -> None:
        """Join a poll's new impressions (one row per request and experiment) and positive events."""
        impressions = impressions[~impressions.set_index(["request_id", "experiment"]).index.isin(
            self.impressions.set_index(["request_id", "experiment"]).index)]
        horizon = self.clock - self.lateness_s  # what arrives older than this may have missed its partners
        self.metrics.late.labels("impressions").inc(int((impressions["timestamp"] < horizon - self.window_s).sum()))
        self.metrics.late.labels("events").inc(int((events["timestamp"] < horizon).sum()))
        for (experiment, arm), rows in impressions.groupby(ARM):
            self.metrics.impressions.labels(experiment, arm).inc(len(rows))
            shown = self.shown.setdefault((experiment, arm), set())
            shown.update(item for items in rows["items"] for item in items)
            self.metrics.shown_items.labels(experiment, arm).set(len(shown))
        held_events = pd.concat([self.events, events], ignore_index=True) if len(events) else self.events
        joined = [outcomes(impressions, held_events, self.window_s)] if len(impressions) and len(held_events) else []
        if len(self.impressions) and len(events):
            joined.append(outcomes(self.impressions, events, self.window_s))
        for frame in joined:
            self._count(frame, "hit", self.hit, self.metrics.hits)
            self._count(frame, "click", self.clicked, self.metrics.clicks)
        self.impressions = pd.concat([self.impressions, impressions], ignore_index=True) if len(impressions) else self.impressions
        self.events = held_events
        stamps = [frame["timestamp"].max() for frame in (impressions, events) if len(frame)]
        # never past the wall clock: one valid event dated hours ahead (the schema allows a day, for
        # skewed clients) made every record after it late, unscored, until wall time caught up
        self.clock = min(max([self.clock, *stamps]), time.time())
        self._expire()

    def _count(self, frame: pd.DataFrame, flag: str, counted: set[str], counter: Counter) -> None:
        new = frame[frame[flag] & ~frame["request_id"].isin(counted)]
        for (experiment, arm), rows in new.groupby(ARM):
            counter.labels(experiment, arm).inc(len(rows))
        counted.update(new["request_id"])

    def _expire(self) -> None:
        """Drop what no record within the lateness can join any more."""
        horizon = self.clock - self.lateness_s
        keep = self.impressions["timestamp"] + self.window_s >= horizon
        gone = set(self.impressions.loc[~keep, "request_id"])
        self.impressions = self.impressions[keep].reset_index(drop=True)
        self.hit -= gone
        self.clicked -= gone
        self.events = self.events[self.events["timestamp"] >= horizon - self.window_s].reset_index(drop=True)
        self.metrics.held.labels("impressions").set(len(self.impressions))
        self.metrics.held.labels("events").set(len(self.events))


def _reader(settings: Settings, from_beginning: bool) -> Consumer:
    """A group-less reader of every partition of both topics, at their ends (or beginnings). The
    topics are created where they do not exist yet, as the impression follower does: a watch
    started before serving's first answer raised KeyError (and left its consumer open)."""
    topics = [settings.impressions_topic, settings.topic]
    create_topics(settings.kafka_bootstrap, topics, settings.topic_partitions)
    ends: dict[TopicPartition, int] = {(topic, partition): end
            for topic in topics
            for partition, (_, end) in end_offsets(settings.kafka_bootstrap, topic,
                                                   partitions_of(settings.kafka_bootstrap, topic)).items()}
    consumer = make_consumer(settings.kafka_bootstrap, settings.kafka_client, fetch_wait_ms=settings.fetch_wait_ms)
    consumer.assign(list(ends))
    if not from_beginning:
        for partition, end in ends.items():
            consumer.seek(partition, end)
    return consumer


def split(records: Iterable[Record], impressions_topic: str) -> tuple[list[Record], list[Record]]:
    """(impression records, interaction records) of one poll."""
    impressions, events = [], []
    for record in records:
        (impressions if record.topic == impressions_topic else events).append(record)
    return impressions, events


def watch(settings: Settings, window_s: float, lateness_s: float, stop: threading.Event, metrics_port: int,
          from_beginning: bool = False) -> None:
    """Serve the per-arm series on `metrics_port` until `stop` is set."""
    metrics = WatchMetrics()
    start_http_server(metrics_port, addr=settings.metrics_host, registry=metrics.registry)
    live = LiveOutcomes(window_s, lateness_s, metrics)
    consumer = _reader(settings, from_beginning)
    try:
        while not stop.is_set():
            impressions, events = split(consumer.poll(max_records=5000, timeout_s=0.5), settings.impressions_topic)
            if impressions or events:
                live.add(impressions_frame(impressions)[0], events_frame(events)[0])
    finally:
        consumer.close()
