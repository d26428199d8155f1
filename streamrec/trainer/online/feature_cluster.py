"""The feature store on a Redis Cluster: the same keys and the same write script, in buckets.

A Cluster runs a script only on keys of one hash slot, and the single-Redis layout spreads one
batch over the slots of all its users and items. Here every user and item belongs to one of
`CLUSTER_BUCKETS` buckets (`bucket_of`, a hash of its id), and all keys of a bucket carry the hash
tag `{b<k>}`: a user's `sr:{b<k>}:u:<user>:recent`, an item's `sr:{b<k>}:i:<item>`, and the
bucket's own fragment of every shared key: `sr:{b<k>}:wm` (watermarks), `:pop` (the popularity
of the bucket's items), `:item_events`, `:clock`, `:pop:landmark`. So:

- **Atomic per slot, with its watermark.** A batch is written as one script call per bucket: the
  bucket's users' side of their events (recent, seen, user counters and windows) and its items'
  side (item counters and windows, popularity, exact counts), with the bucket's watermark per
  partition, read and advanced in the same execution. An event is applied by each of its two
  buckets exactly once whatever happens to the other; every bucket advances its watermarks for
  every partition of every batch (to the batch's last offset), so a bucket without a watermark
  still means a lost or wiped bucket, as in the single store, and is rebuilt from the topic.
- **Declared keys.** Each call declares every key it may touch (`DeclaredKeys`: the bucket's
  shared keys, then its users', items' and window buckets' keys), all under the bucket's tag, so
  in the bucket's slot; the script builds no key, and the cluster routes the call by its keys.
- **Sharded global keys.** Popularity, exact counts and the clock are fragments per bucket
  (no hot slot); readers merge them: popularity rescaled to one landmark, counts summed, the
  clock's maximum, and a partition's watermark as the minimum over buckets (what every bucket has).
- **Replication before commit.** Redis replicates asynchronously; a master that dies can take
  acknowledged writes with it. Each master's calls of a batch go through one pipeline that ends
  with `WAIT 1`: the write returns only once every master that took part had a replica confirm
  it. A master waits for none only when the cluster gives it no replica that could take over
  (none assigned, or every assigned one marked failed: a promoted replica whose old master died,
  a master whose replica died); `CLUSTER NODES` on the master tells, asked at most once a second.
  A replica that is assigned but not replicating (its first full sync, a resync after a lost
  link) is waited for: WAIT times out, the batch is not confirmed and is written again, and the
  trainer holds consumption meanwhile. Counting only the replicas online (`ROLE`) lost writes: a
  master whose replica was still in its first sync took them unconfirmed, then died, and the
  replica was promoted without them. A master learns that a node became its replica from the
  cluster's gossip, up to half the node timeout later (seconds with a production timeout), so a
  replica already connected to the master (`INFO replication`, any state) counts as assigned
  too: a new cluster's first batches were taken unconfirmed in that gap, and lost the same way.
  One the cluster marked failed does not, connected or not: a hung replica stays connected until
  `repl-timeout` (60 s) and would stall every write that long.
  The trainer commits its Kafka offsets only after the write, so what a failover can lose was
  never committed and is read and written again; the watermarks then skip what survived.
- **Failover.** A call that meets a moved slot or a lost connection refreshes the slot map and the
  whole batch is written again (idempotent by the watermarks), a few times, before the error
  reaches the trainer, which pauses consumption until the store answers (as for one Redis).

Serving reads a user's history from the user's bucket (one slot) and trending from all buckets
(cached per worker). One pipeline per master per batch, all sent before any reply is read: 64
script calls cost one round trip on a 3-master cluster, the masters work at the same time, and
each call aggregates inside Redis as before.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import TypeVar

import numpy as np
import redis
from redis.backoff import NoBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.retry import Retry

from streamrec.stream.events import EventBatch
from streamrec.trainer.online.feature_store import (
    RENORMALISE_AFTER_HALF_LIVES,
    WAIT_TIMEOUT_MS,
    ConsumedRanges,
    FeatureStore,
    FeatureStoreConfig,
    FeatureWrite,
    KeySchema,
    ScriptCall,
    connect_on_first_use,
    run_write_script,
    script_argument,
)

log = logging.getLogger(__name__)
CLUSTER_BUCKETS = 64  # part of the layout: changing it needs `streamrec features rebuild` into a new prefix
WAIT_REPLICAS = 1  # replicas that must confirm a batch (at most those the cluster assigns to the master)
REPLICAS_TTL_S = 1.0  # how long a master's count of assigned replicas is trusted before it is asked again
ATTEMPTS = 4  # writes of a batch (with a fresh slot map between) before the error reaches the caller
RETRY_PAUSE_S = 0.5  # a failover takes the cluster's node timeout plus an election
EVENT_COLUMNS = frozenset({"i", "t", "w", "pi", "o"})  # the script's per-event fields (the rest is per batch)
KEY_INDEX_COLUMNS = frozenset({"uk", "ik", "uw", "iw"})  # per event too, but set per bucket (0: another bucket's side)
T = TypeVar("T")


def _first_application(final: list, unconfirmed: list | None) -> list:
    """A bucket's reply ([applied, skipped, unmarked, behind, repaired]) counting as applied the events a first,
    unconfirmed execution applied: its retry finds them written (the watermark) and skips them,
    or, on a promoted replica that never got them, applies the same events again. The partitions
    either execution found unmarked or behind, and the keys either repaired, are all reported:
    a retry that skips what the first wrote over a lost bucket no longer sees the loss."""
    if unconfirmed is None:
        return final
    applied, skipped = int(final[0]), int(final[1])
    moved = max(int(unconfirmed[0]) - applied, 0)
    unmarked, behind = (sorted({int(k) for k in (*unconfirmed[n], *final[n])}) for n in (2, 3))
    return [applied + moved, skipped - moved, unmarked, behind, list(dict.fromkeys((*unconfirmed[4], *final[4])))]


def _address(field: str) -> str:
    """`ip:port` of a `CLUSTER NODES` address field (`ip:port@cport[,hostname]`)."""
    return field.split("@", 1)[0]


def replicas_to_wait_for(nodes: bytes | str, replication: Mapping[str, object]) -> int:
    """The replicas a master's writes wait for, from its own `CLUSTER NODES` and `INFO replication`:
    those the cluster assigns to it (the line flagged `myself`), and those connected to it, which
    gossip may not have told it of yet (a new replica), less those the cluster has marked failed:
    a replica that hangs without closing its socket stays connected until `repl-timeout` (60 s),
    and waiting for it meanwhile stalled every write where a dead replica should stop the wait
    after the node timeout. A replica only suspected by this master (`fail?`) still counts: the
    others may see it, and promote it. Replicas are matched by address, so a cluster that
    announces other addresses (`cluster-announce-ip`) than its replicas do to their masters
    (`replica-announce-ip`) waits for a hung one until `repl-timeout` again."""
    # (node id, address, flags, its master's id) per line
    text = nodes.decode() if isinstance(nodes, bytes) else nodes
    lines = [(fields[0], _address(fields[1]), set(fields[2].split(",")), fields[3])
             for fields in (line.split() for line in text.splitlines()) if len(fields) > 3]
    me = next((node for node, _, flags, _ in lines if "myself" in flags), None)
    # an address is failed only when no live node holds it: a replica restarted with a new node id
    # on the address of its old, failed entry is a replica again
    failed = ({address for _, address, flags, _ in lines if flags & {"fail", "noaddr"}}
              - {address for _, address, flags, _ in lines if not flags & {"fail", "noaddr"}})
    assigned = {address for _, address, flags, master in lines if master == me and "slave" in flags}
    connected = {f"{value['ip']}:{value['port']}" for key, value in replication.items()
                 if key.startswith("slave") and isinstance(value, dict) and "ip" in value and "port" in value}
    return len((assigned | connected) - failed)


class ReplicationNotConfirmed(redis.ConnectionError):
    """A master's replica did not confirm a batch in time: the batch must not be committed yet."""


class ClusterFeatureStore(FeatureStore):
    """`FeatureStore` on a Redis Cluster: the same reads and writes, the keys in buckets (module
    docstring); the shared keys' readers merge the buckets' fragments."""

    def __init__(self, connect: Callable[[], RedisCluster], config: FeatureStoreConfig | None = None,
                 buckets: int = CLUSTER_BUCKETS) -> None:
        """`connect` makes the cluster client on first use: redis-py's asks a node for the slot
        map when made, and a trainer or serving worker must start while the cluster is down."""
        self._connect, self._client = connect, None
        self.config = config or FeatureStoreConfig(cluster=True)
        self.keys = KeySchema(self.config.prefix, buckets)
        self.buckets = buckets
        self._bucket_shared = [self.keys.shared_keys(b) for b in range(buckets)]
        self._marks = [shared[0] for shared in self._bucket_shared]  # each bucket's watermarks: where its calls go
        self._replicas: dict[str, tuple[float, int]] = {}  # master -> (when asked, replicas assigned)

    @classmethod
    def from_url(cls, url: str, config: FeatureStoreConfig | None = None, timeout_s: float = 2.0,
                 fail_fast: bool = False) -> ClusterFeatureStore:
        """`fail_fast`: one retry without backoff. redis-py's default (backing off, up to 10 tries)
        held each read of a stopped master's keys for ~4 s, where serving answers without them."""
        retry = Retry(NoBackoff(), 1) if fail_fast else None
        return cls(lambda: RedisCluster.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                                                 retry=retry), config)

    @property
    def redis(self) -> RedisCluster:  # type: ignore[override]  # the base class holds a plain client
        """The cluster client, made on first use; a cluster that cannot be reached raises
        redis.ConnectionError (the error every caller already handles), and is asked again next time."""
        if self._client is None:
            self._client = connect_on_first_use(self._connect)
        return self._client

    # ---- per master ---------------------------------------------------------------------------
    def _master_of(self, key: str) -> ClusterNode:
        return self.redis.nodes_manager.get_node_from_slot(self.redis.keyslot(key))

    def _by_master(self, keys: list[str]) -> dict[str, tuple[ClusterNode, list[int]]]:
        """The positions of `keys` grouped by the master that holds each key's slot."""
        groups: dict[str, tuple[ClusterNode, list[int]]] = {}
        for position, key in enumerate(keys):
            node = self._master_of(key)
            groups.setdefault(node.name, (node, []))[1].append(position)
        return groups

    def _retrying(self, attempt: Callable[[], T], attempts: int = ATTEMPTS, pause_s: float = RETRY_PAUSE_S) -> T:
        """`attempt` again with a fresh slot map after a moved slot or a lost master (a failover).
        What still fails after `attempts` is raised as a redis.ConnectionError, the error the
        trainer waits out and serving degrades on (redis-py raises RedisClusterException, not a
        RedisError, for a slot without a node). Reads make two attempts without a pause: they run
        inside requests."""
        for number in range(1, attempts + 1):
            try:
                return attempt()
            except (redis.ConnectionError, redis.TimeoutError, redis.exceptions.ClusterError,
                    redis.exceptions.MovedError, redis.exceptions.AskError, redis.exceptions.TryAgainError,
                    redis.exceptions.RedisClusterException) as exc:
                if number == attempts:
                    raise redis.ConnectionError(f"Redis Cluster: {type(exc).__name__}: {exc}") from exc
                log.warning("feature store (cluster): %s; refreshing the slot map (attempt %d)", exc, number)
                time.sleep(pause_s)
                try:
                    self.redis.nodes_manager.initialize()
                except (redis.RedisError, redis.exceptions.RedisClusterException) as again:
                    log.warning("feature store (cluster): no slot map yet (%s)", again)
        raise AssertionError("unreachable")

    # ---- writing ------------------------------------------------------------------------------
    def write(self, batch: EventBatch, weights: np.ndarray | None = None,
              floors: Mapping[str, int] | None = None, ranges: ConsumedRanges | None = None) -> FeatureWrite:
        """The batch as one script call per bucket, every master's calls in one pipeline ending
        with WAIT (module docstring); semantics and result as `FeatureStore.write` (each bucket
        compares its own watermark with `ranges`, and reports the partitions it lacks)."""
        if not len(batch) and not ranges:
            return FeatureWrite(0, 0, {})
        fields, keys, origin = self._columns(batch, weights, floors, ranges)
        if len(origin.pkeys) and origin.last is None:
            last = np.full(len(origin.pkeys), -1, np.int64)
            tagged = origin.index > 0
            np.maximum.at(last, origin.index[tagged] - 1, np.asarray(fields["o"])[tagged])
            fields["plast"] = last
        calls = []
        for bucket in range(self.buckets):
            user_here, item_here = keys.user_bucket == bucket, keys.item_bucket == bucket
            rows = np.flatnonzero(user_here | item_here)
            part = {k: (v[rows] if k in EVENT_COLUMNS else v) for k, v in fields.items() if k not in KEY_INDEX_COLUMNS}
            user_here, item_here = user_here[rows], item_here[rows]
            part |= {"uk": np.where(user_here, keys.user[rows], 0), "ik": np.where(item_here, keys.item[rows], 0),
                     "uw": np.where(user_here[:, None], keys.user_windows[rows], 0),
                     "iw": np.where(item_here[:, None], keys.item_windows[rows], 0)}
            calls.append((self._bucket_shared[bucket] + keys.of_bucket(bucket), script_argument(part)))
        done: dict[int, list[int]] = {}  # bucket -> its reply, once its master wrote and replicated it
        unconfirmed: dict[int, list[int]] = {}  # bucket -> its reply from a master whose replica did not confirm
        self._retrying(lambda: self._run_buckets(calls, done, unconfirmed))
        replies = [_first_application(done[bucket], unconfirmed.get(bucket)) for bucket in range(self.buckets)]
        return origin.outcome(replies, floors, len(keys.keys))

    def _run_buckets(self, calls: list[ScriptCall], done: dict[int, list[int]],
                     unconfirmed: dict[int, list[int]]) -> None:
        """Every bucket's call not yet `done` (its declared keys and its argument), one pipeline per
        master ending with WAIT when the master has a replica to wait for, all masters at once; the
        replies of the masters that wrote and replicated their calls go into `done`, so a retry
        after a failover resends only the others' (their events would count as skipped otherwise),
        even when another master failed meanwhile; a master that failed after some of its calls
        (or before its replica confirmed) leaves their replies `unconfirmed`. Raises the first
        failure: an error reply, a lost connection, or a replica that did not confirm."""
        pending = [bucket for bucket in range(len(calls)) if bucket not in done]
        failure: Exception | None = None
        try:
            masters = [(node, [pending[k] for k in positions], self.redis.get_redis_connection(node))
                       for node, positions in self._by_master([self._marks[b] for b in pending]).values()]
            wanted = [self._wanted(node.name, client) for node, _, client in masters]
            results = run_write_script([(client, [calls[b] for b in buckets], w)
                                        for (_, buckets, client), w in zip(masters, wanted)])
            for (node, buckets, _), want, got in zip(masters, wanted, results):
                error = next((result for result in got if isinstance(result, Exception)), None)
                confirmed = not want or (len(got) > len(buckets) and not isinstance(got[-1], Exception)
                                         and int(got[-1]) >= want)
                if error is None and not confirmed:
                    error = ReplicationNotConfirmed(f"{node.name}: {got[-1]} of {want} replicas confirmed "
                                                    f"the batch within {WAIT_TIMEOUT_MS} ms")
                for bucket, reply in zip(buckets, got):  # replies before a lost connection stand
                    if isinstance(reply, Exception):
                        continue
                    if confirmed:
                        done[bucket] = reply
                    else:  # written, not yet confirmed: the retry says "skipped"
                        unconfirmed.setdefault(bucket, reply)
                failure = failure or error
            if failure is not None:
                raise failure
        except Exception:
            self._replicas.clear()  # a failover changes who replicates whom: ask again
            raise

    def _wanted(self, name: str, connection: redis.Redis) -> int:
        """Replicas that must confirm this master's writes: WAIT_REPLICAS, at most those of
        `replicas_to_wait_for` (module docstring), asked at most once every REPLICAS_TTL_S."""
        asked = self._replicas.get(name)
        if asked is None or time.monotonic() - asked[0] > REPLICAS_TTL_S:
            pipe = connection.pipeline(transaction=False)
            pipe.execute_command("CLUSTER", "NODES")
            pipe.info("replication")
            nodes, replication = pipe.execute()
            asked = (time.monotonic(), replicas_to_wait_for(nodes, replication))
            self._replicas[name] = asked
        return min(WAIT_REPLICAS, asked[1])

    def clear(self) -> int:
        """Delete every key under this store's prefix on every master; returns the count."""
        deleted = 0
        for node in self.redis.get_primaries():
            connection = self.redis.get_redis_connection(node)
            keys = list(connection.scan_iter(self.keys.pattern(), count=1000))
            pipe = connection.pipeline(transaction=False)
            for key in keys:  # keys of many slots: one DEL each, pipelined
                pipe.delete(key)
            deleted += sum(pipe.execute()) if keys else 0
        return deleted

    # ---- reading: the shared keys, merged over the buckets -------------------------------------
    def _per_bucket(self, command: Callable[[redis.client.Pipeline, int], object], per_bucket: int = 1) -> list[list]:
        """`command(pipe, bucket)` queues `per_bucket` commands for a bucket; run for every bucket,
        one pipeline per master; each bucket's replies, in bucket order."""
        def attempt() -> list[list]:
            replies: list[list] = [[] for _ in range(self.buckets)]
            for node, buckets in self._by_master(self._marks).values():
                pipe = self.redis.get_redis_connection(node).pipeline(transaction=False)
                for bucket in buckets:
                    command(pipe, bucket)
                flat = pipe.execute()
                for i, bucket in enumerate(buckets):
                    replies[bucket] = flat[per_bucket * i : per_bucket * (i + 1)]
            return replies
        return self._retrying(attempt, attempts=2, pause_s=0.0)

    def watermarks(self) -> dict[str, int]:
        """Partition key -> the next offset EVERY bucket has reached (their minimum): everything
        below it is written in full; a partition missing from some bucket counts as 0 there."""
        marks = [{k.decode(): int(v) for k, v in reply.items()}
                 for reply, in self._per_bucket(lambda pipe, b: pipe.hgetall(self.keys.shared("wm", bucket=b)))]
        partitions = set().union(*marks)
        return {pkey: min(m.get(pkey, 0) for m in marks) for pkey in sorted(partitions)}

    def item_event_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for reply, in self._per_bucket(lambda pipe, b: pipe.hgetall(self.keys.shared("item_events", bucket=b))):
            counts.update((k.decode(), int(v)) for k, v in reply.items())  # an item lives in one bucket
        return counts

    def clock(self) -> float:
        values = self._per_bucket(lambda pipe, b: pipe.get(self.keys.shared("clock", bucket=b)))
        return max((float(v) for v, in values if v), default=0.0)

    def popular(self, n: int) -> list[tuple[str, float]]:
        """Top-n items over every bucket, scores in units of the earliest bucket landmark; of the
        latest where they lie more than twice RENORMALISE_AFTER_HALF_LIVES apart (each bucket moves
        its landmark up on its own, and 2^x overflows from x = 1,024)."""
        def fetch(pipe: redis.client.Pipeline, bucket: int) -> None:
            pipe.get(self.keys.shared("pop", "landmark", bucket=bucket))
            pipe.zrevrange(self.keys.shared("pop", bucket=bucket), 0, n - 1, withscores=True)

        replies = self._per_bucket(fetch, per_bucket=2)
        landmarks = [float(landmark) for landmark, _ in replies if landmark]
        if not landmarks:
            return []
        half_life = self.config.popularity_half_life
        apart = max(landmarks) - min(landmarks)
        base = min(landmarks) if apart <= 2 * RENORMALISE_AFTER_HALF_LIVES * half_life else max(landmarks)
        merged = [(item.decode(), score * 2.0 ** ((float(landmark) - base) / half_life))
                  for landmark, top in replies if landmark for item, score in top]
        merged.sort(key=lambda pair: -pair[1])
        return merged[:n]
