"""The HTTP API of one worker against a parameter server loaded with known vectors and a Redis
feature store with known history: exact results, filters, cold start, kNN, errors, metrics."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pytest
from fastapi.exceptions import RequestValidationError

from streamrec.param_server.artifacts import KNN_BLOB, encode_neighbors
from streamrec.param_server.client import ParamClient
from streamrec.serving import schemas
from streamrec.serving.app import validation_refusal
from streamrec.trainer.online.feature_store import FeatureStore, FeatureStoreConfig
from streamrec.trainer.online.session import SESSION_FADE, SESSION_WEIGHT, faded_weight
from tests.serving.conftest import (
    Serving,
    load_model,
    serving_factory,
    start_param_server,
    write_history,
)

DIM, N_ITEMS, N_USERS = 8, 40, 5
SEEN = ["i3", "i7"]  # u1's history (i7 most recent)
POPULAR = ["i30", "i31", "i32"]  # i30 most popular


# A tiny model served by a second worker for the MMR test: user (1, 0) and five items whose
# scores (dot + bias) are 1.0, 0.9, 0.5, 0.6, 0.0 and whose cosines are easy to see.
TINY_USER = np.array([1.0, 0.0], np.float32)
TINY_ITEMS = {  # item: (vector, bias)
    "a": ((1.0, 0.0), 0.0),  # score 1.0
    "b": ((0.5, 0.0), 0.4),  # score 0.9, same direction as a
    "c": ((0.0, 1.0), 0.5),  # score 0.5, orthogonal to a and b
    "d": ((0.6, 0.8), 0.0),  # score 0.6, cos 0.6 with a and b, 0.8 with c
    "e": ((0.0, -1.0), 0.0),  # score 0.0, opposite c, orthogonal to a and b
}


@dataclass
class World:
    serving: Serving
    tiny: Serving  # serves the TINY_ITEMS tables
    users: np.ndarray
    items: np.ndarray
    bias: np.ndarray

    def scores(self, user: int) -> np.ndarray:
        """The online model's score: the user's row plus, for u1, their current session (i3, i7:
        two events, so the faded weight is 4 * 2 / (2 + 2) = 2) times its mean item vector."""
        vector = self.users[user]
        if user == 1:
            vector = vector + faded_weight(SESSION_WEIGHT, SESSION_FADE, 2.0) * self.items[[3, 7]].mean(axis=0)
        return self.items @ vector + self.bias

    def top(self, user: int, k: int, exclude: tuple[str, ...] = ()) -> list[str]:
        scores = self.scores(user)
        order = [f"i{j}" for j in np.argsort(-scores, kind="stable")]
        return [i for i in order if i not in exclude][:k]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, redis_url: str) -> Iterator[World]:
    home = tmp_path_factory.mktemp("serving-api")
    server = start_param_server(home / "ps")
    rng = np.random.default_rng(7)
    users = rng.normal(size=(N_USERS, DIM)).astype(np.float32)
    items = rng.normal(size=(N_ITEMS, DIM)).astype(np.float32)
    bias = rng.normal(scale=0.1, size=N_ITEMS).astype(np.float32)
    prefix = f"test-serving-{uuid.uuid4().hex[:10]}"
    tiny_prefix = f"test-serving-tiny-{uuid.uuid4().hex[:10]}"  # no history: no trending, nothing seen
    start, started = serving_factory(home)
    try:
        with ParamClient([server.address]) as client:
            load_model(client, {f"u{u}": users[u] for u in range(N_USERS)}, {f"i{j}": items[j] for j in range(N_ITEMS)}, bias)
            # item-kNN: every item's neighbours are the next three items
            neighbors = (np.arange(N_ITEMS)[:, None] + np.arange(1, 4)) % N_ITEMS
            client.put_blob(KNN_BLOB, encode_neighbors([f"i{j}" for j in range(N_ITEMS)], neighbors,
                                                       np.tile([0.9, 0.8, 0.7], (N_ITEMS, 1))))
            client.create_table("tiny_users", 2)
            client.create_table("tiny_items", 2, scalars=1)
            client.assign("tiny_users", ["u"], TINY_USER[None])
            client.assign("tiny_items", list(TINY_ITEMS), np.array([v for v, _ in TINY_ITEMS.values()], np.float32),
                          np.array([b for _, b in TINY_ITEMS.values()], np.float32))
        store = FeatureStore.from_url(redis_url, FeatureStoreConfig(prefix=prefix))
        write_history(store, [("u1", "i3", 1e9), ("u1", "i7", 1e9 + 1)]
                      + [("x", item, 1e9 + 2) for item, n in zip(POPULAR, (3, 2, 1)) for _ in range(n)])
        serving = start(server.address, redis_url, prefix, args=("--index", "flat"))
        tiny = start(server.address, redis_url, tiny_prefix,
                     args=("--index", "flat", "--user-table", "tiny_users", "--item-table", "tiny_items"))
        yield World(serving, tiny, users.astype(np.float64), items.astype(np.float64), bias.astype(np.float64))
    finally:
        for s in started:
            s.stop()
        server.kill()
        for name in (prefix, tiny_prefix):
            FeatureStore.from_url(redis_url, FeatureStoreConfig(prefix=name)).clear()


def test_exact_top_k(world: World) -> None:
    for user in range(N_USERS):
        reply = world.serving.get("/recommend", user_id=f"u{user}", k=10, exclude_seen="false")
        assert reply.status_code == 200, reply.text
        body = schemas.RecommendResponse.model_validate(reply.json())
        assert [item.item_id for item in body.items] == world.top(user, 10)
        expected = world.scores(user)[[int(item.item_id[1:]) for item in body.items]]
        assert [item.score for item in body.items] == pytest.approx(expected.tolist(), rel=1e-5)
        assert not body.cold_start and body.degraded == [] and body.model_version > 0
        assert body.session == (2 if user == 1 else None)
        assert 0 <= body.staleness_seconds < 5
        assert all("ann" in item.sources for item in body.items)  # the flat index holds all 40 items


def test_seen_filter(world: World) -> None:
    reply = world.serving.get("/recommend", user_id="u1", k=N_ITEMS).json()
    assert [item["item_id"] for item in reply["items"]] == world.top(1, N_ITEMS, exclude=tuple(SEEN))
    unfiltered = world.serving.get("/recommend", user_id="u1", k=N_ITEMS, exclude_seen="false").json()
    assert set(SEEN) <= {item["item_id"] for item in unfiltered["items"]}


def test_item_knn_and_trending_sources_and_explain(world: World) -> None:
    body = world.serving.get("/recommend", user_id="u1", k=N_ITEMS, explain="true").json()
    explain = schemas.Explain.model_validate(body["explain"])
    # recent items i7, i3 -> neighbours i8, i9, i10, i4, i5, i6; trending i30, i31, i32, i3, i7
    assert explain.candidates == {"ann": N_ITEMS, "item_knn": 6, "trending": 5}
    assert explain.union == N_ITEMS and explain.seen_filtered == 2 and explain.lambda_ == 1.0
    sources = {item["item_id"]: item["sources"] for item in body["items"]}
    assert sources["i8"] == ["ann", "item_knn"] and sources["i30"] == ["ann", "trending"]
    i8 = next(item for item in body["items"] if item["item_id"] == "i8")
    assert i8["knn_score"] == pytest.approx(0.9) and i8["dot"] + i8["bias"] == pytest.approx(i8["score"], rel=1e-6)


def test_diversity_is_mmr(world: World) -> None:
    """MMR by hand, lambda = 1 - diversity = 0.5, value = 0.5 * rel - 0.5 * max cos to the picked.
    Scores a 1.0, b 0.9, d 0.6, c 0.5, e 0.0 -> rel (min-max over 0..1) is the score itself.
      pick 1: 0.5 * rel: a .5, b .45, d .3, c .25, e 0                          -> a (0.5)
      pick 2: max cos to {a}: b 1, d .6, c 0, e 0
              b .45 - .5 = -.05, d .3 - .3 = 0, c .25 - 0 = .25, e 0 - 0 = 0    -> c (0.25)
      pick 3: max cos to {a, c}: b 1, d max(.6, .8) = .8, e max(0, -1) = 0
              b -.05, d .3 - .4 = -.1, e 0                                       -> e (0.0)
      pick 4: max cos to {a, c, e}: b 1, d .8: b -.05, d -.1                     -> b (-0.05)
      pick 5:                                                                    -> d (-0.1)
    Pure relevance orders them a, b, d, c, e."""
    body = world.tiny.get("/recommend", user_id="u", k=5, diversity=0.5, explain="true").json()
    assert [item["item_id"] for item in body["items"]] == ["a", "c", "e", "b", "d"]
    assert [item["mmr"] for item in body["items"]] == pytest.approx([0.5, 0.25, 0.0, -0.05, -0.1], abs=1e-6)
    assert [item["score"] for item in body["items"]] == pytest.approx([1.0, 0.5, 0.0, 0.9, 0.6], abs=1e-6)
    relevance = world.tiny.get("/recommend", user_id="u", k=5).json()
    assert [item["item_id"] for item in relevance["items"]] == ["a", "b", "d", "c", "e"]


def test_cold_start_user_gets_trending(world: World) -> None:
    body = world.serving.get("/recommend", user_id="newcomer", k=2).json()
    assert body["cold_start"] is True
    assert [(item["item_id"], item["sources"]) for item in body["items"]] == [("i30", ["trending"]), ("i31", ["trending"])]


def test_a_short_trending_list_is_filled_to_k_by_the_items_of_largest_bias(world: World) -> None:
    """Trending holds five items; a cold user asking for 8 got those five, though 40 items exist
    (a filter that allows everything gave 8: that path already filled from the bias prior)."""
    body = world.serving.get("/recommend", user_id="newcomer", k=8).json()
    trending = ["i30", "i31", "i32", "i3", "i7"]
    by_bias = [f"i{j}" for j in np.argsort(-world.bias, kind="stable") if f"i{j}" not in trending]
    ids = [item["item_id"] for item in body["items"]]
    assert sorted(ids[:5]) == sorted(trending) and ids[5:] == by_bias[:3]
    assert [item["sources"] for item in body["items"]] == [["trending"]] * 5 + [["prior"]] * 3


def test_rescore_reports_unknown(world: World) -> None:
    reply = world.serving.http.post("/rescore", json={"user_id": "u2", "candidates": ["i5", "nope", "i1", "i5"]})
    body = schemas.RescoreResponse.model_validate(reply.json())
    scores = world.scores(2)
    expected = sorted(["i5", "i1"], key=lambda i: -scores[int(i[1:])])
    assert [item.item_id for item in body.items] == expected and body.unknown == ["nope"]
    assert [item.score for item in body.items] == pytest.approx([scores[int(i[1:])] for i in expected], rel=1e-5)
    cold = world.serving.http.post("/rescore", json={"user_id": "newcomer", "candidates": ["i5"]}).json()
    assert cold["cold_start"] and cold["items"][0]["score"] == pytest.approx(world.bias[5], rel=1e-5)


def test_similar(world: World) -> None:
    body = schemas.SimilarResponse.model_validate(world.serving.get("/similar/i4", k=3).json())
    unit = world.items / np.linalg.norm(world.items, axis=1, keepdims=True)
    cosine = unit @ unit[4]
    cosine[4] = -np.inf
    expected = np.argsort(-cosine)[:3]
    assert [item.item_id for item in body.items] == [f"i{j}" for j in expected]
    assert [item.score for item in body.items] == pytest.approx(cosine[expected].tolist(), rel=1e-5)
    assert [(n.item_id, n.score) for n in body.item_knn] == [("i5", pytest.approx(0.9)), ("i6", pytest.approx(0.8)),
                                                              ("i7", pytest.approx(0.7))]
    missing = world.serving.get("/similar/unknown-item")
    assert missing.status_code == 404 and "unknown item" in missing.json()["detail"]


@pytest.mark.parametrize("params", [
    {"user_id": "u1", "k": 0}, {"user_id": "u1", "k": 1001}, {"user_id": "u1", "k": "ten"},
    {"user_id": "u1", "diversity": 1.5}, {"user_id": "u1", "diversity": -0.1}, {"k": 5}, {"user_id": ""},
    {"user_id": "u1", "exclude_seen": "maybe"},
])
def test_bad_recommend_parameters(world: World, params: dict) -> None:
    reply = world.serving.get("/recommend", **params)
    assert reply.status_code == 422 and reply.json()["detail"][0]["msg"]


def test_bad_rescore_and_similar_bodies(world: World) -> None:
    http = world.serving.http
    assert http.post("/rescore", json={"user_id": "u1", "candidates": []}).status_code == 422
    assert http.post("/rescore", json={"user_id": "u1"}).status_code == 422
    unknown = http.post("/rescore", json={"user_id": "u1", "candidates": ["i1"], "k": 5})
    assert unknown.status_code == 422 and "k" in unknown.text  # ignored before: the client never learned
    assert http.post("/rescore", content=b"not json", headers={"content-type": "application/json"}).status_code == 422
    assert http.post("/rescore", json={"user_id": "u1", "candidates": ["x"] * 10_001}).status_code == 422
    assert world.serving.get("/similar/i1", k=5000).status_code == 422
    assert world.serving.get("/recommend", user_id="u1", k=1000).status_code == 200  # the bound itself is fine
    # non-finite numbers parse (json.loads), fail validation, and the 422 that echoes them was a 500
    # and inputs orjson cannot write back: an integer past 64 bits, arrays nested 300 deep
    for body in (b'{"user_id": 1e309, "candidates": ["i1"]}', b'{"user_id": NaN, "candidates": ["i1"]}',
                 b'{"user_id": "u1", "candidates": ["i1"], "x": -Infinity}',
                 b'{"user_id": 1' + b"0" * 30 + b', "candidates": ["i1"]}',
                 b'{"user_id": ' + b"[" * 300 + b"]" * 300 + b', "candidates": ["i1"]}',
                 b'{"user_id": "u1", "candidates": ["i1"], "\\ud800": "\\udea3"}'):  # lone surrogates
        refused = http.post("/rescore", content=body, headers={"content-type": "application/json"})
        assert refused.status_code == 422 and refused.json()["detail"], (body, refused.text)
    # more digits than int() converts: the direct route raised, a 500
    assert world.serving.get("/recommend", user_id="u1", k="0" * 5000 + "5").status_code == 200
    assert world.serving.get("/recommend", user_id="u1", k="9" * 5000).status_code == 422


def test_health_ready_metrics_openapi(world: World) -> None:
    assert world.serving.get("/healthz").json()["alive"] is True
    ready = schemas.Ready.model_validate(world.serving.get("/readyz").json())
    assert ready.ready and ready.index_items == N_ITEMS and ready.users == N_USERS and KNN_BLOB in ready.artifacts
    world.serving.get("/recommend", user_id="u3")
    text = world.serving.get("/metrics").text
    for name in ('streamrec_serving_request_seconds_bucket{endpoint="/recommend"', "streamrec_serving_requests_total",
                 'streamrec_serving_errors_total{endpoint="/recommend",status="422"}',
                 'streamrec_serving_candidates_total{source="ann"}', "streamrec_serving_model_version",
                 "streamrec_serving_staleness_seconds", "streamrec_serving_index_items 40.0",
                 "streamrec_serving_sync_seconds_count"):
        assert name in text, name
    paths = world.serving.get("/openapi.json").json()["paths"]
    assert {"/recommend", "/rescore", "/similar/{item_id}", "/healthz", "/readyz", "/metrics"} <= set(paths)


@pytest.mark.parametrize(("direct", "through_fastapi"), [
    ({"user_id": "u2", "k": 5, "exclude_seen": "false"}, {"user_id": "u2", "k": "+5", "exclude_seen": "False"}),
    ({"user_id": "u1", "k": 7, "explain": "true"}, {"user_id": "u1", "k": "7.0", "explain": "yes"}),
])
def test_direct_route_and_fastapi_route_answer_alike(world: World, direct: dict, through_fastapi: dict) -> None:
    """Plain queries take streamrec.serving.fastpath, the odd-but-valid forms FastAPI's route."""
    answers = [world.serving.get("/recommend", **params) for params in (direct, through_fastapi)]
    assert [a.status_code for a in answers] == [200, 200]
    assert [a.headers["content-type"] for a in answers] == ["application/json"] * 2
    bodies = [a.json() for a in answers]
    request_ids = {body.pop("request_id") for body in bodies}  # one per answer
    assert len(request_ids) == 2 and all(len(r) == 32 for r in request_ids)
    for body in bodies:
        body.pop("staleness_seconds")
    assert bodies[0] == bodies[1]


@pytest.mark.parametrize("error", [
    {"type": "extra_forbidden", "loc": ("body", "\ud800"), "msg": "Extra inputs are not permitted", "input": "\udea3"},
    {"type": "string_type", "loc": ("body", "user_id"), "msg": "Input should be a valid string", "input": 10**30},
    {"type": "string_type", "loc": ("body", "user_id"), "msg": "Input should be a valid string", "input": float("nan")},
])
def test_a_refusal_is_written_whatever_input_it_echoes(error: dict) -> None:
    """FastAPI's 422 echoes the input; what its encoder (NaN) or orjson (integers past 64 bits,
    lone surrogates) cannot write made the refusal itself a 500 (schemathesis found the surrogate)."""
    reply = asyncio.run(validation_refusal(None, RequestValidationError([error])))
    assert reply.status_code == 422
    [detail] = json.loads(reply.body)["detail"]
    assert detail["type"] == error["type"] and detail["loc"] == list(error["loc"])
