"""The feature store on a real Redis Cluster (3 masters, 3 replicas, started here from Debian's
`redis-server`): it reads what the single-Redis store reads, each write stays in one slot, and a
master failover during a replay (by hand, and by SIGKILL) loses and doubles nothing, counted
independently per item against what was produced."""

from __future__ import annotations

import signal
from collections import Counter

import numpy as np
import pytest
import redis

from streamrec.core import net
from streamrec.stream.events import EventBatch
from streamrec.trainer.online.feature_cluster import (
    CLUSTER_BUCKETS,
    ClusterFeatureStore,
    _first_application,
    replicas_to_wait_for,
)
from streamrec.trainer.online.feature_rebuild import rebuild_features
from streamrec.trainer.online.feature_store import (
    FeatureStore,
    FeatureStoreConfig,
    FeatureWrite,
    bucket_of,
)
from tests.redis_cluster import RedisCluster
from tests.trainer_online.conftest import (
    TrainerProcess,
    applied,
    monitored_script_keys,
    planted_events,
    produce_events,
    unique_prefix,
    wait_until,
)
from tests.trainer_online.test_feature_store_rebuild import end_of_topic, topic_batch


def origin_batch(events: list[dict], partition: str = "t/0", first: int = 0) -> EventBatch:
    batch = EventBatch.from_events(events)
    batch.partition[:] = partition
    batch.offset[:] = np.arange(first, first + len(events))
    return batch


def test_a_cluster_store_reads_what_one_redis_reads(redis_url: str, redis_cluster: RedisCluster) -> None:
    prefix = unique_prefix()
    events = [{**e, "user_id": f"{e['user_id']}:{{x}}"} for e in planted_events(3000)]  # ids with ':' and braces
    single = FeatureStore.from_url(redis_url, FeatureStoreConfig(prefix=prefix))
    spread = FeatureStore.from_url(redis_cluster.url, FeatureStoreConfig(prefix=prefix, cluster=True))
    assert isinstance(spread, ClusterFeatureStore)
    try:
        for store in (single, spread):
            for start in range(0, 3000, 700):
                store.write(origin_batch(events[start : start + 700], first=start))
            again = store.write(origin_batch(events[1000:2500], first=1000))  # a replayed range
            assert (again.applied, again.skipped) == (0, 1500)
        assert spread.watermarks() == single.watermarks() == {"t/0": 3000}
        assert spread.item_event_counts() == single.item_event_counts() == dict(Counter(e["item_id"] for e in events))
        assert spread.clock() == single.clock()
        top, top_single = spread.popular(20), single.popular(20)
        assert [i for i, _ in top] == [i for i, _ in top_single]
        np.testing.assert_allclose([s for _, s in top], [s for _, s in top_single], rtol=1e-9)
        for user in {e["user_id"] for e in events[:50]}:
            history = single.user_history(user, 10, True, session=True)
            assert spread.user_history(user, 10, True, session=True) == history
            assert history.session is not None and history.session.position is not None  # where the newest event is
            assert spread.entity("u", user) == single.entity("u", user)
        item = events[-1]["item_id"]
        assert spread.window_count("i", item, 3600) == single.window_count("i", item, 3600)
    finally:
        single.clear()
        spread.clear()


def test_each_bucket_call_touches_only_keys_it_declares(redis_cluster: RedisCluster) -> None:
    """Watched with MONITOR on every master: a batch's bucket calls declare every key their
    scripts touch (the cluster routes a script by its keys; one it never saw is not checked)."""
    store = FeatureStore.from_url(redis_cluster.url, FeatureStoreConfig(prefix=unique_prefix(), cluster=True))
    events = [{**e, "user_id": f"{e['user_id']}:{{x}}"} for e in planted_events(1500)]
    store.write(origin_batch(events[:500]))  # loads the script
    for port in redis_cluster.master_ports():
        server = redis.Redis(port=port)
        declared, touched, _ = monitored_script_keys(server, store.keys.prefix,
                                                     lambda: store.write(origin_batch(events[250:], first=250)))
        assert touched and touched <= declared, sorted(touched - declared)[:5]
        events_written = store.item_event_counts()
        store.clear()
        store.write(origin_batch(events[:500]))
    assert sum(events_written.values()) == 1500


def test_every_key_of_a_bucket_is_in_its_slot_and_the_buckets_span_every_master(redis_cluster: RedisCluster) -> None:
    store = FeatureStore.from_url(redis_cluster.url, FeatureStoreConfig(prefix=unique_prefix(), cluster=True))
    events = planted_events(2000)
    store.write(origin_batch(events))
    client = store.redis
    keys = [key.decode() for key in client.scan_iter(store.keys.pattern())]
    assert keys
    for key in keys:
        tag = key[key.index("{") + 1 : key.index("}")]
        assert tag.startswith("b") and client.keyslot(key) == client.keyslot("{" + tag + "}")
    user = events[0]["user_id"]
    assert store.keys.entity("u", user).startswith(f"{store.keys.prefix}:{{b{bucket_of([user], CLUSTER_BUCKETS)[0]}}}:")
    # the popularity ranking is sharded: its fragments live on every master
    holders = {client.nodes_manager.get_node_from_slot(client.keyslot(store.keys.shared("pop", bucket=b))).name
               for b in range(CLUSTER_BUCKETS) if client.exists(store.keys.shared("pop", bucket=b))}
    assert len(holders) == 3
    store.clear()


def test_a_bucket_whose_keys_are_lost_holds_its_share_until_rebuilt_from_the_topic(
        online_settings, topic_events: list[dict], redis_cluster: RedisCluster) -> None:
    """A bucket's master and replica both lost its keys (watermarks included): the next live
    batch is written by every other bucket and held back by that one, which reports every
    partition; the rebuild the trainer then runs writes the topic into that bucket alone (the
    others' watermarks skip it), and the batch written again completes it: nothing lost, nothing
    counted twice."""
    store = FeatureStore.from_url(redis_cluster.url, FeatureStoreConfig(prefix=unique_prefix(), cluster=True))
    until = end_of_topic(online_settings)
    halfway = {pkey: end // 2 for pkey, end in until.items()}
    rebuild_features(online_settings, store, halfway)
    victim = topic_events[0]["user_id"]
    lost = int(bucket_of([victim], CLUSTER_BUCKETS)[0])
    gone = list(store.redis.scan_iter(f"{store.keys.prefix}:{{b{lost}}}:*"))
    assert store.redis.delete(*gone) == len(gone) > 0
    later = topic_batch(online_settings, start=halfway)  # the trainer's next batch
    in_lost_bucket = bucket_of(later.user_id, CLUSTER_BUCKETS) == lost
    floors = dict.fromkeys(until, 0)  # the topic holds every partition from offset 0
    held = store.write(later, floors=floors)
    assert held == FeatureWrite(int((~in_lost_bucket).sum()), int(in_lost_bucket.sum()), halfway)
    assert rebuild_features(online_settings, store, halfway) > 0  # what the trainer does
    assert store.write(later, floors=floors) == FeatureWrite(int(in_lost_bucket.sum()), int((~in_lost_bucket).sum()), {})
    assert store.item_event_counts() == dict(Counter(e["item_id"] for e in topic_events))
    assert store.watermarks() == until
    assert store.seen_items(victim) == {e["item_id"] for e in topic_events if e["user_id"] == victim}
    store.clear()


def test_a_store_on_an_unreachable_cluster_is_made_and_fails_its_calls_as_an_outage() -> None:
    """A trainer or serving worker starts while the cluster is down: the store is made without a
    connection, and each call raises redis.ConnectionError (what the trainer waits out and serving
    degrades on) instead of redis-py's RedisClusterException."""
    store = FeatureStore.from_url(f"redis://127.0.0.1:{net.free_port()}/0", FeatureStoreConfig(cluster=True),
                                  timeout_s=0.5)
    for call in (lambda: store.popular(5), store.watermarks, lambda: store.user_history("u", 5, True),
                 lambda: store.write(origin_batch(planted_events(10)))):
        with pytest.raises(redis.ConnectionError):
            call()


@pytest.mark.cluster_node_timeout_ms(5000)  # gossip tells a master of its replica up to 2.5 s late
def test_a_write_is_confirmed_by_a_replica_still_in_its_first_sync(redis_cluster: RedisCluster) -> None:
    """A new cluster's replicas take their first full sync ~5 s after it forms (Redis's diskless
    sync delay), so none is online yet. A batch written then must wait for them: the old rule
    counted only online replicas, took the batch unconfirmed, and a master killed before the sync
    took it away when its replica was promoted. The next rule counted the replicas the master's
    `CLUSTER NODES` assigns to it, which the cluster's gossip tells it up to half the node timeout
    after the replica attached: with 1 s, CI still lost a batch once; with 5 s, every run did.
    A replica connected to the master counts now too."""
    config = FeatureStoreConfig(prefix=unique_prefix(), cluster=True)
    store = FeatureStore.from_url(redis_cluster.url, config)
    assert all(not redis.Redis(port=port).execute_command("ROLE")[2] for port in redis_cluster.master_ports())
    events = planted_events(2000)
    written = None
    while written is None:  # as the trainer does: a batch not confirmed is written again
        try:
            written = store.write(origin_batch(events))
        except redis.ConnectionError:
            pass
    redis_cluster.kill(redis_cluster.master_ports()[0])  # its replica, promoted, has to hold what it took
    store = FeatureStore.from_url(redis_cluster.url, config)
    assert store.item_event_counts() == dict(Counter(e["item_id"] for e in events))
    assert store.watermarks() == {"t/0": len(events)}


def test_a_retry_reports_what_its_first_unconfirmed_execution_found() -> None:
    """A first execution that wrote a bucket (its replica did not confirm) found partition 1 unmarked;
    the retry skips what it wrote and sees the partition marked: the loss is still reported, and
    the events the first applied count as applied."""
    first, retry = [5, 0, [1], [], [b"sr:k"]], [0, 5, [], [2], []]
    assert _first_application(retry, first) == [5, 0, [1], [2], [b"sr:k"]]
    assert _first_application(retry, None) == retry


NODES = """\
m1 127.0.0.1:7001@17001 myself,master - 0 0 1 connected 0-5460
m2 127.0.0.1:7002@17002 master - 0 0 2 connected 5461-10922
r1 127.0.0.1:7011@17011 slave m1 0 0 1 connected
r2 127.0.0.1:7012@17012 slave m2 0 0 2 connected
"""


def replication(*ports: int, state: str = "online") -> dict[str, object]:
    return {"role": "master", "connected_slaves": len(ports),
            **{f"slave{k}": {"ip": "127.0.0.1", "port": port, "state": state} for k, port in enumerate(ports)}}


def test_the_replicas_a_master_waits_for() -> None:
    """Its own assigned replica, connected or not; a connected one gossip has not told it of yet
    (still listed as a slot-less master); not one the cluster marked failed, even while its socket
    is still connected (a hung replica); one only this master suspects (`fail?`) still counts."""
    assert replicas_to_wait_for(NODES, replication()) == 1  # assigned, not connected (first sync, lost link)
    assert replicas_to_wait_for(NODES, replication(7011, state="wait_bgsave")) == 1  # the same replica once
    unknown = NODES.replace("r1 127.0.0.1:7011@17011 slave m1", "r1 127.0.0.1:7011@17011 master -")
    assert replicas_to_wait_for(unknown, replication()) == 0
    assert replicas_to_wait_for(unknown, replication(7011, state="wait_bgsave")) == 1
    failed = NODES.replace("r1 127.0.0.1:7011@17011 slave", "r1 127.0.0.1:7011@17011 slave,fail")
    assert replicas_to_wait_for(failed, replication(7011)) == 0
    suspected = NODES.replace("r1 127.0.0.1:7011@17011 slave", "r1 127.0.0.1:7011@17011 slave,fail?")
    assert replicas_to_wait_for(suspected, replication(7011)) == 1
    # restarted with a new node id on its old address: the old entry stays failed for a while
    reborn = failed + "r1b 127.0.0.1:7011@17011 slave m1 0 0 1 connected\n"
    assert replicas_to_wait_for(reborn, replication(7011, state="wait_bgsave")) == 1
    meeting = unknown.replace("r1 127.0.0.1:7011@17011 master -", "r1 127.0.0.1:7011@17011 handshake -")
    assert replicas_to_wait_for(meeting, replication(7011, state="wait_bgsave")) == 1  # connected, still being met
    assert replicas_to_wait_for(NODES.replace("myself,master", "master").replace("m2 127.0.0.1:7002@17002 master",
                                                                                "m2 127.0.0.1:7002@17002 myself,master"),
                                replication(7012)) == 1  # the other master's replica, for the other master


def test_a_hung_replica_marked_failed_stops_the_wait(redis_cluster: RedisCluster) -> None:
    """A replica that stops answering without closing its socket (a hung VM, a host lost without a
    reset) is marked failed by the cluster after the node timeout, but stays connected to its
    master until `repl-timeout` (60 s). Counting connected replicas kept every write waiting for
    it that long, where a dead replica must stop the wait: nothing could promote it."""
    master = redis_cluster.master_ports()[0]
    wait_until(lambda: redis_cluster.online_replicas(master), timeout=60)  # its first sync done
    replica, = redis_cluster.online_replicas(master)
    store = FeatureStore.from_url(redis_cluster.url, FeatureStoreConfig(prefix=unique_prefix(), cluster=True))
    events = planted_events(600)
    store.write(origin_batch(events[:300]))
    redis_cluster.nodes[replica].send_signal(signal.SIGSTOP)
    try:
        wait_until(lambda: "fail" in redis_cluster.flags(master, replica), timeout=30)
        assert redis_cluster.online_replicas(master) == [replica]  # still connected
        written = store.write(origin_batch(events[300:], first=300))
    finally:
        redis_cluster.nodes[replica].send_signal(signal.SIGCONT)
    assert written.applied == 300
    assert store.item_event_counts() == dict(Counter(e["item_id"] for e in events))


@pytest.mark.slow  # ~30 s each: a trainer, a parameter server and a failover
@pytest.mark.parametrize("fault", ["manual-failover", "sigkill"])
def test_a_master_failover_during_a_replay_loses_and_doubles_nothing(online_settings, start_server, tmp_path,
                                                                    redis_cluster: RedisCluster, fault: str) -> None:
    """A trainer writes the features of 8,000 events to the cluster while one master fails over:
    by `CLUSTER FAILOVER` on its replica, or by SIGKILL (its replica is elected after the node
    timeout). Every item's exact count and every partition's watermark end as produced."""
    settings = online_settings.model_copy(update={"redis_url": redis_cluster.url, "redis_cluster": True,
                                                  "feature_prefix": unique_prefix()})
    server = start_server("--no-checkpoints")
    events = planted_events(8000)
    trainer = TrainerProcess(settings, server.address, tmp_path / "r.json", "--idle-exit", "20")
    produce_events(settings, events[:4000])
    wait_until(lambda: applied(server.address) == 4000, timeout=120)
    master = redis_cluster.master_ports()[0]
    if fault == "manual-failover":
        redis_cluster.manual_failover(master, wait=False)
    else:
        redis_cluster.kill(master, wait=False)
    produce_events(settings, events[4000:])  # written while the slots move
    trainer.wait(timeout=300)
    redis_cluster.wait_whole()
    store = FeatureStore.from_url(redis_cluster.url, FeatureStoreConfig(prefix=settings.feature_prefix, cluster=True))
    assert store.item_event_counts() == dict(Counter(e["item_id"] for e in events))
    marks = store.watermarks()
    assert sum(marks.values()) == len(events) and len(marks) == 3
    some_user = events[0]["user_id"]
    assert store.seen_items(some_user) == {e["item_id"] for e in events if e["user_id"] == some_user}
    report = trainer.report()
    assert report is not None and report["applied"] == len(events)
    store.clear()


def test_a_bucket_back_with_an_older_state_is_held_and_a_corrupt_counter_repaired(redis_cluster: RedisCluster) -> None:
    """One bucket's master came back with an older state (its replica lagged when promoted): its
    watermark lies below where the next batch starts. The bucket holds its share back until the
    missing range is written again (what the rebuild does); a counter of another bucket left as
    text is reset and that bucket's share written in full."""
    store = FeatureStore.from_url(redis_cluster.url, FeatureStoreConfig(prefix=unique_prefix(), cluster=True))
    events = planted_events(600)
    store.write(origin_batch(events[:200]), ranges={"t/0": (0, 200)})
    lost = int(bucket_of([events[0]["user_id"]], CLUSTER_BUCKETS)[0])
    client = store.redis
    older = {key: (client.dump(key), max(client.pttl(key), 0))
             for key in client.scan_iter(f"{store.keys.prefix}:{{b{lost}}}:*")}
    store.write(origin_batch(events[200:400], first=200), ranges={"t/0": (200, 400)})
    client.delete(*client.scan_iter(f"{store.keys.prefix}:{{b{lost}}}:*"))
    for key, (value, ttl) in older.items():
        client.restore(key, ttl, value)
    later = events[400:]
    item = next(e["item_id"] for e in later if bucket_of([e["item_id"]], CLUSTER_BUCKETS)[0] != lost)
    client.hset(store.keys.entity("i", item), "events", "oops")

    held = store.write(origin_batch(later, first=400), floors={"t/0": 0}, ranges={"t/0": (400, 600)})
    in_lost_bucket = int((bucket_of([e["user_id"] for e in later], CLUSTER_BUCKETS) == lost).sum())
    assert held.behind == {"t/0": 400} and held.skipped == in_lost_bucket
    assert held.repaired == (f"{store.keys.entity('i', item)} events",)
    store.write(origin_batch(events[200:400], first=200), ranges={"t/0": (200, 400)})  # the rebuild's write
    again = store.write(origin_batch(later, first=400), floors={"t/0": 0}, ranges={"t/0": (400, 600)})
    assert again.applied == in_lost_bucket and again.behind == {}
    expected = Counter(e["item_id"] for e in events)
    assert store.item_event_counts() == dict(expected)
    assert store.entity("i", item)["events"] == sum(e["item_id"] == item for e in later)  # restarted from 0
    assert store.watermarks() == {"t/0": 600}
    store.clear()
