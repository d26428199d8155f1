"""`streamrec bench features`: the Redis feature store's write path alone, as the trainer drives it.

The pipeline benchmark measures the store inside the whole pipeline, where its writes overlap the
learning; this one isolates it, so that a change to the store (its keys, its script, a Redis
Cluster) shows in its own figures: the batches of a log (string ids, each event with its partition
and offset, so the exactly-once watermarks are read and advanced as in production) written one
after the other through `FeatureStore.write`, on a fresh key prefix removed afterwards.

Reported: events per second, the client's CPU per event (this process: building the columns and
the declared keys, packing, reading the replies), the CPU per event of every Redis node that
answers INFO (a Cluster's masters and replicas together) and the keys declared per event.
"""

from __future__ import annotations

import time
import uuid

import numpy as np
import redis
from redis.cluster import RedisCluster

from streamrec.core.config import Settings
from streamrec.stream.bench import synthetic_events
from streamrec.stream.events import EventBatch
from streamrec.stream.loaders import load_log
from streamrec.trainer.online.feature_store import FeatureStore, FeatureStoreConfig

PARTITION = "bench-features/0"  # the origin every event carries: the watermark path is taken


def _log_batch(data_path: str | None, fmt: str, events: int) -> EventBatch:
    if data_path is None:
        batch = EventBatch.from_events(synthetic_events(events))
    else:
        log = load_log(data_path, fmt).take(slice(0, events))
        batch = EventBatch.from_columns(log.user_id, log.item_id, log.event_types(), log.timestamp, log.rating)
    return batch.with_origin(np.full(len(batch), PARTITION, object), np.arange(len(batch), dtype=np.int64))


class RedisCpu:
    """CPU seconds used so far by every Redis node of the store (one Redis, or every node of the
    Cluster), on one client kept between reads (a bench samples it several times a second)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._client: redis.Redis | RedisCluster | None = None

    def seconds(self) -> float | None:
        """None when a node does not answer (the client is made again at the next read)."""
        try:
            if self._client is None:
                self._client = RedisCluster.from_url(self.settings.redis_url, socket_timeout=2.0) \
                    if self.settings.redis_cluster else redis.Redis.from_url(self.settings.redis_url, socket_timeout=2.0)
            if isinstance(self._client, RedisCluster):
                infos = list(self._client.info("cpu", target_nodes=RedisCluster.ALL_NODES).values())
            else:
                infos = [self._client.info("cpu")]
        except (redis.RedisError, redis.exceptions.RedisClusterException):
            self.close()
            return None
        return sum(float(info["used_cpu_user"]) + float(info["used_cpu_sys"]) for info in infos)

    def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            client.close()


def run_feature_bench(settings: Settings, data_path: str | None, fmt: str, events: int,
                      batch_events: int) -> dict[str, object]:
    """Write the log's first `events` events in batches of `batch_events` into a fresh prefix of the
    store `settings` name, and measure (module docstring)."""
    batch = _log_batch(data_path, fmt, events)
    config = FeatureStoreConfig.from_settings(settings, prefix=f"bench-features-{uuid.uuid4().hex[:8]}")
    store = FeatureStore.from_url(settings.redis_url, config)
    parts = [batch.take(slice(start, start + batch_events)) for start in range(0, len(batch), batch_events)]
    redis_cpu = RedisCpu(settings)
    try:
        # this process's CPU in ns (all threads): /proc's 10 ms ticks read 0 for a short run
        redis_before, client_before = redis_cpu.seconds(), time.process_time()
        started = time.perf_counter()
        writes = [store.write(part) for part in parts]
        seconds = time.perf_counter() - started
        client_after, redis_after = time.process_time(), redis_cpu.seconds()
        exact = sum(store.item_event_counts().values())
    finally:
        redis_cpu.close()
        store.clear()
    per_event = 1e6 / max(len(batch), 1)
    return {
        "events": len(batch), "batch_events": batch_events, "cluster": settings.redis_cluster,
        "applied": sum(w.applied for w in writes), "exact_counts_sum": exact,
        "events_per_second": round(len(batch) / seconds) if seconds else None,
        "client_cpu_microseconds_per_event": round((client_after - client_before) * per_event, 2),
        "redis_cpu_microseconds_per_event": (round((redis_after - redis_before) * per_event, 2)
                                             if redis_after is not None and redis_before is not None else None),
        "declared_keys_per_event": round(sum(w.declared_keys for w in writes) / max(len(batch), 1), 2),
    }
