"""kafka-python backend: the default, pure Python."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any

import kafka
from kafka import errors as kafka_errors
from kafka.structs import OffsetAndMetadata
from kafka.structs import TopicPartition as KTP

from streamrec.stream.kafka.base import (
    Consumer,
    ConsumerConfig,
    KafkaError,
    Offsets,
    Producer,
    RebalanceCallback,
    Record,
    TopicPartition,
)


class KafkaPythonProducer(Producer):
    def __init__(self, bootstrap: str, acks: str, linger_ms: int, batch_bytes: int, **extra: Any) -> None:
        self._producer = kafka.KafkaProducer(
            bootstrap_servers=bootstrap.split(","),
            acks=int(acks) if acks.isdigit() else acks,
            enable_idempotence=acks == "all",
            linger_ms=linger_ms,
            batch_size=batch_bytes,
            allow_auto_create_topics=False,  # topics are created with their partitions (stream.topics)
            **extra,
        )
        self._failures: list[BaseException] = []

    def _on_error(self, exc: BaseException) -> None:
        self._failures.append(exc)

    def send(self, topic: str, value: bytes, key: bytes | None = None, timestamp_ms: int | None = None,
             headers: Sequence[tuple[str, bytes]] | None = None, partition: int | None = None) -> None:
        future = self._producer.send(
            topic, value=value, key=key, timestamp_ms=timestamp_ms,
            headers=list(headers) if headers else None, partition=partition,
        )
        future.add_errback(self._on_error)

    def flush(self, timeout_s: float = 60.0) -> None:
        try:
            self._producer.flush(timeout=timeout_s)
        except kafka_errors.KafkaError as exc:
            raise KafkaError(f"flush failed: {exc}") from exc
        if self._failures:
            failures, self._failures = self._failures, []
            raise KafkaError(f"{len(failures)} records not delivered; first: {failures[0]!r}")

    def close(self) -> None:
        try:
            self.flush()
        finally:
            self._producer.close()


class _Listener(kafka.ConsumerRebalanceListener):
    def __init__(self, on_assign: RebalanceCallback | None, on_revoke: RebalanceCallback | None) -> None:
        self._on_assign, self._on_revoke = on_assign, on_revoke

    def on_partitions_assigned(self, assigned: Collection[KTP]) -> None:
        if self._on_assign:
            self._on_assign(sorted((tp.topic, tp.partition) for tp in assigned))

    def on_partitions_revoked(self, revoked: Collection[KTP]) -> None:
        if self._on_revoke:
            self._on_revoke(sorted((tp.topic, tp.partition) for tp in revoked))


class KafkaPythonConsumer(Consumer):
    def __init__(self, config: ConsumerConfig, **extra: Any) -> None:
        c = config
        self._consumer = kafka.KafkaConsumer(
            bootstrap_servers=c.bootstrap.split(","),
            group_id=c.group_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            session_timeout_ms=c.session_timeout_ms,
            heartbeat_interval_ms=c.heartbeat_interval_ms,
            max_poll_interval_ms=max(300_000, c.session_timeout_ms),
            fetch_max_bytes=64 * 1024 * 1024,
            max_partition_fetch_bytes=c.partition_fetch_bytes,
            fetch_max_wait_ms=c.fetch_wait_ms,
            allow_auto_create_topics=False,
            **extra,
        )
        if c.topics:
            self._consumer.subscribe(list(c.topics), listener=_Listener(c.on_assign, c.on_revoke))

    def assign(self, partitions: Sequence[TopicPartition]) -> None:
        self._consumer.assign([KTP(t, p) for t, p in partitions])

    def poll(self, max_records: int = 500, timeout_s: float = 1.0) -> list[Record]:
        batches = self._consumer.poll(timeout_ms=int(timeout_s * 1000), max_records=max_records)
        return [
            Record(r.topic, r.partition, r.offset, r.timestamp, r.key, r.value, r.headers)
            for records in batches.values()
            for r in records
        ]

    def commit(self, offsets: Offsets) -> None:
        if not offsets:
            return
        try:
            self._consumer.commit(
                {KTP(t, p): OffsetAndMetadata(o, "", -1) for (t, p), o in offsets.items()}
            )
        except kafka_errors.KafkaError as exc:
            raise KafkaError(f"commit failed: {exc}") from exc

    def committed(self, partitions: Sequence[TopicPartition]) -> Offsets:
        result: Offsets = {}
        for topic, partition in partitions:
            offset = self._consumer.committed(KTP(topic, partition))
            if offset is not None:
                result[(topic, partition)] = offset
        return result

    def assignment(self) -> list[TopicPartition]:
        return sorted((tp.topic, tp.partition) for tp in self._consumer.assignment())

    def seek(self, partition: TopicPartition, offset: int) -> None:
        self._consumer.seek(KTP(*partition), offset)

    def high_watermark(self, partition: TopicPartition) -> int | None:
        """End offset as seen in the last fetch response (right even where ListOffsets is not)."""
        return self._consumer.highwater(KTP(*partition))

    def beginning_offsets(self, partitions: Sequence[TopicPartition]) -> Offsets:
        found = self._consumer.beginning_offsets([KTP(*tp) for tp in partitions])
        return {(tp.topic, tp.partition): int(offset) for tp, offset in found.items()}

    def pause(self, partitions: Sequence[TopicPartition]) -> None:
        self._consumer.pause(*[KTP(*tp) for tp in partitions])

    def resume(self, partitions: Sequence[TopicPartition]) -> None:
        self._consumer.resume(*[KTP(*tp) for tp in partitions])

    def close(self) -> None:
        self._consumer.close(autocommit=False)
