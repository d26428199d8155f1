"""/recommend's asynchronous history read against hostile Redis peers on real sockets: a peer that
accepts and never answers costs a timeout per request only until three come in a row (the
client's timeouts run on the event loop and also count other requests' work), then Redis is
skipped for `redis_retry_s`; a peer that drops every connection is skipped at once."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from streamrec.serving.config import ServingConfig
from streamrec.serving.context import ContextPopularity
from streamrec.serving.explore import ExplorationPool
from streamrec.serving.history import ASYNC_TIMEOUTS_TO_OPEN, History
from streamrec.serving.metrics import serving_metrics
from streamrec.trainer.online.feature_store import FeatureStore, FeatureStoreConfig, UserHistory
from tests.redis_cluster import RedisCluster
from tests.serving.conftest import write_history


@dataclass
class Peer:
    """A TCP server that either holds connections silently or closes each one at once, and
    counts the connections it accepted."""

    silent: bool
    sock: socket.socket = field(default_factory=lambda: socket.create_server(("127.0.0.1", 0)))
    connections: int = 0
    held: list[socket.socket] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.sock.getsockname()[1]}/0"

    def serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            if not self.silent:
                conn.close()
                continue
            self.held.append(conn)
            threading.Thread(target=self._read, args=(conn,), daemon=True).start()

    @staticmethod
    def _read(conn: socket.socket) -> None:
        """Take what the client sends (its handshake, its command) and never answer."""
        while True:
            try:
                if not conn.recv(65536):
                    return
            except OSError:
                return


def _peer(silent: bool) -> Iterator[Peer]:
    peer = Peer(silent)
    threading.Thread(target=peer.serve, daemon=True).start()
    yield peer
    peer.sock.close()
    for conn in peer.held:
        conn.close()


@pytest.fixture
def silent_peer() -> Iterator[Peer]:
    yield from _peer(silent=True)


@pytest.fixture
def closing_peer() -> Iterator[Peer]:
    yield from _peer(silent=False)


def _reads(url: str, n: int) -> list[tuple[list[str], set[str]] | None]:
    history = History(ServingConfig(redis_url=url, redis_timeout_s=0.1, redis_retry_s=60.0), serving_metrics())

    async def run() -> list[tuple[list[str], set[str]] | None]:
        try:
            return [await history.user_history_async("u:1", 10, False) for _ in range(n)]
        finally:
            await history.close()

    return asyncio.run(run())


def test_timeouts_skip_redis_only_after_several_in_a_row(silent_peer: Peer) -> None:
    results = _reads(silent_peer.url, ASYNC_TIMEOUTS_TO_OPEN + 2)
    assert results == [None] * (ASYNC_TIMEOUTS_TO_OPEN + 2)  # every request served without history
    # each of the first requests asked, on a fresh connection since a timed-out one is dropped (a
    # lone slow answer must not blind the worker for a second); from the third timeout in a row on,
    # Redis is not asked
    assert silent_peer.connections == ASYNC_TIMEOUTS_TO_OPEN


def test_a_refused_connection_skips_redis_at_once(closing_peer: Peer) -> None:
    assert _reads(closing_peer.url, 3) == [None, None, None]
    assert closing_peer.connections == 1


def test_a_read_slower_than_the_retry_window_still_opens_it(silent_peer: Peer) -> None:
    """The window was counted from the read's start: a read that took longer than `redis_retry_s`
    (a timeout, a stopped master) opened a window that had already closed, so every request paid
    the whole timeout again."""
    history = History(ServingConfig(redis_url=silent_peer.url, redis_timeout_s=0.3, redis_retry_s=0.2),
                      serving_metrics())
    assert history.trending(5) is None
    asked = silent_peer.connections
    assert asked >= 1 and history.trending(5) is None and history.clock() is None
    assert silent_peer.connections == asked  # not asked again within the window


@pytest.fixture
def store(redis_url: str) -> Iterator[FeatureStore]:
    store = FeatureStore.from_url(redis_url, FeatureStoreConfig(prefix=f"history-{uuid.uuid4().hex[:8]}"))
    yield store
    store.clear()


def test_one_users_broken_key_costs_that_request_alone(store: FeatureStore, redis_url: str) -> None:
    """A key of another type (WRONGTYPE) or a counter that is no number is a fault of one user's data,
    not of Redis: it opened the outage window, and every user went without history for
    `redis_retry_s` each time that one user asked; a broken counter answered 500."""
    write_history(store, [(user, "i:1", 1e9 + n) for n, user in enumerate(("alice", "mallory", "carol"))])
    store.redis.delete(store.keys.entity("u", "mallory", "recent"))
    store.redis.set(store.keys.entity("u", "mallory", "recent"), "not a list")
    store.redis.hset(store.keys.entity("u", "carol"), "events", "oops")
    history = History(ServingConfig(redis_url=redis_url, feature_prefix=store.config.prefix, redis_retry_s=60.0),
                      serving_metrics())

    async def run() -> list[UserHistory | None]:
        try:
            return [await history.user_history_async(user, 10, True, session=True)
                    for user in ("mallory", "alice", "carol", "alice")]
        finally:
            await history.close()

    mallory, alice, carol, alice_again = asyncio.run(run())
    assert mallory is None and carol is None
    assert alice is not None and alice.recent == ["i:1"] and alice_again == alice
    assert history.user_history("mallory", 10, True) is None and history.user_history("carol", 10, True, True) is None
    assert history.user_history("alice", 10, True) is not None and history.trending(3) is not None


def test_an_unreachable_cluster_degrades_requests_and_starts_workers() -> None:
    """redis-py's cluster client raises RedisClusterException, which is no RedisError: a history read
    answered 500, and the context slices and exploration pool (built at start) killed the worker
    while the cluster could not be reached."""
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        url = f"redis://127.0.0.1:{probe.getsockname()[1]}/0"
    config = ServingConfig(redis_url=url, redis_cluster=True, redis_timeout_s=0.2, redis_retry_s=60.0)
    history = History(config, serving_metrics())

    async def run() -> UserHistory | None:
        try:
            return await history.user_history_async("u:1", 10, True)
        finally:
            await history.close()

    assert asyncio.run(run()) is None and history.user_history("u:1", 10, True) is None
    ContextPopularity(config), ExplorationPool(config)  # noqa: B018  # built with nothing to reach


def test_a_stopped_cluster_master_costs_a_blocking_read_no_retries(tmp_path) -> None:
    """/rescore and the console read the history with the blocking cluster client: with redis-py's
    default retries (backing off, up to 10 tries) a read of a stopped master's keys held its
    request for ~4 s. One retry, at once: the request goes without the history within the read's
    timeout. No replica here, so no failover can answer the read instead."""
    cluster = RedisCluster(tmp_path / "cluster", masters=3, replicas=0).start()
    try:
        config = ServingConfig(redis_url=cluster.url, redis_cluster=True, redis_timeout_s=0.5, redis_retry_s=0.0)
        history = History(config, serving_metrics())
        users = [f"u:{n}" for n in range(12)]
        assert all(history.user_history(user, 10, True) == UserHistory([], set()) for user in users)
        client = history.store.redis
        masters = {user: client.get_node_from_key(history.store.keys.entity("u", user)).port for user in users}
        stopped = masters[users[0]]
        cluster.kill(stopped, wait=False)
        for user in [u for u in users if masters[u] == stopped][:3]:
            started = time.monotonic()
            assert history.user_history(user, 10, True) is None
            assert time.monotonic() - started < 2 * config.redis_timeout_s  # not held for retries
        alive = next(u for u in users if masters[u] != stopped)  # the other masters still answer
        assert history.user_history(alive, 10, True) == UserHistory([], set())
    finally:
        cluster.stop()
