"""Availability through the items topic, end to end: a product service's patch (`in_stock` false)
goes through the real broker, `streamrec catalogue follow` and the parameter server to a serving
worker whose configured rule is `exclude=in_stock:false`, and the item leaves `/recommend`; the
patch back brings it back. No file is published at any point."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import uuid
from pathlib import Path

import numpy as np

from streamrec.core.config import Settings
from streamrec.param_server.client import ParamClient
from streamrec.stream.kafka import make_producer
from streamrec.stream.topics import create_topics
from streamrec.trainer.online.feature_store import FeatureStore, FeatureStoreConfig
from tests.conftest import settings_env
from tests.serving.conftest import STREAMREC, StartServing, load_model, start_param_server, wait_for

DIM, N_ITEMS = 8, 30


def send(settings: Settings, records: list[dict[str, object]]) -> None:
    with make_producer(settings.kafka_bootstrap) as producer:
        for record in records:
            producer.send(settings.items_topic, json.dumps(record).encode(), key=str(record["item_id"]).encode())
        producer.flush()


def test_an_out_of_stock_patch_on_the_items_topic_takes_the_item_out_of_recommendations(
        settings: Settings, redis_url: str, tmp_path: Path, start_serving: StartServing) -> None:
    server = start_param_server(tmp_path / "ps")
    rng = np.random.default_rng(5)
    user, items = rng.normal(size=DIM).astype(np.float32), rng.normal(size=(N_ITEMS, DIM)).astype(np.float32)
    ranked = [f"i{j}" for j in np.argsort(-(items @ user), kind="stable")]
    prefix = f"test-items-topic-{uuid.uuid4().hex[:10]}"
    env = {**os.environ, **settings_env(settings), "STREAMREC_PARAM_SERVERS": server.address}
    env.pop("STREAMREC_PARAM_SERVER_TOKEN", None)
    follower = subprocess.Popen([STREAMREC, "catalogue", "follow", "--interval", "0.2"], env=env,
                                stdout=subprocess.DEVNULL, stderr=(tmp_path / "follow.log").open("w"))
    try:
        with ParamClient([server.address]) as client:
            load_model(client, {"u0": user}, {f"i{j}": items[j] for j in range(N_ITEMS)})
        create_topics(settings.kafka_bootstrap, [settings.items_topic], settings.topic_partitions)
        send(settings, [{"item_id": f"i{j}", "in_stock": True, "genre": "g"} for j in range(N_ITEMS)])
        serving = start_serving(server.address, redis_url, prefix,
                                extra_env={"STREAMREC_ITEM_RULES": "exclude=in_stock:false"})

        def top(k: int = 5) -> list[str]:
            reply = serving.get("/recommend", user_id="u0", k=k, include="genre:g")
            return [item["item_id"] for item in reply.json()["items"]] if reply.status_code == 200 else []

        wait_for(lambda: top() == ranked[:5], timeout=30)
        send(settings, [{"item_id": ranked[0], "op": "patch", "in_stock": False}])
        wait_for(lambda: top() == ranked[1:6], timeout=30)
        assert top(N_ITEMS) == ranked[1:]  # a filtered request still returns every allowed item
        send(settings, [{"item_id": ranked[0], "op": "patch", "in_stock": True}])
        wait_for(lambda: top() == ranked[:5], timeout=30)
    finally:
        follower.send_signal(signal.SIGTERM)
        try:
            assert follower.wait(60) == 0, (tmp_path / "follow.log").read_text()
        finally:  # the server and the keys go even when the follower did not stop cleanly
            server.kill()
            FeatureStore.from_url(redis_url, FeatureStoreConfig(prefix=prefix)).clear()
