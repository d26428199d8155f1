"""Prometheus metrics of the online trainer (`streamrec_trainer_*`)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

EVENTS_CONSUMED = Counter("streamrec_trainer_events_consumed_total", "Records read from the topic")
EVENTS_APPLIED = Counter("streamrec_trainer_events_applied_total", "Valid events learned and committed")
BATCH_SECONDS = Histogram(
    "streamrec_trainer_batch_seconds", "Wall time of one consumed batch: decode, learn, features, commit",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
PUSH_SECONDS = Histogram(
    "streamrec_trainer_push_seconds", "Wall time of one micro-batch update (pull, gradients, push)",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1),
)
FEATURE_SECONDS = Histogram(
    "streamrec_trainer_feature_store_seconds", "Wall time of one batch's feature-store write",
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)
FEATURE_ERRORS = Counter(
    "streamrec_trainer_feature_store_errors_total",
    "Feature-store write attempts that failed (retried until they succeed; nothing is dropped), by kind: "
    "unreachable (connection, timeout) or refused (Redis answered with an error, e.g. OOM, READONLY, WRONGTYPE)",
    ["kind"],
)
FEATURE_BACKPRESSURE = Gauge(
    "streamrec_trainer_feature_store_backpressure", "1 while consumption is paused because Redis is unreachable"
)
FEATURE_REBUILDS = Counter(
    "streamrec_trainer_feature_store_rebuilds_total", "Rebuilds of a wiped feature store from the topic"
)
REWINDS = Counter(
    "streamrec_trainer_rewinds_total", "Seeks of a partition to where the parameter server needs it", ["reason"]
)
EVENTS_LOST_TO_RETENTION = Counter(
    "streamrec_trainer_events_lost_to_retention_total",
    "Events the model state needed that the topic no longer holds (retention removed them)", ["partition"],
)
CONSUMER_LAG = Gauge("streamrec_trainer_consumer_lag_events", "End offset minus next offset to read", ["partition"])
LOSS = Gauge("streamrec_trainer_loss", "Mean training loss of the last batch", ["model"])
PREQUENTIAL = Gauge(
    "streamrec_trainer_prequential", "Prequential (test-then-train) metric over the last `window` evaluated events",
    ["metric", "window"],
)
EVENT_TIME = Gauge("streamrec_trainer_event_time_seconds", "Event time of the newest learned event")
IMPRESSIONS_READ = Counter(
    "streamrec_trainer_impressions_total",
    "Impressions read from serving's impressions topic, by outcome: kept (their shown items may become "
    "negatives) or invalid (not an impression: no string user_id or no list of string items)", ["outcome"],
)
IMPRESSION_NEGATIVES = Counter(
    "streamrec_trainer_impression_negatives_total",
    "BPR negatives drawn from items serving showed the user and the user did not pick",
)
EXPLORATION_COUNTED = Counter(
    "streamrec_trainer_exploration_counted_total",
    "Exploration statistics written to Redis, by kind: impressions (answers counted), shown (items of them), "
    "clicks (positive events "
    "carrying the request_id of an impression that showed their item), first_seen (items per counted range), "
    "sliced (positive events counted into context slices, once per slice)",
    ["kind"],
)
for _kind in ("impressions", "shown", "clicks", "first_seen", "sliced"):
    EXPLORATION_COUNTED.labels(_kind)
for _kind in ("unreachable", "refused"):  # both series exist from the start (a dashboard's rate reads 0, not nothing)
    FEATURE_ERRORS.labels(_kind)
