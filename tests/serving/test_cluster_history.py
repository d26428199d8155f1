"""Serving against a feature store on a real Redis Cluster (3 masters, 3 replicas): the seen
filter reads the user's history from the user's bucket, cold start reads trending merged over
every bucket, with `STREAMREC_REDIS_CLUSTER=true` and the URL of any one node."""

from __future__ import annotations

import numpy as np

from streamrec.param_server.client import ParamClient
from streamrec.trainer.online.feature_store import FeatureStore, FeatureStoreConfig
from tests.param_server.conftest import ServerProcess
from tests.redis_cluster import RedisCluster
from tests.serving.conftest import StartServing, load_model, write_history

DIM = 4


def test_serving_reads_history_and_trending_from_a_cluster(ps: ParamClient, param_server: ServerProcess,
                                                          redis_cluster: RedisCluster, start_serving: StartServing) -> None:
    rng = np.random.default_rng(3)
    items = {f"i:{j}": v for j, v in enumerate(rng.normal(size=(40, DIM)).astype(np.float32))}
    load_model(ps, {"u{1}": np.ones(DIM, np.float32)}, items)
    store = FeatureStore.from_url(redis_cluster.url, FeatureStoreConfig(prefix="cluster-serving", cluster=True))
    serving = start_serving(param_server.address, redis_cluster.url, "cluster-serving", poll=0.5,
                            extra_env={"STREAMREC_REDIS_CLUSTER": "true"})
    full = [item["item_id"] for item in serving.get("/recommend", user_id="u{1}", k=5).json()["items"]]
    # the user saw the top two; "i:7" is trending (every other user's events are on it)
    write_history(store, [("u{1}", full[0], 1e9), ("u{1}", full[1], 1e9 + 1)]
                  + [(f"v{k}", "i:7", 1e9 + 2 + k) for k in range(30)])
    filtered = serving.get("/recommend", user_id="u{1}", k=5).json()
    shown = [item["item_id"] for item in filtered["items"]]
    assert filtered["degraded"] == [] and full[0] not in shown and full[1] not in shown and len(shown) == 5
    cold = serving.get("/recommend", user_id="nobody", k=3).json()
    assert cold["cold_start"] and cold["items"][0]["item_id"] == "i:7" and cold["items"][0]["sources"] == ["trending"]
    store.clear()
