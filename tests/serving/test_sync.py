"""Sync against real processes: a pushed change appears at the next poll and not before, requests
racing state swaps see one version each, and parameter-server or Redis outages degrade, never fail."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from pathlib import Path

import httpx
import numpy as np

from streamrec.app import infra
from streamrec.core.net import port_open
from streamrec.param_server.artifacts import CATALOGUE_BLOB, KNN_BLOB, RANKER_BLOB, encode_dense, encode_neighbors
from streamrec.param_server.client import Delta, ParamClient
from streamrec.param_server.keys import Keys
from streamrec.param_server.replica import TableMirror
from streamrec.serving.index import ENTRY_OVERHEAD_BYTES, ItemIndex, MemoCounts, query_rows
from streamrec.trainer.online.feature_store import FeatureStore, FeatureStoreConfig
from tests.param_server.conftest import ServerProcess
from tests.serving.conftest import (
    StartServing,
    free_port,
    load_model,
    wait_for,
    write_history,
)
from tests.test_parent_watch import wait_gone

DIM = 4


def _items(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    vectors = np.random.default_rng(seed).normal(size=(n, DIM)).astype(np.float32)
    return {f"i{j}": vectors[j] for j in range(n)}



def test_change_served_after_next_poll_not_before(ps: ParamClient, param_server: ServerProcess, redis_url: str,
                                                  prefix: str, start_serving: StartServing) -> None:
    items = _items(20)
    load_model(ps, {"u": np.ones(DIM, np.float32)}, items)
    serving = start_serving(param_server.address, redis_url, prefix, poll=2.0)
    first = serving.get("/recommend", user_id="u", k=1).json()
    assert first["items"][0]["item_id"] != "i5"
    first_sync = serving.get("/readyz").json()["synced_at"]
    # wait for a poll to happen, so the next one is a whole poll interval away
    synced = wait_for(lambda: (at := serving.get("/readyz").json()["synced_at"]) != first_sync and at)
    pushed_at = time.time()
    ps.assign("bpr_items", ["i5"], np.full((1, DIM), 10, np.float32), np.zeros(1, np.float32))
    before = serving.get("/recommend", user_id="u", k=1).json()
    assert serving.get("/readyz").json()["synced_at"] == synced, "no poll may fall between the push and the check"
    assert before["items"] == first["items"] and before["model_version"] == first["model_version"]
    wait_for(lambda: serving.get("/readyz").json()["synced_at"] > pushed_at)
    after = serving.get("/recommend", user_id="u", k=1).json()
    assert after["items"][0]["item_id"] == "i5" and after["model_version"] > first["model_version"]
    memo = {line.split('"')[1]: float(line.split()[-1]) for line in serving.get("/metrics").text.splitlines()
            if line.startswith("streamrec_serving_search_memo_total{")}
    assert memo["hit"] >= 1 and memo["miss"] >= 2  # `before` came from the memo, `after` could not


def test_requests_racing_swaps_see_one_version(ps: ParamClient, param_server: ServerProcess, redis_url: str,
                                               prefix: str, start_serving: StartServing) -> None:
    """Odd generations g set every item's bias to 1000 g, even ones only the first tenth's (|dot| < 10):
    a response shows the generation of its state on those items and that or the one before on the
    rest, and one model_version always gives the same answer to the same request."""
    n = 300
    items = {key: value / 10 for key, value in _items(n).items()}
    load_model(ps, {f"u{u}": np.full(DIM, 0.5 + u, np.float32) for u in range(4)}, items)
    serving = start_serving(param_server.address, redis_url, prefix, workers=2, poll=0.05)
    stop = threading.Event()

    def publish() -> None:
        with ParamClient([param_server.address]) as writer:
            generation = 0
            while not stop.is_set():
                generation += 1
                changed = list(items) if generation % 2 else list(items)[: n // 10]  # rebuilds and incremental updates
                writer.assign("bpr_items", changed, np.array([items[i] for i in changed]),
                              np.full(len(changed), 1000.0 * generation, np.float32))
                time.sleep(0.02)

    async def load() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=serving.url, timeout=10,
                                     limits=httpx.Limits(max_connections=32)) as client:
            deadline = time.monotonic() + 4.0

            async def loop(worker: int) -> list[httpx.Response]:
                replies = []
                while time.monotonic() < deadline:
                    if worker % 4 == 0:
                        replies.append(await client.post("/rescore", json={"user_id": "u1", "candidates": list(items)[:50]}))
                    else:
                        replies.append(await client.get("/recommend", params={"user_id": f"u{worker % 4}", "k": 20,
                                                                               "exclude_seen": "false"}))
                return replies

            results = await asyncio.gather(*(loop(w) for w in range(32)))
        return [reply for replies in results for reply in replies]

    thread = threading.Thread(target=publish)
    thread.start()
    try:
        replies = asyncio.run(load())
    finally:
        stop.set()
        thread.join()
    assert len(replies) > 100 and all(reply.status_code == 200 for reply in replies)
    subset = set(list(items)[: n // 10])
    answers: dict[tuple, set[str]] = {}
    for reply in replies:
        body = reply.json()
        generation = {item["item_id"]: round(item["score"] / 1000) for item in body["items"]}
        latest = max(generation.values())
        for item, g in generation.items():
            allowed = {latest} if item in subset or latest % 2 else {latest, latest - 1}
            assert g in allowed, body
        key = (body["model_version"], reply.request.method, reply.request.url.query, body["user_id"])
        answers.setdefault(key, set()).add(str(body["items"]))
    assert all(len(answer) == 1 for answer in answers.values())
    assert len({key[0] for key in answers}) > 3  # swaps really happened during the load


def test_index_follows_deltas_like_a_rebuild(ps: ParamClient) -> None:
    """Incremental updates (flat and IVF) give the same answers as an index built from scratch,
    also for single queries asked before the update, whose answers the memo held."""
    items = _items(2000, seed=1)
    load_model(ps, {"u": np.ones(DIM, np.float32)}, items)
    mirror = TableMirror(ps, "bpr_items")
    counts = MemoCounts()
    indexes = [ItemIndex("flat", memo_bytes=2**20, memo_counts=counts), ItemIndex("ivf", nprobe=64, memo_bytes=2**20)]
    initial = mirror.apply(ps.delta("bpr_items", 0))
    assert all(index.update(initial, mirror) for index in indexes)  # the first delta builds
    rng = np.random.default_rng(2)
    queries = query_rows(rng.normal(size=(20, DIM)).astype(np.float32), mirror)
    before = [[index.search(queries[j : j + 1], 10)[1] for j in range(20)] for index in indexes]
    changed = [f"i{j}" for j in rng.choice(2000, 100, replace=False)]
    ps.assign("bpr_items", changed, rng.normal(size=(100, DIM)).astype(np.float32) * 3, np.ones(100, np.float32))
    changes = mirror.apply(ps.delta("bpr_items", mirror.version))
    assert len(changes.upserted) == 100 and not changes.full
    for index, answers in zip(indexes, before):
        assert [index.search(queries[j : j + 1], 10)[1] for j in range(20)] == answers  # memo answers
        assert index.update(changes, mirror) is False  # incremental, not rebuilt
        fresh = ItemIndex(index.kind, nprobe=64)
        fresh.rebuild(mirror)
        expected = fresh.search(queries, 10)[1]
        assert np.array_equal(index.search(queries, 10)[1], expected)
        singles = np.vstack([index.search(queries[j : j + 1], 10)[1] for j in range(20)])
        assert np.array_equal(singles, expected)  # the memo did not outlive the update
        assert not np.array_equal(np.vstack(answers), expected)  # the update moved answers
    assert (counts.hits.value, counts.misses.value) == (20, 40)  # 20 asked twice before, 20 after


def test_memo_is_bounded_read_only_and_reset_by_rebuilds(ps: ParamClient) -> None:
    load_model(ps, {"u": np.ones(DIM, np.float32)}, _items(500))
    mirror = TableMirror(ps, "bpr_items")
    mirror.apply(ps.delta("bpr_items", 0))
    queries = query_rows(np.random.default_rng(3).normal(size=(5, DIM)).astype(np.float32), mirror)
    entry = queries[:1].nbytes + 7 * (4 + 8) + ENTRY_OVERHEAD_BYTES  # the key, 7 float32 scores, 7 int64 positions
    index = ItemIndex("flat", memo_bytes=3 * entry)
    index.rebuild(mirror)
    for row in range(5):
        scores, positions = index.search(queries[row : row + 1], 7)
    assert len(index.memo) == 3 and index.memo.nbytes == 3 * entry
    index.search(queries[0:1], 400)  # larger than the whole bound: answered, not kept
    assert len(index.memo) == 3
    assert not positions.flags.writeable and not scores.flags.writeable
    assert index.search(queries[4:5], 7)[1] is positions and index.search(queries[4:5], 8)[1] is not positions
    assert index.clone().search(queries[4:5], 7)[1] is not positions  # a clone starts empty
    index.rebuild(mirror)
    assert len(index.memo) == 0
    batch = index.search(queries, 7)  # several rows: FAISS directly, writeable
    assert batch[1].flags.writeable and len(index.memo) == 0
    key = ("<f4", queries.shape[1], queries[:1].tobytes(), 7)
    missed, generation = index.memo.get(key)
    index.memo.clear()  # an index change while that search ran: its answer is not remembered
    index.memo.put(key, batch, generation)
    assert missed is None and len(index.memo) == 0


def test_param_server_outage_keeps_serving(ps: ParamClient, param_server: ServerProcess, redis_url: str,
                                           prefix: str, start_serving: StartServing) -> None:
    load_model(ps, {"u": np.ones(DIM, np.float32)}, _items(30))
    serving = start_serving(param_server.address, redis_url, prefix, poll=0.2)
    before = serving.get("/recommend", user_id="u", k=5).json()
    param_server.kill()
    ready = wait_for(lambda: (r := serving.get("/readyz")).json()["last_error"] and r)  # a poll has failed
    assert ready.status_code == 200
    after = serving.get("/recommend", user_id="u", k=5).json()
    assert after["items"] == before["items"] and after["model_version"] == before["model_version"]
    later = wait_for(lambda: (r := serving.get("/recommend", user_id="u", k=5).json())["staleness_seconds"] > 2.0 and r)
    assert later["items"] == before["items"]
    metrics = serving.get("/metrics").text
    failures = next(line for line in metrics.splitlines() if line.startswith("streamrec_serving_sync_failures_total"))
    assert float(failures.split()[-1]) >= 1


def test_redis_outage_serves_without_history(ps: ParamClient, param_server: ServerProcess, tmp_path: Path,
                                             start_serving: StartServing) -> None:
    redis_server = infra.start_redis(tmp_path)  # a Redis of this test alone, to stop it
    url = f"redis://{redis_server.host}:{redis_server.port}/0"
    try:
        load_model(ps, {"u": np.ones(DIM, np.float32)}, _items(30))
        store = FeatureStore.from_url(url, FeatureStoreConfig(prefix="outage"))
        full = None
        serving = start_serving(param_server.address, url, "outage", poll=0.2)
        full = [item["item_id"] for item in serving.get("/recommend", user_id="u", k=5).json()["items"]]
        write_history(store, [("u", full[0], 1e9)])
        filtered = serving.get("/recommend", user_id="u", k=5).json()
        assert full[0] not in [item["item_id"] for item in filtered["items"]] and filtered["degraded"] == []
    finally:
        infra.stop(redis_server.to_json())
    degraded = serving.get("/recommend", user_id="u", k=5).json()
    assert degraded["degraded"] == ["redis"] and [item["item_id"] for item in degraded["items"]] == full
    # no trending once the worker's cached list (trending_cache_s) has lapsed: the bias prior
    cold = wait_for(lambda: (r := serving.get("/recommend", user_id="nobody", k=3).json())["items"][0]["sources"]
                    == ["prior"] and r, timeout=10)
    assert cold["cold_start"] and len(cold["items"]) == 3
    assert 'streamrec_serving_degraded_total{reason="redis"}' in serving.get("/metrics").text


def _delta(ids: list[str], deleted: list[str], version: int) -> Delta:
    return Delta(values=np.ones((len(ids), DIM + 1), np.float32), found=np.ones(len(ids), bool), dim=DIM,
                 ids=Keys.from_strings(ids), deleted=Keys.from_strings(deleted) if deleted else Keys.empty("str"),
                 version=(version,), full=False)


def test_serving_item_mirror_compacts_dead_rows() -> None:
    """Serving's mirrors drop deleted rows once they outnumber the live ones (a full change, so the
    index rebuilds); a mirror without `compact` keeps its row positions."""
    items = [f"i{j}" for j in range(3000)]
    compacting, stable = TableMirror(None, "items", compact=True), TableMirror(None, "items")
    for mirror in (compacting, stable):
        mirror.apply(_delta(items, [], 1))
    assert not compacting.apply(_delta([], items[:1400], 2)).full  # 1400 dead < 1600 live
    changes = compacting.apply(_delta(["new"], items[1400:1700], 3))  # 1700 dead > 1301 live
    assert changes.full and len(compacting.index) == len(compacting) == 1301 and compacting.alive.all()
    assert compacting.position("i1700") == 0 and compacting.position("new") == 1300
    assert compacting.position("i5") == -1
    index = ItemIndex("flat")
    assert index.update(changes, compacting) and index.size == 1301
    stable.apply(_delta([], items[:1700], 2))
    assert len(stable.index) == 3000 and stable.position("i1700") == 1700


def test_a_starting_worker_answers_from_a_model_not_503(ps: ParamClient, param_server: ServerProcess, redis_url: str,
                                                        prefix: str, start_serving: StartServing) -> None:
    """A worker takes connections only after its first poll: the first answer it gives, while
    the parameter server holds a model, is a recommendation (a worker replacing a killed one
    shares the socket with workers that have a model, and must not answer 503 meanwhile)."""
    rng = np.random.default_rng(1)
    users = {f"u{j}": v for j, v in enumerate(rng.normal(size=(50_000, DIM)).astype(np.float32))}
    load_model(ps, users, _items(2000))
    serving = start_serving(param_server.address, redis_url, prefix, poll=60.0, ready=False)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            reply = serving.fresh_get("/recommend?user_id=u7&k=5")
            break
        except httpx.TransportError:  # not listening yet
            time.sleep(0.005)
    else:
        raise AssertionError(serving.log.read_text()[-3000:])
    assert reply.status_code == 200, reply.text
    assert len(reply.json()["items"]) == 5


def test_a_worker_started_while_its_shard_restarts_answers_from_a_model(tmp_path: Path, redis_url: str, prefix: str,
                                                                         start_serving: StartServing) -> None:
    """A worker whose first polls fail (its shard is down) keeps retrying and takes no connection
    until the shard is back with its model; with a 60 s poll interval, one failed poll used to
    leave it answering 503 "no model loaded yet" for a minute while its siblings served."""
    port = free_port()
    env = {**os.environ, "STREAMREC_HOME": str(tmp_path / "ps-home")}
    env.pop("STREAMREC_PARAM_SERVER_TOKEN", None)
    args = ["--port", str(port), "--checkpoint-dir", str(tmp_path / "checkpoints")]
    shard = ServerProcess(args, env)
    with ParamClient([shard.address]) as client:
        load_model(client, {"u": np.ones(DIM, np.float32)}, _items(30))
    shard.stop()  # a final checkpoint, then down
    serving = start_serving(shard.address, redis_url, prefix, poll=60.0, ready=False)
    wait_for(lambda: "poll failed" in serving.log.read_text(), timeout=60)  # its first poll met the down shard
    serving_port = int(serving.url.rpartition(":")[2])
    assert not port_open("127.0.0.1", serving_port)  # so it takes no connection yet
    shard = ServerProcess(args, env)  # restored from its checkpoint
    try:
        wait_for(lambda: port_open("127.0.0.1", serving_port), timeout=30)
        reply = serving.fresh_get("/recommend?user_id=u&k=5")
        assert reply.status_code == 200, reply.text
        assert len(reply.json()["items"]) == 5 and not reply.json()["cold_start"]
    finally:
        shard.stop()


def test_a_worker_keeps_its_model_and_says_so_when_the_shard_restarts_empty(tmp_path: Path, redis_url: str,
                                                                           prefix: str,
                                                                           start_serving: StartServing) -> None:
    """A shard restarted without state has no tables: a worker that has a model keeps serving it,
    and /readyz reports the failing polls (not a fresh confirmation of a model the server lost)."""
    port = free_port()
    env = {**os.environ, "STREAMREC_HOME": str(tmp_path / "ps-home")}
    env.pop("STREAMREC_PARAM_SERVER_TOKEN", None)
    shard = ServerProcess(["--port", str(port), "--no-checkpoints"], env)
    with ParamClient([shard.address]) as client:
        load_model(client, {"u": np.ones(DIM, np.float32)}, _items(30))
    serving = start_serving(shard.address, redis_url, prefix, poll=0.2)
    before = serving.get("/recommend", user_id="u", k=5).json()
    shard.kill()
    shard = ServerProcess(["--port", str(port), "--no-checkpoints"], env)  # the same address, nothing in it
    try:
        ready = wait_for(lambda: "KeyError" in ((r := serving.get("/readyz").json())["last_error"] or "") and r)
        assert ready["ready"] and ready["model_version"] == before["model_version"]  # the server answers: no table
        later = wait_for(lambda: (r := serving.get("/recommend", user_id="u", k=5).json())["staleness_seconds"] > 1.0 and r)
        assert later["items"] == before["items"]
    finally:
        shard.stop()


def test_a_worker_without_a_model_serves_the_first_one_before_its_next_poll(
        ps: ParamClient, param_server: ServerProcess, redis_url: str, prefix: str,
        start_serving: StartServing) -> None:
    """Started on an empty parameter server, a worker is ready (there is nothing to wait for) but has
    nothing to serve; it keeps asking at the short retry pace until the first model exists, so
    with a 60 s poll interval it serves that model at once, not a minute after its siblings."""
    serving = start_serving(param_server.address, redis_url, prefix, poll=60.0, ready=False)
    wait_for(lambda: port_open("127.0.0.1", int(serving.url.rpartition(":")[2])), timeout=60)
    empty = serving.get("/recommend", user_id="u", k=5)
    assert empty.status_code == 503, empty.text  # no model, no trending: nothing to answer with
    load_model(ps, {"u": np.ones(DIM, np.float32)}, _items(30))
    reply = wait_for(lambda: (r := serving.get("/recommend", user_id="u", k=5)).status_code == 200 and r, timeout=20)
    assert len(reply.json()["items"]) == 5 and not reply.json()["cold_start"]


def test_a_blob_that_does_not_decode_is_refused_once_and_the_poll_goes_on(
        ps: ParamClient, param_server: ServerProcess, redis_url: str, prefix: str,
        start_serving: StartServing) -> None:
    """Blobs come from whoever may put one. A catalogue, kNN or ranker blob that does not decode
    used to fail every poll until a good one was published: new items were never served. Now the
    version is refused once (named in /readyz, counted), the version before stays in use, the
    item delta is applied in the same poll, and a later good version is taken."""
    items = _items(30)
    load_model(ps, {"u": np.ones(DIM, np.float32)}, items)
    ids = list(items)
    good_knn = encode_neighbors(ids, np.tile(np.arange(1, 4, dtype=np.int32), (len(ids), 1)),
                                np.ones((len(ids), 3), np.float32))
    ps.put_blob(KNN_BLOB, good_knn)
    serving = start_serving(param_server.address, redis_url, prefix, poll=0.5)
    good_version = wait_for(lambda: serving.get("/readyz").json()["artifacts"].get(KNN_BLOB))
    pointing_outside = encode_neighbors(ids, np.full((len(ids), 3), 1000, np.int32), np.ones((len(ids), 3), np.float32))
    bad = {CATALOGUE_BLOB: b"SRDENSE1garbage", KNN_BLOB: pointing_outside,
           RANKER_BLOB: encode_dense({"format": "streamrec-ranker/1", "model": "deepfm", "kind": "deepfm",
                                      "dims": {"n_users": 10**9, "n_items": 1, "user_cards": [], "item_cards": [],
                                               "n_genres": 0}, "params": {"dim": 64, "hidden": "", "dropout": 0.0}},
                                     {})}  # a header asking for 256 GB of embeddings, and no weights
    for name, data in bad.items():
        ps.put_blob(name, data)
    ps.assign("bpr_items", ["new"], np.full((1, DIM), 10, np.float32), np.zeros(1, np.float32))
    ready = wait_for(lambda: (r := serving.get("/readyz").json())["index_items"] == 31 and len(r["refused_artifacts"]) == 3
                     and r)
    assert ready["artifacts"] == {KNN_BLOB: good_version} and ready["last_error"] is None
    assert "neighbour blob points outside" in ready["refused_artifacts"][KNN_BLOB]
    assert "header and weights disagree" in ready["refused_artifacts"][RANKER_BLOB]
    assert serving.get("/recommend", user_id="u", k=1).json()["items"][0]["item_id"] == "new"
    assert serving.get("/similar/i0", k=3).status_code == 200  # the kNN lists before are still used
    refusals = {line.split('"')[1]: line.split()[-1] for line in serving.get("/metrics").text.splitlines()
                if line.startswith("streamrec_serving_artifact_refusals_total{")}
    # once each, not per poll; the table alias's series is declared too, at 0 (no alias was put)
    assert refusals == {KNN_BLOB: "1.0", RANKER_BLOB: "1.0", CATALOGUE_BLOB: "1.0", "tables/bpr_items": "0.0"}
    ps.put_blob(KNN_BLOB, good_knn)
    ready = wait_for(lambda: KNN_BLOB not in (r := serving.get("/readyz").json())["refused_artifacts"] and r)
    assert ready["artifacts"][KNN_BLOB] > good_version


def test_the_workers_stop_when_their_supervisor_is_sigkilled(ps: ParamClient, param_server: ServerProcess,
                                                             redis_url: str, prefix: str,
                                                             start_serving: StartServing) -> None:
    """`streamrec serve --workers 2` is uvicorn's supervisor and two worker processes. SIGTERM to the
    supervisor stops them all; a SIGKILLed supervisor left both workers answering on the port,
    owned by nobody. Each worker now watches its supervisor and stops when it is gone."""
    load_model(ps, {"u": np.ones(DIM, np.float32)}, _items(30))
    serving = start_serving(param_server.address, redis_url, prefix, workers=2)
    workers: set[int] = set()
    wait_for(lambda: workers.add(serving.fresh_get("/readyz").json()["pid"]) or len(workers) == 2, timeout=30)
    serving.proc.kill()  # the supervisor alone: its workers are in its group but get no signal
    serving.proc.wait()
    assert wait_gone(sorted(workers), timeout=20) == [], "workers outlived their supervisor"
