"""The online trainer against the real broker, Redis and parameter server."""

from __future__ import annotations

import math
import threading
from collections import Counter, defaultdict

import numpy as np
import orjson
import pytest

from streamrec.param_server.client import ParamClient
from streamrec.stream.deadletter import read_dead_letter
from streamrec.stream.events import EventBatch
from streamrec.stream.kafka import make_producer
from streamrec.stream.reader import read_records
from streamrec.trainer.online.feature_store import (
    WINDOWS,
    FeatureStore,
    FeatureStoreConfig,
)
from streamrec.trainer.online.metrics import FEATURE_ERRORS
from streamrec.trainer.online.models import OnlineBPR, OnlineMF
from streamrec.trainer.online.trainer import OnlineTrainer, TrainerConfig
from tests.trainer_online.conftest import (
    TrainerProcess,
    applied,
    planted_events,
    produce_events,
    unique_prefix,
    wait_until,
)


def run_trainer(settings, address: str, **config) -> OnlineTrainer:
    client = ParamClient([address])
    trainer = OnlineTrainer(settings, [OnlineBPR(store=client), OnlineMF(store=client)],
                            TrainerConfig(idle_exit_seconds=3.0, batch_events=500, **config))
    trainer.run()
    return trainer


def test_an_idle_exit_counts_from_the_first_assignment(online_settings, start_server):
    """A trainer whose idle exit is shorter than its group's first assignment takes (Kafka holds a
    new group's for 3 s; over a second here) stopped before it had a partition, having read
    nothing of a full topic. CI's loaded machine did that to a 2 s idle exit now and then."""
    server = start_server("--no-checkpoints")
    produce_events(online_settings, planted_events(300))
    client = ParamClient([server.address])
    trainer = OnlineTrainer(online_settings, [OnlineBPR(store=client)], TrainerConfig(idle_exit_seconds=1.0))
    trainer.run()
    assert trainer.report()["consumed"] == 300


def test_learning_happens_on_planted_structure(online_settings, start_server):
    server = start_server("--no-checkpoints")
    events = planted_events(6000)
    produce_events(online_settings, events)
    trainer = run_trainer(online_settings, server.address, evaluate_every=1)
    report = trainer.report()
    assert report["consumed"] == report["applied"] == 6000
    # every event is due; each (user, item) pair is evaluated at its first event only: repeats
    # are re-consumptions, learned but not evaluated, whatever order the partitions interleave in
    first_times = len({(e["user_id"], e["item_id"]) for e in events})
    assert report["prequential"]["evaluated"] == first_times < 6000
    series = report["prequential"]["series"]  # a point per 500 evaluated events
    assert len(series) == first_times // 500
    early, late = series[0]["hr@10"], series[-1]["hr@10"]
    # 100 items, a user's cluster holds 25: popularity alone gives ~0.1; learning the clusters ~0.4
    assert late > 0.3 and late > early + 0.1, series
    assert applied(server.address) == 6000


def test_a_rating_far_off_the_scale_is_learned_without_stopping_the_trainer(online_settings, start_server):
    """A rating event valued 1e30 passes the schema (a finite number). Online MF's update from it was
    non-finite, the parameter server refused the push, and the trainer took that for an outage and
    retried the same batch for ever: one hostile event stopped all learning."""
    server = start_server("--no-checkpoints")
    events = [{**event, "event_type": "rating", "value": float(1 + n % 5)} for n, event in enumerate(planted_events(400))]
    events[150]["value"], events[250]["value"] = 1e30, 1.7e308
    produce_events(online_settings, events)
    trainer = run_trainer(online_settings, server.address)
    assert trainer.stats.applied == 400 and trainer.stats.dead_lettered == 0
    client = ParamClient([server.address])
    mf = OnlineMF(store=client)
    for table in (mf.user_table, mf.item_table):
        ids = sorted({e["user_id" if table == mf.user_table else "item_id"] for e in events})
        assert np.isfinite(client.pull(table, ids).values).all(), table


def test_a_record_too_large_to_dead_letter_whole_does_not_stop_the_trainer(online_settings, start_server):
    """800 kB of junk with a 100 kB key, written straight to the topic as any producer can: its
    dead letter exceeded the producer's 1 MiB cap and the trainer died on it at every restart."""
    server = start_server("--no-checkpoints")
    with make_producer(online_settings.kafka_bootstrap) as producer:
        producer.send(online_settings.topic, b"\x00junk" * 160_000, b"k" * 100_000)
        producer.flush()
    produce_events(online_settings, planted_events(20))
    trainer = run_trainer(online_settings, server.address)
    assert trainer.stats.applied == 20 and trainer.stats.dead_lettered == 1
    [record] = read_records(online_settings.kafka_bootstrap, online_settings.dlq_topic)
    letter = read_dead_letter(record.value)
    assert letter["reason"] == "not_json" and letter["raw_truncated"] and letter["raw_size"] == 800_000
    assert len(record.key) == 1024


def test_tombstones_and_junk_at_the_head_of_every_partition_are_dead_lettered_and_the_rest_learned(
        online_settings, start_server, redis_url):
    """A tombstone (a record whose value is null, as any Kafka producer can write) killed the
    trainer while it wrote the dead letter, at every restart. Records the schema refuses at the
    head of a partition left the feature store without a watermark for it after a rebuild that
    found no event there: the trainer rebuilt again, 17 times a second, for ever (and SIGTERM
    could not stop it)."""
    server = start_server("--no-checkpoints")
    with make_producer(online_settings.kafka_bootstrap) as producer:
        for partition in range(3):
            producer.send(online_settings.topic, None, b"t", partition=partition)  # type: ignore[arg-type]
            producer.send(online_settings.topic, b"not json", b"j", partition=partition)
        producer.flush()
    events = planted_events(60)
    produce_events(online_settings, events)
    store = FeatureStore.from_url(redis_url, FeatureStoreConfig(prefix=unique_prefix()))
    client = ParamClient([server.address])
    trainer = OnlineTrainer(online_settings, [OnlineBPR(store=client)],
                            TrainerConfig(idle_exit_seconds=3.0, batch_events=500), store)
    worker = threading.Thread(target=trainer.run)
    worker.start()
    worker.join(60)
    alive = worker.is_alive()
    trainer.stop_requested.set()
    worker.join(30)
    try:
        assert not alive, "the trainer did not finish the topic"
        assert trainer.stats.applied == 60 and trainer.stats.dead_lettered == 6
        letters = [read_dead_letter(r.value)
                   for r in read_records(online_settings.kafka_bootstrap, online_settings.dlq_topic)]
        assert Counter(letter["reason"] for letter in letters) == {"null_value": 3, "not_json": 3}
        assert [letter.get("raw_null", False) for letter in letters] == [
            letter["reason"] == "null_value" for letter in letters]
        assert sum(store.item_event_counts().values()) == 60  # every event written once
        assert len(store.watermarks()) == 3
    finally:
        store.clear()


def test_updates_the_server_refuses_stop_the_trainer_instead_of_a_retry_loop(online_settings, start_server):
    """A learner that produces a non-finite update (fault injected: the learners themselves clip
    what could) is refused by the parameter server's check. That refusal was taken for an outage
    and the batch retried for ever under "parameter server unavailable" warnings."""
    from streamrec.trainer.online.trainer import UpdatesRefused

    class Broken(OnlineBPR):
        def _learn(self, batch, rows, before_step):
            updates, stats = super()._learn(batch, rows, before_step)
            ids, gradients = updates[self.item_table]
            return {**updates, self.item_table: (ids, np.full_like(gradients, np.nan))}, stats

    server = start_server("--no-checkpoints")
    produce_events(online_settings, planted_events(50))
    client = ParamClient([server.address])
    trainer = OnlineTrainer(online_settings, [Broken(store=client)], TrainerConfig(idle_exit_seconds=3.0))
    with pytest.raises(UpdatesRefused, match="refused this batch's updates .*NaN or infinite"):
        trainer.run()
    assert applied(server.address) == 0


def test_dead_letters_and_keeps_running(online_settings, start_server):
    server = start_server("--no-checkpoints")
    good = planted_events(50)
    with make_producer(online_settings.kafka_bootstrap) as producer:
        for n, event in enumerate(good):
            producer.send(online_settings.topic, orjson.dumps(event), event["user_id"].encode())
            if n % 10 == 0:
                producer.send(online_settings.topic, b"{broken json", b"x")
        producer.send(online_settings.topic, orjson.dumps({**good[0], "event_type": "teleport"}), b"y")
        producer.flush()
    trainer = run_trainer(online_settings, server.address)
    assert trainer.stats.applied == 50 and trainer.stats.dead_lettered == 6
    letters = [read_dead_letter(r.value) for r in read_records(online_settings.kafka_bootstrap, online_settings.dlq_topic)]
    assert Counter(letter["reason"] for letter in letters) == {"not_json": 5, "unknown_event_type": 1}
    assert all(letter["source"]["topic"] == online_settings.topic and letter["component"] == "trainer" for letter in letters)


def test_sigkill_mid_stream_resumes_from_committed_offsets(online_settings, start_server, tmp_path):
    server = start_server("--no-checkpoints")
    events = planted_events(20000)
    produce_events(online_settings, events)
    first = TrainerProcess(online_settings, server.address, tmp_path / "r1.json")
    wait_until(lambda: applied(server.address) >= 4000, timeout=120)
    first.kill()  # mid-stream, no chance to commit or flush anything
    killed_at = applied(server.address)
    assert 0 < killed_at < 20000
    # the killed member holds its partitions until its session times out: wait through the rebalance
    second = TrainerProcess(online_settings, server.address, tmp_path / "r2.json", "--idle-exit", "10")
    second.wait()
    # every produced event applied exactly once: the uncommitted batch is skipped by the server
    assert applied(server.address) == 20000
    described = read_records(online_settings.kafka_bootstrap, online_settings.topic)
    assert len(described) == 20000


def test_param_server_restored_from_checkpoint_trainer_resumes(online_settings, start_server, tmp_path):
    ckpt = tmp_path / "ckpt"
    server = start_server("--checkpoint-dir", str(ckpt), "--checkpoint-every", "0")
    produce_events(online_settings, planted_events(3000))
    run_trainer(online_settings, server.address)
    with ParamClient([server.address]) as client:
        client.checkpoint()  # state + offsets of the first 3000 events
    produce_events(online_settings, planted_events(2000, seed=1, start=1_700_100_000.0))
    run_trainer(online_settings, server.address)
    assert applied(server.address) == 5000
    server.kill()  # the last 2000 events' updates were never checkpointed: lost with the process
    restarted = start_server("--checkpoint-dir", str(ckpt), "--checkpoint-every", "0")
    assert restarted.ready["restored"] is not None
    assert applied(restarted.address) == 3000
    # the group committed 5000, the server holds offsets of 3000: the trainer rewinds and re-learns
    run_trainer(online_settings, restarted.address)
    assert applied(restarted.address) == 5000


@pytest.mark.parametrize("warmup_events", [300_000, 300, 0])
def test_a_restarted_trainer_scores_with_the_histories_and_sessions_of_earlier_events(
        online_settings, start_server, warmup_events):
    """A new trainer process resumes where the parameter server stands, after re-reading (not
    re-learning) up to `warmup_events` records before it, split over the partitions: its scorer
    knows those users' earlier items (a repeat of one is a re-consumption, not scored) and
    online-bpr their sessions. With 0 it knows only what it consumed itself."""
    server = start_server("--no-checkpoints")
    before, after = planted_events(3000), planted_events(1000, seed=1, start=1_700_001_500.0)
    produce_events(online_settings, before)
    run_trainer(online_settings, server.address, evaluate_every=1)
    produce_events(online_settings, after)
    restarted = run_trainer(online_settings, server.address, evaluate_every=1, warmup_events=warmup_events)
    assert restarted.report()["consumed"] == 1000 and applied(server.address) == 4000
    earlier: dict[int, list[dict]] = defaultdict(list)  # partition -> its `before` events in offset order
    for record in read_records(online_settings.kafka_bootstrap, online_settings.topic):
        event = orjson.loads(record.value)
        if not event["event_id"].startswith("s1"):
            earlier[record.partition].append(event)
    assert sum(map(len, earlier.values())) == 3000 and len(earlier) == 3
    reread = [e for events in earlier.values() for e in events[len(events) - warmup_events // 3:]] if warmup_events else []
    known = {(e["user_id"], e["item_id"]) for e in reread}
    first_times = 0
    for e in after:  # a user's events share a partition: their order holds
        first_times += (e["user_id"], e["item_id"]) not in known
        known.add((e["user_id"], e["item_id"]))
    assert restarted.report()["prequential"]["evaluated"] == first_times
    events = Counter(e["user_id"] for e in reread + after)
    sessions = restarted.models[0].sessions  # the events are 0.5 s apart: one session per user
    assert {user: sessions.events_of(user) for user in events} == dict(events)


def test_two_trainers_in_one_group_split_the_work(online_settings, start_server, tmp_path):
    server = start_server("--no-checkpoints")
    a = TrainerProcess(online_settings, server.address, tmp_path / "a.json", "--idle-exit", "6")
    b = TrainerProcess(online_settings, server.address, tmp_path / "b.json", "--idle-exit", "6")
    wait_until(lambda: a.report() is not None and b.report() is not None, timeout=60)
    produce_events(online_settings, planted_events(6000))
    a.wait()
    b.wait()
    ra, rb = a.report(), b.report()
    assert ra["consumed"] > 0 and rb["consumed"] > 0
    assert ra["consumed"] + rb["consumed"] == 6000
    assert applied(server.address) == 6000


def test_feature_store_after_replay_matches_direct_computation(redis_url):
    config = FeatureStoreConfig(prefix=unique_prefix(), recent_cap=5, popularity_half_life=3600.0)
    store = FeatureStore.from_url(redis_url, config)
    rng = np.random.default_rng(3)
    n = 700
    users = np.array([f"u{i}" for i in rng.integers(0, 12, n)], object)
    items = np.array([f"i{i}" for i in rng.integers(0, 30, n)], object)
    times = 1_700_000_000.0 + np.sort(rng.uniform(0, 7200, n))
    for chunk in np.array_split(np.arange(n), 7):  # several batches, as the trainer writes them
        store.write(EventBatch.from_columns(users[chunk], items[chunk], np.full(len(chunk), "view", object),
                                            times[chunk]))
    try:
        assert store.clock() == pytest.approx(times.max())
        history = defaultdict(list)
        for u, i in zip(users, items):
            history[u].append(i)
        for u, seq in history.items():
            assert store.recent_items(u) == seq[::-1][:5]
            assert store.seen_items(u) == set(seq)
            assert store.entity("u", u)["events"] == len(seq)
        landmark = times.min()
        expected = defaultdict(float)
        for i, t in zip(items, times):
            expected[i] += 2.0 ** ((t - landmark) / 3600.0)
        popular = dict(store.popular(100))
        assert set(popular) == set(expected)
        for i, score in expected.items():
            assert popular[i] == pytest.approx(score, rel=1e-9)
        now = times.max()
        for window, bucket in WINDOWS.items():
            start = (math.floor(now / bucket) * bucket) - window + bucket
            for kind, ids in (("u", users), ("i", items)):
                for entity in set(ids[:20]):
                    direct = int(((ids == entity) & (times >= start)).sum())
                    assert store.window_count(kind, entity, window) == direct
        last = {i: t for i, t in zip(items, times)}
        for i, t in last.items():
            assert store.entity("i", i)["last_seen"] == pytest.approx(t)
    finally:
        store.clear()


def test_popularity_stays_finite_across_decades_of_event_time(redis_url):
    """Forward decay scores 2^((t - landmark) / half_life), which overflows a double 1,024
    half-lives past the landmark (20 years at the default week): a store whose first event was
    from 1995, and a batch spanning 1995 to now, made inf * 0 = NaN in the write script, which then
    failed on every retry after writing part of the batch (user counts went up at each one)."""
    week = 7 * 86_400.0
    config = FeatureStoreConfig(prefix=unique_prefix())
    store = FeatureStore.from_url(redis_url, config)

    def write(users: list[str], items: list[str], times: list[float]) -> None:
        store.write(EventBatch.from_columns(np.array(users, object), np.array(items, object),
                                            np.full(len(users), "view", object), np.array(times)))

    try:
        old, now = 788_918_400.0, 1_760_000_000.0  # 1995, 2025: 1,606 half-lives
        write(["a"], ["i-old"], [old])
        write(["b", "c"], ["i-spans", "i-spans"], [old + week, now])  # one batch across the decades
        write(["d", "d"], ["i-new", "i-new"], [now + 60, now + 120])
        popular = dict(store.popular(10))
        assert all(math.isfinite(score) for score in popular.values()), popular
        assert popular["i-spans"] == pytest.approx(1.0) and popular["i-new"] == pytest.approx(2.0, rel=1e-3)
        assert popular["i-old"] < 1e-300
        assert float(store.redis.get(store.keys.shared("pop", "landmark"))) == now  # moved up to the batch's newest
        assert store.entity("u", "c")["events"] == 1  # written once: no failed script retried
    finally:
        store.clear()


def test_an_event_dated_a_day_ahead_does_not_move_the_clocks_past_the_wall_clock(redis_url):
    """The schema admits event times up to a day ahead (skewed clients). The feature store's clock
    and the trainer's session clock followed such an event, so every user's session read as ended,
    and every window count as empty, until real time caught up."""
    import time

    from streamrec.trainer.online.session import SessionTracker

    store = FeatureStore.from_url(redis_url, FeatureStoreConfig(prefix=unique_prefix()))
    tracker = SessionTracker()
    now = time.time()
    users, items = np.array(["a", "a", "b"], object), np.array(["i1", "i2", "i3"], object)
    times = np.array([now - 60, now - 30, now + 86_000])
    try:
        store.write(EventBatch.from_columns(users, items, np.full(3, "view", object), times))
        tracker.observe(users, items, times, [None] * 3)
        assert now - 30 <= store.clock() <= time.time() and now - 30 <= tracker.clock <= time.time()
        history = store.user_history("a", 5, True, session=True)
        assert history.session_items(store.clock(), 1800.0, 10) == ["i2", "i1"]  # "a" is still in session
        assert tracker.items_of("a") == ["i1", "i2"]
        assert store.window_count("u", "a", 3600) == 2
        assert store.entity("u", "b")["last_seen"] == pytest.approx(now + 86_000)  # the event keeps its time
    finally:
        store.clear()


def test_online_bpr_learns_standalone_on_the_in_process_store():
    """`OnlineBPR()` keeps its tables in a fresh `LocalStore`: the live trainer's learning code
    without a network, one push per `learn_many`."""
    batch = EventBatch.from_events(planted_events(3000))
    model = OnlineBPR()
    for start in range(0, len(batch), 500):
        model.learn_many(batch.take(slice(start, start + 500)))
    scored = model.score_users(np.array(["u0", "u1"], object))
    top = scored.item_ids.to_numpy()[np.argsort(-scored.scores, axis=1)[:, :10]]
    cluster = lambda item: int(item[1:]) // 25
    assert np.mean([cluster(i) == 0 for i in top[0]]) > 0.7  # u0 is in cluster 0
    assert np.mean([cluster(i) == 1 for i in top[1]]) > 0.7  # u1 is in cluster 1
    assert model.store.get_meta()[0]["applied_events"] == 3000


def test_a_key_of_the_wrong_type_is_repaired_and_the_batch_written_without_a_retry(online_settings, start_server,
                                                                                      redis_url, caplog):
    """A key of the store with the wrong type (something else wrote it) made Redis refuse the
    batch's script half-way: the trainer retried for ever, counting the batch's first writes again
    each time. The script now deletes such a key (logged as an error, counted) and writes the
    batch in full: every event is learned and written exactly once, nothing is retried."""
    server = start_server("--no-checkpoints")
    events = planted_events(600, users=20)
    produce_events(online_settings, events)
    config = FeatureStoreConfig(prefix=unique_prefix())
    store = FeatureStore.from_url(redis_url, config)
    poisoned = store.keys.entity("u", events[0]["user_id"], "recent")
    store.redis.set(poisoned, "not a list")
    refused = FEATURE_ERRORS.labels("refused")._value.get()
    client = ParamClient([server.address])
    trainer = OnlineTrainer(online_settings, [OnlineBPR(store=client)],
                            TrainerConfig(batch_events=200, idle_exit_seconds=3.0), store)
    worker = threading.Thread(target=trainer.run)
    worker.start()
    worker.join(60)
    trainer.stop_requested.set()
    worker.join(30)
    try:
        assert trainer.stats.applied == 600 and applied(server.address) == 600
        assert FEATURE_ERRORS.labels("refused")._value.get() == refused
        assert any(poisoned in r.getMessage() and r.levelname == "ERROR" for r in caplog.records)
        mine = [e["item_id"] for e in events if e["user_id"] == events[0]["user_id"]]
        assert store.recent_items(events[0]["user_id"]) == mine[::-1][:100]  # the user's history, in full
        assert store.item_event_counts() == dict(Counter(e["item_id"] for e in events))
    finally:
        store.clear()
