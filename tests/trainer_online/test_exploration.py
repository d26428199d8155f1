"""Exploration statistics (issue 17, cold start): counts in the real Redis, exactly once, and the
trainer's follower that counts impressions, clicks and first sightings from the real broker."""

from __future__ import annotations

import time
import uuid

import numpy as np
import pytest
import redis

from streamrec.core.config import Settings
from streamrec.stream.impressions import encode_records
from streamrec.stream.kafka import make_producer
from streamrec.stream.topics import create_topics
from streamrec.trainer.online.exploration import NO_CLOCK, ExplorationConfig, ExplorationStore, MarkMoved
from streamrec.trainer.online.exploration_follower import RETRY_S, ExplorationFollower
from tests.exploration_credits import credits
from tests.redis_cluster import RedisCluster
from tests.trainer_online.conftest import produce_events, wait_until

HOUR = 3600.0


def objects(*values: str) -> np.ndarray:
    return np.array(values, object)


@pytest.fixture
def store(redis_url: str) -> ExplorationStore:
    prefix = f"t{uuid.uuid4().hex[:8]}"
    explore = ExplorationStore.from_url(redis_url, prefix, config=ExplorationConfig(max_age_s=48 * HOUR,
                                                                                   min_impressions=3))
    yield explore
    client = redis.Redis.from_url(redis_url)
    for key in client.scan_iter(f"{prefix}:*"):
        client.delete(key)


def test_a_range_is_counted_once_and_only_from_its_partition_s_mark(store: ExplorationStore):
    items = objects("a", "b:c", "x" * 10_000)
    store.count(items, np.array([2, 1, 0]), np.array([10.0, 20.0, 30.0]), 30.0, "t/0", 0, 5,
                credits=credits(items, [1, 0, 0]))
    with pytest.raises(MarkMoved) as moved:  # the same range again (a reader that died before moving on)
        store.count(items, np.array([2, 1, 0]), np.array([10.0, 20.0, 30.0]), 30.0, "t/0", 0, 5,
                    credits=credits(items, [1, 0, 0]))
    assert moved.value.mark == 5
    store.count(objects("a"), np.array([1]), np.array([np.nan]), NO_CLOCK, "t/0", 5, 9)
    store.count(objects("a"), np.array([0]), np.array([5.0]), 40.0, "t/1", 0, 1,  # an earlier sighting
                credits=credits(["a"], [1], tag="later"))
    assert store.marks() == {"t/0": 9, "t/1": 1}
    fresh = store.fresh(10)
    by_id = dict(zip(fresh.ids.tolist(), zip(fresh.shown.tolist(), fresh.clicks.tolist(), fresh.first_seen.tolist())))
    assert by_id == {"a": (3, 2, 5.0), "b:c": (1, 0, 20.0), "x" * 10_000: (0, 0, 30.0)}
    assert fresh.clock == 40.0  # the impressions' count did not move the event clock
    assert fresh.ids.tolist() == ["x" * 10_000, "b:c", "a"]  # newest first seen first


def test_an_item_stops_being_fresh_once_old_and_shown_enough(store: ExplorationStore):
    store.count(objects("old", "new", "unseen-old"), np.zeros(3), np.array([0.0, 47 * HOUR, 0.0]),
                47 * HOUR)
    store.count(objects("old", "new"), np.array([3, 3]), np.full(2, np.nan), NO_CLOCK)
    assert sorted(store.fresh(10).ids.tolist()) == ["new", "old", "unseen-old"]  # all younger than 48 h
    store.count(objects("later"), np.zeros(1), np.array([49 * HOUR]), 49 * HOUR)
    # "old" is 49 h old and shown 3 times; "unseen-old" is as old but shown fewer than 3 times; "new" is 2 h old
    assert sorted(store.fresh(10).ids.tolist()) == ["later", "new", "unseen-old"]
    store.count(objects("old"), np.array([1]), np.full(1, np.nan), NO_CLOCK)  # shown again: it leaves
    members = store.redis.zrange(store.keys.key("fresh"), 0, -1)
    assert b"old" not in members and len(members) == 3


def test_the_candidates_are_bounded_newest_kept(redis_url: str):
    prefix = f"t{uuid.uuid4().hex[:8]}"
    small = ExplorationStore.from_url(redis_url, prefix, config=ExplorationConfig(max_fresh=5))
    ids = np.array([f"i{n}" for n in range(12)], object)
    small.count(ids, np.zeros(12), np.arange(12.0), 11.0)
    assert small.fresh(100).ids.tolist() == [f"i{n}" for n in range(11, 6, -1)]
    for key in small.redis.scan_iter(f"{prefix}:*"):
        small.redis.delete(key)


def test_the_follower_counts_impressions_clicks_and_first_sightings_exactly_once(
        settings: Settings, store: ExplorationStore):
    create_topics(settings.kafka_bootstrap, [settings.topic, settings.impressions_topic], 1)
    producer = make_producer(settings.kafka_bootstrap)
    impressions = [{"request_id": "r1", "user_id": "u1", "items": ["a", "b", "c"], "timestamp": 1.0},
                   {"request_id": "r2", "user_id": "u2", "items": ["a", "d"], "timestamp": 2.0},
                   {"request_id": 7, "user_id": "u3", "items": ["z"]}]  # not an impression: not counted
    for value in encode_records(impressions):
        producer.send(settings.impressions_topic, value)
    producer.flush()
    start = 1_700_000_000.0
    produce_events(settings, [
        {"event_id": "e1", "user_id": "u1", "item_id": "b", "event_type": "click", "timestamp": start,
         "context": {"request_id": "r1"}},  # a click on what r1 showed
        {"event_id": "e2", "user_id": "u2", "item_id": "b", "event_type": "click", "timestamp": start + 1,
         "context": {"request_id": "r2"}},  # r2 did not show b: not a click on it
        {"event_id": "e3", "user_id": "u2", "item_id": "a", "event_type": "skip", "timestamp": start + 2,
         "context": {"request_id": "r2"}},  # a skip is not a click
        {"event_id": "e4", "user_id": "u2", "item_id": "d", "event_type": "click", "timestamp": start + 3,
         "context": {"request_id": "r2"}},
        {"event_id": "e5", "user_id": "u9", "item_id": "n", "event_type": "view", "timestamp": start + 4},
    ])
    # an item enters the candidates at its first event: c, shown but never consumed, is not one yet
    expected = {"a": (2, 0), "b": (1, 1), "d": (1, 1), "n": (0, 0)}

    def counts() -> dict[str, tuple[int, int]]:
        fresh = store.fresh(100)
        return dict(zip(fresh.ids.tolist(), zip(fresh.shown.tolist(), fresh.clicks.tolist())))

    follower = ExplorationFollower(settings, store, ["click", "view"]).start()
    try:
        wait_until(lambda: counts() == expected, timeout=30)
    finally:
        follower.close()
    assert store.fresh(100).clock == start + 4
    first = dict(zip(store.fresh(100).ids.tolist(), store.fresh(100).first_seen.tolist()))
    assert first["b"] == start and first["n"] == start + 4
    again = ExplorationFollower(settings, store, ["click", "view"]).start()  # a restart reads from the marks
    try:
        produce_events(settings, [{"event_id": "e6", "user_id": "u1", "item_id": "c", "event_type": "click",
                                   "timestamp": start + 5, "context": {"request_id": "r1"}}])
        wait_until(lambda: counts().get("c") == (1, 1), timeout=30)  # r1 is known again after the restart
    finally:
        again.close()
    assert counts() == {**expected, "c": (1, 1)}  # nothing counted twice


def test_a_partition_s_first_count_may_start_past_offset_zero(store: ExplorationStore):
    """Retention removed the topic's beginning: the first count starts where the topic does."""
    store.count(objects("a"), np.array([1]), np.array([1.0]), 1.0, "t/0", 500, 510)
    assert store.marks() == {"t/0": 510}
    with pytest.raises(MarkMoved):
        store.count(objects("a"), np.array([1]), np.array([1.0]), 1.0, "t/0", 400, 420)


def test_an_event_dated_a_day_ahead_does_not_age_the_fresh_items(store: ExplorationStore):
    """The schema admits times up to a day ahead; the clock followed such an event, so an item first
    seen 30 h ago counted as 53 h old and left the pool at its next impression."""
    import time

    now = time.time()
    store.count(objects("young"), np.array([3]), np.array([now - 30 * HOUR]), now - 30 * HOUR)
    store.count(objects("ahead"), np.zeros(1), np.array([now + 23 * HOUR]), now + 23 * HOUR)
    assert now - 1 <= store.clock() <= time.time()
    store.count(objects("young"), np.array([1]), np.full(1, np.nan), NO_CLOCK)
    assert "young" in store.fresh(10).ids.tolist()


def test_a_click_is_credited_once_per_answer_and_item_and_only_to_the_answer_s_user(store: ExplorationStore):
    """Within a range, across ranges and partitions: one click per (answer, item), whatever repeats it."""
    args = (objects("a", "b"), np.zeros(2), np.array([1.0, 1.0]), 1.0)
    assert store.count(*args, "t/0", 0, 3, credits=[("r1", "a"), ("r1", "a"), ("r2", "a")]) == 2
    with pytest.raises(MarkMoved):  # the range re-read (a counter killed after its write): nothing credited again
        store.count(*args, "t/0", 0, 3, credits=[("r1", "a")])
    assert store.count(*args, "t/1", 0, 1, credits=[("r1", "a"), ("r1", "b")]) == 1  # r1/a was credited already
    assert store.count(*args, credits=[("r", "1:ra"), ("r1:r", "a")]) == 2  # pairs that would spell alike
    fresh = store.fresh(10)
    assert dict(zip(fresh.ids.tolist(), fresh.clicks.tolist())) == {"a": 0, "b": 0}  # never more than shown
    assert store.redis.hgetall(store.keys.key("clicks")) == {b"a": b"3", b"b": b"1", b"1:ra": b"1"}


def test_the_follower_credits_repeated_clicks_once_and_only_from_the_answer_s_user(
        settings: Settings, store: ExplorationStore):
    """A click delivered 5 times (a producer's retries: one event id) and 3 more clicks on the same
    shown item are one click through; another user's click naming u1's answer is none. A restart
    re-reads the answer for the join, and a new click on another item it showed still counts."""
    create_topics(settings.kafka_bootstrap, [settings.topic, settings.impressions_topic], 1)
    producer = make_producer(settings.kafka_bootstrap)
    for value in encode_records([{"request_id": "r1", "user_id": "u1", "items": ["a", "b"], "timestamp": 1.0}]):
        producer.send(settings.impressions_topic, value)
    producer.flush()
    start = 1_700_000_000.0

    def click(event_id: str, user: str, item: str, n: int) -> dict:
        return {"event_id": event_id, "user_id": user, "item_id": item, "event_type": "click",
                "timestamp": start + n, "context": {"request_id": "r1"}}

    def clicks() -> dict[str, int]:
        fresh = store.fresh(100)
        return dict(zip(fresh.ids.tolist(), fresh.clicks.tolist()))

    produce_events(settings, [*(click("e1", "u1", "a", 0) for _ in range(5)),
                              *(click(f"again{n}", "u1", "a", n) for n in range(3)),
                              click("other", "u2", "b", 4),
                              {"event_id": "end", "user_id": "u9", "item_id": "end", "event_type": "view",
                               "timestamp": start + 5}])
    follower = ExplorationFollower(settings, store, ["click"]).start()
    try:
        wait_until(lambda: "end" in clicks(), timeout=30)
    finally:
        follower.close()
    assert clicks() == {"a": 1, "b": 0, "end": 0}
    assert store.redis.hgetall(store.keys.key("clicks")) == {b"a": b"1"}  # raw, before reading clamps it to shown
    again = ExplorationFollower(settings, store, ["click"]).start()
    try:
        produce_events(settings, [click("e1", "u1", "a", 6), click("late", "u1", "b", 7)])
        wait_until(lambda: clicks().get("b") == 1, timeout=30)
    finally:
        again.close()
    assert clicks() == {"a": 1, "b": 1, "end": 0}


def test_a_click_that_reaches_the_broker_before_its_impression_is_credited(
        settings: Settings, store: ExplorationStore):
    """Serving sends impressions in batches, so a click made right after its answer can be read
    before the answer's impression. It was counted at once and never credited (7 of 20 such clicks
    counted); events now wait a grace period for their impressions."""
    create_topics(settings.kafka_bootstrap, [settings.topic, settings.impressions_topic], 1)
    follower = ExplorationFollower(settings, store, ["click"]).start()
    try:
        produce_events(settings, [{"event_id": "e1", "user_id": "u1", "item_id": "a", "event_type": "click",
                                   "timestamp": 1_700_000_000.0, "context": {"request_id": "r1"}}])
        time.sleep(0.5)  # read by now; its impression comes after it
        producer = make_producer(settings.kafka_bootstrap)
        for value in encode_records([{"request_id": "r1", "user_id": "u1", "items": ["a"], "timestamp": 1.0}]):
            producer.send(settings.impressions_topic, value)
        producer.flush()
        wait_until(lambda: "a" in store.fresh(100).ids.tolist(), timeout=30)
    finally:
        follower.close()
    fresh = store.fresh(100)
    assert dict(zip(fresh.ids.tolist(), zip(fresh.shown.tolist(), fresh.clicks.tolist()))) == {"a": (1, 1)}


def test_counters_set_by_hand_are_read_as_counts_never_negative(store: ExplorationStore):
    store.count(objects("neg", "half", "big"), np.array([5, 5, 5]), np.ones(3), 1.0,
                credits=credits(["neg", "half", "big"], [1, 1, 1]))
    store.redis.hset(store.keys.key("shown"), mapping={"neg": -1000, "big": "1" * 30})
    store.redis.hset(store.keys.key("clicks"), mapping={"half": "1.5", "big": -3})
    fresh = store.fresh(10)
    assert dict(zip(fresh.ids.tolist(), zip(fresh.shown.tolist(), fresh.clicks.tolist()))) == {
        "neg": (0, 0), "half": (5, 0), "big": (0, 0)}


def test_a_counter_edited_into_a_non_integer_does_not_stop_counting_nor_count_twice(store: ExplorationStore):
    """HINCRBY on a field set by hand to `1.5` failed in the middle of the counting script, after
    the writes before it (a script is not rolled back): the range was retried for ever, and the
    counts before the failing one were applied again at every retry."""
    store.count(objects("a", "b"), np.array([1, 1]), np.ones(2), 1.0, "t/0", 0, 1)
    store.redis.hset(store.keys.key("shown"), "b", "1.5")
    store.count(objects("a", "b"), np.array([2, 2]), np.ones(2), 1.0, "t/0", 1, 2)
    assert store.redis.hgetall(store.keys.key("shown")) == {b"a": b"3", b"b": b"2"}  # b restarts from its increment
    assert store.marks() == {"t/0": 2}


def test_keys_of_another_type_or_junk_numbers_neither_stop_counting_nor_count_twice(store: ExplorationStore):
    """A key of another type (written by hand, or by another program under the prefix) failed the
    counting script half-way, after its first writes (a script is not rolled back): the range was
    retried for ever, and its first counts applied again at every retry. So did a stored time that
    does not read as a number."""
    client, keys = store.redis, store.keys
    client.set(keys.key("shown"), "text")  # a string where a hash belongs
    client.hset(keys.key("fresh"), "a", "1")  # a hash where a sorted set belongs
    client.rpush(keys.key("clock"), "x")  # a list where a string belongs
    store.count(objects("a", "b"), np.array([1, 2]), np.array([1.0, 2.0]), 2.0, "t/0", 0, 1)
    assert client.hgetall(keys.key("shown")) == {b"a": b"1", b"b": b"2"}
    client.hset(keys.key("first"), "a", "junk")
    client.set(keys.key("clock"), "junk")
    store.count(objects("a", "b"), np.array([1, 1]), np.array([3.0, 3.0]), 3.0, "t/0", 1, 2)
    assert client.hgetall(keys.key("shown")) == {b"a": b"2", b"b": b"3"}
    assert store.marks() == {"t/0": 2} and set(store.fresh(10).ids.tolist()) == {"a", "b"}


def test_the_follower_outlives_a_whole_redis_cluster_outage(settings: Settings, redis_cluster: RedisCluster):
    """With no node of the cluster answering, redis-py raises RedisClusterException, which is no
    RedisError: it ended the follower's thread for good, and exploration and context slices
    stopped counting until the trainer restarted. Now the follower pauses and resumes from the
    store's marks (the nodes come back empty: everything is counted again from the topic)."""
    on_cluster = settings.model_copy(update={"redis_url": redis_cluster.url, "redis_cluster": True})
    create_topics(on_cluster.kafka_bootstrap, [on_cluster.topic, on_cluster.impressions_topic], 1)
    store = ExplorationStore.from_url(redis_cluster.url, f"t{uuid.uuid4().hex[:8]}", cluster=True)
    start = 1_700_000_000.0
    follower = ExplorationFollower(on_cluster, store, ["click"]).start()
    try:
        produce_events(on_cluster, [{"event_id": "e1", "user_id": "u1", "item_id": "a", "event_type": "click",
                                     "timestamp": start}])
        wait_until(lambda: "a" in store.fresh(100).ids.tolist(), timeout=30)
        ports = redis_cluster.alive()
        for port in ports:
            redis_cluster.kill(port, wait=False)
        produce_events(on_cluster, [{"event_id": "e2", "user_id": "u2", "item_id": "b", "event_type": "click",
                                     "timestamp": start + 1}])
        time.sleep(3 * RETRY_S)  # the follower meets the outage
        redis_cluster.start_again(ports)
        wait_until(lambda: set(store.fresh(100).ids.tolist()) == {"a", "b"}, timeout=60)
    finally:
        follower.close()
