"""Read a topic, or given offset ranges of its partitions, outside any consumer group.

Batch refits build their training log this way (`read_log`), and so do tools that inspect the
dead-letter topic. The end is fixed when reading starts (fetch high-water marks, see
`streamrec.stream.topics.end_offsets`), so a topic that keeps growing still yields a finite read.
`read_ranges` reads known offset ranges in chunks: `read_records`, the feature-store rebuild and
the trainer's warm-up after a restart read the topic through it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Mapping

import numpy as np
import pandas as pd

from streamrec.core.config import Settings
from streamrec.stream.events import EventSchema, InvalidEvent
from streamrec.stream.kafka import Record, TopicPartition, make_consumer
from streamrec.stream.loaders import InteractionLog, load_log, time_order
from streamrec.stream.topics import end_offsets, partitions_of

logger = logging.getLogger(__name__)


def read_records(
    bootstrap: str, topic: str, client: str = "kafka-python", timeout_s: float = 60.0,
    progress: Callable[[int], None] | None = None,
) -> list[Record]:
    """Every record of `topic` present when called, ordered by (partition, offset)."""
    partitions = partitions_of(bootstrap, topic)
    bounds = end_offsets(bootstrap, topic, partitions)
    records: list[Record] = []
    deadline = time.monotonic() + timeout_s
    for chunk in read_ranges(bootstrap, {(topic, p): bound for p, bound in bounds.items()}, client, 10_000, timeout_s):
        records.extend(chunk)
        if progress:
            progress(len(chunk))
        if time.monotonic() > deadline:
            raise TimeoutError(f"{topic}: not read to its end in {timeout_s}s")
    records.sort(key=lambda r: (r.partition, r.offset))
    return records


def read_ranges(
    bootstrap: str, ranges: Mapping[TopicPartition, tuple[int, int]], client: str = "kafka-python",
    chunk_records: int = 5000, idle_timeout_s: float = 60.0,
) -> Iterator[list[Record]]:
    """The records of offsets [start, stop) of each partition in `ranges`, in chunks of at most
    `chunk_records` (a partition's records ascend; partitions interleave as the broker sends them).
    A partition is done at its record stop - 1 or at any record beyond (offsets may skip, e.g.
    over transaction markers). Raises TimeoutError when the broker sends nothing for
    `idle_timeout_s` while records are due."""
    stops = {tp: stop for tp, (start, stop) in ranges.items() if start < stop}
    if not stops:
        return
    consumer = make_consumer(bootstrap, client)
    try:
        consumer.assign(list(stops))
        for tp in stops:
            consumer.seek(tp, ranges[tp][0])
        idle_since = time.monotonic()
        while stops:
            polled = consumer.poll(max_records=chunk_records, timeout_s=0.5)
            due = [r for r in polled if r.offset < stops.get((r.topic, r.partition), -1)]
            for r in polled:  # a partition's records ascend: its last record says how far it got
                if r.offset + 1 >= stops.get((r.topic, r.partition), r.offset + 2):
                    del stops[(r.topic, r.partition)]
            if polled:
                idle_since = time.monotonic()
            elif time.monotonic() - idle_since > idle_timeout_s:
                raise TimeoutError(f"no records for {idle_timeout_s}s; still due: {stops}")
            if due:
                yield due
    finally:
        consumer.close()


def read_log(
    bootstrap: str, topic: str, schema: EventSchema, client: str = "kafka-python",
    progress: Callable[[int], None] | None = None,
) -> tuple[InteractionLog, int, int]:
    """The topic as a time-ordered `InteractionLog`, the number of invalid records skipped (they
    were dead-lettered when produced; a batch job only reports them) and the number of records
    that repeat an earlier record's `event_id`, kept once: a replay run again after a crash, or a
    producer's retry, writes events twice, which the online trainer drops and a refit learned twice."""
    events, invalid = [], 0
    for record in read_records(bootstrap, topic, client, progress=progress):
        try:
            events.append(schema.decode(record.value))
        except InvalidEvent:
            invalid += 1
    repeated = pd.Series([e["event_id"] for e in events], dtype=object).duplicated().to_numpy()
    if repeated.any():
        events = [e for e, again in zip(events, repeated) if not again]
    log = InteractionLog(
        user_id=np.array([e["user_id"] for e in events], dtype=object),
        item_id=np.array([e["item_id"] for e in events], dtype=object),
        rating=np.array([e.get("value", np.nan) if e["event_type"] == "rating" else np.nan for e in events],
                        dtype=np.float64),
        timestamp=np.array([e["timestamp"] for e in events], dtype=np.float64),
        event_type=np.array([e["event_type"] for e in events], dtype=object),
        source=f"kafka:{topic}",
    )
    return log.take(time_order(log)), invalid, int(repeated.sum())


def is_topic_source(source: str) -> bool:
    """`source` names a topic (`topic`, `topic:NAME`), not a log file, folder or data-set name."""
    return source == "topic" or source.startswith("topic:")


def read_event_log(settings: Settings, source: str, fmt: str) -> InteractionLog:
    """The event log from its beginning: `topic` (the interaction topic), `topic:NAME`, or a file
    of format `fmt` (batch refits and `streamrec export` read their input this way)."""
    if is_topic_source(source):
        topic = source.partition(":")[2] or settings.topic
        try:
            log, _, repeated = read_log(settings.kafka_bootstrap, topic, EventSchema.from_settings(settings),
                                        settings.kafka_client)
        except KeyError:  # a refit loop started before anything was produced: tried again next period
            raise ValueError(f"topic {topic!r} does not exist yet") from None
        if repeated:
            logger.warning("%d records of %r repeat an earlier event_id (a replay run again, a producer's retry): "
                         "each event is read once", repeated, topic)
        if not len(log):
            raise ValueError(f"topic {topic!r} holds no valid events yet")
        return log
    return load_log(source, fmt)
