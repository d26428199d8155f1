"""confluent-kafka (librdkafka) backend: the `fast` extra, several times kafka-python's throughput."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

from streamrec.stream.kafka.base import (
    Consumer,
    ConsumerConfig,
    KafkaError,
    Offsets,
    Producer,
    Record,
    TopicPartition,
)

try:
    import confluent_kafka as ck
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "STREAMREC_KAFKA_CLIENT=confluent needs confluent-kafka: pip install 'streamrec[fast]'"
    ) from exc


log = logging.getLogger(__name__)
MISSING_TOPIC_WARN_S = 60.0  # a missing subscribed topic is reported at most this often
METADATA_REFRESH_MS = 5000


class ConfluentProducer(Producer):
    def __init__(self, bootstrap: str, acks: str, linger_ms: int, batch_bytes: int, **extra: Any) -> None:
        self._producer = ck.Producer(
            {
                "bootstrap.servers": bootstrap,
                "acks": acks,
                "enable.idempotence": acks == "all",
                "linger.ms": linger_ms,
                "batch.size": batch_bytes,
                "queue.buffering.max.messages": 1_000_000,
                "allow.auto.create.topics": False,  # topics are created with their partitions (stream.topics)
                **extra,
            }
        )
        self._failures: list[str] = []

    def _on_delivery(self, err: ck.KafkaError | None, msg: ck.Message) -> None:
        if err is not None:
            self._failures.append(str(err))

    def send(self, topic: str, value: bytes, key: bytes | None = None, timestamp_ms: int | None = None,
             headers: Sequence[tuple[str, bytes]] | None = None, partition: int | None = None) -> None:
        kwargs: dict[str, Any] = {"on_delivery": self._on_delivery}
        if timestamp_ms is not None:
            kwargs["timestamp"] = timestamp_ms
        if headers:
            kwargs["headers"] = list(headers)
        if partition is not None:
            kwargs["partition"] = partition
        while True:
            try:
                self._producer.produce(topic, value, key, **kwargs)
                return
            except BufferError:  # local queue full: serve delivery reports, then retry
                self._producer.poll(0.05)

    def flush(self, timeout_s: float = 60.0) -> None:
        remaining = self._producer.flush(timeout_s)
        if remaining:
            raise KafkaError(f"{remaining} records still queued after {timeout_s}s")
        if self._failures:
            failures, self._failures = self._failures, []
            raise KafkaError(f"{len(failures)} records not delivered; first: {failures[0]}")

    def close(self) -> None:
        self.flush()


class ConfluentConsumer(Consumer):
    def __init__(self, config: ConsumerConfig, **extra: Any) -> None:
        c = config
        self._consumer = ck.Consumer(
            {
                "bootstrap.servers": c.bootstrap,
                # librdkafka needs a group id even for assign(); it is never committed to then.
                "group.id": c.group_id or "streamrec-standalone",
                "enable.auto.commit": False,
                "enable.auto.offset.store": False,
                "auto.offset.reset": "earliest",
                "session.timeout.ms": c.session_timeout_ms,
                "heartbeat.interval.ms": c.heartbeat_interval_ms,
                "enable.partition.eof": False,
                "max.partition.fetch.bytes": c.partition_fetch_bytes,
                "fetch.wait.max.ms": c.fetch_wait_ms,
                "allow.auto.create.topics": False,  # librdkafka's consumer default, stated
                # a subscribed topic created later (or given partitions) is seen within seconds, not
                # at librdkafka's default 5 min refresh (kafka-python: metadata_max_age_ms, 5 min too,
                # but it refreshes at once while a subscribed topic is missing)
                "topic.metadata.refresh.interval.ms": METADATA_REFRESH_MS,
                **extra,
            }
        )
        self._on_assign, self._on_revoke = c.on_assign, c.on_revoke
        self._missing_warned_at = -MISSING_TOPIC_WARN_S
        if c.topics:
            self._consumer.subscribe(list(c.topics), on_assign=self._assigned, on_revoke=self._revoked)

    def _assigned(self, consumer: ck.Consumer, partitions: list[ck.TopicPartition]) -> None:
        if self._on_assign:
            self._on_assign(sorted((p.topic, p.partition) for p in partitions))

    def _revoked(self, consumer: ck.Consumer, partitions: list[ck.TopicPartition]) -> None:
        if self._on_revoke:
            self._on_revoke(sorted((p.topic, p.partition) for p in partitions))

    def assign(self, partitions: Sequence[TopicPartition]) -> None:
        self._consumer.assign([ck.TopicPartition(t, p, ck.OFFSET_BEGINNING) for t, p in partitions])

    def poll(self, max_records: int = 500, timeout_s: float = 1.0) -> list[Record]:
        messages = self._consumer.consume(max_records, timeout_s)
        records = []
        for m in messages:
            err = m.error()
            if err is not None:
                if err.retriable() or err.code() == ck.KafkaError._PARTITION_EOF:
                    continue  # transient broker state; librdkafka retries by itself
                if err.code() == ck.KafkaError.UNKNOWN_TOPIC_OR_PART:
                    # a subscribed topic that does not exist (yet): clients never create topics
                    # (streamrec.stream.topics), so it is waited for, as kafka-python waits
                    if time.monotonic() >= self._missing_warned_at + MISSING_TOPIC_WARN_S:
                        self._missing_warned_at = time.monotonic()
                        log.warning("consume: %s; waiting for it to be created", err.str())
                    continue
                raise KafkaError(f"consume failed: {err}")
            records.append(
                Record(m.topic(), m.partition(), m.offset(), m.timestamp()[1], m.key(), m.value(),
                       m.headers() or ())
            )
        return records

    def commit(self, offsets: Offsets) -> None:
        if not offsets:
            return
        try:
            self._consumer.commit(
                offsets=[ck.TopicPartition(t, p, o) for (t, p), o in offsets.items()],
                asynchronous=False,
            )
        except ck.KafkaException as exc:
            raise KafkaError(f"commit failed: {exc}") from exc

    def committed(self, partitions: Sequence[TopicPartition]) -> Offsets:
        result = self._consumer.committed([ck.TopicPartition(t, p) for t, p in partitions], timeout=10)
        return {(tp.topic, tp.partition): tp.offset for tp in result if tp.offset >= 0}

    def assignment(self) -> list[TopicPartition]:
        return sorted((tp.topic, tp.partition) for tp in self._consumer.assignment())

    def seek(self, partition: TopicPartition, offset: int) -> None:
        self._consumer.seek(ck.TopicPartition(partition[0], partition[1], offset))

    def high_watermark(self, partition: TopicPartition) -> int | None:
        """End offset from the last fetch response (cached), right even where ListOffsets is not."""
        _, high = self._consumer.get_watermark_offsets(ck.TopicPartition(*partition), cached=True)
        return None if high < 0 else high

    def beginning_offsets(self, partitions: Sequence[TopicPartition]) -> Offsets:
        try:
            return {tp: int(self._consumer.get_watermark_offsets(ck.TopicPartition(*tp), timeout=10)[0])
                    for tp in partitions}
        except ck.KafkaException as exc:
            raise KafkaError(f"listing the earliest offsets failed: {exc}") from exc

    def pause(self, partitions: Sequence[TopicPartition]) -> None:
        self._consumer.pause([ck.TopicPartition(*tp) for tp in partitions])

    def resume(self, partitions: Sequence[TopicPartition]) -> None:
        self._consumer.resume([ck.TopicPartition(*tp) for tp in partitions])

    def close(self) -> None:
        self._consumer.close()
