"""The same event id twice on the topic is learned once, by one trainer and across a trainer restart;
the second copy goes to the dead-letter topic with reason `duplicate_event_id`. The decision is a
function of the topic alone, so a replay from any shard's state decides alike."""

from __future__ import annotations

import time

import numpy as np
import orjson

from streamrec.param_server.store import merge_meta
from streamrec.stream.deadletter import read_dead_letter
from streamrec.stream.events import EventBatch
from streamrec.stream.kafka import make_consumer
from streamrec.trainer.online.dedup import META_KEY, REASON, SPAN_EVENTS, EventIdWindow, hash_ids
from tests.trainer_online.conftest import (
    TrainerProcess,
    applied,
    planted_events,
    produce_events,
    wait_until,
)
from tests.trainer_online.test_exactly_once import shard_counts_match


def stream(ids: list[str], first_offset: int = 0, pkey: str = "t/0") -> EventBatch:
    n = len(ids)
    batch = EventBatch.from_columns(np.full(n, "u", object), np.full(n, "i", object), np.full(n, "click", object),
                                    np.full(n, 1.7e9))
    batch = EventBatch(batch.user_id, batch.item_id, batch.event_type, batch.value, batch.timestamp,
                       np.array(ids, object), batch.context)
    return batch.with_origin(np.full(n, pkey, object), np.arange(first_offset, first_offset + n))


def test_a_repeat_within_a_batch_and_across_batches_is_a_duplicate():
    window = EventIdWindow()
    first = stream(["a", "b", "a", "c"])
    duplicate, previous = window.duplicates(first)
    assert duplicate.tolist() == [False, False, True, False] and previous[2] == 0
    window.record(first)
    later = stream(["c", "d", "b"], first_offset=10)
    duplicate, previous = window.duplicates(later)
    assert duplicate.tolist() == [True, False, True] and previous.tolist() == [3, -1, 1]
    other_partition = stream(["a"], first_offset=20, pkey="t/1")
    assert not window.duplicates(other_partition)[0].any()  # serving keys by user: copies share a partition


def test_the_window_is_bounded_and_relative_to_the_record():
    window = EventIdWindow(window_events=2 * SPAN_EVENTS)  # two spans
    window.record(stream(["old"]))
    far = stream(["old"], first_offset=2 * SPAN_EVENTS)  # its window starts at span 1: offset 0 is out
    near = stream(["old"], first_offset=2 * SPAN_EVENTS - 1)
    assert not window.duplicates(far)[0].any() and window.duplicates(near)[0].all()


def test_decisions_match_the_rule_checked_pair_by_pair():
    """Random ids over many batches in shuffled row order, with a window of a few spans: each row is
    a duplicate exactly when its id occurs at an offset in [start(o), o), and `previous` is the
    latest such offset (the rule of dedup.py, checked against every earlier record one by one)."""
    rng = np.random.default_rng(7)
    slots = 3
    window = EventIdWindow(window_events=slots * SPAN_EVENTS)
    ids = [f"e{n}" for n in rng.integers(0, 400, 6 * SPAN_EVENTS)]
    for first in range(0, len(ids), 700):
        batch = stream(ids[first:first + 700], first)
        batch = batch.take(rng.permutation(len(batch)))
        duplicate, previous = window.duplicates(batch)
        for row, (event_id, offset) in enumerate(zip(batch.event_id.tolist(), batch.offset.tolist())):
            start = (offset // SPAN_EVENTS - (slots - 1)) * SPAN_EVENTS
            earlier = [o for o in range(max(start, 0), offset) if ids[o] == event_id]
            assert duplicate[row] == bool(earlier) and previous[row] == (earlier[-1] if earlier else -1)
        window.record(batch)


def test_a_restored_window_decides_a_replay_exactly_as_the_first_run():
    """Two shards: one stands at offset 1500, one at 900 (it missed pushes). The restored window
    comes from the one further back, and replaying 900.. gives the first run's decisions."""
    rng = np.random.default_rng(3)
    ids = [f"e{n}" for n in rng.integers(0, 1200, 1500)]  # many repeats, near and far
    window = EventIdWindow(window_events=1024)
    shards: list[dict] = [{}, {}]
    decided = []
    for start in range(0, 1500, 100):
        batch = stream(ids[start:start + 100], start)
        decided.append(window.duplicates(batch)[0])
        delta = {"offsets": {"t/0": start + 100}, META_KEY: window.record(batch)}
        for n, shard in enumerate(shards):
            if n == 0 or start + 100 <= 900:
                shards[n] = merge_meta(shard, delta)
    restored = EventIdWindow(window_events=1024)
    restored.restore([{"meta": shards[0]}, {"meta": shards[1]}], ["t/0"])
    replayed = []
    for start in range(900, 1500, 100):
        batch = stream(ids[start:start + 100], start)
        replayed.append(restored.duplicates(batch)[0])
        restored.record(batch)
    assert np.concatenate(replayed).tolist() == np.concatenate(decided[9:]).tolist()
    assert np.concatenate(decided).sum() > 100  # the stream did hold duplicates


def duplicate_letters(bootstrap: str, dlq: str, at_least: int) -> list[dict]:
    consumer = make_consumer(bootstrap)
    try:
        consumer.assign([(dlq, p) for p in range(3)])
        letters: list[dict] = []
        deadline = time.monotonic() + 60
        while len(letters) < at_least and time.monotonic() < deadline:
            letters.extend(read_dead_letter(r.value) for r in consumer.poll(timeout_s=0.5))
        letters.extend(read_dead_letter(r.value) for r in consumer.poll(timeout_s=1.0))
        return [letter for letter in letters if letter["reason"] == REASON]
    finally:
        consumer.close()


def test_copies_on_the_topic_are_applied_once_across_a_trainer_restart(online_settings, start_server, tmp_path):
    server = start_server("--no-checkpoints")
    events = planted_events(600)
    produce_events(online_settings, events[:400])
    first = TrainerProcess(online_settings, server.address, tmp_path / "r1.json", "--no-feature-store")
    wait_until(lambda: applied(server.address) >= 400, timeout=120)
    first.kill()
    # re-sends of events the killed trainer learned, new events, and a copy of a new one
    produce_events(online_settings, events[100:200] + events[400:600] + [events[450]])
    last = TrainerProcess(online_settings, server.address, tmp_path / "r2.json", "--no-feature-store",
                          "--idle-exit", "8")
    last.wait(timeout=240)
    shard_counts_match(server.address, events)  # every event applied once, none of the 101 copies
    letters = duplicate_letters(online_settings.kafka_bootstrap, online_settings.dlq_topic, 101)
    copied = sorted(orjson.loads(letter["raw"])["event_id"] for letter in letters)
    assert copied == sorted(e["event_id"] for e in events[100:200] + [events[450]])


def test_event_id_hashes_are_pinned_because_the_meta_record_keeps_them_across_versions():
    """A restarted trainer compares new ids against hashes an earlier version wrote into the
    parameter server's meta record, so the hash of an id must never change (these were printed
    by the version that factorized ids before hashing, and by the one that does not)."""
    ids = np.array(["e-1", "u:1:click", "é", ""], object)
    assert hash_ids(ids).tolist() == [12489684386117361974, 8201278672224796638, 16908809132758853863,
                                      1760245841805064774]
