"""`streamrec bench stream`: produce and consume (decode + validate) through the real broker.

Besides the speeds it reports how many events were produced, consumed, decoded and distinct
(by event id), so a run also shows that every event made the round trip exactly once."""

from __future__ import annotations

import time
import uuid
from typing import Any

import numpy as np

from streamrec.core.config import Settings
from streamrec.stream.events import EventBatch, EventSchema, InvalidEvent
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


def bench_stream(settings: Settings, events: int, client: str, partitions: int = 3) -> dict[str, Any]:
    topic = f"streamrec.bench.{uuid.uuid4().hex[:8]}"
    create_topics(settings.kafka_bootstrap, [topic, topic + settings.dlq_suffix], partitions)
    data = synthetic_events(events)
    schema = EventSchema.from_settings(settings)
    producer = make_producer(settings.kafka_bootstrap, client, settings.producer_acks, settings.producer_linger_ms)
    publisher = EventPublisher(producer, schema, topic, topic + settings.dlq_suffix, "bench")
    start = time.perf_counter()
    source = {"bench": topic}
    for event in data:
        publisher.publish(event, source)
    publisher.flush()
    produce_seconds = time.perf_counter() - start
    publisher.close()

    consumer = make_consumer(
        settings.kafka_bootstrap, client, group_id=f"bench-{topic}", topics=[topic],
        session_timeout_ms=settings.session_timeout_ms, heartbeat_interval_ms=settings.heartbeat_interval_ms,
    )
    received, rejected, first = 0, 0, None
    event_ids: list[np.ndarray] = []  # per batch, for the exactly-once count after the timed loop
    deadline = time.monotonic() + 120 + events / 1000
    try:
        while received < events and time.monotonic() < deadline:
            records = consumer.poll(max_records=5000, timeout_s=0.5)
            if not records:
                continue
            first = first or time.perf_counter()
            valid = []
            for record in records:
                try:
                    valid.append(schema.decode(record.value))
                except InvalidEvent:
                    rejected += 1
            event_ids.append(EventBatch.from_events(valid).event_id)
            received += len(records)
        consume_seconds = time.perf_counter() - (first or time.perf_counter())
    finally:
        consumer.close()
        delete_topics(settings.kafka_bootstrap, [topic, topic + settings.dlq_suffix])
    if received < events:
        raise RuntimeError(f"consumed only {received} of {events} events before the deadline")
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
    }
