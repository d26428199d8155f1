"""Rebuilding the feature store from the topic (the real broker and Redis): the same features as
the live writes, idempotent, resumable."""

from __future__ import annotations

import json
import os
import subprocess
from collections import Counter
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import pytest

from streamrec.core.config import Settings
from streamrec.param_server.client import ParamClient
from streamrec.stream.events import EventBatch, EventSchema, InvalidEvent
from streamrec.stream.reader import read_records
from streamrec.stream.topics import end_offsets
from streamrec.trainer.online.feature_rebuild import rebuild_features
from streamrec.trainer.online.feature_store import (
    FeatureStore,
    FeatureWrite,
)
from tests.conftest import settings_env
from tests.trainer_online.conftest import (
    STREAMREC,
    TOPIC_EVENTS,
)
from tests.trainer_online.test_feature_store_exactly_once import snapshot

N = TOPIC_EVENTS


def end_of_topic(settings: Settings) -> dict[str, int]:
    return {f"{settings.topic}/{p}": end
            for p, (_, end) in end_offsets(settings.kafka_bootstrap, settings.topic, [0, 1, 2]).items()}


def topic_batch(settings: Settings, start: Mapping[str, int] | None = None) -> EventBatch:
    """The topic's valid records (from `start` per partition key on) in event-time order, each
    event tagged with its partition key and offset: what the trainer consumes and writes."""
    schema = EventSchema.from_settings(settings)
    valid = []
    for record in read_records(settings.kafka_bootstrap, settings.topic):
        pkey = f"{record.topic}/{record.partition}"
        if start is not None and record.offset < start[pkey]:
            continue
        try:
            valid.append((schema.decode(record.value), pkey, record.offset))
        except InvalidEvent:
            continue
    valid.sort(key=lambda v: v[0]["timestamp"])
    events, origin, offsets = zip(*valid)
    return EventBatch.from_events(events).with_origin(np.array(origin, object), np.array(offsets))


def write_live(settings: Settings, store: FeatureStore, batch_events: int = 200) -> None:
    """The trainer's writes: batches of consecutive events, mixing the partitions."""
    batch = topic_batch(settings)
    for start in range(0, len(batch), batch_events):
        store.write(batch.take(slice(start, start + batch_events)))


def test_a_rebuild_reproduces_the_live_features(online_settings: Settings, topic_events: list[dict],
                                                new_store: Callable[[], FeatureStore]) -> None:
    live, rebuilt = new_store(), new_store()
    write_live(online_settings, live)
    until = end_of_topic(online_settings)
    assert sum(until.values()) == N + 3

    assert rebuild_features(online_settings, rebuilt, until, batch_events=300) == N  # the junk is skipped
    direct = Counter(e["item_id"] for e in topic_events)
    assert rebuilt.item_event_counts() == live.item_event_counts() == dict(direct)
    assert rebuilt.watermarks() == live.watermarks()
    for user in {e["user_id"] for e in topic_events}:
        mine = [e["item_id"] for e in topic_events if e["user_id"] == user]
        assert rebuilt.seen_items(user) == live.seen_items(user) == set(mine)
        assert rebuilt.recent_items(user) == live.recent_items(user) == mine[::-1][:100]
    assert rebuilt.clock() == live.clock()

    before = snapshot(rebuilt)
    assert rebuild_features(online_settings, rebuilt, until) == 0  # a second rebuild changes nothing
    assert rebuild_features(online_settings, live, until) == 0  # nor one over the live writes
    assert snapshot(rebuilt) == before


def test_a_rebuild_resumes_where_the_last_one_stopped(online_settings: Settings, topic_events: list[dict],
                                                      new_store: Callable[[], FeatureStore]) -> None:
    until = end_of_topic(online_settings)
    halfway = {pkey: end // 2 for pkey, end in until.items()}
    store = new_store()
    first = rebuild_features(online_settings, store, halfway)
    assert 0 < first < N and store.watermarks() == halfway
    assert first + rebuild_features(online_settings, store, until) == N
    assert store.item_event_counts() == dict(Counter(e["item_id"] for e in topic_events))


@pytest.mark.parametrize("lost", ["after-the-first-write", "after-the-watermarks-were-read"])
def test_a_store_that_loses_state_while_it_is_rebuilt_is_rebuilt_again(
        online_settings: Settings, topic_events: list[dict], new_store: Callable[[], FeatureStore],
        monkeypatch: pytest.MonkeyPatch, lost: str) -> None:
    """Redis restarts empty after the rebuild's first write, or after the rebuild read the
    watermarks it resumes from. The next write used to go on over the hole (the rebuild passed no
    floors and read no report): its watermarks moved past what was lost, and nothing noticed the
    gap. It is held and reported now, and the rebuild starts again."""
    store = new_store()
    until = end_of_topic(online_settings)
    if lost == "after-the-watermarks-were-read":
        rebuild_features(online_settings, store, {pkey: end // 2 for pkey, end in until.items()})
    write, read_watermarks, calls = store.write, store.watermarks, []

    def restarting_empty_after_the_first_write(*args: object, **kwargs: object) -> FeatureWrite:
        result = write(*args, **kwargs)
        calls.append(result)
        if len(calls) == 1:
            store.clear()
        return result

    def restarting_empty_after_the_first_read() -> dict[str, int]:
        marks = read_watermarks()
        monkeypatch.setattr(store, "watermarks", read_watermarks)
        store.clear()
        return marks
    if lost == "after-the-first-write":
        monkeypatch.setattr(store, "write", restarting_empty_after_the_first_write)
    else:
        monkeypatch.setattr(store, "watermarks", restarting_empty_after_the_first_read)
        monkeypatch.setattr(store, "write", lambda *a, **k: calls.append(write(*a, **k)) or calls[-1])
    rebuild_features(online_settings, store, until, batch_events=300)
    assert store.item_event_counts() == dict(Counter(e["item_id"] for e in topic_events))
    assert store.watermarks() == until
    assert any(result.missing for result in calls)  # the loss was seen, not written over


def test_a_wiped_store_holds_the_live_batch_until_rebuilt(online_settings: Settings, topic_events: list[dict],
                                                          new_store: Callable[[], FeatureStore]) -> None:
    until = end_of_topic(online_settings)
    halfway = {pkey: end // 2 for pkey, end in until.items()}
    store = new_store()
    rebuild_features(online_settings, store, halfway)
    store.clear()  # Redis restarted empty
    later = topic_batch(online_settings, start=halfway)  # the trainer's next batch
    floors = dict.fromkeys(until, 0)  # the topic holds every partition from offset 0
    assert store.write(later, floors=floors) == FeatureWrite(0, len(later), halfway)
    assert rebuild_features(online_settings, store, halfway) == sum(halfway.values()) - 3  # what the trainer does
    assert store.write(later, floors=floors) == FeatureWrite(len(later), 0, {})
    assert store.item_event_counts() == dict(Counter(e["item_id"] for e in topic_events))
    assert store.watermarks() == until


def test_a_partition_key_that_is_not_topic_slash_partition_is_refused(online_settings: Settings,
                                                                       new_store: Callable[[], FeatureStore]) -> None:
    with pytest.raises(ValueError, match="expected 'topic/partition'"):
        rebuild_features(online_settings, new_store(), {"no-partition": 10})


def test_the_rebuild_command_stops_where_every_parameter_server_shard_stands(
        online_settings: Settings, topic_events: list[dict], start_server, tmp_path: Path,
        new_store: Callable[[], FeatureStore]) -> None:
    def shard(index: int) -> list[str]:
        return ["--shard", str(index), "--num-shards", "2", "--checkpoint-dir", str(tmp_path / f"ckpt{index}"),
                "--checkpoint-every", "0"]

    a, b = start_server(*shard(0)), start_server(*shard(1))
    until = end_of_topic(online_settings)
    halfway = {pkey: end // 2 for pkey, end in until.items()}
    with ParamClient([a.address, b.address]) as client:
        client.push({}, ranges={pkey: (0, halfway[pkey]) for pkey in until})
        client.checkpoint()
        client.push({}, ranges={pkey: (halfway[pkey], end) for pkey, end in until.items()})
    b.kill()
    b = start_server(*shard(1))  # back from its checkpoint: behind shard a
    store = new_store()
    env = {**os.environ, **settings_env(online_settings), "STREAMREC_PARAM_SERVERS": f"{a.address},{b.address}",
           "STREAMREC_FEATURE_PREFIX": store.config.prefix}
    done = subprocess.run([STREAMREC, "features", "rebuild", "--json"], env=env, capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    assert result["until"] == result["watermarks"] == store.watermarks() == halfway
    assert result["events"] == sum(halfway.values()) - 3  # the three junk records lead the partitions
    assert sum(store.item_event_counts().values()) == result["events"]
