"""Replaying logs: MovieLens 100K end to end through the broker, formats, pacing, determinism."""

from __future__ import annotations

import json
import time
from collections import defaultdict

import pytest

from streamrec.stream.events import EventSchema
from streamrec.stream.loaders import load_log, parse_map_option
from streamrec.stream.publish import EventPublisher
from streamrec.stream.reader import read_records
from streamrec.stream.replay import replay
from streamrec.stream.topics import create_topics, describe_topic


def test_movielens_replay_through_broker(settings, ml100k, kafka_client):
    settings = settings.model_copy(update={"kafka_client": kafka_client})
    create_topics(settings.kafka_bootstrap, [settings.topic, settings.dlq_topic], 3)
    log = load_log(ml100k, "ml-100k")
    publisher = EventPublisher.from_settings(settings, "test")
    result = replay(log, publisher)
    publisher.close()
    assert result.produced == 100_000 and result.dead_lettered == 0
    assert result.first_timestamp == log.timestamp.min() and result.last_timestamp == log.timestamp.max()

    info = describe_topic(settings.kafka_bootstrap, settings.topic)
    assert info["messages"] == 100_000

    records = read_records(settings.kafka_bootstrap, settings.topic, kafka_client)
    assert len(records) == 100_000
    schema = EventSchema()
    per_user: dict[str, list[tuple[int, int, float]]] = defaultdict(list)
    ids = []
    for r in records:
        event = schema.decode(r.value)
        assert r.key == event["user_id"].encode()
        assert r.timestamp_ms == int(event["timestamp"] * 1000)
        assert event["event_type"] == "rating" and 1 <= event["value"] <= 5
        per_user[event["user_id"]].append((r.partition, r.offset, event["timestamp"]))
        ids.append(event["event_id"])
    assert len(per_user) == 943
    for rows in per_user.values():
        assert len({p for p, _, _ in rows}) == 1  # one user, one partition
        in_offset_order = [ts for _, _, ts in sorted(rows)]
        assert in_offset_order == sorted(in_offset_order)  # per-user timestamp order
    assert len(set(ids)) == 100_000
    assert sorted(ids) == sorted(load_log(ml100k, "ml-100k").event_ids())  # deterministic ids


def test_log_order_and_ties(tmp_path):
    path = tmp_path / "log.csv"
    path.write_text("user_id,item_id,rating,timestamp\n10,5,4,900000000\n9,7,3,900000000\n9,12,3,900000000\n2,1,5,899999999\n")
    log = load_log(path, "csv")
    assert list(zip(log.user_id, log.item_id)) == [("2", "1"), ("9", "7"), ("9", "12"), ("10", "5")]
    assert log.event_ids() == load_log(path, "csv").event_ids()


def test_formats_and_mapping(tmp_path):
    latest = tmp_path / "ratings.csv"
    latest.write_text("userId,movieId,rating,timestamp\n1,31,2.5,1260759144\n1,1029,3.0,1260759179\n")
    log = load_log(tmp_path, "ml-latest")
    assert log.item_id.tolist() == ["31", "1029"] and log.rating.tolist() == [2.5, 3.0]

    custom = tmp_path / "clicks.csv"
    custom.write_text("who,what,when,kind\nalice,a-1,1700000000,click\nbob,b-2,1700000001,purchase\n")
    log = load_log(custom, "csv", parse_map_option(["user_id=who,item_id=what", "timestamp=when,event_type=kind"]))
    assert log.user_id.tolist() == ["alice", "bob"] and not log.has_ratings
    assert log.event_types().tolist() == ["click", "purchase"]

    jsonl = tmp_path / "events.jsonl"
    jsonl.write_text("\n".join(json.dumps({"user_id": f"u{i}", "item_id": "x", "timestamp": 1.7e9 + i}) for i in range(3)))
    log = load_log(jsonl, "jsonl")
    assert len(log) == 3 and log.event_types().tolist() == ["view"] * 3

    with pytest.raises(ValueError, match="user_id"):
        load_log(custom, "csv")
    with pytest.raises(ValueError, match="bad --map"):
        parse_map_option(["user_id"])


def test_paced_replay_takes_event_time_over_speed(settings, tmp_path):
    path = tmp_path / "paced.csv"
    base = 1_700_000_000
    path.write_text("user_id,item_id,timestamp\n" + "".join(f"u{i},i{i},{base + 10 * i}\n" for i in range(11)))
    create_topics(settings.kafka_bootstrap, [settings.topic, settings.dlq_topic], 1)
    publisher = EventPublisher.from_settings(settings, "test")
    start = time.monotonic()
    result = replay(load_log(path, "csv"), publisher, speed=100.0)  # 100 s of event time -> 1 s
    elapsed = time.monotonic() - start
    publisher.close()
    assert result.produced == 11
    assert 0.9 <= elapsed < 3.0


def test_invalid_rows_of_a_log_are_dead_lettered(settings, tmp_path):
    path = tmp_path / "old.csv"
    path.write_text("user_id,item_id,timestamp\nu1,i1,1700000000\nu2,i2,100\n")  # 1970: too old
    create_topics(settings.kafka_bootstrap, [settings.topic, settings.dlq_topic], 1)
    publisher = EventPublisher.from_settings(settings, "test")
    result = replay(load_log(path, "csv"), publisher, limit=None)
    publisher.close()
    assert (result.produced, result.dead_lettered) == (1, 1)
    letters = read_records(settings.kafka_bootstrap, settings.dlq_topic)
    assert len(letters) == 1
    assert json.loads(letters[0].value)["source"] == {"file": str(path), "row": 0}  # time order: first
