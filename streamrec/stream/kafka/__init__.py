"""Kafka clients behind one interface; `STREAMREC_KAFKA_CLIENT` picks the backend."""

from __future__ import annotations

from typing import Any

from streamrec.core.config import Settings
from streamrec.stream.kafka.base import (
    Consumer,
    ConsumerConfig,
    KafkaError,
    Offsets,
    Producer,
    Record,
    TopicPartition,
)

__all__ = [
    "Consumer", "ConsumerConfig", "KafkaError", "Offsets", "Producer", "Record", "TopicPartition",
    "BROKER_ERRORS", "make_consumer", "make_producer",
]


def _broker_errors() -> tuple[type[Exception], ...]:
    """What a backend raises outside `flush` (construction, `send`, `poll`) when the broker is
    unreachable: kafka-python's own errors (bootstrap or metadata timeouts), confluent-kafka's
    KafkaException, and this package's KafkaError."""
    import kafka.errors

    errors: list[type[Exception]] = [KafkaError, kafka.errors.KafkaError]
    try:
        import confluent_kafka
    except ImportError:
        return tuple(errors)
    return (*errors, confluent_kafka.KafkaException)


BROKER_ERRORS = _broker_errors()


def make_producer(
    bootstrap: str, client: str = "kafka-python", acks: str = "all", linger_ms: int = 5,
    batch_bytes: int = 256 * 1024, **extra: Any,
) -> Producer:
    """A producer of the chosen backend; acks="all" turns on idempotent, replicated delivery."""
    if client == "confluent":
        from streamrec.stream.kafka.confluent_client import ConfluentProducer

        return ConfluentProducer(bootstrap, acks, linger_ms, batch_bytes, **extra)
    if client == "kafka-python":
        from streamrec.stream.kafka.kafka_python_client import KafkaPythonProducer

        return KafkaPythonProducer(bootstrap, acks, linger_ms, batch_bytes, **extra)
    raise ValueError(f"unknown Kafka client {client!r}; expected kafka-python or confluent")


def producer_from(settings: Settings, **extra: Any) -> Producer:
    """The configured producer (backend, acks, linger) for `settings`."""
    return make_producer(
        settings.kafka_bootstrap, settings.kafka_client, settings.producer_acks,
        settings.producer_linger_ms, **extra,
    )


def make_consumer(bootstrap: str, client: str = "kafka-python", **options: Any) -> Consumer:
    """A consumer of the chosen backend; `options` are `ConsumerConfig` fields (plus, rarely,
    backend-specific settings passed through)."""
    fields = set(ConsumerConfig.__dataclass_fields__)
    config = ConsumerConfig(bootstrap, **{k: v for k, v in options.items() if k in fields})
    extra = {k: v for k, v in options.items() if k not in fields}
    if client == "confluent":
        from streamrec.stream.kafka.confluent_client import ConfluentConsumer

        return ConfluentConsumer(config, **extra)
    if client == "kafka-python":
        from streamrec.stream.kafka.kafka_python_client import KafkaPythonConsumer

        return KafkaPythonConsumer(config, **extra)
    raise ValueError(f"unknown Kafka client {client!r}; expected kafka-python or confluent")
