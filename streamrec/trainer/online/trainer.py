"""`streamrec train-online`: the consumer loop that makes recommendations real-time.

Per consumed batch (bounded by size and time): validate (bad records to the dead-letter topic),
then one pull of the rows the batch needs, learning in small steps locally (prequential scoring
of sampled events before each step), and ONE push carrying the deltas + the Kafka offsets + the
event count; the
feature-store write of the batch runs on a background thread meanwhile; offsets are committed only
after both are done. So after a crash of either process nothing is lost: a restarted trainer
resumes from the group's committed offsets, or from the parameter server's recorded offsets when
those are behind (the server restored an older checkpoint), applying every event at least once.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from redis.exceptions import RedisError

from streamrec.core.config import Settings
from streamrec.stream.deadletter import DeadLetterSink
from streamrec.stream.events import EventBatch, EventSchema, InvalidEvent
from streamrec.stream.kafka import (
    Consumer,
    Record,
    TopicPartition,
    make_consumer,
    producer_from,
)
from streamrec.stream.metrics import EVENTS_ACCEPTED
from streamrec.trainer.online.base import (
    OnlineRecommender,
    learn_together,
    meta_record,
    restore_states,
)
from streamrec.trainer.online.feature_store import FeatureStore
from streamrec.trainer.online.live_eval import LivePrequential
from streamrec.trainer.online.metrics import (
    BATCH_SECONDS,
    CONSUMER_LAG,
    EVENT_TIME,
    EVENTS_APPLIED,
    EVENTS_CONSUMED,
    FEATURE_ERRORS,
    FEATURE_SECONDS,
    LOSS,
    PUSH_SECONDS,
)

log = logging.getLogger("streamrec.trainer")
PARTITION_FETCH_BYTES = 256 * 1024  # ~1,000 events per partition per fetch: a backlog interleaves in time


def offset_key(topic: str, partition: int) -> str:
    return f"{topic}/{partition}"


def recorded_offsets(meta_records: list[dict[str, Any]]) -> dict[str, int]:
    """Offsets the parameter server holds with its state: per partition the minimum over shards
    (each shard stores the meta of the pushes it received; the oldest is the safe resume point)."""
    merged: dict[str, int] = {}
    for record in meta_records:
        for key, offset in ((record.get("meta") or {}).get("offsets") or {}).items():
            merged[key] = min(merged.get(key, offset), offset)
    return merged


@dataclass
class TrainerConfig:
    batch_events: int = 5000
    batch_seconds: float = 0.5
    evaluate_every: int = 10
    max_events: int | None = None  # stop after this many consumed records (benchmarks, tests)
    idle_exit_seconds: float | None = None  # stop when nothing arrived for this long
    report_path: str | None = None  # JSON report rewritten every report_every_seconds and at exit
    report_every_seconds: float = 5.0


@dataclass
class TrainerStats:
    consumed: int = 0
    applied: int = 0
    dead_lettered: int = 0
    batches: int = 0
    batch_seconds: deque[float] = field(default_factory=lambda: deque(maxlen=10_000))  # recent batches
    first_record_at: float | None = None
    last_batch_at: float | None = None
    losses: dict[str, float] = field(default_factory=dict)


class OnlineTrainer:
    def __init__(self, settings: Settings, models: list[OnlineRecommender], config: TrainerConfig | None = None,
                 feature_store: FeatureStore | None = None, consumer: Consumer | None = None) -> None:
        """`models` share one store (the parameter server they were built on); the first ranks
        items for the prequential metrics."""
        if not models:
            raise ValueError("at least one online model is needed")
        self.settings, self.models, self.config = settings, models, config or TrainerConfig()
        self.store = models[0].store
        restore_states(models, self._meta())
        self.schema = EventSchema.from_settings(settings)
        self.features = feature_store
        self.evaluator = LivePrequential(models[0], every=self.config.evaluate_every)
        self.stats = TrainerStats()
        self.stop_requested = threading.Event()
        self._producer = producer_from(settings)
        self.dead_letters = DeadLetterSink(self._producer, settings.dlq_topic, "trainer")
        self._open = True
        self._newly_assigned: list[TopicPartition] = []
        self._positions: dict[TopicPartition, int] = {}
        self._feature_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="features")
        self.consumer = consumer or make_consumer(
            settings.kafka_bootstrap, settings.kafka_client, group_id=settings.consumer_group,
            topics=[settings.topic], session_timeout_ms=settings.session_timeout_ms,
            heartbeat_interval_ms=settings.heartbeat_interval_ms, on_assign=self._on_assign,
            on_revoke=self._on_revoke,
            partition_fetch_bytes=PARTITION_FETCH_BYTES,
        )

    # ---- offsets ------------------------------------------------------------------------------
    def _meta(self) -> dict[str, Any]:
        records = self.store.get_meta()
        return (records[0].get("meta") or {}) | {"offsets": recorded_offsets(records)}

    def _on_assign(self, partitions: list[TopicPartition]) -> None:
        """Runs inside the client's poll, where it must not block: only note the partitions."""
        self._newly_assigned.extend(partitions)

    def _on_revoke(self, partitions: list[TopicPartition]) -> None:
        """Another member owns these now: stop reporting their lag from here."""
        for topic, partition in partitions:
            self._positions.pop((topic, partition), None)
            try:
                CONSUMER_LAG.remove(str(partition))
            except KeyError:
                pass  # never reported a lag for it

    def _apply_rewinds(self, records: list[Record]) -> list[Record]:
        """For newly assigned partitions, resume from the parameter server's recorded offset when
        it is behind the group's committed one (or there is no commit): seek there and drop the
        records this poll fetched from the committed offset."""
        if not self._newly_assigned:
            return records
        partitions, self._newly_assigned = sorted(set(self._newly_assigned)), []
        recorded = recorded_offsets(self.store.get_meta())
        committed = self.consumer.committed(partitions)
        rewound = set()
        for tp in partitions:
            mine = recorded.get(offset_key(*tp))
            if mine is not None and (tp not in committed or mine < committed[tp]):
                log.warning("partition %s: resuming at the parameter server's offset %d (committed: %s)",
                            tp, mine, committed.get(tp))
                self.consumer.seek(tp, mine)
                rewound.add(tp)
        return [r for r in records if (r.topic, r.partition) not in rewound]

    # ---- the loop -----------------------------------------------------------------------------
    def run(self) -> TrainerStats:
        """Consume until stopped (SIGTERM/SIGINT via `stop_requested`, max_events, or idle)."""
        cfg = self.config
        idle_since = last_report = time.monotonic()
        try:
            while not self.stop_requested.is_set():
                records = self._collect()
                if records:
                    idle_since = time.monotonic()
                    self.process(records)
                    if cfg.max_events is not None and self.stats.consumed >= cfg.max_events:
                        break
                elif cfg.idle_exit_seconds is not None and time.monotonic() - idle_since > cfg.idle_exit_seconds:
                    break
                if cfg.report_path and time.monotonic() - last_report >= cfg.report_every_seconds:
                    self.write_report()
                    last_report = time.monotonic()
        finally:
            self.close()
            if cfg.report_path:
                self.write_report()
        return self.stats

    def write_report(self) -> None:
        """Atomically replace the report file (readers never see half a JSON document)."""
        path = Path(self.config.report_path)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_bytes(orjson.dumps(self.report(), option=orjson.OPT_SERIALIZE_NUMPY))
        tmp.replace(path)

    def _collect(self) -> list[Record]:
        """One batch: up to batch_events records or batch_seconds after the first one."""
        cfg = self.config
        records: list[Record] = []
        deadline = None
        while len(records) < cfg.batch_events and not self.stop_requested.is_set():
            timeout = cfg.batch_seconds if deadline is None else max(0.0, deadline - time.monotonic())
            polled = self._apply_rewinds(self.consumer.poll(max_records=cfg.batch_events - len(records), timeout_s=timeout))
            if polled:
                records.extend(polled)
                deadline = deadline or time.monotonic() + cfg.batch_seconds
                if self.stats.first_record_at is None:
                    self.stats.first_record_at = time.monotonic()
            if deadline is None or time.monotonic() >= deadline:
                break
        return records

    def _decode(self, records: list[Record]) -> list[dict[str, Any]]:
        events = []
        for record in records:
            try:
                events.append(self.schema.decode(record.value))
            except InvalidEvent as exc:
                self.dead_letters.send(record.value, exc.reason,
                                       {"topic": record.topic, "partition": record.partition, "offset": record.offset},
                                       exc.detail, key=record.key)
        return events

    def process(self, records: list[Record]) -> None:
        """Learn one batch, write its features, then commit its offsets."""
        started = time.perf_counter()
        events = self._decode(records)
        offsets = {(r.topic, r.partition): r.offset + 1 for r in records}  # the last record's wins
        recorded = {offset_key(*tp): o for tp, o in {**self._positions, **offsets}.items()}
        pending: Future | None = None
        batch = EventBatch.from_events(events)
        # Learn in event-time order (stable: one user's events keep their partition order).
        batch = batch.take(np.argsort(batch.timestamp, kind="stable"))
        if len(batch):
            if self.features:
                weights = self.models[0].roles.positive_weight(batch.event_type, batch.value)
                pending = self._feature_pool.submit(self._write_features, batch, np.where(weights > 0, weights, 1.0))
            self._learn(batch, recorded)
        else:  # nothing valid: still record the offsets with the state
            self.store.push({}, meta=meta_record(self.models, recorded))
        if self.dead_letters.count:
            self._producer.flush()
        if pending is not None:
            pending.result()
        self.consumer.commit(offsets)
        self._positions.update(offsets)
        self._account(records, batch, time.perf_counter() - started)

    def _learn(self, batch: EventBatch, offsets: dict[str, int]) -> None:
        t0 = time.perf_counter()
        stats = learn_together(self.models, batch, offsets,
                               before_step=lambda step: self.evaluator.before_step(batch, step))
        PUSH_SECONDS.observe(time.perf_counter() - t0)
        self.evaluator.end_batch(batch)
        for name, s in stats.items():
            if np.isfinite(s.loss):
                self.stats.losses[name] = s.loss
                LOSS.labels(name).set(s.loss)
            if s.squared_error:
                self.evaluator.record_ratings(s.squared_error, s.examples)
        self.evaluator.publish()

    def _write_features(self, batch: EventBatch, weights: np.ndarray, attempts: int = 5) -> None:
        """Write with retries (backoff 0.2 s .. 3.2 s); after that the batch's features are skipped
        and counted, so a Redis outage slows learning down but never stops it."""
        t0 = time.perf_counter()
        for attempt in range(attempts):
            try:
                self.features.write(batch, weights)
                FEATURE_SECONDS.observe(time.perf_counter() - t0)
                return
            except RedisError as exc:
                log.warning("feature store write failed (attempt %d/%d): %s", attempt + 1, attempts, exc)
                if attempt + 1 < attempts and not self.stop_requested.wait(0.2 * 2**attempt):
                    continue
                break
        FEATURE_ERRORS.inc()

    def _account(self, records: list[Record], batch: EventBatch, seconds: float) -> None:
        s = self.stats
        s.consumed += len(records)
        s.applied += len(batch)
        s.dead_lettered = self.dead_letters.count
        s.batches += 1
        s.batch_seconds.append(seconds)
        s.last_batch_at = time.monotonic()
        EVENTS_CONSUMED.inc(len(records))
        EVENTS_APPLIED.inc(len(batch))
        EVENTS_ACCEPTED.labels("trainer").inc(len(batch))
        BATCH_SECONDS.observe(seconds)
        if len(batch):
            EVENT_TIME.set(batch.timestamp[-1])  # sorted by event time
        for (_, partition), lag in self._partition_lags().items():
            CONSUMER_LAG.labels(str(partition)).set(lag)

    def _partition_lags(self) -> dict[TopicPartition, int]:
        """End offset (latest fetch high-water mark) minus next offset, per partition owned."""
        lags = {}
        for tp, position in self._positions.items():
            high = self.consumer.high_watermark(tp)
            if high is not None:
                lags[tp] = max(0, high - position)
        return lags

    def lag(self) -> int:
        return sum(self._partition_lags().values())

    def report(self) -> dict[str, Any]:
        s = self.stats
        elapsed = (s.last_batch_at - s.first_record_at) if s.first_record_at and s.last_batch_at else 0.0
        batch = np.array(s.batch_seconds) if s.batch_seconds else np.zeros(1)
        return {
            "consumed": s.consumed, "applied": s.applied, "dead_lettered": s.dead_lettered, "batches": s.batches,
            "events_per_second": s.consumed / elapsed if elapsed > 0 else None,
            "p50_batch_seconds": float(np.percentile(batch, 50)), "p99_batch_seconds": float(np.percentile(batch, 99)),
            "lag": self.lag() if self._open else None, "loss": s.losses, "prequential": self.evaluator.report(),
            "models": [m.name for m in self.models], "finished_at": time.time(),
        }

    def close(self) -> None:
        self._open = False
        self._feature_pool.shutdown(wait=True)
        try:
            self._producer.close()
        finally:
            self.consumer.close()
