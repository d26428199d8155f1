"""`streamrec bench stream`: produce and consume (decode + validate) through the real broker.

Besides the speeds it reports how many events were produced, consumed, decoded and distinct
(by event id), so a run also shows that every event made the round trip exactly once.

The bound each speed is compared against is measured in the same run: the raw client library
(kafka-python or confluent-kafka, none of our code) producing and consuming the same encoded
bytes. Machines here are noisy, so the ratio to that bound is the figure that holds.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import numpy as np

from streamrec.core.config import Settings
from streamrec.stream.events import EventBatch, EventSchema, InvalidEvent, encode
from streamrec.stream.kafka import make_consumer, make_producer
from streamrec.stream.publish import EventPublisher
from streamrec.stream.topics import create_topics, delete_topics


def synthetic_events(n: int, users: int = 10_000, items: int = 5_000, seed: int = 0) -> list[dict[str, Any]]:
    """Plausible interaction dicts (Zipf-ish items, recent timestamps) for benchmarks."""
    rng = np.random.default_rng(seed)
    user = rng.integers(0, users, n)
    item = np.minimum(rng.zipf(1.3, n), items) - 1
    kinds = np.array(["view", "click", "like", "purchase", "watch"])[rng.integers(0, 5, n)]
    start = time.time() - 3600.0
    ts = start + np.sort(rng.uniform(0, 3500.0, n))
    return [
        {"event_id": f"b{i}", "user_id": f"u{u}", "item_id": f"i{it}", "event_type": k, "timestamp": t, "value": 1.0}
        for i, (u, it, k, t) in enumerate(zip(user.tolist(), item.tolist(), kinds.tolist(), ts.tolist()))
    ]


RawRecord = tuple[bytes, bytes, int]  # key, value, timestamp (ms): what our publisher sends per event
RAW_POLL_RECORDS = 5000
RAW_PARTITION_FETCH_BYTES = 8 * 1024 * 1024  # our consumers' default (ConsumerConfig), so fetch sizes match


def raw_records(events: list[dict[str, Any]], schema: EventSchema) -> list[RawRecord]:
    """The exact bytes our publisher sends for `events` (validated, encoded, keyed by user)."""
    valid = [schema.validate(event) for event in events]
    return [(e["user_id"].encode(), encode(e), int(e["timestamp"] * 1000)) for e in valid]


def raw_produce(settings: Settings, client: str, topic: str, records: list[RawRecord]) -> float:
    """Seconds for the bare client library to produce and flush `records`, with the producer
    settings ours uses (acks, idempotence, linger, batch size); metadata is fetched first."""
    acks, linger = settings.producer_acks, settings.producer_linger_ms
    if client == "confluent":
        import confluent_kafka as ck

        producer = ck.Producer({"bootstrap.servers": settings.kafka_bootstrap, "acks": acks,
                                "enable.idempotence": acks == "all", "linger.ms": linger,
                                "batch.size": 256 * 1024, "queue.buffering.max.messages": 1_000_000})
        producer.list_topics(topic, timeout=10)  # metadata before the clock starts
        start = time.perf_counter()
        for key, value, ts in records:
            while True:
                try:
                    producer.produce(topic, value, key, timestamp=ts)
                    break
                except BufferError:  # local queue full: serve delivery reports, then retry
                    producer.poll(0.05)
        left = producer.flush(120)
        seconds = time.perf_counter() - start
        if left:
            raise RuntimeError(f"raw confluent producer: {left} records still queued")
        return seconds
    import kafka

    producer = kafka.KafkaProducer(bootstrap_servers=settings.kafka_bootstrap.split(","),
                                   acks=int(acks) if acks.isdigit() else acks, enable_idempotence=acks == "all",
                                   linger_ms=linger, batch_size=256 * 1024)
    try:
        producer.partitions_for(topic)  # metadata before the clock starts
        start = time.perf_counter()
        for key, value, ts in records:
            producer.send(topic, value=value, key=key, timestamp_ms=ts)
        producer.flush(timeout=120)
        return time.perf_counter() - start
    finally:
        producer.close()


def raw_consume(settings: Settings, client: str, topic: str, partitions: int, events: int) -> float:
    """Seconds the bare client library (assigned, no group, values left as bytes) takes to read
    `events` records from the start of `topic`: from the start of the poll that returned the first
    records (so the first fetch counts: with large fetches it can hold most of a small topic) to
    the last record. Connection and metadata are set up before the clock starts."""
    deadline = time.monotonic() + 120 + events / 1000
    received, first = 0, None
    if client == "confluent":
        import confluent_kafka as ck

        consumer = ck.Consumer({"bootstrap.servers": settings.kafka_bootstrap, "group.id": f"raw-{topic}",
                                "enable.auto.commit": False, "enable.partition.eof": False,
                                "max.partition.fetch.bytes": RAW_PARTITION_FETCH_BYTES})
        try:
            for p in range(partitions):  # connects to each partition's leader
                consumer.get_watermark_offsets(ck.TopicPartition(topic, p), timeout=10)
            consumer.assign([ck.TopicPartition(topic, p, ck.OFFSET_BEGINNING) for p in range(partitions)])
            while received < events and time.monotonic() < deadline:
                polled_at = time.perf_counter()
                messages = consumer.consume(RAW_POLL_RECORDS, 0.5)
                if messages:
                    first = first or polled_at
                    received += sum(m.error() is None for m in messages)
            last = time.perf_counter()
        finally:
            consumer.close()
    else:
        import kafka

        consumer = kafka.KafkaConsumer(bootstrap_servers=settings.kafka_bootstrap.split(","),
                                       enable_auto_commit=False, auto_offset_reset="earliest",
                                       fetch_max_bytes=64 * 1024 * 1024,
                                       max_partition_fetch_bytes=RAW_PARTITION_FETCH_BYTES)
        try:
            assigned = [kafka.TopicPartition(topic, p) for p in range(partitions)]
            consumer.assign(assigned)
            consumer.beginning_offsets(assigned)  # connects to each partition's leader
            while received < events and time.monotonic() < deadline:
                polled_at = time.perf_counter()
                batches = consumer.poll(timeout_ms=500, max_records=RAW_POLL_RECORDS)
                if batches:
                    first = first or polled_at
                    received += sum(map(len, batches.values()))
            last = time.perf_counter()
        finally:
            consumer.close()
    if received < events or first is None:
        raise RuntimeError(f"raw {client} consumer read only {received} of {events} records before the deadline")
    return last - first


def raw_bound(settings: Settings, client: str, records: list[RawRecord], source_topic: str,
              partitions: int) -> dict[str, float]:
    """The raw client's speeds on the same bytes: consuming `source_topic` (already holding
    `records`) and producing `records` into a scratch topic of as many partitions."""
    consume_seconds = raw_consume(settings, client, source_topic, partitions, len(records))
    scratch = f"streamrec.bench.raw.{uuid.uuid4().hex[:8]}"
    create_topics(settings.kafka_bootstrap, [scratch], partitions)
    try:
        produce_seconds = raw_produce(settings, client, scratch, records)
    finally:
        delete_topics(settings.kafka_bootstrap, [scratch])
    return {"raw_produce_events_per_second": round(len(records) / produce_seconds),
            "raw_consume_events_per_second": round(len(records) / consume_seconds)}


def _produce(settings: Settings, client: str, topic: str, events: int,
             ) -> tuple[float, EventPublisher, list[dict[str, Any]], EventSchema]:
    """(seconds, the publisher, the events, the schema): `events` synthetic events published to
    `topic` through the publisher, flushed."""
    data = synthetic_events(events)
    schema = EventSchema.from_settings(settings)
    producer = make_producer(settings.kafka_bootstrap, client, settings.producer_acks, settings.producer_linger_ms)
    publisher = EventPublisher(producer, schema, topic, topic + settings.dlq_suffix, "bench")
    try:
        start = time.perf_counter()
        source = {"bench": topic}
        for event in data:
            publisher.publish(event, source)
        publisher.flush()
        return time.perf_counter() - start, publisher, data, schema
    finally:
        publisher.close()


def _consume(settings: Settings, client: str, topic: str, events: int, schema: EventSchema,
             ) -> tuple[float, int, int, list[np.ndarray]]:
    """(seconds from the first fetch, records received, records the schema refused, the event ids
    of each batch): `topic` read in a fresh group until `events` arrived or the deadline."""
    consumer = make_consumer(
        settings.kafka_bootstrap, client, group_id=f"bench-{topic}", topics=[topic],
        session_timeout_ms=settings.session_timeout_ms, heartbeat_interval_ms=settings.heartbeat_interval_ms,
        fetch_wait_ms=settings.fetch_wait_ms,
    )
    received, rejected, first = 0, 0, None
    event_ids: list[np.ndarray] = []  # per batch, for the exactly-once count after the timed loop
    deadline = time.monotonic() + 120 + events / 1000
    try:
        while received < events and time.monotonic() < deadline:
            polled_at = time.perf_counter()
            records = consumer.poll(max_records=5000, timeout_s=0.5)
            if not records:
                continue
            first = first or polled_at  # the first fetch counts (the raw bound is timed alike)
            valid = []
            for record in records:
                try:
                    valid.append(schema.decode(record.value))
                except InvalidEvent:
                    rejected += 1
            event_ids.append(EventBatch.from_events(valid).event_id)
            received += len(records)
        return time.perf_counter() - (first or time.perf_counter()), received, rejected, event_ids
    finally:
        consumer.close()


def bench_stream(settings: Settings, events: int, client: str, partitions: int = 3) -> dict[str, Any]:
    """Produce `events` through the publisher, consume and validate them, and measure the raw
    client on the same bytes. The run's topics are deleted however it ends: created outside the
    `finally`, a failure before the consumer (an unknown client, the broker refusing, Ctrl-C while
    producing) left them on the broker."""
    if events < 1 or partitions < 1:
        raise ValueError(f"events and partitions: at least 1 each, not {events} and {partitions}")
    topic = f"streamrec.bench.{uuid.uuid4().hex[:8]}"
    create_topics(settings.kafka_bootstrap, [topic, topic + settings.dlq_suffix], partitions)
    try:
        produce_seconds, publisher, data, schema = _produce(settings, client, topic, events)
        consume_seconds, received, rejected, event_ids = _consume(settings, client, topic, events, schema)
        if received < events:
            raise RuntimeError(f"consumed only {received} of {events} events before the deadline")
        raw = raw_bound(settings, client, raw_records(data, schema), topic, partitions)
    finally:
        delete_topics(settings.kafka_bootstrap, [topic, topic + settings.dlq_suffix])
    produce_rate, consume_rate = events / produce_seconds, events / consume_seconds
    return {
        "client": client,
        "events": events,
        "produced": publisher.accepted,
        "consumed": received,
        "decoded": sum(map(len, event_ids)),
        "distinct": len(np.unique(np.concatenate(event_ids))) if event_ids else 0,
        "partitions": partitions,
        "produce_events_per_second": round(events / produce_seconds),
        "consume_events_per_second": round(events / consume_seconds),
        "produce_seconds": round(produce_seconds, 3),
        "consume_seconds": round(consume_seconds, 3),
        "rejected": rejected + publisher.dead_lettered,
        "acks": settings.producer_acks,
        **raw,
        "produce_vs_raw": round(produce_rate / raw["raw_produce_events_per_second"], 3),
        "consume_vs_raw": round(consume_rate / raw["raw_consume_events_per_second"], 3),
    }
