"""The bounded user cache against a real parameter server: LRU eviction, deltas reaching only the
cached users (a user's first row included), and a parameter server down or stopped giving stale or
cold-start answers marked degraded, never an error."""

from __future__ import annotations

import signal

import numpy as np

from streamrec.param_server.client import ParamClient
from streamrec.serving.config import ServingConfig
from streamrec.serving.metrics import serving_metrics
from streamrec.serving.users import UserCache
from tests.param_server.conftest import ServerProcess
from tests.serving.conftest import StartServing, load_model, wait_for

DIM = 4


def _users(n: int) -> dict[str, np.ndarray]:
    return {f"u{j}": np.full(DIM, j + 1, np.float32) for j in range(n)}


def _items(n: int) -> dict[str, np.ndarray]:
    vectors = np.random.default_rng(0).normal(size=(n, DIM)).astype(np.float32)
    return {f"i{j}": vectors[j] for j in range(n)}


def _cache(address: str, size: int) -> UserCache:
    return UserCache(ServingConfig(param_servers=[address], user_cache_size=size), serving_metrics())



def test_cache_is_bounded_and_evicts_least_recently_used(ps: ParamClient, param_server: ServerProcess) -> None:
    load_model(ps, _users(5), _items(10))
    cache = _cache(param_server.address, 3)
    for user in ("u0", "u1", "u2", "u0", "u3"):  # u0 used again, so u1 is the oldest when u3 arrives
        row, reachable = cache.get(user)
        assert reachable and row is not None and np.array_equal(row, np.full(DIM, int(user[1:]) + 1, np.float32))
    assert cache.ids() == ["u2", "u0", "u3"] and len(cache) == 3
    row, reachable = cache.get("nobody")  # absent users take an entry too (cold-start users ask again)
    assert row is None and reachable and cache.ids() == ["u0", "u3", "nobody"]
    cache.close()


def test_deltas_update_only_cached_users(ps: ParamClient, param_server: ServerProcess) -> None:
    load_model(ps, _users(5), _items(10))
    cache = _cache(param_server.address, 10)
    assert cache.get("u0").row is not None and cache.get("newcomer").row is None
    since = tuple(ps.tables()["bpr_users"]["versions"])
    ps.assign("bpr_users", ["u0", "u4", "newcomer"], np.full((3, DIM), 7, np.float32))
    cache.follow(ps.delta_chunks("bpr_users", since), ps.shard_of)
    assert sorted(cache.ids()) == ["newcomer", "u0"]  # u4 changed but is not cached: dropped
    assert np.array_equal(cache.get("u0").row, np.full(DIM, 7, np.float32))
    assert np.array_equal(cache.get("newcomer").row, np.full(DIM, 7, np.float32))  # the first row reached it
    cache.close()


def test_a_user_with_new_events_is_pulled_again_without_waiting_for_a_poll(
        ps: ParamClient, param_server: ServerProcess) -> None:
    """Read-your-writes: a cached row is pulled again when the feature store's count of the
    user's events has grown since the last pull; otherwise never. A user the poll brought in first
    notes the count; with `user_pull_on_events` off, rows wait for the poll."""
    load_model(ps, _users(3), _items(10))
    config = ServingConfig(param_servers=[param_server.address])
    cache = UserCache(config, serving_metrics())
    cache.follow(ps.delta_chunks("bpr_users", 0), ps.shard_of, fill=True)  # u0..u2 from the "poll"
    assert cache.get("newcomer", 1).row is None  # pulled: no row yet, 1 event noted
    ps.assign("bpr_users", ["u0", "newcomer"], np.full((2, DIM), 7, np.float32))  # the trainer pushes
    assert np.array_equal(cache.get("u0", 5).row, np.full(DIM, 1, np.float32))  # first sight: the poll's row, 5 noted
    assert np.array_equal(cache.get("u0", 5).row, np.full(DIM, 1, np.float32))  # no new event: no pull
    assert np.array_equal(cache.get("u0", 6).row, np.full(DIM, 7, np.float32))  # a new event: the pushed row
    assert cache.get("newcomer", 1).row is None  # same count, no position known: the absent entry stands
    assert np.array_equal(cache.get("newcomer", 3).row, np.full(DIM, 7, np.float32))
    assert np.array_equal(cache.get("u1").row, np.full(DIM, 2, np.float32))  # no count known: the cached row
    assert cache.get("stranger").row is None  # pulled before the store counted any event of theirs
    ps.assign("bpr_users", ["stranger"], np.full((1, DIM), 4, np.float32))
    assert np.array_equal(cache.get("stranger", 1).row, np.full(DIM, 4, np.float32))  # their first counted event
    cache.close()

    lazy = UserCache(config.model_copy(update={"user_pull_on_events": False}), serving_metrics())
    assert lazy.get("u2", 1).row is not None
    ps.assign("bpr_users", ["u2"], np.full((1, DIM), 9, np.float32))
    assert np.array_equal(lazy.get("u2", 9).row, np.full(DIM, 3, np.float32))
    lazy.close()


def test_a_row_that_has_not_learned_the_users_newest_event_is_pulled_until_it_has(
        ps: ParamClient, param_server: ServerProcess) -> None:
    """The trainer writes a batch's features while it learns the batch, so the store can place a
    user's newest event (partition, offset) before the push that learns it lands. A pull returns
    the watermarks its row has learned, and until its partition's passes that offset every request
    pulls again: at most every `user_pull_interval_s`, for at most `user_pull_lag_s` after the
    count grew (a stopped trainer costs no pull after that)."""
    load_model(ps, _users(1), _items(10))
    newest = ("events/0", 20)  # the feature store: 21 events, the newest at offset 20
    config = ServingConfig(param_servers=[param_server.address], user_pull_interval_s=0.0)
    cache = UserCache(config, serving_metrics())
    before = cache.get("u0", 21, newest).row  # pulled: the row the trainer pushed before this batch
    assert np.array_equal(before, np.full(DIM, 1, np.float32))
    assert np.array_equal(cache.get("u0", 21, newest).row, before)  # the row still lags: pulled, unchanged
    ps.push({"bpr_users": (["u0"], np.full((1, DIM), -1, np.float32))}, ranges={newest[0]: (0, 21)})
    learned = cache.get("u0", 21, newest).row  # same count, pulled again: the push has landed
    assert not np.array_equal(learned, before)
    ps.assign("bpr_users", ["u0"], np.full((1, DIM), 9, np.float32))
    assert np.array_equal(cache.get("u0", 21, newest).row, learned)  # it has learned offset 20: no pull
    assert np.array_equal(cache.get("u0", 22, ("events/0", 21)).row, np.full(DIM, 9, np.float32))  # a new event
    cache.close()

    ahead = ("events/0", 40)  # events the trainer has not pushed (it is slow, or stopped)
    patient = UserCache(config.model_copy(update={"user_pull_interval_s": 60.0}), serving_metrics())
    assert np.array_equal(patient.get("u0", 30, ahead).row, np.full(DIM, 9, np.float32))
    ps.assign("bpr_users", ["u0"], np.full((1, DIM), 5, np.float32))
    assert np.array_equal(patient.get("u0", 30, ahead).row, np.full(DIM, 9, np.float32))  # pulled a moment ago
    patient.close()
    stopped = UserCache(config.model_copy(update={"user_pull_lag_s": 0.0}), serving_metrics())
    assert np.array_equal(stopped.get("u0", 30, ahead).row, np.full(DIM, 5, np.float32))
    ps.assign("bpr_users", ["u0"], np.full((1, DIM), 3, np.float32))
    assert np.array_equal(stopped.get("u0", 30, ahead).row, np.full(DIM, 5, np.float32))  # given up: the poll's job
    stopped.close()


def test_first_poll_fills_the_cache_up_to_its_size(ps: ParamClient, param_server: ServerProcess) -> None:
    load_model(ps, _users(5), _items(10))
    cache = _cache(param_server.address, 3)
    versions = cache.follow(ps.delta_chunks("bpr_users", 0, chunk_rows=2), ps.shard_of, fill=True)
    assert len(versions) == ps.num_shards and len(cache) == 3
    for user in cache.ids():
        assert np.array_equal(cache.get(user).row, np.full(DIM, int(user[1:]) + 1, np.float32))
    cache.close()


def test_new_and_changed_users_served_within_a_poll(ps: ParamClient, param_server: ServerProcess, redis_url: str,
                                                    prefix: str, start_serving: StartServing) -> None:
    items = _items(20)
    load_model(ps, {"u": np.ones(DIM, np.float32)}, items)
    serving = start_serving(param_server.address, redis_url, prefix, poll=0.3, args=("--user-cache-size", "2"))
    assert serving.get("/recommend", user_id="late", k=3).json()["cold_start"]  # cached as absent
    first = serving.get("/recommend", user_id="u", k=1).json()
    matrix = np.array(list(items.values()))
    # an item that is its own best match (the longest vector is one), other than u's current top
    target = next(item for j, item in enumerate(items)
                  if int(np.argmax(matrix @ matrix[j])) == j and item != first["items"][0]["item_id"])
    ps.assign("bpr_users", ["late", "u"], np.repeat(items[target][None] * 100, 2, axis=0))
    late = wait_for(lambda: not (r := serving.get("/recommend", user_id="late", k=1).json())["cold_start"] and r)
    assert late["items"][0]["item_id"] == target and late["degraded"] == []
    wait_for(lambda: serving.get("/recommend", user_id="u", k=1).json()["items"][0]["item_id"] == target)
    ready = serving.get("/readyz").json()
    assert ready["users"] == 2 and ready["cached_users"] == 2


def test_param_server_down_or_stopped_never_fails_a_request(ps: ParamClient, param_server: ServerProcess,
                                                            redis_url: str, prefix: str,
                                                            start_serving: StartServing) -> None:
    load_model(ps, _users(2), _items(30))
    serving = start_serving(param_server.address, redis_url, prefix, poll=0.2)  # the first poll caches u0, u1
    before = serving.get("/recommend", user_id="u1", k=5).json()
    assert not before["cold_start"] and before["degraded"] == []
    ps.assign("bpr_users", ["u2"], np.ones((1, DIM), np.float32))  # a row no request has asked for yet
    wait_for(lambda: serving.get("/readyz").json()["users"] == 3)

    def check_outage() -> None:
        cached = serving.get("/recommend", user_id="u1", k=5).json()  # the cached row, stale
        assert cached["items"] == before["items"] and cached["degraded"] == []
        for user in ("u2", "stranger"):  # has a row at the server / has none: neither is cached
            reply = serving.get("/recommend", user_id=user, k=5)
            assert reply.status_code == 200 and reply.json()["cold_start"], reply.text
            assert reply.json()["degraded"] == ["param_server"] and len(reply.json()["items"]) == 5
        rescored = serving.http.post("/rescore", json={"user_id": "u2", "candidates": ["i1", "i2"]})
        assert rescored.status_code == 200 and rescored.json()["degraded"] == ["param_server"]

    param_server.proc.send_signal(signal.SIGSTOP)  # slow: connections accepted, never answered
    try:
        check_outage()
    finally:
        param_server.proc.send_signal(signal.SIGCONT)
    param_server.kill()  # down: connections refused
    check_outage()
    assert 'streamrec_serving_degraded_total{reason="param_server"}' in serving.get("/metrics").text
