"""The feature store's exactly-once writes (per-partition watermarks) and its id encoding, against
the real Redis."""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterator

import numpy as np
import pytest
import redis

from streamrec.stream.events import EventBatch
from streamrec.trainer.online.feature_store import (
    WINDOWS,
    DeclaredKeys,
    FeatureStore,
    FeatureStoreConfig,
    FeatureWrite,
    KeySchema,
)
from tests.trainer_online.conftest import monitored_script_keys, unique_prefix

START = 1_700_000_000.0


@pytest.fixture
def store(redis_url: str) -> Iterator[FeatureStore]:
    store = FeatureStore.from_url(redis_url, FeatureStoreConfig(prefix=unique_prefix(), recent_cap=8))
    yield store
    store.clear()


def tagged_batch(n: int, seed: int = 0, users: int = 10, items: int = 25) -> EventBatch:
    """n events on two partitions (user -> partition, as the producer keys them), offsets dense
    per partition, times increasing."""
    rng = np.random.default_rng(seed)
    user = rng.integers(0, users, n)
    batch = EventBatch.from_columns(
        np.array([f"u{u}" for u in user], object), np.array([f"i{i}" for i in rng.integers(0, items, n)], object),
        np.full(n, "click", object), START + np.arange(n) * 7.0)
    partition = user % 2
    offset = np.zeros(n, np.int64)
    for p in (0, 1):
        offset[partition == p] = np.arange((partition == p).sum())
    return batch.with_origin(np.array([f"t/{p}" for p in partition], object), offset)


def snapshot(store: FeatureStore) -> dict[bytes, object]:
    """Every key of the store with its value: equal snapshots mean nothing changed at all."""
    r = store.redis
    read = {b"string": r.get, b"list": lambda k: r.lrange(k, 0, -1), b"set": r.smembers, b"hash": r.hgetall,
            b"zset": lambda k: r.zrange(k, 0, -1, withscores=True)}
    return {key: read[r.type(key)](key) for key in r.scan_iter(store.keys.pattern(), count=1000)}


def features(store: FeatureStore, batch: EventBatch) -> dict[str, object]:
    """What serving and the chaos suite read, for every user and item of `batch`."""
    users, items = sorted(set(batch.user_id)), sorted(set(batch.item_id))
    return {
        "recent": {u: store.recent_items(u) for u in users},
        "seen": {u: store.seen_items(u) for u in users},
        "users": {u: store.entity("u", u) for u in users},
        "items": {i: store.entity("i", i) for i in items},
        "windows": {(kind, e, w): store.window_count(kind, e, w)
                    for w in WINDOWS for kind, ids in (("u", users), ("i", items)) for e in ids},
        "item_events": store.item_event_counts(),
        "clock": store.clock(),
        "popular": dict(store.popular(1000)),
    }


def test_a_replayed_batch_changes_nothing(store: FeatureStore) -> None:
    batch = tagged_batch(300)
    first = store.write(batch)
    assert first == FeatureWrite(300, 0, {"t/0": 0, "t/1": 0})  # no watermark yet: reported
    before = snapshot(store)
    assert store.watermarks() == {f"t/{p}": int((batch.partition == f"t/{p}").sum()) for p in (0, 1)}
    assert store.item_event_counts() == dict(Counter(batch.item_id))
    assert sum(int(store.entity("u", u)["events"]) for u in set(batch.user_id)) == 300

    assert store.write(batch) == FeatureWrite(0, 300, {})
    assert store.write(batch.take(slice(100, 200))) == FeatureWrite(0, 100, {})
    assert snapshot(store) == before  # history lengths, popularity, windows, counts: all unchanged


def test_a_partly_overlapping_batch_writes_only_its_new_events(store: FeatureStore, redis_url: str) -> None:
    batch = tagged_batch(400, seed=1)
    once = FeatureStore.from_url(redis_url, FeatureStoreConfig(prefix=unique_prefix(), recent_cap=8))
    try:
        once.write(batch)
        store.write(batch.take(slice(0, 250)))
        # a rewound consumer's batch: the last 50 events again, then 150 new ones
        assert store.write(batch.take(slice(200, 400))) == FeatureWrite(150, 50, {})
        replayed, direct = features(store, batch), features(once, batch)
        assert replayed.pop("popular") == pytest.approx(direct.pop("popular"), rel=1e-12)  # float sum order
        assert replayed == direct
        assert store.watermarks() == once.watermarks()
    finally:
        once.clear()


def test_a_wiped_store_reports_unmarked_partitions(store: FeatureStore) -> None:
    batch = tagged_batch(100, seed=2)
    store.write(batch.take(slice(0, 60)))
    store.clear()  # what a Redis restart without persistence leaves
    rest = batch.take(slice(60, 100))
    first = {p: int(rest.offset[rest.partition == p].min()) for p in ("t/0", "t/1")}
    assert min(first.values()) > 0
    assert store.write(rest) == FeatureWrite(40, 0, first)  # without floors: reported, and written
    assert store.watermarks() == {p: int(rest.offset[rest.partition == p].max()) + 1 for p in first}


def test_a_partition_with_earlier_events_in_the_topic_is_held_for_a_rebuild(store: FeatureStore) -> None:
    batch = tagged_batch(100, seed=2)
    early, rest = batch.take(slice(0, 60)), batch.take(slice(60, 100))
    in_t1 = rest.partition == "t/1"
    first = {p: int(rest.offset[rest.partition == p].min()) for p in ("t/0", "t/1")}
    # t/0's earlier events are gone from the topic (retention): nothing to rebuild, written at once;
    # t/1 still holds offsets from 0: held back, no watermark, reported
    floors = {"t/0": first["t/0"]}
    assert store.write(rest, floors=floors) == FeatureWrite(int((~in_t1).sum()), int(in_t1.sum()), {"t/1": first["t/1"]})
    assert set(store.watermarks()) == {"t/0"}
    store.write(early.take(early.partition == "t/1"))  # what the rebuild writes: t/1 up to first["t/1"]
    assert store.write(rest, floors=floors) == FeatureWrite(int(in_t1.sum()), int((~in_t1).sum()), {})
    written = np.concatenate([early.item_id[early.partition == "t/1"], rest.item_id])
    assert store.item_event_counts() == dict(Counter(written))


def test_events_without_origin_are_written_every_time(store: FeatureStore) -> None:
    batch = EventBatch.from_columns(np.array(["u1", "u2"], object), np.array(["i1", "i1"], object),
                                    np.full(2, "view", object), np.array([START, START + 1]))
    assert store.write(batch) == FeatureWrite(2, 0, {})
    assert store.write(batch) == FeatureWrite(2, 0, {})  # a file replayed twice counts twice, as before
    assert store.item_event_counts() == {"i1": 4} and store.watermarks() == {}


def test_a_batch_mixing_tagged_and_untagged_events(store: FeatureStore) -> None:
    tagged = tagged_batch(21, seed=3)
    origin = tagged.partition.copy()
    offset = tagged.offset.copy()
    origin[10], offset[10] = None, -1  # e.g. an event injected from a file
    both = tagged.with_origin(origin, offset)
    assert store.write(both).applied == 21
    assert store.write(both) == FeatureWrite(1, 20, {})
    expected = Counter(tagged.item_id)
    expected[tagged.item_id[10]] += 1  # only the untagged event was written again
    assert store.item_event_counts() == dict(expected)


HOSTILE_USERS = ["a", "a:seen", "a:recent", "a}", "{a}", "%7Ba%7D", "a%3Aseen", "a b\nc\r\x00", ":", "{", "}",
                 "%", "", "x" * 10_000 + ":seen", "é:{ü}"]


def test_ids_cannot_reach_each_others_keys(store: FeatureStore) -> None:
    # Under the old schema (`sr:u:<id>` hash, `sr:u:<id>:seen` set) user "a:seen"'s hash WAS user
    # "a"'s seen set, "a%3Aseen" would be "a:seen"'s encoding if `%` were not escaped, and "{a}"
    # would pull its keys into another Cluster slot.
    n = len(HOSTILE_USERS)
    items = np.array([f"item:{k}" if k % 2 else "{i}:w300" for k in range(n)], object)
    batch = EventBatch.from_columns(np.array(HOSTILE_USERS, object), items, np.full(n, "click", object),
                                    START + np.arange(n, dtype=np.float64))
    assert store.write(batch).applied == n
    for user, item in zip(HOSTILE_USERS, items):
        assert store.seen_items(user) == {item}
        assert store.recent_items(user) == [item]
        assert store.entity("u", user)["events"] == 1
        assert store.window_count("u", user, 300) == 1
    assert store.item_event_counts() == dict(Counter(items))
    for item, count in Counter(items).items():
        assert store.entity("i", item)["events"] == count
        assert store.window_count("i", item, 3600) == count
    # every key carries the hash tag of exactly one entity (or of the shared group): one Cluster
    # slot per user and per item, and no id reaches a tag it does not own
    def tag(key: str | bytes) -> bytes:
        return (key.encode() if isinstance(key, str) else key).partition(b"{")[2].partition(b"}")[0]

    keys_by_tag = defaultdict(set)
    for key in store.redis.scan_iter(store.keys.pattern(), count=1000):
        keys_by_tag[tag(key)].add(key)
    schema = store.keys
    user_tags = {tag(schema.entity("u", u)) for u in HOSTILE_USERS}
    item_tags = {tag(schema.entity("i", i)) for i in set(items)}
    assert len(user_tags) == len(HOSTILE_USERS) and len(item_tags) == len(set(items))
    assert set(keys_by_tag) == user_tags | item_tags | {b"g"}
    assert all(len(keys_by_tag[t]) == 5 for t in user_tags)  # hash, recent, seen, two windows


def test_bad_key_parts_are_refused(redis_url: str) -> None:
    with pytest.raises(ValueError, match="hash tags"):
        FeatureStore(redis.Redis.from_url(redis_url), FeatureStoreConfig(prefix="a{b}"))
    with pytest.raises(ValueError, match="entity kind"):
        KeySchema("sr").entity("x", "u1")  # type: ignore[arg-type]


WRITE_COMMANDS = {b"HGET", b"HMGET", b"GET", b"SET", b"SETNX", b"LPUSH", b"LTRIM", b"EXPIRE", b"SADD", b"HSET", b"HINCRBY",
                  b"ZINCRBY", b"INCRBY"}


def test_the_write_script_touches_only_keys_it_declares(store: FeatureStore) -> None:
    """Redis requires a script's keys to be declared (a Cluster routes and checks scripts by
    them): watched with MONITOR, every key the script's commands touch was among the keys its
    call declared, for hostile ids too, for a first write and for a partly replayed one."""
    n = len(HOSTILE_USERS)
    users = np.array(HOSTILE_USERS * 3, object)
    items = np.array([f"i{{k % 4}}:%{k % 7}" for k in range(3 * n)], object)
    batch = EventBatch.from_columns(users, items, np.full(3 * n, "click", object), START + 40.0 * np.arange(3 * n))
    batch.partition[:] = "t/0"
    batch.offset[:] = np.arange(3 * n)
    replayed = EventBatch.from_columns(users, items, np.full(3 * n, "click", object),
                                       START + 40.0 * (np.arange(3 * n) + n))
    replayed.partition[:] = "t/0"
    replayed.offset[:] = np.arange(3 * n) + n  # its first n events were written before
    for write in (batch, replayed):
        declared, touched, commands = monitored_script_keys(store.redis, store.keys.prefix,
                                                            lambda: store.write(write))
        assert touched and touched <= declared, sorted(touched - declared)[:5]
        assert commands == WRITE_COMMANDS  # every kind of write ran: the check covers all of them
    assert store.item_event_counts() == dict(Counter(np.concatenate([items, items[2 * n :]])))


def test_declared_keys_are_the_schemas_keys() -> None:
    """The vectorised keys of a batch are `KeySchema.entity` / `window`, id by id, on one Redis and
    in buckets: ids that differ only by a trailing NUL, by escapes or by braces stay apart."""
    users = np.array(["u", "u\x00", "u:seen", "{u}", "%7Bu%7D", "x" * 200, "u"], object)
    items = np.array(["i", "i\x00", "i", "}", "i", ":", "%"], object)
    times = START + np.array([0.0, 59.0, 60.0, 299.0, 300.0, 3600.0, 3601.0])
    for schema in (KeySchema("sr"), KeySchema("sr", buckets=64)):
        keys = DeclaredKeys.of(schema, users, items, times)
        for k, (user, item, t) in enumerate(zip(users, items, times)):
            for kind, entity, index, windows in (("u", user, keys.user, keys.user_windows),
                                                 ("i", item, keys.item, keys.item_windows)):
                bucket = int(keys.user_bucket[k] if kind == "u" else keys.item_bucket[k])
                call = schema.shared_keys(bucket if schema.buckets else None) + keys.of_bucket(bucket)
                assert call[index[k] - 1] == schema.entity(kind, entity)
                for w, (window, size) in enumerate(WINDOWS.items()):
                    assert call[windows[k, w] - 1] == schema.window(kind, entity, window, int(t // size * size))
            bucket = int(keys.user_bucket[k])
            call = schema.shared_keys(bucket if schema.buckets else None) + keys.of_bucket(bucket)
            assert call[keys.user[k] : keys.user[k] + 2] == [schema.entity("u", user, "recent"),
                                                             schema.entity("u", user, "seen")]  # after the hash
        assert len(set(keys.keys)) == len(keys.keys)  # each key once
    empty = DeclaredKeys.of(KeySchema("sr", buckets=64), users[:0], items[:0], times[:0])
    assert empty.of_bucket(63) == [] and empty.user_windows.shape == (0, len(WINDOWS))
    with pytest.raises(ValueError, match="time order"):
        DeclaredKeys.of(KeySchema("sr"), users[:2], items[:2], times[1::-1])


def test_one_user_with_more_events_than_lua_can_unpack_is_written_in_full(store: FeatureStore) -> None:
    """A bot's 20,000 events in one batch (Lua's unpack stops near 8,000 values: the whole batch
    failed, and again at every retry): every item is seen, the newest `recent_cap` are recent."""
    n = 20_000
    items = np.array([f"i{k}" for k in range(n)], object)
    batch = EventBatch.from_columns(np.full(n, "bot", object), items, np.full(n, "click", object),
                                    START + np.arange(n, dtype=np.float64))
    assert store.write(batch).applied == n
    assert len(store.seen_items("bot")) == n and store.entity("u", "bot")["events"] == n
    assert store.recent_items("bot") == items[::-1][: store.config.recent_cap].tolist()


def test_each_user_hash_places_the_users_newest_event_in_the_log(store: FeatureStore) -> None:
    """Serving pulls a user's row again until it has learned the event at this position (the
    partition and offset of the user's newest event): written over several batches, it is the
    user's highest offset so far, and a replayed batch does not move it back."""
    batch = tagged_batch(400, seed=3)
    for chunk in np.array_split(np.arange(400), 4):
        store.write(batch.take(chunk))
    newest = {user: (partition, int(offset))
              for user, partition, offset in zip(batch.user_id, batch.partition, batch.offset)}  # offsets grow
    store.write(batch.take(np.arange(100)))  # a replay of the first batch: below the watermarks
    for user, position in newest.items():
        session = store.user_history(user, 1, False, session=True).session
        assert session is not None and session.position == position, user
    store.write(EventBatch.from_columns(np.array(["u0"], object), np.array(["i0"], object),
                                        np.array(["click"], object), np.array([START + 9_999.0])))
    assert store.user_history("u0", 1, False, session=True).session.position == newest["u0"]  # no origin: kept
