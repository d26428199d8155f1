"""Kafka clients behind one interface; `STREAMREC_KAFKA_CLIENT` picks the backend."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from stream.kafka.base import Consumer, KafkaError, Offsets, Producer, RebalanceCallback, Record, TopicPartition

__all__ = [
    "Consumer", "KafkaError", "Offsets", "Producer", "Record", "TopicPartition",
    "make_consumer", "make_producer",
]


def make_producer(
    bootstrap: str, client: str = "kafka-python", acks: str = "all", linger_ms: int = 5,
    batch_bytes: int = 256 * 1024, **extra: Any,
) -> Producer:
    """A producer of the chosen backend; acks="all" turns on idempotent, replicated delivery."""
    if client == "confluent":
        from stream.kafka.confluent_client import ConfluentProducer

        return ConfluentProducer(bootstrap, acks, linger_ms, batch_bytes, **extra)
    if client == "kafka-python":
        from stream.kafka.kafka_python_client import KafkaPythonProducer

        return KafkaPythonProducer(bootstrap, acks, linger_ms, batch_bytes, **extra)
    raise ValueError(f"unknown Kafka client {client!r}; expected kafka-python or confluent")


def producer_from(settings: Any, **extra: Any) -> Producer:
    """The configured producer (backend, acks, linger) for `settings`."""
    return make_producer(
        settings.kafka_bootstrap, settings.kafka_client, settings.producer_acks,
        settings.producer_linger_ms, **extra,
    )


def make_consumer(
    bootstrap: str,
    client: str = "kafka-python",
    group_id: str | None = None,
    topics: Sequence[str] = (),
    session_timeout_ms: int = 6000,
    heartbeat_interval_ms: int = 1000,
    on_assign: RebalanceCallback | None = None,
    on_revoke: RebalanceCallback | None = None,
    partition_fetch_bytes: int = 8 * 1024 * 1024,
    **extra: Any,
) -> Consumer:
    """A consumer of the chosen backend; with `topics` it joins `group_id` and is assigned
    partitions by the group, without it call `.assign(...)` to read partitions directly.
    A small `partition_fetch_bytes` makes each poll mix all assigned partitions (a backlog is then
    read roughly in time order instead of one partition after another)."""
    if client == "confluent":
        from stream.kafka.confluent_client import ConfluentConsumer as cls
    elif client == "kafka-python":
        from stream.kafka.kafka_python_client import KafkaPythonConsumer as cls  # type: ignore[assignment]
    else:
        raise ValueError(f"unknown Kafka client {client!r}; expected kafka-python or confluent")
    return cls(bootstrap, group_id, topics, session_timeout_ms, heartbeat_interval_ms,
               on_assign, on_revoke, partition_fetch_bytes, **extra)
