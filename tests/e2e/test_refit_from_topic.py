"""`streamrec refit --from topic`: the batch model is fitted on the interaction topic read from its
beginning and published to a running parameter server."""

from __future__ import annotations

import json
import os
import subprocess

from streamrec.param_server.client import ParamClient
from streamrec.stream.topics import create_topics
from tests.conftest import settings_env
from tests.trainer_online.conftest import STREAMREC, planted_events, produce_events


def test_refit_reads_the_topic_and_publishes(settings, start_server):
    create_topics(settings.kafka_bootstrap, [settings.topic, settings.dlq_topic], 3)
    produce_events(settings, planted_events(3000))
    server = start_server("--no-checkpoints")
    env = {**os.environ, **settings_env(settings), "STREAMREC_PARAM_SERVERS": server.address}
    result = subprocess.run([STREAMREC, "refit", "--model", "item-knn", "--from", "topic"], env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout.splitlines()[-1])
    assert report["events"] == 3000 and report["items"] == 100
    with ParamClient([server.address]) as client:
        blobs = client.blobs()
    assert "refit/item-knn/neighbors" in blobs and "refit/item-knn/manifest" in blobs
