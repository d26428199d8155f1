"""Context slices (issue 17, cold start for new users): which slices an event falls into, their
counts in the real Redis (exactly once, bounded against hostile device values), the prequential
merit that decides whether serving uses a kind, and the trainer's follower on the real broker."""

from __future__ import annotations

import dataclasses
import json
import uuid

import numpy as np
import pytest
import redis
from click.testing import CliRunner

from streamrec.app.cli import cli
from streamrec.core.config import Settings
from streamrec.stream.events import EventBatch
from streamrec.stream.topics import create_topics
from streamrec.trainer.online.context_slices import (
    ALL,
    Merit,
    SliceConfig,
    event_slices,
    slice_counts,
)
from streamrec.trainer.online.exploration import ExplorationStore, MarkMoved
from streamrec.trainer.online.exploration_follower import ExplorationFollower
from tests.redis_cluster import RedisCluster
from tests.trainer_online.conftest import produce_events, wait_until

HOUR = 3600.0
DAY0 = 1_700_006_400.0  # a UTC midnight


def batch(items: list[str], hours: list[float], contexts: list[dict | None], kinds: list[str] | None = None,
          ) -> EventBatch:
    columns = EventBatch.from_columns(np.array([f"u{n}" for n in range(len(items))], object),
                                      np.array(items, object), np.array(kinds or ["click"] * len(items), object),
                                      np.array([DAY0 + h * HOUR for h in hours]))
    return dataclasses.replace(columns, context=np.array(contexts, object))


@pytest.fixture
def store(redis_url: str) -> ExplorationStore:
    prefix = f"t{uuid.uuid4().hex[:8]}"
    yield ExplorationStore.from_url(redis_url, prefix, slices=SliceConfig(max_slices=4, slice_items=3))
    client = redis.Redis.from_url(redis_url)
    for key in client.scan_iter(f"{prefix}:*"):
        client.delete(key)


def test_an_event_falls_into_all_its_daypart_and_its_device():
    events = batch(["a", "b", "c", "d", "e"], [1, 13, 13, 20, 7],
                   [None, {"device": "ios"}, {"device": "x" * 10_000, "hour": 2}, {"device": 7}, {"hour": 99}],
                   ["click", "click", "click", "click", "skip"])
    rows = event_slices(events, events.event_type == "click")
    got = sorted(zip(rows["item"], rows["slice"]))
    assert got == sorted([("a", ALL), ("a", "daypart=0"),  # 01:00 UTC: night
                          ("b", ALL), ("b", "daypart=2"), ("b", "device=ios"),
                          ("c", ALL), ("c", "daypart=0"), ("c", "device=other"),  # the context's hour; junk device
                          ("d", ALL), ("d", "daypart=3"), ("d", "device=other")])  # a skip is not counted


def test_slices_are_counted_once_per_range_bounded_and_trimmed(store: ExplorationStore):
    events = batch(["a", "a", "b", "c", "d"], [13, 14, 13, 13, 13],
                   [{"device": "ios"}, {"device": "ios"}, {"device": "web"}, {"device": "tv"}, {"device": "car"}])
    counts = slice_counts(event_slices(events, np.ones(5, bool)), store.slice_config.half_life_s, {})
    nothing = np.empty(0, object)
    store.count(nothing, np.zeros(0), np.zeros(0), DAY0, "t/0", 0, 5, counts)
    with pytest.raises(MarkMoved):  # the same range again (a reader that died before moving on)
        store.count(nothing, np.zeros(0), np.zeros(0), DAY0, "t/0", 0, 5, counts)
    tops = store.slice_tops(10)
    # 4 names: all, daypart=2, device=ios, device=web; tv and car came later and count as other
    assert set(tops.lists) == {ALL, "daypart=2", "device=ios", "device=web", "device=other"}
    assert tops.events == {ALL: 5, "daypart=2": 5, "device=ios": 2, "device=web": 1, "device=other": 2}
    assert tops.lists["device=ios"][0].tolist() == ["a"] and set(tops.lists["device=other"][0]) == {"c", "d"}
    assert len(tops.lists[ALL][0]) == 3  # trimmed to slice_items, the most popular kept first
    assert tops.lists[ALL][0][0] == "a" and tops.mass[ALL] == pytest.approx(tops.lists[ALL][1].sum()
                                                                                + tops.lists[ALL][1][-1], 1e-6)  # d trimmed


def test_later_events_weigh_more_with_the_half_life(store: ExplorationStore):
    half_life = store.slice_config.half_life_s
    old, new = batch(["old"] * 3, [0, 0, 0], [None] * 3), batch(["new"] * 2, [half_life / HOUR * 2] * 2, [None] * 2)
    nothing = np.empty(0, object)
    for n, events in enumerate((old, new)):
        store.count(nothing, np.zeros(0), np.zeros(0), DAY0, "t/0", n, n + 1,
                    slice_counts(event_slices(events, np.ones(len(events), bool)), half_life, {}))
    ids, scores = store.slice_tops(10).lists[ALL]
    assert ids.tolist() == ["new", "old"] and scores[0] / scores[1] == pytest.approx(2 * 4 / 3)


def test_slice_weights_stay_finite_across_decades_of_event_time(store: ExplorationStore):
    """The weights are 2^((t - landmark) / half_life), which overflows 1,024 half-lives past the
    landmark (20 years at a week): a slice count from 1995 and then today made them infinite."""
    half_life, nothing = store.slice_config.half_life_s, np.empty(0, object)
    decades = (1_760_000_000.0 - 788_918_400.0) / HOUR  # 1995 to 2025, as hours after DAY0
    counts = [batch(["old"], [788_918_400.0 / HOUR - DAY0 / HOUR], [None]),
              batch(["new", "new", "spans"], [decades, decades, decades - 24 * 7], [None] * 3)]
    for n, events in enumerate(counts):
        store.count(nothing, np.zeros(0), np.zeros(0), DAY0, "t/0", n, n + 1,
                    slice_counts(event_slices(events, np.ones(len(events), bool)), half_life, {}))
    tops = store.slice_tops(10)
    ids, scores = tops.lists[ALL]
    assert ids.tolist() == ["new", "spans", "old"] and np.isfinite(scores).all() and np.isfinite(tops.mass[ALL])
    assert scores[0] / scores[1] == pytest.approx(4.0) and scores[2] < 1e-300


def test_the_merit_counts_hits_of_the_slice_against_hits_of_all():
    events = batch(["a", "b", "c"], [13, 13, 1], [{"device": "ios"}, {"device": "ios"}, None])
    tops = {ALL: np.array(["b"], object), "device=ios": np.array(["a", "b"], object), "daypart=2": np.array([], object)}
    counts = slice_counts(event_slices(events, np.ones(3, bool)), 86_400.0, tops)
    merit = {kind: (events, hits, reference) for kind, events, hits, reference in zip(
        counts.merit_kinds, counts.merit_events, counts.merit_hits, counts.merit_reference_hits)}
    assert merit == {"daypart": (3, 0, 1), "device": (2, 2, 1)}
    assert Merit(1000, 300, 200).useful() and not Merit(1000, 210, 200).useful() and not Merit(10, 0, 5).useful()


def test_the_follower_counts_slices_and_merit_exactly_once(settings: Settings, store: ExplorationStore):
    create_topics(settings.kafka_bootstrap, [settings.topic, settings.impressions_topic], 1)
    # each device has its own 12 items: a device's top 10 holds most of its next item, the global
    # top 10 (of 24 items) about half as often
    events = [{"event_id": f"e{n}", "user_id": f"u{n}", "item_id": f"{device}-{n // 2 % 12}",
               "event_type": "click", "timestamp": DAY0 + 13 * HOUR + n, "context": {"device": device}}
              for n, device in zip(range(240), ["ios", "tv"] * 120)]
    produce_events(settings, events[:120])
    follower = ExplorationFollower(settings, store, ["click"]).start()
    try:
        wait_until(lambda: store.slice_tops(10).events.get(ALL) == 120, timeout=30)
        produce_events(settings, events[120:])
        wait_until(lambda: store.slice_tops(10).events.get(ALL) == 240, timeout=30)
    finally:
        follower.close()
    again = ExplorationFollower(settings, store, ["click"]).start()  # a restart reads from the marks
    try:
        produce_events(settings, [{**events[0], "event_id": "last", "timestamp": DAY0 + 14 * HOUR}])
        wait_until(lambda: store.slice_tops(10).events.get(ALL) == 241, timeout=30)
    finally:
        again.close()
    tops = store.slice_tops(20)
    assert tops.events == {ALL: 241, "daypart=2": 241, "device=ios": 121, "device=tv": 120}
    assert {item.split("-")[0] for item in tops.lists["device=ios"][0]} == {"ios"}
    device, daypart = tops.merit["device"], tops.merit["daypart"]
    assert device.events == daypart.events == 241
    assert device.useful() and not daypart.useful()  # one daypart for all: no better than the global list
    assert tops.useful_kinds() == {"device"}
    shown = CliRunner().invoke(cli, ["--redis-url", settings.redis_url, "features", "slices", "--top", "2", "--json"],
                               env={"STREAMREC_FEATURE_PREFIX": store.keys.prefix}, catch_exceptions=False)
    assert shown.exit_code == 0, shown.output
    report = json.loads(shown.output)
    assert report["merit"]["device"]["used"] and not report["merit"]["daypart"]["used"]
    assert report["merit"]["device"]["hit@10"] > report["merit"]["device"]["reference_hit@10"]
    assert report["slices"]["device=tv"]["events"] == 120 and len(report["slices"]["device=tv"]["top"]) == 2


def test_slices_count_on_a_redis_cluster(redis_cluster: RedisCluster):
    store = ExplorationStore.from_url(redis_cluster.url, "sr", cluster=True)
    events = batch(["a", "b"], [13, 13], [{"device": "ios"}, None])
    nothing = np.empty(0, object)
    store.count(nothing, np.zeros(0), np.zeros(0), DAY0, "t/0", 0, 2,
                slice_counts(event_slices(events, np.ones(2, bool)), store.slice_config.half_life_s, {}))
    tops = store.slice_tops(10)
    assert tops.events == {ALL: 2, "daypart=2": 2, "device=ios": 1}
    assert tops.lists["device=ios"][0].tolist() == ["a"]
