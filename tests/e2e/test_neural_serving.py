"""Neural families wired into serving: a refit publishes a two-tower model's vectors and serving
retrieves with them; a refit publishes a DeepFM ranker and serving rescores with it."""

from __future__ import annotations

import time
import uuid

import numpy as np
import pytest

from streamrec.param_server.client import ParamClient
from streamrec.stream.loaders import InteractionLog
from tests.serving.conftest import serving_factory, start_param_server, write_history
from tests.trainer_online.conftest import planted_events
from streamrec.trainer.interactions import Interactions
from streamrec.trainer.models.neural.ctr import load_ranker
from streamrec.trainer.online.feature_store import FeatureStore, FeatureStoreConfig
from streamrec.trainer.models import create
from streamrec.trainer.refit import publish


def planted_interactions(n: int = 4000) -> Interactions:
    events = planted_events(n, users=120)
    log = InteractionLog(
        np.array([e["user_id"] for e in events], object), np.array([e["item_id"] for e in events], object),
        np.full(n, np.nan), np.array([e["timestamp"] for e in events]),
    )
    return Interactions.from_log(log, implicit=True)


@pytest.fixture
def stack(tmp_path, redis_url):
    server = start_param_server(tmp_path / "ps")
    start, started = serving_factory(tmp_path / "serving")
    yield server, start
    for serving in started:
        serving.stop()
    server.kill()


def wait_for(predicate, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise TimeoutError("condition not reached")


def test_two_tower_vectors_served_after_refit(stack, redis_url):
    server, start = stack
    data = planted_interactions()
    model = create("youtube-dnn", epochs=3, dim=16, hidden="32", negatives=64, batch_size=256, seed=0).fit(data)
    with ParamClient([server.address]) as client:
        written = publish(client, model, version=1)
    assert {"refit_youtube_dnn_items", "refit_youtube_dnn_users"} <= set(written["aliases"])
    serving = start(server.address, redis_url, f"e2e{uuid.uuid4().hex[:8]}",
                    args=("--user-table", "refit_youtube_dnn_users", "--item-table", "refit_youtube_dnn_items",
                          "--index", "flat"))
    users = ["u0", "u1", "u5"]
    expected_ids, _ = model.recommend(users, k=10, exclude_seen=False)
    for user, expected in zip(users, expected_ids):
        reply = serving.get("/recommend", user_id=user, k=10, exclude_seen="false")
        assert reply.status_code == 200, reply.text
        served = [item["item_id"] for item in reply.json()["items"]]
        # the same top 10 as the model itself (exact search; float32 ties may swap neighbours)
        assert len(set(served) & set(expected.tolist())) >= 9, (served, expected)


def test_deepfm_ranker_rescores_candidates(stack, redis_url):
    """The ranker scores as the model does; with `user_history` (DeepFM's default) it pools the
    user's items as Redis has them now, so an event after the refit moves the ranking at once."""
    server, start = stack
    data = planted_interactions()
    bpr = create("bpr", factors=16, epochs=20, seed=0).fit(data)
    ranker = create("deepfm", epochs=2, dim=8, hidden="32", seed=0).fit(data)
    with ParamClient([server.address]) as client:
        publish(client, bpr, version=1)
        written = publish(client, ranker, version=1)
    assert "refit/ranker" in written["blobs"]
    prefix = f"e2e{uuid.uuid4().hex[:8]}"
    serving = start(server.address, redis_url, prefix,
                    args=("--user-table", "refit_bpr_users", "--item-table", "refit_bpr_items", "--index", "flat"))
    ready = wait_for(lambda: serving.get("/readyz").json().get("artifacts"))
    assert "refit/ranker" in ready
    candidates = [f"i{i}" for i in range(0, 100, 7)]
    reply = serving.http.post("/rescore", json={"user_id": "u3", "candidates": candidates})
    assert reply.status_code == 200, reply.text
    served = reply.json()["items"]
    expected = 1 / (1 + np.exp(-ranker.score(["u3"] * len(candidates), candidates)))  # logits -> probability
    order = [candidates[i] for i in np.argsort(-expected, kind="stable")]
    assert [item["item_id"] for item in served] == order
    assert np.allclose([item["score"] for item in served], np.sort(expected)[::-1], atol=1e-5)
    explained = serving.get("/recommend", user_id="u3", k=5, explain="true").json()
    assert explained["explain"]["ranker"] == "deepfm"
    # events after the refit, through the online trainer's own writer
    store = FeatureStore.from_url(redis_url, FeatureStoreConfig(prefix=prefix))
    write_history(store, [("u3", "i5", 2e9), ("u3", "i61", 2e9 + 1)])
    export = ranker.export().ranker
    live = load_ranker(export.header, export.arrays).score(["u3"] * len(candidates), candidates, history={"i5", "i61"})
    assert not np.allclose(live, expected, atol=1e-5)
    # Redis answered: a read that timed out (100 ms, on a loaded machine) is served without the
    # history and says so (`degraded: ["redis"]`), and Redis is skipped for the next second; that
    # path is tested apart (tests/serving/test_sync.py), here the history must be read
    moved = wait_for(lambda: (reply := serving.http.post(
        "/rescore", json={"user_id": "u3", "candidates": candidates}).json())["degraded"] == [] and reply)["items"]
    assert [item["item_id"] for item in moved] == [candidates[i] for i in np.argsort(-live, kind="stable")]
    assert np.allclose([item["score"] for item in moved], np.sort(live)[::-1], atol=1e-5)
