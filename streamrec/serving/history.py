"""The user's history and trending items from the online trainer's Redis feature store, for one
request; when Redis fails the request goes on without them (counted), and Redis is not asked
again for `redis_retry_s` so an outage costs one timeout, not one per request."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

import redis

from streamrec.serving.config import ServingConfig
from streamrec.serving.metrics import ServingMetrics
from streamrec.trainer.online.feature_store import FeatureStore, FeatureStoreConfig

T = TypeVar("T")


class History:
    def __init__(self, config: ServingConfig, metrics: ServingMetrics) -> None:
        self.config = config
        self.store = FeatureStore.from_url(config.redis_url, FeatureStoreConfig(prefix=config.feature_prefix),
                                           timeout_s=config.redis_timeout_s)
        self._redis_errors = metrics.degraded.labels("redis")
        self._down_until = 0.0
        self._trending: list[tuple[str, float]] = []
        self._trending_n = 0
        self._trending_at = -float("inf")

    def _call(self, read: Callable[[], T]) -> T | None:
        now = time.monotonic()
        if now < self._down_until:
            return None
        try:
            return read()
        except redis.RedisError:
            self._down_until = now + self.config.redis_retry_s
            return None

    def count_degraded(self) -> None:
        self._redis_errors.inc()

    def user_history(self, user: str, recent: int, seen: bool) -> tuple[list[str], set[str]] | None:
        """(newest `recent` items, seen items) in one Redis round trip; None while Redis is down."""
        if not recent and not seen:
            return [], set()
        if not seen:  # a single command skips redis-py's pipeline machinery (~40% of this call's CPU)
            newest = self._call(lambda: self.store.recent_items(user, recent))
            return None if newest is None else (newest, set())
        return self._call(lambda: self.store.user_history(user, recent, seen))

    def trending(self, n: int) -> list[tuple[str, float]] | None:
        """Top-n by decayed popularity; one worker reuses the list for `trending_cache_s`."""
        if not n:
            return []
        now = time.monotonic()
        if now - self._trending_at >= self.config.trending_cache_s or n > self._trending_n:
            fetch = max(n, self.config.trending_candidates)
            fresh = self._call(lambda: self.store.popular(fetch))
            if fresh is None:
                return None
            self._trending, self._trending_n, self._trending_at = fresh, fetch, now
        return self._trending if len(self._trending) <= n else self._trending[:n]  # same object while cached
