"""Rebuild the Redis feature store from the interaction topic.

Redis here keeps nothing on disk, so a restart can bring the store back empty while the parameter
server still holds the models learned from the same events. The topic is the source of truth for
both: this reads each partition from its earliest offset up to where the parameter server's state
stands (`until`, exclusive) and writes it through the trainer's own writer, with each event's
partition and offset. The store's watermarks then make the rebuild idempotent and resumable: a
partition already written up to offset w is read from w on (what lies below would be skipped
anyway), and a rebuild that stops half-way, or runs twice, or overlaps the live trainer's writes,
writes every event exactly once.

Records that fail the event schema are skipped: the trainer dead-lettered them when it first
consumed them, so they never were in the store. So are the records the trainer drops as
duplicates (an event id seen earlier in the partition, `dedup.EventIdWindow`): the same window
runs over the rebuilt records, filled first with the ids of the window before the first offset
rebuilt (read, not written), so that it decides each record as the trainer did. Every write names
the offsets it was read from, so the watermarks move past skipped records too.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import numpy as np

from streamrec.core.config import Settings
from streamrec.param_server.client import ParamClient
from streamrec.stream.events import EventBatch, EventSchema, InvalidEvent
from streamrec.stream.kafka import Record, TopicPartition
from streamrec.stream.reader import read_ranges
from streamrec.stream.topics import end_offsets
from streamrec.trainer.online.dedup import EventIdWindow
from streamrec.trainer.online.feature_store import FeatureStore, popularity_weights
from streamrec.trainer.online.roles import EventRoles

log = logging.getLogger("streamrec.features")


def server_watermarks(client: ParamClient) -> dict[str, int]:
    """Per partition, the offset up to which every parameter-server shard holding a watermark for
    it has applied the topic: the minimum over those shards. A shard without one (it restarted
    empty) makes the trainer replay that partition itself, deduplicated by the store's watermarks."""
    merged: dict[str, int] = {}
    for shard in client.watermarks():
        for pkey, offset in shard.items():
            merged[pkey] = min(merged.get(pkey, offset), offset)
    return merged


def _partition(pkey: str) -> TopicPartition:
    """"topic/partition" -> (topic, partition); a bad key is a clear error, not a silent skip."""
    topic, slash, number = pkey.rpartition("/")
    if not slash or not topic or not number.isdigit():
        raise ValueError(f"partition key {pkey!r}: expected 'topic/partition'")
    return topic, int(number)


def _read_ranges(bootstrap: str, until: Mapping[str, int],
                 written: Mapping[str, int]) -> dict[TopicPartition, tuple[str, int, int, int]]:
    """(topic, partition) -> (pkey, first offset to read, offset to stop before, the topic's
    earliest offset), for partitions with something left to write. Starts at the store's
    watermark or the topic's earliest offset, whichever is later; stops at `until` or the
    topic's end, whichever is earlier."""
    by_topic: dict[str, dict[int, str]] = {}
    for pkey in until:
        topic, partition = _partition(pkey)
        by_topic.setdefault(topic, {})[partition] = pkey
    ranges: dict[TopicPartition, tuple[str, int, int, int]] = {}
    for topic, pkeys in by_topic.items():
        for partition, (begin, end) in end_offsets(bootstrap, topic, list(pkeys)).items():
            pkey = pkeys[partition]
            resume = written.get(pkey, 0)
            if begin > resume:
                log.warning("%s: offsets %d..%d are gone from the topic (retention): they cannot be rebuilt",
                            pkey, resume, begin - 1)
            if until[pkey] > end:
                log.warning("%s: the parameter server is at offset %d but the topic ends at %d", pkey, until[pkey], end)
            start, stop = max(begin, resume), min(until[pkey], end)
            if start < stop:
                ranges[(topic, partition)] = (pkey, start, stop, begin)
    return ranges


def _batch(records: Sequence[Record], schema: EventSchema, pkeys: Mapping[TopicPartition, str]) -> EventBatch:
    """The valid records as an event batch tagged with their partition keys and offsets."""
    events, origin, offsets = [], [], []
    for record in records:
        try:
            events.append(schema.decode(record.value))
        except InvalidEvent:
            continue  # dead-lettered by the trainer when first consumed
        origin.append(pkeys[(record.topic, record.partition)])
        offsets.append(record.offset)
    return EventBatch.from_events(events).with_origin(np.array(origin, dtype=object), np.array(offsets, np.int64))


def _read(records: Sequence[Record], position: dict[TopicPartition, int],
          pkeys: Mapping[TopicPartition, str]) -> dict[str, tuple[int, int]]:
    """Per partition key, the offsets `records` cover ([first, end), the write's `ranges`): from
    where the partition's previous records ended (`position`, moved on here) to its last record."""
    ends: dict[TopicPartition, int] = {}
    for record in records:
        tp = (record.topic, record.partition)
        ends[tp] = max(ends.get(tp, 0), record.offset + 1)
    read = {pkeys[tp]: (position[tp], end) for tp, end in ends.items()}
    position.update(ends)
    return read


def _fill_window(settings: Settings, schema: EventSchema, window: EventIdWindow,
                 ranges: Mapping[TopicPartition, tuple[str, int, int, int]], batch_events: int,
                 idle_timeout_s: float) -> None:
    """Record in `window` the ids of the records before each range's start that the trainer's
    window held there (dedup.py: the window of the range's first record, from the topic's
    earliest offset at most), without writing them."""
    before = {tp: (max(begin, window.window_start(start)), start) for tp, (_, start, _, begin) in ranges.items()}
    pkeys = {tp: pkey for tp, (pkey, _, _, _) in ranges.items()}
    for records in read_ranges(settings.kafka_bootstrap, before, settings.kafka_client, batch_events, idle_timeout_s):
        window.record(_batch(records, schema, pkeys))


def rebuild_features(
    settings: Settings, store: FeatureStore, until: Mapping[str, int], roles: EventRoles | None = None,
    batch_events: int = 5000, idle_timeout_s: float = 60.0, dedup_window_events: int = 65_536,
) -> int:
    """Write the topic's events [earliest, until[pkey]) of every partition key into `store`, in
    batches of `batch_events` records; returns the number of events written (0 when the store
    already holds them all). `roles` weigh popularity as the trainer's ranking model does (the
    default roles, as `streamrec train-online` uses); `dedup_window_events` is the trainer's event-id
    window (`TrainerConfig.dedup_window_events`). Raises TimeoutError when the broker sends
    nothing for `idle_timeout_s` while records are still due.

    A store that loses state while it is rebuilt (a Redis, or a Cluster master with its replica,
    restarted empty after the rebuild read its watermarks, or between two of its writes) is
    rebuilt again from where it stands then: every write names the topic's earliest offsets as its
    floors, so a write that does not start there holds its partition where the store lacks what
    lies before it, and reports it. Before, the write went on over the hole, its watermark moved
    past it, and nothing noticed the gap."""
    roles = roles or EventRoles()
    written = 0
    while True:
        more, lost = _rebuild_once(settings, store, until, roles, batch_events, idle_timeout_s, dedup_window_events)
        written += more
        if not lost:
            log.info("feature store rebuilt: %d events written", written)
            return written
        log.warning("the feature store lost what was rebuilt of %s while it was rebuilt: rebuilding again",
                    sorted(lost.items()))


def _rebuild_once(settings: Settings, store: FeatureStore, until: Mapping[str, int], roles: EventRoles,
                  batch_events: int, idle_timeout_s: float, dedup_window_events: int) -> tuple[int, dict[str, int]]:
    """One pass of `rebuild_features`: (events written, the partitions the store lost meanwhile,
    empty when it lost none; the pass stops at the first write that reports one)."""
    schema = EventSchema.from_settings(settings)
    ranges = _read_ranges(settings.kafka_bootstrap, until, store.watermarks())
    if not ranges:
        return 0, {}
    log.info("rebuilding the feature store from %s",
             {pkey: [start, stop] for pkey, start, stop, _ in ranges.values()})
    window = EventIdWindow(dedup_window_events)
    _fill_window(settings, schema, window, ranges, batch_events, idle_timeout_s)
    pkeys = {tp: pkey for tp, (pkey, _, _, _) in ranges.items()}
    position = {tp: start for tp, (_, start, _, _) in ranges.items()}
    floors = {pkey: begin for pkey, _, _, begin in ranges.values()}  # the topic holds everything from there
    written = 0
    for records in read_ranges(settings.kafka_bootstrap,
                               {tp: (start, stop) for tp, (_, start, stop, _) in ranges.items()},
                               settings.kafka_client, batch_events, idle_timeout_s):
        batch = _batch(records, schema, pkeys)
        duplicate, _ = window.duplicates(batch)  # as the trainer decided (trainer._drop_duplicates)
        window.record(batch)
        batch = batch.take(~duplicate)
        result = store.write(batch, popularity_weights(batch, roles), floors=floors,
                             ranges=_read(records, position, pkeys))
        written += result.applied
        if result.missing:
            return written, result.missing
    return written, {}
