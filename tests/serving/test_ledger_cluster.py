"""The POST /events event-id ledger on a real Redis Cluster with a master stopped (no replica, so
no failover answers instead): requests whose ids all live on the other masters are still checked,
and a request that meets the stopped master leaves no reservation behind on the others (its
re-send would be answered 503 until they expired)."""

from __future__ import annotations

import pytest
import redis

from streamrec.serving.idempotency import EventIdLedger, IdState
from tests.redis_cluster import RedisCluster


def test_a_stopped_master_fails_only_requests_with_ids_on_it_and_leaves_no_reservation(tmp_path) -> None:
    cluster = RedisCluster(tmp_path / "cluster", masters=3, replicas=0).start()
    try:
        ledger = EventIdLedger.from_url(cluster.url, "sr", 60, 60_000, 0.5, cluster=True)
        ids = [f"e{n}" for n in range(60)]
        assert (ledger.reserve(ids[:3], "first") == IdState.RESERVED).all()  # scripts met on a whole cluster
        client = redis.RedisCluster.from_url(cluster.url)
        master = {key: client.get_node_from_key(key).port for key in ledger.keys(ids)}
        first = master[ledger.keys(ids[3:])[0]]  # the request's first bucket is reserved before it fails
        stopped = next(port for port in cluster.master_ports() if port != first)
        cluster.kill(stopped, wait=False)
        elsewhere = [i for i, key in zip(ids[3:], ledger.keys(ids[3:])) if master[key] != stopped]
        worker = EventIdLedger.from_url(cluster.url, "sr", 60, 60_000, 0.5, cluster=True)  # one started now
        assert (worker.reserve(elsewhere[:5], "second") == IdState.RESERVED).all()
        worker.close()
        with pytest.raises((redis.RedisError, redis.exceptions.RedisClusterException)):
            ledger.reserve(ids[3:], "third")
        left = [key for key in ledger.keys(ids[3:]) if master[key] != stopped and client.get(key) == b"third"]
        assert left == []
        ledger.close()
        client.close()
    finally:
        cluster.stop()
