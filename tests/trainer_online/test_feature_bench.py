"""`streamrec bench features` through the real CLI, on the real Redis and on a real Redis Cluster:
every event written once (exact counts), the figures present, nothing left behind."""

from __future__ import annotations

import json

import redis
from click.testing import CliRunner

from streamrec.app.cli import cli
from tests.conftest import settings_env
from tests.redis_cluster import RedisCluster


def bench(settings, *args: str) -> dict:
    result = CliRunner().invoke(cli, ["bench", "features", "--events", "3000", "--batch-events", "700", *args],
                                env=settings_env(settings), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def check(data: dict, cluster: bool) -> None:
    assert data["cluster"] is cluster
    assert data["events"] == data["applied"] == data["exact_counts_sum"] == 3000
    assert data["events_per_second"] > 0 and data["client_cpu_microseconds_per_event"] > 0
    assert data["redis_cpu_microseconds_per_event"] > 0
    assert data["declared_keys_per_event"] > 1  # user and item keys, window buckets


def test_bench_features_on_one_redis(settings) -> None:
    check(bench(settings), cluster=False)
    assert not list(redis.Redis.from_url(settings.redis_url).scan_iter("bench-features-*"))


def test_bench_features_on_a_cluster(settings, redis_cluster: RedisCluster) -> None:
    on_cluster = settings.model_copy(update={"redis_url": redis_cluster.url, "redis_cluster": True})
    check(bench(on_cluster), cluster=True)
    for port in redis_cluster.master_ports():
        assert not list(redis.Redis(port=port).scan_iter("bench-features-*"))
