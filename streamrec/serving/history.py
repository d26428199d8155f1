"""The user's history and trending items from the online trainer's Redis feature store, for one
request; when Redis fails the request goes on without them (counted), and Redis is not asked
again for `redis_retry_s` so an outage costs one timeout, not one per request.

`/recommend` reads the history with an asyncio client (`user_history_async`): a worker answers
requests on one event loop, and a blocking read held that loop for the whole round trip, ~30% of a
worker's time at saturation on a shared machine, in which no other request could run. Awaited,
the round trip overlaps other requests' candidate work. Handlers that run in the thread pool
(`/rescore`, the console) keep the blocking client.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import TypeVar

import redis
import redis.asyncio
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from streamrec.serving.config import ServingConfig
from streamrec.serving.metrics import ServingMetrics
from streamrec.trainer.online.feature_store import FeatureStore, FeatureStoreConfig, UserHistory, decode_history

T = TypeVar("T")
log = logging.getLogger(__name__)
# redis-py's Redis Cluster client raises RedisClusterException (no RedisError) when no node answers
FAILURES = (redis.RedisError, redis.exceptions.RedisClusterException, ValueError)
DATA_ERROR_LOG_S = 60.0  # a broken key is logged at most this often (each request that meets it is counted)
ASYNC_CONNECTIONS = 32  # per worker; requests beyond that wait for one
# The asyncio client's timeouts run on the worker's event loop, so they also count the time other
# requests hold it (candidate work, an overload): at least this long, and a timeout (or a wait for
# a pooled connection) opens the outage window only when ASYNC_TIMEOUTS_TO_OPEN come in a row; a
# refused or broken connection, or an error reply, opens it at once, as for the blocking client.
ASYNC_MIN_TIMEOUT_S = 0.5
ASYNC_TIMEOUTS_TO_OPEN = 3


class History:
    def __init__(self, config: ServingConfig, metrics: ServingMetrics) -> None:
        self.config = config
        self.store = FeatureStore.from_url(
            config.redis_url, FeatureStoreConfig(prefix=config.feature_prefix, cluster=config.redis_cluster),
            timeout_s=config.redis_timeout_s, fail_fast=True)
        # connections are made on first use, in the event loop that awaits them (the worker's); at
        # most ASYNC_CONNECTIONS, so a burst of requests queues for a connection instead of
        # opening one per request in flight
        timeout = max(config.redis_timeout_s, ASYNC_MIN_TIMEOUT_S)
        self.async_redis: redis.asyncio.Redis | redis.asyncio.RedisCluster
        if config.redis_cluster:  # a user's history keys share their bucket's slot: one node per read
            # one retry, at once: redis-py's default (10, backing off) held each request on a stopped
            # master for 3-7 s, longer than the outage window it then opened
            self.async_redis = redis.asyncio.RedisCluster.from_url(
                config.redis_url, max_connections=ASYNC_CONNECTIONS, socket_timeout=timeout,
                socket_connect_timeout=timeout, retry=Retry(NoBackoff(), 1))
        else:
            pool = redis.asyncio.BlockingConnectionPool.from_url(
                config.redis_url, max_connections=ASYNC_CONNECTIONS, timeout=timeout, socket_timeout=timeout,
                socket_connect_timeout=timeout)
            self.async_redis = redis.asyncio.Redis(connection_pool=pool)
        self._redis_errors = metrics.degraded.labels("redis")
        self._down_until = 0.0
        self._timeouts_in_a_row = 0
        self._trending: list[tuple[str, float]] = []
        self._trending_n = 0
        self._trending_at = -float("inf")
        self._clock: float | None = None
        self._clock_at = -float("inf")
        self._data_error_logged_at = -float("inf")

    def _call(self, read: Callable[[], T]) -> T | None:
        if time.monotonic() < self._down_until:
            return None
        try:
            return read()
        except FAILURES as exc:
            self._failed(exc)
            return None

    def _failed(self, exc: BaseException) -> None:
        """A failed read: Redis is not asked again for `redis_retry_s` from now (from the read's start,
        a read slower than that opened a window already closed), unless the fault is in the data
        read (one user's key of another type, a counter that is no number): that request goes
        without, the others still read, and the key is logged."""
        if not _data_error(exc):
            self._down_until = time.monotonic() + self.config.redis_retry_s
            return
        now = time.monotonic()
        if now - self._data_error_logged_at >= DATA_ERROR_LOG_S:
            self._data_error_logged_at = now
            log.warning("feature store data that cannot be read (the request goes on without it): %s: %s",
                        type(exc).__name__, exc)

    def count_degraded(self) -> None:
        self._redis_errors.inc()

    def user_history(self, user: str, recent: int, seen: bool, session: bool = False) -> UserHistory | None:
        """(newest `recent` items, seen items, the session's state) in one Redis round trip; None
        while Redis is down."""
        if not recent and not seen and not session:
            return UserHistory([], set())
        return self._call(lambda: self.store.user_history(user, recent, seen, session))

    async def user_history_async(self, user: str, recent: int, seen: bool, session: bool = False,
                                 ) -> UserHistory | None:
        """`user_history` awaited on the worker's event loop."""
        if not recent and not seen and not session:
            return UserHistory([], set())
        if time.monotonic() < self._down_until:
            return None
        commands = self.store.history_commands(user, recent, seen, session)
        try:
            if len(commands) == 1:
                replies = [await self.async_redis.execute_command(*commands[0])]
            else:
                async with self.async_redis.pipeline(transaction=False) as pipe:
                    for command in commands:
                        pipe.execute_command(*command)
                    replies = await pipe.execute()
            history = decode_history(replies, recent, seen, session)
        except (*FAILURES, asyncio.TimeoutError) as exc:
            if _timed_out(exc):
                self._timeouts_in_a_row += 1
                if self._timeouts_in_a_row < ASYNC_TIMEOUTS_TO_OPEN:
                    return None  # this request goes without the history; Redis is asked again
            self._timeouts_in_a_row = 0
            self._failed(exc)
            return None
        self._timeouts_in_a_row = 0
        return history

    async def close(self) -> None:
        await self.async_redis.aclose()
        if isinstance(self.async_redis, redis.asyncio.Redis):  # a pool passed in is not closed with the client
            await self.async_redis.connection_pool.disconnect()

    def clock(self) -> float | None:
        """The feature store's clock (its newest event time), re-read every `trending_cache_s`:
        it tells whether a user's session has ended. None while Redis is down and nothing was read."""
        now = time.monotonic()
        if now - self._clock_at >= self.config.trending_cache_s:
            clock = self._call(self.store.clock)
            if clock is None:
                return self._clock
            self._clock, self._clock_at = clock, now
        return self._clock

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
            if not fresh:  # nothing written yet (a new or just restarted Redis): ask again next time
                return fresh
            self._trending, self._trending_n, self._trending_at = fresh, fetch, now
        return self._trending if len(self._trending) <= n else self._trending[:n]  # same object while cached


def _data_error(exc: BaseException) -> bool:
    """A fault of the data read, not of Redis: a key of another type, a value that does not decode."""
    if isinstance(exc, ValueError):
        return True
    reply = str(exc).rpartition(" of pipeline caused error: ")[2]  # a pipeline's names the command first
    return isinstance(exc, redis.ResponseError) and reply.startswith("WRONGTYPE")


def _timed_out(exc: BaseException) -> bool:
    """A timeout, not a refusal: a reply or connection that did not come in time, or no pooled
    connection free in time (the pool raises ConnectionError from a TimeoutError)."""
    return isinstance(exc, (redis.TimeoutError, asyncio.TimeoutError)) or isinstance(exc.__cause__, asyncio.TimeoutError)
