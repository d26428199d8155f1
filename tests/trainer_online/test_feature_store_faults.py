"""The feature store against what a production Redis can hold or lose (the real Redis, broker and
parameter server): keys another writer corrupted, a Redis back with an older state than it
acknowledged, and a rebuild of a topic holding events the trainer dropped as duplicates."""

from __future__ import annotations

import threading
from collections import Counter

import numpy as np
import orjson
import pytest
import redis
from prometheus_client import REGISTRY

from streamrec.core.config import Settings
from streamrec.param_server.client import ParamClient
from streamrec.stream.events import EventBatch, EventSchema
from streamrec.stream.kafka import Record, make_producer
from streamrec.stream.reader import read_records
from streamrec.trainer.online.dedup import SPAN_EVENTS, EventIdWindow
from streamrec.trainer.online.feature_rebuild import rebuild_features
from streamrec.trainer.online.feature_store import (
    FeatureStore,
    FeatureStoreConfig,
    run_write_script,
    script_argument,
)
from streamrec.trainer.online.models import OnlineBPR
from streamrec.trainer.online.trainer import OnlineTrainer, TrainerConfig
from tests.trainer_online.conftest import planted_events, produce_events, unique_prefix
from tests.trainer_online.test_feature_store_exactly_once import snapshot
from tests.trainer_online.test_feature_store_rebuild import end_of_topic

START = 1_700_000_000.0


def batch_of(users: list[str], items: list[str], first_offset: int, pkey: str = "t/0") -> EventBatch:
    n = len(users)
    batch = EventBatch.from_columns(np.array(users, object), np.array(items, object), np.full(n, "click", object),
                                    START + first_offset + np.arange(n, dtype=np.float64))
    return batch.with_origin(np.full(n, pkey, object), np.arange(first_offset, first_offset + n))


def pkey_of(record: Record) -> str:
    return f"{record.topic}/{record.partition}"


def rebuilds_so_far() -> float:
    return REGISTRY.get_sample_value("streamrec_trainer_feature_store_rebuilds_total") or 0.0


def dump(store: FeatureStore) -> dict[bytes, tuple[bytes, int]]:
    """Every key of the store as DUMP gives it, with its time to live: a snapshot to go back to."""
    r = store.redis
    return {key: (r.dump(key), max(r.pttl(key), 0)) for key in r.scan_iter(store.keys.pattern(), count=1000)}


def restore(store: FeatureStore, dumped: dict[bytes, tuple[bytes, int]]) -> None:
    """The store as it was when `dumped`: what an RDB/AOF restore or a lagging replica brings back."""
    store.clear()
    for key, (value, ttl) in dumped.items():
        store.redis.restore(key, ttl, value)


# ---- keys another writer corrupted -------------------------------------------------------------------
def test_keys_the_script_cannot_use_are_repaired_and_the_batch_written_once(new_store) -> None:
    """A counter that is no integer (or a key of another type) made the script fail half-way: Redis
    kept the writes before it, the trainer retried for ever and counted them again each time."""
    store = new_store()
    store.write(batch_of(["alice", "bob"], ["x", "y"], 0))
    r, keys = store.redis, store.keys
    r.hset(keys.entity("i", "y"), "events", "oops")  # a hand edit
    r.hset(keys.shared("item_events"), "x2", "1.5")
    r.delete(keys.entity("u", "bob", "seen"))
    r.set(keys.entity("u", "bob", "seen"), "not a set")  # another writer's key
    r.set(keys.shared("clock"), "soon")
    later = batch_of(["alice", "bob"], ["x2", "y"], 2)

    written = store.write(later)
    assert (written.applied, written.skipped) == (2, 0)
    assert set(written.repaired) == {f"{keys.entity('i', 'y')} events", f"{keys.shared('item_events')} x2",
                                     keys.entity("u", "bob", "seen"), keys.shared("clock")}
    assert store.write(later).skipped == 2  # the retry a failure caused: nothing counted again
    assert store.entity("u", "alice")["events"] == store.entity("u", "bob")["events"] == 2
    assert store.entity("i", "y")["events"] == 1  # restarted from 0: this batch's event
    assert store.item_event_counts() == {"x": 1, "y": 2, "x2": 1}
    assert store.seen_items("bob") == {"y"} and store.recent_items("bob") == ["y", "y"]
    assert store.watermarks() == {"t/0": 4} and store.clock() == START + 3


def test_watermarks_that_are_no_offsets_refuse_the_batch_and_nothing_is_written(new_store) -> None:
    from streamrec.trainer.online.feature_store import FeatureStoreCorrupt

    store = new_store()
    store.write(batch_of(["alice"], ["x"], 0))
    store.redis.hset(store.keys.shared("wm"), "t/0", "oops")
    before = snapshot(store)
    with pytest.raises(FeatureStoreCorrupt, match="watermark .* is not an offset: nothing written"):
        store.write(batch_of(["alice", "bob"], ["x", "y"], 0))  # read as -1 before: all written again
    assert snapshot(store) == before


# ---- a Redis back with an older state ------------------------------------------------------------------
def test_watermarks_move_past_the_records_a_batch_read_that_wrote_nothing(new_store) -> None:
    """With the offsets it was read from, a batch moves its partitions' watermarks to their ends,
    records that wrote nothing (invalid, duplicates) and batches without an event included: so
    the next batch, which starts there, does not look like a gap."""
    store = new_store()
    first = store.write(batch_of(["alice"], ["x"], 3), floors={"t/0": 0, "t/1": 0}, ranges={"t/0": (0, 6), "t/1": (0, 2)})
    assert first.applied == 1 and first.unmarked == {} and first.behind == {}  # read from the floor: not wiped
    assert store.watermarks() == {"t/0": 6, "t/1": 2}
    empty = batch_of([], [], 0)
    assert store.write(empty, floors={}, ranges={"t/1": (2, 9)}).missing == {}
    assert store.watermarks() == {"t/0": 6, "t/1": 9}
    with pytest.raises(ValueError, match="outside the ranges"):
        store.write(batch_of(["alice"], ["x"], 5), ranges={"t/0": (6, 7)})


def test_a_store_back_with_an_older_state_holds_the_batch_until_rebuilt(online_settings: Settings, topic_events,
                                                                       new_store) -> None:
    """Redis restored from a snapshot older than what it acknowledged: its watermarks lie below
    where the next batch starts. That batch was written on, and the events in between lost."""
    until = end_of_topic(online_settings)
    thirds = [{pkey: end * k // 3 for pkey, end in until.items()} for k in (0, 1, 2, 3)]
    store = new_store()
    schema = EventSchema.from_settings(online_settings)
    records = read_records(online_settings.kafka_bootstrap, online_settings.topic)

    def batch(k: int) -> tuple[EventBatch, dict[str, tuple[int, int]]]:
        """The trainer's k-th batch: every partition's k-th third, its valid events tagged."""
        mine = [r for r in records if thirds[k][pkey_of(r)] <= r.offset < thirds[k + 1][pkey_of(r)]]
        events, invalid = schema.decode_many([r.value for r in mine])
        valid = np.ones(len(mine), bool)
        valid[[n for n, _ in invalid]] = False
        tagged = events.with_origin(np.array([pkey_of(r) for r in mine], object)[valid],
                                    np.array([r.offset for r in mine], np.int64)[valid])
        return tagged, {pkey: (thirds[k][pkey], thirds[k + 1][pkey]) for pkey in until}

    floors = dict.fromkeys(until, 0)
    for k in (0, 1):
        events, ranges = batch(k)
        written = store.write(events, floors=floors, ranges=ranges)
        assert written.applied == len(events) and written.missing == {}  # junk at the heads: no false alarm
        if k == 0:
            older = dump(store)
    restore(store, older)  # the snapshot before the second batch
    events, ranges = batch(2)
    assert store.write(events, floors=floors, ranges=ranges).behind == thirds[2]  # held back: nothing written
    assert store.watermarks() == thirds[1]
    assert rebuild_features(online_settings, store, thirds[2]) > 0  # what the trainer does
    assert store.write(events, floors=floors, ranges=ranges).applied == len(events)
    assert store.item_event_counts() == dict(Counter(e["item_id"] for e in topic_events))
    assert store.watermarks() == until


def _run(trainer: OnlineTrainer, timeout: float = 60.0) -> BaseException | None:
    """Run `trainer` to its idle exit (stopped after `timeout`); what it raised, if anything."""
    raised: list[BaseException] = []

    def run() -> None:
        try:
            trainer.run()
        except BaseException as exc:  # noqa: BLE001  (handed to the test)
            raised.append(exc)

    worker = threading.Thread(target=run)
    worker.start()
    worker.join(timeout)
    trainer.stop_requested.set()
    worker.join(30)
    return raised[0] if raised else None


def test_the_trainer_rebuilds_what_a_store_back_with_an_older_state_lost(online_settings: Settings, start_server,
                                                                        new_store) -> None:
    """Three runs of the trainer; between the second and the third, the store goes back to its
    state after the first (an RDB restore, a lagging replica promoted). Junk at the head of every
    partition must not look like a gap."""
    server = start_server("--no-checkpoints")
    client = ParamClient([server.address])
    store = new_store()
    with make_producer(online_settings.kafka_bootstrap) as producer:
        for partition in range(3):
            producer.send(online_settings.topic, b"not json", b"j", partition=partition)
        producer.flush()
    events = planted_events(900, users=60)

    def run(part: slice) -> float:
        produce_events(online_settings, events[part])
        rebuilds = rebuilds_so_far()
        trainer = OnlineTrainer(online_settings, [OnlineBPR(store=client)],
                                TrainerConfig(idle_exit_seconds=2.0, batch_events=100), store)
        assert _run(trainer) is None
        return rebuilds_so_far() - rebuilds

    assert run(slice(0, 300)) == 0
    older = dump(store)
    assert run(slice(300, 600)) == 0
    restore(store, older)
    assert run(slice(600, 900)) >= 1
    assert store.item_event_counts() == dict(Counter(e["item_id"] for e in events))
    assert store.watermarks() == end_of_topic(online_settings)


def test_the_trainer_writes_over_a_corrupt_counter_and_stops_on_corrupt_watermarks(online_settings: Settings,
                                                                                   start_server, new_store) -> None:
    """One counter another writer left as text stalled the stream: the trainer took the script's
    error for an outage, retried for ever, and counted the batch's first writes again each time."""
    server = start_server("--no-checkpoints")
    client = ParamClient([server.address])
    store = new_store()
    events = planted_events(300, users=30)
    item = events[-1]["item_id"]
    store.redis.hset(store.keys.entity("i", item), "events", "oops")
    produce_events(online_settings, events)
    trainer = OnlineTrainer(online_settings, [OnlineBPR(store=client)],
                            TrainerConfig(idle_exit_seconds=2.0, batch_events=100), store)
    assert _run(trainer) is None
    assert trainer.stats.applied == 300
    assert store.item_event_counts() == dict(Counter(e["item_id"] for e in events))
    assert store.entity("i", item)["events"] == sum(e["item_id"] == item for e in events)

    from streamrec.trainer.online.feature_store import FeatureStoreCorrupt

    pkey = next(iter(store.watermarks()))
    store.redis.hset(store.keys.shared("wm"), pkey, "oops")
    produce_events(online_settings, planted_events(300, users=30, seed=1))
    trainer = OnlineTrainer(online_settings, [OnlineBPR(store=client)],
                            TrainerConfig(idle_exit_seconds=2.0, batch_events=100), store)
    assert isinstance(_run(trainer), FeatureStoreCorrupt)


# ---- a rebuild of events the trainer dropped as duplicates ---------------------------------------------
def test_a_rebuild_drops_the_duplicates_the_trainer_dropped(online_settings: Settings, new_store) -> None:
    """Clients re-send events (the same event id) after a lost acknowledgement: the trainer learns
    and writes the first copy only. The rebuild wrote every copy, so a rebuilt store counted them
    twice, also when the first copy lies before the offset the rebuild resumes at."""
    events = [{"event_id": f"e{n}", "user_id": "alice", "item_id": f"i{n % 7}", "event_type": "click",
               "timestamp": START + n} for n in range(SPAN_EVENTS + 100)]
    for resent, original in ((3, 1), (10, 8), (SPAN_EVENTS + 50, SPAN_EVENTS - 20), (SPAN_EVENTS + 60, 2)):
        events[resent] = {**events[original], "timestamp": START + resent}  # a copy, later in the partition
    topic = online_settings.topic
    with make_producer(online_settings.kafka_bootstrap) as producer:
        for event in events:
            producer.send(topic, orjson.dumps(event), b"alice", partition=0)
        producer.flush()
    pkey = f"{topic}/0"
    batch, invalid = EventSchema.from_settings(online_settings).decode_many([orjson.dumps(e) for e in events])
    assert not invalid
    batch = batch.with_origin(np.full(len(events), pkey, object), np.arange(len(events)))
    duplicate, _ = EventIdWindow().duplicates(batch)  # what the trainer drops (trainer._drop_duplicates)
    assert duplicate.sum() == 4
    live = new_store()
    live.write(batch.take(~duplicate))

    rebuilt, resumed = new_store(), new_store()
    halfway = SPAN_EVENTS + 30  # after the first copies of two of the later duplicates
    resumed.write(batch.take(np.flatnonzero(~duplicate[:halfway])), ranges={pkey: (0, halfway)})
    until = {pkey: len(events)}
    assert rebuild_features(online_settings, rebuilt, until, idle_timeout_s=20) == len(events) - 4
    assert rebuild_features(online_settings, resumed, until, idle_timeout_s=20) == len(events) - halfway - 2
    for store in (rebuilt, resumed):
        assert store.item_event_counts() == live.item_event_counts()
        assert store.entity("u", "alice")["events"] == len(events) - 4
        assert store.recent_items("alice") == live.recent_items("alice")
        assert store.watermarks() == live.watermarks() == until


# ---- the exchange with several Redis ---------------------------------------------------------------------
def test_replies_received_before_another_redis_failed_stand(redis_url: str) -> None:
    """A Cluster's masters answer one batch together: one that failed made the exchange raise, the
    replies of the others were dropped, and their events, skipped at the retry, went uncounted."""
    store = FeatureStore.from_url(redis_url, FeatureStoreConfig(prefix=unique_prefix()))
    try:
        fields, keys, _ = store._columns(batch_of(["alice"], ["x"], 0), None, None)
        call = (store._shared + keys.of_bucket(0), script_argument(fields))
        gone = redis.Redis(port=1, socket_connect_timeout=0.5)  # nothing listens on port 1
        answered, failed = run_write_script([(store.redis, [call], 0), (gone, [call], 0)])
        assert answered[0][:2] == [1, 0]
        assert len(failed) == 1 and isinstance(failed[0], redis.ConnectionError)
    finally:
        store.clear()

